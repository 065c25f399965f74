"""A Tune trial's (or an experiment's) training rows, read from the features artifact in bounded memory.

Trials and the experiments job train in one process without Ray Data (:mod:`mask.pipeline.tune_trial`).
They used to read the whole features table and its region → word join into memory: at Visual Genome
size (3.8M regions × 2048-d float16) that is ≥ 15.6 GB per trial.  :class:`TrialRows` reads the
committed Parquet parts in record batches instead and joins each batch with the compact region → words
map (:class:`mask.pipeline.regionwords.RegionWords`), so a process never holds more than
``window`` images of features at a time:

* **training** (eq. 14, :meth:`TrialRows.epoch_batches`): images in a seeded order per epoch.  When
  every image fits in one window (the demo, small sweeps) the rows are read once and kept, and the
  order is one permutation of all of them.  Otherwise each epoch visits the parts in a seeded order and
  shuffles each window of ``window`` images — a local shuffle, as Ray Data's
  ``iter_batches(local_shuffle_buffer_size=…)``.  The order depends only on (seed, epoch), so a trial
  restored from its checkpoint continues with the batches it would have seen.
* **the eq. 2 pass** (:meth:`TrialRows.raw_batches`): every feature row, in batches of exactly
  ``size`` rows across part boundaries.

Parts are read in :func:`mask.pipeline.steps.canonical_part_uris` order (by part name, not by the
manifest's timing-dependent commit order), as the Ray Train job reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mask.pipeline.pair_join import PairJoin
from mask.pipeline.regionwords import RegionWords
from mask.pipeline.steps import canonical_part_uris
from mask.storage import Store

FEATURE_COLUMNS = ["image_id", "features", "num_boxes", "feature_dim"]
RAW_COLUMNS = [*FEATURE_COLUMNS, "region_ids"]
WINDOW_IMAGES = 2048  # images of features held at once (≈ 300 MB at 36 × 2048 float16 regions each)
READ_ROWS = 256  # rows per Parquet record batch


def _rows(cols: dict[str, np.ndarray]) -> int:
    return len(next(iter(cols.values()))) if cols else 0


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _take(cols: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in cols.items()}


def rebatch(chunks: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Column chunks of any length → batches of exactly ``size`` rows (the last one smaller), in order."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for chunk in chunks:
        if not _rows(chunk):
            continue
        pending.append(chunk)
        held += _rows(chunk)
        if held < size:
            continue
        cols = _concat(pending)
        n_full = held - held % size
        for i0 in range(0, n_full, size):
            yield _take(cols, slice(i0, i0 + size))
        pending = [_take(cols, slice(n_full, held))] if held > n_full else []
        held -= n_full
    if held:
        yield _concat(pending)


class TrialRows:
    """The training rows of a sweep or experiment, streamed from the storage root.

    Args:
        store: the storage root.
        features_rel: the committed features artifact on the VG ground-truth boxes.
        region_words: region_id → vocabulary word ids (:class:`RegionWords`, loaded on first use).
        window: images of features held at once (rows are kept in memory when all fit in one window).

    Attributes:
        images: images with at least one region–word pair (the training rows of an epoch).
        pairs: region–word pairs over those images.
        raw_images: every feature row (the eq. 2 pass).
    """

    def __init__(self, store: Store, features_rel: str, region_words: RegionWords, window: int = WINDOW_IMAGES):
        self.store, self.features_rel, self.window = store, features_rel, max(1, int(window))
        self.join = PairJoin(region_words)
        self._raw: dict[str, np.ndarray] | None = None  # kept when every row fits in one window
        self._train: dict[str, np.ndarray] | None = None
        self.images = self.pairs = self.raw_images = 0
        for raw, joined in self._joined_chunks(range(len(self._parts()))):
            self.raw_images += _rows(raw)
            self.images += _rows(joined)
            self.pairs += int(np.sum(joined["num_pairs"])) if _rows(joined) else 0
            if self.raw_images <= self.window:
                self._keep(raw, joined)
            else:  # more than one window: nothing is kept (dropped as soon as the window is exceeded)
                self._raw = self._train = None

    def _keep(self, raw: dict[str, np.ndarray], joined: dict[str, np.ndarray]) -> None:
        self._raw = raw if self._raw is None else _concat([self._raw, raw])
        if _rows(joined):
            self._train = joined if self._train is None else _concat([self._train, joined])

    @property
    def in_memory(self) -> bool:
        """True when every row fits in one window and is kept (read once)."""
        return self.raw_images <= self.window

    @property
    def pairs_per_image(self) -> float:
        return self.pairs / max(self.images, 1)

    def _parts(self) -> list[str]:
        return canonical_part_uris(self.store, self.features_rel)

    def _chunks(self, order) -> Iterator[dict[str, np.ndarray]]:
        """Feature rows (``RAW_COLUMNS``) as numpy columns, ``READ_ROWS`` at a time, parts in ``order``."""
        fs = self.store.pyarrow_filesystem()
        uris = self._parts()
        for i in order:
            uri = uris[int(i)]
            path = uri[len("s3://"):] if uri.startswith("s3://") else uri
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=RAW_COLUMNS):
                    yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in RAW_COLUMNS}

    def _joined_chunks(self, order) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        for raw in self._chunks(order):
            yield raw, self.join(raw)

    def raw_batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every feature row (with ``region_ids``), canonical part order, ``size`` rows per batch."""
        if self.in_memory:
            if self._raw is not None:
                yield from rebatch(iter([self._raw]), size)
            return
        yield from rebatch(self._chunks(range(len(self._parts()))), size)

    def epoch_batches(self, seed: int, epoch: int, per: int) -> Iterator[dict[str, np.ndarray]]:
        """The training rows of one epoch in a seeded order, ``per`` images per batch (see module doc)."""
        rng = np.random.default_rng([seed, epoch])
        if self.in_memory:
            if self._train is None:
                return
            order = rng.permutation(self.images)
            for i0 in range(0, self.images, per):
                yield _take(self._train, order[i0:i0 + per])
            return
        parts = np.random.default_rng([seed, epoch, 1]).permutation(len(self._parts()))
        yield from rebatch(self._shuffled_windows(parts, rng), per)

    def _shuffled_windows(self, parts, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        buf: list[dict[str, np.ndarray]] = []
        held = 0
        for _, joined in self._joined_chunks(parts):
            if not _rows(joined):
                continue
            buf.append(joined)
            held += _rows(joined)
            if held >= self.window:
                cols = _concat(buf)
                yield _take(cols, rng.permutation(held))
                buf, held = [], 0
        if held:
            yield _take(_concat(buf), rng.permutation(held))

    def describe(self) -> dict[str, Any]:
        return {"images": self.images, "pairs": self.pairs, "raw_images": self.raw_images,
                "window": self.window, "in_memory": self.in_memory, "parts": len(self._parts())}
