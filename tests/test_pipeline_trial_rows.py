"""TrialRows: a trial's training rows streamed from the features artifact in bounded memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mask.pipeline.pair_join import PairJoin
from mask.pipeline.regionwords import RegionWords
from mask.pipeline.steps import canonical_part_uris, features_dataset
from mask.pipeline.trial_rows import RAW_COLUMNS, TrialRows, rebatch
from mask.storage import Store

VOCAB = ["car", "cat", "dog", "red"]
DIM = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A regions artifact and a features artifact of 40 images in 5 parts (some images without a word)."""
    path = str(tmp_path_factory.mktemp("trial-rows"))
    store = Store(path)
    rng = np.random.default_rng(0)
    rids, words, img_of = [], [], []
    feats = {"image_id": [], "features": [], "num_boxes": [], "feature_dim": [], "region_ids": []}
    for i in range(40):
        n = int(rng.integers(1, 5))
        ids = [f"{i}-{j}" for j in range(n)]
        rids += ids
        img_of += [str(i)] * n
        # images 0, 10, 20, 30 carry no vocabulary word: they are raw rows but not training rows
        words += [[] if i % 10 == 0 else [str(w) for w in rng.choice(VOCAB + ["zzz"], int(rng.integers(0, 3)))]
                  for _ in ids]
        feats["image_id"].append(str(i))
        feats["features"].append(rng.standard_normal(n * DIM).astype(np.float16))
        feats["num_boxes"].append(n)
        feats["feature_dim"].append(DIM)
        feats["region_ids"].append(ids)
    regions = pa.table({"image_id": img_of, "region_id": rids, "words": pa.array(words, pa.list_(pa.string()))})
    with store.open_artifact("datasets/t/regions", kind="regions", config_hash="h") as w:
        w.write_part(regions, name="all")
        w.commit()
    table = pa.table({"image_id": pa.array(feats["image_id"], pa.string()),
                      "features": pa.array(feats["features"], pa.list_(pa.float16())),
                      "num_boxes": pa.array(feats["num_boxes"], pa.int32()),
                      "feature_dim": pa.array(feats["feature_dim"], pa.int32()),
                      "region_ids": pa.array(feats["region_ids"], pa.list_(pa.string()))})
    with store.open_artifact("features/t", kind="features", config_hash="h") as w:
        for i0 in range(0, 40, 8):
            w.write_part(table.slice(i0, 8), name=f"p{i0:02d}")  # names sort as the rows
        w.commit()
    # the same parts committed in another order (as extraction commits groups of parts as batches finish)
    with store.open_artifact("features/t2", kind="features", config_hash="h") as w:
        for i0 in (16, 32, 0, 24, 8):
            w.write_part(table.slice(i0, 8), name=f"p{i0:02d}")
        w.commit()
    return path


def _rows(root: str, window: int, rel: str = "features/t") -> TrialRows:
    store = Store(root)
    return TrialRows(store, rel, RegionWords(root, {}, "datasets/t/regions", VOCAB), window=window)


def _ids(batches) -> list[str]:
    return [str(x) for b in batches for x in b["image_id"]]


def test_small_data_is_kept_and_ordered_as_one_permutation_of_the_joined_table(root):
    rows = _rows(root, window=1000)
    assert rows.in_memory and rows.raw_images == 40
    raw = Store(root).read_table("features/t", columns=RAW_COLUMNS)
    cols = {n: raw.column(n).to_numpy(zero_copy_only=False) for n in RAW_COLUMNS}
    joined = PairJoin(RegionWords(root, {}, "datasets/t/regions", VOCAB))(cols)
    assert rows.images == len(joined["image_id"]) < 40  # images without a vocabulary word are not trained on
    assert rows.pairs == int(joined["num_pairs"].sum())
    order = np.random.default_rng([7, 3]).permutation(rows.images)  # the order trials have always used
    got = list(rows.epoch_batches(7, 3, per=6))
    assert [len(b["image_id"]) for b in got] == [6] * (rows.images // 6) + ([rows.images % 6] if rows.images % 6 else [])
    assert _ids(got) == [str(x) for x in joined["image_id"][order]]
    first = got[0]
    for k in ("pair_slot", "pair_word"):
        assert [list(x) for x in first[k]] == [list(x) for x in joined[k][order[:6]]]


def test_streamed_epochs_visit_every_training_image_once_in_a_seeded_order_holding_no_table(root):
    small, streamed = _rows(root, window=1000), _rows(root, window=5)
    assert not streamed.in_memory and streamed._raw is None and streamed._train is None
    assert (streamed.images, streamed.pairs) == (small.images, small.pairs)
    expected = sorted(_ids(small.epoch_batches(0, 0, per=4)))
    e0 = list(streamed.epoch_batches(1, 0, per=4))
    assert sorted(_ids(e0)) == expected  # every training image exactly once
    assert all(len(b["image_id"]) == 4 for b in e0[:-1])
    assert _ids(streamed.epoch_batches(1, 0, per=4)) == _ids(e0)  # (seed, epoch) → the same order (resume)
    assert _ids(streamed.epoch_batches(1, 1, per=4)) != _ids(e0)
    assert _ids(streamed.epoch_batches(2, 0, per=4)) != _ids(e0)
    b = e0[0]  # the joined columns travel with their image
    ref = {str(x): i for i, x in enumerate(next(iter(small.epoch_batches(0, 0, per=1000)))["image_id"])}
    whole = next(iter(small.epoch_batches(0, 0, per=1000)))
    for j, im in enumerate(b["image_id"]):
        i = ref[str(im)]
        assert list(b["pair_word"][j]) == list(whole["pair_word"][i])
        assert np.array_equal(b["features"][j], whole["features"][i])


@pytest.mark.parametrize("window", [1000, 5])
def test_raw_batches_are_every_row_in_artifact_order_in_exact_sizes(root, window):
    rows = _rows(root, window=window)
    got = list(rows.raw_batches(7))
    assert [len(b["image_id"]) for b in got] == [7] * 5 + [5]  # across the 8-row parts
    assert _ids(got) == [str(i) for i in range(40)]
    stored = Store(root).read_table("features/t").column("region_ids").to_pylist()
    assert [list(r) for b in got for r in b["region_ids"]] == stored


@pytest.mark.parametrize("window", [1000, 5])
def test_the_manifests_commit_order_does_not_change_the_rows_order(root, window):
    """Extraction commits parts in a timing-dependent order; training reads them by part name."""
    store = Store(root)
    assert [u.rsplit("/", 1)[-1] for u in store.part_uris("features/t2")] != \
        [u.rsplit("/", 1)[-1] for u in store.part_uris("features/t")]
    assert [u.rsplit("/", 1)[-1] for u in canonical_part_uris(store, "features/t2")] == \
        [u.rsplit("/", 1)[-1] for u in canonical_part_uris(store, "features/t")]
    a, b = _rows(root, window), _rows(root, window, "features/t2")
    assert _ids(a.epoch_batches(3, 1, per=4)) == _ids(b.epoch_batches(3, 1, per=4))
    assert _ids(a.raw_batches(7)) == _ids(b.raw_batches(7))


def test_canonical_order_is_by_part_name_across_run_folders(tmp_path):
    store = Store(str(tmp_path))
    t = pa.table({"x": [1]})
    names = ("run-b/0c", "run-a/ff", "run-c/1a")  # as extraction's runs write them (mask/pipeline/extract.py)
    for name in names:
        store.write_parquet(f"a/parts/{name}.parquet", t)
    with store.open_artifact("a", kind="k", config_hash="h") as w:
        for name in names:
            w.add_existing_part(name)
        w.commit()
    assert [u.split("/parts/")[1] for u in canonical_part_uris(store, "a")] == \
        ["run-b/0c.parquet", "run-c/1a.parquet", "run-a/ff.parquet"]


def test_features_dataset_reads_every_committed_part_once_by_its_manifest(root, ray_local):
    """No listing (Ray 2.60's V2 ``ListFiles`` task can print an InterruptedError traceback) and no sampling
    (the V1 reader's remote tasks and progress bar): the read tasks come from the manifest, with its row
    counts, and read the rows in canonical part order, only the asked columns."""
    store = Store(root)
    ds = features_dataset(store, "features/t2", columns=["image_id", "num_boxes"])
    plan = ds._logical_plan.dag.dag_str
    assert plan == "Read[ReadCommittedParts]", plan
    assert ds.count() == 40  # from the read tasks' metadata
    rows = ds.take_all()
    assert [r["image_id"] for r in rows] == [str(i) for i in range(40)]  # parts committed out of order
    assert set(rows[0]) == {"image_id", "num_boxes"}
    some = sorted(store.path("features/t2", f"parts/p{i:02d}.parquet") for i in (8, 32))
    assert [r["image_id"] for r in features_dataset(store, "features/t2", ["image_id"], parts=some).take_all()] \
        == [str(i) for i in [*range(8, 16), *range(32, 40)]]
    with pytest.raises(ValueError, match=r"not committed parts: \['/nope.parquet'\]"):
        features_dataset(store, "features/t2", parts=["/nope.parquet"])
    with pytest.raises(ValueError, match=r"no column\(s\) \['nope'\]"):
        features_dataset(store, "features/t2", columns=["nope"])


def test_rebatch_keeps_order_and_sizes():
    chunks = [{"a": np.arange(i0, i0 + n)} for i0, n in ((0, 3), (3, 0), (3, 5), (8, 1), (9, 6))]
    out = list(rebatch(iter(chunks), 4))
    assert [list(b["a"]) for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]
