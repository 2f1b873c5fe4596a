"""The experiment record (``sweep.json``, ``experiment.json``): its JSON round trip, its version, the
files written before it was versioned, and its paths (relative on disk, absolute once read). No Ray."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from wsss_tune.analysis.results import (
    EXPERIMENT_FILE,
    RECORD_VERSION,
    RUNS_DIR,
    SWEEP_FILE,
    ExperimentRecord,
    OutcomeRecord,
    ResourcesRecord,
    ResultsError,
    StudyRecord,
    TrialRecord,
    TrialSummary,
    WandbRecord,
    load_experiment,
    load_sweep,
    write_experiment,
    write_sweep,
)

#: The keys ``sweep.json`` held before the record was versioned (``plan_sweep`` wrote them in this order).
UNVERSIONED_SWEEP_KEYS = [
    "name", "space_name", "space_source", "space", "base_config", "metric", "mode", "heldout_metric",
    "tune_split", "heldout_split", "stages", "trainable", "requested", "reference_point", "store", "storage",
    "study", "wandb", "resources", "seed", "max_failures", "max_concurrent", "settings", "created",
]
#: Keys added in version 1 since (optional: a record without them reads with their defaults, a
#: one-search experiment without seed re-runs).
ADDED_SWEEP_KEYS = ["search_mode", "phases", "reseed"]
#: The keys ``experiment.json`` added to them.
OUTCOME_KEYS = ["counts", "complete", "best", "reference", "gain_over_reference", "gain_over_reference_heldout",
                "seeds", "seed_spread", "files", "warnings", "updated"]


def _record(exp: Path, **changes: Any) -> ExperimentRecord:
    """A record as ``plan_sweep`` makes it for the experiment folder ``exp`` (paths absolute)."""
    record = ExperimentRecord(
        name=exp.name, space_name="synth_eps", space_source=None,
        space={"base": "synth", "stages": ["eps"], "metric": "eps_miou_tune", "mode": "max",
               "params": {"eps.tau": {"kind": "uniform", "low": 0.1, "high": 0.7}},
               "fidelity": {"time_attr": "stage_step", "max_t": 4, "grace_period": 2, "reduction_factor": 2.0}},
        base_config={"eps": {"tau": 0.4}, "data": {"root": "/data/synth"}},
        metric="eps_miou_tune", mode="max", tune_split="train_tune", heldout_split="train_heldout",
        stages=("eps",), trainable="eps", requested=2, reference_point={"eps.tau": 0.4},
        store=str(exp.parent / "artifacts"), storage=str(exp.parent),
        study=StudyRecord(name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}"),
        wandb=WandbRecord(mode="offline", project="wsss-tune", dir=str(exp / "wandb")),
        resources=ResourcesRecord(cpus_per_trial=2.0, gpus_per_trial=0.5),
        seed=3, max_failures=1, max_concurrent=None,
        settings={"base": {"eps": {"tau": 0.4}}, "stages": ["eps"], "runs_dir": str(exp / RUNS_DIR),
                  "store": str(exp.parent / "artifacts"), "metric": "eps_miou_tune", "time_attr": "stage_step",
                  "final_t": 4, "threads": 2, "tune_checkpoints": True},
        created="2024-01-01T00:00:00+0000",
    )
    return dataclasses.replace(record, **changes)


def _outcome(exp: Path) -> OutcomeRecord:
    best = TrialSummary(trial_id="b", status="completed", params={"eps.tau": 0.3}, value=61.0, heldout=59.0,
                        run_dir=str(exp / RUNS_DIR / "b"))
    ref = TrialSummary(trial_id="a", status="completed", params={"eps.tau": 0.4}, value=60.0, heldout=58.0,
                       run_dir=str(exp / RUNS_DIR / "a"))
    return OutcomeRecord(counts={"completed": 2, "pruned": 0, "failed": 0, "incomplete": 0, "total": 2},
                         complete=True, best=best, reference=ref, gain_over_reference=1.0,
                         files={"trials": "trials.parquet", "reports": "reports.parquet", "runs": RUNS_DIR},
                         warnings=("experiment_state-x.json: skipped, unreadable",),
                         updated="2024-01-01T01:00:00+0000")


def _trials(exp: Path) -> list[TrialRecord]:
    return [TrialRecord(trial_id=t, status="completed", params={"eps.tau": tau},
                        metrics={"eps_miou_tune": v, "eps_miou_heldout": v - 2}, run_dir=str(exp / RUNS_DIR / t))
            for t, tau, v in (("a", 0.4, 60.0), ("b", 0.3, 61.0))]


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def test_the_record_survives_its_json_round_trip(tmp_path: Path) -> None:
    """to_json -> JSON text -> from_json in the same folder gives the same record, with and without an
    outcome; the file starts with the version; its keys are the keys the files had before versioning."""
    exp = tmp_path / "exps" / "e1"
    for record in (_record(exp), _record(exp, outcome=_outcome(exp))):
        doc = json.loads(json.dumps(record.to_json(exp)))
        assert next(iter(doc)) == "version" and doc["version"] == RECORD_VERSION
        expected = ["version", *UNVERSIONED_SWEEP_KEYS, *ADDED_SWEEP_KEYS, *(OUTCOME_KEYS if record.outcome else [])]
        assert list(doc) == expected
        assert ExperimentRecord.from_json(doc, exp, file=exp / SWEEP_FILE) == record


def test_sweep_and_experiment_files_read_back_through_the_record(tmp_path: Path) -> None:
    """write_sweep / load_sweep and write_experiment / load_experiment: the same record, the outcome
    computed from the trials (best b, reference a, gain 1), ``info`` derived from the record."""
    exp = tmp_path / "exps" / "e1"
    exp.mkdir(parents=True)
    record = _record(exp)
    write_sweep(exp, dataclasses.replace(record, outcome=_outcome(exp)))  # the outcome is not written
    assert "counts" not in json.loads((exp / SWEEP_FILE).read_text())
    assert load_sweep(exp) == record

    written = write_experiment(exp, sweep=load_sweep(exp), trials=_trials(exp), reports=[], notes=["a note"])
    loaded = load_experiment(exp)
    assert loaded.record == written.record
    assert dataclasses.replace(loaded.record, outcome=None) == record
    outcome = loaded.record.outcome
    assert outcome is not None and outcome.best is not None and outcome.reference is not None
    assert (outcome.best.trial_id, outcome.reference.trial_id, outcome.gain_over_reference) == ("b", "a", 1.0)
    assert outcome.best.run_dir == str(exp / RUNS_DIR / "b")
    assert loaded.warnings == ("a note",) and loaded.counts["total"] == 2 and loaded.complete
    assert (loaded.name, loaded.metric, loaded.heldout_metric, loaded.requested) == \
        ("e1", "eps_miou_tune", "eps_miou_heldout", 2)
    assert loaded.info["study"] == {"name": "e1", "storage": f"sqlite:///{exp / 'optuna.db'}"}
    assert loaded.info["warnings"] == ["a note"] and "counts" not in loaded.info
    assert loaded.record.searched_params == ("eps.tau",) and loaded.record.fidelity["max_t"] == 4
    assert loaded.record.runs_dir == str(exp / RUNS_DIR)


def test_a_plain_dict_still_makes_a_record(tmp_path: Path) -> None:
    """write_experiment takes the flat dict form too (the fields a sweep always writes default)."""
    result = write_experiment(tmp_path, sweep={"name": "x", "metric": "rw_miou_tune", "mode": "max", "requested": 1},
                              trials=[], reports=[])
    assert result.record.study is None and result.record.wandb == WandbRecord() and result.record.stages == ()
    assert result.heldout_metric == "rw_miou_heldout"
    # read back, ``storage`` is the folder that holds the experiment (wherever it is now)
    assert load_experiment(tmp_path).record == dataclasses.replace(result.record, storage=str(tmp_path.parent))


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, words", [
    (RECORD_VERSION + 1, f"version {RECORD_VERSION + 1} is newer than this wsss-tune reads"),
    (0, "unknown experiment record version 0"),
    ("1", "unknown experiment record version '1'"),
])
def test_an_unknown_or_newer_version_is_refused_naming_the_file(tmp_path: Path, version: Any, words: str) -> None:
    exp = tmp_path / "e1"
    exp.mkdir()
    write_sweep(exp, _record(exp))
    write_experiment(exp, sweep=_record(exp), trials=_trials(exp), reports=[])
    for name, read in ((SWEEP_FILE, load_sweep), (EXPERIMENT_FILE, load_experiment)):
        doc = json.loads((exp / name).read_text())
        (exp / name).write_text(json.dumps({**doc, "version": version}))
        with pytest.raises(ResultsError) as info:
            read(exp)
        assert str(info.value).startswith(f"{exp / name}: ") and words in str(info.value)


def test_files_written_before_versioning_read_as_version_1(tmp_path: Path) -> None:
    """A ``sweep.json`` and an ``experiment.json`` as the code before the record's version wrote them
    (no ``version``; the oldest also with absolute paths of the folder they were made in) read as
    version 1, their paths in the folder they are read from."""
    made_in = tmp_path / "old" / "e1"
    exp = tmp_path / "moved" / "e1"
    exp.mkdir(parents=True)
    record = _record(made_in)
    # The pre-versioning writers: the record's dict form, with no version (absolute paths, as the
    # oldest folders hold them).
    sweep_doc = {k: v for k, v in record.to_dict().items() if k not in ADDED_SWEEP_KEYS}
    assert "version" not in sweep_doc and list(sweep_doc) == UNVERSIONED_SWEEP_KEYS
    (exp / SWEEP_FILE).write_text(json.dumps(sweep_doc))
    read = load_sweep(exp)
    assert read.study == StudyRecord(name="e1", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert read.runs_dir == str(exp / RUNS_DIR) and read.wandb.dir == str(exp / "wandb")
    assert read.storage == str(exp.parent) and read.store == record.store  # outside the folder: as it was
    assert dataclasses.replace(read, study=record.study, settings=record.settings, wandb=record.wandb,
                               storage=record.storage) == record

    write_experiment(exp, sweep=read, trials=_trials(exp), reports=[])
    doc = json.loads((exp / EXPERIMENT_FILE).read_text())
    del doc["version"]
    (exp / EXPERIMENT_FILE).write_text(json.dumps(doc))
    old = load_experiment(exp)
    assert old.best is not None and old.best.trial_id == "b" and old.record.outcome.best.trial_id == "b"


def test_a_mistyped_field_is_named_with_the_file(tmp_path: Path) -> None:
    exp = tmp_path / "e1"
    exp.mkdir()
    write_sweep(exp, _record(exp))
    doc = json.loads((exp / SWEEP_FILE).read_text())
    (exp / SWEEP_FILE).write_text(json.dumps({**doc, "resources": {"cpus_per_trial": "two"}}))
    with pytest.raises(ResultsError, match=r"sweep\.json: the sweep record is invalid \(field "
                                           r"'resources\.cpus_per_trial' is 'two', expected a number\)"):
        load_sweep(exp)
    write_experiment(exp, sweep=_record(exp), trials=_trials(exp), reports=[])
    doc = json.loads((exp / EXPERIMENT_FILE).read_text())
    (exp / EXPERIMENT_FILE).write_text(json.dumps({**doc, "requested": "2"}))
    with pytest.raises(ResultsError, match=r"experiment\.json: the experiment record is invalid .*'requested'.*"
                                           r"wsss-tune results rebuild"):
        load_experiment(exp)


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def test_in_folder_paths_are_written_relative_and_resolved_where_read(tmp_path: Path) -> None:
    """On disk: the study, the run folders, the W&B folder, the best and reference run folders and an
    inside store relative; an outside store as it is. A copy reads them inside itself."""
    exp = tmp_path / "exps" / "e1"
    exp.mkdir(parents=True)
    write_sweep(exp, _record(exp, store=str(exp / "store")))
    write_experiment(exp, sweep=load_sweep(exp), trials=_trials(exp), reports=[])
    for name in (SWEEP_FILE, EXPERIMENT_FILE):
        doc = json.loads((exp / name).read_text())
        assert doc["study"]["storage"] == "sqlite:///optuna.db" and doc["settings"]["runs_dir"] == RUNS_DIR
        assert doc["wandb"]["dir"] == "wandb" and doc["store"] == "store" and doc["storage"] == ".."
        assert str(exp) not in (exp / name).read_text()
    doc = json.loads((exp / EXPERIMENT_FILE).read_text())
    assert doc["best"]["run_dir"] == f"{RUNS_DIR}/b" and doc["reference"]["run_dir"] == f"{RUNS_DIR}/a"

    copy = tmp_path / "elsewhere" / "c1"
    shutil.copytree(exp, copy)
    for record in (load_sweep(copy), load_experiment(copy).record):
        assert record.study.storage == f"sqlite:///{copy / 'optuna.db'}"
        assert record.runs_dir == str(copy / RUNS_DIR) and record.wandb.dir == str(copy / "wandb")
        assert record.store == str(copy / "store") and record.storage == str(copy.parent)
    outcome = load_experiment(copy).record.outcome
    assert outcome.best.run_dir == str(copy / RUNS_DIR / "b")
    assert all(Path(t.run_dir).parent == copy / RUNS_DIR for t in load_experiment(copy).trials)

    write_sweep(copy, _record(copy, store="/shared/store"))
    assert json.loads((copy / SWEEP_FILE).read_text())["store"] == "/shared/store"
    assert load_sweep(copy).store == "/shared/store"
