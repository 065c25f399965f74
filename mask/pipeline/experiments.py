"""The paper's experiments as one command (``jobs/experiments.py``): every run that fills the report's
sections, over several seeds, reusing committed work, ending with the report.

Parts (each prints and logs its time):

* ``inputs`` — the sweep inputs of :mod:`mask.pipeline.tune_inputs` (training features, vocabulary, the
  gallery's features, captions parsed once, for each caption mode), with the **whole gallery** as the
  evaluation split (``validation.fraction = 1``): every table row here is on the same gallery and protocol.
* ``train`` — one in-process training per (setting, seed) (the training step of the jobs and Tune trials,
  :func:`mask.pipeline.tune_trial.train_epoch`), the knowledge of eq. 2, μ of the gallery, and the
  evaluations that need no retraining (normalisation, OOD on/off, m grid, α grid, caption mode, OOD
  weighting, Appendix H fine-tuning, modality-gap measures).  Settings: the default; Table 3's ablations
  (without L_cm, L_cl, KL); the other ``loss.ir_reduction``; the paper-literal losses, and eq. 6's two literal
  forms each alone; a fixed λ1 × λ2 grid
  (Tables 4/15).  A (setting, seed) result is committed under ``experiments/<name>/runs/`` and reused.
* ``heldout`` — the held-out-word OOD test: a seeded share of the knowledge words is hidden, their
  prototypes are rebuilt from the others with eq. 11–13 at each m (dot weighting, and our cosine
  variant) and with the Procrustes map (Appendix B), and compared with their real eq. 2 prototype
  (cosine, and the rank of the true word among all prototypes).
* ``report`` — Markdown tables (mean ± spread over seeds; every row states gallery/split, protocol,
  epochs), plots (a λ heatmap, m / α / held-out curves, the L_cm trend), then :func:`mask.report.make_report`
  on the logged MLflow runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mask import tracking
from mask.config import PAPER_LITERAL, MaskConfig
from mask.errors import MaskError
from mask.evaluation import finetune_knowledge, gallery_scores, map_captions
from mask.knowledge import ood_prototypes, procrustes_prototypes
from mask.metrics import recall_at_k
from mask.models import save_pae
from mask.pipeline.runtime import JobContext, init_ray
from mask.pipeline.train import TrainModule
from mask.pipeline.tune_inputs import inputs_hash, prepare_inputs
from mask.pipeline.tune_trial import (
    _gap,
    evaluate_grid,
    gallery_mu,
    knowledge_table,
    load_gallery,
    load_sweep_data,
    read_inputs,
    train_epoch,
    trial_config,
)
from mask.preflight import check_settings
from mask.report import ReportError, make_report
from mask.report.experiments import write_experiment_report
from mask.storage import Store, fingerprint
from mask.sweep import parse_space

logger = logging.getLogger(__name__)

RESULT_KIND = "experiment-result"
METRIC_COLUMNS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum")


class ExperimentError(MaskError, ValueError):
    """An experiment plan that cannot run; the message names the key."""


class Plan(BaseModel):
    """What ``jobs/experiments.py`` runs (``--plan plan.yaml`` replaces any of these)."""
    model_config = ConfigDict(extra="forbid")

    # Seeds of every setting (≥ 3 so that tables can show a spread).
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # Epochs of every training (None = train.epochs of the config).
    epochs: int | None = Field(default=None, ge=1)
    # The fixed λ1 × λ2 grid (Tables 4/15), trained for every seed.
    lambda_grid: list[float] = Field(default_factory=lambda: [1.0, 3.0, 5.0], min_length=1)
    # OOD sampling sizes m (Table 5), α of eq. 15 (Table 6) and its top-k.
    m_grid: list[int] = Field(default_factory=lambda: [1, 3, 10, 30, 100], min_length=1)
    alpha_grid: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0], min_length=1)
    rerank_k: int = Field(default=20, ge=1)
    # Held-out-word OOD test: share of the knowledge words hidden, and the m values of its curve.
    heldout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    heldout_m: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 50], min_length=1)
    # Parts to run (all by default); "settings" limits the trained settings (None = all).
    parts: list[str] = Field(default_factory=lambda: ["train", "heldout", "report"])
    settings: list[str] | None = None
    # Torch threads of the in-process trainings (None = all cores).
    threads: int | None = Field(default=None, ge=1)


def training_settings(cfg: MaskConfig, plan: Plan) -> dict[str, dict[str, Any]]:
    """The trained settings: name → config overrides (dotted keys).

    ``default`` is the config as given; the others change what needs retraining.
    """
    other_red = "mean" if cfg.loss.ir_reduction == "sum" else "sum"
    out: dict[str, dict[str, Any]] = {  # in the order they run (the most informative first)
        "default": {},
        f"ir_reduction_{other_red}": {"loss.ir_reduction": other_red},
        "without_L_cl": {"loss.lambda_cl": 0.0},
        "without_L_cm": {"loss.lambda_cm": 0.0},
        "without_KL": {"loss.kl_weight": 0.0},
        "paper_literal_losses": {k: v for k, v in PAPER_LITERAL.items() if k.startswith("loss.")},
        # eq. 6's two literal forms, each alone (the paper-literal setting changes them together)
        "cl_raw_dot": {"loss.cl_normalize": False},
        "cl_same_word_negatives": {"loss.cl_exclude_same_word": False},
    }
    for l1 in plan.lambda_grid:
        for l2 in plan.lambda_grid:
            if (l1, l2) == (cfg.loss.lambda_cm, cfg.loss.lambda_cl):
                continue  # that cell is the default setting
            out[f"lambda_{l1:g}_{l2:g}"] = {"loss.lambda_cm": float(l1), "loss.lambda_cl": float(l2)}
    if plan.settings is not None:
        unknown = [s for s in plan.settings if s not in out]
        if unknown:
            raise ExperimentError(f"plan.settings: unknown setting(s) {unknown}; known: {sorted(out)}")
        out = {k: v for k, v in out.items() if k in plan.settings}
    # a no-op setting (e.g. the paper's literal reduction equals the default) is still its own row
    return out


def _with(cfg: MaskConfig, overrides: dict[str, Any], seed: int) -> MaskConfig:
    return trial_config(cfg.model_dump(mode="json"), {**overrides, "train.seed": seed, "seed": seed})


# ---------------------------------------------------------------- one trained run


def _recall(sim: np.ndarray, c2i: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in recall_at_k(sim, caption_to_image=c2i).items()}


def evaluate_run(cfg: MaskConfig, plan: Plan, table, mu: np.ndarray, mask: np.ndarray, galleries: dict[str, Any],
                 full: bool) -> dict[str, Any]:
    """The evaluations of one trained model that need no retraining.

    Always: MASK and without OOD words for scoring.normalize true and false.  ``full`` (the default
    setting): also the m grid, the α grid (demo base: global-mean pooling), the caption modes, the OOD
    weighting variant and Appendix H fine-tuning.
    """

    g = galleries["content"]
    c2i = g.caption_to_image
    out: dict[str, Any] = {}

    def mapped(c: MaskConfig, gal, **kw):
        return map_captions(c, table, gal.texts, parser=gal.parser, kv=gal.kv, **kw)

    for norm in (True, False):
        c = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"normalize": norm})})
        key = "cos" if norm else "dot"
        cw = mapped(c, g)
        out[f"mask.{key}"] = _recall(gallery_scores(mu, mask, cw, norm, c.scoring.pooling), c2i)
        out[f"coverage.{key}"] = cw.coverage
        cw0 = mapped(c, g, ood_method="none")
        out[f"without_ood.{key}"] = _recall(gallery_scores(mu, mask, cw0, norm, c.scoring.pooling), c2i)
    if not full:
        return out
    norm = cfg.scoring.normalize
    grid = evaluate_grid(cfg, table, mu, mask, g, sorted(set(plan.m_grid)), plan.alpha_grid, [plan.rerank_k],
                         cfg.knowledge.m)
    out["m_grid"] = {str(m): v for m, v in grid["mask"].items()}
    out["base"] = grid["base"]
    out["alpha_grid"] = {f"{m}|{a:g}": v for (m, a, _k), v in grid["rerank"].items() if m == _nearest(plan.m_grid,
                                                                                                      cfg.knowledge.m)}
    if "tokens" in galleries:
        gt = galleries["tokens"]
        ct = cfg.model_copy(update={"text": cfg.text.model_copy(update={"mode": "tokens"})})
        cw = mapped(ct, gt)
        out["text_tokens"] = _recall(gallery_scores(mu, mask, cw, norm, cfg.scoring.pooling), gt.caption_to_image)
        out["coverage.tokens"] = cw.coverage
        cw0 = mapped(ct, gt, ood_method="none")
        out["text_tokens_without_ood"] = _recall(gallery_scores(mu, mask, cw0, norm, cfg.scoring.pooling),
                                                 gt.caption_to_image)
    other = "cosine" if cfg.knowledge.ood_weighting == "dot" else "dot"
    cv = cfg.model_copy(update={"knowledge": cfg.knowledge.model_copy(update={"ood_weighting": other})})
    out[f"ood_weighting_{other}"] = _recall(gallery_scores(mu, mask, mapped(cv, g), norm, cfg.scoring.pooling), c2i)
    cw = mapped(cfg, g)
    tuned, info = finetune_knowledge(cfg.finetune, mu, mask, cw)
    out["finetuned"] = _recall(gallery_scores(mu, mask, cw, norm, cfg.scoring.pooling, prototypes=tuned), c2i)
    out["finetune_terms"] = {k: v for k, v in info.items() if k != "history"}
    return out


def _nearest(values: list[int], m: int) -> int:
    return min(values, key=lambda v: (abs(v - m), v))


def train_and_evaluate(cfg: MaskConfig, plan: Plan, data, galleries: dict[str, Any], epochs: int,
                       full: bool) -> dict[str, Any]:
    """Train one model in process (eq. 14), build its knowledge (eq. 2) and evaluate it."""


    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    module = TrainModule(cfg, len(data.words)).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)
    wv = torch.from_numpy(data.word_vectors).to(device)
    history, step = [], 0
    for epoch in range(epochs):
        losses, step = train_epoch(module, opt, data.rows, wv, cfg, epoch, device, step)
        history.append({"epoch": epoch, **losses})
    train_s = time.perf_counter() - t0
    module.eval()
    pae = save_pae(module.net.pae)
    table = knowledge_table(pae, data, cfg)
    mu, mask = gallery_mu(pae, galleries["content"])
    result = evaluate_run(cfg, plan, table, mu, mask, galleries, full)
    result["gap"] = _gap(table, module)
    result["history"] = history
    # wall seconds depend on the machine's load; CPU seconds (all threads of this process) much less
    result["seconds"] = {"train": train_s, "total": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    result["knowledge_words"] = len(table.words)
    if full:
        result["heldout"] = heldout_ood(table, plan, seed=cfg.seed)
    return result


# ---------------------------------------------------------------- held-out-word OOD test


def heldout_ood(table, plan: Plan, seed: int = 0) -> dict[str, Any]:
    """Hide ``plan.heldout_fraction`` of the knowledge words (seeded), rebuild their prototypes from the
    others (eq. 11–13 at each m with dot and cosine weighting; Procrustes, Appendix B) and compare with
    their real eq. 2 prototypes.

    Returns:
        ``{"hidden": n, "known": k, "curves": {method: {m: {"cos": mean cosine to the real prototype,
        "rank": mean rank of the true word among all real prototypes (1 = best), "r1": share ranked first}}}}``;
        Procrustes and the "mean of the known prototypes" baseline have one point (key "all").
    """

    vg = table.known()
    k = len(vg)
    n_hide = max(1, int(round(plan.heldout_fraction * k)))
    if k - n_hide < 2:
        return {"hidden": 0, "known": k, "curves": {}, "note": "too few knowledge words to hide any"}
    rng = np.random.default_rng([seed, 13])
    hidden = np.sort(rng.choice(vg, size=n_hide, replace=False))
    rest = np.setdiff1d(vg, hidden)
    wv, protos = table.word_vectors.astype(np.float32), table.prototypes.astype(np.float32)
    allp = protos[vg]  # every real prototype: the candidates of the rank
    alln = allp / np.maximum(np.linalg.norm(allp, axis=1, keepdims=True), 1e-12)
    true_pos = np.searchsorted(vg, hidden)  # rows of the hidden words in allp

    def score(pred: np.ndarray) -> dict[str, float]:
        pn = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
        cos_true = (pn * alln[true_pos]).sum(1)
        sims = pn @ alln.T  # (H, K)
        rank = 1 + (sims > cos_true[:, None] + 1e-9).sum(1)
        return {"cos": float(cos_true.mean()), "rank": float(rank.mean()), "r1": float((rank == 1).mean())}

    curves: dict[str, dict[str, dict[str, float]]] = {"topm_dot": {}, "topm_cosine": {}}
    for m in sorted(set(plan.heldout_m)):
        if m > len(rest):
            continue
        for w in ("dot", "cosine"):
            curves[f"topm_{w}"][str(m)] = score(ood_prototypes(wv[hidden], wv[rest], protos[rest], m, weighting=w))
    curves["procrustes"] = {"all": score(procrustes_prototypes(wv[hidden], wv[rest], protos[rest]))}
    curves["mean_of_known"] = {"all": score(np.repeat(protos[rest].mean(0, keepdims=True), len(hidden), 0))}
    return {"hidden": int(len(hidden)), "known": int(len(rest)), "curves": curves}


# ---------------------------------------------------------------- driver


def _part(times: dict[str, float], name: str, t0: float, say: Callable[[str], None]) -> None:
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    say(f"[experiments] part {name}: {times[name]:.1f} s")


def run_experiments(cfg: MaskConfig, plan: Plan, *, name: str | None = None, out_dir: str | None = None,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every part of the plan; see the module docstring.

    Returns:
        A summary: name, storage folder, times per part, the result files, the report folder.
    """
    check_settings(cfg)
    if cfg.gallery is None:
        raise ExperimentError("gallery: the experiments score a gallery; the config names none")
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    epochs = plan.epochs or cfg.train.epochs
    settings = training_settings(cfg, plan)
    ident = {"cfg": cfg.model_dump(mode="json"), "epochs": epochs}
    for k in ("storage", "tracking", "ray"):
        ident["cfg"].pop(k, None)
    name = name or f"x-{fingerprint(ident)[:12]}"
    ctx = JobContext.from_config(cfg)
    store: Store = ctx.store
    if plan.threads:
        torch.set_num_threads(plan.threads)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    out = out_dir or str(Path("reports") / f"experiments-{name}")
    with tracking.start_run(cfg.tracking, store.root, f"experiments:{name}", params=cfg.flat(),
                            tags={"job": "experiments"}) as run:
        run.log_params({"experiments.name": name, "experiments.epochs": epochs,
                        "experiments.seeds": json.dumps(plan.seeds), "experiments.settings": json.dumps(sorted(settings))})
        t0 = time.perf_counter()
        inputs, data, galleries, gallery_desc = _experiment_inputs(cfg, store, name, run)
        _part(times, "inputs", t0, say)
        # trainings
        t0 = time.perf_counter()
        if "train" in plan.parts:
            for sname, over in settings.items():
                for seed in plan.seeds:
                    results.setdefault(sname, {})[seed] = _setting_run(
                        cfg, plan, store, run, name, sname, over, seed, epochs, inputs, data, galleries,
                        gallery_desc, say)
                if "report" in plan.parts:  # a partial report after every setting (an interrupted run still has one)
                    write_experiment_report(results, cfg, plan, out, gallery_desc,
                                            {**times, "train (so far)": time.perf_counter() - t0})
        _part(times, "train", t0, say)
        t0 = time.perf_counter()
        _part(times, "heldout", t0, say)  # computed with each default-setting run (it needs its knowledge)
        run_ids = log_child_runs(cfg, store, results, epochs) if "report" in plan.parts else []
        report: dict[str, Any] = {}
        if "report" in plan.parts and results:
            t0 = time.perf_counter()
            report = _final_report(cfg, plan, run, results, out, gallery_desc, times, run_ids)
            _part(times, "report", t0, say)
        times["total"] = time.perf_counter() - t_all
        run.log_metrics({f"time.{k}": v for k, v in times.items()})
        return {"name": name, "storage": store.uri("experiments", name), "times": times, "report": report,
                "settings": sorted(results), "seeds": plan.seeds, "epochs": epochs, "gallery": gallery_desc,
                "mlflow": {"run_id": run.run_id}}


def _experiment_inputs(cfg: MaskConfig, store: Store, name: str, run) -> tuple[dict[str, str], Any,
                                                                               dict[str, Any], dict[str, Any]]:
    """The experiments' inputs, one per caption mode (the parse is part of the inputs), computed or reused.

    Returns:
        (mode → inputs artifact, the training data, caption mode → validation gallery, the gallery's
        description for the report).
    """
    spec = parse_space({"validation": {"fraction": 1.0, "seed": 0}})
    inputs: dict[str, str] = {}
    for mode in ("content", "tokens"):
        c = cfg if cfg.text.mode == mode else \
            cfg.model_copy(update={"text": cfg.text.model_copy(update={"mode": mode})})
        mctx = JobContext.from_config(c)
        rel = f"experiments/{name}/inputs-{mode}"
        if store.committed(rel, inputs_hash(c, spec, store)) is None:
            init_ray(cfg)  # only to compute inputs: a rerun on committed inputs starts no Ray
        prepare_inputs(mctx, spec, rel, run)
        inputs[mode] = rel
    data = load_sweep_data(store, inputs["content"], splits=("val",))
    galleries = {"content": data.galleries["val"]}
    tok = load_gallery(store, inputs["tokens"], read_inputs(store, inputs["tokens"]), "val")
    if tok is not None:
        galleries["tokens"] = tok
    gallery_desc = {"name": cfg.gallery.name, "images": len(galleries["content"].image_ids),
                    "captions": len(galleries["content"].texts)}
    return inputs, data, galleries, gallery_desc


def _setting_run(cfg: MaskConfig, plan: Plan, store: Store, run, name: str, sname: str, over: dict[str, Any],
                 seed: int, epochs: int, inputs: dict[str, str], data, galleries: dict[str, Any],
                 gallery_desc: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """One training of setting ``sname`` with ``seed``: its committed result, or trained, evaluated and
    committed (``experiments/<name>/runs/<setting>-s<seed>``)."""
    scfg = _with(cfg, over, seed)
    h = fingerprint({"cfg": {k: v for k, v in scfg.model_dump(mode="json").items()
                             if k not in ("storage", "tracking", "ray")},
                     "epochs": epochs, "plan": plan.model_dump(mode="json", exclude={"parts", "settings",
                                                                                     "seeds", "threads"}),
                     "inputs": [store.manifest(r).get("config_hash") for r in inputs.values()],
                     "full": sname == "default"})[:16]
    rel = f"experiments/{name}/runs/{sname}-s{seed}"
    if store.committed(rel, h) is not None:
        res = json.loads(store.read_file(rel, "result.json"))
        say(f"[experiments] {sname} seed {seed}: reused")
        return res
    ts = time.perf_counter()
    res = train_and_evaluate(scfg, plan, data, galleries, epochs, full=sname == "default")
    res.update(setting=sname, seed=seed, overrides=over, epochs=epochs, gallery=gallery_desc)
    with store.open_artifact(rel, kind=RESULT_KIND, config_hash=h) as w:
        w.write_file("result.json", json.dumps(res, sort_keys=True, default=float).encode())
        w.commit(mlflow_run_id=run.run_id)
    say(f"[experiments] {sname} seed {seed}: Rs {res['mask.cos']['rsum']:.1f} (cos) "
        f"{res['mask.dot']['rsum']:.1f} (dot) in {time.perf_counter() - ts:.0f} s")
    return res


def _final_report(cfg: MaskConfig, plan: Plan, run, results: dict[str, dict[int, dict[str, Any]]], out: str,
                  gallery_desc: dict[str, Any], times: dict[str, float], run_ids: list[str]) -> dict[str, Any]:
    """The experiment report in ``out`` (logged as the run's artifacts), then jobs/report.py's report on
    the child runs (``run_ids``, the MLflow view of them)."""
    report = write_experiment_report(results, cfg, plan, out, gallery_desc, times)
    for f in sorted(Path(out).iterdir()):
        if f.is_file():
            run.log_artifact(str(f), "experiments")
    if run_ids:  # then jobs/report.py's report on the same runs (MLflow view of them)
        try:
            report["mlflow_report"] = make_report(cfg, run_ids=run_ids, out_dir=str(Path(out) / "mlflow-report"),
                                                  log_run=True)["out"]
        except ReportError as e:
            logger.warning("jobs/report.py on the experiment runs: %s", e)
            report["mlflow_report_error"] = str(e)
    return report


def log_child_runs(cfg: MaskConfig, store: Store, results: dict[str, dict[int, dict[str, Any]]],
                   epochs: int) -> list[str]:
    """One nested MLflow run per (setting, seed) — tag ``job=experiment``, the setting's flattened config,
    ``mask.<metric>`` / ``mask_without_ood.<metric>`` (as scored by ``scoring.normalize``), per-epoch
    ``epoch.loss*`` / ``epoch.share_*`` and ``gap.*`` — for ``jobs/report.py``.  Returns their run ids."""

    if not cfg.tracking.enabled:
        return []
    ids = []
    for sname, runs in results.items():
        for seed, res in sorted(runs.items()):
            scfg = _with(cfg, res.get("overrides") or {}, seed)
            key = "cos" if scfg.scoring.normalize else "dot"
            with tracking.start_run(cfg.tracking, store.root, f"experiment:{sname}:s{seed}", params=scfg.flat(),
                                    tags={"job": "experiment", "experiment.setting": sname,
                                          "experiment.seed": seed, "experiment.epochs": epochs},
                                    nested=True) as r:
                r.log_metrics({f"mask.{k}": v for k, v in res[f"mask.{key}"].items()})
                r.log_metrics({f"mask_without_ood.{k}": v for k, v in res[f"without_ood.{key}"].items()})
                r.log_metrics({k: v for k, v in (res.get("gap") or {}).items()})
                for h in res.get("history") or []:
                    r.log_metrics({f"epoch.{k}": v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
                if r.run_id:
                    ids.append(r.run_id)
    return ids


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
