"""The code version recorded in manifests and runs: the package version plus the git commit when known."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import mask

logger = logging.getLogger(__name__)


def _git_sha(repo: Path) -> str | None:
    """HEAD commit of the checkout at ``repo`` by reading .git directly (no subprocess)."""
    try:
        git = repo / ".git"
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            git = (repo / text.split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            f = base / ref
            if f.is_file():
                return f.read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``mask.__version__``, plus ``+g<sha12>`` when the package runs from a git checkout with commits."""

    version = mask.__version__
    sha = _git_sha(Path(mask.__file__).resolve().parent.parent)
    return f"{version}+g{sha[:12]}" if sha else version
