"""Which boxes an image keeps: the extraction modes of the reference (fact sheet §4).

- ``adaptive`` (reference ``roi_feats``, defaults 10–100 boxes at confidence 0.2): each proposal's
  ``max_conf`` is the highest class score (classes 1..C−1) among the classes for which it survives a
  per-class NMS at IoU 0.3; boxes with ``max_conf ≥ conf_thresh`` are kept **in proposal order**; when
  fewer than ``min_boxes`` survive, the top ``min_boxes`` by ``max_conf`` are taken instead, when more
  than ``max_boxes``, the top ``max_boxes`` (both sorted by ``max_conf``, descending).
- ``fixed`` (the paper's 36 regions): the same rule with ``min_boxes = max_boxes = num_boxes`` (what
  ``--min-max-boxes 36,36`` does), i.e. exactly ``num_boxes`` boxes whenever the RPN gave at least
  that many proposals, else all of them.
- ``given`` (VG ground truth): the caller's boxes, in the caller's order, no RPN and no NMS.  Unlike the
  reference (which neither checks nor clips), :func:`prepare_given_boxes` clips them to the image and
  drops — and reports, per box — non-finite boxes, boxes entirely outside the image and boxes with zero
  or negative width or height after clipping.

Labels follow the reference's saved ``info``: ``argmax`` over classes 1..C−1 (0-based in the 1600-word
VG vocabulary) and its probability; attributes likewise over 1..A−1.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mask.errors import MaskError
from mask.features.butd import nms_plus1

logger = logging.getLogger(__name__)

Mode = Literal["given", "fixed", "adaptive"]


def max_conf_per_box(boxes: Tensor, cls_probs: Tensor, nms_thresh: float = 0.3) -> Tensor:
    """Each box's highest class score among the classes whose NMS keeps it (reference ``save_roi_features``).

    Classes whose scores cannot raise any box's current ``max_conf`` are skipped (same result, faster).

    Args:
        boxes: ``(R, 4)`` boxes (any one coordinate frame).
        cls_probs: ``(R, C)`` class probabilities, column 0 = background (ignored).
        nms_thresh: per-class NMS IoU.

    Returns:
        ``(R,)`` float max confidences (0 for boxes that no class keeps).
    """
    boxes = boxes.float()
    probs = cls_probs.float()
    max_conf = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)  # (R,)
    if probs.shape[0] == 0:
        return max_conf
    for c in range(1, probs.shape[1]):
        scores = probs[:, c]  # (R,)
        if not bool((scores > max_conf).any()):
            continue
        keep = nms_plus1(boxes, scores, nms_thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep])
    return max_conf


def select_boxes(boxes: Tensor, cls_probs: Tensor, mode: Mode, *, num_boxes: int = 36, min_boxes: int = 10,
                 max_boxes: int = 100, conf_thresh: float = 0.2, nms_thresh: float = 0.3) -> Tensor:
    """Indices of the proposals an image keeps (rules in the module docstring).

    Args:
        boxes: ``(R, 4)`` proposals (the reference uses original-image coordinates; any consistent
            frame gives the same result up to NMS rounding).
        cls_probs: ``(R, C)`` class probabilities.
        mode: ``fixed``, ``adaptive`` or ``given`` (keeps all, in order).
        num_boxes: boxes for ``fixed``.
        min_boxes, max_boxes, conf_thresh: the ``adaptive`` rule.
        nms_thresh: per-class NMS IoU of ``max_conf``.

    Returns:
        ``(K,)`` int64 indices into the proposals.

    Raises:
        ValueError: unknown mode, or ``min_boxes > max_boxes``.
    """
    r = boxes.shape[0]
    if mode == "given":
        return torch.arange(r, device=boxes.device)
    if mode == "fixed":
        lo = hi = num_boxes
    elif mode == "adaptive":
        lo, hi = min_boxes, max_boxes
        if lo > hi:
            raise ValueError(f"detector.min_boxes={lo} exceeds detector.max_boxes={hi}")
    else:
        raise ValueError(f"unknown box mode {mode!r}; expected 'given', 'fixed' or 'adaptive'")
    max_conf = max_conf_per_box(boxes, cls_probs, nms_thresh)  # (R,)
    keep = torch.nonzero(max_conf >= conf_thresh).flatten()
    if len(keep) < lo:
        keep = torch.argsort(max_conf, descending=True, stable=True)[:lo]
    elif len(keep) > hi:
        keep = torch.argsort(max_conf, descending=True, stable=True)[:hi]
    return keep


def labels_and_scores(probs: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """``argmax`` over columns 1.. (0-based in the vocabulary without background) and its probability.

    Args:
        probs: ``(K, C)`` probabilities (column 0 = background / no attribute) or None.

    Returns:
        ``(labels int32 (K,), scores float32 (K,))``; empty arrays when probs is None.
    """
    if probs is None or probs.ndim != 2 or probs.shape[1] < 2:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    conf, idx = probs[:, 1:].float().max(dim=1)  # (K,), (K,)
    return idx.cpu().numpy().astype(np.int32), conf.cpu().numpy().astype(np.float32)


def prepare_given_boxes(boxes: np.ndarray, image_size: tuple[int, int], *, source: str = "<image>",
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Validate, clip and filter caller-given boxes (xyxy, original pixels).

    Args:
        boxes: ``(K, 4)`` x1, y1, x2, y2 (anything reshapeable to it; empty is fine).
        image_size: (h, w) of the original image.
        source: the image's name for messages.

    Returns:
        ``(kept_boxes (K', 4) float32 clipped to [0, w−1]×[0, h−1], kept_indices (K',) int64,
        dropped_indices (D,) int64, dropped_reasons (D strings))`` — every input box is in exactly one
        of kept/dropped.

    Raises:
        BoxError: the array cannot be read as ``(K, 4)`` numbers.
    """
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BoxError(f"{source}: given boxes are not numeric: {e}") from None
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        if b.ndim == 1 and b.size % 4 == 0:
            b = b.reshape(-1, 4)
        else:
            raise BoxError(f"{source}: given boxes must have shape (K, 4) xyxy, got {b.shape}")
    h, w = image_size
    kept_idx: list[int] = []
    kept: list[np.ndarray] = []
    dropped: list[int] = []
    reasons: list[str] = []
    for i, (x1, y1, x2, y2) in enumerate(b):
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            dropped.append(i)
            reasons.append("non-finite coordinates")
            continue
        if x2 < 0 or y2 < 0 or x1 > w - 1 or y1 > h - 1:
            dropped.append(i)
            reasons.append(f"outside the {w}x{h} image")
            continue
        c = np.array([min(max(x1, 0), w - 1), min(max(y1, 0), h - 1),
                      min(max(x2, 0), w - 1), min(max(y2, 0), h - 1)])
        if c[2] <= c[0] or c[3] <= c[1]:
            dropped.append(i)
            reasons.append("zero or negative width/height after clipping to the image")
            continue
        kept_idx.append(i)
        kept.append(c)
    if dropped:
        logger.debug("%s: dropped %d of %d given boxes", source, len(dropped), len(b))
    kept_arr = np.array(kept, np.float32).reshape(-1, 4)
    return kept_arr, np.array(kept_idx, np.int64), np.array(dropped, np.int64), reasons


class BoxError(MaskError, ValueError):
    """Given boxes that cannot be read as an (K, 4) array of numbers."""
