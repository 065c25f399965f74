"""Tests of mask.losses against naive loop references (values and gradients) and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mask.losses as L
from mask.losses import (
    LossInputError,
    NonFiniteLoss,
    check_finite,
    loss_cl,
    loss_cm,
    loss_dias,
    loss_ir,
    mask_loss,
)

D64 = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


# ---------------------------------------------------------------------------------------------- naive references


def naive_ir(r, r_rec, mu, logvar, kl_weight):
    n = r.shape[0]
    rec = sum(sum((float(r[i, m]) - float(r_rec[i, m])) ** 2 for m in range(r.shape[1])) for i in range(n)) / n
    kl = 0.0
    for i in range(n):
        for z in range(mu.shape[1]):
            m, lv = float(mu[i, z]), float(logvar[i, z])
            kl += 0.5 * (m * m + math.exp(lv) - 1 - lv)
    kl /= n
    return rec + kl_weight * kl, rec, kl


def naive_cm(w, wp, mu):
    p = w.shape[0]
    word = sum(1 - _cos(w[i], wp[i]) for i in range(p)) / p
    pairs = [(i, j) for i in range(p) for j in range(p) if i != j]
    struct = sum((_cos(wp[i], wp[j]) - _cos(mu[i], mu[j])) ** 2 for i, j in pairs) / len(pairs) if pairs else 0.0
    return word + struct


def naive_cl(mu, words, protos, tau, regions=None, normalize=True):
    """Eq. 6 written out: distinct regions as candidates; same-word regions other than the positive dropped."""
    p = mu.shape[0]
    regions = list(range(p)) if regions is None else [int(x) for x in regions]
    first = {}
    for k, g in enumerate(regions):
        first.setdefault(g, k)
    words_of = {g: {int(words[k]) for k in range(p) if regions[k] == g} for g in first}

    def s(a, b):
        return _cos(a, b) if normalize else float(a @ b)

    total = 0.0
    for k in range(p):
        v = protos[int(words[k])]
        pos = s(v, mu[first[regions[k]]]) / tau
        den = 0.0
        for g, kk in first.items():
            if g != regions[k] and int(words[k]) in words_of[g]:
                continue
            den += math.exp(s(v, mu[kk]) / tau)
        total += -(pos - math.log(den))
    return total / p


def naive_dias(wp, w):
    n = wp.shape[1]
    c = [[(1 + _cos(wp[:, i], w[:, j])) / 2 for j in range(n)] for i in range(n)]
    out = 0.0
    for i in range(n):
        out -= c[i][i] / sum(c[i][j] for j in range(n)) + c[i][i] / sum(c[j][i] for j in range(n))
    return out


# ---------------------------------------------------------------------------------------------- values


def test_loss_ir_matches_naive():
    g = _g(0)
    r, r_rec = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mu, lv = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for w in (1.0, 0.25):
        out = loss_ir(r, r_rec, mu, lv, kl_weight=w)
        tot, rec, kl = naive_ir(r, r_rec, mu, lv, w)
        assert out["loss_ir"].item() == pytest.approx(tot, rel=1e-5)
        assert out["loss_rec"].item() == pytest.approx(rec, rel=1e-5)
        assert out["loss_kl"].item() == pytest.approx(kl, rel=1e-5)
    # KL is 0 exactly at N(0, 1)
    assert loss_ir(r, r, torch.zeros(5, 3), torch.zeros(5, 3))["loss_ir"].item() == 0.0


def test_loss_ir_zero_weight_skips_kl():
    g = _g(1)
    r = torch.randn(4, 6, generator=g)
    out = loss_ir(r, r * 0, torch.randn(4, 2, generator=g), torch.full((4, 2), float("nan")), kl_weight=0.0)
    assert "loss_kl" not in out and torch.isfinite(out["loss_ir"])


def test_loss_cm_matches_naive():
    g = _g(2)
    w, wp, mu = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 4, generator=g)
    assert loss_cm(w, wp, mu).item() == pytest.approx(naive_cm(w, wp, mu), rel=1e-5)


def test_loss_cm_excludes_diagonal_and_single_pair():
    g = _g(3)
    w, wp, mu = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 4, generator=g)
    word = sum(1 - _cos(w[i], wp[i]) for i in range(2)) / 2
    # P = 2: exactly the two ordered pairs (0,1), (1,0), which are equal → the mean is one squared gap
    expect = word + (_cos(wp[0], wp[1]) - _cos(mu[0], mu[1])) ** 2
    assert loss_cm(w, wp, mu).item() == pytest.approx(expect, rel=1e-5)
    # P = 1: the i≠j term is defined as 0
    assert loss_cm(w[:1], wp[:1], mu[:1]).item() == pytest.approx(1 - _cos(w[0], wp[0]), rel=1e-5)
    # zero vectors: cosine 0, no NaN
    z = loss_cm(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, 4))
    assert z.item() == pytest.approx(1.0)


def test_loss_cl_matches_naive():
    g = _g(4)
    mu, protos = torch.randn(7, 4, generator=g), torch.randn(5, 4, generator=g)
    words = torch.tensor([0, 1, 0, 2, 3, 1, 4])
    for normalize, tau in ((True, 0.1), (False, 0.7)):
        got = loss_cl(mu, words, protos, tau, normalize=normalize).item()
        assert got == pytest.approx(naive_cl(mu, words, protos, tau, normalize=normalize), rel=1e-5)


def test_loss_cl_multiword_regions_counted_once():
    g = _g(5)
    # regions: 10 carries words {0, 1}; 11 carries {1}; 12 carries {2}; 13 carries {0, 2}
    regions = torch.tensor([10, 10, 11, 12, 13, 13])
    words = torch.tensor([0, 1, 1, 2, 0, 2])
    base = torch.randn(4, 3, generator=g)
    mu = base[torch.tensor([0, 0, 1, 2, 3, 3])]
    protos = torch.randn(3, 3, generator=g)
    got = loss_cl(mu, words, protos, 0.2, region_ids=regions).item()
    assert got == pytest.approx(naive_cl(mu, words, protos, 0.2, regions), rel=1e-5)
    # by hand for pair 0 (word 0, region 10): candidates = 10 (positive), 11, 12; 13 also has word 0
    v = F.normalize(protos[0], dim=0)
    s = [float(v @ F.normalize(base[i], dim=0)) / 0.2 for i in range(4)]
    pair0 = -(s[0] - math.log(math.exp(s[0]) + math.exp(s[1]) + math.exp(s[2])))
    assert _single(mu, words, protos, 0.2, regions, 0) == pytest.approx(pair0, rel=1e-6)
    assert got * 6 == pytest.approx(sum(_single(mu, words, protos, 0.2, regions, k) for k in range(6)), rel=1e-5)


def _single(mu, words, protos, tau, regions, k):
    """Pair k's term of eq. 6, straight from the definition of "regions carrying word w_k"."""
    regions = [int(x) for x in regions]
    first = {}
    for i, gg in enumerate(regions):
        first.setdefault(gg, i)
    v = protos[int(words[k])]
    pos = _cos(v, mu[first[regions[k]]]) / tau
    den = 0.0
    for gg, i in first.items():
        carries = any(regions[j] == gg and int(words[j]) == int(words[k]) for j in range(len(words)))
        if gg != regions[k] and carries:
            continue
        den += math.exp(_cos(v, mu[i]) / tau)
    return -(pos - math.log(den))


def test_loss_cl_same_word_regions_are_not_negatives():
    g = _g(6)
    mu, protos = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    words = torch.tensor([0, 0, 1])  # regions 0 and 1 share word 0
    tau = 0.5
    v = F.normalize(protos, dim=1)
    m = F.normalize(mu, dim=1)
    s = (v[words] @ m.T / tau).tolist()  # s[k][n]

    def term(k, cands):
        return -(s[k][k] - math.log(sum(math.exp(s[k][n]) for n in cands)))

    expect = (term(0, [0, 2]) + term(1, [1, 2]) + term(2, [0, 1, 2])) / 3
    got = loss_cl(mu, words, protos, tau).item()
    assert got == pytest.approx(expect, rel=1e-6)
    with_neg = (term(0, [0, 1, 2]) + term(1, [0, 1, 2]) + term(2, [0, 1, 2])) / 3
    assert abs(got - with_neg) > 1e-3  # the exclusion matters


def test_loss_cl_single_pair_and_empty():
    mu, protos = torch.randn(1, 4), torch.randn(3, 4)
    assert loss_cl(mu, torch.tensor([2]), protos, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    z = loss_cl(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), protos, 0.1)
    assert z.item() == 0.0


def test_loss_dias_matches_naive():
    g = _g(7)
    wp, w = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    assert loss_dias(wp, w).item() == pytest.approx(naive_dias(wp, w), rel=1e-5)
    # aligned columns score lower (better) than independent ones
    assert loss_dias(w, w).item() < loss_dias(wp, w).item()


# ---------------------------------------------------------------------------------------------- gradients


def test_gradcheck_all_terms():
    g = _g(8)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=D64, requires_grad=True)

    r, r_rec, mu, lv = rnd(4, 5), rnd(4, 5), rnd(4, 3), rnd(4, 3)
    assert torch.autograd.gradcheck(lambda a, b, c, d: loss_ir(a, b, c, d, 0.5)["loss_ir"], (r, r_rec, mu, lv))
    w, wp, m = rnd(5, 4), rnd(5, 4), rnd(5, 3)
    assert torch.autograd.gradcheck(loss_cm, (w, wp, m))
    words = torch.tensor([0, 1, 0, 2, 1])
    regions = torch.tensor([0, 0, 1, 2, 3])
    protos = rnd(3, 3)
    m_cl = rnd(5, 3)
    for norm in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, norm=norm: loss_cl(a, words, b, 0.3, region_ids=regions, normalize=norm), (m_cl, protos))
    assert torch.autograd.gradcheck(loss_dias, (rnd(6, 4), rnd(6, 4)))


# ---------------------------------------------------------------------------------------------- eq. 14


def _batch(seed=9, V=6, M=5, Z=4, N=3):
    g = _g(seed)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    batch = {
        "features": torch.randn(3, 4, M, generator=g),
        "mask": mask,
        "pair_image": torch.tensor([0, 0, 0, 1, 2, 2]),
        "pair_slot": torch.tensor([0, 0, 2, 0, 0, 1]),
        "pair_word": torch.tensor([1, 3, 1, 5, 0, 3]),
        "word_vectors": torch.randn(V, N, generator=g),
    }
    out = {k: torch.randn(3, 4, d, generator=g) for k, d in (("mu", Z), ("logvar", Z), ("r_rec", M),
                                                               ("w_pred", N))}
    out = {k: v.masked_fill(~mask[..., None], 0).requires_grad_(True) for k, v in out.items()}
    protos = torch.randn(V, Z, generator=g, requires_grad=True)
    return out, batch, protos


def test_mask_loss_composes_terms():
    out, batch, protos = _batch()
    got = mask_loss(out, batch, lambda_cm=2.0, lambda_cl=3.0, kl_weight=0.5, tau=0.2, dias_weight=0.7,
                    prototypes=protos)
    m = batch["mask"]
    pi, ps, pw = batch["pair_image"], batch["pair_slot"], batch["pair_word"]
    ir = loss_ir(batch["features"][m], out["r_rec"][m], out["mu"][m], out["logvar"][m], 0.5)
    mu_p, wp = out["mu"][pi, ps], out["w_pred"][pi, ps]
    w = batch["word_vectors"][pw]
    cm = naive_cm(w, wp, mu_p)
    cl = naive_cl(mu_p, pw, protos, 0.2, regions=pi * 4 + ps)
    di = naive_dias(wp, w)
    assert got["loss_cm"].item() == pytest.approx(cm, rel=1e-5)
    assert got["loss_cl"].item() == pytest.approx(cl, rel=1e-5)
    assert got["loss_dias"].item() == pytest.approx(di, rel=1e-5)
    assert got["loss_ir"].item() == pytest.approx(ir["loss_ir"].item(), rel=1e-6)
    total = ir["loss_ir"].item() + 2 * cm + 3 * cl + 0.7 * di
    assert got["loss"].item() == pytest.approx(total, rel=1e-5)
    got["loss"].backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0
    for k, v in out.items():
        assert (v.grad[~m] == 0).all(), k  # padded slots get no gradient


def test_zero_weights_skip_terms(monkeypatch):
    out, batch, protos = _batch()

    def boom(*a, **k):
        raise AssertionError("computed a skipped term")

    monkeypatch.setattr(L, "loss_cm", boom)
    monkeypatch.setattr(L, "loss_cl", boom)
    monkeypatch.setattr(L, "loss_dias", boom)
    got = mask_loss(out, batch, lambda_cm=0.0, lambda_cl=0.0, kl_weight=0.0, dias_weight=0.0, prototypes=None)
    assert set(got) == {"loss", "loss_ir", "loss_rec"}
    assert got["loss"].item() == pytest.approx(got["loss_rec"].item())


def test_default_keys_and_prototypes_required():
    out, batch, protos = _batch()
    got = mask_loss(out, batch, prototypes=protos)
    assert set(got) == {"loss", "loss_ir", "loss_rec", "loss_kl", "loss_cm", "loss_cl"}
    with pytest.raises(LossInputError, match="prototypes are required"):
        mask_loss(out, batch)


def test_degenerate_batches_are_finite():
    out, batch, protos = _batch()
    empty = dict(batch, pair_image=torch.zeros(0, dtype=torch.long), pair_slot=torch.zeros(0, dtype=torch.long),
                 pair_word=torch.zeros(0, dtype=torch.long))
    got = mask_loss(out, empty, dias_weight=1.0, prototypes=protos)
    assert got["loss_cm"].item() == got["loss_cl"].item() == got["loss_dias"].item() == 0.0
    check_finite(got, step=0)
    got["loss"].backward()
    no_regions = dict(empty, mask=torch.zeros(3, 4, dtype=torch.bool))
    got = mask_loss(out, no_regions, prototypes=protos)
    assert got["loss"].item() == 0.0
    one = dict(batch, pair_image=torch.tensor([1]), pair_slot=torch.tensor([0]), pair_word=torch.tensor([2]))
    check_finite(mask_loss(out, one, dias_weight=1.0, prototypes=protos))


def test_bad_batches_named():
    out, batch, protos = _batch()
    with pytest.raises(LossInputError, match=r"pair 1 points at padded slot \(image 1, slot 3\)"):
        mask_loss(out, dict(batch, pair_image=torch.tensor([0, 1, 0, 1, 2, 2]),
                            pair_slot=torch.tensor([0, 3, 2, 0, 0, 1])), prototypes=protos)
    with pytest.raises(LossInputError, match="pair_word has values in"):
        mask_loss(out, dict(batch, pair_word=torch.tensor([1, 3, 1, 6, 0, 3])), prototypes=protos)
    with pytest.raises(LossInputError, match="batch lacks"):
        mask_loss(out, {k: v for k, v in batch.items() if k != "mask"}, prototypes=protos)
    with pytest.raises(LossInputError, match="pair_slot has length"):
        mask_loss(out, dict(batch, pair_slot=torch.tensor([0])), prototypes=protos)
    with pytest.raises(LossInputError, match="tau must be > 0"):
        loss_cl(torch.randn(2, 4), torch.tensor([0, 1]), protos, 0.0)
    with pytest.raises(LossInputError, match="w_pred has 2 rows"):
        loss_cm(torch.randn(3, 3), torch.randn(2, 3), torch.randn(3, 4))


def test_check_finite_names_term():
    terms = {"loss": torch.tensor(float("nan")), "loss_ir": torch.tensor(1.0),
             "loss_cl": torch.tensor(float("nan")), "loss_cm": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLoss, match="^step 12: loss_cl is nan$") as e:
        check_finite(terms, step=12)
    assert e.value.term == "loss_cl" and e.value.step == 12 and isinstance(e.value, FloatingPointError)
    with pytest.raises(NonFiniteLoss, match="^loss_cm is inf$"):
        check_finite({"loss_cm": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteLoss, match="^step 3: loss is nan$"):
        check_finite({"loss_ir": 1.0, "loss": float("nan")}, step=3)
    check_finite({"loss": torch.tensor(2.0), "loss_ir": 1.0}, step=1)


def test_non_finite_loss_travels_as_a_value():
    """A Ray worker hands the driver the exception itself (pickled), not a message to parse back."""
    import pickle

    e = pickle.loads(pickle.dumps(NonFiniteLoss("loss_cl", "nan", 12)))
    assert isinstance(e, NonFiniteLoss) and (e.term, e.value, e.step) == ("loss_cl", "nan", 12)
    assert str(e) == "step 12: loss_cl is nan"


def test_nan_model_output_is_caught_by_name():
    out, batch, protos = _batch()
    out = dict(out, w_pred=out["w_pred"].detach().clone())
    out["w_pred"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="step 5: loss_cm is nan"):
        check_finite(mask_loss(out, batch, prototypes=protos), step=5)


def test_training_steps_reduce_total_loss():
    """End to end on tiny sizes: MaskNet + PrototypeTable + mask_loss + Adam lower eq. 14."""
    from mask.models import MaskNet, PrototypeTable

    torch.manual_seed(0)
    _, batch, _ = _batch()
    net, table = MaskNet(5, 8, 4, num_heads=2, pae_layers=1), PrototypeTable(6, 8)
    batch = dict(batch, word_vectors=torch.randn(6, 4))
    opt = torch.optim.Adam([*net.parameters(), *table.parameters()], lr=1e-2)
    losses = []
    for step in range(40):
        terms = mask_loss(net(batch["features"], batch["mask"]), batch, prototypes=table.weight, dias_weight=0.1)
        check_finite(terms, step)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------------------------------------- literal-form switches


def naive_cl_literal(mu, words, protos, tau, regions, normalize):
    """Eq. 6 literally: every other distinct region of the batch is a negative, same word or not."""
    p = mu.shape[0]
    regions = [int(x) for x in regions]
    first = {}
    for k, g in enumerate(regions):
        first.setdefault(g, k)

    def s(a, b):
        return _cos(a, b) if normalize else float(a @ b)

    total = 0.0
    for k in range(p):
        v = protos[int(words[k])]
        den = sum(math.exp(s(v, mu[kk]) / tau) for kk in first.values())
        total += -(s(v, mu[first[regions[k]]]) / tau - math.log(den))
    return total / p


def test_loss_ir_mean_reduction_is_per_dimension():
    g = _g(21)
    r, r_rec = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mu, lv = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    out = loss_ir(r, r_rec, mu, lv, kl_weight=0.5, reduction="mean")
    _, rec, kl = naive_ir(r, r_rec, mu, lv, 0.5)
    assert out["loss_rec"].item() == pytest.approx(rec / 7, rel=1e-5)  # per feature dimension M
    assert out["loss_kl"].item() == pytest.approx(kl / 3, rel=1e-5)  # per latent dimension Z
    assert out["loss_ir"].item() == pytest.approx(rec / 7 + 0.5 * kl / 3, rel=1e-5)
    with pytest.raises(L.LossInputError, match="reduction"):
        loss_ir(r, r_rec, mu, lv, reduction="max")


def test_loss_cl_literal_negatives_match_naive():
    g = _g(22)
    mu, protos = torch.randn(7, 4, generator=g), torch.randn(5, 4, generator=g)
    words = torch.tensor([0, 1, 0, 2, 3, 1, 0])
    regions = torch.tensor([0, 1, 2, 3, 3, 4, 5])
    for normalize, tau in ((True, 0.1), (False, 0.7)):
        got = loss_cl(mu, words, protos, tau, region_ids=regions, normalize=normalize, exclude_same_word=False)
        assert got.item() == pytest.approx(naive_cl_literal(mu, words, protos, tau, regions, normalize), rel=1e-5)
        ours = loss_cl(mu, words, protos, tau, region_ids=regions, normalize=normalize)
        assert ours.item() == pytest.approx(naive_cl(mu, words, protos, tau, regions, normalize), rel=1e-5)
        assert got.item() > ours.item()  # more negatives in the denominator


def test_mask_loss_passes_the_switches_and_shares_sum_to_one():
    out, batch, protos = _batch()
    got = mask_loss(out, batch, lambda_cm=2.0, lambda_cl=3.0, kl_weight=0.5, tau=0.2, prototypes=protos,
                    ir_reduction="mean", cl_exclude_same_word=False, cl_normalize=False)
    m = batch["mask"]
    pi, ps, pw = batch["pair_image"], batch["pair_slot"], batch["pair_word"]
    ir = loss_ir(batch["features"][m], out["r_rec"][m], out["mu"][m], out["logvar"][m], 0.5, reduction="mean")
    assert got["loss_ir"].item() == pytest.approx(ir["loss_ir"].item(), rel=1e-6)
    cl = naive_cl_literal(out["mu"][pi, ps], pw, protos, 0.2, pi * 4 + ps, normalize=False)
    assert got["loss_cl"].item() == pytest.approx(cl, rel=1e-5)
    terms = {k: float(v) for k, v in got.items()}
    shares = L.loss_shares(terms, lambda_cm=2.0, lambda_cl=3.0, kl_weight=0.5)
    assert set(shares) == {"share_rec", "share_kl", "share_cm", "share_cl"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["share_cl"] == pytest.approx(3.0 * terms["loss_cl"] / terms["loss"], rel=1e-5)
    assert shares["share_rec"] == pytest.approx(terms["loss_rec"] / terms["loss"], rel=1e-5)
