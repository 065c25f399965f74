"""The quiet console's Ray Data filter and config (mask/pipeline/console.py)."""

from __future__ import annotations

import json
import logging

from mask.pipeline import console


def _record(name: str, level: int, msg: str, **extra) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    r.__dict__.update(extra)
    return r


def test_filter_passes_warnings_and_driver_progress_only():
    f = console.RayDataConsoleFilter()
    ex = "ray.data._internal.execution.streaming_executor"
    assert f.filter(_record(ex, logging.WARNING, "a real warning"))
    assert f.filter(_record(ex, logging.ERROR, "an error"))
    assert not f.filter(_record(ex, logging.INFO, "Starting execution of Dataset dataset_1_0."))
    assert not f.filter(_record(ex, logging.WARNING, "hidden", hide=True))
    # the training dataset's progress bars are off on purpose (a bar per epoch split): Ray Data's warning about it
    assert not f.filter(_record("ray.data._internal.progress", logging.WARNING,
                                "Progress bars disabled. To enable, set ..."))
    assert f.filter(_record(console.PROGRESS_LOGGER, logging.INFO, "Total Progress: 10/40"))
    for line in ("======= Running Dataset: dataset_1_0 =======", "MapBatches(DetectStage): 3/40", "",
                 "  Tasks: 1; Actors: 2; Queued blocks: 0"):
        assert not f.filter(_record(console.PROGRESS_LOGGER, logging.INFO, line)), line


def test_config_is_ray_datas_default_with_the_filter_on_the_console(tmp_path, monkeypatch):
    monkeypatch.setattr(console.tempfile, "gettempdir", lambda: str(tmp_path))
    for key in (console.DATA_CONFIG_ENV, console.PROGRESS_INTERVAL_ENV):  # restored after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    console.quiet_ray_console(debug=True)
    assert console.DATA_CONFIG_ENV not in console.os.environ  # DEBUG: Ray's consoles as they are
    console.quiet_ray_console(debug=False)
    path = console.os.environ[console.DATA_CONFIG_ENV]
    cfg = json.loads(open(path).read())
    assert cfg["loggers"]["ray.data"]["handlers"] == ["file", "console"]
    assert cfg["filters"]["console_filter"]["()"] == "mask.pipeline.console.RayDataConsoleFilter"
    assert console.os.environ[console.PROGRESS_INTERVAL_ENV] == "30"
    mine = tmp_path / "mine.yaml"
    mine.write_text(open(path).read())
    monkeypatch.setenv(console.DATA_CONFIG_ENV, str(mine))
    console.quiet_ray_console(debug=False)
    assert console.os.environ[console.DATA_CONFIG_ENV] == str(mine)  # a user's setting is kept
