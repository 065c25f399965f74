"""The jobs' command line (jobs/_cli.py): every option in --help, argparse errors for bad values, one
line on stderr for a project error, fail-fast input checks before Ray starts, and a quiet console (the one
test that runs a whole job in a subprocess, beside this session's Ray)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# every job and the options it must list in --help
OPTIONS = {
    "jobs.build_knowledge": ["--config", "--log-level"],
    "jobs.train": ["--config", "--log-level"],
    "jobs.base_scores": ["--config", "--log-level"],
    "jobs.extract_regions": ["--target"],
    "jobs.score_gallery": ["--knowledge"],
    "jobs.reindex": ["--knowledge"],
    "jobs.evaluate": ["--index", "--scores", "--protocol"],
    "jobs.query": ["--text", "--image", "--index", "--top", "--show"],
    "jobs.experiments": ["--plan", "--plan-set", "--out", "--name", "--config"],
    "jobs.report": ["--experiment", "--runs", "--out", "--groups", "--tsne-run", "--no-mlflow-run"],
    "tune.sweep": ["--space", "--name", "--resume"],
}


@pytest.mark.parametrize("module", sorted(OPTIONS))
def test_help_lists_every_option(module, capsys):
    job = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        job.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in [*OPTIONS[module], "--config", "--log-level", "key.path=value"]:
        assert opt in out, f"{module} --help lacks {opt}"


@pytest.mark.parametrize("module,argv,needle", [
    ("jobs.extract_regions", ["--target"], "--target: expected one argument"),
    ("jobs.extract_regions", ["--target", "vg"], "invalid choice: 'vg'"),
    ("jobs.query", ["--text", "dog", "--top", "0"], "--top: expected a number >= 1"),
    ("jobs.query", ["--text", "dog", "--top", "ten"], "--top: expected a whole number"),
    ("jobs.query", [], "give at least one --text or --image"),
    ("jobs.build_knowledge", ["--log-level", "LOUD"], "--log-level: invalid choice"),
    ("jobs.evaluate", ["--protocol", "nope"], "--protocol: invalid choice"),
])
def test_bad_option_values_are_argparse_errors(module, argv, needle, capsys, tmp_path):
    job = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        job.main([f"storage.root={tmp_path}", *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_options_and_overrides_mix_in_any_order(tmp_path):
    from jobs._cli import job_parser, parse_job

    p = job_parser("x")
    p.add_argument("--top", type=int, default=1)
    args, cfg = parse_job(p, ["model.latent_dim=16", "--top", "3", f"storage.root={tmp_path}"])
    assert args.top == 3 and cfg.model.latent_dim == 16 and cfg.storage.root == str(tmp_path)


def test_alias_override_is_a_string_not_yaml():
    from mask.config import load_config

    cfg = load_config(None, ["index.knowledge=@nope"])
    assert cfg.index.knowledge == "@nope"
    assert load_config(None, ["index.knowledge=@champion "]).index.knowledge == "@champion"


def test_config_error_is_one_line(capsys, tmp_path):
    from jobs import train

    with pytest.raises(SystemExit) as e:
        train.main([f"storage.root={tmp_path}", "model.latent_dim=x", "train.epochs=y"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.latent_dim" in err[0] and "train.epochs" in err[0]


def test_run_maps_project_errors_to_one_line(capsys):
    from jobs._cli import _state, run
    from mask.datasets.records import DatasetError
    from mask.losses import NonFiniteLoss

    _state["log_level"] = "INFO"

    def wrapped():  # as Ray wraps a worker's error: the project error is the cause
        try:
            raise DatasetError("dataset.path /x/vg: no such file or folder; fix the path")
        except DatasetError as e:
            raise RuntimeError("RayTaskError(DatasetError): long\ntraceback") from e

    def from_a_worker():  # RayTaskError(DatasetError) is a DatasetError whose str() is the worker's traceback
        import ray.exceptions

        try:
            raise DatasetError("gallery.captions /x/c.txt: line 3 has no text")
        except DatasetError as e:
            raise ray.exceptions.RayTaskError("read", "Traceback (most recent call last):\n  File x", e
                                              ).as_instanceof_cause() from None

    for main, code, needle in [(wrapped, 2, "error: dataset.path /x/vg: no such file or folder; fix the path"),
                               (from_a_worker, 2, "error: gallery.captions /x/c.txt: line 3 has no text"),
                               (lambda: (_ for _ in ()).throw(NonFiniteLoss("loss_ir", "nan", 3)), 1, "loss_ir"),
                               (lambda: {}["boom"], 1, "internal error")]:
        with pytest.raises(SystemExit) as e:
            run(main)
        assert e.value.code == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    _state["log_level"] = "DEBUG"  # tracebacks only with --log-level DEBUG
    with pytest.raises(RuntimeError):
        run(wrapped)
    _state["log_level"] = "INFO"


# ---------------------------------------------------------------- fail fast, in a subprocess as a user runs it


def _job(script: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    # Ray's own knob for its fixed 30 s wait on the raylet (overloaded CI machines miss it)
    env = {"RAY_raylet_start_wait_time_s": "300", **os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def _one_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "starting a local Ray" not in p.stderr  # no Ray was started
    return lines[0]


def test_unwritable_storage_root_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = blocker / "artifacts"
    line = _one_line(_job("jobs/build_knowledge.py", f"storage.root={root}"))
    assert line.startswith("error: storage.root ") and str(root) in line and "writable" in line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_storage_root_is_named(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        line = _one_line(_job("jobs/build_knowledge.py", f"storage.root={root}"))
        assert str(root) in line and "not writable" in line
    finally:
        root.chmod(0o755)


def test_missing_dataset_file_is_one_line(tmp_path):
    line = _one_line(_job("jobs/train.py", f"storage.root={tmp_path / 'r'}", "dataset.kind=vg",
                          f"dataset.path={tmp_path / 'no-vg'}", "dataset.name=vg"))
    assert f"dataset.path {tmp_path / 'no-vg'}: no such file or folder" in line


def test_captionless_gallery_fails_before_training(tmp_path):
    """A folder gallery without captions fails in the first seconds: nothing trained, committed or registered."""
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 24), (200, 10, 10)).save(photos / "red.jpg")
    root = tmp_path / "r"
    line = _one_line(_job("jobs/build_knowledge.py", f"storage.root={root}", "gallery.kind=folder",
                          f"gallery.path={photos}", "gallery.name=fx_folder"))
    assert "gallery fx_folder" in line and "gallery.captions=FILE" in line
    assert not (root / "knowledge").exists() and not (root / "mlflow.db").exists()


def test_missing_knowledge_alias_in_override_reaches_the_resolver(tmp_path):
    root = tmp_path / "r"
    line = _one_line(_job("jobs/reindex.py", f"storage.root={root}", "gallery.name=demo_gallery", "gallery.kind=demo",
                          "index.knowledge=@nope"))
    assert "nope" in line and "found character" not in line


def test_missing_knowledge_is_one_line(tmp_path):
    line = _one_line(_job("jobs/score_gallery.py", f"storage.root={tmp_path / 'r'}", "gallery.name=demo_gallery",
                          "gallery.kind=demo", "--knowledge", "knowledge/k-nope"))
    assert "knowledge/k-nope" in line and "does not exist" in line


# ---------------------------------------------------------------- a quiet console


RAY_CHATTER = ("Starting execution of Dataset", "Execution plan of Dataset", "execution finished in",
               "Running Dataset:", "Reporting training result", "Checkpoint successfully created",
               "Progress bars disabled", "Tasks: ", "Active & requested resources")


def test_main_job_console_has_no_warnings_tracebacks_or_colour_codes(main_job_once):
    """The main job on the session's demo slice (tests/mainjob.py: extraction, Ray Train, the committed index,
    MLflow; its own local Ray beside this test session's) writes no Python warning, no traceback and no ANSI
    escape to a redirected stderr: the read-only NumPy blob (mask/features/extractor.py) is copied before
    torch, `region_ids` leave the decode stage as lists (no Arrow pickle fallback), Ray's worker-log prefixes
    are uncoloured (RAY_COLOR_PREFIX=0), and Ray Train's PlacementGroupCleaner reaches this instance's state
    API (RAY_API_SERVER_ADDRESS, mask/pipeline/runtime.py) instead of timing out on another Ray of the
    machine with a GetTimeoutError traceback when training ends, and features are read by Ray Data's V1
    Parquet reader, without the V2 reader's ListFiles task (mask.pipeline.steps.features_dataset)."""
    p = main_job_once
    assert p.returncode == 0, p.stderr[-4000:]
    lines = p.stderr.splitlines()
    bad = [x for x in lines
           if "Warning:" in x or "Traceback" in x or "\x1b[" in x or "falling back to serialize" in x
           or "GetTimeoutError" in x or "Failed to query Ray Train Controller" in x
           or "Parquet dataset sampling" in x or "(ListFiles" in x]
    assert bad == [], "\n".join(bad[:20])
    # Ray Data's per-execution and per-epoch lines and Ray Train's per-report lines stay in Ray's log files
    # (mask/pipeline/console.py); the project's own lines still reach the console
    chatter = [x for x in p.stderr.splitlines() if any(c in x for c in RAY_CHATTER)]
    assert chatter == [], "\n".join(chatter[:20])
    assert "INFO mask.pipeline" in p.stderr
    assert '"extracted": 48' in p.stdout and '"rsum"' in p.stdout
