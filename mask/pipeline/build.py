"""The main job (``jobs/build_knowledge.py``): dataset → region features → training → knowledge → evaluation.

Each step checks storage first and runs only what is missing for this config, so a rerun reuses
committed work (:mod:`mask.pipeline.steps`).  :func:`build_knowledge` tracks everything in one MLflow
run and registers the knowledge as a model version of ``mask-knowledge`` with its lineage — last, so only a
run that succeeded registers one; inputs are checked before Ray starts (:mod:`mask.preflight`).  Training
runs resume: see :func:`mask.pipeline.train.run_training` and :func:`mask.pipeline.identity.train_run_name`.
"""

from __future__ import annotations

import logging
from typing import Any

from mask import tracking
from mask.config import MaskConfig
from mask.knowledge_artifact import load_knowledge, save_knowledge
from mask.pipeline.evaluate import evaluate_gallery
from mask.pipeline.gap import knowledge_checkpoint, log_gap_measures
from mask.pipeline.identity import knowledge_version
from mask.pipeline.runtime import JobContext, job_run
from mask.pipeline.steps import knowledge_table, prepare_training_inputs, with_ood_vocabulary
from mask.pipeline.train import train_model
from mask.preflight import check_inputs, check_settings

logger = logging.getLogger(__name__)


def build_knowledge(cfg: MaskConfig) -> dict[str, Any]:
    """Run what is missing of dataset → features → training → knowledge → evaluation.

    Returns:
        A summary: knowledge URI, MLflow run id and model version, counts, and the evaluation table.
    """
    # every check that needs no computation, before Ray and MLflow start (a captionless gallery fails here,
    # not after training)
    check_inputs(cfg, ["dataset", "gallery"] if cfg.gallery is not None else ["dataset"], gallery_captions=True)
    check_settings(cfg)  # contradictory settings stop the job before any work (the key named)
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    uri = ctx.tracking_uri
    with job_run(ctx, "build_knowledge") as run:
        run_id = run.run_id
        inputs = prepare_training_inputs(ctx, run)
        summary: dict[str, Any] = dict(inputs.summary)
        vocab = inputs.vocab
        # 4. knowledge (training first, unless this exact knowledge is committed)
        version = knowledge_version(cfg)
        krel = f"knowledge/{version}"
        if store.committed(krel, version) is not None:
            logger.info("knowledge %s is committed; reused", krel)
            table, pae_bytes = load_knowledge(store, krel)
            summary["training"] = {"reused": True}
        else:
            pae_bytes, tsum = train_model(ctx, inputs, run, uri)
            summary["training"] = tsum
            table = knowledge_table(store, cfg, inputs.features_rel, pae_bytes, vocab["words"], vocab["vectors"],
                                    inputs.region_words)
            if cfg.knowledge.ood_vocab_size:
                table = with_ood_vocabulary(table, inputs.kv, cfg)
            save_knowledge(store, krel, table, pae_bytes, config_hash=version, mlflow_run_id=run_id,
                           lineage={"features": store.uri(inputs.features_rel),
                                    "training_run": tsum.get("checkpoint"), "config_hash": version})
        summary["knowledge"] = {"uri": store.uri(krel), "words": len(table.words),
                                "ood_rows": sum(1 for s in table.source if s == "ood")}
        run.set_tags({"knowledge.uri": store.uri(krel)})
        # 4b. modality-gap measures of the trained MTM (gap.* metrics; diagnostics, never fatal)
        summary["gap"] = log_gap_measures(store, cfg, table, knowledge_checkpoint(store, krel), run)
        summary["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        # 5. evaluation on the gallery, if any
        if cfg.gallery is not None:
            summary["evaluation"] = evaluate_gallery(ctx, table, pae_bytes, inputs.det_weights, run)
        # 6. register last: a model version (and the move of alias `latest`) only for a run that succeeded
        if run_id is not None:
            summary["mlflow"]["model_version"] = tracking.register_knowledge(
                cfg.tracking, store.root, store.uri(krel), run_id,
                {"features": summary["features"]["features_uri"], "config_hash": version})
    return summary
