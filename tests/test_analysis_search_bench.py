"""The search-efficiency benchmark's arithmetic: compute to a target, the speed-up and its bounds, and
the labelled surrogate's learning curves."""

from __future__ import annotations

import math

import pytest

from benchmarks.bench_search_efficiency import (
    SURROGATE_MAX_T,
    Pruned,
    RungReporter,
    _surrogate_arm,
    compute_to_target,
    speedup,
    surrogate_value,
)


def test_compute_to_target_counts_stopped_trials_too() -> None:
    """Costs 3 (stopped), 27 (value 60), 9 (stopped), 27 (value 73): target 72 is first reached by the
    fourth trial after 3 + 27 + 9 + 27 = 66 units; target 80 never (inf)."""
    history = [(3.0, None), (27.0, 60.0), (9.0, None), (27.0, 73.0)]
    assert compute_to_target(history, 72.0) == 66.0
    assert compute_to_target(history, 60.0) == 30.0
    assert compute_to_target(history, 80.0) == math.inf


def test_speedup_and_its_bounds() -> None:
    """random 200 / TPE 50 = 4 exactly; random never: budget 300 / 50 = 6 is a lower bound; TPE never:
    random 150 / 300 = 0.5 an upper bound; neither: nan."""
    assert speedup(50.0, 200.0, 300.0) == (4.0, "exact")
    assert speedup(50.0, math.inf, 300.0) == (6.0, "lower bound")
    assert speedup(math.inf, 150.0, 300.0) == (0.5, "upper bound")
    ratio, kind = speedup(math.inf, math.inf, 300.0)
    assert math.isnan(ratio) and kind == "neither reached"


def test_surrogate_curves_rise_and_asha_stops_trials() -> None:
    """Noise-free part of the curve: final x (1 - 0.5 e^(-4 t / 27)) rises with t, so the value at the
    last step beats the first by far more than the noise (sd 0.5). With a budget of 5 full trials the
    ASHA arm stops some trials early and runs more of them than the 5 of the random arm."""
    p = {"deeplab.lr": 1e-3, "deeplab.head_lr_mult": 10.0, "eps.tau": 0.4}
    assert surrogate_value(p, SURROGATE_MAX_T, 0) > surrogate_value(p, 1, 0) + 10
    tpe = _surrogate_arm(0, 5.0 * SURROGATE_MAX_T, tpe=True)
    rnd = _surrogate_arm(0, 5.0 * SURROGATE_MAX_T, tpe=False)
    assert len(rnd) == 5 and all(v is not None for _, v in rnd)
    assert any(v is None for _, v in tpe) and len(tpe) > 5
    # Each arm stops at the first trial that reaches the budget of 5 x 27 = 135 steps.
    assert sum(c for c, _ in tpe[:-1]) < 135 <= sum(c for c, _ in tpe)


class _FakeTrial:
    """Records ``report`` calls; ``should_prune`` is true once a value below ``floor`` was reported."""

    def __init__(self, floor: float) -> None:
        self.floor, self.reported = floor, []

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return self.reported[-1][1] < self.floor


def test_rung_reporter_hands_the_stage_metric_to_the_trial_and_stops_it() -> None:
    """Only the named stage's metric before max_t reaches the trial (other stages, other keys, a
    cache hit's step-less report, the final step 300 and a repeated step do not); a value the pruner rejects ends the run at its step."""
    trial = _FakeTrial(floor=50.0)
    r = RungReporter(trial, stage="deeplab", metric="deeplab_miou_tune", max_t=300, prune=True)
    r.report({"stage": "eps", "stage_step": 100, "eps_miou_tune": 10.0}, step=100)
    r.report({"stage": "deeplab", "stage_step": 50, "deeplab/loss": 0.3}, step=1050)
    r.report({"stage": "deeplab", "cache_hit": True, "deeplab_miou_tune": 80.0}, step=1000)
    r.report({"stage": "deeplab", "stage_step": 100, "deeplab_miou_tune": 70.0}, step=1100)
    r.report({"stage": "deeplab", "stage_step": 100, "deeplab_miou_tune": 70.0}, step=1100)
    assert trial.reported == [(100, 70.0)] and r.values == [(100, 70.0)]
    with pytest.raises(Pruned) as stop:
        r.report({"stage": "deeplab", "stage_step": 200, "deeplab_miou_tune": 40.0}, step=1200)
    assert stop.value.args == (200,)
    r.report({"stage": "deeplab", "stage_step": 300, "deeplab_miou_tune": 10.0}, step=1300)
    assert trial.reported == [(100, 70.0), (200, 40.0)]
    # Without pruning (the random arm) the same values never stop the run.
    keep = RungReporter(_FakeTrial(floor=50.0), stage="deeplab", metric="deeplab_miou_tune", max_t=300, prune=False)
    keep.report({"stage": "deeplab", "stage_step": 200, "deeplab_miou_tune": 40.0}, step=1200)
    assert keep.values == [(200, 40.0)]
