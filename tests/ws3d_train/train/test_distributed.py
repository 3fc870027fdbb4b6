"""Data-parallel training (ws3d_train.train.distributed): two gloo processes on the CPU.

- One DDP step on 2 ranks (2 scenes each, synchronised batch norm, gradients averaged) equals the
  single-process step on the 4 concatenated scenes: gradients, updated weights, running statistics.
- ``pretrain`` under 2 ranks: rank 0 alone writes the run folder, the log states the world size,
  both ranks end with the same weights, and a 1-process resume continues from the 2-rank checkpoint.
- The rank sampler and the cross-world-size resume position (pure code).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  DDP imports it on construction (seconds): once here, not per forked rank
import torch.multiprocessing as mp

from ws3d_train.train import distributed
from ws3d_train.data.dataset import ResumableBatchSampler
from ws3d_train.network import NetworkConfig, build_network
from ws3d_train.sparse import collate_sparse

WORLD = 2


def _run(fn, *args) -> None:
    """``fn(rank, *args)`` in WORLD processes. fork: the children inherit the imported modules
    (spawn re-imports torch and ws3d in each, ~10x the test's own time); torch runs one thread."""
    mp.start_processes(fn, args=args, nprocs=WORLD, join=True, start_method="fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetworkConfig(preset="tiny", in_channels=6, num_classes=5, clip_dim=8, backend="torch")).double()


def _scenes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(2 * WORLD):
        xyz = torch.unique(torch.randint(-12, 12, (500 + 40 * k, 3), generator=g), dim=0)
        out.append((xyz, torch.randn(xyz.shape[0], 6, generator=g, dtype=torch.float64)))
    return out


def _per_voxel_loss(out) -> torch.Tensor:
    return out.semantic.square().sum(1) + out.clip.sin().sum(1) + out.boundary


def _step_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    ctx, device = distributed.setup("cpu")
    assert ctx.world_size == WORLD and ctx.backend == "gloo" and device.type == "cpu"
    model = _model()
    ddp = distributed.wrap_model(model, ctx)
    scenes = _scenes()
    n_total = sum(xyz.shape[0] for xyz, _ in scenes)
    mine = scenes[rank * 2 : (rank + 1) * 2]
    out = ddp(collate_sparse([s[0] for s in mine], [s[1] for s in mine]))
    # DDP averages the ranks' gradients: world x (this rank's share of the global mean)
    (WORLD * _per_voxel_loss(out).sum() / n_total).backward()
    # heads the forward does not use (e.g. region projections of the decoder stages) have no gradient
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.save({"grads": grads, "state": model.state_dict()}, Path(out_dir) / f"rank{rank}.pt")


def test_one_averaged_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path: Path) -> None:
    _run(_step_worker, _free_port(), str(tmp_path))
    model = _model()
    scenes = _scenes()
    n_total = sum(xyz.shape[0] for xyz, _ in scenes)
    out = model(collate_sparse([s[0] for s in scenes], [s[1] for s in scenes]))
    (_per_voxel_loss(out).sum() / n_total).backward()
    # heads the forward does not use (e.g. region projections of the decoder stages) have no gradient
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    for r in ranks:
        assert grads.keys() <= r["grads"].keys()
        # DDP gives the parameters the forward did not use zero gradients
        assert all(not g.any() for name, g in r["grads"].items() if name not in grads)
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-6, atol=1e-9, msg=name)
        for name, v in model.state_dict().items():  # weights after the step, BN running statistics
            torch.testing.assert_close(r["state"][name], v, rtol=1e-6, atol=1e-9, msg=name)
    assert not torch.equal(ranks[0]["state"]["stem.0.weight"], _model().state_dict()["stem.0.weight"])


def _pretrain_worker(rank: int, port: int, store: str, out_dir: str) -> None:
    _join(rank, port)
    from tests.conftest import tiny_run_config
    from ws3d_train.train.pretrain import PretrainConfig, pretrain

    # one thread per forked rank: torch's OpenMP pool is not fork-safe
    cfg = tiny_run_config(PretrainConfig, store, steps=2, batch_size=1, warmup_steps=1, checkpoint_every=1, device="cpu",
                          threads=1)
    summary = pretrain(cfg, Path(out_dir) / "run")
    # what each rank trained (rank 0's checkpoint must hold the same weights as every rank's model)
    torch.save({"steps": summary["steps"], "world_size": summary["world_size"]}, Path(out_dir) / f"pre{rank}.pt")


def test_pretrain_on_two_ranks_writes_once_and_resumes_on_one(tiny_store: Path, tmp_path: Path) -> None:
    from ws3d_train.checkpoint import list_checkpoints, load_checkpoint
    from ws3d_train.logging import read_metrics
    from ws3d_train.train.pretrain import PretrainConfig, pretrain
    from tests.conftest import tiny_run_config

    _run(_pretrain_worker, _free_port(), str(tiny_store), str(tmp_path))
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]  # one writer: each step once
    assert all(r["world_size"] == WORLD for r in records)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts][-1] == 2
    assert load_checkpoint(ckpts[-1][1])["extra"]["world_size"] == WORLD
    assert all(torch.load(tmp_path / f"pre{r}.pt")["world_size"] == WORLD for r in range(WORLD))
    assert records[0]["voxels"] > 0  # summed over both ranks' scenes
    # resume on one process (world size 1) from the 2-rank checkpoint
    cfg = tiny_run_config(PretrainConfig, str(tiny_store), steps=3, batch_size=1, warmup_steps=1, checkpoint_every=1,
                          device="cpu")
    summary = pretrain(cfg, run, resume=True)
    assert summary["start_step"] == 2 and summary["steps"] == 3
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["world_size"] == 1 and json.dumps(records[-1])
    assert load_checkpoint(list_checkpoints(run / "checkpoints")[-1][1])["extra"]["world_size"] == 1


def test_rank_batches_partition_the_global_batch() -> None:
    ref = ResumableBatchSampler(10, 3 * WORLD, seed=4)
    ranks = [distributed.RankBatchSampler(10, 3, rank=r, world_size=WORLD, seed=4) for r in range(WORLD)]
    for k in range(5):
        parts = [s.batch(k) for s in ranks]
        assert all(len(p) == 3 for p in parts)
        assert sum(parts, []) == ref.batch(k)
    one = distributed.RankBatchSampler(10, 3, rank=0, world_size=1, seed=4)
    assert [one.batch(k) for k in range(4)] == [ResumableBatchSampler(10, 3, seed=4).batch(k) for k in range(4)]
    # fewer scenes than the global batch: the epoch's scenes are repeated, no rank gets an empty batch
    tiny = [distributed.RankBatchSampler(3, 2, rank=r, world_size=WORLD, seed=0).batch(0) for r in range(WORLD)]
    assert all(len(b) == 2 for b in tiny) and {i for b in tiny for _, i in b} == {0, 1, 2}


def test_resume_position_across_world_sizes(tmp_path: Path) -> None:
    from ws3d_train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "step_00000003.pt", model=model, optimizer=None, step=3, batches_consumed=3,
                           config={}, extra={"world_size": 2})
    one = distributed.DistContext()
    four = distributed.DistContext(rank=0, world_size=4, backend="gloo")
    two = distributed.DistContext(rank=1, world_size=2, backend="gloo")
    # 20 scenes, 2 per rank: world 2 has 5 global batches of 4 per epoch; 3 done = 12 scenes into epoch 0
    assert distributed.resume_start_batch(path, two, num_items=20, batch_size=2, start_batch=3) == 3
    assert distributed.resume_start_batch(path, one, num_items=20, batch_size=2, start_batch=3) == 6
    assert distributed.resume_start_batch(path, four, num_items=20, batch_size=2, start_batch=3) == 2  # ceil(12/8)
    # 7 batches done = epoch 1, 8 scenes in; world 1 has 10 batches an epoch
    assert distributed.resume_start_batch(path, one, num_items=20, batch_size=2, start_batch=7) == 14
    assert distributed.resume_start_batch(None, one, num_items=20, batch_size=2, start_batch=7) == 7


def test_single_process_setup_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = distributed.setup("cpu")
    assert ctx == distributed.DistContext() and ctx.is_main and not ctx.enabled and device.type == "cpu"
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model and distributed.unwrap(model) is model
    assert distributed.mean_over_ranks({"a": 2.0}, ctx) == {"a": 2.0}
    assert distributed.is_main_process() and distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.setup("cpu")


@pytest.mark.slow
def test_torchrun_cli_pretrain_on_two_cpu_ranks(tiny_store: Path, tmp_path: Path) -> None:
    """The documented command line: torchrun --standalone --nproc_per_node=2 --no-python ws3d pretrain ..."""
    import shutil
    import subprocess
    import sys

    from ws3d_train.logging import read_metrics

    ws3d = shutil.which("ws3d", path=str(Path(sys.executable).parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if ws3d is None or torchrun is None:
        pytest.skip("ws3d / torchrun console scripts not installed beside this python")
    run = tmp_path / "run"
    cmd = [torchrun, "--standalone", f"--nproc_per_node={WORLD}", "--no-python", ws3d, "pretrain",
           "--store", str(tiny_store), "--out", str(run), "--scenes", "all", "steps=2", "batch_size=1",
           "device=cpu", "num_workers=0", "progress=false", "tensorboard=false", "data.voxel_size_m=0.1",
           "network.preset=tiny", "network.backend=torch", "warmup_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2] and all(r["world_size"] == WORLD for r in records)
    assert (run / "checkpoints" / "step_00000002.pt").is_file()
