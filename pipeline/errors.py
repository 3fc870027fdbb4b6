"""The one exception type for a user's mistake (as opposed to a bug).

A missing path or run, a missing vocabulary, a bad config, a model that is not there offline,
an unknown scene: library code raises :class:`UserError` (or one of its subclasses:
``pipeline.config.ConfigError``, ``pipeline.store.StoreError``,
``ws3d_train.checkpoint.CheckpointError``, ``ws3d_train.data.DataError``) with a message that
names what and where. The CLI turns it into a one- or two-line ``error: ...`` and exit code 2 at
one place (``cli.py``); any other exception is a bug and keeps its traceback. Imports nothing.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake the user can fix: the message names the file/scene/option and what was wrong."""
