"""mask.tracking: runs, params (flattened, redacted, truncated), metrics, registry of knowledge versions.

Unit tests share one SQLite tracking store per module (creating its schema costs seconds); each test
uses its own experiment / registered model name.  The integration test starts a real ``mlflow server``
on loopback with artifacts in the moto S3 bucket, and stops it by its PID.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import free_port, stop_pid, wait_for_port
from mlflow import MlflowClient

from mask.config import MaskConfig, TrackingConfig
from mask.storage import Store
from mask.tracking import (
    KNOWLEDGE_URI_TAG,
    KnowledgeNotFound,
    NullRun,
    TrackingError,
    register_knowledge,
    resolve_knowledge,
    sanitize_params,
    start_run,
    tracking_uri,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("track") / "artifacts")


@pytest.fixture
def cfg() -> TrackingConfig:
    tag = uuid.uuid4().hex[:8]
    return TrackingConfig(experiment=f"exp-{tag}", registered_model=f"knowledge-{tag}")


def _client(cfg, root) -> MlflowClient:
    uri = tracking_uri(cfg, root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _commit_knowledge(root: str, rel: str, words: list[str]) -> str:
    store = Store(root)
    with store.open_artifact(rel, kind="knowledge", config_hash="h-" + rel.replace("/", "-")) as w:
        w.write_part(pa.table({"word": words, "count": list(range(len(words)))}))
    return store.uri(rel)


# ---------------------------------------------------------------- URIs


def test_tracking_uri_choices(tmp_path, caplog):
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000"), str(tmp_path)) == "http://127.0.0.1:5000"
    assert tracking_uri(TrackingConfig(), str(tmp_path / "a")) == f"sqlite:///{tmp_path}/a/mlflow.db"
    assert tracking_uri(TrackingConfig(), f"file://{tmp_path}/b") == f"sqlite:///{tmp_path}/b/mlflow.db"
    with caplog.at_level(logging.WARNING, logger="mask.tracking"):
        # ./mlflow.db, made absolute so that Ray workers (other working directories) share it.
        assert tracking_uri(TrackingConfig(), "s3://bucket/warn") == f"sqlite:///{os.getcwd()}/mlflow.db"
        tracking_uri(TrackingConfig(), "s3://bucket/warn")
    assert caplog.text.count("is remote and tracking.uri is not set") == 1


# ---------------------------------------------------------------- params and redaction


def test_params_flattened_redacted_truncated(cfg, root):
    full = MaskConfig().model_dump(mode="json")
    extra = {
        "storage": {"options": {"client_kwargs": {"aws_secret_access_key": "wJalrXUtnFEMIsecret"}}},
        "tracking": {"uri": "http://bob:hunter22pw@mlflow.example:5000"},
        "notes": {"found": "key AKIAABCDEFGHIJKLMNOP in a log", "db_password": "pw-123456"},
        "long": "x" * 7000,
        "odd key!": 1,
    }
    with start_run(cfg, root, "params", params={**full, **extra}, tags={"api_token": "tok-999999"}) as run:
        run_id = run.run_id
    got = _client(cfg, root).get_run(run_id)
    params, tags = got.data.params, got.data.tags
    assert params["model.latent_dim"] == "512" and params["loss.lambda_cm"] == "3.0"
    assert params["text.keep_pos"] == '["NOUN", "ADJ"]'
    assert params["storage.options.client_kwargs.aws_secret_access_key"] == "***"
    assert params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert params["notes.found"] == "key *** in a log" and params["notes.db_password"] == "***"
    assert len(params["long"]) == 6000 and params["long"].endswith("[truncated]")
    assert params["odd key_"] == "1"
    assert tags["api_token"] == "***" and tags["mlflow.runName"] == "params"
    blob = json.dumps([params, tags])
    for secret in ("wJalrXUtnFEMIsecret", "hunter22pw", "AKIAABCDEFGHIJKLMNOP", "pw-123456", "tok-999999"):
        assert secret not in blob
    assert got.info.status == "FINISHED"
    # Artifacts of a local store live under the storage root.
    assert got.info.artifact_uri.startswith(Path(root, "mlartifacts").as_uri())


def test_sanitize_params_keeps_ordinary_words():
    out = sanitize_params({"text": {"tokenizer": "spacy", "max_tokens": 5}, "author": "me"})
    assert out == {"text.tokenizer": "spacy", "text.max_tokens": "5", "author": "me"}


# ---------------------------------------------------------------- metrics, artifacts, status


def test_metrics_per_step_and_artifacts(cfg, root, tmp_path):
    (tmp_path / "plot.txt").write_text("curve")
    with start_run(cfg, root, "metrics") as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": np.float32(0.5 * step)}, step=step)
        run.log_metrics({"final": 7})
        with pytest.raises(TrackingError, match="metric 'bad'.*str"):
            run.log_metrics({"bad": "high"})
        run.log_dict({"r1": 0.5, "secret_token": "abc123456"}, "metrics.json")
        run.log_text("endpoint s3://AKIAABCDEFGHIJKLMNOP:x@b/k", "notes.txt")
        run.log_artifact(tmp_path / "plot.txt", "plots")
        run.set_tags({"stage": "test"})
        run_id = run.run_id
    c = _client(cfg, root)
    hist = c.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(0, 1.0), (1, 0.5), (2, round(1 / 3, 6))]
    assert [m.value for m in c.get_metric_history(run_id, "acc")] == [0.0, 0.5, 1.0]
    assert c.get_run(run_id).data.metrics["final"] == 7.0
    assert c.get_run(run_id).data.tags["stage"] == "test"
    art = Path(c.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert json.loads((art / "metrics.json").read_text()) == {"r1": 0.5, "secret_token": "***"}
    assert "AKIA" not in (art / "notes.txt").read_text()
    assert (art / "plots" / "plot.txt").read_text() == "curve"


def test_failed_run_and_nesting(cfg, root):
    with pytest.raises(RuntimeError), start_run(cfg, root, "boom") as run:
        failed_id = run.run_id
        raise RuntimeError("x")
    with start_run(cfg, root, "parent") as parent, start_run(cfg, root, "child", nested=True) as child:
        ids = parent.run_id, child.run_id
    c = _client(cfg, root)
    assert c.get_run(failed_id).info.status == "FAILED"
    assert c.get_run(ids[1]).data.tags["mlflow.parentRunId"] == ids[0]
    assert "mlflow.parentRunId" not in c.get_run(ids[0]).data.tags


def test_disabled_is_a_noop(tmp_path):
    cfg = TrackingConfig(enabled=False)
    with start_run(cfg, str(tmp_path), "off", params={"a": 1}) as run:
        assert isinstance(run, NullRun) and run.run_id is None
        run.log_metrics({"x": 1.0}, step=1)
        run.log_params({"b": 2})
        run.log_dict({}, "a.json")
        run.log_text("t", "a.txt")
        run.log_artifact(tmp_path, "x")
        run.set_tags({"t": 1})
    assert register_knowledge(cfg, str(tmp_path), str(tmp_path / "k"), None, {}) is None
    assert not (tmp_path / "mlflow.db").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(TrackingError, match="tracking is disabled"):
        resolve_knowledge(cfg, str(tmp_path), "@champion")
    assert resolve_knowledge(cfg, str(tmp_path), "knowledge/v1") == str(tmp_path / "knowledge" / "v1")


def test_remote_root_without_uri_falls_back(cfg, root, monkeypatch):
    # Run from the module's root so that ./mlflow.db is the store the other tests already created
    # (creating an MLflow schema costs seconds).
    os.makedirs(root, exist_ok=True)
    monkeypatch.chdir(root)
    with start_run(cfg, "s3://bucket/prefix", "fallback") as run:
        run_id = run.run_id
    assert Path(root, "mlflow.db").exists()
    c = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert c.get_run(run_id).data.params["tracking.fallback"].startswith(f"sqlite:///{root}/mlflow.db")


# ---------------------------------------------------------------- registry


def test_register_and_resolve(cfg, root):
    uri1 = _commit_knowledge(root, "knowledge/v1", ["dog", "cat"])
    uri2 = _commit_knowledge(root, "knowledge/v2", ["dog", "cat", "red"])
    with start_run(cfg, root, "build_knowledge") as run:
        v1 = register_knowledge(cfg, root, uri1, run.run_id,
                                {"features_uri": "s3://b/features/demo", "training_run_id": "abc",
                                 "config_hash": "h1"}, aliases=["champion", "latest"])
    v2 = register_knowledge(cfg, root, "knowledge/v2", None, {"config_hash": "h2"})  # relative → under root
    assert (v1, v2) == ("1", "2")
    mv = _client(cfg, root).get_model_version(cfg.registered_model, "1")
    assert mv.source == uri1 and mv.run_id == run.run_id
    assert mv.tags["features_uri"] == "s3://b/features/demo" and mv.tags["config_hash"] == "h1"
    assert mv.tags[KNOWLEDGE_URI_TAG] == uri1
    name = cfg.registered_model
    assert resolve_knowledge(cfg, root, "@latest") == uri2
    assert resolve_knowledge(cfg, root, "@champion") == uri1
    assert resolve_knowledge(cfg, root, f"models:/{name}@champion") == uri1
    assert resolve_knowledge(cfg, root, f"models:/{name}/2") == uri2
    assert resolve_knowledge(cfg, root, f"models:/{name}/latest") == uri2
    # Paths and URIs are returned as URIs, without the registry.
    assert resolve_knowledge(cfg, root, "knowledge/v1") == uri1
    assert resolve_knowledge(cfg, root, f"file://{uri1}") == uri1
    assert resolve_knowledge(cfg, root, "s3://bucket/k/v9/") == "s3://bucket/k/v9"
    # Moving an alias re-points resolution.
    register_knowledge(cfg, root, uri2, None, {}, aliases=["champion"])
    assert resolve_knowledge(cfg, root, "@champion") == uri2
    # The resolved URI is a readable committed artifact.
    assert Store(resolve_knowledge(cfg, root, "@latest")).read_json("_MANIFEST.json")["kind"] == "knowledge"


def test_unknown_references(cfg, root):
    uri = _commit_knowledge(root, "knowledge/u1", ["a"])
    register_knowledge(cfg, root, uri, None, {})
    name = cfg.registered_model
    with pytest.raises(KnowledgeNotFound, match=f"{name}.*alias 'nope'"):
        resolve_knowledge(cfg, root, "@nope")
    with pytest.raises(KnowledgeNotFound, match="version 7"):
        resolve_knowledge(cfg, root, f"models:/{name}/7")
    with pytest.raises(KnowledgeNotFound, match="'no-such-model'"):
        resolve_knowledge(cfg, root, "models:/no-such-model@champion")
    for bad in ("models:/", "models:/x/y/z", f"models:/{name}/two", "@", ""):
        with pytest.raises(TrackingError):
            resolve_knowledge(cfg, root, bad)
    with pytest.raises(TrackingError, match="traversal"):
        resolve_knowledge(cfg, root, "../outside")
    with pytest.raises(TrackingError, match="reserved|not allowed"):
        register_knowledge(cfg, root, uri, None, {}, aliases=["v3"])
    with pytest.raises(TrackingError, match="not allowed"):
        register_knowledge(cfg, root, uri, None, {}, aliases=["bad alias"])


# ---------------------------------------------------------------- a real MLflow server (integration)


@pytest.fixture
def mlflow_server(s3_bucket, s3_server, tmp_path):
    """``mlflow server`` on loopback, artifacts proxied to the moto bucket; stopped by its PID."""
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("the mlflow CLI is not installed next to the test interpreter")
    port = free_port()
    # The server's background job runner is not needed here and triples its start-up time.
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", f"{s3_bucket}/mlartifacts"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"))
    try:
        wait_for_port(port, timeout=90)
        yield f"http://127.0.0.1:{port}", s3_bucket
    finally:
        stop_pid(proc)


@pytest.mark.integration
@pytest.mark.slow  # ~25 s: the server's start-up (schema creation, app import) dominates
def test_against_mlflow_server(mlflow_server, tmp_path, s3_server):
    import boto3

    url, bucket = mlflow_server
    cfg = TrackingConfig(uri=url, experiment="server-exp", registered_model="server-knowledge")
    s3_root = f"{bucket}/mask"
    s3_uri = _commit_knowledge(s3_root, "knowledge/s1", ["dog"])
    local_uri = _commit_knowledge(str(tmp_path / "local"), "knowledge/l1", ["cat"])
    (tmp_path / "f.txt").write_text("hello")
    with start_run(cfg, s3_root, "server-run", params={"tracking": {"uri": url}}) as run:
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_artifact(tmp_path / "f.txt")
        v_s3 = register_knowledge(cfg, s3_root, s3_uri, run.run_id, {"config_hash": "s"}, aliases=["champion"])
        # A local path is refused as a source by the server: the manifest goes into the run instead.
        v_local = register_knowledge(cfg, s3_root, local_uri, run.run_id, {"config_hash": "l"},
                                     aliases=["local"])
        run_id = run.run_id
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    assert c.get_run(run_id).data.metrics["loss"] == 0.5
    assert c.get_run(run_id).info.status == "FINISHED"
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
            .list_objects_v2(Bucket=bucket.removeprefix("s3://"))["Contents"]]
    assert any(k.startswith("mlartifacts/") and k.endswith("/f.txt") for k in keys)
    assert any(k.endswith("knowledge/_MANIFEST.json") and k.startswith("mlartifacts/") for k in keys)
    assert c.get_model_version("server-knowledge", v_s3).source == s3_uri
    local_mv = c.get_model_version("server-knowledge", v_local)
    assert local_mv.source.endswith("/knowledge") and local_mv.tags[KNOWLEDGE_URI_TAG] == local_uri
    assert resolve_knowledge(cfg, s3_root, "@champion") == s3_uri
    assert resolve_knowledge(cfg, s3_root, "@local") == local_uri
    assert resolve_knowledge(cfg, s3_root, "@latest") == local_uri
    assert resolve_knowledge(cfg, s3_root, f"models:/server-knowledge/{v_s3}") == s3_uri
    with pytest.raises(KnowledgeNotFound, match="alias 'nope'"):
        resolve_knowledge(cfg, s3_root, "@nope")


def test_buffered_run_logs_step_less_groups_once():
    """BufferedRun keeps params, tags and step-less metrics until flush (one call each), passes stepped
    metrics through, and still rejects a non-number where it is logged."""
    from mask.tracking import BufferedRun, TrackingError

    calls = []

    class Fake:
        run_id, tracking_uri = "r", "u"

        def log_params(self, p):
            calls.append(("params", dict(p)))

        def log_metrics(self, m, step=None):
            calls.append(("metrics", dict(m), step))

        def set_tags(self, t):
            calls.append(("tags", dict(t)))

    with BufferedRun(Fake()) as run:
        run.log_params({"a": 1})
        run.log_metrics({"x": 1.0})
        run.log_metrics({"y": 2.0})
        run.log_metrics({"z": 3.0}, step=4)
        run.set_tags({"t": "v"})
        run.log_params({"b": 2})
        with pytest.raises(TrackingError):
            run.log_metrics({"bad": "nope"})
        assert calls == [("metrics", {"z": 3.0}, 4)]
    assert calls[1:] == [("params", {"a": 1, "b": 2}), ("tags", {"t": "v"}), ("metrics", {"x": 1.0, "y": 2.0}, None)]
