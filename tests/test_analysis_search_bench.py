"""The search-efficiency benchmark's arithmetic: compute to a target, the speed-up and its bounds, and
the labelled surrogate's learning curves."""

from __future__ import annotations

import math

from benchmarks.bench_search_efficiency import (
    SURROGATE_MAX_T,
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
