"""jobs/report.py and mask.report on a small MLflow store of synthetic runs in the jobs' logging format.

The runs are test input logged through MLflow's own client in the format the jobs use (build_knowledge,
Tune parent + trials, score_gallery with re-ranking); every number the report prints is checked
against the number logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum")
HEADS = ("IR R@1", "IR R@5", "IR R@10", "IA R@1", "IA R@5", "IA R@10", "Rs")


def recall(rng) -> dict[str, float]:
    vals = {k: float(np.round(rng.uniform(0, 100), 2)) for k in METRICS[:-1]}
    vals["rsum"] = float(np.round(sum(vals.values()), 2))
    return vals


class Store:
    """A tmp MLflow store (the SQLite file the jobs use under a local storage root) and what was logged."""

    def __init__(self, root: Path, seed: int = 0):
        from mlflow import MlflowClient

        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.rng = np.random.default_rng(seed)
        self.logged: dict[str, dict] = {}

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=(self.root / "mlartifacts").as_uri())

    def run(self, exp: str, job: str, params: dict, metrics: dict[str, float] | None = None,
            history: dict[str, list[float]] | None = None, tags: dict | None = None,
            status: str = "FINISHED", parent: str | None = None) -> str:
        from mlflow.entities import Metric, Param

        t = {"job": job, **(tags or {})}
        if parent:
            t["mlflow.parentRunId"] = parent
        rid = self.client.create_run(exp, run_name=job, tags=t).info.run_id
        ms = [Metric(k, v, 0, 0) for k, v in (metrics or {}).items()]
        for k, vals in (history or {}).items():
            ms += [Metric(k, v, 1000 + i, i) for i, v in enumerate(vals)]
        self.client.log_batch(rid, metrics=ms, params=[Param(k, str(v)) for k, v in params.items()])
        if status != "RUNNING":
            self.client.set_terminated(rid, status)
        self.logged[rid] = {"params": params, "metrics": metrics or {}, "history": history or {}}
        return rid

    def prefixed(self, prefix: str, vals: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}.{k}": v for k, v in vals.items()}


BASE = {"dataset.kind": "demo", "dataset.name": "demo_vg", "gallery.name": "demo_gallery", "train.epochs": 3,
        "loss.lambda_cm": 3.0, "loss.lambda_cl": 3.0, "loss.kl_weight": 1.0, "loss.tau": 0.1, "knowledge.m": 3,
        "storage.root": "/somewhere", "train.run_name": "None"}


def tiny_knowledge(store_root: Path, seed: int = 0) -> str:
    """A committed knowledge artifact whose prototypes cluster by demo word group."""
    from mask.knowledge import KnowledgeTable
    from mask.knowledge_artifact import save_knowledge
    from mask.report.prototype_map import demo_groups
    from mask.storage import Store as ArtifactStore

    rng = np.random.default_rng(seed)
    g = demo_groups()
    words = g["objects"][:12] + g["colours"][:10] + ["extra", "other"]
    centre = {name: rng.normal(size=16) * 4 for name in g}
    protos = []
    for w in words:
        grp = next((n for n, ws in g.items() if w in ws), None)
        protos.append((centre[grp] if grp else np.zeros(16)) + rng.normal(size=16) * 0.3)
    table = KnowledgeTable(words=words, counts=rng.integers(1, 50, len(words)),
                           word_vectors=rng.normal(size=(len(words), 8)), prototypes=np.asarray(protos),
                           source=["vg"] * (len(words) - 2) + ["ood"] * 2,
                           samples=np.asarray(protos) + rng.normal(size=(len(words), 16)))
    save_knowledge(ArtifactStore(str(store_root)), "knowledge/k-tiny", table, b"pae weights (unused)",
                   config_hash="k-tiny")
    return str(store_root / "knowledge" / "k-tiny")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-store")
    s = Store(root)
    exp = s.experiment("mask-itm")
    kuri = tiny_knowledge(root)
    r = s.rng
    # build_knowledge: the full loss, its ablations, another m, a rerun (duplicate), an unfinished run
    full_m = {"mask": recall(r), "mask_without_ood": recall(r), "without_prototypes": recall(r),
              "without_max_mean": recall(r), "chance": recall(r)}
    gap = {"gap.prototype.n": 24.0, "gap.prototype.w2_exact": 1.25, "gap.prototype.w2_exact_unit": 0.5,
           "gap.prototype.w2_gaussian": 1.5, "gap.prototype.w2_gaussian_unit": 0.6, "gap.prototype.centroid": 0.3,
           "gap.prototype.matched_cos": 0.7, "gap.prototype.cos_r1": 0.5, "gap.prototype.euclid_r1": 0.25,
           "gap.prototype.chance_r1": 1 / 24}
    metrics = {k: v for name, vals in full_m.items() for k, v in s.prefixed(name, vals).items()} | gap
    hist = {"epoch.loss": [30.0, 20.0, 15.0], "epoch.loss_ir": [20.0, 14.0, 11.0], "epoch.loss_cm": [0.9, 0.6, 0.5],
            "epoch.loss_cl": [3.2, 3.0, 2.5]}
    s.full = s.run(exp, "build_knowledge", BASE, metrics, hist, tags={"knowledge.uri": kuri})
    s.full_metrics = full_m
    s.rerun = s.run(exp, "build_knowledge", BASE, metrics, tags={"knowledge.uri": kuri})  # newer duplicate
    s.ablations = {}
    for key, label in (("loss.lambda_cm", "w/o L_cm"), ("loss.lambda_cl", "w/o L_cl"), ("loss.kl_weight", "w/o KL")):
        m = recall(r)
        s.ablations[label] = (s.run(exp, "build_knowledge", {**BASE, key: 0.0}, s.prefixed("mask", m)), m)
    s.m10 = recall(r)
    s.m10_run = s.run(exp, "build_knowledge", {**BASE, "knowledge.m": 10}, s.prefixed("mask", s.m10))
    s.failed = s.run(exp, "build_knowledge", {**BASE, "loss.tau": 0.5}, s.prefixed("mask", recall(r)),
                     status="FAILED")
    # a Tune sweep: parent + 3 trials in the contract's format
    s.parent = s.run(exp, "tune", {"tune.num_samples": 3}, {"best.rsum": 0.0})
    s.trials = {}
    for l1, l2 in ((1.0, 3.0), (3.0, 3.0), (5.0, 1.0)):
        grid = {m: recall(r) for m in (1, 10, 50)}
        alpha = {(a, k): recall(r) for a in (0.1, 0.15, 0.2) for k in (10, 20)}
        base = recall(r)
        mets = {}
        for m, vals in grid.items():
            mets |= s.prefixed(f"grid.m_{m:g}", vals)
        for (a, k), vals in alpha.items():
            mets |= s.prefixed(f"grid.m_10.alpha_{a:g}.k_{k:g}", vals)
        mets |= s.prefixed("grid.base", base) | s.prefixed("best", grid[10])
        th = {"val.rsum": list(np.round(r.uniform(100, 300, 4), 2)), "train.loss": [9.0, 7.0, 6.0, 5.5],
              "train.l_ir": [5.0, 4.0, 3.5, 3.2], "train.l_cm": [0.8, 0.6, 0.5, 0.45], "train.l_cl": [3.0, 2.5, 2.2, 2.0]}
        rid = s.run(exp, "tune-trial", {"loss.lambda1": l1, "loss.lambda2": l2, "loss.tau": 0.1, "best.m": 10,
                                        "best.alpha": 0.15, "best.k": 10}, mets, th, parent=s.parent)
        s.trials[rid] = {"l": (l1, l2), "grid": grid, "alpha": alpha, "base": base, "hist": th}
    # score_gallery with re-ranking at two α
    s.before = recall(r)
    s.galleries = {}
    for a in (0.1, 0.2):
        after = recall(r)
        rid = s.run(exp, "score_gallery", {"gallery.name": "demo_gallery", "rerank.alpha": a, "rerank.k": 15},
                    s.prefixed("rerank.before", s.before) | s.prefixed("rerank.after", after))
        s.galleries[a] = (rid, after)
    return s


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    from jobs import report as job

    out = tmp_path_factory.mktemp("out") / "rep"
    summary = job.main(["--out", str(out), f"storage.root={store.root}"])
    md = (out / "report.md").read_text()
    return summary, out, md, json.loads((out / "report.json").read_text())


def section(md: str, title_start: str) -> str:
    parts = md.split("\n## ")
    hits = [p for p in parts if p.startswith(title_start)]
    assert len(hits) == 1, f"section {title_start!r} not found once"
    return hits[0]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text`` as rows keyed by head."""
    out, cur, heads = [], None, None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if heads is None:
                heads, cur = cells, []
            elif not set("".join(cells)) <= {"-"}:
                cur.append(dict(zip(heads, cells, strict=True)))
        elif heads is not None:
            out.append(cur)
            heads = cur = None
    return out


def check_row(row: dict[str, str], logged: dict[str, float]) -> None:
    assert [row[h] for h in HEADS] == [f"{logged[k]:.1f}" for k in METRICS]


def test_loss_ablation_table_matches_runs(store, report):
    _, _, md, _ = report
    rows = tables(section(md, "Loss ablation"))[0]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"MASK", "MASK w/o L_cm", "MASK w/o L_cl", "MASK w/o KL"}
    # of the identical full runs, the one with the most metrics (the first, with its training curves)
    assert by["MASK"]["run"] == store.full[:8]
    check_row(by["MASK"], store.full_metrics["mask"])
    for label, (rid, m) in store.ablations.items():
        assert by[f"MASK {label}"]["run"] == rid[:8]
        check_row(by[f"MASK {label}"], m)
    assert by["MASK w/o L_cm"]["λ1"] == "0" and by["MASK w/o KL"]["KL weight"] == "0"
    # the m=10 build differs in knowledge.m; the ablations do not, so no "also differs" note
    assert "also differs" not in section(md, "Loss ablation")


def test_ood_and_scoring_ablations(store, report):
    _, _, md, _ = report
    rows = tables(section(md, "OOD words on/off"))[0]
    assert [r["method"] for r in rows] == ["MASK", "MASK w/o OOD words", "MASK w/o prototypes (a random region)",
                                           "MASK w/o max-mean pooling", "chance"]
    for row, v in zip(rows, ("mask", "mask_without_ood", "without_prototypes", "without_max_mean", "chance"),
                      strict=True):
        check_row(row, store.full_metrics[v])


def test_lambda_section_takes_the_sweep_and_leaves_out_ablations(store, report):
    """The builds vary λ only as loss ablations (λ = 0: Table 3's section) or at one λ pair with other params
    changed, so the λ section is the sweep's trials alone (validation split), a scatter of sampled λ."""
    _, out, md, js = report
    sec = section(md, "λ1 and λ2")
    (trials,) = tables(sec)
    assert {r["job"] for r in trials} == {"tune-trial"} and len(trials) == 3
    assert len({r["gallery/split"] for r in trials}) == 1 and "validation split of sweep" in trials[0]["gallery/split"]
    for row in trials:
        t = store.trials[next(r for r in store.trials if r.startswith(row["run"]))]
        assert (float(row["λ1"]), float(row["λ2"])) == t["l"] and row["metrics"] == "grid.m_10.*" and row["m"] == "10"
        check_row(row, t["grid"][10])
    (g,) = js["sections"]["λ1 and λ2 (Tables 4 and 15)"]["data"]["groups"]
    assert g["plot"] == "scatter" and g["image"] == "lambda_scatter.png" and (out / g["image"]).exists()


def test_lambda_tables_never_mix_evaluations_or_settings(tmp_path):
    """One table per (gallery/split, protocol, epochs, other params): a complete fixed grid is a heatmap of
    the mean Rs over seeds; runs at other epochs, another gallery or another KL weight are separate tables
    (scatters when their λ values are no complete grid); λ = 0 runs are left out (loss ablations)."""
    from mask.report.compose import lambda_section
    from mask.report.runs import RunRecord

    def rec(i, l1, l2, rs, epochs="40", gallery="g", kl="1.0", seed=0):
        m = {f"mask.{k}": rs / 7 for k in METRICS if k != "rsum"} | {"mask.rsum": rs}
        return RunRecord(run_id=f"r{i:07d}x", name="", job="experiment", status="FINISHED", start_time=i,
                         experiment_id="0", params={"loss.lambda_cm": str(l1), "loss.lambda_cl": str(l2),
                                                    "gallery.name": gallery, "train.epochs": "400",
                                                    "loss.kl_weight": kl, "seed": str(seed), "train.seed": str(seed)},
                         metrics=m, tags={"experiment.epochs": epochs})
    runs, i = [], 0
    for l1 in (1.0, 3.0):
        for l2 in (1.0, 3.0):
            for seed, seed_rs in enumerate((100.0, 110.0)):
                runs.append(rec(i, l1, l2, seed_rs + 10 * l1 + l2, seed=seed))
                i += 1
    runs += [rec(99, 5.0, 5.0, 500.0, epochs="8"), rec(98, 1.0, 1.0, 400.0, epochs="8"),  # other epochs
             rec(97, 3.0, 3.0, 900.0, kl="0.0"), rec(96, 1.0, 1.0, 900.0, kl="0.0"),  # another KL weight
             rec(95, 3.0, 3.0, 1.0, gallery="h"), rec(94, 1.0, 3.0, 2.0, gallery="h"),  # another gallery
             rec(93, 0.0, 3.0, 5.0)]  # a loss ablation
    sec = lambda_section(runs, str(tmp_path))
    groups = sec.data["groups"]
    assert len(groups) == 4 and sec.body.count("| experiment | mask.* |") == 14
    grid_group = groups[0]
    assert grid_group["plot"] == "heatmap" and grid_group["epochs"] == "40" and len(grid_group["rows"]) == 8
    assert np.asarray(grid_group["grid"]) == pytest.approx(np.array([[116.0, 118.0], [136.0, 138.0]]))
    assert all(0.0 not in (r["lambda1"], r["lambda2"]) for g in groups for r in g["rows"])
    by = {(g["gallery_split"], g["epochs"], len(g["rows"])): g["plot"] for g in groups[1:]}
    assert by == {("g, whole gallery", "8", 2): "scatter", ("g, whole gallery", "40", 2): "scatter",  # KL 0
                  ("h, whole gallery", "40", 2): "heatmap"}  # (3, 3) and (1, 3): a complete 2 × 1 grid
    assert (tmp_path / "lambda_heatmap.png").exists() and (tmp_path / "lambda_scatter_2.png").exists()


def test_m_table_from_the_best_trial_and_from_builds(store, report):
    _, _, md, _ = report
    sec = section(md, "OOD sampling size m")
    best = max(store.trials, key=lambda rid: store.trials[rid]["grid"][10]["rsum"])
    assert f"Sweep trial {best[:8]}" in sec
    trial_rows, build_rows = tables(sec)
    assert [r["m"] for r in trial_rows] == ["1", "10", "50"]
    for row in trial_rows:
        check_row(row, store.trials[best]["grid"][int(row["m"])])
    assert [r["m"] for r in build_rows] == ["3", "10"]
    check_row(build_rows[1], store.m10)


def test_alpha_table_from_trial_grid_and_gallery_runs(store, report):
    _, _, md, _ = report
    sec = section(md, "Re-ranking weight α")
    best = max(store.trials, key=lambda rid: max(v["rsum"] for v in store.trials[rid]["alpha"].values()))
    t = store.trials[best]
    trial_rows, gallery_rows = tables(sec)
    check_row(trial_rows[0], t["base"])
    assert trial_rows[0]["α"] == "0 (base)"
    assert len(trial_rows) == 1 + 6
    for row in trial_rows[1:]:
        check_row(row, t["alpha"][(float(row["α"]), float(row["k"]))])
    check_row(gallery_rows[0], store.before)
    for row in gallery_rows[1:]:
        rid, after = store.galleries[float(row["α"])]
        assert row["run"] == rid[:8]
        check_row(row, after)


def test_training_curves_and_gap_tables(store, report):
    _, _, md, _ = report
    rows = tables(section(md, "Training curves"))[0]
    by = {r["run"]: r for r in rows}
    full = by[store.full[:8]]
    assert full["L_cm (eq. 9)"] == "0.5" and full["L_cl (eq. 6)"] == "2.5"
    for rid, t in store.trials.items():
        assert by[rid[:8]]["validation Rs"] == f"{t['hist']['val.rsum'][-1]:.4g}"
        assert by[rid[:8]]["L_ir (eq. 5)"] == "3.2"
    gap = tables(section(md, "Modality gap"))[0]
    assert len(gap) == 1 and gap[0]["run"] == store.full[:8]  # the rerun (same params) is dropped
    assert gap[0]["W2 exact"] == "1.25" and gap[0]["R@1 cosine"] == "0.5" and gap[0]["R@1 Euclidean"] == "0.25"


def test_pngs_are_valid_images_with_content(report):
    from PIL import Image

    summary, out, md, _ = report
    assert set(summary["images"]) == {"lambda_scatter.png", "recall_vs_m.png", "rs_vs_alpha.png",
                                      "training_curves.png", "prototype_tsne.png"}
    for name in summary["images"]:
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            px = np.asarray(im.convert("RGB"))
        assert px.shape[0] > 100 and px.shape[1] > 100
        assert len(np.unique(px.reshape(-1, 3), axis=0)) > 20  # not a flat image


def test_runs_overview_dedupes_and_skips_unfinished(store, report):
    _, _, md, js = report
    sec = section(md, "Runs")
    assert "1 reruns with identical params left out" in sec
    assert f"{store.failed[:8]} (build_knowledge, FAILED)" in sec
    assert store.failed not in js["runs"] and store.rerun not in js["runs"] and store.full in js["runs"]


def test_tsne_section_groups_the_demo_words(report):
    _, _, md, js = report
    data = js["sections"]["Prototype map (Figure 3)"]["data"]
    assert data["points"] == 24 and data["grouped"] == 22
    assert data["groups"]["objects"] == 12 and data["groups"]["colours"] == 10
    assert data["silhouette_prototypes"] > 0.5  # the tiny knowledge clusters by group by construction
    assert "demo world word lists" in section(md, "Prototype map")


def test_report_is_logged_as_an_mlflow_run(store, report):
    summary, _, _, _ = report
    rid = summary["mlflow_run_id"]
    run = store.client.get_run(rid)
    assert run.data.tags["job"] == "report"
    names = {f.path for f in store.client.list_artifacts(rid, "report")}
    assert {"report/report.md", "report/report.json", "report/prototype_tsne.png"} <= names


def test_run_ids_of_a_tune_parent_bring_its_trials(store, tmp_path):
    from mask.config import load_config
    from mask.report import make_report

    cfg = load_config("demo", [f"storage.root={store.root}"])
    res = make_report(cfg, run_ids=[store.parent], out_dir=str(tmp_path / "r"), log_run=False)
    js = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(store.trials) <= set(js["runs"]) and store.full not in js["runs"]
    assert res["sections"]["λ1 and λ2 (Tables 4 and 15)"] and not res["sections"]["Loss ablation (Table 3)"]


def test_sections_without_runs_are_omitted_with_a_reason(tmp_path):
    from mask.config import load_config
    from mask.report import make_report

    s = Store(tmp_path / "art", seed=3)
    exp = s.experiment("mask-itm")
    m = recall(s.rng)
    s.run(exp, "build_knowledge", BASE, s.prefixed("mask", m))
    cfg = load_config("demo", [f"storage.root={tmp_path / 'art'}"])
    res = make_report(cfg, out_dir=str(tmp_path / "r"), log_run=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert res["images"] == [] and not list((tmp_path / "r").glob("*.png"))
    for title in ("Loss ablation", "OOD words", "λ1 and λ2", "OOD sampling size m", "Re-ranking weight α",
                  "Training curves", "Modality gap", "Prototype map"):
        body = section(md, title)
        assert "_Omitted: " in body and "| IR R@1" not in body
    # the only logged numbers appear nowhere (no table has them)
    assert f"{m['rsum']:.1f}" not in md


def test_unknown_experiment_run_id_or_store_exit_2(store, tmp_path, capsys):
    from jobs import report as job

    for args, msg in ((["--experiment", "nope"], "MLflow experiment 'nope' does not exist"),
                      (["--runs", "0123abcd"], "MLflow run '0123abcd' does not exist")):
        with pytest.raises(SystemExit) as e:
            job.main([*args, "--out", str(tmp_path / "x"), f"storage.root={store.root}"])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["--out", str(tmp_path / "x"), f"storage.root={tmp_path / 'empty'}"])
    assert e.value.code == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists() and not (tmp_path / "x").exists()


def test_bad_groups_file_exit_2(store, tmp_path, capsys):
    from jobs import report as job

    bad = tmp_path / "groups.yaml"
    bad.write_text("animals: dog\n")
    with pytest.raises(SystemExit) as e:
        job.main(["--groups", str(bad), "--out", str(tmp_path / "x"), f"storage.root={store.root}"])
    assert e.value.code == 2
    assert f"groups file {bad}: expected a mapping" in capsys.readouterr().err


def test_prototype_map_with_user_groups(tmp_path):
    from PIL import Image

    from mask.knowledge_artifact import load_knowledge
    from mask.report.prototype_map import load_groups, prototype_map
    from mask.storage import Store as ArtifactStore

    tiny_knowledge(tmp_path, seed=1)
    table, _ = load_knowledge(ArtifactStore(str(tmp_path)), "knowledge/k-tiny")
    f = tmp_path / "g.yaml"
    f.write_text("reds: [red, crimson, Scarlet]\nround: [ball, sphere]\n")
    groups = load_groups(f)
    assert groups == {"reds": ["red", "crimson", "scarlet"], "round": ["ball", "sphere"]}
    stats = prototype_map(table, groups, str(tmp_path / "m.png"), title="t", seed=0)
    assert stats["points"] == 24 and stats["grouped"] == sum(w in table.words for ws in groups.values() for w in ws)
    with Image.open(tmp_path / "m.png") as im:
        assert im.size[0] > 100


def test_out_folder_replaced_only_when_it_holds_a_report(store, tmp_path, capsys):
    from jobs import report as job

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        job.main(["--out", str(other), "--no-mlflow-run", "--runs", store.m10_run, f"storage.root={store.root}"])
    assert e.value.code == 2 and "is not a report folder" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "rep"
    for _ in range(2):  # a rerun replaces the earlier report
        s = job.main(["--out", str(out), "--no-mlflow-run", "--runs", store.m10_run, f"storage.root={store.root}"])
    assert s["mlflow_run_id"] is None and (out / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "rep"]  # no temporary folders left


def test_runs_from_before_a_config_section_was_added_still_compare():
    from mask.report.runs import RunRecord, dedupe, param_differences

    def rec(rid, t, params, n_metrics):
        return RunRecord(run_id=rid, name="b", job="build_knowledge", status="FINISHED", start_time=t,
                         experiment_id="1", params=params, metrics={f"x{i}": 1.0 for i in range(n_metrics)}, tags={})

    old = rec("old", 1, {"loss.lambda_cm": "3", "knowledge.m": "3"}, 10)  # logged before index.* existed
    new = rec("new", 2, {"loss.lambda_cm": "3", "knowledge.m": "3", "index.ttl": "600"}, 4)
    other = rec("oth", 3, {"loss.lambda_cm": "0", "knowledge.m": "3", "index.ttl": "600"}, 4)
    assert param_differences(old, new) == [] and param_differences(old, other) == ["loss.lambda_cm"]
    kept, dropped = dedupe([other, new, old])
    assert [r.run_id for r in kept] == ["oth", "old"] and dropped == 1  # the one with more metrics stays
