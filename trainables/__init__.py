"""Ray Tune trainables: flat config dict -> typed stage configs -> stage runner -> tune.report.

Also the Optuna searcher that knows about early stopping, the live trial table, and the sweep
orchestration (:func:`run_sweep`, :func:`resume_sweep`, :func:`demo`). The CLI's entry points are
``wsss_tune.trainables.sweep.{sweep, resume, export, demo}`` (``sweep`` stays the module's name
here); the sweep's parts are ``planning`` (validation, the experiment record; no Ray), ``session``
(the Ray instance), ``tuner`` (the Tune ``Tuner``) and ``records`` (the results, rebuilt from disk).
This package imports Ray and Optuna; the library (``wsss_tune`` proper) never imports it.
"""

from .planning import SMOKE_OVERRIDES, SweepPlan, plan_sweep
from .records import collect_results
from .reporter import (
    FINAL_KEY,
    STAGE_STEP_KEY,
    STEP_KEY,
    TuneReporter,
    pack_work_checkpoint,
    restore_work_checkpoint,
    tune_result,
)
from .search import FidelitySearch, optuna_distributions, study_storage
from .sweep import demo, print_summary, resume_sweep, run_sweep
from .trainable import (
    SETTINGS_KEY,
    TRAINABLES,
    TrialSettings,
    affinity_trainable,
    deeplab_trainable,
    eps_trainable,
    pipeline_trainable,
    run_trial,
    split_trial_config,
    trainable_for,
    trial_pipeline_config,
)

__all__ = [
    "FINAL_KEY",
    "STEP_KEY",
    "STAGE_STEP_KEY",
    "SETTINGS_KEY",
    "TRAINABLES",
    "TuneReporter",
    "TrialSettings",
    "FidelitySearch",
    "SweepPlan",
    "SMOKE_OVERRIDES",
    "tune_result",
    "pack_work_checkpoint",
    "restore_work_checkpoint",
    "optuna_distributions",
    "study_storage",
    "split_trial_config",
    "trial_pipeline_config",
    "run_trial",
    "eps_trainable",
    "affinity_trainable",
    "deeplab_trainable",
    "pipeline_trainable",
    "trainable_for",
    "plan_sweep",
    "run_sweep",
    "resume_sweep",
    "collect_results",
    "print_summary",
    "demo",
]
