"""The fixed schema of ``trials.parquet`` and ``reports.parquet`` (``wsss_tune.analysis.schema``,
``docs/results.md``): equal for different experiments, typed (bools, times), free of Ray's
bookkeeping, readable by DuckDB across experiments; files of the older layout convert on read;
bad values are refused by name."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wsss_tune.analysis import TrialRecord, load_experiment, write_experiment
from wsss_tune.analysis.results import ResultsError, write_sweep
from wsss_tune.analysis.schema import (
    RAY_INTERNAL_KEYS,
    REPORTS_COLUMNS,
    REPORTS_SCHEMA,
    SCHEMA_KEY,
    TRIALS_COLUMNS,
    TRIALS_SCHEMA,
)
from wsss_tune.analysis.tables import experiment_tables

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
#: Keys Ray adds to every result that must not reach the files (a sample of RAY_INTERNAL_KEYS), and
#: the Ray keys that are kept under the schema's names.
RAY_NOISE = {"pid": 4242, "should_checkpoint": True, "experiment_tag": "0_x=1", "time_this_iter_s": 0.1,
             "date": "2024-01-01_00-00-00", "done": False, "time_since_restore": 1.0, "iterations_since_restore": 1,
             "trial_log_path": "/x", "checkpoint_dir_name": None}
KEPT = {"training_iteration", "timestamp", "time_total_s"}
T0 = 1_700_000_000


def _sweep(name: str, metric: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "metric": metric, "mode": "max", "requested": 3, "reference_point": params, **extra}


def _report(trial: str, i: int, **values: Any) -> dict[str, Any]:
    """A report as Ray's ``result.json`` holds it (noise included)."""
    return {"trial_id": trial, "training_iteration": i, "timestamp": T0 + 10 * i, "time_total_s": 1.5 * i,
            "node_id": "n1", "hostname": "h1", "node_ip": "10.0.0.1", "cache_repairs": 0, **RAY_NOISE, **values}


def _rw_experiment(exp: Path) -> Path:
    """An ``rw`` sweep: float and int parameters, every trial completed, no error anywhere."""
    trials = [TrialRecord(trial_id=t, status="completed", params={"rw.beta": beta, "rw.logt": logt},
                          metrics={"rw_miou_tune": v, "rw_miou_heldout": v - 1, "eps_method": "eps", "final": True,
                                   "num_failures": 0, "node_id": "n1", "fingerprint": "abc", **RAY_NOISE},
                          reports=2, seconds=3.0, first_report=T0 + 10, last_report=T0 + 20)
              for t, beta, logt, v in (("r0", 8.0, 3, 50.0), ("r1", 6.5, 2, 55.0), ("r2", 4.0, 5, 45.0))]
    reports = [r for t in trials for r in (
        _report(t.trial_id, 1, stage="eps_model", step=2, stage_step=2, fidelity=2, **{"eps/overlap/disc": 0.5}),
        _report(t.trial_id, 2, stage="rw", cache_hit=True, fidelity=3, step=3, rw_miou_tune=t.metrics["rw_miou_tune"]),
        _report(t.trial_id, 3, final=True, rw_miou_tune=t.metrics["rw_miou_tune"], eps_method="eps"))]
    write_experiment(exp, sweep=_sweep("rw", "rw_miou_tune", {"rw.beta": 8.0, "rw.logt": 3}), trials=trials,
                     reports=reports)
    return exp


def _deeplab_experiment(exp: Path) -> Path:
    """A ``deeplab`` cascade phase: other parameters (a choice, a list), a pruned and a failed trial."""
    params = {"deeplab.lr": 1e-3, "eps.method": "eps", "eps.cam_scales": [0.5, 1.0]}
    trials = [
        TrialRecord(trial_id="d0", status="completed", params=params, phase="deeplab",
                    metrics={"deeplab_miou_tune": 60.0, "deeplab_iou/disc": 40.0, "cache_repairs": 1}),
        TrialRecord(trial_id="d1", status="pruned", params={**params, "deeplab.lr": 5e-3}, phase="deeplab",
                    metrics={"deeplab_miou_tune": 30.0, "pruned": True}),
        TrialRecord(trial_id="d2", status="failed", params={**params, "eps.method": "cam"}, phase="deeplab",
                    error="RuntimeError: boom", resumed_from=("d2a",)),
    ]
    reports = [_report("d0", 1, stage="deeplab", stage_step=4, deeplab_miou_tune=58.0),
               _report("d0", 2, final=True, pruned=False, objective=60.0, deeplab_miou_tune=60.0),
               _report("d1", 1, stage="deeplab", stage_step=4, pruned=True, done=True, deeplab_miou_tune=30.0)]
    write_experiment(exp, sweep=_sweep("deeplab", "deeplab_miou_tune", params), trials=trials, reports=reports)
    return exp


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield _rw_experiment(tmp_path / "rw"), _deeplab_experiment(tmp_path / "deeplab")


def _map_keys(file: Path) -> set[str]:
    table = pq.read_table(file)
    return {k for col in ("metrics", "tags") for entries in table.column(col).to_pylist() for k, _ in entries}


def _check_schemas(a: Path, b: Path) -> None:
    """What every pair of experiments must satisfy: equal schemas (metadata too), the declared ones."""
    for name, declared in (("trials.parquet", TRIALS_SCHEMA), ("reports.parquet", REPORTS_SCHEMA)):
        sa, sb = pq.read_schema(a / name), pq.read_schema(b / name)
        assert sa.equals(sb, check_metadata=True), (name, sa, sb)
        assert sa.equals(declared) and sa.names == declared.names
        assert not set(sa.names) & RAY_INTERNAL_KEYS
        assert not _map_keys(a / name) & (RAY_INTERNAL_KEYS | KEPT), name
        assert not _map_keys(b / name) & (RAY_INTERNAL_KEYS | KEPT), name


def _check_pandas(exp: Path) -> None:
    trials, reports = pd.read_parquet(exp / "trials.parquet"), pd.read_parquet(exp / "reports.parquet")
    for frame, cols in ((trials, ("pruned", "reference")), (reports, ("final", "cache_hit", "pruned"))):
        for c in cols:
            assert pd.api.types.is_bool_dtype(frame[c]), (c, frame[c].dtype)
    for frame, cols in ((trials, ("first_report", "last_report")), (reports, ("time",))):
        for c in cols:
            assert isinstance(frame[c].dtype, pd.DatetimeTZDtype) and str(frame[c].dt.tz) == "UTC", (c, frame[c].dtype)


def test_two_different_experiments_have_one_schema(two: tuple[Path, Path]) -> None:
    """An rw and a deeplab experiment (other parameters, metrics, statuses; errors in one only): the
    same columns and types, bools as pandas bools, times as UTC timestamps, no Ray bookkeeping in
    the columns or the maps."""
    a, b = two
    _check_schemas(a, b)
    for exp in two:
        _check_pandas(exp)
    trials = pq.read_table(a / "trials.parquet")
    assert trials.column("error").to_pylist() == [None] * 3 and trials.schema.field("error").type == pa.string()
    reports = pq.read_table(a / "reports.parquet").to_pylist()
    assert [r["report"] for r in reports[:3]] == [1, 2, 3] and reports[0]["elapsed_s"] == 1.5
    assert reports[0]["time"].timestamp() == T0 + 10 and [r["cache_hit"] for r in reports[:3]] == [False, True, False]
    assert [r["final"] for r in reports[:3]] == [False, False, True]
    assert dict(reports[2]["tags"]) == {"eps_method": "eps"} and reports[0]["stage_step"] == 2
    deeplab = pq.read_table(b / "trials.parquet").to_pylist()
    assert [(t["status"], t["pruned"], t["objective"]) for t in deeplab] == \
        [("completed", False, 60.0), ("pruned", True, None), ("failed", False, None)]
    assert dict(deeplab[0]["params"])["eps.cam_scales"] == "[0.5, 1.0]" and deeplab[2]["resumed_from"] == ["d2a"]
    assert [r["pruned"] for r in pq.read_table(b / "reports.parquet").to_pylist()] == [False, False, True]


def test_duckdb_reads_both_experiments_as_one_table(two: tuple[Path, Path]) -> None:
    """One query over both trials files: the best completed trial of each experiment (``objective``),
    a searched value read from ``params``, a metric from ``metrics``; the reports of both by time."""
    a, b = (str(p / "trials.parquet") for p in two)
    rows = duckdb.sql(f"""
        SELECT experiment, trial_id, objective, CAST(params['rw.beta'] AS DOUBLE) AS beta,
               json_extract_string(params['eps.method'], '$') AS method, metrics['deeplab_iou/disc'] AS disc
        FROM read_parquet(['{a}', '{b}'])
        WHERE status = 'completed' AND NOT pruned
        QUALIFY row_number() OVER (PARTITION BY experiment ORDER BY objective DESC) = 1
        ORDER BY experiment""").fetchall()
    assert rows == [("deeplab", "d0", 60.0, None, "eps", 40.0), ("rw", "r1", 55.0, 6.5, None, None)]
    reports = [str(p / "reports.parquet") for p in two]
    counts = duckdb.sql(f"""SELECT experiment, count(*), count(*) FILTER (WHERE final), min(time)
                            FROM read_parquet({reports}) GROUP BY experiment ORDER BY experiment""").fetchall()
    assert [c[:3] for c in counts] == [("deeplab", 3, 1), ("rw", 9, 3)]
    assert counts[0][3].timestamp() == T0 + 10


def test_values_read_back_with_their_types(two: tuple[Path, Path]) -> None:
    """Searched values keep their type (int, float, text, list); a trial's values come back under their
    keys, fixed columns included (``num_failures``, ``node_id``), report-only keys left out."""
    rw, deeplab = (load_experiment(p) for p in two)
    r0 = rw.trial("r0")
    assert r0.params == {"rw.beta": 8.0, "rw.logt": 3} and type(r0.params["rw.logt"]) is int
    assert r0.metrics == {"rw_miou_tune": 50.0, "rw_miou_heldout": 49.0, "eps_method": "eps", "num_failures": 0,
                          "node_id": "n1", "fingerprint": "abc"}
    assert (r0.first_report, r0.last_report) == (T0 + 10, T0 + 20) and rw.reference.trial_id == "r0"
    d2 = deeplab.trial("d2")
    assert d2.params == {"deeplab.lr": 1e-3, "eps.method": "cam", "eps.cam_scales": [0.5, 1.0]}
    assert (d2.phase, d2.error, d2.resumed_from) == ("deeplab", "RuntimeError: boom", ("d2a",))
    assert deeplab.trial("d0").metrics["cache_repairs"] == 1 and "pruned" not in deeplab.trial("d1").metrics


def test_the_docs_describe_every_column() -> None:
    """docs/results.md has a table row for every column of both files, in the schema's order."""
    text = DOCS.read_text()
    for title, columns in (("trials.parquet", TRIALS_COLUMNS), ("reports.parquet", REPORTS_COLUMNS)):
        section = text.split(f"## `{title}`", 1)[1].split("\n## ", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` +\|", section, flags=re.M)
        assert documented == [c.name for c in columns], title
    assert "read_parquet([" in text


# ---- version 1 (before the fixed schema) --------------------------------------------------------


def _v1_files(exp: Path) -> None:
    """Replace the parquet files with ones in the version-1 layout (as a sweep wrote them before)."""
    trials = pa.table({
        "trial_id": ["r0", "r1"], "phase": pa.array([None, None], pa.null()), "status": ["completed", "pruned"],
        "error": pa.array([None, None], pa.null()), "reference": [True, False], "run_dir": ["runs/r0", "runs/r1"],
        "reports": [2, 1], "seconds": [3.0, 1.0], "resumed_from": pa.array([None, None], pa.null()),
        "config/rw.beta": [8.0, 6.5], "config/rw.logt": [3, 2], "rw_miou_tune": [50.0, 20.0],
        "final": [True, None], "node_id": ["n1", "n1"], "num_failures": [0, 0],
    })
    reports = pa.table({
        "trial_id": ["r0", "r0", "r1"], "stage": ["rw", None, "rw"], "rw_miou_tune": [49.0, 50.0, 20.0],
        "stage_step": [1, None, 1], "final": [None, True, None], "should_checkpoint": [None, None, True],
        "timestamp": [T0 + 1, T0 + 2, T0 + 3], "training_iteration": [1, 2, 1],
    })
    pq.write_table(trials, exp / "trials.parquet")
    pq.write_table(reports, exp / "reports.parquet")


def test_a_version_1_experiment_converts_on_read(tmp_path: Path) -> None:
    """An experiment written before the fixed schema still loads: trials with their values and
    statuses, reports in the current schema (Ray's keys under the schema's names, nulls in the flags
    as false), and every table of the report."""
    exp = _rw_experiment(tmp_path / "old")
    _v1_files(exp)
    result = load_experiment(exp)
    assert [(t.trial_id, t.status, t.params) for t in result.trials] == \
        [("r0", "completed", {"rw.beta": 8.0, "rw.logt": 3}), ("r1", "pruned", {"rw.beta": 6.5, "rw.logt": 2})]
    assert result.trial("r0").metrics["node_id"] == "n1"
    reports = result.reports()
    assert reports.schema.equals(REPORTS_SCHEMA)
    rows = reports.to_pylist()
    assert [(r["experiment"], r["report"], r["final"], r["time"].timestamp()) for r in rows] == \
        [("rw", 1, False, T0 + 1), ("rw", 2, True, T0 + 2), ("rw", 1, False, T0 + 3)]
    assert all("should_checkpoint" not in dict(r["metrics"]) for r in rows)
    tables = experiment_tables(result)
    assert list(tables["trials"].frame["trial_id"]) == ["r0", "r1"]
    assert list(tables["curves"].frame["value"]) == [49.0, 20.0]  # the final report is not a curve point
    rewritten = write_experiment(tmp_path / "new", sweep=result.record, trials=result.trials, reports=[])
    assert pq.read_schema(rewritten.path / "trials.parquet").equals(TRIALS_SCHEMA)


def test_a_newer_or_foreign_file_is_refused_by_name(tmp_path: Path) -> None:
    exp = _rw_experiment(tmp_path / "e")
    table = pq.read_table(exp / "trials.parquet")
    pq.write_table(table.replace_schema_metadata({SCHEMA_KEY: b"trials/3"}), exp / "trials.parquet")
    with pytest.raises(ResultsError, match=r"trials\.parquet: results schema version 3 is newer"):
        load_experiment(exp)
    pq.write_table(pq.read_table(exp / "reports.parquet"), exp / "trials.parquet")
    with pytest.raises(ResultsError, match=r"trials\.parquet: holds the 'reports' table"):
        load_experiment(exp)


def test_a_wrongly_typed_value_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    exp = tmp_path / "e"
    trial = TrialRecord(trial_id="a", status="completed", params={"rw.beta": 8.0}, metrics={"rw_miou_tune": 1.0})
    sweep = _sweep("e", "rw_miou_tune", {"rw.beta": 8.0})
    with pytest.raises(ValueError, match=r"report 0 \(trial 'a'\): field 'stage_step' = 'abc', expected an integer"):
        write_experiment(exp, sweep=sweep, trials=[trial], reports=[{"trial_id": "a", "stage_step": "abc"}])
    with pytest.raises(ValueError, match=r"field 'trial_id' is missing"):
        write_experiment(exp, sweep=sweep, trials=[trial], reports=[{"stage": "rw"}])
    bad = TrialRecord(trial_id="b", status="completed", params={}, metrics={"num_failures": "two"})
    with pytest.raises(ValueError, match=r"trial b: field 'num_failures' = 'two', expected an integer"):
        write_experiment(exp, sweep=sweep, trials=[bad], reports=[])
    assert not exp.exists()


def test_rebuild_skips_a_malformed_report_and_says_where(tmp_path: Path) -> None:
    """``collect_results`` (resume, ``results rebuild``) over a trial folder whose result.json holds a
    report with a wrongly typed ``stage_step``: that report is left out with a warning naming the file,
    the report and the value; the others are kept."""
    from wsss_tune.analysis.results import ExperimentRecord, ResourcesRecord
    from wsss_tune.trainables.records import collect_results

    exp = tmp_path / "exp"
    folder = exp / "eps_t1"
    folder.mkdir(parents=True)
    record = ExperimentRecord(name="exp", metric="eps_miou_tune", mode="max", requested=1, trainable="eps",
                              settings={"runs_dir": str(exp / "runs")}, resources=ResourcesRecord(),
                              reference_point={"eps.tau": 0.4})
    write_sweep(exp, record)
    rows = [_report("t1", 1, stage="eps_model", stage_step=2), _report("t1", 2, stage="eps_model", stage_step="x"),
            _report("t1", 3, final=True, eps_miou_tune=50.0)]
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "params.json").write_text(json.dumps({"eps.tau": 0.4}))
    result = collect_results(exp)
    assert [r["report"] for r in result.reports().to_pylist()] == [1, 3]
    assert any("eps_t1/result.json report 2: field 'stage_step' = 'x'" in w for w in result.warnings), result.warnings
    assert result.trial("t1").status == "completed" and result.trial("t1").first_report == T0 + 10


# ---- real sweeps ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_an_rw_and_a_deeplab_sweep_share_the_schema(tmp_path: Path, synth_root: Path) -> None:
    """Two real sweeps over different spaces and stages (synth_rw, synth_deeplab): the same schemas,
    typed columns, no Ray bookkeeping; DuckDB reads both files as one table."""
    import ray

    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        runs = [run_sweep(space, data=synth_root, storage=tmp_path, name=space, trials=2, wandb="off",
                          progress="off", overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), reseed=None)
                for space in ("synth_rw", "synth_deeplab")]
    finally:
        ray.shutdown()
    assert all(r.complete for r in runs), [t.error for r in runs for t in r.trials]
    a, b = (r.path for r in runs)
    _check_schemas(a, b)
    for exp in (a, b):
        _check_pandas(exp)
    files = [str(p / "trials.parquet") for p in (a, b)]
    rows = duckdb.sql(f"""SELECT experiment, count(*), max(objective), count(metrics['rw_miou_tune'])
                          FROM read_parquet({files}) GROUP BY experiment ORDER BY experiment""").fetchall()
    assert [(e, n) for e, n, _, _ in rows] == [("synth_deeplab", 2), ("synth_rw", 2)]
    assert rows[1][2] == max(t.value("rw_miou_tune") for t in runs[0].trials) and rows[1][3] == 2
    reports = pq.read_table(a / "reports.parquet")
    assert reports.num_rows == sum(t.reports for t in runs[0].trials)
    assert all(t is not None for t in reports.column("time").to_pylist())
