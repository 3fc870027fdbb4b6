"""The store at scale: ScanNet-size synthetic rooms preprocessed (ingest, overseg, render) on a
local Dask cluster into a folder or into a local S3 server; scenes/s, peak memory per worker,
bytes per scene and the store's write rate; then the trainer's read rate (SceneDataset through
its DataLoader, 0 and 2 workers) against a local copy of the same scenes.

Run in pieces (one slice of rooms, one backend, one worker count per process), each appending
one JSON line::

    ws3d synth --out data/scale_raw --scenes 100 room_edge_m=0.018 object_edge_m=0.016
    python -m ws3d_train.bench.store_scale --raw data/scale_raw --rooms 0:25 --backend s3 --workers 2 \\
        --out data/store_scale.jsonl

The S3 server is moto's on 127.0.0.1 (a Python process on the same cores as the workers): its
rates are a floor for an object store, not what AWS or GCS give.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import schema


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _stage_bytes(url: str, scene_ids: list[str], stage: str) -> int:
    from pipeline.storage import open_location

    location = open_location(url)
    total = 0
    for scene_id in scene_ids:
        sizes = location.list_sizes(f"scenes/{scene_id}")
        groups = schema.STAGE_GROUPS[stage]
        total += sum(v for k, v in sizes.items() if k.split("/", 1)[0] in groups or (stage == "ingest" and k == "zarr.json"))
    return total


def run_piece(raw: str, rooms: tuple[int, int], backend: str, workers: int, read_workers: tuple[int, ...] = (0, 2)) -> dict[str, Any]:
    """Preprocess rooms [a, b) of `raw` into a fresh store on `backend` with `workers` local
    Dask workers; measure (see the module docstring)."""
    from pipeline.datasets.ingest import IngestConfig
    from pipeline.executor import ExecutorConfig, dask_client, joinable_by_address
    from pipeline.overseg.config import OversegConfig
    from pipeline.render.config import RenderConfig
    from pipeline.stage import StageRun, run_stage
    from pipeline.stages import BY_NAME
    from pipeline.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="ws3d-scale-"))
    server = None
    try:
        if backend == "s3":
            from ws3d_train.bench.s3server import local_s3_server, make_bucket

            server = local_s3_server()
            endpoint = server.__enter__()
            url = make_bucket(f"scale-{uuid.uuid4().hex[:12]}", endpoint) + "/rooms.zarr"
        else:
            url = str(tmp / "rooms.zarr")
        all_ids = sorted(p.name for p in (Path(raw) / "scans").iterdir())
        ids = all_ids[rooms[0]:rooms[1]]
        listing = tmp / "scenes.txt"
        listing.write_text("\n".join(ids) + "\n")
        out: dict[str, Any] = {"backend": backend, "workers": workers, "rooms": list(rooms), "scenes": len(ids), "stages": {}}
        # one local cluster for the three stages (the executor's own, reached by its address)
        with dask_client(ExecutorConfig(kind="local", workers=workers)) as client, joinable_by_address(client):
            executor = ExecutorConfig(kind="address", address=client.scheduler.address)
            client.run(lambda: None)
            configs = {"ingest": IngestConfig(dataset="synthetic"), "overseg": OversegConfig(), "render": RenderConfig()}
            for name, cfg in configs.items():
                start = time.perf_counter()
                report = run_stage(BY_NAME[name], StageRun(store=url, cfg=cfg, raw=raw, scenes=str(listing)),
                                   executor=executor, log=False)
                wall = time.perf_counter() - start
                done = report.of("done")
                stored = _stage_bytes(url, [r.scene_id for r in done], name)
                write_s = sum(float(r.stats.get("seconds_write", 0.0)) for r in done)
                out["stages"][name] = {
                    "wall_s": wall, "done": len(done), "failed": len(report.of("failed")),
                    "scenes_per_s": len(done) / wall if wall else None,
                    "bytes_per_scene": stored / max(1, len(done)),
                    "write_s_per_scene": write_s / max(1, len(done)),
                    "write_MBps_per_worker": stored / 1e6 / write_s if write_s else None,
                    "errors": [r.error for r in report.of("failed")][:3],
                }
            out["peak_rss_mb_per_worker"] = sorted(client.run(_peak_rss_mb).values())
        out["scenes_per_s_all_stages"] = len(ids) / sum(s["wall_s"] for s in out["stages"].values())
        out["bytes_per_scene"] = sum(s["bytes_per_scene"] for s in out["stages"].values())
        out["valid"] = __import__("pipeline.validate", fromlist=["validate_store"]).validate_store(Store.open(url)).ok
        if backend == "s3" and read_workers:
            out["trainer_read"] = _read_rates(url, tmp / "copy.zarr", ids, read_workers)
        return out
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_store(url: str, folder: Path) -> None:
    from pipeline.storage import open_location

    src, dst = open_location(url), open_location(folder)
    keys = list(src.list_sizes(""))
    for start in range(0, len(keys), 256):
        batch = keys[start:start + 256]
        blobs = src.run(src.aget_many(batch))
        dst.run(dst.aput_many({k: v for k, v in blobs.items() if v is not None}))


def _read_rates(url: str, copy: Path, ids: list[str], workers: tuple[int, ...]) -> dict[str, Any]:
    """Scenes/s of the trainer's data path (SceneDataset, pre-training groups, 2 cm voxels) from
    the S3 store and from a local copy, alternating, for each loader worker count."""
    from ws3d_train.data.dataset import DataConfig, SceneDataset, make_loader

    _copy_store(url, copy)
    out: dict[str, Any] = {}
    cfg = DataConfig(groups=("overseg", "views"))
    for n in workers:
        for where, store in (("local", str(copy)), ("s3", url)):
            dataset = SceneDataset(store, ids, cfg=cfg, split="train", seed=0)
            loader = iter(make_loader(dataset, batch_size=1, seed=0, num_workers=n, shuffle=False))
            next(loader)  # workers started, first scene read
            start = time.perf_counter()
            count = min(len(ids) - 1, 12)
            for _ in range(count):
                next(loader)
            out[f"{where}_workers{n}_scenes_per_s"] = count / (time.perf_counter() - start)
            del loader
        out[f"s3_over_local_workers{n}"] = out[f"s3_workers{n}_scenes_per_s"] / out[f"local_workers{n}_scenes_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--rooms", default="0:25", help="a:b, the slice of the sorted room list")
    parser.add_argument("--backend", choices=("local", "s3"), default="local")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--read-workers", default="0,2", help="DataLoader worker counts for the read rate (s3 only); empty: none")
    parser.add_argument("--out", default="data/store_scale.jsonl")
    args = parser.parse_args()
    a, b = (int(x) for x in args.rooms.split(":"))
    read_workers = tuple(int(x) for x in args.read_workers.split(",") if x)
    result = run_piece(args.raw, (a, b), args.backend, args.workers, read_workers)
    line = json.dumps(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
