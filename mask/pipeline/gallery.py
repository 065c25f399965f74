"""Gallery scoring: a knowledge version × a gallery → a committed index, metrics, optional re-ranking.

:func:`score_gallery` (``jobs/score_gallery.py``) runs, reusing whatever is committed:

1. the gallery dataset and its region features (the extraction pipeline, ``detector.mode`` boxes);
2. μ per image with the knowledge's PAE (Ray Data, :func:`mask.pipeline.represent.image_representations`);
3. caption words → prototypes (knowledge rows, OOD rows by ``knowledge.ood_method`` / ``m``, eq. 11–13);
4. the vocabulary-factorised eq. 10 scorer (:class:`mask.scoring.GalleryScorer`) streamed over
   chunks of ``scoring.image_chunk`` images, so memory is bounded by a chunk (plus the dense matrix
   when it is kept);
5. the index ``indexes/<gallery>/<version>/``: μ per image as Parquet parts and, as manifest-listed
   files, ``images.parquet`` / ``captions.parquet`` (the gallery order every matrix uses),
   ``t2i_topk.parquet`` / ``i2t_topk.parquet`` (query_id, ids, scores), ``scores.npy`` (the dense
   images × captions matrix when it has at most ``scoring.dense_max_pairs`` entries),
   ``index.json`` and ``metrics.json``;
6. with ``rerank.base_scores``: eq. 15 in both directions against the base model's scores, written
   to ``indexes/<gallery>/<version>/rerank/<hash>/`` with metrics before and after (Table 2 layout).

The index version is ``i-<hash>`` of the knowledge version, the gallery dataset hash, the detector
(features) and the scoring config (scoring, text parser, vectors, OOD method and m); a rerun with
the same inputs reuses the committed index.

Gallery order: images in the order of the gallery's ``images`` table (images whose features failed
are left out and counted), captions grouped by that image order (stable within an image). Base-model
score matrices must use the same order; ``images.parquet`` and ``captions.parquet`` record it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mask import tracking
from mask.config import MaskConfig
from mask.errors import MaskError
from mask.metrics import recall_at_k
from mask.pipeline.index import (  # noqa: F401 - re-exported: the index's order, errors and files
    DENSE_FILE,
    GalleryError,
    GalleryOrder,
    build_index,
    gallery_order,
    has_file,
    index_dense,
    index_order,
    index_root,
    parquet_bytes,
    read_current,
    read_index_file,
    recall_from_topk,
)
from mask.pipeline.runtime import JobContext
from mask.storage import Store, fingerprint

logger = logging.getLogger(__name__)

INDEX_FILES = ("images.parquet", "captions.parquet", "words.parquet", "t2i_topk.parquet", "i2t_topk.parquet",
               "index.json", "metrics.json")
METRIC_COLUMNS = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum"]


class BaseScoresError(MaskError, ValueError):
    """Bad base-model scores for re-ranking; the message names the file and the problem."""


# ---------------------------------------------------------------- gallery order and features


def gallery_detector(ctx: JobContext, run) -> str | None:
    """The committed detector weights the gallery features use (the same network as the knowledge's)."""
    from mask.pipeline.build import ensure_dataset, ensure_detector
    from mask.pipeline.extract import extractor_name

    det = ctx.cfg.detector
    if det.weights:
        return None
    base = det.model_copy(update={"mode": "fixed"})
    rel = f"detectors/{extractor_name(base)}"
    if ctx.store.committed(rel, extractor_name(base)) is not None:
        return rel
    train = ensure_dataset(ctx, ctx.cfg.dataset, run.run_id)  # calibration images, as the main job uses
    return ensure_detector(ctx, train["images"].column("uri").to_pylist()[:16])


@dataclass
class GalleryInputs:
    """A gallery with features and μ, in gallery order."""

    order: GalleryOrder
    mu: pa.Table  # image_id, mu (n×Z flat), num_boxes, latent_dim — rows in order.image_ids
    dataset: dict[str, Any]
    features: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def gallery_inputs(ctx: JobContext, run, pae_bytes: bytes, det_weights: str | None) -> GalleryInputs:
    """Gallery dataset → features (extracted when missing) → μ per image (Ray Data)."""
    import ray.data

    from mask.pipeline.build import ensure_dataset
    from mask.pipeline.extract import features_rel, run_extraction
    from mask.pipeline.represent import image_representations
    from mask.pipeline.runtime import cluster_gpus

    cfg = ctx.cfg
    if cfg.gallery is None:
        raise GalleryError("the config names no gallery (set gallery.name / gallery.kind / gallery.path)")
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    gallery = ensure_dataset(ctx, cfg.gallery, run.run_id)
    if gallery.get("captions") is None:
        raise GalleryError(f"gallery {cfg.gallery.name}: the dataset has no captions")
    t["dataset"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fsum = run_extraction(cfg, ctx.store, cfg.gallery.name, gallery["images"], None, det_weights, tracker=run)
    t["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frel = features_rel(cfg.gallery.name, cfg.detector)
    # the committed parts, read by Ray Data (not the driver)
    paths = [u[len("s3://"):] if u.startswith("s3://") else u for u in ctx.store.part_uris(frel)]
    if not paths:
        raise GalleryError(f"gallery {cfg.gallery.name}: no image has region features ({ctx.store.uri(frel)})")
    ds = ray.data.read_parquet(paths, filesystem=ctx.store.pyarrow_filesystem(), partitioning=None) \
        .select_columns(["image_id", "features", "num_boxes", "feature_dim"])
    mu = image_representations(ds, pae_bytes, num_gpus=1 if cluster_gpus() else 0)
    t["mu"] = time.perf_counter() - t0
    ok = set(mu.column("image_id").to_pylist())
    order = gallery_order(gallery["images"], gallery["captions"], ok, cfg.gallery.name)
    if order.dropped_images:
        logger.warning("gallery %s: %d images have no features (see the features' _errors) and are left out",
                       cfg.gallery.name, order.dropped_images)
    where = {x: i for i, x in enumerate(mu.column("image_id").to_pylist())}
    mu = mu.take(pa.array([where[x] for x in order.image_ids], pa.int64()))
    return GalleryInputs(order=order, mu=mu, dataset=gallery, features=fsum, timings=t)


# ---------------------------------------------------------------- the main job's evaluation


def evaluate_gallery(ctx: JobContext, table, pae_bytes: bytes, det_weights: str | None, run) -> dict[str, Any]:
    """Gallery features (detected boxes) → μ → MASK and ablations → R@K table (logged to MLflow)."""
    from mask.pipeline.evaluate import evaluate, format_table

    g = gallery_inputs(ctx, run, pae_bytes, det_weights)
    o = g.order
    captions = pa.table({"caption_id": o.caption_ids, "image_id": o.caption_image, "text": o.texts})
    results = evaluate(ctx.cfg, table, o.image_ids, g.mu, captions)
    md = format_table(results)
    for name, m in results.items():
        if isinstance(m, dict) and "rsum" in m:
            run.log_metrics({f"{name}.{k}": float(v) for k, v in m.items()})
    run.log_metrics({f"coverage.{k}": float(v) for k, v in results["coverage"].items()})
    run.log_text(md, "evaluation.md")
    return {"gallery": ctx.cfg.gallery.name, "images": len(o.image_ids), "features": g.features, "table": md,
            **results}


# ---------------------------------------------------------------- knowledge resolution


def _own_knowledge_version(cfg: MaskConfig) -> str:
    """The knowledge version the main job builds for this config (the rule of ``build_knowledge``)."""
    return cfg.knowledge.version or \
        f"k-{cfg.hash('dataset', 'vocabulary', 'detector', 'model', 'loss', 'train', 'vectors', 'knowledge')}"


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
    from mask.knowledge import KnowledgeError
    from mask.knowledge_artifact import load_knowledge

    if ref is None:
        own = f"knowledge/{_own_knowledge_version(cfg)}"
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


# ---------------------------------------------------------------- scoring


def index_version(cfg: MaskConfig, knowledge: ResolvedKnowledge, dataset_hash: str) -> str:
    """``i-<hash>`` of the index layout, the knowledge version, the gallery dataset, the features and the
    scoring config (a layout change gives new versions: an older layout is never reused as if current)."""
    from mask.pipeline.extract import extractor_name
    from mask.pipeline.index import INDEX_LAYOUT

    data = cfg.model_dump(mode="json")
    ident = {"layout": INDEX_LAYOUT, "knowledge": [knowledge.uri, knowledge.config_hash], "gallery": dataset_hash,
             "features": extractor_name(cfg.detector), "scoring": data["scoring"], "text": data["text"],
             "vectors": data["vectors"], "ood": [cfg.knowledge.ood_method, cfg.knowledge.m]}
    return f"i-{fingerprint(ident)[:16]}"


def markdown_table(rows: dict[str, dict[str, float]], first: str = "method") -> str:
    """Paper-style Markdown (Tables 1/2: image retrieval IR = text→image, annotation IA = image→text);
    a metric a row lacks prints as "–"."""
    head = f"| {first} | IR R@1 | IR R@5 | IR R@10 | IA R@1 | IA R@5 | IA R@10 | Rs |"
    lines = [head, "|" + "---|" * 8]
    for name, m in rows.items():
        cells = [f"{m[c]:.1f}" if c in m and np.isfinite(m[c]) else "–" for c in METRIC_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    from mask.pipeline.runtime import init_ray

    if cfg.gallery is None:
        raise GalleryError("the config names no gallery (set gallery.name / gallery.kind / gallery.path)")
    ctx = JobContext.from_config(cfg)
    store = ctx.store
    knowledge = resolve_and_load_knowledge(cfg, store, knowledge_ref)  # fails before Ray / MLflow start
    init_ray(cfg)
    uri = tracking.tracking_uri(cfg.tracking, store.root)
    with tracking.start_run(cfg.tracking, store.root, "score_gallery", params=cfg.flat(),
                            tags={"job": "score_gallery", "knowledge_uri": knowledge.uri}) as run:
        t_all = time.perf_counter()
        from mask.pipeline.build import ensure_dataset

        t0 = time.perf_counter()
        gal = ensure_dataset(ctx, cfg.gallery, run.run_id)
        dataset_hash = gal["summary"]["config_hash"]
        version = index_version(cfg, knowledge, dataset_hash)
        rel = f"indexes/{cfg.gallery.name}/{version}"
        run.log_params({"knowledge.uri": knowledge.uri, "knowledge.resolved_version": knowledge.version,
                        "index.version": version, "gallery.dataset_hash": dataset_hash})
        summary: dict[str, Any] = {"knowledge": {"uri": knowledge.uri, "version": knowledge.version},
                                   "index": {"uri": store.uri(rel), "version": version}}
        manifest = store.committed(rel, version)
        dense = None
        if manifest is not None:
            logger.info("index %s is committed; reused", store.uri(rel))
            metrics = read_index_file(store, rel, "metrics.json")
            summary["index"]["reused"] = True
        else:
            t_dataset = time.perf_counter() - t0
            det = gallery_detector(ctx, run)
            built = build_index(ctx, run, knowledge, gal, version, det, live=None,
                                keep_dense=bool(cfg.rerank.base_scores))
            metrics, dense = built.metrics, built.dense
            metrics["timings"] = {"dataset": t_dataset, **metrics["timings"]}
            summary["index"]["reused"] = False
            summary["features"] = built.features
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


# ---------------------------------------------------------------- re-ranking (eq. 15)


@dataclass
class BaseScores:
    """Base-model scores aligned with the gallery order.

    Attributes:
        matrix: (N, T) float64; entries the file does not give hold the fill score.
        directions: which directions the file covers ("t2i", "i2t").
        missing: entries the file does not give.
    """

    matrix: np.ndarray
    directions: tuple[str, ...]
    missing: int = 0


def _read_bytes(path: str, options: dict[str, Any]) -> bytes:
    import fsspec

    try:
        with fsspec.open(path, "rb", **(options if path.startswith("s3://") else {})) as f:
            return f.read()
    except FileNotFoundError:
        raise BaseScoresError(f"rerank.base_scores {path}: no such file") from None


def base_scores_artifact(path: str, options: dict[str, Any], store: Store | None = None):
    """``(Store, rel, fingerprint)`` when ``path`` is a committed ``jobs/base_scores.py`` artifact
    (``base_scores/<gallery>/<model-tag>``, under the storage root or given as a URI), else None."""
    if path.endswith((".npy", ".parquet")):
        return None
    p = path.rstrip("/")
    if store is not None and "://" not in p and not os.path.isabs(p) and store.manifest(p) is not None:
        s, rel = store, p
    else:
        if "://" not in p and not os.path.isabs(p):
            return None
        s, rel = Store(posixpath.dirname(p), options if p.startswith("s3://") else {}), posixpath.basename(p)
        if s.manifest(rel) is None:
            return None
    m = s.manifest(rel)
    if m.get("kind") != "base_scores":
        raise BaseScoresError(f"rerank.base_scores {path}: the artifact there is a {m.get('kind')!r}, "
                              "not base_scores (jobs/base_scores.py)")
    files = {f["name"]: f["sha256"] for f in m.get("files") or []}
    return s, rel, fingerprint(files)


def load_base_scores(path: str, image_ids: list[str], caption_ids: list[str],
                     storage_options: dict[str, Any] | None = None, raw: bytes | None = None,
                     artifact=None) -> BaseScores:
    """Read base-model scores in one of four layouts and align them with the gallery order.

    * ``.npy``: a dense (N_images, N_captions) matrix in the index's order (``images.parquet``,
      ``captions.parquet``);
    * Parquet with ``image_id, caption_id, score``: one row per pair (both directions);
    * Parquet with ``query_id, candidate_ids, scores`` (lists; optional ``direction`` "t2i"/"i2t"):
      per-query top-k lists; without ``direction``, query ids that are caption ids mean text→image and
      image ids mean image→text.

    * a committed ``jobs/base_scores.py`` artifact (``base_scores/<gallery>/<model-tag>``, under the
      storage root or as a URI): its ``ids.json`` aligns rows and columns by id; images and captions it
      excluded get the fill score.

    Pairs a Parquet file (or the artifact) does not give get the fill score ``lowest − max(1, |lowest|)``
    (:func:`mask.scoring.fill_score`): they rank after every given pair and are re-ranked only when a
    query has fewer than ``rerank.k`` given candidates.

    Raises:
        BaseScoresError: unreadable file, wrong shape or columns, NaN/inf, unknown or duplicate ids,
            mismatched list lengths — naming the file and the problem.
    """
    from mask.scoring import fill_score

    n, t = len(image_ids), len(caption_ids)
    name = f"rerank.base_scores {path}"
    if artifact is None and raw is None:
        artifact = base_scores_artifact(path, storage_options or {})
    if artifact is not None:  # a jobs/base_scores.py artifact: its ids say where each row and column goes
        from mask.pipeline.base_scores import load_base_scores as load_artifact

        a = load_artifact(artifact[0], artifact[1])
        img_pos = {x: i for i, x in enumerate(image_ids)}
        cap_pos = {x: i for i, x in enumerate(caption_ids)}
        unknown = [x for x in a.image_ids if x not in img_pos] + [x for x in a.caption_ids if x not in cap_pos]
        if unknown:
            raise BaseScoresError(f"{name}: {len(unknown)} ids of the artifact are not in the gallery, e.g. "
                                  f"{unknown[:5]} (scored for another gallery?)")
        if not np.isfinite(a.scores).all():
            raise BaseScoresError(f"{name}: non-finite scores in the artifact's scores.npy")
        from mask.scoring import fill_score

        mat = np.full((n, t), np.nan)
        rows = np.asarray([img_pos[x] for x in a.image_ids], np.int64)
        cols = np.asarray([cap_pos[x] for x in a.caption_ids], np.int64)
        mat[np.ix_(rows, cols)] = a.scores
        given = np.isfinite(mat)
        if not given.any():
            raise BaseScoresError(f"{name}: has no scores")
        missing = int((~given).sum())
        mat[~given] = fill_score(float(mat[given].min()))
        return BaseScores(matrix=mat, directions=("t2i", "i2t"), missing=missing)
    raw = _read_bytes(path, storage_options or {}) if raw is None else raw
    if path.endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise BaseScoresError(f"{name}: not a readable .npy matrix ({e})") from None
        if arr.ndim != 2 or arr.shape != (n, t):
            raise BaseScoresError(f"{name}: has shape {arr.shape}, the gallery has {n} images × {t} captions "
                                  "(rows/columns in the order of the index's images.parquet / captions.parquet)")
        if arr.dtype.kind not in "fiu":
            raise BaseScoresError(f"{name}: expected numbers, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise BaseScoresError(f"{name}: non-finite value {arr[r, c]} at [{r}, {c}] "
                                  f"(image {image_ids[r]!r}, caption {caption_ids[c]!r}); {int(bad.sum())} in all")
        return BaseScores(matrix=arr.astype(np.float64), directions=("t2i", "i2t"))
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowInvalid, OSError) as e:
        raise BaseScoresError(f"{name}: neither a .npy file nor readable Parquet ({e})") from None
    cols = set(table.column_names)
    img_pos = {x: i for i, x in enumerate(image_ids)}
    cap_pos = {x: i for i, x in enumerate(caption_ids)}

    def positions(ids: list[str], where: dict[str, int], what: str) -> np.ndarray:
        unknown = sorted({x for x in ids if x not in where})
        if unknown:
            raise BaseScoresError(f"{name}: {len(unknown)} unknown {what}(s) not in the gallery, e.g. {unknown[:5]}")
        return np.asarray([where[x] for x in ids], np.int64)

    def finite(vals: np.ndarray, rows: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(vals)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BaseScoresError(f"{name}: non-finite score {vals[i]} in row {int(rows[i])} ({int(bad.sum())} in all)")
        return vals

    mat = np.full((n, t), np.nan)
    if {"image_id", "caption_id", "score"} <= cols:
        ii = positions([str(x) for x in table.column("image_id").to_pylist()], img_pos, "image_id")
        cc = positions([str(x) for x in table.column("caption_id").to_pylist()], cap_pos, "caption_id")
        vals = np.asarray(table.column("score").to_numpy(zero_copy_only=False), np.float64)
        finite(vals, np.arange(len(vals)))
        key = ii * t + cc
        uniq, first, cnt = np.unique(key, return_index=True, return_counts=True)
        if (cnt > 1).any():
            d = int(uniq[cnt > 1][0])
            raise BaseScoresError(f"{name}: duplicate pair image_id={image_ids[d // t]!r}, "
                                  f"caption_id={caption_ids[d % t]!r} ({int((cnt > 1).sum())} duplicated pairs)")
        mat[ii, cc] = vals
        directions: tuple[str, ...] = ("t2i", "i2t")
    elif {"query_id", "candidate_ids", "scores"} <= cols:
        q = [str(x) for x in table.column("query_id").to_pylist()]
        cands = table.column("candidate_ids").to_pylist()
        scores = table.column("scores").to_pylist()
        if "direction" in cols:
            dirs = [str(x) for x in table.column("direction").to_pylist()]
            bad_dir = sorted(set(dirs) - {"t2i", "i2t"})
            if bad_dir:
                raise BaseScoresError(f"{name}: direction must be 't2i' or 'i2t', got {bad_dir[:3]}")
        else:
            in_cap = all(x in cap_pos for x in q)
            in_img = all(x in img_pos for x in q)
            if in_cap == in_img:
                raise BaseScoresError(f"{name}: cannot tell the direction of the query ids (they are "
                                      f"{'both' if in_cap else 'neither'} all caption ids {'and' if in_cap else 'nor'} "
                                      "all image ids); add a 'direction' column ('t2i' or 'i2t')")
            dirs = ["t2i" if in_cap else "i2t"] * len(q)
        seen: set[tuple[str, str]] = set()
        for r, (qid, d, cs, ss) in enumerate(zip(q, dirs, cands, scores, strict=True)):
            if (d, qid) in seen:
                raise BaseScoresError(f"{name}: duplicate query_id {qid!r} ({d}) in row {r}")
            seen.add((d, qid))
            cs, ss = [str(x) for x in (cs or [])], np.asarray(ss or [], np.float64)
            if len(cs) != len(ss):
                raise BaseScoresError(f"{name}: row {r} (query {qid!r}) has {len(cs)} candidate_ids and "
                                      f"{len(ss)} scores")
            if len(set(cs)) != len(cs):
                raise BaseScoresError(f"{name}: row {r} (query {qid!r}) lists a candidate twice")
            finite(ss, np.full(len(ss), r))
            if d == "t2i":
                c = positions([qid], cap_pos, "caption_id (query)")[0]
                mat[positions(cs, img_pos, "image_id"), c] = ss
            else:
                i = positions([qid], img_pos, "image_id (query)")[0]
                mat[i, positions(cs, cap_pos, "caption_id")] = ss
        directions = tuple(d for d in ("t2i", "i2t") if d in set(dirs))
    else:
        raise BaseScoresError(f"{name}: Parquet columns {sorted(cols)} are neither (image_id, caption_id, score) "
                              "nor (query_id, candidate_ids, scores)")
    given = np.isfinite(mat)
    if not given.any():
        raise BaseScoresError(f"{name}: has no scores")
    fill = fill_score(float(mat[given].min()))
    missing = int((~given).sum())
    mat[~given] = fill
    return BaseScores(matrix=mat, directions=directions, missing=missing)


def _reranked_lists(order: GalleryOrder, base: np.ndarray, mask: np.ndarray, k: int, alpha: float,
                    direction: str) -> pa.Table:
    from mask.rerank import rerank_topk

    if direction == "t2i":
        b, m, qids, gids = base.T, mask.T, order.caption_ids, np.asarray(order.image_ids, object)
    else:
        b, m, qids, gids = base, mask, order.image_ids, np.asarray(order.caption_ids, object)
    idx = rerank_topk(b, m, k, alpha)  # (Q, k) best first
    return pa.table({"query_id": pa.array(qids, pa.string()),
                     "ids": pa.array([list(gids[r]) for r in idx], pa.list_(pa.string())),
                     "base_scores": pa.array(list(np.take_along_axis(b, idx, 1).astype(np.float32)),
                                             pa.list_(pa.float32())),
                     "mask_scores": pa.array(list(np.take_along_axis(m, idx, 1).astype(np.float32)),
                                             pa.list_(pa.float32()))})


def rerank_index(cfg: MaskConfig, store: Store, rel: str, dense: np.ndarray | None, run) -> dict[str, Any]:
    """Eq. 15 against ``rerank.base_scores`` for a committed index; commits ``<index>/rerank/<hash>/``.

    MASK scores come from this run's dense matrix, else from the index (:func:`mask.pipeline.index.index_dense`).

    Returns:
        ``{"uri", "reused", "before", "after", "rows" (Table 2 layout), "directions", "missing"}``.
    """
    import hashlib

    from mask.rerank import rerank_both

    rc = cfg.rerank
    path = rc.base_scores
    art = base_scores_artifact(path, cfg.storage.options, store)
    raw = None if art is not None else _read_bytes(path, cfg.storage.options)
    base_fp = art[2] if art is not None else hashlib.sha256(raw).hexdigest()
    rhash = fingerprint({"base": base_fp, "k": rc.k, "alpha": rc.alpha})[:16]
    rrel = f"{rel}/rerank/r-{rhash}"
    done = store.committed(rrel, rhash)
    if done is not None:
        out = read_index_file(store, rrel, "metrics.json")
        out.update(uri=store.uri(rrel), reused=True)
    else:
        order = index_order(store, rel)
        base = load_base_scores(path, order.image_ids, order.caption_ids, raw=raw, artifact=art)
        mask = dense if dense is not None else index_dense(cfg, store, rel)
        rr = rerank_both(base.matrix, mask, rc.k, rc.alpha)
        c2i = order.caption_to_image
        before = recall_at_k(base.matrix, caption_to_image=c2i)
        after = recall_at_k(rr.i2t, caption_to_image=c2i, t2i_similarity=rr.t2i)
        keep = [k for k in METRIC_COLUMNS if k == "rsum" or k.split("_")[0] in base.directions]
        if len(base.directions) < 2:
            before = {k: v for k, v in before.items() if k in keep and k != "rsum"}
            after = {k: v for k, v in after.items() if k in keep and k != "rsum"}
        out = {"before": before, "after": after, "directions": list(base.directions), "missing": base.missing,
               "k": rc.k, "alpha": rc.alpha, "base_scores": path}
        with store.open_artifact(rrel, kind="rerank", config_hash=rhash, inputs={"base_scores": base_fp}) as w:
            for d in base.directions:
                w.write_file(f"{d}_reranked.parquet",
                             parquet_bytes(_reranked_lists(order, base.matrix, mask, rc.k, rc.alpha, d)))
            w.write_file("metrics.json", json.dumps(out, indent=2, sort_keys=True).encode())
            w.commit(mlflow_run_id=run.run_id)
        out.update(uri=store.uri(rrel), reused=False)
    out["rows"] = {"base": out["before"], f"base + MASK (α={rc.alpha:g}, k={rc.k})": out["after"]}
    run.log_metrics({f"rerank.before.{k}": v for k, v in out["before"].items()})
    run.log_metrics({f"rerank.after.{k}": v for k, v in out["after"].items()})
    run.log_text(markdown_table(out["rows"]), "rerank.md")
    return out


# ---------------------------------------------------------------- evaluation of a committed index

PROTOCOLS = ("all", "flickr30k-1k", "coco-5k", "coco-5fold-1k")


def find_index(cfg: MaskConfig, store: Store, ref: str | None) -> str:
    """An index reference (path under the root, or absolute/URI under it) → its relative path.

    None: the live version (``indexes/<gallery>/CURRENT``), else the newest committed version.

    Raises:
        GalleryError: nothing committed there (named).
    """
    if ref is None:
        if cfg.gallery is None:
            raise GalleryError("no --index given and the config names no gallery")
        base = index_root(cfg.gallery.name)
        cur = read_current(store, cfg.gallery.name)
        if cur is not None:
            if store.manifest(f"{base}/{cur['version']}") is None:
                raise GalleryError(f"{store.uri(base, 'CURRENT')} points at {cur['version']}, which is not committed")
            return f"{base}/{cur['version']}"
        found = [(m.get("created_at", ""), f"{base}/{v}") for v in store.list(base)
                 if not v.startswith("_") and v != "CURRENT" and (m := store.manifest(f"{base}/{v}")) is not None]
        if not found:
            raise GalleryError(f"no committed index under {store.uri(base)}; run jobs/score_gallery.py first")
        return max(found)[1]
    ref = ref.rstrip("/")
    root = store.root.rstrip("/")
    if ref.startswith(root + "/"):
        ref = ref[len(root) + 1:]
    elif "://" in ref or os.path.isabs(ref):
        raise GalleryError(f"index {ref}: not under the storage root {root}")
    if store.manifest(ref) is None:
        raise GalleryError(f"index {store.uri(ref)} does not exist (no committed manifest)")
    return ref


def protocol_metrics(sim: np.ndarray, caption_to_image: np.ndarray, protocol: str,
                     t2i_similarity: np.ndarray | None = None) -> dict[str, float]:
    """R@K by an evaluation protocol: ``all`` (any gallery), ``flickr30k-1k`` (the 1000-image test),
    ``coco-5k`` (5000 images), ``coco-5fold-1k`` (mean over 5 folds of 1000).

    Raises:
        GalleryError: an unknown protocol, or a gallery that does not fit it (COCO needs 5 captions
            per image in image order).
    """
    from mask.metrics import coco_5fold_1k, coco_5k

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
    with tracking.start_run(cfg.tracking, store.root, "evaluate", params={"index": store.uri(rel),
                            "protocol": protocol, "scores": scores_path or ""}, tags={"job": "evaluate"}) as run:
        for name, mt in rows.items():
            run.log_metrics({f"{_metric_key(name)}.{k}": v for k, v in mt.items()})
        run.log_text(table, f"evaluation_{protocol}.md")
        return {"index": store.uri(rel), "protocol": protocol, "metrics": rows, "table": table,
                "mlflow": {"run_id": run.run_id}}


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")[:60] or "row"
