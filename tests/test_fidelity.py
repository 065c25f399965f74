"""Paper-literal switches (issue 13): each config value reaches the code that uses it.

The literal forms themselves are checked against naive references in test_losses.py / test_knowledge.py;
here the config keys are followed to the library calls of the jobs and of Tune trials.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask.config import TextConfig, load_config
from mask.knowledge import KnowledgeTable, ood_prototypes


def _tiny(*extra: str):
    return load_config("demo", ["model.feature_dim=6", "model.latent_dim=8", "model.word_dim=4",
                                "model.num_heads=2", "model.pae_layers=1", *extra])


def _batch(rng, n=4, dim=6, words=5):
    counts = np.array([3, 2, 4, 1][:n])
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # noqa: E731 - object array of arrays
    return {"num_boxes": counts, "feature_dim": np.full(n, dim),
            "features": obj([rng.normal(size=c * dim).astype(np.float16) for c in counts]),
            "pair_slot": obj([np.arange(c, dtype=np.int32) for c in counts]),
            "pair_word": obj([rng.integers(0, words, c).astype(np.int32) for c in counts])}


@pytest.mark.parametrize("overrides,expected", [
    ([], {"ir_reduction": "mean", "cl_normalize": True, "cl_exclude_same_word": True}),
    (["loss.ir_reduction=sum", "loss.cl_normalize=false", "loss.cl_exclude_same_word=false"],
     {"ir_reduction": "sum", "cl_normalize": False, "cl_exclude_same_word": False}),
])
def test_loss_switches_reach_mask_loss(monkeypatch, rng, overrides, expected):
    import mask.losses as L
    from mask.pipeline.train import TrainModule, collate, epoch_shares, loss_weights, train_step

    cfg = _tiny(*overrides)
    seen = {}
    real = L.mask_loss

    def spy(out, batch, **kw):
        seen.update(kw)
        return real(out, batch, **kw)

    monkeypatch.setattr("mask.pipeline.train.mask_loss", spy)  # the name train_step calls
    torch.manual_seed(0)
    module = TrainModule(cfg, 5)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    b = collate(_batch(rng), torch.device("cpu"))
    weights = loss_weights(cfg)
    terms = train_step(module, module, opt, b, torch.randn(5, 4), weights, 1)
    for k, v in expected.items():
        assert seen[k] == v, k
    # the value changes the number: the same batch through mask_loss with the other reduction differs
    out = module(b["features"], b["mask"])
    other = "sum" if expected["ir_reduction"] == "mean" else "mean"
    b2 = {**b, "word_vectors": torch.randn(5, 4)}
    assert real(out, b2, **{**weights, "prototypes": module.prototypes.weight})["loss_rec"].item() != \
        pytest.approx(real(out, b2, **{**weights, "ir_reduction": other,
                                       "prototypes": module.prototypes.weight})["loss_rec"].item())
    shares = epoch_shares({f"epoch.{k}": float(v) for k, v in terms.items()}, weights)
    assert set(shares) == {"epoch.share_rec", "epoch.share_kl", "epoch.share_cm", "epoch.share_cl"}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_text_mode_tokens_is_close_to_the_paper_parse():
    from mask.text import ContentWordParser

    text = "Two men are sitting on their bikes, very happy."
    content = ContentWordParser.from_config(TextConfig()).parse(text)
    tokens = ContentWordParser.from_config(TextConfig(mode="tokens")).parse(text)
    assert "sitting" not in content and "their" not in content and "bike" in content  # nouns+adjectives, lemmas
    for w in ("sitting", "their", "very", "bikes", "men", "two", "are"):  # Table 10-like words, surface forms
        assert w in tokens, w
    assert "," not in tokens and "." not in tokens and "bike" not in tokens
    only = ContentWordParser.from_config(TextConfig(mode="tokens", tokens_pos=["VERB", "NOUN"])).parse(text)
    assert only == ["men", "sitting", "bikes"]


def _kv(words, vecs):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vecs.shape[1])
    kv.add_vectors(list(words), vecs.astype(np.float32))
    return kv


class _Parser:
    def __init__(self, words):
        self.words = words

    def parse_batch(self, texts, batch_size=256):
        return [list(self.words[t]) for t in texts]


@pytest.mark.parametrize("weighting", ["dot", "cosine"])
def test_ood_weighting_reaches_caption_prototypes(rng, weighting):
    from mask.evaluation import map_captions

    known = rng.normal(size=(6, 4)) * rng.uniform(0.3, 4.0, size=(6, 1))
    t = KnowledgeTable(words=[f"w{i}" for i in range(6)], counts=np.ones(6, np.int64), word_vectors=known,
                       prototypes=rng.normal(size=(6, 8)), source=["vg"] * 6)
    oov = rng.normal(size=(1, 4))
    cfg = _tiny(f"knowledge.ood_weighting={weighting}", "knowledge.ood_temperature=0.3", "knowledge.m=3")
    cw = map_captions(cfg, t, ["a"], parser=_Parser({"a": ["w1", "zebra"]}), kv=_kv(["zebra"], oov))
    want = ood_prototypes(oov, known, t.prototypes, 3, weighting=weighting, temperature=0.3)[0]
    np.testing.assert_allclose(cw.prototypes[cw.vocab.index("zebra")], want, rtol=1e-5)
    other = ood_prototypes(oov, known, t.prototypes, 3, weighting="cosine" if weighting == "dot" else "dot",
                           temperature=0.3)[0]
    assert not np.allclose(want, other)


@pytest.mark.parametrize("normalize", [True, False])
def test_scoring_normalize_reaches_the_evaluation(monkeypatch, rng, normalize):
    import pyarrow as pa

    import mask.evaluation as E

    t = KnowledgeTable(words=["w0", "w1"], counts=np.ones(2, np.int64), word_vectors=rng.normal(size=(2, 4)),
                       prototypes=rng.normal(size=(2, 8)) * [[1.0], [5.0]], source=["vg"] * 2)
    calls = []
    real = E.gallery_scores

    def spy(mu, mask, cw, norm, *a, **kw):
        calls.append(norm)
        return real(mu, mask, cw, norm, *a, **kw)

    monkeypatch.setattr(E, "gallery_scores", spy)
    monkeypatch.setattr("mask.text.ContentWordParser.from_config", lambda cfg: _Parser({"a": ["w0"], "b": ["w1"]}))
    cfg = _tiny(f"scoring.normalize={str(normalize).lower()}", "knowledge.ood_method=none")
    mu = pa.table({"image_id": ["i0", "i1"], "mu": [rng.normal(size=16).tolist(), rng.normal(size=24).tolist()],
                   "num_boxes": pa.array([2, 3], pa.int32()), "latent_dim": pa.array([8, 8], pa.int32())})
    caps = pa.table({"caption_id": ["c0", "c1"], "image_id": ["i0", "i1"], "text": ["a", "b"]})
    monkeypatch.setattr("mask.evaluation.load_vectors", lambda *a, **k: _kv(["x"], np.ones((1, 4))))
    E.evaluate(cfg, t, ["i0", "i1"], mu, caps)
    assert calls and all(c == normalize for c in calls)


def test_switches_are_tunable():
    from mask.pipeline.tune_trial import trial_config
    from mask.sweep import SpaceError, parse_space

    spec = parse_space({"search": {"loss.ir_reduction": {"grid": ["sum", "mean"]},
                                   "scoring.normalize": {"choice": [True, False]},
                                   "loss.cl_exclude_same_word": {"choice": [False]},
                                   "knowledge.ood_weighting": {"choice": ["dot", "cosine"]}}})
    assert spec.search["loss.ir_reduction"].grid == ["sum", "mean"]
    base = _tiny().model_dump(mode="json")
    cfg = trial_config(base, {"loss": {"ir_reduction": "mean", "cl_exclude_same_word": False},
                              "scoring": {"normalize": False}, "knowledge": {"ood_weighting": "cosine"}})
    assert (cfg.loss.ir_reduction, cfg.loss.cl_exclude_same_word, cfg.scoring.normalize,
            cfg.knowledge.ood_weighting) == ("mean", False, False, "cosine")
    with pytest.raises(SpaceError, match="search.loss.ir_reduction: choice value 'max' is refused"):
        parse_space({"search": {"loss.ir_reduction": {"choice": ["max"]}}})


def test_paper_preset_sets_every_literal_choice():
    from mask.config import PAPER_LITERAL

    paper, f30k = load_config("paper").flat(), load_config("flickr30k").flat()
    for key, value in PAPER_LITERAL.items():
        assert paper[key] == value, key
    differ = {k for k in paper if paper[k] != f30k.get(k)}
    assert differ <= set(PAPER_LITERAL), differ - set(PAPER_LITERAL)  # the preset is the recipe + literal keys
    assert paper["knowledge.m"] == 10 and paper["loss.lambda_cm"] == paper["loss.lambda_cl"] == 3.0


def test_contradictory_settings_name_the_key(rng, monkeypatch):
    from mask.config import ConfigError
    from mask.preflight import check_settings, settings_problems

    no_samples = KnowledgeTable(words=["w0"], counts=np.ones(1, np.int64), word_vectors=rng.normal(size=(1, 4)),
                                prototypes=rng.normal(size=(1, 8)), source=["vg"])
    cfg = _tiny("scoring.prototypes=random-region")
    with pytest.raises(ConfigError, match="scoring.prototypes: random-region needs .* stores none"):
        check_settings(cfg, table=no_samples)
    assert settings_problems(_tiny(), table=no_samples) == []
    with pytest.raises(ConfigError, match="knowledge.ood_weighting"):
        check_settings(_tiny("knowledge.ood_weighting=cosine", "knowledge.ood_method=procrustes"))
    with pytest.raises(ConfigError, match="finetune.enabled"):
        check_settings(_tiny("finetune.enabled=true", "gallery=null"))
    # a caption parser whose backend is not installed
    import mask.text as T

    def missing(lemma):
        raise T.TextError("NLTK data missing: punkt_tab")

    monkeypatch.setattr(T, "_nltk_check", missing)
    with pytest.raises(ConfigError, match="text.backend: nltk .* NLTK data missing"):
        check_settings(_tiny("text.backend=nltk", "text.mode=tokens"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="text.backend: spacy is not installed"):
        check_settings(_tiny())


def test_build_job_stops_before_any_work_on_a_contradiction(tmp_path):
    from mask.config import ConfigError
    from mask.pipeline.build import build_knowledge

    cfg = _tiny(f"storage.root={tmp_path}", "knowledge.ood_weighting=cosine", "knowledge.ood_method=none")
    with pytest.raises(ConfigError, match="knowledge.ood_weighting"):
        build_knowledge(cfg)
    assert not any(tmp_path.iterdir())  # nothing written: no dataset, no MLflow store


def test_finetune_option_reports_with_and_without_and_its_terms(monkeypatch, rng):
    import pyarrow as pa

    import mask.evaluation as E
    from mask.finetune import finetune_prototypes

    t = KnowledgeTable(words=["w0", "w1", "w2"], counts=np.ones(3, np.int64), word_vectors=rng.normal(size=(3, 4)),
                       prototypes=rng.normal(size=(3, 8)), source=["vg"] * 3)
    monkeypatch.setattr("mask.text.ContentWordParser.from_config",
                        lambda cfg: _Parser({"a": ["w0", "w1"], "b": ["w1", "w2"], "c": ["w2"]}))
    monkeypatch.setattr("mask.evaluation.load_vectors", lambda *a, **k: _kv(["x"], np.ones((1, 4))))
    mu = pa.table({"image_id": ["i0", "i1", "i2"], "mu": [rng.normal(size=8 * n).tolist() for n in (2, 3, 1)],
                   "num_boxes": pa.array([2, 3, 1], pa.int32()), "latent_dim": pa.array([8] * 3, pa.int32())})
    caps = pa.table({"caption_id": ["c0", "c1", "c2"], "image_id": ["i0", "i1", "i2"], "text": ["a", "b", "c"]})
    off = E.evaluate(_tiny("knowledge.ood_method=none"), t, ["i0", "i1", "i2"], mu, caps)
    assert "mask_finetuned" not in off and "finetune" not in off
    cfg = _tiny("knowledge.ood_method=none", "finetune.enabled=true", "finetune.steps=7", "finetune.lr=0.05",
                "finetune.images_per_batch=2", "finetune.captions_per_batch=2")
    res = E.evaluate(cfg, t, ["i0", "i1", "i2"], mu, caps)
    assert {"mask", "mask_finetuned", "finetune"} <= set(res)
    ft = res["finetune"]
    assert ft["steps"] == 7 and len(ft["history"]) == 7
    assert set(ft["history"][0]) == {"loss_ss", "loss_r2w", "loss_w2r"}
    assert ft["loss_ss_last"] == ft["history"][-1]["loss_ss"]
    # the tuned prototypes are v W with the W of eq. 88–93 learned on the same unpaired batches
    from mask.evaluation import map_captions, padded_mu

    m, mask = padded_mu(mu, ["i0", "i1", "i2"])
    cw = map_captions(cfg, t, ["a", "b", "c"], kv=_kv(["x"], np.ones((1, 4))))
    tuned, _ = E.finetune_knowledge(cfg.finetune, m, mask, cw)
    assert not np.allclose(tuned, cw.prototypes)
    w = finetune_prototypes(cw.prototypes, [np.zeros((1, 8))], [np.array([0])], 0)
    np.testing.assert_allclose(w, np.eye(8))  # zero steps: identity, so the option is a real change only when on
