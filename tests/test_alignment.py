"""Modality-gap measures (mask.alignment) on distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask.alignment import (
    AlignmentInputError,
    centroid_gap,
    empirical_w2,
    gap_measures,
    gaussian_w2,
    gaussian_w2_from_moments,
    mtm_from_state,
    mtm_predict,
    pair_measures,
    retrieval_by_metric,
)


def _naive_gaussian_w2(m1, s1, m2, s2):
    """Reference with scipy's general sqrtm and the other ordering of the cross term."""
    from scipy.linalg import sqrtm

    r1 = sqrtm(s1)
    cross = sqrtm(r1 @ s2 @ r1)
    return float(np.sqrt(max(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(cross)), 0.0)))


def test_shifted_sample_has_w2_equal_to_the_shift(rng):
    x = rng.normal(size=(300, 8))
    delta = rng.normal(size=8)
    y = x + delta
    # same covariance, means differ by delta: Gaussian W2 = |delta|; the optimal coupling of the
    # empirical clouds is the identity, so the exact W2 is |delta| too
    assert gaussian_w2(x, y) == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    w2, n = empirical_w2(x, y)
    assert n == 300
    assert w2 == pytest.approx(np.linalg.norm(delta), rel=1e-9)


def test_isotropic_gaussians_closed_form():
    d = 5
    m1, m2 = np.zeros(d), np.full(d, 2.0)
    s1, s2 = 0.5 ** 2 * np.eye(d), 1.5 ** 2 * np.eye(d)
    # W2² = |m1 - m2|² + d (σ1 - σ2)²
    expected = np.sqrt(4.0 * d + d * (0.5 - 1.5) ** 2)
    assert gaussian_w2_from_moments(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)


def test_general_covariances_match_the_sqrtm_reference(rng):
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    got = gaussian_w2_from_moments(m1, s1, m2, s2)
    assert got == pytest.approx(_naive_gaussian_w2(m1, s1, m2, s2), rel=1e-8)
    assert got == pytest.approx(gaussian_w2_from_moments(m2, s2, m1, s1), rel=1e-8)  # symmetric
    assert gaussian_w2_from_moments(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_fit_of_large_samples_approaches_the_population_value(rng):
    x = rng.normal(size=(20000, 3))
    y = 2.0 * rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, 0.0])
    # N(0, I) vs N((1,0,0), 4I): W2² = 1 + 3·(2-1)² = 4
    assert gaussian_w2(x, y) == pytest.approx(2.0, rel=0.02)


def test_exact_w2_in_one_dimension_is_the_sorted_matching(rng):
    x, y = rng.normal(size=(50, 1)), rng.exponential(size=(50, 1))
    w2, _ = empirical_w2(x, y)
    naive = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert w2 == pytest.approx(naive, rel=1e-12)


def test_exact_w2_subsamples_unequal_sizes_deterministically(rng):
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(25, 3)) + 3.0
    a, n = empirical_w2(x, y, seed=1)
    b, _ = empirical_w2(x, y, seed=1)
    assert n == 25 and a == b
    _, n = empirical_w2(x, y, max_points=10)
    assert n == 10


def test_centroid_gap():
    x = np.array([[1.0, 0.0], [2.0, 0.0]])  # unit rows: (1, 0)
    y = np.array([[0.0, 3.0], [0.0, 0.5]])  # unit rows: (0, 1)
    assert centroid_gap(x, y) == pytest.approx(np.sqrt(2.0))
    assert centroid_gap(x, 5 * x) == pytest.approx(0.0)


def test_cosine_retrieves_scaled_predictions_where_euclidean_fails():
    # targets at 0°, 10°, 20°, 30° with norms 1, 5, 1, 5; each prediction points exactly along its
    # own target but with the "wrong" norm (4, 1, 4, 1): cosine finds every one, Euclidean distance
    # lands on a neighbour of the other norm
    ang = np.deg2rad([0.0, 10.0, 20.0, 30.0])
    unit = np.stack([np.cos(ang), np.sin(ang)], 1)
    t = unit * np.array([1.0, 5.0, 1.0, 5.0])[:, None]
    p = unit * np.array([4.0, 1.0, 4.0, 1.0])[:, None]
    r = retrieval_by_metric(p, t, ks=(1, 2))
    assert r["cos_r1"] == 1.0 and r["matched_cos"] == pytest.approx(1.0)
    d = np.linalg.norm(p[:, None] - t[None], axis=2)  # naive reference
    naive = np.mean(np.argmin(d, 1) == np.arange(4))
    assert r["euclid_r1"] == naive < 0.5
    assert r["chance_r1"] == 0.25 and r["chance_r2"] == 0.5


def test_retrieval_chunks_agree_with_one_block(rng):
    p, t = rng.normal(size=(37, 4)), rng.normal(size=(37, 4))
    assert retrieval_by_metric(p, t, chunk=5) == retrieval_by_metric(p, t, chunk=1000)


def test_bad_inputs_are_named(rng):
    with pytest.raises(AlignmentInputError, match="same dimension"):
        gaussian_w2(rng.normal(size=(3, 2)), rng.normal(size=(3, 4)))
    with pytest.raises(AlignmentInputError, match="paired row by row"):
        retrieval_by_metric(rng.normal(size=(3, 2)), rng.normal(size=(4, 2)))
    with pytest.raises(AlignmentInputError, match="non-finite"):
        centroid_gap(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(AlignmentInputError, match="non-empty"):
        empirical_w2(np.zeros((0, 2)), np.ones((1, 2)))


def _table(rng, v=12, z=8, n=6):
    from mask.knowledge import KnowledgeTable

    samples = rng.normal(size=(v + 2, z)).astype(np.float32)
    return KnowledgeTable(words=[f"w{i}" for i in range(v + 2)], counts=[1] * v + [0, 0],
                          word_vectors=rng.normal(size=(v + 2, n)), prototypes=rng.normal(size=(v + 2, z)),
                          source=["vg"] * v + ["ood", "ood"], samples=samples)


def test_gap_measures_use_the_mtm_on_region_learned_rows(rng):
    from mask.models import MTM

    torch.manual_seed(0)
    table = _table(rng)
    mtm = MTM(latent_dim=8, word_dim=6, num_heads=2).eval()
    state = {f"net.mtm.{k}": v for k, v in mtm.state_dict().items()} | {"net.pae.x": torch.zeros(1)}
    again = mtm_from_state(state, num_heads=2)
    vg = np.arange(12)
    pred = mtm_predict(again, table.prototypes[vg])
    with torch.no_grad():  # one-region sets, computed directly
        ref = mtm(torch.as_tensor(table.prototypes[vg])[:, None, :], torch.ones(12, 1, dtype=torch.bool))[:, 0]
    np.testing.assert_allclose(pred, ref.double().numpy(), rtol=1e-6, atol=1e-6)
    g = gap_measures(table, again)
    expected = pair_measures(pred, table.word_vectors[vg])
    assert {k: g[f"gap.prototype.{k}"] for k in expected} == pytest.approx(expected)
    assert g["gap.prototype.n"] == 12 and g["gap.region.n"] == 12  # OOD rows left out
    region = pair_measures(mtm_predict(again, table.samples[vg]), table.word_vectors[vg])
    assert g["gap.region.w2_exact"] == pytest.approx(region["w2_exact"])
    assert g["gap.prototype.chance_r1"] == pytest.approx(1 / 12)


def test_mtm_from_state_names_missing_weights():
    with pytest.raises(AlignmentInputError, match="no MTM weights"):
        mtm_from_state({"net.pae.fc.weight": torch.zeros(2, 2)}, num_heads=1)


class _Recorder:
    """Stands in for a tracking run: keeps what is logged."""

    def __init__(self):
        self.params, self.metrics = {}, {}

    def log_params(self, p):
        self.params.update(p)

    def log_metrics(self, m, step=None):
        self.metrics.update(m)


def test_log_gap_measures_reads_the_checkpoint_or_records_why_not(rng, tmp_path, caplog):
    from safetensors.torch import save_file

    from mask.config import load_config
    from mask.models import MTM
    from mask.pipeline.gap import log_gap_measures
    from mask.storage import Store

    cfg = load_config("demo", ["model.latent_dim=8", "model.word_dim=6", "model.num_heads=2"])
    table = _table(rng)
    torch.manual_seed(1)
    mtm = MTM(latent_dim=8, word_dim=6, num_heads=2).eval()
    ck = tmp_path / "checkpoint_000"
    ck.mkdir()
    save_file({f"net.mtm.{k}": v.contiguous() for k, v in mtm.state_dict().items()}, str(ck / "model.safetensors"))
    store = Store(str(tmp_path))
    run = _Recorder()
    got = log_gap_measures(store, cfg, table, str(ck), run)
    assert got == run.metrics == gap_measures(table, mtm, seed=cfg.seed)
    for missing, why in ((None, "no training checkpoint is recorded"), (str(tmp_path / "gone"), "model.safetensors")):
        run = _Recorder()
        assert log_gap_measures(store, cfg, table, missing, run) == {} and run.metrics == {}
        assert why in run.params["gap.skipped"]
    assert "modality-gap measures skipped" in caplog.text
