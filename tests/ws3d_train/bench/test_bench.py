"""`ws3d bench`: the sparse section alone at the tiny size (fast), and every section (slow: it
builds and preprocesses a small store)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import app
from ws3d_train.sparse import available_backends


def test_bench_sparse_section_measures_every_installed_backend(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--section", "sparse", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "sparse"} and "render" not in data  # only the section asked for
    sparse = data["sparse"]
    assert "error" not in sparse, sparse
    cpu_backends = [b for b in available_backends() if b != "torchsparse"]
    assert sorted(sparse["backends"]) == sorted(cpu_backends)
    for name, res in sparse["backends"].items():
        assert "error" not in res, (name, res)
        assert res["max_abs_diff_vs_dense"] < 1e-4, name  # every backend holds to the dense oracle
        assert set(res["oracle"]) == {"subm3", "stride2", "transposed"}
        rows = res["rows"]
        for row in ("subm3_c8_n3000", "subm3_c16_n3000", "kmap_subm3_n3000", "stride2_c8_n3000",
                    "transposed_c8_n3000", "net_tiny_n2000", "net_MinkUNet18_n2000"):
            assert rows[row]["voxels_per_s"] > 0 and rows[row]["fwd_bwd_s"] > 0, (name, row)
    for name in sparse["backends"]:
        if name != "torch":
            ratios = sparse["ratios"][f"{name}_over_torch_time"]
            assert set(ratios) == set(sparse["backends"]["torch"]["rows"]) and all(r > 0 for r in ratios.values())
            # the same network weights on both backends give the same outputs
            assert max(sparse["backends"][name]["max_abs_diff_vs_torch"].values()) < 1e-4
    assert "backends.torch.max_abs_diff_vs_dense" in result.output  # the printed table


@pytest.mark.slow
def test_bench_tiny_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for section in ("render", "overseg", "embed", "embed_modes", "sparse", "store_read", "train_step", "predict"):
        assert section in data and "error" not in data[section], (section, data.get(section))
    assert "ratio" in result.output


@pytest.mark.slow
def test_bench_predict_times_each_step_against_the_bare_forward(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--section", "predict", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    predict = json.loads(out.read_text())["predict"]
    for size in ("points_3000", "points_20000"):
        row = predict[size]
        assert set(row["seconds"]) == {"read", "voxelise", "network", "classify", "write", "overseg", "instances"}
        assert 0 < row["forward_s"] and row["predict_s"] < row["predict_with_instances_s"]
        ratio = row["rate_ratio_predict"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert row["rate_ratio_predict_with_instances"]["median"] < ratio["median"]  # instances cost
