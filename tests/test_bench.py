"""`ws3d bench` at a tiny size (slow: it builds and preprocesses a small store)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app


@pytest.mark.slow
def test_bench_tiny_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for section in ("render", "overseg", "embed", "sparse", "store_read", "train_step"):
        assert section in data and "error" not in data[section], (section, data.get(section))
    assert "ratio" in result.output
