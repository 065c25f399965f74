"""Retrieval metrics (Sec. 4.1): R@1/5/10 in both directions and their sum Rs; COCO 5k and 5-fold 1k.

Conventions:

* ``similarity`` is (N_images, N_captions); by default caption j belongs to image
  ``j // captions_per_image`` (the Karpathy layout: image i owns captions 5i … 5i+4); any mapping
  can be given as ``caption_to_image``.
* Image→text: an image's rank is that of the best-scored of its captions; images that own no
  caption (possible with an explicit mapping) are left out of the image→text recalls.
* Text→image: each caption's rank is that of its image.
* **Ties are pessimistic**: every wrong item scoring greater than *or equal to* the true one is
  counted ahead of it, so a constant similarity gives R@K = 0 (for K smaller than the gallery),
  never a flattering score.
* Values are percentages (0–100); ``rsum`` is the sum of the six recalls.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mask.errors import MaskError
from mask.scoring import _as_numpy

logger = logging.getLogger(__name__)

KS = (1, 5, 10)
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
#: Every metric name in the paper's table order (Tables 1/2: image retrieval IR = text→image first,
#: then annotation IA = image→text, then Rs); tables, sweeps and reports use this one tuple.
METRIC_NAMES = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum")


class MetricsError(MaskError, ValueError):
    """Bad input to the metrics, with the input named."""


def _check_sim(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 2:
        raise MetricsError(f"{name}: expected an (N_images, N_captions) matrix, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise MetricsError(f"{name}: expected numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        nan = np.isnan(arr)
        if nan.any():
            r, c = np.argwhere(nan)[0]
            raise MetricsError(f"{name}: NaN at [{r}, {c}]")
    return arr


def _mapping(n_img: int, n_cap: int, captions_per_image: int, caption_to_image: Any | None) -> np.ndarray:
    if caption_to_image is None:
        if captions_per_image < 1:
            raise MetricsError(f"captions_per_image: must be at least 1, got {captions_per_image}")
        if n_cap != n_img * captions_per_image:
            raise MetricsError(f"similarity has {n_cap} captions for {n_img} images, expected "
                               f"{n_img} × {captions_per_image} = {n_img * captions_per_image} "
                               "(or pass caption_to_image)")
        return np.arange(n_cap) // captions_per_image
    c2i = _as_numpy(caption_to_image, "caption_to_image").reshape(-1)
    if c2i.shape[0] != n_cap:
        raise MetricsError(f"caption_to_image has {c2i.shape[0]} entries for {n_cap} captions")
    if c2i.size and c2i.dtype.kind not in "iu":
        raise MetricsError(f"caption_to_image: expected integer image indices, got dtype {c2i.dtype}")
    c2i = c2i.astype(np.int64)
    bad = np.flatnonzero((c2i < 0) | (c2i >= n_img))
    if bad.size:
        raise MetricsError(f"caption_to_image[{bad[0]}] = {c2i[bad[0]]} is outside [0, {n_img})")
    return c2i


def ranks(similarity: Any, captions_per_image: int = 5, *, caption_to_image: Any | None = None,
          t2i_similarity: Any | None = None, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the true items (pessimistic ties).

    Args: as :func:`recall_at_k`; ``block`` bounds temporary memory.

    Returns:
        (i2t ranks (N_images,) — -1 for images without captions, t2i ranks (N_captions,)).
    """
    sim = _check_sim(similarity, "similarity")
    s2 = sim if t2i_similarity is None else _check_sim(t2i_similarity, "t2i_similarity")
    if s2.shape != sim.shape:
        raise MetricsError(f"t2i_similarity shape {s2.shape} and similarity shape {sim.shape} differ")
    n_img, n_cap = sim.shape
    c2i = _mapping(n_img, n_cap, captions_per_image, caption_to_image)
    cols = np.arange(n_cap)

    # text → image: wrong images scoring ≥ the true one (the true one itself is subtracted)
    t2i = np.empty(n_cap, np.int64)
    for c0 in range(0, n_cap, block):
        part = s2[:, c0:c0 + block]  # (N, b)
        gt = s2[c2i[c0:c0 + block], cols[c0:c0 + block]]  # (b,)
        t2i[c0:c0 + block] = (part >= gt[None, :]).sum(axis=0) - 1

    # image → text: best of the image's captions, then wrong captions scoring ≥ it
    gt_scores = sim[c2i, cols].astype(np.float64)  # (T,)
    best = np.full(n_img, -np.inf)
    np.maximum.at(best, c2i, gt_scores)
    owned = np.bincount(c2i, minlength=n_img) > 0
    ge_gt = np.bincount(c2i, weights=(gt_scores >= best[c2i]), minlength=n_img).astype(np.int64)
    i2t = np.empty(n_img, np.int64)
    for i0 in range(0, n_img, block):
        part = sim[i0:i0 + block]  # (b, T)
        i2t[i0:i0 + block] = (part >= best[i0:i0 + block, None]).sum(axis=1)
    i2t -= ge_gt
    i2t[~owned] = -1
    return i2t, t2i


def recall_at_k(similarity: Any, captions_per_image: int = 5, *, caption_to_image: Any | None = None,
                t2i_similarity: Any | None = None) -> dict[str, float]:
    """R@1/5/10 both ways and Rs, in percent.

    Args:
        similarity: (N_images, N_captions) scores (higher = more similar).
        captions_per_image: caption j belongs to image j // captions_per_image (ignored when
            ``caption_to_image`` is given).
        caption_to_image: optional (N_captions,) image index of each caption (any mapping).
        t2i_similarity: optional separate matrix for text→image (e.g. ``rerank_both(...).t2i``);
            ``similarity`` then serves image→text only.

    Returns:
        {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"} as floats.

    Raises:
        MetricsError: shapes that do not fit the mapping (both named), NaN, bad mapping.
    """
    i2t, t2i = ranks(similarity, captions_per_image, caption_to_image=caption_to_image,
                     t2i_similarity=t2i_similarity)
    i2t = i2t[i2t >= 0]
    if i2t.size < np.asarray(similarity).shape[0]:
        logger.info("recall_at_k: %d images own no caption and are left out of image→text",
                    np.asarray(similarity).shape[0] - i2t.size)
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = float(100.0 * (r < k).mean()) if r.size else 0.0
    out["rsum"] = float(sum(out[k] for k in KEYS))
    return out


def coco_5k(similarity: Any, captions_per_image: int = 5, *, t2i_similarity: Any | None = None) -> dict[str, float]:
    """COCO 5k test: :func:`recall_at_k` on the whole (5000, 25000) matrix."""
    n = np.asarray(similarity).shape[0]
    if n != 5000:
        logger.info("coco_5k: %d images (the COCO 5k test has 5000)", n)
    return recall_at_k(similarity, captions_per_image, t2i_similarity=t2i_similarity)


def coco_5fold_1k(similarity: Any, captions_per_image: int = 5, *, t2i_similarity: Any | None = None,
                  folds: int = 5) -> dict[str, float]:
    """COCO 1k: the mean of :func:`recall_at_k` over 5 folds of 1000 images and their 5000 captions.

    Fold f holds images [f·n, (f+1)·n) and captions [f·n·c, (f+1)·n·c) with n = N_images / folds.

    Raises:
        MetricsError: N_images not divisible by ``folds``, or captions not ``captions_per_image`` × images.
    """
    sim = _check_sim(similarity, "similarity")
    s2 = None if t2i_similarity is None else _check_sim(t2i_similarity, "t2i_similarity")
    n_img, n_cap = sim.shape
    if folds < 1 or n_img % folds:
        raise MetricsError(f"similarity has {n_img} images, not divisible into {folds} folds")
    _mapping(n_img, n_cap, captions_per_image, None)
    n = n_img // folds
    c = n * captions_per_image
    results = []
    for f in range(folds):
        part = sim[f * n:(f + 1) * n, f * c:(f + 1) * c]
        part2 = None if s2 is None else s2[f * n:(f + 1) * n, f * c:(f + 1) * c]
        results.append(recall_at_k(part, captions_per_image, t2i_similarity=part2))
    return {k: float(np.mean([r[k] for r in results])) for k in (*KEYS, "rsum")}


def nearest_centroid_accuracy(train: Any, train_labels: Any, test: Any, test_labels: Any) -> float:
    """How much of a label region features carry: nearest-centroid accuracy (a diagnostic of features, not Sec. 4.1).

    Features are centred on the training mean and L2-normalised; each label's centroid is the mean of its
    training rows; a test row gets the label of the centroid with the largest dot product.  Test labels absent
    from the training labels count as errors.

    Args:
        train, test: ``(N, D)`` / ``(M, D)`` features.
        train_labels, test_labels: ``(N,)`` / ``(M,)`` labels (any comparable type).

    Returns:
        The fraction of test rows labelled correctly (0.0 for an empty test set).

    Raises:
        MetricsError: shapes disagree, or the training set is empty.
    """
    a, b = np.asarray(train, np.float64), np.asarray(test, np.float64)
    ya, yb = np.asarray(train_labels), np.asarray(test_labels)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise MetricsError(f"train / test features must be (N, D) / (M, D) with equal D, got {a.shape} / {b.shape}")
    if len(ya) != len(a) or len(yb) != len(b):
        raise MetricsError(f"labels ({len(ya)}, {len(yb)}) do not match the feature rows ({len(a)}, {len(b)})")
    if not len(a):
        raise MetricsError("nearest_centroid_accuracy needs at least one training row")
    if not len(b):
        return 0.0
    mu = a.mean(0)

    def unit(f: np.ndarray) -> np.ndarray:
        f = f - mu
        return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)

    a, b = unit(a), unit(b)
    classes = np.unique(ya)
    cents = np.stack([a[ya == k].mean(0) for k in classes])
    return float((classes[np.argmax(b @ cents.T, 1)] == yb).mean())
