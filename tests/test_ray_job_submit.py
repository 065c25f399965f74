"""The main job works unchanged through ``ray job submit`` against a running Ray head (on loopback).

Starts ``ray start --head --block`` by PID, submits ``jobs/build_knowledge.py`` on a small slice of the
demo world, checks the knowledge is committed, and stops the head by the PID it started (SIGINT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.integration
@pytest.mark.slow  # ~3 min: a second Ray head; run with --runslow (flaky under heavy load: job agent start-up)
def test_ray_job_submit_main_job(tmp_path):
    port, dash = free_port(), free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(dash, timeout=120)
        root = tmp_path / "artifacts"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
               str(ROOT), "--runtime-env-json",
               json.dumps({"excludes": [".venv", "artifacts", ".git", ".plan", "bench/out"]}),
               "--", "python", "jobs/build_knowledge.py", f"storage.root={root}", "dataset.limit=24",
               "gallery.limit=8", "train.epochs=2", "detector.rpn_post_nms_topk=40"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard port opens before the head's job agent is ready to take jobs
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in (out.stdout + out.stderr)
        knowledge = list((root / "knowledge").glob("*/_MANIFEST.json"))
        assert len(knowledge) == 1
        assert "| mask |" in out.stdout
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGINT)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
