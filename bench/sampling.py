"""A background sampler shared by the benchmarks (``bench/extract.py``'s process-tree monitor and
``bench/scale.py``'s peak-RSS probe): ``_sample()`` runs once on entry, every ``interval`` seconds in
a daemon thread, and once on exit."""

from __future__ import annotations

import threading
import time


class Sampler:
    """Subclasses define ``_sample``; ``_own_cpu`` is the CPU time the sampling thread itself used."""

    interval: float = 0.1

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample()
        self._own_cpu = time.thread_time() - t0

    def _start(self) -> None:
        self._own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample()
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
