"""Re-ranking a committed index against a base model's scores (eq. 15), and the one base-score reader.

:func:`load_base_scores` reads base-model scores in any of the accepted layouts (a dense ``.npy``,
pair or top-k Parquet, a committed ``jobs/base_scores.py`` artifact) and aligns them with the gallery
order; every problem is a :class:`~mask.pipeline.base_scores.BaseScoresError` naming the file.
:func:`rerank_index` commits ``indexes/<gallery>/<version>/rerank/<hash>/`` with R@K before and
after (Table 2 layout).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mask.config import MaskConfig
from mask.evaluation import markdown_table
from mask.metrics import METRIC_NAMES, recall_at_k
from mask.pipeline.base_scores import IDS_FILE, SCORES_FILE, BaseScoresError
from mask.pipeline.index import GalleryOrder, index_dense, index_order, parquet_bytes, read_index_file
from mask.rerank import rerank_both, rerank_topk
from mask.scoring import fill_score
from mask.storage import Store, fingerprint

logger = logging.getLogger(__name__)


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

    n, t = len(image_ids), len(caption_ids)
    name = f"rerank.base_scores {path}"
    if artifact is None and raw is None:
        artifact = base_scores_artifact(path, storage_options or {})
    if artifact is not None:  # a jobs/base_scores.py artifact: its ids say where each row and column goes
        a = read_base_scores_artifact(artifact[0], artifact[1])
        img_pos = {x: i for i, x in enumerate(image_ids)}
        cap_pos = {x: i for i, x in enumerate(caption_ids)}
        unknown = [x for x in a.image_ids if x not in img_pos] + [x for x in a.caption_ids if x not in cap_pos]
        if unknown:
            raise BaseScoresError(f"{name}: {len(unknown)} ids of the artifact are not in the gallery, e.g. "
                                  f"{unknown[:5]} (scored for another gallery?)")
        if not np.isfinite(a.scores).all():
            raise BaseScoresError(f"{name}: non-finite scores in the artifact's scores.npy")
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
        if not raw.startswith(b"\x93NUMPY"):
            # np.load takes anything without the NumPy magic for a pickle, and would say "pickled data"
            raise BaseScoresError(f"{name}: not a .npy file (no NumPy header; it starts with {raw[:8]!r}); "
                                  "save the (images × captions) matrix with numpy.save")
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            why = "it holds Python objects (dtype object), not numbers" if "pickle" in str(e) else str(e)
            raise BaseScoresError(f"{name}: not a readable .npy matrix: {why}; save a float matrix with "
                                  "numpy.save") from None
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
        keep = [k for k in METRIC_NAMES if k == "rsum" or k.split("_")[0] in base.directions]
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


@dataclass
class ArtifactScores:
    """A committed base-scores artifact, as the re-ranker reads it."""

    scores: np.ndarray  # (n_images, n_captions) float32
    image_ids: list[str]
    caption_ids: list[str]
    caption_image: np.ndarray  # (n_captions,) row of each caption's image
    excluded_image_ids: list[str] = field(default_factory=list)
    excluded_caption_ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def read_base_scores_artifact(store: Store, rel: str) -> ArtifactScores:
    """Read ``scores.npy`` and ``ids.json`` of a committed artifact (SHA-256 checked by the store).

    Raises:
        ArtifactNotFound: nothing committed at ``rel``.
        BaseScoresError: the matrix and the ids disagree.
    """

    ids = json.loads(store.read_file(rel, IDS_FILE))
    scores = np.load(io.BytesIO(store.read_file(rel, SCORES_FILE)), allow_pickle=False)
    shape = (len(ids["image_ids"]), len(ids["caption_ids"]))
    if scores.shape != shape:
        raise BaseScoresError(f"base scores {store.uri(rel)}: matrix {scores.shape} does not match the ids {shape}")
    meta = {k: v for k, v in ids.items() if k not in ("image_ids", "caption_ids", "caption_image",
                                                      "excluded_image_ids", "excluded_caption_ids")}
    return ArtifactScores(scores=scores, image_ids=ids["image_ids"], caption_ids=ids["caption_ids"],
                      caption_image=np.asarray(ids["caption_image"], np.int64),
                      excluded_image_ids=ids["excluded_image_ids"], excluded_caption_ids=ids["excluded_caption_ids"],
                      meta=meta)
