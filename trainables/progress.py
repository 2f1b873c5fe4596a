"""A live table of a sweep's trials (rich), as a Ray Tune callback.

A caption line counts the search: ``done/total``, running, pruned, failed, the best completed value
so far and an ETA (the remaining trials at the rate trials have finished so far). One row per trial:
status (``pending``, ``running``, ``done``, ``pruned``, ``failed``), the stage it is in, its own step
there, the pipeline-wide fidelity, the last value of the searched metric and the searched
parameters; the best finished trial is marked. The table redraws at most every
:data:`REFRESH_SECONDS`; written to a file or a pipe, only its final state is printed, ending with a
newline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from .reporter import FINAL_KEY, STAGE_STEP_KEY

__all__ = ["REFRESH_SECONDS", "TrialTable", "format_duration"]

#: Seconds between redraws of the table.
REFRESH_SECONDS = 1.0
#: Rows shown: the newest trials (a terminal holds only so many lines).
_MAX_ROWS = 40
#: Width of the table when it goes to a file rather than a terminal (rich would use 80 columns).
_FILE_WIDTH = 160


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


class TrialTable(Callback):
    """Ray Tune callback drawing a rich live table of the trials.

    Args:
        metric: The searched metric. mode: ``max`` or ``min``.
        params: Searched parameter paths (columns).
        title: Table title (the experiment name).
        total: Trials the search will run (None: unknown, no ETA).
        console: Where to draw (default: stderr).
    """

    def __init__(self, *, metric: str, mode: str, params: Sequence[str], title: str, total: int | None = None,
                 console: Any = None) -> None:
        self.metric, self.mode, self.params, self.title = metric, mode, list(params), title
        self.total = total
        self._console = console
        self._rows: dict[str, dict[str, Any]] = {}
        self._live: Any = None
        self._last_draw = 0.0
        self._started: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; the live display stays behind.
        state = dict(self.__dict__)
        state["_live"] = state["_console"] = None
        return state

    # -- Tune hooks --------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        from rich.console import Console
        from rich.live import Live

        console = self._console
        if console is None:
            console = Console(stderr=True)
            if not console.is_terminal:
                console = Console(stderr=True, width=_FILE_WIDTH)
        self._console = console
        self._started = time.monotonic()
        self._live = Live(self._table(), console=console, auto_refresh=False, transient=False)
        self._live.start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial)["status"] = "running"
        self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self._row(trial)
        row["status"] = "running"
        for key in ("stage", STAGE_STEP_KEY, "fidelity"):
            if key in result:
                row[key] = result[key]
        if self.metric in result:
            row["metric"] = result[self.metric]
        if result.get(FINAL_KEY):
            row["final"] = True
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["status"] = "done" if row.get("final") else "pruned"
        self._draw(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._row(trial)["status"] = "failed"
        self._draw(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._draw(force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
            if not self._console.is_terminal:
                self._console.line()  # rich leaves a file's last line open; what follows starts on its own

    # -- drawing -----------------------------------------------------------------------------------

    def _row(self, trial: Any) -> dict[str, Any]:
        row = self._rows.setdefault(trial.trial_id, {"status": "pending"})
        row.setdefault("config", {p: trial.config.get(p) for p in self.params})
        return row

    def _best(self) -> str | None:
        done = [(tid, r["metric"]) for tid, r in self._rows.items()
                if r.get("final") and isinstance(r.get("metric"), int | float) and math.isfinite(r["metric"])]
        if not done:
            return None
        pick = max if self.mode == "max" else min
        return pick(done, key=lambda item: item[1])[0]

    def counts(self) -> dict[str, int]:
        """Trials per status (``pending`` includes those Ray has not created yet, when the total is known)."""
        out = {k: 0 for k in ("done", "running", "pruned", "failed", "pending")}
        for r in self._rows.values():
            out[r.get("status", "pending")] = out.get(r.get("status", "pending"), 0) + 1
        if self.total is not None:
            out["pending"] += max(0, self.total - len(self._rows))
        return out

    def caption(self, now: float | None = None) -> str:
        """``done/total``, running, pruned, failed, the best completed value and the ETA."""
        c = self.counts()
        finished = c["done"] + c["pruned"] + c["failed"]
        total = self.total if self.total is not None else len(self._rows)
        parts = [f"{finished}/{total} finished ({c['done']} done, {c['pruned']} pruned, {c['failed']} failed)",
                 f"{c['running']} running"]
        best = self._best()
        parts.append(f"best {_fmt(self._rows[best]['metric'])}" if best is not None else "best -")
        if self._started is not None:
            elapsed = (time.monotonic() if now is None else now) - self._started
            parts.append(f"elapsed {format_duration(elapsed)}")
            left = total - finished
            if finished and left > 0 and self.total is not None:
                parts.append(f"ETA {format_duration(elapsed / finished * left)}")
            elif left > 0:
                parts.append("ETA -")
        return " | ".join(parts)

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"{self.title}: {self.metric} ({self.mode}); step = the stage's own step",
                      caption=self.caption(), caption_justify="left", show_lines=False)
        for col in ("trial", "status", "stage", "step", "fidelity", "metric",
                    *(p.rsplit(".", 1)[-1] for p in self.params)):
            table.add_column(col, no_wrap=col == "trial", overflow="fold")
        best = self._best()
        rows = list(self._rows.items())[-_MAX_ROWS:]
        for tid, r in rows:
            mark = " *" if tid == best else ""
            table.add_row(tid + mark, r.get("status", ""), _fmt(r.get("stage")), _fmt(r.get(STAGE_STEP_KEY)),
                          _fmt(r.get("fidelity")), _fmt(r.get("metric")),
                          *(_fmt(r["config"].get(p)) for p in self.params))
        return table

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is None or (not force and now - self._last_draw < REFRESH_SECONDS):
            return
        self._last_draw = now
        self._live.update(self._table(), refresh=True)
