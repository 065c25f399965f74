"""The whole stack on loopback: moto S3, an MLflow server, a Ray head, and the jobs through ``ray job submit``.

:func:`run_full_stack` starts, by PID, an ``mlflow server`` (SQLite backend, artifacts proxied to the moto
bucket) and a Ray head (``ray start --head --block``), submits ``jobs/build_knowledge.py``,
``jobs/score_gallery.py`` and (when it exists) ``jobs/reindex.py`` with ``ray job submit --working-dir .
--runtime-env cluster/runtime_env.yaml`` exactly as docs/operations.md does, gathers what the tests check
(job outputs and logs, the MLflow runs and registry seen through the server, the bucket's objects, the
Ray and MLflow server logs), then stops both services by their PIDs and returns the evidence.

Credentials: the head and the MLflow server inherit distinctive fake ``AWS_*`` values (random per run, so
that not even this file's source holds them; :attr:`StackRun.canaries`) from the environment they are
started with — the standard AWS chain, with no credentials file to fall back on — and nothing forwards
them (no runtime-env ``env_vars``); the job client runs without them.  The S3 endpoint reaches
the jobs the same way (``AWS_ENDPOINT_URL``, read by :mod:`mask.storage`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import free_port, stop_pid, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: The tiniest demo that still runs every stage: 24 training images, 8 gallery images, 2 epochs.
TINY = ["dataset.limit=24", "gallery.limit=8", "train.epochs=2", "train.checkpoint_every=1",
        "detector.min_size=128", "detector.max_size=160", "detector.rpn_post_nms_topk=40", "detector.num_boxes=12", "detector.batch_size=4",
        "detector.num_actors=1", "model.pae_layers=1"]
EXPERIMENT = "fullstack"
REGISTERED_MODEL = "fullstack-knowledge"


@dataclass
class JobResult:
    """One ``ray job submit``: its exit status, what the client printed, and the job's own log."""

    name: str
    returncode: int
    output: str
    logs: str
    seconds: float


@dataclass
class StackRun:
    """Evidence of one full-stack run (the services are stopped when this is returned)."""

    bucket: str  # bucket name (no scheme)
    storage_root: str  # s3://bucket/mask
    mlflow_url: str
    mlflow_db: Path
    ray_temp_dir: Path
    log_dir: Path  # service stdout/stderr captured by this module
    jobs: dict[str, JobResult] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # job tag → params/metrics/tags/artifacts
    model_versions: list[dict[str, Any]] = field(default_factory=list)
    stopped: dict[str, bool] = field(default_factory=dict)  # service → its process group is gone
    stopped_by: dict[str, str] = field(default_factory=dict)  # service → the signals it took to stop
    seconds: dict[str, float] = field(default_factory=dict)
    reindex_present: bool = False
    canaries: tuple[str, str] = ("", "")  # (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) the services had


def _start_head(env: dict[str, str], temp_dir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port, dash = free_port(), free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", "--object-store-memory=500000000"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, dash


def _start_mlflow(env: dict[str, str], bucket: str, db: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(env, MLFLOW_S3_ENDPOINT_URL=env["AWS_ENDPOINT_URL"],
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # its job runner is not needed, and slow to start
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", f"s3://{bucket}/mlartifacts"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_group(proc: subprocess.Popen, sig: int, timeout: float) -> tuple[bool, str]:
    """Stop a service we started in its own session: ``sig`` to its PID; if it is still running after
    ``timeout``, SIGTERM to its PID; then SIGKILL to its group (the group of the PID we started, nothing
    else).  Returns (its group is gone, the step that ended the PID we started)."""
    how = "already exited"
    for s, wait_s in ((sig, timeout), (signal.SIGTERM, 30.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(s)
        how = signal.Signals(s).name
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 20
    while not _group_gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not _group_gone(proc.pid):
        how += " + SIGKILL to the group"
        os.killpg(proc.pid, signal.SIGKILL)
    stop_pid(proc)
    deadline = time.monotonic() + 30  # SIGKILLed processes of a loaded machine take a moment to be reaped
    while not _group_gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _group_gone(proc.pid), how


def _submit(name: str, dash: int, client_env: dict[str, str], script: str, args: list[str]) -> JobResult:
    address = f"http://127.0.0.1:{dash}"
    sid = f"{name}-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    deadline = t0 + 300  # a loaded machine has taken over 2 min
    while True:  # the dashboard's port opens before the head's job agent takes jobs
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid,
               "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
               "--", "python", script, *args]
        out = subprocess.run(cmd, env=client_env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        if "No available agent" not in text or time.monotonic() > deadline:
            break
        time.sleep(3)
        sid = f"{name}-{uuid.uuid4().hex[:8]}"
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, sid], env=client_env,
                          capture_output=True, text=True, timeout=120)
    return JobResult(name, out.returncode, text, logs.stdout + logs.stderr, time.monotonic() - t0)


def _collect_mlflow(run: StackRun) -> None:
    """Runs, metrics, params, tags and artifacts as the MLflow server serves them (artifacts proxied)."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    c = MlflowClient(tracking_uri=run.mlflow_url, registry_uri=run.mlflow_url)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        out = []
        for f in c.list_artifacts(run_id, path):
            out.extend(artifacts(run_id, f.path) if f.is_dir else [f.path])
        return out

    for r in c.search_runs([exp.experiment_id]):
        job = r.data.tags.get("job", r.info.run_name)
        files = artifacts(r.info.run_id)
        texts = {}
        for f in files:
            local = c.download_artifacts(r.info.run_id, f, dst_path=tempfile.mkdtemp(prefix="mlart-"))
            texts[f] = Path(local).read_bytes().decode("utf-8", "replace")
        run.runs[job] = {"run_id": r.info.run_id, "status": r.info.status, "artifact_uri": r.info.artifact_uri,
                         "params": dict(r.data.params), "metrics": dict(r.data.metrics),
                         "tags": dict(r.data.tags), "artifacts": texts,
                         "epoch_loss_history": len(c.get_metric_history(r.info.run_id, "epoch.loss"))}
    for mv in c.search_model_versions(f"name='{REGISTERED_MODEL}'"):
        run.model_versions.append({"version": mv.version, "source": mv.source, "run_id": mv.run_id,
                                   "tags": dict(mv.tags), "aliases": list(mv.aliases)})


def run_full_stack(s3_endpoint: str, bucket: str, work: Path) -> StackRun:
    """Start MLflow + Ray head, submit the jobs, gather the evidence, stop both (see the module doc)."""
    t_all = time.monotonic()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Ray's socket paths must stay short (AF_UNIX limit): a short folder under /tmp, removed by the caller.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rfs-", dir="/tmp"))
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "RAY_", "MLFLOW_")) and k not in ("MASK_FAULT_INJECT",)}
    # Fake credentials that look like nothing the redaction rules know, so that a leak shows verbatim.
    key_id = "MASKCANARY" + uuid.uuid4().hex[:10].upper()
    secret = "mask-canary-secret-" + uuid.uuid4().hex
    service_env = dict(base_env, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                       AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                       AWS_ENDPOINT_URL=s3_endpoint, AWS_EC2_METADATA_DISABLED="true",
                       AWS_SHARED_CREDENTIALS_FILE=str(work / "no-credentials"),
                       AWS_CONFIG_FILE=str(work / "no-config"))
    client_env = dict(base_env, PATH=service_env["PATH"], RAY_AUTH_MODE="token")  # no AWS_* at all
    run = StackRun(bucket=bucket, storage_root=f"s3://{bucket}/mask", mlflow_url="", mlflow_db=work / "mlflow.db",
                   ray_temp_dir=ray_tmp, log_dir=logs, canaries=(key_id, secret))
    head = mlflow = None
    try:
        t0 = time.monotonic()
        head, dash = _start_head(service_env, ray_tmp, logs / "ray-head.log")
        mlflow, mport = _start_mlflow(service_env, bucket, run.mlflow_db, logs / "mlflow-server.log")
        run.mlflow_url = f"http://127.0.0.1:{mport}"
        wait_for_port(mport, timeout=180)
        wait_for_port(dash, timeout=180)
        run.seconds["start"] = time.monotonic() - t0
        args = [f"storage.root={run.storage_root}", f"tracking.uri={run.mlflow_url}",
                f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={REGISTERED_MODEL}", *TINY]
        run.reindex_present = (ROOT / "jobs" / "reindex.py").is_file()
        for name, script in (("build", "jobs/build_knowledge.py"), ("score", "jobs/score_gallery.py"),
                             ("reindex", "jobs/reindex.py")):
            if name == "reindex" and not run.reindex_present:
                continue
            res = _submit(name, dash, client_env, script, args)
            (logs / f"job-{name}.out").write_text(res.output)
            run.jobs[name] = res
            run.seconds[name] = res.seconds
            if res.returncode != 0:
                break  # later jobs need this one's output
        t0 = time.monotonic()
        _collect_mlflow(run)
        run.seconds["collect"] = time.monotonic() - t0
    finally:
        t0 = time.monotonic()
        if head is not None:
            # `ray start --block` stops its processes on SIGINT
            run.stopped["ray"], run.stopped_by["ray"] = _stop_group(head, signal.SIGINT, 60)
        if mlflow is not None:
            run.stopped["mlflow"], run.stopped_by["mlflow"] = _stop_group(mlflow, signal.SIGTERM, 20)
        run.seconds["stop"] = time.monotonic() - t0
        run.seconds["total"] = time.monotonic() - t_all
    return run


def bucket_objects(s3_endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of the bucket (key → bytes)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def cleanup(run: StackRun) -> None:
    shutil.rmtree(run.ray_temp_dir, ignore_errors=True)
