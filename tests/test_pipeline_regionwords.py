"""RegionWords: the region → words map read part by part from the regions artifact (no driver dict)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from mask.pipeline.regionwords import RegionWords
from mask.pipeline.steps import region_word_map
from mask.storage import Store


def _regions(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vocab = ["dog", "cat", "red", "tree", "car"]
    words = [[str(w) for w in rng.choice(vocab + ["zzz", "qqq"], int(rng.integers(0, 4)))] for _ in range(n)]
    return pa.table({"image_id": pa.array([str(i // 7) for i in range(n)], pa.string()),
                     "region_id": pa.array([str(1000 + i) for i in range(n)], pa.string()),
                     "words": pa.array(words, pa.list_(pa.string()))})


def test_matches_the_dict_and_pickles_without_its_arrays(tmp_path):
    store = Store(str(tmp_path))
    table = _regions(500)
    with store.open_artifact("datasets/x/regions", kind="regions", config_hash="h") as w:
        for i in range(0, 500, 128):  # several parts
            w.write_part(table.slice(i, 128), name=f"p{i}")
        w.commit()
    vocab = ["car", "cat", "dog", "red"]  # "tree" left out of the vocabulary on purpose
    word_index = {w: i for i, w in enumerate(vocab)}
    expected = region_word_map(table, word_index)
    rw = RegionWords(str(tmp_path), {}, "datasets/x/regions", vocab)
    rids = table.column("region_id").to_pylist() + ["missing-1", "2"]
    got = rw.ids_of(rids)
    for rid, ids in zip(rids, got, strict=True):
        assert [vocab[i] for i in ids] == expected.get(rid, []), rid
        assert rw.get(rid, []) == expected.get(rid, [])
    blob = pickle.dumps(rw)
    assert len(blob) < 1000  # the description travels, not the loaded arrays
    again = pickle.loads(blob)
    assert [list(x) for x in again.ids_of(rids[:50])] == [list(x) for x in got[:50]]


def test_loaded_once_per_process_until_the_artifact_is_committed_again(tmp_path, monkeypatch):
    """The training join runs in Ray tasks, each with its own unpickled RegionWords: the arrays are built once
    per process for one committed manifest, and built again when the artifact is rewritten."""
    store = Store(str(tmp_path))

    def commit(table: pa.Table, name: str) -> None:
        with store.open_artifact("datasets/x/regions", kind="regions", config_hash="h") as w:
            w.write_part(table, name=name)
            w.commit()

    built = []
    real = RegionWords._build
    monkeypatch.setattr(RegionWords, "_build", lambda self, s: (built.append(1), real(self, s))[1])
    vocab = ["car", "cat", "dog", "red", "tree"]
    commit(_regions(50, seed=1), "p0")
    rw = RegionWords(str(tmp_path), {}, "datasets/x/regions", vocab)
    first = [list(x) for x in rw.ids_of(["1000", "1001", "1002"])]
    for _ in range(3):  # a task each: a fresh copy from its pickled description
        copy = pickle.loads(pickle.dumps(rw))
        assert [list(x) for x in copy.ids_of(["1000", "1001", "1002"])] == first
    assert len(built) == 1
    table = pa.table({"image_id": ["0"], "region_id": ["1000"], "words": [["tree"]]})
    commit(table, "p1")  # the same artifact, committed again with other words
    copy = pickle.loads(pickle.dumps(rw))
    assert [list(x) for x in copy.ids_of(["1000", "1001"])] == [[4], []]
    assert len(built) == 2
