"""ws3d's offline stages: readers, over-segmentation, rendering, CLIP embedding, the store, the executor."""
import numba as _numba

# Open3D bundles its own TBB, which numba refuses (with a warning at every parallel call);
# prefer OpenMP, which numba always has, so the warning never fires.
_numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
