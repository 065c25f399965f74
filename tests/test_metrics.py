"""mask.metrics: R@K both directions against a per-query loop; pessimistic ties; COCO folds."""

from __future__ import annotations

import numpy as np
import pytest

from mask.metrics import MetricsError, coco_5fold_1k, coco_5k, ranks, recall_at_k


def recall_naive(sim, c2i, sim_t2i=None):
    """Per-query loop: sort each query's gallery with ties placing the true items last (pessimistic)."""
    sim_t2i = sim if sim_t2i is None else sim_t2i
    n_img, n_cap = sim.shape
    i2t_ranks = []
    for i in range(n_img):
        gts = {j for j in range(n_cap) if c2i[j] == i}
        if not gts:
            continue
        order = sorted(range(n_cap), key=lambda j: (-sim[i, j], j in gts))  # wrong items first on ties
        i2t_ranks.append(min(order.index(j) for j in gts))
    t2i_ranks = []
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-sim_t2i[i, j], i == c2i[j]))
        t2i_ranks.append(order.index(c2i[j]))
    out = {}
    for name, r in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
    out["rsum"] = sum(out.values())
    return out


def check(got, ref):
    assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    for k in ref:
        assert got[k] == pytest.approx(ref[k]), k


def test_matches_naive_random(rng):
    sim = rng.normal(size=(20, 100))
    sim[np.arange(20), np.arange(0, 100, 5)] += 1.5  # make some hits
    check(recall_at_k(sim), recall_naive(sim, np.arange(100) // 5))


def test_matches_naive_with_ties(rng):
    sim = rng.integers(0, 3, size=(12, 36)).astype(np.float32)
    check(recall_at_k(sim, 3), recall_naive(sim, np.arange(36) // 3))


def test_perfect_and_constant():
    n = 12
    sim = np.full((n, 5 * n), -1.0)
    sim[np.arange(5 * n) // 5, np.arange(5 * n)] = 1.0
    assert recall_at_k(sim)["rsum"] == 600.0
    const = recall_at_k(np.zeros((n, 5 * n)))  # pessimistic: every wrong tie counts ahead
    assert const["i2t_r1"] == 0.0 and const["t2i_r10"] == 0.0
    assert recall_at_k(np.zeros((1, 5)))["rsum"] == 600.0  # one image: nothing to beat it


def test_explicit_mapping_and_images_without_captions(rng):
    sim = rng.normal(size=(7, 11))
    c2i = np.array([0, 0, 2, 3, 3, 3, 5, 6, 6, 2, 0])  # images 1 and 4 own no caption
    check(recall_at_k(sim, caption_to_image=c2i), recall_naive(sim, c2i))
    i2t, _ = ranks(sim, caption_to_image=c2i)
    assert i2t[1] == -1 and i2t[4] == -1


def test_separate_t2i_matrix(rng):
    sim, sim2 = rng.normal(size=(6, 30)), rng.normal(size=(6, 30))
    check(recall_at_k(sim, t2i_similarity=sim2), recall_naive(sim, np.arange(30) // 5, sim2))


def test_small_blocks(rng):
    sim = rng.normal(size=(9, 45))
    a = ranks(sim, block=2)
    b = ranks(sim)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_coco_folds(rng):
    sim = rng.normal(size=(50, 250))
    sim[np.arange(250) // 5, np.arange(250)] += 1.0
    got = coco_5fold_1k(sim)
    folds = [recall_naive(sim[f * 10:(f + 1) * 10, f * 50:(f + 1) * 50], np.arange(50) // 5) for f in range(5)]
    check(got, {k: np.mean([f[k] for f in folds]) for k in folds[0]})
    check(coco_5k(sim), recall_naive(sim, np.arange(250) // 5))
    with pytest.raises(MetricsError, match="not divisible into 5 folds"):
        coco_5fold_1k(sim[:49, :245])


def test_errors():
    with pytest.raises(MetricsError, match=r"similarity has 11 captions for 2 images, expected 2 × 5 = 10"):
        recall_at_k(np.zeros((2, 11)))
    bad = np.zeros((2, 10))
    bad[1, 3] = np.nan
    with pytest.raises(MetricsError, match=r"similarity: NaN at \[1, 3\]"):
        recall_at_k(bad)
    with pytest.raises(MetricsError, match=r"caption_to_image\[1\] = 5 is outside \[0, 2\)"):
        recall_at_k(np.zeros((2, 3)), caption_to_image=[0, 5, 1])
    with pytest.raises(MetricsError, match="caption_to_image has 2 entries for 3 captions"):
        recall_at_k(np.zeros((2, 3)), caption_to_image=[0, 1])
    with pytest.raises(MetricsError, match=r"t2i_similarity shape \(2, 5\) and similarity shape \(2, 10\)"):
        recall_at_k(np.zeros((2, 10)), t2i_similarity=np.zeros((2, 5)))
    with pytest.raises(MetricsError, match="expected an"):
        recall_at_k(np.zeros(10))


def test_nearest_centroid_accuracy(rng):
    from mask.metrics import nearest_centroid_accuracy

    centres = rng.normal(size=(4, 16)) * 3
    y_tr, y_te = rng.integers(4, size=200), rng.integers(4, size=100)
    x_tr = centres[y_tr] + rng.normal(size=(200, 16))
    x_te = centres[y_te] + rng.normal(size=(100, 16))
    assert nearest_centroid_accuracy(x_tr, y_tr, x_te, y_te) > 0.95
    # labels unrelated to the features: about chance (1/4)
    assert nearest_centroid_accuracy(x_tr, rng.permutation(y_tr), x_te, y_te) < 0.5
    # a naive loop over the test rows agrees (centred, unit rows, argmax of the dot product with the centroids)
    mu = x_tr.mean(0)
    u = lambda f: (f - mu) / np.linalg.norm(f - mu, axis=1, keepdims=True)  # noqa: E731
    cents = {k: u(x_tr)[y_tr == k].mean(0) for k in range(4)}
    naive = np.mean([max(cents, key=lambda k: float(u(x_te)[i] @ cents[k])) == y_te[i] for i in range(100)])
    assert nearest_centroid_accuracy(x_tr, y_tr, x_te, y_te) == pytest.approx(naive)
    # string labels; a test label never seen in training is an error of the classifier
    names = np.array(["a", "b", "c", "d"])
    assert nearest_centroid_accuracy(x_tr, names[y_tr], x_te, np.full(100, "z")) == 0.0
    with pytest.raises(MetricsError, match="equal D"):
        nearest_centroid_accuracy(x_tr, y_tr, x_te[:, :3], y_te)
    with pytest.raises(MetricsError, match="labels"):
        nearest_centroid_accuracy(x_tr, y_tr[:5], x_te, y_te)
