"""Gallery scoring, re-ranking, evaluation and query jobs on a small slice of the demo world (local Ray).

One knowledge is built per module (the main job on a tiny slice) and one index scored from it; the
other tests reuse both.  Base-score readers are tested directly on small files.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mainjob import MAIN_JOB_SLICE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = MAIN_JOB_SLICE


@pytest.fixture(scope="module")
def world(main_job, ray_local):
    """The session's main-job run (tests/mainjob.py), its root restored for this module, and the gallery
    scored once more from its knowledge by the gallery job."""
    from jobs import score_gallery

    root = main_job.root
    args = [f"storage.root={root}", *SMALL]
    scored = score_gallery.main(args)
    return {"root": root, "args": args, "built": main_job.summary, "scored": scored}


def _index(world):
    from mask.pipeline.index import read_index_file
    from mask.storage import Store

    store = Store(str(world["root"]))
    rel = world["scored"]["index"]["uri"][len(str(world["root"])) + 1:]
    files = {n: read_index_file(store, rel, n) for n in
             ("images.parquet", "captions.parquet", "t2i_topk.parquet", "i2t_topk.parquet", "scores.npy",
              "metrics.json", "index.json")}
    return store, rel, files


# ---------------------------------------------------------------- score_gallery


def test_index_is_committed_with_all_outputs(world):
    from mask.metrics import recall_at_k

    s = world["scored"]
    # the main job committed it (build_index, the same version); score_gallery reuses it
    assert s["index"]["version"].startswith("i-") and s["index"]["reused"] is True
    assert world["built"]["evaluation"]["index"] == {"uri": s["index"]["uri"], "version": s["index"]["version"],
                                                     "reused": False, "metrics": s["metrics"]}
    assert s["knowledge"]["uri"] == world["built"]["knowledge"]["uri"]
    store, rel, f = _index(world)
    m = store.manifest(rel)
    assert m["kind"] == "index" and m["config_hash"] == s["index"]["version"]
    ids = f["images.parquet"].column("image_id").to_pylist()
    caps = f["captions.parquet"]
    c2i = np.asarray(caps.column("image_position").to_pylist())
    dense = f["scores.npy"]
    assert dense.shape == (len(ids), caps.num_rows) == (10, 50)
    # μ per image, in the shared μ artifact of this knowledge (read back in the index order)
    from mask.pipeline.index import read_mu

    mu = read_mu(store, f["index.json"]["mu"], ids)
    assert mu.column("image_id").to_pylist() == ids
    assert store.manifest(f["index.json"]["mu"])["row_count"] == len(ids)
    assert all(len(x) == n * z for x, n, z in zip(mu.column("mu").to_pylist(), mu.column("num_boxes").to_pylist(),
                                                 mu.column("latent_dim").to_pylist(), strict=True))
    # metrics are recall_at_k on the dense matrix
    assert f["metrics.json"]["mask"] == pytest.approx(recall_at_k(dense, caption_to_image=c2i))
    assert s["metrics"] == f["metrics.json"]["mask"]
    # top-K lists agree with the dense matrix
    t2i = f["t2i_topk.parquet"]
    assert t2i.column("query_id").to_pylist() == caps.column("caption_id").to_pylist()
    for j, (row_ids, row_scores) in enumerate(zip(t2i.column("ids").to_pylist(), t2i.column("scores").to_pylist(),
                                                  strict=True)):
        assert len(row_ids) == 10
        np.testing.assert_allclose(row_scores, np.sort(dense[:, j])[::-1], rtol=1e-6)
        assert row_ids[0] == ids[int(np.argmax(dense[:, j]))]
    i2t = f["i2t_topk.parquet"]
    assert len(i2t.column("ids")[0].as_py()) == 20
    np.testing.assert_allclose(i2t.column("scores")[3].as_py(), np.sort(dense[3])[::-1][:20], rtol=1e-6)
    # coverage, knowledge reference
    cov = s["coverage"]
    assert cov["captions"] == 50 and cov["in_knowledge"] > 0 and cov["ood"] > 0
    assert f["index.json"]["knowledge_uri"] == s["knowledge"]["uri"]


def test_index_metrics_match_main_job_mask_scores(world):
    """The main job's ablation table and its committed index score MASK the same on the same gallery."""
    table, index = world["built"]["evaluation"]["mask"], world["built"]["evaluation"]["index"]["metrics"]
    assert index == pytest.approx({k: table[k] for k in index})


def test_the_main_jobs_index_holds_its_mu(world):
    """The main job's index keeps μ in the gallery's shared μ artifact, computed once by that build."""
    store, rel, f = _index(world)
    assert world["built"]["evaluation"]["mu"] == store.uri(f["index.json"]["mu"])
    assert f["metrics.json"]["reuse"]["mu_computed"] == f["metrics.json"]["images"] == 10
    assert f["metrics.json"]["reuse"]["reused_from"] is None


def test_mlflow_run_of_score_gallery(world):
    import mlflow

    s = world["scored"]
    client = mlflow.MlflowClient(tracking_uri=s["mlflow"]["tracking_uri"])
    run = client.get_run(s["mlflow"]["run_id"])
    for key in ("mask.rsum", "mask.t2i_r1", "mask.i2t_r10", "coverage.ood", "coverage.no_vector",
                "coverage.captions_without_words", "time.scoring", "time.mu", "time.total"):
        assert key in run.data.metrics, key
    assert run.data.params["index.version"] == s["index"]["version"]
    assert run.data.params["knowledge.uri"] == s["knowledge"]["uri"]


def test_rerun_reuses_the_committed_index(world):
    from jobs import score_gallery

    again = score_gallery.main(world["args"])
    assert again["index"]["reused"] is True
    assert again["index"]["version"] == world["scored"]["index"]["version"]
    assert again["metrics"] == world["scored"]["metrics"]
    # a different scoring config is another index version
    other = score_gallery.main([*world["args"], "scoring.pooling=mean"])
    assert other["index"]["version"] != world["scored"]["index"]["version"]
    assert other["index"]["reused"] is False


def test_knowledge_by_registry_reference(world):
    from jobs import score_gallery

    v = world["built"]["mlflow"]["model_version"]
    s = score_gallery.main([*world["args"], "--knowledge", f"models:/mask-knowledge/{v}"])
    assert s["knowledge"]["uri"] == world["built"]["knowledge"]["uri"]
    assert s["index"]["reused"] is True  # same knowledge, same gallery, same scoring: same index


def test_unknown_knowledge_version_is_named(world):
    from jobs import score_gallery
    from mask.knowledge import KnowledgeError
    from mask.tracking import KnowledgeNotFound

    with pytest.raises(KnowledgeError, match="knowledge/k-doesnotexist"):
        score_gallery.main([*world["args"], "--knowledge", "knowledge/k-doesnotexist"])
    with pytest.raises(KnowledgeNotFound, match="nope"):
        score_gallery.main([*world["args"], "--knowledge", "@nope"])
    with pytest.raises(KnowledgeNotFound, match="version 999"):
        score_gallery.main([*world["args"], "--knowledge", "models:/mask-knowledge/999"])


# ---------------------------------------------------------------- re-ranking


def _noisy_truth(c2i: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    truth = (c2i[None, :] == np.arange(n)[:, None]).astype(np.float64)  # (N, T)
    return truth + noise * rng.standard_normal(truth.shape)


def test_rerank_with_a_synthetic_base_matrix(world, tmp_path):
    from jobs import score_gallery
    from mask.metrics import recall_at_k
    from mask.pipeline.index import read_index_file
    from mask.rerank import rerank_both

    store, rel, f = _index(world)
    c2i = np.asarray(f["captions.parquet"].column("image_position").to_pylist())
    base = _noisy_truth(c2i, 10, noise=0.8)
    path = tmp_path / "base.npy"
    np.save(path, base)
    s = score_gallery.main([*world["args"], f"rerank.base_scores={path}", "rerank.k=5", "rerank.alpha=0.5"])
    rr = s["rerank"]
    assert rr["reused"] is False and rr["directions"] == ["t2i", "i2t"]
    assert rr["before"] == pytest.approx(recall_at_k(base, caption_to_image=c2i))
    ref = rerank_both(base, f["scores.npy"], 5, 0.5)
    assert rr["after"] == pytest.approx(recall_at_k(ref.i2t, caption_to_image=c2i, t2i_similarity=ref.t2i))
    assert "| base |" in s["table"] and "| base + MASK (α=0.5, k=5) |" in s["table"] and "| MASK |" in s["table"]
    # the re-ranked lists are committed next to the index
    rrel = rr["uri"][len(str(world["root"])) + 1:]
    lists = read_index_file(store, rrel, "t2i_reranked.parquet")
    assert lists.num_rows == 50 and all(len(x) == 5 for x in lists.column("ids").to_pylist())
    assert read_index_file(store, rrel, "metrics.json")["after"] == rr["after"]
    # α = 0 keeps the base order inside the top-k: metrics unchanged
    s0 = score_gallery.main([*world["args"], f"rerank.base_scores={path}", "rerank.k=5", "rerank.alpha=0"])
    assert s0["rerank"]["after"] == pytest.approx(s0["rerank"]["before"])
    # a perfect MASK-side signal fixes a noisy base: re-rank with the truth as "MASK" through the library
    perfect = rerank_both(base, _noisy_truth(c2i, 10, noise=0.0), 10, 5.0)
    assert recall_at_k(perfect.i2t, caption_to_image=c2i, t2i_similarity=perfect.t2i)["rsum"] == 600.0
    # rerun: the committed re-ranking is reused
    again = score_gallery.main([*world["args"], f"rerank.base_scores={path}", "rerank.k=5", "rerank.alpha=0.5"])
    assert again["rerank"]["reused"] is True and again["rerank"]["after"] == rr["after"]


def test_rerank_from_a_base_scores_artifact_by_reference(world):
    """rerank.base_scores may name a jobs/base_scores.py artifact: rows/columns aligned by its ids.json,
    excluded images (and their captions) get the fill score."""
    import json

    from jobs import score_gallery
    from mask.metrics import recall_at_k
    from mask.scoring import fill_score

    store, rel, f = _index(world)
    ids = f["images.parquet"].column("image_id").to_pylist()
    caps = f["captions.parquet"]
    c2i = np.asarray(caps.column("image_position").to_pylist())
    base = _noisy_truth(c2i, 10, noise=0.8)
    keep = [i for i in range(10) if i != 3]  # image 3 failed in the base job: excluded with its captions
    rows = keep[::-1]  # the artifact's own order
    cols = [j for j in range(len(c2i)) if c2i[j] != 3]
    cap_ids = caps.column("caption_id").to_pylist()
    with store.open_artifact("base_scores/demo_gallery/test-model", kind="base_scores", config_hash="t") as w:
        buf = io.BytesIO()
        np.save(buf, base[np.ix_(rows, cols)].astype(np.float32))
        w.write_file("scores.npy", buf.getvalue())
        w.write_file("ids.json", json.dumps({
            "image_ids": [ids[i] for i in rows], "caption_ids": [cap_ids[j] for j in cols],
            "caption_image": [rows.index(c2i[j]) for j in cols], "excluded_image_ids": [ids[3]],
            "excluded_caption_ids": [cap_ids[j] for j in range(len(c2i)) if c2i[j] == 3]}).encode())
    s = score_gallery.main([*world["args"], "rerank.base_scores=base_scores/demo_gallery/test-model", "rerank.k=5"])
    rr = s["rerank"]
    assert rr["missing"] == 10 * 50 - 9 * 45
    expect = base.astype(np.float32).astype(np.float64)
    given = np.zeros_like(expect, bool)
    given[np.ix_(keep, cols)] = True
    expect[~given] = fill_score(float(expect[given].min()))
    assert rr["before"] == pytest.approx(recall_at_k(expect, caption_to_image=c2i))
    with pytest.raises(Exception, match="not base_scores"):
        score_gallery.main([*world["args"], f"rerank.base_scores={rel}"])  # an index is not base scores


def test_rerank_from_parquet_pairs_and_topk_lists(world, tmp_path):
    from jobs import score_gallery

    _, _, f = _index(world)
    ids = f["images.parquet"].column("image_id").to_pylist()
    caps = f["captions.parquet"].column("caption_id").to_pylist()
    c2i = np.asarray(f["captions.parquet"].column("image_position").to_pylist())
    base = _noisy_truth(c2i, 10, noise=0.8, seed=1)
    npy = tmp_path / "b.npy"
    np.save(npy, base)
    ii, cc = np.meshgrid(np.arange(10), np.arange(50), indexing="ij")
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"image_id": [ids[i] for i in ii.ravel()], "caption_id": [caps[c] for c in cc.ravel()],
                             "score": base.ravel()}), pairs)
    a = score_gallery.main([*world["args"], f"rerank.base_scores={npy}"])["rerank"]
    b = score_gallery.main([*world["args"], f"rerank.base_scores={pairs}"])["rerank"]
    assert a["before"] == pytest.approx(b["before"]) and a["after"] == pytest.approx(b["after"])
    # per-caption top-10 lists: text→image only
    order = np.argsort(-base, axis=0)[:10]  # (10, T)
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"query_id": caps, "candidate_ids": [[ids[i] for i in order[:, j]] for j in range(50)],
                             "scores": [list(base[order[:, j], j]) for j in range(50)]}), lists)
    c = score_gallery.main([*world["args"], f"rerank.base_scores={lists}"])["rerank"]
    assert c["directions"] == ["t2i"]
    assert set(c["before"]) == {"t2i_r1", "t2i_r5", "t2i_r10"}
    assert c["before"] == pytest.approx({k: a["before"][k] for k in c["before"]})
    assert "–" in score_gallery.main([*world["args"], f"rerank.base_scores={lists}"])["table"]


def test_bad_base_scores_fail_the_job_with_the_file_named(world, tmp_path):
    from jobs import score_gallery
    from mask.pipeline.base_scores import BaseScoresError

    path = tmp_path / "wrong.npy"
    np.save(path, np.zeros((10, 49)))
    with pytest.raises(BaseScoresError, match=r"wrong\.npy: has shape \(10, 49\), the gallery has 10 images × 50"):
        score_gallery.main([*world["args"], f"rerank.base_scores={path}"])
    with pytest.raises(BaseScoresError, match="no such file"):
        score_gallery.main([*world["args"], f"rerank.base_scores={tmp_path / 'absent.npy'}"])


IMGS = ["a", "b", "c"]
CAPS = ["a0", "a1", "b0", "b1", "c0", "c1"]


def _load(tmp_path, table=None, array=None, name="x.parquet"):
    from mask.pipeline.rerank import load_base_scores

    p = tmp_path / name
    if array is not None:
        np.save(p, array)
    else:
        pq.write_table(pa.table(table), p)
    return load_base_scores(str(p), IMGS, CAPS)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 5)), r"has shape \(3, 5\), the gallery has 3 images × 6 captions"),
    (np.zeros(6), r"has shape \(6,\)"),
    (np.array([[0, 1, 2, 3, 4, np.nan]] * 3), r"non-finite value nan at \[0, 5\] \(image 'a', caption 'c1'\)"),
    (np.array([["x"] * 6] * 3), "expected numbers"),
])
def test_bad_npy(tmp_path, array, message):
    from mask.pipeline.base_scores import BaseScoresError

    with pytest.raises(BaseScoresError, match=r"x\.npy: " + message):
        _load(tmp_path, array=array, name="x.npy")


def test_non_npy_and_object_npy_are_named_for_what_they_are(tmp_path):
    from mask.pipeline.base_scores import BaseScoresError
    from mask.pipeline.rerank import load_base_scores

    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"image_id,caption_id,score\na,a0,1.0\n")
    with pytest.raises(BaseScoresError, match=r"garbage\.npy: not a \.npy file \(no NumPy header") as e:
        load_base_scores(str(garbage), IMGS, CAPS)
    assert "pickle" not in str(e.value)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[{"a": 1}] * 6] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(BaseScoresError, match=r"objects\.npy: .*Python objects \(dtype object\), not numbers"):
        load_base_scores(str(objects), IMGS, CAPS)


@pytest.mark.parametrize("table, message", [
    ({"image_id": ["a", "zz"], "caption_id": ["a0", "a1"], "score": [1.0, 2.0]}, r"unknown image_id.*'zz'"),
    ({"image_id": ["a", "b"], "caption_id": ["a0", "q9"], "score": [1.0, 2.0]}, r"unknown caption_id.*'q9'"),
    ({"image_id": ["a", "a"], "caption_id": ["a0", "a0"], "score": [1.0, 2.0]},
     "duplicate pair image_id='a', caption_id='a0'"),
    ({"image_id": ["a", "b"], "caption_id": ["a0", "a1"], "score": [1.0, float("nan")]},
     "non-finite score nan in row 1"),
    ({"query_id": ["a0", "a0"], "candidate_ids": [["a"], ["b"]], "scores": [[1.0], [2.0]]},
     "duplicate query_id 'a0'"),
    ({"query_id": ["a0"], "candidate_ids": [["a", "b"]], "scores": [[1.0]]}, "2 candidate_ids and 1 scores"),
    ({"query_id": ["a0"], "candidate_ids": [["a", "a"]], "scores": [[1.0, 2.0]]}, "lists a candidate twice"),
    ({"query_id": ["a0"], "candidate_ids": [["a", "x"]], "scores": [[1.0, 2.0]]}, r"unknown image_id.*'x'"),
    ({"query_id": ["a0", "b"], "candidate_ids": [["a"], ["a0"]], "scores": [[1.0], [2.0]]},
     "cannot tell the direction"),
    ({"query_id": ["a0"], "candidate_ids": [["a"]], "scores": [[1.0]], "direction": ["up"]},
     "direction must be 't2i' or 'i2t'"),
    ({"img": ["a"], "score": [1.0]}, r"Parquet columns \['img', 'score'\] are neither"),
])
def test_bad_parquet(tmp_path, table, message):
    from mask.pipeline.base_scores import BaseScoresError

    with pytest.raises(BaseScoresError, match=r"x\.parquet: .*" + message):
        _load(tmp_path, table=table)


def test_partial_pairs_get_the_fill_score(tmp_path):
    b = _load(tmp_path, table={"image_id": ["a", "b"], "caption_id": ["a0", "b1"], "score": [0.5, -0.25]})
    assert b.missing == 16 and b.directions == ("t2i", "i2t")
    assert b.matrix[0, 0] == 0.5 and b.matrix[1, 3] == -0.25
    assert (b.matrix[b.matrix < -0.25] == -1.25).all()  # lowest − max(1, |lowest|)
    lists = _load(tmp_path, table={"query_id": ["a", "c"], "candidate_ids": [["a0", "b0"], ["c1"]],
                                   "scores": [[3.0, 2.0], [1.0]]})
    assert lists.directions == ("i2t",) and lists.matrix[2, 5] == 1.0 and lists.missing == 15


def test_gallery_order_rejects_duplicate_ids():
    from mask.pipeline.index import gallery_order
    from mask.pipeline.steps import GalleryError

    imgs = pa.table({"image_id": ["a", "b", "a"]})
    caps = pa.table({"caption_id": ["1"], "image_id": ["a"], "text": ["x"]})
    with pytest.raises(GalleryError, match=r"duplicate image_id \['a'\]"):
        gallery_order(imgs, caps)
    with pytest.raises(GalleryError, match=r"duplicate caption_id \['1'\]"):
        gallery_order(pa.table({"image_id": ["a", "b"]}),
                      pa.table({"caption_id": ["1", "1"], "image_id": ["b", "a"], "text": ["x", "y"]}))
    o = gallery_order(pa.table({"image_id": ["b", "a", "c"]}),
                      pa.table({"caption_id": ["1", "2", "3", "4"], "image_id": ["a", "b", "c", "a"],
                                "text": ["x", "y", "z", "w"]}), ok_ids={"a", "b"})
    assert o.image_ids == ["b", "a"] and o.caption_ids == ["2", "1", "4"] and o.dropped_images == 1
    assert o.caption_to_image.tolist() == [0, 1, 1]


def test_recall_from_topk_matches_recall_at_k(rng):
    from mask.metrics import recall_at_k
    from mask.pipeline.index import recall_from_topk
    from mask.scoring import topk

    sim = rng.standard_normal((30, 150))
    c2i = np.arange(150) // 5
    t2i, _ = topk(sim, 12, axis=0)
    i2t, _ = topk(sim, 12, axis=1)
    assert recall_from_topk(t2i.T, i2t, c2i) == pytest.approx(recall_at_k(sim, caption_to_image=c2i))


# ---------------------------------------------------------------- evaluate and query jobs


def test_evaluate_job_table_and_protocols(world, tmp_path):
    from jobs import evaluate
    from mask.metrics import coco_5fold_1k
    from mask.pipeline.steps import GalleryError

    _, rel, f = _index(world)
    args = [*world["args"], "--index", rel]
    out = evaluate.main(args)
    assert out["metrics"]["MASK"] == pytest.approx(world["scored"]["metrics"])
    assert out["table"].splitlines()[0].startswith("| method | IR R@1 |") and "| MASK |" in out["table"]
    assert out["mlflow"]["run_id"]
    folds = evaluate.main([*args, "--protocol", "coco-5fold-1k"])
    assert folds["metrics"]["MASK"] == pytest.approx(coco_5fold_1k(f["scores.npy"], 5, folds=5))
    path = tmp_path / "s.npy"
    np.save(path, f["scores.npy"] * 2.0)
    other = evaluate.main([*args, "--scores", str(path)])
    with pytest.raises(GalleryError, match="does not exist"):
        evaluate.main([*world["args"], "--index", "indexes/demo_gallery/i-nope"])
    assert other["metrics"]["s.npy"] == pytest.approx(world["scored"]["metrics"])


def test_query_job_returns_ranked_ids_with_word_sources(world):
    from jobs import query

    store, rel, f = _index(world)
    caps = f["captions.parquet"]
    text = caps.column("text")[7].as_py()
    image = f["images.parquet"].column("image_id")[2].as_py()
    out = query.main([*world["args"], "--index", rel, "--text", text, "--image", image, "--top", "4"])
    q = out["text"][0]
    assert [w["word"] for w in q["words"]] and {w["source"] for w in q["words"]} <= {"knowledge", "ood", "missing"}
    assert len(q["results"]) == 4
    scores = [r["score"] for r in q["results"]]
    assert scores == sorted(scores, reverse=True)
    # the text of caption 7 scores every image as the index's dense column 7
    dense = f["scores.npy"]
    ids = f["images.parquet"].column("image_id").to_pylist()
    for r in q["results"]:
        assert r["score"] == pytest.approx(float(dense[ids.index(r["image_id"]), 7]), abs=1e-5)
    im = out["image"][0]
    assert len(im["results"]) == 4
    for r in im["results"]:
        j = caps.column("caption_id").to_pylist().index(r["caption_id"])
        assert r["score"] == pytest.approx(float(dense[2, j]), abs=1e-5)
    assert out["load_seconds"] > 0


def test_query_unknown_image(world):
    from jobs import query
    from mask.pipeline.query import QueryError

    with pytest.raises(QueryError, match="'nope' is not in the index"):
        query.main([*world["args"], "--image", "nope"])


@pytest.mark.parametrize("text, needles", [
    ("the and of a", ["'the' (a stopword)", "'of' (a stopword)"]),
    ("zzqx", ["'zzqx' ("]),
    ("", ["empty"]),
])
def test_query_without_a_usable_word_fails_naming_the_dropped_words(world, text, needles):
    from jobs import query
    from mask.pipeline.query import QueryError

    with pytest.raises(QueryError, match="no word to score with|empty") as e:
        query.main([*world["args"], "--text", text])
    for n in needles:
        assert n in str(e.value)


def test_query_evidence_is_the_argmax_region_and_is_drawn(world, tmp_path):
    """Each result names, per word, the region eq. 10's max picked; --show draws them (PNG and HTML)."""
    from PIL import Image

    from jobs import query
    from mask.pipeline.index import read_index_file, read_mu
    from mask.scoring import normalize_rows

    store, rel, f = _index(world)
    vocab = read_index_file(store, rel, "words.parquet")
    scorable = {w for w, s in zip(vocab.column("word").to_pylist(), vocab.column("source").to_pylist(), strict=True)
                if s != "missing"}
    caps = f["captions.parquet"]
    text = next(t for t, ws in zip(caps.column("text").to_pylist(), caps.column("words").to_pylist(), strict=True)
                if len(scorable.intersection(ws)) >= 2)
    image = f["images.parquet"].column("image_id")[1].as_py()
    png = tmp_path / "why.png"
    out = query.main([*world["args"], "--index", rel, "--text", text, "--image", image, "--top", "3",
                      "--show", str(png)])
    q = out["text"][0]
    scored = [w["word"] for w in q["words"] if w["source"] != "missing"]
    info = read_index_file(store, rel, "index.json")
    from mask.pipeline.query import QueryEngine

    engine = QueryEngine.from_index(_cfg(world), store, rel)
    _, protos = engine.words(text)
    for hit in q["results"]:
        assert [m["word"] for m in hit["regions"]] == scored
        mu = read_mu(store, info["mu"], [hit["image_id"]])
        n, z = int(mu.column("num_boxes")[0].as_py()), int(mu.column("latent_dim")[0].as_py())
        m = normalize_rows(np.asarray(mu.column("mu")[0].as_py(), np.float32).reshape(n, z))
        sims = m @ protos.T  # (n, W): the reference, each word's best region
        for k, ev in enumerate(hit["regions"]):
            # the region eq. 10's max picked (ties within float32 rounding may pick either of equal regions)
            assert sims[ev["region"], k] >= sims[:, k].max() - 1e-5
            assert ev["score"] == pytest.approx(float(sims[:, k].max()), abs=1e-5)
        assert np.mean([ev["score"] for ev in hit["regions"]]) == pytest.approx(hit["score"], abs=1e-5)
    for hit in out["image"][0]["results"]:
        assert hit["regions"] and all(0 <= m["region"] for m in hit["regions"])
    assert out["shown"] == [str(png), str(tmp_path / "why-2.png")]
    for p in out["shown"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 300
    page = tmp_path / "why.html"
    query.main([*world["args"], "--index", rel, "--text", text, "--top", "2", "--show", str(page)])
    body = page.read_text()
    assert "data:image/png;base64," in body and scored[0] in body


def _cfg(world):
    from mask.config import load_config

    return load_config("demo", world["args"])


def test_a_failed_main_job_registers_no_model_version(world, monkeypatch):
    """Register last: the knowledge is committed (and reused), but a run that fails in its evaluation
    leaves the registry as it was (today's code registered first, then failed)."""
    from jobs import build_knowledge
    from mask import tracking
    from mask.pipeline import build

    cfg = _cfg(world)
    client, _ = tracking._client(cfg.tracking, str(world["root"]))
    before = len(client.search_model_versions(f"name='{cfg.tracking.registered_model}'"))

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(build, "evaluate_gallery", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        build_knowledge.main(world["args"])
    assert len(client.search_model_versions(f"name='{cfg.tracking.registered_model}'")) == before
