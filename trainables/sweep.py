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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wsss_tune.analysis.results import (
    RUNS_DIR,
    SWEEP_FILE,
    ExperimentResult,
    ResultsError,
    heldout_metric_name,
    load_sweep,
    portable_sweep,
    rebuild_hint,
    space_to_dict,
    stage_miou_rows,
)
from wsss_tune.config import to_dict
from wsss_tune.spaces import SearchSpace, SpaceError, load_space, space_from_dict, validate
from wsss_tune.utils.io import atomic_write_json
from wsss_tune.validate import require_preflight

from .cluster import record_ray_session
from .records import collect_results, open_study
from .reporter import CACHE_REPAIRS_KEY
from .search import STUDY_FILE, ResumePlan, optuna_distributions, resume_plan
from .trainable import SETTINGS_KEY, TRAINABLES, TrialSettings, trainable_for

__all__ = [
    "DEFAULT_STORAGE",
    "SMOKE_OVERRIDES",
    "DEFAULT_WANDB_PROJECT",
    "WANDB_MODES",
    "PROGRESS_MODES",
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

#: Default experiment storage (relative to the working directory, made absolute).
DEFAULT_STORAGE = "experiments"
#: W&B project of the runs.
DEFAULT_WANDB_PROJECT = "wsss-tune"
WANDB_MODES = ("offline", "off", "online")
PROGRESS_MODES = ("rich", "ray", "off")
#: Seconds the W&B callback waits for a run's upload when the experiment ends (Ray's default is
#: 1,800; offline runs have nothing to upload).
WANDB_UPLOAD_TIMEOUT_S = 30
#: Width of the summary when it goes to a file rather than a terminal.
SUMMARY_WIDTH = 160
#: Folder of the shared artifact store inside the storage root (shared by all its experiments).
STORE_DIR = "artifacts"
#: Tune checkpoints kept per trial (the newest; training resumes from the store's work folders).
CHECKPOINTS_TO_KEEP = 1
#: Synthetic dataset the demo generates (DESIGN.md §4 prototype) and its default folder.
DEMO_PRESET = "default"
DEMO_DATA = "data/synth"
#: Fixed overrides that shrink the built-in ``synth`` config to seconds per trial on the ``tiny``
#: synthetic preset (a few iterations, small batches, tiny evaluation subsets, CPU): for smoke
#: sweeps, tests and the quick benchmark. The numbers they give mean nothing.
SMOKE_OVERRIDES: dict[str, Any] = {
    "eps.iterations": 4, "eps.batch_size": 4, "eps.eval_every": 2, "eps.eval_images": 4,
    "eps.checkpoint_every": 2, "eps.log_every": 2,
    "affinity.iterations": 2, "affinity.batch_size": 4, "affinity.checkpoint_every": 2,
    "deeplab.iterations": 4, "deeplab.batch_size": 4, "deeplab.eval_every": 2, "deeplab.eval_images": 4,
    "deeplab.checkpoint_every": 2, "deeplab.log_every": 2,
    "run.device": "cpu",
}
#: Failed trials the summary lists one by one (with their error line).
SHOWN_FAILURES = 10
#: Trials of the demo sweep: the reference plus five TPE (random start-up) samples, two at a time on
#: 2 CPU cores; ASHA stops the weaker ones at DeepLab step 100 of 300.
DEMO_TRIALS = 6


# --------------------------------------------------------------------------------------------------
# Planning (no Ray)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SweepPlan:
    """A validated sweep, ready to hand to Ray (:func:`plan_sweep`)."""

    space: SearchSpace
    exp_dir: Path
    name: str
    num_samples: int
    trainable: str
    settings: TrialSettings
    reference_point: Mapping[str, Any]
    sweep: Mapping[str, Any]


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    with contextlib.suppress(Exception):
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    return False


def _check_data(space: SearchSpace) -> None:
    from wsss_tune.data import VOCLayout

    cfg = space.base_config()
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} does not exist (search space {space.where}); pass "
                                "data=<dataset folder>, or generate the synthetic one with `wsss-tune data synth`")
    layout = VOCLayout.from_config(cfg.data)
    for split in sorted({cfg.data.train_split, cfg.data.mask_eval_split, cfg.data.val_split}):
        layout.split_ids(split)  # raises DataError naming the missing id list


def plan_sweep(
    space: SearchSpace | str | Path,
    *,
    data: str | Path | None = None,
    trials: int | None = None,
    gpus_per_trial: float = 0,
    cpus_per_trial: float = 1,
    storage: str | Path | None = None,
    name: str | None = None,
    wandb: str = "offline",
    wandb_project: str = DEFAULT_WANDB_PROJECT,
    seed: int = 0,
    max_failures: int = 0,
    max_concurrent: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    store: str | None = None,
    cache: bool = True,
    tune_checkpoints: bool = True,
) -> SweepPlan:
    """Validate a sweep without starting Ray (arguments as in :func:`run_sweep`).

    Raises:
        SpaceError: the space (with ``overrides``) is invalid. FileNotFoundError / DataError: the data
        root or an id list is missing. ValueError: a bad argument or an existing experiment folder.
    """
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    extra = dict(overrides or {})
    if data is not None:
        extra["data.root"] = str(Path(data).expanduser().resolve())
    if extra:
        space = dataclasses.replace(space, overrides={**space.overrides, **extra})
        validate(space)
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ValueError(f"trials={trials!r}: expected an integer >= 1")
    if not cpus_per_trial > 0:
        raise ValueError(f"cpus_per_trial={cpus_per_trial!r}: expected > 0")
    if gpus_per_trial < 0:
        raise ValueError(f"gpus_per_trial={gpus_per_trial!r}: expected >= 0 (fractions share a GPU)")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or max_concurrent < 1):
        raise ValueError(f"max_concurrent={max_concurrent!r}: expected None (as resources allow) or >= 1")
    if max_failures < -1:
        raise ValueError(f"max_failures={max_failures!r}: expected >= 0 retries per trial, or -1 for unlimited")
    if wandb not in WANDB_MODES:
        raise ValueError(f"wandb={wandb!r}: expected one of {', '.join(WANDB_MODES)}")
    if wandb == "online" and not _wandb_key_configured():
        raise ValueError("wandb='online' but no W&B API key is configured (set WANDB_API_KEY or run `wandb login`); "
                         "or log offline (wandb='offline') and upload later with `wandb sync`")
    storage_text = str(storage if storage is not None else DEFAULT_STORAGE)
    if "://" in storage_text:
        raise ValueError(f"storage={storage_text!r}: the experiment folder must be a local or mounted path (its "
                         "Optuna study is a SQLite file); on a cluster, use a folder every node mounts")
    optuna_distributions(space)  # categorical choices Optuna can hold
    _check_data(space)

    storage_root = Path(storage_text).expanduser().resolve()
    name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name={name!r}: expected a folder name (no '/', not starting with '.')")
    exp_dir = storage_root / name
    if (exp_dir / SWEEP_FILE).exists() or any(exp_dir.glob("experiment_state-*.json")):
        raise ValueError(f"{exp_dir} already holds an experiment; resume it (`wsss-tune resume {exp_dir}`) "
                         "or pick another name")

    cfg = space.base_config()
    if store is None and cache:
        store = cfg.run.artifact_store or str(storage_root / STORE_DIR)
    store_uri = "" if not cache else str(store)
    if store_uri and "://" not in store_uri:
        store_uri = str(Path(store_uri).expanduser().resolve())
    # Every file, weight and storage location the trials need, checked before Ray starts.
    require_preflight(cfg, stages=space.stages, store=store_uri or None, experiments=storage_root)
    trainable, _ = trainable_for(space.stages)
    f = space.fidelity
    settings = TrialSettings(
        base=to_dict(cfg),
        stages=space.stages,
        runs_dir=str(exp_dir / RUNS_DIR),
        store=store_uri,
        metric=space.metric,
        time_attr=f.time_attr if f else None,
        final_t=f.max_t if f else None,
        threads=max(1, int(cpus_per_trial)),
        tune_checkpoints=tune_checkpoints,
    )
    reference = space.reference_point()
    num_samples = trials if trials is not None else space.num_samples
    sweep_doc = {
        "name": name,
        "space_name": space.name,
        "space_source": str(space.source.resolve()) if space.source else None,
        "space": space_to_dict(space),
        "base_config": to_dict(cfg),
        "metric": space.metric,
        "mode": space.mode,
        "heldout_metric": heldout_metric_name(space.metric),
        "tune_split": space.tune_split,
        "heldout_split": space.heldout_split,
        "stages": list(space.stages),
        "trainable": trainable,
        "requested": num_samples,
        "reference_point": dict(reference),
        "store": store_uri or None,
        "storage": str(storage_root),
        "study": {"name": name, "storage": f"sqlite:///{exp_dir / STUDY_FILE}"},
        "wandb": {"mode": wandb, "project": wandb_project, "dir": str(exp_dir / "wandb") if wandb != "off" else None},
        "resources": {"cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial},
        "seed": seed,
        "max_failures": max_failures,
        "max_concurrent": max_concurrent,
        "settings": settings.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return SweepPlan(space=space, exp_dir=exp_dir, name=name, num_samples=num_samples, trainable=trainable,
                     settings=settings, reference_point=reference, sweep=sweep_doc)


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray_session(address: str | None, *, log_to_driver: bool, exp_dir: Path | None = None) -> Iterator[None]:
    """Use a running Ray instance, join ``address``, or start a local one (stopped at the end).

    The session is recorded in ``exp_dir`` so that ``wsss-tune ray-clean EXP`` can end exactly the
    processes this driver started if it is killed.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    if exp_dir is not None:
        record_ray_session(exp_dir)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _tune_env(wandb: str, progress: str) -> Iterator[None]:
    """Environment of the Tune driver during a sweep (restored afterwards).

    Intermediate results carry the searched metric only when a stage evaluates it, so Tune's
    "every result must hold the metric" check is off; ``WANDB_MODE=offline`` without an account;
    unless ``progress`` is ``ray``, Tune's console output is off (its newer output engine prints a
    header even at verbosity 0).
    All of these are read by the driver process (W&B's mode also goes to ``wandb.init`` directly, so
    it reaches the logging workers of a cluster joined by ``address``).
    """
    values = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
              # Every training checkpoint becomes a Tune checkpoint; the snapshot-frequency warning
              # that follows is expected.
              "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    if wandb == "offline":
        values["WANDB_MODE"] = "offline"
    if progress != "ray":
        values["RAY_AIR_NEW_OUTPUT"] = "0"
    if wandb != "off":
        values["WANDB_SILENT"] = "true"
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        raise ValueError(f"a trial asks for {cpus} CPU and {gpus} GPU, but the Ray cluster has "
                         f"{have.get('CPU', 0)} CPU and {have.get('GPU', 0)} GPU; no trial could ever start")


def _with_resources(trainable: str, resources: Mapping[str, float]) -> Any:
    from ray import tune

    return tune.with_resources(TRAINABLES[trainable], {"cpu": resources["cpus_per_trial"],
                                                      "gpu": resources["gpus_per_trial"]})


def _callbacks(plan: SweepPlan, *, progress: str) -> list[Any]:
    out: list[Any] = []
    w = plan.sweep["wandb"]
    if w["mode"] != "off":
        from ray.air.integrations.wandb import WandbLoggerCallback

        plan.exp_dir.mkdir(parents=True, exist_ok=True)
        out.append(WandbLoggerCallback(project=w["project"], group=plan.name, log_config=True,
                                       upload_timeout=WANDB_UPLOAD_TIMEOUT_S, mode=w["mode"],
                                       dir=str(plan.exp_dir)))
    if progress == "rich":
        from .progress import TrialTable

        out.append(TrialTable(metric=plan.space.metric, mode=plan.space.mode,
                              params=[p.path for p in plan.space.params], title=plan.name))
    return out


def _tuner(plan: SweepPlan, *, progress: str, seed: int, max_failures: int, max_concurrent: int | None,
           resume: ResumePlan | None = None) -> Any:
    from optuna.logging import WARNING, set_verbosity
    from optuna.samplers import TPESampler
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from .search import FidelitySearch, FullBudgetASHA, study_storage
    from .trainable import trial_dirname

    space = plan.space
    set_verbosity(WARNING)  # one line per trial from Optuna would fight the live table
    searcher = FidelitySearch(
        space=optuna_distributions(space), metric=space.metric, mode=space.mode,
        # A resumed search asked for the reference point already (it waits in the study's queue if
        # the driver stopped first).
        points_to_evaluate=None if resume is not None else [dict(plan.reference_point)],
        sampler=TPESampler(seed=seed), study_name=plan.name, storage=study_storage(str(plan.exp_dir / STUDY_FILE)),
        time_attr=space.fidelity.time_attr if space.fidelity else None, resume=resume,
    )
    f = space.fidelity
    scheduler = None
    if f is not None:
        scheduler = FullBudgetASHA(time_attr=f.time_attr, metric=space.metric, mode=space.mode, max_t=f.max_t,
                                   grace_period=f.grace_period, reduction_factor=f.reduction_factor)
    return Tuner(
        _with_resources(plan.trainable, plan.sweep["resources"]),
        param_space={SETTINGS_KEY: plan.settings.to_dict()},
        tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                               max_concurrent_trials=max_concurrent, reuse_actors=True,
                               trial_dirname_creator=trial_dirname),
        run_config=RunConfig(name=plan.exp_dir.name, storage_path=str(plan.exp_dir.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
                             callbacks=_callbacks(plan, progress=progress),
                             verbose=1 if progress == "ray" else 0),
    )


def run_sweep(
    space: SearchSpace | str | Path,
    *,
    data: str | Path | None = None,
    trials: int | None = None,
    gpus_per_trial: float = 0,
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
) -> ExperimentResult:
    """Run a search over ``space`` and write its results (see the module docstring).

    Args:
        space: A :class:`SearchSpace`, a built-in space name (``synth_rw``) or a YAML path.
        data: Dataset root (overrides ``data.root`` of the base config).
        trials: Number of trials (default: the space's ``num_samples``).
        gpus_per_trial / cpus_per_trial: Resources of one trial (fractions allowed).
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

    Returns:
        The written results (:func:`~wsss_tune.analysis.results.load_experiment` reads them again).
    """
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r}: expected one of {', '.join(PROGRESS_MODES)}")
    plan = plan_sweep(space, data=data, trials=trials, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                      storage=storage, name=name, wandb=wandb, wandb_project=wandb_project, seed=seed,
                      max_failures=max_failures, max_concurrent=max_concurrent, overrides=overrides, store=store,
                      cache=cache, tune_checkpoints=tune_checkpoints)
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    # Paths inside the folder are written relative to it: a copied or moved experiment is self-contained.
    atomic_write_json(plan.exp_dir / SWEEP_FILE, portable_sweep(plan.sweep, plan.exp_dir))
    with _tune_env(wandb, progress), _ray_session(address, log_to_driver=progress == "ray",
                                                          exp_dir=plan.exp_dir):
        if address is None:
            _check_resources(cpus_per_trial, gpus_per_trial)
        tuner = _tuner(plan, progress=progress, seed=seed, max_failures=max_failures, max_concurrent=max_concurrent)
        try:
            tuner.fit()
        finally:
            result = collect_results(plan.exp_dir)
    return result


def _resumed_plan(exp_dir: Path, doc: dict[str, Any], *, num_samples: int) -> SweepPlan:
    """The :class:`SweepPlan` of an experiment folder's ``sweep.json`` (paths resolved in ``exp_dir``)."""
    try:
        space = space_from_dict(doc["space"], source=doc.get("space_source"), name=doc.get("space_name"))
    except SpaceError as exc:
        raise SpaceError(exc.source, exc.key, f"{exc.message} (the search space recorded in {exp_dir / SWEEP_FILE})") \
            from None
    settings = TrialSettings.from_dict(doc["settings"])
    return SweepPlan(space=space, exp_dir=exp_dir, name=doc["name"], num_samples=num_samples,
                     trainable=doc["trainable"], settings=settings,
                     reference_point=doc.get("reference_point") or {}, sweep=doc)


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
    doc = load_sweep(exp_dir)
    try:
        study = open_study(doc)
    except ResultsError as exc:
        raise ResultsError(f"cannot resume {exp_dir}: {exc}. Nothing was changed; the trial folders still hold "
                           f"every result: {rebuild_hint(exp_dir)}") from None
    plan = _resumed_plan(exp_dir, doc, num_samples=0)
    _check_data(plan.space)
    todo = resume_plan(study, requested=int(doc["requested"]), rerun_failed=resume_errored or restart_errored)
    if todo.num_samples == 0:
        return collect_results(exp_dir, study=study)  # every requested trial has finished
    plan = dataclasses.replace(plan, num_samples=todo.num_samples)
    resources = doc["resources"]
    # A new sampler seed per resume: the seeded start-up samples must not repeat the first run's.
    seed = int(doc.get("seed") or 0) + len(study.trials)
    with _tune_env(doc["wandb"]["mode"], progress), _ray_session(address, log_to_driver=progress == "ray",
                                                                 exp_dir=exp_dir):
        if address is None:
            _check_resources(resources["cpus_per_trial"], resources["gpus_per_trial"])
        tuner = _tuner(plan, progress=progress, seed=seed, max_failures=int(doc.get("max_failures") or 0),
                       max_concurrent=doc.get("max_concurrent"), resume=todo)
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
    if result.best is not None:
        gain = result.gain_over_reference
        console.print(f"best {result.metric} = {_fmt(result.best.value(result.metric))} "
                      f"(held-out {result.heldout_metric} = {_fmt(result.best.value(result.heldout_metric))}); "
                      f"gain over the reference setting: {_fmt(gain)}")
        console.print(f"best values: {json.dumps(dict(result.best.params))}")
    failed = [t for t in result.trials if t.status == "failed"]
    for t in failed[:SHOWN_FAILURES]:
        console.print(f"[red]failed[/red] {t.trial_id}: {t.error}", markup=True, highlight=False)
    if len(failed) > SHOWN_FAILURES:
        console.print(f"... and {len(failed) - SHOWN_FAILURES} more failed trial(s) (the error column of trials.parquet)")
    repaired = {t.trial_id: int(t.metrics.get(CACHE_REPAIRS_KEY) or 0) for t in result.trials}
    if any(repaired.values()):
        console.print(f"cache repairs (damaged artifacts rebuilt): {sum(repaired.values())} in "
                      + ", ".join(f"{k} ({v})" for k, v in repaired.items() if v))
    for warning in result.info.get("warnings") or ():
        console.print(f"[yellow]warning[/yellow] {warning}", markup=True, highlight=False)
    console.print(f"results: {result.path}/trials.parquet, reports.parquet, experiment.json")
    console.print(f"optuna study: optuna-dashboard {result.info.get('study', {}).get('storage')}")
    w = result.info.get("wandb") or {}
    if w.get("mode") and w["mode"] != "off":
        console.print(f"W&B runs ({w['mode']}): {w.get('dir')}" + (" (upload: wandb sync <run folder>)"
                                                                   if w["mode"] == "offline" else ""))


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
    trials: int = DEMO_TRIALS,
    wandb: Literal["offline", "off", "online"] = "offline",
    seed: int = 0,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    overrides: Mapping[str, Any] | None = None,
    progress: Literal["rich", "ray", "off"] = "rich",
) -> ExperimentResult:
    """CLI ``wsss-tune demo``: a real sweep over the whole pipeline on the synthetic dataset.

    Generates the synthetic dataset (preset ``default``) in ``data`` if that folder is missing (an
    existing folder is used as it is), runs ``trials`` trials of the
    ``synth_pipeline`` space (reference setting first, artifact cache on, ``run.cam_baseline`` on),
    prints the CAM, EPS, refined and DeepLab mIoU (tune and held-out halves) of the reference and the
    best config, exports the best config and says where the W&B runs, parquet files and best config are.
    """
    from wsss_tune.data.synth import generate_synthetic_voc

    root = Path(data).expanduser().resolve()
    if not root.exists():
        generate_synthetic_voc(root, preset=DEMO_PRESET, seed=0)
    # The CAM baseline gives the table its first column (one more EPS training, shared by all trials).
    overrides = {"run.cam_baseline": True, **(overrides or {})}
    result = run_sweep("synth_pipeline", data=root, trials=trials, storage=storage, wandb=wandb, seed=seed,
                       cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, overrides=overrides,
                       progress=progress, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    print_summary(result)
    if result.best is not None:
        export(result.path, allow_incomplete=True)
    return result
