"""Output hygiene: no ZarrUserWarning after a stage (logs live beside the store), progress as plain
lines in a log and a bar only on a terminal."""
from __future__ import annotations

import io
import json
import warnings

import pytest
from typer.testing import CliRunner

from cli import app
from tests.synthdata import small_raw


def _open_everything(path):
    import zarr

    from pipeline.store import Store
    from pipeline.summary import summarise_store

    store = Store.open(path)
    summarise_store(store)
    list(zarr.open_group(str(path), mode="r").members(max_depth=None))


def test_a_stage_leaves_no_zarr_warning_and_logs_beside_the_store(tmp_path):
    raw = small_raw(tmp_path / "raw", 1)
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["ingest", "-d", "synthetic", "-r", str(raw), "-s", str(store), "-x", "sync"])
    assert result.exit_code == 0, result.output
    assert "ZarrUserWarning" not in result.output
    log = tmp_path / "s.zarr.logs" / "ingest.jsonl"
    assert json.loads(log.read_text().splitlines()[0])["status"] == "done"
    assert not (store / "logs").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, ZarrUserWarning included, fails the test
        _open_everything(store)


def test_logs_an_older_version_left_inside_the_store_are_moved_out(tmp_path):
    from pipeline.datasets import scannet
    from pipeline.store import Store, log_dir

    path = tmp_path / "old.zarr"
    Store.create(path, dataset="synthetic", class_names=list(scannet.CLASS_NAMES))
    (path / "logs").mkdir()
    (path / "logs" / "ingest.jsonl").write_text('{"old": 1}\n')
    with pytest.warns(Warning, match="logs"):  # what users saw before
        _open_everything(path)
    target = log_dir(path)
    assert (target / "ingest.jsonl").read_text() == '{"old": 1}\n' and not (path / "logs").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _open_everything(path)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(monkeypatch):
    from pipeline.progress import LineProgress, progress_bar

    log = io.StringIO()
    bar = progress_bar(total=3, desc="render", unit="scene", stream=log, interval_s=0.0)
    assert isinstance(bar, LineProgress)
    for _ in range(3):
        bar.update()
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") == 3  # one line per update (interval 0), no repeat at close
    assert text.splitlines()[-1].startswith("render: 3/3 scene (100%)")

    slow = io.StringIO()
    bar = progress_bar(range(50), desc="eval", stream=slow, interval_s=3600.0)
    assert sum(1 for _ in bar) == 50
    assert slow.getvalue().count("\n") == 1  # nothing until the interval passed; the final line
    assert "50/50" in slow.getvalue() and "done" in slow.getvalue()

    from tqdm.auto import tqdm

    terminal = _Terminal()
    bar = progress_bar(total=2, desc="t", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    bar = progress_bar(total=2, stream=quiet, enabled=False, interval_s=0.0)
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == ""


def test_metrics_logger_progress_in_a_log_file(tmp_path, capsys, monkeypatch):
    from ws3d_train.logging import MetricsLogger

    monkeypatch.setenv("WS3D_PROGRESS_INTERVAL_S", "0")
    with MetricsLogger(tmp_path, total_steps=3, tensorboard=False, description="finetune") as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 1.0 / step})
            logger.advance()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("finetune:")]
    assert len(lines) == 3 and lines[0].startswith("finetune: 1/3 step") and "loss=" in lines[0]


def test_other_libraries_bars_are_off_in_a_log(monkeypatch):
    from pipeline.progress import quiet_library_bars

    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # restored as they were after the test
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    assert quiet_library_bars(_Terminal()) is False
    import os

    assert "TQDM_DISABLE" not in os.environ
    assert quiet_library_bars(io.StringIO()) is True
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
