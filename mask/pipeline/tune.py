"""Ray Tune sweeps over λ1, λ2, τ (retrained) and m, α, k (a grid per trial, no retraining).

:func:`run_sweep` (``tune/sweep.py``):

1. **Inputs, once.**  The training steps of the main job (dataset → detector → region features on
   the VG boxes → vocabulary, :func:`mask.pipeline.steps.prepare_training_inputs`) and the gallery's
   features run (or are reused) before any trial starts.  The gallery is split into a validation
   part (``validation.split``, or a seeded ``validation.fraction``) and a held-out test part; the
   captions are parsed once and the sweep's ``inputs`` artifact (vocabulary, splits, parsed
   caption words and their vectors, base-model scores) is committed under
   ``sweeps/<name>/inputs/`` (:mod:`mask.pipeline.tune_inputs`).  Trials read everything from the
   storage root.
2. **Trials.**  :func:`mask.pipeline.tune_trial.run_trial` under ``tune.with_resources`` (concurrency =
   what the cluster's resources allow, optionally capped), sampled by a seeded
   ``BasicVariantGenerator``, stopped early by ``ASHAScheduler`` on ``val_rsum`` (mode max), with a
   checkpoint at each report.  The experiment lives in ``sweeps/<name>/tune/``; a rerun of the same
   sweep (or ``--resume``) restores it with ``Tuner.restore`` — unfinished trials continue from their
   last checkpoint, finished ones are kept.
3. **MLflow.**  A parent run (tag ``job=tune``; the space, the scheduler, the grid) and one nested
   run per trial (tag ``job=tune-trial``, ``mlflow.parentRunId``), written from the driver by
   :class:`mask.pipeline.tune_mlflow.MlflowTrialRuns`, a Tune callback (trials never open the
   tracking store).  A restored sweep
   reopens the same runs (the parent's id is kept in ``sweeps/<name>/sweep.json``, trials are found
   by their ``tune.trial_id`` tag).
4. **Best configuration.**  The trial with the best last ``val_rsum``: its sampled values plus the best
   m (and the best α, k of the re-ranking at that m) as a full config YAML (``sweeps/<name>/best.yaml``
   and a parent-run artifact), its knowledge materialised from its checkpoint (the eq. 2 pass of
   the main job on Ray Data) under ``knowledge/<name>-<trial>/`` and registered, and the held-out
   test split scored with it (``test.*`` metrics) — :mod:`mask.pipeline.tune_best`.

Base model for re-ranking: ``rerank.base_scores`` when set (a matrix or lists over the gallery, read
with :func:`mask.pipeline.rerank.load_base_scores`).  Without one — the demo, where no CLIP weights
can be downloaded — the base is MASK's own *global mean pooling* ablation (``scoring.pooling=mean``,
Table 1) of each trial's model: a real, weaker matcher computed by the same code, **not** a
pretrained base model.  This is logged as a WARNING and as the param ``rerank.base_model``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import yaml

from mask import tracking
from mask.config import MaskConfig
from mask.faults import driver_spec
from mask.pipeline.runtime import JobContext, init_ray
from mask.pipeline.tune_best import finalize
from mask.pipeline.tune_inputs import DEMO_BASE, prepare_inputs
from mask.pipeline.tune_mlflow import MlflowTrialRuns
from mask.pipeline.tune_trial import TrialSetup, run_trial
from mask.preflight import check_inputs, check_settings
from mask.storage import Store, code_version, fingerprint
from mask.sweep import SCORE, SweepError, SweepSpec, clip_m, fmt

__all__ = ["SweepError", "make_scheduler", "run_sweep", "sweep_name"]

logger = logging.getLogger(__name__)

STATE_FILE = "sweep.json"


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


def _grid_m(cfg: MaskConfig, spec: SweepSpec, info: dict[str, Any]) -> tuple[list[int], list[int]]:
    """The grid's m values (clipped to the knowledge size; only ``knowledge.m`` when the OOD method ignores m)."""
    m_grid, clipped = clip_m(spec.grid.m, int(info["vocabulary"]))
    if cfg.knowledge.ood_method != "topm" and len(m_grid) > 1:
        logger.warning("knowledge.ood_method=%s does not use m: the grid keeps m=%d only",
                       cfg.knowledge.ood_method, cfg.knowledge.m)
        m_grid = [cfg.knowledge.m]
    if clipped:
        logger.warning("grid: m=%s exceed the knowledge size (%d words) and are clipped to it; grid m = %s",
                       clipped, info["vocabulary"], m_grid)
    return m_grid, clipped


def _log_parent_params(run, cfg: MaskConfig, spec: SweepSpec, info: dict[str, Any], extra: dict[str, Any],
                       epochs: int, space_text: str) -> None:
    """The parent run's params (once per sweep): space, grid, Tune settings, split sizes, the base config."""
    run.log_params({**extra, **_space_params(spec), "tune.metric": SCORE, "tune.mode": "max",
                    "tune.epochs": epochs, "scheduler.max_t": epochs,
                    "validation.images": info["counts"]["val"]["images"],
                    "test.images": info["counts"]["test"]["images"]})
    run.log_params({f"base.{k}": v for k, v in cfg.flat().items()})
    run.log_text(space_text or yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)), "space.yaml")


def _new_tuner(trainable, spec: SweepSpec, epochs: int, storage_path: str, fs, callbacks: list):
    """A new Tune experiment ``<storage_path>/tune``: ASHA (or FIFO) on the validation score, seeded samples."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    return tune.Tuner(
        trainable, param_space=_param_space(spec),
        tune_config=tune.TuneConfig(metric=SCORE, mode="max", scheduler=make_scheduler(spec, epochs),
                                    num_samples=spec.trials.num_samples,
                                    max_concurrent_trials=spec.trials.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=spec.trials.seed),
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=fs,
                                  callbacks=callbacks,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=spec.trials.max_failures),
                                  verbose=0))


def _record_summary(store: Store, name: str, state: dict[str, Any], summary: dict[str, Any], run) -> None:
    """Add the experiment and MLflow ids to the summary and keep it in ``sweep.json``: as final when every
    trial finished, else as the last one (a rerun restores the experiment and retries the failed trials)."""
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


def run_sweep(cfg: MaskConfig, spec: SweepSpec, *, space_text: str = "", name: str | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a sweep; see the module docstring.

    Args:
        cfg: the base config (what trials do not sample).
        spec: the validated search space.
        space_text: the space file's text (logged to the parent run).
        name: sweep name (default :func:`sweep_name`); its folder is ``sweeps/<name>/``.
        resume: require an existing experiment to restore (error when there is none); without it an
            existing experiment of this sweep is restored too, and a new one started otherwise.

    Returns:
        A summary: name, experiment path, trials (status, score, epochs), the best trial, the best
        config file, the knowledge (URI, model version), held-out test metrics, MLflow ids.

    Raises:
        SweepError: ``resume`` with nothing to resume, no gallery, or no trial with a score.
    """
    from ray import tune

    name = name or sweep_name(cfg, spec)
    # trials run in their own working directories: give them the absolute root
    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = Store(cfg.storage.root, cfg.storage.options).root
    cfg = MaskConfig.model_validate(data)
    check_inputs(cfg, ["dataset", "gallery"] if cfg.gallery is not None else ["dataset"], gallery_captions=True)
    check_settings(cfg)
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    state = _sweep_state(store, name, cfg, spec)
    if state.get("summary"):
        logger.info("sweep %s finished before; returning its summary (%s)", name, store.uri("sweeps", name))
        return {**state["summary"], "reused": True}
    init_ray(cfg)
    storage_path, exp_path = _tune_path(store, name)
    fs = store.pyarrow_filesystem()
    restorable = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resume and not restorable:
        raise SweepError(f"nothing to resume: no Tune experiment at {store.uri('sweeps', name, 'tune')}")
    epochs = spec.epochs(cfg)
    run, exp_id, client = _open_parent(cfg, store, state, name)
    state.update(parent_run_id=run.run_id, name=name, started=state.get("started") or time.time())
    _write_state(store, name, state)
    status = "FAILED"
    t0 = time.perf_counter()
    try:
        summary = _fit_sweep(ctx, spec, name, state, run, exp_id, epochs, space_text,
                             restorable, storage_path, exp_path, fs)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        _record_summary(store, name, state, summary, run)
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


def _sweep_state(store: Store, name: str, cfg: MaskConfig, spec: SweepSpec) -> dict[str, Any]:
    """The sweep's saved state (with its identity), after checking the name and that a saved sweep of
    this name was started with the same config and space."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names the folder sweeps/<name>/)")
    state = _read_state(store, name)
    identity = sweep_name(cfg, spec)
    if state.get("identity", identity) != identity:
        raise SweepError(f"sweep {name} at {store.uri('sweeps', name)} was started with another config or search "
                         "space; pass another --name (or the same config and space to continue it)")
    state["identity"] = identity
    return state


def _fit_sweep(ctx: JobContext, spec: SweepSpec, name: str, state: dict[str, Any], run, exp_id, epochs: int,
               space_text: str, restorable: bool, storage_path: str, exp_path: str, fs) -> dict[str, Any]:
    """Inputs, the parent run's params, then the Tune experiment (new or restored), fitted and finalised."""
    from ray import tune

    cfg, store = ctx.cfg, ctx.store
    inputs_rel = f"sweeps/{name}/inputs"
    info = prepare_inputs(ctx, spec, inputs_rel, run)
    m_grid, clipped = _grid_m(cfg, spec, info)
    if info["base"]["kind"] != "file":
        logger.warning("no rerank.base_scores: the base model re-ranked in the grid is the %s", DEMO_BASE)
    extra = {"rerank.base_model": info["base"]["description"], "grid.m": m_grid, "grid.m_requested": spec.grid.m,
             "grid.m_clipped": clipped, "grid.alpha": spec.grid.alpha, "grid.k": spec.grid.k,
             "tune.sweep": name}
    if not state.get("params_logged"):
        _log_parent_params(run, cfg, spec, info, extra, epochs, space_text)
        state["params_logged"] = True
        _write_state(store, name, state)
    setup = TrialSetup(cfg=cfg.model_dump(mode="json"), inputs_rel=inputs_rel, epochs=epochs,
                       eval_every=spec.trials.eval_every, m=tuple(m_grid), alpha=tuple(spec.grid.alpha),
                       k=tuple(spec.grid.k), base_m=cfg.knowledge.m, cpus=spec.trials.cpus, gpus=spec.trials.gpus,
                       fault=driver_spec())
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": spec.trials.cpus, "gpu": spec.trials.gpus})
    if restorable:
        logger.info("restoring the Tune experiment %s", store.uri("sweeps", name, "tune"))
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=_param_space(spec), storage_filesystem=fs)
    else:
        callbacks = [MlflowTrialRuns(cfg, run.run_id, exp_id, name, extra, epochs)] if run.run_id is not None else []
        tuner = _new_tuner(trainable, spec, epochs, storage_path, fs, callbacks)
    # a snapshot per checkpoint is what makes a restore lose nothing; Tune warns about it otherwise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    results = tuner.fit()
    return finalize(ctx, spec, name, results, info, setup, run, epochs)
