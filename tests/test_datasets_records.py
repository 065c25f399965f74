"""The dataset artifact writer, ingest reuse, and the shared record helpers."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mask.config import DatasetConfig
from mask.datasets import (
    CAPTIONS_SCHEMA,
    IMAGES_SCHEMA,
    REGIONS_SCHEMA,
    DatasetError,
    ErrorLog,
    ingest_dataset,
    write_dataset,
)
from mask.datasets.records import as_id, as_int, dataset_rel, fingerprint, iter_json_items
from mask.storage import Store


def _tables():
    images = pa.Table.from_pylist([{"image_id": "a", "uri": "/x/a.jpg", "split": "train", "width": 4, "height": 3},
                                   {"image_id": "b", "uri": "/x/b.jpg", "split": "train", "width": None,
                                    "height": None}], schema=IMAGES_SCHEMA)
    regions = [pa.Table.from_pylist([{"image_id": "a", "region_id": str(i), "box": [0, 0, 1, 1],
                                      "words": ["cat"], "names": ["cat"], "attributes": []}], schema=REGIONS_SCHEMA)
               for i in range(3)]
    captions = pa.Table.from_pylist([{"caption_id": "0", "image_id": "a", "text": "a cat", "split": "train"},
                                     {"caption_id": "1", "image_id": None, "text": "a query", "split": "train"}],
                                    schema=CAPTIONS_SCHEMA)
    return images, regions, captions


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_dataset_round_trip(tmp_path, request, where):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_bucket") + "/root"
    store = Store(root)
    images, regions, captions = _tables()
    errors = ErrorLog()
    errors.add("f.json", "item 3", "bad_box", "no x")
    errors.count("boxes_clipped", 2)
    out = write_dataset(store, "toy", images, regions=iter(regions), captions=captions, errors=errors,
                        inputs={"f.json": "size=1"}, config_hash="abc")
    assert out["tables"]["regions"] == {"uri": store.uri("datasets/toy/regions"), "rows": 3, "parts": 3}
    assert store.read_table("datasets/toy/images").equals(images)
    assert store.read_table("datasets/toy/regions").equals(pa.concat_tables(regions))
    assert store.read_table("datasets/toy/captions").equals(captions)
    err = store.read_table("datasets/toy/_errors").to_pylist()
    assert err == [{"source": "f.json", "position": "item 3", "error": "bad_box", "message": "no x"}]
    m = store.committed("datasets/toy/_errors", "abc")
    assert m["extra"]["stats"] == {"bad_box": 1, "boxes_clipped": 2}
    assert m["inputs"] == {"f.json": "size=1"}
    # a rewrite with another hash replaces the artifact
    write_dataset(store, "toy", images.slice(0, 1), config_hash="def")
    assert store.read_table("datasets/toy/images").num_rows == 1
    assert store.committed("datasets/toy/images", "abc") is None


def test_write_dataset_rejects_wrong_tables(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ValueError, match=r"images table lacks columns \['split'"):
        write_dataset(store, "bad", pa.table({"image_id": ["a"], "uri": ["u"]}), config_hash="h")
    assert store.committed("datasets/bad/images") is None
    with pytest.raises(ValueError, match="dataset name"):
        dataset_rel("a/b", "images")


def test_empty_tables_are_committed_with_schema(tmp_path):
    store = Store(str(tmp_path))
    write_dataset(store, "empty", IMAGES_SCHEMA.empty_table(), regions=iter([]), config_hash="h")
    assert store.read_table("datasets/empty/regions").schema.equals(REGIONS_SCHEMA)
    assert store.read_table("datasets/empty/_errors").num_rows == 0


def test_ingest_reuses_and_rereads_on_changed_input(tmp_path):
    path = tmp_path / "dataset_toy.json"
    data = {"images": [{"filename": f"{i}.jpg", "imgid": i, "split": "test",
                        "sentences": [{"raw": f"caption {i} {k}", "sentid": 5 * i + k} for k in range(5)]}
                       for i in range(3)], "dataset": "toy"}
    path.write_text(json.dumps(data))
    store = Store(str(tmp_path / "store"))
    cfg = DatasetConfig(name="toy", kind="karpathy", path=str(path))
    out = ingest_dataset(store, cfg)
    assert out["reused"] is False
    assert out["tables"]["captions"]["rows"] == 0  # images are missing on disk → error rows, no captions
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"jpeg")
    data["dataset"] = "toy2"  # changed input → new fingerprint → read again
    path.write_text(json.dumps(data))
    out = ingest_dataset(store, cfg)
    assert out["reused"] is False and out["tables"]["captions"]["rows"] == 15
    again = ingest_dataset(store, cfg)
    assert again["reused"] is True and again["tables"]["captions"]["rows"] == 15
    assert again["config_hash"] == out["config_hash"]
    assert ingest_dataset(store, cfg.model_copy(update={"limit": 2}))["reused"] is False  # config changed


def test_iter_json_items_streams_and_checks(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('\ufeff  [1, {"a": 2.5}, "x"]')
    assert list(iter_json_items(str(p), "item", expect="[")) == [1, {"a": 2.5}, "x"]
    with pytest.raises(DatasetError, match="expected a JSON object"):
        list(iter_json_items(str(p), "images.item", expect="{"))
    p.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        list(iter_json_items(str(p), "item", expect="["))
    with pytest.raises(DatasetError, match="file not found"):
        list(iter_json_items(str(tmp_path / "nope.json"), "item", expect="["))


def test_value_helpers_and_fingerprint(tmp_path):
    assert [as_int(v) for v in (3, 3.0, "4", -1, 2.5, True, None, "x", float("nan"))] == \
        [3, 3, 4, None, None, None, None, None, None]
    assert [as_id(v) for v in (7, 7.0, " a ", "", None, False)] == ["7", "7", "a", None, None, None]
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    f1 = fingerprint(str(p))
    assert f1.startswith("size=3;sha256=ba7816bf")
    p.write_bytes(b"abd")
    assert fingerprint(str(p)) != f1
