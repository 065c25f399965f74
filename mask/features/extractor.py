"""Region features per image: a backend-agnostic :class:`RegionExtractor` built from config.

``RegionExtractor.from_config(cfg)`` gives a callable ``images → list of dicts`` (boxes in original
pixels, 2048-d float16 features, labels/scores) for either backend: the built-in BUTD network
(:mod:`mask.features.butd`) or detectron2 (:mod:`mask.features.detectron2_backend`, imported only
when chosen).

Weights, in order of precedence: ``state_dict_bytes`` (safetensors bytes, e.g. one calibrated set
shipped by the driver to every actor), ``cfg.weights`` (a published checkpoint), else a seeded random
initialisation.

**What the demo uses, and why.**  No BUTD checkpoint can be downloaded here, so the demo runs the
same network code with seeded random weights, a demo-only trunk (``depth: 14`` or ``26``), a small
input size and a 7×7 pooler (config).  Random weights alone are not enough: with every BN layer at
its initial identity statistics the activations of a random ResNet drift in scale from layer to
layer (the stem alone sees inputs of ±128), so the region features are dominated by a few
directions and carry little of the scene; deeper trunks overflow float16 outright.  Measured with
``bench/detector_calibration.py`` (nearest-centroid accuracy of region features of 4 colours ×
3 shapes, chance 0.08; 7×7 pooler): at 128 px, depth 14 0.41 → 0.46, depth 26 0.26 → 0.50, depth 50
0.20 → 0.24, depth 101 float16 overflow → 0.15; at 224 px, depth 14 0.45 → 0.57 (colour alone
0.98 → 1.00, shape alone 0.45 → 0.57).  Random trunks lose content with depth even when calibrated,
hence the shallow demo trunk.  :func:`calibrate_batchnorm` therefore
recomputes every norm layer's statistics (frozen and ordinary BN alike) from a forward pass over
calibration images — seeded synthetic scenes of coloured, textured shapes
(:func:`synthetic_scenes`) unless the caller passes images — so that every layer sees normalised
inputs and the features keep colour, shape and texture apart.  The calibration runs once, where the
extractor is built; the resulting weights can be exported with :meth:`RegionExtractor.state_dict_bytes`
so every actor uses the same numbers.  With a real checkpoint nothing is calibrated.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mask.errors import MaskError
from mask.features.butd import BUTDDetector, BUTDSpec, build_butd, caffe_cell_anchors, detectron2_cell_anchors
from mask.features.checkpoint import load_butd_checkpoint, state_dict_bytes
from mask.features.device import resolve_device
from mask.features.images import resize_for_detector
from mask.features.postprocess import labels_and_scores, prepare_given_boxes, select_boxes

if TYPE_CHECKING:
    from mask.config import DetectorConfig

logger = logging.getLogger(__name__)


def _writable(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array torch may wrap: ``a`` itself when writable, else a copy (no read-only tensor)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


class FeatureOverflow(MaskError, ValueError):
    """Region features that are not finite in float16 (broken or uncalibrated weights)."""


def spec_from_config(cfg: DetectorConfig) -> BUTDSpec:
    """The :class:`BUTDSpec` a :class:`~mask.config.DetectorConfig` describes."""
    version = {"v1": 1, "v2": 2}.get(cfg.variant, 2 if cfg.depth == 152 else 1)
    if cfg.anchor_style == "caffe":
        anchors = caffe_cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)
    else:
        anchors = detectron2_cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios)
    return BUTDSpec(depth=cfg.depth, version=version, num_classes=cfg.num_classes,
                    num_attributes=cfg.num_attributes, pooler_resolution=cfg.pooler_resolution,
                    cell_anchors=tuple(map(tuple, anchors.tolist())), rpn_pre_nms_topk=cfg.rpn_pre_nms_topk,
                    rpn_post_nms_topk=cfg.rpn_post_nms_topk, rpn_nms_thresh=cfg.rpn_nms_thresh,
                    rpn_min_size=cfg.rpn_min_size, roi_chunk=cfg.roi_chunk)


class RegionExtractor:
    """BUTD region features for a list of decoded images (modes in :mod:`mask.features.postprocess`).

    Args:
        model: the detector (eval mode).
        mode, num_boxes, min_boxes, max_boxes, conf_thresh, nms_thresh: box selection.
        min_size, max_size: resize rule.
        device: where the model runs.
        info: provenance (weights source, calibration) kept for logs and manifests.
    """

    def __init__(self, model: BUTDDetector, *, mode: str = "fixed", num_boxes: int = 36, min_boxes: int = 10,
                 max_boxes: int = 100, conf_thresh: float = 0.2, nms_thresh: float = 0.3, min_size: int = 600,
                 max_size: int = 1000, device: torch.device | str = "cpu", info: dict[str, Any] | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.mode = mode
        self.num_boxes, self.min_boxes, self.max_boxes = num_boxes, min_boxes, max_boxes
        self.conf_thresh, self.nms_thresh = conf_thresh, nms_thresh
        self.min_size, self.max_size = min_size, max_size
        self.info = dict(info or {})

    @classmethod
    def from_config(cls, cfg: DetectorConfig, *, state_dict_bytes: bytes | None = None,
                    calibration_images: list[np.ndarray] | None = None) -> Any:
        """Build the extractor a config describes (the detectron2 backend when ``cfg.backend`` says so).

        Args:
            cfg: detector config.
            state_dict_bytes: safetensors/torch bytes of the full detector; overrides ``cfg.weights``
                and skips calibration (they are already final).
            calibration_images: RGB images for BN calibration of random weights (default: seeded
                synthetic scenes).

        Returns:
            A :class:`RegionExtractor` (or :class:`~mask.features.detectron2_backend.Detectron2Extractor`).
        """
        if cfg.backend == "detectron2":
            # the optional backend's module is loaded only when chosen (it wraps the optional detectron2)
            from mask.features.detectron2_backend import Detectron2Extractor

            return Detectron2Extractor.from_config(cfg)
        if cfg.backend == "efficientnet_lite0":
            from mask.features.pretrained import PretrainedRegionExtractor

            return PretrainedRegionExtractor.from_config(cfg)
        spec = spec_from_config(cfg)
        device = resolve_device(cfg.device)
        model = build_butd(spec, seed=cfg.seed)
        info: dict[str, Any] = {"backend": "butd", "depth": spec.depth, "version": spec.version}
        if state_dict_bytes is not None:
            info.update(load_butd_checkpoint(model, state_dict_bytes, name="<shipped detector weights>"))
            info["weights"] = "shipped"
        elif cfg.weights:
            info.update(load_butd_checkpoint(model, cfg.weights))
            info["weights"] = cfg.weights
        else:
            info["weights"] = f"random(seed={cfg.seed})"
        ext = cls(model, mode=cfg.mode, num_boxes=cfg.num_boxes, min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes,
                  conf_thresh=cfg.conf_thresh, nms_thresh=cfg.box_nms_thresh, min_size=cfg.min_size,
                  max_size=cfg.max_size, device=device, info=info)
        if state_dict_bytes is None and not cfg.weights and cfg.calibrate_random:
            if calibration_images is not None:
                imgs, boxes = list(calibration_images), None
            else:
                scenes = synthetic_scenes(cfg.calibration_images, size=(cfg.min_size, cfg.min_size),
                                          seed=cfg.seed + 1)
                imgs, boxes = [s[0] for s in scenes], [s[1] for s in scenes]
            ext.calibrate(imgs, boxes)
            info["calibrated_on"] = len(imgs)
        logger.info("region extractor ready: %s on %s", info, device)
        return ext

    def preprocess(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        """Decoded RGB image → ``(blob (3, H', W') float32, scale)`` (CPU stage; see ``resize_for_detector``)."""
        return resize_for_detector(img, self.min_size, self.max_size, self.model.spec.pixel_mean_bgr)

    def state_dict_bytes(self) -> bytes:
        """The detector's weights (including calibrated BN statistics) as safetensors bytes."""
        return state_dict_bytes(self.model)

    def calibrate(self, images: list[np.ndarray], boxes: list[np.ndarray] | None = None) -> None:
        """Recompute BN statistics on RGB images (see :func:`calibrate_batchnorm`)."""
        prepared = [self.preprocess(im) for im in images]
        blobs = [torch.from_numpy(b).to(self.device) for b, _ in prepared]
        scales = [s for _, s in prepared]
        rois = None
        if boxes is not None:
            rois = [torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4) * s, device=self.device)
                    for b, s in zip(boxes, scales, strict=True)]
        calibrate_batchnorm(self.model, blobs, rois, scales)

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray | None] | None = None) -> list[dict]:
        """Region features of decoded images.

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays.
            boxes: mode ``given`` only: per image ``(K, 4)`` xyxy boxes in original pixels.

        Returns:
            Per image a dict: ``boxes`` (K, 4) float32 xyxy original pixels, ``features`` (K, 2048)
            float16, ``image_size`` (h, w), ``num_boxes``, ``object_labels``/``object_scores`` and
            ``attr_labels``/``attr_scores`` (0-based in the 1600/400 VG vocabularies), and for given
            boxes ``kept_indices`` (into the input boxes), ``dropped_boxes`` (indices) and
            ``dropped_reasons``.

        Raises:
            ValueError: boxes missing in mode ``given`` or passed in another mode; BoxError for an
                unreadable box array; FeatureOverflow when features are not finite.
        """
        prepared = [self.preprocess(im) for im in images]
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        return self.extract_prepared([p[0] for p in prepared], [p[1] for p in prepared], sizes, boxes)

    def extract_prepared(self, blobs: list[np.ndarray], scales: list[float], image_sizes: list[tuple[int, int]],
                         boxes: list[np.ndarray | None] | None = None) -> list[dict]:
        """Like :meth:`__call__` for images already preprocessed by :meth:`preprocess` (actor stage)."""
        n = len(blobs)
        if self.mode == "given" and boxes is None:
            raise ValueError("detector.mode='given' needs boxes for every image")
        if self.mode != "given" and boxes is not None:
            raise ValueError(f"boxes were passed but detector.mode={self.mode!r}; use mode 'given'")
        given: list[tuple] = [()] * n
        if boxes is not None:
            if len(boxes) != n:
                raise ValueError(f"{len(boxes)} box arrays for {n} images")
            given = [prepare_given_boxes(np.zeros((0, 4)) if b is None else b, image_sizes[i],
                                         source=f"image {i}") for i, b in enumerate(boxes)]
        raw: list[dict[str, Tensor] | None] = [None] * n
        # Images with equal blob shapes run as one batch (no padding, so an image's features never
        # depend on its batch mates); others run alone.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, b in enumerate(blobs):
            if boxes is not None and len(given[i][0]) == 0:
                continue
            groups[tuple(b.shape)].append(i)
        with torch.inference_mode():
            for idx in groups.values():
                # blobs that come from Ray's object store are read-only views; torch needs its own copy
                x = [torch.from_numpy(_writable(blobs[i])).to(self.device) for i in idx]
                bx = None
                if boxes is not None:
                    bx = [torch.from_numpy(given[i][0] * scales[i]).to(self.device) for i in idx]
                outs = self.model.forward_features(x, bx, [scales[i] for i in idx])
                for i, o in zip(idx, outs, strict=True):
                    raw[i] = o
        return [self._finish(raw[i], scales[i], image_sizes[i], given[i], i) for i in range(n)]

    def _finish(self, out: dict[str, Tensor] | None, scale: float, size: tuple[int, int], given: tuple,
                index: int) -> dict[str, Any]:
        res: dict[str, Any] = {"image_size": size}
        if out is None:  # given mode with no valid box: nothing ran
            feats = np.zeros((0, 2048), np.float16)
            res.update(boxes=np.zeros((0, 4), np.float32), features=feats, num_boxes=0,
                       object_labels=np.zeros(0, np.int32), object_scores=np.zeros(0, np.float32),
                       attr_labels=np.zeros(0, np.int32), attr_scores=np.zeros(0, np.float32))
        else:
            boxes_orig = out["boxes"].float() / scale  # (R, 4) original pixels
            if given:
                keep = torch.arange(len(boxes_orig), device=boxes_orig.device)
                boxes_out = torch.from_numpy(given[0])  # the clipped input boxes, exactly
            else:
                keep = select_boxes(boxes_orig, out["cls_probs"], self.mode, num_boxes=self.num_boxes,
                                    min_boxes=self.min_boxes, max_boxes=self.max_boxes,
                                    conf_thresh=self.conf_thresh, nms_thresh=self.nms_thresh)
                boxes_out = boxes_orig[keep].cpu()
            feats32 = out["features"][keep].float().cpu().numpy()
            with np.errstate(over="ignore"):  # overflow is detected and reported just below
                feats = feats32.astype(np.float16)
            if not np.isfinite(feats).all():
                raise FeatureOverflow(f"image {index}: region features are not finite in float16 "
                                      f"(max |x| = {np.abs(feats32).max():.3g}); the detector weights are "
                                      "broken or uncalibrated")
            obj_l, obj_s = labels_and_scores(out["cls_probs"][keep])
            attr = out.get("attr_probs")
            att_l, att_s = labels_and_scores(attr[keep] if attr is not None else None)
            res.update(boxes=boxes_out.numpy().astype(np.float32).reshape(-1, 4), features=feats,
                       num_boxes=int(feats.shape[0]), object_labels=obj_l, object_scores=obj_s,
                       attr_labels=att_l, attr_scores=att_s)
        if given:
            res.update(kept_indices=given[1], dropped_boxes=given[2], dropped_reasons=given[3])
        else:
            res.update(dropped_boxes=np.zeros(0, np.int64), dropped_reasons=[])
        return res


def calibrate_batchnorm(model: nn.Module, blobs: list[Tensor], boxes: list[Tensor] | None = None,
                        scales: list[float] | None = None, rois_per_image: int = 32) -> int:
    """Set every norm layer's running mean/var to the statistics of its inputs on calibration images.

    A forward pre-hook on each ``BatchNorm2d`` / ``FrozenBatchNorm2d`` accumulates per-channel sums of
    its input and writes the running mean and (biased) variance *before* the layer normalises, so
    one pass calibrates the layers in order: each layer sees inputs already normalised by the layers
    before it.  Blobs of equal shape run as one batch (exact statistics); different shapes accumulate
    group by group.  The RoI head is calibrated on the given boxes, or on the top ``rois_per_image``
    RPN proposals.

    Args:
        model: a :class:`~mask.features.butd.BUTDDetector`.
        blobs: preprocessed ``(3, H, W)`` images.
        boxes: optional per-image ``(K, 4)`` boxes in blob coordinates.
        scales: per-image resize factors (RPN minimum size).
        rois_per_image: proposals per image used when boxes are not given.

    Returns:
        The number of norm layers calibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)]
    acc: dict[int, list] = {}

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().double()  # (N, C, H, W)
        s = x.sum(dim=(0, 2, 3))
        ss = (x * x).sum(dim=(0, 2, 3))
        cnt = x.numel() // x.shape[1]
        a = acc.setdefault(id(mod), [torch.zeros_like(s), torch.zeros_like(ss), 0])
        a[0] += s
        a[1] += ss
        a[2] += cnt
        mean = a[0] / a[2]
        var = (a[1] / a[2] - mean * mean).clamp(min=0)
        mod.running_mean.copy_(mean.to(mod.running_mean.dtype))
        mod.running_var.copy_(var.to(mod.running_var.dtype))

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    scales = list(scales) if scales is not None else [1.0] * len(blobs)
    was_training = model.training
    model.eval()
    try:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, b in enumerate(blobs):
            groups[tuple(b.shape)].append(i)
        with torch.inference_mode():
            for idx in groups.values():
                x = [blobs[i] for i in idx]
                if boxes is not None:
                    bx = [boxes[i] for i in idx]
                else:
                    feat = model.res4_features(torch.stack(x))  # stats of the trunk are set here
                    props = model.proposal_generator(feat, [tuple(t.shape[-2:]) for t in x], [scales[i] for i in idx])
                    bx = [p[0][:rois_per_image] for p in props]
                model.forward_features(x, bx, [scales[i] for i in idx])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    logger.info("calibrated %d norm layers on %d images", len(norms), len(blobs))
    return len(norms)


_COLOURS = np.array([[220, 40, 40], [40, 160, 60], [40, 80, 220], [240, 200, 40], [160, 60, 200],
                     [250, 140, 30], [30, 200, 210], [240, 240, 240], [30, 30, 30], [140, 90, 50]], np.uint8)


def render_shape(draw: Any, kind: str, box: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    """Draw one filled shape (``rect``, ``ellipse``, ``triangle``) into a PIL ``ImageDraw``."""
    x1, y1, x2, y2 = box
    if kind == "rect":
        draw.rectangle(box, fill=colour)
    elif kind == "ellipse":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=colour)


def synthetic_scenes(n: int, size: tuple[int, int] = (256, 256), seed: int = 0,
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded scenes of coloured, partly striped shapes on gradient backgrounds (BN calibration data).

    Args:
        n: number of scenes.
        size: (h, w).
        seed: RNG seed.

    Returns:
        ``[(image (h, w, 3) uint8 RGB, boxes (K, 4) float32 xyxy)]`` — the shapes' boxes plus a few
        random boxes.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None]
        bg = (c0 * (1 - t) + c1 * t) * np.ones((h, 1, 1))  # (h, w, 3)
        bg += rng.normal(0, 8, bg.shape)
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        boxes = []
        for _k in range(int(rng.integers(3, 7))):
            bw, bh = int(rng.integers(w // 8, w // 2)), int(rng.integers(h // 8, h // 2))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = (x1, y1, x1 + bw, y1 + bh)
            colour = tuple(int(v) for v in _COLOURS[rng.integers(len(_COLOURS))])
            render_shape(draw, ["rect", "ellipse", "triangle"][int(rng.integers(3))], box, colour)
            if rng.random() < 0.3:
                for xs in range(x1, x1 + bw, 6):
                    draw.line([(xs, y1), (xs, y1 + bh)], fill=(0, 0, 0), width=2)
            boxes.append(box)
        for _k in range(4):
            x1, y1 = rng.integers(0, w - 16), rng.integers(0, h - 16)
            boxes.append((x1, y1, rng.integers(x1 + 8, w), rng.integers(y1 + 8, h)))
        out.append((np.asarray(img, np.uint8), np.asarray(boxes, np.float32)))
    return out
