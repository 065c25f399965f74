"""mask.scoring: factorised eq. 10 against a per-pair loop; fill rule; errors; top-k; streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mask.scoring import (
    GalleryScorer,
    ScoringError,
    WordScoreReuse,
    count_empty,
    fill_score,
    normalize_rows,
    pooled_word_scores,
    reuse_word_scores,
    score_matrix,
    score_matrix_naive,
    topk,
)


def make(rng, n=6, r=5, z=8, v=20, t=9, p_real=0.7, max_words=5):
    mu = rng.normal(size=(n, r, z)).astype(np.float32)
    mask = rng.random((n, r)) < p_real
    mask[:, 0] |= rng.random(n) < 0.5
    protos = rng.normal(size=(v, z)).astype(np.float32)
    caps = [list(rng.integers(0, v, rng.integers(1, max_words + 1))) for _ in range(t)]
    return mu, mask, caps, protos


def pair_loop(mu, mask, caps, protos, pooling="max-mean"):
    """Independent reference: eq. 10 literally, NaN where there is no score."""
    out = np.full((len(mu), len(caps)), np.nan)
    for i in range(len(mu)):
        regs = [mu[i, j].astype(np.float64) for j in range(mu.shape[1]) if mask[i, j]]
        for t, words in enumerate(caps):
            if not regs or not words:
                continue
            dots = [[float(np.dot(rg, protos[w])) for rg in regs] for w in words]
            out[i, t] = np.mean([max(d) for d in dots]) if pooling == "max-mean" else np.mean(dots)
    return out


def test_factorised_matches_pair_loop(rng):
    mu, mask, caps, protos = make(rng)
    ref = pair_loop(mu, mask, caps, protos)
    ok = ~np.isnan(ref)
    for chunk in (None, 1, 2, 7):
        got = score_matrix(mu, mask, caps, protos, image_chunk=chunk)
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_matrix_naive(mu, mask, caps, protos)[ok], ref[ok], rtol=1e-5, atol=1e-5)


def test_vocab_blocks_and_small_blocks_agree(rng):
    mu, mask, caps, protos = make(rng, n=9, v=40, t=15)
    ref = score_matrix_naive(mu, mask, caps, protos)
    got = score_matrix(mu, mask, caps, protos, vocab_block=3, max_block_elements=7)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_mean_pooling_ablation(rng):
    mu, mask, caps, protos = make(rng)
    ref = pair_loop(mu, mask, caps, protos, pooling="mean")
    got = score_matrix(mu, mask, caps, protos, pooling="mean")
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, score_matrix_naive(mu, mask, caps, protos, pooling="mean"), rtol=1e-4, atol=1e-5)


def test_repeated_words_count_as_in_the_mean(rng):
    mu, mask, _, protos = make(rng, n=3)
    mask[:] = True
    got = score_matrix(mu, mask, [[1, 1, 2], [1, 2], [2, 1, 1]], protos)
    m1 = (mu @ protos[1]).max(axis=1)
    m2 = (mu @ protos[2]).max(axis=1)
    np.testing.assert_allclose(got[:, 0], (2 * m1 + m2) / 3, rtol=1e-5)
    np.testing.assert_allclose(got[:, 1], (m1 + m2) / 2, rtol=1e-5)
    np.testing.assert_allclose(got[:, 0], got[:, 2], rtol=1e-6)


def test_padding_is_ignored_whatever_it_holds(rng):
    mu, mask, caps, protos = make(rng)
    ref = score_matrix(mu, mask, caps, protos)
    mu2 = mu.copy()
    mu2[~mask] = 1e6  # huge values in padding must not win the max
    mu2[0][~mask[0]] = np.nan  # nor NaN in padding raise
    np.testing.assert_array_equal(score_matrix(mu2, mask, caps, protos), ref)


def test_one_image_and_one_caption(rng):
    mu, mask, caps, protos = make(rng, n=1, t=1)
    mask[0, 0] = True
    got = score_matrix(mu, mask, caps, protos)
    np.testing.assert_allclose(got, pair_loop(mu, mask, caps, protos), rtol=1e-5)


def test_empty_caption_and_regionless_image_rank_last_and_are_counted(rng):
    mu, mask, caps, protos = make(rng, n=5, t=6)
    mask[2] = False
    caps[4] = []
    got = score_matrix(mu, mask, caps, protos)
    assert np.isfinite(got).all()
    real = np.delete(np.delete(got, 2, axis=0), 4, axis=1)
    fill = fill_score(float(real.min()))
    assert fill < real.min()
    np.testing.assert_array_equal(got[2], fill)
    np.testing.assert_array_equal(got[:, 4], fill)
    np.testing.assert_allclose(got, score_matrix_naive(mu, mask, caps, protos), rtol=1e-5, atol=1e-5)
    empty = count_empty(mask, caps)
    assert empty.captions.tolist() == [4] and empty.images.tolist() == [2]
    assert empty.as_dict() == {"empty_captions": 1, "empty_images": 1}


def test_fill_rule_values():
    assert fill_score(0.3) == pytest.approx(-0.7)
    assert fill_score(-5.0) == -10.0
    assert fill_score(None) == -1.0


def test_everything_empty_gives_minus_one(rng):
    mu, mask, _, protos = make(rng, n=3)
    mask[:] = False
    got = score_matrix(mu, mask, [[1], []], protos)
    np.testing.assert_array_equal(got, -1.0)
    assert score_matrix(mu, mask, [], protos).shape == (3, 0)


def test_zero_images_and_zero_regions(rng):
    _, _, caps, protos = make(rng)
    assert score_matrix(np.zeros((0, 4, 8), np.float32), np.zeros((0, 4), bool), caps, protos).shape == (0, len(caps))
    got = score_matrix(np.zeros((2, 0, 8), np.float32), np.zeros((2, 0), bool), caps, protos)
    np.testing.assert_array_equal(got, -1.0)


def test_torch_inputs(rng):
    mu, mask, caps, protos = make(rng)
    ref = score_matrix(mu, mask, caps, protos)
    got = score_matrix(torch.from_numpy(mu), torch.from_numpy(mask), [torch.tensor(c) for c in caps],
                       torch.from_numpy(protos))
    np.testing.assert_array_equal(got, ref)


def test_integer_mask_accepted_and_checked(rng):
    mu, mask, caps, protos = make(rng)
    np.testing.assert_array_equal(score_matrix(mu, mask.astype(np.int8), caps, protos),
                                  score_matrix(mu, mask, caps, protos))
    with pytest.raises(ScoringError, match="image_mask"):
        score_matrix(mu, mask.astype(np.int8) * 3, caps, protos)


@pytest.mark.parametrize("fn", [score_matrix, score_matrix_naive])
def test_errors_name_the_input(rng, fn):
    mu, mask, caps, protos = make(rng)
    bad = mu.copy()
    i, j = np.argwhere(mask)[3]
    bad[i, j, 2] = np.inf
    with pytest.raises(ScoringError, match=rf"image_mu: non-finite value at image {i}, region {j}, dimension 2"):
        fn(bad, mask, caps, protos)
    bad_p = protos.copy()
    bad_p[caps[0][0], 1] = np.nan
    with pytest.raises(ScoringError, match=rf"prototypes: non-finite value at row {caps[0][0]}"):
        fn(mu, mask, caps, bad_p)
    with pytest.raises(ScoringError, match=r"prototypes shape \(20, 7\).*image_mu latent size 8"):
        fn(mu, mask, caps, protos[:, :7])
    with pytest.raises(ScoringError, match=r"image_mask shape \(6, 4\).*image_mu shape \(6, 5, 8\)"):
        fn(mu, mask[:, :4], caps, protos)
    with pytest.raises(ScoringError, match=r"caption_words\[1\]: word index 20 is outside"):
        fn(mu, mask, [[0], [1, 20]], protos)
    with pytest.raises(ScoringError, match=r"caption_words\[0\]: word index -1"):
        fn(mu, mask, [[-1]], protos)
    with pytest.raises(ScoringError, match=r"caption_words\[0\]: expected integer"):
        fn(mu, mask, [[0.5]], protos)
    with pytest.raises(ScoringError, match="pooling"):
        fn(mu, mask, caps, protos, pooling="max")
    with pytest.raises(ScoringError, match="image_mu: expected 3 dimensions"):
        fn(mu[0], mask, caps, protos)


def test_unused_nan_prototype_rows_are_ignored(rng):
    mu, mask, _, protos = make(rng)
    protos[19] = np.nan
    assert np.isfinite(score_matrix(mu, mask, [[0, 1], [2]], protos)).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), r=st.integers(1, 4), v=st.integers(1, 6),
       t=st.integers(1, 6), chunk=st.integers(1, 4))
def test_property_factorised_equals_naive(seed, n, r, v, t, chunk):
    g = np.random.default_rng(seed)
    mu = g.normal(size=(n, r, 3)).astype(np.float32)
    mask = g.random((n, r)) < 0.6
    protos = g.normal(size=(v, 3)).astype(np.float32)
    caps = [list(g.integers(0, v, g.integers(0, 4))) for _ in range(t)]
    for pooling in ("max-mean", "mean"):
        got = score_matrix(mu, mask, caps, protos, image_chunk=chunk, pooling=pooling)
        ref = score_matrix_naive(mu, mask, caps, protos, pooling=pooling)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_normalize_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])


# ------------------------------------------------------------------------------------------ topk

def topk_naive(x, k):
    idx = [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in x]
    return np.array(idx, np.int64)


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_topk_matches_naive_with_ties(rng, k):
    x = rng.integers(0, 4, size=(7, 9)).astype(np.float32)  # many ties
    idx, val = topk(x, k, axis=1)
    np.testing.assert_array_equal(idx, topk_naive(x, k))
    np.testing.assert_array_equal(val, np.take_along_axis(x, idx, 1))
    idx0, val0 = topk(x, k, axis=0)
    np.testing.assert_array_equal(idx0, topk_naive(x.T, k).T)
    np.testing.assert_array_equal(val0, np.take_along_axis(x, idx0, 0))


def test_topk_small_blocks_inf_and_clip(rng):
    x = rng.normal(size=(10, 6))
    x[2, :] = -np.inf
    x[3, 1] = np.inf
    idx, _ = topk(x, 4, axis=1, block=3)
    np.testing.assert_array_equal(idx, topk_naive(x, 4))
    idx, val = topk(x, 100, axis=1)
    assert idx.shape == (10, 6)
    np.testing.assert_array_equal(idx, topk_naive(x, 6))
    i1, v1 = topk(x[0], 2)
    assert i1.shape == (2,) and list(i1) == list(topk_naive(x[:1], 2)[0])


def test_topk_errors(rng):
    with pytest.raises(ScoringError, match=r"scores: NaN at index \(1, 2\)"):
        topk(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, np.nan]]), 1)
    with pytest.raises(ScoringError, match="k: must be at least 1"):
        topk(np.zeros((2, 2)), 0)
    with pytest.raises(ScoringError, match="axis"):
        topk(np.zeros((2, 2)), 1, axis=2)


# ------------------------------------------------------------------------------------------ streaming

def test_gallery_scorer_matches_dense_and_topk(rng):
    mu, mask, caps, protos = make(rng, n=11, t=8)
    mask[4] = False
    caps[3] = []
    mu[7] = mu[2]
    mask[7] = mask[2]  # identical images in different chunks: the earlier one wins ties
    full = score_matrix(mu, mask, caps, protos)
    gs = GalleryScorer(caps, protos, k_images=4, k_captions=3, keep_dense=True)
    ids = np.array([f"img{i}" for i in range(11)])
    for a, b in ((0, 3), (3, 4), (4, 9), (9, 11)):
        # R may differ between chunks: pad some with extra unused slots
        extra = (a % 2) * 2
        m = np.concatenate([mu[a:b], np.zeros((b - a, extra, mu.shape[2]), np.float32)], axis=1)
        k = np.concatenate([mask[a:b], np.zeros((b - a, extra), bool)], axis=1)
        gs.add(ids[a:b], m, k)
    res = gs.result()
    np.testing.assert_array_equal(res.dense, full)
    np.testing.assert_array_equal(res.caption_top_images, topk_naive(full.T, 4))
    np.testing.assert_array_equal(res.caption_top_scores, np.take_along_axis(full.T, res.caption_top_images, 1))
    np.testing.assert_array_equal(res.image_top_captions, topk_naive(full, 3))
    np.testing.assert_array_equal(res.image_top_scores, np.take_along_axis(full, res.image_top_captions, 1))
    assert res.caption_top_image_ids.shape == (8, 4)
    assert res.empty.as_dict() == {"empty_captions": 1, "empty_images": 1}
    assert res.fill is not None and np.isfinite(res.caption_top_scores).all()


def test_gallery_scorer_k_larger_than_gallery(rng):
    mu, mask, caps, protos = make(rng, n=3, t=2)
    gs = GalleryScorer(caps, protos, k_images=10, k_captions=10)
    gs.add([0], mu[:1], mask[:1])
    gs.add([1, 2], mu[1:], mask[1:])
    res = gs.result()
    full = score_matrix(mu, mask, caps, protos)
    assert res.caption_top_images.shape == (2, 3) and res.image_top_captions.shape == (3, 2)
    np.testing.assert_array_equal(res.caption_top_images, topk_naive(full.T, 3))
    assert res.dense is None and res.fill is None


def test_gallery_scorer_errors(rng):
    mu, mask, caps, protos = make(rng)
    gs = GalleryScorer(caps, protos)
    with pytest.raises(ScoringError, match="image_ids length 2"):
        gs.add([0, 1], mu, mask)
    with pytest.raises(ScoringError, match="mu shape"):
        gs.add(np.arange(6), mu[:, :, :4], mask)
    with pytest.raises(ScoringError, match="k_images"):
        GalleryScorer(caps, protos, k_images=0)


def test_fill_uses_the_lowest_score_over_all_row_blocks(rng):
    mu, mask, _, protos = make(rng, n=1100, r=2, z=3)
    mask[:, 0] = True
    mu[1050, 0] = -50.0 * protos[0]  # the lowest real score sits beyond the first 1024-row block
    mask[1050, 1] = False
    got = score_matrix(mu, mask, [[0], []], protos)
    assert got[:, 1].max() == got[:, 1].min() == fill_score(float(got[:, 0].min()))
    assert got[:, 1].max() < got[:, 0].min() == got[1050, 0]


@pytest.mark.parametrize("pooling", ["max-mean", "mean"])
@pytest.mark.parametrize("new_words", [True, False])
def test_reused_word_scores_equal_recomputing_them(pooling, new_words):
    """A chunk scored from a previous index's terms (moved rows and columns, new images, new words)
    equals computing every image × word afresh (the naive twin: pooled_word_scores on all)."""
    rng = np.random.default_rng(7)
    mu, mask, _, protos = make(rng, n=7, v=12)
    words = [f"w{i}" for i in range(12)]
    # the previous index: 5 of the images (another order), a vocabulary without w3/w8 (when new_words) plus one gone
    prev_images = [4, 0, 6, 2, 5]
    prev_words = [w for w in words if not (new_words and w in ("w3", "w8"))][::-1] + ["gone"]
    prev_protos = np.vstack([protos[[words.index(w) for w in prev_words[:-1]]], rng.normal(size=(1, protos.shape[1]))])
    previous = pooled_word_scores(mu[prev_images], mask[prev_images], prev_protos, pooling=pooling)
    reuse = WordScoreReuse.between(words, prev_words)
    assert sorted(reuse.new_cols.tolist()) == ([3, 8] if new_words else [])
    prev_rows = np.asarray([prev_images.index(i) if i in prev_images else -1 for i in range(7)])
    need = (prev_rows < 0) | bool(reuse.new_cols.size)
    ws, rows_full, cells = reuse_word_scores(mu[need], mask[need], need, prev_rows, previous, reuse, protos,
                                             pooling=pooling)
    np.testing.assert_allclose(ws, pooled_word_scores(mu, mask, protos, pooling=pooling), rtol=1e-6, atol=1e-6)
    assert rows_full == 2 and cells == 2 * 12 + (5 * 2 if new_words else 0)
