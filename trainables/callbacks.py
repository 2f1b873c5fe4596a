"""Ray Tune callbacks that make Ray's own records say what the search knows.

* :class:`TrialOutcome` marks each trial's last result: a completed trial's final result gets
  ``pruned: False`` and ``objective`` (the searched metric's completed value); the result on which
  the scheduler stopped a trial gets ``pruned: True`` and ``final: False``. The tuner's metric is
  ``objective`` (:data:`OBJECTIVE_KEY`), so ``ResultGrid.get_best_result()`` compares completed
  trials only: a pruned trial never carries it. A pruned trial's truncated value stays under the
  searched metric's own name, marked by ``pruned``.
* :class:`CompleteCSVLogger` writes ``progress.csv`` with every column any result had: Ray's CSV
  logger fixes the header at the first result, so the later stages' metrics were missing. When a
  result brings new columns the file is rewritten once with the wider header (a few times per trial:
  each stage adds its metrics), otherwise a row is appended.

Both run in the driver for every result, so they do a few dictionary operations per result and touch
the disk only to append a row (see ``python -m benchmarks driver``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ray.air.constants import EXPR_PROGRESS_FILE
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback
from ray.tune.utils import flatten_dict

from wsss_tune.utils.io import atomic_write_text

from .reporter import FINAL_KEY

__all__ = ["OBJECTIVE_KEY", "PRUNED_KEY", "TrialOutcome", "CompleteCSVLogger"]

#: Result key of the searched metric's value in a completed trial's final result (the tuner's metric).
OBJECTIVE_KEY = "objective"
#: Result key marking the result on which the scheduler stopped a trial (True) or a completed
#: trial's final result (False).
PRUNED_KEY = "pruned"
#: Ray sets this in the result on which a trial stops (the scheduler's decision, or its end).
_DONE = "done"


class TrialOutcome(Callback):
    """Marks completed and pruned trials in their last result (module docstring).

    Ray hands callbacks the result it is about to store as the trial's last result, after the
    scheduler's decision (a stopped trial's result already has ``done: True``), and lets them
    change it in place; it must come before other callbacks that read the marks.

    Args:
        metric: The searched metric (copied to :data:`OBJECTIVE_KEY` in completed trials).
    """

    def __init__(self, *, metric: str) -> None:
        self.metric = metric

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        mark(result, metric=self.metric)


def mark(result: dict[str, Any], *, metric: str) -> None:
    """Add the outcome marks to one result in place (see :class:`TrialOutcome`)."""
    if result.get(FINAL_KEY):
        result[PRUNED_KEY] = False
        value = result.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            result[OBJECTIVE_KEY] = float(value)
    elif result.get(_DONE):
        result[PRUNED_KEY] = True
        result[FINAL_KEY] = False


class CompleteCSVLogger(CSVLoggerCallback):
    """Ray's CSV logger, with a header that grows when a result brings new columns (module docstring).

    Passing it to the tuner replaces Ray's own CSV logger (Ray adds its default only when none is given).
    """

    def __init__(self) -> None:
        super().__init__()
        self._columns: dict[Any, list[str]] = {}

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_files:
            self._setup_trial(trial)
        flat = flatten_dict({k: v for k, v in result.items() if k != "config"}, delimiter="/")
        path = Path(trial.local_path, EXPR_PROGRESS_FILE)
        columns = self._columns.get(trial)
        if columns is None:
            columns = self._columns[trial] = _header(path) if self._trial_continue[trial] else []
        new = [k for k in flat if k not in columns]
        if new or self._trial_csv[trial] is None:
            columns += new
            self._rewrite(trial, path, columns)
        self._trial_csv[trial].writerow({k: flat.get(k, "") for k in columns})
        self._trial_files[trial].flush()

    def _rewrite(self, trial: Any, path: Path, columns: list[str]) -> None:
        """Write the file again with ``columns`` as its header (rows so far kept, new columns empty)."""
        self._trial_files[trial].close()
        rows: list[dict[str, str]] = []
        if path.is_file() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self._trial_files[trial] = path.open("a", newline="")
        self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], columns, extrasaction="ignore")
        self._trial_continue[trial] = True

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        super().log_trial_end(trial, failed=failed)
        self._columns.pop(trial, None)


def _header(path: Path) -> list[str]:
    """The header of an existing ``progress.csv`` (a restored trial appends to it)."""
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []
