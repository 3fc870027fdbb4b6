"""The two exception kinds of the project: a user's mistake, and a scene that cannot be processed.

A missing path or run, a missing vocabulary, a bad config, a model that is not there offline,
an unknown scene: library code raises :class:`UserError` (or one of its subclasses:
``pipeline.config.ConfigError``, ``pipeline.store.StoreError``,
``ws3d_train.checkpoint.CheckpointError``, ``ws3d_train.data.dataset.DataError``) with a message that
names what and where. The CLI turns it into a one- or two-line ``error: ...`` and exit code 2 at
one place (``cli.py``); any other exception is a bug and keeps its traceback.

A stage that cannot process one scene (a damaged file, a missing upstream output) raises
:class:`SceneError` naming the scene and the file; the executor reports it as that scene's failure
and the other scenes go on. Imports nothing of the project.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["SceneError", "UserError"]


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
