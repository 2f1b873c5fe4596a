"""Failing trials: a diverging trial is caught at once, retried per ``max_failures``, recorded as
failed with its reason, and the sweep goes on.

The sweep runs the real EPS stage on the session's tiny synthetic dataset with a space written here:
one categorical parameter, the EPS learning rate, whose choices are the ``synth`` value (0.002,
the reference point, evaluated first) and 1e30, which blows the weights up at the first update.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from wsss_tune.analysis import load_experiment
from wsss_tune.trainables import SMOKE_OVERRIDES, resume_sweep, run_sweep

#: A learning rate that makes the first update diverge (the synth EPS lr is 0.002).
DIVERGING_LR = 1.0e30
#: The synth config's EPS learning rate (wsss_tune/configs/synth.yaml), the reference point.
SYNTH_EPS_LR = 0.002
#: Retries of a failing trial in this test (each failure is one attempt: 1 + retries attempts).
MAX_FAILURES = 1


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local CPU-only Ray instance for this module (the machine has 2 cores)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _lr_space(path: Path, *, samples: int) -> Path:
    space = {
        "base": "synth", "stages": ["eps"], "metric": "eps_miou_tune", "mode": "max",
        "tune_split": "train_tune", "heldout_split": "train_heldout", "num_samples": samples,
        "params": {"eps.lr": {"kind": "categorical", "choices": [SYNTH_EPS_LR, DIVERGING_LR]}},
    }
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_diverging_trial_fails_with_reason_is_retried_and_the_sweep_goes_on(
        ray_local: None, synth_root: Path, tmp_path: Path) -> None:
    """4 trials of the lr space (seed 0), ``max_failures=1``, logging every 2 EPS steps.

    * Every trial with lr 0.002 completes; the reference (trial 0) is one of them.
    * Every trial with lr 1e30 fails: step 1's loss is finite (computed before any update), the
      update with lr 1e30 (Adam moves each weight by about lr; the poly factor is 1 at step 1)
      overflows float32 (max ~3.4e38) in the next forward pass, so step 2's loss is non-finite;
      ``check_finite`` runs on every step's loss, so the reason names ``eps/loss`` at step <= 2, the
      first logged step (``eps.log_every`` = 2), and the trial never reaches an evaluation.
    * Each failed trial ran 1 + MAX_FAILURES = 2 attempts (``num_failures`` = 2), the others 0.
    * The study files the failed ones as FAIL, the rest COMPLETE; trials.parquet (read back from
      disk) keeps the reason; the total is the 4 requested.
    """
    result = run_sweep(_lr_space(tmp_path / "lr.yaml", samples=4), data=synth_root, storage=tmp_path / "exp",
                       name="lr", seed=0, max_failures=MAX_FAILURES, wandb="off", progress="off",
                       overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), reseed=None)
    by_lr: dict[float, list] = {SYNTH_EPS_LR: [], DIVERGING_LR: []}
    for t in result.trials:
        by_lr[t.params["eps.lr"]].append(t)
    assert by_lr[DIVERGING_LR], "seed 0 drew no diverging trial; the test needs one"
    assert result.counts["total"] == 4
    assert [t.status for t in by_lr[SYNTH_EPS_LR]] == ["completed"] * len(by_lr[SYNTH_EPS_LR])
    assert result.reference is not None and result.reference.status == "completed"
    assert {t.metrics["num_failures"] for t in by_lr[SYNTH_EPS_LR]} == {0}
    for t in by_lr[DIVERGING_LR]:
        assert t.status == "failed", t
        match = re.search(r"eps/loss became (nan|inf|-inf) at step (\d+)", t.error or "")
        assert match and int(match.group(2)) <= SMOKE_OVERRIDES["eps.log_every"], t.error
        assert t.metrics["num_failures"] == 1 + MAX_FAILURES
        assert "eps_miou_tune" not in t.metrics

    again = load_experiment(result.path)
    assert {t.trial_id: t.error for t in again.trials} == {t.trial_id: t.error for t in result.trials}
    assert again.counts == result.counts
    study = optuna.load_study(study_name="lr", storage=result.info["study"]["storage"])
    states = sorted((t.params["eps.lr"], t.state.name) for t in study.trials)
    assert states == sorted((t.params["eps.lr"], "FAIL" if t.status == "failed" else "COMPLETE")
                            for t in result.trials)
    assert TrialState.RUNNING not in [t.state for t in study.trials]

    # `resume --resume-errored`: each failed trial runs again with its values, under a new Ray id
    # and a new Optuna trial; it fails again for the same reason, and its row replaces the old one
    # (named in resumed_from), so the count stays the 4 requested.
    failed_ids = {t.trial_id for t in by_lr[DIVERGING_LR]}
    rerun = resume_sweep(result.path, resume_errored=True, progress="off")
    assert rerun.counts["total"] == 4 and rerun.counts["failed"] == len(failed_ids), rerun.counts
    again_failed = [t for t in rerun.trials if t.status == "failed"]
    assert {old for t in again_failed for old in t.resumed_from} == failed_ids
    assert all(t.params["eps.lr"] == DIVERGING_LR and "eps/loss became" in (t.error or "") for t in again_failed)
    assert {t.trial_id for t in rerun.trials if t.status == "completed"} == \
        {t.trial_id for t in by_lr[SYNTH_EPS_LR]}
    study = optuna.load_study(study_name="lr", storage=rerun.info["study"]["storage"])
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 2 * len(failed_ids)
