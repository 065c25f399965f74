"""Fault injection for the fault-tolerance tests: ``MASK_FAULT_INJECT=kill:<point>`` makes the process
that reaches ``<point>`` kill itself with SIGKILL (no cleanup, no ``finally``: a crashed driver).

The Ray-side hooks (``train_epoch:<n>:<marker>``, ``detect_batch:<n>:<marker>``) live with the stages
they break (:mod:`mask.pipeline.train`, :mod:`mask.pipeline.extract`); this one is for drivers.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

FAULT_ENV = "MASK_FAULT_INJECT"


def kill_point(point: str) -> None:
    """SIGKILL this process if ``MASK_FAULT_INJECT`` is ``kill:<point>``; otherwise nothing."""
    if os.environ.get(FAULT_ENV, "") == f"kill:{point}":
        logger.error("fault injection: killing process %d at %s", os.getpid(), point)
        os.kill(os.getpid(), signal.SIGKILL)
