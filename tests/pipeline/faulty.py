"""A stage that misbehaves on purpose for one scene: its worker process dies (killed, or out of
memory). Kept in a module of its own so that Dask workers load it without the test modules' imports."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline import schema
from pipeline.stage import Stage, StageOutput, StageRun
from pipeline.store import Store

SCENES = ("scene0000_00", "scene0001_00", "scene0002_00")


@dataclass(frozen=True)
class FaultyConfig:
    """Which scene misbehaves, and how."""

    scene: str = "scene0001_00"
    """The scene whose worker dies."""
    how: Literal["kill", "memory"] = "kill"
    """kill: SIGKILL (as the kernel's OOM killer does); memory: allocate until the nanny kills it."""


def compute(store: Store, scene_id: str, cfg: FaultyConfig, run: StageRun) -> StageOutput:
    if scene_id == cfg.scene and cfg.how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if scene_id == cfg.scene:
        hog = []
        while True:
            hog.append(np.ones(16 << 20, dtype=np.uint8))  # 16 MiB at a time, pages touched
            time.sleep(0.005)
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    arrays = {schema.XYZ: xyz, schema.RGB: np.zeros((4, 3), np.uint8),
              schema.SEMANTIC: np.zeros(4, np.int16), schema.INSTANCE: np.zeros(4, np.int32)}
    return StageOutput(arrays, {"points": 4})


def list_scenes(run: StageRun) -> list[str]:
    return list(SCENES)


def prepare(run: StageRun) -> None:
    Store.create(run.store, dataset="synthetic", class_names=["a"])


def hashed(cfg: Any) -> dict[str, Any]:
    return {}


FAULTY = Stage(name="ingest", config=FaultyConfig, help="ingest, but one scene's worker dies", reads=(),
               writes=schema.STAGE_GROUPS["ingest"], compute=compute, list_scenes=list_scenes, prepare=prepare,
               hashed=hashed)
