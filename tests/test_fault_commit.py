"""A process lost while it commits a manifest: the artifact is committed whole or not at all, and the
rerun completes (every image exactly once).  The job runs in its own process (its own local Ray) and
is SIGKILLed at ``commit.features`` (mask.faults), just before the features manifest would land."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline_extract import DETECTOR, PHOTOS, _committed, _photo_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_killed_at_manifest_commit_leaves_nothing_half_committed_and_rerun_completes(tmp_path):
    from mask.config import load_config
    from mask.pipeline.identity import features_rel
    from mask.storage import Store

    folder = _photo_folder(tmp_path / "photos", 4)
    root = tmp_path / "art"
    args = ["--target", "gallery", f"storage.root={root}", "tracking.enabled=false", "gallery.kind=folder",
            f"gallery.path={folder}", "gallery.name=photos", "ray.num_cpus=2", *DETECTOR]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, str(ROOT / "jobs" / "extract_regions.py"), *args]
    died = subprocess.run(cmd, cwd=ROOT, env={**env, "MASK_FAULT_INJECT": "commit.features"},
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -9, died.stderr[-3000:]
    assert "fault injection: killing process" in died.stderr
    store = Store(str(root))
    rel = features_rel("photos", load_config("demo", DETECTOR).detector)
    assert store.manifest(rel) is None  # the parts were written, nothing is committed
    assert list((root / rel / "parts").rglob("*.parquet"))
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout
    s = json.loads(out if out.startswith("{") else out[out.rindex("\n{\n") + 1:])["features"]
    assert s["done_before"] == 0 and s["extracted"] + s["errors"] == 4
    feats, errs = _committed(store, s["features_uri"])
    ids = feats.column("image_id").to_pylist() + errs.column("image_id").to_pylist()
    assert sorted(ids) == sorted(PHOTOS[:4])  # every image exactly once
