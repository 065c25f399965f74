"""Evaluation jobs: the main job's gallery table and the evaluation of a committed index.

:func:`evaluate_gallery` (the main job, when the config names a gallery): gallery features (detected
boxes) → μ → a committed index (:func:`mask.pipeline.index.build_index`, as ``score_gallery``) → MASK and
its ablations on the index's order (:func:`mask.evaluation.evaluate`) → the R@K table, logged to MLflow.

:func:`evaluate_job` (``jobs/evaluate.py``): R@1/5/10 both ways and Rs of a committed index, or of a
dense score file in its order, by an evaluation protocol (:data:`PROTOCOLS`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa

from mask.config import MaskConfig
from mask.evaluation import evaluate, format_table, markdown_table
from mask.metrics import coco_5fold_1k, coco_5k, recall_at_k
from mask.pipeline.index import (
    DENSE_FILE,
    ensure_index,
    find_index,
    has_file,
    index_dense,
    index_order,
    read_index_file,
    read_mu,
    recall_from_topk,
)
from mask.pipeline.rerank import load_base_scores
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import GalleryError, ResolvedKnowledge, ensure_dataset, require_gallery
from mask.preflight import check_inputs

logger = logging.getLogger(__name__)


def evaluate_gallery(ctx: JobContext, knowledge: ResolvedKnowledge, det_weights: str | None, run) -> dict[str, Any]:
    """The main job's evaluation: a committed index of the gallery, then MASK and its ablations → R@K
    table (logged to MLflow).

    The index is built by :func:`mask.pipeline.index.build_index` — the path ``score_gallery`` and
    ``reindex`` take — under the version they compute for this knowledge and gallery
    (:func:`mask.pipeline.identity.index_version`), so they reuse it; its μ lives in the gallery's shared
    μ artifact.  The ablation table (:func:`mask.evaluation.evaluate`) reads the index's gallery order
    and that μ; its MASK row and the index's metrics are the same scores (tested).

    Args:
        ctx: job context.
        knowledge: the committed knowledge (:func:`mask.pipeline.steps.resolve_and_load_knowledge`).
        det_weights: committed detector weights (None: ``detector.weights``).
        run: the job's MLflow run.
    """
    cfg, store = ctx.cfg, ctx.store
    gcfg = require_gallery(cfg)
    gallery = ensure_dataset(ctx, gcfg, run.run_id)
    if gallery.get("captions") is None:
        raise GalleryError(f"gallery {gcfg.name}: the dataset has no captions")
    index = ensure_index(ctx, run, knowledge, gallery, lambda: det_weights)
    run.log_params({"index.version": index.version})
    run.log_metrics({f"index.mask.{k}": float(v) for k, v in index.metrics["mask"].items()})
    o = index_order(store, index.rel)
    mrel = read_index_file(store, index.rel, "index.json")["mu"]
    captions = pa.table({"caption_id": o.caption_ids, "image_id": o.caption_image, "text": o.texts})
    results = evaluate(cfg, knowledge.table, o.image_ids, read_mu(store, mrel, o.image_ids), captions)
    md = format_table(results)
    for name, m in results.items():
        if isinstance(m, dict) and "rsum" in m:
            run.log_metrics({f"{name}.{k}": float(v) for k, v in m.items()})
    run.log_metrics({f"coverage.{k}": float(v) for k, v in results["coverage"].items()})
    if "finetune" in results:  # Appendix H's own terms: per step (at most ~50 points), and first/last
        ft = results["finetune"]
        hist = ft.pop("history")
        every = max(1, len(hist) // 50)
        for i, h in enumerate(hist):
            if i % every == 0 or i == len(hist) - 1:
                run.log_metrics({f"finetune.{k}": v for k, v in h.items()}, step=i)
        run.log_metrics({f"finetune.{k}": float(v) for k, v in ft.items()})
    run.log_text(md, "evaluation.md")
    features = index.build.features if index.build else {"reused_index": True}
    return {"gallery": gcfg.name, "images": len(o.image_ids), "features": features, "table": md,
            "mu": store.uri(mrel), "index": {"uri": store.uri(index.rel), "version": index.version,
                                             "reused": index.reused, "metrics": index.metrics["mask"]},
            **results}


PROTOCOLS = ("all", "flickr30k-1k", "coco-5k", "coco-5fold-1k")


def protocol_metrics(sim: np.ndarray, caption_to_image: np.ndarray, protocol: str,
                     t2i_similarity: np.ndarray | None = None) -> dict[str, float]:
    """R@K by an evaluation protocol: ``all`` (any gallery), ``flickr30k-1k`` (the 1000-image test),
    ``coco-5k`` (5000 images), ``coco-5fold-1k`` (mean over 5 folds of 1000).

    Raises:
        GalleryError: an unknown protocol, or a gallery that does not fit it (COCO needs 5 captions
            per image in image order).
    """
    if protocol not in PROTOCOLS:
        raise GalleryError(f"--protocol {protocol!r}: expected one of {PROTOCOLS}")
    n = sim.shape[0]
    if protocol in ("all", "flickr30k-1k"):
        if protocol == "flickr30k-1k" and n != 1000:
            logger.warning("protocol flickr30k-1k: the gallery has %d images (the Flickr30K test has 1000)", n)
        return recall_at_k(sim, caption_to_image=caption_to_image, t2i_similarity=t2i_similarity)
    if not np.array_equal(caption_to_image, np.arange(sim.shape[1]) // 5) or sim.shape[1] != 5 * n:
        raise GalleryError(f"--protocol {protocol}: needs exactly 5 captions per image in image order; the "
                           f"gallery has {n} images and {sim.shape[1]} captions")
    if protocol == "coco-5k":
        return coco_5k(sim, 5, t2i_similarity=t2i_similarity)
    return coco_5fold_1k(sim, 5, t2i_similarity=t2i_similarity)


def evaluate_job(cfg: MaskConfig, index_ref: str | None = None, scores_path: str | None = None,
                 protocol: str = "all") -> dict[str, Any]:
    """R@1/5/10 both ways and Rs for a committed index, or a dense score file in the gallery order.

    Args:
        cfg: the config (storage, tracking, gallery).
        index_ref: index path (under the storage root); None = the newest index of ``cfg.gallery``.
        scores_path: a dense ``.npy`` (N, T) in the index's order; None = the index's MASK scores.
        protocol: one of :data:`PROTOCOLS`.

    Returns:
        ``{"index", "protocol", "metrics", "table", "mlflow"}``.
    """
    if protocol not in PROTOCOLS:
        raise GalleryError(f"--protocol {protocol!r}: expected one of {PROTOCOLS}")
    check_inputs(cfg, [])  # the storage root is writable (the MLflow store lives there)
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    rel = find_index(cfg, store, index_ref)
    captions = read_index_file(store, rel, "captions.parquet")
    images = read_index_file(store, rel, "images.parquet")
    c2i = np.asarray(captions.column("image_position").to_pylist(), np.int64)
    rows: dict[str, dict[str, float]] = {}
    if scores_path is not None:
        base = load_base_scores(scores_path, images.column("image_id").to_pylist(),
                                captions.column("caption_id").to_pylist(), cfg.storage.options)
        rows[os.path.basename(scores_path)] = protocol_metrics(base.matrix, c2i, protocol)
    else:
        if has_file(store, rel, DENSE_FILE) or has_file(store, rel, "word_scores.npy"):
            rows["MASK"] = protocol_metrics(index_dense(cfg, store, rel), c2i, protocol)
        elif protocol == "all":
            t2i = read_index_file(store, rel, "t2i_topk.parquet")
            i2t = read_index_file(store, rel, "i2t_topk.parquet")
            ipos = {x: i for i, x in enumerate(images.column("image_id").to_pylist())}
            cpos = {x: i for i, x in enumerate(captions.column("caption_id").to_pylist())}
            rows["MASK"] = recall_from_topk(np.asarray([[ipos[x] for x in r] for r in t2i.column("ids").to_pylist()]),
                                            np.asarray([[cpos[x] for x in r] for r in i2t.column("ids").to_pylist()]),
                                            c2i)
        else:
            raise GalleryError(f"index {store.uri(rel)} keeps no dense matrix; --protocol {protocol} needs one")
        for r in store.list(f"{rel}/rerank"):
            rm = read_index_file(store, f"{rel}/rerank/{r}", "metrics.json") \
                if store.manifest(f"{rel}/rerank/{r}") else None
            if rm and protocol == "all":
                rows[f"base ({r})"] = rm["before"]
                rows[f"base + MASK ({r}, α={rm['alpha']:g}, k={rm['k']})"] = rm["after"]
    table = markdown_table(rows)
    with job_run(ctx, "evaluate", params={"index": store.uri(rel), "protocol": protocol, "scores": scores_path or ""},
                 ray=False) as run:
        for name, mt in rows.items():
            run.log_metrics({f"{_metric_key(name)}.{k}": v for k, v in mt.items()})
        run.log_text(table, f"evaluation_{protocol}.md")
        return {"index": store.uri(rel), "protocol": protocol, "metrics": rows, "table": table,
                "mlflow": {"run_id": run.run_id}}


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")[:60] or "row"
