"""μ from the trained PAE on Ray Data: region representations per image, and the eq. 2 pass.

``MuStage`` is a callable class (the PAE is loaded once per actor) that turns feature rows into
region representations μ (eq. 1/3, the mean of the PAE's distribution).  Two uses:

* :func:`knowledge_pass` — one streaming pass over all VG regions: each batch is reduced to partial
  sums per word (sums, counts and one seeded reservoir sample per word) and the driver merges the
  partials exactly into a :class:`mask.knowledge.PrototypeAccumulator` (eq. 2).
* :func:`image_representations` — μ per gallery image (n×Z) for scoring.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mask.knowledge import PrototypeAccumulator
from mask.models import load_pae

logger = logging.getLogger(__name__)


class MuStage:
    """Feature rows → μ per region with the PAE (batched, GPU when the actor has one)."""

    def __init__(self, pae_bytes: bytes, word_index: dict[str, int] | None = None,
                 region_words: dict[str, list[str]] | None = None, mode: str = "images", seed: int = 0,
                 keep_ids: list[str] | None = None, threads: int | None = None):

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if threads and self.device.type == "cpu":  # Ray pins an actor's torch to 1 thread otherwise
            torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        self.pae = load_pae(pae_bytes).to(self.device).eval()
        self.mode = mode
        self.word_index = word_index or {}
        self.region_words = region_words or {}
        self.seed = seed
        self.keep = set(keep_ids) if keep_ids is not None else None  # images mode: only these image ids

    @torch.no_grad()
    def _mu(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch["num_boxes"])
        counts = [int(c) for c in batch["num_boxes"]]
        dim = int(batch["feature_dim"][0]) if n else 0
        r_max = max(counts + [1])
        feats = np.zeros((n, r_max, dim), np.float32)  # (B, R, M)
        mask = np.zeros((n, r_max), bool)  # (B, R)
        for i, c in enumerate(counts):
            if c:
                feats[i, :c] = np.asarray(batch["features"][i], np.float32).reshape(c, dim)
                mask[i, :c] = True
        mu, _ = self.pae(torch.from_numpy(feats).to(self.device), torch.from_numpy(mask).to(self.device))
        return mu.float().cpu().numpy(), mask  # (B, R, Z), (B, R)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.keep is not None:
            sel = np.asarray([str(x) in self.keep for x in batch["image_id"]], bool)
            batch = {k: np.asarray(v)[sel] for k, v in batch.items()}
            if not sel.any():
                return {"image_id": np.zeros(0, object), "mu": np.zeros(0, object),
                        "num_boxes": np.zeros(0, np.int64), "latent_dim": np.zeros(0, np.int64)}
        mu, mask = self._mu(batch)
        if self.mode == "images":
            out_mu = np.empty(len(mu), dtype=object)
            for i in range(len(mu)):
                out_mu[i] = mu[i][mask[i]].reshape(-1)
            return {"image_id": np.asarray(batch["image_id"]), "mu": out_mu,
                    "num_boxes": np.asarray([int(m.sum()) for m in mask]), "latent_dim": np.full(len(mu), mu.shape[-1])}
        return self._partials(batch, mu, mask)

    def _partials(self, batch: dict[str, Any], mu: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """Per-batch partial sums of eq. 2 for the words of this batch."""
        ids: list[int] = []
        rows: list[np.ndarray] = []
        keys: list[int] = []
        for i in range(len(mu)):
            rids = batch["region_ids"][i]
            for slot, rid in enumerate(rids):
                if not mask[i, slot]:
                    continue
                for w in self.region_words.get(str(rid), ()):
                    k = self.word_index.get(w)
                    if k is not None:
                        ids.append(k)
                        rows.append(mu[i, slot])
                        keys.append(_sample_key(self.seed, str(rid), k))
        z = mu.shape[-1]
        if not ids:
            return {"word_id": np.zeros(0, np.int64), "sum": np.zeros((0, z)), "count": np.zeros(0, np.int64),
                    "key": np.zeros(0, np.uint64), "sample": np.zeros((0, z), np.float32)}
        ids_a = np.asarray(ids, np.int64)
        rows_a = np.stack(rows).astype(np.float64)  # (P, Z)
        keys_a = np.asarray(keys, np.uint64)
        uniq, inv = np.unique(ids_a, return_inverse=True)
        sums = np.zeros((len(uniq), z), np.float64)
        np.add.at(sums, inv, rows_a)
        counts = np.bincount(inv, minlength=len(uniq)).astype(np.int64)
        # reservoir: the pair with the smallest key per word wins (merge-correct)
        order = np.lexsort((keys_a, inv))
        first = order[np.r_[0, np.flatnonzero(np.diff(inv[order])) + 1]]
        return {"word_id": uniq, "sum": sums, "count": counts, "key": keys_a[first],
                "sample": rows_a[first].astype(np.float32)}


def _sample_key(seed: int, region_id: str, word: int) -> int:

    h = hashlib.blake2b(f"{seed}|{region_id}|{word}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def knowledge_pass(features_ds, pae_bytes: bytes, word_index: dict[str, int],
                   region_words: dict[str, list[str]], latent_dim: int, seed: int,
                   concurrency: int = 1, num_gpus: float = 0, batch_size: int = 64, threads: int | None = None):
    """Eq. 2 over every VG region in one streaming pass; returns a merged PrototypeAccumulator.

    ``threads``: torch threads per CPU actor (None: the cluster's CPUs / ``concurrency``)."""
    import ray.data

    acc = PrototypeAccumulator(len(word_index), latent_dim, seed=seed)
    threads = _cpu_threads(threads, concurrency, num_gpus)
    ds = features_ds.map_batches(MuStage, fn_constructor_args=(pae_bytes, word_index, region_words, "partials", seed,
                                                               None, threads),
                                 batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                                 num_gpus=num_gpus, batch_format="numpy")
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(part["word_id"]):
            acc.merge_partial(part["word_id"], np.stack(part["sum"]), part["count"], part["key"],
                              np.stack(part["sample"]))
    return acc


def _cpu_threads(threads: int | None, concurrency: int, num_gpus: float) -> int | None:
    if threads is not None or num_gpus:
        return threads
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, concurrency))


def image_representations(features_ds, pae_bytes: bytes, concurrency: int = 1, num_gpus: float = 0,
                          batch_size: int = 64, keep_ids: list[str] | None = None,
                          threads: int | None = None) -> pa.Table:
    """μ per image (``image_id, mu (list<float32> n×Z), num_boxes, latent_dim``); only ``keep_ids`` when given.

    ``threads``: torch threads per CPU actor (None: the cluster's CPUs / ``concurrency``, at most the
    actor's machine's cores). Actors reserve 1 CPU each so Ray Data's read tasks keep a CPU.
    """
    import ray.data

    threads = _cpu_threads(threads, concurrency, num_gpus)
    ds = features_ds.map_batches(MuStage, fn_constructor_args=(pae_bytes, None, None, "images", 0, keep_ids, threads),
                                 batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                                 num_gpus=num_gpus, batch_format="numpy")
    return mu_table(ds.iter_batches(batch_size=None, batch_format="numpy"))


def mu_table(batches) -> pa.Table:
    """:class:`MuStage` output batches (images mode) → one ``image_id, mu, num_boxes, latent_dim`` table."""
    rows: dict[str, list] = {"image_id": [], "mu": [], "num_boxes": [], "latent_dim": []}
    for b in batches:
        rows["image_id"].extend(str(x) for x in b["image_id"])
        rows["mu"].extend(np.asarray(m, np.float32) for m in b["mu"])
        rows["num_boxes"].extend(int(x) for x in b["num_boxes"])
        rows["latent_dim"].extend(int(x) for x in b["latent_dim"])
    return pa.table({"image_id": pa.array(rows["image_id"], pa.string()),
                     "mu": pa.array(rows["mu"], pa.list_(pa.float32())),
                     "num_boxes": pa.array(rows["num_boxes"], pa.int32()),
                     "latent_dim": pa.array(rows["latent_dim"], pa.int32())})


