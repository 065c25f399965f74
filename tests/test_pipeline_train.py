"""The training job on a small slice of the demo world (local Ray), plus the pieces of the loop without Ray.

Training runs share one storage root, so the features are extracted once: ``trained`` (2 epochs),
its rerun with 3 epochs, a ``variant`` run (word vectors lacking some words, no KL term, a worker
killed at epoch 1) and a diverging run (NaN).  Corrupt and mismatched checkpoints are checked on
copies of the first run's folder and fail before any worker starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a small slice, and a smaller detector input than the demo's (the features' quality does not matter here)
SMALL = ["dataset.limit=32", "train.checkpoint_every=1", "train.log_every=1", "detector.batch_size=8",
         "detector.rpn_post_nms_topk=40", "detector.min_size=128", "detector.max_size=160"]


def _main(root: Path, *extra: str) -> dict:
    from jobs import train

    return train.main([f"storage.root={root}", *SMALL, *extra])


def _client(summary: dict):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("train")
    return root, _main(root, "train.epochs=2")


# ---------------------------------------------------------------- the job, MLflow, resume


def test_train_job_summary_and_checkpoint(trained):
    root, s = trained
    assert s["features"]["images"] == 32
    assert s["vocabulary"]["no_vector"] == 0 and s["vocabulary"]["kept"] > 5
    t = s["training"]
    assert t["run_name"].startswith("train-") and t["final_epoch"] == 1 and t["resumes"] == 0
    assert t["steps"] > 0 and t["pairs"] > t["images"] > 0
    ck = Path(t["checkpoint"])
    assert ck.parent == root / "train" / t["run_name"]
    assert {p.name for p in ck.iterdir()} >= {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == t["steps"]
    for term in ("loss", "loss_ir", "loss_rec", "loss_kl", "loss_cm", "loss_cl"):
        assert np.isfinite(t[f"epoch.{term}"])
    assert t["pairs_per_s"] > 0


def test_mlflow_run_has_params_losses_throughput_and_checkpoint(trained):
    _, s = trained
    client = _client(s)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.info.run_name == "train" and run.data.tags["job"] == "train"
    assert run.data.params["model.latent_dim"] == "128" and run.data.params["loss.lambda_cm"] == "3.0"
    steps = s["training"]["steps"]
    for term in ("loss", "loss_ir", "loss_rec", "loss_kl", "loss_cm", "loss_cl"):
        per_step = _history(client, run.info.run_id, f"step.{term}")
        assert [st for st, _ in per_step] == list(range(1, steps + 1)), term  # log_every=1
        assert [st for st, _ in _history(client, run.info.run_id, f"epoch.{term}")] == [0, 1], term
    # epoch means are the means of the logged steps
    per_step = [v for _, v in _history(client, run.info.run_id, "step.loss")]
    epoch = [v for _, v in _history(client, run.info.run_id, "epoch.loss")]
    half = steps // 2
    assert epoch == pytest.approx([np.mean(per_step[:half]), np.mean(per_step[half:])], rel=1e-5)
    assert len(_history(client, run.info.run_id, "pairs_per_s")) == 2
    assert run.data.tags["train.checkpoint"] == s["training"]["checkpoint"]
    art = json.loads(Path(client.download_artifacts(run.info.run_id, "train/checkpoint.json")).read_text())
    assert art["checkpoint"] == s["training"]["checkpoint"] and art["final_epoch"] == 1
    assert run.data.metrics["vocabulary.no_vector"] == 0


def test_rerun_with_more_epochs_continues_the_run(trained, capsys):
    from mask.pipeline.train import TrainingRunError

    root, first = trained
    s = _main(root, "train.epochs=3")
    t = s["training"]
    assert t["run_name"] == first["training"]["run_name"]  # epochs are not part of the run name
    assert t["continued_from_epoch"] == 2 and t["final_epoch"] == 2 and t["resumes"] == 1
    assert t["steps"] == first["training"]["steps"] * 3 // 2  # one more epoch of the same size
    client = _client(s)
    assert [st for st, _ in _history(client, s["mlflow"]["run_id"], "epoch.loss")] == [2]
    assert _history(client, s["mlflow"]["run_id"], "train.resumed_at_epoch") == [(first["training"]["steps"], 2.0)]
    # the same job again: the run is finished, nothing trains, same checkpoint and losses
    capsys.readouterr()
    again = _main(root, "train.epochs=3")
    assert again["training"]["reused"] is True
    assert again["training"]["checkpoint"] == t["checkpoint"]
    assert again["training"]["epoch.loss"] == pytest.approx(t["epoch.loss"])
    out = capsys.readouterr().out
    assert f"checkpoint: {t['checkpoint']}" in out and "final losses: loss=" in out
    # fewer epochs than the run already trained: a clear error, not a silent longer model
    with pytest.raises(TrainingRunError, match=r"train-\w+: its latest checkpoint .*checkpoint_.* past train.epochs=1"):
        _main(root, "train.epochs=1")


def _copy_run(root: Path, name: str, new: str) -> Path:
    dst = root / "train" / new
    shutil.copytree(root / "train" / name, dst)
    return dst


def test_corrupt_checkpoint_is_named(trained):
    from mask.pipeline.train import CheckpointError, latest_checkpoint

    root, s = trained
    run = _copy_run(root, s["training"]["run_name"], "copy-corrupt")
    import pyarrow.fs as pafs

    latest = Path(latest_checkpoint(pafs.LocalFileSystem(), str(run)))
    target = latest / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=re.escape(str(target)) + ".*unreadable or truncated"):
        _main(root, "train.epochs=9", "train.run_name=copy-corrupt")
    client = _client(s)
    failed = client.search_runs([client.get_run(s["mlflow"]["run_id"]).info.experiment_id],
                                "tags.`train.run_name` = 'copy-corrupt'")
    assert failed and failed[0].info.status == "FAILED"
    assert "CheckpointError" in failed[0].data.tags["train.error"]


def test_mismatched_checkpoint_is_named(trained):
    from mask.pipeline.train import CheckpointError

    root, s = trained
    run = _copy_run(root, s["training"]["run_name"], "copy-mismatch")
    with pytest.raises(CheckpointError, match=re.escape(str(run)) + r".*model.safetensors: does not match the model"):
        _main(root, "train.epochs=9", "train.run_name=copy-mismatch", "model.latent_dim=64")


# ---------------------------------------------------------------- faults, vectors, ablation


@pytest.fixture(scope="module")
def variant(trained, tmp_path_factory):
    """Word vectors lacking some words + the "w/o KL" ablation + a worker killed at the start of epoch 1."""
    from mask.datasets.demo import COLOURS, OBJECT_ASPECT, PARTS, SCENERY, SIZES, TEXTURES
    from mask.faults import FAULT_ENV

    root, _ = trained
    tmp = tmp_path_factory.mktemp("variant")
    words = sorted({*OBJECT_ASPECT, *PARTS, *SCENERY, *COLOURS, *SIZES, *TEXTURES})  # the world's VG-side words
    omitted = set(words[::3])
    rng = np.random.default_rng(0)
    with open(tmp / "tiny.glove.txt", "w") as f:
        for w in [*words, "unrelated", "other"]:
            if w not in omitted:
                f.write(w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=8)) + "\n")
    marker = tmp / "fault-fired"
    os.environ[FAULT_ENV] = f"train_epoch:1:{marker}"
    try:
        s = _main(root, "train.epochs=3", f"vectors.source={tmp / 'tiny.glove.txt'}",
                  f"vectors.cache_dir={tmp / 'cache'}", "model.word_dim=8", "loss.kl_weight=0",
                  "train.max_failures=2")
    finally:
        os.environ.pop(FAULT_ENV, None)
    return s, omitted, marker


def test_worker_killed_mid_run_resumes_and_finishes(variant):
    s, _, marker = variant
    assert marker.read_text() == "fired"  # the worker really died at epoch 1
    t = s["training"]
    assert t["final_epoch"] == 2 and t["resumes"] == 1 and t["continued_from_epoch"] == 0
    client = _client(s)
    rid = s["mlflow"]["run_id"]
    assert [st for st, _ in _history(client, rid, "epoch.loss")] == [0, 1, 2]
    assert [v for _, v in _history(client, rid, "train.resumed_at_epoch")] == [1.0]
    assert client.get_run(rid).data.metrics["train.resumes"] == 1


def test_words_without_vectors_are_counted_and_reported(variant, trained):
    s, omitted, _ = variant
    v = s["vocabulary"]
    assert v["vocabulary"] == trained[1]["vocabulary"]["vocabulary"]  # same VG words as with full vectors
    assert v["no_vector"] > 0 and set(v["no_vector_examples"]) <= omitted
    assert len(v["no_vector_examples"]) == min(v["no_vector"], 20)  # the summary lists at most 20
    assert v["kept"] == v["vocabulary"] - v["no_vector"]
    assert v["no_vector_regions"] > 0
    assert s["training"]["vocabulary"] == v["kept"]
    client = _client(s)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.data.metrics["vocabulary.no_vector"] == v["no_vector"]
    listed = json.loads(Path(client.download_artifacts(run.info.run_id, "vocabulary/no_vector.json")).read_text())
    assert len(listed["no_vector"]) == v["no_vector"] and set(listed["no_vector"]) <= omitted  # every one
    assert set(v["no_vector_examples"]) <= set(listed["no_vector"])


def test_ablation_runs_are_separate(variant, trained):
    from mask.config import load_config
    from mask.pipeline.identity import knowledge_version, train_run_name

    s, _, _ = variant
    base = trained[1]
    # the KL ablation trained as its own Ray Train run and its own MLflow run, without a KL term
    assert s["training"]["run_name"] != base["training"]["run_name"]
    assert s["mlflow"]["run_id"] != base["mlflow"]["run_id"]
    client = _client(s)
    run = client.get_run(s["mlflow"]["run_id"])
    assert run.data.params["loss.kl_weight"] == "0.0"
    assert "epoch.loss_kl" not in run.data.metrics and "epoch.loss_rec" in run.data.metrics
    # every ablation of eq. 14 is its own knowledge version and training run
    frel = "features/demo_vg/x"
    cfgs = [load_config("demo", o) for o in ([], ["loss.lambda_cm=0"], ["loss.lambda_cl=0"], ["loss.kl_weight=0"])]
    assert len({knowledge_version(c) for c in cfgs}) == 4
    assert len({train_run_name(c, frel) for c in cfgs}) == 4


def test_nan_loss_stops_naming_step_and_term(trained):
    from mask.losses import NonFiniteLoss

    root, s = trained
    # a diverging learning rate: Adam moves every weight by ~lr, the next forward pass overflows
    with pytest.raises(NonFiniteLoss, match=r"^step \d+: loss_\w+ is (nan|inf)$") as e:
        _main(root, "train.epochs=2", "train.lr=1e30")
    assert e.value.step >= 1 and e.value.term.startswith("loss")
    client = _client(s)
    runs = client.search_runs([client.get_run(s["mlflow"]["run_id"]).info.experiment_id],
                              "tags.`train.error` LIKE 'NonFiniteLoss%'")
    assert runs and runs[0].info.status == "FAILED"
    assert str(e.value) in runs[0].data.tags["train.error"]


# ---------------------------------------------------------------- pieces, no Ray


def _rows(rng, n_images=5, dim=6):
    counts = rng.integers(0, 5, n_images)
    feats = [rng.normal(size=(c, dim)).astype(np.float16) for c in counts]
    rids = [[f"r{i}_{j}" for j in range(c)] for i, c in enumerate(counts)]
    return counts, feats, rids


def test_collate_matches_naive_padding(rng):
    from mask.pipeline.train import collate

    counts, feats, _ = _rows(rng)
    slots = [np.arange(c, dtype=np.int32)[::-1].copy() for c in counts]
    words = [rng.integers(0, 9, c).astype(np.int32) for c in counts]
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # noqa: E731 - object array of arrays
    batch = {"num_boxes": counts, "feature_dim": np.full(len(counts), 6), "features": obj([f.reshape(-1) for f in feats]),
             "pair_slot": obj(slots), "pair_word": obj(words)}
    b = collate(batch, torch.device("cpu"))
    r = max(int(counts.max()), 1)
    assert b["features"].shape == (len(counts), r, 6) and b["features"].dtype == torch.float32
    for i, c in enumerate(counts):
        assert torch.equal(b["mask"][i], torch.arange(r) < c)
        np.testing.assert_array_equal(b["features"][i, :c].numpy(), feats[i].astype(np.float32))
        assert not b["features"][i, c:].any()
    np.testing.assert_array_equal(b["pair_image"].numpy(), np.repeat(np.arange(len(counts)), counts))
    np.testing.assert_array_equal(b["pair_slot"].numpy(), np.concatenate(slots))
    np.testing.assert_array_equal(b["pair_word"].numpy(), np.concatenate(words))


def test_pair_join_matches_arrow_reference(rng):
    from mask.pipeline.pair_join import PairJoin
    from mask.pipeline.train import training_table

    counts, feats, rids = _rows(rng, 8)
    features = pa.table({"image_id": [f"i{i}" for i in range(8)],
                         "features": pa.array([f.reshape(-1) for f in feats], pa.list_(pa.float16())),
                         "num_boxes": pa.array(counts, pa.int32()), "feature_dim": pa.array([6] * 8, pa.int32()),
                         "region_ids": pa.array(rids, pa.list_(pa.string()))})
    vocab = ["ball", "red", "tree"]
    index = {w: i for i, w in enumerate(vocab)}
    region_words = {r: [vocab[k] for k in range(3) if rng.random() < 0.4] for ids in rids for r in ids}
    region_words = {r: ws for r, ws in region_words.items() if ws}
    ref = training_table(features, region_words, index).to_pylist()
    batch = {k: np.array(features.column(k).to_pylist() + [None], dtype=object)[:-1] for k in features.column_names}
    out = PairJoin({r: [index[w] for w in ws] for r, ws in region_words.items()})(batch)
    assert list(out["image_id"]) == [row["image_id"] for row in ref]
    for i, row in enumerate(ref):
        assert list(out["pair_slot"][i]) == row["pair_slot"] and list(out["pair_word"][i]) == row["pair_word"]
        assert out["num_pairs"][i] == row["num_pairs"] == len(row["pair_word"])


def test_checkpoint_round_trip_and_errors(tmp_path):
    import pyarrow.fs as pafs

    from mask.config import load_config
    from mask.pipeline.train import (
        CheckpointError,
        TrainModule,
        latest_checkpoint,
        load_checkpoint_dir,
        save_checkpoint,
    )

    cfg = load_config("demo", ["model.latent_dim=16", "model.feature_dim=12", "model.word_dim=8"])
    torch.manual_seed(0)
    m = TrainModule(cfg, 5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool))["mu"].sum().backward()
    opt.step()
    rngs = [torch.get_rng_state(), torch.manual_seed(7).get_state()]
    for step, name in ((3, "checkpoint_a"), (9, "checkpoint_b"), (12, "checkpoint_c")):
        (tmp_path / name).mkdir()
        if name != "checkpoint_c":  # c: interrupted upload, no state.json
            save_checkpoint(m, opt, {"epoch": step // 3, "step": step}, rngs, str(tmp_path / name))
    assert latest_checkpoint(pafs.LocalFileSystem(), str(tmp_path)) == str(tmp_path / "checkpoint_b")
    assert latest_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "none")) is None
    m2 = TrainModule(cfg, 5)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    meta = load_checkpoint_dir(str(tmp_path / "checkpoint_b"), m2, opt2, rank=1)
    assert meta["step"] == 9
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), rngs[1])  # rank 1's stream
    assert opt2.state_dict()["state"][0]["step"] == 1
    # mismatched model
    other = TrainModule(load_config("demo", ["model.latent_dim=8", "model.feature_dim=12", "model.word_dim=8"]), 5)
    with pytest.raises(CheckpointError, match=r"checkpoint_b/model.safetensors: does not match the model"):
        load_checkpoint_dir(str(tmp_path / "checkpoint_b"), other)
    # truncated weights, broken state
    f = tmp_path / "checkpoint_a" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        load_checkpoint_dir(str(tmp_path / "checkpoint_a"), m2)
    (tmp_path / "checkpoint_b" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"checkpoint_b/state.json: unreadable"):
        load_checkpoint_dir(str(tmp_path / "checkpoint_b"))


def test_batch_schedule_and_run_name():
    from mask.config import load_config
    from mask.pipeline.identity import knowledge_version, train_run_name
    from mask.pipeline.train import batch_pairs, images_per_batch

    paper = load_config("vg").train
    assert [batch_pairs(paper, e) for e in (0, 199, 200, 399)] == [4096, 4096, 2048, 2048]
    assert images_per_batch(paper, 0, pairs_per_image=16.0, world_size=4) == 64  # 4096 / 16 / 4
    assert images_per_batch(paper, 300, pairs_per_image=1e6) == 1
    base = load_config("demo")
    same = [load_config("demo", [o]) for o in ("train.epochs=99", "train.checkpoint_every=2",
                                               "train.num_workers=2", "train.log_every=3")]
    other = [load_config("demo", [o]) for o in ("train.lr=0.5", "train.seed=3", "loss.tau=0.2", "model.latent_dim=64")]
    name = train_run_name(base, "f")
    assert all(train_run_name(c, "f") == name for c in same)
    assert all(train_run_name(c, "f") != name for c in other) and train_run_name(base, "g") != name
    assert knowledge_version(same[0]) != knowledge_version(base)  # the knowledge does depend on epochs
    assert train_run_name(load_config("demo", ["train.run_name=mine"]), "f") == "mine"


@pytest.mark.parametrize("name", ["vg", "flickr30k", "coco"])
def test_shipped_configs_load(name):
    from mask.config import load_config

    cfg = load_config(name)
    assert cfg.model.latent_dim == 512 and cfg.model.word_dim == 300 and cfg.model.feature_dim == 2048
    assert cfg.loss.lambda_cm == cfg.loss.lambda_cl == 3.0
    t = cfg.train
    assert (t.lr, t.epochs, t.batch_size, t.batch_size_late, t.late_epoch) == (1e-4, 400, 4096, 2048, 200)
    assert t.use_gpu and cfg.dataset.kind == "vg" and cfg.detector.depth == 101
    assert cfg.vectors.source.endswith("glove.840B.300d.txt") and cfg.knowledge.m == 10
    from mask.pipeline.identity import knowledge_version

    if name == "vg":
        assert knowledge_version(cfg) == knowledge_version(load_config("vg"))
    else:
        # The leakage guard leaves this gallery's images out of the VG knowledge, so each evaluation gets its
        # own knowledge; without the guard all three share one.
        assert cfg.dataset.exclude_gallery_overlap
        assert knowledge_version(cfg) != knowledge_version(load_config("vg"))
        unguarded = load_config(name, ["dataset.exclude_gallery_overlap=false"])
        assert knowledge_version(unguarded) == knowledge_version(load_config("vg"))
    if name == "vg":
        assert cfg.gallery is None
    else:
        assert cfg.gallery.kind == "karpathy" and cfg.gallery.splits == ["test"]
