"""Shared fixtures: one local Ray per session, a moto S3 server on loopback, seeded RNGs, one run of the
main job (tests/mainjob.py) whose storage root is restored for each module that tests its outputs.

Servers are started here on 127.0.0.1 and stopped by the PID this file started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from mainjob import MainJobRun, run_main_job

# A loaded CI machine can take longer than Ray's default 30 s for a raylet to register; every local Ray
# this session starts (in-process or in job subprocesses, which inherit the environment) waits longer.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
# MLflow's documented pool setting: a connection per operation, so that a store's file restored under the same
# path (the `main_job` fixture below) is read afresh instead of through a pooled handle on the old file.
os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_pid(proc: subprocess.Popen) -> None:
    """Stop a server we started, by its PID only."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on loopback; yields its endpoint URL.

    Sets fake credentials in the environment (the standard chain) for the session.
    """
    moto_server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if moto_server is None:
        pytest.fail("moto_server not installed: pip install 'moto[server]'")
    port = free_port()
    proc = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
        os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        yield endpoint
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        stop_pid(proc)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (Ray's testing tips)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def full_stack(s3_server, tmp_path_factory):
    """One run of the whole stack (tests/fullstack.py): MLflow server + Ray head started by PID, the jobs
    submitted with ``ray job submit``, both services stopped again; yields the evidence (shared by
    test_full_stack.py and test_security.py, so CI starts one Ray head for both)."""
    import boto3
    from fullstack import cleanup, run_full_stack

    bucket = f"stack-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    run = run_full_stack(s3_server, bucket, tmp_path_factory.mktemp("fullstack"))
    yield run
    cleanup(run)


@pytest.fixture(scope="session")
def main_job_once(ray_local, tmp_path_factory) -> MainJobRun:
    """The main job on MAIN_JOB_SLICE, run once per session in a subprocess while this session's Ray runs
    beside it; its storage root is kept as a snapshot for `main_job`."""
    base = tmp_path_factory.mktemp("main-job")
    run = run_main_job(base / "root")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    shutil.copytree(run.root, base / "snapshot", symlinks=True)
    run.snapshot = base / "snapshot"
    return run


@pytest.fixture(scope="module")
def main_job(main_job_once) -> MainJobRun:
    """The main job's storage root as that run left it, restored for each module that uses it.

    The root is restored under the path the job ran at, because its manifests, dataset tables and MLflow
    store name absolute paths; modules run one after another, so each one owns the root while it runs."""
    shutil.rmtree(main_job_once.root, ignore_errors=True)
    shutil.copytree(main_job_once.snapshot, main_job_once.root, symlinks=True)
    return main_job_once
