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
