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

**The reference is never pruned.** The searcher marks the trial that evaluates the space's reference
point, and those of its named reference points (user attribute :data:`REFERENCE_ATTR`);
:class:`FullBudgetASHA` asks it (:meth:`FidelitySearch.protected`) and lets these trials run their
whole budget, so "gain over the reference" always compares completed values.

**Budgets in steps.** With ``step_budget`` the searcher starts a new trial only while the compute
spent (each finished trial's last ``time_attr``) plus the full budget of each running trial plus one
more full trial fits; then it tells Ray the search is finished.

:class:`FullBudgetASHA` is ASHA that never stops a trial which has reached ``max_t``: the stage's last
evaluation arrives at ``max_t``, but the pipeline still has its final result to send (and later
stages to run), and a trial cut off there would count as pruned although it trained its full budget.

Each Optuna trial records its Ray trial id (user attribute :data:`RAY_TRIAL_ATTR`) and every id it
ran under (:data:`ATTEMPTS_ATTR`), so the study in the experiment's SQLite file
(``optuna-dashboard sqlite:///<experiment>/optuna.db``) maps onto the trials table.

**The study is the searcher's state.** :class:`FidelitySearch` never pickles itself (Ray's
``searcher-state-*.pkl``) and refuses to restore from a pickle: unpickling a file from an experiment
folder would run whatever code it holds. A resumed sweep builds a new searcher on the same study
(:func:`resume_plan`): it continues the search trials that were running (:class:`Continue`: same
Optuna trial, same values, a new Ray trial id) and asks Optuna for the rest, so TPE sees every
trial that finished before.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from wsss_tune.spaces import SearchSpace, SpaceError

from .reporter import FINAL_KEY

__all__ = ["RAY_TRIAL_ATTR", "ATTEMPTS_ATTR", "REFERENCE_ATTR", "STUDY_FILE", "Continue", "ResumePlan", "FidelitySearch", "FullBudgetASHA", "attempts_of", "stage_metric_names",
           "optuna_distributions", "resume_plan", "study_storage"]

log = logging.getLogger(__name__)

#: Optuna user attribute holding the Ray trial id.
RAY_TRIAL_ATTR = "ray_trial_id"
#: Optuna user attribute listing every Ray trial id the search trial ran under, oldest first (a
#: resumed sweep continues an interrupted trial under a new id).
ATTEMPTS_ATTR = "ray_trial_ids"
#: Optuna user attribute marking the trial that evaluates the reference point (never pruned).
REFERENCE_ATTR = "reference"
#: The study's SQLite file in the experiment folder.
STUDY_FILE = "optuna.db"
#: Ray's result key counting a trial's reports (the step of intermediate values without ``time_attr``).
_TRAINING_ITERATION = "training_iteration"
#: Values an Optuna categorical distribution can hold.
_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


def _same_value(a: Any, b: Any) -> bool:
    """Equal values; numbers up to a relative 1e-9 (a value that went through JSON or SQLite)."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


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


@dataclass(frozen=True)
class Continue:
    """A search trial to continue: its Optuna trial (``number`` in the study, ``storage_id`` in the
    storage) and the Ray trial ids it ran under so far."""

    number: int
    storage_id: int
    attempts: tuple[str, ...]


@dataclass(frozen=True)
class ResumePlan:
    """What a resumed sweep runs: the running trials it continues, the failed ones it runs again
    (as new Optuna trials with the same values), and how many trials in all (``num_samples``)."""

    continued: tuple[Continue, ...]
    rerun: tuple[tuple[Mapping[str, Any], tuple[str, ...]], ...]
    num_samples: int
    finished: int


def attempts_of(frozen: Any) -> tuple[str, ...]:
    """The Ray trial ids a search trial (an Optuna trial) ran under, oldest first."""
    ids = frozen.user_attrs.get(ATTEMPTS_ATTR)
    if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
        return tuple(ids)
    one = frozen.user_attrs.get(RAY_TRIAL_ATTR)
    return (one,) if isinstance(one, str) else ()


def resume_plan(study: optuna.Study, *, requested: int, rerun_failed: bool = False) -> ResumePlan:
    """What is left of a search of ``requested`` trials whose state is ``study``.

    Finished trials (complete, pruned, failed) stay as they are; running ones (the driver stopped
    while they ran, or before Ray started them) are continued; trials waiting in the queue (the
    reference point, when the driver stopped before asking for it) are asked as usual. With
    ``rerun_failed`` a failed trial runs again under a new Optuna trial with the same values.
    """
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL] if rerun_failed else []
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials) - len(failed)
    remaining = max(0, requested - finished)
    continued = tuple(Continue(number=t.number, storage_id=t._trial_id, attempts=attempts_of(t))
                      for t in running[:remaining])
    for extra in running[remaining:]:  # more running than the search asked for (cannot happen unless edited)
        study.tell(extra.number, state=TrialState.FAIL)
    rerun = tuple((dict(t.params), attempts_of(t)) for t in failed[: max(0, remaining - len(continued))])
    return ResumePlan(continued=continued, rerun=rerun, num_samples=remaining, finished=finished)


class FidelitySearch(OptunaSearch):
    """``OptunaSearch`` that files scheduler-stopped trials as PRUNED (see the module docstring).

    Args:
        time_attr: Result key used as the step of Optuna's intermediate values (the fidelity);
            ``training_iteration`` when None or missing from a result.
        resume: On a resumed sweep, the search trials to continue (handed to the first Ray trials,
            before Optuna is asked for new ones) and the failed ones to run again.
        reference: The reference point; the trial that evaluates it is marked and protected from
            the scheduler (:meth:`protected`).
        references: More reference points (the space's named ones), marked and protected the same way.
        step_budget / full_steps: Stop asking for trials once the compute in ``time_attr`` units would
            pass ``step_budget``, a full trial costing ``full_steps`` (module docstring).
        count_stage: Count only the steps of results whose ``stage`` is this (the searched stage's
            training; upstream stages a trial builds report their own steps).
        **kwargs: Passed to ``OptunaSearch`` (``space``, ``metric``, ``mode``, ``points_to_evaluate``,
            ``sampler``, ``study_name``, ``storage``).
    """

    def __init__(self, *, time_attr: str | None = None, resume: ResumePlan | None = None,
                 reference: Mapping[str, Any] | None = None,
                 references: Sequence[Mapping[str, Any]] = (), step_budget: int | None = None,
                 full_steps: int | None = None, count_stage: str | None = None, **kwargs: Any) -> None:
        if step_budget is not None and (not time_attr or not full_steps or full_steps < 1):
            raise ValueError("a step budget needs the time_attr that counts steps and the steps of a full trial")
        # Set before OptunaSearch's constructor, which sets up the study (see _setup_study).
        self._to_continue: list[Continue] = list(resume.continued) if resume else []
        self._to_rerun: Sequence[tuple[Mapping[str, Any], tuple[str, ...]]] = resume.rerun if resume else ()
        self._step_budget, self._full_steps, self._count_stage = step_budget, full_steps, count_stage
        #: Steps of the trials that finished before this searcher started (a resumed search).
        self._finished_steps_before = 0
        super().__init__(**kwargs)
        self._time_attr = time_attr
        self._last_step: dict[str, int] = {}
        self._references = [dict(r) for r in ([reference] if reference else []) + list(references) if r]
        self._protected: set[str] = set()
        #: Steps each trial reached (its largest ``time_attr``), for the step budget.
        self._steps: dict[str, int] = {}

    def protected(self, trial_id: str) -> bool:
        """Whether ``trial_id`` evaluates the reference point (the scheduler must not stop it)."""
        return trial_id in self._protected

    def _is_reference(self, config: Mapping[str, Any]) -> bool:
        return any(all(k in config and _same_value(config[k], v) for k, v in ref.items())
                   for ref in self._references)

    def _budget_left(self) -> bool:
        """Whether one more full trial fits the step budget (always, without one)."""
        if self._step_budget is None:
            return True
        assert self._full_steps is not None
        running = [t for t in self._ot_trials if t not in self._completed_trials]
        spent = sum(self._steps.get(t, 0) for t in self._ot_trials if t in self._completed_trials)
        spent += self._finished_steps_before
        return spent + self._full_steps * (len(running) + 1) <= self._step_budget

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if isinstance(self._metric, str) and self._ot_study.metric_names != [self._metric]:
            # optuna-dashboard and trials_dataframe() name the value after the searched metric
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self._metric])
        if self._step_budget is not None:
            assert self._full_steps is not None
            for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                        TrialState.FAIL)):
                steps = self._full_steps if t.state == TrialState.COMPLETE else max(t.intermediate_values, default=0)
                self._finished_steps_before += int(steps)
        for params, attempts in self._to_rerun:
            self._ot_study.enqueue_trial(dict(params), user_attrs={ATTEMPTS_ATTR: list(attempts)})
        self._to_rerun = ()

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and not self._to_continue and not self._budget_left():
            from ray.tune.search import Searcher

            return Searcher.FINISHED
        if trial_id not in self._ot_trials and self._to_continue and self._space and self._metric:
            item = self._to_continue.pop(0)
            ot_trial = optuna.trial.Trial(self._ot_study, item.storage_id)
            self._ot_trials[trial_id] = ot_trial
            steps = ot_trial.storage.get_trial(item.storage_id).intermediate_values
            if steps:
                self._last_step[trial_id] = max(steps)
            config: dict | None = dict(ot_trial.params)
        else:
            config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is not None and ot_trial is not None:
            frozen = ot_trial.storage.get_trial(ot_trial._trial_id)
            attempts = [i for i in attempts_of(frozen) if i != trial_id]
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            ot_trial.set_user_attr(ATTEMPTS_ATTR, [*attempts, trial_id])
            if frozen.user_attrs.get(REFERENCE_ATTR) or self._is_reference(config):
                ot_trial.set_user_attr(REFERENCE_ATTR, True)
                self._protected.add(trial_id)
        return config

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing is pickled: the study in ``optuna.db`` is the searcher's state (module docstring)."""

    def save(self, checkpoint_path: str) -> None:
        raise NotImplementedError("the searcher's state is its Optuna study; nothing is pickled")

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        self.restore(checkpoint_dir)

    def restore(self, checkpoint_path: str) -> None:
        raise RuntimeError(f"refusing to unpickle {checkpoint_path}: a pickle from an experiment folder can run "
                           "any code; `wsss-tune resume` rebuilds the searcher from the Optuna study instead")

    def _step(self, result: Mapping[str, Any]) -> int | None:
        """The fidelity of a result: ``time_attr`` when set (None if the result lacks it, e.g. a stage
        served from the cache), else ``training_iteration``."""
        value = result.get(self._time_attr or _TRAINING_ITERATION)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
        return None

    def _count_steps(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        if self._step_budget is None or not result:
            return
        if result.get(FINAL_KEY):
            step: int | None = self._full_steps
        elif self._count_stage is not None and result.get("stage") != self._count_stage:
            return
        else:
            step = self._step(result)
        if step is not None:
            self._steps[trial_id] = max(step, self._steps.get(trial_id, 0))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Report the metric as an intermediate value at the result's fidelity; results without the
        metric (training logs) or without a fidelity are skipped, as is the final result."""
        self._count_steps(trial_id, result)
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
        self._count_steps(trial_id, result)
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
        _record_stage_metrics(ot_trial, result)
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except (RuntimeError, ValueError) as exc:  # e.g. told already by a driver that was then killed
            log.warning("optuna trial of %s: outcome not recorded (%s)", trial_id, exc)
        self._completed_trials.add(trial_id)


def stage_metric_names() -> tuple[str, ...]:
    """Every stage's mask-quality metrics (``<prefix>_miou``, ``_tune``, ``_heldout``, from the stage
    graph), the ones each Optuna trial records as user attributes."""
    from wsss_tune.stages import graph

    return tuple(f"{prefix}_miou{half}" for _, prefix in graph.metric_columns() for half in ("", "_tune", "_heldout"))


def _record_stage_metrics(ot_trial: optuna.trial.Trial, result: Mapping[str, Any] | None) -> None:
    """The stage metrics a trial's last result holds, as user attributes (a pruned trial's are the
    values when it stopped): the study alone shows how each stage did."""
    if not result:
        return
    for name in stage_metric_names():
        value = result.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            try:
                ot_trial.set_user_attr(name, float(value))
            except (RuntimeError, ValueError) as exc:  # the trial finished before a resume
                log.warning("optuna trial %s: %s not recorded (%s)", ot_trial.number, name, exc)


class FullBudgetASHA(ASHAScheduler):
    """``ASHAScheduler`` that lets a trial which reached ``max_t`` run to its end (see the module
    docstring), and never stops a protected trial (the reference, :meth:`FidelitySearch.protected`).

    Their results still enter the rungs, so later trials are compared against them.
    Arguments as ``ASHAScheduler``'s (``stop_last_trials`` is fixed to False), plus ``protected``:
    trial id -> whether the trial must run its whole budget.
    """

    def __init__(self, *, time_attr: str, max_t: int, protected: Callable[[str], bool] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, stop_last_trials=False, **kwargs)
        self._full_budget_attr, self._full_budget = time_attr, max_t
        self._protected = protected

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Keep the metric it was built with: the tuner's metric is the completed value
        (``trainables.callbacks.OBJECTIVE_KEY``), which intermediate results do not carry."""
        if self._metric and self._mode:
            return True
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        t = result.get(self._full_budget_attr)
        if isinstance(t, int | float) and t >= self._full_budget:
            return TrialScheduler.CONTINUE
        if self._protected is not None and self._protected(trial.trial_id):
            return TrialScheduler.CONTINUE
        return action
