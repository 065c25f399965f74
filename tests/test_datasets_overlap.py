"""Leakage guard: VG images that are gallery images (coco_id / flickr_id) are left out of knowledge building."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_datasets_vg import _img, _vg  # noqa: E402 - the format-exact VG fixture

from mask.config import load_config  # noqa: E402
from mask.datasets.overlap import gallery_source_ids  # noqa: E402


def _karpathy(tmp_path: Path, name: str, entries: list[dict]) -> Path:
    """A Karpathy split file in the real layout (dataset_flickr30k.json / dataset_coco.json)."""
    folder = tmp_path / name
    folder.mkdir()
    images = []
    for i, e in enumerate(entries):
        rec = {"filename": e["filename"], "imgid": i, "split": e["split"], "sentids": [5 * i + j for j in range(5)],
               "sentences": [{"raw": f"a dog number {j}.", "tokens": ["a", "dog"], "imgid": i, "sentid": 5 * i + j}
                             for j in range(5)]}
        if "cocoid" in e:
            rec.update(filepath="val2014", cocoid=e["cocoid"])
        images.append(rec)
        _img(folder / rec.get("filepath", "") / e["filename"], 32, 32)
    path = folder / f"dataset_{name}.json"
    path.write_text(json.dumps({"images": images, "dataset": name}))
    return path


def test_gallery_ids_from_flickr_and_coco_split_files(tmp_path):
    flickr = _karpathy(tmp_path, "flickr30k", [{"filename": "555.jpg", "split": "test"},
                                               {"filename": "556.jpg", "split": "train"},
                                               {"filename": "notanid.jpg", "split": "test"}])
    coco = _karpathy(tmp_path, "coco", [{"filename": "COCO_val2014_000000000777.jpg", "cocoid": 777, "split": "test"},
                                        {"filename": "COCO_val2014_000000000778.jpg", "cocoid": 778, "split": "val"}])
    g = load_config("demo", ["gallery.kind=karpathy", f"gallery.path={flickr}", "gallery.splits=[test]"]).gallery
    assert gallery_source_ids(g) == (set(), {555})
    g = load_config("demo", ["gallery.kind=karpathy", f"gallery.path={coco}", "gallery.splits=[test]"]).gallery
    assert gallery_source_ids(g) == ({777}, set())
    g = load_config("demo", ["gallery.kind=karpathy", f"gallery.path={coco}", "gallery.splits=null"]).gallery
    assert gallery_source_ids(g) == ({777, 778}, set())


@pytest.mark.parametrize("gallery,excluded,kept", [("flickr30k", "1", {"2", "3"}), ("coco", "2", {"1", "3"})])
def test_knowledge_dataset_leaves_out_gallery_images(tmp_path, gallery, excluded, kept):
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import ensure_dataset

    vg = _vg(tmp_path)  # VG image 1 is Flickr 555, VG image 2 is COCO 777
    entry = {"filename": "555.jpg", "split": "test"} if gallery == "flickr30k" else \
        {"filename": "COCO_val2014_000000000777.jpg", "cocoid": 777, "split": "test"}
    split_file = _karpathy(tmp_path, gallery, [entry])
    over = [f"storage.root={tmp_path / 'store'}", "tracking.enabled=false", "dataset.name=vg", "dataset.kind=vg",
            f"dataset.path={vg}", f"dataset.image_root={vg}", "dataset.splits=null", f"gallery.name={gallery}_test", "gallery.kind=karpathy",
            f"gallery.path={split_file}", "gallery.splits=[test]"]
    cfg = load_config(gallery, over)  # the shipped config sets the guard
    assert cfg.dataset.exclude_gallery_overlap is True
    ctx = JobContext.from_config(cfg)
    out = ensure_dataset(ctx, cfg.dataset, None)
    ids = set(out["images"].column("image_id").to_pylist())
    assert excluded not in ids and ids == kept
    assert out["summary"]["overlap"]["excluded_overlap"] == 1
    # without the guard the image is kept (a separate artifact identity: nothing stale is reused)
    cfg2 = load_config(gallery, [*over, "dataset.exclude_gallery_overlap=false"])
    out2 = ensure_dataset(JobContext.from_config(cfg2), cfg2.dataset, None)
    assert excluded in set(out2["images"].column("image_id").to_pylist()) and "overlap" not in out2["summary"]


def test_demo_reports_zero_overlap(tmp_path):
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import ensure_dataset

    cfg = load_config("demo", [f"storage.root={tmp_path}", "tracking.enabled=false", "dataset.limit=3"])
    assert cfg.dataset.exclude_gallery_overlap is True
    out = ensure_dataset(JobContext.from_config(cfg), cfg.dataset, None)
    assert out["summary"]["overlap"]["excluded_overlap"] == 0
