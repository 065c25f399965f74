"""Gallery index versions: built from scratch or incrementally from the live version; μ store; CURRENT.

Layout under ``indexes/<gallery>/``:

* ``<version>/`` — one committed index version (its manifest lists files, written last):
  ``images.parquet`` (position, image_id, num_boxes), ``captions.parquet`` (position, caption_id,
  image_id, image_position, text, words, word_ids, dropped_words), ``words.parquet`` (word, source,
  prototype — the columns of ``word_scores.npy``), ``word_scores.npy`` (N × V: per image and word the
  pooled term of eq. 10, ``max_r μ_r·v`` or the mean for the ablation; kept when N·V ≤
  ``scoring.dense_max_pairs``), ``scores.npy`` (the dense N × T eq. 10 matrix, same bound),
  ``t2i_topk.parquet`` / ``i2t_topk.parquet``, ``index.json``, ``metrics.json``.
* ``_mu/<m-hash>/`` — μ per image (eq. 1/3: the PAE's mean) for one (knowledge, features) pair; an
  append-only artifact shared by every version scored with that pair, so each image's μ is computed once.
* ``CURRENT`` — ``{"version", "previous", "switched_at", "mlflow_run_id", ...}``: the live version,
  replaced atomically by ``jobs/reindex.py`` (:func:`switch_current`).
* ``_lease/`` — the re-index lease (:mod:`mask.lease`).

Eq. 10 factorises as ``s[n, t] = mean_{w ∈ t} WS[n, w]`` with ``WS[n, w] = max_r μ_nr·v_w``; an
index keeps ``WS``, so a new version needs ``WS`` only for new images (all words) and for new words
(all images), then one sparse product for the scores (:func:`build_index` with ``live``).  With the
same knowledge, features and scoring config, the result equals a from-scratch build.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mask.config import MaskConfig
from mask.evaluation import map_captions, padded_mu
from mask.faults import kill_point
from mask.metrics import KEYS, recall_at_k
from mask.pipeline.extract import run_extraction
from mask.pipeline.identity import (
    INDEX_LAYOUT,
    extractor_name,
    features_rel,
    gallery_content,
    index_root,
    index_version,
    mu_rel,
    score_hash,
)
from mask.pipeline.represent import MuStage, image_representations, mu_table
from mask.pipeline.resources import ensure_gpus
from mask.pipeline.runtime import JobContext
from mask.pipeline.steps import MU_COLUMNS, GalleryError, features_dataset
from mask.scoring import GalleryScorer, WordScoreReuse, normalize_rows, reuse_word_scores
from mask.storage import Store, fingerprint

logger = logging.getLogger(__name__)

CURRENT = "CURRENT"
LEASE_DIR = "_lease"
WORD_SCORES = "word_scores.npy"
DENSE_FILE = "scores.npy"


@dataclass
class GalleryOrder:
    """The order every gallery matrix uses.

    Attributes:
        image_ids: N image ids (rows).
        caption_ids: T caption ids (columns), grouped by image in ``image_ids`` order.
        caption_image: T image ids of the captions.
        texts: T caption texts.
        caption_to_image: (T,) row of each caption's image.
        dropped_images: gallery images left out (no features).
    """
    image_ids: list[str]
    caption_ids: list[str]
    caption_image: list[str]
    texts: list[str]
    caption_to_image: np.ndarray
    dropped_images: int = 0


def gallery_order(images: pa.Table, captions: pa.Table, ok_ids: set[str] | None = None,
                  name: str = "gallery") -> GalleryOrder:
    """Images in table order (only ``ok_ids`` when given), captions grouped by that order.

    Raises:
        GalleryError: duplicate image or caption ids, or no image left.
    """
    all_ids = [str(x) for x in images.column("image_id").to_pylist()]
    _no_duplicates(all_ids, f"gallery {name}: images", "image_id")
    image_ids = [i for i in all_ids if ok_ids is None or i in ok_ids]
    if not image_ids:
        raise GalleryError(f"gallery {name}: no image has region features ({len(all_ids)} images)")
    pos = {x: i for i, x in enumerate(image_ids)}
    cap_ids = [str(x) for x in captions.column("caption_id").to_pylist()]
    _no_duplicates(cap_ids, f"gallery {name}: captions", "caption_id")
    cap_img = [str(x) for x in captions.column("image_id").to_pylist()]
    texts = captions.column("text").to_pylist()
    order = sorted((j for j in range(len(cap_img)) if cap_img[j] in pos), key=lambda j: (pos[cap_img[j]], j))
    return GalleryOrder(image_ids=image_ids, caption_ids=[cap_ids[j] for j in order],
                        caption_image=[cap_img[j] for j in order], texts=[texts[j] or "" for j in order],
                        caption_to_image=np.asarray([pos[cap_img[j]] for j in order], np.int64),
                        dropped_images=len(all_ids) - len(image_ids))


def _no_duplicates(ids: list[str], where: str, column: str) -> None:
    seen: set[str] = set()
    dup = [x for x in ids if x in seen or seen.add(x)]
    if dup:
        raise GalleryError(f"{where}: duplicate {column} {sorted(set(dup))[:5]} ({len(dup)} duplicates)")


def recall_from_topk(t2i_top: np.ndarray, i2t_top: np.ndarray, caption_to_image: np.ndarray) -> dict[str, float]:
    """R@1/5/10 from top-K lists (K ≥ 10): ranks are list positions, so ties follow the lists' order
    (lower index first) instead of the pessimistic rule of :func:`mask.metrics.recall_at_k`.

    Args:
        t2i_top: (T, K) image rows per caption, best first.
        i2t_top: (N, K) caption columns per image, best first.
        caption_to_image: (T,) image row of each caption.
    """
    if min(t2i_top.shape[1], i2t_top.shape[1]) < 10:
        raise GalleryError(f"R@10 from top-K lists needs K ≥ 10, the lists keep {t2i_top.shape[1]} "
                           "(raise scoring.top_k or scoring.dense_max_pairs)")
    big = np.iinfo(np.int64).max
    hit = t2i_top == caption_to_image[:, None]  # (T, K)
    t2i = np.where(hit.any(axis=1), hit.argmax(axis=1), big)
    own = caption_to_image[i2t_top] == np.arange(i2t_top.shape[0])[:, None]  # (N, K)
    i2t = np.where(own.any(axis=1), own.argmax(axis=1), big)
    has_caption = np.bincount(caption_to_image, minlength=i2t_top.shape[0]) > 0
    i2t = i2t[has_caption]
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float(100.0 * (r < k).mean()) if r.size else 0.0
    out["rsum"] = float(sum(out[k] for k in KEYS))
    return out


# ---------------------------------------------------------------- hashes


# ---------------------------------------------------------------- small file helpers


def parquet_bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def read_index_file(store: Store, rel: str, name: str):
    """A file of a committed index: Parquet → Table, .npy → array, .json → object."""
    data = store.read_file(rel, name)
    if name.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data))
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    return json.loads(data)


def has_file(store: Store, rel: str, name: str) -> bool:
    m = store.manifest(rel) or {}
    return any(f["name"] == name for f in m.get("files") or [])


# ---------------------------------------------------------------- μ store


def mu_ids(store: Store, mrel: str) -> dict[str, int]:
    """Image id → number of regions, for the images whose μ is committed in ``mrel``."""
    return {i: n for i, (n, _) in mu_state(store, mrel).items()}


def mu_state(store: Store, mrel: str) -> dict[str, tuple[int, str | None]]:
    """Image id → (number of regions, ``content_sha256`` of the features row its μ was computed from)."""
    if store.manifest(mrel) is None:
        return {}
    t = store.read_table(mrel, columns=["image_id", "num_boxes", "content_sha256"])
    out: dict[str, tuple[int, str | None]] = {}
    for i, n, h in zip(t.column("image_id").to_pylist(), t.column("num_boxes").to_pylist(),
                       t.column("content_sha256").to_pylist(), strict=True):
        out.setdefault(i, (int(n), h))
    return out


def features_content(store: Store, frel: str) -> dict[str, str | None]:
    """Image id → ``content_sha256`` of its committed features row (None: not recorded, e.g. given features)."""
    if store.manifest(frel) is None:
        return {}
    t = store.read_table(frel, columns=["image_id", "content_sha256"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("content_sha256").to_pylist(), strict=True))


def _other_content(current: dict[str, str | None]):
    """Predicate for :meth:`mask.storage.ArtifactWriter.retire_rows`: μ rows of the images of ``current``
    computed from other features (the image changed and was extracted again)."""
    def stale(t: pa.Table) -> np.ndarray:
        ids = t.column("image_id").to_pylist()
        hs = t.column("content_sha256").to_pylist()
        return np.fromiter((i in current and h != current[i] for i, h in zip(ids, hs, strict=True)), bool, len(ids))
    return stale


def read_rows(store: Store, rel: str, image_ids: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """The committed rows of ``image_ids`` of a per-image artifact (μ, features), in part order.

    Reads each part's ``image_id`` column, then only the parts holding a wanted image, whole — much
    faster than a row filter on list columns — and keeps the wanted rows. None when no part has any.
    """
    m = store.manifest(rel) or {}
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    fs = store.pyarrow_filesystem()
    tables = []
    for p in m.get("parts") or []:
        path = store.path(rel, p["path"])
        ids = pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id")
        keep = pc.is_in(ids, value_set=wanted)
        if pc.any(keep).as_py():
            t = pq.read_table(path, filesystem=fs, columns=columns)
            tables.append(t if pc.all(keep).as_py() else t.filter(keep))
    return pa.concat_tables(tables) if tables else None


def read_mu(store: Store, mrel: str, image_ids: list[str], ordered: bool = True) -> pa.Table:
    """μ rows of ``image_ids`` (in that order; in storage order when not ``ordered``, which saves a copy
    for :func:`mask.pipeline.represent.padded_mu`, which orders them itself) from the μ artifact.

    Raises:
        GalleryError: an image has no committed μ.
    """
    m = store.manifest(mrel)
    if m is None:
        raise GalleryError(f"no region representations committed at {store.uri(mrel)}")
    t = read_rows(store, mrel, image_ids)
    pos: dict[str, int] = {}
    if t is not None:
        for i, x in enumerate(t.column("image_id").to_pylist()):
            pos.setdefault(x, i)
    missing = [x for x in image_ids if x not in pos]
    if missing:
        raise GalleryError(f"{store.uri(mrel)}: no region representations for {len(missing)} images, e.g. {missing[:3]}")
    return t.take(pa.array([pos[x] for x in image_ids], pa.int64())) if ordered else t


def ensure_mu(ctx: JobContext, pae_bytes: bytes, frel: str, mrel: str, mhash: str, image_ids: list[str],
              run_id: str | None, content: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Compute and append μ for the images of ``image_ids`` that have none yet, or one computed from other
    features (eq. 1/3, the PAE mean).

    Few images run on the driver; more than ``index.local_max_images`` go through Ray Data actors.  Each
    μ row records the ``content_sha256`` of the features row it came from; an image whose features were
    extracted again (its bytes changed) gets a new μ, and its old row is dropped in the same commit.

    Args:
        content: image id → ``content_sha256`` of its features (:func:`features_content`; read when None).

    Returns:
        ``{"computed", "changed", "reused", "where", "seconds"}``.
    """
    t0 = time.perf_counter()
    store = ctx.store
    have = mu_state(store, mrel)
    content = features_content(store, frel) if content is None else content
    need = [i for i in dict.fromkeys(image_ids) if i not in have or have[i][1] != content.get(i)]
    changed = [i for i in need if i in have]
    out = {"computed": len(need), "changed": len(changed), "reused": len(image_ids) - len(need), "where": "none",
           "seconds": 0.0}
    if not need:
        return out
    commit = functools.partial(_commit_mu, store, frel, mrel, mhash, have, content, run_id)
    if len(need) <= ctx.cfg.index.local_max_images:
        commit(_mu_on_driver(store, frel, pae_bytes, need), need)
        out["where"] = "driver"
    else:
        # parts grouped into commits of about index.mu_commit_images images: a long μ stage keeps its
        # progress (a rerun computes only the images without μ)
        groups = _mu_groups(store, frel, need, ctx.cfg.index.mu_commit_images)
        ensure_gpus(ctx.cfg, "represent.num_gpus", ctx.cfg.represent.num_gpus)
        for paths, ids in groups:
            ds = features_dataset(store, frel, MU_COLUMNS, parts=paths)
            commit(image_representations(ds, pae_bytes, ctx.cfg.represent, keep_ids=ids), ids)
        out["where"] = "ray-data"
        out["commits"] = len(groups)
    out["seconds"] = time.perf_counter() - t0
    return out


def _no_features(store: Store, frel: str, lost: list[str]) -> GalleryError:
    return GalleryError(f"μ: {len(lost)} images have no committed region features in {store.uri(frel)}, "
                        f"e.g. {lost[:3]}")


def _commit_mu(store: Store, frel: str, mrel: str, mhash: str, have: dict[str, tuple[int, str | None]],
               content: dict[str, str | None], run_id: str | None, table: pa.Table, ids: list[str]) -> None:
    """Append the μ rows ``table`` of ``ids`` (with their features' ``content_sha256``) to the μ artifact;
    images that had μ from other features lose their old rows in the same manifest write."""
    got = set(table.column("image_id").to_pylist())
    lost = [i for i in ids if i not in got]
    if lost:
        raise _no_features(store, frel, lost)
    table = table.append_column("content_sha256", pa.array(
        [content.get(i) for i in table.column("image_id").to_pylist()], pa.string()))
    swap = [i for i in ids if i in have]
    with store.open_artifact(mrel, kind="mu", config_hash=mhash, append=True) as w:
        if swap:  # μ of changed images: the old rows leave in the same manifest write
            w.retire_rows(["image_id", "content_sha256"], _other_content({i: content.get(i) for i in swap}))
        w.write_part(table, name=f"mu-{fingerprint([sorted(ids), [content.get(i) for i in sorted(ids)]])[:20]}")
        w.commit(mlflow_run_id=run_id)


def _mu_on_driver(store: Store, frel: str, pae_bytes: bytes, need: list[str]) -> pa.Table:
    """μ of a few images (``need``), computed on the driver."""
    cols = MU_COLUMNS
    feats = read_rows(store, frel, need, columns=cols)
    if feats is None:
        raise GalleryError(f"μ: none of {len(need)} images has committed region features in {store.uri(frel)}")
    stage = MuStage(pae_bytes, keep_ids=need)
    batches = []
    for b in feats.to_batches(max_chunksize=64):
        batches.append(stage({c: b.column(c).to_numpy(zero_copy_only=False) for c in cols}))
    return mu_table(batches)


def _mu_groups(store: Store, frel: str, need: list[str], group_images: int) -> list[tuple[list[str], list[str]]]:
    """The features parts holding ``need``, grouped into commits of about ``group_images`` images:
    ``(part paths, image ids)`` per group.

    Raises:
        GalleryError: an image of ``need`` has no committed features.
    """
    fs = store.pyarrow_filesystem()
    wanted = set(need)
    groups: list[tuple[list[str], list[str]]] = []
    for p in (store.manifest(frel) or {}).get("parts") or []:
        path = store.path(frel, p["path"])
        ids = [i for i in pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist()
               if i in wanted]
        if not ids:
            continue
        if not groups or len(groups[-1][1]) >= group_images:
            groups.append(([], []))
        groups[-1][0].append(path)
        groups[-1][1].extend(ids)
    covered = {i for _, ids in groups for i in ids}
    lost = [i for i in need if i not in covered]
    if lost:
        raise _no_features(store, frel, lost)
    return groups


# ---------------------------------------------------------------- CURRENT


def read_current(store: Store, gallery: str) -> dict[str, Any] | None:
    """The live pointer of a gallery (None when no version was ever switched live)."""
    try:
        cur = store.read_json(f"{index_root(gallery)}/{CURRENT}")
    except FileNotFoundError:
        return None
    if not isinstance(cur, dict) or not isinstance(cur.get("version"), str):
        raise GalleryError(f"{store.uri(index_root(gallery), CURRENT)} is not an index pointer (no 'version')")
    store.path(index_root(gallery), cur["version"])  # a version name that escapes the root is rejected
    return cur


def switch_current(store: Store, gallery: str, version: str, previous: str | None, **extra: Any) -> dict[str, Any]:
    """Point ``CURRENT`` at a committed version (one atomic write: rename locally, one PUT on S3)."""
    rel = f"{index_root(gallery)}/{version}"
    if store.manifest(rel) is None:
        raise GalleryError(f"cannot switch {gallery} to {store.uri(rel)}: it is not committed")
    cur = {"version": version, "previous": previous,
           "switched_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"), **extra}
    store.write_json(f"{index_root(gallery)}/{CURRENT}", cur)
    return cur


# ---------------------------------------------------------------- the live index


@dataclass
class LiveIndex:
    """What a new version may reuse from a committed one."""

    rel: str
    info: dict[str, Any]
    images: pa.Table
    captions: pa.Table
    words: pa.Table | None
    word_scores: np.ndarray | None

    @classmethod
    def load(cls, store: Store, rel: str) -> LiveIndex:
        info = read_index_file(store, rel, "index.json")
        words = read_index_file(store, rel, "words.parquet") if has_file(store, rel, "words.parquet") else None
        ws = read_index_file(store, rel, WORD_SCORES) if has_file(store, rel, WORD_SCORES) else None
        return cls(rel=rel, info=info, images=read_index_file(store, rel, "images.parquet"),
                   captions=read_index_file(store, rel, "captions.parquet"), words=words, word_scores=ws)


# ---------------------------------------------------------------- building a version


@dataclass
class CaptionVocabulary:
    """Caption words over one vocabulary V (the columns of the word-score matrix)."""

    words: list[str]  # V, sorted
    source: list[str]  # V: knowledge / ood
    prototypes: np.ndarray  # (V, Z) as scored (before normalisation)
    caption_word_ids: list[list[int]]  # T
    caption_words: list[list[str]]  # T
    dropped: list[list[str]]  # T: words without a vector
    parsed: int  # captions parsed in this run (the rest came from the live index)


def caption_vocabulary(cfg: MaskConfig, table, texts: list[str], caption_ids: list[str],
                       live: LiveIndex | None) -> CaptionVocabulary:
    """Caption words → one vocabulary with prototypes (knowledge rows / OOD eq. 11–13); captions whose
    id and text the live index already has keep its parse and its prototypes."""

    reuse: dict[str, tuple[list[str], list[str]]] = {}
    protos: dict[str, tuple[str, np.ndarray]] = {}
    if live is not None and live.words is not None:
        lc = live.captions
        dropped_col = lc.column("dropped_words").to_pylist() if "dropped_words" in lc.column_names \
            else [[] for _ in range(lc.num_rows)]
        for cid, text, ws, dr in zip(lc.column("caption_id").to_pylist(), lc.column("text").to_pylist(),
                                     lc.column("words").to_pylist(), dropped_col, strict=True):
            reuse[cid] = (text, (ws or [], dr or []))
        for w, s, p in zip(live.words.column("word").to_pylist(), live.words.column("source").to_pylist(),
                           live.words.column("prototype").to_numpy(zero_copy_only=False), strict=True):
            protos[w] = (s, np.asarray(p, np.float32))
    todo = [j for j, (cid, text) in enumerate(zip(caption_ids, texts, strict=True))
            if cid not in reuse or reuse[cid][0] != text]
    caption_words: list[list[str]] = [[] for _ in texts]
    dropped: list[list[str]] = [[] for _ in texts]
    for j, cid in enumerate(caption_ids):
        if cid in reuse and reuse[cid][0] == texts[j]:
            caption_words[j], dropped[j] = list(reuse[cid][1][0]), list(reuse[cid][1][1])
    if todo:
        cw = map_captions(cfg, table, [texts[j] for j in todo])
        rows = cw.prototypes
        if cfg.scoring.prototypes == "random-region":
            if cw.samples is None:
                raise GalleryError("scoring.prototypes=random-region: this knowledge has no sampled regions")
            rows = cw.samples
        for i, w in enumerate(cw.vocab):
            protos.setdefault(w, (cw.source[i], np.asarray(rows[i], np.float32)))
        for k, j in enumerate(todo):
            caption_words[j] = [cw.vocab[i] for i in cw.caption_words[k]]
            dropped[j] = list(cw.dropped[k]) if cw.dropped is not None else []
    vocab = sorted({w for ws in caption_words for w in ws})
    pos = {w: i for i, w in enumerate(vocab)}
    z = int(table.prototypes.shape[1])
    mat = np.stack([protos[w][1] for w in vocab]).astype(np.float32) if vocab else np.zeros((0, z), np.float32)
    return CaptionVocabulary(words=vocab, source=[protos[w][0] for w in vocab], prototypes=mat,
                             caption_word_ids=[[pos[w] for w in ws] for ws in caption_words],
                             caption_words=caption_words, dropped=dropped, parsed=len(todo))


@dataclass
class IndexBuild:
    """One built (and committed) index version."""

    rel: str
    version: str
    metrics: dict[str, Any]
    info: dict[str, Any]
    dense: np.ndarray | None
    reuse: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)


def _coverage(voc: CaptionVocabulary, empty: dict[str, int]) -> dict[str, int]:
    no_vector = sorted({w for d in voc.dropped for w in d})
    return {"captions": len(voc.caption_words),
            "captions_without_words": sum(1 for c in voc.caption_words if not c),
            "vocab": len(voc.words) + len(no_vector),
            "in_knowledge": sum(1 for s in voc.source if s == "knowledge"),
            "ood": sum(1 for s in voc.source if s == "ood"), "no_vector": len(no_vector), **empty}


def build_index(ctx: JobContext, run, knowledge, gallery: dict[str, Any], version: str, det_weights: str | None,
                live: LiveIndex | None = None, keep_dense: bool = False) -> IndexBuild:
    """Features → μ → caption words → per-word terms → eq. 10 scores, top-K, metrics → a committed version.

    Args:
        ctx: job context (config, store).
        run: the MLflow run (or NullRun).
        knowledge: a :class:`mask.pipeline.steps.ResolvedKnowledge`.
        gallery: :func:`mask.pipeline.steps.ensure_dataset` tables of the gallery.
        version: the version name to commit (``indexes/<gallery>/<version>``).
        det_weights: committed detector weights for feature extraction (None: ``detector.weights``).
        live: a committed version to reuse from (per-word terms of unchanged images and words, caption
            parses); None = from scratch (features and μ are still reused from their artifacts).
        keep_dense: return the dense matrix even when it is too large to store.
    """
    cfg, store = ctx.cfg, ctx.store
    name = cfg.gallery.name
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fsum = run_extraction(cfg, store, name, gallery["images"], None, det_weights, tracker=run)
    frel = features_rel(name, cfg.detector)
    content = features_content(store, frel)
    feat_ids = set(content)
    timings["features"] = time.perf_counter() - t0
    order = gallery_order(gallery["images"], gallery["captions"], feat_ids, name)
    if order.dropped_images:
        logger.warning("gallery %s: %d images have no features (see %s/_errors) and are left out",
                       name, order.dropped_images, store.uri(frel))
    # μ (eq. 1/3), only for images that have none for this knowledge
    t0 = time.perf_counter()
    mrel = mu_rel(cfg, knowledge)
    mhash = mrel.rsplit("/", 1)[-1]
    mu_info = ensure_mu(ctx, knowledge.pae_bytes, frel, mrel, mhash, order.image_ids, run.run_id, content)
    boxes = mu_ids(store, mrel)
    timings["mu"] = time.perf_counter() - t0
    kill_point("index.after_mu")
    # caption words and prototypes
    t0 = time.perf_counter()
    sh = score_hash(cfg, knowledge)
    reusable = live is not None and live.info.get("score_hash") == sh
    if live is not None and not reusable:
        logger.info("index %s was scored with another knowledge/scoring config; rescoring every pair "
                    "(features and μ are reused)", live.rel)
    voc = caption_vocabulary(cfg, knowledge.table, order.texts, order.caption_ids, live if reusable else None)
    timings["captions"] = time.perf_counter() - t0
    # per-word terms WS (N, V) and eq. 10 scores
    t0 = time.perf_counter()
    sc = _score_words(cfg, store, mrel, order, boxes, voc, content, live if reusable else None, keep_dense)
    res = sc.result
    timings["scoring"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if res.dense is not None:
        mask_metrics, source = recall_at_k(res.dense, caption_to_image=order.caption_to_image), "dense"
    else:
        mask_metrics = recall_from_topk(res.caption_top_images, res.image_top_captions, order.caption_to_image)
        source = "topk"
    timings["metrics"] = time.perf_counter() - t0
    cov = _coverage(voc, res.empty.as_dict())
    n, t = len(order.image_ids), len(order.caption_ids)
    reuse = _reuse_summary(live, sc, order, voc, mu_info, fsum)
    metrics = {"index_version": version, "mask": mask_metrics, "metrics_source": source, "coverage": cov,
               "images": n, "captions": t, "dropped_images": order.dropped_images, "dense": sc.write_dense,
               "fill_score": res.fill, "timings": timings, "reuse": reuse}
    info = _index_info(cfg, knowledge, gallery, version, store.uri(frel), mrel, sh, voc)
    t0 = time.perf_counter()
    rel = f"{index_root(name)}/{version}"
    _write_version(store, rel, version, order, boxes, voc, res, info, metrics, sc.write_dense, run.run_id, content)
    timings["write"] = time.perf_counter() - t0
    return IndexBuild(rel=rel, version=version, metrics=metrics, info=info, dense=res.dense, reuse=reuse,
                      features=fsum)


@dataclass
class _WordScoring:
    """What :func:`_score_words` scored and how much it reused from the live version."""

    result: Any  # the GalleryScorer's result
    write_dense: bool
    score_reuse: bool  # per-word terms were reused from the live version
    live_rows: dict[str, int]  # image id → its row in the live version, for images with unchanged features
    new_words: int  # words without a live column (all words when nothing is reused)
    rows_computed: int
    cells_computed: int


def _score_words(cfg: MaskConfig, store: Store, mrel: str, order: GalleryOrder, boxes: dict[str, int],
                 voc: CaptionVocabulary, content: dict[str, str | None], live: LiveIndex | None,
                 keep_dense: bool) -> _WordScoring:
    """Per-word terms WS (N, V) and the eq. 10 scores, chunk by chunk of images; WS of images whose
    features and words the ``live`` version (same score hash, or None) already scored are reused."""
    n, t, v = len(order.image_ids), len(order.caption_ids), len(voc.words)
    store_ws = n * max(v, 1) <= cfg.scoring.dense_max_pairs
    write_dense = n * t <= cfg.scoring.dense_max_pairs
    protos = normalize_rows(voc.prototypes) if cfg.scoring.normalize else voc.prototypes
    scorer = GalleryScorer(voc.caption_word_ids, protos, k_images=cfg.scoring.top_k, k_captions=cfg.scoring.top_k,
                           pooling=cfg.scoring.pooling, keep_dense=write_dense or keep_dense,
                           keep_word_scores=store_ws)
    if not np.array_equal(scorer.used_words, np.arange(v)):
        raise GalleryError("internal: the caption vocabulary has unused words")  # by construction it cannot
    live_ws = live.word_scores if live is not None and live.word_scores is not None and live.words is not None \
        else None
    live_rows: dict[str, int] = {}
    if live_ws is not None:  # images whose features (content) are those the live version scored
        live_content = live.images.column("content_sha256").to_pylist() if "content_sha256" in \
            live.images.column_names else [False] * live.images.num_rows
        live_rows = {x: i for i, (x, h) in enumerate(zip(live.images.column("image_id").to_pylist(), live_content,
                                                          strict=True)) if h is not False and h == content.get(x)}
    reuse_cols = WordScoreReuse.between(voc.words, live.words.column("word").to_pylist() if live_ws is not None else [])
    new_cols = reuse_cols.new_cols
    computed_rows = computed_cells = 0
    chunk = max(1, cfg.scoring.image_chunk)

    def mu_of(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        m, mask = padded_mu(read_mu(store, mrel, ids, ordered=False), ids)
        return (normalize_rows(m) if cfg.scoring.normalize else m), mask

    for i0 in range(0, n, chunk):
        ids = order.image_ids[i0:i0 + chunk]
        ok = np.asarray([boxes.get(x, 0) > 0 for x in ids], bool)
        if live_ws is None:
            m, mask = mu_of(ids)
            scorer.add(np.asarray(ids, object), m, mask)
            computed_rows += len(ids)
            computed_cells += len(ids) * v
            continue
        prev_rows = np.asarray([live_rows.get(x, -1) for x in ids], np.int64)
        old = prev_rows >= 0
        need = ~old | (old & bool(new_cols.size))  # rows that need μ: new images; all when words are new
        m_all, mask_all = mu_of([x for x, k in zip(ids, need, strict=True) if k]) if need.any() else (None, None)
        ws, rows_full, cells = reuse_word_scores(m_all, mask_all, need, prev_rows, live_ws, reuse_cols, protos,
                                                 pooling=cfg.scoring.pooling)
        computed_rows += rows_full
        computed_cells += cells
        scorer.add_word_scores(np.asarray(ids, object), ws, ok)
    return _WordScoring(result=scorer.result(), write_dense=write_dense, score_reuse=live_ws is not None,
                        live_rows=live_rows, new_words=int(new_cols.size) if live_ws is not None else v,
                        rows_computed=computed_rows, cells_computed=computed_cells)


def _reuse_summary(live: LiveIndex | None, sc: _WordScoring, order: GalleryOrder, voc: CaptionVocabulary,
                   mu_info: dict[str, Any], fsum: dict[str, Any]) -> dict[str, Any]:
    """The ``reuse`` entry of an index's metrics: what was reused from the live version, μ and features."""
    n, t, v = len(order.image_ids), len(order.caption_ids), len(voc.words)
    kept = sum(1 for x in order.image_ids if x in sc.live_rows)
    return {"reused_from": live.rel if live is not None else None, "score_reuse": sc.score_reuse,
            "images": n, "captions": t, "words": v,
            "images_new": n - kept,
            "images_removed": len(sc.live_rows) - kept,
            "captions_parsed": voc.parsed, "words_new": sc.new_words,
            "word_score_rows_computed": sc.rows_computed, "word_score_cells_computed": sc.cells_computed,
            "word_score_cells_reused": n * v - sc.cells_computed, "mu_computed": mu_info["computed"],
            "mu_changed": mu_info["changed"],
            "mu_commits": mu_info.get("commits", int(mu_info["computed"] > 0)),
            "mu_where": mu_info["where"], "features_extracted": int(fsum.get("extracted", 0) or 0)}


def _index_info(cfg: MaskConfig, knowledge, gallery: dict[str, Any], version: str, features_uri: str, mrel: str,
                sh: str, voc: CaptionVocabulary) -> dict[str, Any]:
    """An index version's ``index.json``: its inputs and the configs it was scored with."""
    return {"layout": INDEX_LAYOUT, "version": version, "gallery": cfg.gallery.name,
            "dataset_hash": gallery["summary"]["config_hash"],
            "knowledge_uri": knowledge.uri, "knowledge_version": knowledge.version,
            "features": features_uri, "extractor": extractor_name(cfg.detector), "mu": mrel, "score_hash": sh,
            "scoring": cfg.scoring.model_dump(mode="json"), "text": cfg.text.model_dump(mode="json"),
            "vectors": cfg.vectors.model_dump(mode="json"), "ood_method": cfg.knowledge.ood_method,
            "m": cfg.knowledge.m, "word_source": dict(zip(voc.words, voc.source, strict=True)),
            "inputs": {"knowledge": knowledge.uri, "gallery_dataset": gallery["summary"]["config_hash"]}}


@dataclass
class GalleryIndex:
    """The committed index of a gallery for a knowledge (:func:`ensure_index`)."""

    rel: str
    version: str
    metrics: dict[str, Any]
    reused: bool
    build: IndexBuild | None  # None when reused


def ensure_index(ctx: JobContext, run, knowledge, gallery: dict[str, Any], detector: Callable[[], str | None],
                 keep_dense: bool = False) -> GalleryIndex:
    """The gallery's index for this knowledge and scoring config: the committed version, or built from
    scratch by :func:`build_index` and committed (the main job's evaluation and ``score_gallery``).

    Args:
        ctx: job context (config, store).
        run: the MLflow run (or NullRun).
        knowledge: a :class:`mask.pipeline.steps.ResolvedKnowledge`.
        gallery: :func:`mask.pipeline.steps.ensure_dataset` tables of the gallery.
        detector: returns the committed detector weights for feature extraction; called only to build.
        keep_dense: return the dense matrix of a build even when it is too large to store.
    """
    cfg, store = ctx.cfg, ctx.store
    version = index_version(cfg, knowledge, gallery["summary"]["config_hash"],
                            gallery_content(cfg, gallery["images"].column("uri").to_pylist()))
    rel = f"{index_root(cfg.gallery.name)}/{version}"
    if store.committed(rel, version) is not None:
        logger.info("index %s is committed; reused", store.uri(rel))
        return GalleryIndex(rel, version, read_index_file(store, rel, "metrics.json"), True, None)
    built = build_index(ctx, run, knowledge, gallery, version, detector(), live=None, keep_dense=keep_dense)
    return GalleryIndex(rel, version, built.metrics, False, built)


def _topk_tables(order, res) -> tuple[pa.Table, pa.Table]:
    """``query_id, ids, scores`` tables of the top-K lists, built in Arrow (no per-row Python lists)."""
    def lists(names: list[str], pos: np.ndarray, val: np.ndarray, queries: list[str]) -> pa.Table:
        n, k = pos.shape
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * np.int32(k))
        ids = pa.array(names, pa.string()).take(pa.array(pos.reshape(-1).astype(np.int64)))
        return pa.table({"query_id": pa.array(queries, pa.string()),
                         "ids": pa.ListArray.from_arrays(offsets, ids),
                         "scores": pa.ListArray.from_arrays(offsets, pa.array(val.reshape(-1).astype(np.float32)))})

    t2i = lists(order.image_ids, res.caption_top_images, res.caption_top_scores, order.caption_ids)
    i2t = lists(order.caption_ids, res.image_top_captions, res.image_top_scores, order.image_ids)
    return t2i, i2t


def _write_version(store: Store, rel: str, version: str, order, boxes: dict[str, int], voc: CaptionVocabulary,
                   res, info: dict[str, Any], metrics: dict[str, Any], write_dense: bool,
                   run_id: str | None, content: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Commit one index version (files, then the manifest)."""
    t2i, i2t = _topk_tables(order, res)
    images = pa.table({"position": pa.array(np.arange(len(order.image_ids)), pa.int64()),
                       "image_id": pa.array(order.image_ids, pa.string()),
                       "num_boxes": pa.array([boxes.get(x, 0) for x in order.image_ids], pa.int32()),
                       "content_sha256": pa.array([(content or {}).get(x) for x in order.image_ids], pa.string())})
    captions = pa.table({"position": pa.array(np.arange(len(order.caption_ids)), pa.int64()),
                         "caption_id": pa.array(order.caption_ids, pa.string()),
                         "image_id": pa.array(order.caption_image, pa.string()),
                         "image_position": pa.array(order.caption_to_image, pa.int64()),
                         "text": pa.array(order.texts, pa.string()),
                         "words": pa.array(voc.caption_words, pa.list_(pa.string())),
                         "word_ids": pa.array(voc.caption_word_ids, pa.list_(pa.int32())),
                         "dropped_words": pa.array(voc.dropped, pa.list_(pa.string()))})
    words = pa.table({"word": pa.array(voc.words, pa.string()), "source": pa.array(voc.source, pa.string()),
                      "prototype": pa.array(list(voc.prototypes), pa.list_(pa.float32()))})
    with store.open_artifact(rel, kind="index", config_hash=version, inputs=info.get("inputs", {})) as w:
        w.write_file("images.parquet", parquet_bytes(images))
        w.write_file("captions.parquet", parquet_bytes(captions))
        w.write_file("words.parquet", parquet_bytes(words))
        w.write_file("t2i_topk.parquet", parquet_bytes(t2i))
        w.write_file("i2t_topk.parquet", parquet_bytes(i2t))
        if res.word_scores is not None:
            w.write_file(WORD_SCORES, npy_bytes(res.word_scores))
        if write_dense and res.dense is not None:
            w.write_file(DENSE_FILE, npy_bytes(res.dense))
        w.write_file("index.json", json.dumps(info, indent=2, sort_keys=True, default=str).encode())
        w.write_file("metrics.json", json.dumps(metrics, indent=2, sort_keys=True, default=str).encode())
        return w.commit(mlflow_run_id=run_id, extra={"images": len(order.image_ids),
                                                     "captions": len(order.caption_ids)})


def index_order(store: Store, rel: str):
    """The :class:`mask.pipeline.index.GalleryOrder` a committed index uses."""
    images = read_index_file(store, rel, "images.parquet")
    captions = read_index_file(store, rel, "captions.parquet")
    return GalleryOrder(image_ids=images.column("image_id").to_pylist(),
                        caption_ids=captions.column("caption_id").to_pylist(),
                        caption_image=captions.column("image_id").to_pylist(),
                        texts=captions.column("text").to_pylist(),
                        caption_to_image=np.asarray(captions.column("image_position").to_pylist(), np.int64))


def index_dense(cfg: MaskConfig, store: Store, rel: str) -> np.ndarray:
    """The MASK (N, T) matrix of a committed index: ``scores.npy``, else from ``word_scores.npy`` (one
    sparse product), else recomputed from μ."""

    if has_file(store, rel, DENSE_FILE):
        return read_index_file(store, rel, DENSE_FILE)
    info = read_index_file(store, rel, "index.json")
    sc = cfg.scoring.model_copy(update={k: info["scoring"][k] for k in ("normalize", "pooling")})  # as scored
    images = read_index_file(store, rel, "images.parquet")
    captions = read_index_file(store, rel, "captions.parquet")
    words = read_index_file(store, rel, "words.parquet")
    protos = np.asarray(words.column("prototype").to_pylist(), np.float32).reshape(words.num_rows, -1)
    if sc.normalize:
        protos = normalize_rows(protos)
    ids = images.column("image_id").to_pylist()
    ok = np.asarray(images.column("num_boxes").to_pylist()) > 0
    scorer = GalleryScorer(captions.column("word_ids").to_pylist(), protos, k_images=1, k_captions=1,
                           pooling=sc.pooling, keep_dense=True)
    if has_file(store, rel, WORD_SCORES):
        scorer.add_word_scores(np.asarray(ids, object), read_index_file(store, rel, WORD_SCORES), ok)
        return scorer.result().dense

    for i0 in range(0, len(ids), sc.image_chunk):
        chunk = ids[i0:i0 + sc.image_chunk]
        m, mask = padded_mu(read_mu(store, info["mu"], chunk), chunk)
        scorer.add(np.asarray(chunk, object), normalize_rows(m) if sc.normalize else m, mask)
    return scorer.result().dense


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
