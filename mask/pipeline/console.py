"""A quiet console: the project's lines, one progress line per long stage, and the summary.

Ray Data and Ray Train log every dataset execution ("Starting execution of …", the execution plan,
"… finished in …"), every epoch's split of the training dataset, every reported training result and
checkpoint, and a multi-line progress report every 10 s when stderr is not a terminal.  All of it stays
in Ray's log files (``logs/ray-data*.log``, ``logs/train/`` of the Ray session); the console is set
through the libraries' own documented settings:

* **Ray Data**: ``RAY_DATA_LOGGING_CONFIG`` names a logging config for the ``ray.data`` logger, read
  by the driver and by every worker that inherits the variable (a local Ray started by
  :func:`mask.pipeline.runtime.init_ray`).  Ours is Ray Data's default — DEBUG to the session's
  ``ray-data.log`` — with a console filter (:class:`RayDataConsoleFilter`) that passes warnings and
  errors and, in the driver only, the ``Total Progress: n/N`` line of Ray Data's non-terminal progress
  report (every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds, 30 by default here).  On a terminal
  Ray Data draws its progress bars as usual.
* **Ray Train**: ``RunConfig(logging_config=LoggingConfig(log_level=…))`` (:func:`train_log_level`).

With ``--log-level DEBUG`` nothing is quietened.  A variable the user set is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile

logger = logging.getLogger(__name__)

DATA_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"
PROGRESS_INTERVAL_ENV = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"
PROGRESS_INTERVAL_S = 30
PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"


def _in_driver() -> bool:
    """True outside Ray actors (the driver; a progress report in an actor, e.g. the training dataset's
    per-epoch ``SplitCoordinator``, is not a stage of the job)."""
    import ray

    if not ray.is_initialized():
        return True
    return ray.get_runtime_context().get_actor_id() is None


#: Ray Data's warning when a dataset's progress bars are off: the training dataset's are, on purpose
#: (:func:`mask.pipeline.train.training_dataset`: Ray Train splits it again every epoch, and a bar per
#: epoch split drowns the job), so this warning says nothing a user can act on.
PROGRESS_OFF = "Progress bars disabled"


class RayDataConsoleFilter(logging.Filter):
    """Ray Data's console handler: warnings and errors (but :data:`PROGRESS_OFF`); in the driver, the
    ``Total Progress`` lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "hide", False):  # Ray Data's own HiddenRecordFilter convention
            return False
        if record.levelno >= logging.WARNING:
            return not str(record.msg).startswith(PROGRESS_OFF)
        return record.name == PROGRESS_LOGGER and str(record.msg).startswith("Total Progress") and _in_driver()


def ray_data_logging_config() -> dict:
    """Ray Data's default logging config (Ray 2.60) with :class:`RayDataConsoleFilter` on its console."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
        "filters": {"console_filter": {"()": f"{__name__}.RayDataConsoleFilter"}},
        "handlers": {
            "file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                     "filename": "ray-data.log"},
            "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "INFO",
                        "filters": ["console_filter"]},
        },
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
    }


def _write_config() -> str:
    """The config as a file (Ray Data reads a path), named by its content, written atomically."""
    text = json.dumps(ray_data_logging_config(), indent=1, sort_keys=True)  # JSON is YAML
    path = os.path.join(tempfile.gettempdir(), f"mask-ray-data-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def quiet_ray_console(debug: bool) -> None:
    """Set Ray Data's console (before Ray starts, so a local Ray's workers inherit it); ``debug``: leave it."""
    if debug:
        return
    if DATA_CONFIG_ENV not in os.environ:
        os.environ[DATA_CONFIG_ENV] = _write_config()
    os.environ.setdefault(PROGRESS_INTERVAL_ENV, str(PROGRESS_INTERVAL_S))
    if "ray.data" in sys.modules:  # the driver read Ray Data's config when it first imported ray.data
        try:
            from ray.data._internal.logging import configure_logging

            configure_logging()
        except ImportError as e:  # another Ray version: the workers still read the variable
            logger.debug("Ray Data's logging could not be configured again in the driver: %s", e)


def train_log_level(debug: bool) -> str:
    """Ray Train's console level (``ray.train.LoggingConfig``): its per-report lines only with DEBUG."""
    return "DEBUG" if debug else "WARNING"


def quiet_train_worker(level: str) -> None:
    """In a Ray Train worker: give Ray Train's per-report logger the :func:`train_log_level`.

    Ray Train 2.60 logs "Reporting training result …" through ``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py``, a logger named by its file path: it is outside
    ``ray.train``, so ``LoggingConfig`` does not reach it and it propagates to the worker's root logger
    (the project's own worker lines, which stay).  Python's logger level is set on it here.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay on the console
        return
    logging.getLogger(context.__file__).setLevel(level)
