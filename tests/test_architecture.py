"""The import contracts of ``pyproject.toml`` (``[tool.importlinter]``), checked by import-linter.

Layers jobs/tune → mask.pipeline → library, the library free of the pipeline and of Ray, a one-way
order inside mask.pipeline, and no import cycle in any package.  A few seconds: grimp parses the
sources, nothing is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"lint-imports not found next to {sys.executable}: install the dev extra (import-linter)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(exe), "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    res = _lint_imports(ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "0 broken" in out
    # every contract of pyproject.toml was checked (a contract dropped from the file shows here)
    for name in ("Entry points → pipeline", "The library", "mask.pipeline flows one way", "No import cycles"):
        assert name in out, out


def test_function_level_imports_count(tmp_path):
    """The tool sees an import inside a function: a cycle hidden in a function body breaks the contract."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyc import a  # hidden in a function\n    return a\n")
    cfg = tmp_path / "contracts.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["cyc"]

        [[tool.importlinter.contracts]]
        name = "no cycles"
        type = "acyclic_siblings"
        ancestors = ["cyc"]
    """))
    res = _lint_imports(tmp_path, cfg)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "BROKEN" in res.stdout
