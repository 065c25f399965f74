"""Optional detectron2 backend: region features from any detectron2 config + weights.

Chosen with ``detector.backend: detectron2`` (``detector.d2_config`` = a detectron2 YAML, ``detector.weights``
= its checkpoint).  detectron2 is imported only here and only when this backend is built; without it
the error says how to install it.  The output has the same keys as
:class:`mask.features.extractor.RegionExtractor`, with these differences:

- resizing follows the detectron2 config (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), and
  normalisation is the model's own (``PIXEL_MEAN``/``PIXEL_STD``, ``INPUT.FORMAT``);
- region features are ``mean(res5(RoIAlign))`` for C4 models (``Res5ROIHeads``) and the box head's
  output for FPN models (``StandardROIHeads``, 1024-d by default) — the feature size is the model's;
- detectron2 puts background in the **last** class column; it is moved to column 0 so the box modes
  and labels of :mod:`mask.features.postprocess` apply unchanged; there are no attribute scores
  (empty arrays).

Not verified here: detectron2 does not install on this machine (no wheel on PyPI); the tests of this
module skip with that reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mask.features.device import resolve_device
from mask.features.postprocess import labels_and_scores, prepare_given_boxes, select_boxes

if TYPE_CHECKING:
    from mask.config import DetectorConfig

logger = logging.getLogger(__name__)

INSTALL_HINT = ("detectron2 is not installed; install it with "
                "`pip install 'git+https://github.com/facebookresearch/detectron2.git'` "
                "(needs a C++ compiler and a torch matching its build), or use detector.backend=butd")


def import_detectron2() -> Any:
    """Import detectron2 or raise an ImportError that says how to install it."""
    try:
        import detectron2
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return detectron2


class Detectron2Extractor:
    """Region features with a detectron2 ``GeneralizedRCNN`` (module docstring).

    Args:
        model: a built detectron2 model with weights loaded, in eval mode.
        d2_cfg: its detectron2 config node.
        det: our detector config (box modes, thresholds).
    """

    def __init__(self, model: Any, d2_cfg: Any, det: DetectorConfig):
        import_detectron2()
        from detectron2.data import transforms as T

        self.model = model.eval()
        self.d2_cfg = d2_cfg
        self.det = det
        self.input_format = d2_cfg.INPUT.FORMAT
        self.resize = T.ResizeShortestEdge([d2_cfg.INPUT.MIN_SIZE_TEST] * 2, d2_cfg.INPUT.MAX_SIZE_TEST)
        self.info = {"backend": "detectron2", "config": det.d2_config, "weights": d2_cfg.MODEL.WEIGHTS}

    @classmethod
    def from_config(cls, det: DetectorConfig) -> Detectron2Extractor:
        """Build from ``det.d2_config`` (+ ``det.weights``, which overrides ``MODEL.WEIGHTS``).

        Raises:
            ImportError: detectron2 missing (with the install hint).
            ValueError: no ``d2_config`` given.
        """
        import_detectron2()
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        if not det.d2_config:
            raise ValueError("detector.backend=detectron2 needs detector.d2_config (a detectron2 config file)")
        cfg = get_cfg()
        cfg.merge_from_file(det.d2_config)
        if det.weights:
            cfg.MODEL.WEIGHTS = det.weights
        cfg.MODEL.DEVICE = str(resolve_device(det.device))
        cfg.freeze()
        model = build_model(cfg)
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return cls(model, cfg, det)

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray | None] | None = None) -> list[dict]:
        """Same contract as :meth:`mask.features.extractor.RegionExtractor.__call__`."""
        from detectron2.structures import Boxes

        det = self.det
        if det.mode == "given" and boxes is None:
            raise ValueError("detector.mode='given' needs boxes for every image")
        if det.mode != "given" and boxes is not None:
            raise ValueError(f"boxes were passed but detector.mode={det.mode!r}; use mode 'given'")
        out = []
        roi = self.model.roi_heads
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            arr = img[:, :, ::-1] if self.input_format == "BGR" else img
            tr = self.resize.get_transform(arr)
            resized = tr.apply_image(np.ascontiguousarray(arr))
            scale = resized.shape[0] / h
            given = None
            if boxes is not None:
                given = prepare_given_boxes(np.zeros((0, 4)) if boxes[i] is None else boxes[i], (h, w),
                                            source=f"image {i}")
                if len(given[0]) == 0:
                    out.append({"image_size": (h, w), "boxes": given[0], "features": np.zeros((0, 0), np.float16),
                                "num_boxes": 0, "object_labels": np.zeros(0, np.int32),
                                "object_scores": np.zeros(0, np.float32), "attr_labels": np.zeros(0, np.int32),
                                "attr_scores": np.zeros(0, np.float32), "kept_indices": given[1],
                                "dropped_boxes": given[2], "dropped_reasons": given[3]})
                    continue
            with torch.inference_mode():
                inp = {"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()), "height": h, "width": w}
                batched = self.model.preprocess_image([inp])
                feats = self.model.backbone(batched.tensor)
                if given is not None:
                    pb = [Boxes(torch.as_tensor(given[0] * scale, device=batched.tensor.device))]
                else:
                    props, _ = self.model.proposal_generator(batched, feats, None)
                    pb = [p.proposal_boxes for p in props]
                if hasattr(roi, "_shared_roi_transform"):  # C4: Res5ROIHeads
                    x = roi._shared_roi_transform([feats[f] for f in roi.in_features], pb)
                    region = x.mean(dim=(2, 3))  # (R, 2048)
                else:  # FPN: StandardROIHeads
                    x = roi.box_pooler([feats[f] for f in roi.box_in_features], pb)
                    region = roi.box_head(x)  # (R, D)
                logits = roi.box_predictor(region)[0]  # (R, K+1), background last
                probs = torch.softmax(logits, dim=-1)
                probs = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)  # background first
                boxes_orig = pb[0].tensor.float() / scale
                if given is not None:
                    keep = torch.arange(len(boxes_orig), device=boxes_orig.device)
                else:
                    keep = select_boxes(boxes_orig, probs, det.mode, num_boxes=det.num_boxes,
                                        min_boxes=det.min_boxes, max_boxes=det.max_boxes,
                                        conf_thresh=det.conf_thresh, nms_thresh=det.box_nms_thresh)
            f = region[keep].float().cpu().numpy().astype(np.float16)
            lab, sc = labels_and_scores(probs[keep])
            res: dict[str, Any] = {
                "image_size": (h, w), "boxes": boxes_orig[keep].cpu().numpy().astype(np.float32),
                "features": f, "num_boxes": int(f.shape[0]), "object_labels": lab, "object_scores": sc,
                "attr_labels": np.zeros(0, np.int32), "attr_scores": np.zeros(0, np.float32)}
            if given is not None:
                res.update(boxes=given[0], kept_indices=given[1], dropped_boxes=given[2], dropped_reasons=given[3])
            else:
                res.update(dropped_boxes=np.zeros(0, np.int64), dropped_reasons=[])
            out.append(res)
        return out
