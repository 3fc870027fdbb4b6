"""Stages as declarations: the CLI commands and the workflow runner come from one list, take one
path, and a workflow file is checked whole before its first stage writes anything."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from pipeline import schema
from pipeline.config import ConfigError
from pipeline.stages import STAGES
from pipeline.store import Store
from pipeline.workflow import load_workflow
from tests.synthdata import small_raw


def _workflow(tmp_path, **sections) -> tuple:
    raw = small_raw(tmp_path / "raw", 1)
    store = tmp_path / "store.zarr"
    wf = {"dataset": "synthetic", "raw": str(raw), "store": str(store), "stages": ["ingest", "overseg", "render"],
          "executor": {"kind": "sync"}, **sections}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    return path, store


@pytest.mark.parametrize("sections, key", [
    ({"render": {"widht": 100}}, "widht"),                    # a typo in a stage section
    ({"overseg": {"voxel_m": "fine"}}, "voxel_m"),            # a wrong type
    ({"rendr": {"width": 100}}, "rendr"),                     # a misspelled section
    ({"ingest": {"reader": {"label_tabel": "x.tsv"}}}, "label_tabel"),  # a reader option the reader lacks
    ({"stages": ["ingest", "rendr"]}, "rendr"),               # a stage that does not exist
])
def test_a_bad_workflow_exits_2_naming_the_key_before_any_stage_writes(tmp_path, sections, key):
    path, store = _workflow(tmp_path, **sections)
    result = CliRunner().invoke(app, ["preprocess", "--workflow", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and key in result.output and "Traceback" not in result.output
    assert not store.exists() and not (tmp_path / "store.zarr.logs").exists()


def test_workflow_sections_are_the_stages_config_classes(tmp_path):
    path, _ = _workflow(tmp_path, render={"width": 100}, overseg={"voxel_m": 0.03})
    cfg = load_workflow(path, ["render.height=60"])
    assert (cfg.render.width, cfg.render.height, cfg.overseg.voxel_m) == (100, 60, 0.03)
    assert cfg.stage_config("ingest").dataset == "synthetic"
    with pytest.raises(ConfigError, match="widht"):
        load_workflow(path, ["render.widht=60"])


def test_every_stage_has_its_command_with_its_options():
    runner = CliRunner()
    for stage in STAGES:
        result = runner.invoke(app, [stage.name, "--help"])
        assert result.exit_code == 0, result.output
        assert "--store" in result.output and "--shard" in result.output and "--executor" in result.output
        for option in stage.options:
            assert option.flags[0] in result.output


def test_cli_embed_and_workflow_embed_write_identical_arrays(tmp_path):
    """`ws3d embed` and a workflow's embed stage run the same code path: the same model on copies
    of one store gives the same clip arrays and the same vocabulary, byte for byte."""
    from pipeline.datasets.scannet import CLASS_NAMES
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher

    path, store = _workflow(tmp_path)
    assert CliRunner().invoke(app, ["preprocess", "--workflow", str(path)]).exit_code == 0
    model = random_teacher(tmp_path / "clip", CLASS_NAMES, TeacherConfig(vision_layers=1, text_layers=1, projection_dim=16))
    cli_store = tmp_path / "cli.zarr"
    shutil.copytree(store, cli_store)
    result = CliRunner().invoke(app, ["embed", "-s", str(cli_store), "--model", str(model), "-x", "sync"])
    assert result.exit_code == 0, result.output
    assert "vocabulary 'classes'" in result.output
    result = CliRunner().invoke(app, ["preprocess", "--workflow", str(path), "stages=[embed]", f"embed.model={model}"])
    assert result.exit_code == 0, result.output
    a, b = Store.open(cli_store), Store.open(store)
    assert a.scene_ids() == b.scene_ids() and a.scene_ids()
    for scene in a.scene_ids():
        for spec in schema.arrays_of_stage("embed"):
            x, y = a.read(scene, spec), b.read(scene, spec)
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{scene} {spec.name}"
        assert a.stage_record(scene, "embed")["config_hash"] == b.stage_record(scene, "embed")["config_hash"]
    ta, attrs_a = a.read_vocab("classes")
    tb, attrs_b = b.read_vocab("classes")
    assert np.array_equal(ta, tb) and attrs_a == attrs_b
