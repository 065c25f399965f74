"""Checkpoint loading: synthetic state dicts with the real key names/shapes, containers, mismatch errors."""

from __future__ import annotations

import collections
import logging

import pytest
import torch
from test_features_butd import fact_sheet_table

from mask.features.butd import BUTDDetector, BUTDSpec, build_butd, caffe_cell_anchors
from mask.features.checkpoint import (
    ANCHOR_KEY,
    CheckpointError,
    CheckpointMismatch,
    load_butd_checkpoint,
    read_state_dict,
    state_dict_bytes,
)


def synthetic_checkpoint(depth: int, version: int, seed: int = 0, anchors: bool = True) -> dict[str, torch.Tensor]:
    """A state dict as the published files hold it: fact-sheet keys/shapes, no num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, shape in fact_sheet_table(depth, version).items():
        if k == ANCHOR_KEY:
            if anchors:
                sd[k] = caffe_cell_anchors([4, 8, 16, 32], [0.5, 1, 2])
            continue
        v = torch.randn(shape, generator=g) * 0.01
        if k.endswith("running_var"):
            v = v.abs() + 0.5
        sd[k] = v
    return sd


def test_r101_checkpoint_loads_by_name():
    sd = synthetic_checkpoint(101, 1)
    model = BUTDDetector(BUTDSpec(depth=101))
    report = load_butd_checkpoint(model, {"model": sd}, name="bua-caffe-frcn-r101-k36.pth")
    assert report["anchors"] == "checkpoint" and report["tensors"] == len(sd)
    own = model.state_dict()
    for k in ("backbone.res4.22.conv3.weight", "roi_heads.box_predictor.attr_linear1.weight",
              "backbone.stem.conv1.norm.running_var", ANCHOR_KEY):
        assert torch.equal(own[k], sd[k])


def test_tiny_roundtrip_through_pth_file(tmp_path):
    sd = synthetic_checkpoint(14, 1, seed=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "iteration": 5}, path)
    model = BUTDDetector(BUTDSpec(depth=14))
    load_butd_checkpoint(model, path)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())


def test_v2_checkpoint_loads():
    sd = synthetic_checkpoint(14, 2)
    model = BUTDDetector(BUTDSpec(depth=14, version=2))
    load_butd_checkpoint(model, sd)
    assert torch.equal(model.state_dict()["roi_heads.res5_bn.running_var"], sd["roi_heads.res5_bn.running_var"])


def test_safetensors_roundtrip_gives_identical_outputs(tmp_path):
    a = build_butd(BUTDSpec(depth=14, pooler_resolution=3), seed=1)
    with torch.no_grad():  # make BN statistics non-trivial
        for m in a.modules():
            if hasattr(m, "running_var"):
                m.running_var.uniform_(0.5, 2.0)
    blob = state_dict_bytes(a)
    b = build_butd(BUTDSpec(depth=14, pooler_resolution=3), seed=99)
    load_butd_checkpoint(b, blob)
    path = tmp_path / "det.safetensors"
    path.write_bytes(blob)
    c = build_butd(BUTDSpec(depth=14, pooler_resolution=3), seed=5)
    load_butd_checkpoint(c, path)
    im, box = torch.randn(3, 48, 48) * 40, torch.tensor([[2.0, 2, 40, 30]])
    with torch.inference_mode():
        fa, fb, fc = (m.forward_features([im], [box])[0]["features"] for m in (a, b, c))
    assert torch.equal(fa, fb) and torch.equal(fa, fc)


def test_missing_anchors_keep_config_and_log(caplog):
    sd = synthetic_checkpoint(14, 1, anchors=False)
    model = BUTDDetector(BUTDSpec(depth=14))
    before = model.proposal_generator.anchor_generator.cell_anchors[0].clone()
    with caplog.at_level(logging.INFO, logger="mask.features.checkpoint"):
        report = load_butd_checkpoint(model, sd, name="old.pth")
    assert report["anchors"] == "config"
    assert torch.equal(model.proposal_generator.anchor_generator.cell_anchors[0], before)
    assert "keeping the config's cell anchors" in caplog.text


def test_num_batches_tracked_and_module_prefix_are_ignored():
    sd = synthetic_checkpoint(14, 1)
    sd["backbone.res4.0.conv1.norm.num_batches_tracked"] = torch.tensor(7)
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    load_butd_checkpoint(BUTDDetector(BUTDSpec(depth=14)), wrapped)


def test_mismatch_lists_missing_unexpected_and_shapes():
    sd = synthetic_checkpoint(14, 1)
    del sd["backbone.res2.0.conv1.weight"]
    sd["roi_heads.box_predictor.extra.weight"] = torch.zeros(3)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 2048)
    with pytest.raises(CheckpointMismatch) as e:
        load_butd_checkpoint(BUTDDetector(BUTDSpec(depth=14)), sd, name="coco-model.pth")
    msg = str(e.value)
    assert "coco-model.pth" in msg
    assert "1 missing key(s): backbone.res2.0.conv1.weight" in msg
    assert "1 unexpected key(s): roi_heads.box_predictor.extra.weight" in msg
    assert "roi_heads.box_predictor.cls_score.weight checkpoint [81, 2048] vs network [1601, 2048]" in msg
    assert e.value.missing == ["backbone.res2.0.conv1.weight"]


def test_wrong_depth_is_reported_with_counts_and_truncated_lists():
    sd = synthetic_checkpoint(14, 1)
    with pytest.raises(CheckpointMismatch) as e:
        load_butd_checkpoint(BUTDDetector(BUTDSpec(depth=26)), sd, name="r14.pth", max_list=3)
    assert len(e.value.missing) > 3 and "…" in str(e.value)
    assert f"{len(e.value.missing)} missing key(s)" in str(e.value)


def test_frozen_bn_eps_corrected_for_old_versions():
    sd = collections.OrderedDict(synthetic_checkpoint(14, 1))
    sd._metadata = {"backbone.stem.conv1.norm": {"version": 2}, "backbone.res3.0.conv1.norm": {"version": 3},
                    "backbone.res4.0.conv1.norm": {"version": 2}}
    model = BUTDDetector(BUTDSpec(depth=14))
    report = load_butd_checkpoint(model, sd)
    own = model.state_dict()
    k = "backbone.stem.conv1.norm.running_var"
    torch.testing.assert_close(own[k], sd[k] - 1e-5)
    assert torch.equal(own["backbone.res3.0.conv1.norm.running_var"], sd["backbone.res3.0.conv1.norm.running_var"])
    # res4 is a plain BN (not frozen): no correction
    assert torch.equal(own["backbone.res4.0.conv1.norm.running_var"], sd["backbone.res4.0.conv1.norm.running_var"])
    assert report["frozen_bn_eps_corrected"] == 1


def test_metadata_survives_torch_save(tmp_path):
    model = BUTDDetector(BUTDSpec(depth=14))
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    _, meta, _ = read_state_dict(path)
    assert meta is not None and "backbone.stem.conv1.norm" in meta


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_butd_checkpoint(BUTDDetector(BUTDSpec(depth=14)), tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(junk)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="pickles"):
        read_state_dict(pkl)
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict({"a.weight": "string"})
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_state_dict(_torch_bytes([1, 2, 3]))


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "evil": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
