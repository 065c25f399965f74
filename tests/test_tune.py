"""tune/: search-space validation, a tiny sweep end to end (nested MLflow runs, grid metrics, best
config, registered knowledge), ASHA settings, and restoring a sweep whose driver was killed.

One tiny sweep (2 trials × 2 epochs on a slice of the demo world) runs per module on the session's
local Ray; the restore test reuses its storage root (features are extracted once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a thin slice: few images, small inputs, few boxes, no BN calibration (the plumbing is under test, not accuracy)
SMALL = ["dataset.limit=24", "gallery.limit=12", "detector.batch_size=8", "detector.rpn_post_nms_topk=40",
         "detector.num_boxes=12", "detector.min_size=128", "detector.max_size=160", "detector.calibrate_random=false"]
TINY_SPACE = {
    "search": {"loss.lambda_cm": {"loguniform": [1.0, 9.0]}, "loss.tau": {"choice": [0.05, 0.2]}},
    "grid": {"knowledge.m": [1, 100], "rerank.alpha": [0.15, 1.0], "rerank.k": [5]},
    "trials": {"num_samples": 2, "epochs": 2, "eval_every": 1, "cpus": 1},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "validation": {"fraction": 0.75},
}
METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum")


def _space(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


# ---------------------------------------------------------------- the space file (no Ray)


@pytest.mark.parametrize("change, key, words", [
    ({"search": {"loss.lamda_cm": {"loguniform": [1, 9]}}}, "search", "unknown parameter 'loss.lamda_cm'"),
    ({"search": {"knowledge.m": {"choice": [1, 10]}}}, "search", "belong under grid"),
    ({"search": {"loss.lambda_cm": {"loguniform": [0.0, 9]}}}, "search.loss.lambda_cm", "0 < lower < upper"),
    ({"search": {"loss.lambda_cl": {"loguniform": [9, 1]}}}, "search.loss.lambda_cl", "0 < lower < upper"),
    ({"search": {"loss.tau": {"uniform": [-1.0, 0.5]}}}, "search.loss.tau", "refused by the config"),
    ({"search": {"loss.tau": {"choice": []}}}, "search.loss.tau", "at least one value"),
    ({"search": {"loss.tau": {"choice": [0.1], "grid": [0.2]}}}, "search.loss.tau", "exactly one"),
    ({"search": {"loss.tau": {"normal": [0.1, 1]}}}, "search.loss.tau.normal", "unknown key"),
    ({"grid": {"knowledge.m": [0, 10]}}, "grid.knowledge.m", "≥ 1"),
    ({"grid": {"rerank.alpha": [-0.5]}}, "grid.rerank.alpha", "≥ 0"),
    ({"grid": {"rerank.topk": [5]}}, "grid.rerank.topk", "unknown key"),
    ({"trials": {"num_samples": 0}}, "trials.num_samples", "greater than or equal to 1"),
    ({"trials": {"epochs": 2}, "scheduler": {"grace_period": 3}}, "grace_period", "exceeds trials.epochs"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type", "asha"),
    ({"validation": {"fraction": 0}}, "validation.fraction", "greater than 0"),
])
def test_space_errors_name_the_key(tmp_path, change, key, words):
    from mask.sweep import SpaceError, load_space

    data = {**TINY_SPACE, **change}
    with pytest.raises(SpaceError) as e:
        load_space(_space(tmp_path, data))
    assert key in str(e.value) and words in str(e.value), str(e.value)
    assert str(tmp_path / "space.yaml") in str(e.value)


def test_space_file_problems(tmp_path):
    from mask.sweep import SpaceError, load_space

    with pytest.raises(SpaceError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="top level must be a mapping"):
        load_space(bad)


def test_cli_exits_2_on_a_bad_space(tmp_path, capsys):
    from tune import sweep

    p = _space(tmp_path, {**TINY_SPACE, "search": {"loss.tau": {"loguniform": [0.5, 0.1]}}})
    with pytest.raises(SystemExit) as e:
        sweep.main(["--space", str(p), f"storage.root={tmp_path / 'r'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "search.loss.tau" in err and "0 < lower < upper" in err
    assert not (tmp_path / "r").exists()  # nothing ran


def test_demo_space_is_valid_and_samples_the_paper_parameters():
    from mask.sweep import load_space

    spec = load_space(ROOT / "tune" / "spaces" / "demo.yaml")
    assert {"loss.lambda_cm", "loss.lambda_cl", "loss.tau"} <= set(spec.search)
    lo, hi = spec.search["loss.lambda_cm"].loguniform
    assert lo < 3.0 < hi  # around the paper's λ1 = 3
    assert spec.grid.m == [1, 10, 50, 100] and spec.scheduler.type == "asha"


def test_grid_names_best_entry_and_m_clipping(rng):
    from mask.sweep import best_entry, best_rerank, clip_m, flatten_grid

    def met():
        v = {k: float(x) for k, x in zip(METRICS[:-1], rng.uniform(0, 100, 6), strict=True)}
        v["rsum"] = sum(v.values())
        return v

    grid = {"mask": {1: met(), 25: met()}, "base": met(),
            "rerank": {(m, a, k): met() for m in (1, 25) for a in (0.15, 1.0) for k in (5, 10)}}
    flat = flatten_grid(grid)
    assert flat["grid.m_25.rsum"] == grid["mask"][25]["rsum"]
    assert flat["grid.m_1.alpha_0.15.k_10.t2i_r5"] == grid["rerank"][(1, 0.15, 10)]["t2i_r5"]
    assert flat["grid.base.i2t_r1"] == grid["base"]["i2t_r1"]
    assert len(flat) == 7 * (2 + 8 + 1)
    best = best_entry(grid)
    cand = [v for k, v in flat.items() if k.endswith(".rsum") and not k.startswith("grid.base")]
    assert best["metrics"]["rsum"] == max(cand)
    at = best_rerank(grid, 25)
    assert at["metrics"]["rsum"] == max(v["rsum"] for (m, _, _), v in grid["rerank"].items() if m == 25)
    assert clip_m([1, 10, 50, 100], 25) == ([1, 10, 25], [50, 100])
    assert clip_m([1, 10], 25) == ([1, 10], [])


@pytest.mark.parametrize("given_base", [True, False])
def test_grid_matches_a_naive_reference(rng, given_base):
    """evaluate_grid against eq. 10 by loops (score_matrix_naive), eq. 11–13 (ood_prototypes) and eq. 15
    (rerank_both) applied by hand; the demo base is the same prototypes with global mean pooling."""
    from mask.config import load_config
    from mask.knowledge import KnowledgeTable, ood_prototypes
    from mask.metrics import recall_at_k
    from mask.pipeline.tune_trial import EvalGallery, PreParsed, StoredVectors, evaluate_grid
    from mask.rerank import rerank_both
    from mask.scoring import normalize_rows, score_matrix_naive

    known = ["car", "dog", "red", "blue", "tree", "big"]
    kvecs = rng.normal(size=(6, 8)).astype(np.float32)
    table = KnowledgeTable(words=known, counts=np.full(6, 3), word_vectors=kvecs,
                           prototypes=rng.normal(size=(6, 5)).astype(np.float32), source=["vg"] * 6)
    ood = {"automobile": kvecs[0] + 0.1 * rng.normal(size=8), "crimson": rng.normal(size=8)}
    texts = ["red car", "big dog", "crimson automobile", "blue tree", "red dog", "big car", "blue car", "tree"]
    words = {"red car": ["red", "car"], "big dog": ["big", "dog"], "crimson automobile": ["crimson", "automobile"],
             "blue tree": ["blue", "tree"], "red dog": ["red", "dog"], "big car": ["big", "car"],
             "blue car": ["blue", "car"], "tree": ["tree", "nightjar"]}  # "nightjar": no vector, dropped
    kv = StoredVectors({w: i for i, w in enumerate(ood)}, np.stack(list(ood.values())).astype(np.float32), 8)
    n_img = 4
    c2i = np.repeat(np.arange(n_img), 2)
    mu = rng.normal(size=(n_img, 3, 5)).astype(np.float32)
    mask = np.ones((n_img, 3), bool)
    mask[1, 2] = False
    base = rng.normal(size=(n_img, len(texts))) if given_base else None
    g = EvalGallery(features={}, image_ids=[str(i) for i in range(n_img)], texts=texts, caption_to_image=c2i,
                    parser=PreParsed(words), kv=kv, base=base)
    cfg = load_config("demo")
    grid = evaluate_grid(cfg, table, mu, mask, g, [1, 3], [0.5], [2, 4], base_m=3)

    def naive(m: int, pooling: str) -> np.ndarray:
        protos = {w: table.prototypes[i] for i, w in enumerate(known)}
        made = ood_prototypes(np.stack(list(ood.values())), kvecs, table.prototypes, m)
        protos.update(dict(zip(ood, made, strict=True)))
        vocab = sorted(protos)
        cw = [[vocab.index(w) for w in words[t] if w in protos] for t in texts]
        p = normalize_rows(np.stack([protos[w] for w in vocab]))
        return score_matrix_naive(normalize_rows(mu.reshape(-1, 5)).reshape(mu.shape), mask, cw, p, pooling=pooling)

    ref_base = base if given_base else naive(3, "mean")
    assert grid["base"] == pytest.approx(recall_at_k(ref_base, caption_to_image=c2i))
    for m in (1, 3):
        sim = naive(m, "max-mean")
        assert grid["mask"][m] == pytest.approx(recall_at_k(sim, caption_to_image=c2i))
        for k in (2, 4):
            rr = rerank_both(ref_base, sim, k, 0.5)
            want = recall_at_k(rr.i2t, caption_to_image=c2i, t2i_similarity=rr.t2i)
            assert grid["rerank"][(m, 0.5, k)] == pytest.approx(want)


def test_asha_stops_a_worse_trial_at_the_grace_rung():
    """The scheduler the sweep uses: ASHA on val_rsum (max) over epochs_done; Tune sets metric/mode."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from mask.pipeline.tune import make_scheduler
    from mask.sweep import SCORE, parse_space

    spec = parse_space({**TINY_SPACE, "trials": {"epochs": 8}, "scheduler": {"grace_period": 2, "reduction_factor": 2}})
    s = make_scheduler(spec, 8)
    assert isinstance(s, ASHAScheduler)
    s.set_search_properties(SCORE, "max")
    trials = [SimpleNamespace(trial_id=str(i), status="RUNNING") for i in range(3)]
    for t in trials:
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, trials[0], {"epochs_done": 1, SCORE: 1.0}) == "CONTINUE"  # before the grace period
    assert s.on_trial_result(None, trials[0], {"epochs_done": 2, SCORE: 100.0}) == "CONTINUE"
    assert s.on_trial_result(None, trials[1], {"epochs_done": 2, SCORE: 200.0}) == "CONTINUE"
    assert s.on_trial_result(None, trials[2], {"epochs_done": 2, SCORE: 10.0}) == "STOP"
    assert isinstance(make_scheduler(parse_space({"scheduler": {"type": "fifo"}}), 8), FIFOScheduler)


# ---------------------------------------------------------------- a tiny sweep end to end


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_local):
    from tune import sweep

    root = tmp_path_factory.mktemp("tune")
    space = _space(root, TINY_SPACE, "tiny.yaml")
    args = ["--space", str(space), "--name", "tiny", f"storage.root={root}", *SMALL]
    t0 = time.perf_counter()
    summary = sweep.main(args)
    return {"root": root, "space": space, "args": args, "summary": summary, "seconds": time.perf_counter() - t0}


def _client(root: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")


def _sweep_runs(root: Path, parent_id: str):
    c = _client(root)
    exp = c.get_experiment_by_name("mask-itm")
    parent = c.get_run(parent_id)
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return c, parent, children


def test_sweep_logs_nested_runs_with_grid_metrics(swept):
    s = swept["summary"]
    c, parent, children = _sweep_runs(swept["root"], s["mlflow"]["parent_run_id"])
    assert parent.data.tags["job"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.params["scheduler.type"] == "asha" and "space.search.loss.lambda_cm" in parent.data.params
    assert parent.data.params["grid.m_clipped"] == "[100]"  # the slice's knowledge has fewer words
    assert "not a pretrained base model" in parent.data.params["rerank.base_model"]
    assert len(children) == 2 == len(s["trials"])
    m_grid = s["grid_m"]
    assert m_grid[0] == 1 and 1 < m_grid[-1] < 100
    for r in children:
        assert r.data.tags["job"] == "tune-trial" and r.info.status == "FINISHED"
        p = r.data.params
        assert p["loss.lambda1"] == p["loss.lambda_cm"] and float(p["loss.tau"]) in (0.05, 0.2)
        assert "not a pretrained base model" in p["rerank.base_model"]
        # ASHA (grace 1, factor 2) may stop the worse trial after its first evaluation
        done = int(p["epochs_done"])
        assert r.data.tags["tune.stopped_early"] == str(done < 2).lower()
        assert sorted(h.step for h in c.get_metric_history(r.info.run_id, "val.rsum")) == list(range(done))
        assert sorted(h.step for h in c.get_metric_history(r.info.run_id, "epoch.loss")) == list(range(done))
        for term in ("epoch.loss_ir", "epoch.loss_cm", "epoch.loss_cl"):
            assert term in r.data.metrics
        met = r.data.metrics
        # the modality-gap measures of the trial's MTM, per evaluation
        assert "gap.skipped" not in met
        assert met["gap.prototype.cos_r1"] >= 0 and met["gap.prototype.w2_exact"] > 0
        assert len(c.get_metric_history(r.info.run_id, "gap.prototype.w2_exact")) == done
        names = [f"grid.m_{m}.{k}" for m in m_grid for k in METRICS]
        names += [f"grid.m_{m}.alpha_{a}.k_5.{k}" for m in m_grid for a in ("0.15", "1") for k in METRICS]
        names += [f"grid.base.{k}" for k in METRICS]
        missing = [n for n in names if n not in met]
        assert not missing, missing
        # the trial's score is the best Rs over its grid (MASK alone and re-ranked, not the base)
        rsums = {n: met[n] for n in names if n.endswith(".rsum") and not n.startswith("grid.base")}
        assert met["val.rsum"] == met["best.rsum"] == max(rsums.values())
        top = max(rsums, key=rsums.get)
        assert top.startswith(f"grid.m_{p['best.m']}.")
        if p["best.alpha"] == "none":
            assert top == f"grid.m_{p['best.m']}.rsum"
        else:
            assert top == f"grid.m_{p['best.m']}.alpha_{float(p['best.alpha']):g}.k_{p['best.k']}.rsum"
        for k in METRICS[:-1]:
            assert 0.0 <= met[f"grid.base.{k}"] <= 100.0
        assert met["grid.base.rsum"] == pytest.approx(sum(met[f"grid.base.{k}"] for k in METRICS[:-1]))
    # the parent's best is the best trial's
    top = max(r.data.metrics["val.rsum"] for r in children)
    assert parent.data.metrics["best.rsum"] == top == s["best"]["val_rsum"]
    best_child = next(r for r in children if r.data.tags["tune.trial_id"] == parent.data.params["best.trial_id"])
    assert best_child.data.metrics["val.rsum"] == top
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"best.yaml", "space.yaml", "trials.csv"}


def test_best_config_is_a_loadable_config_with_registered_knowledge(swept):
    from mask.config import load_config
    from mask.knowledge_artifact import load_knowledge
    from mask.storage import Store

    s = swept["summary"]
    path = Path(s["best_config"])
    cfg = load_config(path)
    best = s["best"]
    assert cfg.loss.lambda_cm == pytest.approx(best["config"]["loss"]["lambda_cm"])
    assert cfg.loss.tau == best["config"]["loss"]["tau"]
    # the config trains as long as the best trial did: ASHA (grace 1) may have stopped the trial whose last
    # score is the best after its first epoch (Tune's best is by the last result; tune_best.py)
    assert cfg.knowledge.m == best["m"] and cfg.train.epochs == best["epochs"] and best["epochs"] in (1, 2)
    assert cfg.rerank.alpha == best["rerank"]["alpha"] and cfg.rerank.k == best["rerank"]["k"]
    assert cfg.knowledge.version == s["knowledge"]["version"]
    store = Store(str(swept["root"]))
    rel = f"knowledge/{cfg.knowledge.version}"
    assert store.committed(rel, cfg.knowledge.version) is not None
    table, pae = load_knowledge(store, rel)
    assert len(table.words) == s["knowledge"]["words"] > 0 and pae
    mv = _client(swept["root"]).get_model_version("mask-knowledge", s["knowledge"]["model_version"])
    assert mv.tags["knowledge_uri"] == s["knowledge"]["uri"] and mv.tags["tune.trial_id"] == best["trial_id"]
    # held-out test images were scored with the registered knowledge
    assert set(s["test"]) >= {"mask", "base"} and 0 <= s["test"]["mask"]["rsum"] <= 600
    # a rerun of the finished sweep reuses it (nothing retrained or registered again)
    from tune import sweep

    again = sweep.main(swept["args"])
    assert again["reused"] is True and again["best"] == s["best"]


def test_a_sweep_name_belongs_to_one_config_and_space(swept, tmp_path, capsys):
    from tune import sweep

    other = _space(tmp_path, {**TINY_SPACE, "grid": {**TINY_SPACE["grid"], "rerank.k": [3]}})
    args = ["--space", str(other), f"storage.root={swept['root']}", *SMALL]
    for name, words in (("tiny", "was started with another config or search space"), ("../up", "--name")):
        with pytest.raises(SystemExit) as e:
            sweep.main(["--name", name, *args])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_rerun_restores_failed_trials_from_their_checkpoints(swept, monkeypatch, tmp_path):
    """Tuner.restore of an interrupted experiment: a trial fails after its first report; the sweep
    reports the other one and stays open; a rerun (--resume) restores the experiment and the failed trial
    continues from its checkpoint (epoch 1 of 3) — the same parent and nested MLflow runs, now finished."""
    from tune import sweep

    root = swept["root"]
    space = _space(tmp_path, {**TINY_SPACE, "trials": {**TINY_SPACE["trials"], "epochs": 3, "max_failures": 0},
                              "scheduler": {"type": "fifo"}})
    # a base model's scores given as a file (random, seeded): the grid's base is then the same for every trial
    from mask.storage import Store

    store = Store(str(root))
    caps = store.read_table("datasets/demo_gallery/captions")
    imgs = store.read_table("datasets/demo_gallery/images").column("image_id").to_pylist()
    pairs = [(i, c) for i in imgs for c in caps.column("caption_id").to_pylist()]
    base = tmp_path / "base.parquet"
    pq.write_table(pa.table({"image_id": [i for i, _ in pairs], "caption_id": [c for _, c in pairs],
                             "score": np.random.default_rng(0).normal(size=len(pairs))}), base)
    args = ["--name", "failed", "--space", str(space), f"storage.root={root}", f"rerank.base_scores={base}", *SMALL]
    monkeypatch.setenv("MASK_FAULT_INJECT", f"tune_error:1:{tmp_path / 'failed-once'}")
    first = sweep.main(args)
    errors = [t for t in first["trials"] if t["error"]]
    assert len(errors) == 1 and "fault injection" in errors[0]["error"]
    state = json.loads((root / "sweeps" / "failed" / "sweep.json").read_text())
    assert "summary" not in state  # not final: a rerun retries
    c, parent, children = _sweep_runs(root, first["mlflow"]["parent_run_id"])
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    assert parent.data.tags["tune.incomplete"] == "true" and "best.m" not in parent.data.params
    again = sweep.main([*args, "--resume"])
    assert again["mlflow"]["parent_run_id"] == first["mlflow"]["parent_run_id"]
    assert all(t["error"] is None and t["epochs_done"] == 3 for t in again["trials"])
    c, parent, children = _sweep_runs(root, first["mlflow"]["parent_run_id"])
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert parent.data.params["best.trial_id"] == again["best"]["trial_id"]
    assert parent.data.params["rerank.base_model"] == f"rerank.base_scores {base}"
    assert children[0].data.metrics["grid.base.rsum"] == children[1].data.metrics["grid.base.rsum"]
    redone = next(r for r in children if r.data.tags["tune.trial_id"] == errors[0]["trial_id"])
    assert sorted(h.step for h in c.get_metric_history(redone.info.run_id, "val.rsum")) == [0, 1, 2]
    starts = _start_epochs(root / "sweeps" / "failed" / "tune" / f"trial_{errors[0]['trial_id']}")
    assert starts == [0, 1, 1], starts  # epoch 0 from scratch, then epochs 1-2 after the restore


def _start_epochs(trial_dir: Path) -> list[int]:
    """``start_epoch`` of every report of a trial (Tune's result.json, one line per report)."""
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)["start_epoch"] for line in lines if line.strip()]


@pytest.mark.slow  # a second local Ray in a driver subprocess (~1–2 min on 2 cores)
def test_resume_after_the_driver_is_killed(swept, ray_local, tmp_path):
    """A driver process killed mid-sweep (one trial has reported and holds); --resume finishes it,
    the trial continues from its checkpoint, and the MLflow runs are reopened, not duplicated."""
    from tune import sweep

    root = swept["root"]
    name = "killed"
    space = _space(tmp_path, {**TINY_SPACE, "trials": {**TINY_SPACE["trials"], "epochs": 3},
                              "scheduler": {"type": "fifo"}})
    common = ["--space", str(space), f"storage.root={root}", *SMALL]
    args = ["--name", name, *common]
    marker = tmp_path / "held"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MASK_FAULT_INJECT"] = f"tune_report:1:{marker}"
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune" / "sweep.py"), *args], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp = root / "sweeps" / name / "tune"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            results = [p for p in exp.glob("trial_*/result.json") if p.stat().st_size > 0] if exp.exists() else []
            if marker.exists() and results:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert marker.exists(), "no trial reported in time"
        time.sleep(1.0)  # let the driver snapshot the experiment state after the result
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its session)
        proc.wait(timeout=30)
        log.close()
    state = json.loads((root / "sweeps" / name / "sweep.json").read_text())
    assert "summary" not in state
    summary = sweep.main([*args, "--resume"])
    assert summary["mlflow"]["parent_run_id"] == state["parent_run_id"]
    assert all(t["status"] == "TERMINATED" and t["epochs_done"] == 3 for t in summary["trials"])
    c, parent, children = _sweep_runs(root, state["parent_run_id"])
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in children)
    # the held trial went on from its checkpoint (epoch 1 of 3), not from scratch
    starts = []
    for t in exp.glob("trial_*/result.json"):
        starts += [json.loads(line)["start_epoch"] for line in t.read_text().splitlines() if line.strip()]
    assert 1 in starts, starts
    for r in children:
        steps = [h.step for h in c.get_metric_history(r.info.run_id, "val.rsum")]
        assert sorted(set(steps)) == [0, 1, 2]
    with pytest.raises(SystemExit) as e:
        sweep.main(["--name", "never-ran", "--resume", *common])
    assert e.value.code == 2
    assert np.isfinite(summary["best"]["val_rsum"])


@pytest.mark.integration
@pytest.mark.slow  # ~3 min: a second Ray head (`ray start`) and a job; run with --runslow
def test_sweep_through_ray_job_submit(tmp_path):
    """`ray job submit -- python tune/sweep.py …` against a head on loopback (started and stopped by PID)."""
    from conftest import free_port, wait_for_port

    bin_dir = Path(sys.executable).parent
    port, dash = free_port(), free_port()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(dash, timeout=120)
        root = tmp_path / "artifacts"
        space = _space(tmp_path, TINY_SPACE)
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
               str(ROOT), "--runtime-env-json",
               json.dumps({"excludes": [".venv", "artifacts", ".git", ".plan", "bench/out"]}),
               "--", "python", "tune/sweep.py", "--space", str(space), "--name", "submitted",
               f"storage.root={root}", *SMALL]
        deadline = time.monotonic() + 300
        while True:  # the dashboard port opens before the head's job agent is ready to take jobs
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in (out.stdout + out.stderr) and "best trial" in out.stdout
        state = json.loads((root / "sweeps" / "submitted" / "sweep.json").read_text())
        assert len(state["summary"]["trials"]) == 2
        assert (root / "knowledge" / state["summary"]["knowledge"]["version"] / "_MANIFEST.json").exists()
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGINT)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
