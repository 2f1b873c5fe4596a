"""Experiment results: every trial's outcome and every report, as parquet and JSON, and back.

An experiment folder holds, next to Ray Tune's own files:

==================  ===========================================================================
``sweep.json``      what was asked for, written before the search starts (:data:`SWEEP_FILE`)
``trials.parquet``  one row per trial: id, status, error, searched values, final metrics, run folder
                    (:data:`TRIALS_FILE`)
``reports.parquet`` one row per report of every trial (stage, step, fidelity, time, metrics)
``experiment.json`` the sweep plus counts, the best trial and the reference trial
``optuna.db``       the Optuna study (``optuna-dashboard sqlite:///<folder>/optuna.db``)
``runs/<trial>/``   each trial's resolved ``config.yaml`` and ``metrics.json``
==================  ===========================================================================

**The experiment record.** ``sweep.json`` and ``experiment.json`` hold one typed record,
:class:`ExperimentRecord` (what was asked for; in ``experiment.json`` also its
:class:`OutcomeRecord`: counts, the best and the reference trial, warnings). The sweep writes it
(:func:`write_sweep`), the results writer adds the outcome (:func:`write_experiment`), and every reader
(``load_sweep``, ``load_experiment``, resume, export, compare, report) gets it back through
:meth:`ExperimentRecord.from_json`. The files carry a ``version`` (:data:`RECORD_VERSION`); a newer or
unknown one is refused with the file's name, and files without one (written before the record was
versioned) read as version 1.

**The parquet files** have one fixed schema whatever the experiment (:mod:`wsss_tune.analysis.schema`,
``docs/results.md``): fixed typed columns plus ``params`` / ``metrics`` / ``tags`` map columns for
what varies with the space and the stages. Files written before that schema (version 1: one column
per searched value, ``config/<path>``, and per metric, types guessed from the values) are converted
when read; ``wsss-tune results rebuild`` rewrites them in the current schema.

**Self-contained folders.** Every path these files hold that points inside the experiment folder (the
study, the run folders, the W&B folder) is written relative to the folder and resolved against the
folder it is read from (:meth:`ExperimentRecord.to_json` / :meth:`ExperimentRecord.from_json`, the one
place that does it), so a copied or moved experiment reads, resumes and reports on its own and never
reaches back into the original. Folders written with absolute paths are rebased onto the folder they
are read from.

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

from wsss_tune.analysis import schema
from wsss_tune.spaces import HELDOUT_SUFFIX, TUNE_SUFFIX, SearchSpace
from wsss_tune.stages import graph
from wsss_tune.utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "SEED_PARAM",
    "RESEED_PHASE",
    "config_key",
    "seed_rows",
    "SWEEP_FILE",
    "TRIALS_FILE",
    "REPORTS_FILE",
    "EXPERIMENT_FILE",
    "RUNS_DIR",
    "STATUSES",
    "PARAM_PREFIX",
    "RECORD_VERSION",
    "ResultsError",
    "StudyRecord",
    "WandbRecord",
    "ResourcesRecord",
    "TrialSummary",
    "PhaseRecord",
    "ReseedRecord",
    "SeedRow",
    "OutcomeRecord",
    "ExperimentRecord",
    "TrialRecord",
    "ExperimentResult",
    "load_sweep",
    "write_sweep",
    "record_version",
    "portable_sweep",
    "heldout_metric_name",
    "space_to_dict",
    "pick_best",
    "find_reference",
    "write_experiment",
    "load_experiment",
    "read_trials_table",
    "read_reports_table",
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
#: Prefix of the searched-value columns of a version-1 ``trials.parquet`` (``config/eps.tau``, as Ray
#: names them); the current schema keeps them in its ``params`` column.
PARAM_PREFIX = "config/"
#: Fixed columns of a version-1 ``trials.parquet`` (metrics took the other columns).
_V1_TRIAL_COLUMNS = ("trial_id", "phase", "status", "error", "reference", "run_dir", "reports", "seconds",
                     "resumed_from")
#: Relative tolerance when matching a trial's values to the reference point (floats pass through
#: Optuna and JSON exactly, so this only absorbs representation noise).
_REF_REL_TOL = 1e-9


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

#: Paths of ``sweep.json`` / ``experiment.json`` that point inside the experiment folder, as (section,
#: key): the study, the run folders, the W&B folder, the best and the reference trial's run folder
#: (``store`` too, when it lies inside).
_INSIDE = (("study", "storage"), ("settings", "runs_dir"), ("wandb", "dir"), ("best", "run_dir"),
           ("reference", "run_dir"))
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


def load_sweep(exp_dir: str | Path) -> ExperimentRecord:
    """The record of ``<exp_dir>/sweep.json``, its paths resolved in ``exp_dir`` (see :func:`resolve_paths`).

    Raises:
        FileNotFoundError: no ``sweep.json``. ResultsError: it is unreadable, of an unknown version, or
        lacks a needed key.
    """
    exp_dir = Path(exp_dir).expanduser().resolve()
    path = exp_dir / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{exp_dir}: no {SWEEP_FILE}; not an experiment folder made by `wsss-tune sweep`")
    doc = _read_json(path, "the sweep record")
    record_version(doc, path)
    missing = [k for k in ("name", "metric", "mode", "requested", "study", "settings", "trainable", "resources")
               if k not in doc]
    if missing:
        raise ResultsError(f"{path}: the sweep record lacks {', '.join(missing)}; it was not written by "
                           "`wsss-tune sweep` or was edited")
    return ExperimentRecord.from_json(doc, exp_dir, file=path, what="the sweep record",
                                      hint="it was not written by `wsss-tune sweep` or was edited")


def write_sweep(exp_dir: str | Path, record: ExperimentRecord) -> Path:
    """Write ``record`` (without an outcome) as ``<exp_dir>/sweep.json``, its in-folder paths relative
    to the folder; returns the file."""
    exp_dir = Path(exp_dir).expanduser().resolve()
    path = exp_dir / SWEEP_FILE
    atomic_write_json(path, dataclasses.replace(record, outcome=None).to_json(exp_dir))
    return path


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
    if space.references:  # resolved values, so reading the record never loads the named configs again
        out["references"] = {label: {p.path: _plain(values[p.path]) for p in space.params}
                             for label, values in space.references.items()}
    if space.description:
        out["description"] = space.description
    return out


# --------------------------------------------------------------------------------------------------
# The experiment record (sweep.json, experiment.json)
# --------------------------------------------------------------------------------------------------

#: Version of the experiment record this code writes (the ``version`` field of ``sweep.json`` and
#: ``experiment.json``) and the newest it reads. Raise it when a field changes meaning or goes away,
#: and teach :meth:`ExperimentRecord.from_json` to read the older versions.
RECORD_VERSION = 1
#: The version of a record without a ``version`` field. The files written before the record was
#: versioned hold exactly the fields of version 1, so they are read as version 1.
_UNVERSIONED = 1

#: The JSON types a record field may hold, by the name the error messages use.
_KINDS: dict[str, tuple[type, ...]] = {
    "text": (str,), "an integer": (int,), "a number": (int, float), "true or false": (bool,),
    "an object": (Mapping,), "a list": (list, tuple),
}
_ABSENT = object()


def record_version(doc: Mapping[str, Any], file: str | Path) -> int:
    """The record version of ``doc`` (read from ``file``): its ``version`` field, 1 when it has none.

    Raises:
        ResultsError: an unknown version, or one newer than :data:`RECORD_VERSION` (naming the file).
    """
    if "version" not in doc:
        return _UNVERSIONED  # written before the record was versioned: the version-1 fields
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResultsError(f"{file}: unknown experiment record version {version!r} (this wsss-tune reads "
                           f"versions 1 to {RECORD_VERSION})")
    if version > RECORD_VERSION:
        raise ResultsError(f"{file}: experiment record version {version} is newer than this wsss-tune reads "
                           f"(versions 1 to {RECORD_VERSION}); it was written by a newer wsss-tune, read it "
                           "with that one")
    return version


def _get(doc: Mapping[str, Any], key: str, kind: str, *, where: str = "", default: Any = _ABSENT) -> Any:
    """``doc[key]`` checked to be of ``kind`` (a :data:`_KINDS` name); ``default`` when it is absent or
    null (without a default it is required). Raises ValueError naming the field."""
    value = doc.get(key)
    if value is None:
        if default is _ABSENT:
            raise ValueError(f"field {where + key!r} is missing")
        return default
    types = _KINDS[kind]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ValueError(f"field {where + key!r} is {value!r}, expected {kind}")
    return value


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    return _get(doc, key, "an object", default=None)


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types (tuples become lists, mappings dicts)."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True, kw_only=True)
class StudyRecord:
    """The experiment's Optuna study: its name and SQLite URL (absolute once read)."""

    name: str
    storage: str

    @property
    def file(self) -> Path | None:
        """The SQLite file of :attr:`storage`, or None for another kind of storage."""
        return Path(self.storage[len(_SQLITE):]) if self.storage.startswith(_SQLITE) else None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> StudyRecord:
        return cls(name=_get(doc, "name", "text", where="study."),
                   storage=_get(doc, "storage", "text", where="study."))


@dataclass(frozen=True, kw_only=True)
class WandbRecord:
    """W&B logging of the trials: ``mode`` (``offline``, ``online``, ``off``), project, runs folder."""

    mode: str = "off"
    project: str | None = None
    dir: str | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> WandbRecord:
        return cls(mode=_get(doc, "mode", "text", where="wandb.", default="off"),
                   project=_get(doc, "project", "text", where="wandb.", default=None),
                   dir=_get(doc, "dir", "text", where="wandb.", default=None))


@dataclass(frozen=True, kw_only=True)
class ResourcesRecord:
    """Resources of one trial (fractions allowed)."""

    cpus_per_trial: float = 1
    gpus_per_trial: float = 0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ResourcesRecord:
        return cls(cpus_per_trial=_get(doc, "cpus_per_trial", "a number", where="resources.", default=1),
                   gpus_per_trial=_get(doc, "gpus_per_trial", "a number", where="resources.", default=0))


@dataclass(frozen=True, kw_only=True)
class PhaseRecord:
    """One search of a multi-phase experiment: a stage of a cascade, the joint search, or the seed
    re-runs. Each has its own Optuna study in the experiment's storage.

    Attributes:
        name: ``search`` (a joint search), a stage name (a cascade's stage search) or ``reseed``.
        study: The Optuna study name.
        metric: The metric this phase optimises (its stage's tune metric).
        stages: The pipeline stages its trials run.
        space: The phase's search space in its YAML form (``space_from_dict`` reads it back).
        requested: Trials asked for (with a step budget: at most this many).
        step_budget: Training steps of the phase's stage the search may spend (None: count trials).
        frozen: Values fixed from the phases before (the best of each), known once the phase starts.
        points: The re-runs' configs (``reseed``: full values plus ``run.seed``), known once it starts.
        done: The phase's search ended (its budget spent); a resume skips it.
    """

    name: str
    study: str
    metric: str
    stages: tuple[str, ...] = ()
    space: Mapping[str, Any] = field(default_factory=dict)
    requested: int = 0
    step_budget: int | None = None
    frozen: Mapping[str, Any] = field(default_factory=dict)
    points: tuple[Mapping[str, Any], ...] = ()
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "study": self.study, "metric": self.metric, "stages": list(self.stages),
                "space": dict(self.space), "requested": self.requested, "step_budget": self.step_budget,
                "frozen": dict(self.frozen), "points": [dict(p) for p in self.points], "done": self.done}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> PhaseRecord:
        w = f"{where}."
        return cls(name=_get(doc, "name", "text", where=w), study=_get(doc, "study", "text", where=w),
                   metric=_get(doc, "metric", "text", where=w),
                   stages=tuple(_get({"s": s}, "s", "text", where=w + "stages.")
                                for s in _get(doc, "stages", "a list", where=w, default=())),
                   space=_plain(_get(doc, "space", "an object", where=w, default={})),
                   requested=_get(doc, "requested", "an integer", where=w, default=0),
                   step_budget=_get(doc, "step_budget", "an integer", where=w, default=None),
                   frozen=_plain(_get(doc, "frozen", "an object", where=w, default={})),
                   points=tuple(_plain(_get({"p": p}, "p", "an object", where=w + "points."))
                                for p in _get(doc, "points", "a list", where=w, default=())),
                   done=_get(doc, "done", "true or false", where=w, default=False))


@dataclass(frozen=True, kw_only=True)
class ReseedRecord:
    """The seed re-runs after a search: the ``top_k`` configs and the reference, each with ``seeds``
    more values of ``run.seed``; ``configs`` are further named settings run the same way for
    comparison (label -> values of the searched parameters), never chosen as the winner."""

    top_k: int = 3
    seeds: int = 2
    configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "seeds": self.seeds, "configs": {k: dict(v) for k, v in self.configs.items()}}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ReseedRecord:
        return cls(top_k=_get(doc, "top_k", "an integer", where="reseed.", default=3),
                   seeds=_get(doc, "seeds", "an integer", where="reseed.", default=2),
                   configs=_plain(_get(doc, "configs", "an object", where="reseed.", default={})))


@dataclass(frozen=True, kw_only=True)
class SeedRow:
    """One config of the seed re-runs: its runs' tune and held-out metric, mean and sample std."""

    label: str
    params: Mapping[str, Any]
    trials: tuple[str, ...]
    seeds: tuple[int, ...]
    tune_mean: float | None = None
    tune_std: float | None = None
    heldout_mean: float | None = None
    heldout_std: float | None = None
    winner: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "params": dict(self.params), "trials": list(self.trials), "seeds": list(self.seeds),
                "tune_mean": self.tune_mean, "tune_std": self.tune_std, "heldout_mean": self.heldout_mean,
                "heldout_std": self.heldout_std, "winner": self.winner}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SeedRow:
        w = "seeds."
        return cls(label=_get(doc, "label", "text", where=w), params=_plain(_get(doc, "params", "an object", where=w)),
                   trials=tuple(_get(doc, "trials", "a list", where=w, default=())),
                   seeds=tuple(_get(doc, "seeds", "a list", where=w, default=())),
                   tune_mean=_get(doc, "tune_mean", "a number", where=w, default=None),
                   tune_std=_get(doc, "tune_std", "a number", where=w, default=None),
                   heldout_mean=_get(doc, "heldout_mean", "a number", where=w, default=None),
                   heldout_std=_get(doc, "heldout_std", "a number", where=w, default=None),
                   winner=_get(doc, "winner", "true or false", where=w, default=False))


@dataclass(frozen=True, kw_only=True)
class TrialSummary:
    """The best or the reference trial as ``experiment.json`` names it (its values keyed by the
    metric names on disk)."""

    trial_id: str
    status: str
    params: Mapping[str, Any] = field(default_factory=dict)
    value: float | None = None
    heldout: float | None = None
    run_dir: str = ""

    @classmethod
    def of(cls, t: TrialRecord, metric: str, heldout: str) -> TrialSummary:
        return cls(trial_id=t.trial_id, status=t.status, params=dict(t.params), value=t.value(metric),
                   heldout=t.value(heldout), run_dir=t.run_dir)

    def to_dict(self, metric: str, heldout: str) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "status": self.status, "params": dict(self.params), metric: self.value,
                heldout: self.heldout, "run_dir": self.run_dir}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], metric: str, heldout: str, where: str) -> TrialSummary:
        w = f"{where}."
        return cls(trial_id=_get(doc, "trial_id", "text", where=w), status=_get(doc, "status", "text", where=w),
                   params=dict(_get(doc, "params", "an object", where=w, default={})),
                   value=_get(doc, metric, "a number", where=w, default=None),
                   heldout=_get(doc, heldout, "a number", where=w, default=None),
                   run_dir=_get(doc, "run_dir", "text", where=w, default=""))


@dataclass(frozen=True, kw_only=True)
class OutcomeRecord:
    """What came of a sweep (the part of ``experiment.json`` that ``sweep.json`` lacks)."""

    counts: Mapping[str, int]
    complete: bool = False
    best: TrialSummary | None = None
    reference: TrialSummary | None = None
    gain_over_reference: float | None = None
    #: The same gain on the held-out half (completed values only, as the tune gain).
    gain_over_reference_heldout: float | None = None
    #: The seed re-runs, one row per config (empty without them); the winner is chosen by mean tune metric.
    seeds: tuple[SeedRow, ...] = ()
    #: Pooled seed standard deviation of the held-out metric over the re-run configs (None without them).
    seed_spread: float | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    #: Problems met while gathering the results (damaged sources that were skipped).
    warnings: tuple[str, ...] = ()
    updated: str | None = None

    def to_dict(self, metric: str, heldout: str) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "complete": self.complete,
            "best": self.best.to_dict(metric, heldout) if self.best is not None else None,
            "reference": self.reference.to_dict(metric, heldout) if self.reference is not None else None,
            "gain_over_reference": self.gain_over_reference,
            "gain_over_reference_heldout": self.gain_over_reference_heldout,
            "seeds": [r.to_dict() for r in self.seeds],
            "seed_spread": self.seed_spread,
            "files": dict(self.files),
            "warnings": list(self.warnings),
            "updated": self.updated,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], metric: str, heldout: str) -> OutcomeRecord:
        counts = _get(doc, "counts", "an object")
        for k in counts:
            _get(counts, k, "an integer", where="counts.")
        best, ref = _section(doc, "best"), _section(doc, "reference")
        return cls(
            counts=dict(counts),
            complete=_get(doc, "complete", "true or false", default=False),
            best=TrialSummary.from_dict(best, metric, heldout, "best") if best is not None else None,
            reference=TrialSummary.from_dict(ref, metric, heldout, "reference") if ref is not None else None,
            gain_over_reference=_get(doc, "gain_over_reference", "a number", default=None),
            gain_over_reference_heldout=_get(doc, "gain_over_reference_heldout", "a number", default=None),
            seeds=tuple(SeedRow.from_dict(r) for r in _get(doc, "seeds", "a list", default=())),
            seed_spread=_get(doc, "seed_spread", "a number", default=None),
            files=dict(_get(doc, "files", "an object", default={})),
            warnings=tuple(_get({"warnings": w}, "warnings", "text") for w in _get(doc, "warnings", "a list", default=())),
            updated=_get(doc, "updated", "text", default=None),
        )


@dataclass(frozen=True, kw_only=True)
class ExperimentRecord:
    """An experiment as ``sweep.json`` records it (what was asked for), and as ``experiment.json``
    records it (the same, plus :attr:`outcome`).

    In memory every in-folder path is absolute; on disk it is relative to the experiment folder
    (:meth:`to_json`, :meth:`from_json`). Fields a sweep always writes but a hand-made record may
    lack (the study, the settings, ...) default to None or empty.
    """

    name: str
    metric: str
    mode: str
    requested: int
    #: The held-out twin of :attr:`metric` (filled in from it when a record lacks it).
    heldout_metric: str = ""
    space_name: str | None = None
    #: The YAML file the space came from (absolute), or None for a built-in one.
    space_source: str | None = None
    #: The search space in its YAML form (:func:`space_to_dict`; ``space_from_dict`` reads it back).
    space: Mapping[str, Any] = field(default_factory=dict)
    #: The base pipeline config, the space's overrides applied (``to_dict`` form).
    base_config: Mapping[str, Any] = field(default_factory=dict)
    tune_split: str | None = None
    heldout_split: str | None = None
    stages: tuple[str, ...] = ()
    #: Name of the Ray trainable (``trainables.trainable.TRAINABLES``).
    trainable: str | None = None
    #: The space's reference point (evaluated first).
    reference_point: Mapping[str, Any] = field(default_factory=dict)
    #: Artifact store URI shared by the trials; None without a shared cache.
    store: str | None = None
    #: The folder holding the experiment folder.
    storage: str | None = None
    study: StudyRecord | None = None
    wandb: WandbRecord = field(default_factory=WandbRecord)
    resources: ResourcesRecord = field(default_factory=ResourcesRecord)
    seed: int = 0
    max_failures: int = 0
    max_concurrent: int | None = None
    #: The trials' ``TrialSettings`` in their dict form (``TrialSettings.from_dict`` reads it).
    settings: Mapping[str, Any] | None = None
    created: str | None = None
    #: ``joint`` (one search over every parameter) or ``cascade`` (one search per stage, in order).
    search_mode: str = "joint"
    #: The searches of the experiment in order (empty: one joint search, study :attr:`study`).
    phases: tuple[PhaseRecord, ...] = ()
    #: The seed re-runs after the search (None: none).
    reseed: ReseedRecord | None = None
    #: What came of the sweep (``experiment.json``); None in ``sweep.json``.
    outcome: OutcomeRecord | None = None

    def __post_init__(self) -> None:
        if not self.heldout_metric:
            object.__setattr__(self, "heldout_metric", heldout_metric_name(self.metric))
        object.__setattr__(self, "stages", tuple(self.stages))

    # ---- typed views of the nested parts ----

    @property
    def searched_params(self) -> tuple[str, ...]:
        """The config paths the space searches, in its order."""
        return tuple(self.space.get("params") or {})

    @property
    def fidelity(self) -> Mapping[str, Any] | None:
        """The space's fidelity (ASHA's ``time_attr``, ``max_t``, ...), or None without early stopping."""
        return self.space.get("fidelity") or None

    @property
    def runs_dir(self) -> str | None:
        """The folder of the trials' run folders."""
        value = (self.settings or {}).get("runs_dir")
        return value if isinstance(value, str) else None

    # ---- dict and JSON forms ----

    def to_dict(self) -> dict[str, Any]:
        """The flat dict of the files (no ``version``), paths as they are in memory (absolute)."""
        out: dict[str, Any] = {
            "name": self.name,
            "space_name": self.space_name,
            "space_source": self.space_source,
            "space": self.space,
            "base_config": self.base_config,
            "metric": self.metric,
            "mode": self.mode,
            "heldout_metric": self.heldout_metric,
            "tune_split": self.tune_split,
            "heldout_split": self.heldout_split,
            "stages": list(self.stages),
            "trainable": self.trainable,
            "requested": self.requested,
            "reference_point": self.reference_point,
            "store": self.store,
            "storage": self.storage,
            "study": dataclasses.asdict(self.study) if self.study is not None else None,
            "wandb": dataclasses.asdict(self.wandb),
            "resources": dataclasses.asdict(self.resources),
            "seed": self.seed,
            "max_failures": self.max_failures,
            "max_concurrent": self.max_concurrent,
            "settings": self.settings,
            "created": self.created,
            "search_mode": self.search_mode,
            "phases": [p.to_dict() for p in self.phases],
            "reseed": self.reseed.to_dict() if self.reseed is not None else None,
        }
        if self.outcome is not None:
            out.update(self.outcome.to_dict(self.metric, self.heldout_metric))
        return _plain(out)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ExperimentRecord:
        """A record from its flat dict form (paths as they are; unknown keys ignored).

        Raises:
            ValueError: a field is missing (``name``, ``metric``, ``mode``, ``requested``) or of the
            wrong type (the message names it).
        """
        metric = _get(doc, "metric", "text")
        heldout = _get(doc, "heldout_metric", "text", default="") or heldout_metric_name(metric)
        study, wandb, resources = _section(doc, "study"), _section(doc, "wandb"), _section(doc, "resources")
        settings = _section(doc, "settings")
        return cls(
            name=_get(doc, "name", "text"),
            metric=metric,
            mode=_get(doc, "mode", "text"),
            requested=_get(doc, "requested", "an integer"),
            heldout_metric=heldout,
            space_name=_get(doc, "space_name", "text", default=None),
            space_source=_get(doc, "space_source", "text", default=None),
            space=_plain(_get(doc, "space", "an object", default={})),
            base_config=_plain(_get(doc, "base_config", "an object", default={})),
            tune_split=_get(doc, "tune_split", "text", default=None),
            heldout_split=_get(doc, "heldout_split", "text", default=None),
            stages=tuple(_get({"stages": s}, "stages", "text") for s in _get(doc, "stages", "a list", default=())),
            trainable=_get(doc, "trainable", "text", default=None),
            reference_point=_plain(_get(doc, "reference_point", "an object", default={})),
            store=_get(doc, "store", "text", default=None),
            storage=_get(doc, "storage", "text", default=None),
            study=StudyRecord.from_dict(study) if study is not None else None,
            wandb=WandbRecord.from_dict(wandb) if wandb is not None else WandbRecord(),
            resources=ResourcesRecord.from_dict(resources) if resources is not None else ResourcesRecord(),
            seed=_get(doc, "seed", "an integer", default=0),
            max_failures=_get(doc, "max_failures", "an integer", default=0),
            max_concurrent=_get(doc, "max_concurrent", "an integer", default=None),
            settings=_plain(settings) if settings is not None else None,
            created=_get(doc, "created", "text", default=None),
            search_mode=_get(doc, "search_mode", "text", default="joint"),
            phases=tuple(PhaseRecord.from_dict(p, f"phases[{i}]")
                         for i, p in enumerate(_get(doc, "phases", "a list", default=()))),
            reseed=ReseedRecord.from_dict(doc["reseed"]) if _section(doc, "reseed") is not None else None,
            outcome=OutcomeRecord.from_dict(doc, metric, heldout) if "counts" in doc else None,
        )

    def to_json(self, exp_dir: str | Path) -> dict[str, Any]:
        """The record as written into ``exp_dir``: ``version`` first, in-folder paths relative to it."""
        return {"version": RECORD_VERSION, **portable_sweep(self.to_dict(), exp_dir)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], exp_dir: str | Path, *, file: str | Path,
                  what: str = "the experiment record", hint: str = "") -> ExperimentRecord:
        """The record of ``file`` (its JSON ``doc``), read in ``exp_dir``: in-folder paths resolved there.

        Raises:
            ResultsError: an unknown or newer version, or a missing or mistyped field (naming ``file``;
            ``hint`` says what to do).
        """
        record_version(doc, file)  # version 1 is the only one so far: nothing to convert
        try:
            return cls.from_dict(resolve_paths(doc, exp_dir))
        except (ValueError, TypeError) as exc:
            raise ResultsError(f"{file}: {what} is invalid ({_why(exc)})" + (f"; {hint}" if hint else "")) from None


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
    #: The search the trial belongs to (:attr:`PhaseRecord.name`; empty for a one-search experiment).
    phase: str = ""
    #: Times of the trial's first and last report, in seconds since the epoch (None: unknown).
    first_report: float | None = None
    last_report: float | None = None

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
        return TrialSummary.of(self, metric, heldout).to_dict(metric, heldout)


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


def _complete(counts: Mapping[str, int], requested: int) -> bool:
    return (counts.get("failed", 0) == 0 and counts.get("incomplete", 0) == 0
            and counts.get("total", 0) >= requested)


def _gain(best: TrialRecord | None, reference: TrialRecord | None, metric: str, mode: str) -> float | None:
    """Best minus reference ``metric`` (positive = better), from completed trials only: a pruned
    reference holds a truncated value and a failed one none, so either gives no gain."""
    if best is None or reference is None or best.status != "completed" or reference.status != "completed":
        return None
    b, r = best.value(metric), reference.value(metric)
    if b is None or r is None:
        return None
    return b - r if mode == "max" else r - b


def find_reference(trials: Sequence[TrialRecord], point: Mapping[str, Any]) -> TrialRecord | None:
    """The first trial whose searched values equal the reference ``point`` (None if none does)."""
    for t in trials:
        if point and all(k in t.params and _same(t.params[k], v) for k, v in point.items()):
            return t
    return None


#: The config field the seed re-runs vary, and the phase that holds them.
SEED_PARAM = "run.seed"
RESEED_PHASE = "reseed"


def config_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable key of a config's values, ``run.seed`` left out (floats to 12 significant digits)."""
    def norm(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v):
            return float(f"{v:.12g}")
        return v if isinstance(v, str | int | bool | type(None)) else json.dumps(v, default=str)

    return tuple(sorted((k, norm(v)) for k, v in params.items() if k != SEED_PARAM))


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_rows(trials: Sequence[TrialRecord], record: ExperimentRecord) -> tuple[tuple[SeedRow, ...], float | None]:
    """The seed re-runs, one row per config (the experiment's metric, tune and held-out halves), and the
    pooled seed spread (root mean of the configs' held-out variances; None with fewer than two runs).

    A config's runs are its completed trials with the metric in the last search and in the re-runs,
    matched by their values (``run.seed`` aside; a trial without it ran the base config's seed). The
    winner is the best mean tune metric among the searched configs and the reference; the comparison
    configs of :attr:`ReseedRecord.configs` are shown, never chosen. Empty without re-runs.
    """
    if record.reseed is None or not any(t.phase == RESEED_PHASE for t in trials):
        return (), None
    metric, heldout = record.metric, record.heldout_metric
    base_seed = int(((record.base_config or {}).get("run") or {}).get("seed") or 0)
    keys: list[tuple[tuple[str, Any], ...]] = []
    for t in trials:
        if t.phase == RESEED_PHASE and config_key(t.params) not in keys:
            keys.append(config_key(t.params))
    labels: dict[Any, str] = {}
    ref_key = config_key(record.reference_point)
    labels[ref_key] = "reference"
    for name, values in record.reseed.configs.items():
        labels.setdefault(config_key(values), name)
    compare = {config_key(v) for v in record.reseed.configs.values()} - {ref_key}
    rank = 0
    rows: list[SeedRow] = []
    for key in keys:
        runs = [t for t in trials if t.status == "completed" and t.value(metric) is not None
                and config_key(t.params) == key]
        if key not in labels:
            rank += 1
        label = labels.get(key, f"searched #{rank}")
        tune_mean, tune_std = _mean_std([t.value(metric) for t in runs])  # type: ignore[misc]
        held = [t.value(heldout) for t in runs if t.value(heldout) is not None]
        held_mean, held_std = _mean_std(held)  # type: ignore[arg-type]
        params = dict(key)
        rows.append(SeedRow(label=label, params=params, trials=tuple(t.trial_id for t in runs),
                            seeds=tuple(int(t.params.get(SEED_PARAM, base_seed)) for t in runs),
                            tune_mean=tune_mean, tune_std=tune_std, heldout_mean=held_mean, heldout_std=held_std))
    sign = 1.0 if record.mode == "max" else -1.0
    eligible = [i for i, (r, k) in enumerate(zip(rows, keys, strict=True)) if k not in compare and r.tune_mean is not None]
    if eligible:
        win = max(eligible, key=lambda i: sign * rows[i].tune_mean)  # type: ignore[operator]
        rows[win] = dataclasses.replace(rows[win], winner=True)
    variances = [r.heldout_std ** 2 for r in rows if r.heldout_std is not None]
    spread = math.sqrt(sum(variances) / len(variances)) if variances else None
    return tuple(rows), spread


@dataclass(frozen=True, kw_only=True)
class ExperimentResult:
    """An experiment folder, read back (see the module docstring): its record (with the outcome) and
    its trials."""

    path: Path
    record: ExperimentRecord
    trials: tuple[TrialRecord, ...]
    best: TrialRecord | None
    reference: TrialRecord | None

    def __post_init__(self) -> None:
        if self.record.outcome is None:
            raise ValueError(f"{self.path}: an experiment result needs a record with its outcome")

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def metric(self) -> str:
        return self.record.metric

    @property
    def mode(self) -> str:
        return self.record.mode

    @property
    def heldout_metric(self) -> str:
        return self.record.heldout_metric

    @property
    def requested(self) -> int:
        return self.record.requested

    @property
    def outcome(self) -> OutcomeRecord:
        assert self.record.outcome is not None  # checked when made
        return self.record.outcome

    @property
    def counts(self) -> Mapping[str, int]:
        """Trials by status, and ``total`` (as ``experiment.json`` records them)."""
        return self.outcome.counts

    @property
    def warnings(self) -> tuple[str, ...]:
        """Problems met while gathering the results (damaged sources that were skipped)."""
        return self.outcome.warnings

    @property
    def info(self) -> dict[str, Any]:
        """The record as the flat dict of ``experiment.json`` (paths absolute), without ``counts``,
        ``best`` and ``reference``: the older, untyped view (read :attr:`record` instead)."""
        return {k: v for k, v in self.record.to_dict().items() if k not in ("counts", "best", "reference")}

    @property
    def complete(self) -> bool:
        """Every requested trial ran to an end (completed or pruned); none failed or is missing."""
        return _complete(self.counts, self.requested)

    @property
    def gain_over_reference(self) -> float | None:
        """Best minus reference tune metric (sign follows ``mode``: positive = better), from completed
        values only (with seed re-runs: the difference of their means); None if unknown."""
        return self.outcome.gain_over_reference

    @property
    def gain_over_reference_heldout(self) -> float | None:
        """The same on the held-out half."""
        return self.outcome.gain_over_reference_heldout

    @property
    def seeds(self) -> tuple[SeedRow, ...]:
        """The seed re-runs, one row per config (empty without them)."""
        return self.outcome.seeds

    def trial(self, trial_id: str) -> TrialRecord:
        for t in self.trials:
            if t.trial_id == trial_id:
                return t
        raise KeyError(f"{self.path}: no trial {trial_id!r} (trials: {', '.join(t.trial_id for t in self.trials)})")

    def reports(self) -> pa.Table:
        """Every report of every trial (``reports.parquet``) in the current schema
        (:data:`~wsss_tune.analysis.schema.REPORTS_SCHEMA`; a version-1 file is converted).

        Raises:
            ResultsError: the file is missing or unreadable (the message says how to rebuild it).
        """
        return read_reports_table(self.path, experiment=self.name)

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


def _write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _trial_row(t: TrialRecord, exp_dir: Path, *, experiment: str, metric: str) -> dict[str, Any]:
    """A ``trials.parquet`` row (:data:`~wsss_tune.analysis.schema.TRIALS_COLUMNS`) of ``t``; ``metric``
    is the searched metric of its phase (its ``objective``)."""
    keyed = {c.key: c.name for c in schema.TRIALS_COLUMNS if c.key}
    row: dict[str, Any] = {
        "experiment": experiment, "trial_id": t.trial_id, "phase": t.phase or None, "status": t.status,
        "pruned": t.status == "pruned", "reference": t.reference, "error": t.error,
        "objective": t.value(metric) if t.status == "completed" else None,
        "run_dir": _relative(t.run_dir, exp_dir) if t.run_dir else "", "reports": t.reports, "seconds": t.seconds,
        "first_report": t.first_report, "last_report": t.last_report, "resumed_from": list(t.resumed_from),
        "params": sorted((str(k), schema.encode_param(v)) for k, v in t.params.items()),
    }
    rest: dict[str, Any] = {}
    for k, v in t.metrics.items():
        if k in keyed:
            row[keyed[k]] = v
        elif k not in schema.DROPPED_KEYS and k not in schema.REPORT_ONLY_KEYS:
            rest[k] = v
    row["metrics"], row["tags"] = schema.split_values(rest)
    where = f"trial {t.trial_id}"
    return {c.name: schema.cell_value(c, row.get(c.name), where) for c in schema.TRIALS_COLUMNS}


def _trials_table(trials: Sequence[TrialRecord], record: ExperimentRecord, exp_dir: Path) -> pa.Table:
    phase_metric = {p.name: p.metric for p in record.phases}
    rows = [_trial_row(t, exp_dir, experiment=record.name, metric=phase_metric.get(t.phase, record.metric))
            for t in trials]
    return pa.Table.from_pylist(rows, schema=schema.TRIALS_SCHEMA)


def _reports_table(reports: Sequence[Mapping[str, Any]], experiment: str) -> pa.Table:
    """``reports.parquet`` of ``reports`` (Ray results, each with ``trial_id``).

    Raises:
        ValueError: a report lacks its trial id or holds a value of the wrong type (naming them).
    """
    rows = [schema.report_row(r, experiment=experiment, where=f"report {i} (trial {r.get('trial_id')!r})")
            for i, r in enumerate(reports)]
    return pa.Table.from_pylist(rows, schema=schema.REPORTS_SCHEMA)


def write_experiment(
    path: str | Path,
    *,
    sweep: ExperimentRecord | Mapping[str, Any],
    trials: Sequence[TrialRecord],
    reports: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
) -> ExperimentResult:
    """Write ``trials.parquet``, ``reports.parquet`` and ``experiment.json`` into ``path``.

    Args:
        sweep: The sweep's record (``sweep.json``; an outcome it holds is replaced), or its flat dict
            form (needs ``name``, ``metric``, ``mode`` and ``requested``; see
            :meth:`ExperimentRecord.from_dict`).
        trials: One record per trial (the ``reference`` flags are set here).
        reports: One dict per report, each with ``trial_id``.
        notes: Problems met while gathering the results (damaged sources that were skipped), kept in
            ``experiment.json`` as ``warnings``.

    Raises:
        ValueError: a trial or a report holds a value of the wrong type for its column (naming the
            trial, the field and the value); no file is written then.
    """
    path = Path(path).expanduser().resolve()
    record = sweep if isinstance(sweep, ExperimentRecord) else ExperimentRecord.from_dict(sweep)
    metric, mode, heldout = record.metric, record.mode, record.heldout_metric
    ref = find_reference(trials, record.reference_point)
    trials = [dataclasses.replace(t, reference=ref is not None and t.trial_id == ref.trial_id) for t in trials]
    best = pick_best(trials, metric, mode)
    ref = next((t for t in trials if t.reference), None)
    gain, gain_heldout = _gain(best, ref, metric, mode), _gain(best, ref, heldout, mode)
    seeds, spread = seed_rows(trials, record)
    winner = next((r for r in seeds if r.winner), None)
    if winner is not None:  # the seed re-runs decide: the winner by mean, gains as differences of means
        by_id = {t.trial_id: t for t in trials}
        best = by_id[winner.trials[0]]
        ref_row = next((r for r in seeds if r.label == "reference"), None)
        sign = 1.0 if mode == "max" else -1.0
        gain = gain_heldout = None
        if ref_row is not None and winner.tune_mean is not None and ref_row.tune_mean is not None:
            gain = sign * (winner.tune_mean - ref_row.tune_mean)
        if ref_row is not None and winner.heldout_mean is not None and ref_row.heldout_mean is not None:
            gain_heldout = sign * (winner.heldout_mean - ref_row.heldout_mean)
    counts = {s: sum(t.status == s for t in trials) for s in STATUSES}
    counts["total"] = len(trials)
    trials_table = _trials_table(trials, record, path)  # both built before either file is replaced
    reports_table = _reports_table(reports, record.name)
    _write_parquet(trials_table, path / TRIALS_FILE)
    _write_parquet(reports_table, path / REPORTS_FILE)
    outcome = OutcomeRecord(
        counts=counts,
        complete=_complete(counts, record.requested) if not record.phases
        else all(p.done for p in record.phases) and not counts["failed"] and not counts["incomplete"],
        best=TrialSummary.of(best, metric, heldout) if best is not None else None,
        reference=TrialSummary.of(ref, metric, heldout) if ref is not None else None,
        gain_over_reference=gain,
        gain_over_reference_heldout=gain_heldout,
        seeds=seeds,
        seed_spread=spread,
        files={"trials": TRIALS_FILE, "reports": REPORTS_FILE, "runs": RUNS_DIR},
        warnings=tuple(notes),
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    record = dataclasses.replace(record, outcome=outcome)
    atomic_write_json(path / EXPERIMENT_FILE, record.to_json(path))
    return ExperimentResult(path=path, record=record, trials=tuple(trials), best=best, reference=ref)


def _file_version(table: pa.Table, name: str, file: Path) -> int:
    """The schema version of a results table read from ``file`` (1 for a file without one)."""
    tag = (table.schema.metadata or {}).get(schema.SCHEMA_KEY)
    if tag is None:
        return 1
    kind, _, version = tag.decode(errors="replace").partition("/")
    if kind != name or not version.isdigit():
        raise ResultsError(f"{file}: holds the {kind!r} table (schema tag {tag!r}), expected {name!r}")
    if int(version) > schema.SCHEMA_VERSION:
        raise ResultsError(f"{file}: results schema version {version} is newer than this wsss-tune reads "
                           f"(versions 1 to {schema.SCHEMA_VERSION}); read it with the wsss-tune that wrote it")
    return int(version)


def _records(table: pa.Table, exp_dir: Path) -> list[TrialRecord]:
    """The trial records of a current-schema ``trials.parquet``: the map columns and the columns that
    hold a result key (``num_failures``, ``node_id``, ...) become :attr:`TrialRecord.metrics` again."""
    keyed = [(c.name, c.key) for c in schema.TRIALS_COLUMNS if c.key]
    out = []
    for row in table.to_pylist():
        metrics: dict[str, Any] = {**dict(row["metrics"] or ()), **dict(row["tags"] or ())}
        metrics.update({key: row[name] for name, key in keyed if row[name] is not None})
        out.append(TrialRecord(
            trial_id=row["trial_id"], status=row["status"],
            params={k: schema.decode_param(v) for k, v in row["params"] or ()}, metrics=metrics,
            error=row["error"], run_dir=run_dir_in(exp_dir, row["run_dir"] or "", row["trial_id"]),
            reference=bool(row["reference"]), reports=int(row["reports"] or 0), seconds=row["seconds"],
            resumed_from=tuple(row["resumed_from"] or ()), phase=row["phase"] or "",
            first_report=schema.to_epoch(row["first_report"]), last_report=schema.to_epoch(row["last_report"])))
    return out


def _records_v1(table: pa.Table, exp_dir: Path) -> list[TrialRecord]:
    """The trial records of a version-1 ``trials.parquet`` (one column per searched value and metric)."""
    out = []
    for row in table.to_pylist():
        params = {k[len(PARAM_PREFIX):]: v for k, v in row.items() if k.startswith(PARAM_PREFIX) and v is not None}
        metrics = {k: v for k, v in row.items()
                   if k not in _V1_TRIAL_COLUMNS and not k.startswith(PARAM_PREFIX) and v is not None}
        out.append(TrialRecord(trial_id=row["trial_id"], status=row["status"], params=params, metrics=metrics,
                               error=row.get("error"),
                               run_dir=run_dir_in(exp_dir, row.get("run_dir") or "", row["trial_id"]),
                               reference=bool(row.get("reference")), reports=int(row.get("reports") or 0),
                               seconds=row.get("seconds"),
                               resumed_from=tuple(x for x in (row.get("resumed_from") or "").split(",") if x),
                               phase=row.get("phase") or ""))
    return out


def _read_parquet(file: Path, exp_dir: Path) -> pa.Table:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise ResultsError(f"{file} is unreadable ({_why(exc)}); {rebuild_hint(exp_dir)}") from None


def read_trials_table(path: str | Path) -> list[TrialRecord]:
    """The records of ``<path>/trials.parquet`` (run folders resolved in ``path``; a version-1 file
    is converted).

    Raises:
        FileNotFoundError: no such file. ResultsError: it is unreadable (the message says how to rebuild it).
    """
    path = Path(path).expanduser().resolve()
    file = path / TRIALS_FILE
    table = _read_parquet(file, path)
    version = _file_version(table, "trials", file)
    try:
        if version == 1:
            return _records_v1(table, path)
        if not table.schema.equals(schema.TRIALS_SCHEMA):
            raise ValueError(f"its columns differ from the trials schema version {version} "
                             f"({', '.join(table.schema.names)})")
        return _records(table, path)
    except (pa.ArrowException, KeyError, TypeError, ValueError) as exc:
        raise ResultsError(f"{file} is unreadable ({_why(exc)}); {rebuild_hint(path)}") from None


def read_reports_table(path: str | Path, *, experiment: str) -> pa.Table:
    """``<path>/reports.parquet`` in the current schema (:data:`~wsss_tune.analysis.schema.REPORTS_SCHEMA`):
    a version-1 file (one column per metric) is converted, its rows named ``experiment``.

    Raises:
        ResultsError: the file is missing or unreadable (the message says how to rebuild it).
    """
    path = Path(path).expanduser().resolve()
    file = path / REPORTS_FILE
    try:
        table = _read_parquet(file, path)
    except FileNotFoundError as exc:
        raise ResultsError(f"{exc}; {rebuild_hint(path)}") from None
    version = _file_version(table, "reports", file)
    try:
        if version == 1:
            rows = [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]
            return _reports_table(rows, experiment)
        if not table.schema.equals(schema.REPORTS_SCHEMA):
            raise ValueError(f"its columns differ from the reports schema version {version} "
                             f"({', '.join(table.schema.names)})")
        return table
    except (pa.ArrowException, KeyError, TypeError, ValueError) as exc:
        raise ResultsError(f"{file} is unreadable ({_why(exc)}); {rebuild_hint(path)}") from None


def load_experiment(path: str | Path) -> ExperimentResult:
    """Read an experiment folder written by :func:`write_experiment`.

    Raises:
        FileNotFoundError: ``path`` has no ``experiment.json`` / ``trials.parquet`` (with what to do).
        ResultsError: one of them is unreadable, or ``experiment.json`` is of an unknown version.
    """
    path = Path(path).expanduser().resolve()
    doc_path, trials_path = path / EXPERIMENT_FILE, path / TRIALS_FILE
    if not doc_path.is_file() or not trials_path.is_file():
        hint = (f"its results files are missing; {rebuild_hint(path)}, or continue the sweep with "
                f"`wsss-tune resume {path}`"
                if (path / SWEEP_FILE).is_file() else "not an experiment folder made by `wsss-tune sweep`")
        raise FileNotFoundError(f"{path}: no {EXPERIMENT_FILE} and {TRIALS_FILE} ({hint})")
    doc = _read_json(doc_path, "the experiment record", rebuild_hint(path))
    record_version(doc, doc_path)
    missing = [k for k in ("name", "metric", "mode", "counts", "requested") if k not in doc]
    if missing:
        raise ResultsError(f"{doc_path}: the experiment record lacks {', '.join(missing)}; {rebuild_hint(path)}")
    record = ExperimentRecord.from_json(doc, path, file=doc_path, hint=rebuild_hint(path))
    trials = read_trials_table(path)
    ref = next((t for t in trials if t.reference), None)
    best_id = record.outcome.best.trial_id if record.outcome and record.outcome.best else None
    best = next((t for t in trials if t.trial_id == best_id), None)
    return ExperimentResult(path=path, record=record, trials=tuple(trials), best=best, reference=ref)


def stage_miou_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    """Per-stage mask quality of the reference and the best trial: one row each, with
    ``<stage> tune`` / ``<stage> held-out`` columns for CAM (with ``run.cam_baseline``), EPS, refined
    (random walk) and DeepLab (a stage a sweep did not run has no columns)."""
    rows = []
    for label, trial in (("reference", result.reference), ("best", result.best)):
        if trial is None:
            continue
        row: dict[str, Any] = {"config": label, "trial": trial.trial_id}
        for name, prefix in graph.metric_columns():
            tune, held = trial.value(f"{prefix}_miou_tune"), trial.value(f"{prefix}_miou_heldout")
            if tune is not None or held is not None:
                row[f"{name} tune"], row[f"{name} held-out"] = tune, held
        rows.append(row)
    return rows
