"""mask.knowledge: eq. 2 accumulation, the table's Arrow round trip, OOD prototypes (eq. 11–13),
similarity Procrustes (Appendix B) — each against a naive reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mask.knowledge import (
    KnowledgeError,
    KnowledgeTable,
    PrototypeAccumulator,
    build_prototypes_for,
    extend_with_ood,
    fit_similarity_procrustes,
    ood_prototypes,
    procrustes_prototypes,
)

# ------------------------------------------------------------------------------------ accumulator


def pairs(rng, p=50, k=6, z=4):
    ids = rng.integers(0, k - 1, p)  # the last word is never seen
    mu = rng.normal(size=(p, z)).astype(np.float32)
    return ids, mu


def test_accumulator_is_the_mean_and_flags_unseen(rng):
    ids, mu = pairs(rng)
    acc = PrototypeAccumulator(6, 4, seed=1)
    acc.update(ids[:20], mu[:20]).update(ids[20:], mu[20:])
    protos, counts, missing = acc.prototypes()
    for k in range(6):
        sel = ids == k
        assert counts[k] == sel.sum()
        if sel.any():
            np.testing.assert_allclose(protos[k], mu[sel].astype(np.float64).mean(0), rtol=1e-6)
    assert missing.tolist() == [False] * 5 + [True]
    np.testing.assert_array_equal(protos[5], 0.0)
    assert protos.dtype == np.float32 and counts.dtype == np.int64
    samples = acc.samples()
    for k in range(5):  # the sample is one of the word's own μ
        assert any(np.array_equal(samples[k], row) for row in mu[ids == k])


def test_merge_of_shards_equals_one_pass(rng):
    ids, mu = pairs(rng, p=200)
    keys = rng.integers(0, 2**63, 200, dtype=np.uint64)
    whole = PrototypeAccumulator(6, 4).update(ids, mu, keys=keys)
    shards = [PrototypeAccumulator(6, 4).update(ids[a:b], mu[a:b], keys=keys[a:b])
              for a, b in ((0, 70), (70, 71), (71, 200))]
    merged = shards[2].merge(shards[0]).merge(shards[1])
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    # with region-derived keys the sample does not depend on the sharding
    np.testing.assert_array_equal(merged.sample, whole.sample)
    np.testing.assert_array_equal(merged.sample_key, whole.sample_key)
    for k in range(5):  # min key wins
        sel = np.flatnonzero(ids == k)
        np.testing.assert_array_equal(whole.sample[k], mu[sel[np.argmin(keys[sel])]])


def test_merged_sample_is_uniform_over_the_union():
    # word 0 has 1 region in shard A and 3 in shard B: each of the 4 must win ~1/4 of the time
    mu = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    wins = np.zeros(4)
    for s in range(800):
        a = PrototypeAccumulator(1, 2, seed=[s, 0]).update([0], mu[:1])
        b = PrototypeAccumulator(1, 2, seed=[s, 1]).update([0, 0, 0], mu[1:])
        wins[int(a.merge(b).samples()[0, 0])] += 1
    assert (np.abs(wins / 800 - 0.25) < 0.06).all(), wins


def test_merge_partial_matches_update(rng):
    ids, mu = pairs(rng)
    keys = rng.integers(0, 2**63, len(ids), dtype=np.uint64)
    ref = PrototypeAccumulator(6, 4).update(ids, mu, keys=keys)
    uniq = np.unique(ids)
    sums = np.stack([mu[ids == k].astype(np.float64).sum(0) for k in uniq])
    counts = np.array([(ids == k).sum() for k in uniq])
    first = [np.flatnonzero(ids == k)[np.argmin(keys[ids == k])] for k in uniq]
    acc = PrototypeAccumulator(6, 4).merge_partial(uniq, sums, counts, keys[first], mu[first])
    np.testing.assert_allclose(acc.sums, ref.sums, rtol=1e-12)
    np.testing.assert_array_equal(acc.sample, ref.sample)
    acc.merge_partial(np.zeros(0, np.int64), None, np.zeros(0), np.zeros(0, np.uint64), None)  # empty partial
    # two partials concatenated (repeated word ids) combine exactly
    half = len(ids) // 2
    parts = [PrototypeAccumulator(6, 4).update(ids[a:b], mu[a:b], keys=keys[a:b]) for a, b in ((0, half), (half, None))]
    cat = {name: np.concatenate([getattr(p, name)[p.counts > 0] for p in parts])
           for name in ("sums", "counts", "sample_key", "sample")}
    word_ids = np.concatenate([np.flatnonzero(p.counts > 0) for p in parts])
    acc2 = PrototypeAccumulator(6, 4).merge_partial(word_ids, cat["sums"], cat["counts"], cat["sample_key"],
                                                    cat["sample"])
    np.testing.assert_allclose(acc2.sums, ref.sums, rtol=1e-12)
    np.testing.assert_array_equal(acc2.counts, ref.counts)
    np.testing.assert_array_equal(acc2.sample, ref.sample)


def test_arrays_round_trip_including_the_generator(rng):
    ids, mu = pairs(rng, p=60)
    a = PrototypeAccumulator(6, 4, seed=3).update(ids[:30], mu[:30])
    arrays = a.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    b = PrototypeAccumulator.from_arrays(arrays)
    a.update(ids[30:], mu[30:])
    b.update(ids[30:], mu[30:])
    for name in ("sums", "counts", "sample", "sample_key"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_accumulator_errors(rng):
    acc = PrototypeAccumulator(3, 2)
    with pytest.raises(KnowledgeError, match=r"word_ids\[1\] = 3 is outside \[0, 3\)"):
        acc.update([0, 3], np.zeros((2, 2)))
    with pytest.raises(KnowledgeError, match="mu: non-finite value at row 1"):
        acc.update([0, 1], np.array([[0.0, 0.0], [np.nan, 0.0]]))
    with pytest.raises(KnowledgeError, match=r"word_ids length 2 and mu shape \(3, 2\)"):
        acc.update([0, 1], np.zeros((3, 2)))
    with pytest.raises(KnowledgeError, match="expected 2 columns"):
        acc.update([0], np.zeros((1, 3)))
    with pytest.raises(KnowledgeError, match="cannot merge"):
        acc.merge(PrototypeAccumulator(4, 2))
    with pytest.raises(KnowledgeError, match="lack"):
        PrototypeAccumulator.from_arrays({"sums": np.zeros((1, 1))})


# ------------------------------------------------------------------------------------ table


def table(rng, k=5, n=3, z=4, samples=True):
    return KnowledgeTable(words=[f"w{i}" for i in range(k)], counts=rng.integers(1, 9, k),
                          word_vectors=rng.normal(size=(k, n)), prototypes=rng.normal(size=(k, z)),
                          source=["vg"] * k, samples=rng.normal(size=(k, z)) if samples else None)


@pytest.mark.parametrize("samples", [True, False])
def test_arrow_round_trip_is_exact(rng, samples):
    t = table(rng, samples=samples)
    arrow = t.to_arrow()
    assert arrow.column_names == ["word", "count", "word_vector", "prototype", "source"] + (["sample"] * samples)
    assert arrow.schema.field("prototype").type == pa.list_(pa.float32(), 4)
    # through Parquet, as the knowledge artifact stores it (an all-null sample column did not survive)
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(arrow, buf)
    assert pq.read_table(io.BytesIO(buf.getvalue())).equals(arrow)
    back = KnowledgeTable.from_arrow(arrow)
    assert back.words == t.words and back.source == t.source
    np.testing.assert_array_equal(back.counts, t.counts)
    np.testing.assert_array_equal(back.word_vectors, t.word_vectors)
    np.testing.assert_array_equal(back.prototypes, t.prototypes)
    if samples:
        np.testing.assert_array_equal(back.samples, t.samples)
    else:
        assert back.samples is None
    # chunked and sliced tables read back the right rows
    chunked = pa.concat_tables([arrow.slice(0, 2), arrow.slice(2)])
    sliced = KnowledgeTable.from_arrow(chunked.slice(1, 3))
    np.testing.assert_array_equal(sliced.prototypes, t.prototypes[1:4])
    assert KnowledgeTable.from_arrow(arrow.drop_columns([c for c in ["sample"] if c in arrow.column_names])).samples is None
    assert t.index() == {f"w{i}": i for i in range(5)}


def test_validate_names_the_problem(rng):
    t = table(rng)
    with pytest.raises(KnowledgeError, match="empty"):
        KnowledgeTable([], np.zeros(0), np.zeros((0, 3)), np.zeros((0, 4)), [])
    with pytest.raises(KnowledgeError, match="duplicate word 'w1'"):
        KnowledgeTable(["w0", "w1", "w1", "w3", "w4"], t.counts, t.word_vectors, t.prototypes, t.source)
    bad = t.prototypes.copy()
    bad[2, 1] = np.nan
    with pytest.raises(KnowledgeError, match="prototypes: non-finite value in the row of word 'w2'"):
        KnowledgeTable(t.words, t.counts, t.word_vectors, bad, t.source)
    with pytest.raises(KnowledgeError, match="prototypes has 4 rows but there are 5 words"):
        KnowledgeTable(t.words, t.counts, t.word_vectors, t.prototypes[:4], t.source)
    with pytest.raises(KnowledgeError, match="source 'x'"):
        KnowledgeTable(t.words, t.counts, t.word_vectors, t.prototypes, ["vg"] * 4 + ["x"])
    with pytest.raises(KnowledgeError, match="no regions"):
        KnowledgeTable(t.words, np.zeros(5), t.word_vectors, t.prototypes, t.source)
    with pytest.raises(KnowledgeError, match="samples shape"):
        KnowledgeTable(t.words, t.counts, t.word_vectors, t.prototypes, t.source, samples=np.zeros((5, 2)))
    with pytest.raises(KnowledgeError, match="null"):
        KnowledgeTable.from_arrow(t.to_arrow().set_column(
            5, "sample", pa.array([None, [1.0] * 4, [1.0] * 4, [1.0] * 4, [1.0] * 4], pa.list_(pa.float32(), 4))))


# ------------------------------------------------------------------------------------ OOD top-m


def ood_naive(q, kv, kp, m):
    out = []
    m = min(m, len(kv))
    for w in q.astype(np.float64):
        if not w.any():
            out.append(kp.astype(np.float64).mean(0))
            continue
        cos = [float(w @ k / (np.linalg.norm(w) * max(np.linalg.norm(k), 1e-300))) for k in kv.astype(np.float64)]
        top = sorted(range(len(kv)), key=lambda j: (-np.round(cos[j], 9), j))[:m]  # eq. 13, ties → lower index
        raw = np.array([w @ kv[j] for j in top])
        s = np.exp(raw - raw.max())
        s /= s.sum()  # eq. 11
        out.append(sum(si * kp[j] for si, j in zip(s, top, strict=True)))  # eq. 12
    return np.array(out)


@pytest.mark.parametrize("m", [1, 3, 7])
def test_ood_matches_naive(rng, m):
    q = rng.normal(size=(9, 5)).astype(np.float32)
    kv = rng.normal(size=(7, 5)).astype(np.float32)
    kp = rng.normal(size=(7, 6)).astype(np.float32)
    got = ood_prototypes(q, kv, kp, m, chunk=4)
    assert got.shape == (9, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, ood_naive(q, kv, kp, m), rtol=1e-5, atol=1e-5)


def test_ood_uses_cosine_for_selection_and_raw_dots_for_weights():
    kv = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0]], np.float32)  # row 1 is long but less aligned
    kp = np.eye(3, dtype=np.float32)
    q = np.array([[1.0, 0.01]], np.float32)
    # m=1: cosine picks row 0 although row 1 has the larger dot product
    np.testing.assert_allclose(ood_prototypes(q, kv, kp, 1), [[1.0, 0.0, 0.0]])
    # m=2: softmax over raw dots 1.0 and 10.01
    w = np.exp([1.0, 10.01]) / np.exp([1.0, 10.01]).sum()
    np.testing.assert_allclose(ood_prototypes(q, kv, kp, 2), [[w[0], w[1], 0.0]], rtol=1e-5)


def test_ood_ties_clip_zero_query_and_torch(rng):
    kv = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)  # 3 vectors tie on cosine
    kp = rng.normal(size=(4, 3)).astype(np.float32)
    q = np.array([[3.0, 0.0], [0.0, 0.0]], np.float32)
    got = ood_prototypes(q, kv, kp, 2)
    np.testing.assert_allclose(got, ood_naive(q, kv, kp, 2), rtol=1e-5)  # lower indices 0, 1 win the tie
    np.testing.assert_allclose(got[1], kp.mean(0), rtol=1e-6)  # zero query → mean of all prototypes
    np.testing.assert_allclose(ood_prototypes(q, kv, kp, 50), ood_prototypes(q, kv, kp, 4))  # m > K clipped
    np.testing.assert_allclose(ood_prototypes(torch.from_numpy(q), torch.from_numpy(kv), kp, 2), got)
    assert ood_prototypes(np.zeros((0, 2)), kv, kp, 2).shape == (0, 3)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 8), m=st.integers(1, 10), ties=st.booleans())
def test_property_ood_equals_naive(seed, k, m, ties):
    g = np.random.default_rng(seed)
    kv = g.normal(size=(k, 3)).astype(np.float32)
    if ties:
        kv = np.round(kv).astype(np.float32)  # duplicates and zero rows
        kv[k // 2] = 3.0 * kv[0]  # a parallel vector: an exact tie in cosine
    kp = g.normal(size=(k, 2)).astype(np.float32)
    q = np.round(g.normal(size=(5, 3))).astype(np.float32) if ties else g.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(ood_prototypes(q, kv, kp, m, chunk=2), ood_naive(q, kv, kp, m), rtol=1e-4, atol=1e-5)


def test_ood_errors(rng):
    kv, kp = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    with pytest.raises(KnowledgeError, match="empty"):
        ood_prototypes(np.zeros((1, 3)), np.zeros((0, 3)), np.zeros((0, 5)), 2)
    with pytest.raises(KnowledgeError, match=r"query_vectors shape \(1, 2\) and known_vectors shape \(4, 3\)"):
        ood_prototypes(np.zeros((1, 2)), kv, kp, 2)
    with pytest.raises(KnowledgeError, match=r"known_vectors shape \(4, 3\) and known_prototypes shape \(3, 5\)"):
        ood_prototypes(np.zeros((1, 3)), kv, kp[:3], 2)
    bad = np.zeros((2, 3))
    bad[1, 2] = np.inf
    with pytest.raises(KnowledgeError, match="query_vectors: non-finite value at row 1, column 2"):
        ood_prototypes(bad, kv, kp, 2)
    with pytest.raises(KnowledgeError, match="m: must be at least 1"):
        ood_prototypes(np.ones((1, 3)), kv, kp, 0)


# ------------------------------------------------------------------------------------ Procrustes


def random_semi_orthogonal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T  # (rows, cols)


@pytest.mark.parametrize("n,z", [(3, 6), (6, 3), (4, 4)])
def test_procrustes_is_exact_on_a_similarity_transform(rng, n, z):
    k = 12
    if n <= z:  # v = β A w + t, AᵀA = I_N
        w = rng.normal(size=(k + 5, n))
        a = random_semi_orthogonal(rng, z, n)
        v = 2.5 * w @ a.T + rng.normal(size=z)
    else:  # w = s B v + c, BᵀB = I_Z  (word space bigger)
        v = rng.normal(size=(k + 5, z))
        b = random_semi_orthogonal(rng, n, z)
        w = 0.4 * v @ b.T + rng.normal(size=n)
    fit = fit_similarity_procrustes(w[:k], v[:k])
    a = fit.a
    if n <= z:
        np.testing.assert_allclose(a.T @ a, np.eye(n), atol=1e-8)
    else:
        np.testing.assert_allclose(a @ a.T, np.eye(z), atol=1e-8)
    got = procrustes_prototypes(w[k:], w[:k], v[:k])  # held-out words
    np.testing.assert_allclose(got, v[k:], rtol=1e-4, atol=1e-4)


def test_procrustes_least_squares_against_brute_scale(rng):
    w = rng.normal(size=(20, 3))
    v = rng.normal(size=(20, 3))
    fit = fit_similarity_procrustes(w, v)

    def loss(beta):
        return ((beta * w @ fit.a.T + (v.mean(0) - beta * fit.a @ w.mean(0)) - v) ** 2).sum()

    assert loss(fit.scale) <= min(loss(fit.scale * 1.01), loss(fit.scale * 0.99))


def test_procrustes_errors(rng):
    with pytest.raises(KnowledgeError, match="at least 2"):
        procrustes_prototypes(np.zeros((1, 2)), np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(KnowledgeError, match="identical"):
        procrustes_prototypes(np.zeros((1, 2)), np.ones((3, 2)), rng.normal(size=(3, 3)))


# ------------------------------------------------------------------------------------ caption words


def vectors_from(d):
    calls = []

    def vectors(words):
        calls.append(list(words))
        found = np.array([w in d for w in words])
        vecs = np.array([d.get(w, np.zeros(3)) for w in words], np.float32).reshape(len(words), 3)
        return vecs, found

    return vectors, calls


def test_build_prototypes_for(rng):
    t = table(rng)
    t = extend_with_ood(t, ["pre"], rng.normal(size=(1, 3)), "topm", 2)
    extra = {"cat": rng.normal(size=3)}
    vectors, calls = vectors_from(extra)
    protos, source, counts = build_prototypes_for(["w1", "cat", "zzz", "pre", "cat"], t, vectors, "topm", 2)
    assert source == ["knowledge", "ood", "missing", "ood", "ood"]
    assert counts == {"knowledge": 1, "ood": 3, "missing": 1}
    assert calls == [["cat", "zzz"]]  # only unknown words are looked up, once each
    np.testing.assert_array_equal(protos[0], t.prototypes[1])
    np.testing.assert_array_equal(protos[3], t.prototypes[5])
    known = t.known()
    np.testing.assert_allclose(protos[1], ood_prototypes(extra["cat"][None], t.word_vectors[known],
                                                         t.prototypes[known], 2)[0])
    np.testing.assert_array_equal(protos[2], 0.0)
    _, source, counts = build_prototypes_for(["w1", "cat"], t, vectors, "none", 2)
    assert source == ["knowledge", "missing"] and counts["missing"] == 1
    protos_p, source, _ = build_prototypes_for(["cat"], t, vectors, "procrustes", 2)
    np.testing.assert_allclose(protos_p[0], procrustes_prototypes(extra["cat"][None], t.word_vectors[known],
                                                                  t.prototypes[known])[0], rtol=1e-5)
    with pytest.raises(KnowledgeError, match="method"):
        build_prototypes_for(["cat"], t, vectors, "nearest", 2)


def test_extend_with_ood(rng):
    t = table(rng)
    vecs = rng.normal(size=(3, 3)).astype(np.float32)
    ext = extend_with_ood(t, ["a", "w2", "b"], vecs, "topm", 3)  # w2 is already known: skipped
    assert ext.words == t.words + ["a", "b"]
    assert ext.source[-2:] == ["ood", "ood"] and ext.counts[-2:].tolist() == [0, 0]
    np.testing.assert_allclose(ext.prototypes[-2:], ood_prototypes(vecs[[0, 2]], t.word_vectors, t.prototypes, 3))
    np.testing.assert_allclose(ext.samples[-2:], ood_prototypes(vecs[[0, 2]], t.word_vectors, t.samples, 3))
    # OOD rows are built from "vg" rows only, even when the table already has OOD rows
    ext2 = extend_with_ood(ext, ["c"], vecs[:1], "topm", 3)
    np.testing.assert_allclose(ext2.prototypes[-1], ext.prototypes[-2])
    assert extend_with_ood(t, ["a"], vecs[:1], "none", 3) is t
    with pytest.raises(KnowledgeError, match="duplicates"):
        extend_with_ood(t, ["a", "a"], vecs[:2], "topm", 3)
    with pytest.raises(KnowledgeError, match="expected 3 columns"):
        extend_with_ood(t, ["a"], vecs[:1, :2], "topm", 3)
    KnowledgeTable.from_arrow(ext.to_arrow())


def test_without_ood_ablation_drops_precomputed_ood_rows(rng):
    """Regression (issue 13): method "none" returned the precomputed OOD rows of a knowledge built with
    ``knowledge.ood_vocab_size > 0``, so the "without OOD words" ablation silently used OOD words."""
    t = extend_with_ood(table(rng), ["pre"], rng.normal(size=(1, 3)), "topm", 2)
    vectors, calls = vectors_from({})
    protos, source, counts = build_prototypes_for(["w1", "pre"], t, vectors, "none", 2)
    assert source == ["knowledge", "missing"] and counts == {"knowledge": 1, "ood": 0, "missing": 1}
    np.testing.assert_array_equal(protos[1], 0.0)
    assert calls == []  # nothing is looked up for the ablation


def test_precomputed_ood_rows_follow_the_requested_m_and_method(rng):
    t = extend_with_ood(table(rng), ["pre"], rng.normal(size=(1, 3)), "topm", 2)
    vectors, _ = vectors_from({})
    known = t.known()
    w = t.word_vectors[t.index()["pre"]][None]
    for m in (1, 3):
        protos, source, _ = build_prototypes_for(["pre"], t, vectors, "topm", m)
        assert source == ["ood"]
        np.testing.assert_allclose(protos[0], ood_prototypes(w, t.word_vectors[known], t.prototypes[known], m)[0],
                                   rtol=1e-6)
    protos, _, _ = build_prototypes_for(["pre"], t, vectors, "procrustes", 2)
    np.testing.assert_allclose(protos[0], procrustes_prototypes(w, t.word_vectors[known], t.prototypes[known])[0],
                               rtol=1e-5)


def ood_naive_cosine(q, kv, kp, m, tau):
    out = []
    for w in q.astype(np.float64):
        cos = np.array([w @ k / (np.linalg.norm(w) * np.linalg.norm(k)) for k in kv.astype(np.float64)])
        top = np.argsort(-cos, kind="stable")[:m]
        s = np.exp(cos[top] / tau - (cos[top] / tau).max())
        s /= s.sum()
        out.append(sum(si * kp[j] for si, j in zip(s, top, strict=True)))
    return np.array(out)


def test_ood_cosine_weighting_variant_matches_naive(rng):
    q = rng.normal(size=(6, 5)).astype(np.float32)
    kv = (rng.normal(size=(8, 5)) * rng.uniform(0.2, 5.0, size=(8, 1))).astype(np.float32)  # varied lengths
    kp = rng.normal(size=(8, 4)).astype(np.float32)
    got = ood_prototypes(q, kv, kp, 3, weighting="cosine", temperature=0.2)
    np.testing.assert_allclose(got, ood_naive_cosine(q, kv, kp, 3, 0.2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, ood_prototypes(q, kv, kp, 3))  # differs from eq. 11's raw dot products
    np.testing.assert_allclose(ood_prototypes(q, kv, kp, 3, weighting="dot"), ood_naive(q, kv, kp, 3), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(KnowledgeError, match="weighting"):
        ood_prototypes(q, kv, kp, 3, weighting="l1")
    t = table(rng)
    vectors, _ = vectors_from({"cat": q[0, :3]})
    protos, _, _ = build_prototypes_for(["cat"], t, vectors, "topm", 2, weighting="cosine", temperature=0.5)
    known = t.known()
    np.testing.assert_allclose(protos[0], ood_naive_cosine(q[:1, :3], t.word_vectors[known], t.prototypes[known],
                                                           2, 0.5)[0], rtol=1e-5, atol=1e-6)
