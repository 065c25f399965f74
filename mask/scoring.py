"""Knowledge-based image–caption scores (eq. 10) for whole galleries, without a loop over pairs.

The score of image n and caption t is the max-mean pooling of eq. 10 over the region representations
μ of the image and the prototypes v of the caption's words:

    s[n, t] = mean_{w in caption t} max_{r real region of n} μ_r · v_w

Captions share a vocabulary, so the gallery is scored *vocabulary-factorised* (DESIGN §5):

1. only the prototype rows that some caption uses are kept (``Vu`` of them);
2. per chunk of images, regions × used vocabulary is one large float32 matrix product
   (``(n·R, Z) @ (Z, Vu)``, torch/MKL — measured faster than numpy's BLAS here), and the max over
   each image's real regions gives ``(n, Vu)``;
3. a sparse caption × word matrix with weights ``count / len(caption)`` turns that into ``(n, T)``
   (a word used twice in a caption counts twice, exactly as in the naive mean).

Memory is bounded by the chunk sizes: at most ``max_block_elements`` float32 values for one product
block, whatever the gallery size (the ``(N, T)`` output itself excepted).

Normalisation of μ and prototypes is the caller's choice (:func:`normalize_rows` helps); the scores
are eq. 10 on exactly the vectors given.

**Empty rows and columns** (documented rule, counted by :func:`count_empty`): a caption with no words
or an image with no real region has no eq. 10 score. Such entries get the *fill score*
``lowest − max(1, |lowest|)`` where ``lowest`` is the lowest real score of the returned matrix
(``-1.0`` when there is no real score at all), so they rank after every real pair, stay finite and
never produce NaN. :class:`GalleryScorer` applies the same rule with the gallery-wide lowest score.

Ablations (paper Table 5): ``pooling="mean"`` is the global mean of all region–word dot products
(computed as ``mean(μ) · mean(v)``, which is the same number by linearity); "a random region of the
word" instead of the prototype is just another prototype matrix (``KnowledgeTable.samples``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from mask.errors import MaskError

logger = logging.getLogger(__name__)

Pooling = Literal["max-mean", "mean"]

# Largest region × vocabulary product block, in float32 elements (16 Mi = 64 MiB; smaller blocks
# cost measurably more CPU per FLOP on the benchmark machine, larger ones gain nothing).
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 24
# Vocabulary columns per product block (bounds memory when images have many regions).
DEFAULT_VOCAB_BLOCK = 16384


class ScoringError(MaskError, ValueError):
    """Bad input to the scorer (shape, dtype, NaN/inf, word index), with the input named."""


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _as_numpy(x: Any, name: str, dtype: Any | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ScoringError(f"{name}: cannot be converted to an array ({e})") from e
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def _first_bad(arr: np.ndarray, row_mask: np.ndarray | None = None) -> tuple[int, ...] | None:
    """Index of the first non-finite entry (only rows where ``row_mask`` holds), or None."""
    bad = ~np.isfinite(arr)
    if row_mask is not None:
        bad &= row_mask.reshape(row_mask.shape + (1,) * (arr.ndim - row_mask.ndim))
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_float(arr: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if arr.ndim != ndim:
        raise ScoringError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ScoringError(f"{name}: expected a float array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_mu_mask(image_mu: Any, image_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    mu = _check_float(_as_numpy(image_mu, "image_mu"), "image_mu", 3)  # (N, R, Z)
    mask = _as_numpy(image_mask, "image_mask")
    if mask.shape != mu.shape[:2]:
        raise ScoringError(f"image_mask shape {mask.shape} does not match image_mu shape {mu.shape} "
                           f"(expected {mu.shape[:2]})")
    if mask.dtype != np.bool_:
        if mask.dtype.kind in "iu" and mask.size and not np.isin(mask, (0, 1)).all():
            raise ScoringError(f"image_mask: expected booleans (True = real region), got values other "
                               f"than 0/1 in dtype {mask.dtype}")
        if mask.dtype.kind not in "iub":
            raise ScoringError(f"image_mask: expected booleans, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mu, mask


def _check_prototypes(prototypes: Any, latent_dim: int | None) -> np.ndarray:
    protos = _check_float(_as_numpy(prototypes, "prototypes"), "prototypes", 2)  # (V, Z)
    if latent_dim is not None and protos.shape[1] != latent_dim:
        raise ScoringError(f"prototypes shape {protos.shape} and image_mu latent size {latent_dim} differ "
                           f"(prototypes must be (V, {latent_dim}))")
    return protos


@dataclass(frozen=True)
class CaptionIndex:
    """Captions as a sparse caption × used-word matrix (built once, reused for every image chunk).

    Attributes:
        used: (Vu,) prototype rows used by at least one caption, ascending.
        weights: (Vu, T) CSR matrix; entry [u, t] = (times word u occurs in caption t) / len(caption t).
        lengths: (T,) number of words per caption (repeats included).
    """

    used: np.ndarray
    weights: sp.csr_matrix
    lengths: np.ndarray

    @property
    def num_captions(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def empty(self) -> np.ndarray:
        """(T,) True where a caption has no words."""
        return self.lengths == 0


def index_captions(caption_words: Sequence[Sequence[int]], num_prototypes: int) -> CaptionIndex:
    """Validate caption word indices and build the sparse caption × word matrix.

    Args:
        caption_words: T sequences of row indices into the prototype matrix (repeats allowed).
        num_prototypes: V, the number of prototype rows.

    Returns:
        A :class:`CaptionIndex`.

    Raises:
        ScoringError: a caption that is not a sequence of integers, or an index outside [0, V).
    """
    if isinstance(caption_words, (str, bytes)) or not isinstance(caption_words, Sequence | np.ndarray):
        raise ScoringError(f"caption_words: expected a list of word-index lists, got {type(caption_words).__name__}")
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(caption_words), np.int64)
    for t, words in enumerate(caption_words):
        arr = _as_numpy(words, f"caption_words[{t}]")
        if arr.ndim != 1:
            raise ScoringError(f"caption_words[{t}]: expected a flat list of word indices, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise ScoringError(f"caption_words[{t}]: expected integer word indices, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        lengths[t] = arr.size
        parts.append(arr)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= num_prototypes))
    if bad.size:
        t = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ScoringError(f"caption_words[{t}]: word index {int(flat[bad[0]])} is outside the prototype rows "
                           f"[0, {num_prototypes})")
    used, inverse = np.unique(flat, return_inverse=True)
    cols = np.repeat(np.arange(len(lengths)), lengths)
    vals = (1.0 / lengths[cols]).astype(np.float32) if flat.size else np.zeros(0, np.float32)
    # COO → CSR sums duplicates: a word repeated in a caption gets weight count/len
    weights = sp.coo_matrix((vals, (inverse.reshape(-1), cols)), shape=(len(used), len(lengths))).tocsr()
    return CaptionIndex(used=used, weights=weights, lengths=lengths)


@dataclass(frozen=True)
class EmptyCounts:
    """Captions without words and images without real regions (their scores follow the fill rule).

    Attributes:
        captions: indices of empty captions.
        images: indices of images with no real region.
    """

    captions: np.ndarray
    images: np.ndarray

    def as_dict(self) -> dict[str, int]:
        return {"empty_captions": int(self.captions.size), "empty_images": int(self.images.size)}


def count_empty(image_mask: Any, caption_words: Sequence[Sequence[Any]]) -> EmptyCounts:
    """Which captions have no words and which images have no real region.

    Args:
        image_mask: (N, R) bool, True = real region.
        caption_words: T word-index lists.

    Returns:
        :class:`EmptyCounts` with the indices of both.
    """
    mask = _as_numpy(image_mask, "image_mask").astype(bool)
    if mask.ndim != 2:
        raise ScoringError(f"image_mask: expected shape (N, R), got {mask.shape}")
    caps = np.asarray([len(c) == 0 for c in caption_words], bool)
    return EmptyCounts(captions=np.flatnonzero(caps), images=np.flatnonzero(~mask.any(axis=1)))


def fill_score(lowest: float | None) -> float:
    """The score given to pairs without an eq. 10 score: ``lowest − max(1, |lowest|)`` (−1 if None)."""
    if lowest is None or not np.isfinite(lowest):
        return -1.0
    return float(lowest - max(1.0, abs(lowest)))


def normalize_rows(x: Any, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise the last axis (rows of zeros stay zeros).

    Args:
        x: (..., D) array or tensor.
        eps: norms below this count as zero.

    Returns:
        float32 array of the same shape.
    """
    arr = np.asarray(_as_numpy(x, "x"), np.float32)
    norm = np.linalg.norm(arr, axis=-1, keepdims=True)
    return np.divide(arr, norm, out=np.zeros_like(arr), where=norm > eps)


# ----------------------------------------------------------------------------------------------
# the factorised scorer
# ----------------------------------------------------------------------------------------------

def _fill_padding(mu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Padded regions become a copy of the image's first real region, so an unmasked max is exact."""
    if mask.all():
        return mu
    first = mask.argmax(axis=1)  # (n,) index of the first real region (0 if none)
    rep = mu[np.arange(mu.shape[0]), first]  # (n, Z)
    rep[~mask.any(axis=1)] = 0.0  # images without regions: any finite value, their column is filled later
    return np.where(mask[:, :, None], mu, rep[:, None, :])  # (n, R, Z)


def _word_max(mu: np.ndarray, mask: np.ndarray, protos_t: torch.Tensor, vocab_block: int) -> np.ndarray:
    """max over real regions of μ·v for every used word: (n, R, Z), (n, R), (Vu, Z) → (n, Vu)."""
    n, r, z = mu.shape
    x = torch.from_numpy(np.ascontiguousarray(_fill_padding(mu, mask)).reshape(n * r, z))  # (n·R, Z)
    vu = protos_t.shape[0]
    if vu <= vocab_block:
        return torch.amax((x @ protos_t.T).view(n, r, vu), dim=1).numpy()  # (n·R, Vu) → (n, Vu)
    out = torch.empty((n, vu), dtype=torch.float32)  # (n, Vu)
    for v0 in range(0, vu, vocab_block):
        block = x @ protos_t[v0:v0 + vocab_block].T  # (n·R, vb)
        out[:, v0:v0 + vocab_block] = torch.amax(block.view(n, r, -1), dim=1)
    return out.numpy()


def _word_mean(mu: np.ndarray, mask: np.ndarray, protos_t: torch.Tensor) -> np.ndarray:
    """mean over real regions of μ·v for every used word (= mean(μ)·v): → (n, Vu)."""
    cnt = mask.sum(axis=1, keepdims=True)  # (n, 1)
    mean_mu = np.einsum("nrz,nr->nz", mu, mask.astype(np.float32)) / np.maximum(cnt, 1)  # (n, Z)
    return (torch.from_numpy(np.ascontiguousarray(mean_mu, np.float32)) @ protos_t.T).numpy()  # (n, Vu)


def _used_rows(protos: np.ndarray, used: np.ndarray) -> np.ndarray:
    """The prototype rows the captions use, checked for NaN/inf (unused rows are not inspected)."""
    rows = protos[used]  # (Vu, Z)
    bad = _first_bad(rows)
    if bad is not None:
        raise ScoringError(f"prototypes: non-finite value at row {int(used[bad[0]])}, column {bad[1]}")
    return rows


class _ChunkScorer:
    """Scores chunks of images against a fixed set of captions (shared by score_matrix and GalleryScorer)."""

    def __init__(self, caption_words: Sequence[Sequence[int]], prototypes: Any, pooling: Pooling,
                 latent_dim: int | None = None, vocab_block: int = DEFAULT_VOCAB_BLOCK):
        if pooling not in ("max-mean", "mean"):
            raise ScoringError(f"pooling: expected 'max-mean' or 'mean', got {pooling!r}")
        protos = _check_prototypes(prototypes, latent_dim)
        self.captions = index_captions(caption_words, protos.shape[0])
        used = _used_rows(protos, self.captions.used)  # (Vu, Z)
        self.latent_dim = protos.shape[1]
        self.protos_t = torch.from_numpy(np.ascontiguousarray(used))  # (Vu, Z)
        # (T, Vu) CSR so that scores^T = W^T @ maxes^T runs as sparse @ dense
        self.weights_t = self.captions.weights.T.tocsr()
        self.pooling = pooling
        self.vocab_block = max(1, int(vocab_block))

    def chunk_images(self, num_regions: int, max_block_elements: int) -> int:
        """Images per chunk so that one product block has at most ``max_block_elements`` values."""
        vb = min(max(self.protos_t.shape[0], 1), self.vocab_block)
        return max(1, int(max_block_elements) // max(1, num_regions * vb))

    def per_word(self, mu: np.ndarray, mask: np.ndarray, offset: int = 0) -> np.ndarray:
        """The pooled word terms of eq. 10 for one image chunk: max (or mean) over real regions of μ·v
        for every used word, (n, R, Z), (n, R) → (n, Vu) float32 (zeros where there is nothing to pool)."""
        bad = _first_bad(mu, mask)
        if bad is not None:
            raise ScoringError(f"image_mu: non-finite value at image {offset + bad[0]}, region {bad[1]}, "
                               f"dimension {bad[2]}")
        n = mu.shape[0]
        if self.protos_t.shape[0] == 0 or n == 0 or mu.shape[1] == 0:
            return np.zeros((n, self.protos_t.shape[0]), np.float32)
        if self.pooling == "max-mean":
            return _word_max(mu, mask, self.protos_t, self.vocab_block)  # (n, Vu)
        return _word_mean(mu, mask, self.protos_t)  # (n, Vu)

    def aggregate(self, per_word: np.ndarray) -> np.ndarray:
        """The mean over each caption's words: (n, Vu) → (n, T) float32 (sparse caption × word product)."""
        if per_word.shape[1] != self.protos_t.shape[0]:
            raise ScoringError(f"per-word scores have {per_word.shape[1]} columns, the captions use "
                               f"{self.protos_t.shape[0]} words")
        if per_word.shape[1] == 0:
            return np.zeros((per_word.shape[0], self.captions.num_captions), np.float32)
        return np.ascontiguousarray((self.weights_t @ per_word.T).T, dtype=np.float32)  # (n, T)

    def score(self, mu: np.ndarray, mask: np.ndarray, offset: int = 0) -> np.ndarray:
        """Raw eq. 10 scores of one image chunk: (n, R, Z), (n, R) → (n, T) float32 (no fill applied)."""
        return self.aggregate(self.per_word(mu, mask, offset))


def _apply_fill(scores: np.ndarray, image_ok: np.ndarray, caption_ok: np.ndarray) -> float | None:
    """Fill entries without an eq. 10 score in place; returns the fill value used (None if none needed)."""
    if image_ok.all() and caption_ok.all():
        return None
    lowest = None
    if caption_ok.any():
        for i0 in range(0, scores.shape[0], 1024):  # row blocks: no copy of the whole matrix
            real = scores[i0:i0 + 1024][image_ok[i0:i0 + 1024]][:, caption_ok]
            if real.size:
                low = float(real.min())
                lowest = low if lowest is None else min(lowest, low)
    fill = fill_score(lowest)
    scores[~image_ok, :] = fill
    scores[:, ~caption_ok] = fill
    return fill


def score_matrix(image_mu: Any, image_mask: Any, caption_words: Sequence[Sequence[int]], prototypes: Any, *,
                 pooling: Pooling = "max-mean", image_chunk: int | None = None,
                 max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
                 vocab_block: int = DEFAULT_VOCAB_BLOCK) -> np.ndarray:
    """Eq. 10 for every image × caption pair, vocabulary-factorised and streamed over image chunks.

    Args:
        image_mu: (N, R, Z) region representations μ (numpy or torch).
        image_mask: (N, R) bool, True = real region (padding is ignored, whatever it holds).
        caption_words: T lists of row indices into ``prototypes`` (repeats count as in the mean).
        prototypes: (V, Z) prototype matrix (the knowledge's, OOD rows included, or an ablation's);
            only the rows some caption uses are read (and checked for NaN/inf).
        pooling: "max-mean" (eq. 10) or "mean" (ablation: mean over all regions and words).
        image_chunk: images per chunk; None = as many as fit ``max_block_elements``.
        max_block_elements: float32 values in one region × vocabulary product block (memory bound).
        vocab_block: used-vocabulary columns per product block.

    Returns:
        (N, T) float32 scores. Empty captions / images without regions get the fill score (module
        docstring); :func:`count_empty` says which.

    Raises:
        ScoringError: shape mismatch (both shapes named), NaN/inf in a real region or a used prototype
            row (first bad index named), a word index outside [0, V), an unknown pooling.
    """
    mu, mask = _check_mu_mask(image_mu, image_mask)
    scorer = _ChunkScorer(caption_words, prototypes, pooling, latent_dim=mu.shape[2], vocab_block=vocab_block)
    n, r, _ = mu.shape
    chunk = int(image_chunk) if image_chunk else scorer.chunk_images(r, max_block_elements)
    if chunk < 1:
        raise ScoringError(f"image_chunk: must be at least 1, got {image_chunk}")
    out = np.empty((n, scorer.captions.num_captions), np.float32)  # (N, T)
    for i0 in range(0, n, chunk):
        out[i0:i0 + chunk] = scorer.score(mu[i0:i0 + chunk], mask[i0:i0 + chunk], offset=i0)
    image_ok = mask.any(axis=1)
    caption_ok = ~scorer.captions.empty
    fill = _apply_fill(out, image_ok, caption_ok)
    if fill is not None:
        logger.warning("score_matrix: %d empty captions and %d images without regions get the fill score %.4g",
                       int((~caption_ok).sum()), int((~image_ok).sum()), fill)
    return out


def pooled_word_scores(image_mu: Any, image_mask: Any, prototypes: Any, *, pooling: Pooling = "max-mean",
                       vocab_block: int = DEFAULT_VOCAB_BLOCK) -> np.ndarray:
    """The pooled word terms of eq. 10 for every image × prototype row: max (or mean) over an image's
    real regions of μ·v — the (N, V) matrix a gallery index keeps so that re-indexing computes only new
    images and new words (images without a real region get zeros; the fill rule handles them later).

    Args:
        image_mu: (N, R, Z); image_mask: (N, R) bool; prototypes: (V, Z).
    """
    mu, mask = _check_mu_mask(image_mu, image_mask)
    if pooling not in ("max-mean", "mean"):
        raise ScoringError(f"pooling: expected 'max-mean' or 'mean', got {pooling!r}")
    protos = _check_prototypes(prototypes, mu.shape[2])
    bad = _first_bad(protos)
    if bad is not None:
        raise ScoringError(f"prototypes: non-finite value at row {bad[0]}, column {bad[1]}")
    bad = _first_bad(mu, mask)
    if bad is not None:
        raise ScoringError(f"image_mu: non-finite value at image {bad[0]}, region {bad[1]}, dimension {bad[2]}")
    if protos.shape[0] == 0 or mu.shape[0] == 0 or mu.shape[1] == 0:
        return np.zeros((mu.shape[0], protos.shape[0]), np.float32)
    protos_t = torch.from_numpy(np.ascontiguousarray(protos, np.float32))
    if pooling == "max-mean":
        return _word_max(mu, mask, protos_t, max(1, int(vocab_block)))
    return _word_mean(mu, mask, protos_t)


@dataclass
class WordScoreReuse:
    """How a new vocabulary's columns map onto a previous index's per-word terms.

    Attributes:
        old_cols: (K,) columns of the new vocabulary that the previous one has …
        src_cols: (K,) … and where they are in the previous matrix.
        new_cols: (V - K,) columns the previous vocabulary lacks (computed for every image).
    """

    old_cols: np.ndarray
    src_cols: np.ndarray
    new_cols: np.ndarray

    @classmethod
    def between(cls, words: Sequence[str], previous: Sequence[str]) -> WordScoreReuse:
        """The mapping from a previous vocabulary (``previous``) to ``words``."""
        at = {w: i for i, w in enumerate(previous)}
        old = np.asarray([j for j, w in enumerate(words) if w in at], np.int64)
        return cls(old_cols=old, src_cols=np.asarray([at[words[j]] for j in old], np.int64),
                   new_cols=np.asarray([j for j, w in enumerate(words) if w not in at], np.int64))


def reuse_word_scores(image_mu: Any, image_mask: Any, need: np.ndarray, previous_rows: np.ndarray,
                      previous: np.ndarray, reuse: WordScoreReuse, prototypes: Any, *,
                      pooling: Pooling = "max-mean") -> tuple[np.ndarray, int, int]:
    """Per-word terms (:func:`pooled_word_scores`) of a chunk of images, reusing a previous index's.

    An image the previous index holds keeps its terms for the words it had and gets new words
    computed; a new image gets every word computed.  Equal to :func:`pooled_word_scores` on every
    image when the previous terms are the ones this μ and these prototypes give (tested against it).

    Args:
        image_mu: (M, R, Z) μ of the images with ``need`` set, in chunk order; image_mask: (M, R).
        need: (n,) bool, the images whose μ is given: every new image, and every image when
            ``reuse.new_cols`` is not empty.
        previous_rows: (n,) int, each image's row in ``previous`` (-1: a new image).
        previous: (N_prev, V_prev) the previous index's per-word terms.
        reuse: the column mapping (:meth:`WordScoreReuse.between`).
        prototypes: (V, Z) the (normalised when scoring normalises) prototype rows of the vocabulary.

    Returns:
        ``(ws (n, V) float32, rows computed in full, cells computed)``.
    """
    need = np.asarray(need, bool)
    old = np.asarray(previous_rows) >= 0
    n, v = len(need), int(np.shape(prototypes)[0])
    ws = np.zeros((n, v), np.float32)  # (n, V)
    at = {j: i for i, j in enumerate(np.flatnonzero(need))}
    cells = rows_full = 0
    if old.any():
        rows = np.asarray(previous_rows)[old]
        ws[np.ix_(old, reuse.old_cols)] = previous[np.ix_(rows, reuse.src_cols)]
        if reuse.new_cols.size:  # new words for unchanged images
            sel = [at[j] for j in np.flatnonzero(old)]
            ws[np.ix_(old, reuse.new_cols)] = pooled_word_scores(image_mu[sel], image_mask[sel],
                                                                 prototypes[reuse.new_cols], pooling=pooling)
            cells += len(sel) * reuse.new_cols.size
    if (~old).any():  # new images: every word
        sel = [at[j] for j in np.flatnonzero(~old)]
        ws[~old] = pooled_word_scores(image_mu[sel], image_mask[sel], prototypes, pooling=pooling)
        rows_full += len(sel)
        cells += len(sel) * v
    return ws, rows_full, cells


def score_matrix_naive(image_mu: Any, image_mask: Any, caption_words: Sequence[Sequence[int]], prototypes: Any,
                       *, pooling: Pooling = "max-mean") -> np.ndarray:
    """Reference: eq. 10 by a loop over every (image, caption) pair, in float64.

    Same arguments, validation and fill rule as :func:`score_matrix`; for tests and benchmarks only.
    """
    mu, mask = _check_mu_mask(image_mu, image_mask)
    protos = _check_prototypes(prototypes, mu.shape[2]).astype(np.float64)
    if pooling not in ("max-mean", "mean"):
        raise ScoringError(f"pooling: expected 'max-mean' or 'mean', got {pooling!r}")
    caps = index_captions(caption_words, protos.shape[0])
    _used_rows(protos, caps.used)
    bad = _first_bad(mu, mask)
    if bad is not None:
        raise ScoringError(f"image_mu: non-finite value at image {bad[0]}, region {bad[1]}, dimension {bad[2]}")
    out = np.zeros((mu.shape[0], len(caption_words)), np.float64)
    for i in range(mu.shape[0]):
        regions = mu[i][mask[i]].astype(np.float64)  # (r, Z)
        for t, words in enumerate(caption_words):
            if len(regions) == 0 or len(words) == 0:
                continue
            sims = regions @ protos[np.asarray(words, np.int64)].T  # (r, w)
            out[i, t] = sims.max(axis=0).mean() if pooling == "max-mean" else sims.mean()
    out = out.astype(np.float32)
    _apply_fill(out, mask.any(axis=1), ~caps.empty)
    return out


# ----------------------------------------------------------------------------------------------
# top-k and the streaming gallery scorer
# ----------------------------------------------------------------------------------------------

def _topk_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of a 2-D array; ties → lower column first. Returns (indices, values) best first."""
    q, n = x.shape
    if k == n:
        idx = np.argsort(-x, axis=1, kind="stable")
        return idx, np.take_along_axis(x, idx, axis=1)
    thr = np.partition(x, n - k, axis=1)[:, n - k : n - k + 1]  # (q, 1) k-th largest value
    sel = x >= thr  # (q, n)
    over = np.flatnonzero(sel.sum(axis=1) > k)  # rows whose ties at the threshold overflow k
    if over.size:
        gt = x[over] > thr[over]
        eq = x[over] == thr[over]
        need = k - gt.sum(axis=1, keepdims=True)
        sel[over] = gt | (eq & (np.cumsum(eq, axis=1) <= need))
    cols = np.nonzero(sel)[1].reshape(q, k)  # ascending column per row
    vals = np.take_along_axis(x, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: equal values keep the lower column first
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def topk(scores: Any, k: int, axis: int = 1, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The k highest entries along ``axis``, best first; ties go to the lower index.

    Args:
        scores: 1-D or 2-D array (numpy or torch); ±inf allowed, NaN is an error.
        k: how many; larger than the axis length → clipped to it.
        axis: 0 (per column) or 1 / -1 (per row). Ignored for 1-D input.
        block: rows processed at once (bounds temporary memory).

    Returns:
        (indices int64, values) shaped like ``scores`` with ``axis`` cut to k.

    Raises:
        ScoringError: NaN in scores, k < 1, a bad axis.
    """
    x = _as_numpy(scores, "scores")
    if x.ndim not in (1, 2):
        raise ScoringError(f"scores: expected 1 or 2 dimensions, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ScoringError(f"scores: expected numbers, got dtype {x.dtype}")
    if int(k) < 1:
        raise ScoringError(f"k: must be at least 1, got {k}")
    nan = np.isnan(x) if x.dtype.kind == "f" else None
    if nan is not None and nan.any():
        raise ScoringError(f"scores: NaN at index {tuple(int(i) for i in np.argwhere(nan)[0])}")
    if x.ndim == 1:
        idx, val = topk(x[None, :], k, axis=1)
        return idx[0], val[0]
    if axis not in (0, 1, -1):
        raise ScoringError(f"axis: expected 0 or 1 for a 2-D array, got {axis}")
    rows = x if axis in (1, -1) else x.T
    k = min(int(k), rows.shape[1])
    q = rows.shape[0]
    idx = np.empty((q, k), np.int64)
    val = np.empty((q, k), x.dtype)
    if rows.shape[1] == 0:
        return (idx, val) if axis != 0 else (idx.T, val.T)
    for r0 in range(0, q, block):
        part = np.ascontiguousarray(rows[r0:r0 + block])
        idx[r0:r0 + block], val[r0:r0 + block] = _topk_rows(part, k)
    if axis == 0:
        return np.ascontiguousarray(idx.T), np.ascontiguousarray(val.T)
    return idx, val


@dataclass
class GalleryResult:
    """What :class:`GalleryScorer` returns.

    Attributes:
        image_ids: (N,) ids in the order the images were added.
        caption_top_images: (T, Ki) positions into ``image_ids`` of each caption's best images.
        caption_top_scores: (T, Ki) their scores.
        image_top_captions: (N, Kc) caption indices of each image's best captions.
        image_top_scores: (N, Kc) their scores.
        dense: (N, T) the whole matrix when ``keep_dense`` was set, else None.
        empty: counts of empty captions / regionless images (scored with ``fill``).
        fill: the fill score used (None when nothing needed it).
        word_scores: (N, Vu) pooled word terms when ``keep_word_scores`` was set, else None.
    """

    image_ids: np.ndarray
    caption_top_images: np.ndarray
    caption_top_scores: np.ndarray
    image_top_captions: np.ndarray
    image_top_scores: np.ndarray
    dense: np.ndarray | None
    empty: EmptyCounts
    fill: float | None = None
    word_scores: np.ndarray | None = None

    @property
    def caption_top_image_ids(self) -> np.ndarray:
        """(T, Ki) image ids (not positions) of each caption's best images."""
        return self.image_ids[self.caption_top_images]


@dataclass
class GalleryScorer:
    """Streams image chunks against fixed captions; keeps the top-K both ways and, optionally, the matrix.

    Scores are eq. 10 exactly as :func:`score_matrix` computes them (same fill rule, applied with the
    gallery-wide lowest score when :meth:`result` is called). Ties go to the earlier image / lower caption.

    Args:
        caption_words: T word-index lists into ``prototypes``.
        prototypes: (V, Z).
        k_images: images kept per caption (clipped to the gallery size).
        k_captions: captions kept per image (clipped to T).
        pooling: "max-mean" or "mean".
        keep_dense: also keep the (N, T) matrix.
        max_block_elements: bound of one product block inside a chunk (as in :func:`score_matrix`).
        keep_word_scores: also keep the (N, Vu) pooled word terms (``GalleryResult.word_scores``), which
            an index stores so that re-indexing computes only new images and new words.
    """

    caption_words: Sequence[Sequence[int]]
    prototypes: Any
    k_images: int = 100
    k_captions: int = 100
    pooling: Pooling = "max-mean"
    keep_dense: bool = False
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS
    keep_word_scores: bool = False
    _scorer: _ChunkScorer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k_images < 1 or self.k_captions < 1:
            raise ScoringError(f"k_images and k_captions must be at least 1, got {self.k_images}, {self.k_captions}")
        self._scorer = _ChunkScorer(self.caption_words, self.prototypes, self.pooling)
        t = self._scorer.captions.num_captions
        self._ids: list[np.ndarray] = []
        self._top_pos = np.zeros((t, 0), np.int64)  # (T, k) running best image positions
        self._top_val = np.zeros((t, 0), np.float32)  # (T, k)
        self._img_top: list[np.ndarray] = []
        self._img_val: list[np.ndarray] = []
        self._dense: list[np.ndarray] = []
        self._word_scores: list[np.ndarray] = []
        self._image_ok: list[np.ndarray] = []
        self._lowest: float | None = None
        self._n = 0
        self._caption_ok = ~self._scorer.captions.empty

    def add(self, image_ids: Any, mu: Any, mask: Any) -> None:
        """Score one chunk of images.

        Args:
            image_ids: (n,) ids of the chunk's images.
            mu: (n, R, Z) region representations (R may differ between chunks).
            mask: (n, R) bool, True = real region.
        """
        mu_a, mask_a = _check_mu_mask(mu, mask)
        if mu_a.shape[2] != self._scorer.latent_dim:
            raise ScoringError(f"mu shape {mu_a.shape} and prototypes latent size {self._scorer.latent_dim} differ")
        ids = np.asarray(_as_numpy(image_ids, "image_ids")).reshape(-1)
        if ids.shape[0] != mu_a.shape[0]:
            raise ScoringError(f"image_ids length {ids.shape[0]} and mu shape {mu_a.shape} differ")
        n, r, _ = mu_a.shape
        step = self._scorer.chunk_images(r, self.max_block_elements)
        per_word = np.empty((n, self._scorer.protos_t.shape[0]), np.float32)  # (n, Vu)
        for i0 in range(0, n, step):
            per_word[i0:i0 + step] = self._scorer.per_word(mu_a[i0:i0 + step], mask_a[i0:i0 + step],
                                                           offset=self._n + i0)
        self.add_word_scores(image_ids, per_word, mask_a.any(axis=1))

    def add_word_scores(self, image_ids: Any, per_word: Any, image_ok: Any) -> None:
        """Add one chunk of images given their pooled word terms (what :meth:`add` computes from μ).

        This is how an index is re-scored incrementally: stored per-word terms of unchanged images are
        reused and only new images or new words are computed from μ.

        Args:
            image_ids: (n,) ids.
            per_word: (n, Vu) float32, columns in the order of the used prototype rows
                (``CaptionIndex.used``).
            image_ok: (n,) bool, False for images without a real region.
        """
        pw = _as_numpy(per_word, "per_word").astype(np.float32, copy=False)
        ok = np.asarray(_as_numpy(image_ok, "image_ok"), bool).reshape(-1)
        ids = np.asarray(_as_numpy(image_ids, "image_ids")).reshape(-1)
        if pw.ndim != 2 or pw.shape[0] != ids.shape[0] or ok.shape[0] != ids.shape[0]:
            raise ScoringError(f"per_word shape {pw.shape}, image_ok {ok.shape} and image_ids {ids.shape} differ")
        n = ids.shape[0]
        if n == 0:
            return
        bad = _first_bad(pw, ok)
        if bad is not None:
            raise ScoringError(f"per-word scores: non-finite value at image {self._n + bad[0]}, word {bad[1]}")
        scores = self._scorer.aggregate(pw)  # (n, T)
        image_ok = ok
        if self.keep_word_scores:
            self._word_scores.append(pw)
        real = scores[np.ix_(image_ok, self._caption_ok)]
        if real.size:
            low = float(real.min())
            self._lowest = low if self._lowest is None else min(self._lowest, low)
        # entries without a score rank last while merging; the fill value replaces -inf at the end
        scores[~image_ok, :] = -np.inf
        scores[:, ~self._caption_ok] = -np.inf
        if scores.shape[1]:
            pos, val = topk(scores, self.k_images, axis=0)  # (k, T)
            cat_pos = np.concatenate([self._top_pos, pos.T + self._n], axis=1)
            cat_val = np.concatenate([self._top_val, val.T], axis=1)
            sel, self._top_val = topk(cat_val, self.k_images, axis=1)
            self._top_pos = np.take_along_axis(cat_pos, sel, axis=1)
            cap_idx, cap_val = topk(scores, self.k_captions, axis=1)  # (n, kc)
        else:
            cap_idx, cap_val = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
        self._img_top.append(cap_idx)
        self._img_val.append(cap_val)
        if self.keep_dense:
            self._dense.append(scores)
        self._ids.append(ids)
        self._image_ok.append(image_ok)
        self._n += n

    @property
    def used_words(self) -> np.ndarray:
        """(Vu,) prototype rows the captions use, ascending: the columns of the per-word terms."""
        return self._scorer.captions.used

    def result(self) -> GalleryResult:
        """The merged top-K lists (and matrix), with the fill rule applied gallery-wide."""
        image_ok = np.concatenate(self._image_ok) if self._image_ok else np.zeros(0, bool)
        empty = EmptyCounts(captions=np.flatnonzero(~self._caption_ok), images=np.flatnonzero(~image_ok))
        needs_fill = bool(empty.captions.size or empty.images.size) and self._n > 0
        fill = fill_score(self._lowest) if needs_fill else None

        def filled(a: np.ndarray) -> np.ndarray:
            return np.where(np.isneginf(a), np.float32(fill), a).astype(np.float32) if fill is not None else a

        t = self._scorer.captions.num_captions
        return GalleryResult(
            image_ids=np.concatenate(self._ids) if self._ids else np.zeros(0, object),
            caption_top_images=self._top_pos,
            caption_top_scores=filled(self._top_val),
            image_top_captions=np.concatenate(self._img_top) if self._img_top else np.zeros((0, 0), np.int64),
            image_top_scores=filled(np.concatenate(self._img_val)) if self._img_val else np.zeros((0, 0), np.float32),
            dense=(filled(np.concatenate(self._dense)) if self._dense else np.zeros((0, t), np.float32))
            if self.keep_dense else None,
            empty=empty,
            fill=fill,
            word_scores=(np.concatenate(self._word_scores) if self._word_scores
                         else np.zeros((0, self._scorer.protos_t.shape[0]), np.float32))
            if self.keep_word_scores else None,
        )
