"""region_id → vocabulary words, read from the ``regions`` artifact where it is used, part by part.

The training join (:class:`mask.pipeline.pair_join.PairJoin`) and the eq. 2 pass
(:class:`mask.pipeline.represent.MuStage`) need the words of every VG region they see.  Building a
Python dict of all ~3.8M regions in the driver and shipping it to the actors made the driver's memory
grow with the dataset.  :class:`RegionWords` is the description instead (storage root, artifact,
vocabulary): small to pickle, loaded inside the actor or task on first use, one Parquet part at a time, into
compact arrays (kept once per worker process for the committed manifest they came from, so the training join's
Ray tasks load them once per process, not once per batch) — a sorted uint64 hash per region and CSR word ids (~20 bytes per region instead of
~300 for the dict).  Region ids are hashed with pandas' stable 64-bit hash; for 3.8M regions the
chance of any collision is ~4e-7.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mask.storage import Store

logger = logging.getLogger(__name__)

# the arrays last loaded in this process, by (root, artifact, vocabulary, committed manifest): one entry
_LOADED: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def hash_ids(ids) -> np.ndarray:
    """Stable uint64 hash of string ids (the same in every process)."""
    from pandas.util import hash_array

    return hash_array(np.asarray([str(x) for x in ids], dtype=object))


def iter_parts(store: Store, rel: str, columns: list[str]) -> Iterator[pa.Table]:
    """The committed parts of an artifact, one table at a time (bounded memory)."""
    fs = store.pyarrow_filesystem()
    for uri in store.part_uris(rel):  # the same URIs Ray Data reads (features_dataset)
        path = uri[len("s3://"):] if uri.startswith("s3://") else uri
        yield pq.read_table(path, filesystem=fs, columns=columns, partitioning=None)


class RegionWords:
    """region_id → word ids (vocabulary order), loaded lazily from the regions artifact.

    Args:
        root, options: the storage root.
        rel: the ``regions`` artifact (``datasets/<name>/regions``).
        words: the vocabulary, in word-id order.
    """

    def __init__(self, root: str, options: dict[str, Any], rel: str, words: list[str]):
        self.root, self.options, self.rel, self.words = root, dict(options or {}), rel, list(words)
        self._keys: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._ids: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:  # ship the description, never the loaded arrays
        return {"root": self.root, "options": self.options, "rel": self.rel, "words": self.words}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["options"], state["rel"], state["words"])

    def _load(self) -> None:
        store = Store(self.root, self.options)
        key = hashlib.sha256(json.dumps([self.root, self.rel, self.words, store.manifest(self.rel)],
                                        sort_keys=True, default=str).encode()).hexdigest()
        if key not in _LOADED:
            self._build(store)
            _LOADED.clear()
            _LOADED[key] = (self._keys, self._offsets, self._ids)
        self._keys, self._offsets, self._ids = _LOADED[key]

    def _build(self, store: Store) -> None:
        vocab = pa.array(self.words, pa.string())
        keys, counts, ids = [], [], []
        for part in iter_parts(store, self.rel, ["region_id", "words"]):
            col = part.column("words").combine_chunks() if part.num_rows else None
            if col is None:
                continue
            flat = pc.index_in(col.flatten(), value_set=vocab)  # word → id, null when not in the vocabulary
            owner = np.repeat(np.arange(part.num_rows), np.diff(col.offsets.to_numpy()))
            valid = ~np.asarray(pc.is_null(flat).to_numpy(zero_copy_only=False), bool)
            wid = np.asarray(flat.fill_null(0).to_numpy(zero_copy_only=False), np.int32)[valid]
            own = owner[valid]
            c = np.bincount(own, minlength=part.num_rows)
            keep = c > 0
            keys.append(hash_ids(np.asarray(part.column("region_id").to_pylist(), dtype=object)[keep]))
            counts.append(c[keep])
            ids.append(wid)  # already grouped by region (flatten keeps row order)
        if not keys:
            self._keys, self._offsets, self._ids = np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.int32)
            return
        k, c, w = np.concatenate(keys), np.concatenate(counts), np.concatenate(ids)
        starts = np.r_[0, np.cumsum(c)[:-1]].astype(np.int64)
        order = np.argsort(k, kind="stable")
        self._keys = k[order]
        c_sorted = c[order]
        self._offsets = np.r_[0, np.cumsum(c_sorted)].astype(np.int64)
        # word ids regrouped in key order: position j of region r moves from starts[r] + j to offsets[r'] + j
        gather = np.arange(len(w), dtype=np.int64) + np.repeat(starts[order] - self._offsets[:-1], c_sorted)
        self._ids = w[gather]
        logger.info("region words: %d regions with vocabulary words (%.1f MB)", len(self._keys),
                    (self._keys.nbytes + self._offsets.nbytes + self._ids.nbytes) / 1e6)

    def ids_of(self, region_ids) -> list[np.ndarray]:
        """Word ids of each region (empty for regions without a vocabulary word)."""
        if self._keys is None:
            self._load()
        if not len(region_ids):
            return []
        h = hash_ids(region_ids)
        pos = np.searchsorted(self._keys, h)
        pos_c = np.minimum(pos, max(len(self._keys) - 1, 0))
        found = (pos < len(self._keys)) & (self._keys[pos_c] == h) if len(self._keys) else np.zeros(len(h), bool)
        empty = np.zeros(0, np.int32)
        return [self._ids[self._offsets[p]:self._offsets[p + 1]] if f else empty
                for p, f in zip(pos_c, found, strict=True)]

    def get(self, region_id, default=()) -> list[str]:
        """The vocabulary words of one region (dict-like; ``default`` when it has none)."""
        got = self.ids_of([region_id])[0]
        return [self.words[i] for i in got] if len(got) else default
