"""Security (DESIGN §3): credentials come only from the environment/AWS chain and are written nowhere;
manifests and configs cannot make a job read or write outside its storage root; nothing user-facing is
unpickled.

The credential test reads the evidence of the full-stack run (``full_stack`` fixture, tests/fullstack.py):
the Ray head and the MLflow server got random canary ``AWS_*`` values in their environment, and every log,
MLflow record, artifact and bucket object is searched for them.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- (a) credentials


def _strings(data: bytes) -> bytes:
    """The raw bytes, plus the string values of a Parquet file (its pages may be compressed)."""
    if not data.startswith(b"PAR1"):
        return data
    table = pq.read_table(io.BytesIO(data))
    out = [data]
    for col in table.columns:
        t = col.type
        while pa.types.is_list(t) or pa.types.is_large_list(t):
            col, t = col.combine_chunks().flatten(), t.value_type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
            out.extend(str(v).encode() for v in col.to_pylist() if v is not None)
    return b"\n".join(out)


def _leaks(blobs: dict[str, bytes], needles: tuple[str, ...]) -> list[str]:
    return [f"{where} holds needle #{i}" for where, data in blobs.items()
            for i, n in enumerate(needles) if n.encode() in _strings(data)]


def test_leak_scanner_finds_what_it_looks_for():
    needle = "mask-canary-" + uuid.uuid4().hex
    buf = io.BytesIO()
    pq.write_table(pa.table({"n": [1, 2], "v": [["a"], [f"x {needle} y"]]}), buf, compression="zstd")
    blobs = {"p.parquet": buf.getvalue(), "log": f"...{needle}...".encode(), "clean": b"ok"}
    assert _leaks(blobs, (needle, "absent-" + needle)) == ["p.parquet holds needle #0", "log holds needle #0"]


def test_full_stack_credentials_appear_in_no_log_record_or_object(full_stack, s3_server):
    from fullstack import bucket_objects

    key_id, secret = full_stack.canaries
    assert key_id and secret
    # The jobs reached S3 with them: the services' environment was the only credential source.
    assert full_stack.jobs["build"].returncode == 0, full_stack.jobs["build"].output[-3000:]
    blobs: dict[str, bytes] = {}
    for name, job in full_stack.jobs.items():
        blobs[f"`ray job submit` output of {name}"] = job.output.encode()
        blobs[f"`ray job logs` of {name}"] = job.logs.encode()
    for folder, label in ((full_stack.ray_temp_dir, "ray"), (full_stack.log_dir, "service log")):
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                blobs[f"{label} {p.relative_to(folder)}"] = p.read_bytes()
    for p in full_stack.mlflow_db.parent.glob(full_stack.mlflow_db.name + "*"):
        blobs[f"MLflow database {p.name}"] = p.read_bytes()  # every param, tag, metric key, registry row
    blobs["MLflow runs (params, tags, metrics, artifact files)"] = json.dumps(full_stack.runs).encode()
    blobs["MLflow model versions"] = json.dumps(full_stack.model_versions).encode()
    objects = bucket_objects(s3_server, full_stack.bucket)
    blobs.update({f"s3://{full_stack.bucket}/{k}": v for k, v in objects.items()})
    # the search covered what it claims to
    assert any("job-driver-build" in k for k in blobs), "no Ray job driver log found"
    assert any(k.endswith("raylet.out") for k in blobs) and any("mlflow.db" in k for k in blobs)
    assert any(k.endswith("_MANIFEST.json") for k in blobs) and any("/mlartifacts/" in k for k in blobs)
    assert full_stack.runs["build_knowledge"]["params"] and full_stack.runs["build_knowledge"]["artifacts"]
    assert _leaks(blobs, (key_id, secret)) == []


def _jpeg_folder(folder: Path, n: int = 2) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    for name in ("astronaut", "coffee")[:n]:
        Image.fromarray(getattr(data, name)()).resize((96, 72)).save(folder / f"{name}.jpg", quality=90)
    return folder


def test_secrets_inside_storage_options_are_redacted_in_params_and_artifacts(tmp_path, ray_local, capsys, caplog):
    """A secret under a key the config accepts (an SSE-C key, a proxy/endpoint URL's password) reaches
    the job; a real job's MLflow params show ``***`` and no file under the storage root holds it."""
    import mlflow

    from jobs import extract_regions

    pw, sse = "canary-pw-" + uuid.uuid4().hex[:12], "canary-ssec-" + uuid.uuid4().hex
    root = tmp_path / "root"
    options = (f'storage.options={{client_kwargs: {{endpoint_url: "http://bob:{pw}@minio.example:9000"}}, '
               f's3_additional_kwargs: {{SSECustomerAlgorithm: AES256, SSECustomerKey: "{sse}"}}}}')
    s = extract_regions.main([
        "--target", "gallery", f"storage.root={root}", options, "gallery.kind=folder",
        f"gallery.path={_jpeg_folder(tmp_path / 'imgs')}", "gallery.name=photos", "tracking.experiment=sec",
        "detector.depth=14", "detector.min_size=64", "detector.max_size=96", "detector.pooler_resolution=7",
        "detector.rpn_pre_nms_topk=200", "detector.rpn_post_nms_topk=20", "detector.num_boxes=4",
        "detector.batch_size=2", "detector.num_actors=1", "detector.calibrate_random=false"])
    assert s["features"]["extracted"] == 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sec").experiment_id])
    params = run.data.params
    assert params["storage.options.client_kwargs.endpoint_url"] == "http://***@minio.example:9000"
    assert params["storage.options.s3_additional_kwargs.SSECustomerKey"] == "***"
    assert params["storage.options.s3_additional_kwargs.SSECustomerAlgorithm"] == "AES256"
    blobs = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert any(k.endswith("_MANIFEST.json") for k in blobs) and "mlflow.db" in blobs
    out = capsys.readouterr()
    blobs.update(stdout=out.out.encode(), stderr=out.err.encode(), log=caplog.text.encode())
    assert _leaks(blobs, (pw, sse)) == []


@pytest.mark.parametrize("key", ["key", "secret", "token", "password", "username", "secret_key", "access_key",
                                 "session_token", "client_kwargs.aws_secret_access_key",
                                 "config_kwargs.aws_session_token"])
def test_credentials_in_storage_options_are_refused_at_config_time(key, tmp_path, capsys):
    from jobs import build_knowledge

    value = "canary-" + uuid.uuid4().hex
    with pytest.raises(SystemExit) as e:
        build_knowledge.main([f"storage.root={tmp_path}", f"storage.options.{key}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "storage.options" in err and key.rsplit(".", 1)[-1] in err and "credential" in err
    assert value not in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- (b) path traversal


BAD_PATHS = ["../../outside.parquet", "parts/../../../outside.parquet", "/etc/passwd", "s3://other-bucket/x.parquet",
             "file:///etc/passwd", "parts\\..\\..\\x", "parts//x.parquet"]


def _names(bad: str, err: Exception) -> bool:
    """The error names the offending value (alone, or as the end of the path it makes)."""
    msg = str(err)
    return (bad in msg or repr(bad)[1:-1] in msg) and ("traversal" in msg or "backslash" in msg)


def _artifact(store, rng_seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    with store.open_artifact("a/b", kind="k", config_hash="h") as w:
        w.write_part(pa.table({"x": rng.normal(size=3)}), name="p0")
        w.write_file("w.bin", b"weights")
    return store.manifest("a/b")


def _tamper(store, manifest: dict, section: str, field: str, value: str) -> None:
    m = json.loads(json.dumps(manifest))
    m[section][0][field] = value
    if field == "name":
        m[section][0].pop("path")
    store.write_json("a/b/_MANIFEST.json", m)


@pytest.mark.parametrize("bad", BAD_PATHS)
@pytest.mark.parametrize("field", ["path", "name"])
def test_manifest_part_paths_cannot_leave_the_root(tmp_path, bad, field):
    from mask.storage import StorageError, Store

    (tmp_path / "outside.parquet").write_bytes(b"not yours")
    store = Store(str(tmp_path / "root"))
    _tamper(store, _artifact(store), "parts", field, bad)
    for read in (store.read_table, store.part_uris):
        with pytest.raises(StorageError) as e:
            read("a/b")
        assert _names(bad, e.value), str(e.value)


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_manifest_file_paths_cannot_leave_the_root(tmp_path, bad):
    from mask.storage import StorageError, Store

    store = Store(str(tmp_path / "root"))
    _tamper(store, _artifact(store), "files", "path", bad)
    with pytest.raises(StorageError) as e:
        store.read_file("a/b", "w.bin")
    assert _names(bad, e.value), str(e.value)


def test_manifest_on_s3_cannot_reach_other_buckets_or_prefixes(s3_bucket, s3_server):
    import boto3

    from mask.storage import StorageError, Store

    s3 = boto3.client("s3", endpoint_url=s3_server)
    other = f"other-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="x.parquet", Body=b"x")
    store = Store(f"{s3_bucket}/tenant-a")
    m = _artifact(store)
    for bad in (f"s3://{other}/x.parquet", "../../../tenant-b/parts/x.parquet", f"/{other}/x.parquet"):
        _tamper(store, m, "parts", "path", bad)
        with pytest.raises(StorageError) as e:
            store.read_table("a/b")
        assert _names(bad, e.value), str(e.value)
        _tamper(store, m, "files", "path", bad)
        with pytest.raises(StorageError) as e:
            store.read_file("a/b", "w.bin")
        assert _names(bad, e.value), str(e.value)
    with store.open_artifact("c", kind="k", config_hash="h") as w:
        for bad in ("../x", f"s3://{other}/x", "/abs/x"):
            with pytest.raises(StorageError, match="part name"):
                w.add_existing_part(bad)


NAME_FIELDS = ["dataset.name", "gallery.name", "knowledge.version", "train.run_name"]
BAD_NAMES = ["../escape", "..", "a/b", "/abs", "x/../../y", ".", ".hidden", "a\\b", "s3://b/x", ""]


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_config_names_used_in_paths_are_single_safe_names(field, bad):
    from mask.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("demo", [f"{field}={json.dumps(bad)}"])
    msg = str(e.value)
    assert field in msg and repr(bad) in msg, msg


@pytest.mark.parametrize("field", NAME_FIELDS)
def test_config_names_accept_ordinary_names(field):
    from mask.config import load_config

    cfg = load_config("demo", [f"{field}=flickr30k_test-v2.1"])
    section, key = field.split(".")
    assert getattr(getattr(cfg, section), key) == "flickr30k_test-v2.1"


def test_job_with_a_traversing_name_stops_before_any_work(tmp_path, capsys):
    from jobs import build_knowledge, score_gallery

    for job in (build_knowledge, score_gallery):
        with pytest.raises(SystemExit) as e:
            job.main([f"storage.root={tmp_path / 'root'}", "gallery.name=../../escape"])
        assert e.value.code == 2
        assert "gallery.name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- (c) nothing user-facing unpickled

CODE_DIRS = ("mask", "jobs", "tune", "bench")
# Calls that unpickle whatever they are given.
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"),
              ("pd", "read_pickle"), ("pandas", "read_pickle"), ("shelve", "open"), ("KeyedVectors", "load"),
              ("Word2Vec", "load"), ("np", "fromfile")}


def _code_files() -> list[Path]:
    files = [p for d in CODE_DIRS if (ROOT / d).is_dir() for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    return files


def _call_name(node: ast.Call) -> tuple[str, str] | None:
    f = node.func
    if isinstance(f, ast.Attribute):
        base = f.value
        owner = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        return owner, f.attr
    return None


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def _unsafe_loads(source: str) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or (name := _call_name(node)) is None:
            continue
        owner, attr = name
        if (owner, attr) in UNPICKLERS:
            bad.append((node.lineno, f"{owner}.{attr}"))
        elif owner == "torch" and attr == "load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append((node.lineno, "torch.load without weights_only=True"))
        elif (ap := _kw(node, "allow_pickle")) is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
            bad.append((node.lineno, f"{owner}.{attr} with allow_pickle"))  # np.load, load_vectors, …
    return bad


def test_unsafe_load_finder_flags_each_form():
    src = ("import pickle, torch, numpy as np\npickle.loads(b)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "np.load(f, allow_pickle=True)\nKeyedVectors.load(p)\ntorch.load(f, weights_only=True)\n"
           "np.load(f)\nnp.load(f, allow_pickle=False)\n")
    assert [line for line, _ in _unsafe_loads(src)] == [2, 3, 4, 5, 6]
    assert _unsafe_loads("vectors.load_vectors(p, allow_pickle=True)\n") == [(1, "vectors.load_vectors with allow_pickle")]


# Unpickling behind an explicit library argument that no job passes (checked above: no call passes
# allow_pickle=True); each has a behavioural test below.
GATED = {("mask/vectors.py", "KeyedVectors.load")}


def test_code_has_no_unsafe_unpickling():
    found = [(str(p.relative_to(ROOT)), line, what) for p in _code_files() for line, what in _unsafe_loads(p.read_text())]
    assert {(f, w) for f, _, w in found} <= GATED, "\n".join(f"{f}:{n}: {w}" for f, n, w in found)
    assert {(f, w) for f, _, w in found} == GATED  # the gate is still there (else drop it from GATED)


class _Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_torch_file(path: Path, marker: Path, good: dict | None = None) -> Path:
    import torch

    torch.save({**(good or {}), "payload": _Payload(marker)}, path)
    return path


def test_payload_is_live(tmp_path):
    """Control: the same file loaded with a full unpickler runs the payload."""
    import torch

    marker = tmp_path / "ran"
    torch.load(_evil_torch_file(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_detector_checkpoint_is_refused_without_running_it(tmp_path):
    import torch

    from mask.features.checkpoint import CheckpointError, read_state_dict

    marker = tmp_path / "ran"
    path = _evil_torch_file(tmp_path / "butd.pth", marker, {"model": {"w": torch.zeros(2)}})
    for source in (path, path.read_bytes()):
        with pytest.raises(CheckpointError, match="weights_only=True"):
            read_state_dict(source)
    assert not marker.exists()


@pytest.mark.parametrize("evil", ["optimizer.pt", "rng.pt"])
def test_malicious_training_checkpoint_is_refused_without_running_it(tmp_path, evil):
    import torch
    from safetensors.torch import save_file

    from mask.pipeline.train import OPTIM_FILE, RNG_FILE, STATE_FILE, CheckpointError, load_checkpoint_dir

    assert evil in (OPTIM_FILE, RNG_FILE)
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / STATE_FILE).write_text(json.dumps({"epoch": 0, "step": 1}))
    torch.save(opt.state_dict(), tmp_path / OPTIM_FILE)
    torch.save({"torch_rng": torch.get_rng_state()[None]}, tmp_path / RNG_FILE)
    load_checkpoint_dir(str(tmp_path), opt=opt)  # the honest checkpoint loads
    marker = tmp_path / "ran"
    _evil_torch_file(tmp_path / evil, marker, torch.load(tmp_path / evil, weights_only=True))
    with pytest.raises(CheckpointError, match=re.escape(evil)):
        load_checkpoint_dir(str(tmp_path), opt=opt)
    assert not marker.exists()


def test_gensim_pickle_vectors_are_refused_without_running_them(tmp_path):
    """A ``.kv`` word-vector file (gensim's pickle) is not loaded unless the library caller opts in."""
    import pickle

    from mask.config import load_config
    from mask.vectors import VectorsError, load_vectors

    marker = tmp_path / "ran"
    (tmp_path / "evil.kv").write_bytes(pickle.dumps(_Payload(marker)))
    cfg = load_config("demo", [f"vectors.source={tmp_path / 'evil.kv'}"])  # what a job would be given
    with pytest.raises(VectorsError, match="pickles and are not loaded"):
        load_vectors(cfg.vectors.source, cfg.vectors.format, str(tmp_path / "cache"))
    with pytest.raises(VectorsError, match="pickles"):
        load_vectors(str(tmp_path / "evil.kv"), "gensim", str(tmp_path / "cache"))
    assert not marker.exists()
