"""The modality-gap measures of a trained run (mask.alignment), logged as ``gap.*`` MLflow metrics.

The MTM is not part of the knowledge artifact (scoring needs only the PAE), so its weights are read
from the training checkpoint the knowledge was built from (``model.safetensors``, keys ``net.mtm.*``).
The main job calls :func:`log_gap_measures` after the knowledge is built; a Tune trial that holds its
trained module can call :func:`mask.alignment.gap_measures` directly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mask.alignment import AlignmentInputError, gap_measures, mtm_from_state
from mask.knowledge_artifact import INFO_FILE
from mask.pipeline.train import MODEL_FILE
from mask.storage import Store

logger = logging.getLogger(__name__)


def read_checkpoint_state(store: Store, checkpoint_uri: str) -> dict[str, Any]:
    """The weights of a training checkpoint folder (``s3://…`` or a local path) through the store's filesystem.

    Raises:
        FileNotFoundError: no ``model.safetensors`` in that folder (named).
    """
    from safetensors.torch import load


    path = checkpoint_uri[len("s3://"):] if checkpoint_uri.startswith("s3://") else checkpoint_uri
    fs = store.pyarrow_filesystem()
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{MODEL_FILE}") as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"training checkpoint {checkpoint_uri}: no readable {MODEL_FILE} ({e})") from e
    return load(data)


def knowledge_checkpoint(store: Store, krel: str) -> str | None:
    """The training checkpoint a committed knowledge version was built from (its ``knowledge.json`` lineage)."""


    try:
        info = json.loads(store.read_file(krel, INFO_FILE))
    except Exception as e:  # noqa: BLE001 - an old or foreign artifact: no lineage, measures skipped
        logger.warning("knowledge %s: no readable %s (%s)", store.uri(krel), INFO_FILE, e)
        return None
    return (info.get("lineage") or {}).get("training_run")


def gap_from_checkpoint(store: Store, checkpoint_uri: str, table, num_heads: int, seed: int = 0) -> dict[str, float]:
    """``gap.*`` measures of the checkpoint's MTM on a knowledge table (:func:`mask.alignment.gap_measures`)."""

    mtm = mtm_from_state(read_checkpoint_state(store, checkpoint_uri), num_heads)
    return gap_measures(table, mtm, seed=seed)


def log_gap_measures(store: Store, cfg, table, checkpoint_uri: str | None, run) -> dict[str, float]:
    """Compute the gap measures and log them to ``run``; a failure is a warning, never the job's end.

    The measures are diagnostics: when they cannot be computed (no checkpoint, a table without
    region-learned rows) the run gets the param ``gap.skipped`` with the reason and the job goes on.

    Returns:
        The ``gap.*`` metrics (empty when skipped).
    """

    try:
        if not checkpoint_uri:
            raise FileNotFoundError("no training checkpoint is recorded for this knowledge")
        metrics = gap_from_checkpoint(store, checkpoint_uri, table, cfg.model.num_heads, seed=cfg.seed)
    except (FileNotFoundError, AlignmentInputError) as e:
        logger.warning("modality-gap measures skipped: %s", e)
        run.log_params({"gap.skipped": str(e)})
        return {}
    run.log_metrics(metrics)
    logger.info("modality gap (prototypes): W2 %.4g (unit %.4g), centroid %.4g, R@1 cosine %.3f vs Euclidean %.3f",
                metrics["gap.prototype.w2_exact"], metrics["gap.prototype.w2_exact_unit"],
                metrics["gap.prototype.centroid"], metrics["gap.prototype.cos_r1"],
                metrics["gap.prototype.euclid_r1"])
    return metrics
