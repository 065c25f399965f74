"""Ray Tune sweeps over λ1, λ2, τ (retrained) and m, α, k (a grid per trial, no retraining).

:func:`run_sweep` (``tune/sweep.py``):

1. **Inputs, once.**  The training steps of the main job (dataset → detector → region features on
   the VG boxes → vocabulary, :func:`mask.pipeline.build.prepare_training_inputs`) and the gallery's
   features run (or are reused) before any trial starts.  The gallery is split into a validation
   part (``validation.split``, or a seeded ``validation.fraction``) and a held-out test part; the
   captions are parsed once and the sweep's ``inputs`` artifact (vocabulary, splits, parsed
   caption words and their vectors, base-model scores) is committed under
   ``sweeps/<name>/inputs/``.  Trials read everything from the storage root.
2. **Trials.**  :func:`mask.pipeline.tune_trial.run_trial` under ``tune.with_resources`` (concurrency =
   what the cluster's resources allow, optionally capped), sampled by a seeded
   ``BasicVariantGenerator``, stopped early by ``ASHAScheduler`` on ``val_rsum`` (mode max), with a
   checkpoint at each report.  The experiment lives in ``sweeps/<name>/tune/``; a rerun of the same
   sweep (or ``--resume``) restores it with ``Tuner.restore`` — unfinished trials continue from their
   last checkpoint, finished ones are kept.
3. **MLflow.**  A parent run (tag ``job=tune``; the space, the scheduler, the grid) and one nested
   run per trial (tag ``job=tune-trial``, ``mlflow.parentRunId``), written from the driver by
   :class:`MlflowTrialRuns`, a Tune callback (trials never open the tracking store).  A restored sweep
   reopens the same runs (the parent's id is kept in ``sweeps/<name>/sweep.json``, trials are found
   by their ``tune.trial_id`` tag).
4. **Best configuration.**  The trial with the best last ``val_rsum``: its sampled values plus the best
   m (and the best α, k of the re-ranking at that m) as a full config YAML (``sweeps/<name>/best.yaml``
   and a parent-run artifact), its knowledge materialised from its checkpoint (the eq. 2 pass of
   the main job on Ray Data) under ``knowledge/<name>-<trial>/`` and registered, and the held-out
   test split scored with it (``test.*`` metrics).

Base model for re-ranking: ``rerank.base_scores`` when set (a matrix or lists over the gallery, read
with :func:`mask.pipeline.gallery.load_base_scores`).  Without one — the demo, where no CLIP weights
can be downloaded — the base is MASK's own *global mean pooling* ablation (``scoring.pooling=mean``,
Table 1) of each trial's model: a real, weaker matcher computed by the same code, **not** a
pretrained base model.  This is logged as a WARNING and as the param ``rerank.base_model``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mask import tracking
from mask.config import MaskConfig, flatten
from mask.pipeline.runtime import JobContext, init_ray
from mask.pipeline.tune_trial import (
    FAULT_ENV,
    INPUTS_KIND,
    TrialSetup,
    grid_from_json,
    run_trial,
    trial_config,
)
from mask.storage import Store, code_version, fingerprint
from mask.sweep import METRICS, SCORE, SweepSpec, best_entry, best_rerank, clip_m, fmt

logger = logging.getLogger(__name__)

DEMO_BASE = ("MASK global mean pooling ablation (scoring.pooling=mean) of each trial's own model; "
             "demo stand-in, not a pretrained base model")
STATE_FILE = "sweep.json"


class SweepError(ValueError):
    """A sweep that cannot run or go on as asked; the message names what is missing."""


# ---------------------------------------------------------------- names and paths


def sweep_name(cfg: MaskConfig, spec: SweepSpec) -> str:
    """``sweep-<hash>`` of the config (without ray/tracking/storage) and the space: the same sweep
    again gets the same name, so a rerun restores it."""
    data = cfg.model_dump(mode="json")
    for s in ("ray", "tracking", "storage"):
        data.pop(s, None)
    return f"sweep-{fingerprint({'cfg': data, 'space': spec.model_dump(mode='json')})[:12]}"


def _tune_path(store: Store, name: str) -> tuple[str, str]:
    """(Tune's ``storage_path``, the experiment folder), fs-native for ``store.pyarrow_filesystem()``."""
    storage_path = store.path("sweeps", name)
    if store.protocol == "file":
        os.makedirs(storage_path, exist_ok=True)
    return storage_path, f"{storage_path}/tune"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- inputs


def _split_positions(images: pa.Table, image_ids: list[str], spec: SweepSpec) -> tuple[list[int], list[int]]:
    """Rows of the validation and the held-out test part of the gallery (both in gallery order)."""
    v = spec.validation
    n = len(image_ids)
    if v.split is not None:
        split_of = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist(), strict=True))
        val = [i for i, x in enumerate(image_ids) if split_of.get(x) == v.split]
        if not val:
            raise SweepError(f"validation.split={v.split!r}: no gallery image is in that split "
                             f"(splits: {sorted(set(split_of.values()))})")
    else:
        take = max(1, min(n, round(v.fraction * n)))
        val = sorted(np.random.default_rng(v.seed).permutation(n)[:take].tolist())
    chosen = set(val)
    return val, [i for i in range(n) if i not in chosen]


def _gallery_order(images: pa.Table, captions: pa.Table, ok: set[str]) -> tuple[list[str], list[int], np.ndarray]:
    """Images in table order (those with features), captions grouped by image — the index's order
    (``images.parquet`` / ``captions.parquet``), which a ``.npy`` base-score matrix must follow."""
    image_ids = [x for x in images.column("image_id").to_pylist() if x in ok]
    pos = {x: i for i, x in enumerate(image_ids)}
    cap_img = captions.column("image_id").to_pylist()
    order = sorted((j for j, x in enumerate(cap_img) if x in pos), key=lambda j: (pos[cap_img[j]], j))
    return image_ids, order, np.asarray([pos[cap_img[j]] for j in order], np.int64)


def _parquet(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def inputs_hash(cfg: MaskConfig, spec: SweepSpec) -> str:
    data = cfg.model_dump(mode="json")
    ident = {s: data[s] for s in ("seed", "dataset", "gallery", "vocabulary", "detector", "vectors", "text")}
    ident["base_scores"] = cfg.rerank.base_scores
    ident["validation"] = spec.validation.model_dump(mode="json")
    return fingerprint(ident)[:16]


def prepare_inputs(ctx: JobContext, spec: SweepSpec, rel: str, run) -> dict[str, Any]:
    """Everything trials read, computed once: features (training + gallery), vocabulary, the
    validation / test split, parsed caption words and vectors, base scores; committed at ``rel``.

    Returns:
        The ``inputs.json`` of the committed artifact (reused when already committed).
    """
    from mask.pipeline.build import ensure_dataset, prepare_training_inputs
    from mask.pipeline.extract import features_rel, run_extraction
    from mask.pipeline.tune_trial import read_inputs
    from mask.text import ContentWordParser
    from mask.vectors import vectors_for

    cfg, store = ctx.cfg, ctx.store
    h = inputs_hash(cfg, spec)
    if store.committed(rel, h) is not None:
        logger.info("sweep inputs %s are committed; reused", store.uri(rel))
        return read_inputs(store, rel)
    if store.manifest(rel) is not None:
        raise SweepError(f"sweep inputs {store.uri(rel)} were built from another dataset/gallery/detector/validation "
                         "config; pass another --name")
    if cfg.gallery is None:
        raise SweepError("the config names no gallery: a sweep scores its validation part "
                         "(set gallery.name / gallery.kind / gallery.path)")
    t0 = time.perf_counter()
    tin = prepare_training_inputs(ctx, run)
    gal = ensure_dataset(ctx, cfg.gallery, run.run_id)
    if gal.get("captions") is None:
        raise SweepError(f"gallery {cfg.gallery.name}: the dataset has no captions")
    fsum = run_extraction(cfg, store, cfg.gallery.name, gal["images"], None, tin.det_weights, tracker=run)
    frel = features_rel(cfg.gallery.name, cfg.detector)
    ok = set(store.read_table(frel, columns=["image_id"]).column("image_id").to_pylist())
    image_ids, cap_order, c2i = _gallery_order(gal["images"], gal["captions"], ok)
    if not image_ids:
        raise SweepError(f"gallery {cfg.gallery.name}: no image has region features ({store.uri(frel)})")
    caps = gal["captions"].take(pa.array(cap_order, pa.int64()))
    texts = [t or "" for t in caps.column("text").to_pylist()]
    val, test = _split_positions(gal["images"], image_ids, spec)
    # captions → content words once (spaCy/NLTK are not loaded by trials), and their vectors
    uniq = sorted(set(texts))
    parsed = ContentWordParser.from_config(cfg.text).parse_batch(uniq)
    cap_vocab = sorted({w for ws in parsed for w in ws})
    vecs, found = vectors_for(tin.kv, cap_vocab)
    files: dict[str, bytes] = {}
    base_info: dict[str, Any] = {"kind": "demo-mean-pooling", "description": DEMO_BASE}
    base = None
    if cfg.rerank.base_scores:
        from mask.pipeline.gallery import load_base_scores

        caption_ids = caps.column("caption_id").to_pylist()
        bs = load_base_scores(cfg.rerank.base_scores, image_ids, caption_ids, cfg.storage.options)
        base = bs.matrix
        base_info = {"kind": "file", "description": f"rerank.base_scores {cfg.rerank.base_scores}",
                     "directions": list(bs.directions), "missing": int(bs.missing)}
        if len(bs.directions) < 2:
            logger.warning("rerank.base_scores %s gives only %s lists; the other direction is re-ranked from "
                           "fill scores", cfg.rerank.base_scores, bs.directions)
    counts = {}
    for split, rows in (("val", val), ("test", test)):
        pos = {r: i for i, r in enumerate(rows)}
        cols = [j for j in range(len(texts)) if int(c2i[j]) in pos]
        files[f"{split}_images.parquet"] = _parquet(pa.table({"image_id": pa.array([image_ids[r] for r in rows],
                                                                                     pa.string())}))
        files[f"{split}_captions.parquet"] = _parquet(pa.table({
            "caption_id": pa.array([caps.column("caption_id")[j].as_py() for j in cols], pa.string()),
            "image_id": pa.array([image_ids[int(c2i[j])] for j in cols], pa.string()),
            "image_position": pa.array([pos[int(c2i[j])] for j in cols], pa.int64()),
            "text": pa.array([texts[j] for j in cols], pa.string())}))
        if base is not None and rows:
            files[f"{split}_base.npy"] = _npy(base[np.ix_(rows, cols)].astype(np.float64))
        counts[split] = {"images": len(rows), "captions": len(cols)}
    vocab = tin.vocab
    files["vocabulary.parquet"] = _parquet(pa.table({
        "word": pa.array(vocab["words"], pa.string()),
        "vector": pa.array(list(np.asarray(vocab["vectors"], np.float32)), pa.list_(pa.float32())),
        "count": pa.array(np.asarray(vocab["counts"], np.int64))}))
    files["caption_words.parquet"] = _parquet(pa.table({"text": pa.array(uniq, pa.string()),
                                                        "words": pa.array(parsed, pa.list_(pa.string()))}))
    files["caption_vectors.parquet"] = _parquet(pa.table({
        "word": pa.array([w for w, f in zip(cap_vocab, found, strict=True) if f], pa.string()),
        "vector": pa.array(list(np.asarray(vecs, np.float32)[found]), pa.list_(pa.float32()))}))
    info = {"dataset": cfg.dataset.name, "features": tin.features_rel, "gallery": cfg.gallery.name,
            "gallery_features": frel, "detector_weights": tin.det_weights, "word_dim": cfg.model.word_dim,
            "vocabulary": len(vocab["words"]), "counts": counts, "base": base_info,
            "caption_words": {"vocab": len(cap_vocab), "no_vector": int((~np.asarray(found)).sum())},
            "files": sorted([*files, "inputs.json"]), "seconds": round(time.perf_counter() - t0, 2),
            "features_summary": {k: v for k, v in fsum.items() if isinstance(v, int | float | str)}}
    with store.open_artifact(rel, kind=INPUTS_KIND, config_hash=h,
                             inputs={"features": store.uri(tin.features_rel), "gallery_features": store.uri(frel)}) as w:
        for name, data in files.items():
            w.write_file(name, data)
        w.write_file("inputs.json", json.dumps(info, indent=2, sort_keys=True, default=str).encode())
        w.commit(mlflow_run_id=run.run_id, extra={"counts": counts})
    return info


# ---------------------------------------------------------------- MLflow


def _mlflow(cfg: MaskConfig, root: str):
    """(client, tracking URI, experiment id) — the same store and experiment every job uses."""
    client, uri = tracking._client(cfg.tracking, root)
    return client, uri, tracking._experiment_id(client, cfg.tracking, root)


def _open_parent(cfg: MaskConfig, store: Store, state: dict[str, Any], name: str):
    """The sweep's parent run, reopened when the sweep was started before, else created.

    Returns:
        ``(run, experiment id, client)`` — a :class:`mask.tracking.NullRun` and Nones when tracking is off.
    """
    if not cfg.tracking.enabled:
        return tracking.NullRun(), None, None
    client, uri, exp_id = _mlflow(cfg, store.root)
    rid = state.get("parent_run_id")
    if rid:
        try:
            client.update_run(rid, status="RUNNING")
            logger.info("MLflow: reopened the sweep's parent run %s", rid)
            return tracking.Run(client, rid, uri), exp_id, client
        except Exception as e:  # noqa: BLE001 - a deleted run or another store: start a new parent
            logger.warning("MLflow: cannot reopen parent run %s (%s); starting a new one", rid, e)
    tags = tracking.sanitize_params({"job": "tune", "tune.sweep": name, "mask.code_version": code_version(),
                                     "mask.storage_root": store.root})
    run = client.create_run(exp_id, run_name=f"tune:{name}", tags=tags)
    logger.info("MLflow: parent run %s (tune:%s) at %s", run.info.run_id, name, tracking.redact_text(uri))
    return tracking.Run(client, run.info.run_id, uri), exp_id, client


def _space_params(spec: SweepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, dist in spec.search.items():
        out[f"space.search.{key}"] = f"{dist.kind}{[fmt(v) for v in dist.edge_values()]}"
    data = spec.model_dump(mode="json", by_alias=True)
    for section in ("trials", "scheduler", "validation"):
        out.update({f"{section}.{k}": v for k, v in data[section].items()})
    return out


# ---------------------------------------------------------------- the sweep


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search.items():
        section, field = key.split(".", 1)
        kind = dist.kind
        if kind == "loguniform":
            d = tune.loguniform(*dist.loguniform)
        elif kind == "uniform":
            d = tune.uniform(*dist.uniform)
        elif kind == "choice":
            d = tune.choice(list(dist.choice))
        else:
            d = tune.grid_search(list(dist.grid))
        space.setdefault(section, {})[field] = d
    return space


def make_scheduler(spec: SweepSpec, epochs: int):
    """ASHA on ``val_rsum`` (metric and mode come from the TuneConfig) with ``epochs_done`` as its time
    axis: a trial runs ``grace_period`` epochs before it can be stopped, at most ``epochs``; or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epochs_done", max_t=epochs, grace_period=min(spec.scheduler.grace_period, epochs),
                         reduction_factor=spec.scheduler.reduction_factor)


def _read_state(store: Store, name: str) -> dict[str, Any]:
    rel = f"sweeps/{name}/{STATE_FILE}"
    return store.read_json(rel) if store.exists(rel) else {}


def _write_state(store: Store, name: str, state: dict[str, Any]) -> None:
    store.write_json(f"sweeps/{name}/{STATE_FILE}", state)


def run_sweep(cfg: MaskConfig, spec: SweepSpec, *, space_text: str = "", name: str | None = None,
              resume: bool = False, restore: str | None = None) -> dict[str, Any]:
    """Run (or continue) a sweep; see the module docstring.

    Args:
        cfg: the base config (what trials do not sample).
        spec: the validated search space.
        space_text: the space file's text (logged to the parent run).
        name: sweep name (default :func:`sweep_name`); its folder is ``sweeps/<name>/``.
        resume: require an existing experiment to restore (error when there is none).
        restore: restore this Tune experiment folder (path or URI) instead of ``sweeps/<name>/tune``.

    Returns:
        A summary: name, experiment path, trials (status, score, epochs), the best trial, the best
        config file, the knowledge (URI, model version), held-out test metrics, MLflow ids.

    Raises:
        SweepError: ``resume`` with nothing to resume, no gallery, or no trial with a score.
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    name = name or sweep_name(cfg, spec)
    # trials run in their own working directories: give them the absolute root
    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = Store(cfg.storage.root, cfg.storage.options).root
    cfg = MaskConfig.model_validate(data)
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names the folder sweeps/<name>/)")
    state = _read_state(store, name)
    identity = sweep_name(cfg, spec)
    if state.get("identity", identity) != identity:
        raise SweepError(f"sweep {name} at {store.uri('sweeps', name)} was started with another config or search "
                         "space; pass another --name (or the same config and space to continue it)")
    state["identity"] = identity
    if state.get("summary") and restore is None:
        logger.info("sweep %s finished before; returning its summary (%s)", name, store.uri("sweeps", name))
        return {**state["summary"], "reused": True}
    init_ray(cfg)
    storage_path, exp_path = _tune_path(store, name)
    fs = store.pyarrow_filesystem()
    exp_restore = restore or exp_path
    restorable = tune.Tuner.can_restore(exp_restore, storage_filesystem=None if restore else fs)
    if (resume or restore) and not restorable:
        raise SweepError(f"nothing to resume: no Tune experiment at {restore or store.uri('sweeps', name, 'tune')}")
    epochs = spec.epochs(cfg)
    run, exp_id, client = _open_parent(cfg, store, state, name)
    state.update(parent_run_id=run.run_id, name=name, started=state.get("started") or time.time())
    _write_state(store, name, state)
    status = "FAILED"
    t0 = time.perf_counter()
    try:
        inputs_rel = f"sweeps/{name}/inputs"
        info = prepare_inputs(ctx, spec, inputs_rel, run)
        m_grid, clipped = clip_m(spec.grid.m, int(info["vocabulary"]))
        if cfg.knowledge.ood_method != "topm" and len(m_grid) > 1:
            logger.warning("knowledge.ood_method=%s does not use m: the grid keeps m=%d only",
                           cfg.knowledge.ood_method, cfg.knowledge.m)
            m_grid = [cfg.knowledge.m]
        if clipped:
            logger.warning("grid: m=%s exceed the knowledge size (%d words) and are clipped to it; grid m = %s",
                           clipped, info["vocabulary"], m_grid)
        if info["base"]["kind"] != "file":
            logger.warning("no rerank.base_scores: the base model re-ranked in the grid is the %s", DEMO_BASE)
        extra = {"rerank.base_model": info["base"]["description"], "grid.m": m_grid, "grid.m_requested": spec.grid.m,
                 "grid.m_clipped": clipped, "grid.alpha": spec.grid.alpha, "grid.k": spec.grid.k,
                 "tune.sweep": name}
        if not state.get("params_logged"):
            run.log_params({**extra, **_space_params(spec), "tune.metric": SCORE, "tune.mode": "max",
                            "tune.epochs": epochs, "scheduler.max_t": epochs,
                            "validation.images": info["counts"]["val"]["images"],
                            "test.images": info["counts"]["test"]["images"]})
            run.log_params({f"base.{k}": v for k, v in cfg.flat().items()})
            run.log_text(space_text or yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)), "space.yaml")
            state["params_logged"] = True
            _write_state(store, name, state)
        setup = TrialSetup(cfg=cfg.model_dump(mode="json"), inputs_rel=inputs_rel, epochs=epochs,
                           eval_every=spec.trials.eval_every, m=tuple(m_grid), alpha=tuple(spec.grid.alpha),
                           k=tuple(spec.grid.k), base_m=cfg.knowledge.m, cpus=spec.trials.cpus, gpus=spec.trials.gpus,
                           fault=os.environ.get(FAULT_ENV, ""))
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        {"cpu": spec.trials.cpus, "gpu": spec.trials.gpus})
        if restorable:
            logger.info("restoring the Tune experiment %s", exp_restore)
            tuner = tune.Tuner.restore(exp_restore, trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=_param_space(spec), storage_filesystem=None if restore else fs)
        else:
            callbacks = []
            if run.run_id is not None:
                from mask.pipeline.tune_mlflow import MlflowTrialRuns

                callbacks.append(MlflowTrialRuns(cfg, run.run_id, exp_id, name, extra, epochs))
            tuner = tune.Tuner(
                trainable, param_space=_param_space(spec),
                tune_config=tune.TuneConfig(metric=SCORE, mode="max", scheduler=make_scheduler(spec, epochs), num_samples=spec.trials.num_samples,
                                            max_concurrent_trials=spec.trials.max_concurrent,
                                            search_alg=BasicVariantGenerator(random_state=spec.trials.seed),
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=fs,
                                          callbacks=callbacks,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=spec.trials.max_failures),
                                          verbose=0))
        # a snapshot per checkpoint is what makes a restore lose nothing; Tune warns about it otherwise
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        results = tuner.fit()
        summary = finalize(ctx, spec, name, results, info, setup, run, epochs)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["experiment"] = store.uri("sweeps", name, "tune")
        summary["mlflow"] = {"tracking_uri": getattr(run, "tracking_uri", None), "parent_run_id": run.run_id}
        run.log_metrics({"sweep_seconds": summary["seconds"]})
        failed = [t["trial_id"] for t in summary["trials"] if t["error"]]
        if failed:
            # not final: a rerun restores the experiment and retries these trials from their checkpoints
            logger.warning("sweep %s: %d trial(s) failed (%s); the best of the others is reported. Rerun the same "
                           "command (or --resume) to retry them from their last checkpoints", name, len(failed), failed)
            state["last_summary"] = summary
        else:
            state["summary"] = summary
        _write_state(store, name, state)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if client is not None:
            try:
                client.set_terminated(run.run_id, status)
            except Exception as e:  # noqa: BLE001 - never hide the sweep's own error
                logger.warning("could not end MLflow run %s as %s: %s", run.run_id, status, e)


# ---------------------------------------------------------------- after the trials


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
    from mask.pipeline.tune_trial import evaluate_grid, gallery_mu, load_gallery

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
    from mask.datasets import dataset_rel
    from mask.knowledge import KnowledgeTable
    from mask.knowledge_artifact import load_knowledge, save_knowledge
    from mask.models import save_pae
    from mask.pipeline.build import features_dataset, region_word_map
    from mask.pipeline.represent import knowledge_pass
    from mask.pipeline.runtime import cluster_gpus
    from mask.pipeline.train import TrainModule, load_checkpoint_dir
    from mask.pipeline.tune_trial import _parquet_file

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
    feats = features_dataset(store, info["features"], ["image_id", "features", "num_boxes", "feature_dim", "region_ids"])
    acc = knowledge_pass(feats, pae, word_index, region_words, bcfg.model.latent_dim, bcfg.seed,
                         num_gpus=1 if cluster_gpus() else 0)
    protos, counts, missing = acc.prototypes()
    seen = ~missing
    table = KnowledgeTable(words=[w for w, s in zip(words, seen, strict=True) if s], counts=counts[seen],
                           word_vectors=vectors[seen], prototypes=protos[seen], source=["vg"] * int(seen.sum()),
                           samples=acc.samples()[seen])
    if bcfg.knowledge.ood_vocab_size:
        from mask.knowledge import extend_with_ood
        from mask.vectors import load_vectors, vectors_for

        kv = load_vectors(bcfg.vectors.source, bcfg.vectors.format, bcfg.vectors.cache_dir)
        extra = [w for w in kv.index_to_key[: bcfg.knowledge.ood_vocab_size] if w not in set(table.words)]
        vecs, found = vectors_for(kv, extra)
        table = extend_with_ood(table, [w for w, f in zip(extra, found, strict=True) if f], np.asarray(vecs)[found],
                                bcfg.knowledge.ood_method, bcfg.knowledge.m)
    lineage = {"features": store.uri(info["features"]), "training_run": checkpoint.path, "config_hash": version,
               **lineage_extra}
    save_knowledge(store, krel, table, pae, config_hash=version, mlflow_run_id=run.run_id, lineage=lineage)
    mv = None
    if run.run_id is not None:
        mv = tracking.register_knowledge(bcfg.tracking, store.root, store.uri(krel), run.run_id, lineage)
        run.set_tags({"knowledge.version": version, "knowledge.model_version": str(mv)})
    return {"uri": store.uri(krel), "version": version, "words": len(table.words), "reused": False,
            "model_version": mv, "table": table, "pae": pae}

