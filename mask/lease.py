"""A lease with expiry on the storage root: at most one holder at a time, taken over when it expires.

Used by ``jobs/reindex.py`` so that two scheduled runs of the same gallery cannot both publish.  A
lease is a folder of *generation* files ``<rel>/<generation:012d>.json``; generation ``g + 1`` can
only be created once (:meth:`mask.storage.Store.create_exclusive`: an exclusive local link, an S3
conditional PUT), so of two runs that both find generation ``g`` expired or released exactly one
gets ``g + 1``.  The holder renews its own file (a heartbeat thread) and marks it released at the
end; a killed holder simply stops renewing, and its lease expires ``ttl_s`` after the last renewal.

Each file holds ``{"owner", "generation", "state": "held"|"released", "acquired_at", "expires_at"}``
(Unix seconds, the machines' clocks; keep ``ttl_s`` well above their skew).  :meth:`Lease.check`
fences the irreversible step: it fails if a newer generation exists or the lease has expired.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mask.errors import MaskError
from mask.storage import StorageError, Store

logger = logging.getLogger(__name__)


class LeaseBusy(MaskError, RuntimeError):
    """Another holder has the lease; the message says who and until when."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


class LeaseLost(MaskError, RuntimeError):
    """This holder's lease expired or was taken over; it must not publish."""

    exit_code = 1  # not bad input: the run failed

    exit_code = 1  # not bad input: the run failed


@dataclass
class LeaseState:
    generation: int
    owner: str
    state: str
    acquired_at: float
    expires_at: float

    def live(self, now: float) -> bool:
        return self.state == "held" and self.expires_at > now


def default_owner() -> str:
    """``host:pid:random`` — unique per process and attempt."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """A lease on ``rel`` under a storage root.

    Args:
        store: the storage root.
        rel: the lease folder (``indexes/<gallery>/_lease``).
        ttl_s: seconds a holder keeps the lease without renewing.
        owner: a name for this holder (default :func:`default_owner`).
        heartbeat: renew every ``ttl_s / 3`` in a daemon thread while held.
    """

    def __init__(self, store: Store, rel: str, ttl_s: float, owner: str | None = None, heartbeat: bool = True):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        store.path(rel)  # validates rel
        self.store = store
        self.rel = rel
        self.ttl_s = float(ttl_s)
        self.owner = owner or default_owner()
        self.heartbeat = heartbeat
        self.generation: int | None = None
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- reading --------------------------------------------------------------------------------

    def _generations(self) -> list[int]:
        gens = []
        for name in self.store.list(self.rel):
            stem = name[:-5] if name.endswith(".json") else ""
            if stem.isdigit():
                gens.append(int(stem))
        return sorted(gens)

    def _file(self, gen: int) -> str:
        return f"{self.rel}/{gen:012d}.json"

    def _read(self, gen: int) -> LeaseState | None:
        try:
            d = json.loads(self.store.read_bytes(self._file(gen)))
            return LeaseState(generation=int(d["generation"]), owner=str(d["owner"]), state=str(d["state"]),
                              acquired_at=float(d["acquired_at"]), expires_at=float(d["expires_at"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            # only a holder writes its file, whole (atomic writes); an unreadable one is treated as expired
            logger.warning("lease %s: generation %d is unreadable (%s); treated as expired",
                           self.store.uri(self.rel), gen, e)
            return LeaseState(generation=gen, owner="?", state="broken", acquired_at=0.0, expires_at=0.0)

    def current(self) -> LeaseState | None:
        """The newest generation's state (None when the lease was never taken)."""
        gens = self._generations()
        return self._read(gens[-1]) if gens else None

    # ---- holding --------------------------------------------------------------------------------

    def _payload(self, state: str, expires_at: float) -> bytes:
        return json.dumps({"owner": self.owner, "generation": self.generation, "state": state,
                           "acquired_at": self._acquired_at, "expires_at": expires_at}, sort_keys=True).encode()

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`LeaseBusy` naming the holder and its expiry."""
        now = time.time()
        gens = self._generations()
        if gens:
            cur = self._read(gens[-1])
            if cur is not None and cur.live(now):
                raise LeaseBusy(f"lease {self.store.uri(self.rel)} is held by {cur.owner} (generation "
                                f"{cur.generation}) until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(cur.expires_at))}"
                                f" ({cur.expires_at - now:.0f} s from now)", holder=cur.__dict__)
            if cur is not None and cur.state == "held":
                logger.warning("lease %s: generation %d of %s expired %.0f s ago; taking over",
                               self.store.uri(self.rel), cur.generation, cur.owner, now - cur.expires_at)
        gen = (gens[-1] + 1) if gens else 1
        self.generation = gen
        self._acquired_at = now
        if not self.store.create_exclusive(self._file(gen), self._payload("held", now + self.ttl_s)):
            other = self._read(gen)
            if other is not None and other.owner == self.owner:
                # our conditional PUT landed but its reply was lost: the retry got 412 for our own file
                logger.info("lease %s: generation %d is ours (a retried create)", self.store.uri(self.rel), gen)
                return self._held(gen)
            self.generation = None
            raise LeaseBusy(f"lease {self.store.uri(self.rel)} was just taken by "
                            f"{other.owner if other else 'another run'} (generation {gen})",
                            holder=other.__dict__ if other else None)
        return self._held(gen, gens)

    def _held(self, gen: int, gens: list[int] | None = None) -> Lease:
        for old in (gens or [])[:-1]:  # keep the previous generation for the record; older ones go
            try:
                self.store.delete(self._file(old))
            except (OSError, StorageError) as e:
                logger.debug("lease: could not remove generation %d: %s", old, e)
        logger.info("lease %s: acquired generation %d as %s (ttl %.0f s)", self.store.uri(self.rel), gen,
                    self.owner, self.ttl_s)
        if self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                logger.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat
                logger.warning("lease %s: renewal failed (%s); retrying", self.store.uri(self.rel), e)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this holder still has the newest, unexpired generation."""
        if self.generation is None:
            raise LeaseLost(f"lease {self.store.uri(self.rel)}: not held")
        gens = self._generations()
        if gens and gens[-1] != self.generation:
            raise LeaseLost(f"lease {self.store.uri(self.rel)}: generation {gens[-1]} was taken after ours "
                            f"({self.generation}); our lease expired")
        cur = self._read(self.generation)
        if cur is None or cur.owner != self.owner or not cur.live(time.time()):
            raise LeaseLost(f"lease {self.store.uri(self.rel)}: our generation {self.generation} expired")

    def renew(self) -> None:
        """Extend the expiry by ``ttl_s`` from now (after :meth:`check`)."""
        with self._lock:
            self.check()
            self.store.write_bytes(self._file(self.generation), self._payload("held", time.time() + self.ttl_s))

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.generation is None:
            return
        with self._lock:
            try:
                self.check()
                self.store.write_bytes(self._file(self.generation), self._payload("released", time.time()))
                logger.info("lease %s: released generation %d", self.store.uri(self.rel), self.generation)
            except LeaseLost as e:
                logger.warning("lease release: %s", e)
            finally:
                self.generation = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _process_gone(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:random``, :func:`default_owner`) names a process of this host that no
    longer exists.  False when it cannot tell (another host, another owner format)."""
    bits = owner.rsplit(":", 2)
    if len(bits) != 3 or bits[0] != socket.gethostname() or not bits[1].isdigit():
        return False
    try:
        os.kill(int(bits[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def holder_alive(store: Store, rel: str) -> bool | None:
    """Whether the lease at ``rel`` has a live holder: None when no lease was ever taken there; False when
    released, expired, or held by a process of this host that is gone (killed: it could not release,
    and waiting for the expiry is not needed); True otherwise.

    Used to tell a live writer's uncommitted files from a dead one's (:func:`mask.storage.sweep_parts`).
    A PID reused by another process after the holder died makes a dead holder look alive until its
    lease expires: the safe direction.
    """
    cur = Lease(store, rel, ttl_s=1.0, heartbeat=False).current()
    if cur is None:
        return None
    if not cur.live(time.time()):
        return False
    return not _process_gone(cur.owner)
