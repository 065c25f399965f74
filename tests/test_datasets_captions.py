"""Karpathy split files (Flickr30K / COCO) and COCO's official captions JSON, in their exact formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mask.datasets import DatasetError, read_coco_captions, read_karpathy


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8jpeg")


def _sent(raw, imgid, sentid):
    return {"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def _flickr(tmp_path: Path, n_test=3, n_train=2) -> Path:
    """A dataset_flickr30k.json: no filepath, ids from file names, split per image."""
    images = []
    sentid = 0
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        fn = f"{1000 + i}.jpg"
        sents = [_sent(f"A dog number {i} sentence {k}.", i, sentid + k) for k in range(5)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents,
                       "split": split, "filename": fn})
        sentid += 5
        _touch(tmp_path / "flickr30k-images" / fn)
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def test_flickr_test_split_order_and_ids(tmp_path):
    path = _flickr(tmp_path)
    ds = read_karpathy(str(path), str(tmp_path / "flickr30k-images"), splits=["test"])
    assert ds.name == "flickr30k"
    assert ds.images.column("image_id").to_pylist() == ["1002", "1003", "1004"]
    assert ds.images.column("uri").to_pylist()[0] == str(tmp_path / "flickr30k-images" / "1002.jpg")
    assert ds.images.column("split").to_pylist() == ["test"] * 3
    caps = ds.captions.to_pylist()
    assert len(caps) == 15
    # image i owns captions 5i … 5i+4, in file order
    assert [c["image_id"] for c in caps] == [i for i in ("1002", "1003", "1004") for _ in range(5)]
    assert caps[0] == {"caption_id": "10", "image_id": "1002", "text": "A dog number 2 sentence 0.", "split": "test"}
    assert ds.stats == {"images_not_selected": 2}
    assert read_karpathy(str(path), str(tmp_path / "flickr30k-images")).images.num_rows == 5
    assert read_karpathy(str(path), str(tmp_path / "flickr30k-images"), splits=["test"], limit=2).images.num_rows == 2


def test_standard_1k_test_split_size(tmp_path):
    """Flickr30K's Karpathy file has 1,000 test images × 5 captions; the reader keeps exactly those."""
    path = _flickr(tmp_path, n_test=1000, n_train=30)
    ds = read_karpathy(str(path), str(tmp_path / "flickr30k-images"), splits=["test"])
    assert ds.images.num_rows == 1000 and ds.captions.num_rows == 5000
    assert ds.captions.column("image_id").to_pylist()[4995:] == ["2029"] * 5


def test_coco_karpathy_filepath_cocoid_and_caption_rules(tmp_path):
    images = [
        {"filepath": "val2014", "sentids": [1, 2, 3, 4, 5, 6, 7], "filename": "COCO_val2014_000000391895.jpg",
         "imgid": 0, "split": "test", "cocoid": 391895,
         "sentences": [_sent(f"Caption {k}", 0, k + 1) for k in range(7)]},          # 7 → first 5 kept
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "imgid": 1, "split": "restval",
         "cocoid": 522418, "sentids": [8, 9, 10],
         "sentences": [{"tokens": ["a", "woman"], "imgid": 1, "sentid": 8},            # no raw → tokens
                       {"raw": "   ", "tokens": [], "imgid": 1, "sentid": 9},          # empty → error
                       _sent("A woman  cutting\ncake.", 1, 10)]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "imgid": 2, "split": "test",
         "cocoid": 522418, "sentences": []},                                          # duplicate cocoid
        {"filepath": "val2014", "imgid": 3, "split": "test", "sentences": []},        # no filename
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "imgid": 4, "split": "test",
         "cocoid": 1, "sentences": []},                                               # file missing
        17,                                                                           # not an object
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    for rec in images[:2]:
        _touch(tmp_path / "coco" / rec["filepath"] / rec["filename"])
    ds = read_karpathy(str(path), str(tmp_path / "coco"))
    assert ds.name == "coco"
    assert ds.images.column("image_id").to_pylist() == ["391895", "522418"]
    assert ds.images.column("uri").to_pylist()[0] == str(tmp_path / "coco/val2014/COCO_val2014_000000391895.jpg")
    caps = ds.captions.to_pylist()
    assert [c["caption_id"] for c in caps] == ["1", "2", "3", "4", "5", "8", "10"]
    assert caps[5]["text"] == "a woman" and caps[6]["text"] == "A woman cutting cake."
    errors = sorted((e["position"], e["error"]) for e in ds.errors.rows)
    assert errors == [("images[1].sentences[1]", "empty_caption"), ("images[2]", "duplicate_image_id"),
                      ("images[3]", "missing_field"), ("images[4]", "image_not_found"),
                      ("images[5]", "not_an_object")]
    assert ds.stats["captions_beyond_max"] == 2
    assert ds.stats["images_with_fewer_captions"] == 1
    all_caps = read_karpathy(str(path), str(tmp_path / "coco"), max_captions_per_image=None).captions
    assert all_caps.num_rows == 9


def test_karpathy_malformed_json(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text('{"images": [\n  {"filename": "1.jpg", "split": "test"},\n  {"filename": "2.jpg" "split": 1}]}')
    with pytest.raises(DatasetError, match=r"dataset_flickr30k.json: malformed JSON at byte 78 \(line 3, column 24\)"):
        read_karpathy(str(path), check_files=False)
    path.write_text('[{"filename": "1.jpg"}]')
    with pytest.raises(DatasetError, match="expected a JSON object"):
        read_karpathy(str(path))


def _coco_official(tmp_path: Path) -> Path:
    data = {
        "info": {"description": "COCO 2014 Dataset"}, "licenses": [],
        "images": [
            {"license": 3, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640, "id": 391895},
            {"license": 4, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640, "id": 522418},
            {"license": 4, "file_name": "COCO_val2014_000000184613.jpg", "height": 336, "width": 500, "id": 184613},
            {"license": 4, "height": 1, "width": 1, "id": 5},                               # no file_name
        ],
        "annotations": [
            {"image_id": 522418, "id": 10, "caption": "A woman wearing a net on her head cutting a cake. "},
            {"image_id": 391895, "id": 11, "caption": "A man with a red helmet on a small moped."},
            {"image_id": 391895, "id": 12, "caption": "Man riding a motor bike on a dirt road."},
            {"image_id": 999, "id": 13, "caption": "An orphan caption."},                    # unknown image
            {"image_id": 391895, "id": 14, "caption": ""},                                   # empty
        ] + [{"image_id": 184613, "id": 20 + k, "caption": f"cattle {k}"} for k in range(7)],
    }
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    path = tmp_path / "coco" / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps(data))
    for im in data["images"][:3]:
        _touch(tmp_path / "coco" / "val2014" / im["file_name"])
    return path


def test_coco_official_captions(tmp_path):
    path = _coco_official(tmp_path)
    ds = read_coco_captions(str(path))   # image root guessed: coco/val2014 next to annotations/
    assert ds.name == "coco_val2014"
    im = ds.images.to_pylist()
    assert [r["image_id"] for r in im] == ["391895", "522418", "184613"]
    assert im[0] == {"image_id": "391895", "uri": str(tmp_path / "coco/val2014/COCO_val2014_000000391895.jpg"),
                     "split": "val2014", "width": 640, "height": 360}
    caps = ds.captions.to_pylist()
    assert [(c["image_id"], c["caption_id"]) for c in caps] == \
        [("391895", "11"), ("391895", "12"), ("522418", "10")] + [("184613", str(20 + k)) for k in range(5)]
    assert caps[2]["text"] == "A woman wearing a net on her head cutting a cake."
    assert sorted((e["position"], e["error"]) for e in ds.errors.rows) == \
        [("annotations[3]", "unknown_image"), ("annotations[4]", "empty_caption"), ("images[3]", "missing_field")]
    assert ds.stats["captions_beyond_max"] == 2 and ds.stats["images_with_fewer_captions"] == 2
    assert read_coco_captions(str(path), splits=["train2014"]).images.num_rows == 0
    one = read_coco_captions(str(path), str(tmp_path / "coco" / "val2014"), split="test", limit=1)
    assert one.images.column("split").to_pylist() == ["test"] and one.captions.num_rows == 2


def test_coco_official_malformed(tmp_path):
    path = _coco_official(tmp_path)
    text = path.read_text()
    path.write_text(text.replace('"id": 12,', '"id": 12 "x",'))
    with pytest.raises(DatasetError, match=r"captions_val2014.json: malformed JSON at byte \d+ \(line 1, column \d+\)"):
        read_coco_captions(str(path))
