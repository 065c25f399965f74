"""The BUTD Faster R-CNN (ResNet C4, caffe-style) in PyTorch with torchvision.ops.

The network of Anderson et al. as converted by MILVLG/bottom-up-attention.pytorch (the paper's
detector, Sec. 4 / Appendix: 36 regions × 2048-d from a VG-pretrained ResNet-101 Faster R-CNN).
The module tree reproduces the reference's state-dict keys exactly (``shared/butd-facts.md`` §2),
so a published checkpoint loads by name (:mod:`mask.features.checkpoint`):

- ``backbone.stem`` / ``backbone.res{2,3,4}.{i}``: ResNet trunk, stride 16; the stem, res2 and res3
  use frozen BN (``FREEZE_AT=3``), res4 and res5 ordinary BN used in eval mode;
- ``proposal_generator.rpn_head`` (3×3 conv 512 → objectness 2A, deltas 4A) and the persistent buffer
  ``proposal_generator.anchor_generator.cell_anchors.0`` (A×4);
- ``roi_heads.res5.{i}`` (+ ``roi_heads.res5_bn`` for v2) after 14×14 RoIPool at 1/16, mean over H, W
  → 2048-d region features; ``roi_heads.box_predictor.{cls_score, bbox_pred, cls_embed, attr_linear1,
  attr_linear2}`` → class (1601) and attribute (401) probabilities.

Variants: v1 (R101; caffe post-activation bottleneck, stride in the 1×1, res5 dilation 2 / stride 1,
BN eps 1e-5, BGR mean subtraction) and v2 (R152; pre-activation, stride in the 3×3, res5 stride 2,
BN eps 2e-5, input BN instead of mean subtraction, ``roi_heads.res5.0.norm`` applied to res4 before
the RPN and the pooler).  Depths: 101 and 152 as published, 50, and two demo-only trunks named for
their bottleneck layer count: ``14`` = blocks [1, 1, 1, 1] and ``26`` = blocks [2, 2, 2, 2] (same
widths, so features stay 2048-d).

Numerics follow the reference (fact sheet §3, §5): softmax over the two objectness channels; box
decoding with the "+1" width convention and dw/dh clamped at log(1000/16); clip to [0, size−1];
boxes kept when width+1 and height+1 exceed ``min_size × scale``; pre-NMS top-k, NMS, post-NMS top-k.
NMS is ``torchvision.ops.nms`` on boxes shifted by +1 at x2/y2, which reproduces the "+1" areas of the
maskrcnn-benchmark kernel; it suppresses at IoU > t where the reference CPU kernel uses ≥ t (only exact
ties differ).  RoIPool is ``torchvision.ops.roi_pool`` (the same legacy Caffe semantics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from mask.errors import MaskError

logger = logging.getLogger(__name__)

# Bottleneck blocks per stage (res2, res3, res4, res5) for each supported depth (3·sum + 2 layers).
BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),  # demo-only "ResNet-14": one bottleneck per stage
    26: (2, 2, 2, 2),  # demo-only "ResNet-26": two bottlenecks per stage
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

# Feature stride of res4 (the RPN and pooler input).
FEATURE_STRIDE = 16
# Blobs are zero-padded to at least this side (two res4 cells).
MIN_INPUT_SIDE = 32
# Largest dw/dh before exp (reference: a 16 px box may grow to 1000 px).
SCALE_CLAMP = math.log(1000.0 / 16)


class BUTDConfigError(MaskError, ValueError):
    """An architecture setting the network cannot be built with."""


def detectron2_cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Cell anchors as detectron2's ``DefaultAnchorGenerator`` builds them (what the reference repo uses
    when the checkpoint carries no ``cell_anchors.0``): size-major, centred at 0.

    Args:
        sizes: anchor side lengths in pixels (reference: 4, 8, 16, 32).
        ratios: height/width ratios (reference: 0.5, 1, 2).

    Returns:
        ``(len(sizes)·len(ratios), 4)`` float32 boxes x1, y1, x2, y2.
    """
    out = []
    for size in sizes:
        area = float(size) ** 2
        for r in ratios:
            w = math.sqrt(area / r)
            h = r * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


def caffe_cell_anchors(scales: Sequence[float], ratios: Sequence[float], base_size: int = 16) -> Tensor:
    """Cell anchors of the original Caffe BUTD model (py-faster-rcnn's ``generate_anchors``):
    ratio-major, a ``base_size`` box centred at (base−1)/2, widths rounded.  With scales
    4, 8, 16, 32 the first anchor is [−38, −16, 53, 31] (fact sheet §5).

    Args:
        scales: multiples of the base box (BUTD: 4, 8, 16, 32, i.e. 64–512 px).
        ratios: height/width ratios.
        base_size: side of the base box.

    Returns:
        ``(len(ratios)·len(scales), 4)`` float32 boxes.
    """
    ctr = 0.5 * (base_size - 1)
    area = float(base_size * base_size)
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(area / r))
        hs = np.round(ws * r)
        for s in scales:
            w, h = ws * s, hs * s
            out.append([ctr - 0.5 * (w - 1), ctr - 0.5 * (h - 1), ctr + 0.5 * (w - 1), ctr + 0.5 * (h - 1)])
    return torch.tensor(out, dtype=torch.float32)


@dataclass(frozen=True)
class BUTDSpec:
    """Plain architecture arguments of :class:`BUTDDetector` (built from config by the extractor).

    Attributes:
        depth: key of :data:`BLOCKS_PER_STAGE`.
        version: 1 (caffe post-activation, R101) or 2 (pre-activation, R152).
        num_classes: classes including background at index 0 (VG: 1601).
        num_attributes: attributes including "none" at index 0 (VG: 401); 0 = no attribute head.
        pooler_resolution: RoIPool output side (reference 14).
        cell_anchors: A anchors (x1, y1, x2, y2) placed at every stride-16 cell.
        rpn_pre_nms_topk, rpn_post_nms_topk, rpn_nms_thresh, rpn_min_size: test-time RPN settings.
        roi_chunk: RoIs per chunk through res5 (bounds memory, not results).
    """

    depth: int = 101
    version: int = 1
    num_classes: int = 1601
    num_attributes: int = 401
    pooler_resolution: int = 14
    cell_anchors: tuple[tuple[float, float, float, float], ...] = field(
        default_factory=lambda: tuple(map(tuple, detectron2_cell_anchors([4, 8, 16, 32], [0.5, 1, 2]).tolist())))
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 16.0
    roi_chunk: int = 128

    def __post_init__(self) -> None:
        if self.depth not in BLOCKS_PER_STAGE:
            raise BUTDConfigError(f"detector depth {self.depth} is not supported; choose one of "
                                  f"{sorted(BLOCKS_PER_STAGE)} (14 and 26 are demo-only trunks)")
        if self.version not in (1, 2):
            raise BUTDConfigError(f"detector version {self.version} must be 1 (caffe, R101) or 2 (R152)")
        if self.num_classes < 2:
            raise BUTDConfigError(f"num_classes={self.num_classes} must include background and ≥1 class")
        if len(self.cell_anchors) == 0 or any(len(a) != 4 for a in self.cell_anchors):
            raise BUTDConfigError("cell_anchors must be a non-empty list of (x1, y1, x2, y2)")

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return BLOCKS_PER_STAGE[self.depth]

    @property
    def bn_eps(self) -> float:
        return 1e-5 if self.version == 1 else 2e-5

    @property
    def stride_in_1x1(self) -> bool:
        return self.version == 1

    @property
    def res5_dilation(self) -> int:
        return 2 if self.version == 1 else 1

    @property
    def pixel_mean_bgr(self) -> tuple[float, float, float]:
        return (102.9801, 115.9465, 122.7717) if self.version == 1 else (0.0, 0.0, 0.0)

    @property
    def num_anchors(self) -> int:
        return len(self.cell_anchors)


def _norm(channels: int, eps: float, frozen: bool) -> nn.Module:
    return FrozenBatchNorm2d(channels, eps=eps) if frozen else nn.BatchNorm2d(channels, eps=eps)


class NormConv(nn.Conv2d):
    """Conv2d with an optional ``norm`` child, keys ``weight`` (+ ``bias``) and ``norm.*`` as in
    detectron2's ``Conv2d``.  ``pre_act`` gives the v2 order norm → ReLU → conv; otherwise conv → norm."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = False, norm: nn.Module | None = None, pre_act: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
        self.norm = norm
        self.pre_act = pre_act

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_act:
            if self.norm is not None:
                x = F.relu(self.norm(x))
            return super().forward(x)
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class BottleneckV1(nn.Module):
    """Post-activation bottleneck (detectron2 ``BottleneckBlock``): conv-BN-ReLU ×2, conv-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, bottleneck: int, *, stride: int, dilation: int, stride_in_1x1: bool,
                 eps: float, frozen: bool):
        super().__init__()
        self.shortcut = (NormConv(cin, cout, 1, stride=stride, norm=_norm(cout, eps, frozen))
                         if cin != cout else None)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = NormConv(cin, bottleneck, 1, stride=s1, norm=_norm(bottleneck, eps, frozen))
        self.conv2 = NormConv(bottleneck, bottleneck, 3, stride=s3, padding=dilation, dilation=dilation,
                              norm=_norm(bottleneck, eps, frozen))
        self.conv3 = NormConv(bottleneck, cout, 1, norm=_norm(cout, eps, frozen))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        short = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + short)


class BottleneckV2(nn.Module):
    """Pre-activation bottleneck (reference ``BottleneckBlockv2``): x2 = ReLU(norm(x)); conv1 (no norm);
    norm-ReLU-conv2; norm-ReLU-conv3; + shortcut(x2) (or x); no final ReLU."""

    def __init__(self, cin: int, cout: int, bottleneck: int, *, stride: int, dilation: int, stride_in_1x1: bool,
                 eps: float, frozen: bool):
        super().__init__()
        self.shortcut = NormConv(cin, cout, 1, stride=stride) if cin != cout else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = NormConv(cin, bottleneck, 1, stride=s1)
        self.conv2 = NormConv(bottleneck, bottleneck, 3, stride=s3, padding=dilation, dilation=dilation,
                              norm=_norm(bottleneck, eps, frozen), pre_act=True)
        self.conv3 = NormConv(bottleneck, cout, 1, norm=_norm(bottleneck, eps, frozen), pre_act=True)
        self.norm = _norm(cin, eps, frozen)

    def forward(self, x: Tensor, pre_normed: bool = False) -> Tensor:
        x2 = x if pre_normed else F.relu(self.norm(x))
        out = self.conv3(self.conv2(self.conv1(x2)))
        short = self.shortcut(x2) if self.shortcut is not None else x
        return out + short


class Stem(nn.Module):
    """7×7/2 conv + BN + ReLU + 3×3/2 ceil-mode max-pool; v2 adds an input BN (``stem.norm``)."""

    def __init__(self, version: int, eps: float):
        super().__init__()
        if version == 2:
            self.norm = _norm(3, eps, frozen=True)
        self.conv1 = NormConv(3, 64, 7, stride=2, padding=3, norm=_norm(64, eps, frozen=True))
        self.version = version

    def forward(self, x: Tensor) -> Tensor:
        if self.version == 2:
            x = self.norm(x)
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


def _stage(spec: BUTDSpec, n: int, cin: int, bottleneck: int, cout: int, stride: int, dilation: int,
           frozen: bool) -> nn.Sequential:
    block = BottleneckV1 if spec.version == 1 else BottleneckV2
    blocks = []
    for i in range(n):
        blocks.append(block(cin if i == 0 else cout, cout, bottleneck, stride=stride if i == 0 else 1,
                            dilation=dilation, stride_in_1x1=spec.stride_in_1x1, eps=spec.bn_eps, frozen=frozen))
    return nn.Sequential(*blocks)


class Backbone(nn.Module):
    """Stem + res2..res4 (stride 16, 1024 channels); stem, res2, res3 frozen BN."""

    def __init__(self, spec: BUTDSpec):
        super().__init__()
        n2, n3, n4, _ = spec.blocks
        self.stem = Stem(spec.version, spec.bn_eps)
        self.res2 = _stage(spec, n2, 64, 64, 256, 1, 1, frozen=True)
        self.res3 = _stage(spec, n3, 256, 128, 512, 2, 1, frozen=True)
        self.res4 = _stage(spec, n4, 512, 256, 1024, 2, 1, frozen=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))  # (N, 1024, H/16, W/16)


class _BufferList(nn.Module):
    """Buffers named "0", "1", … (detectron2's ``BufferList``; persistent, so they are in the state dict)."""

    def __init__(self, buffers: list[Tensor]):
        super().__init__()
        for i, b in enumerate(buffers):
            self.register_buffer(str(i), b)

    def __getitem__(self, i: int) -> Tensor:
        return getattr(self, str(i))


class AnchorGenerator(nn.Module):
    """Cell anchors (buffer ``cell_anchors.0``) shifted to every cell of the stride-16 grid, (H, W, A) order."""

    def __init__(self, cell_anchors: Tensor):
        super().__init__()
        self.cell_anchors = _BufferList([cell_anchors.float().clone()])

    def forward(self, h: int, w: int) -> Tensor:
        cell = self.cell_anchors[0]  # (A, 4)
        ys = torch.arange(h, device=cell.device, dtype=torch.float32) * FEATURE_STRIDE
        xs = torch.arange(w, device=cell.device, dtype=torch.float32) * FEATURE_STRIDE
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)  # (H·W, 1, 4)
        return (shifts + cell[None]).reshape(-1, 4)  # (H·W·A, 4)


class RPNHead(nn.Module):
    """3×3 conv (→512) + ReLU, then 1×1 convs to 2A objectness logits and 4A deltas."""

    def __init__(self, cin: int, num_anchors: int, hidden: int = 512):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, 2 * num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, 4 * num_anchors, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)  # (N, 2A, H, W), (N, 4A, H, W)


def apply_deltas(deltas: Tensor, boxes: Tensor, scale_clamp: float = SCALE_CLAMP) -> Tensor:
    """Decode (dx, dy, dw, dh) against boxes with the caffe "+1" convention (fact sheet §5).

    Args:
        deltas: ``(R, 4)`` regression deltas (weights 1, 1, 1, 1).
        boxes: ``(R, 4)`` reference boxes x1, y1, x2, y2.
        scale_clamp: upper clamp of dw, dh.

    Returns:
        ``(R, 4)`` decoded boxes.
    """
    widths = boxes[:, 2] - boxes[:, 0] + 1.0  # (R,)
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = boxes[:, 0] + 0.5 * widths
    cy = boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = deltas[:, 2].clamp(max=scale_clamp)
    dh = deltas[:, 3].clamp(max=scale_clamp)
    pcx = dx * widths + cx
    pcy = dy * heights + cy
    pw = torch.exp(dw) * widths
    ph = torch.exp(dh) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)  # (R, 4)


def nms_plus1(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """NMS with "+1" box areas (maskrcnn-benchmark kernel) via ``torchvision.ops.nms``.

    Returns:
        Kept indices, highest score first.
    """
    shifted = boxes.clone()
    shifted[:, 2:] += 1.0
    return nms(shifted, scores, thresh)


def find_proposals(boxes: Tensor, scores: Tensor, image_size: tuple[int, int], scale: float, *,
                   pre_nms_topk: int, post_nms_topk: int, nms_thresh: float, min_size: float,
                   ) -> tuple[Tensor, Tensor]:
    """Proposal selection of one image (reference ``find_top_bua_rpn_proposals``).

    Args:
        boxes: ``(R, 4)`` decoded anchors in resized-image coordinates.
        scores: ``(R,)`` foreground probabilities.
        image_size: (h, w) of the resized image (before any batch padding).
        scale: resize factor; the minimum side is ``min_size × scale``.
        pre_nms_topk, post_nms_topk, nms_thresh, min_size: RPN test settings.

    Returns:
        ``(boxes (P, 4), scores (P,))``, highest score first.
    """
    h, w = image_size
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(min=0, max=w - 1)
    b[:, 1::2] = b[:, 1::2].clamp(min=0, max=h - 1)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    thr = min_size * scale
    keep &= ((b[:, 2] - b[:, 0] + 1) > thr) & ((b[:, 3] - b[:, 1] + 1) > thr)
    b, s = b[keep], scores[keep]
    s, order = s.sort(descending=True)
    order = order[:pre_nms_topk]
    b, s = b[order], s[:pre_nms_topk]
    k = nms_plus1(b, s, nms_thresh)[:post_nms_topk]
    return b[k], s[k]


class RPN(nn.Module):
    """Proposal generator: ``rpn_head`` + ``anchor_generator`` (reference ``BUARPN`` at test time)."""

    def __init__(self, spec: BUTDSpec):
        super().__init__()
        self.spec = spec
        self.rpn_head = RPNHead(1024, spec.num_anchors)
        self.anchor_generator = AnchorGenerator(torch.tensor(spec.cell_anchors, dtype=torch.float32))

    def forward(self, feat: Tensor, image_sizes: list[tuple[int, int]], scales: list[float],
                ) -> list[tuple[Tensor, Tensor]]:
        logits, deltas = self.rpn_head(feat)  # (N, 2A, H, W), (N, 4A, H, W)
        n, _, h, w = logits.shape
        a = self.anchor_generator.cell_anchors[0].shape[0]
        if logits.shape[1] != 2 * a:
            raise BUTDConfigError(f"RPN head predicts {logits.shape[1] // 2} anchors per cell but "
                                  f"cell_anchors.0 holds {a}")
        fg = F.softmax(logits.view(n, 2, a, h, w), dim=1)[:, 1]  # (N, A, H, W)
        fg = fg.permute(0, 2, 3, 1).reshape(n, -1)  # (N, H·W·A)
        d = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)  # (N, H·W·A, 4)
        anchors = self.anchor_generator(h, w)  # (H·W·A, 4)
        out = []
        for i in range(n):
            boxes = apply_deltas(d[i], anchors)  # (H·W·A, 4)
            out.append(find_proposals(boxes, fg[i], image_sizes[i], scales[i],
                                      pre_nms_topk=self.spec.rpn_pre_nms_topk,
                                      post_nms_topk=self.spec.rpn_post_nms_topk,
                                      nms_thresh=self.spec.rpn_nms_thresh, min_size=self.spec.rpn_min_size))
        return out


class BoxPredictor(nn.Module):
    """Class logits, class-specific deltas, and the attribute head (reference
    ``BUACaffeFastRCNNOutputLayers``): attribute input = [pooled ‖ embedding of argmax class]."""

    def __init__(self, dim: int, num_classes: int, num_attributes: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * num_classes)
        self.num_attributes = num_attributes
        if num_attributes > 0:
            self.cls_embed = nn.Embedding(num_classes, 256)
            self.attr_linear1 = nn.Linear(dim + 256, 512)
            self.attr_linear2 = nn.Linear(512, num_attributes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns class logits ``(K, C)`` and attribute probabilities ``(K, A)`` (None without the head)."""
        logits = self.cls_score(x)  # (K, C)
        if self.num_attributes <= 0:
            return logits, None
        emb = self.cls_embed(logits.argmax(dim=1))  # (K, 256)
        hid = F.relu(self.attr_linear1(torch.cat([x, emb], dim=1)))  # (K, 512)
        return logits, F.softmax(self.attr_linear2(hid), dim=-1)  # (K, A)


class Res5ROIHeads(nn.Module):
    """RoIPool (1/16) → res5 → mean over H, W → predictor (reference ``BUACaffeRes5ROIHeads``)."""

    def __init__(self, spec: BUTDSpec):
        super().__init__()
        self.spec = spec
        stride = 1 if spec.res5_dilation > 1 else 2
        self.res5 = _stage(spec, spec.blocks[3], 1024, 512, 2048, stride, spec.res5_dilation, frozen=False)
        if spec.version == 2:
            self.res5_bn = _norm(2048, spec.bn_eps, frozen=False)
        self.box_predictor = BoxPredictor(2048, spec.num_classes, spec.num_attributes)

    def pooled_features(self, feat: Tensor, boxes: list[Tensor]) -> Tensor:
        """``(ΣK, 2048)`` region features for boxes in resized-image coordinates, one list entry per image."""
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=feat.dtype, device=feat.device),
                                     b.to(feat.dtype)], dim=1) for i, b in enumerate(boxes)])  # (ΣK, 5)
        out = []
        r = self.spec.pooler_resolution
        for start in range(0, len(rois), self.spec.roi_chunk):
            x = roi_pool(feat, rois[start:start + self.spec.roi_chunk], (r, r),
                         1.0 / FEATURE_STRIDE)  # (k, 1024, r, r)
            out.append(self._res5(x).mean(dim=(2, 3)))  # (k, 2048)
        if not out:
            return feat.new_zeros((0, 2048))
        return torch.cat(out)

    def _res5(self, x: Tensor) -> Tensor:
        if self.spec.version == 1:
            return self.res5(x)
        out = self.res5[0](x, pre_normed=True)
        for blk in list(self.res5)[1:]:
            out = blk(out)
        return F.relu(self.res5_bn(out))


class BUTDDetector(nn.Module):
    """BUTD Faster R-CNN with the reference's state-dict layout (module docstring)."""

    def __init__(self, spec: BUTDSpec | None = None):
        super().__init__()
        self.spec = spec or BUTDSpec()
        self.backbone = Backbone(self.spec)
        self.proposal_generator = RPN(self.spec)
        self.roi_heads = Res5ROIHeads(self.spec)

    def res4_features(self, x: Tensor) -> Tensor:
        """Backbone map used by the RPN and the pooler (v2: ReLU(res5.0.norm(res4)))."""
        feat = self.backbone(x)  # (N, 1024, H/16, W/16)
        if self.spec.version == 2:
            feat = F.relu(self.roi_heads.res5[0].norm(feat))
        return feat

    def forward_features(self, images: list[Tensor], boxes: list[Tensor] | None = None,
                         scales: list[float] | None = None) -> list[dict[str, Tensor]]:
        """Run the detector on preprocessed images.

        Args:
            images: ``(3, H_i, W_i)`` float blobs from :func:`mask.features.images.resize_for_detector`;
                different sizes are zero-padded to a batch (as detectron2's ``ImageList``), and every
                side to at least ``MIN_INPUT_SIDE``.
            boxes: per image ``(K_i, 4)`` boxes in blob coordinates, used instead of the RPN; None = RPN.
            scales: per image resize factor (for the RPN minimum box side); default 1.

        Returns:
            Per image: ``boxes`` (K, 4) in blob coordinates (RPN proposals, unregressed, or the given
            boxes), ``objectness`` (K,) (RPN only), ``features`` (K, 2048), ``cls_probs`` (K, C),
            ``attr_probs`` (K, A) when the attribute head is on.
        """
        if not images:
            return []
        scales = list(scales) if scales is not None else [1.0] * len(images)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        # At least MIN_INPUT_SIDE: a blob a few pixels high (extreme aspect ratio) would pool to nothing
        # in the stem; the padding is outside image_size, so no box reaches into it.
        hmax = max(MIN_INPUT_SIDE, *(s[0] for s in sizes))
        wmax = max(MIN_INPUT_SIDE, *(s[1] for s in sizes))
        x = images[0].new_zeros((len(images), 3, hmax, wmax))  # (N, 3, H, W)
        for i, im in enumerate(images):
            x[i, :, : sizes[i][0], : sizes[i][1]] = im
        feat = self.res4_features(x)  # (N, 1024, h, w)
        results: list[dict[str, Tensor]] = [{} for _ in images]
        if boxes is None:
            props = self.proposal_generator(feat, sizes, scales)
            boxes = [p[0] for p in props]
            for r, p in zip(results, props, strict=True):
                r["objectness"] = p[1]
        else:
            boxes = [b.to(device=feat.device, dtype=feat.dtype).reshape(-1, 4) for b in boxes]
        pooled = self.roi_heads.pooled_features(feat, boxes)  # (ΣK, 2048)
        logits, attr = self.roi_heads.box_predictor(pooled)
        probs = F.softmax(logits, dim=-1)  # (ΣK, C)
        counts = [len(b) for b in boxes]
        for i, (r, f, p) in enumerate(zip(results, pooled.split(counts), probs.split(counts), strict=True)):
            r["boxes"] = boxes[i]
            r["features"] = f
            r["cls_probs"] = p
            if attr is not None:
                r["attr_probs"] = attr.split(counts)[i]
        return results


def build_butd(spec: BUTDSpec, seed: int = 0) -> BUTDDetector:
    """A :class:`BUTDDetector` in eval mode with seeded random weights (the reference's init schemes:
    MSRA fill for convs, N(0, 0.01) for the RPN and classifier, N(0, 0.001) for box deltas; BN
    identity).  Uses a private generator, so the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG; restore it
        model = BUTDDetector(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith("proposal_generator"):
                    nn.init.normal_(m.weight, std=0.01, generator=g)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                std = 0.001 if name.endswith("bbox_pred") else 0.01
                nn.init.normal_(m.weight, std=std, generator=g)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01, generator=g)
    return model.eval()
