"""Ray start-up and the run context shared by every job.

:func:`job_run` is the one job setup: the storage root (:class:`JobContext`), Ray (started or
joined), and the job's MLflow run.  The embedded default starts a local Ray; inside ``ray job
submit`` (RAY_ADDRESS is set) or with ``ray.address=auto`` the job joins the cluster instead.  One
place decides, so every job behaves alike.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mask import tracking
from mask.config import MaskConfig
from mask.pipeline.console import quiet_ray_console
from mask.pipeline.resources import check_storage_reachable
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
        # Ray Data's console (warnings and one progress line per stage), inherited by a local Ray's workers
        quiet_ray_console(debug=logger.isEnabledFor(logging.DEBUG))
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
            port = _free_local_port()
            # Ray's own components (Ray Train's PlacementGroupCleaner asks the state API every second whether
            # the training controller is alive) find the API server by auto-detecting "the" Ray on the
            # machine: with no dashboard, or with several Ray instances on one machine, they ask a missing
            # server or another instance's GCS (40 s timeouts), and the cleaner's stop times out with a
            # GetTimeoutError traceback at the end of every training.  Ray's RAY_API_SERVER_ADDRESS, inherited
            # by this instance's workers, names this instance's dashboard.
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # Ray's "Started a local Ray instance. View the dashboard at ..." line carries ANSI colour codes
            # whatever stderr is; below DEBUG it is lowered (Python's logger level) and said once, plainly
            ray_worker_log = logging.getLogger("ray._private.worker")
            level = ray_worker_log.level
            if not logger.isEnabledFor(logging.DEBUG):
                ray_worker_log.setLevel(logging.WARNING)
            try:
                ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True,
                         dashboard_host="127.0.0.1", dashboard_port=port)
            finally:
                ray_worker_log.setLevel(level)
            logger.info("started a local Ray; its dashboard: http://127.0.0.1:%d", port)
    # Ray Data's own progress bars, quiet per-operator logs (also when Ray was started by the caller).
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.verbose_stats_logs = False
    # before any work: a node-local storage root on a multi-node / autoscaling cluster is refused
    check_storage_reachable(cfg)


def _free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the local Ray's dashboard takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JobContext:
    """What every pipeline stage needs: the validated config and the storage root."""

    cfg: MaskConfig
    store: Store

    @classmethod
    def from_config(cls, cfg: MaskConfig) -> JobContext:
        return cls(cfg=cfg, store=Store(cfg.storage.root, cfg.storage.options))

    @property
    def tracking_uri(self) -> str | None:
        """The MLflow tracking URI jobs record in their summaries (and hand to Ray Train workers)."""
        return tracking.tracking_uri(self.cfg.tracking, self.store.root)


@contextmanager
def job_run(ctx: JobContext, job: str, *, run_name: str | None = None, params: Mapping[str, Any] | None = None,
            tags: Mapping[str, Any] | None = None, ray: bool = True) -> Iterator[Any]:
    """The one job setup: Ray started or joined (``ray=False``: not needed), then the job's MLflow run.

    Args:
        ctx: the job context (config and storage root); built first, so a job can fail on bad
            input before Ray or MLflow start.
        job: the job's name, recorded as the run tag ``job``.
        run_name: the MLflow run name (default ``job``).
        params: run params (default: the flattened config).
        tags: extra run tags.
        ray: start or join Ray first.

    Yields:
        The open run (:class:`mask.tracking.Run` or :class:`mask.tracking.NullRun`); it ends FINISHED,
        FAILED (exception) or KILLED (Ctrl-C).
    """
    if ray:
        init_ray(ctx.cfg)
    with tracking.start_run(ctx.cfg.tracking, ctx.store.root, run_name or job,
                            params=ctx.cfg.flat() if params is None else params,
                            tags={"job": job, **(tags or {})}) as run:
        yield run
