"""The main job: dataset → region features → training → knowledge → (gallery) evaluation.

Each step checks storage first and runs only what is missing for this config, so a rerun reuses
committed work.  Everything is tracked in one MLflow run; the knowledge is registered as a model
version of ``mask-knowledge`` with its lineage.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mask import tracking
from mask.config import MaskConfig
from mask.pipeline.runtime import JobContext, cluster_gpus, init_ray
from mask.storage import Store

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- datasets


def demo_root(ctx: JobContext) -> str:
    """Where the demo world lives: generated once under the storage root (``raw/demo-world``)."""
    from mask.datasets import generate_demo_world

    root = ctx.store.uri("raw", "demo-world")
    if ctx.store.root.startswith("s3://"):
        if not ctx.store.exists("raw", "demo-world", "_DONE"):
            with tempfile.TemporaryDirectory() as d:
                generate_demo_world(d, seed=ctx.cfg.seed)
                ctx.store.fs.put(d.rstrip("/") + "/", ctx.store.path("raw", "demo-world"), recursive=True)
            ctx.store.write_bytes("raw/demo-world/_DONE", b"ok")
        return root
    local = ctx.store.path("raw", "demo-world")
    if not os.path.exists(os.path.join(local, "_DONE")):
        generate_demo_world(local, seed=ctx.cfg.seed)
        with open(os.path.join(local, "_DONE"), "w") as f:
            f.write("ok")
    return local


def ensure_dataset(ctx: JobContext, dcfg, run_id: str | None) -> dict[str, pa.Table]:
    """Ingest a dataset (reusing a committed one) and return its tables."""
    from mask.datasets import dataset_rel, ingest_dataset

    droot = demo_root(ctx) if dcfg.kind == "demo" and dcfg.path is None else None
    summary = ingest_dataset(ctx.store, dcfg, ctx.cfg.storage.options, droot, mlflow_run_id=run_id)
    out = {"summary": summary}
    for t in ("images", "regions", "captions", "_errors"):
        if ctx.store.manifest(dataset_rel(dcfg.name, t)) is not None:
            out[t] = ctx.store.read_table(dataset_rel(dcfg.name, t))
    return out


# ---------------------------------------------------------------- detector


def ensure_detector(ctx: JobContext, calib_uris: list[str]) -> str | None:
    """The artifact holding the detector weights for the actors (None: each actor loads ``detector.weights``).

    With no published weights, the network is initialised from ``detector.seed`` and, if
    ``detector.calibrate_random``, its normalisation statistics are calibrated once on a fixed sample
    of the training images; the result is committed under ``detectors/<hash>/`` so every actor and
    every later run (gallery, re-index) uses the very same network.
    """
    from mask.pipeline.extract import DETECTOR_FILE, extractor_name

    det = ctx.cfg.detector
    if det.weights:
        return None
    base = det.model_copy(update={"mode": "fixed"})
    rel = f"detectors/{extractor_name(base)}"
    if ctx.store.committed(rel, extractor_name(base)) is not None:
        return rel
    logger.warning("detector: no published weights configured; using seeded random initialisation%s",
                   " with BN statistics calibrated on the training images" if det.calibrate_random else "")
    weights = calibrated_random_weights(det, calib_uris if det.calibrate_random else [],
                                        storage_options=ctx.cfg.storage.options)
    with ctx.store.open_artifact(rel, kind="detector", config_hash=extractor_name(base),
                                 inputs={"calibration_images": len(calib_uris)}) as w:
        w.write_file(DETECTOR_FILE, weights)
        w.write_part(pa.table({"calibration_uri": pa.array(calib_uris, pa.string())}), name="calibration")
    return rel


def calibrated_random_weights(det, uris: list[str], storage_options: dict) -> bytes:
    """Seeded random detector with BN statistics calibrated on the given images (synthetic scenes if none)."""
    from mask.features.extractor import RegionExtractor
    from mask.features.images import ImageError, decode_image
    from mask.pipeline.extract import read_uri

    images = []
    for u in uris:
        try:
            images.append(decode_image(read_uri(u, storage_options), max_pixels=det.max_pixels, source=u))
        except ImageError as e:
            logger.warning("calibration: skipping %s (%s)", u, e)
    ex = RegionExtractor.from_config(det.model_copy(update={"mode": "fixed"}), calibration_images=images or None)
    return ex.state_dict_bytes()


# ---------------------------------------------------------------- vocabulary and training data


def vocabulary(cfg: MaskConfig, regions: pa.Table, kv) -> dict[str, Any]:
    """VG words → the knowledge vocabulary with vectors; words without a vector are counted and reported."""
    from mask.datasets import build_vocabulary, count_words
    from mask.vectors import vectors_for

    counts = count_words(regions)
    v = cfg.vocabulary
    words = build_vocabulary(counts, v.min_count, v.min_length, v.max_length, v.alphabetic)
    vecs, found = vectors_for(kv, words)
    missing = [w for w, f in zip(words, found, strict=True) if not f]
    if missing:
        logger.warning("vocabulary: %d of %d words have no word vector and are left out, e.g. %s",
                       len(missing), len(words), missing[:10])
    keep = np.flatnonzero(found)
    kept = [words[i] for i in keep]
    return {"words": kept, "vectors": np.asarray(vecs)[keep].astype(np.float32),
            "counts": np.asarray([counts[w] for w in kept], np.int64),
            "report": {"vg_words": len(counts), "vocabulary": len(words), "no_vector": len(missing),
                       "no_vector_examples": missing[:20], "kept": len(kept)}}


def region_word_map(regions: pa.Table, word_index: dict[str, int]) -> dict[str, list[str]]:
    """region_id → its vocabulary words."""
    out: dict[str, list[str]] = {}
    for rid, ws in zip(regions.column("region_id").to_pylist(), regions.column("words").to_pylist(), strict=True):
        kept = [w for w in (ws or []) if w in word_index]
        if kept:
            out[rid] = kept
    return out


def training_table(features: pa.Table, region_words: dict[str, list[str]], word_index: dict[str, int]) -> pa.Table:
    """Features rows + region-word pairs (``pair_slot``, ``pair_word``); images with no pair are dropped."""
    slots_col, words_col, keep = [], [], []
    for i, rids in enumerate(features.column("region_ids").to_pylist()):
        slots, wids = [], []
        for s, rid in enumerate(rids or []):
            for w in region_words.get(rid, ()):
                slots.append(s)
                wids.append(word_index[w])
        if slots:
            keep.append(i)
            slots_col.append(slots)
            words_col.append(wids)
    t = features.select(["image_id", "features", "num_boxes", "feature_dim"]).take(pa.array(keep, pa.int64()))
    return t.append_column("pair_slot", pa.array(slots_col, pa.list_(pa.int32()))) \
            .append_column("pair_word", pa.array(words_col, pa.list_(pa.int32())))


def run_training(ctx: JobContext, table: pa.Table, word_vectors: np.ndarray, run_id: str | None,
                 tracking_uri: str | None, run_name: str) -> tuple[bytes, dict[str, Any]]:
    """Ray Train on the training table; returns (PAE safetensors bytes, summary)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from mask.models import save_pae
    from mask.pipeline.train import FAULT_ENV, TrainModule, load_checkpoint_dir, train_loop_per_worker

    cfg = ctx.cfg
    pairs = sum(len(x) for x in table.column("pair_word").to_pylist())
    ds = ray.data.from_arrow(table)
    storage_path = ctx.store.uri("train")
    if not storage_path.startswith("s3://"):
        storage_path = os.path.abspath(ctx.store.path("train"))
        os.makedirs(storage_path, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "word_vectors": word_vectors,
                           "pairs_per_image": pairs / max(table.num_rows, 1),
                           "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "fault": os.environ.get(FAULT_ENV, "")},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    secs = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    module = TrainModule(cfg, word_vectors.shape[0])
    with result.checkpoint.as_directory() as d:
        meta = load_checkpoint_dir(d, module)
    summary = {"train_seconds": round(secs, 2), "images": table.num_rows, "pairs": pairs,
               "final_epoch": meta["epoch"], "steps": meta["step"], "checkpoint": result.checkpoint.path,
               **{k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}}
    return save_pae(module.net.pae), summary


# ---------------------------------------------------------------- the job


def build_knowledge(cfg: MaskConfig) -> dict[str, Any]:
    """Run what is missing of dataset → features → training → knowledge → evaluation.

    Returns:
        A summary: knowledge URI, MLflow run id and model version, counts, and the evaluation table.
    """
    import ray.data

    from mask.knowledge import KnowledgeTable
    from mask.knowledge_artifact import load_knowledge, save_knowledge
    from mask.pipeline.extract import features_rel, run_extraction
    from mask.pipeline.represent import knowledge_pass
    from mask.vectors import load_vectors

    ctx = JobContext.from_config(cfg)
    init_ray(cfg)
    store: Store = ctx.store
    summary: dict[str, Any] = {}
    uri = tracking.tracking_uri(cfg.tracking, store.root)
    with tracking.start_run(cfg.tracking, store.root, "build_knowledge", params=cfg.flat(),
                            tags={"job": "build_knowledge"}) as run:
        run_id = run.run_id
        # 1. datasets
        train = ensure_dataset(ctx, cfg.dataset, run_id)
        summary["dataset"] = train["summary"]
        # 2. detector + features on ground-truth boxes (the knowledge is built on those)
        images = train["images"]
        calib = images.column("uri").to_pylist()[:16]
        det_weights = ensure_detector(ctx, calib)
        given = cfg.detector.model_copy(update={"mode": "given"})
        summary["features"] = run_extraction(cfg, store, cfg.dataset.name, images, train.get("regions"),
                                             det_weights, det=given, tracker=run)
        # 3. vocabulary and word vectors
        kv = load_vectors(cfg.vectors.source, cfg.vectors.format, cfg.vectors.cache_dir)
        vocab = vocabulary(cfg, train["regions"], kv)
        summary["vocabulary"] = vocab["report"]
        run.log_metrics({f"vocabulary.{k}": v for k, v in vocab["report"].items() if isinstance(v, int)})
        word_index = {w: i for i, w in enumerate(vocab["words"])}
        # 4. knowledge (training first, unless this exact knowledge is committed)
        version = cfg.knowledge.version or f"k-{cfg.hash('dataset', 'vocabulary', 'detector', 'model', 'loss', 'train', 'vectors', 'knowledge')}"
        krel = f"knowledge/{version}"
        if store.committed(krel, version) is not None:
            logger.info("knowledge %s is committed; reused", krel)
            table, pae_bytes = load_knowledge(store, krel)
            summary["training"] = {"reused": True}
        else:
            frel = features_rel(cfg.dataset.name, given)
            features = store.read_table(frel)
            rw = region_word_map(train["regions"], word_index)
            ttable = training_table(features, rw, word_index)
            pae_bytes, tsum = run_training(ctx, ttable, vocab["vectors"], run_id, uri, f"train-{version}")
            summary["training"] = tsum
            run.log_metrics({f"train.{k}": float(v) for k, v in tsum.items() if isinstance(v, int | float)})
            gpus = cluster_gpus()
            acc = knowledge_pass(ray.data.from_arrow(features), pae_bytes, word_index, rw, cfg.model.latent_dim,
                                 cfg.seed, num_gpus=1 if gpus else 0)
            protos, counts, missing = acc.prototypes()
            samples = acc.samples()
            seen = ~missing
            table = KnowledgeTable(words=[w for w, s in zip(vocab["words"], seen, strict=True) if s],
                                   counts=counts[seen], word_vectors=vocab["vectors"][seen],
                                   prototypes=protos[seen], source=["vg"] * int(seen.sum()),
                                   samples=samples[seen])
            if cfg.knowledge.ood_vocab_size:
                table = _with_ood_vocabulary(table, kv, cfg)
            save_knowledge(store, krel, table, pae_bytes, config_hash=version, mlflow_run_id=run_id,
                           lineage={"features": store.uri(frel), "training_run": tsum.get("checkpoint"),
                                    "config_hash": version})
        summary["knowledge"] = {"uri": store.uri(krel), "words": len(table.words),
                                "ood_rows": sum(1 for s in table.source if s == "ood")}
        summary["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        if run_id is not None:
            summary["mlflow"]["model_version"] = tracking.register_knowledge(
                cfg.tracking, store.root, store.uri(krel), run_id,
                {"features": summary["features"]["features_uri"], "config_hash": version})
        # 5. evaluation on the gallery, if any
        if cfg.gallery is not None:
            summary["evaluation"] = evaluate_gallery(ctx, table, pae_bytes, det_weights, run)
    return summary


def _with_ood_vocabulary(table, kv, cfg: MaskConfig):
    """Precomputed OOD prototypes for the most frequent words of the vectors (``source = ood``)."""
    from mask.knowledge import extend_with_ood
    from mask.vectors import vectors_for

    known = set(table.words)
    words = [w for w in kv.index_to_key[: cfg.knowledge.ood_vocab_size] if w not in known]
    vecs, found = vectors_for(kv, words)
    words = [w for w, f in zip(words, found, strict=True) if f]
    return extend_with_ood(table, words, np.asarray(vecs)[found], cfg.knowledge.ood_method, cfg.knowledge.m)


def evaluate_gallery(ctx: JobContext, table, pae_bytes: bytes, det_weights: str | None, run) -> dict[str, Any]:
    """Gallery features (detected boxes) → μ → MASK and ablations → R@K table (logged to MLflow);
    see :func:`mask.pipeline.gallery.evaluate_gallery`."""
    from mask.pipeline import gallery

    return gallery.evaluate_gallery(ctx, table, pae_bytes, det_weights, run)


def extract_dataset(cfg: MaskConfig, target: str = "dataset") -> dict[str, Any]:
    """The extraction job: features for the training dataset (its ground-truth boxes when it has
    regions) or for the gallery (``detector.mode`` boxes), tracked in its own MLflow run."""
    from mask.pipeline.extract import run_extraction

    if target not in ("dataset", "gallery"):
        raise ValueError(f"--target must be 'dataset' or 'gallery', got {target!r}")
    dcfg = cfg.dataset if target == "dataset" else cfg.gallery
    if dcfg is None:
        raise ValueError("the config names no gallery")
    ctx = JobContext.from_config(cfg)
    init_ray(cfg)
    with tracking.start_run(cfg.tracking, ctx.store.root, f"extract_regions:{dcfg.name}", params=cfg.flat(),
                            tags={"job": "extract_regions"}) as run:
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
