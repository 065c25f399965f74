"""The picture behind a query's ranking: each top image with the regions that matched its words.

Eq. 10 scores an image for a caption as the mean over the caption's words of the *maximum* similarity
between the word's prototype and the image's regions; the arg-max region of each word is the evidence
a user wants when asking "why this image?".  :func:`render_evidence` draws, for every panel, the image
with each matched region boxed and labelled ``word score`` (one colour per word), under a title with
the rank and the eq. 10 score.  PNG through matplotlib's Agg canvas (no pyplot state), or HTML with the
same PNG embedded and the matches listed as text.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mask.errors import MaskError

logger = logging.getLogger(__name__)

# Colour-blind-safe qualitative palette (Okabe–Ito), one colour per query word.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF")


class EvidenceError(MaskError, ValueError):
    """The evidence cannot be drawn (an unsupported output file), with the path named."""


@dataclass
class Match:
    """One word's best region: ``box`` is (x0, y0, x1, y1) in the image's pixels."""

    word: str
    box: tuple[float, float, float, float]
    score: float


@dataclass
class Panel:
    """One ranked item: the image (H, W, 3 uint8, or None when it cannot be read), its title, matches."""

    title: str
    image: np.ndarray | None
    matches: list[Match] = field(default_factory=list)
    note: str = ""


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def evidence_png(panels: Sequence[Panel], heading: str, columns: int = 3) -> bytes:
    """Draw the panels in a grid; returns PNG bytes."""
    from matplotlib.patches import Rectangle

    n = max(len(panels), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(4.6 * cols, 4.4 * rows + 0.6)
    fig.suptitle(heading, fontsize=12)
    words = list(dict.fromkeys(m.word for p in panels for m in p.matches))
    colour = {w: PALETTE[i % len(PALETTE)] for i, w in enumerate(words)}
    for k, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(p.title, fontsize=9, wrap=True)
        if p.image is None:
            ax.text(0.5, 0.5, p.note or "image not readable", ha="center", va="center", fontsize=9,
                    transform=ax.transAxes)
            continue
        ax.imshow(p.image)
        # a word matched by the same region as another word shares the box; labels stack inside it
        stacked: dict[tuple[float, ...], int] = {}
        inset = max(p.image.shape[:2]) / 150  # words sharing a region get nested boxes, each in its colour
        for m in sorted(p.matches, key=lambda m: -m.score):
            level = stacked.get(m.box, 0)
            stacked[m.box] = level + 1
            x0, y0, x1, y1 = (m.box[0] + level * inset, m.box[1] + level * inset,
                              m.box[2] - level * inset, m.box[3] - level * inset)
            c = colour[m.word]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=2.2))
            ax.text(m.box[0] + 2, m.box[1] + 2 + level * 0.07 * p.image.shape[0], f"{m.word} {m.score:.3f}", fontsize=8,
                    va="top", ha="left", color="black",
                    bbox={"facecolor": c, "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
        if p.note:
            ax.set_xlabel(p.note, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_evidence(panels: Sequence[Panel], path: str, heading: str) -> str:
    """Write the evidence picture to ``path``: ``.png``, or ``.html`` (the PNG embedded, matches as text).

    Raises:
        EvidenceError: another extension, or the file cannot be written (the path named).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".html", ".htm"):
        raise EvidenceError(f"--show {path}: expected a .png or .html file")
    png = evidence_png(panels, heading)
    try:
        if ext == ".png":
            with open(path, "wb") as f:
                f.write(png)
        else:
            rows = "".join(
                f"<tr><td>{html.escape(p.title)}</td><td>"
                + ", ".join(f"{html.escape(m.word)} {m.score:.3f} at ({', '.join(f'{v:.0f}' for v in m.box)})"
                            for m in p.matches)
                + (f" {html.escape(p.note)}" if p.note else "") + "</td></tr>" for p in panels)
            page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(heading)}</title>"
                    f"<h1>{html.escape(heading)}</h1>"
                    f"<img alt='evidence' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                    f"<table border='1' cellpadding='4'><tr><th>result</th><th>word score at region (x0, y0, x1, y1)"
                    f"</th></tr>{rows}</table>")
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
    except OSError as e:
        raise EvidenceError(f"--show {path}: cannot write ({e.strerror or e})") from None
    return path
