"""The t-SNE map of knowledge prototypes with semantic groups marked (the paper's Figure 3).

Figure 3 embeds each word's prototypical region representation with t-SNE and outlines groups of
related words (animals, transports, faces, humans) to show that MASK's prototypes of related words lie
close together — the effect of eq. 8/9 (L_cm keeps the word vectors' structure).  Groups come from:

* a user YAML (``{group: [word, …]}``), when given;
* the demo world's own word lists (object classes, colours, sizes, textures, each with its caption
  synonyms) for a run on the demo world (param ``dataset.kind = demo``);
* otherwise :data:`GENERIC_GROUPS`, a small built-in list after Figure 3's groups.

Besides the picture, the map reports the silhouette score of the groups (cosine) in the prototype
space and, as the reference the prototypes should inherit, in the word-vector space.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mask.alignment import unit_rows
from mask.datasets.demo import COLOURS, OBJECT_ASPECT, PARTS, SCENERY, SIZES, SYNONYMS, TEXTURES
from mask.report import plots
from mask.report.runs import ReportError

logger = logging.getLogger(__name__)

#: Up to this many rows t-SNE runs its exact O(n²) gradient: deterministic, and on small maps far faster
#: than Barnes–Hut, whose OpenMP threads stall on a busy machine (measured: 24 rows 0.5 s vs 11 s).
EXACT_TSNE_POINTS = 100

#: Built-in groups for real vocabularies (Figure 3's animals, transports, faces, humans, and two more).
GENERIC_GROUPS: dict[str, list[str]] = {
    "animals": ["dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear", "duck",
                "pigeon"],
    "transport": ["car", "bus", "truck", "train", "bike", "bicycle", "motorcycle", "boat", "airplane", "plane",
                  "taxi", "van"],
    "face": ["face", "eye", "eyes", "nose", "mouth", "ear", "ears", "hair", "beard", "lips", "forehead", "cheek"],
    "people": ["man", "woman", "boy", "girl", "child", "person", "people", "player", "lady", "guy", "kid",
               "skier"],
    "colours": ["red", "blue", "green", "yellow", "white", "black", "orange", "brown", "pink", "purple", "gray",
                "grey"],
    "clothing": ["shirt", "jacket", "hat", "pants", "shorts", "dress", "coat", "shoe", "shoes", "cap", "jeans",
                 "helmet"],
}


def demo_groups() -> dict[str, list[str]]:
    """The demo world's word lists (:mod:`mask.datasets.demo`), each with its candidate caption synonyms."""

    def with_synonyms(ws: Sequence[str]) -> list[str]:
        return [x for w in ws for x in (w, *SYNONYMS.get(w, ()))]

    return {"objects": with_synonyms(list(OBJECT_ASPECT)), "colours": with_synonyms(list(COLOURS)),
            "sizes": with_synonyms(SIZES), "textures": with_synonyms(TEXTURES),
            "parts": with_synonyms([p for p in PARTS if p not in OBJECT_ASPECT]), "scenery": with_synonyms(SCENERY)}


def load_groups(path: str | Path) -> dict[str, list[str]]:
    """Groups from a YAML mapping ``{group name: [word, …]}``.

    Raises:
        ReportError: unreadable file or another shape (the file is named).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"groups file {path}: cannot be read ({e})") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in data.values()):
        raise ReportError(f"groups file {path}: expected a mapping of group name → list of words")
    return {str(k): [w.strip().lower() for w in v] for k, v in data.items()}


def groups_for(params: Mapping[str, str], user: dict[str, list[str]] | None) -> tuple[dict[str, list[str]], str]:
    """(groups, where they came from) for a run."""
    if user:
        return user, "user file"
    if params.get("dataset.kind") == "demo":
        return demo_groups(), "demo world word lists"
    return GENERIC_GROUPS, "built-in list"


def _assign(words: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[str | None]:
    """Each word's first group (None when in none)."""
    first: dict[str, str] = {}
    for g, ws in groups.items():
        for w in ws:
            first.setdefault(w, g)
    return [first.get(w) for w in words]


def _silhouette(x: np.ndarray, labels: Sequence[str | None]) -> float | None:
    from sklearn.metrics import silhouette_score

    sel = np.asarray([lab is not None for lab in labels])
    labs = [lab for lab in labels if lab is not None]
    if len(set(labs)) < 2 or len(labs) <= len(set(labs)):
        return None
    return float(silhouette_score(x[sel], labs, metric="cosine"))


def prototype_map(table, groups: Mapping[str, Sequence[str]], path: str, *, title: str, seed: int = 0,
                  max_points: int = 1000) -> dict[str, Any]:
    """t-SNE of the L2-normalised prototypes with groups marked; writes ``path`` (PNG).

    Rows: every grouped word, then the most frequent others up to ``max_points`` (t-SNE cost grows
    with the rows).  Perplexity ``min(30, (n − 1) / 3)`` (scikit-learn needs it below n); exact t-SNE
    up to :data:`EXACT_TSNE_POINTS` rows, Barnes–Hut beyond.

    Returns:
        ``points``, ``grouped``, ``groups`` (sizes), ``perplexity``, ``method``, ``silhouette_prototypes`` and
        ``silhouette_word_vectors`` (cosine, None when fewer than two groups have words).

    Raises:
        ReportError: fewer than 5 words (t-SNE has nothing to show).
    """
    from sklearn.manifold import TSNE


    words = list(table.words)
    group_of = _assign(words, groups)
    grouped = [i for i, g in enumerate(group_of) if g is not None]
    rest = [i for i in np.argsort(-np.asarray(table.counts), kind="stable") if group_of[i] is None]
    rows = sorted(grouped + rest[: max(0, max_points - len(grouped))])
    if len(rows) < 5:
        raise ReportError(f"the knowledge has {len(rows)} words; a t-SNE map needs at least 5")
    protos = unit_rows(np.asarray(table.prototypes, np.float64)[rows])
    vecs = unit_rows(np.asarray(table.word_vectors, np.float64)[rows])
    labels = [group_of[i] for i in rows]
    perplexity = float(min(30.0, (len(rows) - 1) / 3.0))
    method = "exact" if len(rows) <= EXACT_TSNE_POINTS else "barnes_hut"
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              method=method).fit_transform(protos)
    plots.scatter_groups(xy, [words[i] for i in rows], labels, [table.source[i] == "ood" for i in rows], path,
                         title=title)
    sizes = {g: sum(1 for lab in labels if lab == g) for g in groups}
    return {"points": len(rows), "grouped": sum(1 for lab in labels if lab is not None), "groups": sizes,
            "perplexity": perplexity, "method": method, "silhouette_prototypes": _silhouette(protos, labels),
            "silhouette_word_vectors": _silhouette(vecs, labels)}
