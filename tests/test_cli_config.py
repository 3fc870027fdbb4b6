"""The CLI's config handling (issue 26, item 2): every key of a --config file or override is
checked, a run's own config.yaml configures the command that wrote it (or is refused in one line
saying why), a workflow given to a stage command is read as a workflow, bad values are one line."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from pipeline.config import to_dict
from pipeline.executor import RunReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def captured(monkeypatch):
    """The configs the commands would run with (the loops and the stage runner are replaced)."""
    import pipeline.stage
    import ws3d_train.train.finetune
    import ws3d_train.train.pretrain

    seen: dict = {}

    def loop(name):
        def run(cfg, out, resume=False):
            seen[name] = cfg
            return {"steps": cfg.steps}
        return run

    def stage(stage, run, executor, echo=None, log=True):
        seen[stage.name], seen["executor"] = run.cfg, executor
        return RunReport(stage.name, [])

    monkeypatch.setattr(ws3d_train.train.finetune, "finetune", loop("finetune"))
    monkeypatch.setattr(ws3d_train.train.pretrain, "pretrain", loop("pretrain"))
    monkeypatch.setattr(pipeline.stage, "run_stage", stage)
    return seen


def _one_error_line(result) -> str:
    output = result.output.strip()
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}\n{result.exception!r}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) < 400, output[:2000]
    return errors[0]


def _run_config(tmp_path, cls, name: str, **values):
    """A run's own config.yaml, written the way the training loop writes it."""
    from tests.conftest import tiny_run_config

    folder = tmp_path / name
    folder.mkdir()
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_run_config(cls, "old/store.zarr", **values)), sort_keys=False))
    return path


def test_a_finetune_runs_own_config_configures_finetune(tmp_path, captured):
    """`ws3d finetune --config RUN/config.yaml` was ignored without a word: 5,000 steps instead of
    200, w_align 0 instead of 1."""
    from ws3d_train.train.finetune import FinetuneConfig

    config = _run_config(tmp_path, FinetuneConfig, "ft", steps=200, w_align=1.0, scenes="lr5", labels="la50")
    result = CliRunner().invoke(app, ["finetune", "-s", str(tmp_path / "new.zarr"), "-o", str(tmp_path / "run2"),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    cfg = captured["finetune"]
    assert (cfg.steps, cfg.w_align, cfg.labels, cfg.scenes) == (200, 1.0, "la50", "lr5")  # the file's, scenes too
    assert cfg.store == str(tmp_path / "new.zarr")  # --store wins over the file
    # a command-line value wins over the file; --scenes all means every scene
    CliRunner().invoke(app, ["finetune", "-s", "s.zarr", "-o", str(tmp_path / "r3"), "--config", str(config),
                             "--scenes", "all", "steps=7"])
    assert (captured["finetune"].steps, captured["finetune"].scenes) == (7, None)
    # without a file the train split stays the default
    CliRunner().invoke(app, ["finetune", "-s", "s.zarr", "-o", str(tmp_path / "r4")])
    assert captured["finetune"].scenes == "train"


def test_a_pretrain_runs_config_is_refused_by_finetune_in_one_line(tmp_path, captured):
    from ws3d_train.train.pretrain import PretrainConfig

    config = _run_config(tmp_path, PretrainConfig, "pre", steps=300)
    result = CliRunner().invoke(app, ["finetune", "-s", "s.zarr", "-o", str(tmp_path / "r"), "--config", str(config)])
    line = _one_error_line(result)
    assert "a `pretrain` config" in line and str(config) in line and "finetune" not in captured
    result = CliRunner().invoke(app, ["pretrain", "-s", "s.zarr", "-o", str(tmp_path / "r"), "--config", str(config)])
    assert result.exit_code == 0 and captured["pretrain"].steps == 300


@pytest.mark.parametrize("text,words", [
    ("finetun:\n  steps: 200\n", "did you mean 'finetune'"),             # a misspelled section
    ("finetune:\n  steps: 200\nverbose: true\n", "verbose"),             # an unknown top-level key
    ("finetune:\n  stpes: 200\n", "stpes"),                               # an unknown key in the section
    ("finetune:\n  steps: 200\npretrain:\n  w_veiw: 1\n", "w_veiw"),     # the other loop's section, checked too
    ("pretrain:\n  steps: 200\n", "nothing in it for this command"),      # nothing for finetune
    ("finetune:\n  steps: 0\n", "steps must be >= 1"),                    # a value the config refuses
])
def test_a_training_config_file_is_checked_whole(tmp_path, captured, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["finetune", "-s", "s.zarr", "-o", str(tmp_path / "r"), "--config", str(path)])
    assert words in _one_error_line(result)
    assert "finetune" not in captured


@pytest.mark.parametrize("text,words", [
    ("rendr:\n  width: 64\n", "did you mean 'render'"),
    ("render:\n  width: 64\nverbose: true\n", "verbose"),
    ("render:\n  width: 64\nexecutor:\n  workers: -3\n", "workers must be >= 0"),
    ("render:\n  width: 64\nembed:\n  scale: [1.0]\n", "scale"),           # a sibling stage's typo
])
def test_a_stage_config_file_is_checked_whole(tmp_path, captured, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["render", "-s", str(tmp_path / "s.zarr"), "--config", str(path)])
    assert words in _one_error_line(result)
    assert "render" not in captured


def test_an_alias_bomb_is_one_short_line(tmp_path, captured):
    from tests.pipeline.test_config import _bomb

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    result = CliRunner().invoke(app, ["render", "-s", str(tmp_path / "s.zarr"), "--config", str(path)])
    assert "expands to more than" in _one_error_line(result)


def test_bad_values_on_the_command_line_are_one_line(tmp_path, captured):
    """These were tracebacks with exit code 1."""
    for argv, words in ((["overseg", "-s", "s.zarr", "k_neighbours=1"], "k_neighbours"),
                        (["render", "-s", "s.zarr", "width=0"], "render.width must be >= 1"),  # failed every scene
                        (["render", "-s", "s.zarr", "executor.workers=-3"], "workers must be >= 0"),
                        (["render", "-s", "s.zarr", "executor.nope=1"], "unknown key 'nope'")):
        assert words in _one_error_line(CliRunner().invoke(app, argv))


def test_stage_configs_from_sections_a_flat_file_and_a_workflow(tmp_path, captured):
    from pipeline.workflow import load_workflow
    from tests.paths import ROOT

    path = tmp_path / "c.yaml"
    path.write_text("render:\n  width: 64\noverseg:\n  k_neighbours: 12\nexecutor:\n  kind: sync\n")
    result = CliRunner().invoke(app, ["render", "-s", "s.zarr", "--config", str(path), "height=40"])
    assert result.exit_code == 0, result.output
    assert (captured["render"].width, captured["render"].height, captured["executor"].kind) == (64, 40, "sync")
    path.write_text("width: 80\n")  # the stage's own config, no sections
    CliRunner().invoke(app, ["render", "-s", "s.zarr", "--config", str(path)])
    assert captured["render"].width == 80 and captured["executor"].kind == "local"
    # a workflow: checked as a workflow, the stage's config as the workflow runs it
    workflow = ROOT / "workflows" / "synthetic.yaml"
    result = CliRunner().invoke(app, ["embed", "-s", "s.zarr", "--model", "m", "--config", str(workflow)])
    assert result.exit_code == 0, result.output
    expected = load_workflow(workflow, []).stage_config("embed")
    assert captured["embed"] == type(expected)(**{**vars(expected), "model": "m"})
    assert captured["executor"] == load_workflow(workflow, []).executor
    broken = tmp_path / "wf.yaml"
    broken.write_text(workflow.read_text() + "rendr:\n  width: 3\n")
    assert "rendr" in _one_error_line(CliRunner().invoke(app, ["render", "-s", "s.zarr", "--config", str(broken)]))
