import pytest

from mask.config import ConfigError, MaskConfig, apply_overrides, flatten, load_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.latent_dim == 512
    assert cfg.storage.root == "./artifacts"


def test_dotted_override_types():
    cfg = load_config(overrides=["model.latent_dim=256", "loss.tau=0.05", "train.use_gpu=true",
                                 "storage.root=s3://bucket/x"])
    assert cfg.model.latent_dim == 256 and isinstance(cfg.model.latent_dim, int)
    assert cfg.loss.tau == pytest.approx(0.05)
    assert cfg.train.use_gpu is True
    assert cfg.storage.root == "s3://bucket/x"


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"model\.latnt_dim: unknown key"):
        load_config(overrides=["model.latnt_dim=3"])


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"model\.latent_dim"):
        load_config(overrides=["model.latent_dim=big"])


def test_constraint_named():
    with pytest.raises(ConfigError, match=r"loss\.tau"):
        load_config(overrides=["loss.tau=0"])


def test_heads_must_divide():
    with pytest.raises(ConfigError, match="num_heads=4 must divide word_dim=50"):
        load_config(overrides=["model.word_dim=50"])


def test_yaml_file_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  latent_dim: 64\n  num_heads: 2\n  word_dim: 50\n")
    cfg = load_config(p, ["model.latent_dim=32"])
    assert cfg.model.latent_dim == 32 and cfg.model.word_dim == 50
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["model.latent_dim"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_credentials_rejected_in_storage_options():
    with pytest.raises(ConfigError, match="credentials are not accepted"):
        load_config(overrides=["storage.options={key: AKIA, secret: s}"])


def test_hash_stable_and_sensitive():
    a, b = MaskConfig(), MaskConfig()
    assert a.hash() == b.hash()
    b.model.latent_dim = 256
    assert a.hash() != b.hash()
    assert a.hash("loss") == b.hash("loss")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert "model.latent_dim" in MaskConfig().flat()


def test_demo_synonyms_key_is_validated_and_recorded():
    """The demo world's synonym set is a config key (validated, in the flattened MLflow params)."""
    cfg = load_config("demo", overrides=["gallery.demo_synonyms=all"])
    assert cfg.gallery.demo_synonyms == "all" and cfg.dataset.demo_synonyms == "supported"
    assert cfg.flat()["gallery.demo_synonyms"] == "all"
    assert load_config("demo").flat()["gallery.demo_synonyms"] == "supported"
    with pytest.raises(ConfigError, match="demo_synonyms"):
        load_config("demo", overrides=["gallery.demo_synonyms=some"])
    with pytest.raises(ConfigError, match="generated demo world only"):
        load_config("demo", overrides=["gallery.demo_synonyms=all", "gallery.path=/x"])
    with pytest.raises(ConfigError, match="generated demo world only"):
        load_config("demo", overrides=["gallery.kind=karpathy", "gallery.path=/x", "gallery.demo_synonyms=all"])
