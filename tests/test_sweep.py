"""Sweeps: validation before Ray, the fidelity-aware searcher, and tiny sweeps on a local CPU-only Ray.

The sweeps run the real pipeline on the session's tiny synthetic dataset, shrunk to a few iterations
per stage (``SMOKE_OVERRIDES``); they are marked ``slow``. The searcher test uses a stand-in
trainable whose learning curves are known, so which trials ASHA stops can be derived by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from wsss_tune.analysis import load_experiment
from wsss_tune.artifacts import ArtifactStore
from wsss_tune.spaces import SpaceError, load_space, space_from_dict
from wsss_tune.trainables import (
    FINAL_KEY,
    SMOKE_OVERRIDES,
    FidelitySearch,
    demo,
    optuna_distributions,
    plan_sweep,
    resume_sweep,
    run_sweep,
    study_storage,
)
from wsss_tune.trainables.search import RAY_TRIAL_ATTR, STUDY_FILE, FullBudgetASHA

SYNTH_SPACES = ("synth_eps", "synth_rw", "synth_deeplab", "synth_pipeline")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local CPU-only Ray instance for this module (the machine has 2 cores)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An artifact store shared by this module's sweeps (later sweeps reuse earlier stages)."""
    return str(tmp_path_factory.mktemp("store"))


def _sweep(space: str, synth_root: Path, storage: Path, **kw: Any) -> Any:
    kw.setdefault("trials", 2)
    kw.setdefault("wandb", "off")
    kw.setdefault("progress", "off")
    return run_sweep(space, data=synth_root, storage=storage, overrides=SMOKE_OVERRIDES, **{"reseed": None, **kw})


# --------------------------------------------------------------------------------------------------
# Before Ray
# --------------------------------------------------------------------------------------------------


def test_optuna_distributions_follow_the_space() -> None:
    """int bounds stay inclusive (Optuna's IntDistribution is inclusive too), loguniform is a log
    float, a stepped uniform keeps its step, categorical keeps its choices in order."""
    space = space_from_dict({
        "base": "synth", "stages": ["eps", "affinity"], "metric": "rw_miou_tune", "mode": "max",
        "tune_split": "train_tune", "heldout_split": "train_heldout",
        "params": {"rw.logt": {"kind": "int", "low": 1, "high": 5},
                   "rw.alpha": {"kind": "loguniform", "low": 1, "high": 16},
                   "rw.beta": {"kind": "uniform", "low": 2, "high": 12, "step": 2},
                   "rw.bg_mode": {"kind": "categorical", "choices": ["power", "learned"]}},
    })
    assert optuna_distributions(space) == {
        "rw.logt": IntDistribution(1, 5),
        "rw.alpha": FloatDistribution(1.0, 16.0, log=True),
        "rw.beta": FloatDistribution(2.0, 12.0, step=2.0),
        "rw.bg_mode": CategoricalDistribution(["power", "learned"]),
    }


def test_invalid_sweeps_fail_before_ray_starts(synth_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mistake raises its own clear error while Ray's ``init`` would fail the test if called,
    and nothing is written to the storage folder."""
    import ray

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ray.init called before the sweep was validated")

    monkeypatch.setattr(ray, "init", no_ray)
    storage = tmp_path / "experiments"
    with pytest.raises(SpaceError, match="overrides.rw.beta"):
        run_sweep("synth_rw", data=synth_root, storage=storage, overrides={"rw.beta": 3.0})
    with pytest.raises(SpaceError, match="eps.iterations"):
        run_sweep("synth_rw", data=synth_root, storage=storage, overrides={"eps.iterations": "many"})
    with pytest.raises(FileNotFoundError, match="data.root"):
        run_sweep("synth_rw", data=tmp_path / "no-such-data", storage=storage)
    with pytest.raises(ValueError, match="wandb='sometimes'"):
        run_sweep("synth_rw", data=synth_root, storage=storage, wandb="sometimes")
    with pytest.raises(ValueError, match="gpus_per_trial"):
        run_sweep("synth_rw", data=synth_root, storage=storage, gpus_per_trial=-1)
    with pytest.raises(SpaceError, match="no such file"):
        run_sweep(tmp_path / "missing.yaml", data=synth_root, storage=storage)

    from typer.testing import CliRunner

    from wsss_tune.cli import app

    res = CliRunner().invoke(app, ["sweep", "synth_rw", "--data", str(synth_root), "--storage", str(storage),
                                   "--set", "rw.beta=3", "--wandb", "off"])
    assert res.exit_code == 2 and "overrides.rw.beta" in res.output, res.output
    assert not storage.exists()


def test_plan_resolves_store_fidelity_and_reference(synth_root: Path, tmp_path: Path) -> None:
    """synth_pipeline: the pipeline trainable; store ``<storage>/artifacts``; ASHA time ``stage_step``
    with the final result at max_t (300); the reference point is the synth config's own values; an
    existing experiment name is refused."""
    plan = plan_sweep("synth_pipeline", data=synth_root, storage=tmp_path / "exp", name="p", cpus_per_trial=2)
    space = load_space("synth_pipeline")
    assert plan.trainable == "pipeline" and plan.num_samples == space.num_samples
    assert plan.settings.store == str((tmp_path / "exp" / "artifacts").resolve())
    assert (plan.settings.time_attr, plan.settings.final_t, plan.settings.threads) == ("stage_step", 300, 2)
    assert plan.settings.runs_dir == str((tmp_path / "exp" / "p" / "runs").resolve())
    assert dict(plan.reference_point) == space.reference_point()
    assert plan.settings.base["data"]["root"] == str(synth_root.resolve())
    assert plan_sweep("synth_rw", data=synth_root, storage=tmp_path, cache=False).settings.store == ""
    (tmp_path / "exp" / "p").mkdir(parents=True)
    (tmp_path / "exp" / "p" / "sweep.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds an experiment"):
        plan_sweep("synth_pipeline", data=synth_root, storage=tmp_path / "exp", name="p")


# --------------------------------------------------------------------------------------------------
# The searcher under ASHA (stand-in trainable)
# --------------------------------------------------------------------------------------------------


def _curve_trainable(config: dict[str, Any]) -> None:
    """Reports m = x * s at stage steps s = 1..4, then a final result; x = 3 raises."""
    from ray import tune

    x = config["x"]
    if x == 3.0:
        raise RuntimeError("x = 3 is broken")
    for s in (1, 2, 3, 4):
        tune.report({"m": x * s, "stage_step": s})
    tune.report({"m": x * 4, "stage_step": 4, FINAL_KEY: True})


@pytest.mark.ray
def test_scheduler_stopped_trials_are_pruned_in_the_study(ray_cluster: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ASHA with max_t 4, grace 1, reduction 2 (rungs at steps 1, 2 and 4), one trial at a time,
    x = 1, 0.5, 2, 0.25, 3 in that order. A rung stops a trial below the median of the values
    recorded there before it:

    * x = 1 is first everywhere: runs to the end -> COMPLETE, value 1 * 4 = 4;
    * x = 0.5: at step 1, 0.5 < median{1} = 1 -> stopped -> PRUNED after one intermediate value;
    * x = 2: 2 >= median{1, 0.5} = 0.75, 4 >= median{2} = 2, 8 >= median{4} = 4 -> COMPLETE, 8;
    * x = 0.25: 0.25 < median{1, 0.5, 2} = 1 -> PRUNED;
    * x = 3 raises -> FAIL.

    Ray's own integration would have filed the two stopped trials as COMPLETE with 0.5 and 0.25.
    Ray's records say the same: the stopped trials' last results are marked ``pruned`` (their
    truncated ``m`` kept), only completed trials carry ``objective`` (the tuner's metric, as sweeps
    set it), and Ray's ``get_best_result()`` returns x = 2.
    """
    import ray.cloudpickle
    from ray.tune import RunConfig, TuneConfig, Tuner

    from wsss_tune.trainables.callbacks import OBJECTIVE_KEY, PRUNED_KEY, TrialOutcome

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # as sweeps run (trainables.session.tune_env)
    points = [{"x": 1.0}, {"x": 0.5}, {"x": 2.0}, {"x": 0.25}, {"x": 3.0}]
    searcher = FidelitySearch(space={"x": FloatDistribution(0.1, 4.0)}, metric="m", mode="max",
                              points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=0),
                              study_name="curves", storage=study_storage(str(tmp_path / STUDY_FILE)),
                              time_attr="stage_step")
    scheduler = FullBudgetASHA(time_attr="stage_step", metric="m", mode="max", max_t=4, grace_period=1,
                               reduction_factor=2)
    grid = Tuner(_curve_trainable,
                 tune_config=TuneConfig(metric=OBJECTIVE_KEY, mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=len(points), max_concurrent_trials=1, reuse_actors=True),
                 run_config=RunConfig(storage_path=str(tmp_path), name="curves", verbose=0,
                                      callbacks=[TrialOutcome(metric="m")])).fit()
    by_x = {r.config["x"]: r for r in grid}
    assert grid.get_best_result().config["x"] == 2.0
    assert [by_x[x].metrics.get(PRUNED_KEY) for x in (1.0, 0.5, 2.0, 0.25)] == [False, True, False, True]
    assert [by_x[x].metrics.get(FINAL_KEY) for x in (1.0, 0.5, 2.0, 0.25)] == [True, False, True, False]
    assert [by_x[x].metrics.get(OBJECTIVE_KEY) for x in (1.0, 0.5, 2.0, 0.25)] == [4.0, None, 8.0, None]
    assert by_x[0.5].metrics["m"] == 0.5 and by_x[3.0].error is not None

    study = optuna.load_study(study_name="curves", storage=f"sqlite:///{tmp_path / STUDY_FILE}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.params["x"] for t in trials] == [p["x"] for p in points]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE,
                                         TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].value == 4.0 and trials[2].value == 8.0
    assert trials[0].intermediate_values == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert trials[1].intermediate_values == {1: 0.5}
    assert trials[3].intermediate_values == {1: 0.25}
    assert all(t.user_attrs.get(RAY_TRIAL_ATTR) for t in trials)


# --------------------------------------------------------------------------------------------------
# Real sweeps (tiny)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("prebuild", [True, False], ids=["prebuild", "trials-build"])
def test_rw_sweep_builds_each_shared_artifact_once(ray_cluster: None, synth_root: Path, tmp_path: Path,
                                                   prebuild: bool) -> None:
    """synth_rw, 4 trials, two at a time on 2 CPUs, on an empty store: EPS and AffinityNet are
    fixed, so ``eps_model``, ``eps`` and ``affinity`` are built exactly once and the store holds one
    artifact of each plus one walk per distinct setting. By default the sweep builds them before the
    trials start (its run folder ``runs/prebuild-search``) and every trial finds them; without
    ``prebuild`` the first trial builds them and the second, started while EPS trains, waits."""
    from wsss_tune.trainables.prebuild import PREBUILD_PREFIX

    store = tmp_path / "store"
    # EPS trains long enough (60 steps) for the second trial's worker to start while it runs.
    result = run_sweep("synth_rw", data=synth_root, storage=tmp_path / "exp", trials=4, store=str(store),
                       cpus_per_trial=1, wandb="off", progress="off",
                       overrides={**SMOKE_OVERRIDES, "eps.iterations": 60}, reseed=None, prebuild=prebuild)
    assert result.counts["completed"] == 4, [t.error for t in result.trials]
    shared = ("eps_model", "eps", "affinity")
    record = result.path / "runs" / f"{PREBUILD_PREFIX}search" / "metrics.json"
    if prebuild:
        built = json.loads(record.read_text())
        assert built["prebuilt"] == list(shared)
        assert [built["stages"][s]["hit"] for s in shared] == [False, False, False]
        for stage in shared:
            assert sum(t.metrics[f"built/{stage}"] for t in result.trials) == 0, stage
    else:
        assert not record.exists()
        for stage in shared:
            assert sum(t.metrics[f"built/{stage}"] for t in result.trials) == 1, stage
        waited = [t.metrics["seconds/eps_model"] for t in result.trials if t.metrics["built/eps_model"] == 0]
        assert max(waited) > 1.0, f"no trial waited for the EPS build (waits {waited}); the trials did not overlap"
    listed = ArtifactStore(uri=str(store))
    assert [len(listed.list(s)) for s in shared] == [1, 1, 1]
    settings = {tuple(sorted(t.params.items())) for t in result.trials}
    assert len(listed.list("rw")) == len(settings)
    # the compute table counts each shared build once, whoever built it
    from wsss_tune.analysis.tables import compute_table

    frame = compute_table(result).frame.set_index("stage")
    assert [int(frame.loc[s, "built"]) for s in shared] == [1, 1, 1]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("space_name", SYNTH_SPACES)
def test_each_synth_space_sweeps_end_to_end(ray_cluster: None, synth_root: Path, shared_store: str,
                                            tmp_path: Path, space_name: str) -> None:
    """Two trials of each shipped synthetic space: the reference point runs first (Optuna trial 0),
    both trials complete, results files agree with the returned result and the study."""
    result = _sweep(space_name, synth_root, tmp_path, name=space_name, store=shared_store)
    space = load_space(space_name)
    assert result.counts == {"completed": 2, "pruned": 0, "failed": 0, "incomplete": 0, "total": 2}, \
        [t.error for t in result.trials]
    study = optuna.load_study(study_name=space_name, storage=result.info["study"]["storage"])
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == space.reference_point()
    assert result.reference is not None and result.reference.trial_id == first.user_attrs[RAY_TRIAL_ATTR]
    assert result.best is not None and result.best.value(space.metric) == max(
        t.value(space.metric) for t in result.trials)
    assert result.best.value(result.heldout_metric) is not None

    again = load_experiment(result.path)
    assert again.best.trial_id == result.best.trial_id and again.reference.trial_id == result.reference.trial_id
    assert {t.trial_id: dict(t.params) for t in again.trials} == {t.trial_id: dict(t.params) for t in result.trials}
    assert again.reports().num_rows == sum(t.reports for t in result.trials)
    doc = json.loads((result.path / "experiment.json").read_text())
    assert doc["tune_split"] == space.tune_split and doc["heldout_split"] == space.heldout_split
    assert doc["base_config"]["data"]["root"] == str(synth_root.resolve())


def _doc_example(name: str, heading: str) -> str:
    """The first python code block after ``heading`` in ``docs/<name>``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / name).read_text()
    after = text.split(heading, 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_api_reads_a_sweep(ray_cluster: None, synth_root: Path, shared_store: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """The docs' "Reading results with Ray's own API" example, run on a real 3-trial DeepLab sweep:
    Ray's ``get_best_result()`` is our best completed trial; every trial's last result says whether
    it was pruned; ``progress.csv`` holds the columns of every stage; the trial config names the
    base config instead of holding it."""
    result = _sweep("synth_deeplab", synth_root, tmp_path, name="rayapi", store=shared_store, trials=3)
    assert result.counts["failed"] == 0, [t.error for t in result.trials]
    code = _doc_example("ray.md", "## Reading results with Ray's own API")
    assert 'Path("experiments/my-sweep")' in code
    exec(compile(code.replace('Path("experiments/my-sweep")', f"Path({str(result.path)!r})"), "docs/ray.md", "exec"),
         {"__name__": "doc_example"})
    out = capsys.readouterr().out
    assert f"best: {result.best.trial_id} " in out
    assert f"completed: {result.counts['completed']} pruned: {result.counts['pruned']}" in out
    for t in result.trials:
        folder = next(result.path.glob(f"*_{t.trial_id}"))
        params = json.loads((folder / "params.json").read_text())
        assert "base" not in params["wsss_tune"] and Path(params["wsss_tune"]["base_ref"]["path"]).is_file()
        assert set(params) - {"wsss_tune"} == set(t.params)
        header = (folder / "progress.csv").read_text().splitlines()[0].split(",")
        assert {"eps_miou_tune", "rw_miou_tune", "deeplab_miou_tune", "final"} <= set(header)


@pytest.mark.slow
@pytest.mark.ray
def test_wandb_offline_keeps_one_run_per_trial(ray_cluster: None, synth_root: Path, shared_store: str,
                                               tmp_path: Path) -> None:
    """W&B offline (no account): one offline run per trial under ``<experiment>/wandb``."""
    result = _sweep("synth_rw", synth_root, tmp_path, name="wb", store=shared_store, wandb="offline")
    assert result.counts["completed"] == 2
    runs = sorted((result.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs


_KILLED_SWEEP = textwrap.dedent("""
    import json, sys
    import ray
    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep
    args = json.loads(sys.argv[1])
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    run_sweep("synth_eps", data=args["data"], storage=args["storage"], name="killed", store=args["store"],
              trials=3, max_concurrent=1, wandb="off", progress="off",
              overrides={**SMOKE_OVERRIDES, "eps.iterations": 40}, reseed=None)
""")


def _finished_runs(exp_dir: Path) -> int:
    """Trials whose pipeline finished (each writes ``runs/<trial>/metrics.json`` last)."""
    return len(list((exp_dir / "runs").glob("*/metrics.json")))


@pytest.mark.slow
@pytest.mark.ray
def test_resume_after_the_driver_is_killed(ray_cluster: None, synth_root: Path, tmp_path: Path) -> None:
    """A synth_eps sweep of 3 trials, one at a time (each trains its own EPS), whose driver is
    killed (SIGKILL to its process group) once the first trial's pipeline finished: ``resume_sweep``
    runs the rest. The study then holds 3 finished trials, the reference once, and none left
    running (a trial the killed driver had asked Optuna for but not saved is closed as failed);
    the results files count 3 completed trials."""
    args = {"data": str(synth_root), "storage": str(tmp_path), "store": str(tmp_path / "store")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SWEEP, json.dumps(args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    exp_dir = tmp_path / "killed"
    deadline = time.monotonic() + 300
    try:
        while _finished_runs(exp_dir) < 1:
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the first trial did not finish within 300 s")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _finished_runs(exp_dir) < 3

    result = resume_sweep(exp_dir, progress="off")
    assert result.counts["completed"] == 3 and result.counts["total"] == 3, [t.error for t in result.trials]
    study = optuna.load_study(study_name="killed", storage=result.info["study"]["storage"])
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states, states
    reference = load_space("synth_eps").reference_point()
    assert sum(t.params == reference for t in study.trials if t.state == TrialState.COMPLETE) == 1
    assert result.complete


@pytest.mark.slow
@pytest.mark.ray
def test_demo_prints_the_gap_table_and_exports(ray_cluster: None, synth_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``demo`` on an existing dataset folder (used as it is), one trial per stage of the synth_gap
    cascade and one more seed for the re-runs: the stage table, the searches, the seed re-runs, the
    gap table (paper setting -> searched -> hand-tuned synth) with the share of the gap closed, and
    the exported winner; the results are complete."""
    from wsss_tune.analysis.results import ReseedRecord

    result = demo(data=synth_root, storage=tmp_path, trials=1, wandb="off", overrides=SMOKE_OVERRIDES,
                  progress="off", reseed=ReseedRecord(top_k=1, seeds=1))
    out = capsys.readouterr().out
    assert result.complete and result.best is not None, [t.error for t in result.trials]
    for text in ("mask quality", "EPS tune", "refined held-out", "DeepLab tune", "Searches in order",
                 "Seed re-runs", "Reproduction gap", "paper setting (reference)", "searched (winner)",
                 "hand-tuned (synth)", "gap closed:", "best config:"):
        assert text in out, text
    assert [p.name for p in result.record.phases] == ["eps", "affinity", "deeplab", "reseed"]
    assert {r.label for r in result.seeds} >= {"reference", "synth"}
    assert (result.path / "best_config.yaml").is_file()
