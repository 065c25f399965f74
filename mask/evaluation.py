"""The evaluator: captions → words → prototypes → eq. 10 → R@K, and the paper-style tables.

:func:`map_captions` gives every caption word a prototype (knowledge rows, OOD rows by eq. 11–13);
:func:`gallery_scores` is eq. 10 on padded μ (:func:`padded_mu`); :func:`evaluate` reports MASK next
to the paper's ablations that need no retraining — without OOD words (Table 3), without region
prototypes (a random region of the word, Table 1), without max-mean pooling (global mean, Table 1) —
and next to chance level; :func:`format_table` / :func:`markdown_table` print Tables 1/2.
Used by the main job, the index build (caption words), the Tune trials and the evaluation job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mask.config import MaskConfig
from mask.finetune import finetune_prototypes
from mask.knowledge import build_prototypes_for
from mask.metrics import METRIC_NAMES, recall_at_k
from mask.scoring import score_matrix
from mask.text import ContentWordParser
from mask.vectors import load_vectors, vectors_for

logger = logging.getLogger(__name__)


@dataclass
class CaptionWords:
    """Caption words mapped onto a prototype matrix."""

    caption_words: list[list[int]]  # per caption: rows into ``prototypes``
    prototypes: np.ndarray  # (W, Z)
    samples: np.ndarray | None  # (W, Z) one region μ per word (random-region ablation), NaN rows where none
    vocab: list[str]
    source: list[str]  # per vocab word: knowledge / ood
    coverage: dict[str, int]
    dropped: list[list[str]] | None = None  # per caption: its words without a vector (dropped, counted)


def map_captions(cfg: MaskConfig, table, texts: list[str], parser=None, kv=None,
                 ood_method: str | None = None, m: int | None = None) -> CaptionWords:
    """Parse captions into content words and give each word a prototype (knowledge or OOD, eq. 11–13).

    Words with no prototype and no vector are dropped and counted (``coverage["no_vector"]``).
    """

    parser = parser or ContentWordParser.from_config(cfg.text)
    kv = kv if kv is not None else load_vectors(cfg.vectors.source, cfg.vectors.format, cfg.vectors.cache_dir)
    words_per_caption = parser.parse_batch(texts)
    vocab = sorted({w for ws in words_per_caption for w in ws})

    def lookup(ws: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return vectors_for(kv, ws)

    method = ood_method or cfg.knowledge.ood_method
    protos, source, counts = build_prototypes_for(vocab, table, lookup, method, m or cfg.knowledge.m,
                                                  **cfg.knowledge.ood_options())
    keep = [i for i, s in enumerate(source) if s != "missing"]
    remap = {vocab[i]: j for j, i in enumerate(keep)}
    caption_words = [[remap[w] for w in ws if w in remap] for ws in words_per_caption]
    samples = None
    if table.samples is not None:
        idx = table.index()
        z = table.prototypes.shape[1]
        samples = np.full((len(keep), z), np.nan, np.float32)
        for j, i in enumerate(keep):
            k = idx.get(vocab[i])
            if k is not None:
                samples[j] = table.samples[k]
            else:  # an OOD word has no region of its own; fall back to its constructed prototype
                samples[j] = protos[i]
    coverage = {
        "captions": len(texts),
        "captions_without_words": sum(1 for c in caption_words if not c),
        "vocab": len(vocab),
        "in_knowledge": sum(1 for s in source if s == "knowledge"),
        "ood": sum(1 for s in source if s == "ood"),
        "no_vector": sum(1 for s in source if s == "missing"),
    }
    return CaptionWords(caption_words, np.asarray(protos)[keep], samples, [vocab[i] for i in keep],
                        [source[i] for i in keep], coverage,
                        dropped=[[w for w in ws if w not in remap] for ws in words_per_caption])


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def gallery_scores(image_mu: np.ndarray, image_mask: np.ndarray, cw: CaptionWords, normalize: bool,
                   pooling: str = "max-mean", prototypes: np.ndarray | None = None) -> np.ndarray:
    """(N_images, N_captions) similarity of eq. 10 (or the global-mean ablation)."""
    protos = cw.prototypes if prototypes is None else prototypes
    mu = image_mu
    if normalize:
        mu, protos = _normalise(image_mu), _normalise(protos)
    return score_matrix(mu, image_mask, cw.caption_words, protos, pooling=pooling)


def finetune_knowledge(fcfg, image_mu: np.ndarray, image_mask: np.ndarray, cw: CaptionWords
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Appendix H on a gallery: learn W (eq. 88–93) from its images and captions drawn **independently**
    (unpaired batches: ``finetune.images_per_batch`` images' regions, ``finetune.captions_per_batch``
    captions' words, seeded), and return the fine-tuned prototypes ``v̂ = v W`` of the caption words.

    Returns:
        ``(prototypes (W, Z) float32, {"steps", "loss_ss_first", "loss_ss_last", "loss_r2w_last",
        "loss_w2r_last", "history": [per-step terms]})``.
    """
    rng = np.random.default_rng(fcfg.seed)
    n_img, n_cap = image_mu.shape[0], len(cw.caption_words)
    with_words = [t for t in range(n_cap) if cw.caption_words[t]]
    mu_batches, word_batches = [], []
    for _ in range(fcfg.steps):
        imgs = rng.choice(n_img, size=min(fcfg.images_per_batch, n_img), replace=False)
        caps = rng.choice(with_words, size=min(fcfg.captions_per_batch, len(with_words)), replace=False) \
            if with_words else []
        mu_batches.append(image_mu[imgs][image_mask[imgs]])  # (I, Z) real regions of those images
        word_batches.append(np.unique(np.asarray([w for t in caps for w in cw.caption_words[t]], np.int64)))
    hist: list[dict[str, float]] = []
    w = finetune_prototypes(cw.prototypes, mu_batches, word_batches, fcfg.steps, lr=fcfg.lr, seed=fcfg.seed,
                            normalize=fcfg.normalize, reduction=fcfg.reduction, history=hist)
    info: dict[str, Any] = {"steps": len(hist), "history": hist}
    if hist:
        info.update({"loss_ss_first": hist[0]["loss_ss"], "loss_ss_last": hist[-1]["loss_ss"],
                     "loss_r2w_last": hist[-1]["loss_r2w"], "loss_w2r_last": hist[-1]["loss_w2r"]})
    return (np.asarray(cw.prototypes, np.float32) @ w).astype(np.float32), info


def chance_recall(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected R@K of a random ranking (percent)."""
    out = {}
    n_caps = n_images * captions_per_image
    for k in (1, 5, 10):
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
        # image→text hits if any of its captions is in the top k of n_caps
        miss = 1.0
        for j in range(min(k, n_caps)):
            miss *= (n_caps - captions_per_image - j) / (n_caps - j)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - max(miss, 0.0))
    out["rsum"] = sum(out.values())
    return out


def evaluate(cfg: MaskConfig, table, image_ids: list[str], mu_table: pa.Table, captions: pa.Table,
             rng_seed: int = 0) -> dict[str, Any]:
    """MASK and its ablations on one gallery; returns {variant: metrics} plus coverage.

    Captions are grouped by image in the order of ``image_ids`` (5 per image in the standard splits).
    """
    cap_img = captions.column("image_id").to_pylist()
    texts = captions.column("text").to_pylist()
    pos = {x: i for i, x in enumerate(image_ids)}
    order = sorted(range(len(cap_img)), key=lambda j: (pos[cap_img[j]], j))
    texts = [texts[j] for j in order]
    caption_to_image = np.asarray([pos[cap_img[j]] for j in order])
    mu, mask = padded_mu(mu_table, image_ids)
    cw = map_captions(cfg, table, texts)
    sc = cfg.scoring
    results: dict[str, Any] = {"coverage": cw.coverage}

    def metrics(sim: np.ndarray) -> dict[str, float]:
        return recall_at_k(sim, caption_to_image=caption_to_image)

    results["mask"] = metrics(gallery_scores(mu, mask, cw, sc.normalize, sc.pooling))
    if cfg.finetune.enabled:  # Appendix H: the same gallery with the fine-tuned knowledge v̂ = v W
        tuned, info = finetune_knowledge(cfg.finetune, mu, mask, cw)
        results["mask_finetuned"] = metrics(gallery_scores(mu, mask, cw, sc.normalize, sc.pooling, prototypes=tuned))
        results["finetune"] = info
    if cfg.knowledge.ood_method != "none":
        cw_no = map_captions(cfg, table, texts, ood_method="none")
        results["mask_without_ood"] = metrics(gallery_scores(mu, mask, cw_no, sc.normalize, sc.pooling))
    if cw.samples is not None:
        results["without_prototypes"] = metrics(
            gallery_scores(mu, mask, cw, sc.normalize, sc.pooling, prototypes=cw.samples))
    results["without_max_mean"] = metrics(gallery_scores(mu, mask, cw, sc.normalize, "mean"))
    results["chance"] = chance_recall(len(image_ids), max(1, round(len(texts) / max(len(image_ids), 1))))
    return results


def format_table(results: dict[str, Any]) -> str:
    """Paper-style Markdown table (Table 1 columns: image retrieval = t2i, annotation = i2t)."""
    head = "| variant | IR R@1 | IR R@5 | IR R@10 | IA R@1 | IA R@5 | IA R@10 | Rs |"
    lines = [head, "|" + "---|" * 8]
    for name, m in results.items():
        if not isinstance(m, dict) or "rsum" not in m:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.1f}" for c in METRIC_NAMES) + " |")
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict[str, float]], first: str = "method") -> str:
    """Paper-style Markdown (Tables 1/2: image retrieval IR = text→image, annotation IA = image→text);
    a metric a row lacks prints as "–"."""
    head = f"| {first} | IR R@1 | IR R@5 | IR R@10 | IA R@1 | IA R@5 | IA R@10 | Rs |"
    lines = [head, "|" + "---|" * 8]
    for name, m in rows.items():
        cells = [f"{m[c]:.1f}" if c in m and np.isfinite(m[c]) else "–" for c in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def padded_mu(table: pa.Table, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """μ rows in the order of ``image_ids`` → (N, R, Z) and mask (N, R) (one flat copy out of Arrow,
    no per-row Python lists)."""
    index = {x: i for i, x in enumerate(table.column("image_id").to_pylist())}
    missing = [x for x in image_ids if x not in index]
    if missing:
        raise KeyError(f"no region representations for {len(missing)} images, e.g. {missing[:3]}")
    z = int(table.column("latent_dim")[0].as_py()) if table.num_rows else 0
    counts = np.asarray(table.column("num_boxes").to_numpy(zero_copy_only=False), np.int64)
    col = table.column("mu").combine_chunks() if table.num_rows else None
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32) if col is not None else None
    offsets = np.asarray(col.offsets.to_numpy(), np.int64) if col is not None else None
    starts = offsets[:-1] - offsets[0] if col is not None else None  # flatten() starts at the first offset
    rows = np.asarray([index[x] for x in image_ids], np.int64)
    r = int(max(counts[rows].max(initial=0), 1)) if rows.size else 1
    out = np.zeros((len(image_ids), r, z), np.float32)  # (N, R, Z)
    mask = np.zeros((len(image_ids), r), bool)  # (N, R)
    for j, i in enumerate(rows):
        c = int(counts[i])
        if c:
            out[j, :c] = flat[starts[i]:starts[i] + c * z].reshape(c, z)
            mask[j, :c] = True
    return out, mask
