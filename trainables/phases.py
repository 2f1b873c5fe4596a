"""Experiments made of several searches: the stage-wise (cascade) search and the seed re-runs.

**Cascade.** ``--mode cascade`` splits a space's parameters by the stage that reads them (EPS, the
walk, DeepLab; :func:`cascade_spaces`) and searches them in pipeline order, each on its own cheap
metric: EPS on ``eps_miou_tune``, then the walk on ``rw_miou_tune`` with EPS and AffinityNet from the
cache, then DeepLab on the space's metric with the space's fidelity (ASHA). When a stage's search
ends, its best config (by its tune metric, completed trials only) is frozen into the next stages'
base config. Each stage has its own Optuna study in the experiment's ``optuna.db``
(``<experiment>/<stage>``), its own budget (:class:`StageBudget`: trials, or training steps of that
stage) and its own reference point (the base values, the earlier stages' best frozen in), which
the scheduler never stops.

**Seed re-runs.** A search picks its winner from single runs, and the best of many noisy runs is
usually lucky (the winner's curse). After the search the ``top_k`` configs of the last search and
the reference setting run again with ``seeds`` more values of ``run.seed`` (which seeds every
stage), in a phase ``reseed`` with its own study; a config that has no run at the base seed yet (the
reference of a cascade) gets one too. The winner is then the best *mean* tune metric
(:func:`wsss_tune.analysis.results.seed_rows`), the gains are differences of means, tune and
held-out, beside the seed spread, and ``export`` writes the winner. Named comparison configs
(``--compare-config synth``) run the same way and are shown, never chosen.

Every phase runs as Ray Tune trials of the same experiment folder (one trial table, one W&B group,
one report), and :func:`run_phases` is what both ``sweep`` and ``resume`` call: a phase whose search
ended is skipped, an interrupted one continues from its study, the frozen values are read back from
the studies (the source of truth), never from memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_tune.analysis.results import (
    RESEED_PHASE,
    SEED_PARAM,
    ExperimentRecord,
    PhaseRecord,
    ReseedRecord,
    config_key,
    space_to_dict,
    write_sweep,
)
from wsss_tune.config import to_dict
from wsss_tune.spaces import (
    HELDOUT_SUFFIX,
    TUNE_SUFFIX,
    Param,
    SearchSpace,
    SpaceError,
    config_point,
    space_from_dict,
    validate,
)
from wsss_tune.stages import graph

__all__ = [
    "SEARCH_MODES",
    "JOINT_PHASE",
    "StageBudget",
    "parse_stage_budget",
    "cascade_spaces",
    "experiment_phases",
    "phase_space",
    "reseed_points",
    "run_phases",
]

#: How a sweep searches: one search over every parameter, or one per stage in pipeline order.
SEARCH_MODES = ("joint", "cascade")
#: The phase of a joint search followed by seed re-runs.
JOINT_PHASE = "search"
#: Values ``run.seed`` may take in the re-runs (a non-negative 31-bit integer).
_SEED_RANGE = (0, 2**31 - 1)
_BUDGET_RE = re.compile(r"^\s*([A-Za-z_][\w]*)\s*=\s*(\d+)\s*(steps?)?\s*$")


@dataclass(frozen=True)
class StageBudget:
    """What one stage's search may spend: ``trials``, or ``steps`` of that stage's training (then it
    starts trials while their full budget still fits; at most ``trials`` if both are given)."""

    trials: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("trials", "steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"stage budget {name}={v!r}: expected an integer >= 1")
        if self.trials is None and self.steps is None:
            raise ValueError("a stage budget needs trials or steps")


def parse_stage_budget(text: str) -> tuple[str, StageBudget]:
    """``eps=6`` (six trials) or ``deeplab=1200steps`` (1,200 DeepLab training steps) -> (stage, budget).

    Raises:
        ValueError: not of that form, or an unknown stage (the message names the text and the stages).
    """
    m = _BUDGET_RE.match(text)
    if not m:
        raise ValueError(f"stage budget {text!r}: expected STAGE=N (trials) or STAGE=Nsteps, e.g. eps=6 or "
                         "deeplab=1200steps")
    stage, n, steps = m.group(1), int(m.group(2)), bool(m.group(3))
    if stage not in graph.stage_names():
        raise ValueError(f"stage budget {text!r}: unknown stage {stage!r}; stages: {', '.join(graph.stage_names())}")
    return stage, StageBudget(steps=n) if steps else StageBudget(trials=n)


def _stage_metric(stage: str) -> str:
    for metric, (owner, _) in graph.tune_metrics().items():
        if owner == stage:
            return metric
    raise SpaceError("<cascade>", "stages", f"stage {stage!r} reports no tune metric; it cannot be searched alone")


def cascade_spaces(space: SearchSpace) -> list[tuple[str, SearchSpace]]:
    """The space split by the stage that reads each parameter, in pipeline order: each part searches
    that stage's parameters on that stage's tune metric (derived halves of its evaluation split),
    running the stages it needs; the last stage keeps the space's fidelity.

    Raises:
        SpaceError: a parameter no stage reads (``run.*``), or a space whose halves are id-list files
        (the earlier stages are measured on other splits; a cascade needs the derived halves).
    """
    cfg = space.base_config()
    if space._derived_halves(cfg) is None:
        raise SpaceError(space.where, "tune_split", "a cascade measures each stage on the derived halves of its "
                         "own evaluation split; use <split>_tune / <split>_heldout, not id-list files")
    sections = graph.section_stages()
    by_stage: dict[str, list[Param]] = {}
    for p in space.params:
        stage = sections.get(p.path.partition(".")[0])
        if stage is None:
            raise SpaceError(space.where, f"params.{p.path}", "no stage reads this section; a cascade searches "
                             "each stage's own parameters")
        by_stage.setdefault(stage, []).append(p)
    final_stage = graph.tune_metrics()[space.metric][0]
    needs = graph.stage_requirements()
    out = []
    for stage in graph.stage_names():
        if stage not in by_stage:
            continue
        metric = _stage_metric(stage)
        split = getattr(cfg.data, graph.tune_metrics()[metric][1])
        stages = tuple(s for s in space.stages if s in needs[stage]) if stage != final_stage else space.stages
        sub = dataclasses.replace(space, name=f"{space.name}/{stage}", params=tuple(by_stage[stage]), metric=metric,
                                  stages=stages, fidelity=space.fidelity if stage == final_stage else None,
                                  tune_split=split + TUNE_SUFFIX, heldout_split=split + HELDOUT_SUFFIX)
        validate(sub)
        out.append((stage, sub))
    return out


def _reseed_space(space: SearchSpace, points: int) -> SearchSpace:
    """The re-runs' space: every parameter of ``space`` plus ``run.seed``, no early stopping."""
    seed = Param(path=SEED_PARAM, kind="int", low=_SEED_RANGE[0], high=_SEED_RANGE[1])
    # The re-runs have their own points; the named reference points were the search's.
    return dataclasses.replace(space, name=f"{space.name}/{RESEED_PHASE}", params=(*space.params, seed),
                               fidelity=None, num_samples=max(1, points), references={})


def experiment_phases(space: SearchSpace, *, name: str, mode: str, trials: int | None,
                      budgets: Mapping[str, StageBudget] | None = None,
                      reseed: ReseedRecord | None = None) -> tuple[PhaseRecord, ...]:
    """The searches of an experiment in order (empty for a joint search without re-runs: the one
    study named ``name``, as every sweep had before).

    Args:
        mode: ``joint`` or ``cascade``.
        trials: Trials of each search (cascade: of each stage; default the space's ``num_samples``).
        budgets: Per-stage budgets of a cascade (stages not named get ``trials``).
        reseed: The seed re-runs (None: none).

    Raises:
        ValueError / SpaceError: an unknown mode, a budget for a stage the cascade does not search, a
        step budget for a stage without training steps.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(SEARCH_MODES)}")
    budgets = dict(budgets or {})
    default = trials if trials is not None else space.num_samples
    phases: list[PhaseRecord] = []
    if mode == "cascade":
        parts = cascade_spaces(space)
        unknown = sorted(set(budgets) - {stage for stage, _ in parts})
        if unknown:
            raise ValueError(f"stage budget for {', '.join(unknown)}: the cascade of {space.name} searches only "
                             f"{', '.join(stage for stage, _ in parts)}")
        for stage, sub in parts:
            budget = budgets.get(stage, StageBudget(trials=default))
            if budget.steps is not None and _full_steps(sub, stage) is None:
                raise ValueError(f"stage budget {stage}={budget.steps}steps: the {stage} stage's search has no "
                                 "training steps to count (its trials share one training); give trials")
            requested = budget.trials if budget.trials is not None else _max_trials(sub, stage, budget.steps)
            phases.append(PhaseRecord(name=stage, study=f"{name}/{stage}", metric=sub.metric, stages=sub.stages,
                                      space=space_to_dict(sub), requested=requested, step_budget=budget.steps))
    elif budgets:
        raise ValueError("stage budgets apply to a cascade (--mode cascade); a joint search takes --trials")
    elif reseed is not None and reseed.seeds > 0:
        phases.append(PhaseRecord(name=JOINT_PHASE, study=name, metric=space.metric, stages=space.stages,
                                  space=space_to_dict(space), requested=default))
    if phases and reseed is not None:
        phases.append(PhaseRecord(name=RESEED_PHASE, study=f"{name}/{RESEED_PHASE}", metric=space.metric,
                                  stages=space.stages, space={}, requested=0))
    return tuple(phases)


def _full_steps(space: SearchSpace, stage: str) -> int | None:
    """Training steps of one full trial of ``stage`` (its fidelity's ``max_t``, else its section's
    ``iterations``); None if the stage has no fidelity artifact."""
    if graph.fidelity_artifact(stage) is None:
        return None
    if space.fidelity is not None:
        return space.fidelity.max_t
    section = next((sec for sec, st in graph.section_stages().items() if st == stage), None)
    cfg = space.base_config()
    iterations = getattr(getattr(cfg, section, None), "iterations", None) if section else None
    return int(iterations) if isinstance(iterations, int) and iterations > 0 else None


def _max_trials(space: SearchSpace, stage: str, steps: int | None) -> int:
    """Most trials a step budget can start: every trial but the full ones stopped at the first rung."""
    full = _full_steps(space, stage)
    assert steps is not None and full is not None
    cheapest = space.fidelity.grace_period if space.fidelity is not None else full
    return max(1, math.ceil(steps / max(1, cheapest)))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def phase_space(phase: PhaseRecord, record: ExperimentRecord) -> SearchSpace:
    """The search space of ``phase`` with its frozen values as fixed overrides (validated)."""
    try:
        sub = space_from_dict(phase.space, source=record.space_source, name=f"{record.space_name}/{phase.name}")
    except SpaceError as exc:
        raise SpaceError(exc.source, exc.key, f"{exc.message} (the {phase.name!r} search recorded in sweep.json)") \
            from None
    if not phase.frozen:
        return sub
    out = dataclasses.replace(sub, overrides={**sub.overrides, **phase.frozen})
    validate(out)
    return out


def _phase_plan(plan: Any, phase: PhaseRecord, space: SearchSpace) -> Any:
    """The :class:`~trainables.planning.SweepPlan` of one phase of ``plan``'s experiment."""
    from .trainable import TrialSettings, trainable_for

    stage = graph.tune_metrics()[space.metric][0]
    time_attr = final_t = None
    if space.fidelity is not None:
        time_attr, final_t = space.fidelity.time_attr, space.fidelity.max_t
    elif phase.step_budget is not None:
        time_attr, final_t = "stage_step", _full_steps(space, stage)
    base = space.base_config()
    settings = dataclasses.replace(
        TrialSettings.from_dict(plan.settings.to_dict()), base=to_dict(base), stages=space.stages,
        metric=space.metric, time_attr=time_attr, final_t=final_t, phase=phase.name)
    trainable, _ = trainable_for(space.stages)
    return dataclasses.replace(plan, space=space, num_samples=phase.requested, trainable=trainable,
                               settings=settings, reference_point=space.reference_point())


def _study(exp_dir: Path, phase: PhaseRecord, mode: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per study would fight the live table
    from .search import STUDY_FILE, study_storage

    return optuna.create_study(study_name=phase.study, storage=study_storage(str(exp_dir / STUDY_FILE)),
                               direction="maximize" if mode == "max" else "minimize", load_if_exists=True)


def _best_values(study: Any, phase: PhaseRecord) -> dict[str, Any]:
    """The frozen values plus the best completed trial's values of a finished stage search."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        raise RuntimeError(f"the {phase.name} search (study {phase.study!r}) has no completed trial; nothing to "
                           "carry to the next stage. See the failed trials in trials.parquet, fix the cause and "
                           "resume with --restart-errored")
    best = max(done, key=lambda t: t.value) if study.direction.name == "MAXIMIZE" else min(done, key=lambda t: t.value)
    return {**phase.frozen, **best.params}


def _phase_done(study: Any, phase: PhaseRecord, plan: Any) -> bool:
    """Whether ``phase``'s search has ended: nothing running or waiting, and its trials or its step
    budget spent."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    if len(trials) >= phase.requested:
        return True
    if phase.step_budget is not None:
        full = plan.settings.final_t or 1
        spent = sum(full if t.state == TrialState.COMPLETE else max(t.intermediate_values, default=0) for t in trials)
        return spent + full > phase.step_budget
    return False


def reseed_points(record: ExperimentRecord, search: PhaseRecord, study: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """The re-runs' points: the ``top_k`` configs of the last search (``study``), the reference and the
    comparison configs, each with ``seeds`` more seeds, plus the base seed for a config that has no
    run there yet (a failed one is not tried again at the same seed). Values are full configs (frozen
    ones included) plus ``run.seed``; none when the search completed no trial."""
    from optuna.trial import TrialState

    reseed = record.reseed
    assert reseed is not None
    base_seed = int(space.base_config().run.seed)
    paths = [p.path for p in space.params]
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return []  # the search completed no trial: nothing to compare, and its failures stand as they are
    done.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    ran = {config_key({**search.frozen, **t.params}) for t in study.get_trials(deepcopy=False)
           if t.state in (TrialState.COMPLETE, TrialState.FAIL)}
    candidates: list[dict[str, Any]] = [dict(record.reference_point)]
    for t in done:
        if len(candidates) > reseed.top_k:
            break
        full = {**search.frozen, **t.params}
        if config_key(full) not in {config_key(c) for c in candidates}:
            candidates.append(full)
    for values in reseed.configs.values():
        if config_key(values) not in {config_key(c) for c in candidates}:
            candidates.append(dict(values))
    points = []
    for values in candidates:
        missing = [p for p in paths if p not in values]
        if missing:
            raise ValueError(f"re-run config {values}: lacks {', '.join(missing)}")
        seeds = [base_seed + i for i in range(1, reseed.seeds + 1)]
        if config_key(values) not in ran:
            seeds.insert(0, base_seed)
        points += [{**{p: values[p] for p in paths}, SEED_PARAM: s} for s in seeds]
    return points


def compare_configs(space: SearchSpace, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The values of ``space``'s parameters in each named config (built-in name or YAML path).

    Raises:
        ValueError: a config whose value of a parameter lies outside the space (it must be a point the
        search could have found).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        label, values = config_point(space.params, name)
        for p in space.params:
            if not p.contains(values[p.path]):
                raise ValueError(f"--compare-config {name}: {p.path} = {values[p.path]!r} lies outside the space's "
                                 f"{p.describe()}; a comparison config must be a point of the space")
        out[label] = values
    return out


def _set_phase(record: ExperimentRecord, index: int, phase: PhaseRecord) -> ExperimentRecord:
    phases = list(record.phases)
    phases[index] = phase
    return dataclasses.replace(record, phases=tuple(phases))


def run_phases(plan: Any, *, progress: str, seed: int, max_failures: int, max_concurrent: int | None,
               rerun_failed: bool = False) -> ExperimentRecord:
    """Run (or continue) every phase of ``plan``'s experiment in order; returns the record as written.

    ``sweep.json`` is rewritten as each phase starts (its frozen values, the re-runs' space) and ends
    (``done``), so an interrupted experiment resumes where it stopped (see the module docstring).
    """
    from .search import resume_plan
    from .tuner import build_tuner

    record: ExperimentRecord = plan.record
    exp_dir: Path = plan.exp_dir
    frozen: dict[str, Any] = {}
    for i, phase in enumerate(record.phases):
        study = _study(exp_dir, phase, record.mode)
        if phase.name == RESEED_PHASE:
            search = record.phases[i - 1]
            if not phase.space:  # the re-runs are chosen once, when the search before them has ended
                points = reseed_points(record, search, _study(exp_dir, search, record.mode), plan.space)
                space = _reseed_space(plan.space, len(points))
                phase = dataclasses.replace(phase, space=space_to_dict(space), points=tuple(points),
                                            requested=len(points))
                record = _set_phase(record, i, phase)
                record = dataclasses.replace(record, requested=sum(p.requested for p in record.phases))
                write_sweep(exp_dir, record)
            points = [dict(p) for p in phase.points]
            space = phase_space(phase, record)
            if not points:  # nothing to re-run (every config had its runs)
                phase = dataclasses.replace(phase, done=True)
                record = _set_phase(record, i, phase)
                write_sweep(exp_dir, record)
                continue
        else:
            if phase.frozen != frozen:
                phase = dataclasses.replace(phase, frozen=dict(frozen))
                record = _set_phase(record, i, phase)
                write_sweep(exp_dir, record)
            space = phase_space(phase, record)
            points = list(space.reference_points().values())
        phase_plan = dataclasses.replace(_phase_plan(plan, phase, space), record=record)
        if not phase.done and not _phase_done(study, phase, phase_plan):
            started = bool(study.get_trials(deepcopy=False))
            todo = resume_plan(study, requested=phase.requested, rerun_failed=rerun_failed) if started else None
            if todo is None or todo.num_samples > 0:
                if todo is not None:
                    phase_plan = dataclasses.replace(phase_plan, num_samples=todo.num_samples)
                tuner = build_tuner(phase_plan, progress=progress, seed=seed + len(study.trials),
                                    max_failures=max_failures, max_concurrent=max_concurrent, resume=todo,
                                    study_name=phase.study, points=points, step_budget=phase.step_budget)
                tuner.fit()
            if not _phase_done(study, phase, phase_plan):
                return record  # interrupted: `resume` continues here
        if not phase.done:
            phase = dataclasses.replace(phase, done=True)
            record = _set_phase(record, i, phase)
            write_sweep(exp_dir, record)
        if phase.name != RESEED_PHASE and phase.name != JOINT_PHASE:
            frozen = _best_values(study, phase)
    return record
