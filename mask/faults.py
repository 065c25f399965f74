"""Fault injection for the fault-tolerance tests: one spec format, one parser, one place.

``MASK_FAULT_INJECT=<point>[:<n>[:<marker>]]`` makes the code that reaches the hook ``<point>`` fail
there — at its n-th pass when ``<n>`` is given (a batch, an epoch, a report), and only once when
``<marker>`` is given (the marker file records that it fired, so a retry or a rerun gets past it).

=========================  ==================================================  ==========================
point                      what fails                                           where
=========================  ==================================================  ==========================
``detect_batch``           a detector actor exits hard at its n-th batch       :mod:`mask.pipeline.extract`
``train_epoch``            a training worker exits hard at epoch n             :mod:`mask.pipeline.train`
``tune_error``             a Tune trial raises after its n-th report           :mod:`mask.pipeline.tune_trial`
``tune_report``            a Tune trial hangs after its n-th report (a test    :mod:`mask.pipeline.tune_trial`
                           kills the driver meanwhile)
``index.after_mu`` …       the driver kills itself with SIGKILL (no cleanup,   :func:`kill_point` callers
                           no ``finally``: a crashed driver)
=========================  ==================================================  ==========================

The driver reads the spec (:func:`driver_spec`) and hands it to Ray actors, workers and trials with
their arguments: on a cluster their environment is not the driver's.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FAULT_ENV = "MASK_FAULT_INJECT"


@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``MASK_FAULT_INJECT`` value."""

    point: str
    at: int | None = None  # the pass that fails (None: every pass)
    marker: str | None = None  # fire once: the file written when it fires

    @classmethod
    def parse(cls, text: str) -> FaultSpec | None:
        """``<point>[:<n>[:<marker>]]`` → a spec; "" → None.

        Raises:
            ValueError: ``<n>`` is not an integer.
        """
        if not text:
            return None
        point, _, rest = text.partition(":")
        at, _, marker = rest.partition(":")
        try:
            n = int(at) if at else None
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected <point>[:<n>[:<marker>]] with an integer n") from None
        return cls(point=point, at=n, marker=marker or None)

    def fires(self, point: str, count: int | None = None) -> bool:
        """Whether the hook ``point`` at pass ``count`` fails now (writes the marker when it does)."""
        if self.point != point or (self.at is not None and count != self.at):
            return False
        if self.marker is not None:
            if os.path.exists(self.marker):
                return False
            with open(self.marker, "w") as f:
                f.write("fired")  # what the tests read back
        return True


def driver_spec() -> str:
    """This process's ``MASK_FAULT_INJECT`` ("" when unset), to hand to Ray actors, workers and trials."""
    return os.environ.get(FAULT_ENV, "")


def fires(point: str, count: int | None = None, spec: str | None = None) -> bool:
    """Whether the hook ``point`` fails now, by ``spec`` (default: this process's environment)."""
    parsed = FaultSpec.parse(driver_spec() if spec is None else spec)
    return parsed is not None and parsed.fires(point, count)


def exit_point(point: str, count: int, spec: str) -> None:
    """Exit this Ray actor or worker hard (``os._exit``: Ray sees it die) if ``spec`` says so."""
    if fires(point, count, spec):
        logger.warning("fault injection: %s %d: exiting process %d", point, count, os.getpid())
        os._exit(1)


def kill_point(point: str) -> None:
    """SIGKILL this process if ``MASK_FAULT_INJECT`` names ``point``; otherwise nothing."""
    if fires(point):
        logger.error("fault injection: killing process %d at %s", os.getpid(), point)
        os.kill(os.getpid(), signal.SIGKILL)
