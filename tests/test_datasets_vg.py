"""Visual Genome reader on small files in the exact VG formats (image_data / objects / attributes.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from mask.datasets import DatasetError, read_vg
from mask.datasets import records as records_mod
from mask.datasets.records import REGIONS_SCHEMA


def _img(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (100, 120, 140)).save(path)


def _vg(tmp_path: Path, image_data=None, objects=None, attributes=None) -> Path:
    """A tiny VG folder: VG_100K/ and VG_100K_2/ image folders, JSON in the real layout."""
    root = tmp_path / "vg"
    root.mkdir()
    if image_data is None:
        image_data = [
            {"width": 100, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "height": 80,
             "image_id": 1, "coco_id": None, "flickr_id": 555},
            {"width": 50, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "height": 50,
             "id": 2, "coco_id": 777, "flickr_id": None},          # older files say "id"
            {"width": 60, "url": "https://cs.stanford.edu/people/rak248/VG_100K/3.jpg", "height": 40,
             "image_id": 3, "coco_id": None, "flickr_id": None},   # no objects at all
            {"width": 60, "url": "https://cs.stanford.edu/people/rak248/VG_100K/3.jpg", "height": 40,
             "image_id": 3, "coco_id": None, "flickr_id": None},   # duplicate id: first kept
        ]
    if objects is None:
        objects = [
            {"image_id": 1, "objects": [
                {"object_id": 10, "x": 10, "y": 5, "w": 20, "h": 30, "names": ["Hot Dog"], "synsets": ["hotdog.n.02"],
                 "merged_object_ids": [99]},
                {"object_id": 11, "x": 90, "y": 70, "w": 30, "h": 30, "name": "T-shirt"},    # clipped to 100x80
                {"object_id": 12, "x": 5, "y": 5, "w": 0, "h": 10, "names": ["cup"]},        # degenerate
                {"object_id": 13, "x": 200, "y": 5, "w": 10, "h": 10, "names": ["cup"]},     # outside
                {"object_id": 14, "y": 5, "w": 10, "h": 10, "names": ["cup"]},               # no x
                {"object_id": 15, "x": 1, "y": 1, "w": 10, "h": 10, "names": []},            # no name
                {"object_id": 16, "x": 1, "y": 1, "w": 10, "h": 10, "names": ["!!"]},        # no word
                {"object_id": 17, "x": -4, "y": 2.5, "w": 14, "h": 10, "names": ["man's hat"]},
            ]},
            {"image_id": 42, "objects": [{"object_id": 1, "x": 0, "y": 0, "w": 5, "h": 5, "names": ["x"]}]},
            {"image_id": 2, "objects": [{"object_id": 20, "x": 0, "y": 0, "w": 50, "h": 50, "names": ["sky"]}]},
            {"image_id": 3, "objects": []},
        ]
    if attributes is None:
        attributes = [  # out of order on purpose: image 2 comes first
            {"image_id": 2, "attributes": [{"object_id": 20, "x": 0, "y": 0, "w": 50, "h": 50,
                                            "names": ["sky"], "attributes": ["Blue", " cloudy "]}]},
            {"image_id": 1, "attributes": [
                {"object_id": 10, "names": ["hot dog"], "attributes": ["grilled"]},
                {"object_id": 99, "names": ["hot dog"], "attributes": ["long", "grilled"]},   # merged into 10
                {"object_id": 11, "names": ["t-shirt"]},                                        # no attributes key
                {"object_id": 17, "names": ["hat"], "attributes": ["red-and-white"]},
            ]},
        ]
    for name, data in (("image_data.json", image_data), ("objects.json", objects),
                       ("attributes.json", attributes)):
        if data is not False:
            (root / name).write_text(json.dumps(data, indent=1))
    _img(root / "VG_100K" / "1.jpg", 100, 80)
    _img(root / "VG_100K_2" / "2.jpg", 50, 50)
    _img(root / "VG_100K" / "3.jpg", 60, 40)
    return root


def _regions(ds) -> pa.Table:
    parts = list(ds.regions)
    return pa.concat_tables(parts) if parts else REGIONS_SCHEMA.empty_table()


def test_images_regions_words_and_counted_rules(tmp_path):
    root = _vg(tmp_path)
    ds = read_vg(str(root))
    assert ds.images.column("image_id").to_pylist() == ["1", "2", "3"]
    assert ds.images.column("uri").to_pylist() == [str(root / "VG_100K/1.jpg"), str(root / "VG_100K_2/2.jpg"),
                                                   str(root / "VG_100K/3.jpg")]
    assert ds.images.column("split").to_pylist() == ["train"] * 3
    assert ds.images.column("width").to_pylist() == [100, 50, 60]
    reg = _regions(ds)
    got = {r["region_id"]: r for r in reg.to_pylist()}
    assert list(got) == ["10", "11", "17", "20"]
    assert got["10"]["words"] == ["hot", "dog", "grilled", "long"]       # merged attributes joined
    assert got["10"]["names"] == ["Hot Dog"] and got["10"]["attributes"] == ["grilled", "long"]
    assert got["10"]["box"] == [10, 5, 30, 35]                            # xywh → xyxy
    assert got["11"]["words"] == ["t", "shirt"] and got["11"]["attributes"] == []
    assert got["11"]["box"] == [90, 70, 100, 80]                          # clipped to the image
    assert got["17"]["words"] == ["man", "s", "hat", "red", "and", "white"]
    assert got["17"]["box"] == [0, 2.5, 10, 12.5]                         # clipped at 0
    assert got["20"]["words"] == ["sky", "blue", "cloudy"] and got["20"]["image_id"] == "2"
    errs = ds.errors.to_table().to_pylist()
    kinds = sorted(e["error"] for e in errs)
    assert kinds == sorted(["duplicate_image_id", "degenerate_box", "box_outside_image", "bad_box",
                            "missing_name", "no_words", "unknown_image"])
    by_kind = {e["error"]: e for e in errs}
    assert by_kind["bad_box"]["position"] == "item 0.objects[4]"
    assert by_kind["bad_box"]["source"].endswith("objects.json")
    assert by_kind["duplicate_image_id"]["source"].endswith("image_data.json")
    assert "42" in by_kind["unknown_image"]["message"]
    assert ds.stats["boxes_clipped"] == 2
    assert ds.stats["images_without_regions"] == 1                        # image 3 kept, zero regions
    assert ds.stats["regions"] == 4
    # every object of a known image ends in regions or errors
    n_objects_known = 8 + 1
    assert reg.num_rows + sum(1 for e in errs if e["source"].endswith("objects.json")
                              and e["error"] != "unknown_image") == n_objects_known


def test_regions_table_schema_and_batches(tmp_path):
    ds = read_vg(str(_vg(tmp_path)), batch_images=1)
    parts = list(ds.regions)
    # one batch per image entry that was read (1, 2, 3); image 3 has no regions → empty part
    assert [p.num_rows for p in parts] == [3, 1, 0]
    assert all(p.schema.equals(REGIONS_SCHEMA) for p in parts)


def test_limit_stops_streaming_before_the_rest(tmp_path):
    root = _vg(tmp_path)
    # a broken tail after the first image: with limit=1 the reader must stop before reaching it
    text = (root / "objects.json").read_text()
    first = json.dumps(json.loads(text)[0])
    (root / "objects.json").write_text("[" + first + ",\n" + '{"image_id": 2, "objects": [ BROKEN' + " " * 10)
    ds = read_vg(str(root), limit=1)
    reg = _regions(ds)
    assert ds.images.num_rows == 1 and reg.num_rows == 3
    with pytest.raises(DatasetError, match="objects.json"):
        list(read_vg(str(root)).regions)


def test_splits_exclusions_and_missing_files(tmp_path):
    root = _vg(tmp_path)
    assert read_vg(str(root), splits=["test"]).images.num_rows == 0
    ds = read_vg(str(root), exclude_coco_ids=[777], exclude_flickr_ids=[555])
    assert ds.images.column("image_id").to_pylist() == ["3"]
    assert ds.stats["excluded_overlap"] == 2
    (root / "VG_100K" / "3.jpg").unlink()
    ds = read_vg(str(root))
    assert ds.images.column("image_id").to_pylist() == ["1", "2"]
    assert [e["error"] for e in ds.errors.rows].count("image_not_found") == 1
    # unchecked (e.g. remote) roots keep the URI as the VG folder layout says
    ds = read_vg(str(root), image_root="s3://bucket/vg", check_files=False)
    assert ds.images.column("uri").to_pylist()[:2] == ["s3://bucket/vg/VG_100K/1.jpg", "s3://bucket/vg/VG_100K_2/2.jpg"]


def test_without_attributes_file(tmp_path):
    root = _vg(tmp_path, attributes=False)
    reg = _regions(read_vg(str(root)))
    assert reg.column("attributes").to_pylist() == [[], [], [], []]
    assert reg.column("words").to_pylist()[0] == ["hot", "dog"]


def test_missing_required_file(tmp_path):
    root = _vg(tmp_path, objects=False)
    with pytest.raises(DatasetError, match="objects.json: file not found"):
        read_vg(str(root))


def test_top_level_must_be_an_array(tmp_path):
    root = _vg(tmp_path)
    (root / "image_data.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"image_data.json: expected a JSON array"):
        read_vg(str(root))


def test_malformed_json_names_file_line_and_column(tmp_path):
    root = _vg(tmp_path)
    text = '[\n {"image_id": 1, "width": 100, "height": 80},\n {"image_id": 2, "width": 50,, "height": 5}\n]'
    (root / "image_data.json").write_text(text)
    with pytest.raises(DatasetError) as e:
        read_vg(str(root))
    msg = str(e.value)
    assert "image_data.json" in msg
    pos = text.index(",,") + 1
    col = pos - text.rindex("\n", 0, pos)
    assert f"at byte {pos} (line 3, column {col})" in msg
    assert "after 1 complete records" in msg


def test_malformed_json_position_in_a_large_file(tmp_path, monkeypatch):
    """Files too large for the exact json re-parse are located from ijson's context in the read chunks."""
    monkeypatch.setattr(records_mod, "_EXACT_LOCATE_MAX_BYTES", 0)
    root = _vg(tmp_path)
    entries = [json.dumps({"image_id": i + 1, "objects": [{"object_id": i, "x": 1, "y": 1, "w": 2, "h": 2,
                                                             "names": [f"thing{i}"]}]}) for i in range(3000)]
    bad = entries[2500].replace('"x": 1', '"x": 1 2')
    text = "[\n" + ",\n".join(entries[:2500] + [bad] + entries[2501:]) + "\n]"
    assert len(text) > 3 * records_mod._JSON_BUF
    (root / "objects.json").write_text(text)
    (root / "image_data.json").write_text(json.dumps([{"image_id": i + 1, "width": 10, "height": 10,
                                                         "url": "VG_100K/1.jpg"} for i in range(3000)]))
    try:
        json.loads(text)
    except json.JSONDecodeError as je:
        want = f"at byte {je.pos} (line {je.lineno}, column {je.colno})"
    with pytest.raises(DatasetError) as e:
        list(read_vg(str(root)).regions)
    assert want in str(e.value) and "objects.json" in str(e.value)


def test_truncated_file(tmp_path):
    root = _vg(tmp_path)
    text = (root / "objects.json").read_text()
    (root / "objects.json").write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"objects.json: malformed JSON at byte \d+ \(line \d+, column \d+\)"):
        list(read_vg(str(root)).regions)


def test_written_artifact_has_every_region_and_error(tmp_path):
    from mask.datasets import write_dataset
    from mask.storage import Store

    ds = read_vg(str(_vg(tmp_path)), batch_images=1)
    store = Store(str(tmp_path / "store"))
    out = write_dataset(store, "vg", ds.images, regions=ds.regions, errors=ds.errors, inputs=ds.inputs,
                        config_hash="h")
    assert out["tables"]["regions"]["rows"] == 4 and out["tables"]["regions"]["parts"] == 2
    assert store.read_table("datasets/vg/regions").column("region_id").to_pylist() == ["10", "11", "17", "20"]
    # errors are written after the regions stream, so they include the objects.json rows
    errs = store.read_table("datasets/vg/_errors")
    assert errs.num_rows == 7 and "bad_box" in errs.column("error").to_pylist()
    m = store.committed("datasets/vg/_errors", "h")
    assert m["extra"]["stats"]["boxes_clipped"] == 2
    assert set(m["inputs"]) == {"image_data.json", "objects.json", "attributes.json"}


def test_failed_region_stream_leaves_committed_tables_alone(tmp_path):
    from mask.datasets import write_dataset
    from mask.storage import Store

    root = _vg(tmp_path)
    store = Store(str(tmp_path / "store"))
    ds = read_vg(str(root))
    write_dataset(store, "vg", ds.images, regions=ds.regions, errors=ds.errors, config_hash="old")
    (root / "objects.json").write_text('[{"image_id": 1, "objects": [}]')
    ds = read_vg(str(root))
    with pytest.raises(DatasetError, match="objects.json"):
        write_dataset(store, "vg", ds.images, regions=ds.regions, errors=ds.errors, config_hash="new")
    for t in ("images", "regions", "_errors"):
        assert store.committed(f"datasets/vg/{t}", "old") is not None
    assert store.read_table("datasets/vg/regions").num_rows == 4
