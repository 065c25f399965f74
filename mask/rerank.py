"""Re-ranking a base model's top-k with MASK scores (Sec. 3.6, eq. 15).

Per query: take the k gallery items the base model scores highest, z-score the base scores and
the MASK scores over those k, fuse ``ZS(base) + α·ZS(mask)`` and reorder the k by the fused score.

Rules (documented, tested):

* z-score uses the population standard deviation (ddof = 0); a constant vector (all k values
  equal, which includes k = 1) has z-score 0 everywhere, so that side then cannot change the order.
* Ties: the base top-k picks the lower gallery index among equal base scores; equal fused scores
  keep the base order.
* k larger than the gallery is clipped to the gallery size.
* NaN or ±inf in either score matrix, mismatched shapes, k < 1 or a non-finite α are errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from mask.errors import MaskError
from mask.scoring import _as_numpy, topk

logger = logging.getLogger(__name__)


class RerankError(MaskError, ValueError):
    """Bad input to the re-ranker, with the input named."""


def _check_scores(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 2:
        raise RerankError(f"{name}: expected a 2-D (queries, gallery) array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise RerankError(f"{name}: expected numbers, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise RerankError(f"{name}: non-finite value {arr[r, c]} at [{r}, {c}]")
    return arr


def _check_pair(base: Any, mask: Any, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray, int]:
    b = _check_scores(base, "base_scores")
    m = _check_scores(mask, "mask_scores")
    if b.shape != m.shape:
        raise RerankError(f"base_scores shape {b.shape} and mask_scores shape {m.shape} differ")
    if int(k) < 1:
        raise RerankError(f"k: must be at least 1, got {k}")
    if not np.isfinite(alpha):
        raise RerankError(f"alpha: must be finite, got {alpha}")
    if k > b.shape[1] and b.shape[1] > 0:
        logger.info("rerank: k=%d is larger than the gallery (%d), clipped", k, b.shape[1])
    return b, m, min(int(k), b.shape[1])


def zscore(x: Any, axis: int = -1) -> np.ndarray:
    """Z-score along ``axis`` with the population std; constant slices give 0.

    Args:
        x: array of scores.
        axis: axis to normalise over.

    Returns:
        float64 array of the same shape.
    """
    a = np.asarray(_as_numpy(x, "x"), np.float64)
    mean = a.mean(axis=axis, keepdims=True)
    std = a.std(axis=axis, keepdims=True)
    # "constant" is decided exactly (max == min): a float std of equal values can be a tiny non-zero
    const = a.max(axis=axis, keepdims=True) == a.min(axis=axis, keepdims=True)
    safe = np.where(const | (std == 0), 1.0, std)
    return np.where(const, 0.0, (a - mean) / safe)


def _fuse(base_k: np.ndarray, mask_k: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 15 over the candidate axis: (Q, k), (Q, k) → order (Q, k) of positions 0..k-1, best first."""
    fused = zscore(base_k, axis=1) + alpha * zscore(mask_k, axis=1)  # (Q, k)
    return np.argsort(-fused, axis=1, kind="stable")  # stable: ties keep the base order


def rerank_topk(base_scores: Any, mask_scores: Any, k: int, alpha: float) -> np.ndarray:
    """Re-rank each query's base top-k by ZS(base) + α·ZS(mask) (eq. 15).

    Args:
        base_scores: (Q, G) base-model scores, one row per query.
        mask_scores: (Q, G) MASK scores of the same pairs.
        k: candidates per query (clipped to G).
        alpha: weight α of the MASK z-scores.

    Returns:
        (Q, k) int64 gallery indices, best first.
    """
    b, m, k = _check_pair(base_scores, mask_scores, k, alpha)
    return _rerank_rows(b, m, k, alpha)


def _rerank_rows(b: np.ndarray, m: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """rerank_topk on validated (Q, G) arrays with k already clipped."""
    k = min(k, b.shape[1])
    if k == 0:
        return np.zeros((b.shape[0], 0), np.int64)
    cand, base_k = topk(b, k, axis=1)  # (Q, k), best base first; ties → lower index
    mask_k = np.take_along_axis(m, cand, axis=1)  # (Q, k)
    return np.take_along_axis(cand, _fuse(base_k, mask_k, alpha), axis=1)


@dataclass(frozen=True)
class Reranked:
    """Re-ranked similarity matrices for :func:`mask.metrics.recall_at_k`.

    Attributes:
        i2t: (N_img, N_cap) for image→text (each image row re-ranked over captions).
        t2i: (N_img, N_cap) for text→image (each caption column re-ranked over images).
    """

    i2t: np.ndarray
    t2i: np.ndarray


def _reranked_matrix(base: np.ndarray, mask: np.ndarray, k: int, alpha: float, axis: int) -> np.ndarray:
    """Queries along ``axis`` (1: rows, 0: columns): candidates score above every non-candidate of
    their query, in fused order; non-candidates keep their base scores. Same layout as ``base``."""
    rows_b, rows_m = (base, mask) if axis == 1 else (base.T, mask.T)
    order = _rerank_rows(rows_b, rows_m, k, alpha)  # (Q, k)
    kk = order.shape[1]
    out = base.copy()
    if kk == 0 or base.size == 0:
        return out
    # candidates: top + step·(1 + k − rank) > every base score; non-candidates keep their base scores.
    # step ≥ |top| keeps the increments far above the float spacing whatever the scale of the scores.
    top = float(base.max())
    step = max(1.0, abs(top))
    ranks64 = top + step * np.arange(kk + 1, 1, -1, dtype=np.float64)  # (k,)
    ranks = ranks64.astype(out.dtype)
    if not np.isfinite(ranks).all() or (np.diff(ranks) >= 0).any() or ranks[-1] <= top:
        out, ranks = out.astype(np.float64), ranks64  # float32 too narrow for these scores
    queries = np.arange(order.shape[0])[:, None]  # (Q, 1)
    if axis == 1:
        out[queries, order] = ranks[None, :]
    else:
        out[order, queries] = ranks[None, :]
    return out


def rerank_both(base: Any, mask: Any, k: int, alpha: float) -> Reranked:
    """Re-rank both directions of an image × caption matrix (eq. 15 per query).

    Text→image: each caption column's top-k images by ``base`` are reordered; image→text: each image
    row's top-k captions. In the returned matrices the re-ranked candidates score above every
    non-candidate of the same query (in their fused order); non-candidates keep their base scores.

    Args:
        base: (N_img, N_cap) base-model similarities.
        mask: (N_img, N_cap) MASK similarities.
        k: candidates per query (clipped to the gallery size of each direction).
        alpha: weight α.

    Returns:
        :class:`Reranked` with ``i2t`` and ``t2i`` matrices of shape (N_img, N_cap), in the input's
        float dtype (float64 for integer input).
    """
    b, m, _ = _check_pair(base, mask, k, alpha)
    return Reranked(i2t=_reranked_matrix(b, m, k, alpha, axis=1), t2i=_reranked_matrix(b, m, k, alpha, axis=0))
