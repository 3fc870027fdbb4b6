"""`ws3d view`: an interactive web page (viser) of a store's scenes, a run's predictions and
open-vocabulary queries. :mod:`.core` computes what is shown (no server, no viser import);
:mod:`.server` binds it to viser widgets."""
from ws3d_train.viewer.core import (
    DEFAULT_POINT_BUDGET,
    MODES,
    CameraView,
    LegendEntry,
    RunModel,
    RunScene,
    SceneData,
    ViewerState,
    base_novel_colours,
    boundary_colours,
    camera_views,
    class_colours,
    class_legend,
    heatmap_colours,
    id_colours,
    legend_markdown,
    load_scene,
    mesh_glb,
    point_size_m,
    rank_segments,
    rotation_to_wxyz,
    subsample_indices,
    view_image,
)

__all__ = [
    "DEFAULT_POINT_BUDGET", "MODES", "CameraView", "LegendEntry", "RunModel", "RunScene", "SceneData",
    "ViewerState", "base_novel_colours", "boundary_colours", "camera_views", "class_colours", "class_legend",
    "heatmap_colours", "id_colours", "legend_markdown", "load_scene", "mesh_glb", "point_size_m", "rank_segments", "rotation_to_wxyz",
    "subsample_indices", "view_image",
]
