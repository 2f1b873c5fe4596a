"""Shared training plumbing: poly LR, optimiser groups, atomic checkpoints, exact resume of data order."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from wsss_tune.stages.common import (
    CheckpointManager,
    ResumableSampler,
    build_optimizer,
    capture_rng,
    poly_lr,
    restore_rng,
    set_poly_lr,
)


def test_poly_lr_hand_values():
    """0.01 * (1 - 5000/20000)^0.9 = 0.01 * 0.75^0.9 = 0.0077217...; zero at the last step."""
    assert poly_lr(0.01, 0, 20000) == pytest.approx(0.01)
    assert poly_lr(0.01, 5000, 20000, 0.9) == pytest.approx(0.01 * 0.75**0.9)
    assert poly_lr(0.01, 20000, 20000) == 0.0


def test_optimizer_groups_keep_their_multiplier():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer([{"params": a.parameters(), "lr_mult": 1.0}, {"params": b.parameters(), "lr_mult": 10.0,
                                                                          "weight_decay": 0.0}],
                          kind="sgd", lr=0.01, momentum=5e-4, weight_decay=5e-4)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert opt.param_groups[0]["momentum"] == 5e-4
    set_poly_lr(opt, 0.01, 5, 10, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])
    with pytest.raises(ValueError, match="optimizer must be"):
        build_optimizer([{"params": a.parameters()}], kind="rmsprop", lr=1, momentum=0, weight_decay=0)


def test_checkpoints_keep_newest_and_skip_damaged(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((2,), float(step))})
    assert mgr.steps() == [20, 30]
    mgr.path(30).write_bytes(mgr.path(30).read_bytes()[:20])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        step, state = mgr.latest()
    assert step == 20 and state["w"][0] == 20
    assert not list(tmp_path.glob("*.tmp"))


def test_rng_roundtrip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"rng": capture_rng()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(mgr.latest()[1]["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_resumable_sampler_continues_exactly():
    full = list(itertools.islice(iter(ResumableSampler(7, seed=5)), 30))
    resumed = list(itertools.islice(iter(ResumableSampler(7, seed=5, start_index=12)), 18))
    assert full[12:] == resumed
    assert sorted(i % 7 for i in full[:7]) == list(range(7))  # each epoch is a permutation
    assert full[:7] != full[7:14]
