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


def init_ray(cfg: MaskConfig) -> None:
    """Start or join Ray as the config says (no-op when already initialised)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("starting a local Ray (num_cpus=%s)", cfg.ray.num_cpus)
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False)
    # Ray Data's own progress bars, quiet per-operator logs.
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
