"""Pictures of a scene's rendered views, for a person to look at what the model will see.

Reads (render): `views/rgb`, `views/depth`, `views/point_index` of one scene.
Writes PNGs into an output folder: per view `view_NN_rgb.png`, `view_NN_depth.png` (z-depth
colourised, black = nothing) and `view_NN_points.png` (each point id its own colour, black = no
point), plus `contact_sheet.png` with the three pictures of every view side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import schema

SHEET_COLUMNS = 4
"""Views per row of the contact sheet."""


def colourise_depth(depth: np.ndarray, max_depth_m: float) -> np.ndarray:
    """uint8 [H, W, 3] of a z-depth image [H, W]: near = yellow, far = blue (viridis), 0 = black."""
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)[::-1]
    d = np.asarray(depth, dtype=np.float32)
    level = np.clip(d / max(max_depth_m, 1e-6) * 255, 0, 255).astype(np.uint8)
    out = lut[level]
    out[d <= 0] = 0
    return out


def colourise_points(point_index: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: a point id's colour is a hash of the id (neighbours differ), -1 = black."""
    idx = np.asarray(point_index, dtype=np.int64)
    h = (idx + 1) * np.int64(2654435761) % np.int64(2**32)  # Knuth's multiplicative hash
    out = np.stack([(h >> 16) & 255, (h >> 8) & 255, h & 255], -1).astype(np.uint8)
    out = np.maximum(out, 40)  # keep every point visibly different from "nothing"
    out[idx < 0] = 0
    return out


def contact_sheet(panels: list[list[np.ndarray]], *, columns: int = SHEET_COLUMNS, scale: float = 0.5) -> Image.Image:
    """One image of all views: each view a cell of its panels side by side, labelled with its number.

    Args:
        panels: per view, a list of uint8 [H, W, 3] pictures of equal size.
    """
    cells = []
    for number, pics in enumerate(panels):
        cell = Image.fromarray(np.concatenate(pics, axis=1))
        if scale != 1.0:
            cell = cell.resize((max(1, round(cell.width * scale)), max(1, round(cell.height * scale))), Image.BILINEAR)
        ImageDraw.Draw(cell).text((3, 2), f"{number}", fill=(255, 255, 255))
        cells.append(cell)
    if not cells:
        return Image.new("RGB", (1, 1))
    gap = 4
    cw, ch = cells[0].width, cells[0].height
    cols = min(columns, len(cells))
    rows = -(-len(cells) // cols)
    sheet = Image.new("RGB", (cols * cw + (cols - 1) * gap, rows * ch + (rows - 1) * gap), (255, 255, 255))
    for k, cell in enumerate(cells):
        sheet.paste(cell, ((k % cols) * (cw + gap), (k // cols) * (ch + gap)))
    return sheet


def export_views(store_path: str | Path, scene_id: str, out_dir: str | Path) -> list[Path]:
    """Write the PNGs of one scene's views and a contact sheet; return the paths written.

    Raises:
        UserError naming the store and scene when the scene is not there or not rendered.
    """
    from pipeline.errors import UserError
    from pipeline.store import Store

    store = Store.open(store_path)
    if not store.has_scene(scene_id):
        raise UserError(f"{store_path}: no scene {scene_id!r}")
    if not store.has(scene_id, schema.VIEW_RGB):
        raise UserError(f"{store_path}: scene {scene_id} has no rendered views; run `ws3d render` first")
    rgb = store.read(scene_id, schema.VIEW_RGB)
    depth = store.read(scene_id, schema.VIEW_DEPTH).astype(np.float32)
    index = store.read(scene_id, schema.VIEW_POINT_INDEX)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    valid = depth[depth > 0]
    # one depth scale for the whole scene, so the views compare; a high percentile ignores strays
    max_depth = float(np.percentile(valid, 98)) if valid.size else 1.0
    written: list[Path] = []
    panels: list[list[np.ndarray]] = []
    for v in range(len(rgb)):
        pics = [rgb[v], colourise_depth(depth[v], max_depth), colourise_points(index[v])]
        for name, pic in zip(("rgb", "depth", "points"), pics):
            path = out / f"view_{v:02d}_{name}.png"
            Image.fromarray(pic).save(path)
            written.append(path)
        panels.append(pics)
    path = out / "contact_sheet.png"
    contact_sheet(panels).save(path)
    written.append(path)
    return written
