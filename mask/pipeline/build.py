"""Job orchestration: dataset → region features → training → knowledge → (gallery) evaluation.

Each step checks storage first and runs only what is missing for this config, so a rerun reuses
committed work.  :func:`build_knowledge` (the main job) tracks everything in one MLflow run and
registers the knowledge as a model version of ``mask-knowledge`` with its lineage;
:func:`train_job` runs the same steps up to training in its own run; :func:`extract_dataset` only
the features.  Training runs resume: see :func:`run_training` and :func:`train_run_name`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
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
    if det.weights or det.backend == "efficientnet_lite0":  # each actor loads the package's (or given) weights
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
    """VG words → the knowledge vocabulary with vectors.

    A vocabulary word with no word vector is counted (``report["no_vector"]``), listed
    (``no_vector_words``; the report keeps 20 examples) and logged, then left out of training and
    of the knowledge — it cannot enter L_cm or the OOD search without a vector.

    Raises:
        ValueError: the vectors' size differs from ``model.word_dim``.
    """
    from mask.datasets import build_vocabulary, count_words
    from mask.vectors import vectors_for

    if int(kv.vector_size) != cfg.model.word_dim:
        raise ValueError(f"vectors.source {cfg.vectors.source}: vectors have {kv.vector_size} dimensions, "
                         f"model.word_dim is {cfg.model.word_dim}")
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
            "counts": np.asarray([counts[w] for w in kept], np.int64), "no_vector_words": missing,
            "report": {"vg_words": len(counts), "vocabulary": len(words), "no_vector": len(missing),
                       "no_vector_regions": int(sum(counts[w] for w in missing)),
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
    """Features rows + region-word pairs (``pair_slot``, ``pair_word``); images with no pair are dropped.

    The in-memory reference of :func:`training_dataset` (tests, benchmarks)."""
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
            .append_column("pair_word", pa.array(words_col, pa.list_(pa.int32()))) \
            .append_column("num_pairs", pa.array([len(x) for x in slots_col], pa.int64()))


def features_dataset(store: Store, rel: str, columns: list[str] | None = None):
    """The committed parts of a features artifact as a Ray Dataset (read by Ray Data, not the driver)."""
    import ray.data

    paths = [u[len("s3://"):] if u.startswith("s3://") else u for u in store.part_uris(rel)]
    if not paths:
        raise ValueError(f"features artifact {store.uri(rel)} has no rows")
    ds = ray.data.read_parquet(paths, filesystem=store.pyarrow_filesystem(), partitioning=None)
    return ds.select_columns(columns) if columns else ds


def training_dataset(store: Store, features_rel_: str, region_words: dict[str, list[str]],
                     word_index: dict[str, int]):
    """Training rows through Ray Data: the features artifact joined with the VG region words.

    :class:`mask.pipeline.train.PairJoin` runs in one actor that holds the region → word-ids map;
    the result is materialised in Ray's object store (spilling to disk when large), so every epoch
    iterates it without re-reading storage and the trainer's workers can take every CPU.

    Returns:
        ``(dataset, {"images", "pairs"})``.
    """
    import ray.data

    from mask.pipeline.train import PairJoin

    ids = {rid: [word_index[w] for w in ws] for rid, ws in region_words.items()}
    ds = features_dataset(store, features_rel_, ["image_id", "features", "num_boxes", "feature_dim", "region_ids"])
    ds = ds.map_batches(PairJoin, fn_constructor_args=(ids,), batch_size=256,
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy").materialize()
    images = ds.count()
    # a projection per block (no aggregation shuffle): only the small column reaches the driver
    pairs = sum(int(np.sum(b["num_pairs"])) for b in
                ds.select_columns(["num_pairs"]).iter_batches(batch_size=None, batch_format="numpy"))
    return ds, {"images": images, "pairs": pairs}


# ---------------------------------------------------------------- training

#: TrainConfig fields that change how a run executes or how long it goes, not the trajectory it
#: follows: left out of the default run name, so a rerun with more epochs continues the same run.
TRAIN_RUN_MECHANICS = frozenset({"epochs", "checkpoint_every", "max_failures", "log_every", "num_workers",
                                 "use_gpu", "cpus_per_worker", "run_name"})


def train_run_name(cfg: MaskConfig, features_rel_: str) -> str:
    """The Ray Train run name: ``train.run_name``, else ``train-<hash>`` of the features artifact, the
    dataset, vocabulary, vectors, model, loss and the train fields outside :data:`TRAIN_RUN_MECHANICS`.

    Epochs are left out on purpose: the run with ``train.epochs=4`` continues the one that stopped
    at 2 (its latest checkpoint), instead of starting again.
    """
    from mask.storage import fingerprint

    data = cfg.model_dump(mode="json")
    ident = {s: data[s] for s in ("dataset", "vocabulary", "vectors", "model", "loss")}
    ident["features"] = features_rel_
    ident["train"] = {k: v for k, v in data["train"].items() if k not in TRAIN_RUN_MECHANICS}
    return cfg.train.run_name or f"train-{fingerprint(ident)[:16]}"


def _cpus_per_worker(cfg: MaskConfig) -> int:
    import ray

    t = cfg.train
    if t.cpus_per_worker is not None:
        return t.cpus_per_worker
    if t.use_gpu:
        return 1
    total = int(ray.cluster_resources().get("CPU", 1))
    per_node = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])
    return max(1, min(per_node, total // t.num_workers))


def _checkpoint_uri(store: Store, path: str) -> str:
    return path if store.protocol == "file" else f"s3://{path}"


def _worker_error(err: BaseException) -> BaseException | None:
    """The checkpoint/run error raised inside a training worker, if that is what failed the run."""
    from mask.pipeline.train import CheckpointError, TrainingRunError

    for e in getattr(err, "worker_failures", {}).values():
        seen = set()
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if isinstance(e, CheckpointError | TrainingRunError):
                return e
            e = getattr(e, "cause", None) or e.__cause__
    return None


def _train_storage(ctx: JobContext) -> tuple[Any, str]:
    """(pyarrow filesystem, fs-native folder) where Ray Train keeps its runs: ``<storage root>/train``."""
    storage_path = ctx.store.path("train")
    if ctx.store.protocol == "file":
        os.makedirs(storage_path, exist_ok=True)
    return ctx.store.pyarrow_filesystem(), storage_path


def resume_point(ctx: JobContext, run_name: str, module) -> dict[str, Any] | None:
    """The latest checkpoint of a training run, checked against the model, or None for a new run.

    Args:
        ctx: job context (storage root, config).
        run_name: the Ray Train run name.
        module: a :class:`mask.pipeline.train.TrainModule` of this config; the checkpoint's weights
            are loaded into it.

    Returns:
        The checkpoint's state (``epoch`` 0-based, ``step``, ``resumes``) plus ``uri`` and ``fs_path``.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not match the model (names the file).
        TrainingRunError: it is past ``train.epochs`` (a shorter rerun cannot un-train).
    """
    import ray.train

    from mask.pipeline.train import TrainingRunError, latest_checkpoint, load_checkpoint_dir

    fs, storage_path = _train_storage(ctx)
    path = latest_checkpoint(fs, f"{storage_path}/{run_name}")
    if path is None:
        return None
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
        meta = load_checkpoint_dir(d, module)
    meta.pop("state", None)
    meta.update(uri=_checkpoint_uri(ctx.store, path), fs_path=path)
    if meta["epoch"] > ctx.cfg.train.epochs - 1:
        raise TrainingRunError(
            f"training run {run_name}: its latest checkpoint {meta['uri']} is after epoch {meta['epoch'] + 1}, "
            f"past train.epochs={ctx.cfg.train.epochs}; raise train.epochs, or set train.run_name to train a "
            "separate run")
    return meta


def run_training(ctx: JobContext, ds, stats: dict[str, int], word_vectors: np.ndarray, run_id: str | None,
                 tracking_uri: str | None, run_name: str) -> tuple[bytes, dict[str, Any]]:
    """Ray Train (``TorchTrainer``) on the training rows; returns (PAE safetensors bytes, summary).

    Resume: Ray Train V2 reloads the run's checkpoint list from ``<storage>/train/<run_name>`` when
    ``fit()`` runs again under the same name and hands its latest checkpoint to the workers (checked
    with ray 2.60: no flag needed); after a worker failure it restarts the worker group from it
    (``train.max_failures``).  The driver checks the run's newest checkpoint first (:func:`resume_point`:
    a corrupt or mismatched one fails here, naming the file).  Workers also look at the run's storage
    folder (:func:`mask.pipeline.train.resume_checkpoint`): a checkpoint persisted just before a worker
    died may not be registered by Ray yet, and a run folder may hold checkpoints without a Ray
    snapshot (V2 deprecates ``resume_from_checkpoint``).

    Args:
        ctx: job context.  ds: training rows (Ray Dataset).  stats: ``images``, ``pairs`` of ``ds``.
        word_vectors: (V, N) vectors of the vocabulary.  run_id, tracking_uri: MLflow run for the
            workers' metrics (None = none).  run_name: Ray Train run name.

    Raises:
        CheckpointError, TrainingRunError: see :func:`resume_point`.
        NonFiniteLoss: a loss term became NaN/inf (the message names the step and the term).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from mask.losses import NonFiniteLoss
    from mask.models import save_pae
    from mask.pipeline.train import FAULT_ENV, TrainModule, load_checkpoint_dir, train_loop_per_worker

    cfg = ctx.cfg
    if stats["pairs"] == 0:
        raise ValueError(f"dataset {cfg.dataset.name}: no region carries a vocabulary word; nothing to train on")
    fs, storage_path = _train_storage(ctx)
    module = TrainModule(cfg, word_vectors.shape[0])
    prior = resume_point(ctx, run_name, module)
    if prior is not None:
        logger.info("training run %s: continuing after epoch %d from %s", run_name, prior["epoch"] + 1, prior["uri"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "word_vectors": word_vectors,
                           "pairs_per_image": stats["pairs"] / max(stats["images"], 1),
                           "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                           "fault": os.environ.get(FAULT_ENV, ""),
                           "run_storage": (fs, f"{storage_path}/{run_name}")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(cfg), **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        inner = _worker_error(e)
        if inner is not None:
            raise inner from e
        raise
    secs = time.perf_counter() - t0
    metrics = dict(result.return_value or result.metrics or {})
    if "nonfinite" in metrics:
        # "step <n>: <term> is <value>", as mask.losses.check_finite words it
        _, rest = str(metrics["nonfinite"]).split(": ", 1)
        term, value = rest.split(" is ", 1)
        raise NonFiniteLoss(term, value, int(metrics["step"]))
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = load_checkpoint_dir(d, module)
    summary = _training_summary(run_name, _checkpoint_uri(ctx.store, result.checkpoint.path), meta, stats,
                                word_vectors.shape[0], prior)
    summary["train_seconds"] = round(secs, 2)
    summary.update({k: v for k, v in metrics.items()
                    if isinstance(v, int | float) and (k.startswith("epoch.") or k in ("pairs_per_s", "epoch_seconds"))})
    return save_pae(module.net.pae), summary


def _training_summary(run_name: str, uri: str, meta: dict[str, Any], stats: dict[str, int] | None,
                      num_words: int, prior: dict[str, Any] | None) -> dict[str, Any]:
    return {"run_name": run_name, "checkpoint": uri, "final_epoch": meta["epoch"], "steps": meta["step"],
            "resumes": int(meta.get("resumes", 0)), "vocabulary": int(num_words),
            "continued_from_epoch": prior["epoch"] + 1 if prior is not None else 0, "reused": False,
            **(stats or {})}


# ---------------------------------------------------------------- shared job steps


@dataclass
class TrainingInputs:
    """What training and the knowledge pass need: features on the VG boxes and the vocabulary."""

    dataset: dict[str, Any]
    det_weights: str | None
    features_rel: str
    kv: Any
    vocab: dict[str, Any]
    word_index: dict[str, int]
    region_words: dict[str, list[str]]
    summary: dict[str, Any]


def prepare_training_inputs(ctx: JobContext, run) -> TrainingInputs:
    """Dataset → detector → features on the ground-truth boxes → vocabulary (each reused when committed)."""
    from mask.pipeline.extract import features_rel, run_extraction
    from mask.vectors import load_vectors

    cfg, store = ctx.cfg, ctx.store
    summary: dict[str, Any] = {}
    # 1. datasets
    train = ensure_dataset(ctx, cfg.dataset, run.run_id)
    summary["dataset"] = train["summary"]
    if train.get("regions") is None or not train["regions"].num_rows:
        raise ValueError(f"dataset {cfg.dataset.name} has no region annotations; training needs VG-style regions")
    # 2. detector + features on ground-truth boxes (the knowledge is built on those)
    images = train["images"]
    det_weights = ensure_detector(ctx, images.column("uri").to_pylist()[:16])
    given = cfg.detector.model_copy(update={"mode": "given"})
    summary["features"] = run_extraction(cfg, store, cfg.dataset.name, images, train.get("regions"),
                                         det_weights, det=given, tracker=run)
    # 3. vocabulary and word vectors (words without a vector are counted and reported)
    kv = load_vectors(cfg.vectors.source, cfg.vectors.format, cfg.vectors.cache_dir)
    vocab = vocabulary(cfg, train["regions"], kv)
    summary["vocabulary"] = vocab["report"]
    run.log_metrics({f"vocabulary.{k}": v for k, v in vocab["report"].items() if isinstance(v, int)})
    if vocab["no_vector_words"]:
        run.log_dict({"no_vector": vocab["no_vector_words"]}, "vocabulary/no_vector.json")
    word_index = {w: i for i, w in enumerate(vocab["words"])}
    return TrainingInputs(dataset=train, det_weights=det_weights, features_rel=features_rel(cfg.dataset.name, given),
                          kv=kv, vocab=vocab, word_index=word_index,
                          region_words=region_word_map(train["regions"], word_index), summary=summary)


def train_model(ctx: JobContext, inputs: TrainingInputs, run, tracking_uri: str | None) -> tuple[bytes, dict[str, Any]]:
    """Ray Data join → Ray Train, or the finished run's checkpoint when it already reached
    ``train.epochs``; logs the summary to the job's MLflow run and records the final checkpoint there
    (tag ``train.checkpoint`` and the artifact ``train/checkpoint.json``)."""
    if not inputs.word_index:
        raise ValueError(f"dataset {ctx.cfg.dataset.name}: the vocabulary is empty "
                         f"({inputs.vocab['report']}); nothing to train")
    from mask.models import save_pae
    from mask.pipeline.train import TrainModule

    name = train_run_name(ctx.cfg, inputs.features_rel)
    run.set_tags({"train.run_name": name})
    try:
        module = TrainModule(ctx.cfg, len(inputs.word_index))
        prior = resume_point(ctx, name, module)
        if prior is not None and prior["epoch"] == ctx.cfg.train.epochs - 1:
            logger.info("training run %s already finished epoch %d; reusing %s", name, prior["epoch"] + 1, prior["uri"])
            pae_bytes = save_pae(module.net.pae)
            tsum = {**_training_summary(name, prior["uri"], prior, None, len(inputs.word_index), None),
                    "reused": True, **prior.get("metrics", {})}
        else:
            ds, stats = training_dataset(ctx.store, inputs.features_rel, inputs.region_words, inputs.word_index)
            pae_bytes, tsum = run_training(ctx, ds, stats, inputs.vocab["vectors"], run.run_id, tracking_uri, name)
    except Exception as e:
        run.set_tags({"train.error": f"{type(e).__name__}: {e}"})
        raise
    run.log_metrics({f"train.{k}": float(v) for k, v in tsum.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)})
    run.set_tags({"train.checkpoint": tsum["checkpoint"]})
    run.log_dict({k: tsum[k] for k in ("run_name", "checkpoint", "final_epoch", "steps", "resumes")},
                 "train/checkpoint.json")
    return pae_bytes, tsum


def knowledge_version(cfg: MaskConfig) -> str:
    """The knowledge artifact's version: ``knowledge.version`` or ``k-<hash>`` of everything that shapes it."""
    return cfg.knowledge.version or \
        f"k-{cfg.hash('dataset', 'vocabulary', 'detector', 'model', 'loss', 'train', 'vectors', 'knowledge')}"


# ---------------------------------------------------------------- the jobs


def train_job(cfg: MaskConfig) -> dict[str, Any]:
    """The training job: dataset → features → vocabulary → Ray Train, in its own MLflow run.

    Returns:
        A summary: ``dataset``, ``features``, ``vocabulary`` (incl. words without a vector),
        ``training`` (run name, checkpoint URI, epochs, steps, resumes, final losses, pairs/s) and
        ``mlflow`` (tracking URI, run id).
    """
    ctx = JobContext.from_config(cfg)
    init_ray(cfg)
    uri = tracking.tracking_uri(cfg.tracking, ctx.store.root)
    with tracking.start_run(cfg.tracking, ctx.store.root, "train", params=cfg.flat(), tags={"job": "train"}) as run:
        inputs = prepare_training_inputs(ctx, run)
        _, tsum = train_model(ctx, inputs, run, uri)
        return {**inputs.summary, "training": tsum,
                "mlflow": {"tracking_uri": uri if run.run_id else None, "run_id": run.run_id}}


def build_knowledge(cfg: MaskConfig) -> dict[str, Any]:
    """Run what is missing of dataset → features → training → knowledge → evaluation.

    Returns:
        A summary: knowledge URI, MLflow run id and model version, counts, and the evaluation table.
    """
    from mask.knowledge import KnowledgeTable
    from mask.knowledge_artifact import load_knowledge, save_knowledge
    from mask.pipeline.represent import knowledge_pass

    ctx = JobContext.from_config(cfg)
    init_ray(cfg)
    store: Store = ctx.store
    uri = tracking.tracking_uri(cfg.tracking, store.root)
    with tracking.start_run(cfg.tracking, store.root, "build_knowledge", params=cfg.flat(),
                            tags={"job": "build_knowledge"}) as run:
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
            gpus = cluster_gpus()
            feats = features_dataset(store, inputs.features_rel,
                                     ["image_id", "features", "num_boxes", "feature_dim", "region_ids"])
            acc = knowledge_pass(feats, pae_bytes, inputs.word_index, inputs.region_words, cfg.model.latent_dim,
                                 cfg.seed, num_gpus=1 if gpus else 0)
            protos, counts, missing = acc.prototypes()
            samples = acc.samples()
            seen = ~missing
            table = KnowledgeTable(words=[w for w, s in zip(vocab["words"], seen, strict=True) if s],
                                   counts=counts[seen], word_vectors=vocab["vectors"][seen],
                                   prototypes=protos[seen], source=["vg"] * int(seen.sum()),
                                   samples=samples[seen])
            if cfg.knowledge.ood_vocab_size:
                table = _with_ood_vocabulary(table, inputs.kv, cfg)
            save_knowledge(store, krel, table, pae_bytes, config_hash=version, mlflow_run_id=run_id,
                           lineage={"features": store.uri(inputs.features_rel),
                                    "training_run": tsum.get("checkpoint"), "config_hash": version})
        summary["knowledge"] = {"uri": store.uri(krel), "words": len(table.words),
                                "ood_rows": sum(1 for s in table.source if s == "ood")}
        run.set_tags({"knowledge.uri": store.uri(krel)})
        # 4b. modality-gap measures of the trained MTM (gap.* metrics; diagnostics, never fatal)
        from mask.pipeline.gap import knowledge_checkpoint, log_gap_measures

        summary["gap"] = log_gap_measures(store, cfg, table, knowledge_checkpoint(store, krel), run)
        summary["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        if run_id is not None:
            summary["mlflow"]["model_version"] = tracking.register_knowledge(
                cfg.tracking, store.root, store.uri(krel), run_id,
                {"features": summary["features"]["features_uri"], "config_hash": version})
        # 5. evaluation on the gallery, if any
        if cfg.gallery is not None:
            summary["evaluation"] = evaluate_gallery(ctx, table, pae_bytes, inputs.det_weights, run)
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
