"""Modality-gap measures between the MTM's predicted word vectors and the real word vectors.

The MTM f (eq. 7) maps a region representation μ into the word-vector space, trained by L_cm
(eq. 9) to point each region at its word's vector and to keep the pairwise structure of eq. 8.  How
far the two point clouds — predictions ``P = f(·)`` and word vectors ``W`` — still are apart is the
*modality gap*.  Xu & Leiva, "Multimodal Representation Alignment for Cross-modal Information
Retrieval" (2025; summary in ``shared/seeds/alignment-metrics-summary.md``) report that (1) the
Wasserstein distance characterises the discrepancy between the two modalities' embedding
distributions and (2) cosine similarity is a more robust alignment score than Euclidean distance.
This module measures both for a trained MASK model:

* :func:`gaussian_w2` — 2-Wasserstein distance between Gaussian fits of ``P`` and ``W`` (closed form,
  the Fréchet distance of Dowson & Landau 1982; the formula of FID),
  ``W2² = ‖m_P − m_W‖² + Tr(Σ_P + Σ_W − 2 (Σ_W^{½} Σ_P Σ_W^{½})^{½})``;
* :func:`empirical_w2` — the exact 2-Wasserstein distance between the two *empirical* distributions
  (uniform weights, equal sizes): the optimal transport plan is then a permutation (Birkhoff), found
  by :func:`scipy.optimize.linear_sum_assignment` on squared Euclidean costs — no POT needed;
* :func:`centroid_gap` — ‖mean(P̂) − mean(Ŵ)‖ of the L2-normalised clouds, the "modality gap" of
  Liang et al., "Mind the Gap" (NeurIPS 2022), which the summary's Wasserstein measure refines;
* :func:`retrieval_by_metric` — word retrieval from each prediction over the whole vocabulary,
  ranked by cosine similarity vs. by Euclidean distance (R@1, R@5), the summary's point (2) made
  concrete for MASK: L_cm trains directions only, so cosine should retrieve better than distance.

:func:`gap_measures` computes all of them for the rows of a knowledge table with the MTM applied to
the eq. 2 prototypes v_k (``prototype.*``) and to one stored region μ per word (``region.*``).  The
MTM is applied to each vector as a one-region set, so its self-attention sees that vector only
(in training it sees all regions of the image; a prototype has no image).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from mask.errors import MaskError

logger = logging.getLogger(__name__)

#: Rows beyond which :func:`empirical_w2` subsamples (the assignment is O(n³)).
EXACT_MAX_POINTS = 2000


class AlignmentInputError(MaskError, ValueError):
    """Inputs to a gap measure of the wrong shape or with non-finite values; the message names them."""


def _matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise AlignmentInputError(f"{name} must be a non-empty (n, d) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise AlignmentInputError(f"{name} has non-finite values")
    return a


def _pair(x: Any, y: Any, same_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    a, b = _matrix(x, "x"), _matrix(y, "y")
    if a.shape[1] != b.shape[1]:
        raise AlignmentInputError(f"x and y must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise AlignmentInputError(f"x and y must be paired row by row, got {a.shape[0]} and {b.shape[0]} rows")
    return a, b


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n > 0, x / np.maximum(n, 1e-300), 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def gaussian_w2_from_moments(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """2-Wasserstein distance between N(m1, s1) and N(m2, s2) (Dowson & Landau 1982).

    ``W2² = ‖m1 − m2‖² + Tr(s1) + Tr(s2) − 2 Tr((s2^{½} s1 s2^{½})^{½})``; the inner matrix is
    symmetric PSD, so its trace-root is the sum of the square roots of its eigenvalues (no complex
    ``sqrtm``).
    """
    m1, m2 = np.asarray(m1, np.float64), np.asarray(m2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    r2 = _psd_sqrt(s2)
    cross = r2 @ s1 @ r2
    eig = np.linalg.eigvalsh((cross + cross.T) / 2)
    tr_cross = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    w2sq = float(np.sum((m1 - m2) ** 2)) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_cross
    return float(np.sqrt(max(w2sq, 0.0)))


def gaussian_w2(x: Any, y: Any) -> float:
    """2-Wasserstein distance between Gaussian fits of two samples (rows = points).

    Means and covariances are the sample ones (``ddof=1``, as FID; a single row has zero covariance).

    Args:
        x: (n, d) sample.  y: (m, d) sample.

    Returns:
        W2 (same units as the vectors).
    """
    a, b = _pair(x, y)

    def moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.cov(z, rowvar=False) if z.shape[0] > 1 else np.zeros((z.shape[1], z.shape[1]))
        return z.mean(axis=0), np.atleast_2d(c)

    return gaussian_w2_from_moments(*moments(a), *moments(b))


def empirical_w2(x: Any, y: Any, max_points: int = EXACT_MAX_POINTS, seed: int = 0) -> tuple[float, int]:
    """Exact 2-Wasserstein distance between two equal-weight empirical distributions.

    With n points on each side and uniform weights, an optimal transport plan is a permutation
    (Birkhoff–von Neumann), so ``W2² = min_σ (1/n) Σ_i ‖x_i − y_σ(i)‖²`` — a linear assignment
    (:func:`scipy.optimize.linear_sum_assignment`).  Samples of different sizes, or larger than
    ``max_points``, are subsampled (seeded, without replacement) to the same size; the result is then
    the exact distance between the subsamples, an estimate of the full one.

    Args:
        x: (n, d).  y: (m, d).  max_points: the largest assignment solved.  seed: subsampling seed.

    Returns:
        ``(W2, points used per side)``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    a, b = _pair(x, y)
    n = min(a.shape[0], b.shape[0], int(max_points))
    rng = np.random.default_rng(seed)
    if a.shape[0] > n:
        a = a[np.sort(rng.choice(a.shape[0], n, replace=False))]
    if b.shape[0] > n:
        b = b[np.sort(rng.choice(b.shape[0], n, replace=False))]
    cost = cdist(a, b, "sqeuclidean")  # (n, n)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(max(cost[rows, cols].mean(), 0.0))), n


def centroid_gap(x: Any, y: Any) -> float:
    """‖mean of unit-normalised x − mean of unit-normalised y‖ (Liang et al. 2022, "modality gap")."""
    a, b = _pair(x, y)
    return float(np.linalg.norm(unit_rows(a).mean(axis=0) - unit_rows(b).mean(axis=0)))


def retrieval_by_metric(pred: Any, targets: Any, ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    """Retrieve each prediction's own target among all targets, by cosine and by Euclidean distance.

    Row i of ``pred`` belongs to row i of ``targets``.  A hit at K means fewer than K other targets
    score strictly better than the true one (ties count in the prediction's favour, both metrics
    alike).

    Args:
        pred: (n, d) predictions (MTM outputs).  targets: (n, d) word vectors.  ks: cut-offs.
        chunk: rows per block.

    Returns:
        ``cos_r<K>``, ``euclid_r<K>`` (fractions in [0, 1]), ``matched_cos`` (mean cosine of the true
        pairs), ``chance_r<K>`` (K/n).
    """
    p, t = _pair(pred, targets, same_rows=True)
    n = p.shape[0]
    pu, tu = unit_rows(p), unit_rows(t)
    tsq = (t ** 2).sum(1)  # (n,)
    rank_cos = np.empty(n, np.int64)
    rank_euc = np.empty(n, np.int64)
    matched = np.empty(n)
    for s in range(0, n, chunk):  # row blocks: an (n, n) matrix of a 10k-word vocabulary is 800 MB
        e = min(s + chunk, n)
        idx = np.arange(s, e)
        cos = pu[s:e] @ tu.T  # (b, n)
        d2 = (p[s:e] ** 2).sum(1)[:, None] + tsq[None, :] - 2.0 * p[s:e] @ t.T  # (b, n) squared distances
        own_cos, own_d2 = cos[idx - s, idx], d2[idx - s, idx]
        rank_cos[s:e] = (cos > own_cos[:, None]).sum(1)  # other targets strictly better
        rank_euc[s:e] = (d2 < own_d2[:, None]).sum(1)
        matched[s:e] = own_cos
    out: dict[str, float] = {}
    for k in ks:
        out[f"cos_r{k}"] = float(np.mean(rank_cos < k))
        out[f"euclid_r{k}"] = float(np.mean(rank_euc < k))
        out[f"chance_r{k}"] = float(min(k, n) / n)
    out["matched_cos"] = float(np.mean(matched))
    return out


def pair_measures(pred: Any, targets: Any, seed: int = 0, max_points: int = EXACT_MAX_POINTS) -> dict[str, float]:
    """All gap measures between paired predictions and targets (row i ↔ row i).

    W2 is computed on the raw vectors and on the unit-normalised ones (``*_unit``): L_cm (eq. 9) is
    a cosine loss, so the MTM's output scale is free and the raw W2 mixes a norm mismatch into
    the gap.

    Returns:
        ``n``, ``w2_gaussian``, ``w2_gaussian_unit``, ``w2_exact``, ``w2_exact_unit``, ``centroid``,
        ``mean_norm_pred``, ``mean_norm_target`` and those of :func:`retrieval_by_metric`.
    """
    p, t = _pair(pred, targets, same_rows=True)
    pu, tu = unit_rows(p), unit_rows(t)
    w2, used = empirical_w2(p, t, max_points, seed)
    w2u, _ = empirical_w2(pu, tu, max_points, seed)
    out = {"n": float(p.shape[0]), "w2_gaussian": gaussian_w2(p, t), "w2_gaussian_unit": gaussian_w2(pu, tu),
           "w2_exact": w2, "w2_exact_unit": w2u, "w2_exact_points": float(used),
           "centroid": centroid_gap(p, t),
           "mean_norm_pred": float(np.linalg.norm(p, axis=1).mean()),
           "mean_norm_target": float(np.linalg.norm(t, axis=1).mean())}
    out.update(retrieval_by_metric(p, t))
    return out


# ---------------------------------------------------------------- the MTM side


def mtm_from_state(state: Mapping[str, Any], num_heads: int, prefix: str = "net.mtm."):
    """An :class:`mask.models.MTM` (eval mode) from a state dict, e.g. a training checkpoint's weights.

    Args:
        state: tensors by name; the MTM's are those starting with ``prefix`` (``net.mtm.`` in a
            :class:`mask.pipeline.train.TrainModule` checkpoint; ``""`` for an MTM's own state dict).
        num_heads: ``model.num_heads`` (not recoverable from the weights).

    Raises:
        AlignmentInputError: no MTM weights under ``prefix``, or weights that do not fit an MTM.
    """
    import torch

    from mask.models import MTM

    sub = {k[len(prefix):]: torch.as_tensor(v) for k, v in state.items() if k.startswith(prefix)}
    if "fc1.weight" not in sub:
        raise AlignmentInputError(f"no MTM weights under {prefix!r} (keys such as {sorted(state)[:3]})")
    word_dim, latent_dim = sub["fc1.weight"].shape
    mtm = MTM(int(latent_dim), int(word_dim), num_heads)
    try:
        mtm.load_state_dict(sub)
    except RuntimeError as e:
        raise AlignmentInputError(f"MTM weights under {prefix!r} do not fit an MTM: {e}") from e
    return mtm.eval()


def mtm_predict(mtm, vectors: Any, batch: int = 4096) -> np.ndarray:
    """Predicted word vectors f(v) (eq. 7) of each row of ``vectors`` (V, Z), as a one-region set.

    Returns:
        (V, N) float64.
    """
    import torch

    v = torch.as_tensor(np.asarray(vectors, np.float32))
    outs = []
    with torch.no_grad():
        for i in range(0, v.shape[0], batch):
            x = v[i:i + batch, None, :]  # (b, 1, Z)
            mask = torch.ones(x.shape[:2], dtype=torch.bool)  # (b, 1)
            outs.append(mtm(x, mask)[:, 0, :].double().numpy())  # (b, N)
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0))


def gap_measures(table, mtm, seed: int = 0, max_points: int = EXACT_MAX_POINTS) -> dict[str, float]:
    """The modality-gap measures of a trained model on its knowledge table, as flat ``gap.*`` metrics.

    Only rows learned from regions (``source == "vg"``) are used: an OOD row's prototype is built
    from word-vector neighbours (eq. 11–13), not from regions.

    Args:
        table: a :class:`mask.knowledge.KnowledgeTable`.
        mtm: the trained :class:`mask.models.MTM` (:func:`mtm_from_state`).
        seed: subsampling seed of :func:`empirical_w2`.

    Returns:
        ``gap.prototype.<measure>`` (MTM on the eq. 2 prototypes) and, when the table stores one
        region μ per word, ``gap.region.<measure>`` — see :func:`pair_measures`.

    Raises:
        AlignmentInputError: the table has no region-learned rows.
    """
    rows = np.flatnonzero(np.asarray([s == "vg" for s in table.source]))
    if rows.size == 0:
        raise AlignmentInputError("the knowledge table has no rows learned from regions (source 'vg')")
    words = np.asarray(table.word_vectors, np.float64)[rows]  # (V, N)
    out = {f"gap.prototype.{k}": v for k, v in
           pair_measures(mtm_predict(mtm, np.asarray(table.prototypes)[rows]), words, seed, max_points).items()}
    if table.samples is not None:  # validated finite by KnowledgeTable
        out.update({f"gap.region.{k}": v for k, v in
                    pair_measures(mtm_predict(mtm, np.asarray(table.samples)[rows]), words, seed,
                                  max_points).items()})
    return out
