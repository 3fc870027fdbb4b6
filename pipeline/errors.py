"""The two exception kinds of the project: a user's mistake, and a scene that cannot be processed.

A missing path or run, a missing vocabulary, a bad config, a model that is not there offline,
an unknown scene: library code raises :class:`UserError` (or one of its subclasses:
``pipeline.config.ConfigError``, ``pipeline.store.StoreError``,
``ws3d_train.checkpoint.CheckpointError``, ``ws3d_train.data.dataset.DataError``) with a message that
names what and where. The CLI turns it into a one- or two-line ``error: ...`` and exit code 2 at
one place (``cli.py``); any other exception is a bug and keeps its traceback.

A scene that can be processed but that a person should know about carries warnings: strings
tagged with a kind (:func:`tag`, ``[kind] message``) kept in its stage record and printed at the
end of the run, a line per scene and kind; kinds in :data:`SUSPECT_KINDS` make `ws3d validate`
flag the scene.

A stage that cannot process one scene (a damaged file, a missing upstream output) raises
:class:`SceneError` naming the scene and the file; the executor reports it as that scene's failure
and the other scenes go on. Imports nothing of the project.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SUSPECT_KINDS", "SceneError", "UserError", "is_suspect", "tag", "warning_kind"]


class UserError(Exception):
    """A mistake the user can fix: the message names the file/scene/option and what was wrong."""


class SceneError(Exception):
    """A scene that cannot be read: names the scene, the file and what was wrong."""

    def __init__(self, scene_id: str, file: str | Path | None, message: str):
        self.scene_id = scene_id
        self.file = str(file) if file is not None else None
        self.message = message
        where = f" ({self.file})" if self.file else ""
        super().__init__(f"scene {scene_id}{where}: {message}")

    def __reduce__(self):  # keep the fields through pickling (Dask workers)
        return (SceneError, (self.scene_id, self.file, self.message))


SUSPECT_KINDS: frozenset[str] = frozenset({
    "no-colour", "sensor-frame", "labels-lost", "unannotated", "low-coverage",
})
"""Warning kinds that make a scan suspect: it was read, but what comes next will likely be wrong
(black views, cameras looking at nothing, most labels lost, points dropped unsaid).
`ws3d validate` flags scenes with such warnings; the other kinds only inform."""
_TAG = re.compile(r"^\[([a-z0-9-]+)\] (.*)$", re.S)


def tag(kind: str, message: str) -> str:
    """A warning of a kind: ``[kind] message``."""
    return f"[{kind}] {message}"


def warning_kind(warning: str) -> tuple[str, str]:
    """``(kind, message)`` of a warning; an untagged warning is of kind ``other``."""
    match = _TAG.match(warning)
    return (match.group(1), match.group(2)) if match else ("other", warning)


def is_suspect(warning: str) -> bool:
    """Whether a warning makes its scan suspect (:data:`SUSPECT_KINDS`)."""
    return warning_kind(warning)[0] in SUSPECT_KINDS
