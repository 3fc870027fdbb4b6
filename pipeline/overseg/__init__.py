"""Over-segmentation: over-segments that follow the surface (normals, curvature, PFH, region
growing, merging), their boundaries and the segment graph. `config` (thresholds), `features` and
`regions` (numba kernels), `core` (the pure function `overseg_points`), `stage` (the store runner),
`neighbours` (kNN), `scan_stats` (mesh statistics and a Segmentator-style reference)."""
