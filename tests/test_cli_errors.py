"""One error style: a user's mistake is one or two `error:` lines and exit code 2; a bug keeps its traceback."""
from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from cli import app
from tests.conftest import make_tiny_store, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store, a 1-step run on it, an old-style run (no label space) and a store without vocabulary."""
    from ws3d_train.train.finetune import FinetuneConfig, finetune
    from ws3d_train.run import LABELS_FILE

    base = tmp_path_factory.mktemp("cli_errors")
    store = make_tiny_store(base / "s.zarr", n_scenes=1, n_points=600, seed=5)
    run = base / "run"
    finetune(tiny_run_config(FinetuneConfig, store, batch_size=1, steps=1, labels="all"), run)
    old_run = base / "old_run"
    shutil.copytree(run, old_run)
    (old_run / LABELS_FILE).unlink()
    bare = make_tiny_store(base / "bare.zarr", n_scenes=1, n_points=600, seed=5)
    shutil.rmtree(bare / "vocab" / "classes")
    bad_yaml = base / "bad.yaml"
    bad_yaml.write_text("dataset: scannet\nstagez: [ingest]\n")
    scene_file = base / "scenes.txt"
    scene_file.write_text("scene0000_00\nscene0042_00\n")
    (base / "raw" / "scans" / "scene0000_00").mkdir(parents=True)
    (base / "raw" / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.ply").write_text("never read: the executor fails first")
    # a store ingested only (no overseg, no render), and one embedded by a CLIP of another width
    import numpy as np

    from pipeline import schema
    from pipeline.store import Store

    src = Store.open(store)
    scene = src.scene_ids()[0]
    ingested = Store.create(base / "ingested.zarr", dataset="synthetic", class_names=list(src.class_names))
    ingested.write_stage(scene, "ingest", {spec: src.read(scene, spec) for spec in schema.arrays_of_stage("ingest")
                                           if src.has(scene, spec)}, src.stage_record(scene, "ingest"))
    wide = make_tiny_store(base / "wide.zarr", n_scenes=1, n_points=600, seed=5)
    w = Store.open(wide)
    views, segments = w.shape(scene, schema.CLIP_VIEW)[0], w.shape(scene, schema.CLIP_SEGMENT)[0]
    w.write_stage(scene, "embed", {schema.CLIP_VIEW: np.ones((views, 16), np.float16),
                                   schema.CLIP_SEGMENT: np.ones((segments, 16), np.float16),
                                   schema.CLIP_SEGMENT_SEEN: np.ones(segments, np.uint8)},
                  {**w.stage_record(scene, "embed"), "config_hash": "another-clip"})
    return {"store": store, "run": run, "old_run": old_run, "bare": bare, "bad_yaml": bad_yaml,
            "scenes": scene_file, "base": base, "ingested": ingested.path, "wide": wide}


MISTAKES = [
    # (what, argv template, expected text in the message)
    ("missing store", ["info", "-s", "{base}/nope.zarr"], "not a ws3d store"),
    ("missing run", ["predict", "--run", "{base}/no_run", "-s", "{store}", "--scene", "scene0000_00", "-o", "{base}/p.ply"],
     "no such run directory"),
    ("unknown scene", ["predict", "--run", "{run}", "-s", "{store}", "--scene", "scene0099_00", "-o", "{base}/p.ply"],
     "scene0099_00"),
    ("missing vocabulary", ["predict", "--run", "{old_run}", "-s", "{bare}", "--scene", "scene0000_00", "-o", "{base}/p.ply"],
     "no vocabulary 'classes'"),
    ("bad workflow config", ["preprocess", "--workflow", "{bad_yaml}"], "stagez"),
    ("missing workflow", ["preprocess", "--workflow", "{base}/none.yaml"], "none.yaml"),
    ("bad override", ["finetune", "-s", "{store}", "-o", "{base}/r2", "steps=many"], "steps"),
    ("model not found offline", ["query", "a chair", "--run", "{run}", "-s", "{store}", "--scene", "scene0000_00",
                                 "--model", "{base}/no_model"], "no_model"),
    ("unknown split", ["eval", "--run", "{run}", "-s", "{store}", "--split", "nosuchsplit"], "nosuchsplit"),
    ("scene list with a scene not in the store", ["eval", "--run", "{run}", "-s", "{store}", "--split", "{scenes}"],
     "scene0042_00"),
    ("missing raw folder", ["ingest", "-d", "scannet", "-r", "{base}/raw_nope", "-s", "{base}/x.zarr"], "raw_nope"),
    ("bad export format", ["predict", "--run", "{run}", "-s", "{store}", "--scene", "scene0000_00", "--format", "xyz",
                           "-o", "{base}/x"], "xyz"),
    ("export of a non-ScanNet label space", ["predict", "--run", "{run}", "-s", "{store}", "--format", "scannet",
                                             "-o", "{base}/bench"], "ScanNet's 20 classes"),
    ("eval before overseg", ["eval", "--run", "{run}", "-s", "{ingested}", "--split", "all"], "run `ws3d overseg` first"),
    ("views export before render", ["views", "export", "-s", "{ingested}", "--scene", "scene0000_00", "-o", "{base}/v"],
     "run `ws3d render` first"),
    ("2D ensemble with another CLIP's store", ["eval", "--run", "{run}", "-s", "{wide}", "--split", "all",
                                              "--ensemble-2d"], "another CLIP model"),
    ("a store and files at once", ["predict", "--run", "{run}", "-s", "{store}", "--input", "{base}", "-o", "{base}/p"],
     "one of them"),
    ("predict a missing file", ["predict", "--run", "{run}", "--input", "{base}/none.ply", "-o", "{base}/p"], "none.ply"),
    ("a bad reader option", ["predict", "--run", "{run}", "--input", "{base}", "-o", "{base}/p", "--reader", "up=z"],
     "up"),
    ("no submit command", ["ingest", "-d", "synthetic", "-r", "{base}/raw", "-s", "{base}/y.zarr", "-x", "slurm"], "sbatch"),
]


@pytest.mark.parametrize("what,argv,expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_user_mistake_is_one_clear_line(setup, what, argv, expected, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent-bin")  # no sbatch/qsub here, whatever the machine has
    args = [a.format(**{k: str(v) for k, v in setup.items()}) for a in argv]
    result = CliRunner().invoke(app, args)
    output = result.output.strip()
    assert result.exit_code == 2, f"{what}: exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert "Traceback" not in output, what
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"{what}: {output}"
    error_text = "\n".join(lines[lines.index(errors[0]):])
    assert len(error_text.splitlines()) <= 2, f"{what}: {error_text}"
    assert expected in error_text, f"{what}: {error_text!r} lacks {expected!r}"


def test_a_bug_keeps_its_traceback(setup, monkeypatch):
    import pipeline.summary

    def broken(store):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline.summary, "summarise_store", broken)
    result = CliRunner().invoke(app, ["info", "-s", str(setup["store"])])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a one-line error
    assert "error:" not in result.output
