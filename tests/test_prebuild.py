"""Which artifacts a search's trials all share (built first, before trials claim resources)."""

from __future__ import annotations

import pytest

from wsss_tune.spaces import load_space
from wsss_tune.trainables.prebuild import shared_artifacts


@pytest.mark.parametrize(("space", "shared"), [
    # EPS's tau and lam key the EPS model: nothing is shared
    ("synth_eps", ()),
    # the walk's beta/t/alpha key only the walk: EPS and AffinityNet are shared
    ("synth_rw", ("eps_model", "eps", "affinity")),
    ("rw", ("eps_model", "eps", "affinity")),
    # DeepLab's learning rates key DeepLab: every mask stage is shared
    ("synth_deeplab", ("eps_model", "eps", "affinity", "rw")),
    ("deeplab", ("eps_model", "eps", "affinity", "rw")),
    # a space over EPS and later stages shares nothing
    ("synth_gap", ()),
])
def test_shared_artifacts_follow_the_searched_keys(space: str, shared: tuple[str, ...]) -> None:
    sp = load_space(space)
    assert shared_artifacts(sp, sp.base_config()) == shared


def test_cascade_stage_shares_its_frozen_upstream() -> None:
    """The walk's search in a cascade of ``synth_gap``: EPS values frozen, EPS and AffinityNet shared."""
    from wsss_tune.trainables.phases import cascade_spaces

    parts = dict(cascade_spaces(load_space("synth_gap")))
    walk, deeplab = parts["affinity"], parts["deeplab"]
    assert shared_artifacts(walk, walk.base_config()) == ("eps_model", "eps", "affinity")
    assert shared_artifacts(deeplab, deeplab.base_config()) == ("eps_model", "eps", "affinity", "rw")
