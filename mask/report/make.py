"""The report job: read the runs, write the report folder, log it as a ``report`` run."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mask import tracking
from mask.report.compose import write_report
from mask.report.prototype_map import load_groups
from mask.report.runs import ReportError, collect_runs, open_client

logger = logging.getLogger(__name__)


def default_out_dir(experiments: list[str] | None, run_ids: list[str] | None) -> str:
    """``reports/<experiment or "runs">-<UTC time>`` under the working directory."""
    name = experiments[0] if experiments and len(experiments) == 1 else "runs"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return os.path.join("reports", f"{safe}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def make_report(cfg, experiments: list[str] | None = None, run_ids: list[str] | None = None,
                out_dir: str | None = None, groups_file: str | None = None, tsne_run: str | None = None,
                log_run: bool = True) -> dict[str, Any]:
    """Read the runs, write the report folder, and log it as the artifacts of a new ``report`` run.

    Args:
        cfg: a :class:`mask.config.MaskConfig`; ``tracking`` and ``storage.root`` say where the runs
            are (the same settings the jobs logged with), ``storage.options`` how to read knowledge.
        experiments: MLflow experiment names (default: ``tracking.experiment`` when no run ids).
        run_ids: MLflow run ids (a Tune parent run brings its trials).
        out_dir: local report folder (default :func:`default_out_dir`).
        groups_file: YAML ``{group: [words]}`` for the t-SNE map.
        tsne_run: run id whose knowledge to map.
        log_run: log the report as a run (``job=report``; in the reported experiment when one is named,
            else in ``tracking.experiment``).

    Returns:
        ``out``, ``sections`` (title → filled), ``images``, ``runs`` and ``mlflow_run_id``.

    Raises:
        ReportError: tracking disabled, no store, unknown experiment or run id, no finished runs, a bad
            groups file.
    """

    if not cfg.tracking.enabled:
        raise ReportError("tracking.enabled is false: the report reads MLflow runs; enable tracking")
    if not experiments and not run_ids:
        experiments = [cfg.tracking.experiment]
    groups = load_groups(groups_file) if groups_file else None
    uri = tracking.tracking_uri(cfg.tracking, cfg.storage.root)
    client = open_client(uri)
    runs = collect_runs(client, experiments, run_ids)
    sources = {k: v for k, v in (("experiments", experiments), ("run_ids", run_ids)) if v}
    out_dir = out_dir or default_out_dir(experiments, run_ids)
    result = write_report(client, runs, out_dir, sources=sources, storage_options=cfg.storage.options,
                          groups=groups, tsne_run=tsne_run, seed=cfg.seed)
    result["mlflow_run_id"] = None
    if log_run:
        tcfg = cfg.tracking.model_copy(update={"experiment": experiments[0]}) if experiments else cfg.tracking
        params = {"report.experiments": ",".join(experiments or []), "report.run_ids": ",".join(run_ids or []),
                  "report.runs": result["runs"], "report.tsne_run": tsne_run or "",
                  "report.groups_file": groups_file or ""}
        with tracking.start_run(tcfg, cfg.storage.root, "report", params=params, tags={"job": "report"}) as run:
            for name in sorted(os.listdir(result["out"])):  # flat folder: its files under report/
                run.log_artifact(os.path.join(result["out"], name), "report")
            run.log_metrics({"report.sections_filled": sum(result["sections"].values())})
            result["mlflow_run_id"] = run.run_id
    logger.info("report written to %s (%d of %d sections filled)", result["out"],
                sum(result["sections"].values()), len(result["sections"]))
    return result
