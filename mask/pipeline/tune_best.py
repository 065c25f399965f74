"""After the trials: the best trial → a full config YAML, its knowledge (materialised from its
checkpoint with the main job's eq. 2 pass on Ray Data, committed and registered), and the held-out
test part of the gallery scored with that knowledge.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import yaml

from mask import tracking
from mask.config import MaskConfig, flatten
from mask.datasets import dataset_rel
from mask.knowledge_artifact import load_knowledge, save_knowledge
from mask.models import save_pae
from mask.pipeline.runtime import JobContext
from mask.pipeline.steps import knowledge_table, region_word_map, with_ood_vocabulary
from mask.pipeline.train import TrainModule, load_checkpoint_dir
from mask.pipeline.tune_trial import (
    TrialSetup,
    _parquet_file,
    evaluate_grid,
    gallery_mu,
    grid_from_json,
    load_gallery,
    trial_config,
)
from mask.sweep import METRICS, SCORE, SweepError, SweepSpec, best_entry, best_rerank
from mask.vectors import load_vectors

logger = logging.getLogger(__name__)


def _error_line(err: BaseException) -> str:
    """The line that says what failed (a RayTaskError's text ends with the original exception)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return lines[-1] if lines else type(err).__name__


def _trial_rows(results) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id") or (r.path.rstrip("/").rsplit("_", 1)[-1] if r.path else None),
                     "status": "ERROR" if r.error else "TERMINATED", SCORE: m.get(SCORE),
                     "epochs_done": m.get("epochs_done"), "config": r.config,
                     "error": _error_line(r.error) if r.error else None})
    return rows


def best_config(cfg: MaskConfig, samples: dict[str, Any], grid: dict[str, Any], epochs_done: int,
                version: str) -> tuple[MaskConfig, dict[str, Any]]:
    """The full config of the best trial: its samples, the best m, the best re-ranking at that m.

    Returns:
        ``(config, {"m", "alpha", "k", "entry"})`` — ``alpha``/``k`` of the overall best entry when it
        is a re-ranking, else of the best re-ranking at the best m (MASK alone won; the re-ranking
        settings are still the best ones to use with a base model).
    """
    best = best_entry(grid)
    rr = best_rerank(grid, best["m"]) if best["alpha"] is None else {"alpha": best["alpha"], "k": best["k"]}
    c = trial_config(cfg.model_dump(mode="json"), samples)
    data = c.model_dump(mode="json")
    data["knowledge"]["m"] = int(best["m"])
    data["knowledge"]["version"] = version
    data["train"]["epochs"] = int(epochs_done)
    if rr is not None:
        data["rerank"]["alpha"] = float(rr["alpha"])
        data["rerank"]["k"] = int(rr["k"])
    return MaskConfig.model_validate(data), {"m": best["m"], "alpha": best["alpha"], "k": best["k"],
                                            "rerank": rr, "metrics": best["metrics"]}


def best_yaml(cfg: MaskConfig, header: str) -> str:
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def finalize(ctx: JobContext, spec: SweepSpec, name: str, results, info: dict[str, Any], setup: TrialSetup,
             run, epochs: int) -> dict[str, Any]:
    """Best trial → best config YAML, knowledge (materialised + registered), held-out test metrics."""

    store, cfg = ctx.store, ctx.cfg
    rows = _trial_rows(results)
    scored = [r for r in results if r.metrics and SCORE in r.metrics and r.checkpoint is not None]
    if not scored:
        errors = [f"{r['trial_id']}: {r['error']}" for r in rows if r["error"]]
        raise SweepError(f"sweep {name}: no trial reported a validation score" +
                         (f"; errors: {errors[:3]}" if errors else ""))
    best = results.get_best_result(metric=SCORE, mode="max", scope="last")
    m = best.metrics
    trial_id = m["trial_id"]
    grid = grid_from_json(m["grid_json"])
    version = f"{name}-{trial_id}"
    bcfg, choice = best_config(cfg, best.config, grid, int(m["epochs_done"]), version)
    header = (f"Best configuration of sweep {name} (trial {trial_id}), written by tune/sweep.py.\n"
              f"Validation Rs {m[SCORE]:.2f}: m={choice['m']}, alpha={choice['alpha']}, k={choice['k']} "
              f"(alpha/k none = MASK alone won; rerank.* holds the best re-ranking at that m).\n"
              f"knowledge.version names the knowledge this sweep materialised from the trial's checkpoint.")
    text = best_yaml(bcfg, header)
    store.write_bytes(f"sweeps/{name}/best.yaml", text.encode())
    run.log_text(text, "best.yaml")
    # the best trial's knowledge: eq. 2 over its checkpoint's PAE (the main job's Ray Data pass)
    knowledge = materialise_knowledge(ctx, bcfg, best.checkpoint, info, setup.inputs_rel, version, run,
                                      {"tune.sweep": name, "tune.trial_id": trial_id})
    # held-out test split with the registered knowledge
    test_metrics: dict[str, Any] = {}
    test = load_gallery(store, setup.inputs_rel, info, "test")
    if test is not None:
        mu, mask = gallery_mu(knowledge["pae"], test)
        rr = choice["rerank"]
        tg = evaluate_grid(bcfg, knowledge["table"], mu, mask, test, [choice["m"]],
                           [rr["alpha"]] if rr else [], [rr["k"]] if rr else [], setup.base_m)
        test_metrics = {"mask": tg["mask"][choice["m"]], "base": tg["base"]}
        if rr:
            test_metrics["rerank"] = tg["rerank"][(choice["m"], rr["alpha"], rr["k"])]
        for part, met in test_metrics.items():
            run.log_metrics({f"test.{part}.{k}": v for k, v in met.items()})
    run.log_metrics({f"best.{k}": v for k, v in choice["metrics"].items() if k in METRICS})
    run.log_metrics({"trials.total": len(rows), "trials.errors": sum(1 for r in rows if r["error"]),
                     "trials.stopped_early": sum(1 for r in rows if not r["error"] and (r["epochs_done"] or 0) < epochs)})
    best_params = {"best.trial_id": trial_id, "best.m": choice["m"],
                   "best.alpha": "none" if choice["alpha"] is None else choice["alpha"],
                   "best.k": "none" if choice["k"] is None else choice["k"],
                   "best.epochs": int(m["epochs_done"]), "best.knowledge_version": version}
    best_params.update({f"best.{k}": v for k, v in flatten(best.config).items()})
    if choice["rerank"]:
        best_params.update({"best.rerank_alpha": choice["rerank"]["alpha"], "best.rerank_k": choice["rerank"]["k"]})
    if not any(r["error"] for r in rows):  # params are write-once: only for a sweep whose trials all finished
        _log_params_once(run, best_params)
    else:
        run.set_tags({"tune.incomplete": "true", "tune.best_so_far": json.dumps(best_params, default=str)})
    try:
        df = results.get_dataframe()
        keep = [c for c in df.columns if c.startswith(("config/", "trial_id", SCORE, "epochs_done", "best_"))]
        run.log_text(df[keep].to_csv(index=False), "trials.csv")
    except Exception as e:  # noqa: BLE001 - the table is a convenience
        logger.warning("could not log the trials table: %s", e)
    return {"name": name, "trials": rows, "best": {"trial_id": trial_id, SCORE: m[SCORE], "config": best.config,
                                                    "m": choice["m"], "alpha": choice["alpha"], "k": choice["k"],
                                                    "rerank": {k: v for k, v in (choice["rerank"] or {}).items()
                                                               if k != "metrics"},
                                                    "metrics": choice["metrics"], "epochs": int(m["epochs_done"])},
            "best_config": store.uri("sweeps", name, "best.yaml"),
            "knowledge": {k: v for k, v in knowledge.items() if k not in ("table", "pae")},
            "test": test_metrics, "base_model": info["base"]["description"], "grid_m": list(setup.m)}


def _log_params_once(run, params: dict[str, Any]) -> None:
    try:
        run.log_params(params)
    except Exception as e:  # noqa: BLE001 - a resumed finalisation: MLflow refuses re-logging a param
        logger.info("parent params already logged (%s)", str(e).splitlines()[0])


def materialise_knowledge(ctx: JobContext, bcfg: MaskConfig, checkpoint, info: dict[str, Any], inputs_rel: str,
                          version: str, run, lineage_extra: dict[str, Any]) -> dict[str, Any]:
    """The best trial's knowledge: eq. 2 on Ray Data with its checkpoint's PAE, committed and registered.

    Reuses a committed ``knowledge/<version>`` (a rerun registers nothing new).
    """
    store = ctx.store
    krel = f"knowledge/{version}"
    if store.committed(krel, version) is not None:
        table, pae = load_knowledge(store, krel)
        return {"uri": store.uri(krel), "version": version, "words": len(table.words), "reused": True,
                "model_version": None, "table": table, "pae": pae}
    vocab = _parquet_file(store, inputs_rel, "vocabulary.parquet")
    words = vocab.column("word").to_pylist()
    vectors = np.asarray(vocab.column("vector").to_pylist(), np.float32).reshape(len(words), bcfg.model.word_dim)
    word_index = {w: i for i, w in enumerate(words)}
    module = TrainModule(bcfg, len(words))
    with checkpoint.as_directory() as d:
        load_checkpoint_dir(d, module)
    pae = save_pae(module.net.pae)
    regions = store.read_table(dataset_rel(info["dataset"], "regions"), columns=["region_id", "words"])
    region_words = region_word_map(regions, word_index)
    table = knowledge_table(store, bcfg, info["features"], pae, words, vectors, region_words)
    if bcfg.knowledge.ood_vocab_size:
        kv = load_vectors(bcfg.vectors.source, bcfg.vectors.format, bcfg.vectors.cache_dir)
        table = with_ood_vocabulary(table, kv, bcfg)
    lineage = {"features": store.uri(info["features"]), "training_run": checkpoint.path, "config_hash": version,
               **lineage_extra}
    save_knowledge(store, krel, table, pae, config_hash=version, mlflow_run_id=run.run_id, lineage=lineage)
    mv = None
    if run.run_id is not None:
        mv = tracking.register_knowledge(bcfg.tracking, store.root, store.uri(krel), run.run_id, lineage)
        run.set_tags({"knowledge.version": version, "knowledge.model_version": str(mv)})
    return {"uri": store.uri(krel), "version": version, "words": len(table.words), "reused": False,
            "model_version": mv, "table": table, "pae": pae}
