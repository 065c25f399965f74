"""Extraction that survives its driver, and inputs that change (issue 14, items 1–2).

* A driver killed with SIGKILL mid-extraction: the rerun skips every committed image, sweeps the parts
  the dead run left outside any manifest, and every image ends exactly once in the features or errors.
  Both runs are real job processes (``jobs/extract_regions.py``) with their own local Ray; the test
  records the processes the killed driver started and stops those (by PID) that outlive it.
  Heavy: ~1–2 min on 2 shared cores.
* Replaced files: a truncated JPEG replaced by a valid one leaves ``_errors``; ``cat.jpg`` replaced by a
  different photo gets new features; nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DETECTOR = ["detector.depth=14", "detector.min_size=64", "detector.max_size=96", "detector.pooler_resolution=7",
            "detector.rpn_pre_nms_topk=200", "detector.rpn_post_nms_topk=20", "detector.num_boxes=6",
            "detector.num_actors=1"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
          "colorwheel")


def _jpeg(name: str, size: tuple[int, int] = (96, 72)) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gallery_33(folder: Path) -> list[str]:
    """24 valid photos (8 × 3 sizes) and 9 broken files: the issue's 33-image folder."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for k, size in enumerate(((96, 72), (80, 80), (72, 96))):
        for name in PHOTOS:
            (folder / f"{name}-{k}.jpg").write_bytes(_jpeg(name, size))
            ids.append(f"{name}-{k}")
    good = _jpeg("coffee")
    for k in range(9):
        data = good[: len(good) // 3] if k % 3 == 0 else b"not an image" if k % 3 == 1 else b""
        (folder / f"broken-{k}.jpg").write_bytes(data)
        ids.append(f"broken-{k}")
    return ids


def _job(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "extract_regions.py"), *args, "ray.num_cpus=2"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _uncommitted(store, rel: str) -> list[str]:
    """Part files under the artifacts' folders that their manifests do not list."""
    out = []
    for r in (rel, f"{rel}/_errors"):
        listed = {p["path"] for p in (store.manifest(r) or {}).get("parts") or []}
        base = Path(store.path(r, "parts"))
        if base.exists():
            out += [f"{r}/{p.relative_to(store.path(r))}" for p in base.rglob("*") if p.is_file()
                    and str(p.relative_to(store.path(r))) not in listed]
    return out


def _committed_rows(store, rel: str) -> int:
    return sum((store.manifest(r) or {}).get("row_count", 0) for r in (rel, f"{rel}/_errors"))


def _stop_leftovers(procs) -> list[str]:
    """Stop (by PID, checked against its start time) the recorded processes that are still running."""
    import psutil

    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.name())
                p.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)  # SIGKILL is delivered asynchronously: wait until they are gone
    return left


def test_sigkilled_driver_resumes_and_its_orphans_are_swept(tmp_path):
    """SIGKILL the job's driver once some batches are committed and some written but not yet committed;
    the rerun skips the committed images, sweeps the dead run's parts, and every image is there once."""
    import psutil

    from mask.config import load_config
    from mask.pipeline.identity import features_rel
    from mask.storage import Store

    ids = _gallery_33(tmp_path / "photos")
    root = tmp_path / "art"
    args = ["--target", "gallery", f"storage.root={root}", "tracking.enabled=false", "gallery.kind=folder",
            f"gallery.path={tmp_path / 'photos'}", "gallery.name=photos", *DETECTOR, "detector.batch_size=1",
            "detector.commit_every_batches=5", "detector.commit_every_s=600"]
    store = Store(str(root))
    rel = features_rel("photos", load_config("demo", DETECTOR).detector)
    started: dict[int, psutil.Process] = {}
    try:
        for _attempt in range(5):  # Ray's 30 s node start-up limit can be missed on overloaded CI machines
            proc = subprocess.Popen(_job(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + 600  # a guard: ~30 s on an idle 2-core machine
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for c in psutil.Process(proc.pid).children(recursive=True):
                        started.setdefault(c.pid, c)
                if _committed_rows(store, rel) >= 5 and _uncommitted(store, rel):
                    break
                time.sleep(0.1)
            if proc.poll() is None:
                break
            err = proc.stderr.read().decode()
            proc.stderr.close()
            assert "timed out during startup" in err, f"the job ended before it could be killed: {err[-3000:]}"
        assert proc.poll() is None and time.monotonic() < deadline, "no progress commit within 600 s"
        for c in psutil.Process(proc.pid).children(recursive=True):
            started.setdefault(c.pid, c)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    # the killed driver's Ray workers would linger ~60 s (their GCS time-out) and may still write a part (parts
    # are written by Ray tasks, committed only by the driver): they die too, as on a lost node, so the orphans
    # are counted when nothing writes any more
    _kill_the_writers(started)
    # the rerun batches 8 images at a time: batch size and commit cadence are execution fields, not part of the
    # features' identity (mask.pipeline.identity.extractor_name), so it resumes the same artifact
    rerun = [a for a in args if not a.startswith(("detector.batch_size=", "detector.commit_every"))]
    try:
        _rerun_and_check([*rerun, "detector.batch_size=8"], store, rel, ids, started)
    finally:
        # Ray processes the killed driver started: its agents outlive it (they report the raylet's unexpected
        # death to the already dead GCS, with Ray's 60 s timeout, before exiting); stop what is left
        _stop_leftovers(list(started.values()))
    assert not [p for p in started.values() if _alive(p)], "a Ray process of the test outlived SIGKILL"


def _kill_the_writers(started: dict) -> None:
    """SIGKILL the Ray worker processes (``ray::…``, ``default_worker.py``) among the recorded processes and
    their children (recorded too), and wait until they are gone."""
    import psutil

    for p in list(started.values()):
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                started.setdefault(c.pid, c)
    procs = list(started.values())

    def worker(p) -> bool:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            return _alive(p) and (cmd.startswith("ray::") or "default_worker.py" in cmd)
        return False

    workers = [p for p in procs if worker(p)]
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"Ray workers of the killed driver survived SIGKILL: {[p.pid for p in alive]}"


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run_job(args: list[str], started: dict) -> dict:
    """The job in a child process, as a user runs it (its own local Ray); retried when Ray misses its 30 s
    start-up limit (overloaded CI machines).  Every process it starts is recorded in ``started``."""
    import psutil

    for _attempt in range(5):
        proc = subprocess.Popen(_job(args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        with contextlib.suppress(psutil.NoSuchProcess):
            while proc.poll() is None:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    started.setdefault(c.pid, c)
                time.sleep(0.2)
        out, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            return json.loads(out if out.startswith("{") else out[out.rindex("\n{\n") + 1:])
        assert "timed out during startup" in err, err[-4000:]
    raise AssertionError("Ray did not start in 5 attempts")


def _rerun_and_check(args: list[str], store, rel: str, ids: list[str], started: dict) -> None:
    from mask.pipeline.extract import RUNS_DIR

    committed = _committed_rows(store, rel)
    orphans = _uncommitted(store, rel)
    assert 5 <= committed < len(ids) and orphans
    assert store.list(f"{rel}/{RUNS_DIR}"), "the killed run left no lease"
    # the rerun: resumes, sweeps the dead run's parts (its lease names a process of this host that is gone)
    s = _run_job(args, started)["features"]
    assert (s["images"], s["done_before"], s["swept_parts"]) == (len(ids), committed, len(orphans))
    assert s["extracted"] + s["errors"] == len(ids) - committed
    feats, errs = store.read_table(rel), store.read_table(f"{rel}/_errors")
    got = feats.column("image_id").to_pylist() + errs.column("image_id").to_pylist()
    assert sorted(got) == sorted(ids)  # every image exactly once
    assert feats.num_rows == 24 and errs.num_rows == 9
    assert _uncommitted(store, rel) == []  # the orphaned parts are gone
    assert store.list(f"{rel}/{RUNS_DIR}") == []  # and the leases of both runs


def test_sweep_spares_a_live_run_and_takes_a_dead_one(tmp_path):
    """The sweep deletes the uncommitted parts of a run whose lease is released or whose holder process is
    gone, never those of a run that holds its lease, nor committed parts."""
    import pyarrow as pa

    from mask.lease import Lease
    from mask.pipeline.extract import RUNS_DIR, sweep_dead_runs
    from mask.storage import Store

    store = Store(str(tmp_path))
    rel = "features/x/e"
    t = pa.table({"image_id": ["a"]})
    for run in ("run-live", "run-done", "run-gone"):
        store.write_parquet(f"{rel}/parts/{run}/p1.parquet", t)
        store.write_parquet(f"{rel}/parts/{run}/p2.parquet", t)
    with store.open_artifact(rel, kind="features", config_hash="h", append=True) as w:
        for run in ("run-live", "run-done", "run-gone"):
            w.add_existing_part(f"{run}/p1")
    live = Lease(store, f"{rel}/{RUNS_DIR}/run-live", ttl_s=600).acquire()
    done = Lease(store, f"{rel}/{RUNS_DIR}/run-done", ttl_s=600).acquire()
    done.release()
    gone = Lease(store, f"{rel}/{RUNS_DIR}/run-gone", ttl_s=600, heartbeat=False,
                 owner=f"{os.uname().nodename}:{_dead_pid()}:x").acquire()
    try:
        out = sweep_dead_runs(store, rel, ttl_s=600)
        assert out["orphans"] == 2 and out["runs"] == 2
        assert store.exists(rel, "parts/run-live/p2.parquet")
        for run in ("run-done", "run-gone"):
            assert not store.exists(rel, f"parts/{run}/p2.parquet")
        assert store.read_table(rel).num_rows == 3  # committed parts untouched
        assert store.list(f"{rel}/{RUNS_DIR}") == ["run-live"]
    finally:
        live.release()
        gone.generation = None


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def _ray(ray_local):
    return ray_local


def test_replaced_files_are_extracted_again(tmp_path, _ray):
    """A truncated JPEG replaced by a valid one leaves ``_errors``; ``cat.jpg`` replaced by another photo gets
    new features (its old row is gone); untouched images are not extracted again."""
    import numpy as np

    from jobs import extract_regions
    from mask.config import load_config
    from mask.pipeline.identity import features_rel
    from mask.storage import Store

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS[:4]:
        (folder / f"{name}.jpg").write_bytes(_jpeg(name))
    (folder / "cat.jpg").write_bytes(_jpeg("chelsea"))
    good = _jpeg("rocket", (80, 80))
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    args = ["--target", "gallery", f"storage.root={tmp_path / 'art'}", "tracking.enabled=false",
            "gallery.kind=folder", f"gallery.path={folder}", "gallery.name=photos", *DETECTOR,
            "detector.batch_size=2"]
    store = Store(str(tmp_path / "art"))
    rel = features_rel("photos", load_config("demo", DETECTOR).detector)
    s1 = extract_regions.main(args)["features"]
    assert (s1["extracted"], s1["errors"]) == (5, 1)
    before = store.read_table(rel)
    cat_before = before.filter(np.asarray(before.column("image_id").to_pylist()) == "cat")
    assert store.read_table(f"{rel}/_errors").column("image_id").to_pylist() == ["truncated"]
    # replace two files (another size, so the stamp differs even on a coarse-mtime filesystem)
    (folder / "truncated.jpg").write_bytes(good)
    (folder / "cat.jpg").write_bytes(_jpeg("coffee", (90, 70)))
    s2 = extract_regions.main(args)["features"]
    assert (s2["done_before"], s2["changed"], s2["extracted"], s2["errors"]) == (4, 2, 2, 0)
    feats, errs = store.read_table(rel), store.read_table(f"{rel}/_errors")
    assert errs.num_rows == 0  # the repaired file left _errors
    assert sorted(feats.column("image_id").to_pylist()) == sorted([*PHOTOS[:4], "cat", "truncated"])
    cat = feats.filter(np.asarray(feats.column("image_id").to_pylist()) == "cat")
    assert cat.column("image_w")[0].as_py() == 90 and cat_before.column("image_w")[0].as_py() == 96
    assert cat.column("content_sha256")[0].as_py() != cat_before.column("content_sha256")[0].as_py()
    # a third run: nothing changed, nothing extracted
    s3 = extract_regions.main(args)["features"]
    assert (s3["done_before"], s3["changed"], s3["extracted"]) == (6, 0, 0)
