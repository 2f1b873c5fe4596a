"""Building the Ray Tune ``Tuner`` of a sweep: the searcher, the scheduler, the trial resources and
the callbacks (W&B logging, the live trial table).

:func:`build_tuner` turns a :class:`~trainables.planning.SweepPlan` into a ``Tuner`` whose ``fit``
runs the search (new or resumed from the Optuna study, :class:`~trainables.search.ResumePlan`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from wsss_tune.analysis.results import ResourcesRecord
from wsss_tune.spaces import REFERENCE_LABEL
from wsss_tune.stages import graph

from .planning import SweepPlan
from .search import STUDY_FILE, ResumePlan, optuna_distributions
from .trainable import SETTINGS_KEY, TRAINABLES

__all__ = ["WANDB_UPLOAD_TIMEOUT_S", "CHECKPOINTS_TO_KEEP", "with_resources", "callbacks", "build_tuner"]

#: Seconds the W&B callback waits for a run's upload when the experiment ends (Ray's default is
#: 1,800; offline runs have nothing to upload).
WANDB_UPLOAD_TIMEOUT_S = 30
#: Tune checkpoints kept per trial (the newest; training resumes from the store's work folders).
CHECKPOINTS_TO_KEEP = 1


def with_resources(trainable: str, resources: ResourcesRecord) -> Any:
    """The named trainable with one trial's CPUs and GPUs attached."""
    from ray import tune

    return tune.with_resources(TRAINABLES[trainable], {"cpu": resources.cpus_per_trial,
                                                      "gpu": resources.gpus_per_trial})


def callbacks(plan: SweepPlan, *, progress: str) -> list[Any]:
    """W&B logging (unless the sweep's W&B mode is ``off``) and, for ``progress='rich'``, the live table."""
    out: list[Any] = []
    w = plan.record.wandb
    if w.mode != "off":
        from .wandb_logging import wandb_callback

        plan.exp_dir.mkdir(parents=True, exist_ok=True)
        out.append(wandb_callback(plan, upload_timeout=WANDB_UPLOAD_TIMEOUT_S))
    if progress == "rich":
        from .progress import TrialTable

        out.append(TrialTable(metric=plan.space.metric, mode=plan.space.mode,
                              params=[p.path for p in plan.space.params], title=plan.name,
                              total=plan.num_samples))
    return out


def _stderr_line(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(text, highlight=False)


def _distinct(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``points`` without the repeats of an earlier one (two reference points may coincide; the seed
    re-runs' points differ in ``run.seed``, which counts)."""
    out: dict[str, dict[str, Any]] = {}
    for p in points:
        out.setdefault(json.dumps(dict(p), sort_keys=True, default=str), dict(p))
    return list(out.values())


def build_tuner(plan: SweepPlan, *, progress: str, seed: int, max_failures: int, max_concurrent: int | None,
                resume: ResumePlan | None = None, study_name: str | None = None,
                points: Sequence[Mapping[str, Any]] | None = None, step_budget: int | None = None) -> Any:
    """The ``Tuner`` of ``plan``: Optuna TPE (seeded) on the study in the experiment folder, ASHA when
    the space has a fidelity, ``plan.num_samples`` trials; ``resume`` continues a search from its study.
    With ``plan.prebuild`` the artifacts every trial of the search shares are built first, in one Ray
    task with one trial's resources (:func:`~trainables.prebuild.prebuild_shared`).

    Args:
        study_name: The study of this search in the experiment's storage (default: the experiment's
            name; a cascade has one per stage).
        points: Points evaluated first (default: the space's reference points, the base config's and each
            named one, :meth:`~wsss_tune.spaces.SearchSpace.reference_points`); a point equal to an earlier
            one is evaluated once. Trials of the reference points are never pruned.
        step_budget: Stop starting trials once their steps of the searched stage would pass this.
    """
    from optuna.logging import WARNING, set_verbosity
    from optuna.samplers import TPESampler
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from .search import FidelitySearch, FullBudgetASHA, study_storage
    from .trainable import trial_dirname

    space = plan.space
    set_verbosity(WARNING)  # one line per trial from Optuna would fight the live table
    f = space.fidelity
    full_steps = plan.settings.final_t if step_budget is not None else None
    named = [v for k, v in space.reference_points().items() if k != REFERENCE_LABEL]
    if points is None:
        points = [dict(plan.reference_point), *named]
    points = _distinct(points)
    searcher = FidelitySearch(
        space=optuna_distributions(space), metric=space.metric, mode=space.mode,
        # A resumed search asked for its first points already (they wait in the study's queue if the
        # driver stopped first).
        points_to_evaluate=None if resume is not None else [dict(p) for p in points],
        sampler=TPESampler(seed=seed), study_name=study_name or plan.name,
        storage=study_storage(str(plan.exp_dir / STUDY_FILE)),
        time_attr=plan.settings.time_attr, resume=resume, reference=plan.reference_point, references=named,
        step_budget=step_budget, full_steps=full_steps,
        count_stage=graph.fidelity_report_name(graph.tune_metrics()[space.metric][0]),
    )
    scheduler = None
    if f is not None:
        scheduler = FullBudgetASHA(time_attr=f.time_attr, metric=space.metric, mode=space.mode, max_t=f.max_t,
                                   grace_period=f.grace_period, reduction_factor=f.reduction_factor,
                                   protected=searcher.protected)
    from .callbacks import OBJECTIVE_KEY, CompleteCSVLogger, TrialOutcome

    if plan.prebuild:
        from .prebuild import prebuild_shared

        prebuild_shared(plan, log=_stderr_line if progress != "off" else None)
    return Tuner(
        with_resources(plan.trainable, plan.record.resources),
        param_space={SETTINGS_KEY: plan.settings.to_trial_config(plan.exp_dir)},
        # The tuner's metric is the completed value (only finished trials carry it), so Ray's own
        # ResultGrid.get_best_result() picks the best completed trial; searcher and scheduler keep
        # the searched metric, which they also read mid-run.
        tune_config=TuneConfig(metric=OBJECTIVE_KEY, mode=space.mode,
                               search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                               max_concurrent_trials=max_concurrent, reuse_actors=True,
                               trial_dirname_creator=trial_dirname),
        run_config=RunConfig(name=plan.exp_dir.name, storage_path=str(plan.exp_dir.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
                             # outcome marks first: the other callbacks see them
                             callbacks=[TrialOutcome(metric=space.metric), CompleteCSVLogger(),
                                        *callbacks(plan, progress=progress)],
                             verbose=1 if progress == "ray" else 0),
    )
