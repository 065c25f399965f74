"""Tests of mask.finetune (Appendix H, eq. 88–93) against a naive numpy reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mask.finetune import FinetuneInputError, cycle_consistency_loss, finetune_prototypes


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def naive_cycle(u, mu, W):
    """Eq. 88–93 with loops: rows of S are softmaxed for û, columns for μ̂."""
    n_words, n_regions = u.shape[0], mu.shape[0]
    uw, mw = u @ W, mu @ W
    S = np.array([[uw[j] @ mw[n] for n in range(n_regions)] for j in range(n_words)])  # (88)
    u_hat = np.stack([_softmax(S[j]) @ mw for j in range(n_words)])  # (89)
    mu_hat = np.stack([_softmax(S[:, n]) @ uw for n in range(n_regions)])
    # (90): Ŷ = softmax(uW ûᵀ)ᵀ; column j of Ŷ = softmax of row j of uW ûᵀ; (91) -y_jᵀ log ŷ_j
    r2w = -sum(np.log(_softmax(np.array([uw[j] @ u_hat[b] for b in range(n_words)]))[j]) for j in range(n_words))
    w2r = -sum(np.log(_softmax(np.array([mw[n] @ mu_hat[b] for b in range(n_regions)]))[n]) for n in range(n_regions))
    return r2w + w2r, r2w, w2r  # (93)


def test_loss_matches_naive(rng):
    u, mu = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    W = np.eye(3) + 0.3 * rng.normal(size=(3, 3))
    got = cycle_consistency_loss(*(torch.tensor(x) for x in (u, mu, W)))
    ss, r2w, w2r = naive_cycle(u, mu, W)
    assert got["loss_ss"].item() == pytest.approx(ss, rel=1e-9)
    assert got["loss_r2w"].item() == pytest.approx(r2w, rel=1e-9)
    assert got["loss_w2r"].item() == pytest.approx(w2r, rel=1e-9)
    mean = cycle_consistency_loss(*(torch.tensor(x) for x in (u, mu, W)), reduction="mean")
    assert mean["loss_ss"].item() == pytest.approx(r2w / 4 + w2r / 6, rel=1e-9)


def test_gradcheck(rng):
    args = tuple(torch.tensor(rng.normal(size=s), requires_grad=True) for s in ((3, 2), (4, 2), (2, 2)))
    assert torch.autograd.gradcheck(lambda a, b, c: cycle_consistency_loss(a, b, c)["loss_ss"], args)


def _toy(rng, K=8, Z=6, batches=5):
    """Target-domain regions are the prototypes seen through a fixed distortion, plus noise."""
    protos = rng.normal(size=(K, Z)).astype(np.float32)
    A = (np.eye(Z) + 0.8 * rng.normal(size=(Z, Z))).astype(np.float32)
    mus, words = [], []
    for _ in range(batches):
        ids = rng.choice(K, size=5, replace=False)
        mus.append(protos[rng.choice(K, size=5, replace=False)] @ A + 0.05 * rng.normal(size=(5, Z)))
        words.append(ids)
    return protos, mus, words


def _mean_loss(protos, mus, words, W):
    v = torch.nn.functional.normalize(torch.tensor(protos), dim=-1)
    Wt = torch.tensor(W)
    tot = 0.0
    for m, ids in zip(mus, words, strict=True):
        mt = torch.nn.functional.normalize(torch.tensor(m, dtype=torch.float32), dim=-1)
        tot += cycle_consistency_loss(v[torch.tensor(ids)], mt, Wt)["loss_ss"].item()
    return tot / len(mus)


def test_few_steps_reduce_loss(rng):
    protos, mus, words = _toy(rng)
    W0 = finetune_prototypes(protos, mus, words, steps=0)
    np.testing.assert_array_equal(W0, np.eye(protos.shape[1], dtype=np.float32))
    W = finetune_prototypes(protos, mus, words, steps=30, lr=0.05, seed=0)
    assert W.shape == (6, 6) and W.dtype == np.float32
    before, after = _mean_loss(protos, mus, words, W0), _mean_loss(protos, mus, words, W)
    assert after < 0.9 * before, (before, after)
    W2 = finetune_prototypes(protos, mus, words, steps=30, lr=0.05, seed=0)
    np.testing.assert_array_equal(W, W2)  # deterministic
    state = torch.random.get_rng_state()
    finetune_prototypes(protos, mus, words, steps=2, seed=123)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG side effect


def test_one_shot_iterators_stop_early(rng, caplog):
    protos, mus, words = _toy(rng, batches=3)
    with caplog.at_level(logging.INFO, logger="mask.finetune"):
        W = finetune_prototypes(protos, iter(mus), iter(words), steps=10, lr=0.05)
    assert "exhausted after 3 of 10 steps" in caplog.text
    W3 = finetune_prototypes(protos, mus, words, steps=3, lr=0.05)
    np.testing.assert_allclose(W, W3)


def test_empty_batches_skipped_and_counted(rng, caplog):
    protos, mus, words = _toy(rng, batches=2)
    mus = [mus[0], np.zeros((0, 6)), mus[1]]
    words = [words[0], words[0], words[1]]
    with caplog.at_level(logging.INFO, logger="mask.finetune"):
        finetune_prototypes(protos, mus, words, steps=4)
    assert "4 steps, 2 empty batches skipped" in caplog.text
    with pytest.raises(FinetuneInputError, match="every batch is empty"):
        finetune_prototypes(protos, [np.zeros((0, 6))], [np.array([1])], steps=2)


def test_bad_inputs(rng):
    protos, mus, words = _toy(rng)
    with pytest.raises(FinetuneInputError, match="indices outside"):
        finetune_prototypes(protos, mus, [np.array([0, 99])] * 5, steps=1)
    with pytest.raises(FinetuneInputError, match=r"expected \(I, 6\)"):
        finetune_prototypes(protos, [np.zeros((3, 5))], words, steps=1)
    with pytest.raises(FinetuneInputError, match="prototypes must be a float"):
        finetune_prototypes(np.zeros(4), mus, words, steps=1)
    with pytest.raises(FinetuneInputError, match="NaN"):
        finetune_prototypes(protos, [np.full((2, 6), np.nan)], words, steps=1)
    with pytest.raises(FinetuneInputError, match="do not fit"):
        cycle_consistency_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.eye(3))
    with pytest.raises(FinetuneInputError, match="at least one word"):
        cycle_consistency_loss(torch.zeros(0, 3), torch.zeros(2, 3), torch.eye(3))
