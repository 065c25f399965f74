"""Deployment files: ray_cluster.yaml against Ray's own launcher schema, the KubeRay/Kubernetes manifests
under cluster/, the runtime env, no literal credentials, and docs/operations.md naming every command."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
OPS = ROOT / "docs" / "operations.md"


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _launcher_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, list[dict]]:
    return {p.name: _docs(p) for p in sorted(CLUSTER.glob("*.yaml"))}


def _by_kind(kind: str) -> list[dict]:
    return [d for docs in _manifests().values() for d in docs if d.get("kind") == kind]


# --- ray_cluster.yaml -------------------------------------------------------------------------------


def test_launcher_config_validates_against_ray_schema():
    cfg = _launcher_config()
    jsonschema.validate(cfg, _ray_schema())
    # Ray's own check after filling the AWS defaults (head type exists, node types consistent).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("breakage", ["no_provider", "min_workers_text", "unknown_key", "resources_float"])
def test_launcher_schema_rejects_broken_config(breakage):
    cfg = _launcher_config()
    if breakage == "no_provider":
        del cfg["provider"]
    elif breakage == "min_workers_text":
        cfg["available_node_types"]["ray.worker.gpu"]["min_workers"] = "zero"
    elif breakage == "unknown_key":
        cfg["setup_comands"] = []
    else:
        cfg["available_node_types"]["ray.worker.gpu"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


def test_launcher_missing_head_type_fails_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher_config()
    cfg["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))


def test_launcher_cpu_head_gpu_workers_autoscaled_from_zero():
    cfg = _launcher_config()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU head
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "gpu" in cfg["docker"]["worker_image"]
    # Instance profiles give S3 access: no keys.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def test_launcher_setup_installs_project_detectron2_and_environment():
    cfg = _launcher_config()
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "~/mask-itm" in setup
    assert cfg["file_mounts"]["~/mask-itm"] == "."
    for excluded in (".venv", "artifacts", ".git"):
        assert excluded in cfg["rsync_exclude"]
    for var in ("MASK_STORAGE_ROOT=s3://", "MLFLOW_TRACKING_URI=http", "RAY_AUTH_MODE=token"):
        assert var in setup
    assert "detectron2.git" in "\n".join(cfg["worker_setup_commands"])
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("source ~/.mask_env" in c and "ray start" in c for c in cmds)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --- cluster/ ---------------------------------------------------------------------------------------


def test_every_cluster_yaml_parses_and_is_non_empty():
    manifests = _manifests()
    assert {"raycluster.yaml", "rayjob.yaml", "reindex-cronjob.yaml", "runtime_env.yaml", "mlflow.yaml",
            "common.yaml"} <= set(manifests)
    for name, docs in manifests.items():
        assert docs, name
        for d in docs:
            assert isinstance(d, dict), name
            if name != "runtime_env.yaml":
                assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name


def test_kuberay_kinds_and_api_versions():
    kinds = {(d["apiVersion"], d["kind"]) for docs in _manifests().values() for d in docs if "kind" in d}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob"),
            ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "ServiceAccount")} <= kinds


def test_raycluster_gpu_group_requests_gpus_and_autoscales_from_zero():
    (rc,) = _by_kind("RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["rayVersion"] == "2.60.0"
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})


def test_rayjob_runs_the_main_job_on_the_cluster():
    (job,) = _by_kind("RayJob")
    entry = " ".join(job["spec"]["entrypoint"].split())
    assert entry.startswith("python jobs/build_knowledge.py ")
    assert "storage.root=$MASK_STORAGE_ROOT" in entry and "tracking.uri=$MLFLOW_TRACKING_URI" in entry
    # The submitter shell must not run anything locally after `ray job submit … --`.
    assert not re.search(r"&&|;|\|", entry)
    (rc,) = _by_kind("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"


def test_cronjob_submits_reindex_to_the_cluster():
    (cron,) = _by_kind("CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:3] == ["ray", "job", "submit"]
    rest = cmd[cmd.index("--") + 1:]
    assert rest[:2] == ["python", "jobs/reindex.py"]
    assert "--runtime-env=/app/cluster/runtime_env.yaml" in cmd
    (rc,) = _by_kind("RayCluster")
    assert f"--address=http://{rc['metadata']['name']}-head-svc:8265" in cmd


def test_ray_containers_get_token_auth_from_a_secret():
    (rc,) = _by_kind("RayCluster")
    (job,) = _by_kind("RayJob")
    (cron,) = _by_kind("CronJob")
    containers = (rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
                  + [g["template"]["spec"]["containers"][0] for g in rc["spec"]["workerGroupSpecs"]]
                  + job["spec"]["submitterPodTemplate"]["spec"]["containers"]
                  + cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
                  + [rc["spec"]["autoscalerOptions"]])
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "mask-itm-env"]
    assert cm["data"]["RAY_AUTH_MODE"] == "token"
    for c in containers:
        assert {"configMapRef": {"name": "mask-itm-env"}} in c["envFrom"]
        (tok,) = [e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN"]
        assert "value" not in tok and tok["valueFrom"]["secretKeyRef"]["name"] == "mask-itm-ray-token"


def test_mlflow_recipe_database_backend_and_object_store_artifacts():
    (cfg,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-config"]
    assert cfg["data"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert ":" not in cfg["data"]["MLFLOW_BACKEND_STORE_URI"].split("://", 1)[1].split("@")[0]  # no password
    assert cfg["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    (dep,) = _by_kind("Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "mlflow server" in args and "--serve-artifacts" in args and "--artifacts-destination" in args
    (pw,) = [e for e in c["env"] if e["name"] == "PGPASSWORD"]
    assert "secretKeyRef" in pw["valueFrom"]


def is_allowed_host_header(allowed: list[str], host: str) -> bool:
    """MLflow 3.17's rule (mlflow.server.security_utils.is_allowed_host_header, checked by hand against it;
    importing mlflow.server here takes seconds): exact match, or fnmatch for patterns with '*'."""
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_allowed_hosts_accept_the_service_names():
    (cfg,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-config"]
    allowed = [h.strip() for h in cfg["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    (env,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "mask-itm-env"]
    host = env["data"]["MLFLOW_TRACKING_URI"].split("://", 1)[1].rstrip("/")
    assert is_allowed_host_header(allowed, host)
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_runtime_env_excludes_local_state_and_is_accepted_by_ray():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    path = CLUSTER / "runtime_env.yaml"
    env = parse_runtime_env_args(runtime_env=str(path), working_dir=".")  # what `ray job submit` builds
    for excluded in (".venv", "artifacts", ".git"):
        assert excluded in env["excludes"]
    assert env["working_dir"] == "."
    RuntimeEnv(**env)  # Ray's own validation of the fields


# --- credentials and docs ---------------------------------------------------------------------------

_SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                                   # AWS access key ids
    re.compile(r"aws_secret_access_key\s*[:=]\s*\S+", re.I),
    re.compile(r"aws_session_token\s*[:=]\s*\S+", re.I),
    re.compile(r"\b[A-Za-z0-9/+]{40}\b"),                                         # secret-key shaped
    re.compile(r"password\s*[:=]\s*['\"]?[^\s'\"$({]+", re.I),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),                                        # user:password@ in URIs
    re.compile(r"--from-literal=\w+=[^$\s\"]"),                                   # a literal secret value
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*[A-Za-z0-9]{16,}"),
]


def _deployment_files() -> list[Path]:
    return [ROOT / "ray_cluster.yaml", OPS, *sorted(p for p in CLUSTER.iterdir() if p.is_file())]


def test_scanner_catches_planted_credentials():
    planted = ["AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
               "password: hunter2", "postgresql://mlflow:hunter2@db/mlflow",
               "--from-literal=password=hunter2", "RAY_AUTH_TOKEN=0123456789abcdef0123"]
    for text in planted:
        assert any(p.search(text) for p in _SECRET_PATTERNS), text


def test_no_literal_credentials_in_deployment_files():
    for path in _deployment_files():
        text = path.read_text()
        for pattern in _SECRET_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.name}: {m.group(0)!r}"


def test_operations_doc_names_every_command():
    text = OPS.read_text()
    for needle in [
        "ray up ray_cluster.yaml",
        "ray get-auth-token --generate",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE=token",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml "
        "-- python jobs/build_knowledge.py",
        "python tune/sweep.py",
        "mlflow ui",
        "kubectl apply -f cluster/raycluster.yaml",
        "kubectl apply -f cluster/rayjob.yaml",
        "kubectl apply -f cluster/reindex-cronjob.yaml",
        "kubectl apply -f cluster/mlflow.yaml",
        "jobs/reindex.py",
        "What is verified, and what is not",
        "cluster/reindex.crontab",
    ]:
        assert needle in text, needle
    # every manifest in cluster/ is mentioned
    for p in CLUSTER.glob("*.yaml"):
        assert f"cluster/{p.name}" in text, p.name


def test_runtime_env_upload_package_leaves_local_state_out(tmp_path):
    """Ray's own packaging of `--working-dir .` with the excludes of cluster/runtime_env.yaml."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    repo = tmp_path / "repo"
    for rel in ("jobs/build_knowledge.py", "mask/__init__.py", ".venv/lib/big.so", "artifacts/mlflow.db",
                ".git/HEAD", "mask/__pycache__/x.pyc", "mask_itm.egg-info/PKG-INFO"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    out = tmp_path / "pkg.zip"
    create_package(str(repo), out, True, excludes=env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(out).namelist()}
    assert {"jobs/build_knowledge.py", "mask/__init__.py"} <= names
    assert not any(n.split("/")[0] in {".venv", "artifacts", ".git", "mask_itm.egg-info"} or "__pycache__" in n
                   for n in names), names


def test_reindex_crontab_lines_are_cron_entries_that_run_reindex():
    lines = [ln for ln in (CLUSTER / "reindex.crontab").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, "no active cron line"
    for ln in lines:
        fields = ln.split(None, 5)
        assert len(fields) == 6, ln
        minute, hour, dom, month, dow, command = fields
        for f, hi in ((minute, 59), (hour, 23)):
            assert f == "*" or (f.isdigit() and 0 <= int(f) <= hi), ln
        assert (dom, month, dow) == ("*", "*", "*")
        assert "jobs/reindex.py" in command and "ray job submit" in command and "RAY_AUTH_MODE=token" in command
        assert "AWS_" not in command  # credentials come from the head's environment, never from the line
