"""Smoke tests of the main job and the extraction job on a small slice of the demo world (local Ray)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from mainjob import MAIN_JOB_SLICE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def built(main_job, ray_local):
    """The session's main-job run on MAIN_JOB_SLICE (tests/mainjob.py), its root restored for this module."""
    return main_job.root, main_job.summary


def test_main_job_builds_and_evaluates(built):
    root, s = built
    k = s["knowledge"]
    assert Path(k["uri"], "_MANIFEST.json").exists()
    assert k["words"] > 5
    f = s["features"]
    assert f["images"] == 48 and f["extracted"] + f["errors"] == 48
    ev = s["evaluation"]
    assert ev["images"] == 10
    for variant in ("mask", "without_prototypes", "without_max_mean", "chance"):
        assert 0.0 <= ev[variant]["rsum"] <= 600.0
    assert "| mask |" in ev["table"]
    # tracked: run id, registered knowledge version
    assert s["mlflow"]["run_id"] and s["mlflow"]["model_version"]


def test_main_job_rerun_reuses_committed_work(built):
    from jobs import build_knowledge

    root, first = built
    again = build_knowledge.main([f"storage.root={root}", *MAIN_JOB_SLICE])
    assert again["dataset"]["reused"] is True
    assert again["features"]["done_before"] == 48 and again["features"].get("extracted", 0) == 0
    assert again["training"] == {"reused": True}
    assert again["knowledge"]["uri"] == first["knowledge"]["uri"]
    # identical scores: nothing random leaked into the reused path
    assert again["evaluation"]["mask"] == first["evaluation"]["mask"]
    # the gap measures find the checkpoint through the knowledge's lineage
    assert again["gap"] and again["gap"] == first["gap"]


def test_mlflow_run_has_metrics_and_artifacts(built):
    import mlflow

    root, s = built
    client = mlflow.MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = client.get_run(s["mlflow"]["run_id"])
    assert "mask.rsum" in run.data.metrics
    assert any(k.startswith("epoch.loss") for k in run.data.metrics)
    assert run.data.params["model.latent_dim"] == "128"
    hist = client.get_metric_history(run.info.run_id, "epoch.loss")
    assert len(hist) == 2  # train.epochs=2
    # modality-gap measures of the trained MTM (mask.alignment) and the knowledge it built
    assert run.data.metrics["gap.prototype.n"] == s["knowledge"]["words"]
    assert 0.0 <= run.data.metrics["gap.prototype.cos_r1"] <= 1.0
    assert run.data.metrics["gap.prototype.w2_exact"] > 0.0
    assert run.data.tags["knowledge.uri"] == s["knowledge"]["uri"]


def test_config_error_before_any_work(tmp_path, capsys):
    from jobs import build_knowledge

    with pytest.raises(SystemExit) as e:
        build_knowledge.main([f"storage.root={tmp_path}", "model.latnt_dim=3"])
    assert e.value.code == 2
    assert "model.latnt_dim: unknown key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_extract_job_records_bad_images(tmp_path, ray_local):
    """Every input ends in the features or in _errors with a reason; the job completes."""
    from jobs import extract_regions
    from mask.storage import Store

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).resize((128, 128)).save(img_dir / "good.jpg")
    Image.fromarray(data.camera()).resize((128, 128)).save(img_dir / "gray.png")
    (img_dir / "empty.jpg").write_bytes(b"")
    (img_dir / "text.jpg").write_text("not an image")
    good = (img_dir / "good.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    root = tmp_path / "art"
    s = extract_regions.main(["--target", "gallery", f"storage.root={root}", "gallery.kind=folder",
                              f"gallery.path={img_dir}", "gallery.name=mine", "tracking.enabled=false",
                              "detector.depth=14", "detector.min_size=96", "detector.max_size=128",
                              "detector.rpn_post_nms_topk=40", "detector.num_boxes=10"])
    f = s["features"]
    assert f["images"] == 5
    assert f["extracted"] == 2 and f["errors"] == 3
    store = Store(str(root))
    rel = f["features_uri"][len(str(root)) + 1:]
    feats = store.read_table(rel)
    assert sorted(feats.column("image_id").to_pylist()) == ["good", "gray"]
    assert set(feats.column("num_boxes").to_pylist()) == {10}
    errs = store.read_table(rel + "/_errors").to_pylist()
    assert {e["image_id"] for e in errs} == {"empty", "text", "truncated"}
    assert all(e["message"] and e["stage"] for e in errs)
    # rerun: nothing extracted twice
    s2 = extract_regions.main(["--target", "gallery", f"storage.root={root}", "gallery.kind=folder",
                               f"gallery.path={img_dir}", "gallery.name=mine", "tracking.enabled=false",
                               "detector.depth=14", "detector.min_size=96", "detector.max_size=128",
                               "detector.rpn_post_nms_topk=40", "detector.num_boxes=10"])
    assert s2["features"]["done_before"] == 5
    assert store.read_table(rel).num_rows == 2
    json.dumps(s2, default=str)


def test_demo_root_one_folder_per_world(tmp_path, monkeypatch):
    """Seed and synonym set each have their own generated world: a rerun with other world parameters on the
    same storage root never reads a world generated with different ones."""
    from mask.config import load_config
    from mask.pipeline import steps
    from mask.pipeline.runtime import JobContext

    calls = []

    def fake_world(d, seed, synonyms):
        calls.append((seed, synonyms))
        os.makedirs(d, exist_ok=True)

    monkeypatch.setattr(steps, "generate_demo_world", fake_world)
    ctx = JobContext.from_config(load_config("demo", overrides=[f"storage.root={tmp_path}"]))
    ctx1 = JobContext.from_config(load_config("demo", overrides=[f"storage.root={tmp_path}", "seed=1"]))
    a, b, c = steps.demo_root(ctx), steps.demo_root(ctx, "all"), steps.demo_root(ctx1)
    assert a.endswith("demo-world") and len({a, b, c}) == 3
    assert steps.demo_root(ctx) == a  # generated once
    assert calls == [(0, "supported"), (0, "all"), (1, "supported")]
