"""Pre-training: schedule, checkpoints (weights_only, RNG), a two-step CPU smoke test, exact
resume (4 steps == 2 + resume + 2), and (slow) the loss falling."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from tests.conftest import make_tiny_store, tiny_run_config
from ws3d_train.checkpoint import (
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from ws3d_train.data.dataset import DataConfig
from ws3d_train.logging import read_metrics
from ws3d_train.network import NetworkConfig
from ws3d_train.train.pretrain import PretrainConfig, load_pretrained, pretrain
from ws3d_train.train.schedule import lr_at


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smaller than the shared tiny store: the CPU trains a few steps on it in seconds."""
    return make_tiny_store(tmp_path_factory.mktemp("pretrain") / "store", n_scenes=3, n_points=700, seed=1)


def _cfg(store: Path, **overrides) -> PretrainConfig:
    base = tiny_run_config(
        PretrainConfig, store, data=DataConfig(max_voxels=500, voxel_size_m=0.05), batch_size=2, steps=4,
        warmup_steps=1, lr=2e-3, log_every=1, checkpoint_every=2, keep_checkpoints=0,
    )
    return dataclasses.replace(base, **overrides)


def test_lr_warms_up_then_decays_by_cosine() -> None:
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    warm = [lr_at(s, **kw) for s in range(4)]
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 9)))
    assert lr_at(13, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(4, 14)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_checkpoint_loads_weights_only_and_restores_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(
        tmp_path / "step_00000001.pt", model=model, optimizer=optimizer, step=1, batches_consumed=2,
        config={"a": [1, 2], "b": None}, extra={"metrics": {"loss": 1.5}},
    )
    raw = torch.load(path, weights_only=True)  # only tensors and plain containers inside
    assert raw["step"] == 1 and raw["batches_consumed"] == 2 and raw["config"] == {"a": [1, 2], "b": None}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(raw["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert latest_checkpoint(tmp_path) == path
    state = get_rng_state()
    assert isinstance(state["numpy"]["keys"], torch.Tensor)


def test_pretrain_two_step_cpu_smoke(small_store: Path, tmp_path: Path) -> None:
    cfg = _cfg(small_store, steps=2)
    summary = pretrain(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "loss_view", "loss_segment", "loss_kl", "lr", "grad_norm"):
            assert np.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["loss_view"] + r["loss_segment"] + r["loss_kl"], rel=1e-5)
    assert summary["steps"] == 2 and summary["device"] == "cpu" and summary["scenes"] == 3
    ckpt = torch.load(summary["checkpoint"], weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["network"]["clip_dim"] == 32
    assert ckpt["config"]["network"]["in_channels"] == 4 and ckpt["config"]["network"]["num_classes"] == 5
    # the resolved config written beside the run reads back into the same dataclass
    resolved = load_config(PretrainConfig, tmp_path / "run" / "config.yaml")
    assert resolved.data.voxel_size_m == 0.05 and resolved.network.clip_dim == 32
    model, _ = load_pretrained(summary["checkpoint"], num_classes=7)
    assert model.semantic_head.out_features == 7
    torch.testing.assert_close(model.clip_head.weight, ckpt["model"]["clip_head.weight"])


def _final_state(run: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def test_resume_is_exact(small_store: Path, tmp_path: Path) -> None:
    cfg = _cfg(small_store, steps=4, checkpoint_every=2)
    straight = pretrain(cfg, tmp_path / "straight")
    # a job killed after step 3 (its last checkpoint is step 2), then resumed
    pretrain(cfg, tmp_path / "killed", stop_at=3)
    assert [s for s, _ in list_checkpoints(tmp_path / "killed" / "checkpoints")] == [2]
    resumed = pretrain(cfg, tmp_path / "killed", resume=True)
    assert resumed["start_step"] == 2 and resumed["steps"] == 4

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name]))
    la, lb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]  # step 3 was redone, not logged twice
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert straight["loss"] == resumed["loss"]

    with pytest.raises(FileExistsError):
        pretrain(cfg, tmp_path / "killed")
    with pytest.raises(ConfigError, match="lr"):
        pretrain(dataclasses.replace(cfg, lr=1e-2, steps=6), tmp_path / "killed", resume=True)


@pytest.mark.slow
def test_pretraining_loss_falls(tmp_path: Path) -> None:
    store = make_tiny_store(tmp_path / "store", n_scenes=4, n_points=1500, seed=2)
    cfg = _cfg(store, steps=50, warmup_steps=5, lr=3e-3, checkpoint_every=50, log_every=1,
               data=DataConfig(max_voxels=1500, voxel_size_m=0.05))
    pretrain(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert len(records) == 50
    first = {k: float(np.mean([r[k] for r in records[:5]])) for k in ("loss", "loss_view", "loss_segment", "loss_kl")}
    last = {k: float(np.mean([r[k] for r in records[-5:]])) for k in first}
    print(json.dumps({"first": first, "last": last}))
    assert last["loss"] < 0.7 * first["loss"]
    for term in ("loss_view", "loss_segment", "loss_kl"):
        assert last[term] < 0.8 * first[term], term


def test_bench_train_step_reports_memory_and_rate(small_store: Path) -> None:
    from ws3d_train.bench.data import bench_train_step

    result = bench_train_step(
        small_store, network=NetworkConfig(preset="tiny", backend="torch"),
        data=DataConfig(max_voxels=300, voxel_size_m=0.05), steps=1, device="cpu",
    )
    assert result["steps_per_s"] > 0 and result["peak_memory_mb"] > 0 and result["voxels_per_batch"] == 600
