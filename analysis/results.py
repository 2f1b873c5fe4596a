"""Experiment results: every trial's outcome and every report, as parquet and JSON, and back.

An experiment folder holds, next to Ray Tune's own files:

==================  ===========================================================================
``sweep.json``      what was asked for, written before the search starts (:data:`SWEEP_FILE`)
``trials.parquet``  one row per trial: id, status, error, searched values (``config/<path>``), final
                    metrics, run folder (:data:`TRIALS_FILE`)
``reports.parquet`` one row per report of every trial (stage, step, fidelity, metrics)
``experiment.json`` the sweep plus counts, the best trial and the reference trial
``optuna.db``       the Optuna study (``optuna-dashboard sqlite:///<folder>/optuna.db``)
``runs/<trial>/``   each trial's resolved ``config.yaml`` and ``metrics.json``
==================  ===========================================================================

**Self-contained folders.** Every path these files hold that points inside the experiment folder (the
study, the run folders, the W&B folder) is written relative to the folder and resolved against the
folder it is read from (:func:`load_sweep`, :func:`load_experiment`), so a copied or moved experiment
reads, resumes and reports on its own and never reaches back into the original. Folders written with
absolute paths are rebased onto the folder they are read from.

Statuses: ``completed`` (the pipeline finished; its metrics are at full fidelity), ``pruned``
(stopped early by the scheduler), ``failed`` (raised; ``error`` says what), ``incomplete`` (never
ran, or was interrupted and not resumed).

The best trial is chosen by the *tune* metric among completed trials only: a pruned trial's value is
a truncated one. Its held-out metric (``<metric without _tune>_heldout``) is reported beside it and
never used for the choice. The reference trial is the one that evaluated the space's reference point
(the paper's or the built-in setting), which every sweep runs first.

This module builds plain data (records, rows); drawing tables is left to the callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wsss_tune.spaces import HELDOUT_SUFFIX, TUNE_SUFFIX, SearchSpace
from wsss_tune.utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "SWEEP_FILE",
    "TRIALS_FILE",
    "REPORTS_FILE",
    "EXPERIMENT_FILE",
    "RUNS_DIR",
    "STATUSES",
    "PARAM_PREFIX",
    "ResultsError",
    "TrialRecord",
    "ExperimentResult",
    "load_sweep",
    "portable_sweep",
    "heldout_metric_name",
    "space_to_dict",
    "pick_best",
    "find_reference",
    "write_experiment",
    "load_experiment",
    "read_trials_table",
    "rebuild_hint",
    "resolve_paths",
    "run_dir_in",
    "stage_miou_rows",
]

SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.parquet"
REPORTS_FILE = "reports.parquet"
EXPERIMENT_FILE = "experiment.json"
#: Folder of the trials' run folders inside the experiment folder.
RUNS_DIR = "runs"
STATUSES = ("completed", "pruned", "failed", "incomplete")
#: Prefix of the searched-value columns of ``trials.parquet`` (``config/eps.tau``, as Ray names them).
PARAM_PREFIX = "config/"
#: Fixed columns of ``trials.parquet`` (metrics take the other columns).
_TRIAL_COLUMNS = ("trial_id", "status", "error", "reference", "run_dir", "reports", "seconds",
                  "resumed_from")
#: Relative tolerance when matching a trial's values to the reference point (floats pass through
#: Optuna and JSON exactly, so this only absorbs representation noise).
_REF_REL_TOL = 1e-9
#: Stages and the metric prefix of their mask quality, in pipeline order (``stage_miou_rows``).
_STAGE_PREFIXES = (("CAM", "cam"), ("EPS", "eps"), ("refined", "rw"), ("DeepLab", "deeplab"))


class ResultsError(ValueError):
    """A results file of an experiment folder is unreadable (the message names it and what to do)."""


def rebuild_hint(exp_dir: str | Path) -> str:
    """What to do about a damaged results file (the command that regenerates them)."""
    return f"regenerate the results files from the study and the trial folders: `wsss-tune results rebuild {exp_dir}`"


def _why(exc: BaseException) -> str:
    """An exception's text on one line (a library's message can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    hint = f"; {hint}" if hint else ""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: {what} is unreadable ({_why(exc)}){hint}") from None
    if not isinstance(doc, dict):
        raise ResultsError(f"{path}: {what} must hold a JSON object, found {type(doc).__name__}{hint}")
    return doc


# --------------------------------------------------------------------------------------------------
# Paths inside an experiment folder: relative on disk, absolute once read
# --------------------------------------------------------------------------------------------------

#: Paths of ``sweep.json`` that point inside the experiment folder, as (section, key): the study, the
#: run folders, the W&B folder (``store`` too, when it lies inside).
_INSIDE = (("study", "storage"), ("settings", "runs_dir"), ("wandb", "dir"))
_SQLITE = "sqlite:///"


def _origin(doc: Mapping[str, Any]) -> Path | None:
    """The folder an older ``sweep.json`` was written in (it recorded absolute paths), or None."""
    storage, name = doc.get("storage"), doc.get("name")
    if isinstance(storage, str) and isinstance(name, str) and Path(storage).is_absolute():
        return Path(storage) / name
    return None


def _rebase(value: str, exp_dir: Path, origin: Path | None) -> str:
    """A recorded path, read in ``exp_dir``: relative -> inside ``exp_dir``; absolute inside the
    folder it was written in -> the same place inside ``exp_dir``; anything else as it is."""
    path = Path(value)
    if not path.is_absolute():
        return str(exp_dir / path)
    if origin is not None:
        with contextlib.suppress(ValueError):
            return str(exp_dir / path.relative_to(origin))
    return value


def _relative(value: str, exp_dir: Path) -> str:
    """A path as written into the folder: relative when inside ``exp_dir``, else as it is."""
    with contextlib.suppress(ValueError):
        return Path(value).relative_to(exp_dir).as_posix() or "."
    return value


def _map_paths(doc: Mapping[str, Any], fn: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(doc, default=str))  # a deep copy
    for section, key in _INSIDE:
        part = out.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str):
            value = part[key]
            if section == "study":
                part[key] = _SQLITE + fn(value[len(_SQLITE):] if value.startswith(_SQLITE) else value)
            else:
                part[key] = fn(value)
    store = out.get("store")
    if isinstance(store, str) and store and "://" not in store:
        out["store"] = fn(store)
    return out


def resolve_paths(doc: Mapping[str, Any], exp_dir: str | Path) -> dict[str, Any]:
    """``doc`` (``sweep.json`` / ``experiment.json``) with its in-folder paths absolute in ``exp_dir``."""
    exp_dir = Path(exp_dir)
    origin = _origin(doc)
    out = _map_paths(doc, lambda v: _rebase(v, exp_dir, origin))
    out["storage"] = str(exp_dir.parent)
    return out


def portable_sweep(doc: Mapping[str, Any], exp_dir: str | Path) -> dict[str, Any]:
    """``doc`` as written into ``exp_dir``: its in-folder paths relative to the folder."""
    exp_dir = Path(exp_dir)
    out = _map_paths(doc, lambda v: _relative(v, exp_dir))
    out["storage"] = ".."
    return out


def load_sweep(exp_dir: str | Path) -> dict[str, Any]:
    """``<exp_dir>/sweep.json`` with its paths resolved in ``exp_dir`` (see :func:`resolve_paths`).

    Raises:
        FileNotFoundError: no ``sweep.json``. ResultsError: it is unreadable or lacks a needed key.
    """
    exp_dir = Path(exp_dir).expanduser().resolve()
    path = exp_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{exp_dir}: no {SWEEP_FILE}; not an experiment folder made by `wsss-tune sweep`")
    doc = _read_json(path, "the sweep record")
    missing = [k for k in ("name", "metric", "mode", "requested", "study", "settings", "trainable", "resources")
               if k not in doc]
    if missing:
        raise ResultsError(f"{path}: the sweep record lacks {', '.join(missing)}; it was not written by "
                           "`wsss-tune sweep` or was edited")
    return resolve_paths(doc, exp_dir)


def run_dir_in(exp_dir: Path, run_dir: str, trial_id: str) -> str:
    """A trial's recorded run folder, read in ``exp_dir`` (relative -> inside it; an absolute one of
    an older or moved folder -> ``<exp_dir>/runs/<trial>`` when that is where it pointed)."""
    if not run_dir:
        return ""
    path = Path(run_dir)
    if not path.is_absolute():
        return str(exp_dir / path)
    if path.parent.name == RUNS_DIR and path.name == trial_id:
        return str(exp_dir / RUNS_DIR / trial_id)
    return run_dir


def heldout_metric_name(metric: str) -> str:
    """``deeplab_miou_tune`` -> ``deeplab_miou_heldout`` (the number to report for the best trial)."""
    if not metric.endswith(TUNE_SUFFIX):
        raise ValueError(f"metric {metric!r}: a search optimises a '*{TUNE_SUFFIX}' metric")
    return metric[: -len(TUNE_SUFFIX)] + HELDOUT_SUFFIX


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """The space in its YAML form (``space_from_dict`` reads it back); ``base`` made absolute if a path."""
    base = space.base
    if space.source is not None and not Path(base).is_absolute() and (space.source.parent / base).is_file():
        base = str((space.source.parent / base).resolve())
    params: dict[str, Any] = {}
    for p in space.params:
        spec: dict[str, Any] = {"kind": p.kind}
        if p.kind == "categorical":
            spec["choices"] = [list(c) if isinstance(c, tuple) else c for c in p.choices]
        else:
            spec["low"], spec["high"] = p.low, p.high
            if p.step:
                spec["step"] = p.step
            if p.kind == "int" and p.log:
                spec["log"] = True
        params[p.path] = spec
    out: dict[str, Any] = {
        "base": base,
        "stages": list(space.stages),
        "metric": space.metric,
        "mode": space.mode,
        "tune_split": space.tune_split,
        "heldout_split": space.heldout_split,
        "num_samples": space.num_samples,
        "overrides": dict(space.overrides),
        "params": params,
    }
    if space.fidelity is not None:
        out["fidelity"] = dataclasses.asdict(space.fidelity)
    if space.description:
        out["description"] = space.description
    return out


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """One trial's outcome."""

    trial_id: str
    status: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    run_dir: str = ""
    reference: bool = False
    reports: int = 0
    seconds: float | None = None
    #: Ray trial ids of earlier attempts of the same search trial (an interrupted trial that a
    #: resume continued under a new id); their reports stay in ``reports.parquet`` under those ids.
    resumed_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"trial {self.trial_id}: status {self.status!r}, expected one of {', '.join(STATUSES)}")

    def value(self, metric: str) -> float | None:
        """A finite numeric metric, or None."""
        v = self.metrics.get(metric)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    def summary(self, metric: str, heldout: str) -> dict[str, Any]:
        """JSON form for ``experiment.json``: id, params, the tune and held-out values, run folder."""
        return {"trial_id": self.trial_id, "status": self.status, "params": dict(self.params),
                metric: self.value(metric), heldout: self.value(heldout), "run_dir": self.run_dir}


def pick_best(trials: Iterable[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The completed trial with the best ``metric`` (first one on ties); None if there is none."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'min'")
    best: TrialRecord | None = None
    for t in trials:
        v = t.value(metric)
        if t.status != "completed" or v is None:
            continue
        if best is None or (v > best.value(metric) if mode == "max" else v < best.value(metric)):  # type: ignore[operator]
            best = t
    return best


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=_REF_REL_TOL, abs_tol=_REF_REL_TOL)
    return a == b


def find_reference(trials: Sequence[TrialRecord], point: Mapping[str, Any]) -> TrialRecord | None:
    """The first trial whose searched values equal the reference ``point`` (None if none does)."""
    for t in trials:
        if point and all(k in t.params and _same(t.params[k], v) for k, v in point.items()):
            return t
    return None


@dataclass(frozen=True, kw_only=True)
class ExperimentResult:
    """An experiment folder, read back (see the module docstring)."""

    path: Path
    name: str
    metric: str
    mode: str
    heldout_metric: str
    trials: tuple[TrialRecord, ...]
    best: TrialRecord | None
    reference: TrialRecord | None
    counts: Mapping[str, int]
    requested: int
    info: Mapping[str, Any]

    @property
    def complete(self) -> bool:
        """Every requested trial ran to an end (completed or pruned); none failed or is missing."""
        return (self.counts.get("failed", 0) == 0 and self.counts.get("incomplete", 0) == 0
                and self.counts.get("total", 0) >= self.requested)

    @property
    def gain_over_reference(self) -> float | None:
        """Best minus reference tune metric (sign follows ``mode``: positive = better); None if unknown."""
        if self.best is None or self.reference is None:
            return None
        b, r = self.best.value(self.metric), self.reference.value(self.metric)
        if b is None or r is None:
            return None
        return b - r if self.mode == "max" else r - b

    def trial(self, trial_id: str) -> TrialRecord:
        for t in self.trials:
            if t.trial_id == trial_id:
                return t
        raise KeyError(f"{self.path}: no trial {trial_id!r} (trials: {', '.join(t.trial_id for t in self.trials)})")

    def reports(self) -> pa.Table:
        """Every report of every trial (``reports.parquet``).

        Raises:
            ResultsError: the file is missing or unreadable (the message says how to rebuild it).
        """
        file = self.path / REPORTS_FILE
        try:
            return pq.read_table(file)
        except (OSError, pa.ArrowException) as exc:
            raise ResultsError(f"{file} is unreadable ({_why(exc)}); {rebuild_hint(self.path)}") from None

    def describe_incomplete(self) -> str:
        """One line saying what is missing, for error messages."""
        c = self.counts
        ran = c.get("completed", 0) + c.get("pruned", 0)
        parts = [f"{c.get('failed', 0)} failed"] if c.get("failed") else []
        missing = self.requested - ran - c.get("failed", 0)
        if missing > 0:
            parts.append(f"{missing} not run or interrupted")
        return f"{ran} of {self.requested} trials finished ({', '.join(parts) or 'none missing'})"


# --------------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------------


def _column(values: list[Any]) -> pa.Array:
    """One column from Python values: bool, int, float or string (mixed numbers become float;
    anything else mixed becomes text), None as null."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if not present:
        return pa.array(values, type=pa.null())
    return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                     for v in values], type=pa.string())


def _table(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> pa.Table:
    names = list(first)
    for r in rows:
        names += [k for k in r if k not in names]
    return pa.table({n: _column([r.get(n) for r in rows]) for n in names})


def _write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _trial_row(t: TrialRecord, exp_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"trial_id": t.trial_id, "status": t.status, "error": t.error, "reference": t.reference,
                           "run_dir": _relative(t.run_dir, exp_dir) if t.run_dir else "", "reports": t.reports,
                           "seconds": t.seconds, "resumed_from": ",".join(t.resumed_from) or None}
    row.update({PARAM_PREFIX + k: v for k, v in t.params.items()})
    row.update({k: v for k, v in t.metrics.items() if k not in row})
    return row


def write_experiment(
    path: str | Path,
    *,
    sweep: Mapping[str, Any],
    trials: Sequence[TrialRecord],
    reports: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> ExperimentResult:
    """Write ``trials.parquet``, ``reports.parquet`` and ``experiment.json`` into ``path``.

    Args:
        sweep: The contents of ``sweep.json`` (needs ``name``, ``metric``, ``mode``, ``requested``
            and ``reference_point``).
        trials: One record per trial (the ``reference`` flags are set here).
        reports: One dict per report, each with ``trial_id``.
        notes: Problems met while gathering the results (damaged sources that were skipped), kept in
            ``experiment.json`` as ``warnings``.
    """
    path = Path(path).expanduser().resolve()
    metric, mode = sweep["metric"], sweep["mode"]
    heldout = heldout_metric_name(metric)
    ref = find_reference(trials, sweep.get("reference_point") or {})
    trials = [dataclasses.replace(t, reference=ref is not None and t.trial_id == ref.trial_id) for t in trials]
    best = pick_best(trials, metric, mode)
    ref = next((t for t in trials if t.reference), None)
    counts = {s: sum(t.status == s for t in trials) for s in STATUSES}
    counts["total"] = len(trials)
    _write_parquet(_table([_trial_row(t, path) for t in trials], first=_TRIAL_COLUMNS), path / TRIALS_FILE)
    _write_parquet(_table(reports, first=("trial_id",)), path / REPORTS_FILE)
    result = ExperimentResult(path=path, name=sweep["name"], metric=metric, mode=mode, heldout_metric=heldout,
                              trials=tuple(trials), best=best, reference=ref, counts=counts,
                              requested=int(sweep["requested"]), info={**sweep, "warnings": list(notes)})
    doc = {
        **portable_sweep(sweep, path),
        "heldout_metric": heldout,
        "counts": counts,
        "complete": result.complete,
        "best": _portable_summary(best, metric, heldout, path),
        "reference": _portable_summary(ref, metric, heldout, path),
        "gain_over_reference": result.gain_over_reference,
        "files": {"trials": TRIALS_FILE, "reports": REPORTS_FILE, "runs": RUNS_DIR},
        "warnings": list(notes),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(path / EXPERIMENT_FILE, doc)
    return result


def _portable_summary(t: TrialRecord | None, metric: str, heldout: str, exp_dir: Path) -> dict[str, Any] | None:
    if t is None:
        return None
    out = t.summary(metric, heldout)
    out["run_dir"] = _relative(t.run_dir, exp_dir) if t.run_dir else ""
    return out


def _records(table: pa.Table, exp_dir: Path) -> list[TrialRecord]:
    out = []
    for row in table.to_pylist():
        params = {k[len(PARAM_PREFIX):]: v for k, v in row.items() if k.startswith(PARAM_PREFIX) and v is not None}
        metrics = {k: v for k, v in row.items()
                   if k not in _TRIAL_COLUMNS and not k.startswith(PARAM_PREFIX) and v is not None}
        out.append(TrialRecord(trial_id=row["trial_id"], status=row["status"], params=params, metrics=metrics,
                               error=row.get("error"),
                               run_dir=run_dir_in(exp_dir, row.get("run_dir") or "", row["trial_id"]),
                               reference=bool(row.get("reference")), reports=int(row.get("reports") or 0),
                               seconds=row.get("seconds"),
                               resumed_from=tuple(x for x in (row.get("resumed_from") or "").split(",") if x)))
    return out


def read_trials_table(path: str | Path) -> list[TrialRecord]:
    """The records of ``<path>/trials.parquet`` (run folders resolved in ``path``).

    Raises:
        FileNotFoundError: no such file. ResultsError: it is unreadable (the message says how to rebuild it).
    """
    path = Path(path).expanduser().resolve()
    file = path / TRIALS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        table = pq.read_table(file)
        return _records(table, path)
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as exc:
        raise ResultsError(f"{file} is unreadable ({_why(exc)}); {rebuild_hint(path)}") from None


def load_experiment(path: str | Path) -> ExperimentResult:
    """Read an experiment folder written by :func:`write_experiment`.

    Raises:
        FileNotFoundError: ``path`` has no ``experiment.json`` / ``trials.parquet`` (with what to do).
    """
    path = Path(path).expanduser().resolve()
    doc_path, trials_path = path / EXPERIMENT_FILE, path / TRIALS_FILE
    if not doc_path.is_file() or not trials_path.is_file():
        hint = (f"its results files are missing; {rebuild_hint(path)}, or continue the sweep with "
                f"`wsss-tune resume {path}`"
                if (path / SWEEP_FILE).is_file() else "not an experiment folder made by `wsss-tune sweep`")
        raise FileNotFoundError(f"{path}: no {EXPERIMENT_FILE} and {TRIALS_FILE} ({hint})")
    doc = _read_json(doc_path, "the experiment record", rebuild_hint(path))
    missing = [k for k in ("name", "metric", "mode", "counts", "requested") if k not in doc]
    if missing:
        raise ResultsError(f"{doc_path}: the experiment record lacks {', '.join(missing)}; {rebuild_hint(path)}")
    doc = resolve_paths(doc, path)
    trials = read_trials_table(path)
    metric, mode = doc["metric"], doc["mode"]
    ref = next((t for t in trials if t.reference), None)
    best_id = (doc.get("best") or {}).get("trial_id")
    best = next((t for t in trials if t.trial_id == best_id), None)
    info = {k: v for k, v in doc.items() if k not in ("counts", "best", "reference")}
    return ExperimentResult(path=path, name=doc["name"], metric=metric, mode=mode,
                            heldout_metric=doc.get("heldout_metric") or heldout_metric_name(metric),
                            trials=tuple(trials), best=best, reference=ref, counts=dict(doc["counts"]),
                            requested=int(doc["requested"]), info=info)


def stage_miou_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    """Per-stage mask quality of the reference and the best trial: one row each, with
    ``<stage> tune`` / ``<stage> held-out`` columns for CAM (with ``run.cam_baseline``), EPS, refined
    (random walk) and DeepLab (a stage a sweep did not run has no columns)."""
    rows = []
    for label, trial in (("reference", result.reference), ("best", result.best)):
        if trial is None:
            continue
        row: dict[str, Any] = {"config": label, "trial": trial.trial_id}
        for name, prefix in _STAGE_PREFIXES:
            tune, held = trial.value(f"{prefix}_miou_tune"), trial.value(f"{prefix}_miou_heldout")
            if tune is not None or held is not None:
                row[f"{name} tune"], row[f"{name} held-out"] = tune, held
        rows.append(row)
    return rows
