"""The viser layer of `ws3d view`: widgets bound to a :class:`ws3d_train.viewer.core.ViewerState`.

Reads nothing itself (the state reads the store and the run); serves the page on ``host:port``
(127.0.0.1 by default: reach a remote machine through an SSH tunnel, see the README). All that
is computed here is which arrays go to which viser handle.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

from ws3d_train.viewer.core import (
    DEFAULT_POINT_BUDGET,
    RunModel,
    ViewerState,
    ScanFiles,
    check_scene,
    frame_camera,
    legend_markdown,
    mesh_glb,
    point_size_m,
    view_image,
)

__all__ = ["ViewerApp", "ViserMissing", "import_viser"]


class ViserMissing(UserError, ImportError):
    """viser is not installed (an optional dependency of the viewer)."""


def import_viser() -> Any:
    """``import viser`` or raise :class:`ViserMissing` saying how to install it."""
    try:
        import viser
    except ImportError as exc:
        raise ViserMissing(
            f"the viewer needs viser ({exc}); install it with `pip install viser` "
            "or `pip install -e '.[dev]'`"
        ) from exc
    return viser


class ViewerApp:
    """One viser server showing one :class:`ViewerState` (every browser tab sees the same).

    Widgets (``gui_*``) call the state's setters and :meth:`refresh` copies the result into the
    scene; tests set widget values from Python (viser runs their callbacks synchronously).
    """

    def __init__(self, state: ViewerState, *, host: str = "127.0.0.1", port: int = 8080, verbose: bool = False):
        viser = import_viser()
        self.state = state
        self.server = viser.ViserServer(host=host, port=port, verbose=verbose)
        self.server.scene.set_up_direction("+z")
        self._lock = threading.RLock()
        self._updating = False
        self.cloud: Any = None
        self.mesh: Any = None
        self.frusta: list[Any] = []
        self.match_labels: list[Any] = []
        self._build_gui()
        self.show_scene()

    # -- page --------------------------------------------------------------------------------
    def _build_gui(self) -> None:
        gui, st = self.server.gui, self.state
        self.gui_notice = gui.add_markdown("")
        self.gui_scene = gui.add_dropdown("Scene", st.scene_ids, initial_value=st.scene.scene_id)
        self.gui_mode = gui.add_dropdown("Colour", st.available_modes(), initial_value=st.mode)
        self.gui_draw = gui.add_dropdown("Draw", ("points",), initial_value="points",
                                         hint="mesh: the scan's triangles with vertex colours (where it has them)")
        self.gui_point_size = gui.add_slider("Point size", min=0.002, max=0.2, step=0.001, initial_value=0.02)
        self.gui_legend = gui.add_html("")
        with gui.add_folder("Query", visible=st.run is not None) as self.gui_query_folder:
            self.gui_query = gui.add_text("Text", initial_value="", hint="Free text; Enter runs the query")
            self.gui_query_button = gui.add_button("Search")
            self.gui_threshold = gui.add_slider("Threshold", min=-1.0, max=1.0, step=0.001, initial_value=-1.0,
                                                disabled=True)
            self.gui_matches = gui.add_markdown("")
        with gui.add_folder("Views", visible=bool(st.scene.cameras)) as self.gui_views_folder:
            # off until asked: dozens of frusta hide the scene they look at
            self.gui_show_frusta = gui.add_checkbox("Show cameras", initial_value=False)
            self.gui_view = gui.add_slider("View", min=0, max=max(len(st.scene.cameras) - 1, 1), step=1,
                                           initial_value=0)
            self.gui_image = gui.add_image(np.zeros((8, 8, 3), np.uint8), label="view", visible=False)

        self.gui_scene.on_update(lambda _: self._guarded(self.state.set_scene, self.gui_scene.value, rebuild=True))
        self.gui_mode.on_update(lambda _: self._guarded(self.state.set_mode, self.gui_mode.value))
        self.gui_point_size.on_update(lambda _: self._set_point_size(self.gui_point_size.value))
        self.gui_draw.on_update(lambda _: self._set_draw(self.gui_draw.value))
        self.gui_query.on_update(lambda _: self.run_query(self.gui_query.value))
        self.gui_query_button.on_click(lambda _: self.run_query(self.gui_query.value))
        self.gui_threshold.on_update(lambda _: self._guarded(self.state.set_threshold, self.gui_threshold.value))
        self.gui_show_frusta.on_update(lambda _: self._show_frusta(self.gui_show_frusta.value))
        self.gui_view.on_update(lambda _: self.select_view(int(self.gui_view.value)))

    def _guarded(self, setter: Any, value: Any, *, rebuild: bool = False) -> None:
        """Run a state setter from a widget (not while :meth:`refresh` is writing widgets)."""
        if self._updating:
            return
        with self._lock:
            if rebuild:  # loading a scene (and predicting on it) takes a while: say so
                self.gui_notice.content = f"loading {value} ..."
            try:
                setter(value)
            except (UserError, ValueError) as exc:  # a choice that does not apply: say so on the page
                self.gui_notice.content = f"**{exc}**"
                self._updating = True
                try:  # the widgets go back to what is shown
                    self.gui_scene.value, self.gui_mode.value = self.state.scene.scene_id, self.state.mode
                finally:
                    self._updating = False
                return
            self.show_scene() if rebuild else self.refresh()

    # -- scene -------------------------------------------------------------------------------
    def show_scene(self) -> None:
        """(Re)create the point cloud, mesh and frusta of the state's scene."""
        with self._lock:
            st, scene = self.state, self.state.scene
            for handle in [self.cloud, self.mesh, *self.frusta]:
                if handle is not None:
                    handle.remove()
            size = point_size_m(st.points)
            self.cloud = self.server.scene.add_point_cloud(
                "/scene/points", points=st.points.astype(np.float32), colors=st.colours,
                point_size=size, point_shape="circle", precision="float32",
            )
            # a mesh scan is drawn as its triangles with vertex colours (a GLB: viser's simple
            # meshes take one colour), unless subsampled (the faces need every vertex)
            self.mesh = None
            has_mesh = self.has_mesh
            if has_mesh:
                self.mesh = self.server.scene.add_glb("/scene/mesh", mesh_glb(scene.xyz, scene.faces, st.colours))
            self.frusta = []
            scale = 0.08 * float(np.max(scene.xyz.max(axis=0) - scene.xyz.min(axis=0))) if scene.num_points else 0.3
            for cam in scene.cameras:
                frustum = self.server.scene.add_camera_frustum(
                    f"/views/{cam.index}", fov=cam.fov_y_rad, aspect=cam.aspect, scale=scale, thickness=scale * 0.02,
                    wxyz=cam.wxyz, position=cam.position, color=(30, 30, 30), visible=self.gui_show_frusta.value,
                )
                frustum.on_click(lambda event, v=cam.index: self.select_view(v))
                self.frusta.append(frustum)
            if scene.num_points:
                fov = float(getattr(self.server.initial_camera, "fov", 1.3) or 1.3)
                position, look_at = frame_camera(scene.xyz, fov_y_rad=fov)
                self.server.initial_camera.look_at = tuple(float(v) for v in look_at)
                self.server.initial_camera.position = tuple(float(v) for v in position)
                for client in self.server.get_clients().values():  # pages already open follow the new scene
                    client.camera.look_at, client.camera.position = look_at, position
            self._updating = True
            try:
                self.gui_draw.options = ("mesh", "points") if has_mesh else ("points",)
                self.gui_draw.value = "mesh" if has_mesh else "points"
                self.cloud.visible = not has_mesh
                self.gui_point_size.value = size
                self.gui_views_folder.visible = bool(scene.cameras)
                self.gui_view.max = max(len(scene.cameras) - 1, 1)
                self.gui_view.value = 0
                self.gui_image.visible = False
            finally:
                self._updating = False
            self.refresh()

    def refresh(self) -> None:
        """Copy the state's colours, legend, notice, modes and query results into the page."""
        with self._lock:
            st = self.state
            self.cloud.colors = st.colours
            if self.mesh is not None:
                self.mesh.glb_data = mesh_glb(st.scene.xyz, st.scene.faces, st.colours)
            self._updating = True
            try:
                self.gui_mode.options = tuple(st.available_modes())
                self.gui_mode.value = st.mode
                self.gui_scene.value = st.scene.scene_id
                lo, hi = st.similarity_range()
                self.gui_threshold.disabled = st.similarity is None
                if st.similarity is not None:
                    self.gui_threshold.min, self.gui_threshold.max = round(lo, 3) - 0.001, round(hi, 3) + 0.001
                    if st.threshold is None:
                        self.gui_threshold.value = self.gui_threshold.min
            finally:
                self._updating = False
            mesh_note = ""
            if st.scene.faces is not None and st.display_index is not None:
                mesh_note = " (the mesh is not drawn when subsampled)"
            self.gui_notice.content = st.notice + mesh_note + f" · colour **{st.mode}**"
            self.gui_legend.content = legend_markdown(st.legend)
            self.gui_matches.content = self._matches_markdown()
            self._show_match_labels()

    def _show_match_labels(self) -> None:
        """Rank labels ("#1 0.31") at the centroids of the best segments of the current query."""
        for label in self.match_labels:
            label.remove()
        self.match_labels = []
        if self.state.mode != "query":
            return
        for rank, match in enumerate(self.state.matches, 1):
            self.match_labels.append(self.server.scene.add_label(
                f"/query/{rank}", f"#{rank} {match.score:.2f}", position=np.asarray(match.centroid, np.float32),
            ))

    def _matches_markdown(self) -> str:
        st = self.state
        if st.similarity is None:
            return ""
        lines = [f'Best segments for "{st.query_text}":', "", "| # | segment | score | points |", "|---|---|---|---|"]
        lines += [f"| {k} | {m.segment} | {m.score:.3f} | {m.points} |" for k, m in enumerate(st.matches, 1)]
        return "\n".join(lines)

    def run_query(self, text: str) -> None:
        """The query box's callback: heatmap of ``text`` and its best segments."""
        if self._updating or not text.strip() or self.state.run is None:
            return
        with self._lock:
            try:
                self.state.query(text)
            except (UserError, ValueError) as exc:  # e.g. the CLIP model is not there offline
                self.gui_notice.content = f"**{exc}**"
                return
            self.refresh()

    @property
    def has_mesh(self) -> bool:
        """The scene has faces and every vertex is drawn."""
        faces = self.state.scene.faces
        return faces is not None and len(faces) > 0 and self.state.display_index is None

    def _set_draw(self, what: str) -> None:
        if self._updating:
            return
        if self.mesh is not None:
            self.mesh.visible = what == "mesh"
        self.cloud.visible = what != "mesh" or self.mesh is None

    def _set_point_size(self, size: float) -> None:
        if not self._updating and self.cloud is not None:
            self.cloud.point_size = float(size)

    # -- views -------------------------------------------------------------------------------
    def _show_frusta(self, visible: bool) -> None:
        for frustum in self.frusta:
            frustum.visible = bool(visible)

    def select_view(self, index: int) -> None:
        """Show view ``index``'s rendered image beside the scene and highlight its frustum."""
        if self._updating:
            return
        with self._lock:
            st = self.state
            if not 0 <= index < len(st.scene.cameras):
                return
            image = view_image(st.store, st.scene.scene_id, index)
            for k, frustum in enumerate(self.frusta):
                frustum.color = (230, 120, 20) if k == index else (30, 30, 30)
            if image is not None:
                self.gui_image.image = image
                self.gui_image.label = f"view {index} ({image.shape[1]}x{image.shape[0]})"
                self.gui_image.visible = True
            if int(self.gui_view.value) != index:
                self.gui_view.value = index

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self.server.get_port())

    def stop(self) -> None:
        self.server.stop()


def serve(
    store: str | Path | None,
    scene_id: str | None = None,
    *,
    run: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    point_budget: int = DEFAULT_POINT_BUDGET,
    device: str = "auto",
    model_dir: str | None = None,
    scans: str | Path | None = None,
    reader: Any = None,
) -> ViewerApp:
    """Build the state and start the server (returns at once; the server runs in threads).
    ``scans`` (a scan file or a folder of them, read with ``reader``) replaces the store."""
    import_viser()  # fail before loading a run when viser is missing
    from pipeline.store import Store

    if (store is None) == (scans is None):
        raise UserError("ws3d view: give a store (--store) or scan files (--input), one of them")
    st = ScanFiles(scans, reader) if scans is not None else Store.open(store)
    if scene_id is not None:
        check_scene(st, scene_id)  # before the (slow) run loading
    run_model = RunModel(run, st, device=device, model_dir=model_dir) if run is not None else None
    state = ViewerState(st, scene_id, run=run_model, point_budget=point_budget)
    return ViewerApp(state, host=host, port=port)
