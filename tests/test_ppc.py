"""EPS with pixel-to-prototype contrast (``eps.method: eps_ppc``) as a whole: on data-parallel ranks,
and (slow) against plain EPS on the default synthetic preset."""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from stage_helpers import logged

from wsss_tune.config import load_config
from wsss_tune.data import generate_synthetic_voc
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages.eps import run_eps, train_eps

#: Training seeds of the slow comparison (the benchmark's).
SEEDS = (0, 1, 2)


def test_ppc_trains_on_two_ranks(synth_root: Path, tmp_path: Path) -> None:
    """Two gloo ranks train ``eps_ppc`` (two forward passes through the DDP wrapper in one step): the
    run ends, saves a model with the projection head, and logs finite losses whose sum holds."""
    cfg = load_config("synth", {
        "data.root": str(synth_root), "data.num_workers": 0, "run.device": "cpu", "run.ddp_ranks": 2,
        "eps.method": "eps_ppc", "eps.ppc_proj_dim": 8, "eps.iterations": 2, "eps.batch_size": 4,
        "eps.crop_size": 32, "eps.resize_long": [32, 48], "eps.eval_every": 0, "eps.log_every": 1,
        "eps.checkpoint_every": 2})
    rec = RecordingReporter()
    path = train_eps(cfg, out_dir=tmp_path / "eps", reporter=rec)
    assert "proj.weight" in torch.load(path, weights_only=True)
    logs = logged(rec.history, "eps/loss")
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert all(math.isfinite(v) for k, v in h.items() if k.startswith("eps/"))
        assert h["eps/loss"] == pytest.approx(h["eps/loss_cls"] + h["eps/loss_sal"] + h["eps/loss_ppc"], rel=1e-4)


@pytest.fixture(scope="module")
def default_preset_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The built-in synth EPS stage, plain and with the contrast, for :data:`SEEDS` on the default
    preset (data seed 0): each method's metrics per seed. About 6 minutes on one core, 4 on two."""
    root = generate_synthetic_voc(tmp_path_factory.mktemp("synth") / "voc", seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    runs: dict[str, list[dict]] = {"eps": [], "eps_ppc": []}
    try:
        for method, seed in itertools.product(runs, SEEDS):
            cfg = load_config("synth", {"data.root": str(root), "run.device": "cpu", "eps.method": method,
                                        "run.seed": seed})
            t0 = time.time()
            metrics = run_eps(cfg, out_dir=tmp_path_factory.mktemp(f"{method}{seed}"), reporter=RecordingReporter()).metrics
            print(f"{method} seed {seed}: eps_miou {metrics['eps_miou']:.2f} in {time.time() - t0:.0f}s")
            runs[method].append(metrics)
    finally:
        torch.set_num_threads(before)
    return runs


@pytest.mark.slow
def test_ppc_path_trains_and_yields_masks_on_the_default_preset(default_preset_runs: dict[str, list[dict]]) -> None:
    """Every contrast run trained with a finite contrast loss and its pseudo masks score far above the
    plain CAM baseline (~46-49 on this data, README): the path works end to end."""
    for metrics in default_preset_runs["eps_ppc"]:
        assert metrics["eps_method"] == "eps_ppc"
        assert math.isfinite(metrics["eps/loss_ppc"]) and metrics["eps/loss_ppc"] > 0
        assert len([k for k in metrics if k.startswith("eps/overlap/")]) == 5
        assert metrics["eps_miou"] > 55.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not on this data: EPS+PPC's pseudo masks are ~7 mIoU below EPS's on the "
                   "default preset, against a pooled seed std of ~3 (README, 'Pixel-to-prototype contrast'); the "
                   "reference's 2/7 second view is 27 px here, and its EPS loss alone costs as much")
def test_ppc_masks_are_at_least_as_good_as_eps_within_the_seed_spread(
        default_preset_runs: dict[str, list[dict]]) -> None:
    """The issue's bar: the mean EPS+PPC pseudo-mask mIoU over :data:`SEEDS` is no more than the pooled
    seed standard deviation below plain EPS's. Strict: it fails loudly once it holds, so that the
    expectation is revisited then."""
    eps = [m["eps_miou"] for m in default_preset_runs["eps"]]
    ppc = [m["eps_miou"] for m in default_preset_runs["eps_ppc"]]
    spread = math.sqrt((statistics.variance(eps) + statistics.variance(ppc)) / 2)
    assert statistics.fmean(ppc) >= statistics.fmean(eps) - spread
