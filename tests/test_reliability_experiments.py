"""Experiment folders as untrusted, damageable, copyable data.

* Nothing executable is read from an experiment folder: every pickle in it (Ray's ``tuner.pkl``,
  searcher and search-generator state, the ``CLOUDPICKLE_FALLBACK`` entries of its experiment
  state, each trial's ``params.pkl`` and ``error.pkl``) replaced by a payload that would create a
  file when unpickled, and ``resume``, ``results rebuild``, ``report``, ``export`` and ``compare``
  create none.
* Results are never forgotten: damaged searcher state, corrupted parquet, a corrupted study, a
  damaged Ray state file and a kill during the results rewrite each leave every finished trial in
  the rebuilt results.
* A copied (``cp -a``) or moved experiment resumes, reports and exports on its own and never writes
  into the original.

One small finished sweep (synth_eps, 2 trials on the tiny synthetic preset) is made per module;
each test works on its own copy. An interrupted sweep is made from a copy by raising its requested
trial count and leaving a search trial RUNNING in its study (what a killed driver leaves).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from wsss_tune.analysis import load_experiment
from wsss_tune.analysis.results import (
    RUNS_DIR,
    ResultsError,
    load_sweep,
    portable_sweep,
    resolve_paths,
)
from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep
from wsss_tune.trainables.records import collect_results
from wsss_tune.trainables.search import ATTEMPTS_ATTR, RAY_TRIAL_ATTR, FidelitySearch
from wsss_tune.trainables.sweep import rebuild_results, resume_sweep

TRIALS = 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Iterator[Path]:
    """A finished synth_eps sweep of 2 trials (its own Ray instance, stopped afterwards)."""
    import ray

    storage = tmp_path_factory.mktemp("exps")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep("synth_eps", data=synth_root, storage=storage, name="orig", trials=TRIALS, wandb="off",
                           progress="off", overrides=SMOKE_OVERRIDES, store=str(storage / "store"), reseed=None)
    finally:
        ray.shutdown()
    assert result.counts["completed"] == TRIALS, [t.error for t in result.trials]
    yield result.path


def _copy(src: Path, dst: Path) -> Path:
    """``cp -a``: the folder with its modes, times and links."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _completed(exp: Path) -> dict[str, float]:
    return {t.trial_id: t.value("eps_miou_tune") for t in load_experiment(exp).trials if t.status == "completed"}


class _Payload:
    """Unpickling this creates ``marker`` (stands for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _plant(exp: Path, marker: Path) -> dict[str, int]:
    """Replace every pickle the folder holds with the payload; count them by kind."""
    payload = pickle.dumps(_Payload(marker))
    counts: dict[str, int] = {}

    def bump(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    for path in exp.rglob("*.pkl"):
        path.write_bytes(payload)
        bump(path.name.split("-")[0])
    for path in exp.glob("search_gen_state-*.json"):  # a pickle despite its name
        path.write_bytes(payload)
        bump("search_gen_state")
    for folder in exp.glob("*_*"):
        if folder.is_dir() and (folder / "result.json").is_file():
            (folder / "error.pkl").write_bytes(payload)
            bump("error.pkl")
    (exp / "searcher-state-2000-01-01_00-00-00.pkl").write_bytes(payload)
    bump("searcher-state")

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            if obj.get("_type") == "CLOUDPICKLE_FALLBACK":
                obj["value"] = payload.hex()
                bump("cloudpickle")
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for path in exp.glob("experiment_state-*.json"):
        doc = json.loads(path.read_text())
        entries = []
        for state, meta in doc["trial_data"]:
            state = json.loads(state)
            walk(state)
            entries.append([json.dumps(state), meta])
        doc["trial_data"] = entries
        path.write_text(json.dumps(doc))
    return counts


def _interrupt(exp: Path, *, extra: int = 1) -> str:
    """Make a finished copy look interrupted: ``extra`` more trials requested, one of them RUNNING in
    the study under a Ray trial id that never saved anything (as after a SIGKILL). Returns that id."""
    sweep = json.loads((exp / "sweep.json").read_text())
    sweep["requested"] = sweep["requested"] + extra
    (exp / "sweep.json").write_text(json.dumps(sweep))
    record = load_sweep(exp)
    study = optuna.load_study(study_name=record.study.name, storage=record.study.storage)
    done = study.trials[-1]
    running = study.ask({k: v for k, v in done.distributions.items()})
    running.set_user_attr(RAY_TRIAL_ATTR, "deadbeef")
    running.set_user_attr(ATTEMPTS_ATTR, ["deadbeef"])
    return "deadbeef"


# --------------------------------------------------------------------------------------------------
# No code from the folder; a copy never writes into the original
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.ray
def test_resume_of_a_copied_folder_with_planted_pickles_runs_no_code_and_leaves_the_original(
        finished: Path, tmp_path: Path) -> None:
    """``cp -a`` of the experiment, interrupted (one more trial requested, one RUNNING in the study),
    every pickle replaced by a payload: ``resume`` continues the running trial (same Optuna trial,
    new Ray id, ``resumed_from`` names the old one), creates no marker, and the original folder is
    byte for byte unchanged. The copy then moves (``mv``) and still reports, exports and compares."""
    from wsss_tune.analysis.compare import compare
    from wsss_tune.analysis.export import export_best
    from wsss_tune.analysis.report import report

    original = _copy(finished, tmp_path / "a")  # a private original, so the module's stays clean
    before_original = _snapshot(original)
    before = _completed(original)
    copy = _copy(original, tmp_path / "b")
    stale = _interrupt(copy)
    marker = tmp_path / "pwned"
    planted = _plant(copy, marker)
    assert {"tuner.pkl", "searcher-state", "search_gen_state", "params.pkl", "error.pkl", "cloudpickle"} <= set(planted), \
        planted

    result = resume_sweep(copy, progress="off")
    assert not marker.exists()
    assert result.counts == {"completed": TRIALS + 1, "pruned": 0, "failed": 0, "incomplete": 0,
                             "total": TRIALS + 1}, [t.error for t in result.trials]
    after = {t.trial_id: t for t in result.trials}
    for trial_id, value in before.items():
        assert after[trial_id].status == "completed" and after[trial_id].value("eps_miou_tune") == value
    resumed = [t for t in result.trials if t.resumed_from]
    assert [t.resumed_from for t in resumed] == [(stale,)]
    study = optuna.load_study(study_name="orig", storage=f"sqlite:///{copy / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * (TRIALS + 1)
    assert study.trials[-1].user_attrs[ATTEMPTS_ATTR] == [stale, resumed[0].trial_id]
    assert _snapshot(original) == before_original, "the resumed copy wrote into the original"

    moved = tmp_path / "moved"
    os.rename(copy, moved)
    rebuilt = rebuild_results(moved)
    assert rebuilt.counts["completed"] == TRIALS + 1
    report(moved, out=tmp_path / "report", images=0)
    exported = export_best(moved, out=tmp_path / "best.yaml")
    compare(moved, original)
    assert not marker.exists()
    assert exported.is_file()
    for name in ("sweep.json", "experiment.json", "trials.parquet"):
        data = (moved / name).read_bytes()
        assert str(copy).encode() not in data and str(original).encode() not in data, name
    assert all(Path(t.run_dir).parent == moved / RUNS_DIR for t in load_experiment(moved).trials)


def test_the_searcher_never_pickles_or_unpickles(tmp_path: Path) -> None:
    """FidelitySearch writes no searcher-state pickle and refuses to restore from one."""
    from optuna.distributions import FloatDistribution
    from optuna.samplers import TPESampler

    from wsss_tune.trainables.search import study_storage

    searcher = FidelitySearch(space={"eps.tau": FloatDistribution(0.1, 0.9)}, metric="m", mode="max",
                              sampler=TPESampler(seed=0), study_name="s",
                              storage=study_storage(str(tmp_path / "optuna.db")))
    searcher.save_to_dir(str(tmp_path), "x")
    assert not list(tmp_path.glob("searcher-state-*"))
    evil = tmp_path / "searcher-state-x.pkl"
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        searcher.restore_from_dir(str(tmp_path))
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        searcher.restore(str(evil))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Results are never forgotten
# --------------------------------------------------------------------------------------------------


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i: i + 64] = bytes(b ^ 0xFF for b in data[i: i + 64])
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.ray
def test_corrupt_results_files_name_the_file_and_rebuild_gives_every_trial_back(finished: Path,
                                                                                tmp_path: Path) -> None:
    """A byte-flipped trials.parquet / reports.parquet and a cut experiment.json: reading them names
    the file and the rebuild command; ``rebuild_results`` gives every trial back with its values."""
    exp = _copy(finished, tmp_path / "exp")
    before = _completed(exp)
    _flip(exp / "trials.parquet")
    with pytest.raises(ResultsError, match=r"trials\.parquet.*wsss-tune results rebuild"):
        load_experiment(exp)
    _flip(exp / "reports.parquet")
    text = (exp / "experiment.json").read_text()
    (exp / "experiment.json").write_text(text[: len(text) // 2])
    with pytest.raises(ResultsError, match=r"experiment\.json.*wsss-tune results rebuild"):
        load_experiment(exp)
    rebuilt = rebuild_results(exp)
    assert {t.trial_id: t.value("eps_miou_tune") for t in rebuilt.trials if t.status == "completed"} == before
    assert _completed(exp) == before
    assert rebuilt.reports().num_rows > 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_corrupt_study_stops_resume_before_any_results_file_changes(finished: Path, tmp_path: Path) -> None:
    """``optuna.db`` overwritten: ``resume`` refuses with a message naming it and changes nothing; the
    rebuild still lists every trial (from the trial folders and Ray's state), with a warning."""
    exp = _copy(finished, tmp_path / "exp")
    before = _completed(exp)
    _interrupt(exp)
    (exp / "optuna.db").write_bytes(b"this is not a database" * 100)
    snap = _snapshot(exp)
    with pytest.raises(ResultsError, match=r"cannot resume .*optuna\.db.*Nothing was changed"):
        resume_sweep(exp, progress="off")
    assert _snapshot(exp) == snap
    rebuilt = rebuild_results(exp)
    assert {t.trial_id: t.value("eps_miou_tune") for t in rebuilt.trials if t.status == "completed"} == before
    assert any("optuna.db" in w for w in rebuilt.info["warnings"])


@pytest.mark.slow
@pytest.mark.ray
def test_every_source_can_be_lost_but_one(finished: Path, tmp_path: Path) -> None:
    """A trial known only to one source is still listed: its Ray folder and Ray's state gone (the
    study remembers it); then the study corrupt too (the previous trials table remembers it)."""
    exp = _copy(finished, tmp_path / "exp")
    before = _completed(exp)
    victim = sorted(before)[0]
    shutil.rmtree(next(p for p in exp.iterdir() if p.name.endswith(f"_{victim}")))
    for path in exp.glob("experiment_state-*.json"):
        path.write_text("{ damaged")
    rebuilt = collect_results(exp)
    assert rebuilt.trial(victim).status == "completed"
    assert {t.trial_id for t in rebuilt.trials} == set(before)
    assert any("experiment_state" in w for w in rebuilt.info["warnings"])
    (exp / "optuna.db").write_bytes(b"\0" * 4096)
    rebuilt = collect_results(exp)
    assert rebuilt.trial(victim).status == "completed"
    assert rebuilt.trial(victim).value("eps_miou_tune") == before[victim]
    assert _completed(exp) == before


_KILLED_REWRITE = textwrap.dedent("""
    import os, sys
    import wsss_tune.analysis.results as results
    from wsss_tune.trainables.records import collect_results
    real = results.atomic_write_bytes
    def write(path, data):
        if str(path).endswith("reports.parquet"):
            os._exit(9)  # killed between the two parquet files
        real(path, data)
    results.atomic_write_bytes = write
    collect_results(sys.argv[1])
""")


@pytest.mark.slow
@pytest.mark.ray
def test_a_kill_during_the_results_rewrite_loses_nothing(finished: Path, tmp_path: Path) -> None:
    """The process rewriting the results dies half-way (after trials.parquet, before reports.parquet
    and experiment.json): every file is whole, and the rebuild lists every finished trial."""
    exp = _copy(finished, tmp_path / "exp")
    before = _completed(exp)
    (exp / "trials.parquet").unlink()
    proc = subprocess.run([sys.executable, "-c", _KILLED_REWRITE, str(exp)], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert not list(exp.glob(".*.tmp"))
    assert _completed(exp) == before  # the new trials table with the old experiment.json
    assert {t.trial_id: t.value("eps_miou_tune") for t in rebuild_results(exp).trials} == before


# --------------------------------------------------------------------------------------------------
# Paths (no Ray)
# --------------------------------------------------------------------------------------------------


def test_paths_inside_the_folder_are_written_relative_and_rebased_when_read(tmp_path: Path) -> None:
    """Written: the study, run folders, W&B folder and an inside store relative; an outside store as it
    is. Read in another folder: everything inside points into that folder. A folder written by an
    older version (absolute paths) is rebased onto where it is read."""
    exp = tmp_path / "exps" / "e1"
    doc = {"name": "e1", "storage": str(exp.parent), "store": str(exp / "store"),
           "study": {"name": "e1", "storage": f"sqlite:///{exp / 'optuna.db'}"},
           "settings": {"runs_dir": str(exp / RUNS_DIR)}, "wandb": {"mode": "offline", "dir": str(exp / "wandb")}}
    portable = portable_sweep(doc, exp)
    assert portable["study"]["storage"] == "sqlite:///optuna.db"
    assert portable["settings"]["runs_dir"] == RUNS_DIR and portable["wandb"]["dir"] == "wandb"
    assert portable["store"] == "store" and portable["storage"] == ".."
    other = tmp_path / "elsewhere" / "copy"
    for recorded in (portable, doc):  # new relative form, and an older absolute one
        got = resolve_paths(recorded, other)
        assert got["study"]["storage"] == f"sqlite:///{other / 'optuna.db'}"
        assert got["settings"]["runs_dir"] == str(other / RUNS_DIR)
        assert got["wandb"]["dir"] == str(other / "wandb")
        assert got["store"] == str(other / "store")
        assert got["storage"] == str(other.parent)
    outside = {**doc, "store": "/shared/store"}
    assert resolve_paths(portable_sweep(outside, exp), other)["store"] == "/shared/store"
