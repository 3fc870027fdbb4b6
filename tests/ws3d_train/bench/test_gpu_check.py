"""The prepared GPU check (`make gpu-check`), exercised on the CPU through its dry run: the script
runs end to end on tiny sizes and writes one JSON with every section and sane values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ws3d_train.bench import gpu_check
from ws3d_train.sparse import available_backends, backend_runs_on


def _check_common(data: dict) -> None:
    assert data["dry_run"] is True and data["machine"]["torch"]
    cpu_backends = [b for b in available_backends() if backend_runs_on(b, "cpu")]
    assert data["backends_on_device"] == cpu_backends
    for section in ("sparse", "store_build", "train_step", "store_read", "embed"):
        assert section in data and "error" not in data[section], (section, data.get(section))
        assert data[section]["seconds"] >= 0
    sparse = data["sparse"]["backends"]
    assert sorted(sparse) == sorted(cpu_backends)
    assert all(res["max_abs_diff_vs_dense"] < 1e-4 for res in sparse.values())
    runs = data["train_step"]["runs"]
    assert sorted(runs) == sorted(f"{b}_fp32" for b in cpu_backends)  # bf16 autocast is CUDA-only
    for res in runs.values():
        assert res["steps_per_s"] > 0 and res["peak_memory_gb"] > 0 and res["voxels_per_batch"] > 100
    assert data["store_read"]["workers"] == 4 and data["store_read"]["scenes_per_s"] > 0
    embed = data["embed"]
    assert embed["images"] > 0 and embed["images_per_s"] > 0 and "encode_pixels" in embed["path"]
    goals = data["goals"]
    assert goals["evaluated"] is False and goals["best_steps_per_s"] == max(r["steps_per_s"] for r in runs.values())
    assert goals["peak_memory_gb_max"] == 16.0 and isinstance(goals["embed_ok"], bool)


def test_dry_run_writes_every_section(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--dry-run", "--skip-pytest"]) == 0
    data = json.loads(out.read_text())
    _check_common(data)
    assert "pytest_gpu" not in data
    assert "written" in capsys.readouterr().out


def test_full_check_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the full check would run")
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_dry_run_with_pytest_gpu_counts_the_gpu_tests(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0
    data = json.loads(out.read_text())
    _check_common(data)
    tests = data["pytest_gpu"]
    assert "error" not in tests, tests
    assert tests["skipped"] + tests["passed"] >= 20 and tests["failed"] == 0  # the CUDA oracle cases
