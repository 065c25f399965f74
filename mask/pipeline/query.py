"""Ad-hoc retrieval against a committed gallery index (``jobs/query.py``): text → images, image → captions.

:class:`QueryEngine` loads the index's μ, caption words, the knowledge, the word vectors and the
caption parser **once**; each query then costs one matrix product over the gallery's regions:

* text → images: the query's content words (the configured parser) get prototypes — knowledge rows,
  OOD prototypes by ``knowledge.ood_method`` / ``m`` (eq. 11–13), or nothing when the word has no
  vector ("missing", reported and dropped) — and every image is scored by eq. 10;
* image → captions: the image's μ against the prototypes of the index's caption vocabulary (built
  at load), max over its regions, then the mean over each caption's words (a sparse product).

Entries without an eq. 10 score (an image without regions, a query or caption without words) get
the fill score of :mod:`mask.scoring` and rank last.  No Ray is needed.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from mask.config import MaskConfig
from mask.datasets.records import dataset_rel
from mask.errors import MaskError
from mask.evaluation import padded_mu
from mask.knowledge import build_prototypes_for
from mask.pipeline.index import find_index, read_index_file, read_mu, read_rows
from mask.pipeline.steps import resolve_and_load_knowledge
from mask.report.evidence import Match, Panel, render_evidence
from mask.scoring import _fill_padding, fill_score, index_captions, normalize_rows, topk
from mask.storage import Store
from mask.text import ContentWordParser
from mask.vectors import load_vectors, vectors_for

logger = logging.getLogger(__name__)


class QueryError(MaskError, ValueError):
    """A query that cannot be answered (unknown image id, empty text), with the input named."""


class QueryEngine:
    """A gallery index loaded for queries.

    Args:
        cfg: config (text parser, vectors, knowledge.ood_method / m, scoring.normalize).
        table: the knowledge table (:class:`mask.knowledge.KnowledgeTable`).
        mu: μ rows (``image_id, mu, num_boxes, latent_dim``) in the order of ``image_ids``.
        image_ids: N gallery image ids.
        caption_ids: T caption ids.
        caption_texts: T caption texts.
        caption_words: T lists of the captions' content words (as the index stored them).
        parser: a :class:`mask.text.ContentWordParser` (None: from ``cfg.text``).
        kv: word vectors (None: loaded from ``cfg.vectors``).
    """

    def __init__(self, cfg: MaskConfig, table, mu: pa.Table, image_ids: list[str], caption_ids: list[str],
                 caption_texts: list[str], caption_words: list[list[str]], parser=None, kv=None):

        self.cfg = cfg
        self.table = table
        self.parser = parser or ContentWordParser.from_config(cfg.text)
        self.kv = kv if kv is not None else load_vectors(cfg.vectors.source, cfg.vectors.format,
                                                         cfg.vectors.cache_dir)
        self._lookup = lambda ws: vectors_for(self.kv, ws)
        self.image_ids = list(image_ids)
        self._image_pos = {x: i for i, x in enumerate(self.image_ids)}
        self.caption_ids = list(caption_ids)
        self.caption_texts = list(caption_texts)
        m, mask = padded_mu(mu, self.image_ids)  # (N, R, Z), (N, R)
        if cfg.scoring.normalize:
            m = normalize_rows(m)
        self._mu = m
        self._mask = mask
        self._has_regions = mask.any(axis=1)  # (N,)
        n, r, z = m.shape
        self._r = r
        self._x = torch.from_numpy(np.ascontiguousarray(_fill_padding(m, mask)).reshape(n * r, z))  # (N·R, Z)
        # the captions' vocabulary → prototypes once; captions as a sparse caption × word matrix
        vocab = sorted({w for ws in caption_words for w in ws})
        protos, source, _ = build_prototypes_for(vocab, table, self._lookup, cfg.knowledge.ood_method, cfg.knowledge.m,
                                                 **cfg.knowledge.ood_options())
        kept = [w for w, s in zip(vocab, source, strict=True) if s != "missing"]
        keep = {w: j for j, w in enumerate(kept)}
        rows = np.asarray([i for i, s in enumerate(source) if s != "missing"], np.int64)
        vprotos = protos[rows] if rows.size else np.zeros((0, table.latent_dim), np.float32)
        if cfg.scoring.normalize:
            vprotos = normalize_rows(vprotos)
        caps = index_captions([[keep[w] for w in ws if w in keep] for ws in caption_words], len(keep))
        self._cap_protos = torch.from_numpy(np.ascontiguousarray(vprotos[caps.used]))  # (Vu, Z)
        self._cap_vocab = [kept[u] for u in caps.used]  # the Vu words, for the evidence of image → text
        self._cap_weights_t = caps.weights.T.tocsr()  # (T, Vu)
        self._caption_ok = ~caps.empty

    @classmethod
    def from_index(cls, cfg: MaskConfig, store: Store, rel: str, **kw) -> QueryEngine:
        """Load a committed index (``indexes/<gallery>/<version>``) and its knowledge."""

        info = read_index_file(store, rel, "index.json")
        knowledge = resolve_and_load_knowledge(cfg, store, info["knowledge_uri"])
        images = read_index_file(store, rel, "images.parquet")
        captions = read_index_file(store, rel, "captions.parquet")
        ids = images.column("image_id").to_pylist()
        return cls(cfg, knowledge.table, read_mu(store, info["mu"], ids), ids,
                   captions.column("caption_id").to_pylist(), captions.column("text").to_pylist(),
                   captions.column("words").to_pylist(), **kw)

    # ------------------------------------------------------------------------------------------

    def words(self, text: str) -> tuple[list[dict[str, str]], np.ndarray]:
        """The query's content words with their source, and the prototypes of those that have one.

        Returns:
            ([{"word", "source" (knowledge / ood / missing)}], (W, Z) prototypes of the non-missing words).

        Raises:
            QueryError: no word of the text has a prototype; the message lists every word dropped and why
                (a stopword, not a noun/adjective, no word vector).
        """

        if not isinstance(text, str):
            raise QueryError(f"query text: expected a str, got {type(text).__name__}")
        ws = self.parser.parse(text)
        protos, source, _ = build_prototypes_for(ws, self.table, self._lookup, self.cfg.knowledge.ood_method,
                                                 self.cfg.knowledge.m, **self.cfg.knowledge.ood_options())
        used = np.asarray([s != "missing" for s in source], bool)
        if not used.any():
            raise QueryError(self._nothing_to_score(text, ws))
        p = protos[used]
        if self.cfg.scoring.normalize:
            p = normalize_rows(p)
        return [{"word": w, "source": s} for w, s in zip(ws, source, strict=True)], p

    def _nothing_to_score(self, text: str, words: list[str]) -> str:
        if not text.strip():
            return f"text query {text!r}: empty; give a few nouns or adjectives (\"red car\")"
        why = [f"{tok!r} ({reason})" for tok, reason in self.parser.explain(text) if reason]
        why += [f"{w!r} (no word vector in {self.cfg.vectors.source} and not in the knowledge)" for w in words]
        return (f"text query {text!r}: no word to score with; dropped {', '.join(why) or 'every token'}; "
                "use nouns or adjectives that have word vectors")

    def text_to_images(self, text: str, top: int = 10) -> dict[str, Any]:
        """Eq. 10 of the text against every image; the ``top`` best images.

        Returns:
            ``{"query", "words", "results": [{"image_id", "score", "regions"}], "seconds"}``; ``regions``
            is the evidence of eq. 10: for each scored word, the image's region with the highest
            similarity (the arg-max of the max over regions) and that similarity,
            ``[{"word", "region", "score"}]`` (empty for an image without regions).

        Raises:
            QueryError: no word of the text has a prototype (the dropped words and why are named).
        """

        t0 = time.perf_counter()
        words, p = self.words(text)
        scored = [w["word"] for w in words if w["source"] != "missing"]
        n = len(self.image_ids)
        sims = (self._x @ torch.from_numpy(np.ascontiguousarray(p)).T).view(n, self._r, -1)  # (N, R, W)
        best, arg = torch.max(sims, dim=1)  # (N, W): eq. 10's max over regions, and which region
        scores = best.mean(dim=1).numpy()  # (N,)
        if not self._has_regions.all():
            real = scores[self._has_regions]
            scores[~self._has_regions] = fill_score(float(real.min()) if real.size else None)
        idx, val = topk(scores, min(int(top), n))
        results = []
        for i, v in zip(idx, val, strict=True):
            ev = [] if not self._has_regions[i] else \
                [{"word": w, "region": int(arg[i, k]), "score": float(best[i, k])} for k, w in enumerate(scored)]
            results.append({"image_id": self.image_ids[i], "score": float(v), "regions": ev})
        return {"query": text, "words": words, "results": results, "seconds": time.perf_counter() - t0}

    def image_to_captions(self, image_id: str, top: int = 10) -> dict[str, Any]:
        """Eq. 10 of one gallery image against every caption; the ``top`` best captions.

        Returns:
            ``{"query", "results": [{"caption_id", "text", "score", "regions"}], "seconds"}``; ``regions``
            is, for each word of the caption, the image's region that matched it best (eq. 10's arg-max)
            and the similarity, ``[{"word", "region", "score"}]``.

        Raises:
            QueryError: the image is not in the index.
        """

        t0 = time.perf_counter()
        i = self._image_pos.get(str(image_id))
        if i is None:
            raise QueryError(f"image {image_id!r} is not in the index ({len(self.image_ids)} images)")
        t = len(self.caption_ids)
        per_word = arg = None
        if not self._has_regions[i] or self._cap_protos.shape[0] == 0:
            scores = np.full(t, fill_score(None), np.float32)
        else:
            regions = np.flatnonzero(self._mask[i])  # the image's real regions, in μ order
            mu = torch.from_numpy(self._mu[i][regions])  # (r, Z)
            best, arg = torch.max(mu @ self._cap_protos.T, dim=0)  # (Vu,): eq. 10's max over regions, and where
            per_word = best.numpy()
            arg = regions[arg.numpy()]
            scores = np.asarray(self._cap_weights_t @ per_word, np.float32)  # (T,)
            if not self._caption_ok.all():
                real = scores[self._caption_ok]
                scores[~self._caption_ok] = fill_score(float(real.min()) if real.size else None)
        idx, val = topk(scores, min(int(top), t))
        results = []
        for j, v in zip(idx, val, strict=True):
            ev = []
            if per_word is not None:
                cols = self._cap_weights_t.indices[self._cap_weights_t.indptr[j]:self._cap_weights_t.indptr[j + 1]]
                ev = [{"word": self._cap_vocab[u], "region": int(arg[u]), "score": float(per_word[u])} for u in cols]
            results.append({"caption_id": self.caption_ids[j], "text": self.caption_texts[j], "score": float(v),
                            "regions": ev})
        return {"query": str(image_id), "results": results, "seconds": time.perf_counter() - t0}


def query_job(cfg: MaskConfig, index_ref: str | None, texts: list[str], images: list[str],
              top: int = 10, show: str | None = None) -> dict[str, Any]:
    """Load an index once, answer text and image queries; optionally draw the evidence.

    Args:
        show: a ``.png`` / ``.html`` file: each query's top images with the region each word matched
            (eq. 10's arg-max), boxed and labelled with the word and its score (one file per query:
            ``name.png``, then ``name-2.png``, …).

    Returns:
        ``{"index", "load_seconds", "text": [...], "image": [...], "shown": [files]}`` (see the
        QueryEngine methods).
    """

    if show is not None and os.path.splitext(show)[1].lower() not in (".png", ".html", ".htm"):
        raise QueryError(f"--show {show}: expected a .png or .html file")
    store = Store(cfg.storage.root, cfg.storage.options)
    rel = find_index(cfg, store, index_ref)
    t0 = time.perf_counter()
    engine = QueryEngine.from_index(cfg, store, rel)
    load = time.perf_counter() - t0
    out = {"index": store.uri(rel), "load_seconds": load,
           "text": [engine.text_to_images(q, top) for q in texts],
           "image": [engine.image_to_captions(q, top) for q in images]}
    if show is not None:
        out["shown"] = show_evidence(store, rel, out, show)
    return out


#: At most this many results of a query are drawn (a grid of 3 columns).
SHOW_MAX = 9


def show_evidence(store: Store, rel: str, out: dict[str, Any], path: str) -> list[str]:
    """Draw every query of ``out`` (see :func:`query_job`) into ``path`` (``-2``, ``-3`` … for more queries)."""
    info = read_index_file(store, rel, "index.json")
    queries = [("text", q) for q in out["text"]] + [("image", q) for q in out["image"]]
    ids = sorted({h["image_id"] for kind, q in queries if kind == "text" for h in q["results"][:SHOW_MAX]}
                 | {q["query"] for kind, q in queries if kind == "image"})
    boxes = _boxes(store, info["features"], ids)
    uris = _image_uris(store, info["gallery"], ids)
    stem, ext = os.path.splitext(path)
    written = []
    for n, (kind, q) in enumerate(queries):
        panels = []
        for r, hit in enumerate(q["results"][:SHOW_MAX], 1):
            image_id = hit["image_id"] if kind == "text" else q["query"]
            b = boxes.get(image_id)
            matches = [Match(m["word"], tuple(float(v) for v in b[m["region"]]), m["score"])
                       for m in hit["regions"] if b is not None and m["region"] < len(b)]
            title = f"{r}. {image_id}  eq.10 {hit['score']:.3f}" if kind == "text" else \
                f"{r}. {hit['text'][:60]}  eq.10 {hit['score']:.3f}"
            image, note = _load_rgb(uris.get(image_id), store)
            panels.append(Panel(title=title, image=image, matches=matches,
                                note=note or ("" if matches else "no region matched (no regions)")))
        heading = (f"text {q['query']!r}: top {len(panels)} images, each word's best region (eq. 10)"
                   if kind == "text" else
                   f"image {q['query']}: top {len(panels)} captions, each caption word's best region (eq. 10)")
        target = path if n == 0 else f"{stem}-{n + 1}{ext}"
        written.append(render_evidence(panels, target, heading))
        logger.info("query evidence: %s", target)
    return written


def _boxes(store: Store, features_uri: str, ids: list[str]) -> dict[str, np.ndarray]:
    """image_id → (n, 4) xyxy boxes in original pixels, from the features artifact the index was built on."""
    root = store.root.rstrip("/")
    uri = features_uri.rstrip("/")
    fstore, frel = (store, uri[len(root) + 1:]) if uri.startswith(root + "/") else \
        (Store(uri.rsplit("/", 1)[0], store.options), uri.rsplit("/", 1)[1])
    t = read_rows(fstore, frel, ids, columns=["image_id", "boxes"])
    if t is None:
        return {}
    return {x: np.asarray(b, np.float32).reshape(-1, 4)
            for x, b in zip(t.column("image_id").to_pylist(), t.column("boxes").to_pylist(), strict=True)}


def _image_uris(store: Store, gallery: str, ids: list[str]) -> dict[str, str]:
    rel = dataset_rel(gallery, "images")
    if store.manifest(rel) is None:
        return {}
    t = store.read_table(rel, columns=["image_id", "uri"])
    want = set(ids)
    return {x: u for x, u in zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist(), strict=True)
            if x in want}


def _load_rgb(uri: str | None, store: Store) -> tuple[np.ndarray | None, str]:
    """The image as (H, W, 3) uint8 in the orientation the boxes use (EXIF applied), or (None, why)."""
    if uri is None:
        return None, "image not in the gallery dataset"
    try:
        with fsspec.open(uri, "rb", **(store.options or {})) as f, Image.open(f) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB")), ""
    except Exception as e:  # noqa: BLE001 - an unreadable image is drawn as a note, the others still are
        return None, f"cannot read {uri}: {type(e).__name__}"
