"""The over-segmentation's thresholds (`overseg.*` options of `ws3d overseg` and workflows)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OversegConfig:
    """Thresholds of the over-segmentation (defaults tuned on synthetic ScanNet-like rooms)."""

    k_neighbours: int = 16
    """Neighbours per point (and per voxel) for PCA, growing, merging and boundaries."""
    voxel_m: float = 0.02
    """Side of the surface voxels that segments are grown on (metres); 0 = grow on the points
    themselves (then counts depend on the sampling density)."""
    range_scale: float = 0.003
    """Clouds seen from a sensor (a `viewpoint` is given: LiDAR): an item at range r from it has
    its metric thresholds grown by s = max(1, range_scale * r / voxel_m) (tangent band, radius
    cap, boundary band; the smallest segment's area by s**2), and points are pooled into cells of
    the first `voxel_m * 2**L` >= 4 * range_scale * r (0.003: 0.16 m cells at 7-13 m, 0.64 m at
    27-53 m), so that a sweep's sparse far field gives about the same segments at any point density
    (SemanticKITTI: all / half / quarter of a sweep within 1.5x; plain `voxel_m`: 2.8x). 0 = off.
    Meshes and clouds without a viewpoint (rooms) never use it."""
    voxel_radius_factor: float = 2.5
    """Boundaries and the segment graph link voxels within this many `voxel_m` (a band of fixed
    width in metres at any density; the nearest 4 always count, for sparse LiDAR far field).
    Growing uses the k nearest voxels (bounded by `radius_m` when set)."""
    min_segment_area_m2: float = 0.012
    """With voxels: segments covering fewer than this many square metres (area / voxel_m**2
    voxels) are merged into their most similar neighbour (replaces `min_segment_points`)."""
    mesh_edges: bool = True
    """Meshes: an item's neighbours are the items its triangles' edges link (no search); False =
    its `k_neighbours` nearest, as for clouds (the slower reference the tests compare with)."""
    radius_m: float = 0.0
    """Drop neighbours farther than this (metres); 0 = plain kNN. Useful for sparse LiDAR far field."""
    k_pfh: int = 8
    """Neighbours (besides the point) whose pairs make a point's PFH: (k+1)k/2 pairs."""
    pfh_bins: int = 5
    """Bins per PFH angle; the histogram has pfh_bins**3 entries."""
    max_normal_angle_deg: float = 15.0
    """A neighbour joins only if its normal is within this angle of the current point's (unsigned)."""
    max_plane_offset_m: float = 0.01
    """...and it lies within this distance of the current point's tangent plane (keeps pictures,
    doors and objects standing a little in front of a wall out of the wall)..."""
    max_plane_slope_deg: float = 15.0
    """...or, for a far neighbour (sparse scans, LiDAR), the line to it is within this angle of
    the tangent plane (0 = the band alone)."""
    min_pfh_affinity: float = 0.25
    """...and the histogram intersection of their PFHs is at least this (0..1)."""
    mesh_pfh: bool = False
    """Meshes (every item on a face): apply the PFH test too. Off: on the real ScanNet sample and
    five synthetic rooms it changed no segment (identical counts and purity) and took half the time."""
    max_colour_dist: float = 40.0
    """...and their (neighbourhood-smoothed) RGB colours differ by at most this (0..255 units)..."""
    max_colour_dist_segment: float = 30.0
    """...and its smoothed colour is within this of the segment's running mean colour."""
    max_seed_curvature: float = 0.05
    """Points with higher curvature do not spread a segment they join; those that no segment
    reaches seed their own after all flatter seeds (and are usually merged as small segments)."""
    max_segment_radius_m: float = 0.4
    """A point joins only within this distance of the segment's seed; 0 = unbounded. Keeps large
    planes (floors, walls) in region-sized pieces like ScanNet's shipped segments."""
    min_segment_points: int = 30
    """Segments with fewer points are merged into their most similar adjacent segment."""
    merge_colour_scale: float = 100.0
    """Merging score = |cos(normal angle)| - colour distance / this (RGB units)."""
    colour_smoothing: bool = True
    """Denoise colours before the colour tests: average with the neighbours within the tangent
    band (max_plane_offset_m) whose colour is within max_colour_dist (see `smooth_colours`)."""

    def __post_init__(self) -> None:
        if self.k_neighbours < 3 or not 2 <= self.k_pfh <= min(22, self.k_neighbours):
            raise ValueError(f"overseg: need 3 <= k_neighbours and 2 <= k_pfh <= min(22, k_neighbours), got "
                             f"k_neighbours={self.k_neighbours} k_pfh={self.k_pfh}")
        if not 2 <= self.pfh_bins <= 12:
            raise ValueError(f"overseg: pfh_bins must be in 2..12, got {self.pfh_bins}")
        if not 0.0 < self.max_normal_angle_deg <= 180.0:
            raise ValueError(f"overseg: max_normal_angle_deg must be in (0, 180], got {self.max_normal_angle_deg}")
        for name in ("radius_m", "voxel_m", "range_scale", "voxel_radius_factor", "min_segment_area_m2", "max_plane_offset_m", "max_plane_slope_deg", "max_colour_dist", "max_colour_dist_segment",
                     "max_seed_curvature", "max_segment_radius_m", "min_pfh_affinity", "merge_colour_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"overseg: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_plane_slope_deg >= 90:
            raise ValueError(f"overseg: max_plane_slope_deg must be below 90, got {self.max_plane_slope_deg}")
        if self.merge_colour_scale == 0:
            raise ValueError("overseg: merge_colour_scale must be > 0")
        if self.min_segment_points < 1:
            raise ValueError(f"overseg: min_segment_points must be >= 1, got {self.min_segment_points}")
