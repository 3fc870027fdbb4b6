"""The run folder carries its label space: predict/eval/query on another store without a vocabulary."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.clip.model import model_identity
from pipeline.config import ConfigError
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, TINY_CLIP_DIM, make_tiny_store, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.conftest import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, clip_dir):
    """The training store (vocabulary embedded by the tiny CLIP) and a second store of the same
    scenes without any vocabulary, as a test split preprocessed later without `embed` would be."""
    base = tmp_path_factory.mktemp("runs")
    train = make_tiny_store(base / "train.zarr", n_scenes=1, n_points=700, seed=3)
    s = Store.open(train)
    text, attrs = s.read_vocab("classes")
    s.write_vocab("classes", text, {**attrs, "model": model_identity(str(clip_dir))})
    other = make_tiny_store(base / "other.zarr", n_scenes=1, n_points=700, seed=3)
    shutil.rmtree(other / "vocab" / "classes")
    assert Store.open(other).vocab_names() == []
    return train, other


@pytest.fixture(scope="module")
def run(stores, tmp_path_factory):
    from ws3d_train.train.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("run") / "run"
    finetune(tiny_run_config(FinetuneConfig, stores[0], batch_size=1, steps=1, labels="all",
                             ov_split="novel=cabinet"), out)
    return out


def test_finetune_writes_the_label_space(run, stores, clip_dir):
    from ws3d_train.run import LABELS_FILE, TEXT_FILE, open_run, read_label_space

    assert (run / LABELS_FILE).is_file() and (run / TEXT_FILE).is_file()
    labels = read_label_space(run)
    assert labels.class_names == tuple(TINY_CLASSES)
    assert labels.novel_ids == (TINY_CLASSES.index("cabinet"),) and labels.ov_split == "novel=cabinet"
    assert TINY_CLASSES.index("cabinet") not in labels.base_ids
    text, _ = Store.open(stores[0]).read_vocab("classes")
    np.testing.assert_allclose(labels.text, text.astype(np.float32))
    assert labels.text_model == model_identity(str(clip_dir))
    info = open_run(run)  # no network built
    assert info.path == run and info.step == 1 and info.labels.class_names == tuple(TINY_CLASSES)
    assert info.store == str(stores[0])


def test_predict_eval_query_on_a_store_without_vocabulary(run, stores, tmp_path):
    from ws3d_train.infer.evaluate import evaluate
    from ws3d_train.infer.predict import predict_scene, query_scene
    from ws3d_train.run import eval_path, load_run, resolve_classes

    train, other = stores
    scene = Store.open(other).scene_ids()[0]
    loaded = load_run(run, device="cpu")
    setup = resolve_classes(loaded, Store.open(other))
    assert setup.text_source == "run" and setup.text.shape == (len(TINY_CLASSES), TINY_CLIP_DIM)
    a = predict_scene(loaded, train, scene, device="cpu")
    b = predict_scene(loaded, other, scene, device="cpu")
    np.testing.assert_array_equal(a.pred_class, b.pred_class)  # same scene, same run: same answer
    # the run's own embeddings are the store's: asking for the store vocabulary changes nothing
    c = predict_scene(loaded, train, scene, vocab="classes", device="cpu")
    np.testing.assert_array_equal(a.pred_class, c.pred_class)
    # the other store has no vocabulary to ask for
    with pytest.raises(ConfigError, match="no vocabulary 'classes'"):
        predict_scene(loaded, other, scene, vocab="classes", device="cpu")
    result = evaluate(loaded, other, [scene], min_region_size=5, device="cpu")
    assert result["split"]["novel"] == ["cabinet"] and result["scenes"] == 1
    assert eval_path(run, other, "val") != eval_path(run, train, "val") != eval_path(run, train, None)
    assert eval_path(run, other, "val") == run / "eval" / "other.val.json"
    query = query_scene(loaded, other, scene, "a red chair", device="cpu")  # model recorded in the run
    assert query.similarity.shape == (b.xyz.shape[0],)


def test_a_run_without_labels_json_still_loads(run, stores, tmp_path):
    from ws3d_train.infer.predict import predict_scene
    from ws3d_train.run import LABELS_FILE, load_run, resolve_classes

    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / LABELS_FILE).unlink()
    loaded = load_run(old, device="cpu")
    assert loaded.class_names == tuple(TINY_CLASSES) and loaded.novel_ids == (TINY_CLASSES.index("cabinet"),)
    assert resolve_classes(loaded, Store.open(stores[0])).text_source == "store:classes"
    with pytest.raises(ConfigError, match="no vocabulary 'classes'"):
        predict_scene(loaded, stores[1], Store.open(stores[1]).scene_ids()[0], device="cpu")


def test_a_store_of_other_classes_is_refused(run, tmp_path):
    from ws3d_train.run import load_run, resolve_classes

    s = Store.create(tmp_path / "x.zarr", dataset="synthetic", class_names=["a", "b"])
    loaded = load_run(run, device="cpu")
    with pytest.raises(ConfigError, match="trained on classes"):  # the store's vocabulary asked for
        resolve_classes(loaded, s, vocab="classes")
    if loaded.labels is not None and loaded.labels.text is not None:
        # without a vocabulary (a store of one's own scans): the run's own label space
        setup = resolve_classes(loaded, s)
        assert list(setup.class_names) == list(loaded.labels.class_names) != ["a", "b"]


def test_cli_eval_writes_one_file_per_store_and_split_and_query_into_the_run(run, stores):
    import json

    from typer.testing import CliRunner

    from cli import app

    train, other = stores
    runner = CliRunner()
    for store in (train, other):
        result = runner.invoke(app, ["eval", "--run", str(run), "-s", str(store), "--split", "all", "--min-region-size", "5"])
        assert result.exit_code == 0, result.output
    own, foreign = run / "eval" / "train.all.json", run / "eval" / "other.all.json"
    assert json.loads(own.read_text())["store"] == str(train)  # not overwritten by the other store's
    assert json.loads(foreign.read_text())["store"] == str(other)
    assert not (run / "eval.json").exists()
    scene = Store.open(other).scene_ids()[0]
    result = runner.invoke(app, ["query", "a red chair", "--run", str(run), "-s", str(other), "--scene", scene])
    assert result.exit_code == 0, result.output
    assert (run / f"query_a_red_chair_{scene}.ply").is_file()
