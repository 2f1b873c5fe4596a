"""The gap benchmark's arithmetic: the arm's choice is its best *tune* value so far, valued by its
held-out number; hand-derived curves."""

from __future__ import annotations

import math

import pytest

from benchmarks.bench_gap import compute_to_share, gap_closed_curve

#: (cumulative compute, tune value or None when stopped, held-out value); paper 60, oracle 70.
HISTORY = [(10.0, 50.0, 60.0), (20.0, None, None), (30.0, 70.0, 65.0), (40.0, 60.0, 80.0)]


def test_the_curve_follows_the_choice_by_the_tune_value() -> None:
    """At 15: only the first trial (held-out 60 = the paper's): 0. At 30: the tune-best (70) holds 65:
    (65 - 60) / (70 - 60) = 0.5. At 40 the last trial's held-out 80 is not chosen (its tune 60 < 70):
    still 0.5. Before any completed trial: None."""
    assert gap_closed_curve(HISTORY, paper=60.0, oracle=70.0, at=[5.0, 15.0, 30.0, 40.0]) == \
        [None, 0.0, pytest.approx(0.5), pytest.approx(0.5)]


def test_compute_to_a_share_of_the_oracles_gain() -> None:
    assert compute_to_share(HISTORY, paper=60.0, oracle=70.0, share=0.5) == 30.0
    assert math.isinf(compute_to_share(HISTORY, paper=60.0, oracle=70.0, share=0.9))


@pytest.mark.slow
def test_quick_run_gives_the_settings_every_arm_and_the_medians() -> None:
    """The smoke run (tiny preset): the paper and hand-tuned settings stage by stage, one row per arm
    (each ran trials within its budget), and the median rows (the quick setting has no recorded oracle:
    the best held-out any arm chose stands in)."""
    from benchmarks import bench_gap

    rows = bench_gap.run(quick=True)
    settings = [r for r in rows if r["arm"].startswith("setting: ")]
    assert [r["arm"] for r in settings] == ["setting: synth_paper", "setting: synth (hand-tuned)"]
    assert all(0.0 <= r["deeplab_heldout"] <= 100.0 for r in settings)
    arms = [r for r in rows if r["arm"] in bench_gap.ARMS and r["seed"] == 0]
    assert [r["arm"] for r in arms] == list(bench_gap.ARMS)
    for r in arms:
        assert r["trials"] >= 1 and r["budget (runs)"] == bench_gap.BUDGET_QUICK
    medians = [r for r in rows if r["seed"] == "median"]
    assert {r["arm"] for r in medians} >= set(bench_gap.ARMS)
