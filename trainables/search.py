"""Optuna TPE through Ray Tune, aware of early stopping.

Ray's ``OptunaSearch`` tells Optuna a trial is COMPLETE with whatever value its last result held.
Under ASHA that is wrong: a trial stopped at a low rung would enter the study as finished with a
truncated value (e.g. the mIoU after 200 of 400 DeepLab steps), and TPE would model it as a full
result. :class:`FidelitySearch` tells Optuna

* COMPLETE, with the final value, only for a trial whose last result carries ``final: True`` (the
  trainable sends it after the whole pipeline ran);
* PRUNED for a trial that ended without one (stopped by the scheduler) - its intermediate values
  were reported on the way, at the fidelity step (``time_attr``), the one that made the scheduler
  stop it included (Tune hands that result to the searcher only at completion), so Optuna knows
  how far it got;
* FAIL for a trial that raised, or that finished without a finite value of the metric.

:class:`FullBudgetASHA` is ASHA that never stops a trial which has reached ``max_t``: the stage's last
evaluation arrives at ``max_t``, but the pipeline still has its final result to send (and later
stages to run), and a trial cut off there would count as pruned although it trained its full budget.

Each Optuna trial records its Ray trial id (user attribute :data:`RAY_TRIAL_ATTR`), so the study in
the experiment's SQLite file (``optuna-dashboard sqlite:///<experiment>/optuna.db``) maps onto the
trials table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from wsss_tune.spaces import SearchSpace, SpaceError

from .reporter import FINAL_KEY

__all__ = ["RAY_TRIAL_ATTR", "STUDY_FILE", "FidelitySearch", "FullBudgetASHA", "optuna_distributions", "study_storage"]

log = logging.getLogger(__name__)

#: Optuna user attribute holding the Ray trial id.
RAY_TRIAL_ATTR = "ray_trial_id"
#: The study's SQLite file in the experiment folder.
STUDY_FILE = "optuna.db"
#: Ray's result key counting a trial's reports (the step of intermediate values without ``time_attr``).
_TRAINING_ITERATION = "training_iteration"
#: Values an Optuna categorical distribution can hold.
_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


def optuna_distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The space's parameters as Optuna distributions, keyed by config path.

    ``int`` bounds are inclusive in both; ``uniform`` may have a ``step``; ``loguniform`` (or
    ``log: true``) samples on a log scale.

    Raises:
        SpaceError: a categorical choice Optuna cannot store (lists, mappings).
    """
    out: dict[str, BaseDistribution] = {}
    for p in space.params:
        if p.kind == "categorical":
            bad = [c for c in p.choices if not isinstance(c, _CATEGORICAL_TYPES)]
            if bad:
                raise SpaceError(space.where, f"params.{p.path}.choices", f"{bad[0]!r} is not a number, string, "
                                 "bool or null; Optuna's categorical parameters hold only those")
            out[p.path] = CategoricalDistribution(list(p.choices))
        elif p.kind == "int":
            assert p.low is not None and p.high is not None
            out[p.path] = IntDistribution(int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            log = p.kind == "loguniform" or p.log
            out[p.path] = FloatDistribution(float(p.low), float(p.high), log=log,
                                            step=None if log or not p.step else float(p.step))
    return out


def study_storage(path: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage on the SQLite file ``path`` (created if missing)."""
    return optuna.storages.RDBStorage(f"sqlite:///{path}")


class FidelitySearch(OptunaSearch):
    """``OptunaSearch`` that files scheduler-stopped trials as PRUNED (see the module docstring).

    Args:
        time_attr: Result key used as the step of Optuna's intermediate values (the fidelity);
            ``training_iteration`` when None or missing from a result.
        **kwargs: Passed to ``OptunaSearch`` (``space``, ``metric``, ``mode``, ``points_to_evaluate``,
            ``sampler``, ``study_name``, ``storage``).
    """

    def __init__(self, *, time_attr: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._time_attr = time_attr
        self._last_step: dict[str, int] = {}

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is not None and ot_trial is not None:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def _step(self, result: Mapping[str, Any]) -> int | None:
        """The fidelity of a result: ``time_attr`` when set (None if the result lacks it, e.g. a stage
        served from the cache), else ``training_iteration``."""
        value = result.get(self._time_attr or _TRAINING_ITERATION)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the metric as an intermediate value at the result's fidelity; results without the
        metric (training logs) or without a fidelity are skipped, as is the final result."""
        if isinstance(self.metric, list) or trial_id in self._completed_trials or result.get(FINAL_KEY):
            return
        self._report_intermediate(trial_id, result)

    def _report_intermediate(self, trial_id: str, result: Mapping[str, Any]) -> None:
        value = result.get(self.metric)
        ot_trial = self._ot_trials.get(trial_id)
        step = self._step(result)
        if ot_trial is None or not isinstance(value, int | float) or isinstance(value, bool) or step is None:
            return
        if not math.isfinite(value) or step <= self._last_step.get(trial_id, -1):
            return  # Optuna keeps the first value of a step; a repeated step adds nothing
        self._last_step[trial_id] = step
        try:
            ot_trial.report(float(value), step)
        except (RuntimeError, ValueError) as exc:  # e.g. the trial finished before a resume
            log.warning("optuna trial of %s: intermediate value not recorded (%s)", trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        value = (result or {}).get(self.metric)
        final = bool(result and result.get(FINAL_KEY))
        if error:
            state, values = TrialState.FAIL, None
        elif final and isinstance(value, int | float) and math.isfinite(value):
            state, values = TrialState.COMPLETE, float(value)
        elif final:
            # Finished, but the metric is missing or NaN: nothing TPE could learn from.
            ot_trial.set_user_attr("fail_reason", f"final {self.metric} = {value!r}")
            state, values = TrialState.FAIL, None
        else:
            # The result that made the scheduler stop the trial never reached on_trial_result.
            if result:
                self._report_intermediate(trial_id, result)
            state, values = TrialState.PRUNED, None
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except (RuntimeError, ValueError) as exc:  # e.g. told already by a driver that was then killed
            log.warning("optuna trial of %s: outcome not recorded (%s)", trial_id, exc)
        self._completed_trials.add(trial_id)


class FullBudgetASHA(ASHAScheduler):
    """``ASHAScheduler`` that lets a trial which reached ``max_t`` run to its end (see the module docstring).

    Its result at ``max_t`` still enters the top rung, so later trials are compared against it.
    Arguments as ``ASHAScheduler``'s (``stop_last_trials`` is fixed to False).
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, stop_last_trials=False, **kwargs)
        self._full_budget_attr, self._full_budget = time_attr, max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        t = result.get(self._full_budget_attr)
        if isinstance(t, int | float) and t >= self._full_budget:
            return TrialScheduler.CONTINUE
        return action
