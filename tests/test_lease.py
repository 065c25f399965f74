"""The re-index lease: one holder at a time, expiry and takeover, fencing, local and S3 (moto)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mask.lease import Lease, LeaseBusy, LeaseLost
from mask.storage import Store


def test_exclusive_create_local(tmp_path):
    s = Store(str(tmp_path))
    assert s.create_exclusive("l/1.json", b"a") is True
    assert s.create_exclusive("l/1.json", b"b") is False
    assert s.read_bytes("l/1.json") == b"a"
    assert s.list("l") == ["1.json"]  # no temp file left behind


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    s = Store(str(tmp_path))
    a = Lease(s, "idx/_lease", ttl_s=60, owner="run-a", heartbeat=False).acquire()
    with pytest.raises(LeaseBusy, match=r"held by run-a .*until 20\d\d-"):
        Lease(s, "idx/_lease", ttl_s=60, owner="run-b", heartbeat=False).acquire()
    a.release()
    b = Lease(s, "idx/_lease", ttl_s=60, owner="run-b", heartbeat=False).acquire()
    assert b.generation == 2 and b.current().owner == "run-b"
    b.release()
    assert b.current().state == "released"


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(tmp_path):
    s = Store(str(tmp_path))
    dead = Lease(s, "l", ttl_s=0.3, owner="dead", heartbeat=False).acquire()  # never renews: a killed run
    time.sleep(0.4)
    new = Lease(s, "l", ttl_s=60, owner="new", heartbeat=False).acquire()
    assert new.generation == 2
    with pytest.raises(LeaseLost, match="generation 2 was taken after ours"):
        dead.check()
    with pytest.raises(LeaseLost):
        dead.renew()
    new.check()
    new.release()


def test_heartbeat_keeps_the_lease_alive(tmp_path):
    s = Store(str(tmp_path))
    with Lease(s, "l", ttl_s=0.6, owner="beating") as held:
        time.sleep(1.5)  # > 2 TTLs: only renewals keep it
        held.check()
        with pytest.raises(LeaseBusy):
            Lease(s, "l", ttl_s=0.6, heartbeat=False).acquire()
    Lease(s, "l", ttl_s=1, heartbeat=False).acquire().release()


def test_unreadable_generation_counts_as_expired(tmp_path):
    s = Store(str(tmp_path))
    s.write_bytes("l/000000000001.json", b"{not json")
    lease = Lease(s, "l", ttl_s=10, heartbeat=False).acquire()
    assert lease.generation == 2
    lease.release()


def test_only_one_of_many_concurrent_acquirers_wins(tmp_path):
    s = Store(str(tmp_path))
    wins, busy = [], []
    barrier = threading.Barrier(8)

    def race(i):
        barrier.wait()
        try:
            wins.append(Lease(s, "l", ttl_s=60, owner=f"r{i}", heartbeat=False).acquire())
        except LeaseBusy:
            busy.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(busy) == 7


def test_lease_on_s3(s3_bucket):
    s = Store(f"{s3_bucket}/root")
    assert s.create_exclusive("x/1.json", b"a") is True and s.create_exclusive("x/1.json", b"b") is False
    a = Lease(s, "idx/_lease", ttl_s=60, owner="a", heartbeat=False).acquire()
    with pytest.raises(LeaseBusy, match="held by a"):
        Lease(s, "idx/_lease", ttl_s=60, owner="b", heartbeat=False).acquire()
    a.release()
    Lease(s, "idx/_lease", ttl_s=60, owner="b", heartbeat=False).acquire().release()


def test_bad_arguments(tmp_path):
    s = Store(str(tmp_path))
    with pytest.raises(ValueError, match="ttl_s"):
        Lease(s, "l", ttl_s=0)
    with pytest.raises(Exception, match=r"\.\."):
        Lease(s, "../escape", ttl_s=1)


def test_a_create_whose_reply_was_lost_is_still_ours(tmp_path, monkeypatch):
    """The conditional PUT landed, its reply was lost, the retry got 412: the lease is ours, not busy."""
    s = Store(str(tmp_path))
    real = s.create_exclusive

    def lost_reply(rel, data):
        real(rel, data)
        return False

    monkeypatch.setattr(s, "create_exclusive", lost_reply)
    lease = Lease(s, "l", ttl_s=60, owner="me", heartbeat=False).acquire()
    assert lease.generation == 1
    lease.check()
    monkeypatch.setattr(s, "create_exclusive", lambda rel, data: False)  # someone else really has gen 2
    s.write_bytes("l/000000000002.json", b'{"owner": "other", "generation": 2, "state": "held", '
                                         b'"acquired_at": 0, "expires_at": 9e12}')
    lease.release()
    with pytest.raises(LeaseBusy, match="held by other"):
        Lease(s, "l", ttl_s=60, owner="me2", heartbeat=False).acquire()


def test_holder_alive_tells_live_released_expired_and_gone_holders(tmp_path):
    import subprocess
    import sys

    from mask.lease import Lease, holder_alive
    from mask.storage import Store

    store = Store(str(tmp_path))
    assert holder_alive(store, "l/none") is None
    live = Lease(store, "l/live", ttl_s=600, heartbeat=False).acquire()
    assert holder_alive(store, "l/live") is True
    live.release()
    assert holder_alive(store, "l/live") is False
    Lease(store, "l/expired", ttl_s=0.01, heartbeat=False).acquire()
    time.sleep(0.05)
    assert holder_alive(store, "l/expired") is False
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    Lease(store, "l/gone", ttl_s=600, heartbeat=False, owner=f"{socket.gethostname()}:{p.pid}:x").acquire()
    assert holder_alive(store, "l/gone") is False  # its process no longer exists
    Lease(store, "l/remote", ttl_s=600, heartbeat=False, owner="another-host:1:x").acquire()
    assert holder_alive(store, "l/remote") is True  # cannot tell: alive until it expires
