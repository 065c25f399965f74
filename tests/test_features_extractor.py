"""RegionExtractor from config: modes, output contract, determinism, BN calibration quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from skimage import data

from mask.config import DetectorConfig
from mask.features.extractor import (
    FeatureOverflow,
    RegionExtractor,
    calibrate_batchnorm,
    render_shape,
    spec_from_config,
    synthetic_scenes,
)
from mask.metrics import nearest_centroid_accuracy

SMALL = dict(depth=14, min_size=112, max_size=224, pooler_resolution=4, rpn_post_nms_topk=60,
             calibration_images=2, device="cpu")


def photos() -> list[np.ndarray]:
    cam = data.camera()[::2, ::2]
    return [data.astronaut()[::2, ::2], data.coffee()[::2, ::2], np.stack([cam] * 3, -1), data.chelsea()]


@pytest.fixture(scope="module")
def fixed():
    return RegionExtractor.from_config(DetectorConfig(**SMALL, mode="fixed", num_boxes=36))


@pytest.fixture(scope="module")
def given():
    return RegionExtractor.from_config(DetectorConfig(**SMALL, mode="given"))


def check_contract(o, image):
    h, w = image.shape[:2]
    k = o["num_boxes"]
    assert o["image_size"] == (h, w)
    assert o["boxes"].shape == (k, 4) and o["boxes"].dtype == np.float32
    assert o["features"].shape == (k, 2048) and o["features"].dtype == np.float16
    assert np.isfinite(o["features"]).all()
    for key, n in (("object_labels", 1600), ("attr_labels", 400)):
        assert o[key].shape == (k,) and o[key].dtype == np.int32
        assert ((o[key] >= 0) & (o[key] < n)).all()
    for key in ("object_scores", "attr_scores"):
        assert o[key].shape == (k,) and o[key].dtype == np.float32 and ((o[key] > 0) & (o[key] <= 1)).all()
    b = o["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= w - 1 + 1e-3).all() and (b[:, 3] <= h - 1 + 1e-3).all()


def test_fixed_mode_gives_36_boxes_on_real_photos(fixed):
    imgs = photos()
    outs = fixed(imgs)
    for o, im in zip(outs, imgs, strict=True):
        check_contract(o, im)
        assert o["num_boxes"] == 36
        assert len(o["dropped_boxes"]) == 0 and "kept_indices" not in o


def test_adaptive_mode_between_min_and_max(fixed):
    ext = RegionExtractor(fixed.model, mode="adaptive", min_boxes=5, max_boxes=20, conf_thresh=0.0,
                          min_size=112, max_size=224)
    o = ext([data.chelsea()])[0]
    check_contract(o, data.chelsea())
    assert o["num_boxes"] == 20  # threshold 0 passes everything → capped at max_boxes
    ext.conf_thresh = 0.99  # random weights: nothing that confident → min_boxes
    assert ext([data.chelsea()])[0]["num_boxes"] == 5


def test_given_boxes_in_order_with_drops_reported(given):
    img = data.astronaut()[::2, ::2]  # 256 × 256
    boxes = np.array([[10, 10, 100, 120], [300, 300, 400, 400], [50, 60, 50, 90], [-20, 100, 80, 400],
                      [120, 30, 200, 90]], np.float32)
    o = given([img], [boxes])[0]
    check_contract(o, img)
    assert o["kept_indices"].tolist() == [0, 3, 4]
    assert o["dropped_boxes"].tolist() == [1, 2] and len(o["dropped_reasons"]) == 2
    np.testing.assert_array_equal(o["boxes"], [[10, 10, 100, 120], [0, 100, 80, 255], [120, 30, 200, 90]])
    # a box's features do not depend on the other boxes of the image
    alone = given([img], [boxes[4:5]])[0]
    np.testing.assert_allclose(alone["features"][0], o["features"][2], rtol=2e-3, atol=1e-3)


def test_given_mode_image_without_valid_boxes(given):
    img = data.coffee()[::2, ::2]
    outs = given([img, img], [np.array([[1000, 1000, 1200, 1100]]), np.zeros((0, 4))])
    for o in outs:
        assert o["num_boxes"] == 0 and o["features"].shape == (0, 2048)
    assert outs[0]["dropped_boxes"].tolist() == [0]


def test_mixed_sizes_equal_one_by_one(given):
    imgs = photos()
    boxes = [np.array([[5, 5, 60, 70], [20, 30, 120, 100]], np.float32)] * len(imgs)
    together = given(imgs, boxes)
    for im, b, t in zip(imgs, boxes, together, strict=True):
        alone = given([im], [b])[0]
        # equal up to float rounding (oneDNN picks kernels by batch size)
        np.testing.assert_allclose(alone["features"], t["features"], rtol=2e-3, atol=1e-3)


def test_mode_errors(given, fixed):
    img = data.chelsea()
    with pytest.raises(ValueError, match="needs boxes"):
        given([img])
    with pytest.raises(ValueError, match="use mode 'given'"):
        fixed([img], [np.zeros((1, 4))])
    with pytest.raises(ValueError, match="2 box arrays for 1 images"):
        given([img], [np.zeros((1, 4)), np.zeros((1, 4))])


def test_seeded_and_shipped_weights_are_identical(given):
    cfg = DetectorConfig(**SMALL, mode="given")
    again = RegionExtractor.from_config(cfg)
    shipped = RegionExtractor.from_config(cfg.model_copy(update={"seed": 5}),
                                          state_dict_bytes=given.state_dict_bytes())
    img, b = data.chelsea(), [np.array([[10, 20, 200, 180]], np.float32)]
    ref = given([img], b)[0]["features"]
    np.testing.assert_array_equal(again([img], b)[0]["features"], ref)
    np.testing.assert_array_equal(shipped([img], b)[0]["features"], ref)
    assert shipped.info["weights"] == "shipped"
    other = RegionExtractor.from_config(cfg.model_copy(update={"seed": 5}))
    assert not np.array_equal(other([img], b)[0]["features"], ref)


def test_calibration_normalises_every_bn_input():
    """After calibration on a batch, each norm layer maps its inputs to mean 0, variance 1 per channel."""
    cfg = DetectorConfig(**SMALL, mode="given", calibrate_random=False)
    ext = RegionExtractor.from_config(cfg)
    scenes = synthetic_scenes(3, (128, 128), seed=3)
    blobs = [torch.from_numpy(ext.preprocess(s[0])[0]) for s in scenes]
    rois = [torch.from_numpy(s[1]) for s in scenes]
    n = calibrate_batchnorm(ext.model, blobs, rois)
    assert n == 17  # stem 1 + 4 stages × (shortcut + 3 convs)
    outs = {}
    layers = {"stem": ext.model.backbone.stem.conv1.norm, "res3": ext.model.backbone.res3[0].conv2.norm,
              "res5": ext.model.roi_heads.res5[0].conv3.norm}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o)) for k, m in layers.items()]
    with torch.inference_mode():
        ext.model.forward_features(blobs, rois)
    for h in hooks:
        h.remove()
    for k, o in outs.items():
        mean, var = o.mean(dim=(0, 2, 3)), o.var(dim=(0, 2, 3), unbiased=False)
        assert mean.abs().max() < 1e-3, k
        assert (var - 1).abs().max() < 2e-2, k


def shape_crops(n: int, seed: int, size: int = 128):
    """Images with two shapes each; label = colour × shape (4 × 3 = 12 classes)."""
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40)]
    rng = np.random.default_rng(seed)
    imgs, boxes, labels = [], [], []
    for _ in range(n):
        bg = rng.integers(90, 170, 3)
        im = Image.fromarray(np.clip(bg + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        bs = []
        for half in range(2):
            c, s = int(rng.integers(4)), int(rng.integers(3))
            bw, bh = int(rng.integers(size // 4, size // 2 - 4)), int(rng.integers(size // 4, size // 2))
            x1, y1 = int(rng.integers(0, size // 2 - bw)) + half * size // 2, int(rng.integers(0, size - bh))
            render_shape(d, ["rect", "ellipse", "triangle"][s], (x1, y1, x1 + bw, y1 + bh), colours[c])
            bs.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(3 * c + s)
        imgs.append(np.asarray(im))
        boxes.append(np.array(bs, np.float32))
    return imgs, boxes, np.array(labels)


def test_calibrated_random_features_carry_colour_and_shape():
    cfg = DetectorConfig(depth=14, min_size=128, max_size=256, pooler_resolution=7, mode="given",
                         calibration_images=8, device="cpu")
    ext = RegionExtractor.from_config(cfg)
    tr, te = shape_crops(24, seed=1), shape_crops(24, seed=2)
    ftr = np.concatenate([o["features"] for o in ext(tr[0], tr[1])]).astype(np.float32)
    fte = np.concatenate([o["features"] for o in ext(te[0], te[1])]).astype(np.float32)
    acc = nearest_centroid_accuracy(ftr, tr[2], fte, te[2])
    colour = nearest_centroid_accuracy(ftr, tr[2] // 3, fte, te[2] // 3)
    assert acc > 3 / 12  # chance is 1/12
    assert colour > 0.85  # chance is 1/4


def test_uncalibrated_deep_random_network_overflows_float16():
    """Why the demo calibrates: a random R101 with identity BN blows activations past float16."""
    cfg = DetectorConfig(depth=101, min_size=96, max_size=128, pooler_resolution=2, mode="given",
                         calibrate_random=False, device="cpu")
    ext = RegionExtractor.from_config(cfg)
    img = synthetic_scenes(1, (96, 96), seed=0)[0][0]
    with pytest.raises(FeatureOverflow, match="not finite in float16"):
        ext([img], [np.array([[10, 10, 80, 80]], np.float32)])


def test_spec_from_config_variants():
    assert spec_from_config(DetectorConfig(depth=152)).version == 2
    assert spec_from_config(DetectorConfig(depth=101)).version == 1
    s = spec_from_config(DetectorConfig(depth=50, variant="v2", anchor_style="caffe"))
    assert s.version == 2 and s.cell_anchors[0] == (-38.0, -16.0, 53.0, 31.0)


def test_tiny_and_extreme_aspect_images_do_not_crash(fixed, given):
    """A 1×900 image resizes to a 1-pixel-high blob: padded for the stem, and no box fits in it."""
    for shape in [(1, 1, 3), (1, 900, 3), (3, 3, 3)]:
        o = fixed([np.full(shape, 128, np.uint8)])[0]
        assert o["num_boxes"] == 0 and o["features"].shape == (0, 2048)  # nothing ≥ 16 original px fits
    o = fixed([np.full((20, 900, 3), 128, np.uint8)])[0]
    assert o["num_boxes"] == 36 and (o["boxes"][:, 3] <= 19 + 1e-3).all()
    o = given([np.full((2, 900, 3), 128, np.uint8)], [np.array([[0, 0, 100, 5.0]])])[0]
    assert o["num_boxes"] == 1 and o["boxes"].tolist() == [[0, 0, 100, 1]]
