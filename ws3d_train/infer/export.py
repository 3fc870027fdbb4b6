"""ScanNet benchmark export (semantic and instance formats) and an evaluator of such exports.

Writes, for ``ws3d predict --format scannet|scannet-instance --out DIR``:

- semantic (``scannet``): ``DIR/<scene_id>.txt``, one NYU40 id per line, one line per vertex of
  the scan's ``<scene_id>_vh_clean_2.ply`` in that file's vertex order (ingest keeps every mesh
  vertex in order, so store point i is PLY vertex i);
- instance (``scannet-instance``): ``DIR/<scene_id>.txt`` with one line per predicted instance,
  ``pred_mask/<scene_id>_<k:03d>.txt <nyu40 id> <confidence>``, and each mask file
  ``DIR/pred_mask/<scene_id>_<k:03d>.txt`` with one 0/1 per vertex.

The files are scored by the benchmark's own scripts; `tests/oracles/scannet_benchmark.py` holds an
independent implementation of them, written from the benchmark's description, that the tests
score exports with (the product's metrics live in :mod:`ws3d_train.infer.metrics`).

Reads a run and a store through :mod:`ws3d_train.run` and :mod:`ws3d_train.infer.predict`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import UserError

__all__ = [
    "BENCHMARK_NYU40_IDS",
    "INSTANCE_NYU40_IDS",
    "ExportFormat",
    "export_scenes",
    "nyu40_ids_of",
    "write_instance_txt",
    "write_semantic_txt",
]

ExportFormat = Literal["scannet", "scannet-instance"]

BENCHMARK_NYU40_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
"""The NYU40 ids of the 20 ScanNet benchmark classes (wall .. otherfurniture), in train-id order."""
INSTANCE_NYU40_IDS: tuple[int, ...] = BENCHMARK_NYU40_IDS[2:]
"""The 18 classes the instance benchmark scores (no wall, no floor)."""
MIN_REGION_SIZE = 100
"""The benchmark's smallest instance (vertices)."""


def nyu40_ids_of(class_names: Sequence[str], dataset: str) -> np.ndarray:
    """[C] int64 NYU40 id of each training class of a ScanNet-label-space store.

    Raises:
        UserError for a store whose classes are not ScanNet's 20 benchmark classes.
    """
    from pipeline.datasets import scannet

    if tuple(class_names) != tuple(scannet.CLASS_NAMES):
        raise UserError(
            f"benchmark export needs ScanNet's 20 classes; the {dataset!r} store has {list(class_names)[:4]}..."
        )
    return np.asarray(scannet.NYU40_IDS, np.int64)


# ---------------------------------------------------------------------------------------------
# writing


def write_semantic_txt(path: str | Path, nyu40: np.ndarray) -> Path:
    """One integer a line (the benchmark's semantic format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, np.asarray(nyu40, np.int64).reshape(-1), fmt="%d")
    return path


def write_instance_txt(
    out_dir: str | Path,
    scene_id: str,
    instance: np.ndarray,
    instance_nyu40: np.ndarray,
    instance_score: np.ndarray,
) -> Path:
    """The benchmark's instance format for one scene.

    Args:
        out_dir: DIR (``DIR/<scene_id>.txt`` and ``DIR/pred_mask/`` are written).
        scene_id: the scene.
        instance: [N] int instance id per vertex in 0..I-1, -1 none.
        instance_nyu40: [I] NYU40 id of each instance.
        instance_score: [I] confidence of each instance.
    """
    out_dir = Path(out_dir)
    (out_dir / "pred_mask").mkdir(parents=True, exist_ok=True)
    instance = np.asarray(instance).reshape(-1)
    lines = []
    for k, (label, score) in enumerate(zip(np.asarray(instance_nyu40), np.asarray(instance_score))):
        mask = (instance == k).astype(np.int64)
        if not mask.any():
            continue
        rel = f"pred_mask/{scene_id}_{k:03d}.txt"
        np.savetxt(out_dir / rel, mask, fmt="%d")
        lines.append(f"{rel} {int(label)} {float(score):.6f}")
    path = out_dir / f"{scene_id}.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def export_scenes(
    run: str | Path,
    store_path: str | Path,
    scene_ids: Sequence[str],
    out_dir: str | Path,
    *,
    fmt: ExportFormat = "scannet",
    raw: str | Path | None = None,
    min_instance_points: int = MIN_REGION_SIZE,
    ensemble_2d: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> list[Path]:
    """Predict scenes with a run and write them in a benchmark format (module docstring).
    ``ensemble_2d``: as :func:`ws3d_train.infer.predict.predict_scene`.

    ``raw``: the raw ScanNet folder; when given, each scene's ``<scene>_vh_clean_2.ply`` vertex
    count is checked against the store's point count (a mismatch would misalign every line).

    Raises:
        UserError: not a ScanNet label space, an unknown scene, or a vertex-count mismatch.
    """
    from pipeline import schema
    from pipeline.store import Store
    from pipeline.progress import progress_bar
    from ws3d_train.infer.predict import predict_scene
    from ws3d_train.run import load_run

    if fmt not in ("scannet", "scannet-instance"):
        raise UserError(f"--format {fmt!r}: expected ply, scannet or scannet-instance")
    store = Store.open(store_path)
    nyu = nyu40_ids_of(store.class_names, store.dataset)
    known = set(store.scene_ids())
    unknown = [s for s in scene_ids if s not in known]
    if unknown:
        raise UserError(f"{store_path}: scene(s) not in the store: {unknown[:5]}")
    loaded = load_run(run, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for scene_id in progress_bar(scene_ids, desc="export", unit="scene", enabled=progress):
        n = store.shape(scene_id, schema.XYZ)[0]
        if raw is not None:
            _check_vertex_count(Path(raw), scene_id, n)
        pred = predict_scene(loaded, store_path, scene_id, min_instance_points=min_instance_points,
                             ensemble_2d=ensemble_2d, device=device)
        if fmt == "scannet":
            written.append(write_semantic_txt(out_dir / f"{scene_id}.txt", nyu[pred.pred_class]))
        else:
            written.append(write_instance_txt(out_dir, scene_id, pred.instance, nyu[pred.instance_class],
                                              pred.instance_score))
    return written


def _check_vertex_count(raw: Path, scene_id: str, n: int) -> None:
    from plyfile import PlyData

    candidates = [raw / sub / scene_id / f"{scene_id}_vh_clean_2.ply" for sub in ("scans", "scans_test")]
    ply = next((p for p in candidates if p.is_file()), None)
    if ply is None:
        raise UserError(f"{raw}: no {scene_id}_vh_clean_2.ply under scans/ or scans_test/")
    count = PlyData.read(str(ply))["vertex"].count
    if count != n:
        raise UserError(f"{ply}: {count} vertices but the store's {scene_id} has {n} points (not the same scan?)")
