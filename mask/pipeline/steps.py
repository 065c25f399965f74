"""Steps shared by the jobs: each checks storage first and runs only what is missing for this config.

* :func:`ensure_dataset` — ingest a dataset (the demo world generated once under the root);
* :func:`ensure_detector` / :func:`gallery_detector` — the committed detector weights every actor uses;
* :func:`features_dataset` — the one reader of a committed features artifact into Ray Data;
* :func:`prepare_training_inputs` — dataset → detector → features on the VG boxes → vocabulary;
* :func:`resolve_and_load_knowledge` — a knowledge reference (path, URI, ``@alias``, ``models:/``) → its table;
* :func:`with_ood_vocabulary` — the precomputed OOD rows of the knowledge (``knowledge.ood_vocab_size``);
* :func:`require_gallery` — the one "the config names no gallery" error.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mask import tracking
from mask.config import DatasetConfig, MaskConfig
from mask.datasets import build_vocabulary, count_words, dataset_rel, generate_demo_world, ingest_dataset
from mask.datasets.overlap import gallery_source_ids
from mask.errors import MaskError
from mask.features.extractor import RegionExtractor
from mask.features.images import ImageError, decode_image
from mask.knowledge import KnowledgeError, KnowledgeTable, extend_with_ood
from mask.knowledge_artifact import load_knowledge
from mask.pipeline.extract import DETECTOR_FILE, read_uri, run_extraction
from mask.pipeline.identity import extractor_name, features_rel, knowledge_version
from mask.pipeline.regionwords import RegionWords, iter_parts
from mask.pipeline.represent import knowledge_pass
from mask.pipeline.resources import ensure_gpus
from mask.pipeline.runtime import JobContext
from mask.storage import Store
from mask.vectors import load_vectors, vectors_for

logger = logging.getLogger(__name__)


class GalleryError(MaskError, ValueError):
    """A gallery, index or knowledge that cannot be used; the message names it."""


def require_gallery(cfg: MaskConfig, error: type[ValueError] = GalleryError) -> DatasetConfig:
    """The config's gallery.

    Args:
        cfg: the job config.
        error: the job's error class (the base-scores job raises its own).

    Raises:
        GalleryError (or ``error``): the config names no gallery.
    """
    if cfg.gallery is None:
        raise error("the config names no gallery (set gallery.name / gallery.kind / gallery.path)")
    return cfg.gallery


def demo_root(ctx: JobContext, synonyms: str = "supported") -> str:
    """Where the demo world lives: generated once under the storage root, one folder per world (``raw/demo-world``
    for the default seed 0 and supported synonyms; ``raw/demo-world-seed<N>`` for another ``seed``,
    ``…-synonyms-all`` for ``dataset.demo_synonyms: all``), so a rerun with other world parameters on the same
    root never reads a world generated with different ones."""
    name = "demo-world" + (f"-seed{ctx.cfg.seed}" if ctx.cfg.seed != 0 else "") + \
        (f"-synonyms-{synonyms}" if synonyms != "supported" else "")
    root = ctx.store.uri("raw", name)
    if ctx.store.root.startswith("s3://"):
        if not ctx.store.exists("raw", name, "_DONE"):
            with tempfile.TemporaryDirectory() as d:
                generate_demo_world(d, seed=ctx.cfg.seed, synonyms=synonyms)
                ctx.store.fs.put(d.rstrip("/") + "/", ctx.store.path("raw", name), recursive=True)
            ctx.store.write_bytes(f"raw/{name}/_DONE", b"ok")
        return root
    local = ctx.store.path("raw", name)
    if not os.path.exists(os.path.join(local, "_DONE")):
        generate_demo_world(local, seed=ctx.cfg.seed, synonyms=synonyms)
        with open(os.path.join(local, "_DONE"), "w") as f:
            f.write("ok")
    return local


def ensure_dataset(ctx: JobContext, dcfg, run_id: str | None, skip: tuple[str, ...] = ()) -> dict[str, pa.Table]:
    """Ingest a dataset (reusing a committed one) and return its tables (except those in ``skip``:
    the training reads ``regions`` part by part where it needs them, never whole in the driver)."""
    droot = demo_root(ctx, dcfg.demo_synonyms) if dcfg.kind == "demo" and dcfg.path is None else None
    exclude = None
    gal = ctx.cfg.gallery
    if dcfg.exclude_gallery_overlap and dcfg.kind in ("vg", "demo") and gal is not None and dcfg is ctx.cfg.dataset:
        # leakage guard: VG images that are images of the evaluation gallery never enter the knowledge
        groot = demo_root(ctx, gal.demo_synonyms) if gal.kind == "demo" and gal.path is None else None
        exclude = gallery_source_ids(gal, ctx.cfg.storage.options, groot)
    summary = ingest_dataset(ctx.store, dcfg, ctx.cfg.storage.options, droot, mlflow_run_id=run_id, exclude=exclude)
    if exclude is not None:
        summary["overlap"] = {"excluded_overlap": int((summary.get("stats") or {}).get("excluded_overlap", 0)),
                              "gallery_coco_ids": len(exclude[0]), "gallery_flickr_ids": len(exclude[1])}
    out = {"summary": summary}
    for t in ("images", "regions", "captions", "_errors"):
        if t in skip:
            continue
        if ctx.store.manifest(dataset_rel(dcfg.name, t)) is not None:
            out[t] = ctx.store.read_table(dataset_rel(dcfg.name, t))
    return out


def ensure_detector(ctx: JobContext, calib_uris: list[str]) -> str | None:
    """The artifact holding the detector weights for the actors (None: each actor loads ``detector.weights``).

    With no published weights, the network is initialised from ``detector.seed`` and, if
    ``detector.calibrate_random``, its normalisation statistics are calibrated once on a fixed sample
    of the training images; the result is committed under ``detectors/<hash>/`` so every actor and
    every later run (gallery, re-index) uses the very same network.
    """
    det = ctx.cfg.detector
    if det.weights or det.backend == "efficientnet_lite0":  # actors load the package's (or given) weights
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
    images = []
    for u in uris:
        try:
            images.append(decode_image(read_uri(u, storage_options), max_pixels=det.max_pixels, source=u))
        except ImageError as e:
            logger.warning("calibration: skipping %s (%s)", u, e)
    ex = RegionExtractor.from_config(det.model_copy(update={"mode": "fixed"}), calibration_images=images or None)
    return ex.state_dict_bytes()


def gallery_detector(ctx: JobContext, run) -> str | None:
    """The committed detector weights the gallery features use (the same network as the knowledge's)."""
    det = ctx.cfg.detector
    if det.weights or det.backend == "efficientnet_lite0":  # actors load the package's (or given) weights
        return None
    base = det.model_copy(update={"mode": "fixed"})
    rel = f"detectors/{extractor_name(base)}"
    if ctx.store.committed(rel, extractor_name(base)) is not None:
        return rel
    train = ensure_dataset(ctx, ctx.cfg.dataset, run.run_id)  # calibration images, as the main job uses
    return ensure_detector(ctx, train["images"].column("uri").to_pylist()[:16])


#: The feature columns the knowledge pass reads (eq. 2: μ of every VG region, grouped by its words).
KNOWLEDGE_COLUMNS = ["image_id", "features", "num_boxes", "feature_dim", "region_ids"]
#: The feature columns μ per image needs (eq. 1/3).
MU_COLUMNS = ["image_id", "features", "num_boxes", "feature_dim"]


def canonical_part_uris(store: Store, rel: str) -> list[str]:
    """The committed parts of an artifact in a canonical order: by part file name.

    Extraction names a part by a hash of its image ids but commits parts in groups as batches finish
    (every ``detector.commit_every_batches`` batches or ``commit_every_s`` seconds), so the manifest's
    order depends on timing.  Training reads its rows in this order instead, so a seeded run repeats
    itself whatever the machine's load was during extraction.
    """
    return sorted(store.part_uris(rel), key=_canonical_key)


def _canonical_key(uri: str) -> tuple[str, str]:
    return uri.rsplit("/", 1)[-1], uri


def features_dataset(store: Store, rel: str, columns: list[str] | None = None, parts: list[str] | None = None):
    """The committed parts of a features artifact as a Ray Dataset (read by Ray Data's tasks, not the driver),
    in :func:`canonical_part_uris` order; ``parts``: only these (native paths of committed parts,
    :meth:`Store.path`).  The manifest is the reader's index (:mod:`mask.pipeline.parts_source`): every
    read task's rows and bytes are known before it runs, and nothing is listed or sampled.

    Raises:
        ArtifactNotFound: nothing committed at ``rel``.
        ValueError: no parts to read, or a path of ``parts`` is not a committed part of ``rel``.
    """
    import ray.data

    from mask.pipeline.parts_source import CommittedPartsDatasource, Part

    entries, schema = store.committed_parts(rel)
    by_path = {e["native"]: e for e in entries}
    if parts is None:
        chosen = sorted(entries, key=lambda e: _canonical_key(e["uri"]))
    else:
        unknown = [p for p in parts if p not in by_path]
        if unknown:
            raise ValueError(f"features artifact {store.uri(rel)}: not committed parts: {unknown[:3]}")
        chosen = [by_path[p] for p in parts]
    if not chosen:
        raise ValueError(f"features artifact {store.uri(rel)} has no rows")
    source = CommittedPartsDatasource([Part(e["native"], e.get("rows"), e.get("bytes")) for e in chosen],
                                      store.pyarrow_filesystem(), schema=schema, columns=columns)
    return ray.data.read_datasource(source)


def vocabulary(cfg: MaskConfig, regions: pa.Table, kv) -> dict[str, Any]:
    """VG words → the knowledge vocabulary with vectors.

    A vocabulary word with no word vector is counted (``report["no_vector"]``), listed
    (``no_vector_words``; the report keeps 20 examples) and logged, then left out of training and
    of the knowledge — it cannot enter L_cm or the OOD search without a vector.

    Raises:
        ValueError: the vectors' size differs from ``model.word_dim``.
    """
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


@dataclass
class TrainingInputs:
    """What training and the knowledge pass need: features on the VG boxes and the vocabulary."""

    dataset: dict[str, Any]
    det_weights: str | None
    features_rel: str
    kv: Any
    vocab: dict[str, Any]
    word_index: dict[str, int]
    region_words: RegionWords | dict[str, list[str]]
    summary: dict[str, Any]


def prepare_training_inputs(ctx: JobContext, run) -> TrainingInputs:
    """Dataset → detector → features on the ground-truth boxes → vocabulary (each reused when committed)."""
    cfg, store = ctx.cfg, ctx.store
    summary: dict[str, Any] = {}
    # 1. datasets (the regions stay in storage: read part by part where they are needed)
    train = ensure_dataset(ctx, cfg.dataset, run.run_id, skip=("regions",))
    summary["dataset"] = train["summary"]
    if "overlap" in train["summary"]:  # leakage guard: VG images that are gallery images, left out
        run.log_metrics({f"dataset.{k}": v for k, v in train["summary"]["overlap"].items()})
    regions_rel = dataset_rel(cfg.dataset.name, "regions")
    m = store.manifest(regions_rel)
    if m is None or not m.get("row_count"):
        raise ValueError(f"dataset {cfg.dataset.name} has no region annotations; training needs VG-style regions")
    # 2. detector + features on ground-truth boxes (the knowledge is built on those)
    images = train["images"]
    det_weights = ensure_detector(ctx, images.column("uri").to_pylist()[:16])
    given = cfg.detector.model_copy(update={"mode": "given"})

    def regions_of(image_ids: list[str]) -> pa.Table:  # only the regions of the images still to extract
        want = pa.array(sorted(set(image_ids)), pa.string())
        return pa.concat_tables([p.filter(pc.is_in(p["image_id"], value_set=want))
                                 for p in iter_parts(store, regions_rel, ["image_id", "region_id", "box"])])

    summary["features"] = run_extraction(cfg, store, cfg.dataset.name, images, regions_of,
                                         det_weights, det=given, tracker=run)
    # 3. vocabulary and word vectors (words without a vector are counted and reported), counted part by part
    kv = load_vectors(cfg.vectors.source, cfg.vectors.format, cfg.vectors.cache_dir)
    vocab = vocabulary(cfg, iter_parts(store, regions_rel, ["words"]), kv)
    summary["vocabulary"] = vocab["report"]
    run.log_metrics({f"vocabulary.{k}": v for k, v in vocab["report"].items() if isinstance(v, int)})
    if vocab["no_vector_words"]:
        run.log_dict({"no_vector": vocab["no_vector_words"]}, "vocabulary/no_vector.json")
    word_index = {w: i for i, w in enumerate(vocab["words"])}
    return TrainingInputs(dataset=train, det_weights=det_weights, features_rel=features_rel(cfg.dataset.name, given),
                          kv=kv, vocab=vocab, word_index=word_index,
                          region_words=RegionWords(store.root, cfg.storage.options, regions_rel, vocab["words"]),
                          summary=summary)


@dataclass
class ResolvedKnowledge:
    uri: str
    version: str
    config_hash: str | None
    table: Any
    pae_bytes: bytes


def resolve_and_load_knowledge(cfg: MaskConfig, store: Store, ref: str | None) -> ResolvedKnowledge:
    """Load a knowledge version from a path/URI/``@alias``/``models:/`` reference.

    ``ref=None``: the version this config builds (``knowledge/<knowledge_version(cfg)>``) when it is
    committed, else the newest registered version (``@latest``).

    Raises:
        KnowledgeError / KnowledgeNotFound: the reference names no committed knowledge (named).
    """
    if ref is None:
        own = f"knowledge/{knowledge_version(cfg)}"
        if store.manifest(own) is not None:
            ref = own
        elif cfg.tracking.enabled:
            try:
                ref = "@latest"
                tracking.resolve_knowledge(cfg.tracking, store.root, ref)
            except tracking.KnowledgeNotFound:
                raise KnowledgeError(f"no knowledge to score with: {store.uri(own)} (the version this config "
                                     "builds) is not committed and no version is registered; run "
                                     "jobs/build_knowledge.py or pass --knowledge") from None
        else:
            raise KnowledgeError(f"no knowledge to score with: {store.uri(own)} (the version this config builds) "
                                 "is not committed; run jobs/build_knowledge.py or pass --knowledge")
    uri = tracking.resolve_knowledge(cfg.tracking, store.root, ref).rstrip("/")
    root = store.root.rstrip("/")
    if uri.startswith(root + "/"):
        kstore, rel = store, uri[len(root) + 1:]
    else:
        kstore, rel = Store(posixpath.dirname(uri), cfg.storage.options), posixpath.basename(uri)
    manifest = kstore.manifest(rel)
    if manifest is None:
        raise KnowledgeError(f"knowledge version {ref!r} does not exist: nothing is committed at {uri}")
    table, pae = load_knowledge(kstore, rel)
    return ResolvedKnowledge(uri=uri, version=posixpath.basename(uri), config_hash=manifest.get("config_hash"),
                             table=table, pae_bytes=pae)


def with_ood_vocabulary(table: KnowledgeTable, kv, cfg: MaskConfig) -> KnowledgeTable:
    """Precomputed OOD prototypes for the most frequent words of the vectors (``source = ood``)."""
    known = set(table.words)
    words = [w for w in kv.index_to_key[: cfg.knowledge.ood_vocab_size] if w not in known]
    vecs, found = vectors_for(kv, words)
    words = [w for w, f in zip(words, found, strict=True) if f]
    return extend_with_ood(table, words, np.asarray(vecs)[found], cfg.knowledge.ood_method, cfg.knowledge.m,
                           **cfg.knowledge.ood_options())


def knowledge_table(store: Store, cfg: MaskConfig, features_rel_: str, pae_bytes: bytes, words: list[str],
                    word_vectors: np.ndarray, region_words) -> KnowledgeTable:
    """Eq. 2 on Ray Data: μ of every VG region through the PAE, averaged per word → the knowledge table
    (:meth:`mask.knowledge.KnowledgeTable.from_accumulator`; OOD rows are added by :func:`with_ood_vocabulary`)."""
    word_index = {w: i for i, w in enumerate(words)}
    feats = features_dataset(store, features_rel_, KNOWLEDGE_COLUMNS)
    ensure_gpus(cfg, "represent.num_gpus", cfg.represent.num_gpus)
    acc = knowledge_pass(feats, pae_bytes, word_index, region_words, cfg.model.latent_dim, cfg.seed, cfg.represent)
    return KnowledgeTable.from_accumulator(acc, words, word_vectors)
