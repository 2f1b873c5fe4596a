"""Sweeps: a search space -> Ray Tune + Optuna TPE (+ ASHA) over the pipeline -> experiment results.

:func:`run_sweep` validates everything before Ray starts (the space, the data root and its id lists,
the resources, the W&B mode), so a mistake costs no cluster time. Then:

* **Search.** Optuna TPE with a seeded sampler through :class:`~trainables.search.FidelitySearch`, its
  study in ``<experiment>/optuna.db`` (``optuna-dashboard sqlite:///<experiment>/optuna.db``). The
  space's reference point (the paper's or the built-in setting) is evaluated first, so every
  experiment reports its gain over that setting.
* **Early stopping.** ASHA on the space's ``fidelity`` (``time_attr``, ``max_t``, ``grace_period``,
  ``reduction_factor``) and metric, when the space has one; a trial that reached ``max_t`` is let
  finish (:class:`~trainables.search.FullBudgetASHA`). Stopped trials enter the study as PRUNED,
  not as finished with a truncated value.
* **Resources.** ``cpus_per_trial`` and ``gpus_per_trial`` (fractions allowed) per trial; Ray runs as
  many trials at once as the resources allow (``max_concurrent`` caps it); ``address`` joins an
  existing cluster. Trials share stage outputs through the artifact store (default
  ``<storage>/artifacts``, next to the experiments).
* **Logging.** W&B through Ray's ``WandbLoggerCallback``, one run per trial grouped by experiment,
  config and metrics logged, ``offline`` by default (runs under ``<experiment>/wandb``; ``wandb sync``
  uploads them), ``online`` to sync as it runs, ``off`` for none. A live rich table of the trials.
* **Results.** ``trials.parquet``, ``reports.parquet`` and ``experiment.json`` in the experiment folder
  (:mod:`wsss_tune.analysis.results`), written after the search, also when it was interrupted.

:func:`resume_sweep` continues an interrupted experiment (Ctrl-C, a killed driver) where it stopped,
searcher state included, and rewrites the results. :func:`demo` runs a small real sweep on the
synthetic dataset. :func:`sweep`, :func:`resume`, :func:`export` and :func:`demo` are the CLI's
entry points: they print what a user needs and return what they computed.

The parts live in their own modules: :mod:`~trainables.planning` (:class:`SweepPlan`,
:func:`plan_sweep`, the data checks and the experiment record; no Ray), :mod:`~trainables.session`
(the Ray instance and the driver's environment), :mod:`~trainables.tuner` (the ``Tuner``: searcher,
scheduler, resources, callbacks) and :mod:`~trainables.records` (the results, rebuilt from disk).
This module keeps the entry points and re-exports what callers import from it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from wsss_tune.analysis.results import (
    ExperimentResult,
    ReseedRecord,
    ResultsError,
    load_sweep,
    rebuild_hint,
    stage_miou_rows,
    write_sweep,
)
from wsss_tune.analysis.tables import compute_line, gain_lines, phases_table, seeds_table
from wsss_tune.spaces import SearchSpace
from wsss_tune.stages.pipeline import FINGERPRINT_KEY

from .phases import StageBudget, run_phases
from .planning import (
    DEFAULT_STORAGE,
    DEFAULT_WANDB_PROJECT,
    PROGRESS_MODES,
    SMOKE_OVERRIDES,
    STORE_DIR,
    WANDB_MODES,
    SweepPlan,
    check_data,
    cluster_gpus,
    plan_from_record,
    plan_sweep,
    settle_gpus,
)
from .records import collect_results, open_studies
from .reporter import CACHE_REPAIRS_KEY
from .search import resume_plan
from .session import check_resources, ray_session, tune_env
from .tuner import CHECKPOINTS_TO_KEEP, WANDB_UPLOAD_TIMEOUT_S, build_tuner

__all__ = [
    "DEFAULT_STORAGE",
    "SMOKE_OVERRIDES",
    "DEFAULT_WANDB_PROJECT",
    "WANDB_MODES",
    "PROGRESS_MODES",
    "STORE_DIR",
    "WANDB_UPLOAD_TIMEOUT_S",
    "CHECKPOINTS_TO_KEEP",
    "SUMMARY_WIDTH",
    "SHOWN_FAILURES",
    "SweepPlan",
    "plan_sweep",
    "run_sweep",
    "resume_sweep",
    "collect_results",
    "rebuild_results",
    "print_summary",
    "sweep",
    "resume",
    "export",
    "demo",
]

#: Width of the summary when it goes to a file rather than a terminal.
SUMMARY_WIDTH = 160
#: Synthetic dataset the demo generates (DESIGN.md §4 prototype) and its default folder.
DEMO_PRESET = "default"
DEMO_DATA = "data/synth"
#: Failed trials the summary lists one by one (with their error line).
SHOWN_FAILURES = 10
#: The demo's search: the reproduction-gap space, from the paper's setting, as a cascade with these
#: trials per stage, sized by what a trial costs on 2 cores (an EPS training ~22 s; a walk ~2 s once
#: EPS and AffinityNet are cached; a DeepLab trial ~7 s on average, ASHA stopping weak ones at step 100
#: of 300), so that each stage's search takes a similar share of the time; then re-runs of the top 2
#: and the reference with 2 more seeds each, and the hand-tuned target config run the same way.
DEMO_SPACE = "synth_gap"
DEMO_TARGET = "synth"
DEMO_BUDGETS = {"eps": 4, "affinity": 30, "deeplab": 12}
DEMO_RESEED = ReseedRecord(top_k=2, seeds=2)
#: Recorded oracles of the built-in spaces (package data next to the spaces).
ORACLE_FILE = "oracles.json"
#: Seed re-runs after a search unless told otherwise: the top 3 configs and the reference, 2 more seeds each.
DEFAULT_RESEED = ReseedRecord(top_k=3, seeds=2)


# --------------------------------------------------------------------------------------------------
# Running and resuming
# --------------------------------------------------------------------------------------------------


def run_sweep(
    space: SearchSpace | str | Path,
    *,
    data: str | Path | None = None,
    trials: int | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1,
    address: str | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    wandb: Literal["offline", "off", "online"] = "offline",
    wandb_project: str = DEFAULT_WANDB_PROJECT,
    seed: int = 0,
    max_failures: int = 0,
    max_concurrent: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    store: str | None = None,
    cache: bool = True,
    progress: Literal["rich", "ray", "off"] = "rich",
    tune_checkpoints: bool = True,
    mode: Literal["joint", "cascade"] = "joint",
    stage_budgets: Mapping[str, StageBudget] | None = None,
    reseed: ReseedRecord | None = DEFAULT_RESEED,
    compare: Sequence[str] = (),
    prebuild: bool = True,
) -> ExperimentResult:
    """Run a search over ``space`` and write its results (see the module docstring).

    Args:
        space: A :class:`SearchSpace`, a built-in space name (``synth_rw``) or a YAML path.
        data: Dataset root (overrides ``data.root`` of the base config).
        trials: Number of trials (default: the space's ``num_samples``).
        gpus_per_trial / cpus_per_trial: Resources of one trial (fractions allowed). GPUs None: 1 where
            the Ray cluster has GPUs, else 0 (:func:`~trainables.planning.trial_gpus`; printed at the start).
        address: Ray cluster to join (``auto`` or ``host:port``); None starts a local instance (or uses
            one already running in this process).
        storage: Folder holding experiments (default ``./experiments``).
        name: Experiment folder name (default ``<space>-<date>-<time>``).
        wandb: ``offline`` (default), ``online`` (needs an API key) or ``off``.
        seed: Seed of the TPE sampler.
        max_failures: Retries of a failing trial before it counts as failed (-1: unlimited).
        max_concurrent: At most this many trials at once (default: as the resources allow).
        overrides: Extra fixed config values (``{"eps.iterations": 50}``), validated with the space.
        store: Artifact store URI shared by the trials (default: the base config's
            ``run.artifact_store``, else ``<storage>/artifacts``).
        cache: False gives every trial a private store (everything recomputed; for comparisons).
        progress: ``rich`` live table, ``ray`` Tune's own output, ``off``.
        tune_checkpoints: Attach training checkpoints to Tune results (needed to resume a trial on
            another host when the store is remote; costs a copy per checkpoint).
        mode: ``joint`` (one search over every parameter) or ``cascade`` (one search per stage, each
            stage's best frozen and carried downstream; :mod:`trainables.phases`).
        stage_budgets: A cascade's budget per stage (trials or training steps); stages not named get
            ``trials``.
        reseed: Seed re-runs after the search (default: the top 3 and the reference with 2 more seeds
            each; None: none). The winner is then chosen by mean tune metric.
        compare: Named configs (built-in or YAML) also run in the seed re-runs, for comparison only.
        prebuild: Build the artifacts every trial of a search shares (no searched parameter keys them)
            first, in one Ray task with one trial's resources, so that trials do not hold CPUs or GPUs
            while they wait for them (:mod:`~trainables.prebuild`).

    Returns:
        The written results (:func:`~wsss_tune.analysis.results.load_experiment` reads them again).
    """
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r}: expected one of {', '.join(PROGRESS_MODES)}")
    plan = plan_sweep(space, data=data, trials=trials, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                      storage=storage, name=name, wandb=wandb, wandb_project=wandb_project, seed=seed,
                      max_failures=max_failures, max_concurrent=max_concurrent, overrides=overrides, store=store,
                      cache=cache, tune_checkpoints=tune_checkpoints, mode=mode, stage_budgets=stage_budgets,
                      reseed=reseed, compare=tuple(compare))
    plan = dataclasses.replace(plan, prebuild=prebuild)
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    # Paths inside the folder are written relative to it: a copied or moved experiment is self-contained.
    write_sweep(plan.exp_dir, plan.record)
    with tune_env(wandb, progress), ray_session(address, log_to_driver=progress == "ray", exp_dir=plan.exp_dir):
        plan = settle_gpus(plan, cluster_gpus())  # a default share follows the cluster Ray runs
        print(plan.resources_line, flush=True)
        if address is None:
            check_resources(cpus_per_trial, plan.record.resources.gpus_per_trial)
        try:
            if plan.record.phases:
                run_phases(plan, progress=progress, seed=seed, max_failures=max_failures,
                           max_concurrent=max_concurrent)
            else:
                build_tuner(plan, progress=progress, seed=seed, max_failures=max_failures,
                            max_concurrent=max_concurrent).fit()
        finally:
            result = collect_results(plan.exp_dir)
    return result


def resume_sweep(
    exp_dir: str | Path,
    *,
    resume_errored: bool = False,
    restart_errored: bool = False,
    address: str | None = None,
    progress: Literal["rich", "ray", "off"] = "rich",
) -> ExperimentResult:
    """Continue an interrupted experiment where it stopped, then rewrite its results.

    Nothing is unpickled from the folder (Ray's ``tuner.pkl`` and searcher pickles are ignored): the
    searcher is rebuilt from the Optuna study, which holds every trial. Finished trials stay as they
    are; trials that were running continue under new Ray trial ids with the same values (the same
    Optuna trial), their training resuming from the artifact store's work folders; the rest are
    asked of TPE as usual. Every path comes from the folder itself, so a copied or moved experiment
    resumes on its own.

    Args:
        exp_dir: The experiment folder.
        resume_errored / restart_errored: Also run the failed trials again, with the same values (as
            new Optuna trials; their training resumes from the store's work folders in both cases).
        address / progress: As in :func:`run_sweep`.

    Raises:
        FileNotFoundError: ``exp_dir`` is not an experiment folder. ResultsError: its sweep record or
        study is unreadable (checked before anything is written; nothing is changed).
        SpaceError / FileNotFoundError: its search space or data are gone.
    """
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r}: expected one of {', '.join(PROGRESS_MODES)}")
    exp_dir = Path(exp_dir).expanduser().resolve()
    record = load_sweep(exp_dir)
    try:
        studies = open_studies(record)
    except ResultsError as exc:
        raise ResultsError(f"cannot resume {exp_dir}: {exc}. Nothing was changed; the trial folders still hold "
                           f"every result: {rebuild_hint(exp_dir)}") from None
    plan = plan_from_record(exp_dir, record, num_samples=0)
    check_data(plan.space)
    if record.phases:
        if all(p.done for p in record.phases):
            return collect_results(exp_dir)
        asked = sum(len(s.trials) for s in studies.values())
        with tune_env(record.wandb.mode, progress), ray_session(address, log_to_driver=progress == "ray",
                                                                exp_dir=exp_dir):
            if address is None:
                check_resources(record.resources.cpus_per_trial, record.resources.gpus_per_trial)
            try:
                run_phases(plan, progress=progress, seed=record.seed + asked,
                           max_failures=record.max_failures, max_concurrent=record.max_concurrent,
                           rerun_failed=resume_errored or restart_errored)
            finally:
                result = collect_results(exp_dir)
        return result
    study = studies[""]
    todo = resume_plan(study, requested=record.requested, rerun_failed=resume_errored or restart_errored)
    if todo.num_samples == 0:
        return collect_results(exp_dir, study=study)  # every requested trial has finished
    plan = dataclasses.replace(plan, num_samples=todo.num_samples)
    resources = record.resources
    # A new sampler seed per resume: the seeded start-up samples must not repeat the first run's.
    seed = record.seed + len(study.trials)
    with tune_env(record.wandb.mode, progress), ray_session(address, log_to_driver=progress == "ray",
                                                            exp_dir=exp_dir):
        if address is None:
            check_resources(resources.cpus_per_trial, resources.gpus_per_trial)
        tuner = build_tuner(plan, progress=progress, seed=seed, max_failures=record.max_failures,
                            max_concurrent=record.max_concurrent, resume=todo)
        try:
            tuner.fit()
        finally:
            result = collect_results(exp_dir)
    return result


def rebuild_results(exp_dir: str | Path) -> ExperimentResult:
    """Regenerate ``trials.parquet``, ``reports.parquet`` and ``experiment.json`` from what is on disk
    (the study, the trial folders, Ray's state as JSON; see :mod:`trainables.records`)."""
    return collect_results(exp_dir)


# --------------------------------------------------------------------------------------------------
# CLI entry points
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def _print_table(console: Any, table: Any, columns: Sequence[str]) -> None:
    """A rich table of ``table``'s ``columns`` (nothing when it has no rows)."""
    from rich.table import Table

    if table.empty:
        return
    out = Table(title=table.title)
    for c in columns:
        out.add_column(c, justify="left" if c in ("search", "metric", "config", "budget", "frozen_next") else "right")
    for row in table.frame[list(columns)].to_dict("records"):
        out.add_row(*(_fmt(None if _is_nan(row[c]) else row[c]) for c in columns))
    console.print(out)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def print_summary(result: ExperimentResult, *, console: Any = None) -> None:
    """Print the per-stage mIoU of the reference and the best config, counts and where things are."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
            console = Console(width=SUMMARY_WIDTH)
    rows = stage_miou_rows(result)
    if rows:
        table = Table(title=f"{result.name}: mask quality (mIoU, tune / held-out halves)")
        cols = [c for c in rows[0] if c not in ("config", "trial")]
        for c in ("config", "trial", *cols):
            table.add_column(c, justify="left" if c in ("config", "trial") else "right")
        for r in rows:
            table.add_row(r["config"], r["trial"], *(_fmt(r.get(c)) for c in cols))
        console.print(table)
    c = result.counts
    console.print(f"trials: {c.get('total', 0)} of {result.requested} ({c.get('completed', 0)} completed, "
                  f"{c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed, {c.get('incomplete', 0)} incomplete)")
    console.print(compute_line(result), highlight=False)
    _print_table(console, phases_table(result), ("search", "metric", "trials", "completed", "pruned", "failed",
                                                  "budget", "best", "frozen_next"))
    seeds = seeds_table(result)
    _print_table(console, seeds, ("config", "winner", "runs", "seeds", "tune_mean", "tune_std", "heldout_mean",
                                  "heldout_std"))
    if result.best is not None:
        console.print(f"best {result.metric} = {_fmt(result.best.value(result.metric))} "
                      f"(held-out {result.heldout_metric} = {_fmt(result.best.value(result.heldout_metric))})"
                      + (" - chosen by the mean over seeds" if result.seeds else ""))
        console.print(f"best values: {json.dumps(dict(result.best.params))}")
    for line in gain_lines(result):
        console.print(line, highlight=False)
    failed = [t for t in result.trials if t.status == "failed"]
    for t in failed[:SHOWN_FAILURES]:
        console.print(f"[red]failed[/red] {t.trial_id}: {t.error}", markup=True, highlight=False)
    if len(failed) > SHOWN_FAILURES:
        console.print(f"... and {len(failed) - SHOWN_FAILURES} more failed trial(s) (the error column of trials.parquet)")
    repaired = {t.trial_id: int(t.metrics.get(CACHE_REPAIRS_KEY) or 0) for t in result.trials}
    if any(repaired.values()):
        console.print(f"cache repairs (damaged artifacts rebuilt): {sum(repaired.values())} in "
                      + ", ".join(f"{k} ({v})" for k, v in repaired.items() if v))
    for warning in result.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}", markup=True, highlight=False)
    console.print(f"results: {result.path}/trials.parquet, reports.parquet, experiment.json")
    study = result.record.study
    console.print(f"optuna study: optuna-dashboard {study.storage if study is not None else None}")
    w = result.record.wandb
    if w.mode and w.mode != "off":
        console.print(f"W&B runs ({w.mode}): {w.dir}" + (" (upload: wandb sync <run folder>)"
                                                         if w.mode == "offline" else ""))


def sweep(space: str, **kwargs: Any) -> ExperimentResult:
    """CLI ``wsss-tune sweep SPACE``: :func:`run_sweep`, then a summary (kwargs as in :func:`run_sweep`)."""
    result = run_sweep(space, **kwargs)
    print_summary(result)
    return result


def resume(exp_dir: str | Path, **kwargs: Any) -> ExperimentResult:
    """CLI ``wsss-tune resume EXP_DIR``: :func:`resume_sweep`, then a summary."""
    result = resume_sweep(exp_dir, **kwargs)
    print_summary(result)
    return result


def export(exp_dir: str | Path, out: str | Path | None = None, allow_incomplete: bool = False) -> Path:
    """CLI ``wsss-tune export EXP_DIR``: write the best config YAML and print where it is."""
    from wsss_tune.analysis.export import export_best

    path = export_best(exp_dir, out=out, allow_incomplete=allow_incomplete)
    print(f"best config: {path}")
    return path


def demo(
    *,
    data: str | Path = DEMO_DATA,
    storage: str | Path | None = None,
    trials: int | None = None,
    wandb: Literal["offline", "off", "online"] = "offline",
    seed: int = 0,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    overrides: Mapping[str, Any] | None = None,
    progress: Literal["rich", "ray", "off"] = "rich",
    reseed: ReseedRecord | None = None,
) -> ExperimentResult:
    """CLI ``wsss-tune demo``: the reproduction-gap search on the synthetic dataset.

    Generates the synthetic dataset (preset ``default``) in ``data`` if that folder is missing (an
    existing folder is used as it is) and runs the ``synth_gap`` space as a cascade from the paper's
    setting (``synth_paper``): EPS, then the walk, then DeepLab (:data:`DEMO_BUDGETS` trials each, or
    ``trials`` each), then the seed re-runs of the best configs, the paper setting and the hand-tuned
    ``synth`` config (:data:`DEMO_RESEED`). Prints the summary, then the gap table: paper setting ->
    searched -> hand-tuned, tune and held-out, mean +- std over seeds, and how much of the gap the
    search closed (against the hand-tuned config and against the recorded oracle, :func:`oracle`).
    Exports the winner's config.
    """
    from wsss_tune.data.synth import generate_synthetic_voc

    root = Path(data).expanduser().resolve()
    if not root.exists():
        generate_synthetic_voc(root, preset=DEMO_PRESET, seed=0)
    budgets = {stage: StageBudget(trials=trials if trials is not None else n) for stage, n in DEMO_BUDGETS.items()}
    result = run_sweep(DEMO_SPACE, data=root, storage=storage, wandb=wandb, seed=seed, cpus_per_trial=cpus_per_trial,
                       gpus_per_trial=gpus_per_trial, overrides=overrides, progress=progress, mode="cascade",
                       stage_budgets=budgets, reseed=reseed or DEMO_RESEED, compare=(DEMO_TARGET,),
                       name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    print_summary(result)
    print_gap(result, target=DEMO_TARGET, oracle=oracle(DEMO_SPACE))
    if result.best is not None:
        export(result.path, allow_incomplete=True)
    return result


def oracle(space: str) -> dict[str, Any] | None:
    """The recorded oracle of a built-in space (:data:`ORACLE_FILE`: the best reachable values found
    once by a large-budget search, ``python -m benchmarks gap_oracle``), or None if none is recorded."""
    from importlib import resources

    file = resources.files("wsss_tune.search_spaces") / ORACLE_FILE
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = doc.get(space) if isinstance(doc, dict) else None
    return entry if isinstance(entry, dict) else None


def print_gap(result: ExperimentResult, *, target: str, oracle: Mapping[str, Any] | None = None,
              console: Any = None) -> None:
    """The gap table (paper setting -> searched -> ``target``, mean +- std over seeds) and the share
    of the gap closed on the held-out half, against ``target`` and against the recorded ``oracle``."""
    from rich.console import Console

    from wsss_tune.analysis.tables import gap_closed, gap_table

    console = console or Console(width=SUMMARY_WIDTH)
    table = gap_table(result, target)
    _print_table(console, table, ("config", "runs", "tune_mean", "tune_std", "heldout_mean", "heldout_std"))
    rows = {r.label: r for r in result.seeds}
    winner = next((r for r in result.seeds if r.winner), None)
    ref, tgt = rows.get("reference"), rows.get(target)
    held = gap_closed(winner.heldout_mean if winner else None, ref.heldout_mean if ref else None,
                      tgt.heldout_mean if tgt else None)
    console.print(f"gap closed: {_percent(held)} (paper -> hand-tuned {target}, held-out)", highlight=False)
    if oracle is None:
        return
    recorded, mine = oracle.get(FINGERPRINT_KEY), result.best.metrics.get(FINGERPRINT_KEY) if result.best else None
    if recorded and mine and recorded != mine:
        console.print(f"recorded oracle {_fmt(oracle.get(result.heldout_metric))} not compared: it was found on "
                      f"another dataset ({oracle.get('data', 'data fingerprint ' + str(recorded))}; this data's "
                      f"fingerprint is {mine})", highlight=False)
    else:
        value = oracle.get(result.heldout_metric)
        share = gap_closed(winner.heldout_mean if winner else None, ref.heldout_mean if ref else None,
                           value if isinstance(value, int | float) else None)
        console.print(f"gap closed: {_percent(share)} (paper -> recorded oracle {_fmt(value)}, held-out; "
                      f"{oracle.get('source', 'python -m benchmarks gap_oracle')})", highlight=False)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"
