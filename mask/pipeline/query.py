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
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mask.config import MaskConfig
from mask.errors import MaskError
from mask.evaluation import padded_mu
from mask.knowledge import build_prototypes_for
from mask.pipeline.index import find_index, read_index_file, read_mu
from mask.pipeline.steps import resolve_and_load_knowledge
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
        protos, source, _ = build_prototypes_for(vocab, table, self._lookup, cfg.knowledge.ood_method, cfg.knowledge.m)
        keep = {w: j for j, w in enumerate(w for w, s in zip(vocab, source, strict=True) if s != "missing")}
        rows = np.asarray([i for i, s in enumerate(source) if s != "missing"], np.int64)
        vprotos = protos[rows] if rows.size else np.zeros((0, table.latent_dim), np.float32)
        if cfg.scoring.normalize:
            vprotos = normalize_rows(vprotos)
        caps = index_captions([[keep[w] for w in ws if w in keep] for ws in caption_words], len(keep))
        self._cap_protos = torch.from_numpy(np.ascontiguousarray(vprotos[caps.used]))  # (Vu, Z)
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
        """

        if not isinstance(text, str):
            raise QueryError(f"query text: expected a str, got {type(text).__name__}")
        ws = self.parser.parse(text)
        protos, source, _ = build_prototypes_for(ws, self.table, self._lookup, self.cfg.knowledge.ood_method,
                                                 self.cfg.knowledge.m)
        used = np.asarray([s != "missing" for s in source], bool)
        p = protos[used]
        if self.cfg.scoring.normalize:
            p = normalize_rows(p)
        return [{"word": w, "source": s} for w, s in zip(ws, source, strict=True)], p

    def text_to_images(self, text: str, top: int = 10) -> dict[str, Any]:
        """Eq. 10 of the text against every image; the ``top`` best images.

        Returns:
            ``{"query", "words", "results": [{"image_id", "score"}], "seconds"}``.
        """

        t0 = time.perf_counter()
        words, p = self.words(text)
        n = len(self.image_ids)
        if p.shape[0] == 0:
            scores = np.full(n, fill_score(None), np.float32)
            logger.warning("query %r has no word with a prototype (%s); every image gets the fill score", text, words)
        else:
            sims = self._x @ torch.from_numpy(np.ascontiguousarray(p)).T  # (N·R, W)
            scores = torch.amax(sims.view(n, self._r, -1), dim=1).mean(dim=1).numpy()  # (N,)
            if not self._has_regions.all():
                real = scores[self._has_regions]
                scores[~self._has_regions] = fill_score(float(real.min()) if real.size else None)
        idx, val = topk(scores, min(int(top), n))
        return {"query": text, "words": words,
                "results": [{"image_id": self.image_ids[i], "score": float(v)} for i, v in zip(idx, val, strict=True)],
                "seconds": time.perf_counter() - t0}

    def image_to_captions(self, image_id: str, top: int = 10) -> dict[str, Any]:
        """Eq. 10 of one gallery image against every caption; the ``top`` best captions.

        Returns:
            ``{"query", "results": [{"caption_id", "text", "score"}], "seconds"}``.

        Raises:
            QueryError: the image is not in the index.
        """

        t0 = time.perf_counter()
        i = self._image_pos.get(str(image_id))
        if i is None:
            raise QueryError(f"image {image_id!r} is not in the index ({len(self.image_ids)} images)")
        t = len(self.caption_ids)
        if not self._has_regions[i] or self._cap_protos.shape[0] == 0:
            scores = np.full(t, fill_score(None), np.float32)
        else:
            mu = torch.from_numpy(self._mu[i][self._mask[i]])  # (r, Z)
            per_word = torch.amax(mu @ self._cap_protos.T, dim=0).numpy()  # (Vu,)
            scores = np.asarray(self._cap_weights_t @ per_word, np.float32)  # (T,)
            if not self._caption_ok.all():
                real = scores[self._caption_ok]
                scores[~self._caption_ok] = fill_score(float(real.min()) if real.size else None)
        idx, val = topk(scores, min(int(top), t))
        return {"query": str(image_id),
                "results": [{"caption_id": self.caption_ids[j], "text": self.caption_texts[j], "score": float(v)}
                            for j, v in zip(idx, val, strict=True)],
                "seconds": time.perf_counter() - t0}


def query_job(cfg: MaskConfig, index_ref: str | None, texts: list[str], images: list[str],
              top: int = 10) -> dict[str, Any]:
    """Load an index once, answer text and image queries.

    Returns:
        ``{"index", "load_seconds", "text": [...], "image": [...]}`` (see the QueryEngine methods).
    """

    store = Store(cfg.storage.root, cfg.storage.options)
    rel = find_index(cfg, store, index_ref)
    t0 = time.perf_counter()
    engine = QueryEngine.from_index(cfg, store, rel)
    load = time.perf_counter() - t0
    return {"index": store.uri(rel), "load_seconds": load,
            "text": [engine.text_to_images(q, top) for q in texts],
            "image": [engine.image_to_captions(q, top) for q in images]}
