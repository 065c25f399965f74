"""The training join: feature rows + VG region words → training rows (``pair_slot``, ``pair_word``).

:class:`PairJoin` is a Ray Data stage that runs as Ray tasks (:func:`mask.pipeline.train.training_dataset`).
Tasks, not an actor: the joined rows are materialised in Ray's object store, and when a node that held some of
them is lost, Ray rebuilds them by lineage, which re-runs the tasks that made them. An actor stage's rows
cannot be rebuilt once its pool has shut down (seen on the simulated cluster: the restarted actor's creation
argument had already been released, and the training failed on every retry).
It lives apart from the trainer, with numpy only, so that its tasks start without importing torch,
torchvision and the models (~3–5 s per worker on a 2-core machine).
"""

from __future__ import annotations

import numpy as np


class PairJoin:
    """Ray Data stage: feature rows + VG region words → training rows (``pair_slot``, ``pair_word``).

    An instance is the stage's function (Ray Data runs it in tasks).  Rows whose regions carry no vocabulary
    word are dropped (they have nothing to align).

    Args:
        region_words: region_id → word indices into the vocabulary: a dict, or a
            :class:`mask.pipeline.regionwords.RegionWords` (loaded from the regions artifact once per worker
            process).
    """

    def __init__(self, region_words):
        self.region_words = region_words

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep: list[int] = []
        slots_col: list[np.ndarray] = []
        words_col: list[np.ndarray] = []
        lookup = getattr(self.region_words, "ids_of", None)
        for i, rids in enumerate(batch["region_ids"]):
            slots: list[int] = []
            wids: list[int] = []
            rids = [str(r) for r in (rids if rids is not None else ())]
            per_region = lookup(rids) if lookup is not None else [self.region_words.get(r, ()) for r in rids]
            for s, ws in enumerate(per_region):
                for w in ws:
                    slots.append(s)
                    wids.append(int(w))
            if slots:
                keep.append(i)
                slots_col.append(np.asarray(slots, np.int32))
                words_col.append(np.asarray(wids, np.int32))
        idx = np.asarray(keep, np.int64)
        return {"image_id": np.asarray(batch["image_id"])[idx],
                "features": np.asarray(batch["features"])[idx],
                "num_boxes": np.asarray(batch["num_boxes"])[idx].astype(np.int32),
                "feature_dim": np.asarray(batch["feature_dim"])[idx].astype(np.int32),
                "pair_slot": _objects(slots_col), "pair_word": _objects(words_col),
                "num_pairs": np.asarray([len(s) for s in slots_col], np.int64)}


def _objects(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out
