"""Scheduled re-indexing: incremental work, equality with a full build, CURRENT, lease, crashes.

One tiny knowledge is built for the module (the main job on a slice of the demo world); the gallery
grows and shrinks through ``gallery.limit`` (which changes the gallery dataset, as new files would).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mainjob import MAIN_JOB_SLICE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the session's main-job slice without its gallery size, which the tests here change
SMALL = [a for a in MAIN_JOB_SLICE if not a.startswith("gallery.limit=")]


@pytest.fixture(scope="module")
def world(main_job, ray_local):
    """The session's main-job run (tests/mainjob.py: 10 gallery images), its root restored for this module."""
    return {"root": main_job.root, "built": main_job.summary}


def _args(world, limit, *more):
    return [f"storage.root={world['root']}", *SMALL, f"gallery.limit={limit}", *more]


def _store(world):
    from mask.storage import Store

    return Store(str(world["root"]))


def _current(world):
    from mask.pipeline.index import read_current

    return read_current(_store(world), "demo_gallery")


def _files(world, version):
    from mask.pipeline.index import read_index_file

    rel = f"indexes/demo_gallery/{version}"
    return {n: read_index_file(_store(world), rel, n) for n in
            ("scores.npy", "word_scores.npy", "t2i_topk.parquet", "i2t_topk.parquet", "images.parquet",
             "captions.parquet", "words.parquet", "metrics.json")}


def _scratch(world, limit, version="i-scratch"):
    """A from-scratch build of the same gallery (no live index reused), for comparison."""
    from mask.config import load_config
    from mask.pipeline.index import build_index
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import ensure_dataset, resolve_and_load_knowledge
    from mask.tracking import NullRun

    cfg = load_config("demo", _args(world, limit))
    ctx = JobContext.from_config(cfg)
    k = resolve_and_load_knowledge(cfg, ctx.store, None)
    gal = ensure_dataset(ctx, cfg.gallery, None)
    return build_index(ctx, NullRun(), k, gal, version, None, live=None)


def test_first_run_switches_to_the_main_jobs_index_then_is_up_to_date(world):
    from jobs import reindex

    first = reindex.main(_args(world, 10))
    # the main job committed the index of this gallery and knowledge through build_index: the first re-index
    # computes nothing and makes it live
    assert first["status"] == "switched" and first["previous"] is None and "reuse" not in first
    assert first["version"] == world["built"]["evaluation"]["index"]["version"]
    assert first["metrics"] == world["built"]["evaluation"]["index"]["metrics"]
    cur = _current(world)
    assert cur["version"] == first["version"] and cur["previous"] is None
    assert cur["mlflow_run_id"] == first["mlflow"]["run_id"]
    again = reindex.main(_args(world, 10))
    assert again["status"] == "up-to-date" and again["version"] == first["version"]
    assert again["metrics"] == first["metrics"]
    world["v10"] = first["version"]


def test_new_images_computed_incrementally_equal_a_full_build(world):
    import mlflow

    from jobs import reindex

    before = _current(world)["version"]
    out = reindex.main(_args(world, 12))
    r = out["reuse"]
    assert out["status"] == "built" and out["previous"] == before and r["reused_from"].endswith(before)
    assert r["score_reuse"] is True
    assert (r["images_new"], r["images_removed"], r["mu_computed"], r["word_score_rows_computed"]) == (2, 0, 2, 2)
    assert r["captions_parsed"] == 10 and r["features_extracted"] == 2 and r["mu_where"] == "driver"
    assert r["word_score_cells_reused"] >= 10 * (r["words"] - r["words_new"])
    assert _current(world)["version"] == out["version"] and _current(world)["previous"] == before
    world["v12"] = out["version"]
    inc = _files(world, out["version"])
    full = _scratch(world, 12)
    ref = _files(world, full.version)
    np.testing.assert_allclose(inc["scores.npy"], ref["scores.npy"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inc["word_scores.npy"], ref["word_scores.npy"], rtol=1e-5, atol=1e-6)
    assert inc["words.parquet"].column("word").to_pylist() == ref["words.parquet"].column("word").to_pylist()
    assert inc["captions.parquet"].column("words").to_pylist() == ref["captions.parquet"].column("words").to_pylist()
    assert inc["metrics.json"]["mask"] == pytest.approx(ref["metrics.json"]["mask"])
    assert inc["metrics.json"]["coverage"] == ref["metrics.json"]["coverage"]
    for name in ("t2i_topk.parquet", "i2t_topk.parquet"):
        np.testing.assert_allclose(np.asarray(inc[name].column("scores").to_pylist()),
                                   np.asarray(ref[name].column("scores").to_pylist()), rtol=1e-5, atol=1e-6)
    # tracked: what was reused and computed
    run = mlflow.MlflowClient(tracking_uri=out["mlflow"]["tracking_uri"]).get_run(out["mlflow"]["run_id"])
    assert run.data.tags["job"] == "reindex" and run.data.tags["reindex.status"] == "built"
    assert run.data.metrics["reuse.images_new"] == 2 and "mask.rsum" in run.data.metrics
    assert run.data.params["index.previous"] == before


def test_removed_images_compute_nothing(world):
    from jobs import reindex

    prev = _current(world)["version"]
    prev_files = _files(world, prev)
    out = reindex.main(_args(world, 11))
    r = out["reuse"]
    assert out["status"] == "built" and r["images_removed"] == 1 and r["images_new"] == 0
    assert r["mu_computed"] == 0 and r["word_score_cells_computed"] == 0 and r["captions_parsed"] == 0
    got = _files(world, out["version"])
    ids = got["images.parquet"].column("image_id").to_pylist()
    old_ids = prev_files["images.parquet"].column("image_id").to_pylist()
    caps = got["captions.parquet"].column("caption_id").to_pylist()
    old_caps = prev_files["captions.parquet"].column("caption_id").to_pylist()
    rows = [old_ids.index(x) for x in ids]
    cols = [old_caps.index(c) for c in caps]
    np.testing.assert_allclose(got["scores.npy"], prev_files["scores.npy"][np.ix_(rows, cols)], rtol=1e-6)


def test_query_and_evaluate_use_the_live_index(world):
    from mask.config import load_config
    from mask.pipeline.evaluate import evaluate_job
    from mask.pipeline.query import query_job

    cfg = load_config("demo", _args(world, 11))
    live = _current(world)["version"]
    q = query_job(cfg, None, ["a red ball"], [], top=3)
    assert q["index"].endswith(live) and len(q["text"][0]["results"]) == 3
    ev = evaluate_job(cfg, None)
    assert ev["index"].endswith(live) and ev["metrics"]["MASK"]["rsum"] > 0


def test_second_run_while_the_lease_is_held_exits_cleanly(world, capsys):
    from jobs import reindex
    from mask.lease import Lease

    live = _current(world)["version"]
    holder = Lease(_store(world), "indexes/demo_gallery/_lease", ttl_s=120, owner="other-run", heartbeat=False)
    holder.acquire()
    try:
        out = reindex.main(_args(world, 12))
    finally:
        holder.release()
    assert out["status"] == "busy" and "held by other-run" in out["reason"]
    assert "re-index skipped" in capsys.readouterr().out
    assert _current(world)["version"] == live


def test_committed_version_that_is_not_live_is_only_switched(world):
    """Like a run that died after committing its version but before the switch: the next run only switches."""
    from jobs import reindex

    v12 = world["v12"]
    assert _current(world)["version"] != v12 and _store(world).manifest(f"indexes/demo_gallery/{v12}")
    out = reindex.main(_args(world, 12))
    assert out["status"] == "switched" and out["version"] == v12
    assert _current(world)["version"] == v12


def test_new_knowledge_rescores_but_reuses_features(world):
    from jobs import build_knowledge, reindex
    from mask.pipeline.index import read_index_file

    # k2: another knowledge version of the same trained model (OOD's top-m, eq. 11; no training run).  Its main
    # job evaluates on the first 10 images: it commits an index of that gallery (10 μ of k2)
    k2 = build_knowledge.main(_args(world, 10, "knowledge.m=3"))
    assert k2["training"]["reused"] is True
    assert k2["knowledge"]["uri"] != world["built"]["knowledge"]["uri"]
    k2_index = read_index_file(_store(world), f"indexes/demo_gallery/{k2['evaluation']['index']['version']}",
                               "metrics.json")["reuse"]
    assert k2_index["features_extracted"] == 0 and k2_index["mu_computed"] == 10
    # the live 12-image index was scored with another knowledge: every pair is rescored, no feature extracted,
    # and only the 2 images the main job did not evaluate get a μ
    out = reindex.main([*_args(world, 12), "--knowledge", k2["knowledge"]["uri"]])
    r = out["reuse"]
    assert out["status"] == "built" and out["knowledge"] == k2["knowledge"]["uri"]
    assert r["score_reuse"] is False and r["features_extracted"] == 0 and r["mu_computed"] == 2
    assert r["word_score_rows_computed"] == 12


def test_driver_killed_mid_run_leaves_the_live_index_and_the_rerun_completes(world):
    from mask.pipeline.index import read_index_file

    live = _current(world)
    live_metrics = read_index_file(_store(world), f"indexes/demo_gallery/{live['version']}", "metrics.json")
    env = {**os.environ, "MASK_FAULT_INJECT": "index.after_mu"}
    env.pop("RAY_ADDRESS", None)
    args = _args(world, 14, "index.lease_ttl_s=4")
    knowledge = ["--knowledge", live["knowledge_uri"]]
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "reindex.py"), *knowledge, *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "fault injection: killing process" in proc.stderr
    assert _current(world) == live  # untouched
    assert read_index_file(_store(world), f"indexes/demo_gallery/{live['version']}", "metrics.json") == live_metrics
    from jobs import reindex

    busy = reindex.main([*knowledge, *args])  # the dead run's lease has not expired yet
    assert busy["status"] == "busy"
    time.sleep(4.5)
    out = reindex.main([*knowledge, *args])
    assert out["status"] == "built" and out["previous"] == live["version"]
    assert out["reuse"]["mu_computed"] == 0  # the killed run committed μ for the new images
    assert out["reuse"]["images_new"] == 2
    assert _current(world)["version"] == out["version"]


def test_bad_inputs(world, tmp_path):
    from jobs import reindex
    from mask.knowledge import KnowledgeError

    with pytest.raises(KnowledgeError, match="does not exist|no committed"):
        reindex.main([*_args(world, 12), "--knowledge", str(tmp_path / "nope")])
    store = _store(world)
    good = store.read_bytes("indexes/demo_gallery/CURRENT")
    store.write_bytes("indexes/demo_gallery/CURRENT", b'{"version": "../../escape"}')
    try:
        with pytest.raises(Exception, match=r"\.\."):
            reindex.main(_args(world, 12))
    finally:
        store.write_bytes("indexes/demo_gallery/CURRENT", good)


def test_user_folder_with_a_captions_file_grows_incrementally(world, tmp_path):
    """A user's image folder + CSV captions (gallery.kind=folder): new files are picked up, only they cost work."""
    import csv
    import shutil

    from jobs import reindex

    store = _store(world)
    images = store.read_table("datasets/demo_gallery/images").to_pylist()[:6]
    captions = store.read_table("datasets/demo_gallery/captions").to_pylist()
    folder = tmp_path / "photos"
    folder.mkdir()

    def publish(n):
        for rec in images[:n]:  # new files only: the images already there stay as they are (same stamp)
            if not (folder / f"{rec['image_id']}.jpg").exists():
                shutil.copy(rec["uri"], folder / f"{rec['image_id']}.jpg")
        keep = {r["image_id"] for r in images[:n]}
        with open(tmp_path / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["caption_id", "image_id", "text"])
            w.writeheader()
            for c in captions:
                if c["image_id"] in keep:
                    w.writerow({k: c[k] for k in ("caption_id", "image_id", "text")})
            first = images[0]["image_id"]  # hard captions: no content word, unicode, very long
            w.writerow({"caption_id": "x-none", "image_id": first, "text": "it is there and then of it"})
            w.writerow({"caption_id": "x-uni", "image_id": first, "text": "ein rotes Auto 🚗 — très jolie boîte ☃ ball"})
            w.writerow({"caption_id": "x-long", "image_id": first, "text": "a small red ball " * 2500 + "and a purple umbrella"})

    args = [f"storage.root={world['root']}", *SMALL, "gallery.name=user_photos", "gallery.kind=folder",
            f"gallery.path={folder}", f"gallery.captions={tmp_path / 'captions.csv'}", "gallery.splits=null",
            "--knowledge", world["built"]["knowledge"]["uri"]]
    publish(4)
    first = reindex.main(args)
    assert first["status"] == "built" and first["reuse"]["images"] == 4 and first["reuse"]["captions"] == 23
    from mask.pipeline.index import read_index_file

    rel = f"indexes/user_photos/{first['version']}"
    caps = read_index_file(store, rel, "captions.parquet").to_pylist()
    dense = read_index_file(store, rel, "scores.npy")
    metrics = read_index_file(store, rel, "metrics.json")
    by_id = {c["caption_id"]: c for c in caps}
    assert by_id["x-none"]["words"] == [] and metrics["coverage"]["captions_without_words"] >= 1
    col = by_id["x-none"]["position"]  # rule: no content word → the fill score, below every real score
    assert np.all(dense[:, col] == metrics["fill_score"]) and metrics["fill_score"] < dense[:, 0].min()
    assert "ball" in by_id["x-uni"]["words"] and "🚗" in by_id["x-uni"]["text"]
    assert set(by_id["x-long"]["words"]) == {"small", "red", "ball", "purple", "umbrella"}  # 10k words, not cut
    publish(6)
    second = reindex.main(args)
    r = second["reuse"]
    assert second["status"] == "built" and second["previous"] == first["version"]
    assert (r["images_new"], r["features_extracted"], r["mu_computed"], r["captions_parsed"]) == (2, 2, 2, 10)
    assert r["captions"] == 33
    assert reindex.main(args)["status"] == "up-to-date"


def test_changed_image_bytes_and_caption_text_are_recomputed(world, tmp_path):
    """Same ids, other content: a truncated image repaired, a photo replaced by another one, a caption's
    text edited.  The re-index extracts exactly those two images again, recomputes their μ and per-word
    terms (not the others'), re-parses the one caption, and equals a from-scratch build."""
    import csv
    import shutil

    from jobs import reindex
    from mask.config import load_config
    from mask.pipeline.index import build_index, read_index_file
    from mask.pipeline.runtime import JobContext
    from mask.pipeline.steps import ensure_dataset, resolve_and_load_knowledge
    from mask.tracking import NullRun

    store = _store(world)
    images = store.read_table("datasets/demo_gallery/images").to_pylist()[:6]
    captions = [c for c in store.read_table("datasets/demo_gallery/captions").to_pylist()
                if c["image_id"] in {r["image_id"] for r in images[:4]}]
    folder = tmp_path / "photos"
    folder.mkdir()
    for rec in images[:4]:
        shutil.copy(rec["uri"], folder / f"{rec['image_id']}.jpg")
    broken, replaced = images[2]["image_id"], images[3]["image_id"]
    good = Path(images[2]["uri"]).read_bytes()
    (folder / f"{broken}.jpg").write_bytes(good[: len(good) // 3])  # truncated

    def write_captions(edit: str | None):
        with open(tmp_path / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["caption_id", "image_id", "text"])
            w.writeheader()
            for c in captions:
                text = edit if edit and c["caption_id"] == captions[0]["caption_id"] else c["text"]
                w.writerow({"caption_id": c["caption_id"], "image_id": c["image_id"], "text": text})

    write_captions(None)
    args = [f"storage.root={world['root']}", *SMALL, "gallery.name=changing", "gallery.kind=folder",
            f"gallery.path={folder}", f"gallery.captions={tmp_path / 'captions.csv'}", "gallery.splits=null",
            "detector.batch_size=1", "index.local_max_images=0", "index.mu_commit_images=2",  # μ: Ray Data, 2 commits
            "--knowledge", world["built"]["knowledge"]["uri"]]
    first = reindex.main(args)
    assert first["status"] == "built" and first["reuse"]["images"] == 3  # the truncated one is left out
    assert first["reuse"]["mu_where"] == "ray-data" and first["reuse"]["mu_commits"] == 2
    # repair the truncated file, replace a photo by another (same id), edit one caption
    (folder / f"{broken}.jpg").write_bytes(good)
    shutil.copy(images[5]["uri"], folder / f"{replaced}.jpg")
    write_captions("a purple umbrella next to a small red ball")
    second = reindex.main(args)
    r = second["reuse"]
    assert second["status"] == "built" and second["previous"] == first["version"]
    assert (r["images"], r["features_extracted"], r["mu_computed"], r["mu_changed"]) == (4, 2, 2, 1)
    assert r["mu_commits"] == 1
    # parsed: the repaired image's captions (left out of the first index with their image) + the edited one
    assert r["word_score_rows_computed"] == 2 and r["captions_parsed"] == sum(c["image_id"] == broken for c in captions) + 1
    rel = f"indexes/changing/{second['version']}"
    caps = {c["caption_id"]: c for c in read_index_file(store, rel, "captions.parquet").to_pylist()}
    assert set(caps[captions[0]["caption_id"]]["words"]) >= {"umbrella", "ball"}
    # the same as a from-scratch build of the changed gallery
    cfg = load_config("demo", args[:-2])
    ctx = JobContext.from_config(cfg)
    k = resolve_and_load_knowledge(cfg, ctx.store, world["built"]["knowledge"]["uri"])
    full = build_index(ctx, NullRun(), k, ensure_dataset(ctx, cfg.gallery, None), "i-scratch-changed", None)
    assert full.reuse["mu_computed"] == 0 and full.reuse["features_extracted"] == 0
    np.testing.assert_allclose(read_index_file(store, rel, "scores.npy"), full.dense, rtol=1e-5, atol=1e-6)
    assert reindex.main(args)["status"] == "up-to-date"
