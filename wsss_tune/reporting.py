"""The reporter protocol through which stage runners publish metrics and checkpoints.

Stage runners never import Ray: the console/file reporter here serves the CLI and tests, and
``wsss_tune.trainables`` provides the Ray Tune implementation.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Reporter", "ConsoleReporter", "NullReporter", "RecordingReporter", "DivergedError", "check_finite"]


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite."""


def check_finite(name: str, value: float, *, step: int) -> None:
    """Raise :class:`DivergedError` naming the metric and step if ``value`` is NaN/inf."""
    if not math.isfinite(value):
        raise DivergedError(f"{name} became {value} at step {step}: training diverged "
                            "(lower the learning rate or check the data)")


@runtime_checkable
class Reporter(Protocol):
    """Receives metrics with a global step, optionally with a checkpoint folder."""

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None: ...


class NullReporter:
    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        return None


class RecordingReporter:
    """Keeps every report in memory (tests, and the pipeline's per-stage bookkeeping)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        self.history.append({"step": step, **metrics, **({"checkpoint_dir": checkpoint_dir} if checkpoint_dir else {})})


class ConsoleReporter(RecordingReporter):
    """Prints each report on one line and appends it to ``<out>/history.jsonl``."""

    def __init__(self, out_dir: str | Path | None = None, *, stream: Any = None) -> None:
        super().__init__()
        self.path = Path(out_dir) / "history.jsonl" if out_dir else None
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        super().report(metrics, step=step, checkpoint_dir=checkpoint_dir)
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        print(f"[{time.time() - self.t0:7.1f}s] step {step}: " + " ".join(parts), file=self.stream, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(self.history[-1], default=str) + "\n")
