"""PNG plots for the report, drawn with matplotlib's object API on the Agg canvas.

No pyplot and no global backend switch: each function makes its own :class:`~matplotlib.figure.Figure`
with a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so plotting works headless, in
threads, and never changes the caller's matplotlib state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mask.report.runs import METRICS
from mask.report.tables import RECALL_HEADS


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def heatmap(row_values: Sequence[float], col_values: Sequence[float], grid: np.ndarray, path: str, *,
            row_label: str, col_label: str, title: str) -> str:
    """A value grid (NaN = no run) with each cell annotated."""
    fig = _figure(max(4.5, 1.8 + 0.9 * len(col_values)), max(3.5, 1.4 + 0.7 * len(row_values)))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(col_values)), [f"{v:g}" for v in col_values])
    ax.set_yticks(range(len(row_values)), [f"{v:g}" for v in row_values])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center",
                        color="black" if grid[i, j] > mid else "white", fontsize=9)
    fig.colorbar(im, ax=ax, label="Rs")
    return _save(fig, path)


def scatter_values(x: Sequence[float], y: Sequence[float], values: Sequence[float], path: str, *, xlabel: str,
                   ylabel: str, title: str, label: str = "Rs") -> str:
    """Points on two parameter axes coloured by a value (sampled sweeps: no grid to draw as a heatmap)."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    sc = ax.scatter(np.asarray(x, float), np.asarray(y, float), c=np.asarray(values, float), cmap="viridis", s=60,
                    edgecolors="black", linewidths=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(sc, ax=ax, label=label)
    return _save(fig, path)


def recall_curves(x: Sequence[float], rows: Sequence[dict[str, float]], path: str, *, xlabel: str, title: str,
                  logx: bool = False) -> str:
    """R@K (six lines) and Rs (right axis) against a parameter."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for key, head in zip(METRICS[:-1], RECALL_HEADS[:-1], strict=True):
        ax.plot(x, [r[key] for r in rows], marker="o", linestyle="-" if key.startswith("t2i") else "--", label=head)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("R@K (%)")
    if logx and min(x) > 0:
        ax.set_xscale("log")
    ax2 = ax.twinx()
    ax2.plot(x, [r["rsum"] for r in rows], color="black", marker="s", linewidth=2, label="Rs")
    ax2.set_ylabel("Rs")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, path)


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, *, xlabel: str, ylabel: str,
          title: str) -> str:
    """One line per label: ``{label: (x, y)}``."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def curve_panels(panels: dict[str, dict[str, tuple[Sequence[int], Sequence[float]]]], path: str, *,
                 xlabel: str = "epoch") -> str:
    """A grid of panels (one per loss term), each with one line per run: ``{term: {run: (steps, values)}}``."""
    from matplotlib.ticker import MaxNLocator

    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    for i, (term, series) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=label)
        ax.set_title(term)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 0:
            ax.legend(fontsize=7)
    return _save(fig, path)


def scatter_groups(xy: np.ndarray, words: Sequence[str], group_of: Sequence[str | None], ood: Sequence[bool],
                   path: str, *, title: str, hulls: bool = True) -> str:
    """The t-SNE map (Figure 3): grouped words coloured and labelled, a dashed outline per group."""
    from matplotlib import colormaps

    fig = _figure(8.0, 7.0)
    ax = fig.add_subplot(1, 1, 1)
    other = np.asarray([g is None for g in group_of])
    ood_a = np.asarray(ood, bool)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=8, c="lightgrey", label="other words")
    names = sorted({g for g in group_of if g is not None})
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    for ci, name in enumerate(names):
        sel = np.asarray([g == name for g in group_of])
        colour = cmap(ci % cmap.N)
        ax.scatter(xy[sel & ~ood_a, 0], xy[sel & ~ood_a, 1], s=30, color=colour, label=name)
        if (sel & ood_a).any():
            ax.scatter(xy[sel & ood_a, 0], xy[sel & ood_a, 1], s=30, facecolors="none", edgecolors=[colour])
        for i in np.flatnonzero(sel):
            ax.annotate(words[i], xy[i], fontsize=7, color=colour, xytext=(2, 2), textcoords="offset points")
        if hulls and sel.sum() >= 3:
            _hull(ax, xy[sel], colour)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _hull(ax, pts: np.ndarray, colour) -> None:
    from scipy.spatial import ConvexHull, QhullError

    try:
        h = ConvexHull(pts)
    except (QhullError, ValueError):  # collinear or duplicate points: no outline
        return
    loop = np.append(h.vertices, h.vertices[0])
    ax.plot(pts[loop, 0], pts[loop, 1], linestyle="--", linewidth=1, color=colour)
