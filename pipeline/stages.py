"""Every per-scene stage, in pipeline order: the one list that the CLI's stage commands and the
workflow runner are built from (`ws3d ingest|overseg|render|embed`, `ws3d preprocess`).

Adding a stage: its package (pure core + a `Stage` declaration, see `pipeline.stage`), its store
group in `pipeline.schema.STAGE_GROUPS`, and one entry here; the command, the workflow section
(typed by its config class), resuming and logging come with it.
"""
from __future__ import annotations

from pipeline.datasets.ingest import INGEST
from pipeline.embed.stage import EMBED
from pipeline.overseg.stage import OVERSEG
from pipeline.render.stage import RENDER
from pipeline.stage import Stage

STAGES: tuple[Stage, ...] = (INGEST, OVERSEG, RENDER, EMBED)
"""The per-scene stages in the order a workflow runs them."""

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
"""The stages by name."""
