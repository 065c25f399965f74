"""Markdown tables in the paper's layout: leading columns, then IR R@1/5/10, IA R@1/5/10, Rs."""

from __future__ import annotations

from collections.abc import Sequence

from mask.report.runs import METRICS

#: Column heads of :data:`mask.report.runs.METRICS` (image retrieval = t2i, image annotation = i2t).
RECALL_HEADS = ("IR R@1", "IR R@5", "IR R@10", "IA R@1", "IA R@5", "IA R@10", "Rs")


def fmt_recall(x: float) -> str:
    """R@K and Rs as the paper prints them (one decimal)."""
    return f"{x:.1f}"


def fmt_num(x: float | None) -> str:
    """A parameter or measure: ``g`` format, ``–`` when absent."""
    return "–" if x is None else f"{x:.4g}"


def markdown(heads: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def recall_table(lead_heads: Sequence[str], rows: Sequence[tuple[Sequence[str], dict[str, float]]],
                 tail_heads: Sequence[str] = (), tails: Sequence[Sequence[str]] | None = None) -> str:
    """A paper-layout table: ``lead`` cells, the seven recall numbers, then optional ``tail`` cells.

    Args:
        lead_heads: heads of the leading columns.
        rows: ``(lead cells, {metric: value})`` per row.
        tail_heads: heads after Rs (e.g. ``run``).
        tails: cells of those columns per row.
    """
    out = []
    for i, (lead, m) in enumerate(rows):
        out.append([*lead, *(fmt_recall(m[k]) for k in METRICS), *((tails or [[]] * len(rows))[i])])
    return markdown([*lead_heads, *RECALL_HEADS, *tail_heads], out)
