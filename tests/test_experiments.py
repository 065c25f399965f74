"""jobs/experiments.py on a tiny slice of the demo world (one seed, two settings, 1 epoch): every part runs,
prints its time, writes the report; a rerun reuses the committed runs.  Heavy-ish (~1–2 min: Ray starts once,
the tiny world's features are extracted once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["ray.num_cpus=2", "dataset.limit=24", "gallery.limit=10", "finetune.steps=3", "detector.rpn_post_nms_topk=40",
        "detector.min_size=128", "detector.max_size=160", "detector.num_boxes=12"]
PLAN = ["--plan-set", "seeds=[0, 1]", "--plan-set", "settings=[default, without_L_cl, lambda_1_3]",
        "--plan-set", "epochs=1", "--plan-set", "lambda_grid=[1, 3]", "--plan-set", "m_grid=[1, 3]",
        "--plan-set", "alpha_grid=[0, 0.15]", "--plan-set", "heldout_m=[1, 2]", "--plan-set", "threads=1"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    out = root / "report"
    cmd = [sys.executable, str(ROOT / "jobs" / "experiments.py"), *PLAN, "--out", str(out), "--name", "tiny",
           f"storage.root={root / 'store'}", *TINY]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    return root, out, first.stdout, second.stdout


def test_every_part_runs_and_prints_its_time(ran):
    _, out, first, second = ran
    for part in ("inputs", "train", "heldout", "report"):
        assert f"[experiments] part {part}:" in first
    assert first.count(": Rs ") == 6  # 3 settings × 2 seeds trained
    assert second.count(": reused") == 6 and ": Rs " not in second  # committed work is reused


def test_report_tables_state_gallery_protocol_epochs_and_spread(ran):
    _, out, _, _ = ran
    md = (out / "experiments.md").read_text()
    for section in ("Table 3 — loss ablations", "Table 3 — OOD words on/off", "Table 5", "Tables 4/15",
                    "Table 6", "Held-out-word OOD test", "Paper Table 3", "Paper Table 5"):
        assert section in md, section
    assert "| default | demo_gallery (all 10 images, 50 captions) | 1 gallery, 5 captions/image" in md
    assert " ± " in md
    assert (out / "lambda_heatmap.png").stat().st_size > 0 and (out / "heldout_curve.png").stat().st_size > 0
    data = json.loads((out / "experiments.json").read_text())
    assert set(data) == {"default", "without_L_cl", "lambda_1_3"} and set(data["default"]) == {"0", "1"}
    d = data["default"]["0"]
    assert {"mask.cos", "mask.dot", "without_ood.cos", "m_grid", "alpha_grid", "finetuned", "heldout"} <= set(d)
    cur = d["heldout"]["curves"]
    assert set(cur) == {"topm_dot", "topm_cosine", "procrustes", "mean_of_known"}
    for pts in cur.values():
        for v in pts.values():
            assert -1.0 <= v["cos"] <= 1.0 and v["rank"] >= 1.0
    assert 0 < d["history_last"]["share_rec"] < 1


def test_jobs_report_reads_the_experiment_runs_for_loss_and_ood_ablations(ran):
    """jobs/report.py on the experiment runs (the job's last part) fills Table 3's loss-ablation and OOD
    sections from them, one row per seed, under a line naming the gallery/split, protocol and epochs."""
    _, out, _, _ = ran
    md = (out / "mlflow-report" / "report.md").read_text()
    loss = md.split("## Loss ablation")[1].split("\n## ")[0]
    assert "_Omitted" not in loss and "protocol: experiment: MASK (mask.*) · epochs: 1" in loss
    assert "| MASK w/o L_cl (seed 0) |" in loss and "| MASK w/o L_cl (seed 1) |" in loss
    ood = md.split("## OOD words on/off")[1].split("\n## ")[0]
    assert "_Omitted" not in ood and "| MASK w/o OOD words (seed 0) |" in ood


def test_heldout_test_recovers_prototypes_that_follow_the_word_vectors():
    """A knowledge whose prototypes are a linear map of the word vectors: Procrustes recovers hidden words
    nearly exactly and top-m beats the mean-of-known baseline (the test measures what it claims)."""
    from mask.knowledge import KnowledgeTable
    from mask.pipeline.experiments import Plan, heldout_ood

    rng = np.random.default_rng(0)
    wv = rng.normal(size=(60, 6))
    protos = wv @ rng.normal(size=(6, 10)) + 0.01 * rng.normal(size=(60, 10))
    t = KnowledgeTable(words=[f"w{i}" for i in range(60)], counts=np.ones(60, np.int64), word_vectors=wv,
                       prototypes=protos, source=["vg"] * 60)
    res = heldout_ood(t, Plan(heldout_fraction=0.2, heldout_m=[1, 3]), seed=0)
    assert res["hidden"] == 12 and res["known"] == 48
    c = res["curves"]
    assert c["procrustes"]["all"]["cos"] > 0.6  # a similarity map fits a generic linear map only partly
    assert c["topm_dot"]["1"]["cos"] > c["mean_of_known"]["all"]["cos"]
    assert c["mean_of_known"]["all"]["rank"] > c["topm_cosine"]["3"]["rank"]
