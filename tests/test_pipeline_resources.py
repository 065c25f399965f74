"""Per-stage resources from config, autoscaling pools, and the cluster checks (mask/pipeline/resources.py)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from mask.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["vg", "coco", "flickr30k"])
def test_real_run_configs_ask_for_gpus_and_an_autoscaling_pool(name):
    cfg = load_config(name)
    for key, pool in (("detector", cfg.detector), ("represent", cfg.represent), ("clip", cfg.clip)):
        assert pool.num_gpus >= 1, key
        lo, hi = pool.pool_sizes()
        assert 1 <= lo < hi, key
    assert cfg.train.use_gpu


def test_demo_asks_for_no_gpu():
    cfg = load_config("demo")
    assert cfg.detector.num_gpus == cfg.represent.num_gpus == cfg.clip.num_gpus == 0
    assert not cfg.train.use_gpu


def test_pool_sizes_validated_and_num_actors_pins_the_pool():
    with pytest.raises(ConfigError, match="min_actors=3 is larger than max_actors=2"):
        load_config(overrides=["detector.min_actors=3", "detector.max_actors=2"])
    assert load_config(overrides=["detector.num_actors=3"]).detector.pool_sizes() == (3, 3)
    assert load_config(overrides=["represent.min_actors=2", "represent.max_actors=5"]).represent.pool_sizes() == (2, 5)


def test_pool_fields_do_not_change_artifact_identity():
    from mask.pipeline.identity import extractor_name, model_tag

    a, b = load_config("demo"), load_config("demo", ["detector.num_gpus=1", "detector.max_actors=9",
                                                      "detector.device=cpu", "clip.num_gpus=1"])
    assert extractor_name(a.detector) == extractor_name(b.detector)
    assert model_tag(a.clip) == model_tag(b.clip)


def test_no_start_time_cluster_sizing_left():
    """The stages ask for what config says; nothing sizes work from ray.cluster_resources() any more."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "mask").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"cluster_resources\(|cluster_gpus\(|ActorPoolStrategy\(size=|concurrency=", line)]
    # no fixed pool either: the last one, the training join's single actor, became Ray tasks
    # (mask.pipeline.pair_join: its rows can be rebuilt by lineage after a node loss)
    assert hits == []


def test_autoscaling_pool_has_no_deprecation_warning(ray_local):
    import ray.data

    from mask.pipeline.resources import pool_args

    class Double:
        def __call__(self, batch):
            return {"x": batch["id"] * 2}

    cfg = load_config(overrides=["represent.min_actors=1", "represent.max_actors=2"])
    args = pool_args(cfg.represent)
    assert (args["compute"].min_size, args["compute"].max_size) == (1, 2)
    assert (args["num_gpus"], args["num_cpus"]) == (0, 1)
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    def deprecations(**kw) -> list[str]:
        keep = Keep()
        ray_data_logger = logging.getLogger("ray.data")  # Ray's loggers do not propagate to the root
        ray_data_logger.addHandler(keep)
        try:
            out = ray.data.range(8).map_batches(Double, batch_size=4, **kw).take_all()
        finally:
            ray_data_logger.removeHandler(keep)
        assert sorted(r["x"] for r in out) == [2 * i for i in range(8)]
        return [r.getMessage() for r in keep.records if "deprecated" in r.getMessage().lower()]

    assert deprecations(**args) == []
    # the check sees Ray's warning: the older concurrency=(min, max) form is reported
    assert any("concurrency" in m for m in deprecations(concurrency=(1, 2)))


def test_local_storage_refused_on_a_multi_node_cluster(monkeypatch):
    from mask.pipeline import resources

    monkeypatch.setattr(resources, "_alive_nodes", lambda: [{}, {}])
    monkeypatch.setattr(resources, "autoscaler_running", lambda: False)
    with pytest.raises(ConfigError, match=r"storage\.root='./artifacts'.*2 nodes.*s3://.*storage\.shared_fs=true"):
        resources.check_storage_reachable(load_config())
    resources.check_storage_reachable(load_config(overrides=["storage.shared_fs=true"]))
    resources.check_storage_reachable(load_config(overrides=["storage.root=s3://bucket/mask"]))
    # one node, but an autoscaler that may add more: refused as well
    monkeypatch.setattr(resources, "_alive_nodes", lambda: [{}])
    monkeypatch.setattr(resources, "autoscaler_running", lambda: True)
    with pytest.raises(ConfigError, match="autoscaler"):
        resources.check_storage_reachable(load_config(overrides=["storage.root=file:///tmp/x"]))
    monkeypatch.setattr(resources, "autoscaler_running", lambda: False)
    resources.check_storage_reachable(load_config())  # a single machine: fine


def test_gpus_that_can_never_come_fail_at_once(monkeypatch):
    from mask.pipeline import resources

    monkeypatch.setattr(resources, "_alive_nodes", lambda: [{"Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(resources, "autoscaler_running", lambda: False)
    t0 = time.monotonic()
    with pytest.raises(resources.ClusterResourcesError,
                       match=r"detector\.num_gpus=1.*no autoscaler.*set detector\.num_gpus=0"):
        resources.ensure_gpus(load_config("vg"), "detector.num_gpus", 1)
    assert time.monotonic() - t0 < 1
    resources.ensure_gpus(load_config("demo"), "detector.num_gpus", 0)  # nothing asked, nothing checked
    monkeypatch.setattr(resources, "_alive_nodes", lambda: [{"Resources": {"CPU": 2.0, "GPU": 1.0}}])
    resources.ensure_gpus(load_config("vg"), "detector.num_gpus", 1)


def test_gpus_with_an_autoscaler_that_never_starts_one_is_a_bounded_wait(monkeypatch):
    import ray.autoscaler.sdk

    from mask.pipeline import resources

    asked = []
    monkeypatch.setattr(resources, "_alive_nodes", lambda: [{"Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(resources, "autoscaler_running", lambda: True)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: asked.append(kw))
    t0 = time.monotonic()
    with pytest.raises(resources.ClusterResourcesError, match=r"within ray\.resource_wait_s=2 s"):
        resources.ensure_gpus(load_config("vg", ["ray.resource_wait_s=2"]), "clip.num_gpus", 1)
    assert 2 <= time.monotonic() - t0 < 6
    assert asked == [{"bundles": [{"GPU": 1}]}, {"bundles": []}]  # asked, then withdrawn


def test_auto_device_without_cuda_falls_back_to_cpu_and_warns(monkeypatch, caplog):
    import ray
    import torch

    from mask.pipeline import resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])  # what a fake GPU node assigns
    monkeypatch.setattr(resources, "node_cpus", lambda: 4)
    monkeypatch.setattr(resources, "node_id", lambda: "n1")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="mask.pipeline.resources"):
            dev = resources.actor_device("auto", "detector", None, 2)
        assert dev.type == "cpu" and torch.get_num_threads() == 2  # node CPUs / max actors
        assert any("falls back to the CPU" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        with pytest.raises(resources.ClusterResourcesError, match="detector.device=cuda"):
            resources.actor_device("cuda", "detector")
    finally:
        torch.set_num_threads(before)


def test_a_readonly_monitor_is_not_an_autoscaler():
    """A local ray.init() runs the monitor with Ray's readonly provider (anonymous node_<id> types): it
    cannot add nodes; a cluster-config autoscaler reports its configured node types."""
    import json

    from mask.pipeline.resources import _has_node_types

    local = {"autoscaler_report": {"active_nodes": {"node_0123abcd": 1}, "idle_nodes": None,
                                   "node_type_mapping": {"0123abcd": "node_0123abcd"}}}
    fake = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1}, "idle_nodes": None,
                                  "node_type_mapping": {"fff00000": "ray.head.default"}}}
    assert not _has_node_types(json.dumps(local).encode())
    assert _has_node_types(json.dumps(fake).encode())
    assert not _has_node_types(None) and not _has_node_types(b"not json")


def test_a_local_ray_is_not_multi_node(ray_local):
    from mask.pipeline import resources

    assert not resources.autoscaler_running()
    resources.check_storage_reachable(load_config())  # ./artifacts on a local Ray: allowed
