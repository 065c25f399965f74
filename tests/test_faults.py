"""mask.faults: the one fault-injection spec format and its parser."""

from __future__ import annotations

import pytest

from mask.faults import FAULT_ENV, FaultSpec, fires


def test_parse_point_count_marker():
    assert FaultSpec.parse("") is None
    assert FaultSpec.parse("index.after_mu") == FaultSpec("index.after_mu")
    assert FaultSpec.parse("train_epoch:1") == FaultSpec("train_epoch", 1)
    # a marker path may hold colons (the rest of the spec)
    assert FaultSpec.parse("detect_batch:4:/tmp/a:b") == FaultSpec("detect_batch", 4, "/tmp/a:b")
    with pytest.raises(ValueError, match="integer n"):
        FaultSpec.parse("train_epoch:x:/tmp/m")


def test_fires_at_its_pass_once_with_a_marker(tmp_path):
    marker = tmp_path / "m"
    spec = f"train_epoch:2:{marker}"
    assert not fires("detect_batch", 2, spec)  # another point
    assert not fires("train_epoch", 1, spec)  # another pass
    assert fires("train_epoch", 2, spec)
    assert marker.exists()
    assert not fires("train_epoch", 2, spec)  # once: the marker says it fired


def test_without_marker_every_pass_and_from_the_environment(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "reindex.after_lease")
    assert fires("reindex.after_lease") and fires("reindex.after_lease")
    assert not fires("reindex.after_commit")
    monkeypatch.delenv(FAULT_ENV)
    assert not fires("reindex.after_lease")
