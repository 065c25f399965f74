"""The knowledge table: words, word vectors and prototypical region representations (Sec. 3.1).

* :class:`PrototypeAccumulator` — eq. 2 (``v_k`` = mean of μ over all VG regions of word k) as a
  streaming float64 sum that merges across shards, plus one uniformly sampled μ per word (the
  "a random region of the word" ablation).
* :class:`KnowledgeTable` — the materialised table (Arrow round trip; storage is elsewhere).
* :func:`ood_prototypes` — eq. 11–13: prototypes for words outside the knowledge from their top-m
  neighbours in word-vector space.
* :func:`procrustes_prototypes` — Appendix B (eq. 23–31): a similarity Procrustes map from word
  space to prototype space fitted on the knowledge.
* :func:`build_prototypes_for` / :func:`extend_with_ood` — prototypes for caption words, and
  precomputed OOD rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from mask.errors import MaskError

logger = logging.getLogger(__name__)

OodMethod = Literal["topm", "procrustes", "none"]

# Reservoir key of a word that has no sample yet (larger than every real key).
NO_KEY = np.iinfo(np.uint64).max
# Query rows per chunk in ood_prototypes (bounds the (chunk, K) cosine block: 1024 × 12k = 50 MB).
OOD_QUERY_CHUNK = 1024


class KnowledgeError(MaskError, ValueError):
    """Invalid knowledge or OOD input, with the problem named."""


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise KnowledgeError(f"{name}: cannot be converted to an array ({e})") from e


def _float_matrix(x: Any, name: str, cols: int | None = None) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 2:
        raise KnowledgeError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise KnowledgeError(f"{name}: expected floats, got dtype {arr.dtype}")
    if cols is not None and arr.shape[1] != cols:
        raise KnowledgeError(f"{name}: expected {cols} columns, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise KnowledgeError(f"{name}: non-finite value at row {r}, column {c}")
    return arr


# ----------------------------------------------------------------------------------------------
# eq. 2 — streaming prototypes
# ----------------------------------------------------------------------------------------------

class PrototypeAccumulator:
    """Eq. 2 as a streaming mean: float64 sums and counts per word, mergeable across shards.

    It also keeps one μ per word sampled uniformly over all regions seen (the "random region"
    ablation): every region gets a uniform random uint64 key and the region with the smallest key
    wins. Because the minimum of iid keys is uniform over the union, :meth:`merge` of two shards
    yields a uniform sample of their union. Keys come from the accumulator's own seeded generator,
    so **give each shard a distinct seed** (e.g. ``seed=[base_seed, shard_index]``), or pass
    ``keys`` to :meth:`update` that depend on the region's identity (then the result is independent
    of how regions are sharded).

    Args:
        num_words: K, the size of the vocabulary (word ids are 0..K-1).
        latent_dim: Z.
        seed: int or sequence of ints for ``numpy.random.default_rng``.
    """

    def __init__(self, num_words: int, latent_dim: int, seed: int | Sequence[int] = 0):
        if int(num_words) < 0 or int(latent_dim) < 1:
            raise KnowledgeError(f"num_words must be ≥ 0 and latent_dim ≥ 1, got {num_words}, {latent_dim}")
        self.num_words = int(num_words)
        self.latent_dim = int(latent_dim)
        self.sums = np.zeros((self.num_words, self.latent_dim), np.float64)  # (K, Z)
        self.counts = np.zeros(self.num_words, np.int64)  # (K,)
        self.sample = np.zeros((self.num_words, self.latent_dim), np.float32)  # (K, Z)
        self.sample_key = np.full(self.num_words, NO_KEY, np.uint64)  # (K,)
        self._rng = np.random.default_rng(seed)

    def _check_ids(self, word_ids: Any, name: str = "word_ids") -> np.ndarray:
        ids = _as_numpy(word_ids, name).reshape(-1)
        if ids.size and ids.dtype.kind not in "iu":
            raise KnowledgeError(f"{name}: expected integer word ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        bad = np.flatnonzero((ids < 0) | (ids >= self.num_words))
        if bad.size:
            raise KnowledgeError(f"{name}[{bad[0]}] = {ids[bad[0]]} is outside [0, {self.num_words})")
        return ids

    def update(self, word_ids: Any, mu: Any, keys: Any | None = None) -> PrototypeAccumulator:
        """Add P (word, μ) pairs.

        Args:
            word_ids: (P,) word ids.
            mu: (P, Z) region representations.
            keys: optional (P,) uint64 reservoir keys (e.g. a hash of the region id); default: random.

        Returns:
            self.
        """
        ids = self._check_ids(word_ids)
        mu_a = _float_matrix(mu, "mu", self.latent_dim) if ids.size else np.zeros((0, self.latent_dim), np.float32)
        if mu_a.shape[0] != ids.size:
            raise KnowledgeError(f"word_ids length {ids.size} and mu shape {mu_a.shape} differ")
        if ids.size == 0:
            return self
        if keys is None:
            k = self._rng.integers(0, NO_KEY, size=ids.size, dtype=np.uint64, endpoint=False)
        else:
            k = _as_numpy(keys, "keys").reshape(-1)
            if k.shape != ids.shape or k.dtype.kind not in "iu":
                raise KnowledgeError(f"keys: expected {ids.size} unsigned integers, got shape {k.shape}, dtype {k.dtype}")
            k = k.astype(np.uint64)
        order = np.lexsort((k, ids))  # by word, then key: the first of each word has the smallest key
        s_ids = ids[order]
        starts = np.r_[0, np.flatnonzero(np.diff(s_ids)) + 1]
        uniq = s_ids[starts]
        sums = np.add.reduceat(mu_a[order].astype(np.float64), starts, axis=0)  # (U, Z)
        counts = np.diff(np.r_[starts, s_ids.size])
        first = order[starts]
        return self.merge_partial(uniq, sums, counts, k[first], mu_a[first])

    def merge_partial(self, word_ids: Any, sums: Any | None, counts: Any, keys: Any, samples: Any | None
                      ) -> PrototypeAccumulator:
        """Merge per-word partial results (one row per distinct word, e.g. from a Ray task).

        Args:
            word_ids: (U,) word ids (normally distinct; repeated ids, e.g. from concatenated
                partials, are combined: sums and counts add up, the smallest key wins).
            sums: (U, Z) float64 sums of μ (None when U = 0).
            counts: (U,) regions per word.
            keys: (U,) uint64 smallest reservoir key per word.
            samples: (U, Z) the μ that had that key (None when U = 0).

        Returns:
            self.
        """
        ids = self._check_ids(word_ids)
        if ids.size == 0:
            return self
        s = _as_numpy(sums, "sums").astype(np.float64)
        smp = _as_numpy(samples, "samples")
        c = _as_numpy(counts, "counts").reshape(-1).astype(np.int64)
        k = _as_numpy(keys, "keys").reshape(-1).astype(np.uint64)
        for name, a, shape in (("sums", s, (ids.size, self.latent_dim)), ("samples", smp, (ids.size, self.latent_dim)),
                               ("counts", c, (ids.size,)), ("keys", k, (ids.size,))):
            if a.shape != shape:
                raise KnowledgeError(f"{name}: expected shape {shape}, got {a.shape}")
        if not np.isfinite(s).all() or not np.isfinite(smp).all():
            raise KnowledgeError("sums/samples: non-finite values in a partial")
        if (c < 0).any():
            raise KnowledgeError("counts: negative count in a partial")
        if np.unique(ids).size != ids.size:  # combine repeated words first (fancy += would drop repeats)
            order = np.lexsort((k, ids))
            s_ids = ids[order]
            starts = np.r_[0, np.flatnonzero(np.diff(s_ids)) + 1]
            first = order[starts]
            s = np.add.reduceat(s[order], starts, axis=0)
            c = np.add.reduceat(c[order], starts)
            ids, k, smp = s_ids[starts], k[first], smp[first]
        self.sums[ids] += s
        self.counts[ids] += c
        win = k < self.sample_key[ids]
        self.sample_key[ids[win]] = k[win]
        self.sample[ids[win]] = smp[win]
        return self

    def merge(self, other: PrototypeAccumulator) -> PrototypeAccumulator:
        """Add another shard's accumulator (same K and Z); exact sums, uniform merged samples. Returns self."""
        if (other.num_words, other.latent_dim) != (self.num_words, self.latent_dim):
            raise KnowledgeError(f"cannot merge accumulators of shape (K={other.num_words}, Z={other.latent_dim}) "
                                 f"into (K={self.num_words}, Z={self.latent_dim})")
        self.sums += other.sums
        self.counts += other.counts
        win = other.sample_key < self.sample_key
        self.sample_key[win] = other.sample_key[win]
        self.sample[win] = other.sample[win]
        return self

    def prototypes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eq. 2 means.

        Returns:
            (protos (K, Z) float32, counts (K,) int64, missing (K,) bool). Words never seen
            (count 0) are flagged in ``missing`` and their prototype rows are zeros.
        """
        missing = self.counts == 0
        protos = self.sums / np.maximum(self.counts, 1)[:, None]  # (K, Z)
        return protos.astype(np.float32), self.counts.copy(), missing

    def samples(self) -> np.ndarray:
        """(K, Z) float32: one μ per word, uniform over its regions (zeros where count is 0)."""
        return self.sample.copy()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (ship between Ray tasks, save as .npy); the generator state included."""
        st = self._rng.bit_generator.state
        if st["bit_generator"] != "PCG64":  # pragma: no cover - default_rng is PCG64
            raise KnowledgeError(f"unsupported generator {st['bit_generator']}")
        mask64 = (1 << 64) - 1
        inner = st["state"]
        rng_state = np.array([inner["state"] >> 64, inner["state"] & mask64, inner["inc"] >> 64,
                              inner["inc"] & mask64, st["has_uint32"], st["uinteger"]], np.uint64)
        return {"sums": self.sums.copy(), "counts": self.counts.copy(), "sample": self.sample.copy(),
                "sample_key": self.sample_key.copy(), "rng_state": rng_state}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PrototypeAccumulator:
        """Inverse of :meth:`to_arrays` (bit-exact, including the generator's position)."""
        missing = {"sums", "counts", "sample", "sample_key", "rng_state"} - set(arrays)
        if missing:
            raise KnowledgeError(f"accumulator arrays lack {sorted(missing)}")
        sums = np.asarray(arrays["sums"], np.float64)
        if sums.ndim != 2:
            raise KnowledgeError(f"sums: expected (K, Z), got shape {sums.shape}")
        acc = cls(sums.shape[0], sums.shape[1])
        for name, attr, dtype in (("counts", "counts", np.int64), ("sample", "sample", np.float32),
                                  ("sample_key", "sample_key", np.uint64)):
            a = np.asarray(arrays[name], dtype)
            if a.shape != getattr(acc, attr).shape:
                raise KnowledgeError(f"{name}: expected shape {getattr(acc, attr).shape}, got {a.shape}")
            setattr(acc, attr, a.copy())
        acc.sums = sums.copy()
        r = [int(x) for x in np.asarray(arrays["rng_state"], np.uint64)]
        acc._rng.bit_generator.state = {"bit_generator": "PCG64",
                                        "state": {"state": (r[0] << 64) | r[1], "inc": (r[2] << 64) | r[3]},
                                        "has_uint32": r[4], "uinteger": r[5]}
        return acc


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------

SOURCES = ("vg", "ood")


@dataclass
class KnowledgeTable:
    """One row per word: its vector, its prototype (eq. 2, or an OOD construction), and provenance.

    Attributes:
        words: K distinct words.
        counts: (K,) int64 regions behind each prototype (0 for OOD rows).
        word_vectors: (K, N) float32.
        prototypes: (K, Z) float32.
        source: K entries, "vg" (eq. 2 over VG regions) or "ood" (eq. 11–13 / Procrustes).
        samples: (K, Z) float32 one sampled μ per word (OOD rows: the same OOD construction applied
            to the samples of the known words), or None.

    Validated on construction (:meth:`validate`).
    """

    words: list[str]
    counts: np.ndarray
    word_vectors: np.ndarray
    prototypes: np.ndarray
    source: list[str]
    samples: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.words = [str(w) for w in self.words]
        self.source = [str(s) for s in self.source]
        self.counts = np.asarray(self.counts).astype(np.int64, copy=False)
        self.word_vectors = np.ascontiguousarray(self.word_vectors, dtype=np.float32)
        self.prototypes = np.ascontiguousarray(self.prototypes, dtype=np.float32)
        if self.samples is not None:
            self.samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        self.validate()

    def __len__(self) -> int:
        return len(self.words)

    @property
    def word_dim(self) -> int:
        return int(self.word_vectors.shape[1])

    @property
    def latent_dim(self) -> int:
        return int(self.prototypes.shape[1])

    def validate(self) -> None:
        """Raise :class:`KnowledgeError` naming the problem: empty, inconsistent shapes, duplicate
        words, NaN/inf, unknown sources, negative counts, a "vg" row with count 0."""
        k = len(self.words)
        if k == 0:
            raise KnowledgeError("knowledge table is empty")
        if self.word_vectors.ndim != 2 or self.prototypes.ndim != 2:
            raise KnowledgeError(f"word_vectors {self.word_vectors.shape} and prototypes {self.prototypes.shape} "
                                 "must be 2-D")
        shapes = {"counts": self.counts.shape[:1], "word_vectors": self.word_vectors.shape[:1],
                  "prototypes": self.prototypes.shape[:1], "source": (len(self.source),)}
        if self.samples is not None:
            shapes["samples"] = self.samples.shape[:1]
            if self.samples.shape != self.prototypes.shape:
                raise KnowledgeError(f"samples shape {self.samples.shape} differs from prototypes "
                                     f"{self.prototypes.shape}")
        for name, shape in shapes.items():
            if shape != (k,):
                raise KnowledgeError(f"{name} has {shape[0] if shape else 0} rows but there are {k} words")
        if self.counts.ndim != 1:
            raise KnowledgeError(f"counts: expected shape ({k},), got {self.counts.shape}")
        if len(set(self.words)) != k:
            seen: set[str] = set()
            dup = next(w for w in self.words if w in seen or seen.add(w))
            raise KnowledgeError(f"duplicate word {dup!r} in the knowledge table")
        if "" in self.words:
            raise KnowledgeError(f"empty word at row {self.words.index('')}")
        bad_src = [s for s in self.source if s not in SOURCES]
        if bad_src:
            raise KnowledgeError(f"source {bad_src[0]!r} is not one of {SOURCES}")
        if (self.counts < 0).any():
            raise KnowledgeError(f"negative count for word {self.words[int(np.argmax(self.counts < 0))]!r}")
        vg_zero = np.flatnonzero((np.asarray(self.source) == "vg") & (self.counts == 0))
        if vg_zero.size:
            raise KnowledgeError(f"word {self.words[vg_zero[0]]!r} has source 'vg' but no regions (count 0)")
        for name in ("word_vectors", "prototypes", "samples"):
            a = getattr(self, name)
            if a is None:
                continue
            bad = ~np.isfinite(a)
            if bad.any():
                r = int(np.argwhere(bad)[0][0])
                raise KnowledgeError(f"{name}: non-finite value in the row of word {self.words[r]!r}")

    def index(self) -> dict[str, int]:
        """word → row."""
        return {w: i for i, w in enumerate(self.words)}

    def to_arrow(self) -> pa.Table:
        """Columns word, count, word_vector, prototype, source, sample (fixed-size lists of float32;
        ``sample`` is left out when there are no samples). Round-trips exactly through :meth:`from_arrow`."""

        def fsl(a: np.ndarray) -> pa.FixedSizeListArray:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), a.shape[1])

        cols = {"word": pa.array(self.words, pa.string()), "count": pa.array(self.counts, pa.int64()),
                "word_vector": fsl(self.word_vectors), "prototype": fsl(self.prototypes),
                "source": pa.array(self.source, pa.string())}
        if self.samples is not None:
            cols["sample"] = fsl(self.samples)
        # no samples: no column (an all-null fixed-size-list column does not survive a Parquet
        # round trip in pyarrow 25: "Expected all lists to be of size=Z")
        return pa.table(cols)

    @classmethod
    def from_accumulator(cls, acc: PrototypeAccumulator, words: Sequence[str], word_vectors: Any) -> KnowledgeTable:
        """The knowledge table of eq. 2: each word's prototype (mean μ of its regions) from an accumulator.

        Words no region was seen for get no prototype and are left out (``source`` is ``vg`` for every row).

        Args:
            acc: the accumulator over the vocabulary (row i = ``words[i]``).
            words: the vocabulary, in the accumulator's row order.
            word_vectors: (W, D) their word vectors.

        Returns:
            The table of the seen words, with one sampled region μ per word (``samples``).
        """
        protos, counts, missing = acc.prototypes()
        seen = ~missing
        return cls(words=[w for w, s in zip(words, seen, strict=True) if s], counts=counts[seen],
                   word_vectors=np.asarray(word_vectors)[seen], prototypes=protos[seen],
                   source=["vg"] * int(seen.sum()), samples=acc.samples()[seen])

    @classmethod
    def from_arrow(cls, table: pa.Table) -> KnowledgeTable:
        """Inverse of :meth:`to_arrow` (``sample`` may be absent or all-null → None)."""
        need = {"word", "count", "word_vector", "prototype", "source"}
        missing = need - set(table.column_names)
        if missing:
            raise KnowledgeError(f"knowledge table lacks columns {sorted(missing)}")

        def matrix(name: str) -> np.ndarray:
            col = table.column(name).combine_chunks()
            if not pa.types.is_fixed_size_list(col.type) and not pa.types.is_list(col.type):
                raise KnowledgeError(f"column {name}: expected a list of float32, got {col.type}")
            if col.null_count:
                raise KnowledgeError(f"column {name}: {col.null_count} null rows")
            if len(col) == 0:
                return np.zeros((0, 0), np.float32)
            if pa.types.is_list(col.type):
                lens = np.asarray(col.value_lengths())
                if (lens != lens[0]).any():
                    raise KnowledgeError(f"column {name}: rows of different lengths")
                width = int(lens[0])
            else:
                width = col.type.list_size
            return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(col), width)

        samples = None
        if "sample" in table.column_names:
            col = table.column("sample")
            if col.null_count == len(col):
                samples = None
            elif col.null_count:
                raise KnowledgeError(f"column sample: {col.null_count} of {len(col)} rows are null")
            else:
                samples = matrix("sample")
        return cls(words=table.column("word").to_pylist(),
                   counts=np.asarray(table.column("count").to_numpy(), np.int64),
                   word_vectors=matrix("word_vector"), prototypes=matrix("prototype"),
                   source=table.column("source").to_pylist(), samples=samples)

    def known(self) -> np.ndarray:
        """Rows with source "vg" (the knowledge proper, the base of OOD constructions)."""
        return np.flatnonzero(np.asarray(self.source) == "vg")


# ----------------------------------------------------------------------------------------------
# OOD prototypes
# ----------------------------------------------------------------------------------------------

def _check_ood_inputs(query_vectors: Any, known_vectors: Any, known_prototypes: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kv = _as_numpy(known_vectors, "known_vectors")
    if kv.ndim == 2 and kv.shape[0] == 0:
        raise KnowledgeError("known_vectors: the knowledge is empty (0 words)")
    kv = _float_matrix(kv, "known_vectors")
    kp = _float_matrix(known_prototypes, "known_prototypes")
    if kp.shape[0] != kv.shape[0]:
        raise KnowledgeError(f"known_vectors shape {kv.shape} and known_prototypes shape {kp.shape} "
                             "have different numbers of words")
    q = _as_numpy(query_vectors, "query_vectors")
    if q.ndim == 2 and q.shape[0] == 0:
        return np.zeros((0, kv.shape[1]), np.float32), kv, kp
    q = _float_matrix(q, "query_vectors")
    if q.shape[1] != kv.shape[1]:
        raise KnowledgeError(f"query_vectors shape {q.shape} and known_vectors shape {kv.shape} differ in the "
                             "word-vector size")
    return q, kv, kp


# Cosines closer than this (float32 error is ~1e-7·√N) are re-decided in float64 ...
OOD_TIE_TOL = 1e-5
# ... where values equal to this many decimals count as ties (→ lower index).
OOD_TIE_DECIMALS = 9


def _topm_exact(q: np.ndarray, kn64: np.ndarray, m: int) -> np.ndarray:
    """Top-m known rows per query with float64 cosines rounded to OOD_TIE_DECIMALS; ties → lower index.

    The slow path for rows whose float32 m-th and (m+1)-th cosines are within OOD_TIE_TOL: exact
    ties in real arithmetic (parallel vectors) then resolve the same way whatever BLAS did.
    """
    qn = q.astype(np.float64)
    qn /= np.maximum(np.linalg.norm(qn, axis=1, keepdims=True), 1e-300)
    key = -np.round(qn @ kn64.T, OOD_TIE_DECIMALS)  # (r, K) smaller = better
    kth = np.partition(key, m - 1, axis=1)[:, m - 1 : m]  # (r, 1) the m-th best key
    out = np.empty((q.shape[0], m), np.int64)
    for i in range(q.shape[0]):
        cand = np.flatnonzero(key[i] <= kth[i, 0])  # ascending index; ≥ m of them
        out[i] = cand[np.argsort(key[i, cand], kind="stable")[:m]]
    return out


def _check_ood_options(m: int, weighting: str, temperature: float) -> None:
    """The options of :func:`ood_prototypes`: m ≥ 1, a known weighting, τ > 0 for the cosine weighting."""
    if int(m) < 1:
        raise KnowledgeError(f"m: must be at least 1, got {m}")
    if weighting not in ("dot", "cosine"):
        raise KnowledgeError(f"weighting: expected 'dot' (eq. 11) or 'cosine', got {weighting!r}")
    if weighting == "cosine" and not temperature > 0:
        raise KnowledgeError(f"temperature: must be > 0 for the cosine weighting, got {temperature}")


def _ood_neighbours(cos: np.ndarray, qc: np.ndarray, zero: np.ndarray, kn64: np.ndarray, m: int) -> np.ndarray:
    """Eq. 13: the indices of each query's m known words of highest cosine, sorted (fixed term order →
    deterministic sums).

    Args:
        cos: (c, K) float32 cosines of the queries with the known words.
        qc: (c, N) the queries; zero: (c,) which of them are all zeros (they never re-decide ties).
        kn64: (K, N) the L2-normalised known vectors in float64, for re-deciding (near) ties.
        m: sampling size, 1 ≤ m ≤ K (m = K takes every known word).

    Returns:
        (c, m) indices into the knowledge.
    """
    k_known = cos.shape[1]
    if m < k_known:
        vals, idx_t = torch.topk(torch.from_numpy(cos), m + 1, dim=1)  # (c, m+1): one extra to see ties
        vals, idx = vals.numpy(), idx_t.numpy()
        # a (near) tie across the boundary: re-decide in float64, ties → lower index
        tie = (vals[:, m - 1] - vals[:, m] <= OOD_TIE_TOL) & ~zero
        idx = idx[:, :m].copy()
        if tie.any():
            rows = np.flatnonzero(tie)
            idx[rows] = _topm_exact(qc[rows], kn64, m)
    else:
        idx = np.broadcast_to(np.arange(k_known), (qc.shape[0], k_known))
    return np.sort(idx, axis=1)  # (c, m) fixed term order → deterministic sums


def _ood_weights(qc: np.ndarray, qnorm: np.ndarray, idx: np.ndarray, kv: np.ndarray, kn64: np.ndarray,
                 weighting: str, temperature: float) -> np.ndarray:
    """Eq. 11: the (c, m) float64 softmax weights of each query's neighbours ``idx`` — of the raw dot products
    w_out · w_q (``"dot"``, the paper's form) or of cos(w_out, w_q) / τ (``"cosine"``, our variant)."""
    if weighting == "dot":
        raw = np.einsum("cn,cmn->cm", qc.astype(np.float64), kv[idx].astype(np.float64))  # (c, m) w_out·w_q
    else:  # our variant: cos(w_out, w_q) / τ
        qn64 = qc.astype(np.float64) / np.maximum(qnorm.astype(np.float64), 1e-300)
        raw = np.einsum("cn,cmn->cm", qn64, kn64[idx]) / float(temperature)  # (c, m)
    raw -= raw.max(axis=1, keepdims=True)
    weights = np.exp(raw)
    weights /= weights.sum(axis=1, keepdims=True)  # (c, m) eq. 11
    return weights


def ood_prototypes(query_vectors: Any, known_vectors: Any, known_prototypes: Any, m: int,
                   chunk: int = OOD_QUERY_CHUNK, *, weighting: str = "dot", temperature: float = 0.1) -> np.ndarray:
    """Eq. 11–13: prototypes of out-of-knowledge words from their top-m neighbours.

    For each query vector w_out: the m known words with the highest cosine (eq. 13, both sides
    L2-normalised), weights = softmax over those m of the **raw** dot products w_out · w_q
    (eq. 11, ``weighting="dot"``, the paper's form), result = Σ weight · v_q (eq. 12).

    ``weighting="cosine"`` is **our variant**, not the paper's: softmax of cos(w_out, w_q) / τ.  With
    raw dot products long word vectors dominate the softmax (GloVe: the top-weighted neighbour is the
    cosine-nearest one in only ~40 % of queries), so m matters little beyond a few neighbours.

    Ties: cosines are computed in float32; where the m-th and (m+1)-th are within 1e-5 the
    choice is re-made in float64 with cosines rounded to 9 decimals, equal values going to the
    lower known index — so words with parallel vectors resolve the same way on every machine.

    Rules: m > K is clipped to K. A query of all zeros has no direction: it gets the mean of all
    known prototypes (the uniform softmax over the whole knowledge); such queries are counted in
    the log. Known vectors of zeros have cosine 0 with everything.

    Args:
        query_vectors: (Q, N).
        known_vectors: (K, N) word vectors of the knowledge.
        known_prototypes: (K, Z) their prototypes.
        m: sampling size (≥ 1).
        chunk: queries per block (bounds the (chunk, K) similarity block).
        weighting: "dot" (eq. 11) or "cosine" (our variant, softmax of cosine / ``temperature``).
        temperature: τ > 0 of the "cosine" weighting (unused for "dot").

    Returns:
        (Q, Z) float32.

    Raises:
        KnowledgeError: empty knowledge, mismatched shapes, NaN/inf, m < 1, an unknown weighting.
    """
    q, kv, kp = _check_ood_inputs(query_vectors, known_vectors, known_prototypes)
    _check_ood_options(m, weighting, temperature)
    k_known = kv.shape[0]
    if m > k_known:
        logger.info("ood_prototypes: m=%d > %d known words, clipped to %d", m, k_known, k_known)
    m = min(int(m), k_known)
    out = np.empty((q.shape[0], kp.shape[1]), np.float32)  # (Q, Z)
    if q.shape[0] == 0:
        return out
    # numpy's BLAS for the thin product (inner size N ≈ 50–300: measured ~2–3× faster than torch's
    # here); torch only for the row-wise top-k (numpy's argpartition is ~10× slower); the small
    # per-query steps in numpy so that the two libraries' thread pools do not wait on each other.
    norms = np.linalg.norm(kv, axis=1, keepdims=True)  # (K, 1)
    kv64 = kv.astype(np.float64)
    norms64 = np.linalg.norm(kv64, axis=1, keepdims=True)
    kn64 = np.divide(kv64, norms64, out=np.zeros_like(kv64), where=norms64 > 0)  # (K, N) for the tie path
    kn_t = np.ascontiguousarray(np.divide(kv, norms, out=np.zeros_like(kv), where=norms > 0).T)  # (N, K)
    mean_proto = kp.astype(np.float64).mean(axis=0).astype(np.float32)  # (Z,)
    n_zero = 0
    for q0 in range(0, q.shape[0], chunk):
        qc = q[q0:q0 + chunk]  # (c, N)
        qnorm = np.linalg.norm(qc, axis=1, keepdims=True)  # (c, 1)
        zero = qnorm[:, 0] == 0  # (c,)
        cos = np.divide(qc, qnorm, out=np.zeros_like(qc), where=qnorm > 0) @ kn_t  # (c, K) eq. 13
        idx = _ood_neighbours(cos, qc, zero, kn64, m)  # (c, m)
        weights = _ood_weights(qc, qnorm, idx, kv, kn64, weighting, temperature)  # (c, m) eq. 11
        res = np.einsum("cm,cmz->cz", weights.astype(np.float32), kp[idx])  # (c, Z) eq. 12
        if zero.any():
            n_zero += int(zero.sum())
            res[zero] = mean_proto
        out[q0:q0 + chunk] = res
    if n_zero:
        logger.warning("ood_prototypes: %d all-zero query vectors got the mean of all known prototypes", n_zero)
    return out


@dataclass(frozen=True)
class SimilarityMap:
    """v ≈ scale · A w + t (word space → prototype space), fitted by similarity Procrustes.

    Attributes:
        a: (Z, N) semi-orthogonal (AᵀA = I_N if N ≤ Z, AAᵀ = I_Z if N > Z).
        scale: β.
        t: (Z,) translation.
    """

    a: np.ndarray
    scale: float
    t: np.ndarray

    def __call__(self, w: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Map (Q, N) word vectors → (Q, Z) float32 prototypes (float64 inside, chunked)."""
        out = np.empty((w.shape[0], self.a.shape[0]), np.float32)  # (Q, Z)
        scaled = self.scale * self.a.T  # (N, Z)
        for q0 in range(0, w.shape[0], chunk):
            out[q0:q0 + chunk] = w[q0:q0 + chunk].astype(np.float64) @ scaled + self.t
        return out


def fit_similarity_procrustes(known_vectors: Any, known_prototypes: Any) -> SimilarityMap:
    """Fit v ≈ β·A·w + t on the knowledge pairs (Appendix B, eq. 25–31, derived for this direction).

    Let W̃ (K, N), Ṽ (K, Z) be the centred word vectors and prototypes (eq. 25–26) and
    C = Ṽᵀ W̃ (Z, N) the cross-covariance (eq. 27). With the thin SVD C = U Σ Vᵀ (r = min(Z, N)),
    the semi-orthogonal A maximising tr(Aᵀ C) is A = U Vᵀ (eq. 28–29; reflections allowed, as the
    paper's "rotation or reflection"). The least-squares scale is β = tr(Σ) / ‖W̃‖²_F and the
    translation t = v̄ − β A w̄. (The paper's eq. 30–31 mix the two directions: ``tr(W̃2 W̃1ᵀ)``
    is not square when M ≠ N and ``t = w̄ − βA v̄`` does not type-check; eq. 23 then inverts the
    word←prototype map. Fitting prototype←word directly is the same similarity transform when
    one exists and needs no inverse when the dimensions differ.)

    Exact when the pairs are an exact similarity transform of each other in either direction
    (N < Z: v = βAw + t with AᵀA = I; N > Z: w = sBv + c with BᵀB = I, so A = Bᵀ, β = 1/s).

    Raises:
        KnowledgeError: fewer than 2 known words, or all known word vectors identical.
    """
    _, kv, kp = _check_ood_inputs(np.zeros((0, 1)), known_vectors, known_prototypes)
    if kv.shape[0] < 2:
        raise KnowledgeError(f"Procrustes needs at least 2 known words, got {kv.shape[0]}")
    w = kv.astype(np.float64)
    v = kp.astype(np.float64)
    w_bar, v_bar = w.mean(axis=0), v.mean(axis=0)  # eq. 25
    wc, vc = w - w_bar, v - v_bar  # eq. 26 (rows are words)
    denom = float((wc**2).sum())
    if denom <= 0.0:
        raise KnowledgeError("Procrustes: all known word vectors are identical (no spread to fit a map)")
    c = vc.T @ wc  # (Z, N) eq. 27
    u, s, vt = np.linalg.svd(c, full_matrices=False)  # u (Z, r), s (r,), vt (r, N)
    a = u @ vt  # (Z, N) eq. 29
    beta = float(s.sum() / denom)  # eq. 30, corrected
    t = v_bar - beta * (a @ w_bar)  # eq. 31, corrected
    return SimilarityMap(a=a, scale=beta, t=t)


def procrustes_prototypes(query_vectors: Any, known_vectors: Any, known_prototypes: Any) -> np.ndarray:
    """OOD prototypes through the similarity Procrustes map (Appendix B; eq. 23 in our direction).

    Args:
        query_vectors: (Q, N).
        known_vectors: (K, N).
        known_prototypes: (K, Z).

    Returns:
        (Q, Z) float32 = β·A·w + t (a zero query maps to t).
    """
    q, kv, kp = _check_ood_inputs(query_vectors, known_vectors, known_prototypes)
    fit = fit_similarity_procrustes(kv, kp)
    return fit(q) if q.shape[0] else np.zeros((0, kp.shape[1]), np.float32)


def _ood(method: str, queries: np.ndarray, known_vectors: np.ndarray, known_protos: np.ndarray, m: int,
         weighting: str = "dot", temperature: float = 0.1) -> np.ndarray:
    if method == "topm":
        return ood_prototypes(queries, known_vectors, known_protos, m, weighting=weighting, temperature=temperature)
    if method == "procrustes":
        return procrustes_prototypes(queries, known_vectors, known_protos)
    raise KnowledgeError(f"method: expected 'topm', 'procrustes' or 'none', got {method!r}")


def build_prototypes_for(words: Sequence[str], table: KnowledgeTable,
                         vectors: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
                         method: OodMethod = "topm", m: int = 10, *, weighting: str = "dot",
                         temperature: float = 0.1
                         ) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Prototypes for caption words.

    A word with a "vg" row of the table gets that row (source "knowledge"). Every other word is an
    OOD word: a word with a precomputed OOD row (``knowledge.ood_vocab_size``) takes its word vector
    from the table, the others are looked up with ``vectors``; those with a vector get an OOD
    prototype by ``method`` (and ``m``, ``weighting``) built from the table's "vg" rows (source
    "ood"); the rest are "missing" (zero rows; callers drop and count them).  With ``method="none"``
    (the "without OOD words" ablation, Table 3) **every** OOD word is missing, the precomputed rows
    included.  Precomputed rows are rebuilt from their stored vector with the requested method, so an
    m grid or a method ablation never reuses rows made with other settings (same settings → the same
    numbers: each query row of eq. 11–13 is independent of the others).

    Args:
        words: W words (duplicates allowed).
        table: the knowledge.
        vectors: ``f(words) -> (vectors (n, N), found (n,) bool)``; rows where ``found`` is False are ignored.
        method: "topm" (eq. 11–13), "procrustes" (Appendix B) or "none".
        m: sampling size for "topm".
        weighting: "dot" (eq. 11) or "cosine" (our variant); see :func:`ood_prototypes`.
        temperature: τ of the "cosine" weighting.

    Returns:
        (protos (W, Z) float32, source list of W in {"knowledge", "ood", "missing"},
        counts {"knowledge": …, "ood": …, "missing": …}).
    """
    if method not in ("topm", "procrustes", "none"):
        raise KnowledgeError(f"method: expected 'topm', 'procrustes' or 'none', got {method!r}")
    index = table.index()
    words = [str(w) for w in words]
    out = np.zeros((len(words), table.latent_dim), np.float32)  # (W, Z)
    source = ["missing"] * len(words)
    unknown: list[str] = []
    stored: dict[str, int] = {}  # precomputed OOD rows: their word vector is in the table
    for i, w in enumerate(words):
        row = index.get(w)
        if row is None:
            unknown.append(w)
        elif table.source[row] == "vg":
            out[i] = table.prototypes[row]
            source[i] = "knowledge"
        else:
            stored[w] = row
    uniq = sorted(set(unknown))
    if (uniq or stored) and method != "none":
        if uniq:
            vecs, found = vectors(uniq)
            vecs = _as_numpy(vecs, "vectors(...)[0]")
            found = _as_numpy(found, "vectors(...)[1]").astype(bool).reshape(-1)
            if vecs.ndim != 2 or vecs.shape[0] != len(uniq) or found.shape[0] != len(uniq):
                raise KnowledgeError(f"vectors(...) returned shapes {vecs.shape}, {found.shape} for {len(uniq)} words")
            if found.any() and vecs.shape[1] != table.word_dim:
                raise KnowledgeError(f"vectors(...) returned {vecs.shape[1]}-d vectors, the knowledge has "
                                     f"{table.word_dim}-d")
        else:
            vecs, found = np.zeros((0, table.word_dim), np.float32), np.zeros(0, bool)
        names = sorted(stored)
        uniq = uniq + names
        vecs = np.concatenate([vecs[found].reshape(-1, table.word_dim).astype(np.float32),
                               table.word_vectors[[stored[w] for w in names]].reshape(-1, table.word_dim)])
        found = np.concatenate([found, np.ones(len(names), bool)])
        if found.any():
            known = table.known()
            protos = _ood(method, vecs, table.word_vectors[known], table.prototypes[known], m,
                          weighting=weighting, temperature=temperature)
            made = dict(zip([w for w, f in zip(uniq, found, strict=True) if f], protos, strict=True))
            for i, w in enumerate(words):
                if source[i] == "missing" and w in made:
                    out[i] = made[w]
                    source[i] = "ood"
    counts = {s: source.count(s) for s in ("knowledge", "ood", "missing")}
    if counts["missing"]:
        logger.info("build_prototypes_for: %d of %d words have no prototype (no vector or method 'none')",
                    counts["missing"], len(words))
    return out, source, counts


def extend_with_ood(table: KnowledgeTable, words: Sequence[str], vectors_array: Any,
                    method: OodMethod = "topm", m: int = 10, *, weighting: str = "dot",
                    temperature: float = 0.1) -> KnowledgeTable:
    """A new table with precomputed OOD rows (source "ood", count 0) appended.

    OOD rows are built from the table's "vg" rows only. Words already in the table are skipped
    (logged). If the table has samples, the OOD rows' samples are the same construction applied
    to the known words' samples (eq. 12 with samples as base vectors / a Procrustes fit to them).

    Args:
        table: the knowledge.
        words: W distinct words.
        vectors_array: (W, N) their word vectors.
        method: "topm" or "procrustes"; "none" returns the table unchanged.
        m: sampling size for "topm".
        weighting, temperature: as in :func:`ood_prototypes`.

    Returns:
        A new, validated :class:`KnowledgeTable`.
    """
    if method == "none":
        return table
    words = [str(w) for w in words]
    vecs = _float_matrix(vectors_array, "vectors_array", table.word_dim) if words else np.zeros((0, table.word_dim))
    if vecs.shape[0] != len(words):
        raise KnowledgeError(f"vectors_array has {vecs.shape[0]} rows for {len(words)} words")
    if len(set(words)) != len(words):
        raise KnowledgeError("words: duplicates in the OOD word list")
    index = table.index()
    keep = np.asarray([w not in index for w in words], bool)
    if (~keep).any():
        logger.info("extend_with_ood: %d words are already in the knowledge and were skipped", int((~keep).sum()))
    new_words = [w for w, k in zip(words, keep, strict=True) if k]
    if not new_words:
        return table
    known = table.known()
    kv = table.word_vectors[known]
    new_protos = _ood(method, vecs[keep], kv, table.prototypes[known], m, weighting, temperature)
    new_samples = None
    if table.samples is not None:
        new_samples = _ood(method, vecs[keep], kv, table.samples[known], m, weighting, temperature)
    return KnowledgeTable(
        words=table.words + new_words,
        counts=np.concatenate([table.counts, np.zeros(len(new_words), np.int64)]),
        word_vectors=np.concatenate([table.word_vectors, vecs[keep]]),
        prototypes=np.concatenate([table.prototypes, new_protos]),
        source=table.source + ["ood"] * len(new_words),
        samples=None if new_samples is None else np.concatenate([table.samples, new_samples]),
    )
