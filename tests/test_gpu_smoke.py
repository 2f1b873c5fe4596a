"""The GPU smoke check's dry run: without CUDA every check still runs, on the CPU at tiny size, and the
table says so."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_gpu_smoke as smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the path without CUDA; with a GPU run "
                                                      "`python -m benchmarks gpu_smoke` itself")
def test_the_dry_run_runs_every_check_on_the_cpu_and_says_so():
    rows = smoke.run(quick=True)
    assert all(tuple(r) == smoke.COLUMNS for r in rows)
    assert rows[0]["check"] == "device" and smoke.DRY_RUN in rows[0]["result"]
    assert all(r["device"].startswith("cpu") for r in rows), [r["device"] for r in rows]
    assert smoke.failed(rows) == []
    checks = {(r["check"].split(" ")[0], r["amp"]) for r in rows}
    assert {("stage", "off"), ("ddp", "off"), ("walk", ""), ("train", "off"), ("train", "on")} <= checks
    stages = {r["check"] for r in rows if r["check"].startswith("stage ")}
    assert stages == {f"stage {a}" for a in ("eps_model", "eps", "affinity", "rw", "deeplab_model", "deeplab")}
    assert {r["check"].split(" ")[1] for r in rows if r["check"].startswith("walk ")} == set(smoke.WALK_STENCILS)
    trains = [r["check"] for r in rows if r["check"].startswith("train ")]
    assert sorted(trains) == ["train deeplab-v2/tiny"] * 2 + ["train eps/tiny"] * 2
    assert all("img/s" in r["result"] and "TFLOP/s" in r["result"] for r in rows if r["check"].startswith("train "))


def test_a_check_that_breaks_becomes_a_failed_row_and_the_table_goes_on():
    def broken() -> list[dict]:
        raise RuntimeError("no kernel image is available\nfor execution on the device")

    (row,) = smoke._guarded("walk", "cuda:0 (X)", broken)
    assert row["status"] == "FAIL" and row["result"] == "RuntimeError: no kernel image is available"
    assert smoke.failed([row]) == [row] and tuple(row) == smoke.COLUMNS
