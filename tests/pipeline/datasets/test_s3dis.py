"""S3DIS reader: the real sample room, damaged lines, class names, the parser against a slow oracle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import s3dis
from pipeline.errors import SceneError
from pipeline.schema import check_scene_id
from tests.paths import SHARED_DATA

SHARED = SHARED_DATA
S3DIS_SAMPLE = SHARED / "s3dis"
needs_sample = pytest.mark.skipif(
    not (S3DIS_SAMPLE / "Area_1" / "office_2").is_dir(),
    reason=f"real S3DIS sample not found at {S3DIS_SAMPLE} (../shared/data is absent on this machine)",
)
_FMT = "%.3f %.3f %.3f %d %d %d"


def _write_room(raw: Path, area: str, room: str, files: dict[str, np.ndarray], room_file: bool = True) -> Path:
    ann = raw / area / room / "Annotations"
    ann.mkdir(parents=True)
    for name, values in files.items():
        np.savetxt(ann / name, values, fmt=_FMT)
    if room_file:
        np.savetxt(raw / area / room / f"{room}.txt", np.concatenate(list(files.values())), fmt=_FMT)
    return ann


def _points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0, 5, (n, 3)).round(3), rng.integers(0, 256, (n, 3))], axis=1)


@needs_sample
def test_real_sample_room():
    scene = s3dis.read_scene(S3DIS_SAMPLE, "Area_1_office_2")
    scene.validate()
    assert len(scene.xyz) == 100
    assert len(np.unique(scene.semantic)) == 12
    assert s3dis.CLASS_NAMES[11] == "board" and 11 not in scene.semantic  # the one class absent
    assert len(np.unique(scene.instance)) == 19
    assert scene.kind == "points" and scene.warnings == []
    assert scene.xyz.dtype == np.float32 and scene.rgb.dtype == np.uint8
    assert scene.semantic.dtype == np.int16 and scene.instance.dtype == np.int32
    # The annotations hold exactly the room file's points (as a multiset of rows).
    room = np.loadtxt(S3DIS_SAMPLE / "Area_1" / "office_2" / "office_2.txt")
    ours = np.concatenate([scene.xyz.astype(np.float64), scene.rgb], axis=1)
    np.testing.assert_allclose(np.unique(ours.round(3), axis=0), np.unique(room, axis=0), atol=1e-6)
    # Every instance holds one class, taken from its file name.
    table = np.loadtxt(S3DIS_SAMPLE / "Area_1" / "office_2" / "Annotations" / "table_2.txt")
    rows = np.flatnonzero(np.isin(scene.xyz[:, 0], table[:, 0].astype(np.float32)))
    assert set(scene.semantic[rows]) == {s3dis.CLASS_NAMES.index("table")}
    assert s3dis.list_scenes(S3DIS_SAMPLE) == ["Area_1_office_2"]


def test_scene_ids_are_plain_names():
    assert s3dis.scene_id_of("Area_5", "hallway_6") == "Area_5_hallway_6"
    assert s3dis.split_scene_id("Area_5_hallway_6") == ("Area_5", "hallway_6")
    assert check_scene_id(s3dis.scene_id_of("Area_6", "copyRoom_1"))
    with pytest.raises(SceneError, match="Area_<k>_<room>"):
        s3dis.split_scene_id("office_2")


def test_semantics_instances_and_natural_order(tmp_path):
    files = {
        "chair_1.txt": _points(5, 0),
        "clutter_10.txt": _points(3, 1),
        "clutter_2.txt": _points(4, 2),
        "stairs_1.txt": _points(2, 3),
        "wall_1.txt": _points(6, 4),
    }
    _write_room(tmp_path, "Area_2", "office_7", files)
    scene = s3dis.read_scene(tmp_path, "Area_2_office_7")
    names = [s3dis.CLASS_NAMES[c] for c in scene.semantic]
    # natural order: chair_1, clutter_2, clutter_10, stairs_1, wall_1; stairs -> clutter
    expected = ["chair"] * 5 + ["clutter"] * 4 + ["clutter"] * 3 + ["clutter"] * 2 + ["wall"] * 6
    assert names == expected
    assert scene.instance.tolist() == [0] * 5 + [1] * 4 + [2] * 3 + [3] * 2 + [4] * 6
    np.testing.assert_allclose(scene.xyz[5:9], files["clutter_2.txt"][:, :3], atol=1e-5)
    assert scene.rgb[5:9].tolist() == files["clutter_2.txt"][:, 3:].astype(int).tolist()
    assert scene.warnings == []
    assert s3dis.list_scenes(tmp_path) == ["Area_2_office_7"]


def test_damaged_line_is_skipped_and_reported(tmp_path):
    ann = _write_room(tmp_path, "Area_5", "hallway_6", {"ceiling_1.txt": _points(6, 0), "floor_1.txt": _points(4, 1)})
    lines = (ann / "ceiling_1.txt").read_bytes().splitlines(keepends=True)
    lines[2] = b"1.000 2.000 3.0\x100 10 20 30\n"  # the release's kind of stray byte, on line 3
    (ann / "ceiling_1.txt").write_bytes(b"".join(lines))
    scene = s3dis.read_scene(tmp_path, "Area_5_hallway_6")
    assert len(scene.xyz) == 9
    assert len(scene.warnings) == 1
    assert "Area_5/hallway_6/Annotations/ceiling_1.txt" in scene.warnings[0]
    assert "line 3" in scene.warnings[0] and "skipped 1" in scene.warnings[0]
    # the room file (with 10 lines) agrees once the skipped line is counted: no count warning
    kept = np.delete(_points(6, 0), 2, axis=0)
    np.testing.assert_allclose(scene.xyz[:5], kept[:, :3], atol=1e-5)


def test_too_many_damaged_lines_is_an_error(tmp_path):
    ann = _write_room(tmp_path, "Area_1", "office_1", {"wall_1.txt": _points(5, 0)})
    (ann / "wall_1.txt").write_text("a b c d e f\n" * 4 + "1 2 3 4 5 6\n")
    with pytest.raises(SceneError, match="max_skipped_lines"):
        s3dis.read_scene(tmp_path, "Area_1_office_1", cfg=s3dis.S3DISReaderConfig(max_skipped_lines=3))


def test_unknown_class_names_the_file(tmp_path):
    _write_room(tmp_path, "Area_1", "office_1", {"wall_1.txt": _points(3, 0), "piano_1.txt": _points(2, 1)})
    with pytest.raises(SceneError, match="unknown class 'piano'") as info:
        s3dis.read_scene(tmp_path, "Area_1_office_1")
    assert info.value.file.endswith("piano_1.txt") and info.value.scene_id == "Area_1_office_1"


def test_missing_annotations_and_bad_file_names(tmp_path):
    with pytest.raises(SceneError, match="no Annotations folder"):
        s3dis.read_scene(tmp_path, "Area_1_office_1")
    ann = _write_room(tmp_path, "Area_1", "office_1", {"wall_1.txt": _points(3, 0)})
    (ann / "notes.txt").write_text("1 2 3 4 5 6\n")
    with pytest.raises(SceneError, match="<class>_<i>.txt"):
        s3dis.read_scene(tmp_path, "Area_1_office_1")


def test_room_file_count_mismatch_warns(tmp_path):
    _write_room(tmp_path, "Area_3", "lounge_1", {"sofa_1.txt": _points(4, 0)}, room_file=False)
    np.savetxt(tmp_path / "Area_3" / "lounge_1" / "lounge_1.txt", _points(7, 0), fmt=_FMT)
    scene = s3dis.read_scene(tmp_path, "Area_3_lounge_1")
    assert len(scene.xyz) == 4
    assert any("7 lines" in w and "4 points" in w for w in scene.warnings)
    # the 3 points in no Annotations file are dropped, and said so as a suspect warning (`ws3d validate` flags it)
    from pipeline.errors import is_suspect

    (dropped,) = [w for w in scene.warnings if w.startswith("[unannotated]")]
    assert "3 unannotated point(s) (42.9%) dropped" in dropped and is_suspect(dropped)
    quiet = s3dis.read_scene(tmp_path, "Area_3_lounge_1", cfg=s3dis.S3DISReaderConfig(check_room_file=False))
    assert quiet.warnings == []


def _slow_parse(data: bytes, n_columns: int = 6) -> tuple[np.ndarray, list[int]]:
    """The obvious version: one line at a time."""
    rows, skipped = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            skipped.append(number)
            continue
        if len(values) != n_columns or not all(c in b"0123456789+-.eE \t\r" for c in line):
            skipped.append(number)
            continue
        rows.append(values)
    return np.array(rows).reshape(-1, n_columns), skipped


@pytest.mark.parametrize("seed", range(6))
def test_parser_matches_slow_oracle(seed):
    rng = np.random.default_rng(seed)
    n = 400
    lines = [
        " ".join(f"{v:.3f}" for v in row[:3]) + " " + " ".join(str(int(v)) for v in row[3:])
        for row in np.concatenate([rng.normal(0, 10, (n, 3)), rng.integers(0, 256, (n, 3))], axis=1)
    ]
    damage = [
        lambda s: s.replace(" ", " x", 1),  # a stray letter
        lambda s: s + " 7",  # seven columns
        lambda s: s.rsplit(" ", 2)[0],  # four columns
        lambda s: "",  # blank line
        lambda s: s.replace("\n", "") + "\r",  # CRLF ending
        lambda s: "\t" + s.replace(" ", "\t"),  # tabs
        lambda s: s.replace(".", "\x10", 1),  # control byte inside a number
    ]
    for at in rng.choice(n, size=12, replace=False):
        lines[at] = damage[int(rng.integers(len(damage)))](lines[at])
    data = "\n".join(lines).encode() + (b"\n" if seed % 2 else b"")
    values, skipped = s3dis.parse_numeric_lines(data)
    expected, expected_skipped = _slow_parse(data)
    assert skipped.tolist() == expected_skipped
    np.testing.assert_array_equal(values, expected)


def test_parser_clean_fast_path_and_empty():
    data = b"1 2 3 4 5 6\n7 8 9 10 11 12\n"
    values, skipped = s3dis.parse_numeric_lines(data)
    assert values.shape == (2, 6) and skipped.size == 0
    values, skipped = s3dis.parse_numeric_lines(b"\n \n")
    assert values.shape == (0, 6) and skipped.size == 0
    with pytest.raises(ValueError):
        s3dis.parse_numeric_lines(b"1.2.3 2 3 4 5 6\n")


def test_unsafe_scene_id_is_a_scene_error(tmp_path):
    with pytest.raises(SceneError, match="invalid scene id"):
        s3dis.read_scene(tmp_path, "Area_1_../../etc")
