"""Export an experiment's best configuration as a full config YAML that ``wsss-tune run`` accepts.

The file is the fully resolved config the best trial ran: the sweep's base config (with the space's
overrides and the data root) plus the trial's searched values, with ``run.artifact_store`` pointing
at the sweep's store. Running it again computes the same artifact keys, so the store serves the
trial's results at once; with an empty store it recomputes them and gives the same numbers. A header
comment names the experiment, the trial, its tune and held-out metric and the command to run.
"""

from __future__ import annotations

from pathlib import Path

from wsss_tune.config import PipelineConfig, apply_overrides, dump_yaml, from_dict
from wsss_tune.utils.io import atomic_write_text

from .results import ExperimentResult, load_experiment

__all__ = ["BEST_CONFIG_FILE", "best_config", "export_best"]

#: Default output file in the experiment folder.
BEST_CONFIG_FILE = "best_config.yaml"


def best_config(result: ExperimentResult) -> PipelineConfig:
    """The resolved config of ``result``'s best trial (see the module docstring).

    Raises:
        ValueError: the experiment has no completed trial with a finite metric.
    """
    best = result.best
    if best is None:
        raise ValueError(f"{result.path}: no completed trial with a finite {result.metric}; nothing to export "
                         f"({result.describe_incomplete()})")
    record = result.record
    if not record.base_config:
        raise ValueError(f"{result.path}: the experiment record holds no base config; nothing to export")
    cfg = from_dict(record.base_config, source=f"{result.path} base_config")
    overrides = dict(best.params)
    if record.store:
        overrides["run.artifact_store"] = record.store
    return apply_overrides(cfg, {**overrides, "name": f"{result.name}-best"})


def export_best(exp_dir: str | Path, out: str | Path | None = None, allow_incomplete: bool = False) -> Path:
    """Write the best trial's config of the experiment in ``exp_dir`` as YAML; returns the file.

    Args:
        exp_dir: The experiment folder.
        out: Output YAML (default ``<exp_dir>/best_config.yaml``).
        allow_incomplete: Export even if some trials failed or never ran (the best is then the best
            of those that finished).

    Raises:
        ValueError: the experiment did not finish all its trials (and ``allow_incomplete`` is false),
            or has no completed trial.
        FileNotFoundError: ``exp_dir`` holds no written results.
    """
    result = load_experiment(exp_dir)
    if not result.complete and not allow_incomplete:
        raise ValueError(f"{result.path}: experiment {result.name!r} is incomplete: {result.describe_incomplete()}. "
                         f"Resume it (`wsss-tune resume {result.path}`) or export the best finished trial "
                         "anyway with allow_incomplete=True (--allow-incomplete)")
    cfg = best_config(result)
    best = result.best
    assert best is not None
    out_path = Path(out).expanduser().resolve() if out is not None else result.path / BEST_CONFIG_FILE
    stages = ",".join(result.record.stages)
    tune, held = best.value(result.metric), best.value(result.heldout_metric)
    header = [
        f"# Best configuration of experiment {result.name!r} (trial {best.trial_id}),",
        f"# chosen by {result.metric} = {tune!r}; held-out {result.heldout_metric} = {held!r}.",
        f"# Searched values: {', '.join(f'{k}={v!r}' for k, v in best.params.items())}.",
        f"# Run it: wsss-tune run {out_path} --stages {stages or 'all'}",
    ]
    atomic_write_text(out_path, "\n".join(header) + "\n" + dump_yaml(cfg))
    return out_path
