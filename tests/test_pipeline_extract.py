"""The extraction job on Ray Data: S3 storage and inputs (moto on loopback), a killed detector actor,
and its MLflow run.  Tiny photos, a depth-14 detector, the session's shared local Ray (``ray_local``)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DETECTOR = ["detector.depth=14", "detector.min_size=64", "detector.max_size=96", "detector.pooler_resolution=7",
            "detector.rpn_pre_nms_topk=200", "detector.rpn_post_nms_topk=20", "detector.num_boxes=6",
            "detector.batch_size=2", "detector.num_actors=1"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
          "colorwheel")


def _jpeg(name: str, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small JPEG of one of scikit-image's sample photos (grey ones stay grey)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _photo_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS[:n]:
        (folder / f"{name}.jpg").write_bytes(_jpeg(name))
    return folder


def _committed(store, features_uri: str):
    rel = features_uri[len(store.root) + 1:]
    return store.read_table(rel), store.read_table(rel + "/_errors")


def _run_job(args: list[str], ray) -> dict:
    """The extraction job with the S3 credentials of this process's environment.

    Ray workers take credentials from their own environment, which they inherit once, at ``ray.init``.
    If the session's Ray already has this environment (the moto fixture exported its fake AWS_*
    variables before Ray started), the job runs here; otherwise it runs as a user would run it, in a
    child process whose own local Ray (started by ``init_ray``) is born with the environment.
    """
    import json
    import os
    import subprocess

    from jobs import extract_regions

    def aws_digest() -> str:  # defined here so that Ray ships it by value to a worker
        import hashlib
        import os

        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        return hashlib.sha256("\n".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()

    # compared, never shown
    if ray.get(ray.remote(num_cpus=0)(aws_digest).remote()) == aws_digest():
        return extract_regions.main(list(args))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "extract_regions.py"), *args, "ray.num_cpus=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr
    out = proc.stdout
    return json.loads(out if out.startswith("{") else out[out.rindex("\n{\n") + 1:])


def test_s3_storage_and_s3_image_folder(s3_bucket, s3_server, ray_local):
    """Inputs and artifacts on S3 (moto): features and errors committed in the bucket; a rerun extracts nothing.

    Credentials come from the environment (the fixture's fake AWS_* variables), the endpoint from
    ``storage.options``: the only way Ray workers learn either (see :func:`_run_job`).
    """
    import os

    import fsspec

    from mask.storage import Store

    options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    bucket = s3_bucket[len("s3://"):]
    for name in PHOTOS[:4]:
        fs.pipe(f"{bucket}/photos/{name}.jpg", _jpeg(name))
    fs.pipe(f"{bucket}/photos/broken.jpg", b"this is not a jpeg")
    args = ["--target", "gallery", f"storage.root={s3_bucket}/mask",
            f'storage.options={{client_kwargs: {{endpoint_url: "{s3_server}"}}}}', "tracking.enabled=false",
            "gallery.kind=folder", f"gallery.path={s3_bucket}/photos", "gallery.name=photos", *DETECTOR]
    s = _run_job(args, ray_local)["features"]
    assert s["features_uri"].startswith(f"{s3_bucket}/mask/features/photos/")
    assert (s["images"], s["done_before"], s["extracted"], s["errors"]) == (5, 0, 4, 1)
    assert s["errors_by_kind"] == {"decode.NotAnImage": 1}
    store = Store(f"{s3_bucket}/mask", options)
    feats, errs = _committed(store, s["features_uri"])
    assert sorted(feats.column("image_id").to_pylist()) == sorted(PHOTOS[:4])
    assert set(feats.column("num_boxes").to_pylist()) == {6}
    assert feats.schema.field("features").type.value_type == pa.float16()
    assert errs.column("image_id").to_pylist() == ["broken"]
    assert errs.column("uri").to_pylist() == [f"{s3_bucket}/photos/broken.jpg"]
    rel = s["features_uri"][len(store.root) + 1:]
    assert store.exists(rel, "_MANIFEST.json") and store.exists(rel, "_errors", "_MANIFEST.json")
    # no object of the bucket holds the secret
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [k for k in fs.find(bucket) if secret in fs.cat(k)]
    # rerun: everything is committed, nothing is extracted again, nothing is duplicated
    s2 = _run_job(args, ray_local)["features"]
    assert (s2["done_before"], s2["extracted"], s2["errors"]) == (5, 0, 0)
    feats2, errs2 = _committed(store, s["features_uri"])
    assert feats2.num_rows == 4 and errs2.num_rows == 1


def test_killed_detector_actor_loses_and_duplicates_nothing(tmp_path, ray_local, monkeypatch):
    """The detector actor dies hard (``os._exit``) in the middle of the job.

    With restarts off the job fails, but the batches written before are committed (usually some: the
    actor dies at its last batch), so the rerun resumes from them; with restarts on (the default) Ray
    restarts the actor and retries its batch.  Every image ends in the features or errors exactly once.
    """
    from jobs import extract_regions
    from mask.config import load_config
    from mask.faults import FAULT_ENV
    from mask.pipeline.extract import committed_image_ids
    from mask.pipeline.identity import features_rel
    from mask.storage import Store

    folder = _photo_folder(tmp_path / "photos", 8)
    root = tmp_path / "art"
    args = ["--target", "gallery", f"storage.root={root}", "tracking.enabled=false", "gallery.kind=folder",
            f"gallery.path={folder}", "gallery.name=photos", *DETECTOR]
    store = Store(str(root))
    # 1. no restarts: the failure surfaces; what finished is committed
    monkeypatch.setenv(FAULT_ENV, f"detect_batch:4:{tmp_path / 'fault-1'}")
    with pytest.raises(Exception, match="(?i)actor"):
        extract_regions.main(args + ["detector.max_restarts=0"])
    assert (tmp_path / "fault-1").read_text() == "fired"
    rel = features_rel("photos", load_config("demo", DETECTOR).detector)
    partial = committed_image_ids(store, rel)
    assert len(partial) in (0, 2, 4, 6) and partial <= set(PHOTOS)  # whole batches, before the 4th
    # 2. restarts on: the actor dies again at its first batch of the rerun, and nothing is lost
    monkeypatch.setenv(FAULT_ENV, f"detect_batch:1:{tmp_path / 'fault-2'}")
    s = extract_regions.main(args)["features"]
    assert (tmp_path / "fault-2").read_text() == "fired"
    assert s["features_uri"] == store.uri(rel)
    assert (s["images"], s["done_before"], s["extracted"] + s["errors"]) == (8, len(partial), 8 - len(partial))
    feats, errs = _committed(store, s["features_uri"])
    ids = feats.column("image_id").to_pylist() + errs.column("image_id").to_pylist()
    assert sorted(ids) == sorted(PHOTOS)  # every image exactly once
    assert errs.num_rows == 0


def test_extraction_run_is_tracked(tmp_path, ray_local):
    """The job's MLflow run: the config as params; counts, throughput and errors as metrics."""
    import mlflow

    from jobs import extract_regions
    from mask import tracking
    from mask.config import TrackingConfig

    folder = _photo_folder(tmp_path / "photos", 3)
    (folder / "empty.jpg").write_bytes(b"")
    root = tmp_path / "art"
    args = ["--target", "gallery", f"storage.root={root}", "gallery.kind=folder", f"gallery.path={folder}",
            "gallery.name=photos", *DETECTOR]
    s = extract_regions.main(args)["features"]
    assert (s["extracted"], s["errors"]) == (3, 1)
    uri = tracking.tracking_uri(TrackingConfig(), str(root))
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(TrackingConfig().experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.job = 'extract_regions'")
    assert len(runs) == 1
    run = runs[0]
    m = run.data.metrics
    assert m["extract.photos.images"] == 4 and m["extract.photos.extracted"] == 3
    assert m["extract.photos.errors"] == 1
    assert sum(v for k, v in m.items() if k.startswith("extract.photos.errors.")) == 1
    assert m["extract.photos.images_per_s"] > 0 and m["extract.photos.seconds"] > 0
    assert run.data.params["detector.depth"] == "14" and run.data.params["gallery.path"] == str(folder)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("field,value", [("batch_size", 5), ("num_actors", 3), ("cpu_threads", 2),
                                         ("max_restarts", 0), ("device", "cpu")])
def test_execution_settings_keep_the_artifact_name(field, value):
    """A rerun with another batch size / actor count / thread count resumes the same artifact."""
    from mask.config import DetectorConfig
    from mask.pipeline.identity import extractor_name

    base = DetectorConfig()
    assert extractor_name(base.model_copy(update={field: value})) == extractor_name(base)
    assert extractor_name(base.model_copy(update={"num_boxes": 10})) != extractor_name(base)


def test_pretrained_feature_version_is_part_of_the_artifact_name(monkeypatch):
    """A changed feature definition of the demo backend never reuses (or appends to) older features."""
    from mask.config import DetectorConfig
    from mask.features import pretrained
    from mask.pipeline.identity import extractor_name

    det = DetectorConfig(backend="efficientnet_lite0", min_size=512, max_size=512)
    butd = DetectorConfig()
    before, before_butd = extractor_name(det), extractor_name(butd)
    monkeypatch.setattr(pretrained, "FEATURES_VERSION", pretrained.FEATURES_VERSION + 1)
    assert extractor_name(det) != before
    assert extractor_name(butd) == before_butd  # the BUTD path's names do not move


def test_list_columns_match_pyarrow_conversion():
    """The flat-buffer list builder gives exactly what pyarrow's element-wise conversion gives."""
    import numpy as np

    from mask.pipeline.extract import _list_array

    rng = np.random.default_rng(0)
    f16 = [rng.normal(size=(3, 4)).astype(np.float16), None, np.zeros((0, 4), np.float16),
           np.array([[np.float16(65504), -0.0, 1e-7, 2.5]], np.float16)]
    ints = [np.arange(3, dtype=np.int32), None, np.zeros(0, np.int32), np.array([7], np.int32)]
    strs = [["a", "b"], None, [], ["é"]]
    for rows, typ in ((f16, pa.list_(pa.float16())), (ints, pa.list_(pa.int32())), (strs, pa.list_(pa.string()))):
        naive = pa.array([None if r is None else np.asarray(r).reshape(-1).tolist() for r in rows], type=typ)
        got = _list_array(rows, typ)
        assert got.type == typ and got.null_count == 1
        assert got.to_pylist() == naive.to_pylist()
    assert _list_array([None, None], pa.list_(pa.float32())).to_pylist() == [None, None]
