"""The extraction job (``jobs/extract_regions.py``): region features of the training dataset or the gallery."""

from __future__ import annotations

import logging
from typing import Any

from mask.config import MaskConfig
from mask.pipeline.extract import run_extraction
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import ensure_dataset, ensure_detector, require_gallery
from mask.preflight import PreflightError, check_inputs

logger = logging.getLogger(__name__)


def extract_dataset(cfg: MaskConfig, target: str = "dataset") -> dict[str, Any]:
    """The extraction job: features for the training dataset (its ground-truth boxes when it has
    regions) or for the gallery (``detector.mode`` boxes), tracked in its own MLflow run."""
    if target not in ("dataset", "gallery"):
        raise PreflightError(f"--target must be 'dataset' or 'gallery', got {target!r}")
    dcfg = cfg.dataset if target == "dataset" else require_gallery(cfg)
    check_inputs(cfg, [target])  # before Ray and MLflow start
    ctx = JobContext.from_config(cfg)
    with job_run(ctx, "extract_regions", run_name=f"extract_regions:{dcfg.name}") as run:
        data = ensure_dataset(ctx, dcfg, run.run_id)
        images = data["images"]
        weights = ensure_detector(ctx, images.column("uri").to_pylist()[:16])
        regions = data.get("regions")
        det = cfg.detector
        if target == "dataset" and regions is not None and regions.num_rows:
            det = det.model_copy(update={"mode": "given"})
        return {"dataset": data["summary"],
                "features": run_extraction(cfg, ctx.store, dcfg.name, images, regions if det.mode == "given" else None,
                                           weights, det=det, tracker=run)}
