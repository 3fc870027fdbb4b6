"""The synthetic dataset: procedural indoor rooms written in the ScanNet raw layout (the demo's and
the tests' data), read back by ScanNet's reader, labelled with ScanNet's 20 classes.

Each room: a floor, four walls and 8-20 objects of ScanNet classes built from boxes and
cylinders with class-typical sizes and colours (with variation), sampled into a vertex-coloured
triangle mesh with 1-3 cm edges. Scanner effects (on by default, `SynthConfig.scanner_effects`)
make the mesh look like a reconstructed scan: surfaces no scanner position sees are dropped,
thin rods (legs) are lost at random, the floor under furniture and random patches are missing,
vertices are displaced by noise, each object's mesh is decimated into uneven triangles, and
colours are shaded and noisy. They draw from their own random stream, so the room's layout is
the same with or without them. `write_scannet_layout` writes what a ScanNet release holds for a
scan (binary `_vh_clean_2.ply`, `segs.json`, an aggregation file, `<scene>.txt` with
`axisAlignment`) plus a small label table, so that the demo exercises the real ScanNet reader.
Both annotation releases are produced (v2 by default, v1-era for every fourth room). Everything
is deterministic per (seed, room index).

Writes: `<out>/scans/<scene>/...` and `<out>/scannetv2-labels.combined.tsv`. Manifests
(`data_manifests/synthetic/`): `classes.csv` and `ov_splits.yaml`; no official scene lists (a run
names its own, e.g. the demo's train and validation rooms).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from pipeline.datasets import scannet
from pipeline.datasets.base import Dataset
from pipeline.datasets.scannet import CLASS_NAMES, NYU40_IDS

# class -> (size ranges (w, d, h) in metres, palette of RGB colours, placement)
_PALETTES = {
    "wood": [(140, 100, 60), (170, 120, 75), (110, 75, 45), (200, 160, 110)],
    "white": [(230, 230, 225), (245, 245, 240), (215, 215, 210)],
    "fabric": [(90, 110, 150), (120, 130, 90), (150, 60, 60), (100, 100, 105), (60, 90, 80)],
    "bright": [(220, 60, 50), (50, 120, 200), (240, 200, 60), (60, 170, 90), (170, 80, 170)],
    "metal": [(190, 195, 200), (160, 165, 170), (220, 222, 225)],
    "glass": [(160, 200, 230), (140, 185, 220)],
    "dark": [(40, 40, 45), (70, 60, 55), (30, 50, 80)],
}
FLOOR_COLOURS = [(150, 120, 90), (120, 120, 120), (180, 160, 130), (100, 80, 60)]
WALL_COLOURS = [(235, 230, 215), (220, 225, 230), (240, 235, 225), (205, 210, 200)]

FLOOR_OBJECTS = ("cabinet", "bed", "chair", "sofa", "table", "bookshelf", "counter", "desk",
                 "refrigerator", "toilet", "sink", "bathtub", "otherfurniture")
WALL_OBJECTS = ("door", "window", "picture", "curtain", "shower curtain")


@dataclass(frozen=True)
class SynthConfig:
    """How synthetic rooms are generated."""

    room_edge_m: float = 0.03
    """Triangle edge length of floor and walls (metres)."""
    object_edge_m: float = 0.025
    """Triangle edge length of objects (metres)."""
    min_objects: int = 8
    """Fewest objects per room."""
    max_objects: int = 20
    """Most objects per room."""
    room_size_m: tuple[float, float] = (3.5, 5.0)
    """Range of the room's side lengths."""
    wall_height_m: float = 2.4
    """Wall height."""
    scan_heights_m: tuple[float, ...] = (1.2, 1.6)
    """Heights of the simulated scanner; surfaces it never sees are dropped, as in a real scan."""
    scan_grid: int = 3
    """Scanner positions per room axis (a grid over the free floor)."""
    colour_noise: float = 8.0
    """Standard deviation of per-vertex colour noise (0..255 units), like a scan's."""
    seg_cell_m: float = 0.5
    """Size of the patches that the shipped over-segmentation (segs.json) cuts surfaces into."""
    scanner_effects: bool = True
    """Make the mesh scan-like (the knobs below); False = clean, exactly planar primitives."""
    vertex_noise_m: float = 0.0005
    """Standard deviation of the white vertex displacement along the surface normal (metres)."""
    bump_m: float = 0.003
    """Standard deviation of the smooth displacement along the normal (a scan's bumps, metres)..."""
    bump_length_m: float = 0.12
    """...and its typical wavelength (metres)."""
    vertex_jitter: float = 0.3
    """In-plane vertex displacement, as a fraction of the edge length (uneven triangles)."""
    decimate_keep: float = 0.75
    """Fraction of each object's triangles kept by quadric decimation (1 = none)."""
    thin_part_m: float = 0.035
    """Rods (boxes whose two smaller sides are below this) are lost with `thin_part_drop`."""
    thin_part_drop: float = 0.4
    """Probability that a thin rod (a leg, a book seen edge-on) is missing from the scan."""
    floor_under_furniture: bool = True
    """Drop the floor under furniture footprints (a scan never sees it)."""
    hole_rate_per_m2: float = 0.06
    """Random missing patches (discs of 5-25 cm radius) per square metre of surface."""
    shading: float = 0.35
    """Strength of the shading (a directional light and a slow exposure drift) in the colours."""


@dataclass
class SynthRoom:
    """A generated room, in its axis-aligned frame, with the generator's ground truth."""

    scene_id: str
    xyz: np.ndarray        # float32 [N, 3], aligned frame
    rgb: np.ndarray        # uint8 [N, 3]
    faces: np.ndarray      # int32 [F, 3]
    seg: np.ndarray        # int32 [N] shipped over-segment per vertex
    instance: np.ndarray   # int32 [N] 0..I-1 (every vertex belongs to an object, wall or floor)
    instance_labels: list[str] = field(default_factory=list)  # class name per instance
    alignment: np.ndarray = field(default_factory=lambda: np.eye(4))  # raw -> aligned

    @property
    def semantic(self) -> np.ndarray:
        """Training ids [N] of the ScanNet 20 classes."""
        ids = np.array([CLASS_NAMES.index(name) for name in self.instance_labels], dtype=np.int16)
        return ids[self.instance]


class _MeshBuilder:
    """Accumulates primitives as grids of triangles with instance and segment ids."""

    def __init__(self, rng: np.random.Generator, cfg: SynthConfig, scan_rng: np.random.Generator | None = None):
        self.rng, self.cfg = rng, cfg
        self.scan_rng = scan_rng  # scanner effects only: the layout's stream stays the same
        self.xyz: list[np.ndarray] = []
        self.rgb: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.seg: list[np.ndarray] = []
        self.inst: list[np.ndarray] = []
        self.count = 0
        self.next_seg = 0

    def quad(self, origin, u, v, colour, instance: int, edge: float, *, flip: bool = False) -> None:
        """A planar rectangle origin + s*u + t*v, s,t in [0,1], as a grid of triangles whose
        normal is u x v (or its opposite with `flip`): outward on objects, inward on walls."""
        origin, u, v = (np.asarray(a, dtype=np.float64) for a in (origin, u, v))
        nu = max(1, int(np.ceil(np.linalg.norm(u) / edge)))
        nv = max(1, int(np.ceil(np.linalg.norm(v) / edge)))
        s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
        pts = origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
        self._add_grid(pts, nu, nv, colour, instance, s.ravel() * np.linalg.norm(u), t.ravel() * np.linalg.norm(v), flip)

    def _add_grid(self, pts, nu, nv, colour, instance, su, tv, flip: bool = False) -> None:
        idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
        a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
        if flip:
            b, d = d, b
        faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]) + self.count
        cell = self.cfg.seg_cell_m
        cu, cv = np.floor(su / cell).astype(np.int64), np.floor(tv / cell).astype(np.int64)
        _, local_seg = np.unique(cu * 100_003 + cv, return_inverse=True)
        noise = self.rng.normal(0, self.cfg.colour_noise, size=(len(pts), 3))
        rgb = np.clip(np.asarray(colour, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        self.xyz.append(pts)
        self.rgb.append(rgb)
        self.faces.append(faces)
        self.seg.append(local_seg.ravel() + self.next_seg)
        self.inst.append(np.full(len(pts), instance))
        self.next_seg += int(local_seg.max()) + 1
        self.count += len(pts)

    def box(self, lo, hi, colour, instance: int, *, bottom: bool = False) -> None:
        """An axis-aligned box (5 faces; the bottom only when asked: it rests on something)."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        dx, dy, dz = hi - lo
        if self.cfg.scanner_effects and self.scan_rng is not None:
            sides = np.sort([dx, dy, dz])
            if sides[1] < self.cfg.thin_part_m and self.scan_rng.random() < self.cfg.thin_part_drop:
                return  # a thin rod the scan lost
        e = self.cfg.object_edge_m
        x, y, z = np.eye(3)
        self.quad(lo + z * dz, x * dx, y * dy, colour, instance, e)              # top
        self.quad(lo, x * dx, z * dz, colour, instance, e)                       # front (y = lo)
        self.quad(lo + y * dy, x * dx, z * dz, colour, instance, e, flip=True)   # back
        self.quad(lo, y * dy, z * dz, colour, instance, e, flip=True)            # left (x = lo)
        self.quad(lo + x * dx, y * dy, z * dz, colour, instance, e)              # right
        if bottom:
            self.quad(lo, x * dx, y * dy, colour, instance, e, flip=True)

    def cylinder(self, centre_xy, radius, z0, z1, colour, instance: int) -> None:
        """A vertical cylinder: side as an (angle, height) grid plus a top cap (polar grid)."""
        e = self.cfg.object_edge_m
        na = max(8, int(np.ceil(2 * np.pi * radius / e)))
        nz = max(1, int(np.ceil((z1 - z0) / e)))
        ang, hz = np.meshgrid(np.linspace(0, 2 * np.pi, na + 1), np.linspace(z0, z1, nz + 1), indexing="ij")
        pts = np.stack([centre_xy[0] + radius * np.cos(ang), centre_xy[1] + radius * np.sin(ang), hz], -1)
        self._add_grid(pts.reshape(-1, 3), na, nz, colour, instance, ang.ravel() * radius, hz.ravel() - z0)
        nr = max(1, int(np.ceil(radius / e)))
        rr, aa = np.meshgrid(np.linspace(0, radius, nr + 1), np.linspace(0, 2 * np.pi, na + 1), indexing="ij")
        cap = np.stack([centre_xy[0] + rr * np.cos(aa), centre_xy[1] + rr * np.sin(aa), np.full_like(rr, z1)], -1)
        self._add_grid(cap.reshape(-1, 3), nr, na, colour, instance, rr.ravel(), aa.ravel() * 0)

    def build(self):
        return (np.concatenate(self.xyz).astype(np.float32), np.concatenate(self.rgb),
                np.concatenate(self.faces).astype(np.int32), np.concatenate(self.seg).astype(np.int32),
                np.concatenate(self.inst).astype(np.int32))


def _pick(rng: np.random.Generator, palette: str) -> tuple[int, int, int]:
    colours = _PALETTES[palette]
    return colours[rng.integers(len(colours))]


def _legs(mb: _MeshBuilder, x0, y0, x1, y1, h, colour, inst, t=0.04) -> None:
    for lx, ly in ((x0, y0), (x1 - t, y0), (x0, y1 - t), (x1 - t, y1 - t)):
        mb.box((lx, ly, 0), (lx + t, ly + t, h), colour, inst)


def _floor_object(mb: _MeshBuilder, rng, name: str, x0: float, y0: float, w: float, d: float, inst: int) -> None:
    """Build one floor-standing object of class `name` in the footprint [x0,x0+w]x[y0,y0+d]."""
    x1, y1 = x0 + w, y0 + d
    u = rng.uniform
    if name == "cabinet":
        mb.box((x0, y0, 0), (x1, y1, u(0.8, 1.2)), _pick(rng, rng.choice(["wood", "white"])), inst)
    elif name == "bed":
        frame = _pick(rng, "wood")
        mb.box((x0, y0, 0), (x1, y1, 0.3), frame, inst)
        mb.box((x0 + 0.02, y0 + 0.02, 0.3), (x1 - 0.02, y1 - 0.02, 0.5), _pick(rng, "white"), inst)
        mb.box((x0, y1 - 0.08, 0), (x1, y1, 1.0), frame, inst)
    elif name == "chair":
        colour = _pick(rng, rng.choice(["bright", "dark", "fabric"]))
        _legs(mb, x0, y0, x1, y1, 0.42, colour, inst, 0.03)
        mb.box((x0, y0, 0.42), (x1, y1, 0.47), colour, inst)
        mb.box((x0, y1 - 0.05, 0.47), (x1, y1, 0.9), colour, inst)
    elif name == "sofa":
        colour = _pick(rng, "fabric")
        mb.box((x0, y0, 0), (x1, y1, 0.42), colour, inst)
        mb.box((x0, y1 - 0.2, 0.42), (x1, y1, 0.85), colour, inst)
        mb.box((x0, y0, 0.42), (x0 + 0.18, y1 - 0.2, 0.62), colour, inst)
        mb.box((x1 - 0.18, y0, 0.42), (x1, y1 - 0.2, 0.62), colour, inst)
    elif name in ("table", "desk"):
        colour = _pick(rng, "wood" if name == "table" else rng.choice(["white", "wood"]))
        h = 0.72 if name == "table" else 0.76
        if name == "table":
            _legs(mb, x0, y0, x1, y1, h - 0.04, colour, inst)
        else:  # desks stand on two side panels
            mb.box((x0, y0, 0), (x0 + 0.04, y1, h - 0.04), colour, inst)
            mb.box((x1 - 0.04, y0, 0), (x1, y1, h - 0.04), colour, inst)
        mb.box((x0, y0, h - 0.04), (x1, y1, h), colour, inst, bottom=True)
    elif name == "bookshelf":
        frame = _pick(rng, "wood")
        h = u(1.5, 2.0)
        mb.box((x0, y0, 0), (x1, y1, h), frame, inst)
        for k in range(1, 4):  # books sticking out of the front face
            z = h * k / 4
            n_books = int(rng.integers(3, 7))
            edges = np.sort(u(x0 + 0.03, x1 - 0.03, size=n_books * 2)).reshape(-1, 2)
            for bx0, bx1 in edges:
                mb.box((bx0, y0 - 0.03, z - 0.25), (bx1, y0, z - 0.02), _pick(rng, "bright"), inst)
    elif name == "counter":
        mb.box((x0, y0, 0), (x1, y1, 0.86), _pick(rng, "wood"), inst)
        mb.box((x0 - 0.02, y0 - 0.02, 0.86), (x1 + 0.02, y1 + 0.02, 0.9), _pick(rng, "dark"), inst, bottom=True)
    elif name == "refrigerator":
        mb.box((x0, y0, 0), (x1, y1, u(1.6, 1.9)), _pick(rng, "metal"), inst)
    elif name == "toilet":
        white = _pick(rng, "white")
        r = min(w, d) * 0.45
        mb.cylinder((x0 + w / 2, y0 + r + 0.02), r, 0, 0.42, white, inst)
        mb.box((x0, y1 - 0.18, 0), (x1, y1, 0.8), white, inst)
    elif name == "sink":
        white = _pick(rng, "white")
        mb.cylinder((x0 + w / 2, y0 + d / 2), 0.08, 0, 0.75, white, inst)
        mb.box((x0, y0, 0.75), (x1, y1, 0.88), white, inst, bottom=True)
    elif name == "bathtub":
        white = _pick(rng, "white")
        mb.box((x0, y0, 0), (x1, y1, 0.55), white, inst)
    else:  # otherfurniture: a stool, a box, a small stand
        mb.box((x0, y0, 0), (x1, y1, u(0.3, 1.0)), _pick(rng, rng.choice(["dark", "metal", "wood"])), inst)


_FOOTPRINTS = {  # class -> ((w min, w max), (d min, d max))
    "cabinet": ((0.5, 1.0), (0.4, 0.6)), "bed": ((1.4, 1.9), (1.9, 2.1)), "chair": ((0.42, 0.5), (0.42, 0.5)),
    "sofa": ((1.6, 2.2), (0.8, 0.95)), "table": ((1.0, 1.6), (0.7, 0.9)), "bookshelf": ((0.8, 1.2), (0.3, 0.38)),
    "counter": ((1.2, 2.2), (0.55, 0.65)), "desk": ((1.1, 1.5), (0.55, 0.7)), "refrigerator": ((0.65, 0.8), (0.65, 0.75)),
    "toilet": ((0.38, 0.45), (0.65, 0.72)), "sink": ((0.5, 0.6), (0.4, 0.5)), "bathtub": ((1.5, 1.7), (0.7, 0.8)),
    "otherfurniture": ((0.3, 0.7), (0.3, 0.7)),
}
_AGAINST_WALL = {"cabinet", "bed", "sofa", "bookshelf", "counter", "desk", "refrigerator", "toilet", "sink", "bathtub"}


def make_room(seed: int, index: int, cfg: SynthConfig = SynthConfig()) -> SynthRoom:
    """Generate room `index` of the set drawn with `seed` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    scan_rng = np.random.default_rng([seed, index, 1])  # scanner effects: their own stream
    scene_id = f"scene{index:04d}_00"
    sx, sy = rng.uniform(*cfg.room_size_m, size=2)
    height = cfg.wall_height_m
    mb = _MeshBuilder(rng, cfg, scan_rng)
    labels: list[str] = []

    def new_instance(name: str) -> int:
        labels.append(name)
        return len(labels) - 1

    # floor and walls: one instance each class, as in ScanNet annotations of most rooms
    mb.quad((0, 0, 0), (sx, 0, 0), (0, sy, 0), FLOOR_COLOURS[rng.integers(len(FLOOR_COLOURS))],
            new_instance("floor"), cfg.room_edge_m)
    wall_colour = WALL_COLOURS[rng.integers(len(WALL_COLOURS))]
    wall = new_instance("wall")
    for origin, u in (((0, 0, 0), (sx, 0, 0)), ((sx, 0, 0), (0, sy, 0)), ((sx, sy, 0), (-sx, 0, 0)), ((0, sy, 0), (0, -sy, 0))):
        mb.quad(origin, u, (0, 0, height), wall_colour, wall, cfg.room_edge_m, flip=True)  # facing inwards

    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_wall = min(int(rng.integers(2, 5)), max(0, n_objects - 1))
    # floor objects: rejection sampling of footprints, keeping a 0.1 m gap and a free walkway
    occupied: list[tuple[float, float, float, float]] = []
    target = n_objects - n_wall
    placed = 0
    for name in rng.choice(FLOOR_OBJECTS, size=4 * target):  # candidates until `target` fit
        name = str(name)
        if placed == target:
            break
        (wmin, wmax), (dmin, dmax) = _FOOTPRINTS[name]
        for _attempt in range(40):
            w, d = rng.uniform(wmin, wmax), rng.uniform(dmin, dmax)
            if name in _AGAINST_WALL:
                side = int(rng.integers(4))
                # footprint in a frame where the wall is y = 0; rotated to the chosen wall below
                along = sx if side % 2 == 0 else sy
                if w > along - 0.2:
                    continue
                a = rng.uniform(0.05, along - w - 0.05)
                gap = 0.03
                if side == 0:
                    rect = (a, gap, a + w, gap + d)
                elif side == 2:
                    rect = (a, sy - gap - d, a + w, sy - gap)
                elif side == 1:
                    rect = (sx - gap - d, a, sx - gap, a + w)
                else:
                    rect = (gap, a, gap + d, a + w)
            else:
                if w > sx - 0.6 or d > sy - 0.6:
                    continue
                x, y = rng.uniform(0.3, sx - 0.3 - w), rng.uniform(0.3, sy - 0.3 - d)
                rect = (x, y, x + w, y + d)
            if all(rect[2] + 0.1 < o[0] or o[2] + 0.1 < rect[0] or rect[3] + 0.1 < o[1] or o[3] + 0.1 < rect[1]
                   for o in occupied):
                occupied.append(rect)
                inst = new_instance(name)
                _floor_object(mb, rng, name, rect[0], rect[1], rect[2] - rect[0], rect[3] - rect[1], inst)
                placed += 1
                break
    # wall objects: thin boxes 1.5 cm proud of a wall, avoiding each other along the wall
    wall_spans: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: [], 3: []}
    for name in rng.choice(WALL_OBJECTS, size=n_wall):
        name = str(name)
        for _attempt in range(40):
            side = int(rng.integers(4))
            along = sx if side % 2 == 0 else sy
            if name == "door":
                w, z0, z1 = rng.uniform(0.8, 0.95), 0.0, 2.05
            elif name == "window":
                w, z0 = rng.uniform(0.9, 1.5), rng.uniform(0.85, 1.0)
                z1 = z0 + rng.uniform(0.9, 1.2)
            elif name == "picture":
                w, z0 = rng.uniform(0.4, 0.9), rng.uniform(1.2, 1.5)
                z1 = z0 + rng.uniform(0.3, 0.6)
            else:  # curtains
                w, z0, z1 = rng.uniform(1.0, 1.8), 0.05 if name == "shower curtain" else 0.3, 2.2
            if w > along - 0.4:
                continue
            a = rng.uniform(0.2, along - w - 0.2)
            if any(not (a + w + 0.1 < b0 or b1 + 0.1 < a) for b0, b1 in wall_spans[side]):
                continue
            wall_spans[side].append((a, a + w))
            t = 0.015 if name != "door" else 0.04
            rect = {0: (a, 0.005, a + w, 0.005 + t), 2: (a, sy - 0.005 - t, a + w, sy - 0.005),
                    1: (sx - 0.005 - t, a, sx - 0.005, a + w), 3: (0.005, a, 0.005 + t, a + w)}[side]
            palette = {"door": rng.choice(["wood", "white"]), "window": "glass", "picture": "bright",
                       "curtain": "fabric", "shower curtain": "glass"}[name]
            inst = new_instance(name)
            mb.box((rect[0], rect[1], z0), (rect[2], rect[3], z1), _pick(rng, palette), inst, bottom=z0 > 0)
            break

    xyz, rgb, faces, seg, instance = mb.build()
    xyz, rgb, faces, seg, instance, labels = _keep_scanned(
        xyz, rgb, faces, seg, instance, labels, _scanner_positions(sx, sy, occupied, cfg))
    if cfg.scanner_effects:
        xyz, rgb, faces, seg, instance, labels = _scan_effects(
            xyz, rgb, faces, seg, instance, labels, occupied, scan_rng, cfg)
    # the raw scan is not axis aligned: rotate about z and translate; axisAlignment undoes it
    angle = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    raw_from_aligned = np.array([[c, -s, 0, rng.uniform(-2, 2)], [s, c, 0, rng.uniform(-2, 2)], [0, 0, 1, 0], [0, 0, 0, 1]])
    return SynthRoom(scene_id, xyz, rgb, faces, seg, instance, labels, alignment=np.linalg.inv(raw_from_aligned))


def _scanner_positions(sx: float, sy: float, occupied, cfg: SynthConfig) -> np.ndarray:
    """Grid positions over the free floor (outside furniture footprints) at the scan heights."""
    g = cfg.scan_grid
    xs, ys = np.linspace(0.5, sx - 0.5, g), np.linspace(0.5, sy - 0.5, g)
    positions = []
    for x in xs:
        for y in ys:
            if all(not (o[0] - 0.2 < x < o[2] + 0.2 and o[1] - 0.2 < y < o[3] + 0.2) for o in occupied):
                positions += [(x, y, h) for h in cfg.scan_heights_m]
    if not positions:
        positions = [(sx / 2, sy / 2, h) for h in cfg.scan_heights_m]
    return np.asarray(positions, dtype=np.float32)


def _keep_faces(xyz, rgb, faces, seg, instance, labels, keep):
    """The mesh restricted to the faces `keep` (bool [F]) and their vertices, ids renumbered
    (instances and segments that lose every vertex disappear)."""
    faces = faces[keep]
    used = np.zeros(len(xyz), dtype=bool)
    used[faces.ravel()] = True
    new_index = np.cumsum(used) - 1
    faces = new_index[faces].astype(np.int32)
    kept_instances, instance = np.unique(instance[used], return_inverse=True)
    labels = [labels[i] for i in kept_instances]
    _, seg = np.unique(seg[used], return_inverse=True)
    return (xyz[used], rgb[used], faces, seg.astype(np.int32), instance.astype(np.int32), labels)


def _vertex_normals(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v = np.asarray(xyz, np.float64)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    out = np.zeros_like(v)
    for k in range(3):
        np.add.at(out, faces[:, k], fn)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _scan_effects(xyz, rgb, faces, seg, instance, labels, occupied, rng: np.random.Generator, cfg: SynthConfig):
    """What a reconstructed scan has and a clean generator lacks (see the module docstring):
    missing floor under furniture and random holes, vertex noise, per-object quadric decimation
    (uneven triangles), shading and colour noise. Ground truth (instances, shipped segments)
    follows the vertices: decimation runs per instance, segments go to the nearest old vertex."""
    from scipy.spatial import cKDTree

    xyz = np.asarray(xyz, np.float64)
    centroid = xyz[faces].mean(axis=1)
    keep = np.ones(len(faces), dtype=bool)
    if cfg.floor_under_furniture and occupied:
        floor_inst = labels.index("floor") if "floor" in labels else -1
        on_floor = instance[faces[:, 0]] == floor_inst
        for x0, y0, x1, y1 in occupied:
            inside = ((centroid[:, 0] > x0 + 0.03) & (centroid[:, 0] < x1 - 0.03)
                      & (centroid[:, 1] > y0 + 0.03) & (centroid[:, 1] < y1 - 0.03))
            keep &= ~(on_floor & inside)
    area = 0.5 * np.linalg.norm(np.cross(xyz[faces[:, 1]] - xyz[faces[:, 0]], xyz[faces[:, 2]] - xyz[faces[:, 0]]), axis=1)
    n_holes = int(rng.poisson(cfg.hole_rate_per_m2 * float(area.sum())))
    if n_holes and len(faces):
        centres = centroid[rng.choice(len(faces), size=n_holes, p=area / area.sum())]
        radii = rng.uniform(0.05, 0.25, size=n_holes)
        near = cKDTree(centres).query(centroid, k=1)
        keep &= ~(near[0] < radii[near[1]])
    xyz, rgb, faces, seg, instance, labels = _keep_faces(xyz, rgb, faces, seg, instance, labels, keep)

    # noise: along the normal (depth noise), and in the plane (uneven triangles)
    normal = _vertex_normals(xyz, faces)
    edge = np.linalg.norm(xyz[faces[:, 0]] - xyz[faces[:, 1]], axis=1)
    vertex_edge = np.zeros(len(xyz))
    np.maximum.at(vertex_edge, faces[:, 0], edge)
    jitter = rng.normal(0, 1, size=xyz.shape) * (cfg.vertex_jitter * vertex_edge / 2)[:, None]
    jitter -= np.einsum("ij,ij->i", jitter, normal)[:, None] * normal
    # smooth bumps: random Fourier features of wavelengths around bump_length_m
    n_feat = 24
    direction = rng.normal(0, 1, size=(n_feat, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wave = direction * (2 * np.pi / (cfg.bump_length_m * rng.uniform(0.6, 1.6, size=(n_feat, 1))))
    bumps = np.cos(xyz @ wave.T + rng.uniform(0, 2 * np.pi, size=n_feat)).sum(axis=1) * np.sqrt(2.0 / n_feat)
    offset = cfg.bump_m * bumps + rng.normal(0, cfg.vertex_noise_m, size=len(xyz))
    xyz = xyz + jitter + normal * offset[:, None]

    if cfg.decimate_keep < 1.0:
        xyz, rgb, faces, seg, instance = _decimate_per_instance(xyz, rgb, faces, seg, instance, cfg.decimate_keep)

    # shading: a directional light (Lambert on the unsigned normal) and a slow exposure drift
    if cfg.shading > 0:
        normal = _vertex_normals(xyz, faces)
        light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 1.0])
        light /= np.linalg.norm(light)
        lambert = np.abs(normal @ light)
        freq = rng.normal(0, 1.2, size=(3, 3))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        drift = np.sin(xyz @ freq.T + phase).mean(axis=1)
        factor = 1.0 - cfg.shading * (0.6 * (1.0 - lambert) + 0.4 * (0.5 - 0.5 * drift))
        noise = rng.normal(0, cfg.colour_noise / 2, size=rgb.shape)
        rgb = np.clip(rgb.astype(np.float64) * factor[:, None] * (1.0 + 0.15 * cfg.shading) + noise, 0, 255).astype(np.uint8)
    return xyz.astype(np.float32), rgb, faces.astype(np.int32), seg, instance, labels


def _decimate_per_instance(xyz, rgb, faces, seg, instance, keep: float):
    """Quadric decimation (Open3D) of each instance's sub-mesh to `keep` of its triangles; colours
    and shipped segments from the nearest original vertex of the same instance."""
    import open3d as o3d
    from scipy.spatial import cKDTree

    out_xyz, out_rgb, out_faces, out_seg, out_inst = [], [], [], [], []
    count = 0
    face_inst = instance[faces[:, 0]]
    for inst in np.unique(instance):
        f = faces[face_inst == inst]
        verts = np.unique(f.ravel())
        local = np.full(len(xyz), -1, np.int64)
        local[verts] = np.arange(len(verts))
        v, f = xyz[verts], local[f]
        target = int(len(f) * keep)
        if target >= 16:
            mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32)))
            mesh = mesh.simplify_quadric_decimation(target, boundary_weight=10.0)
            mesh.remove_unreferenced_vertices()
            mesh.remove_degenerate_triangles()
            new_v, new_f = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
            if len(new_f):
                v, f = new_v, new_f
        nearest = cKDTree(xyz[verts]).query(v, k=1)[1]
        out_xyz.append(v)
        out_rgb.append(rgb[verts][nearest])
        out_seg.append(seg[verts][nearest])
        out_inst.append(np.full(len(v), inst))
        out_faces.append(f + count)
        count += len(v)
    _, seg_new = np.unique(np.concatenate(out_seg), return_inverse=True)
    return (np.concatenate(out_xyz), np.concatenate(out_rgb), np.concatenate(out_faces).astype(np.int32),
            seg_new.astype(np.int32), np.concatenate(out_inst).astype(np.int32))


def _keep_scanned(xyz, rgb, faces, seg, instance, labels, positions):
    """Drop the surfaces that no scanner position sees (backs of furniture against walls, tops
    above eye height, faces hidden by other objects): a real scan has no such surfaces.
    A vertex is seen when the ray from a scanner position towards it is not blocked before it;
    a triangle is kept when any of its vertices is seen."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(xyz), o3d.core.Tensor(faces.astype(np.uint32)))
    vertex_seen = np.zeros(len(xyz), dtype=bool)
    for origin in positions:
        delta = xyz - origin
        dist = np.linalg.norm(delta, axis=1)
        rays = np.concatenate([np.broadcast_to(origin, xyz.shape), delta / np.maximum(dist, 1e-9)[:, None]], 1)
        t_hit = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
        vertex_seen |= t_hit >= dist - 0.01
    return _keep_faces(xyz, rgb, faces, seg, instance, labels, vertex_seen[faces].any(axis=1))


def write_scannet_layout(room: SynthRoom, out_dir: str | Path, *, variant: str = "v2") -> Path:
    """Write `room` as ScanNet raw files under `out_dir/scans/<scene>/`; return that folder.

    variant "v2": Aggregator.v2, `scannet.`-prefixed sceneId, `<scene>.aggregation.json`,
    axisAlignment in `<scene>.txt`. "v1": the v1-era names, no prefix, no axisAlignment
    (vertices written already aligned).
    """
    scene = room.scene_id
    folder = Path(out_dir) / "scans" / scene
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "v2":
        raw_from_aligned = np.linalg.inv(room.alignment)
        xyz_raw = room.xyz @ raw_from_aligned[:3, :3].T + raw_from_aligned[:3, 3]
    else:
        xyz_raw = room.xyz
    vertex = np.empty(len(room.xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"),
                                            ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz_raw.astype(np.float32).T
    vertex["red"], vertex["green"], vertex["blue"] = room.rgb.T
    vertex["alpha"] = 255
    face = np.empty(len(room.faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = room.faces
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")],
            byte_order="<").write(str(folder / f"{scene}_vh_clean_2.ply"))

    segs_name = f"{scene}_vh_clean_2.0.010000.segs.json"
    (folder / segs_name).write_text(json.dumps({
        "params": {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "30000",
                   "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"},
        "sceneId": scene, "segIndices": room.seg.tolist()}))
    groups = []
    for inst, label in enumerate(room.instance_labels):
        segments = np.unique(room.seg[room.instance == inst]).tolist()
        groups.append({"id": inst, "objectId": inst, "segments": segments, "label": label})
    if variant == "v2":
        agg_name, scene_ref, app = f"{scene}.aggregation.json", f"scannet.{scene}", "Aggregator.v2"
    else:
        agg_name, scene_ref, app = f"{scene}_vh_clean.aggregation.json", scene, "Aggregator.v1"
    (folder / agg_name).write_text(json.dumps({
        "sceneId": scene_ref, "appId": app, "segGroups": groups,
        "segmentsFile": f"scannet.{segs_name}" if variant == "v2" else segs_name}))
    lines = ["colorHeight = 968", "colorWidth = 1296", "numColorFrames = 0", "sceneType = Synthetic"]
    if variant == "v2":
        lines.insert(0, "axisAlignment = " + " ".join(f"{v:.9g}" for v in room.alignment.ravel()))
    (folder / f"{scene}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_label_table(out_dir: str | Path) -> Path:
    """A minimal `scannetv2-labels.combined.tsv` (raw_category -> nyu40id) for the synthetic labels."""
    path = Path(out_dir) / "scannetv2-labels.combined.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class"]
    for k, (name, nyu) in enumerate(zip(CLASS_NAMES, NYU40_IDS), 1):
        rows.append(f"{k}\t{name}\t{name}\t1\t{nyu}\t0\t{name}\t{name}")
    path.write_text("\n".join(rows) + "\n")
    return path


SYNTH_RECORD = ".ws3d_synth.json"
"""Written last into each generated room's folder: what it was generated from (a rerun with the
same seed, index and config keeps the room instead of generating it again)."""


def synthesise(out_dir: str | Path, n_scenes: int, *, seed: int = 0, start: int = 0,
               cfg: SynthConfig = SynthConfig()) -> list[str]:
    """Generate `n_scenes` rooms (indices start..start+n-1) into `out_dir`; return their ids.

    Resumable: a room whose folder holds the record of the same (seed, index, config) is kept."""
    from pipeline.config import to_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_label_table(out_dir)
    ids = []
    for index in range(start, start + n_scenes):
        record = json.dumps({"seed": int(seed), "index": int(index), "config": to_dict(cfg)}, sort_keys=True)
        scene_id = f"scene{index:04d}_00"
        marker = out_dir / "scans" / scene_id / SYNTH_RECORD
        if marker.is_file() and marker.read_text() == record:
            ids.append(scene_id)
            continue
        room = make_room(seed, index, cfg)
        folder = write_scannet_layout(room, out_dir, variant="v1" if index % 4 == 3 else "v2")
        (folder / SYNTH_RECORD).write_text(record)
        ids.append(room.scene_id)
    return ids


DATASET = Dataset(
    name="synthetic", scene_id=re.compile(r"^.+$"),  # the generator's own names; check_scene_id still applies
    reader_config=scannet.ScanNetReaderConfig, list_scenes=scannet.list_scenes, read_scene=scannet.read_scene,
    label_map=scannet.label_map,
)
"""Rooms of `synthesise`, in the ScanNet layout (read by ScanNet's reader)."""

