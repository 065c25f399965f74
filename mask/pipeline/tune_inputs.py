"""The inputs of a sweep, computed once before any trial and committed under ``sweeps/<name>/inputs/``.

The training steps of the main job (dataset → detector → region features on the VG boxes →
vocabulary, :func:`mask.pipeline.steps.prepare_training_inputs`) and the gallery's features run or are
reused; the gallery is split into a validation part (``validation.split``, or a seeded
``validation.fraction``) and a held-out test part; captions are parsed once (trials never load spaCy or
NLTK) and their words' vectors looked up; base-model scores (``rerank.base_scores``) are cut to both
parts.  Trials read this artifact and the features from the storage root, never from their config.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from mask.config import MaskConfig
from mask.pipeline.extract import run_extraction
from mask.pipeline.identity import features_rel
from mask.pipeline.index import npy_bytes, parquet_bytes
from mask.pipeline.rerank import base_scores_artifact, load_base_scores
from mask.pipeline.runtime import JobContext
from mask.pipeline.steps import ensure_dataset, prepare_training_inputs
from mask.pipeline.tune_trial import INPUTS_KIND, read_inputs
from mask.storage import StorageError, Store, fingerprint, fingerprint_files
from mask.sweep import SweepError, SweepSpec
from mask.text import ContentWordParser
from mask.vectors import vectors_for

logger = logging.getLogger(__name__)

DEMO_BASE = ("MASK global mean pooling ablation (scoring.pooling=mean) of each trial's own model; "
             "demo stand-in, not a pretrained base model")


def _split_positions(images: pa.Table, image_ids: list[str], spec: SweepSpec) -> tuple[list[int], list[int]]:
    """Rows of the validation and the held-out test part of the gallery (both in gallery order)."""
    v = spec.validation
    n = len(image_ids)
    if v.split is not None:
        split_of = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist(), strict=True))
        val = [i for i, x in enumerate(image_ids) if split_of.get(x) == v.split]
        if not val:
            raise SweepError(f"validation.split={v.split!r}: no gallery image is in that split "
                             f"(splits: {sorted(set(split_of.values()))})")
    else:
        take = max(1, min(n, round(v.fraction * n)))
        val = sorted(np.random.default_rng(v.seed).permutation(n)[:take].tolist())
    chosen = set(val)
    return val, [i for i in range(n) if i not in chosen]


def _gallery_order(images: pa.Table, captions: pa.Table, ok: set[str]) -> tuple[list[str], list[int], np.ndarray]:
    """Images in table order (those with features), captions grouped by image — the index's order
    (``images.parquet`` / ``captions.parquet``), which a ``.npy`` base-score matrix must follow."""
    image_ids = [x for x in images.column("image_id").to_pylist() if x in ok]
    pos = {x: i for i, x in enumerate(image_ids)}
    cap_img = captions.column("image_id").to_pylist()
    order = sorted((j for j, x in enumerate(cap_img) if x in pos), key=lambda j: (pos[cap_img[j]], j))
    return image_ids, order, np.asarray([pos[cap_img[j]] for j in order], np.int64)


def _base_artifact(cfg: MaskConfig, store: Store):

    return base_scores_artifact(cfg.rerank.base_scores, cfg.storage.options, store)


def inputs_hash(cfg: MaskConfig, spec: SweepSpec, store: Store) -> str:
    """What the inputs depend on: data, detector, vocabulary, parser, the validation split and the base
    scores (their content: a base_scores artifact's file hashes, else the file's size and mtime/ETag)."""
    data = cfg.model_dump(mode="json")
    ident = {s: data[s] for s in ("seed", "dataset", "gallery", "vocabulary", "detector", "vectors", "text")}
    ident["validation"] = spec.validation.model_dump(mode="json")
    path = cfg.rerank.base_scores
    if path:
        art = _base_artifact(cfg, store)
        try:
            ident["base_scores"] = [path, art[2] if art is not None else fingerprint_files(None, [path])]
        except StorageError as e:
            raise SweepError(f"rerank.base_scores {path}: {e}") from None
    return fingerprint(ident)[:16]


def prepare_inputs(ctx: JobContext, spec: SweepSpec, rel: str, run) -> dict[str, Any]:
    """Everything trials read, computed once: features (training + gallery), vocabulary, the
    validation / test split, parsed caption words and vectors, base scores; committed at ``rel``.

    Returns:
        The ``inputs.json`` of the committed artifact (reused when already committed).
    """

    cfg, store = ctx.cfg, ctx.store
    h = inputs_hash(cfg, spec, store)
    if store.committed(rel, h) is not None:
        logger.info("sweep inputs %s are committed; reused", store.uri(rel))
        return read_inputs(store, rel)
    if store.manifest(rel) is not None:
        raise SweepError(f"sweep inputs {store.uri(rel)} were built from another dataset/gallery/detector/validation "
                         "config; pass another --name")
    if cfg.gallery is None:
        raise SweepError("the config names no gallery: a sweep scores its validation part "
                         "(set gallery.name / gallery.kind / gallery.path)")
    t0 = time.perf_counter()
    tin = prepare_training_inputs(ctx, run)
    gal = ensure_dataset(ctx, cfg.gallery, run.run_id)
    if gal.get("captions") is None:
        raise SweepError(f"gallery {cfg.gallery.name}: the dataset has no captions")
    fsum = run_extraction(cfg, store, cfg.gallery.name, gal["images"], None, tin.det_weights, tracker=run)
    frel = features_rel(cfg.gallery.name, cfg.detector)
    ok = set(store.read_table(frel, columns=["image_id"]).column("image_id").to_pylist())
    image_ids, cap_order, c2i = _gallery_order(gal["images"], gal["captions"], ok)
    if not image_ids:
        raise SweepError(f"gallery {cfg.gallery.name}: no image has region features ({store.uri(frel)})")
    caps = gal["captions"].take(pa.array(cap_order, pa.int64()))
    texts = [t or "" for t in caps.column("text").to_pylist()]
    val, test = _split_positions(gal["images"], image_ids, spec)
    # captions → content words once (spaCy/NLTK are not loaded by trials), and their vectors
    uniq = sorted(set(texts))
    parsed = ContentWordParser.from_config(cfg.text).parse_batch(uniq)
    cap_vocab = sorted({w for ws in parsed for w in ws})
    vecs, found = vectors_for(tin.kv, cap_vocab)
    files: dict[str, bytes] = {}
    base_info: dict[str, Any] = {"kind": "demo-mean-pooling", "description": DEMO_BASE}
    base = None
    if cfg.rerank.base_scores:
        caption_ids = caps.column("caption_id").to_pylist()
        bs = load_base_scores(cfg.rerank.base_scores, image_ids, caption_ids, cfg.storage.options,
                              artifact=_base_artifact(cfg, store))
        base = bs.matrix
        base_info = {"kind": "file", "description": f"rerank.base_scores {cfg.rerank.base_scores}",
                     "directions": list(bs.directions), "missing": int(bs.missing)}
        if len(bs.directions) < 2:
            logger.warning("rerank.base_scores %s gives only %s lists; the other direction is re-ranked from "
                           "fill scores", cfg.rerank.base_scores, bs.directions)
    counts = {}
    for split, rows in (("val", val), ("test", test)):
        pos = {r: i for i, r in enumerate(rows)}
        cols = [j for j in range(len(texts)) if int(c2i[j]) in pos]
        files[f"{split}_images.parquet"] = parquet_bytes(pa.table({"image_id": pa.array([image_ids[r] for r in rows],
                                                                                     pa.string())}))
        files[f"{split}_captions.parquet"] = parquet_bytes(pa.table({
            "caption_id": pa.array([caps.column("caption_id")[j].as_py() for j in cols], pa.string()),
            "image_id": pa.array([image_ids[int(c2i[j])] for j in cols], pa.string()),
            "image_position": pa.array([pos[int(c2i[j])] for j in cols], pa.int64()),
            "text": pa.array([texts[j] for j in cols], pa.string())}))
        if base is not None and rows:
            files[f"{split}_base.npy"] = npy_bytes(base[np.ix_(rows, cols)].astype(np.float64))
        counts[split] = {"images": len(rows), "captions": len(cols)}
    vocab = tin.vocab
    files["vocabulary.parquet"] = parquet_bytes(pa.table({
        "word": pa.array(vocab["words"], pa.string()),
        "vector": pa.array(list(np.asarray(vocab["vectors"], np.float32)), pa.list_(pa.float32())),
        "count": pa.array(np.asarray(vocab["counts"], np.int64))}))
    files["caption_words.parquet"] = parquet_bytes(pa.table({"text": pa.array(uniq, pa.string()),
                                                        "words": pa.array(parsed, pa.list_(pa.string()))}))
    files["caption_vectors.parquet"] = parquet_bytes(pa.table({
        "word": pa.array([w for w, f in zip(cap_vocab, found, strict=True) if f], pa.string()),
        "vector": pa.array(list(np.asarray(vecs, np.float32)[found]), pa.list_(pa.float32()))}))
    info = {"dataset": cfg.dataset.name, "features": tin.features_rel, "gallery": cfg.gallery.name,
            "gallery_features": frel, "detector_weights": tin.det_weights, "word_dim": cfg.model.word_dim,
            "vocabulary": len(vocab["words"]), "counts": counts, "base": base_info,
            "caption_words": {"vocab": len(cap_vocab), "no_vector": int((~np.asarray(found)).sum())},
            "files": sorted([*files, "inputs.json"]), "seconds": round(time.perf_counter() - t0, 2),
            "features_summary": {k: v for k, v in fsum.items() if isinstance(v, int | float | str)}}
    with store.open_artifact(rel, kind=INPUTS_KIND, config_hash=h,
                             inputs={"features": store.uri(tin.features_rel), "gallery_features": store.uri(frel)}) as w:
        for name, data in files.items():
            w.write_file(name, data)
        w.write_file("inputs.json", json.dumps(info, indent=2, sort_keys=True, default=str).encode())
        w.commit(mlflow_run_id=run.run_id, extra={"counts": counts})
    return info
