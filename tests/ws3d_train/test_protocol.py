"""The open-vocabulary protocol: novel labels never reach the trainers, the teacher never sees the
3D store's scenes (and the trainers refuse one that did), and the 2D-fusion baseline's core."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import schema
from pipeline.config import ConfigError
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, make_tiny_store, tiny_run_config
from ws3d_train.checkpoint import latest_checkpoint, load_checkpoint
from ws3d_train.data.dataset import DataConfig
from ws3d_train.train.finetune import FinetuneConfig, finetune
from ws3d_train.infer.fusion import fuse_point_embeddings
from ws3d_train.train.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOVEL = ("chair", "table")
OV_SPLIT = "novel=" + ",".join(NOVEL)


def _overwrite(store: Store, scene_id: str, spec: schema.ArraySpec, values: np.ndarray) -> None:
    """Replace one array's values in place (the test's way of relabelling a copy of a store)."""
    array = zarr.open_array(str(store.scene_dir(scene_id) / spec.group / spec.name), mode="r+")
    array[...] = values


def permute_novel_labels(src: Path, dst: Path, novel: tuple[str, ...] = NOVEL) -> int:
    """Copy a store and cycle the labels of the novel classes among themselves; returns the number
    of points relabelled."""
    shutil.copytree(src, dst)
    store = Store.open(dst)
    ids = [store.class_names.index(n) for n in novel]
    changed = 0
    for scene_id in store.scene_ids():
        semantic = store.read(scene_id, schema.SEMANTIC)
        out = semantic.copy()
        for a, b in zip(ids, ids[1:] + ids[:1]):
            out[semantic == a] = b
        changed += int((out != semantic).sum())
        _overwrite(store, scene_id, schema.SEMANTIC, out)
    return changed


def _train(store: Path, out: Path) -> tuple[dict, dict]:
    common = dict(data=DataConfig(max_voxels=500, voxel_size_m=0.1), batch_size=2, warmup_steps=1, seed=3,
                  checkpoint_every=3, log_every=1)
    pretrain(tiny_run_config(PretrainConfig, store, steps=3, **common), out / "pre")
    finetune(tiny_run_config(FinetuneConfig, store, steps=3, init=str(out / "pre"), ov_split=OV_SPLIT, labels="la20",
                             w_align=0.5, **common), out / "ft")
    return (load_checkpoint(latest_checkpoint(out / "pre" / "checkpoints")),
            load_checkpoint(latest_checkpoint(out / "ft" / "checkpoints")))


def _same_tensors(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")


def test_permuting_novel_labels_leaves_pretraining_and_finetuning_bitwise_identical(tmp_path):
    store = make_tiny_store(tmp_path / "store", n_scenes=2, n_points=700, seed=5)
    changed = permute_novel_labels(store, tmp_path / "permuted")
    assert changed > 50  # the relabelling is real
    pre_a, ft_a = _train(store, tmp_path / "a")
    pre_b, ft_b = _train(tmp_path / "permuted", tmp_path / "b")
    for a, b in ((pre_a, pre_b), (ft_a, ft_b)):
        assert a["step"] == b["step"] == 3
        _same_tensors(a["model"], b["model"], "model")
        _same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    # and the check has teeth: relabelling a base class changes the fine-tuned weights
    base_swap = tmp_path / "base_swapped"
    permute_novel_labels(store, base_swap, novel=("floor", "cabinet"))
    _, ft_c = _train(base_swap, tmp_path / "c")
    assert any(not torch.equal(v, ft_c["model"][k]) for k, v in ft_a["model"].items())


def _record(corpus: Path, scenes: list[str]) -> dict:
    return {"store": str(corpus.resolve()), "scenes": scenes, "caption_vocabulary": {"classes": TINY_CLASSES}}


def _stamp_vocab(store_path: Path, record: dict) -> None:
    store = Store.open(store_path)
    text, attrs = store.read_vocab("classes")
    store.write_vocab("classes", text, {**attrs, "teacher_corpus": record})


def test_trainers_refuse_a_teacher_fitted_on_their_store(tmp_path):
    store = make_tiny_store(tmp_path / "store", n_scenes=2, n_points=400, seed=6)
    _stamp_vocab(store, _record(store, ["scene0000_00", "scene0001_00"]))
    with pytest.raises(ConfigError, match="fitted on .*is this store"):
        pretrain(tiny_run_config(PretrainConfig, store, steps=1, batch_size=2), tmp_path / "pre")
    with pytest.raises(ConfigError, match="fitted on"):
        finetune(tiny_run_config(FinetuneConfig, store, steps=1, batch_size=2), tmp_path / "ft")
    # a corpus elsewhere that holds one of the training scenes is refused too
    _stamp_vocab(store, _record(tmp_path / "corpus", ["scene0001_00", "scene5000_00"]))
    with pytest.raises(ConfigError, match="shares 1 scene"):
        pretrain(tiny_run_config(PretrainConfig, store, steps=1, batch_size=2), tmp_path / "pre2")
    # a disjoint corpus passes
    _stamp_vocab(store, _record(tmp_path / "corpus", ["scene5000_00"]))
    summary = pretrain(tiny_run_config(PretrainConfig, store, steps=1, batch_size=2), tmp_path / "pre3")
    assert summary["steps"] == 1


def test_embed_copies_the_teacher_corpus_into_the_vocabulary(tmp_path):
    from pipeline.embed.stage import run_vocabulary
    from pipeline.teacher.config import TeacherConfig
    from pipeline.teacher.fit import random_teacher

    store = make_tiny_store(tmp_path / "store", n_scenes=1, n_points=300, seed=7)
    model = random_teacher(tmp_path / "teacher", TINY_CLASSES, TeacherConfig(vision_layers=1, text_layers=1))
    record = _record(tmp_path / "corpus", ["scene5000_00"])
    (model / "teacher_corpus.json").write_text(json.dumps(record))
    run_vocabulary(str(store), str(model), vocab_name="teacher")
    _, attrs = Store.open(store).read_vocab("teacher")
    assert attrs["teacher_corpus"] == record


def test_fusion_projects_segment_then_view_embeddings_onto_points():
    # 6 points: segments 0 (seen), 1 (unseen), none; 2 views
    segment = np.array([0, 0, 1, 1, -1, -1])
    seg_embed = np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32)
    seen = np.array([True, False])
    view = np.array([[0, 0, 1.0], [0, 1.0, 1.0]], np.float32)
    ptr = np.array([0, 3, 5])
    ids = np.array([0, 2, 3, 3, 4])  # view 0 shows 0, 2, 3; view 1 shows 3, 4; point 5 in no view
    out = fuse_point_embeddings(segment, seg_embed, seen, ptr, ids, view)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose(out[0], [1, 0, 0]) and np.allclose(out[1], [1, 0, 0])  # seen segment
    assert np.allclose(out[2], [0, 0, 1])  # unseen segment: its views
    assert np.allclose(out[3], np.array([0, 1, 2]) / np.sqrt(5))  # mean of views 0 and 1
    assert np.allclose(out[4], np.array([0, 1, 1]) / np.sqrt(2))
    assert np.allclose(out[5], np.array([0, 0.5, 1]) / np.linalg.norm([0, 0.5, 1]))  # scene mean


@pytest.mark.slow
def test_permuting_novel_labels_through_every_stage_leaves_checkpoints_identical(tmp_path):
    """The same through the real stages: synthetic rooms ingested, the copy relabelled, then both
    over-segmented (its label-boundary array too), rendered and embedded by a small CLIP the test
    builds, pre-trained and fine-tuned on the synthetic B15/N4 split."""
    from pipeline.executor import ExecutorConfig
    from pipeline.datasets.scannet import CLASS_NAMES
    from pipeline.teacher.config import TeacherConfig
    from pipeline.embed.config import EmbedConfig
    from pipeline.teacher.fit import random_teacher
    from pipeline.workflow import WorkflowConfig, run_workflow
    from tests.synthdata import small_raw

    raw = small_raw(tmp_path / "raw", 3, seed=2)
    novel = ("sofa", "bookshelf", "desk", "toilet")
    model = random_teacher(tmp_path / "clip", CLASS_NAMES, TeacherConfig(vision_layers=1, text_layers=1, projection_dim=32))
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    sync = ExecutorConfig(kind="sync")
    run_workflow(WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(stores[0]), executor=sync,
                                stages=("ingest",)), echo=lambda _: None)
    assert permute_novel_labels(stores[0], stores[1], novel) > 0
    ckpts = []
    for store in stores:
        run_workflow(WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(store), executor=sync,
                                    stages=("overseg", "render", "embed"), embed=EmbedConfig(model=str(model))),
                     echo=lambda _: None)
        common = dict(data=DataConfig(max_voxels=3000, voxel_size_m=0.1), batch_size=2, warmup_steps=1, seed=4,
                      checkpoint_every=2, log_every=1)
        out = tmp_path / f"run_{store.stem}"
        pretrain(tiny_run_config(PretrainConfig, store, steps=2, **common), out / "pre")
        finetune(tiny_run_config(FinetuneConfig, store, steps=2, init=str(out / "pre"), ov_split="b15n4",
                                 w_align=0.5, **common), out / "ft")
        ckpts.append([load_checkpoint(latest_checkpoint(out / p / "checkpoints")) for p in ("pre", "ft")])
    for a, b in zip(*ckpts):
        _same_tensors(a["model"], b["model"], "model")
        _same_tensors(a["optimizer"], b["optimizer"], "optimizer")


def test_workflow_teacher_stage_needs_its_own_corpus(tmp_path):
    from pipeline.executor import ExecutorConfig
    from pipeline.workflow import TeacherStep, WorkflowConfig, run_workflow

    store = tmp_path / "store.zarr"
    base = dict(dataset="synthetic", raw=str(tmp_path / "raw"), store=str(store), executor=ExecutorConfig(kind="sync"),
                stages=("teacher",))
    with pytest.raises(ConfigError, match="corpus"):
        run_workflow(WorkflowConfig(**base, teacher=TeacherStep(out=str(tmp_path / "t"))), echo=lambda _: None)
    with pytest.raises(ConfigError, match="own store"):
        run_workflow(WorkflowConfig(**base, teacher=TeacherStep(out=str(tmp_path / "t"), corpus=str(store))), echo=lambda _: None)
