"""Per-stage resources from config, and the checks a cluster must pass before any work starts.

Every Ray Data actor stage (detector, μ, CLIP) asks Ray for what its config section says
(:class:`mask.config.ActorPoolConfig`: ``num_gpus``, ``num_cpus``, ``min_actors``..``max_actors``),
never for what the cluster happened to have when the job started: on an autoscaling cluster whose head
has no GPU, the GPU request is what makes the autoscaler start a GPU node, and an autoscaling pool
uses nodes that join later.  Inside an actor, ``device: auto`` picks CUDA when torch sees one, else
the CPU (logged; a warning when Ray assigned the actor a GPU that torch cannot see).

Checks (each fails with a message naming the config key and the fix):

* :func:`check_storage_reachable` — a local storage root on a cluster of more than one node (or one
  that can autoscale) would scatter artifact parts over the nodes' disks.
* :func:`ensure_gpus` — a GPU request that no node has: with an autoscaler, a bounded wait for it to
  start one (``ray.resource_wait_s``); without one, an error at once instead of a silent hang.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mask.config import ActorPoolConfig, ConfigError, MaskConfig
from mask.errors import MaskError

logger = logging.getLogger(__name__)

#: Internal KV key the Ray autoscaler (monitor) publishes its status under.
_AUTOSCALER_STATUS_KEY = "__autoscaling_status"


class ClusterResourcesError(MaskError, RuntimeError):
    """The cluster cannot provide what a stage asks for (the message names the key and the fix)."""


def pool_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """``map_batches`` keyword arguments of an actor stage: its resource request and an autoscaling pool.

    Uses ``compute=ActorPoolStrategy(min_size=, max_size=)``: in Ray 2.60 the ``concurrency`` argument
    of ``map_batches`` is deprecated (since 2.51) for callable classes.
    """
    import ray.data

    lo, hi = pool.pool_sizes()
    return {"num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus,
            "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)}


def node_id() -> str:
    """Ray node id of the calling process ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 — best-effort provenance only
        return ""


def node_cpus() -> int:
    """CPUs of the Ray node this process runs on (os.cpu_count() outside Ray)."""
    import os

    try:
        import ray

        if ray.is_initialized():
            me = ray.get_runtime_context().get_node_id()
            for n in ray.nodes():
                if n.get("NodeID") == me:
                    return max(1, int(n.get("Resources", {}).get("CPU", 1)))
    except Exception:  # noqa: BLE001 — fall back to the machine's cores
        pass
    return os.cpu_count() or 1


def actor_device(device: str, stage: str, cpu_threads: int | None = None, max_actors: int | None = 1):
    """torch's device inside an actor (``auto``: CUDA when torch sees one, else CPU), threads set on CPU:
    ``cpu_threads``, else the node's CPUs / ``max_actors`` (``max_actors=None``: torch's setting is kept,
    for in-process use).

    Logged; a warning when Ray assigned this actor a GPU but torch has no CUDA (e.g. a fake GPU node,
    or a driver problem) — the stage then runs on the CPU.

    Raises:
        ClusterResourcesError: ``device: cuda`` and torch sees no CUDA device.
    """
    import torch

    gpu_ids: list = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001
        pass
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ClusterResourcesError(f"{stage}.device=cuda but torch sees no CUDA device on node {node_id()} "
                                    f"(Ray assigned GPUs {gpu_ids}); use {stage}.device=auto or cpu")
    dev = torch.device("cuda" if device != "cpu" and cuda else "cpu")
    if dev.type == "cpu":
        if cpu_threads or max_actors:
            torch.set_num_threads(cpu_threads or max(1, node_cpus() // max(1, max_actors)))
        threads = torch.get_num_threads()
        if gpu_ids and device == "auto":
            logger.warning("%s: Ray assigned GPU %s to this actor but torch sees no CUDA device; "
                           "device=auto falls back to the CPU (%d threads)", stage, gpu_ids, threads)
        else:
            logger.info("%s: running on the CPU (%d threads, device=%s)", stage, threads, device)
    else:
        logger.info("%s: running on %s (Ray GPUs %s)", stage, dev, gpu_ids)
    return dev


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes runs in this cluster (so nodes may join during the job).

    The Ray monitor publishes its status in the GCS KV store on every cluster, also a plain local
    ``ray.init()``; there it runs Ray's *readonly* provider, whose node types are the anonymous
    ``node_<id>`` (``ray.autoscaler._private.util.format_readonly_node_type``).  A launcher / KubeRay /
    fake-multinode autoscaler reports the node types of its cluster config instead.
    """
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        blob = _internal_kv_get(_AUTOSCALER_STATUS_KEY)
    except Exception:  # noqa: BLE001 — no KV (not connected): no autoscaler known
        return False
    return _has_node_types(blob)


def _has_node_types(blob: bytes | None) -> bool:
    if not blob:
        return False
    import json

    try:
        report = json.loads(blob).get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return False
    types = set((report.get("active_nodes") or {}).keys()) | set((report.get("idle_nodes") or {}).keys())
    types |= set((report.get("node_type_mapping") or {}).values())
    return any(not str(t).startswith("node_") for t in types)


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_multi_node(cfg: MaskConfig) -> bool:
    """More than one node now, or a cluster that can grow (an autoscaler runs)."""
    return len(_alive_nodes()) > 1 or autoscaler_running()


def check_storage_reachable(cfg: MaskConfig) -> None:
    """Refuse a node-local storage root on a multi-node (or autoscaling) cluster, before any work.

    Raises:
        ConfigError: naming ``storage.root`` and the fix (``s3://…`` or ``storage.shared_fs: true``).
    """
    from mask.storage import Store

    if cfg.storage.shared_fs or Store(cfg.storage.root, cfg.storage.options).protocol != "file":
        return
    nodes = len(_alive_nodes())
    scaling = autoscaler_running()
    if nodes > 1 or scaling:
        why = f"{nodes} node{'s' if nodes != 1 else ''}" + (" and an autoscaler that may add more" if scaling else "")
        raise ConfigError(
            f"storage.root={cfg.storage.root!r} is a local path, but this Ray cluster has {why}: each node "
            "would write its artifact parts to its own disk. Set storage.root=s3://bucket/prefix (object "
            "storage every node reaches), or, if that path is a filesystem every node mounts at the same "
            "place (NFS, EFS, …), say so with storage.shared_fs=true")


def ensure_gpus(cfg: MaskConfig, key: str, num_gpus: float) -> None:
    """Make sure a stage asking for ``num_gpus`` per actor/worker can ever get them.

    A node with that many GPUs exists: return.  None, and no autoscaler: fail at once.  None, with an
    autoscaler: ask it for one node's worth (``request_resources``) and wait at most
    ``ray.resource_wait_s``, logging progress, then fail with a message.

    Args:
        cfg: the job config (``ray.resource_wait_s``).
        key: the config key that asked (``detector.num_gpus``) — named in the messages.
        num_gpus: GPUs per actor / worker (0: nothing to check).

    Raises:
        ClusterResourcesError: the GPUs cannot (or did not within the wait) become available.
    """
    if not num_gpus:
        return

    def fits() -> bool:
        return any(n.get("Resources", {}).get("GPU", 0) >= num_gpus for n in _alive_nodes())

    if fits():
        return
    fix = (f"set {key}=0 to run this stage on CPUs, or run on a cluster with GPU worker nodes "
           "(ray_cluster.yaml / cluster/raycluster.yaml)")
    if not autoscaler_running():
        raise ClusterResourcesError(f"{key}={num_gpus}: no node of this Ray cluster has {num_gpus} GPU(s) and "
                                    f"no autoscaler can start one; {fix}")
    from ray.autoscaler.sdk import request_resources

    wait = cfg.ray.resource_wait_s
    logger.info("%s=%s: no GPU node yet; asking the autoscaler for one (waiting at most %.0f s)", key, num_gpus, wait)
    request_resources(bundles=[{"GPU": num_gpus}])
    t0 = last = time.monotonic()
    try:
        while not fits():
            now = time.monotonic()
            if now - t0 > wait:
                raise ClusterResourcesError(
                    f"{key}={num_gpus}: the autoscaler started no node with {num_gpus} GPU(s) within "
                    f"ray.resource_wait_s={wait:g} s (does the cluster config have a GPU node type, and quota "
                    f"for it?); {fix}")
            if now - last > 30:
                logger.info("%s: still waiting for a GPU node (%.0f of %.0f s)", key, now - t0, wait)
                last = now
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])  # the stage's own requests keep the node; do not pin it beyond them
    logger.info("%s: a GPU node joined after %.1f s", key, time.monotonic() - t0)
