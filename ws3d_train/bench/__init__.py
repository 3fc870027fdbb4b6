"""`ws3d bench` / `make bench`: every stage measured on a fixed input, as ratios against a
reference measured in the same process where one exists.

Sections (each from the stage owner's bench function): rendering vs bare ray casting,
over-segmentation vs Open3D FPFH, CLIP embedding images/s, crops and seconds per scan of each
embed mode (packed vs crops, a ViT-B/16-sized model on the real ScanNet sample), store read scenes/s, sparse
convolution voxels/s of every installed backend side by side, each against a dense `nn.Conv3d`
(`sparse.backends.<name>`), store commits and reads on a disk and a local S3 server against zarr's
own writes (and Icechunk's, when installed), peak memory per stage, and, on a GPU, training steps/s and peak GPU
memory, and a trained run predicting on a 100k- and a 1M-point scan end to end against its bare
forward (`predict`). Writes a JSON file and prints a table. `ws3d bench --section sparse` runs one section.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import resource
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
"""The project's root folder."""
SHARED_DATA = Path(os.environ.get("WS3D_SHARED_DATA") or ROOT.parent / "shared" / "data")
"""The real samples beside the project, where present (the real-scan rows need them)."""

SECTIONS: dict[str, tuple[str, str]] = {
    "render": ("ws3d_train.bench.render", "bench_render"),
    "overseg": ("ws3d_train.bench.overseg", "bench_overseg"),
    "embed": ("ws3d_train.bench.embed", "bench_embed"),
    "embed_modes": ("ws3d_train.bench.embed", "bench_embed_modes"),
    "sparse": ("ws3d_train.bench.sparse", "bench_sparse"),
    "store": ("ws3d_train.bench.store", "bench_store"),
    "store_read": ("ws3d_train.bench.data", "bench_store_read"),
    "train_step": ("ws3d_train.bench.data", "bench_train_step"),
    "predict": ("ws3d_train.bench.predict", "bench_predict"),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    import os

    import torch

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(sections: list[str] | None = None, *, size: str = "full", store: str | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the named sections (default all); `size="tiny"` shrinks inputs (for tests)."""
    results: dict[str, Any] = {"machine": machine(), "size": size, "date": time.strftime("%Y-%m-%d")}
    store_path = store
    for name in sections or list(SECTIONS):
        module_name, fn_name = SECTIONS[name]
        echo(f"bench {name} ...")
        start = time.perf_counter()
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            kwargs = _kwargs(name, size, store_path)
            if name in ("store_read", "train_step") and store_path is None:
                store_path = _bench_store(size)
                kwargs = _kwargs(name, size, store_path)
            out = fn(**kwargs)
        except Exception as exc:  # a broken section is reported, the others still run
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
        out["seconds_total"] = time.perf_counter() - start
        out["peak_rss_mb_process"] = _peak_rss_mb()
        results[name] = out
    return results


def _kwargs(name: str, size: str, store: str | None) -> dict[str, Any]:
    tiny = size == "tiny"
    if name == "overseg":
        return {"n_points": 8_000 if tiny else 80_000}
    if name == "sparse":  # every installed backend side by side (ws3d_train.bench.sparse)
        if tiny:
            return {"sizes": (3_000,), "channels": (8, 16), "net_sizes": (2_000,), "dense_grid": 16, "repeats": 1}
        return {}  # 80k and 300k voxels, 32 and 64 channels, tiny and MinkUNet18 at 80k
    if name == "render":
        return {"tiny": True} if tiny else {}
    if name == "embed":  # bench_embed has no `tiny` switch: small batches and views instead
        return {"batch_sizes": (2,), "view_hw": (48, 64), "verbose": False} if tiny else {}
    if name == "embed_modes":  # tiny: a teacher-sized model and 16 timed crops (the scene stays real)
        tiny_vit = {"image_size": 64, "patch_size": 16, "hidden_size": 64, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 2}
        return {"vision": tiny_vit, "crops_sample": 16, "verbose": False} if tiny else {}
    if name in ("store_read", "train_step"):
        return {"store_path": store}
    if name == "predict":  # a run on a robot's scan, end to end, against the bare forward
        return {"sizes": (3_000, 20_000), "repeats": 1, "cli": False} if tiny else {}
    if name == "store":  # commits and reads on a disk and a local S3 server (+ Icechunk when installed)
        return {"tiny": True, "writers": False} if tiny else {}
    return {}


def _bench_store(size: str) -> str:
    """A small preprocessed synthetic store (ingest, overseg, render, embed with a random tiny
    CLIP) for the trainer-side sections, built once per bench run in a temporary folder."""
    import tempfile

    from ws3d_train.demo import build_store_for_bench

    folder = Path(tempfile.mkdtemp(prefix="ws3d-bench-"))
    return build_store_for_bench(folder, n_scenes=2 if size == "tiny" else 4)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value
    elif isinstance(value, str) and prefix.endswith(("error", "device", "backend")):
        out[prefix] = value


def format_table(results: dict[str, Any]) -> str:
    """Readable lines: section, figure, value (ratios flagged)."""
    lines = [f"ws3d bench  {results['date']}  {results['machine'].get('platform')}  "
             f"cpus={results['machine'].get('cpus')}  cuda={results['machine'].get('cuda')}"]
    for name in SECTIONS:
        if name not in results:
            continue
        flat: dict[str, Any] = {}
        _flatten("", {k: v for k, v in results[name].items() if k != "trace"}, flat)
        lines.append(f"[{name}]")
        for key, value in flat.items():
            if isinstance(value, float):
                text = f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
            else:
                text = str(value)
            mark = "  <- ratio" if any(w in key for w in ("ratio", "_over_", "speedup")) else ""
            lines.append(f"  {key:<48}{text:>18}{mark}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | Path) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(results), indent=2, default=str))
