"""``plan``: the cost arithmetic on stubbed timings (derived by hand), the stage timer, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from wsss_tune.analysis.plan import (
    DatasetSizes,
    StageTimings,
    asha_fractions,
    asha_rungs,
    estimate_cost,
    expected_distinct,
    format_plan,
    param_artifacts,
    param_cardinality,
    time_stages,
)
from wsss_tune.config import load_config
from wsss_tune.spaces import Fidelity, Param, SearchSpace, load_space

HOUR = 3600.0
#: Stub unit times (seconds): EPS step 1, forward 0.1; AffinityNet step 2, forward 0.2; walk 0.5;
#: DeepLab step 3, forward 0.1.
STUB = StageTimings(device="stub", eps_step=1.0, eps_forward=0.1, affinity_step=2.0, affinity_forward=0.2,
                    rw_image=0.5, deeplab_step=3.0, deeplab_forward=0.1)
SIZES = DatasetSizes(train=100, masks=100, val=50)
#: Round numbers: 1000 EPS steps, no periodic evaluation, one CAM pass; 500 AffinityNet steps; 1000
#: DeepLab steps, one test pass. One build: eps_model 1000 x 1 = 1000 s; eps 100 images x 0.1 = 10 s;
#: affinity 500 x 2 + 100 x 0.2 = 1020 s; rw 100 x 0.5 = 50 s; deeplab 1000 x 3 + 50 x 0.1 = 3005 s.
ROUND = {"eps.iterations": 1000, "eps.eval_every": 0, "eps.cam_scales": [1.0], "eps.cam_flip": False,
         "affinity.iterations": 500, "deeplab.iterations": 1000, "deeplab.eval_every": 0,
         "deeplab.test_scales": [1.0], "deeplab.test_flip": False}


def _cfg():  # noqa: ANN202 - PipelineConfig
    return load_config("synth", ROUND)


def _space(params: tuple[Param, ...], *, stages: tuple[str, ...], metric: str,
           fidelity: Fidelity | None = None) -> SearchSpace:
    return SearchSpace(name="t", base="synth", params=params, metric=metric, mode="max", stages=stages,
                       fidelity=fidelity, tune_split="train_tune", heldout_split="train_heldout")


BETA = Param(path="rw.beta", kind="uniform", low=2.0, high=12.0)
TAU = Param(path="eps.tau", kind="uniform", low=0.1, high=0.7)
RW_SPACE = _space((BETA,), stages=("eps", "affinity"), metric="rw_miou_tune")


def _rows(est):  # noqa: ANN001, ANN202
    return {r.artifact: r for r in est.rows}


def test_rw_space_with_cache_builds_upstream_once() -> None:
    """Searching rw.beta (continuous) over 10 trials with the cache: EPS and AffinityNet are shared
    (built once: 1000 + 10 + 1020 = 2030 s), the walk runs per trial (10 x 50 = 500 s): 2530 s.
    Wall clock on 2 devices: the shared 2030 s first, then 500 s over 2 devices (250 s, more than one
    trial's 50 s): 2280 s."""
    est = estimate_cost(STUB, RW_SPACE, _cfg(), 10, 2, cache=True, sizes=SIZES)
    rows = _rows(est)
    assert list(rows) == ["eps_model", "eps", "affinity", "rw"]
    assert [rows[a].builds for a in ("eps_model", "eps", "affinity", "rw")] == [1, 1, 1, 10]
    assert rows["affinity"].seconds == pytest.approx(1020.0) and rows["affinity"].shared
    assert est.device_hours * HOUR == pytest.approx(2530.0)
    assert est.wall_hours * HOUR == pytest.approx(2280.0)
    # Trials building the shared 2030 s themselves: the second device waits all of it; built first
    # with one trial's resources, it is free. On 4 devices three wait: 3 x 2030 s.
    assert est.shared_hours * HOUR == pytest.approx(2030.0)
    assert est.waiting_device_hours * HOUR == pytest.approx(2030.0)
    four = estimate_cost(STUB, RW_SPACE, _cfg(), 10, 4, cache=True, sizes=SIZES)
    assert four.waiting_device_hours * HOUR == pytest.approx(3 * 2030.0)
    assert "1.69 device-hours not held idle (3 device(s) x 0.56 h" in " ".join(format_plan(four).split())


def test_rw_space_without_cache_repeats_everything() -> None:
    """Without the cache each of 10 trials builds all four artifacts: 10 x 2080 = 20800 s; on 2 devices
    the wall clock is 20800 / 2 = 10400 s."""
    est = estimate_cost(STUB, RW_SPACE, _cfg(), 10, 2, cache=False, sizes=SIZES)
    assert est.device_hours * HOUR == pytest.approx(20800.0)
    assert est.wall_hours * HOUR == pytest.approx(10400.0)
    assert not any(r.shared for r in est.rows)


def test_asha_rungs_and_fractions() -> None:
    """grace 100, eta 3, max_t 1000: int(log(10) / log(3) + 1) = 3 rungs at 100, 300, 900. A trial stops
    at them with probability 2/3, 2/9, 2/27 and finishes with 1/27, so it trains on average
    (2/3 100 + 2/9 300 + 2/27 900 + 1/27 1000) / 1000 = (200 + 1000/27) / 1000 = 32/135 of max_t."""
    f = Fidelity(time_attr="stage_step", max_t=1000, grace_period=100, reduction_factor=3)
    assert asha_rungs(f) == [100, 300, 900]
    work, complete = asha_fractions(f)
    assert work == pytest.approx(32 / 135)
    assert complete == pytest.approx(1 / 27)
    # The reference's DeepLab schedule: rungs 4000 and 12000 of 20000 (36000 > max_t is no rung).
    ref = Fidelity(time_attr="stage_step", max_t=20000, grace_period=4000, reduction_factor=3)
    assert asha_rungs(ref) == [4000, 12000]


def test_full_pipeline_asha_cuts_deeplab_only() -> None:
    """Searching eps.tau keys EPS training, so every artifact is per trial (cache or not). ASHA on
    DeepLab (schedule above): its training runs 32/135 of 3000 s = 711.11 s on average, its 5 s of
    evaluation only for the 1/27 that finish. 10 trials: 10 x (1000 + 10 + 1020 + 50) + 10 x (711.11 +
    5/27) = 20800 + 7112.96 = 27912.96 s; without ASHA 10 x 5085 = 50850 s."""
    fid = Fidelity(time_attr="stage_step", max_t=1000, grace_period=100, reduction_factor=3)
    space = _space((TAU,), stages=("eps", "affinity", "deeplab"), metric="deeplab_miou_tune", fidelity=fid)
    with_asha = estimate_cost(STUB, space, _cfg(), 10, 2, cache=True, asha=True, sizes=SIZES)
    expected = 20800 + 10 * (32 / 135 * 3000 + 5 / 27)
    assert with_asha.device_hours * HOUR == pytest.approx(expected)
    assert _rows(with_asha)["eps_model"].work_fraction == 1.0
    no_cache = estimate_cost(STUB, space, _cfg(), 10, 2, cache=False, asha=True, sizes=SIZES)
    assert no_cache.device_hours == pytest.approx(with_asha.device_hours)
    without = estimate_cost(STUB, space, _cfg(), 10, 2, cache=True, asha=False, sizes=SIZES)
    assert without.device_hours * HOUR == pytest.approx(50850.0)
    assert without.asha is None and with_asha.asha == fid


def test_discrete_parameter_repeats_under_the_cache() -> None:
    """rw.logt in 1..5 (5 values) over 10 trials: expected distinct values 5 (1 - (4/5)^10) = 4.4631,
    so the walk is built 4.4631 times; EPS and AffinityNet once."""
    logt = Param(path="rw.logt", kind="int", low=1, high=5)
    assert param_cardinality(logt) == 5
    space = _space((logt,), stages=("eps", "affinity"), metric="rw_miou_tune")
    rows = _rows(estimate_cost(STUB, space, _cfg(), 10, 1, sizes=SIZES))
    assert rows["rw"].builds == pytest.approx(5 * (1 - 0.8**10))
    assert rows["eps_model"].builds == 1
    assert expected_distinct(math.inf, 7) == 7 and expected_distinct(1, 7) == 1


def test_param_artifacts_follow_the_pipeline_keys() -> None:
    """tau trains EPS; bg_threshold only relabels CAMs; beta only walks; the seed trains every model;
    the evaluation cadence keys nothing; a categorical with one choice never changes anything."""
    cfg = _cfg()
    assert param_artifacts(TAU, cfg) == ("eps_model",)
    assert param_artifacts(Param(path="eps.bg_threshold", kind="uniform", low=0.1, high=0.3), cfg) == ("eps",)
    assert param_artifacts(BETA, cfg) == ("rw",)
    assert param_artifacts(Param(path="run.seed", kind="int", low=0, high=3), cfg) == ("eps_model", "affinity", "deeplab_model")
    assert param_artifacts(Param(path="eps.eval_every", kind="int", low=100, high=200), cfg) == ()
    assert param_artifacts(Param(path="eps.bg_mode", kind="categorical", choices=("learned",)), cfg) == ()


def test_voc_full_pipeline_without_cache_is_hundreds_of_gpu_hours() -> None:
    """The shipped `pipeline` space on VOC (10,582 train_aug, 1,449 val), 50 trials on 4 GPUs, no cache,
    no early stopping, with plausible GPU step times (EPS and AffinityNet 0.6 s, DeepLab 0.45 s,
    forwards 0.05 s, walk 0.1 s). One trial: EPS 20000 x 0.6 + 20 evals x 64 x 8 passes x 0.05 = 12512;
    CAMs 10582 x 8 x 0.05 = 4232.8; AffinityNet 10576 x 0.6 + 10582 x 0.05 = 6874.7; walk 1058.2;
    DeepLab 20000 x 0.45 + (2000 + 1449) x 0.05 = 9172.45; 33850.15 s. x 50 = 470.14 GPU-hours, 117.5 h
    on 4 GPUs."""
    space = load_space("pipeline")
    t = StageTimings(device="stub gpu", eps_step=0.6, eps_forward=0.05, affinity_step=0.6, affinity_forward=0.05,
                     rw_image=0.1, deeplab_step=0.45, deeplab_forward=0.05)
    sizes = DatasetSizes(train=10582, masks=10582, val=1449)
    est = estimate_cost(t, space, space.base_config(), 50, 4, cache=False, asha=False, sizes=sizes)
    assert est.per_trial_hours * HOUR == pytest.approx(33850.15)
    assert est.device_hours == pytest.approx(50 * 33850.15 / HOUR)
    assert est.device_hours > 400
    assert est.wall_hours == pytest.approx(est.device_hours / 4)
    text = format_plan(est)
    assert "470.14 device-hours" in text and "cache off" in text


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="trials=0"):
        estimate_cost(STUB, RW_SPACE, _cfg(), 0, 1, sizes=SIZES)
    with pytest.raises(ValueError, match="gpus=0"):
        estimate_cost(STUB, RW_SPACE, _cfg(), 1, 0, sizes=SIZES)
    with pytest.raises(ValueError, match="StageTimings.rw_image"):
        StageTimings(device="x", eps_step=1, eps_forward=1, affinity_step=1, affinity_forward=1, rw_image=-1,
                     deeplab_step=1, deeplab_forward=1)


TINY_MODELS = {"eps.batch_size": 2, "eps.crop_size": 32, "affinity.batch_size": 2, "affinity.crop_size": 48,
               "deeplab.batch_size": 2, "deeplab.crop_size": 32, "run.device": "cpu"}


def test_time_stages_measures_the_stages_a_space_runs(synth_root: Path) -> None:
    """Tiny models at batch 2, 32 px (AffinityNet 48 px: a 12 x 12 map holds radius-5 pairs): every unit time of the timed stages is positive and finite;
    DeepLab is not timed for a space that stops after the walk."""
    cfg = load_config("synth", {**TINY_MODELS, "data.root": str(synth_root)})
    t = time_stages(cfg, num_classes=5, stages=("eps", "affinity"), steps=1, warmup=0)
    for name in ("eps_step", "eps_forward", "affinity_step", "affinity_forward", "rw_image"):
        assert 0 < getattr(t, name) < 60, name
    assert t.deeplab_step == 0 and t.deeplab_forward == 0
    assert t.device.startswith("cpu")


def test_time_stages_times_the_stages_own_step_functions(synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepLab on the ground truth (nothing upstream to time) with ``accumulate`` 2, 1 warm-up + 2 timed
    steps: ``make_deeplab_step``'s step runs 3 times, each on 2 random micro-batches of the configured
    batch and crop, at LR 0, so the weights stay put (BatchNorm statistics aside)."""
    import torch

    import wsss_tune.stages.deeplab as deeplab

    calls: list[tuple[int, tuple[int, ...], list[float]]] = []
    made = []
    make_step = deeplab.make_deeplab_step

    def recording(d, model, *, device):  # noqa: ANN001, ANN202
        step = make_step(d, model, device=device)
        made.append((step, {k: v.detach().clone() for k, v in model.named_parameters()}))

        def run(batches, i):  # noqa: ANN001, ANN202
            calls.append((len(batches), tuple(batches[0]["image"].shape), [g["lr"] for g in step.optimizer.param_groups]))
            return step(batches, i)

        return deeplab.TrainStep(model=step.model, optimizer=step.optimizer, scaler=step.scaler, run=run,
                                 micro_batches=step.micro_batches)

    monkeypatch.setattr(deeplab, "make_deeplab_step", recording)
    cfg = load_config("synth", {**TINY_MODELS, "data.root": str(synth_root), "deeplab.accumulate": 2,
                                "deeplab.mask_source": "gt"})
    t = time_stages(cfg, num_classes=5, stages=("deeplab",), steps=2, warmup=1)
    assert 0 < t.deeplab_step < 60 and t.eps_step == 0
    assert [(n, shape) for n, shape, _ in calls] == [(2, (2, 3, 32, 32))] * 3
    assert all(lr == 0.0 for _, _, lrs in calls for lr in lrs)
    (step, before), = made
    assert all(torch.equal(before[k], v) for k, v in step.model.named_parameters())


def test_cli_plan(synth_root: Path, tmp_path: Path) -> None:
    """``wsss-tune plan SPACE --data ROOT --gpus 4 --trials 8`` times the stages and prints the estimate,
    the four scenarios and the assumptions; a missing data root exits 2 naming it."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    space = tmp_path / "rw.yaml"
    space.write_text(yaml.safe_dump({
        "base": "synth", "stages": ["eps", "affinity"], "metric": "rw_miou_tune", "mode": "max",
        "tune_split": "train_tune", "heldout_split": "train_heldout", "overrides": TINY_MODELS,
        "params": {"rw.beta": {"kind": "uniform", "low": 2, "high": 12}}}))
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(space), "--data", str(synth_root), "--gpus", "4", "--trials", "8",
                              "--steps", "1"])
    assert res.exit_code == 0, res.output
    assert "8 trials on 4 device(s)" in res.output and "cache off, ASHA off" in res.output
    assert "Assumptions:" in res.output
    bad = runner.invoke(app, ["plan", str(space), "--data", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "missing" in bad.output
