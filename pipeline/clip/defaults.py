"""CLIP's defaults that need no model loaded: pixel mean and std, the prompt templates, and what
names a local model folder (as opposed to a hub id). Light: imports nothing heavy, so stage
declarations and the teacher folder's readers can use it without loading torch."""
from __future__ import annotations

from pathlib import Path

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's pixel mean (RGB, 0..1), used when a folder has no preprocessor_config.json."""
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's pixel standard deviation (RGB, 0..1)."""

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} in a room.",
    "a photo of a {} in a room.",
    "a rendering of a {}.",
    "there is a {} in the scene.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
)
"""Prompt templates for class names: shared by the text vocabulary and the teacher's captions,
so that the teacher is trained on exactly the prompts it is queried with."""


def is_local_model(model: str) -> bool:
    """True when `model` names a folder: an existing directory, or a path-like string (hub ids are
    `name` or `org/name`, never start with '.', '/' or '~' and hold at most one '/')."""
    return Path(model).expanduser().is_dir() or model.startswith((".", "/", "~")) or model.count("/") > 1
