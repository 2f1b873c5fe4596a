"""Helpers the stage-runner tests share: a reporter that interrupts a run, and the log reports of a
history (for comparing an interrupted + resumed run with an uninterrupted one)."""

from __future__ import annotations

from typing import Any

from wsss_tune.reporting import RecordingReporter


class Interrupt(Exception):
    """Stands in for a killed process."""


class CrashingReporter(RecordingReporter):
    """Records reports and raises :class:`Interrupt` after recording the one at step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def report(self, metrics: Any, *, step: int, checkpoint_dir: str | None = None) -> None:
        super().report(metrics, step=step, checkpoint_dir=checkpoint_dir)
        if step == self.at:
            raise Interrupt(f"interrupted at step {step}")


def logged(history: list[dict[str, Any]], loss_key: str) -> list[dict[str, Any]]:
    """The log reports (those holding ``loss_key``), without the run-specific checkpoint folder."""
    return [{k: v for k, v in h.items() if k != "checkpoint_dir"} for h in history if loss_key in h]
