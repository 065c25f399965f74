"""The report: sections in the paper's layouts from the runs there are, PNG plots, ``report.md``.

Each section is built only from runs that can fill it; otherwise it is one line saying which runs
would (never a number that was not logged).  Sections:

1. loss ablation (Table 3): ``build_knowledge`` and ``experiment`` runs with λ1 = 0 (w/o L_cm), λ2 = 0
   (w/o L_cl) or ``loss.kl_weight`` = 0, next to the full-loss run whose other params match best — one
   table per (gallery/split, protocol, epochs);
2. OOD words on/off (Table 3) and the scoring ablations the main job logs (and the experiments' OOD
   on/off), one table per (gallery/split, protocol, epochs);
3. λ1 / λ2 (Tables 4 and 15) with an Rs heatmap over λ1 × λ2;
4. OOD sampling size m (Table 5) with R@K against m;
5. re-ranking weight α (Table 6, eq. 15) with Rs against α;
6. training curves per loss term (eq. 14: L_ir, L_cm, L_cl; validation Rs of sweep trials);
7. modality-gap measures (``gap.*``, :mod:`mask.alignment`);
8. the t-SNE prototype map (Figure 3).

``report.json`` holds the numbers of every table, for machines and tests.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mask.knowledge_artifact import load_knowledge
from mask.report import plots
from mask.report.prototype_map import groups_for, prototype_map
from mask.report.runs import (
    ReportError,
    RunRecord,
    comparable_params,
    dedupe,
    load_history,
    param_differences,
    run_knowledge_uri,
)
from mask.report.tables import fmt_num, markdown, recall_table
from mask.storage import Store

logger = logging.getLogger(__name__)

#: At most this many runs per multi-run table or plot (the best by Rs); the rest are counted.
MAX_RUNS = 8

#: Loss-curve keys → the panel they go to (build/train runs log ``epoch.*``, sweep trials ``train.*``).
CURVE_TERMS: dict[str, str] = {
    "epoch.loss": "L (eq. 14)", "train.loss": "L (eq. 14)",
    "epoch.loss_ir": "L_ir (eq. 5)", "train.l_ir": "L_ir (eq. 5)",
    "epoch.loss_cm": "L_cm (eq. 9)", "train.l_cm": "L_cm (eq. 9)",
    "epoch.loss_cl": "L_cl (eq. 6)", "train.l_cl": "L_cl (eq. 6)",
    "epoch.loss_kl": "KL term of L_ir", "epoch.loss_rec": "reconstruction term of L_ir",
    "val.rsum": "validation Rs",
}

_VARIANTS = {"mask": "MASK", "mask_without_ood": "MASK w/o OOD words",
             "without_prototypes": "MASK w/o prototypes (a random region)",
             "without_max_mean": "MASK w/o max-mean pooling", "chance": "chance"}


@dataclass
class Section:
    """One report section: Markdown body, its images (file names in the report folder), its numbers."""

    title: str
    body: str
    images: list[str] = field(default_factory=list)
    data: Any = None
    filled: bool = True


def _omitted(title: str, why: str) -> Section:
    return Section(title, f"_Omitted: {why}_", filled=False)


def _lam_cells(r: RunRecord) -> list[str]:
    l1, l2 = r.lambdas
    return [fmt_num(l1), fmt_num(l2)]


def _best(runs: list[RunRecord], score) -> list[RunRecord]:
    return sorted(runs, key=lambda r: -(score(r) if score(r) is not None else -np.inf))


def mask_metrics(r: RunRecord) -> tuple[dict[str, float] | None, str]:
    """MASK-alone metrics of a run and where they come from.

    build_knowledge: ``mask.*``.  Sweep trial: ``grid.m_<best.m>.*`` (MASK alone at the trial's best
    m), else the grid row with the best Rs, else ``best.*``.
    """
    if r.job in ("build_knowledge", "experiment"):
        return r.recall("mask"), "mask.*"
    grid = r.grid_m()
    m = r.param_float("best.m")
    if m is not None and m in grid:
        return grid[m], f"grid.m_{m:g}.*"
    if grid:
        m, row = max(grid.items(), key=lambda kv: kv[1]["rsum"])
        return row, f"grid.m_{m:g}.*"
    return r.recall("best"), "best.*"


def _rsum(r: RunRecord) -> float | None:
    m, _ = mask_metrics(r)
    if m is not None:
        return m["rsum"]
    b = r.recall("best")
    return b["rsum"] if b else None


# ---------------------------------------------------------------- sections


def _ablated(r: RunRecord) -> str | None:
    """Which loss terms of eq. 14 a run switched off (λ1 = 0, λ2 = 0, KL weight 0), or None."""
    l1, l2 = r.lambdas
    kl = r.param_float("loss.kl_weight")
    parts = [n for n, v in (("w/o L_cm", l1), ("w/o L_cl", l2), ("w/o KL", kl)) if v == 0]
    return ", ".join(parts) or None


def _seeded(label: str, r: RunRecord) -> str:
    """A row label with the seed of an experiment run (``jobs/experiments.py`` logs one run per seed)."""
    seed = r.tags.get("experiment.seed")
    return f"{label} (seed {seed})" if seed is not None else label


def _by_evaluation(runs: list[RunRecord]) -> dict[tuple[str, str, str], list[RunRecord]]:
    """Runs grouped by :func:`evaluation_of` (gallery/split, protocol, epochs): one table per group."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(evaluation_of(r), []).append(r)
    return groups


def _evaluation_line(ev: tuple[str, str, str]) -> str:
    gal, proto, epochs = ev
    return f"Gallery/split: {gal} · protocol: {proto} · epochs: {epochs}\n\n"


def _loss_ablation_table(runs: list[RunRecord]) -> tuple[str, list[dict[str, Any]]]:
    """One evaluation group's Table 3 rows: the full-loss run closest in config, then every ablated run."""
    abl = [r for r in runs if _ablated(r)]
    loss_keys = ("loss.lambda_cm", "loss.lambda_cl", "loss.kl_weight", "loss.lambda1", "loss.lambda2")
    full = [r for r in runs if not _ablated(r)]
    # the closest full-loss run: fewest other differences, then fewest differences in the loss weights too
    # (so λ1 = λ2 = 3 is the reference of a λ1 = 0 run, not a λ1 = λ2 = 5 run of the same config)
    ref = min(full, key=lambda f: (sum(len(param_differences(f, a, loss_keys)) for a in abl),
                                   sum(len(param_differences(f, a)) for a in abl), -f.start_time), default=None)
    rows, tails, notes, data = [], [], [], []
    for label, r in ([("MASK", ref)] if ref else []) + [(f"MASK {_ablated(a)}", a) for a in abl]:
        label = _seeded(label, r)
        m = r.recall("mask")
        rows.append(([label, *_lam_cells(r), fmt_num(r.param_float("loss.kl_weight"))], m))
        tails.append([r.short])
        data.append({"row": label, "run_id": r.run_id, **m})
        if ref is not None and r is not ref:
            diff = param_differences(ref, r, loss_keys)
            if diff:
                notes.append(f"- {label} ({r.short}) also differs from the MASK row in: "
                             f"{', '.join(diff[:8])}{' …' if len(diff) > 8 else ''}")
    body = recall_table(["method", "λ1", "λ2", "KL weight"], rows, ["run"], tails)
    if ref is None:
        notes.append("- no full-loss run with this gallery, protocol and epochs to compare with")
    return body + ("\n\n" + "\n".join(notes) if notes else ""), data


def loss_ablation(runs: list[RunRecord]) -> Section:
    """Table 3's loss ablation from ``build_knowledge`` and ``experiment`` runs, one table per (gallery/split,
    protocol, epochs) — rows that were evaluated differently are never compared in one table."""
    title = "Loss ablation (Table 3)"
    groups = {ev: g for ev, g in _by_evaluation(runs).items() if any(_ablated(r) for r in g)}
    if not groups:
        return _omitted(title, "no build_knowledge or experiment run with λ1 = 0, λ2 = 0 or a zero KL weight; run "
                               "`jobs/build_knowledge.py loss.lambda_cm=0` (and `loss.lambda_cl=0`, "
                               "`loss.kl_weight=0`) next to a full-loss run, or `jobs/experiments.py`, to fill it.")
    bodies, data = [], []
    for ev, g in groups.items():
        by_seed: dict[str | None, list[RunRecord]] = {}  # experiment runs: one table per seed
        for r in g:
            by_seed.setdefault(r.tags.get("experiment.seed"), []).append(r)
        for seed, runs_ in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
            if not any(_ablated(r) for r in runs_):
                continue
            body, d = _loss_ablation_table(runs_)
            bodies.append(_evaluation_line(ev) + (f"Seed {seed}:\n\n" if seed is not None else "") + body)
            data += [{**row, "evaluation": list(ev)} for row in d]
    return Section(title, "\n\n".join(bodies), data=data)


def ood_ablation(runs: list[RunRecord]) -> Section:
    """OOD words on/off and the scoring ablations from ``build_knowledge`` and ``experiment`` runs, one table
    per (gallery/split, protocol, epochs), the best runs by Rs first."""
    title = "OOD words on/off and scoring ablations (Tables 1 and 3)"
    have = [r for r in runs if r.recall("mask_without_ood")]
    if not have:
        return _omitted(title, "no build_knowledge or experiment run evaluated a gallery with OOD prototypes "
                               "(`knowledge.ood_method` other than `none` and a `gallery` in the config).")
    bodies, data = [], []
    for ev, g in _by_evaluation(have).items():
        ranked = _best(g, _rsum)
        shown, rest = ranked[:MAX_RUNS], len(ranked) - MAX_RUNS
        rows, tails = [], []
        for r in shown:
            for v, label in _VARIANTS.items():
                m = r.recall(v)
                if m is not None:
                    rows.append(([_seeded(label, r), *_lam_cells(r)], m))
                    tails.append([r.short])
                    data.append({"row": label, "variant": v, "run_id": r.run_id, "evaluation": list(ev), **m})
        body = _evaluation_line(ev) + recall_table(["method", "λ1", "λ2"], rows, ["run"], tails)
        if rest > 0:
            body += f"\n\n{rest} more runs not shown (the {MAX_RUNS} with the best Rs are)."
        bodies.append(body)
    return Section(title, "\n\n".join(bodies), data=data)


def evaluation_of(r: RunRecord) -> tuple[str, str, str]:
    """(gallery/split, protocol, epochs) of a run's MASK metrics: what must be equal for two runs' Rs to be
    compared in one table (issue 13, item 7)."""
    gal = r.params.get("gallery.name") or r.params.get("base.gallery.name") or "?"
    if r.job == "tune-trial":
        sweep = r.tags.get("tune.sweep") or (r.parent_id or "?")[:8]
        ep = r.params.get("epochs_done") or "?"
        return (f"{gal}, validation split of sweep {sweep}", "Tune trial: MASK alone at its best m", ep)
    ep = r.tags.get("experiment.epochs") or r.params.get("train.epochs") or "?"
    return (f"{gal}, whole gallery", f"{r.job}: MASK (mask.*)", ep)


_LAMBDA_FREE = frozenset({"loss.lambda_cm", "loss.lambda_cl", "loss.lambda1", "loss.lambda2", "seed", "train.seed",
                          "train.epochs", "epochs_done"})


def _setting_signature(r: RunRecord) -> tuple:
    """What else must be equal for runs to share a λ table: a sweep's trials share their sweep (their sampled
    keys are columns); other runs every comparable param except λ, seeds and epochs (e.g. an
    ``ir_reduction`` or zero-KL run at λ1 = λ2 = 3 is not averaged into the grid's (3, 3) cell)."""
    if r.job == "tune-trial":
        return ("sweep", r.tags.get("tune.sweep") or r.parent_id or "")
    return tuple(sorted((k, v) for k, v in comparable_params(r).items() if k not in _LAMBDA_FREE))


def lambda_section(points: list[RunRecord], out: str) -> Section:
    """Tables 4/15: one table (and one plot) per (gallery/split, protocol, epochs) — runs evaluated
    differently are never mixed.  A complete fixed grid is drawn as a heatmap of the mean Rs per cell;
    sampled λ values as a scatter on the λ axes coloured by Rs."""
    title = "λ1 and λ2 (Tables 4 and 15)"
    pts = [(r, *mask_metrics(r)) for r in points]
    # λ = 0 is a loss ablation (its own section), not a point of the λ grid
    pts = [(r, m, src) for r, m, src in pts if m is not None and None not in r.lambdas and 0.0 not in r.lambdas]
    groups: dict[tuple, list] = defaultdict(list)
    for p in pts:
        groups[(*evaluation_of(p[0]), _setting_signature(p[0]))].append(p)
    groups = {k: g for k, g in groups.items() if len({r.lambdas for r, _, _ in g}) >= 2}
    if not groups:
        return _omitted(title, "needs runs at two or more (λ1, λ2) settings evaluated on the same gallery/split, "
                               "protocol and epochs: a Tune sweep (`python tune/sweep.py`), build_knowledge runs with "
                               "different `loss.lambda_cm` / `loss.lambda_cl`, or `python jobs/experiments.py`.")
    parts, images, gdata = [], [], []
    for gi, (key, g) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        split, proto, ep, _ = key
        g.sort(key=lambda t: (t[0].lambdas[0], t[0].lambdas[1], -t[1]["rsum"]))
        rows, tails, data = [], [], []
        for r, m, src in g:
            l1, l2 = r.lambdas
            ratio = fmt_num(l1 / l2) if l2 else "–"
            m_used = r.param_float("best.m") if r.job == "tune-trial" else r.param_float("knowledge.m")
            rows.append(([fmt_num(l1), fmt_num(l2), ratio, fmt_num(r.param_float("loss.tau")), fmt_num(m_used),
                          split, proto, str(ep)], m))
            tails.append([r.job, src, r.short])
            data.append({"run_id": r.run_id, "lambda1": l1, "lambda2": l2, "source": src, **m})
        body = recall_table(["λ1", "λ2", "λ1/λ2", "τ", "m", "gallery/split", "protocol", "epochs"], rows,
                            ["job", "metrics", "run"], tails)
        pairs = {r.lambdas for r, _, _ in g}
        l1s = sorted({p[0] for p in pairs})
        l2s = sorted({p[1] for p in pairs})
        name = "lambda_heatmap.png" if gi == 0 else f"lambda_heatmap_{gi + 1}.png"
        fixed = len(pairs) == len(l1s) * len(l2s) and len(l1s) <= 8 and len(l2s) <= 8
        entry: dict[str, Any] = {"gallery_split": split, "protocol": proto, "epochs": ep, "rows": data,
                                 "plot": "heatmap" if fixed else "scatter"}
        if fixed:
            grid = np.full((len(l1s), len(l2s)), np.nan)
            for i, a in enumerate(l1s):
                for j, b in enumerate(l2s):
                    grid[i, j] = float(np.mean([m["rsum"] for r, m, _ in g if r.lambdas == (a, b)]))
            plots.heatmap(l1s, l2s, grid, os.path.join(out, name), row_label="λ1 (L_cm weight)",
                          col_label="λ2 (L_cl weight)", title=f"mean Rs over λ1 × λ2 ({split}, {ep} epochs)")
            entry.update({"lambda1": l1s, "lambda2": l2s, "grid": grid.tolist()})
            note = "Heatmap cells: the mean Rs of the runs at that (λ1, λ2) (a complete fixed grid)."
        else:
            name = name.replace("heatmap", "scatter")
            plots.scatter_values([r.lambdas[0] for r, _, _ in g], [r.lambdas[1] for r, _, _ in g],
                                 [m["rsum"] for _, m, _ in g], os.path.join(out, name), xlabel="λ1 (L_cm weight)",
                                 ylabel="λ2 (L_cl weight)", title=f"Rs of sampled (λ1, λ2) ({split}, {ep} epochs)")
            note = "Sampled λ values (not a grid): one point per run, coloured by Rs."
        entry["image"] = name
        images.append(name)
        gdata.append(entry)
        parts.append(f"**{split}; {proto}; {ep} epochs** ({len(g)} runs):\n\n{body}\n\n"
                     f"![Rs over λ1, λ2]({name})\n\n{note}")
    if len(groups) > 1:
        parts.insert(0, f"{len(groups)} tables: runs evaluated on different galleries/splits, protocols or epochs "
                        "are not compared in one table.")
    return Section(title, "\n\n".join(parts), images, data={"groups": gdata})


def _groups_varying(runs: list[RunRecord], key: str, value) -> list[list[RunRecord]]:
    """Groups of runs equal in every comparable param but ``key`` (see
    :func:`~mask.report.runs.param_differences`), with ≥ 2 distinct values of it; largest first."""
    groups: list[list[RunRecord]] = []
    for r in runs:
        if value(r) is None:
            continue
        g = next((g for g in groups if not param_differences(g[0], r, [key])), None)
        if g is None:
            groups.append([r])
        else:
            g.append(r)
    out = [g for g in groups if len({value(r) for r in g}) >= 2]
    return sorted(out, key=len, reverse=True)


def m_section(trials: list[RunRecord], builds: list[RunRecord], out: str) -> Section:
    title = "OOD sampling size m (Table 5)"
    parts, images, data = [], [], {}
    with_grid = _best([t for t in trials if len(t.grid_m()) >= 2], _rsum)
    if with_grid:
        best = with_grid[0]
        grid = best.grid_m()
        ms = list(grid)
        rows = [([f"{m:g}"], grid[m]) for m in ms]
        l1, l2 = best.lambdas
        parts.append(f"Sweep trial {best.short} (the best of {len(with_grid)} trials with an m grid; "
                     f"λ1 = {fmt_num(l1)}, λ2 = {fmt_num(l2)}), MASK alone:\n\n" + recall_table(["m"], rows))
        plots.recall_curves(ms, [grid[m] for m in ms], os.path.join(out, "recall_vs_m.png"),
                            xlabel="OOD sampling size m", title=f"R@K against m (trial {best.short})", logx=True)
        images.append("recall_vs_m.png")
        parts.append("![R@K against m](recall_vs_m.png)")
        data["trial"] = {"run_id": best.run_id, "rows": [{"m": m, **grid[m]} for m in ms]}
    groups = _groups_varying([b for b in builds if b.recall("mask")], "knowledge.m",
                             lambda r: r.param_float("knowledge.m"))
    if groups:
        g = sorted(groups[0], key=lambda r: r.param_float("knowledge.m"))
        rows = [([fmt_num(r.param_float("knowledge.m"))], r.recall("mask")) for r in g]
        parts.append(f"build_knowledge runs that differ only in `knowledge.m` ({len(g)} runs):\n\n"
                     + recall_table(["m"], rows, ["run"], [[r.short] for r in g]))
        data["builds"] = [{"run_id": r.run_id, "m": r.param_float("knowledge.m"), **r.recall("mask")} for r in g]
        if not with_grid:
            ms = [r.param_float("knowledge.m") for r in g]
            plots.recall_curves(ms, [r.recall("mask") for r in g], os.path.join(out, "recall_vs_m.png"),
                                xlabel="OOD sampling size m", title="R@K against m (build runs)", logx=True)
            images.append("recall_vs_m.png")
            parts.append("![R@K against m](recall_vs_m.png)")
    if not parts:
        return _omitted(title, "needs a Tune sweep over m (`grid.m_<m>.*` metrics of its trials) or build_knowledge "
                               "runs that differ only in `knowledge.m`.")
    return Section(title, "\n\n".join(parts), images, data)


def alpha_section(trials: list[RunRecord], galleries: list[RunRecord], out: str) -> Section:
    title = "Re-ranking weight α (Table 6, eq. 15)"
    parts, images, data = [], [], {}
    with_grid = _best([t for t in trials if t.grid_alpha()],
                      lambda t: max(r["rsum"] for r in t.grid_alpha().values()))
    if with_grid:
        best = with_grid[0]
        ga = best.grid_alpha()
        m = best.param_float("best.m")
        if m is None or not any(key[0] == m for key in ga):
            m = max(ga.items(), key=lambda kv: kv[1]["rsum"])[0][0]
        at_m = {(a, k): row for (mm, a, k), row in ga.items() if mm == m}
        base = best.recall("grid.base")
        rows, series, rdata = [], {}, []
        if base is not None:
            rows.append((["0 (base)", "–"], base))
            rdata.append({"alpha": 0.0, "k": None, **base})
        for (a, k), row in sorted(at_m.items()):
            rows.append(([f"{a:g}", f"{k:g}"], row))
            rdata.append({"alpha": a, "k": k, **row})
        for k in sorted({k for _, k in at_m}):
            pts = sorted((a, row["rsum"]) for (a, kk), row in at_m.items() if kk == k)
            if base is not None:
                pts = [(0.0, base["rsum"]), *[p for p in pts if p[0] != 0.0]]
            series[f"k = {k:g}"] = ([p[0] for p in pts], [p[1] for p in pts])
        parts.append(f"Sweep trial {best.short} (best of {len(with_grid)} with a re-ranking grid), m = {m:g}; "
                     "α = 0 is the base model alone:\n\n" + recall_table(["α", "k"], rows))
        plots.lines(series, os.path.join(out, "rs_vs_alpha.png"), xlabel="α", ylabel="Rs",
                    title=f"Rs against α (trial {best.short}, m = {m:g})")
        images.append("rs_vs_alpha.png")
        parts.append("![Rs against α](rs_vs_alpha.png)")
        data["trial"] = {"run_id": best.run_id, "m": m, "rows": rdata}
    reranked = [g for g in galleries if g.recall("rerank.after") and g.param_float("rerank.alpha") is not None]
    groups = _groups_varying(reranked, "rerank.alpha", lambda r: r.param_float("rerank.alpha"))
    if groups or len(reranked) == 1:
        g = sorted(groups[0] if groups else reranked, key=lambda r: r.param_float("rerank.alpha"))
        base = g[0].recall("rerank.before")
        rows = ([(["0 (base)", "–"], base)] if base else []) + \
               [([fmt_num(r.param_float("rerank.alpha")), fmt_num(r.param_float("rerank.k"))], r.recall("rerank.after"))
                for r in g]
        tails = ([[g[0].short]] if base else []) + [[r.short] for r in g]
        parts.append("score_gallery runs with re-ranking (`rerank.alpha`):\n\n"
                     + recall_table(["α", "k"], rows, ["run"], tails))
        data["gallery_runs"] = [{"run_id": r.run_id, "alpha": r.param_float("rerank.alpha"),
                                 **r.recall("rerank.after")} for r in g]
        if not with_grid:
            xs = ([0.0] if base else []) + [r.param_float("rerank.alpha") for r in g]
            ys = ([base["rsum"]] if base else []) + [r.recall("rerank.after")["rsum"] for r in g]
            plots.lines({"score_gallery": (xs, ys)}, os.path.join(out, "rs_vs_alpha.png"), xlabel="α",
                        ylabel="Rs", title="Rs against α")
            images.append("rs_vs_alpha.png")
            parts.append("![Rs against α](rs_vs_alpha.png)")
    if not parts:
        return _omitted(title, "needs a Tune sweep with base-model scores (`grid.m_<m>.alpha_<a>.k_<k>.*` metrics) "
                               "or score_gallery runs with re-ranking at different `rerank.alpha`.")
    return Section(title, "\n\n".join(parts), images, data)


def curves_section(client, runs: list[RunRecord], out: str) -> Section:
    title = "Training curves per loss term (eq. 14)"
    cands = [r for r in runs if any(k in r.metrics for k in CURVE_TERMS)]
    cands = _best(cands, _rsum)
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    finals, used = [], []
    for r in cands:
        if len(used) >= MAX_RUNS:
            break
        hist = load_history(client, r, [k for k in CURVE_TERMS if k in r.metrics])
        hist = {k: h for k, h in hist.items() if len(h) >= 2}
        if not hist:
            continue
        used.append(r)
        l1, l2 = r.lambdas
        label = f"{r.short} λ1={fmt_num(l1)} λ2={fmt_num(l2)}"
        last = {}
        for k, h in hist.items():
            panels.setdefault(CURVE_TERMS[k], {})[label] = ([s for s, _ in h], [v for _, v in h])
            last[CURVE_TERMS[k]] = h[-1][1]
        finals.append((r, last))
    if not panels:
        return _omitted(title, "no run logged per-epoch loss terms with two or more epochs (build_knowledge and "
                               "train runs log `epoch.loss*`, sweep trials `train.loss`, `train.l_*`, `val.rsum`).")
    order = [t for t in dict.fromkeys(CURVE_TERMS.values()) if t in panels]
    plots.curve_panels({t: panels[t] for t in order}, os.path.join(out, "training_curves.png"))
    heads = ["run", "job", "λ1", "λ2", *order]
    rows = [[r.short, r.job, *_lam_cells(r), *(fmt_num(last.get(t)) for t in order)] for r, last in finals]
    body = ("Last-epoch values:\n\n" + markdown(heads, rows) + "\n\n![Training curves](training_curves.png)")
    skipped = len([r for r in cands if r not in used])
    if skipped:
        body += f"\n\n{skipped} more runs with curves not shown."
    data = [{"run_id": r.run_id, **last} for r, last in finals]
    return Section(title, body, ["training_curves.png"], data)


GAP_COLUMNS = (("n", "words"), ("w2_exact", "W2 exact"), ("w2_exact_unit", "W2 exact (unit)"),
               ("w2_gaussian", "W2 Gaussian"), ("w2_gaussian_unit", "W2 Gaussian (unit)"),
               ("centroid", "centroid gap"), ("matched_cos", "mean cos"), ("cos_r1", "R@1 cosine"),
               ("euclid_r1", "R@1 Euclidean"), ("chance_r1", "R@1 chance"))


def gap_section(runs: list[RunRecord]) -> Section:
    title = "Modality gap between MTM outputs and word vectors"
    have = _best([r for r in runs if any(k.startswith("gap.") for k in r.metrics)], _rsum)
    if not have:
        return _omitted(title, "no run logged `gap.*` metrics (build_knowledge logs them once the knowledge is "
                               "built; see mask/alignment.py).")
    parts = ["Measures after Xu & Leiva 2025 (seeds/alignment-metrics-summary.md): the 2-Wasserstein distance "
             "between the MTM's predicted word vectors f(v) (eq. 7) and the real word vectors — exact between the "
             "empirical clouds and between Gaussian fits, raw and unit-normalised — the centroid gap of the "
             "normalised clouds, and word retrieval from f(v) ranked by cosine vs. by Euclidean distance "
             "(fractions). `prototype`: f applied to the eq. 2 prototypes; `region`: to one region μ per word."]
    data = {}
    for kind in ("prototype", "region"):
        rs = [r for r in have[:MAX_RUNS] if f"gap.{kind}.w2_exact" in r.metrics]
        if not rs:
            continue
        rows = [[r.short, r.job, *_lam_cells(r), fmt_num(_rsum(r)),
                 *(fmt_num(r.metrics.get(f"gap.{kind}.{c}")) for c, _ in GAP_COLUMNS)] for r in rs]
        parts.append(f"**{kind}**\n\n" + markdown(["run", "job", "λ1", "λ2", "Rs", *(h for _, h in GAP_COLUMNS)], rows))
        data[kind] = [{"run_id": r.run_id, **{c: r.metrics.get(f"gap.{kind}.{c}") for c, _ in GAP_COLUMNS}}
                      for r in rs]
    return Section(title, "\n\n".join(parts), data=data)


def tsne_section(client, runs: list[RunRecord], out: str, storage_options: dict, groups_user, tsne_run: str | None,
                 seed: int) -> Section:

    title = "Prototype map (Figure 3)"
    if tsne_run is not None:
        cands = [r for r in runs if r.run_id == tsne_run]
        if not cands:
            raise ReportError(f"--tsne-run {tsne_run!r} is not among the report's runs")
    else:
        cands = _best([r for r in runs if r.job in ("build_knowledge", "tune-trial", "tune")], _rsum)
    problems = []
    for r in cands:
        uri = run_knowledge_uri(client, r)
        if uri is None:
            continue
        try:
            table = load_knowledge_uri(uri, storage_options)
        except Exception as e:  # noqa: BLE001 - named in the report, next candidate tried
            problems.append(f"{r.short}: {uri}: {e}")
            logger.warning("run %s: knowledge %s cannot be loaded: %s", r.run_id, uri, e)
            continue
        groups, origin = groups_for(r.params, groups_user)
        try:
            stats = prototype_map(table, groups, os.path.join(out, "prototype_tsne.png"), seed=seed,
                                  title=f"t-SNE of knowledge prototypes (run {r.short})")
        except ReportError as e:
            problems.append(f"{r.short}: {e}")
            continue
        sil = ", ".join(f"{k.split('_', 1)[1].replace('_', ' ')} {fmt_num(v)}" for k, v in stats.items()
                        if k.startswith("silhouette") and v is not None)
        body = (f"Run {r.short}, knowledge `{uri}`; {stats['points']} words, {stats['grouped']} in groups "
                f"({origin}: " + ", ".join(f"{g} {n}" for g, n in stats["groups"].items()) + "). "
                f"Hollow markers: OOD rows. Silhouette of the groups (cosine): {sil or 'n/a'}.\n\n"
                "![Prototype t-SNE](prototype_tsne.png)")
        return Section(title, body, ["prototype_tsne.png"], {"run_id": r.run_id, "knowledge_uri": uri, **stats})
    why = "no run has a loadable knowledge artifact (tag `knowledge.uri` or a registered knowledge version)"
    if problems:
        why += ": " + "; ".join(problems[:3])
    return _omitted(title, why + ".")


def load_knowledge_uri(uri: str, storage_options: dict):
    """The knowledge table at an artifact URI (local path or ``s3://…``)."""

    uri = uri.rstrip("/")
    table, _ = load_knowledge(Store(posixpath.dirname(uri), storage_options), posixpath.basename(uri))
    return table


# ---------------------------------------------------------------- the report


def overview(runs: list[RunRecord], skipped: list[RunRecord], duplicates: int, sources: dict[str, Any]) -> Section:
    by_job: dict[str, int] = defaultdict(int)
    for r in runs:
        by_job[r.job or "(no job tag)"] += 1
    lines = [f"Source: {json.dumps(sources)}", "",
             markdown(["job", "runs"], [[j, str(n)] for j, n in sorted(by_job.items())])]
    if duplicates:
        lines.append(f"\n{duplicates} reruns with identical params left out (of each set, the run with the most metrics is used).")
    if skipped:
        lines.append("\nNot finished, left out: " + ", ".join(f"{r.short} ({r.job}, {r.status})" for r in skipped[:20]))
    return Section("Runs", "\n".join(lines), data={"by_job": dict(by_job), "duplicates": duplicates,
                                                   "unfinished": [r.run_id for r in skipped]})


def write_report(client, runs: list[RunRecord], out_dir: str, *, sources: dict[str, Any],
                 storage_options: dict | None = None, groups: dict[str, list[str]] | None = None,
                 tsne_run: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Build every section and write ``report.md``, ``report.json`` and the PNGs to ``out_dir``.

    The folder is written next to its final place and moved there at the end, so a failed report leaves
    the previous one (or nothing).

    Args:
        client: an MlflowClient (histories, registered knowledge).
        runs: the runs (:func:`mask.report.runs.collect_runs`).
        out_dir: the local report folder; an earlier report there (or an empty folder) is replaced.
        sources: what was asked for (experiments / run ids), recorded in the report.
        storage_options: fsspec options for reading knowledge artifacts.
        groups: user word groups for the t-SNE map.
        tsne_run: the run whose knowledge to map (default: the best with a knowledge artifact).
        seed: t-SNE seed.

    Returns:
        ``{"out": folder, "sections": {title: filled}, "images": [...], "runs": n}``.

    Raises:
        ReportError: no finished runs; ``out_dir`` exists and holds something other than a report.
    """
    finished = [r for r in runs if r.status == "FINISHED"]
    skipped = [r for r in runs if r.status != "FINISHED"]
    if not finished:
        raise ReportError(f"no finished runs to report on in {json.dumps(sources)} "
                          f"({len(skipped)} unfinished)")
    everything = finished  # duplicates included: a rerun that reused the training has no curves of its own
    finished, dups = dedupe(finished)
    builds = [r for r in finished if r.job == "build_knowledge" and r.recall("mask")]
    trials = [r for r in finished if r.job == "tune-trial"]
    galleries = [r for r in finished if r.job == "score_gallery"]
    experiments = [r for r in finished if r.job == "experiment" and r.recall("mask")]
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (
            os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "report.md")))):
        # never replace a folder that holds something else (e.g. --out . or a typo)
        raise ReportError(f"--out {out_dir} exists and is not a report folder (no report.md); "
                          "choose a new or an earlier report's folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        sections = [
            overview(finished, skipped, dups, sources),
            loss_ablation(builds + experiments),
            ood_ablation(builds + experiments),
            lambda_section(builds + trials + experiments, tmp),
            m_section(trials, builds, tmp),
            alpha_section(trials, galleries, tmp),
            curves_section(client, everything, tmp),
            gap_section(finished),
            tsne_section(client, everything, tmp, storage_options or {}, groups, tsne_run, seed),
        ]
        md = ["# MASK experiment report", "",
              f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from {len(finished)} runs. "
              "R@K in percent; IR = image retrieval (text→image), IA = image annotation (image→text), "
              "Rs = their sum. Runs are named by the first 8 characters of their MLflow run id.", ""]
        for s in sections:
            md += [f"## {s.title}", "", s.body, ""]
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write("\n".join(md))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump({"sources": sources, "runs": [r.run_id for r in finished],
                       "sections": {s.title: {"filled": s.filled, "images": s.images, "data": s.data}
                                    for s in sections}}, f, indent=2, default=float)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".report-old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "r"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out_dir, "sections": {s.title: s.filled for s in sections},
            "images": [i for s in sections for i in s.images], "runs": len(finished)}
