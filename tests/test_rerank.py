"""mask.rerank: eq. 15 against a per-query loop; z-score rules; both directions; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask.metrics import recall_at_k
from mask.rerank import RerankError, rerank_both, rerank_topk, zscore


def zs_naive(x):
    x = [float(v) for v in x]
    if max(x) == min(x):
        return [0.0] * len(x)
    mean = sum(x) / len(x)
    std = (sum((v - mean) ** 2 for v in x) / len(x)) ** 0.5
    return [(v - mean) / std for v in x]


def rerank_naive(base, mask, k, alpha):
    out = []
    for b, m in zip(base, mask, strict=True):
        k_ = min(k, len(b))
        cand = sorted(range(len(b)), key=lambda j: (-b[j], j))[:k_]
        zb = zs_naive([b[j] for j in cand])
        zm = zs_naive([m[j] for j in cand])
        fused = [zb[i] + alpha * zm[i] for i in range(k_)]
        order = sorted(range(k_), key=lambda i: (-fused[i], i))
        out.append([cand[i] for i in order])
    return np.array(out, np.int64)


@pytest.mark.parametrize("k,alpha", [(1, 0.5), (3, 0.15), (5, 1.0), (8, 3.0), (20, 0.7)])
def test_matches_naive(rng, k, alpha):
    base = rng.normal(size=(6, 8))
    mask = rng.normal(size=(6, 8))
    got = rerank_topk(base, mask, k, alpha)
    assert got.dtype == np.int64 and got.shape == (6, min(k, 8))
    np.testing.assert_array_equal(got, rerank_naive(base, mask, k, alpha))


def test_ties_and_constant_vectors(rng):
    base = rng.integers(0, 3, size=(10, 7)).astype(float)  # ties in the base
    mask = rng.integers(0, 2, size=(10, 7)).astype(float)
    mask[0] = 0.3  # constant MASK scores: z-score 0, base order kept
    for k in (1, 3, 7):
        np.testing.assert_array_equal(rerank_topk(base, mask, k, 0.8), rerank_naive(base, mask, k, 0.8))
    base_order = rerank_topk(base, mask, 4, 0.0)  # α = 0 keeps the base top-k order
    np.testing.assert_array_equal(base_order, rerank_naive(base, np.zeros_like(base), 4, 0.0))
    np.testing.assert_array_equal(rerank_topk(base[:1], mask[:1], 4, 5.0), base_order[:1])


def test_large_alpha_orders_by_mask_within_the_candidates(rng):
    base = rng.normal(size=(4, 9))
    mask = rng.normal(size=(4, 9))
    got = rerank_topk(base, mask, 5, 1e6)
    for q in range(4):
        cand = np.argsort(-base[q])[:5]
        assert set(got[q]) == set(cand)
        assert list(got[q]) == sorted(cand, key=lambda j: -mask[q, j])


def test_zscore():
    np.testing.assert_allclose(zscore([1.0, 2.0, 3.0]), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    np.testing.assert_array_equal(zscore([0.1, 0.1, 0.1]), 0.0)  # float mean of equal values is not exact
    np.testing.assert_array_equal(zscore([[5.0], [7.0]], axis=1), [[0.0], [0.0]])


def test_errors(rng):
    base = rng.normal(size=(3, 4))
    with pytest.raises(RerankError, match=r"base_scores shape \(3, 4\) and mask_scores shape \(3, 5\)"):
        rerank_topk(base, np.zeros((3, 5)), 2, 0.1)
    bad = base.copy()
    bad[1, 2] = np.nan
    with pytest.raises(RerankError, match=r"mask_scores: non-finite value nan at \[1, 2\]"):
        rerank_topk(base, bad, 2, 0.1)
    with pytest.raises(RerankError, match="base_scores: non-finite"):
        rerank_both(bad, base, 2, 0.1)
    with pytest.raises(RerankError, match="k: must be at least 1"):
        rerank_topk(base, base, 0, 0.1)
    with pytest.raises(RerankError, match="alpha"):
        rerank_topk(base, base, 2, float("nan"))
    with pytest.raises(RerankError, match="2-D"):
        rerank_topk(base[0], base[0], 2, 0.1)


def test_torch_inputs(rng):
    base, mask = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    np.testing.assert_array_equal(rerank_topk(torch.from_numpy(base), torch.from_numpy(mask), 3, 0.5),
                                  rerank_topk(base, mask, 3, 0.5))


def test_rerank_both_directions(rng):
    n_img, n_cap, k, alpha = 6, 30, 4, 0.9
    base = rng.normal(size=(n_img, n_cap))
    mask = rng.normal(size=(n_img, n_cap))
    res = rerank_both(base, mask, k, alpha)
    assert res.i2t.shape == res.t2i.shape == (n_img, n_cap)
    # image → text: each row's top-k, in fused order, above everything else; the rest in base order
    expected = rerank_naive(base, mask, k, alpha)
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda j: (-res.i2t[i, j], j))
        assert order[:k] == list(expected[i])
        rest = [j for j in sorted(range(n_cap), key=lambda j: (-base[i, j], j)) if j not in expected[i]]
        assert order[k:] == rest
    # text → image: per caption column
    expected_t = rerank_naive(base.T, mask.T, k, alpha)
    for c in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-res.t2i[i, c], i))
        assert order[:k] == list(expected_t[c])
    # usable by the metrics
    r = recall_at_k(res.i2t, 5, t2i_similarity=res.t2i)
    assert 0.0 <= r["rsum"] <= 600.0
    # k beyond the gallery is clipped (image side has only 6 images)
    res_big = rerank_both(base, mask, 50, alpha)
    for c in range(3):
        order = sorted(range(n_img), key=lambda i: (-res_big.t2i[i, c], i))
        assert order == list(rerank_naive(base.T[c:c + 1], mask.T[c:c + 1], 6, alpha)[0])


@pytest.mark.parametrize("scale,dtype", [(1e18, np.float64), (1.0, np.float32), (1e36, np.float32)])
def test_rerank_both_large_scores_stay_ordered(rng, scale, dtype):
    base = (rng.normal(size=(3, 15)) * scale).astype(dtype)
    mask = rng.normal(size=(3, 15)).astype(dtype)
    res = rerank_both(base, mask, 5, 1.0)
    assert np.isfinite(res.i2t).all() and np.isfinite(res.t2i).all()
    for i in range(3):
        order = np.argsort(-res.i2t[i], kind="stable")
        assert list(order[:5]) == list(rerank_naive(base[i:i + 1], mask[i:i + 1], 5, 1.0)[0])
        assert len(set(res.i2t[i][order[:5]])) == 5  # no candidate collapsed into a tie
