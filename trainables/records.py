"""An experiment's results, rebuilt from what is on disk, with nothing executed from the folder.

Ray Tune keeps its driver state as pickles (``tuner.pkl``, ``searcher-state-*.pkl``,
``search_gen_state-*.json``, the ``CLOUDPICKLE_FALLBACK`` entries inside ``experiment_state-*.json``,
``params.pkl`` and ``error.pkl`` in the trial folders). Unpickling runs whatever the file says, and
experiment folders live on shared storage, so this module never unpickles anything. It reads:

* the Optuna study (``optuna.db``, SQLite: parameters, states, values and user attributes are plain
  data) - the searcher's source of truth;
* each trial folder's ``result.json`` (JSON lines), ``params.json`` and ``error.txt``;
* Ray's ``experiment_state-*.json`` as plain JSON only, for each trial's status and retry count (the
  pickled entries inside stay hex text, never decoded);
* the previous ``trials.parquet``, so a trial that only it still knows is never dropped.

:func:`collect_results` merges them into ``trials.parquet``, ``reports.parquet`` and
``experiment.json`` (``wsss-tune results rebuild`` calls it too). A damaged source is skipped with a
warning; the others still give every trial they know.

A resumed sweep continues an interrupted search trial under a new Ray trial id (the study records
every id a search trial ran under, user attribute :data:`~trainables.search.ATTEMPTS_ATTR`); its row carries the latest
id, with the earlier ones in ``resumed_from``, whose reports stay in ``reports.parquet``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss_tune.analysis.results import (
    RUNS_DIR,
    ExperimentRecord,
    ExperimentResult,
    ResultsError,
    TrialRecord,
    load_sweep,
    read_trials_table,
    rebuild_hint,
    write_experiment,
)
from wsss_tune.analysis.schema import DROPPED_KEYS, report_row

from .reporter import FINAL_KEY
from .search import STUDY_FILE, attempts_of
from .trainable import SETTINGS_KEY

__all__ = ["RayTrialState", "ray_trial_states", "trial_folders", "open_study", "open_studies", "collect_results"]

log = logging.getLogger(__name__)

#: Ray's files of an experiment folder that hold trial state as JSON (pickled parts left undecoded).
_STATE_GLOB = "experiment_state-*.json"


@dataclass(frozen=True, kw_only=True)
class RayTrialState:
    """What Ray's experiment state says of one trial (read as plain JSON)."""

    trial_id: str
    status: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    num_failures: int = 0
    last_result: Mapping[str, Any] = field(default_factory=dict)
    logdir: str | None = None


def _plain_params(config: Any) -> dict[str, Any]:
    """The searched values of a trial config (the settings entry and anything non-plain left out)."""
    if not isinstance(config, Mapping):
        return {}
    return {k: v for k, v in config.items()
            if k != SETTINGS_KEY and isinstance(k, str) and isinstance(v, str | int | float | bool | type(None))}


def ray_trial_states(exp_dir: Path) -> tuple[dict[str, RayTrialState], list[str]]:
    """Every trial Ray's state files name, the newest file's view of each; and warnings about the
    files that could not be read (they are skipped)."""
    states: dict[str, RayTrialState] = {}
    problems: list[str] = []
    for path in sorted(exp_dir.glob(_STATE_GLOB)):  # timestamped names: oldest first, newest wins
        try:
            doc = json.loads(path.read_text())
            entries = doc["trial_data"]
            for entry in entries:
                state = json.loads(entry[0])
                meta = json.loads(entry[1]) if len(entry) > 1 and isinstance(entry[1], str) else {}
                trial_id = state["trial_id"]
                if not isinstance(trial_id, str):
                    raise TypeError(f"trial id {trial_id!r}")
                last = meta.get("last_result")
                states[trial_id] = RayTrialState(
                    trial_id=trial_id,
                    status=state.get("status") if isinstance(state.get("status"), str) else None,
                    params=_plain_params(state.get("evaluated_params") or state.get("config")),
                    num_failures=int(meta.get("num_failures") or 0),
                    last_result=last if isinstance(last, dict) else {},
                    logdir=state.get("relative_logdir") if isinstance(state.get("relative_logdir"), str) else None,
                )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
            problems.append(f"{path.name}: skipped, unreadable ({type(exc).__name__}: {exc})")
    return states, problems


def _trial_id_of(folder: Path) -> str:
    """Trial folders are named ``<trainable>_<trial id>`` (:func:`~trainables.trainable.trial_dirname`)."""
    return folder.name.rsplit("_", 1)[-1]


def trial_folders(exp_dir: Path) -> dict[str, Path]:
    """Ray's trial folders in ``exp_dir`` (those holding a ``result.json`` or ``params.json``), by trial id."""
    out: dict[str, Path] = {}
    for folder in sorted(p for p in exp_dir.iterdir() if p.is_dir() and p.name != RUNS_DIR):
        if (folder / "result.json").is_file() or (folder / "params.json").is_file():
            out[_trial_id_of(folder)] = folder
    return out


def _result_rows(folder: Path | None) -> list[dict[str, Any]]:
    if folder is None or not (folder / "result.json").is_file():
        return []
    rows = []
    try:
        text = (folder / "result.json").read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _folder_params(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (folder / "params.json").is_file():
        return {}
    try:
        return _plain_params(json.loads((folder / "params.json").read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _error_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _folder_error(folder: Path | None) -> str | None:
    """The last line of the trial's ``error.txt`` (its ``error.pkl`` is never read)."""
    if folder is None or not (folder / "error.txt").is_file():
        return None
    try:
        return _error_line((folder / "error.txt").read_text(errors="replace"))
    except OSError:
        return None


def _clean(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result without Ray's bookkeeping (:data:`~wsss_tune.analysis.schema.DROPPED_KEYS`; where
    the trial ran stays) and without nested values (the config is in trials.parquet)."""
    return {k: v for k, v in result.items() if k not in DROPPED_KEYS and not isinstance(v, dict | list)}


def _checked_reports(trial_id: str, rows: Sequence[Mapping[str, Any]], folder: Path | None, experiment: str,
                     problems: list[str]) -> list[dict[str, Any]]:
    """The trial's reports that fit ``reports.parquet``'s schema; each that does not is skipped with
    a warning naming the file, the line and the field."""
    out = []
    for i, row in enumerate(rows):
        report = {"trial_id": trial_id, **_clean(row)}
        try:
            report_row(report, experiment=experiment, where=f"{folder}/result.json report {i + 1}")
        except ValueError as exc:
            problems.append(f"{exc}; report skipped")
            continue
        out.append(report)
    return out


def _report_times(rows: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """Times of the first and the last report that has one (Ray's ``timestamp``)."""
    times = [float(r["timestamp"]) for r in rows if _finite(r.get("timestamp"))]
    return (min(times), max(times)) if times else (None, None)


def open_study(record: ExperimentRecord, name: str | None = None) -> Any:
    """The experiment's Optuna study (``record``: its ``sweep.json``, read with :func:`load_sweep`), or
    the study ``name`` in the same storage (a phase's).

    Raises:
        ResultsError: the record names no study, or the study file is missing or unreadable, or holds
        no study of that name.
    """
    import optuna
    import sqlalchemy.exc

    study = record.study
    if study is None:
        raise ResultsError(f"the record of experiment {record.name!r} names no Optuna study")
    name = name or study.name
    path = study.file or Path(study.storage)
    exp_dir = path.parent
    if not path.is_file():
        raise ResultsError(f"{path}: the experiment's Optuna study is missing")
    try:
        return optuna.load_study(study_name=name, storage=study.storage)
    except KeyError:
        raise ResultsError(f"{path}: holds no study named {name!r}; {rebuild_hint(exp_dir)}") from None
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResultsError(f"{path}: the experiment's Optuna study is unreadable ({text})") from None


def open_studies(record: ExperimentRecord) -> dict[str, Any]:
    """The study of each search of the experiment by phase name (``""`` for a one-search experiment);
    a phase that never started has none.

    Raises:
        ResultsError: the study file is unreadable, or the one study of a one-search experiment is missing.
    """
    if not record.phases:
        return {"": open_study(record)}
    import optuna

    path = record.study.file if record.study is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        names = {s.study_name for s in optuna.get_all_study_summaries(storage=record.study.storage)}  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and Optuna errors alike: an unreadable file
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResultsError(f"{path}: the experiment's Optuna study is unreadable ({text})") from None
    return {p.name: open_study(record, p.study) for p in record.phases if p.study in names}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _status(*, last: Mapping[str, Any], ray: RayTrialState | None, frozen: Any, error: str | None,
            previous: TrialRecord | None) -> str:
    from optuna.trial import TrialState

    if last.get(FINAL_KEY):
        return "completed"
    if ray is not None and ray.status == "ERROR":
        return "failed"
    state = getattr(frozen, "state", None)
    if state == TrialState.PRUNED:
        return "pruned"
    if state == TrialState.COMPLETE:
        return "completed"
    if state == TrialState.FAIL and (error or ray is None):
        return "failed"
    if ray is not None and ray.status == "TERMINATED":
        return "pruned"
    if previous is not None and not last:
        return previous.status
    return "incomplete"


def collect_results(exp_dir: str | Path, *, study: Any = None) -> ExperimentResult:
    """Rebuild ``trials.parquet``, ``reports.parquet`` and ``experiment.json`` of ``exp_dir`` from the
    study, the trial folders, Ray's state (as JSON) and the previous trials table (see the module
    docstring). No trial that any of them knows is dropped.

    Args:
        study: The loaded study (else it is opened here; if it is unreadable the others still count).

    Raises:
        FileNotFoundError / ResultsError: no readable ``sweep.json`` (the one file that must be intact).
    """
    exp_dir = Path(exp_dir).expanduser().resolve()
    record = load_sweep(exp_dir)
    states, problems = ray_trial_states(exp_dir)
    folders = trial_folders(exp_dir)
    studies: dict[str, Any] = {}
    if study is not None and not record.phases:
        studies = {"": study}
    elif (exp_dir / STUDY_FILE).is_file():
        try:
            studies = open_studies(record)
        except ResultsError as exc:
            problems.append(str(exc))
    phases = {p.name: p for p in record.phases}
    phase_index = {p.name: i for i, p in enumerate(record.phases)}
    previous: dict[str, TrialRecord] = {}
    try:
        previous = {t.trial_id: t for t in read_trials_table(exp_dir)}
    except FileNotFoundError:
        pass
    except ResultsError as exc:
        problems.append(f"the previous trials table is unreadable and was rebuilt ({exc})")

    by_ray: dict[str, Any] = {}
    phase_of: dict[str, str] = {}
    superseded: dict[str, str] = {}
    frozen_trials = [(name, t) for name, st in studies.items() for t in st.get_trials(deepcopy=False)]
    for phase_name, frozen in sorted(frozen_trials, key=lambda x: (phase_index.get(x[0], 0), x[1].number)):
        ids = attempts_of(frozen)
        for i in ids:
            by_ray[i] = frozen
            phase_of[i] = phase_name
        for old in ids[:-1]:
            superseded[old] = ids[-1]
    for old, new in list(superseded.items()):  # an attempt of an attempt: the newest id wins
        while new in superseded and superseded[new] != new:
            new = superseded[new]
        superseded[old] = new
    known = set(states) | set(folders) | set(by_ray) | set(previous)
    earlier: dict[str, list[str]] = {}
    for old, new in superseded.items():
        earlier.setdefault(new, []).append(old)

    runs_dir = Path(record.runs_dir or exp_dir / RUNS_DIR)
    records: list[TrialRecord] = []
    reports: list[dict[str, Any]] = []
    for trial_id in sorted(known):
        rows = _result_rows(folders.get(trial_id))
        reports.extend(_checked_reports(trial_id, rows, folders.get(trial_id), record.name, problems))
        if trial_id in superseded:
            continue
        ray, frozen, prev = states.get(trial_id), by_ray.get(trial_id), previous.get(trial_id)
        phase_name = phase_of.get(trial_id) or _folder_phase(folders.get(trial_id)) or (prev.phase if prev else "")
        phase = phases.get(phase_name)
        metric = phase.metric if phase is not None else record.metric
        last = dict(rows[-1]) if rows else dict(ray.last_result if ray else {})
        error = _folder_error(folders.get(trial_id)) or (frozen.user_attrs.get("fail_reason") if frozen else None)
        status = _status(last=last, ray=ray, frozen=frozen, error=error, previous=prev)
        if status == "failed" and not error:
            error = (prev.error if prev else None) or "the trial raised (no error text saved)"
        if frozen is not None:
            params = {**(phase.frozen if phase is not None else {}), **frozen.params}
        elif ray is not None and ray.params:
            params = dict(ray.params)
        else:
            params = _folder_params(folders.get(trial_id)) or (dict(prev.params) if prev else {})
        if last:
            metrics = {k: v for k, v in _clean(last).items() if k not in ("trial_id", "timestamp")}
        else:
            metrics = dict(prev.metrics) if prev else {}
        if status == "completed" and frozen is not None and _finite(frozen.value if frozen.values else None) \
                and metric not in metrics:
            metrics[metric] = float(frozen.value)  # the study kept what the folder lost
        # attempts that raised (retried while fewer than FailureConfig.max_failures)
        metrics["num_failures"] = (ray.num_failures if ray is not None
                                   else int((prev.metrics.get("num_failures") if prev else 0) or 0))
        seconds = last.get("time_total_s") if last else (prev.seconds if prev else None)
        first_report, last_report = _report_times(rows)
        if first_report is None and prev is not None:
            first_report, last_report = prev.first_report, prev.last_report
        records.append(TrialRecord(
            trial_id=trial_id, status=status, params=params, metrics=metrics,
            error=error if status == "failed" else None, run_dir=str(runs_dir / trial_id), reports=len(rows),
            seconds=float(seconds) if _finite(seconds) else None,
            resumed_from=tuple(sorted(earlier.get(trial_id, ()))), phase=phase_name,
            first_report=first_report, last_report=last_report,
        ))
    for problem in problems:
        log.warning("%s: %s", exp_dir, problem)
    return write_experiment(exp_dir, sweep=record, trials=_order(records, by_ray, phase_index), reports=reports,
                            notes=problems)


def _folder_phase(folder: Path | None) -> str:
    """The phase a trial folder's ``params.json`` names in its settings (empty if none)."""
    if folder is None or not (folder / "params.json").is_file():
        return ""
    try:
        settings = json.loads((folder / "params.json").read_text()).get(SETTINGS_KEY) or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""
    phase = settings.get("phase") if isinstance(settings, Mapping) else None
    return phase if isinstance(phase, str) else ""


def _order(records: Sequence[TrialRecord], by_ray: Mapping[str, Any], phase_index: Mapping[str, int]) \
        -> list[TrialRecord]:
    """Trials in the order they were asked (phase by phase, the study's trial number), then the rest by id."""
    def key(t: TrialRecord) -> tuple[int, int, str]:
        frozen = by_ray.get(t.trial_id)
        return (phase_index.get(t.phase, 0), frozen.number if frozen is not None else 1 << 30, t.trial_id)

    return sorted(records, key=key)
