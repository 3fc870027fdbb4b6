"""Rendering: 2D views of each scan with the exact point every pixel shows. `config` (RenderConfig),
`cameras` (pinhole math, the camera choice), `raycast` (meshes), `splat` (point clouds), `visibility`
(exact occlusion tests, visibility lists), `core` (the pure `render_scene`), `stage` (the store
runner), `export` (PNGs of stored views)."""
