"""Log a sweep's report (the same tables and figures as the HTML report) to Weights & Biases.

One summary run per call, in the experiment's W&B project and group (the sweep logs one run per
trial in that group), with ``job_type="report"``: every table as a ``wandb.Table``, every figure as
a ``wandb.Image``, and the headline numbers in the run summary. ``online`` uploads as it goes (an
API key must be configured); ``offline`` writes an offline run that ``wandb sync <run folder>``
uploads later. The run folder goes under ``$WANDB_DIR`` when set, else under the experiment folder.

The W&B values both kinds of run log are built here, in one place: :func:`start_run` (``wandb.init``
with a clear error for a missing login), :func:`wandb_table`, :func:`wandb_image` and
:func:`iou_table` (a stage's per-class IoU, ``<prefix>_iou/<class>``). The trials' own runs
(:mod:`wsss_tune.trainables.wandb_logging`) use them too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsss_tune.analysis.results import ExperimentResult
from wsss_tune.analysis.tables import Table

__all__ = [
    "WANDB_LOG_MODES",
    "DEFAULT_PROJECT",
    "start_run",
    "wandb_table",
    "wandb_image",
    "class_ious",
    "iou_table",
    "report_summary",
    "log_report_to_wandb",
]

#: Modes :func:`log_report_to_wandb` accepts (``off`` is the caller's business: do not call it).
WANDB_LOG_MODES = ("online", "offline")
#: Project used when the experiment records none (the sweep's default project).
DEFAULT_PROJECT = "wsss-tune"


def start_run(mode: str, **init: Any) -> Any:
    """``wandb.init(**init)`` in ``mode`` (``online``, else ``offline``).

    Raises:
        ValueError: W&B could not start (for ``online``: no usable login), saying how to fix it.
    """
    import wandb

    try:
        return wandb.init(mode="online" if mode == "online" else "offline", **init)
    except wandb.errors.UsageError as exc:
        raise ValueError(f"W&B {mode} logging could not start ({exc}); for online logging set WANDB_API_KEY or "
                         "run `wandb login`, or log offline and upload with `wandb sync`") from None


def wandb_table(frame: Any) -> Any:
    """A ``wandb.Table`` of a pandas frame (its index dropped)."""
    import wandb

    return wandb.Table(dataframe=frame.reset_index(drop=True))


def wandb_image(image: Any, caption: str) -> Any:
    """A ``wandb.Image`` of PNG bytes, a PIL image or an ``(H, W, 3)`` uint8 array, as RGB."""
    import wandb
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as img:
            return wandb.Image(img.convert("RGB"), caption=caption)
    if isinstance(image, Image.Image):
        return wandb.Image(image.convert("RGB"), caption=caption)
    return wandb.Image(Image.fromarray(image).convert("RGB"), caption=caption)


def class_ious(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The per-class IoU (%) ``metrics`` holds for the stage whose metric prefix is ``prefix``
    (``<prefix>_iou/<class>``, as :func:`wsss_tune.stages.evaluate.miou_metrics` names them), by class
    name in the order reported; empty when it holds none."""
    key = f"{prefix}_iou/"
    return {k[len(key):]: float(v) for k, v in metrics.items()
            if k.startswith(key) and isinstance(v, int | float) and not isinstance(v, bool)}


def iou_table(ious: Mapping[str, float]) -> Any:
    """A ``wandb.Table`` with columns ``class`` and ``iou`` (%), one row per class."""
    import pandas as pd

    return wandb_table(pd.DataFrame([{"class": c, "iou": v} for c, v in ious.items()], columns=["class", "iou"]))


def report_summary(exp: ExperimentResult, tables: Mapping[str, Table]) -> dict[str, Any]:
    """Headline numbers for the run summary: counts, best and reference values, the stage table
    flattened as ``stages/<stage>/<column>``."""
    out: dict[str, Any] = {f"trials/{k}": v for k, v in exp.counts.items()}
    out["metric"] = exp.metric
    if exp.best is not None:
        out["best/trial_id"] = exp.best.trial_id
        out[f"best/{exp.metric}"] = exp.best.value(exp.metric)
        out[f"best/{exp.heldout_metric}"] = exp.best.value(exp.heldout_metric)
        out.update({f"best/params/{k}": v for k, v in exp.best.params.items()})
    if exp.reference is not None:
        out["reference/trial_id"] = exp.reference.trial_id
        out[f"reference/{exp.metric}"] = exp.reference.value(exp.metric)
        out[f"reference/{exp.heldout_metric}"] = exp.reference.value(exp.heldout_metric)
    if exp.gain_over_reference is not None:
        out["gain_over_reference"] = exp.gain_over_reference
    stages = tables.get("stages")
    if stages is not None:
        for row in stages.frame.to_dict("records"):
            for col, value in row.items():
                if col != "stage" and isinstance(value, int | float) and value == value:
                    out[f"stages/{row['stage']}/{col}"] = float(value)
    return {k: v for k, v in out.items() if v is not None}


def log_report_to_wandb(
    exp: ExperimentResult,
    tables: Mapping[str, Table],
    figures: Mapping[str, bytes],
    mode: str,
    *,
    project: str | None = None,
) -> Path:
    """Log ``tables`` and ``figures`` (PNG bytes) of ``exp`` to W&B as one report run.

    Args:
        exp: The experiment (its name is the run's group; its recorded project is used).
        tables: Tables by name (:func:`~wsss_tune.analysis.tables.experiment_tables`).
        figures: PNG bytes by name (:class:`~wsss_tune.analysis.report.Report` ``.figures``).
        mode: ``online`` or ``offline``.
        project: W&B project (default: the experiment's, else :data:`DEFAULT_PROJECT`).

    Returns:
        The run's local folder (for ``offline``, the argument to ``wandb sync``).

    Raises:
        ValueError: an unknown ``mode``, or ``online`` without a usable W&B login.
    """
    if mode not in WANDB_LOG_MODES:
        raise ValueError(f"W&B mode {mode!r}: expected one of {', '.join(WANDB_LOG_MODES)} (to skip W&B, do not log)")
    project = project or exp.record.wandb.project or DEFAULT_PROJECT
    folder = os.environ.get("WANDB_DIR") or str(exp.path)
    config = {"experiment": exp.name, "metric": exp.metric, "mode": exp.mode, "space": dict(exp.record.space) or None,
              "best_params": dict(exp.best.params) if exp.best else None}
    run = start_run(mode, project=project, group=exp.name, name=f"{exp.name}-report", job_type="report",
                    dir=folder, config=config)
    try:
        for name, table in tables.items():
            run.log({f"tables/{name}": wandb_table(table.frame)}, commit=False)
        for name, png in figures.items():
            run.log({f"figures/{name}": wandb_image(png, caption=name)}, commit=False)
        run.log({})
        run.summary.update(report_summary(exp, tables))
        where = Path(run.dir).parent
    finally:
        run.finish()
    return where
