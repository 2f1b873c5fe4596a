"""Experiment results -> tables, parquet, plots, reports, exported best configs.

Modules: ``results`` (trials/reports parquet, the versioned experiment record of sweep.json and
experiment.json, :func:`load_experiment`), ``export``
(best config YAML), ``tables`` (every report table, computed once), ``figures`` (matplotlib figures
drawn from those tables), ``report`` (self-contained HTML + Markdown + CSV), ``wandb_log`` (the same
tables and figures to W&B), ``plan`` (a sweep's cost before launching it), ``compare`` (two
experiments side by side). The last six are imported by name (``wsss_tune.analysis.report``), not
here: they pull in pandas and matplotlib, which a trial worker importing ``results`` does not need.
"""

from .export import BEST_CONFIG_FILE, best_config, export_best
from .results import (
    EXPERIMENT_FILE,
    RECORD_VERSION,
    REPORTS_FILE,
    STATUSES,
    SWEEP_FILE,
    TRIALS_FILE,
    ExperimentRecord,
    ExperimentResult,
    TrialRecord,
    find_reference,
    heldout_metric_name,
    load_experiment,
    pick_best,
    space_to_dict,
    stage_miou_rows,
    write_experiment,
)

__all__ = [
    "BEST_CONFIG_FILE",
    "EXPERIMENT_FILE",
    "RECORD_VERSION",
    "REPORTS_FILE",
    "STATUSES",
    "SWEEP_FILE",
    "TRIALS_FILE",
    "ExperimentRecord",
    "ExperimentResult",
    "TrialRecord",
    "best_config",
    "export_best",
    "find_reference",
    "heldout_metric_name",
    "load_experiment",
    "pick_best",
    "space_to_dict",
    "stage_miou_rows",
    "write_experiment",
]
