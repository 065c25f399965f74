"""Ray start-up and the run context shared by every job.

The embedded default starts a local Ray; inside ``ray job submit`` (RAY_ADDRESS is set) or with
``ray.address=auto`` the job joins the cluster instead.  One place decides, so every job behaves alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mask.config import MaskConfig
from mask.storage import Store

logger = logging.getLogger(__name__)


#: A deprecation warning that Ray Train raises in its own workers (not from any argument of ours).
RAY_INTERNAL_DEPRECATION = "`ExecutionOptions.exclude_resources` is deprecated"


def init_ray(cfg: MaskConfig) -> None:
    """Start or join Ray as the config says (an already initialised Ray is kept as it is).

    Workers take S3 credentials from their own environment / AWS chain, never from this process:
    a local Ray started here inherits this process's environment; on a cluster each node needs its
    own (an instance role, or the environment ``ray start`` ran with).  Credentials are not forwarded
    through Ray's ``runtime_env``: Ray's runtime-env agent writes the serialized environment, values
    included, into ``runtime_env_agent.log`` (checked with Ray 2.60).
    """
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address and address != "local":
            logger.info("joining Ray at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": a new instance, never a cluster that `ray start` left running on this machine
            # (a bare ray.init() would join the one recorded in /tmp/ray/ray_current_cluster).
            logger.info("starting a local Ray (num_cpus=%s)", cfg.ray.num_cpus)
            # Python's documented warning filter, inherited by the local Ray's workers: Ray Train's own
            # DatasetManager passes the deprecated ExecutionOptions.exclude_resources (Ray 2.60), which no
            # argument of ours can avoid
            quiet = f"ignore:{RAY_INTERNAL_DEPRECATION}:DeprecationWarning"
            prior = os.environ.get("PYTHONWARNINGS")
            if not prior or quiet not in prior:
                os.environ["PYTHONWARNINGS"] = f"{prior},{quiet}" if prior else quiet
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    # Ray Data's own progress bars, quiet per-operator logs (also when Ray was started by the caller).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.verbose_stats_logs = False


def cluster_gpus() -> int:
    """GPUs Ray sees in the cluster (0 on CPU-only machines)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass
class JobContext:
    """What every pipeline stage needs: the validated config and the storage root."""

    cfg: MaskConfig
    store: Store

    @classmethod
    def from_config(cls, cfg: MaskConfig) -> JobContext:
        return cls(cfg=cfg, store=Store(cfg.storage.root, cfg.storage.options))
