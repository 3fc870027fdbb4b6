"""`ws3d view`: the pure core (colours, legend, cameras, ranking, subsampling), the page state on a
tiny store and run, the viser server on a free port, and a headless-browser screenshot."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline import schema
from pipeline.clip.model import model_identity
from pipeline.schema import IGNORE_INDEX
from pipeline.store import Store
from tests.conftest import TINY_CLASSES, _look_at, make_tiny_store, tiny_run_config
from ws3d_train.viewer import core
from ws3d_train.viewer.core import (
    BELOW_THRESHOLD_RGB,
    UNKNOWN_RGB,
    ViewerState,
    camera_views,
    class_colours,
    heatmap_colours,
    id_colours,
    point_size_m,
    rank_segments,
    rotation_to_wxyz,
    subsample_indices,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_ENV = "WS3D_VIEWER_SCREENSHOT"
"""Set to a file path to keep the headless-browser screenshot (the README's is made so)."""


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny store with a tiny CLIP recorded as its text model, and a fine-tuned run


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.conftest import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("viewer_clip"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_dir):
    path = make_tiny_store(tmp_path_factory.mktemp("viewer") / "store", n_scenes=2, n_points=1500, seed=3)
    s = Store.open(path)
    text, attrs = s.read_vocab("classes")
    s.write_vocab("classes", text, {**attrs, "model": model_identity(str(clip_dir))})  # as `ws3d embed` records it
    return path


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    from ws3d_train.train.finetune import FinetuneConfig, finetune

    out = tmp_path_factory.mktemp("viewer_run") / "run"
    finetune(tiny_run_config(FinetuneConfig, store, batch_size=1, steps=2, labels="all", ov_split="novel=cabinet"), out)
    return out


@pytest.fixture(scope="module")
def state(store, run):
    return ViewerState(store, run=core.RunModel(run, Store.open(store), device="cpu"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app(state):
    pytest.importorskip("viser")
    from ws3d_train.viewer.server import ViewerApp

    state.set_scene(state.scene_ids[0])
    state.set_mode("rgb")
    viewer = ViewerApp(state, host="127.0.0.1", port=free_port())
    yield viewer
    viewer.stop()


# ---------------------------------------------------------------------------------------------
# pure core


def test_class_colours_are_the_prediction_palette():
    from ws3d_train.infer.predict import class_palette

    labels = np.array([0, 4, IGNORE_INDEX, 2, 7, -1])
    rgb = class_colours(labels, 5)
    palette = class_palette(5)
    assert rgb.shape == (6, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[[0, 1, 3]], palette[[0, 4, 2]])
    for k in (2, 4, 5):  # ignored, out of range, negative
        np.testing.assert_array_equal(rgb[k], UNKNOWN_RGB)


def test_id_colours_fixed_per_id_and_distinct():
    ids = np.array([3, 5, 3, -1, 0, 1, 2, 4])
    rgb = id_colours(ids)
    np.testing.assert_array_equal(rgb[0], rgb[2])
    np.testing.assert_array_equal(rgb[3], UNKNOWN_RGB)
    assert len({tuple(c) for c in rgb[[0, 1, 4, 5, 6, 7]]}) == 6
    np.testing.assert_array_equal(id_colours(np.array([5])), rgb[[1]])  # same id, same colour in any scene


def test_heatmap_colours_threshold_greys_out_low_points():
    sim = np.array([-0.5, 0.0, 0.2, 0.9], np.float32)
    full = heatmap_colours(sim)
    assert full[0, 2] > full[0, 0] and full[3, 0] > full[3, 2]  # low blue, high red
    cut = heatmap_colours(sim, 0.1)
    np.testing.assert_array_equal(cut[:2], np.tile(BELOW_THRESHOLD_RGB, (2, 1)))
    np.testing.assert_array_equal(cut[2:], full[2:])


def test_subsample_indices():
    assert subsample_indices(100, 200) is None
    idx = subsample_indices(1000, 300, seed=1)
    assert idx.shape == (300,) and np.all(np.diff(idx) > 0) and idx.max() < 1000
    np.testing.assert_array_equal(idx, subsample_indices(1000, 300, seed=1))


def test_point_size_follows_spacing():
    grid = np.stack(np.meshgrid(np.arange(30), np.arange(30), [0.0]), -1).reshape(-1, 3) * 0.05
    assert point_size_m(grid) == pytest.approx(1.5 * 0.05, rel=1e-3)


def test_camera_frusta_from_store_poses():
    from scipy.spatial.transform import Rotation

    eye, target = np.array([3.0, -1.0, 1.5]), np.array([0.5, 0.5, 0.2])
    pose = _look_at(eye, target)[None]
    K = np.array([[[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]]], np.float32)
    (cam,) = camera_views(K, pose, (96, 128))
    np.testing.assert_allclose(cam.position, eye, atol=1e-5)
    assert cam.fov_y_rad == pytest.approx(2 * np.arctan(48 / 100.0))
    assert cam.aspect == pytest.approx(128 / 96)
    x, y, z, w = Rotation.from_quat([*cam.wxyz[1:], cam.wxyz[0]]).as_quat()  # scipy: x, y, z, w
    c2w = Rotation.from_quat([x, y, z, w]).as_matrix()
    np.testing.assert_allclose(c2w, pose[0, :3, :3].T, atol=1e-5)
    forward = c2w @ np.array([0, 0, 1.0])  # OpenCV +z looks at the target
    np.testing.assert_allclose(forward, (target - eye) / np.linalg.norm(target - eye), atol=1e-5)
    for seed in range(20):  # every branch of the quaternion extraction
        rot = Rotation.random(random_state=seed).as_matrix()
        np.testing.assert_allclose(Rotation.from_quat(np.roll(rotation_to_wxyz(rot), -1)).as_matrix(), rot, atol=1e-6)


def test_mesh_glb_round_trips_through_open3d(tmp_path):
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(0)
    vertices = rng.uniform(-1, 2, (50, 3)).astype(np.float32)
    faces = np.stack([np.arange(48), np.arange(1, 49), np.arange(2, 50)], axis=1).astype(np.int32)  # a strip
    colours = rng.integers(0, 256, (50, 3)).astype(np.uint8)
    path = tmp_path / "m.glb"
    path.write_bytes(core.mesh_glb(vertices, faces, colours))
    mesh = o3d.io.read_triangle_mesh(str(path), enable_post_processing=False)
    np.testing.assert_allclose(np.asarray(mesh.vertices), vertices, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mesh.triangles), faces)
    srgb = colours / 255.0  # stored linear (glTF), so the page shows the sRGB colours given
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(np.asarray(mesh.vertex_colors), linear, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the page state


def test_state_scene_arrays_and_class_mode(state, store):
    s = Store.open(store)
    scene_id = s.scene_ids()[0]
    state.set_scene(scene_id)
    n = s.shape(scene_id, schema.XYZ)[0]
    assert state.points.shape == (n, 3) and state.colours.shape == (n, 3) and state.display_index is None
    np.testing.assert_array_equal(state.colours, s.read(scene_id, schema.RGB))
    state.set_mode("gt class")
    np.testing.assert_array_equal(state.colours, class_colours(s.read(scene_id, schema.SEMANTIC), len(TINY_CLASSES)))
    names = [e.name for e in state.legend]
    assert "floor" in names and "wall" in names and "ignored" in names
    assert sum(e.points for e in state.legend) == n
    state.set_mode("predicted class")
    np.testing.assert_array_equal(state.colours, class_colours(state.prediction.pred_class, len(TINY_CLASSES)))
    state.set_mode("base/novel")
    novel = np.isin(state.prediction.pred_class, [TINY_CLASSES.index("cabinet")])
    np.testing.assert_array_equal(state.colours[novel], np.tile(core.NOVEL_RGB, (int(novel.sum()), 1)))
    np.testing.assert_array_equal(state.colours[~novel], np.tile(core.BASE_RGB, (int((~novel).sum()), 1)))
    for mode in ("gt instance", "segments", "boundaries", "predicted instance"):
        state.set_mode(mode)
        assert state.colours.shape == (n, 3) and state.legend
    state.set_mode("predicted boundaries")  # grey (p = 0) to red (p = 1), the probability of ws3d predict's PLY
    p = state.prediction.boundary
    assert p.shape == (n,) and ((p >= 0) & (p <= 1)).all()
    np.testing.assert_array_equal(state.colours, core.boundary_probability_colours(p))
    np.testing.assert_array_equal(state.colours[p == 0], np.tile(core.INTERIOR_RGB, (int((p == 0).sum()), 1)))
    np.testing.assert_array_equal(core.boundary_probability_colours(np.ones(1)), core.BOUNDARY_RGB[None])
    assert sum(e.points for e in state.legend) == n
    with pytest.raises(ValueError, match="not available"):
        state.set_mode("query")  # no query made yet
    assert len(state.scene.cameras) == 6


def test_state_subsamples_above_the_budget(store):
    s = Store.open(store)
    scene_id = s.scene_ids()[1]
    small = ViewerState(s, scene_id, point_budget=500)
    n = s.shape(scene_id, schema.XYZ)[0]
    assert small.points.shape == (500, 3) and small.colours.shape == (500, 3)
    np.testing.assert_array_equal(small.points, s.read(scene_id, schema.XYZ)[small.display_index])
    assert "showing 500 of" in small.notice and f"{n:,}" in small.notice
    small.set_mode("gt class")
    np.testing.assert_array_equal(small.colours, small.colours_full[small.display_index])


def test_state_on_an_ingest_only_scene(tmp_path):
    from tests.conftest import make_tiny_scene

    rng = np.random.default_rng(0)
    arrays = make_tiny_scene(400, rng, rng.standard_normal((len(TINY_CLASSES), 8)))
    s = Store.create(tmp_path / "store", dataset="synthetic", class_names=TINY_CLASSES)
    s.write_stage("scene_a", "ingest", arrays["ingest"], {"config": {}, "config_hash": "a", "stats": {}})
    only = ViewerState(tmp_path / "store")
    assert only.available_modes() == ["rgb", "gt class", "gt instance"]
    assert only.scene.cameras == [] and only.scene.segment is None and only.prediction is None
    with pytest.raises(core.ViewerError, match="--run"):
        only.query("a chair")
    with pytest.raises(core.ViewerError, match="no scene 'nope'"):
        only.set_scene("nope")
    assert only.scene.scene_id == "scene_a" and only.points.shape == (only.scene.num_points, 3)  # unchanged


def test_the_viewer_opens_a_store_on_s3(s3_store_url, tmp_path):
    make_tiny_store(s3_store_url, n_scenes=2, n_points=400)
    make_tiny_store(tmp_path / "copy", n_scenes=2, n_points=400)  # the same scenes in a folder
    remote, local = ViewerState(s3_store_url, "scene0001_00"), ViewerState(tmp_path / "copy", "scene0001_00")
    np.testing.assert_array_equal(remote.points, local.points)
    np.testing.assert_array_equal(remote.colours, local.colours)
    assert len(remote.scene.cameras) == len(local.scene.cameras) > 0
    np.testing.assert_array_equal(core.view_image(remote.store, "scene0001_00", 0),
                                  core.view_image(local.store, "scene0001_00", 0))


def test_query_matches_ws3d_query(state, store, run):
    from ws3d_train.infer.predict import query_scene

    scene_id = state.scene_ids[0]
    state.set_scene(scene_id)
    before = state.colours.copy()
    matches = state.query("a chair")
    assert state.mode == "query" and not np.array_equal(before, state.colours)
    reference = query_scene(run, store, scene_id, "a chair", device="cpu")
    np.testing.assert_allclose(state.similarity, reference.similarity, atol=1e-5)
    assert [m.segment for m in matches] == [m.segment for m in reference.segments]
    np.testing.assert_allclose([m.score for m in matches], [m.score for m in reference.segments], atol=1e-5)
    lo, hi = state.similarity_range()
    state.set_threshold((lo + hi) / 2)
    grey = state.similarity < (lo + hi) / 2
    assert 0 < grey.sum() < grey.size
    np.testing.assert_array_equal(state.colours[grey], np.tile(BELOW_THRESHOLD_RGB, (int(grey.sum()), 1)))
    assert state.legend[-1].name.startswith("below") and state.legend[-1].points == int(grey.sum())
    ranked = rank_segments(state.similarity, state.scene.segment, state.scene.xyz, top_k=3)
    assert [m.segment for m in ranked] == [m.segment for m in reference.segments[:3]]


# ---------------------------------------------------------------------------------------------
# the server


def test_server_serves_the_page_and_widgets_drive_the_scene(app, state):
    body = urllib.request.urlopen(f"http://127.0.0.1:{app.port}/", timeout=10).read()
    assert b"<html" in body.lower()
    n = state.scene.num_points
    assert np.asarray(app.cloud.points).shape == (n, 3)
    np.testing.assert_array_equal(app.cloud.colors, state.scene.rgb)
    assert len(app.frusta) == 6
    assert not any(f.visible for f in app.frusta)  # off until asked: frusta hide the scene
    app.gui_show_frusta.value = True
    assert all(f.visible for f in app.frusta)
    app.gui_show_frusta.value = False
    lo, hi = state.scene.xyz.min(axis=0), state.scene.xyz.max(axis=0)
    np.testing.assert_allclose(app.server.initial_camera.look_at, (lo + hi) / 2, atol=1e-4)  # framed

    app.gui_mode.value = "gt class"  # viser runs the callback synchronously
    np.testing.assert_array_equal(app.cloud.colors, class_colours(state.scene.semantic, len(TINY_CLASSES)))
    assert "floor" in app.gui_legend.content

    before = np.array(app.cloud.colors)
    app.gui_query.value = "a table"
    assert state.mode == "query" and app.gui_mode.value == "query"
    assert not np.array_equal(before, app.cloud.colors)
    assert "Best segments" in app.gui_matches.content and not app.gui_threshold.disabled
    assert len(app.match_labels) == len(state.matches) > 0  # rank labels at the best segments
    np.testing.assert_allclose(app.match_labels[0].position, state.matches[0].centroid, atol=1e-4)
    heat = np.array(app.cloud.colors)
    app.gui_threshold.value = float(np.median(state.similarity))
    assert not np.array_equal(heat, app.cloud.colors)

    app.select_view(2)
    assert app.gui_image.visible and app.gui_image.label.startswith("view 2")

    encoder, state.run._encoder, state.run.model_dir = state.run._encoder, None, "/nonexistent/clip"
    try:  # a model that cannot be loaded offline: the page says so, the server goes on
        app.gui_query.value = "a lamp"
        assert "/nonexistent/clip" in app.gui_notice.content and state.query_text == "a table"
    finally:
        state.run._encoder, state.run.model_dir = encoder, None

    other = state.scene_ids[1]
    app.gui_scene.value = other
    assert state.scene.scene_id == other and state.mode == "rgb"  # the query belonged to the last scene
    assert not app.match_labels  # a new scene has no query yet
    assert np.asarray(app.cloud.points).shape == (state.scene.num_points, 3)


def test_cli_view_reports_user_mistakes(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app as cli_app

    runner = CliRunner()
    result = runner.invoke(cli_app, ["view", "--store", str(store), "--scene", "nope"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(cli_app, ["view", "--store", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a ws3d store" in result.output
    result = runner.invoke(cli_app, ["view", "--store", str(store), "--run", str(tmp_path / "norun")])
    assert result.exit_code == 2 and "norun" in result.output
    result = runner.invoke(cli_app, ["view", "--input", str(tmp_path / "no_scan.ply")])
    assert result.exit_code == 2 and "no_scan.ply" in result.output
    result = runner.invoke(cli_app, ["view", "--input", str(tmp_path), "--store", str(store)])
    assert result.exit_code == 2 and "one of them" in result.output
    monkeypatch.setitem(__import__("sys").modules, "viser", None)  # import viser -> ImportError
    result = runner.invoke(cli_app, ["view", "--store", str(store)])
    assert result.exit_code == 2 and "pip install viser" in result.output


@pytest.mark.parametrize("extent", [(6.0, 5.0, 3.0), (80.0, 60.0, 6.0), (0.5, 0.3, 1.8)])
def test_frame_camera_fills_the_view_with_the_whole_scene(extent):
    """The opening camera sees every corner of the scene's box, and the box is not small in the
    frame: its bounding sphere spans the narrower field of view up to the margin."""
    rng = np.random.default_rng(0)
    xyz = (rng.random((500, 3)) * extent - 7.0).astype(np.float32)
    fov, aspect = 1.3, 1.5
    position, look_at = core.frame_camera(xyz, fov_y_rad=fov, aspect=aspect)
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    np.testing.assert_allclose(look_at, (lo + hi) / 2, atol=1e-5)
    forward = (look_at - position) / np.linalg.norm(look_at - position)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    rays = corners - position
    angles = np.arccos(np.clip(rays @ forward / np.linalg.norm(rays, axis=1), -1, 1))
    assert angles.max() < fov / 2  # every corner inside the vertical field of view
    radius = np.linalg.norm(hi - lo) / 2
    assert np.arcsin(radius / np.linalg.norm(look_at - position)) > 0.9 * fov / 2  # and the scene fills it


def test_state_on_scan_files_without_a_store(store, run, tmp_path):
    """`ws3d view --input FILE --run R`: the scan read from its file, predictions and over-segments
    computed on the fly, queries answered; no store."""
    from plyfile import PlyData, PlyElement

    s = Store.open(store)
    scene = s.scene_ids()[0]
    xyz, rgb = s.read(scene, schema.XYZ), s.read(scene, schema.RGB)
    vertex = np.empty(len(xyz), [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "my scan.ply"))
    scans = core.ScanFiles(tmp_path / "my scan.ply")
    st = ViewerState(scans, run=core.RunModel(run, scans, device="cpu"))
    assert st.scene_ids == ["my_scan"] and st.scene.num_points == len(xyz)
    assert {"rgb", "segments", "predicted class", "predicted instance", "base/novel"} <= set(st.available_modes())
    from ws3d_train.infer.predict import predict_scene

    np.testing.assert_array_equal(st.prediction.pred_class, predict_scene(run, store, scene, device="cpu").pred_class)
    st.query("a table")
    assert st.mode == "query" and st.similarity.shape == (len(xyz),) and st.matches
    with pytest.raises(core.ViewerError, match="nope"):
        core.ScanFiles(tmp_path / "nope.ply")


# ---------------------------------------------------------------------------------------------
# a real browser


def browser_screenshots(url: str, profile: Path, *, size: tuple[int, int] = (1280, 800), every_s: float = 2.0,
                        timeout_s: float = 90.0, done=lambda png: False):
    """Open ``url`` in headless Chromium (software WebGL, no network, no GPU) and return PNG bytes
    of the page every ``every_s`` seconds of real time until ``done(png)`` or ``timeout_s``.

    Real time, through the DevTools protocol, rather than ``--screenshot``: the page builds itself
    from websocket messages and fades in, which ``--virtual-time-budget`` does not wait for."""
    import base64
    import json

    from websockets.sync.client import connect

    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, start = profile / "DevToolsActivePort", time.monotonic()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() - start > 30 or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        target = next(p for p in pages if p.get("type") == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params):
                key = next(ids)
                ws.send(json.dumps({"id": key, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=30))
                    if msg.get("id") == key:
                        return msg.get("result", {})

            call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            start, png = time.monotonic(), b""
            while time.monotonic() - start < timeout_s:
                time.sleep(every_s)
                png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
                if done(png):
                    break
            return png
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def palette_pixels(path: Path, colours: np.ndarray, tol: int = 40) -> int:
    """Pixels of the 3D view (left of the control panel) within ``tol`` of one of ``colours``."""
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"), np.int16)[:, :900]
    near = np.zeros(img.shape[:2], bool)
    for c in colours:
        near |= np.abs(img - np.asarray(c, np.int16)).max(axis=2) <= tol
    return int(near.sum())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package `chromium`)")
def test_headless_browser_shows_the_scene(app, state, tmp_path):
    from ws3d_train.infer.predict import class_palette

    app.gui_mode.value = "gt class"
    present = np.unique(state.scene.semantic[state.scene.semantic >= 0])
    colours = class_palette(len(TINY_CLASSES))[present]
    shot = tmp_path / "viewer.png"

    def done(png: bytes) -> bool:  # the scene has faded in: the class colours cover a good area
        shot.write_bytes(png)
        return palette_pixels(shot, colours, tol=12) > 5000

    browser_screenshots(f"http://127.0.0.1:{app.port}/", tmp_path / "profile", done=done, timeout_s=60)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (800, 1280) and img.reshape(-1, 3).std(axis=0).max() > 10  # not blank
    assert palette_pixels(shot, colours, tol=12) > 5000  # the scene's class colours are on screen
    if os.environ.get(SCREENSHOT_ENV):
        target = Path(os.environ[SCREENSHOT_ENV])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package `chromium`)")
def test_headless_browser_on_a_synthesised_room(tmp_path):
    """The README's screenshot: a synthesised room through ingest/overseg/render/embed (a tiny
    CLIP), a one-step run, ground-truth classes on the mesh with vertex colours, a view's image."""
    pytest.importorskip("viser")
    from pipeline.executor import ExecutorConfig
    from pipeline.embed.config import EmbedConfig
    from pipeline.workflow import WorkflowConfig, run_workflow
    from tests.synthdata import small_raw
    from tests.conftest import make_tiny_clip
    from ws3d_train.train.finetune import FinetuneConfig, finetune
    from ws3d_train.infer.predict import class_palette
    from ws3d_train.viewer.server import serve

    raw = small_raw(tmp_path / "raw", n=1, seed=2)
    clip = make_tiny_clip(tmp_path / "clip")
    store = tmp_path / "store.zarr"
    run_workflow(WorkflowConfig(dataset="synthetic", raw=str(raw), store=str(store), executor=ExecutorConfig(kind="sync"),
                                stages=("ingest", "overseg", "render", "embed"), embed=EmbedConfig(model=str(clip))),
                 echo=lambda _: None)
    run = tmp_path / "run"
    finetune(tiny_run_config(FinetuneConfig, store, batch_size=1, steps=1, labels="all", ov_split="b15n4"), run)

    app = serve(store, run=run, port=free_port(), device="cpu")
    try:
        assert app.has_mesh and app.mesh is not None and not app.cloud.visible
        app.gui_mode.value = "gt class"
        app.select_view(1)
        semantic = app.state.scene.semantic
        colours = class_palette(len(app.state.scene.class_names))[np.unique(semantic[semantic >= 0])]
        shot = tmp_path / "viewer.png"

        def done(png: bytes) -> bool:
            shot.write_bytes(png)
            return palette_pixels(shot, colours, tol=40) > 20000

        browser_screenshots(f"http://127.0.0.1:{app.port}/", tmp_path / "profile", done=done, timeout_s=90, every_s=3)
        assert palette_pixels(shot, colours, tol=40) > 20000  # the room's class colours on the mesh
    finally:
        app.stop()
    if os.environ.get(SCREENSHOT_ENV):
        target = Path(os.environ[SCREENSHOT_ENV])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
