"""User galleries: an image folder (local and S3), a URI list (text / CSV), caption files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mask.datasets import DatasetError, read_image_folder, read_uri_list


def _img(path: Path, size=(8, 6), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path, format=fmt)


def _gallery(tmp_path: Path) -> Path:
    g = tmp_path / "gallery"
    _img(g / "b.jpg", (8, 6))
    _img(g / "a.PNG", (5, 7), fmt="PNG")
    _img(g / "beach" / "dog.jpeg", (4, 4))
    _img(g / "beach" / "dog.png", (4, 4))            # same id as dog.jpeg → duplicate, first kept
    _img(g / ".hidden" / "x.jpg")
    _img(g / ".y.jpg")
    (g / "notes.txt").write_text("not an image")
    (g / "broken.jpg").write_bytes(b"not a jpeg")
    return g


def test_folder_listing_ids_and_duplicates(tmp_path):
    g = _gallery(tmp_path)
    ds = read_image_folder(str(g))
    assert ds.name == "gallery"
    assert ds.images.column("image_id").to_pylist() == ["a", "b", "beach/dog", "broken"]
    assert ds.images.column("uri").to_pylist()[:3] == [str(g / "a.PNG"), str(g / "b.jpg"), str(g / "beach/dog.jpeg")]
    assert set(ds.images.column("split").to_pylist()) == {"gallery"}
    assert ds.images.column("width").to_pylist() == [None] * 4
    assert [(e["position"], e["error"]) for e in ds.errors.rows] == [("beach/dog.png", "duplicate_image_id")]
    assert read_image_folder(str(g), recursive=False).images.column("image_id").to_pylist() == ["a", "b", "broken"]
    assert read_image_folder(str(g), limit=2).images.num_rows == 2
    assert ds.inputs["folder"] == read_image_folder(str(g)).inputs["folder"]


def test_folder_probe_sizes_drops_unreadable(tmp_path):
    ds = read_image_folder(str(_gallery(tmp_path)), probe_sizes=True)
    rows = {r["image_id"]: (r["width"], r["height"]) for r in ds.images.to_pylist()}
    assert rows == {"a": (5, 7), "b": (8, 6), "beach/dog": (4, 4)}
    assert sorted(e["error"] for e in ds.errors.rows) == ["duplicate_image_id", "unreadable_image"]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        read_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        read_image_folder(str(tmp_path / "empty"))


def test_folder_captions_text_and_csv(tmp_path):
    g = _gallery(tmp_path)
    txt = tmp_path / "queries.txt"
    txt.write_text("a dog on the beach\n\n  two   cats \n")
    ds = read_image_folder(str(g), captions=str(txt))
    assert ds.captions.to_pylist() == [
        {"caption_id": "1", "image_id": None, "text": "a dog on the beach", "split": "gallery"},
        {"caption_id": "3", "image_id": None, "text": "two cats", "split": "gallery"}]
    csv = tmp_path / "caps.csv"
    csv.write_text('image_id,text\nbeach/dog,"a dog, wet"\nzebra,unknown image\nb,\na,a picture\n')
    ds = read_image_folder(str(g), captions=str(csv))
    assert [(c["caption_id"], c["image_id"], c["text"]) for c in ds.captions.to_pylist()] == \
        [("0", "beach/dog", "a dog, wet"), ("3", "a", "a picture")]
    assert sorted((e["position"], e["error"]) for e in ds.errors.rows if e["source"] == str(csv)) == \
        [("line 3", "unknown_image"), ("line 4", "empty_caption")]
    assert "caps.csv" in ds.inputs
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\na,b\n")
    with pytest.raises(DatasetError, match="no 'text' column"):
        read_image_folder(str(g), captions=str(bad))


def test_uri_list_text(tmp_path):
    _img(tmp_path / "imgs" / "one.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("# my gallery\nimgs/one.jpg\n\ns3://bucket/photos/two.jpg\nhttps://example.org/x/three.png\n"
                   "imgs/one.jpg\n")
    ds = read_uri_list(str(lst))
    assert ds.name == "list"
    assert ds.images.column("uri").to_pylist() == [str(tmp_path / "imgs/one.jpg"), "s3://bucket/photos/two.jpg",
                                                   "https://example.org/x/three.png"]
    assert ds.images.column("image_id").to_pylist() == ["one", "two", "three"]
    assert [(e["position"], e["error"]) for e in ds.errors.rows] == [("line 6", "duplicate_image_id")]


def test_uri_list_csv(tmp_path):
    lst = tmp_path / "gallery.csv"
    lst.write_text("uri,image_id,split\n/data/a.jpg,img-a,test\n/data/b.jpg,,\n,c,test\n")
    ds = read_uri_list(str(lst), split="val")
    assert ds.images.to_pylist() == [
        {"image_id": "img-a", "uri": "/data/a.jpg", "split": "test", "width": None, "height": None},
        {"image_id": "b", "uri": "/data/b.jpg", "split": "val", "width": None, "height": None}]
    assert [(e["position"], e["error"]) for e in ds.errors.rows] == [("line 4", "missing_field")]
    lst.write_text("path,id\n/a.jpg,a\n")
    with pytest.raises(DatasetError, match="no 'uri' column"):
        read_uri_list(str(lst))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match="lists no image"):
        read_uri_list(str(tmp_path / "empty.txt"))
    with pytest.raises(DatasetError, match="file not found"):
        read_uri_list(str(tmp_path / "nope.txt"))


def test_s3_folder(s3_bucket):
    import io

    import fsspec

    fs = fsspec.filesystem("s3")
    for key in ("g/x.jpg", "g/sub/y.png", "g/readme.md"):
        buf = io.BytesIO()
        Image.new("RGB", (3, 2)).save(buf, format="PNG")
        fs.pipe(f"{s3_bucket[5:]}/{key}", buf.getvalue())
    ds = read_image_folder(f"{s3_bucket}/g", probe_sizes=True)
    assert ds.images.column("image_id").to_pylist() == ["sub/y", "x"]
    assert ds.images.column("uri").to_pylist() == [f"{s3_bucket}/g/sub/y.png", f"{s3_bucket}/g/x.jpg"]
    assert ds.images.column("width").to_pylist() == [3, 3]
