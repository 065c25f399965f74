"""BUTD network: state-dict layout vs the fact sheet, RPN numerics vs a naive reference, head semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mask.features.butd import (
    BLOCKS_PER_STAGE,
    BUTDConfigError,
    BUTDDetector,
    BUTDSpec,
    apply_deltas,
    build_butd,
    caffe_cell_anchors,
    detectron2_cell_anchors,
    find_proposals,
)


def fact_sheet_table(depth: int, version: int, num_classes: int = 1601, num_attributes: int = 401,
                     num_anchors: int = 12) -> dict[str, tuple[int, ...]]:
    """Expected checkpoint keys → shapes, written from shared/butd-facts.md §2 (not from our model)."""
    blocks = {101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 14: (1, 1, 1, 1)}[depth]
    t: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            t[f"{prefix}.{s}"] = (c,)

    if version == 2:
        bn("backbone.stem.norm", 3)
    t["backbone.stem.conv1.weight"] = (64, 3, 7, 7)
    bn("backbone.stem.conv1.norm", 64)
    stages = [("backbone.res2", 64, 64, 256), ("backbone.res3", 256, 128, 512),
              ("backbone.res4", 512, 256, 1024), ("roi_heads.res5", 1024, 512, 2048)]
    for (name, cin, b, cout), n in zip(stages, blocks, strict=True):
        for i in range(n):
            p, ci = f"{name}.{i}", (cin if i == 0 else cout)
            t[f"{p}.conv1.weight"] = (b, ci, 1, 1)
            t[f"{p}.conv2.weight"] = (b, b, 3, 3)
            t[f"{p}.conv3.weight"] = (cout, b, 1, 1)
            if i == 0:
                t[f"{p}.shortcut.weight"] = (cout, ci, 1, 1)
            if version == 1:
                bn(f"{p}.conv1.norm", b)
                bn(f"{p}.conv2.norm", b)
                bn(f"{p}.conv3.norm", cout)
                if i == 0:
                    bn(f"{p}.shortcut.norm", cout)
            else:
                bn(f"{p}.norm", ci)
                bn(f"{p}.conv2.norm", b)
                bn(f"{p}.conv3.norm", b)
    if version == 2:
        bn("roi_heads.res5_bn", 2048)
    r = "proposal_generator.rpn_head"
    t[f"{r}.conv.weight"], t[f"{r}.conv.bias"] = (512, 1024, 3, 3), (512,)
    t[f"{r}.objectness_logits.weight"], t[f"{r}.objectness_logits.bias"] = (2 * num_anchors, 512, 1, 1), (2 * num_anchors,)
    t[f"{r}.anchor_deltas.weight"], t[f"{r}.anchor_deltas.bias"] = (4 * num_anchors, 512, 1, 1), (4 * num_anchors,)
    t["proposal_generator.anchor_generator.cell_anchors.0"] = (num_anchors, 4)
    p = "roi_heads.box_predictor"
    t[f"{p}.cls_score.weight"], t[f"{p}.cls_score.bias"] = (num_classes, 2048), (num_classes,)
    t[f"{p}.bbox_pred.weight"], t[f"{p}.bbox_pred.bias"] = (4 * num_classes, 2048), (4 * num_classes,)
    t[f"{p}.cls_embed.weight"] = (num_classes, 256)
    t[f"{p}.attr_linear1.weight"], t[f"{p}.attr_linear1.bias"] = (512, 2048 + 256), (512,)
    t[f"{p}.attr_linear2.weight"], t[f"{p}.attr_linear2.bias"] = (num_attributes, 512), (num_attributes,)
    return t


def model_table(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("depth,version", [(101, 1), (152, 2)])
def test_state_dict_matches_fact_sheet(depth, version):
    model = BUTDDetector(BUTDSpec(depth=depth, version=version))
    expected = fact_sheet_table(depth, version)
    got = model_table(model)
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    if depth == 101:  # fact sheet: "about 65.6M tensor values"
        assert sum(math.prod(s) for s in expected.values()) == pytest.approx(65.6e6, rel=2e-3)


def test_frozen_and_plain_bn_follow_freeze_at_3():
    model = BUTDDetector(BUTDSpec(depth=14))
    sd = model.state_dict()
    # FrozenBN (stem, res2, res3) has no num_batches_tracked; BN (res4, res5) has it.
    assert "backbone.res3.0.conv1.norm.num_batches_tracked" not in sd
    assert "backbone.res4.0.conv1.norm.num_batches_tracked" in sd
    assert "roi_heads.res5.0.conv1.norm.num_batches_tracked" in sd
    v2 = BUTDDetector(BUTDSpec(depth=14, version=2))
    assert v2.roi_heads.res5[0].norm.eps == 2e-5 and model.roi_heads.res5[0].conv1.norm.eps == 1e-5


def test_tiny_tables_match_both_variants():
    for version in (1, 2):
        assert model_table(BUTDDetector(BUTDSpec(depth=14, version=version))) == fact_sheet_table(14, version)


def test_bad_specs_are_named():
    with pytest.raises(BUTDConfigError, match="depth 34"):
        BUTDSpec(depth=34)
    with pytest.raises(BUTDConfigError, match="version"):
        BUTDSpec(version=3)
    assert set(BLOCKS_PER_STAGE) == {14, 26, 50, 101, 152}


def test_anchor_generators_match_documented_values():
    caffe = caffe_cell_anchors([4, 8, 16, 32], [0.5, 1, 2])
    assert caffe.shape == (12, 4)
    assert caffe[0].tolist() == [-38, -16, 53, 31]  # fact sheet §5: first Caffe anchor
    assert caffe[4].tolist() == [-24, -24, 39, 39]  # ratio 1, scale 4
    d2 = detectron2_cell_anchors([4, 8, 16, 32], [0.5, 1, 2])
    assert d2.shape == (12, 4)
    assert d2[1].tolist() == [-2, -2, 2, 2]  # size 4, ratio 1, centred at 0
    w, h = d2[0, 2] - d2[0, 0], d2[0, 3] - d2[0, 1]
    assert float(h / w) == pytest.approx(0.5) and float(w * h) == pytest.approx(16)


def naive_decode(d, box):
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    dw, dh = min(d[2], math.log(1000 / 16)), min(d[3], math.log(1000 / 16))
    pcx, pcy, pw, ph = d[0] * w + cx, d[1] * h + cy, math.exp(dw) * w, math.exp(dh) * h
    return [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]


def naive_iou_plus1(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_apply_deltas_matches_naive(rng):
    boxes = rng.uniform(0, 50, (20, 2))
    boxes = np.concatenate([boxes, boxes + rng.uniform(1, 40, (20, 2))], 1)
    deltas = rng.normal(0, 1, (20, 4))
    deltas[0, 2] = 10.0  # beyond the clamp
    got = apply_deltas(torch.tensor(deltas), torch.tensor(boxes)).numpy()
    ref = np.array([naive_decode(d, b) for d, b in zip(deltas, boxes, strict=True)])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_rpn_matches_naive_reference():
    """Full RPN on a 3×4 map: softmax over the 2 channels, (H, W, A) order, decode, clip, min size, NMS."""
    anchors = caffe_cell_anchors([1, 2], [0.5, 1, 2])  # 6 anchors of 16-32 px
    spec = BUTDSpec(depth=14, cell_anchors=tuple(map(tuple, anchors.tolist())), rpn_pre_nms_topk=40,
                    rpn_post_nms_topk=15, rpn_nms_thresh=0.6, rpn_min_size=8.0)
    model = BUTDDetector(spec).eval()
    g = torch.Generator().manual_seed(3)
    head = model.proposal_generator.rpn_head
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    feat = torch.randn(1, 1024, 3, 4, generator=g)
    size, scale = (45, 60), 0.75
    with torch.no_grad():
        (boxes, scores), = model.proposal_generator(feat, [size], [scale])
        logits, deltas = head(feat)
    a = len(anchors)
    cand = []
    for y in range(3):
        for x in range(4):
            for k in range(a):
                l0, l1 = float(logits[0, k, y, x]), float(logits[0, a + k, y, x])
                fg = math.exp(l1) / (math.exp(l0) + math.exp(l1))
                d = [float(deltas[0, 4 * k + j, y, x]) for j in range(4)]
                anc = [float(v) + s for v, s in zip(anchors[k], (16 * x, 16 * y, 16 * x, 16 * y), strict=True)]
                b = naive_decode(d, anc)
                b = [min(max(b[0], 0), 59), min(max(b[1], 0), 44), min(max(b[2], 0), 59), min(max(b[3], 0), 44)]
                if b[2] > b[0] and b[3] > b[1] and b[2] - b[0] + 1 > 8 * scale and b[3] - b[1] + 1 > 8 * scale:
                    cand.append((fg, b))
    cand.sort(key=lambda c: -c[0])
    cand = cand[:40]
    kept: list = []
    for fg, b in cand:
        if all(naive_iou_plus1(b, kb) <= 0.6 for _, kb in kept):
            kept.append((fg, b))
    kept = kept[:15]
    assert len(boxes) == len(kept) > 3
    np.testing.assert_allclose(scores.numpy(), [k[0] for k in kept], rtol=1e-5)
    np.testing.assert_allclose(boxes.numpy(), [k[1] for k in kept], rtol=1e-5, atol=1e-3)


def test_find_proposals_clip_and_min_size():
    boxes = torch.tensor([[-10.0, -10, 30, 30],  # clipped to [0, 0, 30, 30]
                          [5, 5, 12, 40],  # width 8 (+1) not > 8·1
                          [50, 50, 60, 60],  # entirely outside a 40×40 image → empty after clip
                          [0, 0, 39, 39]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    b, s = find_proposals(boxes, scores, (40, 40), 1.0, pre_nms_topk=10, post_nms_topk=10, nms_thresh=0.99,
                          min_size=8.0)
    assert s.tolist() == pytest.approx([0.9, 0.6])
    assert b.tolist() == [[0, 0, 30, 30], [0, 0, 39, 39]]


@pytest.fixture(scope="module")
def tiny():
    return build_butd(BUTDSpec(depth=14, pooler_resolution=4, rpn_post_nms_topk=20), seed=0)


def test_forward_shapes_and_probabilities(tiny):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(3, 64, 80, generator=g) * 50, torch.randn(3, 48, 64, generator=g) * 50]
    with torch.inference_mode():
        outs = tiny.forward_features(imgs, scales=[0.5, 0.5])
    for o, im in zip(outs, imgs, strict=True):
        k = len(o["boxes"])
        assert 0 < k <= 20
        assert o["features"].shape == (k, 2048) and o["cls_probs"].shape == (k, 1601)
        assert o["attr_probs"].shape == (k, 401)
        torch.testing.assert_close(o["cls_probs"].sum(1), torch.ones(k))
        torch.testing.assert_close(o["attr_probs"].sum(1), torch.ones(k))
        assert (o["boxes"][:, 2] <= im.shape[2] - 1).all() and (o["boxes"][:, 3] <= im.shape[1] - 1).all()
        assert (o["features"] >= 0).all()  # v1: mean of ReLU outputs


def test_given_boxes_independent_of_batch_and_chunking(tiny):
    g = torch.Generator().manual_seed(1)
    im = torch.randn(3, 64, 64, generator=g) * 50
    boxes = torch.tensor([[0.0, 0, 31, 31], [10, 20, 60, 50], [5, 5, 20, 60]])
    with torch.inference_mode():
        alone = tiny.forward_features([im], [boxes])[0]
        one = tiny.forward_features([im], [boxes[1:2]])[0]
        pair = tiny.forward_features([im, im.flip(-1)], [boxes, boxes])[0]
        tiny.roi_heads.spec = BUTDSpec(depth=14, pooler_resolution=4, roi_chunk=1)
        try:
            chunked = tiny.forward_features([im], [boxes])[0]
        finally:
            tiny.roi_heads.spec = tiny.spec
    torch.testing.assert_close(alone["features"][1:2], one["features"])
    torch.testing.assert_close(alone["features"], pair["features"])
    torch.testing.assert_close(alone["features"], chunked["features"])
    assert "objectness" not in alone and torch.equal(alone["boxes"], boxes)


def test_attribute_head_uses_argmax_class_embedding(tiny):
    x = torch.randn(5, 2048)
    with torch.inference_mode():
        logits, attr = tiny.roi_heads.box_predictor(x)
        bp = tiny.roi_heads.box_predictor
        emb = bp.cls_embed.weight[logits.argmax(1)]
        ref = F.softmax(bp.attr_linear2(F.relu(bp.attr_linear1(torch.cat([x, emb], 1)))), -1)
    torch.testing.assert_close(attr, ref)


def test_v2_forward_runs_and_uses_res5_norm_on_res4():
    model = build_butd(BUTDSpec(depth=14, version=2, pooler_resolution=4, rpn_post_nms_topk=10), seed=0)
    im = torch.randn(3, 64, 64)
    with torch.inference_mode():
        out = model.forward_features([im], [torch.tensor([[0.0, 0, 40, 40]])])[0]
        raw = model.backbone(im[None])
        feat = model.res4_features(im[None])
        ref = F.relu(model.roi_heads.res5[0].norm(raw))
    assert out["features"].shape == (1, 2048)
    torch.testing.assert_close(feat, ref)
    assert model.spec.pixel_mean_bgr == (0.0, 0.0, 0.0) and model.spec.res5_dilation == 1


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_butd(BUTDSpec(depth=14), seed=7).state_dict()
    after = torch.rand(1)
    b = build_butd(BUTDSpec(depth=14), seed=7).state_dict()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)
