"""The store-at-scale benchmark runs its stages on the executor's own (TLS) local cluster."""
import pytest

from tests.synthdata import small_raw


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_store_scale_piece_preprocesses_every_room_on_the_local_cluster(tmp_path):
    from ws3d_train.bench.store_scale import run_piece

    raw = small_raw(tmp_path / "raw", 3)
    out = run_piece(str(raw), (0, 3), "local", workers=1, read_workers=())
    assert out["valid"] and out["scenes"] == 3
    for stage in ("ingest", "overseg", "render"):
        row = out["stages"][stage]
        assert row["done"] == 3 and row["failed"] == 0 and row["bytes_per_scene"] > 0, (stage, row)
    assert len(out["peak_rss_mb_per_worker"]) == 1
