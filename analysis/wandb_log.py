"""Log a sweep's report (the same tables and figures as the HTML report) to Weights & Biases.

One summary run per call, in the experiment's W&B project and group (the sweep logs one run per
trial in that group), with ``job_type="report"``: every table as a ``wandb.Table``, every figure as
a ``wandb.Image``, and the headline numbers in the run summary. ``online`` uploads as it goes (an
API key must be configured); ``offline`` writes an offline run that ``wandb sync <run folder>``
uploads later. The run folder goes under ``$WANDB_DIR`` when set, else under the experiment folder.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsss_tune.analysis.results import ExperimentResult
from wsss_tune.analysis.tables import Table

__all__ = ["WANDB_LOG_MODES", "DEFAULT_PROJECT", "report_summary", "log_report_to_wandb"]

#: Modes :func:`log_report_to_wandb` accepts (``off`` is the caller's business: do not call it).
WANDB_LOG_MODES = ("online", "offline")
#: Project used when the experiment records none (the sweep's default project).
DEFAULT_PROJECT = "wsss-tune"


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
    import wandb
    from PIL import Image

    project = project or exp.record.wandb.project or DEFAULT_PROJECT
    folder = os.environ.get("WANDB_DIR") or str(exp.path)
    config = {"experiment": exp.name, "metric": exp.metric, "mode": exp.mode, "space": dict(exp.record.space) or None,
              "best_params": dict(exp.best.params) if exp.best else None}
    try:
        run = wandb.init(project=project, group=exp.name, name=f"{exp.name}-report", job_type="report",
                         mode="online" if mode == "online" else "offline", dir=folder, config=config)
    except wandb.errors.UsageError as exc:
        raise ValueError(f"W&B {mode} logging could not start ({exc}); for online logging set WANDB_API_KEY or "
                         "run `wandb login`, or log offline and upload with `wandb sync`") from None
    try:
        for name, table in tables.items():
            run.log({f"tables/{name}": wandb.Table(dataframe=table.frame.reset_index(drop=True))}, commit=False)
        for name, png in figures.items():
            with Image.open(io.BytesIO(png)) as img:
                run.log({f"figures/{name}": wandb.Image(img.convert("RGB"), caption=name)}, commit=False)
        run.log({})
        run.summary.update(report_summary(exp, tables))
        where = Path(run.dir).parent
    finally:
        run.finish()
    return where
