"""Scheduled, incremental re-indexing of a gallery (``jobs/reindex.py``).

One run:

1. takes the gallery's lease (:mod:`mask.lease`; a second run at the same time exits cleanly saying
   who holds it and until when);
2. re-reads the gallery source (new or removed images and captions change the dataset's hash) and
   resolves the knowledge reference (``--knowledge`` / ``index.knowledge``: an alias follows the
   registry, so promoting a new knowledge version triggers rescoring);
3. compares the target version ``i-<hash>`` (knowledge, gallery contents and its images' change
   stamps, features, scoring config) with ``CURRENT``: equal → nothing to do; committed already (an
   earlier run died after its commit) → only the switch; else builds it with
   :func:`mask.pipeline.index.build_index` from the live version — features only for new or changed
   images (the extraction skips committed ones whose source stamp is unchanged), μ only for images
   without one for this knowledge or whose features changed, per-word terms only for new or changed
   images and new words, captions parsed only when new or changed; a new knowledge rescores every pair
   but reuses every feature;
4. checks it still holds the lease, then switches ``CURRENT`` atomically (one write).

A crash anywhere before the switch leaves ``CURRENT`` and the live version untouched (the new
version is either uncommitted — ignored by readers — or committed and picked up by the next run).
Everything is tracked in one MLflow run (``job=reindex``): what was reused and computed, timings.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mask import tracking
from mask.config import MaskConfig
from mask.faults import kill_point
from mask.lease import Lease, LeaseBusy
from mask.pipeline.identity import gallery_content, index_root, index_version
from mask.pipeline.index import (
    LEASE_DIR,
    LiveIndex,
    build_index,
    read_current,
    read_index_file,
    switch_current,
)
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import ensure_dataset, gallery_detector, require_gallery, resolve_and_load_knowledge
from mask.preflight import check_inputs

logger = logging.getLogger(__name__)


def reindex(cfg: MaskConfig, knowledge_ref: str | None = None) -> dict[str, Any]:
    """Bring ``indexes/<gallery>/CURRENT`` up to date with the gallery and the knowledge.

    Returns:
        ``{"status": "busy" | "up-to-date" | "switched" | "built", "gallery", "version", "previous",
        "reason" (busy), "reuse", "metrics", "timings", "mlflow"}``.

    Raises:
        GalleryError: no gallery configured, an unreadable CURRENT.
        KnowledgeError / KnowledgeNotFound: the knowledge reference names nothing committed.
    """
    require_gallery(cfg)
    check_inputs(cfg, ["gallery"], gallery_captions=True)  # before the lease, Ray and MLflow
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    name = cfg.gallery.name
    root = index_root(name)
    ref = knowledge_ref or cfg.index.knowledge
    knowledge = resolve_and_load_knowledge(cfg, store, ref)  # a missing version fails before any work
    lease = Lease(store, f"{root}/{LEASE_DIR}", cfg.index.lease_ttl_s)
    try:
        lease.acquire()
    except LeaseBusy as e:
        logger.warning("re-index of %s skipped: %s", name, e)
        return {"status": "busy", "gallery": name, "reason": str(e)}
    try:
        kill_point("reindex.after_lease")
        uri = ctx.tracking_uri
        with job_run(ctx, "reindex", tags={"gallery": name, "knowledge_uri": knowledge.uri}) as raw, \
                tracking.BufferedRun(raw) as run:  # one MLflow write for the many small groups below
            t_all = time.perf_counter()
            t0 = time.perf_counter()
            gal = ensure_dataset(ctx, cfg.gallery, run.run_id)
            t_dataset = time.perf_counter() - t0
            version = index_version(cfg, knowledge, gal["summary"]["config_hash"],
                                    gallery_content(cfg, gal["images"].column("uri").to_pylist()))
            cur = read_current(store, name)
            previous = cur["version"] if cur else None
            run.log_params({"knowledge.ref": ref or "", "knowledge.uri": knowledge.uri, "index.version": version,
                            "index.previous": previous or "", "gallery.dataset_hash": gal["summary"]["config_hash"]})
            out: dict[str, Any] = {"gallery": name, "version": version, "previous": previous,
                                   "index": store.uri(root, version), "knowledge": knowledge.uri}
            rel = f"{root}/{version}"
            if previous == version and store.manifest(rel) is not None:
                out["status"] = "up-to-date"
                out["metrics"] = read_index_file(store, rel, "metrics.json")["mask"]
                logger.info("index %s of %s is live and up to date", version, name)
            else:
                if store.committed(rel, version) is not None:
                    out["status"] = "switched"
                    metrics = read_index_file(store, rel, "metrics.json")
                    logger.info("index %s is committed already; switching to it", store.uri(rel))
                else:
                    metrics = _build_version(ctx, run, knowledge, gal, version, previous, t_dataset, out)
                    kill_point("reindex.after_commit")
                lease.check()  # fencing: never switch after our lease expired
                switch_current(store, name, version, previous, mlflow_run_id=run.run_id,
                               knowledge_uri=knowledge.uri)
                out["metrics"] = metrics["mask"]
                run.log_metrics({f"mask.{k}": float(v) for k, v in metrics["mask"].items()})
                logger.info("%s: CURRENT switched %s → %s", name, previous, version)
            run.set_tags({"reindex.status": out["status"]})
            run.log_metrics({"time.total": time.perf_counter() - t_all})
            out["mlflow"] = {"tracking_uri": uri if run.run_id else None, "run_id": run.run_id}
        return out
    finally:
        lease.release()


def _build_version(ctx: JobContext, run, knowledge, gal: dict[str, Any], version: str, previous: str | None,
                   t_dataset: float, out: dict[str, Any]) -> dict[str, Any]:
    """Build and commit index ``version`` from the live ``previous`` version (from scratch when it is not
    committed); records status and reuse in ``out`` and the run.  Returns the version's metrics."""
    store, name = ctx.store, ctx.cfg.gallery.name
    root = index_root(name)
    live = None
    if previous and store.manifest(f"{root}/{previous}") is not None:
        live = LiveIndex.load(store, f"{root}/{previous}")
    elif previous:
        logger.warning("CURRENT of %s points at %s, which is not committed; building from scratch",
                       name, previous)
    det = gallery_detector(ctx, run)
    built = build_index(ctx, run, knowledge, gal, version, det, live=live)
    metrics = built.metrics
    metrics["timings"] = {"dataset": t_dataset, **metrics["timings"]}
    out["status"] = "built"
    out["reuse"] = built.reuse
    run.log_metrics({f"reuse.{k}": float(v) for k, v in built.reuse.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)})
    run.log_params({"reuse.from": built.reuse["reused_from"] or "",
                    "reuse.scores": built.reuse["score_reuse"], "mu.where": built.reuse["mu_where"]})
    run.log_metrics({f"time.{k}": float(v) for k, v in metrics["timings"].items()})
    return metrics
