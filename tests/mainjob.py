"""One run of the main job on a slice of the demo world, shared by the modules that test its outputs.

``jobs/build_knowledge.py`` runs once per test session as a user starts it (a subprocess with its own local
Ray, beside the session's Ray); conftest.py keeps its storage root as a snapshot and restores it for each
module that uses it (fixtures ``main_job_once`` and ``main_job``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: 48 training and 10 gallery images, 2 epochs: every stage (extraction, Ray Train, knowledge, μ, the
#: committed index, MLflow, the registry) on the smallest slice the tests of its outputs need.
MAIN_JOB_SLICE = ["dataset.limit=48", "gallery.limit=10", "train.epochs=2", "train.checkpoint_every=1",
                  "detector.batch_size=6", "detector.rpn_post_nms_topk=40", "scoring.top_k=20"]


@dataclass
class MainJobRun:
    """What the run printed and left: its storage root (and the snapshot of it), exit status, output."""

    root: Path
    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    snapshot: Path | None = None


def summary_json(output: str) -> dict[str, Any]:
    """The job's summary: the last top-level JSON object it printed (``ray job submit`` prints more after it)."""
    start = output.rfind("\n{\n")
    end = output.find("\n}\n", start)
    if start < 0 or end < 0:
        raise AssertionError(f"no JSON summary in the job output: ...{output[-2000:]}")
    return json.loads(output[start + 1:end + 2])


def summary_of(stdout: str) -> dict[str, Any]:
    """The job's summary as ``main()`` returns it: :func:`summary_json`, with the results table it prints
    before it back in ``evaluation.table``."""
    summary = summary_json(stdout)
    if "evaluation" in summary:
        summary["evaluation"]["table"] = stdout[:stdout.rfind("\n{\n") + 1]
    return summary


def run_main_job(root: Path, *more: str, timeout: float = 900) -> MainJobRun:
    """``python jobs/build_knowledge.py storage.root=ROOT MAIN_JOB_SLICE... MORE...`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_knowledge.py"), f"storage.root={root}",
                        *MAIN_JOB_SLICE, *more], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=str(ROOT))
    return MainJobRun(root, p.returncode, p.stdout, p.stderr, summary_of(p.stdout) if p.returncode == 0 else {})
