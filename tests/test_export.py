"""Experiment results (parquet/JSON round trip, best and reference trials) and the best-config export."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from wsss_tune.analysis import (
    TrialRecord,
    export_best,
    load_experiment,
    pick_best,
    stage_miou_rows,
    write_experiment,
)
from wsss_tune.analysis.schema import REPORTS_SCHEMA, TRIALS_SCHEMA
from wsss_tune.artifacts import ArtifactStore
from wsss_tune.config import apply_overrides, load_config, to_dict
from wsss_tune.stages.pipeline import run_pipeline
from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep


def _record(tid: str, status: str, tune: float | None, held: float | None = None, **params: Any) -> TrialRecord:
    metrics = {k: v for k, v in {"rw_miou_tune": tune, "rw_miou_heldout": held}.items() if v is not None}
    return TrialRecord(trial_id=tid, status=status, params=params or {"rw.beta": 8.0, "rw.logt": 3}, metrics=metrics,
                       error="RuntimeError: boom" if status == "failed" else None, run_dir=f"/runs/{tid}")


def _sweep_doc(tmp_path: Path, *, requested: int) -> dict[str, Any]:
    base = load_config("synth", {"data.root": str(tmp_path / "data")})
    return {"name": "exp", "metric": "rw_miou_tune", "mode": "max", "requested": requested,
            "reference_point": {"rw.beta": 8.0, "rw.logt": 3}, "base_config": to_dict(base),
            "store": str(tmp_path / "store"), "stages": ["eps", "affinity"],
            "tune_split": "train_tune", "heldout_split": "train_heldout"}


def _trials() -> list[TrialRecord]:
    return [
        _record("ref", "completed", 50.0, 10.0),
        _record("b", "completed", 60.0, 5.0, **{"rw.beta": 6.5, "rw.logt": 2}),
        _record("c", "completed", 40.0, 90.0, **{"rw.beta": 3.0, "rw.logt": 5}),
        _record("d", "pruned", 70.0, None, **{"rw.beta": 11.0, "rw.logt": 1}),
    ]


def test_best_is_the_best_completed_tune_value() -> None:
    """Tune values: ref 50, b 60, c 40, d 70 (pruned), e 99 (failed). max -> b (d and e are not
    completed); min -> c. Held-out values (c has the best, 90) play no part."""
    trials = [*_trials(), _record("e", "failed", 99.0)]
    assert pick_best(trials, "rw_miou_tune", "max").trial_id == "b"
    assert pick_best(trials, "rw_miou_tune", "min").trial_id == "c"
    assert pick_best([_record("d", "pruned", 70.0)], "rw_miou_tune", "max") is None


def test_results_round_trip_and_mark_best_and_reference(tmp_path: Path) -> None:
    """The reference is the trial whose values equal the reference point (``ref``); the gain over
    it is 60 - 50 = 10. The files have the fixed schema: the searched ``rw.logt`` reads back as an
    integer, report metrics are floats in the ``metrics`` map (a key missing from a report is not
    in its map), Ray's ``training_iteration`` is the ``report`` column."""
    reports = [{"trial_id": "ref", "training_iteration": 1, "stage": "rw", "rw_miou_tune": 1},
               {"trial_id": "b", "training_iteration": 1, "stage": "rw", "rw_miou_tune": 2.5, "rw/t": 4}]
    written = write_experiment(tmp_path, sweep=_sweep_doc(tmp_path, requested=4), trials=_trials(), reports=reports)
    assert written.best.trial_id == "b" and written.reference.trial_id == "ref"
    assert written.gain_over_reference == pytest.approx(10.0) and written.complete

    assert pq.read_schema(tmp_path / "trials.parquet").equals(TRIALS_SCHEMA)
    table = pq.read_table(tmp_path / "reports.parquet")
    assert table.schema.equals(REPORTS_SCHEMA)
    assert table.column("metrics").to_pylist() == [[("rw_miou_tune", 1.0)], [("rw/t", 4.0), ("rw_miou_tune", 2.5)]]
    assert table.column("report").to_pylist() == [1, 1] and table.column("stage").to_pylist() == ["rw", "rw"]

    loaded = load_experiment(tmp_path)
    assert [(t.trial_id, t.status, dict(t.params), t.reference) for t in loaded.trials] == \
        [(t.trial_id, t.status, dict(t.params), t.trial_id == "ref") for t in _trials()]
    assert loaded.best.trial_id == "b" and loaded.counts["pruned"] == 1 and loaded.requested == 4
    assert all(type(t.params["rw.logt"]) is int and type(t.params["rw.beta"]) is float for t in loaded.trials)
    doc = json.loads((tmp_path / "experiment.json").read_text())
    assert doc["best"]["rw_miou_heldout"] == 5.0 and doc["reference"]["trial_id"] == "ref"
    assert doc["heldout_metric"] == "rw_miou_heldout"


def test_stage_rows_show_reference_and_best(tmp_path: Path) -> None:
    trials = [TrialRecord(trial_id="ref", status="completed", params={"rw.beta": 8.0, "rw.logt": 3},
                          metrics={"eps_miou_tune": 60.0, "eps_miou_heldout": 58.0, "rw_miou_tune": 64.0,
                                   "rw_miou_heldout": 61.0}),
              TrialRecord(trial_id="b", status="completed", params={"rw.beta": 4.0, "rw.logt": 2},
                          metrics={"eps_miou_tune": 60.0, "eps_miou_heldout": 58.0, "rw_miou_tune": 66.0,
                                   "rw_miou_heldout": 62.0})]
    result = write_experiment(tmp_path, sweep=_sweep_doc(tmp_path, requested=2), trials=trials, reports=[])
    assert stage_miou_rows(result) == [
        {"config": "reference", "trial": "ref", "EPS tune": 60.0, "EPS held-out": 58.0,
         "refined tune": 64.0, "refined held-out": 61.0},
        {"config": "best", "trial": "b", "EPS tune": 60.0, "EPS held-out": 58.0,
         "refined tune": 66.0, "refined held-out": 62.0},
    ]


def test_export_writes_the_resolved_best_config(tmp_path: Path) -> None:
    """base config + best values (b: beta 6.5, logt 2) + the sweep's store, named ``exp-best``;
    ``load_config`` reads the file back to exactly that config."""
    write_experiment(tmp_path, sweep=_sweep_doc(tmp_path, requested=4), trials=_trials(), reports=[])
    path = export_best(tmp_path)
    assert path == tmp_path / "best_config.yaml"
    base = load_config("synth", {"data.root": str(tmp_path / "data")})
    expected = apply_overrides(base, {"rw.beta": 6.5, "rw.logt": 2, "run.artifact_store": str(tmp_path / "store"),
                                      "name": "exp-best"})
    assert load_config(path) == expected
    text = path.read_text()
    assert text.startswith("# Best configuration of experiment 'exp' (trial b)")
    assert f"wsss-tune run {path} --stages eps,affinity" in text
    other = export_best(tmp_path, out=tmp_path / "x" / "best.yaml")
    assert other.is_file() and load_config(other) == expected


def test_export_refuses_an_incomplete_experiment(tmp_path: Path) -> None:
    """A failed trial, or fewer trials than requested (5 asked, 4 ran), makes the experiment
    incomplete: export refuses, naming what is missing, unless ``allow_incomplete``."""
    failed = tmp_path / "failed"
    write_experiment(failed, sweep=_sweep_doc(tmp_path, requested=5),
                     trials=[*_trials(), _record("e", "failed", None)], reports=[])
    with pytest.raises(ValueError, match=r"incomplete: 4 of 5 trials finished \(1 failed\).*allow_incomplete"):
        export_best(failed)
    assert load_config(export_best(failed, allow_incomplete=True)).rw.beta == 6.5

    short = tmp_path / "short"
    write_experiment(short, sweep=_sweep_doc(tmp_path, requested=5), trials=_trials(), reports=[])
    with pytest.raises(ValueError, match="1 not run or interrupted"):
        export_best(short)

    none = tmp_path / "none"
    write_experiment(none, sweep=_sweep_doc(tmp_path, requested=1), trials=[_record("d", "pruned", 70.0)], reports=[])
    with pytest.raises(ValueError, match="no completed trial"):
        export_best(none)
    with pytest.raises(FileNotFoundError, match="experiment.json"):
        export_best(tmp_path / "nothing")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_exported_config_reproduces_the_trial(ray_cluster: None, synth_root: Path, tmp_path: Path) -> None:
    """A tiny synth_rw sweep; its exported config, run with ``run_pipeline``, gives the best trial's
    rw_miou_tune exactly: from the sweep's store (every stage a cache hit), and recomputed in an
    empty store (every stage built, same seed and one CPU thread as the trial)."""
    result = run_sweep("synth_rw", data=synth_root, storage=tmp_path, name="exp", trials=2, wandb="off",
                       progress="off", overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), reseed=None)
    assert result.complete, [t.error for t in result.trials]
    cfg = load_config(export_best(result.path))
    target = result.best.value("rw_miou_tune")

    cached = run_pipeline(cfg, stages=("eps", "affinity"), out_dir=tmp_path / "run_cached",
                          store=ArtifactStore(uri=cfg.run.artifact_store))
    assert all(info["hit"] for info in cached["stages"].values())
    assert cached["rw_miou_tune"] == target

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh = run_pipeline(cfg, stages=("eps", "affinity"), out_dir=tmp_path / "run_fresh",
                             store=ArtifactStore(uri=str(tmp_path / "fresh_store")))
    finally:
        torch.set_num_threads(threads)
    assert not any(info["hit"] for info in fresh["stages"].values())
    assert fresh["rw_miou_tune"] == target


def test_export_command(tmp_path: Path) -> None:
    """``wsss-tune export EXP`` writes the YAML and says where; an incomplete experiment exits with
    code 2 and the reason, ``--allow-incomplete`` exports it."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    runner = CliRunner()
    write_experiment(tmp_path / "ok", sweep=_sweep_doc(tmp_path, requested=4), trials=_trials(), reports=[])
    res = runner.invoke(app, ["export", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert f"best config: {tmp_path / 'ok' / 'best_config.yaml'}" in res.output

    write_experiment(tmp_path / "short", sweep=_sweep_doc(tmp_path, requested=6), trials=_trials(), reports=[])
    res = runner.invoke(app, ["export", str(tmp_path / "short")])
    assert res.exit_code == 2 and "incomplete" in res.output
    assert runner.invoke(app, ["export", str(tmp_path / "short"), "--allow-incomplete"]).exit_code == 0


def test_summary_lists_failed_trials_cache_repairs_and_warnings(tmp_path: Path) -> None:
    """The sweep summary names every failed trial (up to SHOWN_FAILURES, then a count), the cache
    repairs per trial, and the warnings met while gathering the results."""
    from rich.console import Console

    from wsss_tune.trainables.sweep import SHOWN_FAILURES, print_summary

    failed = [_record(f"f{i:02d}", "failed", None) for i in range(SHOWN_FAILURES + 2)]
    repaired = dataclasses.replace(_trials()[1], metrics={**_trials()[1].metrics, "cache_repairs": 2})
    result = write_experiment(tmp_path, sweep=_sweep_doc(tmp_path, requested=4 + len(failed)),
                              trials=[_trials()[0], repaired, *failed], reports=[],
                              notes=["experiment_state-x.json: skipped, unreadable"])
    console = Console(record=True, width=200)
    print_summary(result, console=console)
    text = console.export_text()
    assert all(f"failed f{i:02d}: RuntimeError: boom" in text for i in range(SHOWN_FAILURES))
    assert f"failed f{SHOWN_FAILURES:02d}" not in text and "and 2 more failed trial(s)" in text
    assert "cache repairs (damaged artifacts rebuilt): 2 in b (2)" in text
    assert "warning experiment_state-x.json: skipped, unreadable" in text
