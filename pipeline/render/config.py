"""How views are chosen and rendered (`render.*` options of `ws3d render` and workflows)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RenderConfig:
    """How views are chosen and rendered."""

    width: int = 320
    """Image width in pixels."""
    height: int = 240
    """Image height in pixels."""
    hfov_deg: float = 90.0
    """Horizontal field of view of indoor cameras (degrees)."""
    max_views: int = 20
    """Most views per indoor scene."""
    coverage_target: float = 0.95
    """Stop adding indoor views once this fraction of the points is seen, or all the observable
    ones (seen by some candidate: points under furniture or against walls may be seen by none)."""
    min_view_gain: float = 0.001
    """A view is added only if it newly shows at least this fraction of the sampled points."""
    eye_height_m: tuple[float, float] = (0.5, 1.6)
    """Range of camera heights above the floor (each candidate position draws one): low ones
    see under tables and between chairs, as a handheld scanner did."""
    clearance_m: float = 0.2
    """Candidate positions keep at least this distance from every surface."""
    headings: int = 8
    """Headings per candidate position, evenly spaced around the vertical."""
    pitches_deg: tuple[float, ...] = (-10.0, -40.0, -70.0)
    """Pitches of indoor cameras (negative = looking down): the steeper one sees the floor
    between furniture and the tops of low objects, which an eye-height level view misses."""
    grid_step_m: float = 0.25
    """Finest spacing of the candidate position grid (coarser in big scenes, see max_positions)."""
    max_positions: int = 96
    """Most candidate positions per scene (spread out by farthest-point sampling)."""
    candidate_width: int = 4
    """Meshes: width of the tiny candidate renders (height keeps the aspect) that find positions
    outside the scan (see min_hit_fraction): 4 x 3 pixels a candidate are 288 rays a position,
    enough for its hit fraction (8 x 6 chose the same views at 4x the rays, which are scattered
    and so cost more each than image rays). Candidates are scored exactly, by casting a ray from
    each position to each sampled point."""
    point_candidate_width: int = 64
    """Point clouds: width of the candidate renders that find positions outside the scan and
    score candidates by a depth test of the sampled points."""
    min_hit_fraction: float = 0.6
    """A position whose candidates' pixels hit a surface less often than this is outside the
    scan (e.g. beyond a wall) and is dropped."""
    coverage_samples: int = 2048
    """Points sampled to score candidates and estimate coverage during the greedy choice."""
    refine_rounds: int = 4
    """After rendering, rounds of extra views chosen for a fresh sample of the points the
    full-size views missed (the first sample's greedy choice overfits it)."""
    refine_samples: int = 512
    """Points sampled from those still unseen for each refinement round."""
    floor_percentile: float = 1.0
    """The floor height is this percentile of the points' z."""
    lidar_headings: int = 6
    """Cameras at a LiDAR sensor, evenly spaced in heading."""
    lidar_hfov_deg: float = 90.0
    """Horizontal field of view of LiDAR cameras (degrees)."""
    lidar_pitch_deg: float = -10.0
    """Pitch of LiDAR cameras: a scanner sees about +2..-25 degrees, so look slightly down."""
    point_radius_m: float = 0.0
    """World radius of an indoor point's splat; 0 = `point_radius_factor` x its local spacing."""
    point_radius_factor: float = 2.0
    """Automatic splat radius in local point spacings (`pipeline.render.splat.local_spacing`, metres):
    irregular (scanned, sampled) clouds leave holes at 1x, through which hidden surfaces show."""
    splat_depth_tol_factor: float = 2.0
    """Clouds: a point is hidden when it lies behind the z-buffer at its pixel by more than this
    many of its own splat radii (a neighbour's disc on the same tilted surface is not an occluder)."""
    lidar_angular_radius_deg: float = 0.35
    """A LiDAR point's splat radius as an angle seen from the sensor (beams are ~0.2-0.4 deg apart)."""
    max_splat_radius_px: float = 8.0
    """Largest splat radius in pixels (points very close to a camera)."""
    visibility_tol_m: float = 0.01
    """Meshes: a vertex is visible when the ray from the camera reaches it within this (metres)."""
    occlusion_rel_tol: float = 0.02
    """Meshes: vertices further behind every depth around their pixel than this fraction of it...
    (point clouds: the tolerance of the low-resolution candidate estimate)..."""
    occlusion_abs_tol_m: float = 0.02
    """...plus this many metres are hidden without casting their occlusion ray (a pre-test)."""
    near_m: float = 0.05
    """Nothing nearer than this to a camera is drawn."""
    views_per_batch: int = 16
    """Views cast in one `cast_rays` call (bounds memory: ~56 bytes a pixel in flight, 70 MB at
    320 x 240). Batches of 16 views (1.2 million pixels) also take the per-pixel and per-point
    kernels past `pipeline.parallel.PARALLEL_MIN_ITEMS`, onto all threads."""
    threads: int = 0
    """Threads for ray casting and the numba kernels; 0 = all cores. Set 1 when an executor runs
    one worker process per core (threads beyond the free cores only wait for each other)."""
    seed: int = 0
    """Seed of the candidate heights and the coverage sample."""

    def __post_init__(self) -> None:
        # a value no render can use is a config error (one line, exit 2), not a failure of every scene
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"render.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("width", "height", "max_views", "headings", "max_positions", "candidate_width",
                     "point_candidate_width", "coverage_samples", "refine_samples", "lidar_headings", "views_per_batch"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("refine_rounds", "threads", "point_radius_m", "clearance_m", "visibility_tol_m",
                     "occlusion_rel_tol", "occlusion_abs_tol_m"):
            need(getattr(self, name) >= 0, name, ">= 0")
        for name in ("grid_step_m", "point_radius_factor", "splat_depth_tol_factor", "lidar_angular_radius_deg",
                     "max_splat_radius_px", "near_m"):
            need(getattr(self, name) > 0, name, "> 0")
        for name in ("hfov_deg", "lidar_hfov_deg"):
            need(0 < getattr(self, name) < 180, name, "in (0, 180)")
        for name in ("coverage_target", "min_view_gain", "min_hit_fraction"):
            need(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        need(0 <= self.floor_percentile <= 100, "floor_percentile", "in [0, 100]")
        need(self.eye_height_m[0] <= self.eye_height_m[1], "eye_height_m", "(low, high) with low <= high")
        need(len(self.pitches_deg) > 0 and all(-90 <= p <= 90 for p in self.pitches_deg), "pitches_deg",
             "one or more angles in [-90, 90]")
