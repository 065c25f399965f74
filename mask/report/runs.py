"""MLflow runs → records the report can compare: which job, which λ/m/α, which R@K.

What the jobs log (the report reads only these names):

* ``build_knowledge`` runs (tag ``job=build_knowledge``): the flattened config as params
  (``loss.lambda_cm`` = λ1, ``loss.lambda_cl`` = λ2, ``loss.kl_weight``, ``loss.tau``, ``knowledge.m``),
  ``<variant>.<metric>`` for the variants ``mask``, ``mask_without_ood``, ``without_prototypes``,
  ``without_max_mean``, ``chance``; per-epoch ``epoch.loss*`` (step = epoch); ``gap.*``; tag
  ``knowledge.uri`` (and a registered model version whose run id is the run's).
* ``train`` runs: per-epoch ``epoch.loss*``.
* Tune sweeps: a parent run (``job=tune``) and nested trials (``job=tune-trial``, ``mlflow.parentRunId``)
  with the flattened config (λ also as ``loss.lambda1``/``loss.lambda2``), ``best.m``/``best.alpha``/
  ``best.k`` params, per-epoch ``val.rsum`` and ``train.loss``/``train.l_ir``/``train.l_cm``/``train.l_cl``,
  and the grid ``grid.m_<m>.<metric>`` (MASK alone at OOD size m), ``grid.m_<m>.alpha_<a>.k_<k>.<metric>``
  (base + MASK re-ranked, eq. 15), ``grid.base.<metric>`` and ``best.<metric>`` (numbers written ``f"{x:g}"``).
* ``score_gallery`` runs with re-ranking: ``rerank.before.<metric>``, ``rerank.after.<metric>`` and
  the params ``rerank.alpha``, ``rerank.k``.

``<metric>`` is one of :data:`METRICS` (R@K in percent, Rs their sum).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mask.errors import MaskError
from mask.metrics import METRIC_NAMES

logger = logging.getLogger(__name__)

#: The seven numbers of a paper table row (:data:`mask.metrics.METRIC_NAMES`).
METRICS = METRIC_NAMES

#: Params that say how a run executed, not what it computed: ignored when runs are compared.
MECHANICS_PREFIXES = ("tracking.", "storage.", "ray.", "best.")
MECHANICS_KEYS = frozenset({
    "train.run_name", "train.checkpoint_every", "train.max_failures", "train.log_every", "train.num_workers",
    "train.use_gpu", "train.cpus_per_worker", "knowledge.version", "detector.batch_size", "detector.num_actors",
    "detector.device", "tracking.fallback", "gap.skipped"})

_METRIC_RE = "|".join(METRICS)
_GRID_M = re.compile(rf"^grid\.m_(?P<m>[^.]+)\.(?P<metric>{_METRIC_RE})$")
_GRID_A = re.compile(rf"^grid\.m_(?P<m>[^.]+)\.alpha_(?P<a>.+?)\.k_(?P<k>[^.]+)\.(?P<metric>{_METRIC_RE})$")


class ReportError(MaskError, ValueError):
    """A report request that cannot be served (unknown experiment or run, no store); names the input."""


@dataclass
class RunRecord:
    """One MLflow run as the report sees it."""

    run_id: str
    name: str
    job: str
    status: str
    start_time: int
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    parent_id: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.run_id[:8]

    def param_float(self, *keys: str) -> float | None:
        """The first of ``keys`` that is a number (params are strings in MLflow)."""
        for k in keys:
            v = self.params.get(k)
            if v is None:
                continue
            try:
                return float(v)
            except ValueError:
                continue
        return None

    def recall(self, prefix: str) -> dict[str, float] | None:
        """``{metric: value}`` of ``<prefix>.<metric>`` when all seven are logged."""
        vals = {m: self.metrics.get(f"{prefix}.{m}") for m in METRICS}
        return vals if all(v is not None for v in vals.values()) else None  # type: ignore[return-value]

    @property
    def lambdas(self) -> tuple[float | None, float | None]:
        """(λ1, λ2) of eq. 14."""
        return (self.param_float("loss.lambda_cm", "loss.lambda1"),
                self.param_float("loss.lambda_cl", "loss.lambda2"))

    def grid_m(self) -> dict[float, dict[str, float]]:
        """MASK alone per OOD sampling size m (``grid.m_<m>.<metric>``), complete rows only."""
        out: dict[float, dict[str, float]] = {}
        for k, v in self.metrics.items():
            g = _GRID_M.match(k)
            if g:
                out.setdefault(float(g["m"]), {})[g["metric"]] = v
        return {m: r for m, r in sorted(out.items()) if len(r) == len(METRICS)}

    def grid_alpha(self) -> dict[tuple[float, float, float], dict[str, float]]:
        """Re-ranked metrics per (m, α, k) (``grid.m_<m>.alpha_<a>.k_<k>.<metric>``), complete rows only."""
        out: dict[tuple[float, float, float], dict[str, float]] = {}
        for k, v in self.metrics.items():
            g = _GRID_A.match(k)
            if g:
                out.setdefault((float(g["m"]), float(g["a"]), float(g["k"])), {})[g["metric"]] = v
        return {key: r for key, r in sorted(out.items()) if len(r) == len(METRICS)}


def comparable_params(run: RunRecord) -> dict[str, str]:
    """The params that define what a run computed (mechanics left out)."""
    return {k: v for k, v in run.params.items()
            if k not in MECHANICS_KEYS and not k.startswith(MECHANICS_PREFIXES)}


def param_differences(a: RunRecord, b: RunRecord, ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ between two runs' comparable params.

    Only keys both runs logged count: a key one run lacks is a config option its code did not have yet
    (runs logged before a config section was added stay comparable with later ones).
    """
    pa_, pb = comparable_params(a), comparable_params(b)
    skip = set(ignore)
    return sorted(k for k in set(pa_) & set(pb) if k not in skip and pa_[k] != pb[k])


# ---------------------------------------------------------------- reading MLflow


def open_client(tracking_uri: str):
    """An MlflowClient for a tracking URI that must already hold a store.

    Raises:
        ReportError: a local SQLite/file store that does not exist (MLflow would create an empty one).
    """
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        if not os.path.exists(db):
            raise ReportError(f"no MLflow store at {tracking_uri} (the file {db} does not exist); "
                              "set storage.root or tracking.uri to where the jobs logged")
    elif tracking_uri.startswith("file:") or tracking_uri.startswith("/"):
        path = tracking_uri[len("file://"):] if tracking_uri.startswith("file://") else tracking_uri
        if not os.path.isdir(path):
            raise ReportError(f"no MLflow store at {tracking_uri}")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _record(run) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(run_id=run.info.run_id, name=run.info.run_name or "", job=tags.get("job", ""),
                     status=run.info.status, start_time=int(run.info.start_time or 0),
                     experiment_id=run.info.experiment_id, params=dict(run.data.params),
                     metrics=dict(run.data.metrics), tags=tags, parent_id=tags.get("mlflow.parentRunId"))


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list[RunRecord]:
    out: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        out.extend(_record(r) for r in page)
        token = page.token
        if not token:
            return out


def collect_runs(client, experiments: list[str] | None = None, run_ids: list[str] | None = None) -> list[RunRecord]:
    """The runs of the named experiments and/or the given run ids (a tune parent brings its trials).

    Report runs (``job=report``) are left out. Order: newest first.

    Raises:
        ReportError: an experiment name or run id the store does not have (named).
    """
    from mlflow.exceptions import MlflowException

    runs: dict[str, RunRecord] = {}
    for name in experiments or []:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            known = sorted(e.name for e in client.search_experiments())
            raise ReportError(f"MLflow experiment {name!r} does not exist at {client.tracking_uri} "
                              f"(experiments there: {known})")
        for r in _search(client, [exp.experiment_id]):
            runs[r.run_id] = r
    for rid in run_ids or []:
        try:
            r = _record(client.get_run(rid))
        except MlflowException as e:
            raise ReportError(f"MLflow run {rid!r} does not exist at {client.tracking_uri} ({e.error_code})") from None
        runs[r.run_id] = r
        if r.job == "tune":
            for child in _search(client, [r.experiment_id], f"tags.mlflow.parentRunId = '{rid}'"):
                runs[child.run_id] = child
    return sorted((r for r in runs.values() if r.job != "report"), key=lambda r: -r.start_time)


def load_history(client, run: RunRecord, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per-step values of the given metric keys the run has (cached on the record), sorted by step."""
    for k in keys:
        if k in run.metrics and k not in run.history:
            hist = client.get_metric_history(run.run_id, k)
            latest: dict[int, tuple[int, float]] = {}
            for m in hist:  # a rerun may log a step twice: keep the latest value
                if m.step not in latest or m.timestamp >= latest[m.step][0]:
                    latest[m.step] = (m.timestamp, m.value)
            run.history[k] = [(s, v) for s, (_, v) in sorted(latest.items())]
    return {k: run.history[k] for k in keys if k in run.history}


def dedupe(runs: list[RunRecord]) -> tuple[list[RunRecord], int]:
    """One run per (job, comparable params) for the jobs whose reruns reuse committed work.

    A rerun of build_knowledge that reused everything logs the same numbers but no training curves;
    of identical runs the one with the most metrics is kept (the newest on a tie).

    Returns:
        (kept runs, newest first; number dropped as duplicates).
    """
    kept: list[RunRecord] = []
    chosen: list[RunRecord] = []  # one per set of identical runs
    for r in runs:
        if r.job not in ("build_knowledge", "train", "score_gallery"):
            kept.append(r)
            continue
        i = next((i for i, c in enumerate(chosen) if c.job == r.job and not param_differences(c, r)), None)
        if i is None:
            chosen.append(r)
        elif (len(r.metrics), r.start_time) > (len(chosen[i].metrics), chosen[i].start_time):
            chosen[i] = r
    kept += chosen
    kept.sort(key=lambda r: -r.start_time)
    return kept, len(runs) - len(kept)


def run_knowledge_uri(client, run: RunRecord) -> str | None:
    """The knowledge artifact a run built: its ``knowledge.uri`` tag, else a registered version of the run."""
    if run.tags.get("knowledge.uri"):
        return run.tags["knowledge.uri"]
    try:
        versions = client.search_model_versions(f"run_id = '{run.run_id}'")
    except Exception as e:  # noqa: BLE001 - a store without a registry: no knowledge to show
        logger.warning("run %s: cannot search registered knowledge (%s)", run.run_id, e)
        return None
    for mv in sorted(versions, key=lambda v: -int(v.version)):
        uri = (mv.tags or {}).get("knowledge_uri") or mv.source
        if uri and not uri.startswith("runs:/"):
            return uri
    return None


def as_dict(run: RunRecord) -> dict[str, Any]:
    """A JSON-friendly summary (report.json)."""
    l1, l2 = run.lambdas
    return {"run_id": run.run_id, "name": run.name, "job": run.job, "status": run.status,
            "parent_id": run.parent_id, "lambda1": l1, "lambda2": l2}
