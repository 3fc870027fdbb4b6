"""The demo pipeline end to end at the smallest scale, and the report's pictures."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.executor import ExecutorConfig
from tests.synthdata import SMALL
from ws3d_train.demo import DemoConfig, format_results, run_demo


def test_demo_smallest_scale_runs_and_writes_results_and_pictures(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), train_scenes=2, val_scenes=1, room=SMALL, teacher_steps=15, teacher_seconds=4.0,
                     pretrain_steps=2, finetune_steps=2, voxel_size_m=0.1, max_voxels=5000, batch_size=1,
                     executor=ExecutorConfig(kind="sync"))
    lines: list[str] = []
    results = run_demo(cfg, echo=lines.append)
    written = json.loads((tmp_path / "demo" / "results.json").read_text())
    row = written["table"]["+pretrain (full)"]
    assert set(row) >= {"mIoU", "novel mIoU", "hIoU", "AP50", "box mAP@25"}
    assert 0.0 <= row["mIoU"]["mean"] <= 1.0
    assert written["val_scenes"] == 1 and written["train_scenes"] == 2
    assert set(written["preprocess_seconds"]) >= {"ingest", "overseg", "render", "teacher", "embed"}
    assert "+pretrain (full)" in format_results(results)
    pictures = sorted((tmp_path / "demo" / "report").glob("*.png"))
    names = {p.name.split("_")[0] for p in pictures}
    assert {"training", "views", "query"} <= names, pictures
    for picture in pictures:
        with Image.open(picture) as image:
            assert image.size[0] > 200 and image.size[1] > 100


def test_demo_config_is_strict():
    with pytest.raises(ValueError):
        from_dict(DemoConfig, {"sclae": 2})
