"""Shared training plumbing: poly LR, optimiser groups, atomic checkpoints, exact resume of data order."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from wsss_tune.reporting import DivergedError
from wsss_tune.stages.common import (
    CheckpointManager,
    LogWindow,
    ResumableSampler,
    TrainingLoop,
    TrainStep,
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


class _ListReporter:
    def __init__(self) -> None:
        self.reports: list[tuple[int, dict, str | None]] = []

    def report(self, metrics, *, step, checkpoint_dir=None):
        self.reports.append((step, dict(metrics), checkpoint_dir))


def _loop(tmp_path, reporter, total=5, **kwargs):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    evals = itertools.count(50)
    options = dict(log_every=2, checkpoint_every=4, evaluate=lambda: float(next(evals)), eval_every=3)
    options.update(kwargs)
    return TrainingLoop("toy", total=total, total_field="toy.iterations", ckpts=CheckpointManager(tmp_path, keep=2),
                        reporter=reporter, model=model, optimizer=optimizer, scaler=None, new_window=LogWindow,
                        **options)


def test_training_loop_logs_evaluates_checkpoints_and_reports_on_its_schedule(tmp_path):
    """5 steps, log every 2, evaluate every 3, checkpoint every 4 (and the last step logs and saves)."""
    reporter = _ListReporter()
    loop = _loop(tmp_path, reporter)
    assert loop.start == 0
    loop.restore()  # fresh run: nothing to load
    for step in range(1, 6):
        loop.window.add(**{"toy/loss": float(step)})
        loop.after_step(step, lr=0.1 / step)
    ckpt = str(tmp_path)
    assert reporter.reports == [
        (2, {"toy/loss": 1.5, "toy/lr": 0.05}, None),
        (3, {"toy_miou_tune": 50.0, "toy/lr": 0.1 / 3}, None),
        (4, {"toy/loss": 3.5, "toy/lr": 0.025}, ckpt),
        (5, {"toy/loss": 5.0, "toy/lr": 0.02}, ckpt),
    ]
    assert loop.last_logged == {"toy/loss": 5.0}

    # A new loop over the same folder continues after the newest checkpoint, with its last logged values.
    again = _loop(tmp_path, _ListReporter())
    assert again.start == 5
    again.restore()
    assert again.last_logged == {"toy/loss": 5.0}
    with pytest.raises(ValueError, match=r"step 5, past toy.iterations = 4"):
        _loop(tmp_path, _ListReporter(), total=4)


def test_training_loop_stops_on_a_non_finite_logged_value(tmp_path):
    loop = _loop(tmp_path, _ListReporter(), evaluate=None)
    loop.window.add(**{"toy/loss": float("nan")})
    with pytest.raises(DivergedError, match="toy/loss became nan at step 2"):
        loop.after_step(2, lr=0.1)


class _ToyData:
    """``get(i, rng)``: item ``i`` plus augmentation noise, the protocol of ``make_loader``."""

    def __len__(self) -> int:
        return 6

    def get(self, i, rng):
        x = torch.tensor([float(i), 1.0]) + torch.from_numpy(rng.normal(size=2).astype(np.float32))
        return {"x": x, "y": torch.tensor([float(i % 2)])}


def _toy_step(seen: list) -> TrainStep:
    """Two micro-batches per step of a linear regression; records the micro-batches and the LR it saw."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(batches, step):
        seen.append((step, [b["x"].clone() for b in batches], optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            loss = torch.nn.functional.mse_loss(model(b["x"]), b["y"]) / len(batches)
            loss.backward()
            total += loss.item()
        optimizer.step()
        return {"toy/loss": total}

    return TrainStep(model=model, optimizer=optimizer, scaler=None, run=run, micro_batches=2)


def _run(tmp_path, reporter, seen, total=5):
    step = _toy_step(seen)
    loop = TrainingLoop("toy", total=total, total_field="toy.iterations", ckpts=CheckpointManager(tmp_path, keep=2),
                        reporter=reporter, model=step.model, optimizer=step.optimizer, scaler=None,
                        new_window=LogWindow, log_every=1, checkpoint_every=2)
    loop.run(step, _ToyData(), batch_size=2, seed=3, lr=0.1, poly_power=1.0)
    return step.model


def test_training_loop_runs_a_step_with_poly_lr_and_resumes_exactly(tmp_path):
    """5 steps of 2 micro-batches of 2 items: the step sees the poly LR 0.1 * (1 - (step - 1) / 5) set
    before it and 2 fresh batches per step. A run cut after step 3 (checkpoint at 2) and restarted
    redoes step 3 on the same batches and ends with the same weights and logged losses."""
    seen: list = []
    full_rep = _ListReporter()
    full = _run(tmp_path / "full", full_rep, seen)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    assert [lr for _, _, lr in seen] == pytest.approx([0.1 * (1 - i / 5) for i in range(5)])
    assert all(len(batches) == 2 and batches[0].shape == (2, 2) for _, batches, _ in seen)

    class Stop(Exception):
        pass

    class StopAt3(_ListReporter):
        def report(self, metrics, *, step, checkpoint_dir=None):
            super().report(metrics, step=step, checkpoint_dir=checkpoint_dir)
            if step == 3:
                raise Stop

    cut: list = []
    with pytest.raises(Stop):
        _run(tmp_path / "cut", StopAt3(), cut)
    resumed: list = []
    rest = _ListReporter()
    model = _run(tmp_path / "cut", rest, resumed)
    assert [s for s, _, _ in resumed] == [3, 4, 5]
    for (_, a, _), (_, b, _) in zip(seen[2:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(full.state_dict().values(), model.state_dict().values(), strict=True))
    assert [m["toy/loss"] for _, m, _ in rest.reports] == [m["toy/loss"] for _, m, _ in full_rep.reports][2:]


def test_training_loop_refuses_a_step_of_other_objects(tmp_path):
    step = _toy_step([])
    loop = _loop(tmp_path, _ListReporter())
    with pytest.raises(ValueError, match="other objects"):
        loop.run(step, _ToyData(), batch_size=2, seed=0, lr=0.1, poly_power=1.0)
