"""`ws3d bench --section store`: how fast the store commits and reads a ScanNet-size scene, on a
disk and on a local S3 server, against references measured in the same process.

A scene is what ingest and render write for a synthetic room of ScanNet size (~147k vertices,
~275k faces, the default render: 8 views of 320x240): two commits. Rows:

- **disk**: the store's commit (encoded in memory, renamed into place) against the same arrays
  written through zarr's own ``LocalStore`` API (same codecs, crc32c included); reads of every
  array of the scene (`Store.read_many`) against zarr's ``open_array`` reads.
- **s3**: the same commits (marker written last) and reads on an S3 server on 127.0.0.1 (moto's,
  its own process; a Python server on the same cores, so a floor for what a cloud store does, not
  AWS's rate), as a ratio to the disk.
- **icechunk** (when the ``icechunk`` package is importable; it is not a ws3d dependency): the
  same scene as one Icechunk transaction per stage (a commit on ``main``), on the disk and on the
  same S3 server; the commit time of the first and last scene (a snapshot lists every node); two
  processes committing different scenes at once (conflicts rebased by ``ConflictDetector``).
- **two writers**: two processes writing different scenes at once with the store's commits.

Rates are MB of stored (encoded) bytes per second of commit; every timing is the median over the
scenes written.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import schema

__all__ = ["bench_store", "bench_scene"]


def bench_scene(tiny: bool = False) -> tuple[dict, dict]:
    """(ingest arrays, render arrays) of the benchmark room (tiny: a small room, small views)."""
    from pipeline.datasets.synthetic import SynthConfig, make_room
    from pipeline.render.config import RenderConfig
    from pipeline.render.core import render_scene

    cfg = SynthConfig(room_edge_m=0.08, object_edge_m=0.05, min_objects=6, max_objects=9) if tiny else \
        SynthConfig(room_edge_m=0.018, object_edge_m=0.016)
    room = make_room(0, 0, cfg)
    ingest = {schema.XYZ: room.xyz, schema.RGB: room.rgb, schema.SEMANTIC: room.semantic,
              schema.INSTANCE: room.instance, schema.FACES: room.faces}
    render_cfg = RenderConfig(width=64, height=48, max_views=4) if tiny else RenderConfig()
    render = render_scene(room.xyz, room.rgb, room.faces, kind="mesh", cfg=render_cfg).arrays()
    return ingest, render


def _write_ours(url: str, scene_id: str, ingest: dict, render: dict) -> None:
    from pipeline.store import Store

    store = Store.open(url)
    store.write_stage(scene_id, "ingest", ingest, {"config_hash": "bench", "stats": {}})
    store.write_stage(scene_id, "render", render, {"config_hash": "bench", "stats": {}})


def _write_zarr(root: Any, scene_id: str, ingest: dict, render: dict) -> None:
    """The reference: the same hierarchy through zarr's API on whatever store `root` is in."""
    from pipeline.store import _codecs

    scene = root.create_group(f"scenes/{scene_id}", attributes={"ws3d_stage": {"config_hash": "bench"}})
    for arrays in (ingest, render):
        for spec, data in arrays.items():
            group = scene.require_group(spec.group)
            data = schema.coerce(spec, data)
            group.create_array(spec.name, data=data, chunks=tuple(max(1, c) for c in spec.chunks(data.shape)),
                               compressors=_codecs(spec), fill_value=0, dimension_names=[str(d) for d in spec.dims],
                               config={"write_empty_chunks": True})


def _read_ours(url: str, scene_id: str, specs: list) -> None:
    from pipeline.store import Store

    Store.open(url).read_many(scene_id, specs)


def _read_zarr(path: Path, scene_id: str, specs: list) -> None:
    import zarr

    for spec in specs:
        zarr.open_array(str(path / "scenes" / scene_id / spec.group / spec.name), mode="r")[...]


def _stored_bytes(url: str, prefix: str = "") -> int:
    from pipeline.storage import open_location

    return sum(open_location(url).list_sizes(prefix).values())


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ours_rows(url: str, scenes: int, ingest: dict, render: dict) -> dict[str, Any]:
    from pipeline.store import Store

    Store.create(url, dataset="bench", class_names=["thing"])
    specs = [*ingest, *render]
    writes = [_timed(lambda i=i: _write_ours(url, f"scene{i:04d}_00", ingest, render)) for i in range(scenes)]
    reads = [_timed(lambda i=i: _read_ours(url, f"scene{i:04d}_00", specs)) for i in range(scenes)]
    per_scene = _stored_bytes(url, "scenes/scene0000_00")
    return {"write_s": _median(writes), "read_s": _median(reads), "bytes_per_scene": per_scene,
            "write_MBps": per_scene / 1e6 / _median(writes), "read_MBps": per_scene / 1e6 / _median(reads),
            "write_first_s": writes[0], "write_last_s": writes[-1]}


def _icechunk_storage(kind: str, where: str, endpoint: str | None) -> Any:
    import icechunk

    if kind == "local":
        return icechunk.local_filesystem_storage(where)
    from ws3d_train.bench.s3server import S3_ENV

    bucket, prefix = where.split("/", 1)
    return icechunk.s3_storage(bucket=bucket, prefix=prefix, endpoint_url=endpoint, allow_http=True, force_path_style=True,
                               region=S3_ENV["AWS_DEFAULT_REGION"], access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                               secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


def _icechunk_commit(repo: Any, scene_id: str, arrays: dict, *, rebase: bool) -> None:
    import icechunk
    import zarr

    session = repo.writable_session("main")
    root = zarr.open_group(session.store, mode="a")
    scene = root.require_group(f"scenes/{scene_id}")
    from pipeline.store import _codecs

    for spec, data in arrays.items():
        group = scene.require_group(spec.group)
        data = schema.coerce(spec, data)
        group.create_array(spec.name, data=data, chunks=tuple(max(1, c) for c in spec.chunks(data.shape)),
                           compressors=_codecs(spec), fill_value=0, dimension_names=[str(d) for d in spec.dims],
                           config={"write_empty_chunks": True})
    session.commit(f"{scene_id}", rebase_with=icechunk.ConflictDetector() if rebase else None)


def _icechunk_rows(kind: str, where: str, endpoint: str | None, scenes: int, ingest: dict, render: dict) -> dict[str, Any]:
    import icechunk
    import zarr

    _icechunk_repo(kind, where, endpoint)
    repo = icechunk.Repository.open(_icechunk_storage(kind, where, endpoint))
    writes = []
    for i in range(scenes):
        scene_id = f"scene{i:04d}_00"
        writes.append(_timed(lambda: (_icechunk_commit(repo, scene_id, ingest, rebase=False),
                                      _icechunk_commit(repo, scene_id, render, rebase=False))))
    session = repo.readonly_session("main")
    root = zarr.open_group(session.store, mode="r")
    specs = [*ingest, *render]
    reads = [_timed(lambda i=i: [root[f"scenes/scene{i:04d}_00/{s.group}/{s.name}"][...] for s in specs])
             for i in range(scenes)]
    return {"write_s": _median(writes), "read_s": _median(reads), "write_first_s": writes[0], "write_last_s": writes[-1]}


def _save_scene(path: Path, ingest: dict, render: dict) -> None:
    """The benchmark scene in one file, for writer processes to load instead of rendering it again."""
    np.savez(path, **{f"{s.group}.{s.name}": a for s, a in [*ingest.items(), *render.items()]})


def _load_scene(path: str) -> tuple[dict, dict]:
    data = np.load(path)
    by_name = {f"{s.group}.{s.name}": s for s in schema.SCENE_ARRAYS}
    arrays = {by_name[k]: data[k] for k in data.files}
    ingest = {s: a for s, a in arrays.items() if s.group in schema.STAGE_GROUPS["ingest"]}
    return ingest, {s: a for s, a in arrays.items() if s.group == "views"}


def _two_writers_ours(url: str, offset: int, count: int, scene_file: str) -> tuple[float, float]:
    """Write scenes offset.. offset+count-1; (start, end) wall-clock times of the writes."""
    ingest, render = _load_scene(scene_file)
    start = time.time()
    for i in range(offset, offset + count):
        _write_ours(url, f"scene{i:04d}_00", ingest, render)
    return start, time.time()


def _two_writers_icechunk(kind: str, where: str, endpoint: str | None, offset: int, count: int,
                          scene_file: str) -> tuple[float, float, int]:
    """The same with one Icechunk commit per scene and stage on `main` (rebased on conflicts);
    (start, end, commits that failed)."""
    import icechunk

    ingest, render = _load_scene(scene_file)
    repo = icechunk.Repository.open(_icechunk_storage(kind, where, endpoint))
    start = time.time()
    failures = 0
    for i in range(offset, offset + count):
        for arrays in (ingest, render):
            try:
                _icechunk_commit(repo, f"scene{i:04d}_00", arrays, rebase=True)
            except Exception:  # a commit that could not be rebased: counted
                failures += 1
    return start, time.time(), failures


def _in_two_processes(fn: Callable, args: list[tuple]) -> dict[str, Any]:
    """Run `fn` in two processes at once; the span from the first start to the last end."""
    context = multiprocessing.get_context("spawn")  # never fork after numba or torch started threads
    with context.Pool(2) as pool:
        results = pool.starmap(fn, args)
    starts, ends = [r[0] for r in results], [r[1] for r in results]
    out = {"span_s": max(ends) - min(starts), "overlap_s": max(0.0, min(ends) - max(starts))}
    if len(results[0]) > 2:
        out["failed_commits"] = sum(r[2] for r in results)
    return out


def _icechunk_repo(kind: str, where: str, endpoint: str | None) -> None:
    import icechunk
    import zarr

    repo = icechunk.Repository.create(_icechunk_storage(kind, where, endpoint))
    session = repo.writable_session("main")
    zarr.open_group(session.store, mode="a").create_group("scenes")
    session.commit("scenes")


def bench_store(*, scenes: int = 6, tiny: bool = False, s3: bool = True, icechunk: bool = True,
                writers: bool = True) -> dict[str, Any]:
    """Run the store benchmark (see the module docstring); returns the measured numbers."""
    import zarr
    from zarr.storage import LocalStore

    from pipeline.store import Store

    ingest, render = bench_scene(tiny)
    scenes = 2 if tiny else scenes
    out: dict[str, Any] = {
        "points": int(len(ingest[schema.XYZ])), "faces": int(len(ingest[schema.FACES])),
        "views": int(render[schema.VIEW_RGB].shape[0]), "scenes": scenes,
        "raw_MB_per_scene": sum(np.asarray(a).nbytes for a in [*ingest.values(), *render.values()]) / 1e6,
    }
    have_icechunk = False
    if icechunk:
        try:
            import icechunk as ic

            have_icechunk = True
            out["icechunk_version"] = ic.__version__
        except ImportError:
            out["icechunk"] = "not installed (pip install icechunk to add its rows)"
    tmp = Path(tempfile.mkdtemp(prefix="ws3d-bench-store-"))
    scene_file = str(tmp / "scene.npz")
    _save_scene(Path(scene_file), ingest, render)
    server = None
    try:
        backends = [("disk", str(tmp), None)]
        if s3:
            from ws3d_train.bench.s3server import local_s3_server, make_bucket

            try:
                server = local_s3_server()
                endpoint = server.__enter__()
                backends.append(("s3", make_bucket(f"bench-{uuid.uuid4().hex[:12]}", endpoint), endpoint))
            except RuntimeError as exc:
                out["s3"] = f"skipped: {exc}"
        for name, base, endpoint in backends:
            out[name] = _ours_rows(f"{base}/ours.zarr", scenes, ingest, render)
            if have_icechunk:
                where = str(Path(base) / "ice") if name == "disk" else f"{base[5:]}/ice"
                out[f"icechunk_{name}"] = _icechunk_rows("local" if name == "disk" else "s3", where, endpoint,
                                                         scenes, ingest, render)
            if writers:
                url = f"{base}/two.zarr"
                Store.create(url, dataset="bench", class_names=["thing"])
                out[name]["two_writers"] = _in_two_processes(
                    _two_writers_ours, [(url, 0, scenes, scene_file), (url, scenes, scenes, scene_file)])
                out[name]["two_writers"]["valid"] = _valid(url, 2 * scenes)
                if have_icechunk:
                    kind = "local" if name == "disk" else "s3"
                    where = str(Path(base) / "ice2") if name == "disk" else f"{base[5:]}/ice2"
                    _icechunk_repo(kind, where, endpoint)
                    out[f"icechunk_{name}"]["two_writers"] = _in_two_processes(_two_writers_icechunk, [
                        (kind, where, endpoint, 0, scenes, scene_file), (kind, where, endpoint, scenes, scenes, scene_file)])
        ref = tmp / "zarr.zarr"
        root = zarr.open_group(LocalStore(ref), mode="w")
        ref_writes = [_timed(lambda i=i: _write_zarr(root, f"scene{i:04d}_00", ingest, render)) for i in range(scenes)]
        specs = [*ingest, *render]
        ref_reads = [_timed(lambda i=i: _read_zarr(ref, f"scene{i:04d}_00", specs)) for i in range(scenes)]
        disk = out["disk"]
        disk["zarr_write_s"], disk["zarr_read_s"] = _median(ref_writes), _median(ref_reads)
        disk["write_ratio_vs_zarr"] = disk["write_s"] / disk["zarr_write_s"]
        disk["read_ratio_vs_zarr"] = disk["read_s"] / disk["zarr_read_s"]
        if isinstance(out.get("s3"), dict):
            out["s3"]["write_ratio_vs_disk"] = out["s3"]["write_s"] / disk["write_s"]
            out["s3"]["read_ratio_vs_disk"] = out["s3"]["read_s"] / disk["read_s"]
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _valid(url: str, expected: int) -> bool:
    from pipeline.store import Store
    from pipeline.validate import validate_store

    store = Store.open(url)
    return len(store.scene_ids()) == expected and validate_store(store).ok


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-writers", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = bench_store(scenes=args.scenes, tiny=args.tiny, s3=not args.no_s3, writers=not args.no_writers)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
