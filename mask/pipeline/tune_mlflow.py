"""The sweep's MLflow runs, written from the Tune driver by a Tune callback.

Trials never open the tracking store: the driver receives every report anyway, so one process
writes the parent run and the nested trial runs (no concurrent SQLite writers, no tracking URI or
credentials handed to trial processes).  Tune saves the callback with its experiment and restores it
with ``Tuner.restore``; the MLflow client is not part of that state and is made again on first use.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune import Callback

from mask import tracking
from mask.config import MaskConfig
from mask.pipeline.tune_trial import trial_config
from mask.storage import code_version
from mask.sweep import ALIASES, SCORE

logger = logging.getLogger(__name__)


def trial_run_name(trial) -> str:
    return f"trial_{trial.trial_id}"


class MlflowTrialRuns(Callback):
    """Tune callback (runs in the driver): one nested MLflow run per trial under the sweep's parent.

    * start: the run is created (tags ``job=tune-trial``, ``mlflow.parentRunId``, ``tune.trial_id``)
      with params = the flattened trial config (plus ``loss.lambda1`` / ``loss.lambda2``, the paper's
      names of ``loss.lambda_cm`` / ``loss.lambda_cl``), or found again after a restore;
    * each report: ``val.rsum`` (the trial's score: the best Rs of its grid) and ``best.*`` at step =
      epoch (0-based), and the per-epoch training losses since the previous report under train.py's
      names (``epoch.loss``, ``epoch.loss_ir``, ``epoch.loss_cm``, ``epoch.loss_cl``, …);
    * end (finished or stopped by ASHA): the grid of the last evaluation (``grid.m_<m>.<metric>``,
      ``grid.m_<m>.alpha_<a>.k_<k>.<metric>``, ``grid.base.<metric>``), params ``best.m`` /
      ``best.alpha`` / ``best.k``, status FINISHED (tag ``tune.stopped_early`` when ASHA stopped it) or
      FAILED with the error.
    """
    def __init__(self, cfg: MaskConfig, parent_run_id: str, experiment_id: str, sweep: str,
                 extra_params: dict[str, Any], epochs: int):
        self.cfg_json = cfg.model_dump(mode="json")
        self.tracking_cfg = cfg.tracking
        self.root = cfg.storage.root
        self.parent = parent_run_id
        self.experiment_id = experiment_id
        self.sweep = sweep
        self.extra_params = extra_params
        self.epochs = epochs
        self.runs: dict[str, str] = {}
        self._client = None
        self._uri = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves callbacks with the experiment: no client in it
        d = dict(self.__dict__)
        d["_client"] = None
        d["runs"] = {}
        return d

    @property
    def client(self):
        if self._client is None:
            self._client, self._uri = tracking._client(self.tracking_cfg, self.root)
        return self._client

    def _run(self, trial) -> tracking.Run:
        rid = self.runs.get(trial.trial_id)
        if rid is None:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.`tune.trial_id` = '{trial.trial_id}'",
                max_results=1)
            if found:
                rid = found[0].info.run_id
                self.client.update_run(rid, status="RUNNING")
            else:
                tags = {"job": "tune-trial", "mlflow.parentRunId": self.parent, "tune.trial_id": trial.trial_id,
                        "tune.sweep": self.sweep, "mask.code_version": code_version()}
                rid = self.client.create_run(self.experiment_id, run_name=trial_run_name(trial),
                                             tags=tracking.sanitize_params(tags)).info.run_id
                cfg = trial_config(self.cfg_json, trial.config)
                params = cfg.flat()
                params.update({alias: params[key] for key, alias in ALIASES.items()})
                params.update(self.extra_params)
                tracking.Run(self.client, rid, self._uri).log_params(params)
            self.runs[trial.trial_id] = rid
        return tracking.Run(self.client, rid, self._uri)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._run(trial)
        epoch = int(result["epoch"])
        for h in json.loads(result.get("history_json", "[]")):
            run.log_metrics({f"epoch.{k}": v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        metrics = {"val.rsum": result[SCORE], "eval_seconds": result.get("eval_seconds", 0.0)}
        metrics.update({k: v for k, v in result.items()
                        if k.startswith(("best.", "gap.")) and isinstance(v, int | float)})
        run.log_metrics(metrics, step=epoch)
        logger.info("trial %s epoch %d/%d: val Rs %.1f (best of the grid: m=%s alpha=%s k=%s), eval %.1fs",
                    trial.trial_id, epoch + 1, self.epochs, result[SCORE], result.get("best_m"),
                    result.get("best_alpha"), result.get("best_k"), result.get("eval_seconds", 0.0))

    def _finish(self, trial, status: str, error: str | None = None) -> None:
        run = self._run(trial)
        last = trial.last_result or {}
        if SCORE in last:
            # the grid of the trial's last evaluation (ASHA may stop it after any report)
            run.log_metrics({k: v for k, v in last.items() if k.startswith("grid.") and isinstance(v, int | float)},
                            step=int(last["epoch"]))
            try:
                run.log_params({"best.m": last["best_m"], "best.alpha": last["best_alpha"], "best.k": last["best_k"],
                                "epochs_done": last["epochs_done"]})
            except Exception as e:  # noqa: BLE001 - a restored trial that had logged them already
                logger.debug("trial %s: best params already logged (%s)", trial.trial_id, e)
        done = int(last.get("epochs_done", 0))
        run.set_tags({"tune.stopped_early": str(status == "FINISHED" and done < self.epochs).lower(),
                      **({"tune.error": error} if error else {})})
        self.client.set_terminated(run.run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "FAILED", str(getattr(trial, "error_file", "") or "trial failed"))


def _callback_class():
    """MlflowTrialRuns with Ray's Callback as a base (Tune checks the type)."""
    from ray.tune import Callback

    return type("MlflowTrialRunsCallback", (MlflowTrialRuns, Callback), {"__module__": __name__})
