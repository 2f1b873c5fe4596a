"""Multi-phase experiments: the cascade (stage-wise) search, the seed re-runs, and the reference that
the scheduler never stops; gains from completed values only.

The arithmetic (phases, budgets, seed statistics, gains, the gap closed) is checked on hand-made
records with hand-derived numbers; the scheduler on a stand-in trainable whose learning curves are
known; one tiny real cascade (``slow``) shows each stage's best carried downstream through Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from wsss_tune.analysis.export import export_best
from wsss_tune.analysis.results import (
    RESEED_PHASE,
    ExperimentRecord,
    PhaseRecord,
    ReseedRecord,
    TrialRecord,
    load_experiment,
    seed_rows,
    write_experiment,
)
from wsss_tune.analysis.tables import gain_lines, gap_closed, gap_table
from wsss_tune.config import load_config, to_dict
from wsss_tune.spaces import SpaceError, load_space, space_from_dict
from wsss_tune.trainables import FINAL_KEY, SMOKE_OVERRIDES, FidelitySearch, run_sweep, study_storage
from wsss_tune.trainables.phases import (
    StageBudget,
    cascade_spaces,
    experiment_phases,
    parse_stage_budget,
    reseed_points,
)
from wsss_tune.trainables.search import REFERENCE_ATTR, STUDY_FILE, FullBudgetASHA

# --------------------------------------------------------------------------------------------------
# The paper's setting on the synthetic data
# --------------------------------------------------------------------------------------------------


def test_synth_paper_is_synth_with_the_papers_searched_values() -> None:
    """synth_paper differs from synth only in the searched fields, each set to the voc config's (the
    paper's) value: tau 0.4, lam 0.5, beta 8, logt 8, alpha 16, DeepLab lr 2.5e-4, head 10x / 20x."""
    synth, paper, voc = to_dict(load_config("synth")), to_dict(load_config("synth_paper")), load_config("voc")
    searched = {"eps.tau", "eps.lam", "rw.beta", "rw.logt", "rw.alpha", "deeplab.lr", "deeplab.head_lr_mult",
                "deeplab.head_bias_lr_mult"}
    differ = {f"{sec}.{k}" for sec, fields in synth.items() if isinstance(fields, dict)
              for k, v in fields.items() if paper[sec][k] != v}
    assert differ <= searched and differ == {"rw.logt", "rw.alpha", "deeplab.lr"}
    for path in searched:
        sec, name = path.split(".")
        assert paper[sec][name] == getattr(getattr(voc, sec), name), path
    assert (paper["rw"]["logt"], paper["rw"]["alpha"], paper["deeplab"]["lr"]) == (8, 16.0, 2.5e-4)


def test_the_gap_space_holds_both_the_paper_and_the_hand_tuned_setting() -> None:
    """synth_gap starts at synth_paper (its reference point) and its ranges contain synth's values."""
    space = load_space("synth_gap")
    ref = space.reference_point()
    assert ref["rw.logt"] == 8 and ref["rw.alpha"] == 16.0 and ref["deeplab.lr"] == 2.5e-4
    synth = load_config("synth")
    for p in space.params:
        sec, name = p.path.split(".")
        assert p.contains(getattr(getattr(synth, sec), name)), p.path


# --------------------------------------------------------------------------------------------------
# Phases and budgets
# --------------------------------------------------------------------------------------------------


def test_a_cascade_splits_the_space_by_the_stage_that_reads_each_parameter() -> None:
    """synth_gap: EPS (tau, lam) on eps_miou_tune over the train halves running EPS only; the walk
    (beta, logt, alpha) on rw_miou_tune running EPS + affinity; DeepLab on the space's metric with
    the space's fidelity, running every stage. Only the last keeps the fidelity."""
    parts = dict(cascade_spaces(load_space("synth_gap")))
    assert list(parts) == ["eps", "affinity", "deeplab"]
    eps, walk, dl = parts["eps"], parts["affinity"], parts["deeplab"]
    assert [p.path for p in eps.params] == ["eps.tau", "eps.lam"]
    assert (eps.metric, eps.stages, eps.tune_split, eps.heldout_split, eps.fidelity) == \
        ("eps_miou_tune", ("eps",), "train_tune", "train_heldout", None)
    assert [p.path for p in walk.params] == ["rw.beta", "rw.logt", "rw.alpha"]
    assert (walk.metric, walk.stages, walk.fidelity) == ("rw_miou_tune", ("eps", "affinity"), None)
    assert dl.metric == "deeplab_miou_tune" and dl.stages == ("eps", "affinity", "deeplab")
    assert dl.fidelity is not None and dl.fidelity.max_t == 300 and dl.tune_split == "val_tune"


def test_a_cascade_refuses_what_it_cannot_split() -> None:
    """A run.* parameter belongs to no stage; id-list halves do not apply to other stages' splits."""
    base = {"base": "synth", "stages": "all", "metric": "deeplab_miou_tune", "mode": "max",
            "tune_split": "val_tune", "heldout_split": "val_heldout",
            "params": {"eps.tau": {"kind": "uniform", "low": 0.1, "high": 0.7}}}
    seeded = space_from_dict({**base, "params": {**base["params"], "run.seed": {"kind": "int", "low": 0, "high": 3}}})
    with pytest.raises(SpaceError, match=r"params\.run\.seed: no stage reads"):
        cascade_spaces(seeded)
    files = space_from_dict({**base, "tune_split": "mine", "heldout_split": "theirs"})
    with pytest.raises(SpaceError, match="derived halves"):
        cascade_spaces(files)


@pytest.mark.parametrize(("text", "stage", "budget"), [
    ("eps=6", "eps", StageBudget(trials=6)),
    ("deeplab=1200steps", "deeplab", StageBudget(steps=1200)),
    (" affinity = 3 ", "affinity", StageBudget(trials=3)),
])
def test_stage_budgets_parse(text: str, stage: str, budget: StageBudget) -> None:
    assert parse_stage_budget(text) == (stage, budget)


@pytest.mark.parametrize(("text", "words"), [
    ("eps", "expected STAGE=N"), ("eps=0", "expected an integer >= 1"), ("walk=3", "unknown stage 'walk'"),
    ("eps=3 trials", "expected STAGE=N"),
])
def test_bad_stage_budgets_say_what_is_expected(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_stage_budget(text)


def test_experiment_phases_by_mode() -> None:
    """Joint without re-runs: no phases (one study named after the experiment, as before). Joint
    with re-runs: the search, then reseed. Cascade: one phase per stage with its own study and
    budget, then reseed. A step budget for the walk (no training steps of its own) and a budget for
    a stage the cascade does not search are refused; so is a stage budget of a joint search."""
    space = load_space("synth_gap")
    assert experiment_phases(space, name="e", mode="joint", trials=5) == ()
    joint = experiment_phases(space, name="e", mode="joint", trials=5, reseed=ReseedRecord())
    assert [(p.name, p.study, p.requested) for p in joint] == [("search", "e", 5), ("reseed", "e/reseed", 0)]
    cascade = experiment_phases(space, name="e", mode="cascade", trials=5, reseed=ReseedRecord(),
                                budgets={"eps": StageBudget(trials=2), "deeplab": StageBudget(steps=1000)})
    assert [(p.name, p.study, p.metric) for p in cascade] == [
        ("eps", "e/eps", "eps_miou_tune"), ("affinity", "e/affinity", "rw_miou_tune"),
        ("deeplab", "e/deeplab", "deeplab_miou_tune"), ("reseed", "e/reseed", "deeplab_miou_tune")]
    # eps: 2 trials; affinity: the default 5; deeplab: 1000 steps, at most ceil(1000 / grace 100) trials
    assert [(p.requested, p.step_budget) for p in cascade[:3]] == [(2, None), (5, None), (10, 1000)]
    with pytest.raises(ValueError, match="affinity=100steps.*give trials"):
        experiment_phases(space, name="e", mode="cascade", trials=5, budgets={"affinity": StageBudget(steps=100)})
    eps_only = load_space("synth_eps")
    with pytest.raises(ValueError, match="searches only eps"):
        experiment_phases(eps_only, name="e", mode="cascade", trials=2, budgets={"deeplab": StageBudget(trials=2)})
    with pytest.raises(ValueError, match="apply to a cascade"):
        experiment_phases(space, name="e", mode="joint", trials=2, budgets={"eps": StageBudget(trials=2)})
    with pytest.raises(ValueError, match="mode='staged'"):
        experiment_phases(space, name="e", mode="staged", trials=2)


# --------------------------------------------------------------------------------------------------
# The searcher and the scheduler
# --------------------------------------------------------------------------------------------------


def _searcher(tmp_path: Path, **kw: Any) -> FidelitySearch:
    return FidelitySearch(space={"x": FloatDistribution(0.1, 4.0)}, metric="m", mode="max",
                          sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                          storage=study_storage(str(tmp_path / STUDY_FILE)), **kw)


def test_the_searcher_marks_the_reference_trial(tmp_path: Path) -> None:
    """The trial given the reference point is protected and carries the study attribute; others not."""
    s = _searcher(tmp_path, points_to_evaluate=[{"x": 2.0}, {"x": 1.0}], reference={"x": 1.0}, time_attr="t")
    assert s.suggest("a") == {"x": 2.0} and s.suggest("b") == {"x": 1.0}
    assert not s.protected("a") and s.protected("b")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / STUDY_FILE}")
    assert [t.user_attrs.get(REFERENCE_ATTR) for t in sorted(study.trials, key=lambda t: t.number)] == [None, True]


def test_a_step_budget_starts_trials_while_their_full_budget_fits(tmp_path: Path) -> None:
    """Budget 700 steps, a full trial 300: two trials start (0 + 2 x 300 <= 700), a third would need
    900. One stopped at step 100 frees the rest of its budget: 100 + 300 (running) + 300 (new) = 700
    fits; then 100 + 2 x 300 + 300 = 1000 does not. Steps of other stages' results are not counted."""
    from ray.tune.search import Searcher

    s = _searcher(tmp_path, time_attr="stage_step", step_budget=700, full_steps=300, count_stage="deeplab")
    assert s.suggest("a") is not None and s.suggest("b") is not None
    assert s.suggest("c") == Searcher.FINISHED
    s.on_trial_result("a", {"stage": "eps_model", "stage_step": 400})  # an upstream stage: not counted
    s.on_trial_result("a", {"stage": "deeplab", "stage_step": 100, "m": 0.5})
    s.on_trial_complete("a", {"stage": "deeplab", "stage_step": 100, "m": 0.5})  # stopped by the scheduler
    assert s.suggest("d") is not None
    assert s.suggest("e") == Searcher.FINISHED


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_asha_never_stops_a_protected_trial() -> None:
    """ASHA, grace 1, reduction 2, max_t 4: at the rung of step 1 the values 1 and 2 are recorded;
    a trial reporting 0.25 there is below their median (1.5) and is stopped - unless it is protected,
    which continues (and still enters the rung)."""
    from ray.tune.schedulers import TrialScheduler

    protected = {"ref"}
    sched = FullBudgetASHA(time_attr="t", metric="m", mode="max", max_t=4, grace_period=1, reduction_factor=2,
                           protected=lambda tid: tid in protected)
    trials = {n: _Trial(n) for n in ("a", "b", "ref", "other")}
    for t in trials.values():
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, trials["a"], {"t": 1, "m": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["b"], {"t": 1, "m": 2.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["other"], {"t": 1, "m": 0.25}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, trials["ref"], {"t": 1, "m": 0.25}) == TrialScheduler.CONTINUE


def _curves(config: dict[str, Any]) -> None:
    """Reports m = x * s at steps s = 1..4, then a final result."""
    from ray import tune

    x = config["x"]
    for s in (1, 2, 3, 4):
        tune.report({"m": x * s, "stage_step": s})
    tune.report({"m": x * 4, "stage_step": 4, FINAL_KEY: True})


@pytest.mark.ray
def test_the_reference_runs_its_whole_budget_under_asha(tmp_path: Path) -> None:
    """x = 1, 2, then the reference x = 0.25, then x = 0.5, one at a time, ASHA grace 1, reduction 2:
    at step 1 both 0.25 and 0.5 fall below median{1, 2} = 1.5. The plain trial is stopped (PRUNED);
    the reference runs all 4 steps and completes with 0.25 x 4 = 1.0."""
    import ray
    import ray.cloudpickle
    from ray.tune import RunConfig, TuneConfig, Tuner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    points = [{"x": 1.0}, {"x": 2.0}, {"x": 0.25}, {"x": 0.5}]
    searcher = _searcher(tmp_path, points_to_evaluate=points, reference={"x": 0.25}, time_attr="stage_step")
    sched = FullBudgetASHA(time_attr="stage_step", metric="m", mode="max", max_t=4, grace_period=1,
                           reduction_factor=2, protected=searcher.protected)
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        Tuner(_curves, tune_config=TuneConfig(search_alg=searcher, scheduler=sched, num_samples=len(points),
                                              max_concurrent_trials=1),
              run_config=RunConfig(storage_path=str(tmp_path), name="ref", verbose=0)).fit()
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / STUDY_FILE}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.params["x"] for t in trials] == [1.0, 2.0, 0.25, 0.5]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE,
                                         TrialState.PRUNED]
    assert trials[2].value == 1.0 and trials[2].intermediate_values == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    assert trials[2].user_attrs[REFERENCE_ATTR] is True and trials[3].intermediate_values == {1: 0.5}


# --------------------------------------------------------------------------------------------------
# Gains and seeds (hand-made records)
# --------------------------------------------------------------------------------------------------

M, H = "deeplab_miou_tune", "deeplab_miou_heldout"


def _record(**changes: Any) -> ExperimentRecord:
    base = dict(name="e", metric=M, mode="max", requested=3, reference_point={"deeplab.lr": 2.5e-4},
                base_config={"run": {"seed": 0}})
    return ExperimentRecord(**{**base, **changes})


def _trial(tid: str, lr: float, tune: float | None, held: float | None, *, status: str = "completed",
           seed: int | None = None, phase: str = "") -> TrialRecord:
    params: dict[str, Any] = {"deeplab.lr": lr}
    if seed is not None:
        params["run.seed"] = seed
    metrics = {k: v for k, v in ((M, tune), (H, held)) if v is not None}
    return TrialRecord(trial_id=tid, status=status, params=params, metrics=metrics, phase=phase)


@pytest.mark.parametrize("ref_status", ["pruned", "failed"])
def test_no_gain_against_a_reference_that_did_not_complete(tmp_path: Path, ref_status: str) -> None:
    """A pruned reference holds a truncated value, a failed one none: no gain is computed on either
    half, and the words say what happened to the reference."""
    trials = [_trial("r", 2.5e-4, 40.0 if ref_status == "pruned" else None, None, status=ref_status),
              _trial("b", 1e-3, 70.0, 69.0)]
    trials[0] = dataclasses.replace(trials[0], error="boom" if ref_status == "failed" else None)
    result = write_experiment(tmp_path, sweep=_record(), trials=trials, reports=[])
    assert result.reference.trial_id == "r" and result.best.trial_id == "b"
    assert result.gain_over_reference is None and result.gain_over_reference_heldout is None
    assert any(f"reference trial r {ref_status}" in line for line in gain_lines(result))


def test_the_gain_of_completed_runs_on_both_halves(tmp_path: Path) -> None:
    result = write_experiment(tmp_path, sweep=_record(), trials=[_trial("r", 2.5e-4, 60.0, 58.5),
                                                                 _trial("b", 1e-3, 70.0, 66.0)], reports=[])
    assert result.gain_over_reference == pytest.approx(10.0)
    assert result.gain_over_reference_heldout == pytest.approx(7.5)
    again = load_experiment(tmp_path)
    assert again.gain_over_reference_heldout == pytest.approx(7.5)


def _seeded(tmp_path: Path) -> Any:
    """A joint search of 3 configs (lr 2.5e-4 = the reference, 1e-3, 3e-3) at seed 0, then re-runs:
    each with seeds 1 and 2, plus the comparison config `synth` (lr 5e-4) at seeds 0, 1, 2.

    tune values:   ref 60, 62, 64 (mean 62, std 2); 1e-3: 71 (lucky), 63, 64 (mean 66, std 4.36);
                   3e-3: 68, 67, 69 (mean 68, std 1); synth: 75, 75, 75 (never the winner).
    held-out:      ref 58, 60, 62 (mean 60, std 2); 1e-3: 65, 61, 63 (63, 2); 3e-3: 66, 65, 67 (66, 1);
                   synth: 70, 72, 74 (72, 2).
    """
    phases = (PhaseRecord(name="search", study="e", metric=M, requested=3, done=True),
              PhaseRecord(name=RESEED_PHASE, study="e/reseed", metric=M, requested=9, done=True))
    record = _record(phases=phases, reseed=ReseedRecord(top_k=2, seeds=2, configs={"synth": {"deeplab.lr": 5e-4}}),
                     base_config={"run": {"seed": 0}, "deeplab": {"lr": 2.5e-4}})
    trials = [_trial("r0", 2.5e-4, 60, 58, phase="search"), _trial("a0", 1e-3, 71, 65, phase="search"),
              _trial("b0", 3e-3, 68, 66, phase="search")]
    for tid, lr, tunes, helds in (("a", 1e-3, (63, 64), (61, 63)), ("b", 3e-3, (67, 69), (65, 67)),
                                  ("r", 2.5e-4, (62, 64), (60, 62))):
        trials += [_trial(f"{tid}{s}", lr, tunes[s - 1], helds[s - 1], seed=s, phase=RESEED_PHASE) for s in (1, 2)]
    trials += [_trial(f"s{s}", 5e-4, 75, 70 + 2 * s, seed=s, phase=RESEED_PHASE) for s in (0, 1, 2)]
    return record, trials


def test_seed_rows_pick_the_winner_by_the_mean_and_not_the_lucky_run(tmp_path: Path) -> None:
    """The single best run (1e-3: 71) loses to the best mean (3e-3: 68); the comparison config has the
    highest mean but is never chosen. Means, sample stds and the pooled spread are hand-derived:
    spread = sqrt((2^2 + 2^2 + 1^2 + 2^2) / 4) = sqrt(13 / 4)."""
    record, trials = _seeded(tmp_path)
    rows, spread = seed_rows(trials, record)
    by = {r.label: r for r in rows}
    assert set(by) == {"reference", "searched #1", "searched #2", "synth"}
    a = next(r for r in rows if r.params["deeplab.lr"] == 1e-3)
    b = next(r for r in rows if r.params["deeplab.lr"] == 3e-3)
    assert a.tune_mean == pytest.approx(66.0) and a.tune_std == pytest.approx(math.sqrt(19))
    assert b.tune_mean == pytest.approx(68.0) and b.tune_std == pytest.approx(1.0) and b.winner
    assert by["reference"].seeds == (0, 1, 2) and by["reference"].heldout_mean == pytest.approx(60.0)
    assert not by["synth"].winner and by["synth"].tune_mean == pytest.approx(75.0)
    assert spread == pytest.approx(math.sqrt(13 / 4))
    result = write_experiment(tmp_path, sweep=record, trials=trials, reports=[])
    assert result.best.trial_id == "b0"  # the winner's run at the base seed
    assert result.gain_over_reference == pytest.approx(6.0) and result.gain_over_reference_heldout == pytest.approx(6.0)
    line = " ".join(gain_lines(result))
    assert "means of 3 run(s)" in line and "exceeds it (3.3x)" in line
    # export writes the winner's values
    assert load_config(export_best(tmp_path)).deeplab.lr == 3e-3


def test_the_gap_closed_is_one_minus_the_normalised_regret(tmp_path: Path) -> None:
    """(found - start) / (target - start): held-out (66 - 60) / (72 - 60) = 50%, tune (68 - 62) /
    (75 - 62) = 46%; no gap when start and target agree."""
    assert gap_closed(66.0, 60.0, 72.0) == pytest.approx(0.5)
    assert gap_closed(80.0, 60.0, 72.0) == pytest.approx(20 / 12)
    assert gap_closed(66.0, 60.0, 60.0) is None and gap_closed(None, 60.0, 72.0) is None
    record, trials = _seeded(tmp_path)
    table = gap_table(write_experiment(tmp_path, sweep=record, trials=trials, reports=[]), "synth")
    assert list(table.frame["heldout_mean"]) == pytest.approx([60.0, 66.0, 72.0])
    assert table.note == "gap closed (tune): 46%; gap closed (held-out): 50%"


def test_reseed_points_cover_the_top_configs_the_reference_and_the_comparisons(tmp_path: Path) -> None:
    """Top 2 of the last search by value (its frozen values added), the reference and a comparison
    config, each with seeds 1 and 2; the base seed 0 only for configs that never ran in the search."""
    storage = study_storage(str(tmp_path / STUDY_FILE))
    study = optuna.create_study(study_name="e/deeplab", storage=storage, direction="maximize")
    dist = {"deeplab.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for lr, value in ((2.5e-4, 60.0), (1e-3, 70.0), (3e-3, 65.0), (5e-3, 50.0)):
        study.add_trial(optuna.trial.create_trial(params={"deeplab.lr": lr}, distributions=dist, value=value))
    space = space_from_dict({"base": "synth_paper", "stages": "all", "metric": M, "mode": "max",
                             "tune_split": "val_tune", "heldout_split": "val_heldout",
                             "params": {"eps.tau": {"kind": "uniform", "low": 0.1, "high": 0.7},
                                        "deeplab.lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2}}})
    search = PhaseRecord(name="deeplab", study="e/deeplab", metric=M, frozen={"eps.tau": 0.3})
    record = _record(reference_point={"eps.tau": 0.4, "deeplab.lr": 2.5e-4},
                     reseed=ReseedRecord(top_k=2, seeds=2, configs={"synth": {"eps.tau": 0.4, "deeplab.lr": 1e-3}}))
    points = reseed_points(record, search, study, space)
    got = [(p["eps.tau"], p["deeplab.lr"], p["run.seed"]) for p in points]
    assert got == [(0.4, 2.5e-4, 0), (0.4, 2.5e-4, 1), (0.4, 2.5e-4, 2),  # the reference never ran (tau 0.4)
                   (0.3, 1e-3, 1), (0.3, 1e-3, 2), (0.3, 3e-3, 1), (0.3, 3e-3, 2),
                   (0.4, 1e-3, 0), (0.4, 1e-3, 1), (0.4, 1e-3, 2)]


# --------------------------------------------------------------------------------------------------
# A tiny real cascade
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_a_cascade_freezes_each_stages_best_downstream(synth_root: Path, tmp_path: Path) -> None:
    """synth_gap as a cascade, 2 trials per stage, then the top config and the reference re-run with
    one more seed, on the tiny dataset with the smoke overrides. Each stage's trials ran with the
    best values of the stages before it (by their own tune metric, in the study), as their run
    folder's resolved config shows; the re-runs are trials of the same experiment with their seeds;
    a resume of the finished experiment runs nothing; export writes the winner's values."""
    import ray
    import yaml

    from wsss_tune.trainables import resume_sweep

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep("synth_gap", data=synth_root, storage=tmp_path, name="c", wandb="off", progress="off",
                           overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), mode="cascade", trials=2,
                           reseed=ReseedRecord(top_k=1, seeds=1))
        again = resume_sweep(result.path, progress="off")
    finally:
        ray.shutdown()
    assert result.complete, [t.error for t in result.trials]
    by_phase: dict[str, list[TrialRecord]] = {}
    for t in result.trials:
        by_phase.setdefault(t.phase, []).append(t)
    assert [p.name for p in result.record.phases] == ["eps", "affinity", "deeplab", "reseed"]
    assert [len(by_phase[p]) for p in ("eps", "affinity", "deeplab")] == [2, 2, 2]
    best_eps = max(by_phase["eps"], key=lambda t: t.value("eps_miou_tune"))
    best_rw = max(by_phase["affinity"], key=lambda t: t.value("rw_miou_tune"))
    eps_keys, rw_keys = ("eps.tau", "eps.lam"), ("rw.beta", "rw.logt", "rw.alpha")
    for t in by_phase["affinity"] + by_phase["deeplab"]:
        cfg = yaml.safe_load((Path(t.run_dir) / "config.yaml").read_text())
        assert [cfg["eps"][k.split(".")[1]] for k in eps_keys] == pytest.approx([best_eps.params[k] for k in eps_keys])
    for t in by_phase["deeplab"]:
        cfg = yaml.safe_load((Path(t.run_dir) / "config.yaml").read_text())
        assert [cfg["rw"][k.split(".")[1]] for k in rw_keys] == pytest.approx([best_rw.params[k] for k in rw_keys])
    # re-runs: each config at seed 1, and at the base seed 0 unless it ran whole in the last search (the
    # reference of a cascade runs whole there only if it won both earlier stages)
    ref = result.record.reference_point
    ref_ran = any(all(t.params[k] == pytest.approx(v) for k, v in ref.items()) for t in by_phase["deeplab"])
    rows = {r.label: r for r in result.seeds}
    assert "reference" in rows and set(rows) <= {"reference", "searched #1"}
    assert all(sorted(r.seeds) == [0, 1] for r in rows.values())
    assert len(by_phase["reseed"]) == len(rows) + (0 if ref_ran else 1)
    assert all(t.params["run.seed"] in (0, 1) for t in by_phase["reseed"])
    assert again.counts == result.counts  # nothing left to run
    doc = json.loads((result.path / "experiment.json").read_text())
    assert sorted(s["label"] for s in doc["seeds"]) == sorted(rows)
    winner = next(r for r in result.seeds if r.winner)
    cfg = load_config(export_best(result.path))
    assert cfg.deeplab.lr == pytest.approx(winner.params["deeplab.lr"])
    assert cfg.rw.logt == winner.params["rw.logt"]


def test_the_gap_printout_against_the_hand_tuned_config_and_the_recorded_oracle(tmp_path: Path) -> None:
    """Held-out means: paper 60, winner 66, synth 72; an oracle of 75 gives (66 - 60) / (75 - 60) = 40%."""
    from rich.console import Console

    from wsss_tune.stages.pipeline import FINGERPRINT_KEY
    from wsss_tune.trainables.sweep import print_gap

    record, trials = _seeded(tmp_path)
    trials = [dataclasses.replace(t, metrics={**t.metrics, FINGERPRINT_KEY: "abc"}) for t in trials]
    result = write_experiment(tmp_path, sweep=record, trials=trials, reports=[])
    console = Console(width=200, record=True)
    oracle = {result.heldout_metric: 75.0, "source": "a benchmark", FINGERPRINT_KEY: "abc"}
    print_gap(result, target="synth", oracle=oracle, console=console)
    text = console.export_text()
    assert "gap closed: 50% (paper -> hand-tuned synth, held-out)" in text
    assert "gap closed: 40% (paper -> recorded oracle 75" in text and "a benchmark" in text
    # an oracle found on other data is named, not compared
    console = Console(width=200, record=True)
    print_gap(result, target="synth", oracle={**oracle, FINGERPRINT_KEY: "xyz", "data": "seed 0"}, console=console)
    text = console.export_text()
    assert "gap closed: 50%" in text
    assert "recorded oracle 75.00 not compared: it was found on another dataset (seed 0; this data's fingerprint " \
           "is abc)" in text and "gap closed: 40%" not in text


def test_the_shipped_oracle_is_recorded_with_its_source() -> None:
    """search_spaces/oracles.json holds the synth_gap oracle (held-out and tune means) and how it was found."""
    from wsss_tune.trainables.sweep import oracle

    entry = oracle("synth_gap")
    assert entry is not None and entry["source"].startswith("python -m benchmarks gap_oracle")
    assert 0.0 < entry["deeplab_miou_tune"] <= 100.0 and 0.0 < entry["deeplab_miou_heldout"] <= 100.0
    assert oracle("no_such_space") is None
