"""The fixed schema of ``trials.parquet`` and ``reports.parquet`` (documented in ``docs/results.md``).

Every experiment writes the same columns with the same types, whatever its space, stages or
outcome, so files of different experiments can be read as one table (DuckDB's
``read_parquet([a, b])``, ``pyarrow.dataset``). What varies between experiments lives in three map
columns:

* ``params`` (trials only): the searched values, ``config path -> value as JSON text`` (``"0.4"``,
  ``"3"``, ``"\\"cam\\""``, ``"[0.5, 1.0]"``), so a number, a choice or a list keeps its exact type;
* ``metrics``: every other number a trial or a report carries, ``name -> float64`` (integers and
  bools become floats);
* ``tags``: every other text value (``eps_method``, ...), ``name -> string``.

The fixed columns are declared once, as :data:`TRIALS_COLUMNS` and :data:`REPORTS_COLUMNS`; the
pyarrow schemas (:data:`TRIALS_SCHEMA`, :data:`REPORTS_SCHEMA`) and the conversions from a trial
record or a Ray result to a row are derived from them. A column with a ``key`` holds the result
key of that name (Ray's ``timestamp`` becomes ``time``, ``training_iteration`` becomes ``report``,
...); reading a trial back puts those values under their keys again.

Ray's bookkeeping (:data:`RAY_INTERNAL_KEYS`: ``pid``, ``should_checkpoint``, ``experiment_tag``,
...) is left out (:data:`DROPPED_KEYS`); where a trial ran (``node_id``, ``hostname``, ``node_ip``),
when and for how long are kept under the names above.

The files carry their table name and :data:`SCHEMA_VERSION` in the parquet metadata
(:data:`SCHEMA_KEY`). Files written before the schema was fixed (no such entry) are version 1 and
are converted when read (see :mod:`wsss_tune.analysis.results`).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_KEY",
    "TIME_TYPE",
    "Column",
    "TRIALS_COLUMNS",
    "REPORTS_COLUMNS",
    "TRIALS_SCHEMA",
    "REPORTS_SCHEMA",
    "MAP_COLUMNS",
    "RAY_INTERNAL_KEYS",
    "DROPPED_KEYS",
    "REPORT_ONLY_KEYS",
    "schema_tag",
    "report_row",
    "report_column",
    "to_epoch",
    "encode_param",
    "decode_param",
    "split_values",
    "cell_value",
]

#: Version of the two tables' schema (the files written before it was fixed are version 1).
SCHEMA_VERSION = 2
#: Parquet metadata key holding ``<table>/<version>`` (``trials/2``).
SCHEMA_KEY = b"wsss_tune.results_schema"
#: Type of every time column: microseconds since the epoch, UTC.
TIME_TYPE = pa.timestamp("us", tz="UTC")

_NUMBERS = pa.map_(pa.string(), pa.float64())
_TEXTS = pa.map_(pa.string(), pa.string())


@dataclass(frozen=True)
class Column:
    """One fixed column: its name, type, meaning; the result key it holds (None: not from a result),
    and for a non-nullable column the value a missing entry takes (None: it must be given)."""

    name: str
    type: pa.DataType
    doc: str
    key: str | None = None
    nullable: bool = True
    default: Any = None

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable, metadata={"doc": self.doc})


#: Where a trial or a report ran (the trainable adds ``node_id``; Ray adds the other two).
_WHERE = (
    Column("node_id", pa.string(), "Ray node id of the worker that ran it", key="node_id"),
    Column("hostname", pa.string(), "host name of that worker", key="hostname"),
    Column("node_ip", pa.string(), "IP address of that worker", key="node_ip"),
)
_MAPS = (
    Column("metrics", _NUMBERS, "every other number of the result: name -> value (float64)", nullable=False,
           default=()),
    Column("tags", _TEXTS, "every other text value of the result: name -> text", nullable=False, default=()),
)

#: The columns of ``trials.parquet`` (one row per trial), in order.
TRIALS_COLUMNS: tuple[Column, ...] = (
    Column("experiment", pa.string(), "experiment name (experiment.json `name`)", nullable=False),
    Column("trial_id", pa.string(), "Ray trial id (the latest attempt's)", nullable=False),
    Column("phase", pa.string(), "search the trial belongs to (a cascade's stage, `reseed`); null in a "
           "one-search experiment"),
    Column("status", pa.string(), "`completed`, `pruned`, `failed` or `incomplete`", nullable=False),
    Column("pruned", pa.bool_(), "stopped early by the scheduler (status `pruned`)", nullable=False),
    Column("reference", pa.bool_(), "it evaluated the space's reference point", nullable=False),
    Column("error", pa.string(), "last line of the error of a failed trial; null otherwise"),
    Column("objective", pa.float64(), "the searched metric of a completed trial (its phase's metric); null "
           "otherwise, also for a pruned trial's truncated value"),
    Column("run_dir", pa.string(), "the trial's run folder (config.yaml, metrics.json), relative to the "
           "experiment folder", nullable=False),
    Column("reports", pa.int64(), "number of reports the trial sent", nullable=False),
    Column("seconds", pa.float64(), "wall-clock seconds of its last attempt (Ray `time_total_s`)"),
    Column("first_report", TIME_TYPE, "time of its first report"),
    Column("last_report", TIME_TYPE, "time of its last report"),
    Column("resumed_from", pa.list_(pa.string()), "Ray trial ids of earlier attempts a resume continued",
           nullable=False, default=()),
    Column("num_failures", pa.int64(), "attempts that raised and were retried", key="num_failures"),
    Column("cache_repairs", pa.int64(), "damaged cache artifacts the trial found and rebuilt", key="cache_repairs"),
    Column("fingerprint", pa.string(), "fingerprint of the data the run read (split ids, labels, file sizes)",
           key="fingerprint"),
    *_WHERE,
    Column("params", _TEXTS, "searched values: config path -> value as JSON text", nullable=False, default=()),
    *_MAPS,
)

#: The columns of ``reports.parquet`` (one row per report of every trial), in order.
REPORTS_COLUMNS: tuple[Column, ...] = (
    Column("experiment", pa.string(), "experiment name (experiment.json `name`)", nullable=False),
    Column("trial_id", pa.string(), "Ray trial id of the attempt that sent it", key="trial_id", nullable=False),
    Column("report", pa.int64(), "the report's number within the attempt, from 1 (Ray `training_iteration`)",
           key="training_iteration"),
    Column("time", TIME_TYPE, "when it was reported (Ray `timestamp`, whole seconds)", key="timestamp"),
    Column("elapsed_s", pa.float64(), "seconds since the attempt started (Ray `time_total_s`)", key="time_total_s"),
    Column("stage", pa.string(), "artifact that reported (`eps_model`, `eps`, `affinity`, `rw`, `deeplab`, ...); "
           "null in the final report", key="stage"),
    Column("step", pa.int64(), "the pipeline's step, counted across stages", key="step"),
    Column("stage_step", pa.int64(), "the stage's own training step (null for a stage served from the cache)",
           key="stage_step"),
    Column("fidelity", pa.int64(), "the pipeline-wide fidelity counter", key="fidelity"),
    Column("final", pa.bool_(), "the trial's last report: the pipeline finished, metrics at full fidelity",
           key="final", nullable=False, default=False),
    Column("cache_hit", pa.bool_(), "the stage was served from the artifact cache (its stored metrics, "
           "reported once)", key="cache_hit", nullable=False, default=False),
    Column("pruned", pa.bool_(), "the scheduler stopped the trial at this report", key="pruned", nullable=False,
           default=False),
    Column("cache_repairs", pa.int64(), "damaged cache artifacts the trial had rebuilt so far", key="cache_repairs"),
    *_WHERE,
    *_MAPS,
)

#: The map columns (the per-experiment part).
MAP_COLUMNS = frozenset({"params", "metrics", "tags"})


def _schema(columns: Sequence[Column], table: str) -> pa.Schema:
    names = [c.name for c in columns]
    assert len(set(names)) == len(names), names
    return pa.schema([c.field for c in columns], metadata={SCHEMA_KEY: schema_tag(table)})


def schema_tag(table: str, version: int = SCHEMA_VERSION) -> bytes:
    """The :data:`SCHEMA_KEY` value of ``table`` (``trials`` or ``reports``)."""
    return f"{table}/{version}".encode()


TRIALS_SCHEMA = _schema(TRIALS_COLUMNS, "trials")
REPORTS_SCHEMA = _schema(REPORTS_COLUMNS, "reports")

#: Keys of Ray's results that are Ray's bookkeeping, not the trial's: never stored. (Where a trial ran
#: and Ray's time keys are kept, under the names of :data:`REPORTS_COLUMNS`.)
RAY_INTERNAL_KEYS = frozenset({
    "config", "date", "pid", "done", "checkpoint_dir_name", "should_checkpoint", "experiment_tag",
    "experiment_id", "trial_log_path", "time_this_iter_s", "time_since_restore", "iterations_since_restore",
    "timesteps_total", "timesteps_since_restore", "episodes_total", "episodes_this_iter", "warmup_time",
})
#: Result keys never stored: Ray's bookkeeping and ``objective``, the tuner's copy of the searched
#: metric's completed value (the metric is stored under its own name; ``trials.parquet`` derives its
#: ``objective`` column from it).
DROPPED_KEYS = RAY_INTERNAL_KEYS | {"objective"}
#: Result keys that describe one report (its time, step, stage, flags): in ``reports.parquet`` only,
#: never among a trial's values.
REPORT_ONLY_KEYS = frozenset(c.key for c in REPORTS_COLUMNS if c.key) - {c.key for c in TRIALS_COLUMNS if c.key}


def report_column(key: str) -> str:
    """The ``reports.parquet`` column holding the result key ``key`` (``training_iteration`` ->
    ``report``); ``key`` itself for any other key (a metric)."""
    return next((c.name for c in REPORTS_COLUMNS if c.key == key), key)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def to_epoch(value: Any) -> float | None:
    """Seconds since the epoch of a time value (a number of seconds or a datetime); None if none."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{value!r} is not a time (seconds since the epoch or a datetime)")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def cell_value(col: Column, value: Any, where: str) -> Any:
    """``value`` as column ``col`` stores it. Raises ValueError naming ``where``, the column and the value."""
    if value is None:
        if col.nullable:
            return None
        if col.default is not None:
            return col.default
        raise ValueError(f"{where}: field {col.name!r} is missing")
    t = col.type
    if t == TIME_TYPE:
        try:
            seconds = to_epoch(value)
        except ValueError:
            raise ValueError(f"{where}: field {col.key or col.name!r} = {value!r}, expected a time "
                             "(seconds since the epoch)") from None
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)  # type: ignore[arg-type]
    if t == pa.string():
        if isinstance(value, str):
            return value
        expected = "text"
    elif t == pa.bool_():
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif t == pa.int64():
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        expected = "an integer"
    elif t == pa.float64():
        if _number(value):
            return float(value)
        expected = "a number"
    else:
        return value
    raise ValueError(f"{where}: field {col.key or col.name!r} = {value!r}, expected {expected}")


def encode_param(value: Any) -> str:
    """A searched value as ``params`` stores it: JSON text (tuples as lists)."""
    return json.dumps(value, sort_keys=True)


def decode_param(text: str) -> Any:
    return json.loads(text)


def split_values(values: Mapping[str, Any]) -> tuple[list[tuple[str, float]], list[tuple[str, str]]]:
    """The ``metrics`` and ``tags`` entries of the remaining values of a result: numbers (bools as
    0/1) and texts, sorted by name; None and nested values (dicts, lists) are left out."""
    metrics: list[tuple[str, float]] = []
    tags: list[tuple[str, str]] = []
    for k, v in sorted(values.items()):
        if isinstance(v, bool | int | float):
            metrics.append((str(k), float(v)))
        elif isinstance(v, str):
            tags.append((str(k), v))
    return metrics, tags


def report_row(result: Mapping[str, Any], *, experiment: str, where: str = "report") -> dict[str, Any]:
    """A ``reports.parquet`` row from one report (a Ray result with ``trial_id``).

    Raises:
        ValueError: a fixed column's value is of the wrong type (naming ``where``, the key and the value).
    """
    by_key = {c.key: c for c in REPORTS_COLUMNS if c.key}
    row: dict[str, Any] = {"experiment": experiment}
    rest: dict[str, Any] = {}
    for k, v in result.items():
        if k in DROPPED_KEYS or isinstance(v, dict | list | tuple):
            continue
        if k in by_key:
            row[by_key[k].name] = v
        else:
            rest[k] = v
    row["metrics"], row["tags"] = split_values(rest)
    return {c.name: cell_value(c, row.get(c.name), where) for c in REPORTS_COLUMNS}
