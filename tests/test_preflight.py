"""mask/preflight.py: the checks every job runs before Ray starts (no Ray here)."""

from __future__ import annotations

import pytest


def test_storage_root_under_a_file_is_named(tmp_path):
    from mask.preflight import storage_problems

    f = tmp_path / "file"
    f.write_text("x")
    (msg,) = storage_problems(str(f / "root"))
    assert msg.startswith(f"storage.root {f / 'root'}: cannot create the folder") and "storage.root" in msg
    (msg,) = storage_problems(str(f))
    assert "cannot create the folder" in msg or "is not a folder" in msg
    assert storage_problems(str(tmp_path / "new" / "root")) == []  # created
    assert (tmp_path / "new" / "root").is_dir() and not list((tmp_path / "new" / "root").iterdir())
    assert storage_problems("s3://bucket/prefix") == []  # checked by its first write


def test_every_missing_input_is_listed_at_once(tmp_path):
    from mask.config import load_config
    from mask.preflight import PreflightError, check_inputs

    cfg = load_config(None, [f"storage.root={tmp_path / 'r'}", "dataset.kind=karpathy", "dataset.name=k",
                             f"dataset.path={tmp_path / 'k.json'}", f"dataset.image_root={tmp_path / 'imgs'}",
                             "gallery.kind=folder", "gallery.name=photos", f"gallery.path={tmp_path}"])
    with pytest.raises(PreflightError) as e:
        check_inputs(cfg, ["dataset", "gallery"], gallery_captions=True)
    msg = str(e.value)
    assert f"dataset.path {tmp_path / 'k.json'}: no such file or folder" in msg
    assert f"dataset.image_root {tmp_path / 'imgs'}: no such file or folder" in msg
    assert "gallery photos: a folder gallery has no captions" in msg
    check_inputs(cfg.model_copy(update={"dataset": cfg.gallery}), ["gallery"])  # extraction needs no captions


def test_no_path_and_no_gallery(tmp_path):
    from mask.config import load_config
    from mask.preflight import PreflightError, check_inputs

    cfg = load_config(None, [f"storage.root={tmp_path}", "dataset.kind=vg", "dataset.name=vg"])
    with pytest.raises(PreflightError, match="dataset.path is not set; dataset.kind=vg reads its data from there"):
        check_inputs(cfg)
    with pytest.raises(PreflightError, match="the config names no gallery"):
        check_inputs(load_config(None, [f"storage.root={tmp_path}"]), ["gallery"])
    check_inputs(load_config("demo", [f"storage.root={tmp_path}"]), ["dataset", "gallery"], gallery_captions=True)
