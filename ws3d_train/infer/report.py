"""`ws3d report`: pictures of a run, so that a person can look rather than read.

Reads a run directory (metrics.jsonl, its checkpoint, eval results if present) and the store it
trained on; writes PNGs into `out/`: training curves, the results table, views of a scene with
ground truth vs prediction (colouring the pixels of the stored rendered views by the class of the
point each pixel shows: the project's own renderer's exact correspondence), and an
open-vocabulary query heatmap painted the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.store import Store


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dirs: list[Path], path: Path) -> Path | None:
    """Loss curves (each term) of one or more runs' metrics.jsonl into one PNG."""
    from ws3d_train.logging import read_metrics

    plt = _plt()
    series = [(d, read_metrics(d)) for d in run_dirs]
    series = [(d, recs) for d, recs in series if recs]
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (run, records) in zip(axes[0], series):
        keys = sorted({k for r in records for k, v in r.items()
                       if isinstance(v, (int, float)) and (k == "loss" or k.startswith("loss"))})
        for key in keys:
            steps = [r["step"] for r in records if key in r]
            values = [r[key] for r in records if key in r]
            ax.plot(steps, values, label=key, lw=1.5 if key == "loss" else 1)
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_table(results: dict[str, Any], path: Path) -> Path:
    """The evaluation's headline numbers as a picture."""
    plt = _plt()
    rows = []
    for group, keys in (("semantic", ("miou", "oa", "macc")), ("open_vocab", ("base_miou", "novel_miou", "hiou")),
                        ("instance", ("ap", "ap50", "ap25")), ("box", ("map@0.25", "map@0.5"))):
        values = results.get(group) or {}
        for key in keys:
            if isinstance(values.get(key), (int, float)):
                rows.append((f"{group} {key}", f"{100 * values[key]:.1f}"))
    fig, ax = plt.subplots(figsize=(4.5, 0.35 * len(rows) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=rows or [("-", "-")], colLabels=["metric", "%"], loc="center")
    table.scale(1, 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paint_views(point_index: np.ndarray, point_rgb: np.ndarray) -> np.ndarray:
    """[V, H, W] point ids (-1 none) + [N, 3] per-point colours -> [V, H, W, 3] images."""
    images = np.zeros((*point_index.shape, 3), dtype=np.uint8)
    shown = point_index >= 0
    images[shown] = point_rgb[point_index[shown]]
    return images


def views_gt_vs_prediction(store: Store, scene_id: str, pred_class: np.ndarray, class_names: tuple[str, ...],
                           path: Path, n_views: int = 3) -> Path:
    """Rows of (rendered colour | ground truth | prediction) for a few views of the scene."""
    from ws3d_train.infer.predict import class_palette

    plt = _plt()
    point_index = store.read(scene_id, schema.VIEW_POINT_INDEX)
    rgb = store.read(scene_id, schema.VIEW_RGB)
    semantic = store.read(scene_id, schema.SEMANTIC).astype(np.int64)
    palette = class_palette(len(class_names))
    gt_rgb = np.where((semantic >= 0)[:, None], palette[np.clip(semantic, 0, len(palette) - 1)], 0).astype(np.uint8)
    pred_rgb = palette[np.clip(pred_class, 0, len(palette) - 1)]
    # the views showing the most points tell most about the scene
    order = np.argsort(-(point_index >= 0).reshape(len(point_index), -1).sum(1))[:n_views]
    fig, axes = plt.subplots(len(order), 3, figsize=(11, 2.9 * len(order)), squeeze=False)
    for row, v in enumerate(order):
        for col, (title, image) in enumerate((("view", rgb[v]), ("ground truth", paint_views(point_index[v:v + 1], gt_rgb)[0]),
                                              ("prediction", paint_views(point_index[v:v + 1], pred_rgb)[0]))):
            axes[row, col].imshow(image)
            axes[row, col].set_title(f"{title} (view {v})", fontsize=9)
            axes[row, col].axis("off")
    present = sorted(set(np.unique(semantic[semantic >= 0]).tolist()) | set(np.unique(pred_class).tolist()))
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[c] / 255) for c in present if c < len(class_names)]
    fig.legend(handles, [class_names[c] for c in present if c < len(class_names)], loc="lower center",
               ncol=min(8, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def query_heatmap(store: Store, scene_id: str, similarity: np.ndarray, text: str, path: Path, n_views: int = 3) -> Path:
    """A query's per-point similarity painted into the scene's views (turbo colour map)."""
    plt = _plt()
    point_index = store.read(scene_id, schema.VIEW_POINT_INDEX)
    lo, hi = np.percentile(similarity, [2, 98])
    heat = (plt.get_cmap("turbo")(np.clip((similarity - lo) / max(hi - lo, 1e-6), 0, 1))[:, :3] * 255).astype(np.uint8)
    order = np.argsort(-(point_index >= 0).reshape(len(point_index), -1).sum(1))[:n_views]
    fig, axes = plt.subplots(1, len(order), figsize=(3.8 * len(order), 3.2), squeeze=False)
    for col, v in enumerate(order):
        axes[0, col].imshow(paint_views(point_index[v:v + 1], heat)[0])
        axes[0, col].axis("off")
    fig.suptitle(f'query: "{text}" (red = similar)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _eval_file(run: Path, store: str | Path) -> Path | None:
    """The newest evaluation of ``store`` in the run folder (``eval/<store>.*.json``, see
    :func:`ws3d_train.run.eval_path`), else any newest evaluation, else a legacy ``eval.json``."""
    from ws3d_train.run import eval_path

    run_dir = run if run.is_dir() else run.parent
    own = eval_path(run_dir, store, None)  # RUN/eval/<store>.all.json
    store_prefix = own.name[: -len("all.json")]
    mine = sorted(own.parent.glob(f"{store_prefix}*.json"), key=lambda p: p.stat().st_mtime)
    others = sorted((run_dir / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    legacy = [run_dir / "eval.json"] if (run_dir / "eval.json").is_file() else []
    found = mine or others or legacy
    return found[-1] if found else None


def write_report(run: str | Path, out: str | Path, *, store: str | None = None, scene: str | None = None,
                 query: str | None = None) -> list[Path]:
    """All pictures of a run. `store` defaults to the one in the run's config, `scene` to the
    first scene of the store, `query` to a novel class name of the run's split."""
    from ws3d_train.infer.predict import predict_scene, query_scene
    from ws3d_train.run import load_run, resolve_ov_split

    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    loaded = load_run(run)
    config = getattr(loaded, "config", {}) or {}
    runs = [run]
    init = config.get("init") if isinstance(config, dict) else None
    if init and Path(init).is_dir():
        runs.insert(0, Path(init))
    curves = plot_curves(runs, out / "training_curves.png")
    if curves:
        written.append(curves)
    store_path = store or (config.get("store") if isinstance(config, dict) else None)
    if not store_path:
        raise ValueError(f"{run}: no store recorded in the run; pass --store")
    st = Store.open(store_path)
    eval_file = _eval_file(run, store_path)
    results = json.loads(eval_file.read_text()) if eval_file is not None else None
    if results:
        written.append(plot_table(results, out / "results_table.png"))
    scene = scene or st.scene_ids()[0]
    prediction = predict_scene(loaded, store_path, scene)
    written.append(views_gt_vs_prediction(st, scene, prediction.pred_class, prediction.class_names,
                                          out / f"views_{scene}.png"))
    if query is None:
        split = config.get("ov_split") if isinstance(config, dict) else None
        novel = []
        if split:
            ov = resolve_ov_split(split, st.class_names, st.dataset)
            novel = [st.class_names[i] for i in (ov.novel if ov else [])]
        present = set(np.unique(st.read(scene, schema.SEMANTIC)).tolist())
        candidates = [n for n in novel if st.class_names.index(n) in present] or novel or ["chair"]
        query = candidates[0]
    result = query_scene(loaded, store_path, scene, query)
    written.append(query_heatmap(st, scene, result.similarity, query, out / f"query_{query.replace(' ', '_')}.png"))
    return written
