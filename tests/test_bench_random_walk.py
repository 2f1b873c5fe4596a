"""The random-walk benchmark entry runs end to end (quick sizes) and its rows hold what the table claims."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_random_walk


@pytest.mark.slow
def test_quick_run_compares_every_stencil_with_the_dense_reference():
    rows = bench_random_walk.run(quick=True)
    maps = sorted({row["map"] for row in rows})
    assert maps == ["32x32", "40x40"]
    for size in maps:
        sparse = [row for row in rows if row["map"] == size and row["method"].startswith("sparse")]
        methods = {row["method"] for row in sparse}
        assert {f"sparse {s}" for s in bench_random_walk.STENCILS} <= methods
        dense = [row for row in rows if row["map"] == size and row["method"].startswith("dense reference (")]
        assert len(dense) == 1 and dense[0]["time_s"] > 0
        for row in sparse:
            # Agreement is measured, not assumed: every walk gives the dense reference's labels.
            assert row["labels_agree_%"] == 100.0, row
            assert row["max_rel_diff"] < 1e-3, row
            assert row["time_s"] > 0 and math.isfinite(row["speedup_vs_dense"])
            assert 0 <= row["peak_mem_MB"] < dense[0]["peak_mem_MB"] + 64
