"""Gallery scoring job: a knowledge version × a gallery → a committed index, metrics, optional re-ranking.

:func:`score_gallery` (``jobs/score_gallery.py``) runs, reusing whatever is committed:

1. the gallery dataset and its region features (the extraction pipeline, ``detector.mode`` boxes);
2. μ per image with the knowledge's PAE (Ray Data, :func:`mask.pipeline.represent.image_representations`);
3. caption words → prototypes (knowledge rows, OOD rows by ``knowledge.ood_method`` / ``m``, eq. 11–13);
4. the vocabulary-factorised eq. 10 scorer (:class:`mask.scoring.GalleryScorer`) streamed over
   chunks of ``scoring.image_chunk`` images, so memory is bounded by a chunk (plus the dense matrix
   when it is kept);
5. the index ``indexes/<gallery>/<version>/`` (:func:`mask.pipeline.index.ensure_index`: the committed
   version, or one built by :func:`~mask.pipeline.index.build_index`, as the main job does): the gallery order (``images.parquet`` / ``captions.parquet``), top-k lists, per-word scores, ``index.json``
   and ``metrics.json``; μ per image in the gallery's shared μ artifact;
6. with ``rerank.base_scores``: eq. 15 in both directions against the base model's scores
   (:func:`mask.pipeline.rerank.rerank_index`), with metrics before and after (Table 2 layout).

The index version is :func:`mask.pipeline.identity.index_version`; a rerun with the same inputs
reuses the committed index.

Gallery order: images in the order of the gallery's ``images`` table (images whose features failed
are left out and counted), captions grouped by that image order (stable within an image). Base-model
score matrices must use the same order; ``images.parquet`` and ``captions.parquet`` record it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mask.config import MaskConfig
from mask.evaluation import markdown_table
from mask.pipeline.index import ensure_index
from mask.pipeline.rerank import rerank_index
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import ensure_dataset, gallery_detector, require_gallery, resolve_and_load_knowledge
from mask.preflight import check_inputs, check_settings

logger = logging.getLogger(__name__)


def score_gallery(cfg: MaskConfig, knowledge_ref: str | None = None) -> dict[str, Any]:
    """The gallery scoring job: a committed index for (knowledge, gallery, scoring config), metrics,
    and eq. 15 re-ranking when ``rerank.base_scores`` is set; one MLflow run.

    Args:
        cfg: the job config (``gallery`` must be set).
        knowledge_ref: knowledge path/URI, ``@alias`` or ``models:/…`` (None: see
            :func:`resolve_and_load_knowledge`).

    Returns:
        Summary: ``index`` (uri, version, reused), ``knowledge``, ``metrics`` (MASK R@K), ``coverage``,
        ``timings``, ``rerank`` (when configured), ``table`` (Markdown), ``mlflow``.

    Raises:
        KnowledgeError / KnowledgeNotFound: the knowledge version does not exist (named).
        BaseScoresError: unusable base scores (file and problem named).
    """
    require_gallery(cfg)
    check_inputs(cfg, ["gallery"], gallery_captions=True)  # before Ray / MLflow start, as the knowledge
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    check_settings(cfg)
    knowledge = resolve_and_load_knowledge(cfg, store, knowledge_ref)  # fails before Ray / MLflow start
    check_settings(cfg, table=knowledge.table)  # what the knowledge stores (samples) vs the scoring config
    uri = ctx.tracking_uri
    with job_run(ctx, "score_gallery", tags={"knowledge_uri": knowledge.uri}) as run:
        t_all = time.perf_counter()
        t0 = time.perf_counter()
        gal = ensure_dataset(ctx, cfg.gallery, run.run_id)
        dataset_hash = gal["summary"]["config_hash"]
        t_dataset = time.perf_counter() - t0
        run.log_params({"knowledge.uri": knowledge.uri, "knowledge.resolved_version": knowledge.version,
                        "gallery.dataset_hash": dataset_hash})
        index = ensure_index(ctx, run, knowledge, gal, lambda: gallery_detector(ctx, run),
                             keep_dense=bool(cfg.rerank.base_scores))
        rel, version, metrics = index.rel, index.version, index.metrics
        run.log_params({"index.version": version})
        summary: dict[str, Any] = {"knowledge": {"uri": knowledge.uri, "version": knowledge.version},
                                   "index": {"uri": store.uri(rel), "version": version, "reused": index.reused}}
        dense = None
        if index.build is not None:
            dense = index.build.dense
            metrics["timings"] = {"dataset": t_dataset, **metrics["timings"]}
            summary["features"] = index.build.features
        summary["metrics"] = metrics["mask"]
        summary["coverage"] = metrics["coverage"]
        summary["timings"] = metrics["timings"]
        rows = {"MASK": metrics["mask"]}
        if cfg.rerank.base_scores:
            rr = rerank_index(cfg, store, rel, dense, run)
            summary["rerank"] = rr
            rows = {"MASK": metrics["mask"], **rr["rows"]}
        run.log_metrics({f"mask.{k}": v for k, v in metrics["mask"].items()})
        run.log_metrics({f"coverage.{k}": float(v) for k, v in metrics["coverage"].items()})
        run.log_metrics({f"time.{k}": float(v) for k, v in metrics["timings"].items()})
        if "reuse" in metrics:
            run.log_metrics({f"index.{k}": float(v) for k, v in metrics["reuse"].items()
                             if isinstance(v, int | float) and not isinstance(v, bool)})
        run.log_metrics({"time.total": time.perf_counter() - t_all, "index.reused": float(summary["index"]["reused"])})
        summary["table"] = markdown_table(rows)
        run.log_text(summary["table"], "evaluation.md")
        run.log_dict(metrics, "index/metrics.json")
        summary["mlflow"] = {"tracking_uri": uri if run.run_id else None, "run_id": run.run_id}
    return summary
