"""Planning a sweep: every check that needs no Ray session, and the experiment record it writes.

:func:`plan_sweep` validates a sweep (the space with its overrides, the arguments, the data root and its
id lists, the files and weights the trials need, the experiment folder) and returns a
:class:`SweepPlan` holding the :class:`~wsss_tune.analysis.results.ExperimentRecord` that becomes
``sweep.json``. :func:`plan_from_record` makes the plan of an existing experiment again from that
record (for ``resume``). Nothing here starts Ray.

GPUs per trial: given none, a sweep takes one GPU per trial where the Ray cluster has GPUs and none
where it has none (:func:`~wsss_tune.utils.runtime.default_gpus_per_trial`), counted before Ray starts
from the GPUs a local instance would register (:func:`cluster_gpus`) and settled on the cluster the
sweep runs on once Ray is up (:func:`settle_gpus`); :attr:`SweepPlan.resources_line` says what it chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_tune.analysis.results import (
    RUNS_DIR,
    SWEEP_FILE,
    ExperimentRecord,
    ReseedRecord,
    ResourcesRecord,
    StudyRecord,
    WandbRecord,
    space_to_dict,
    write_sweep,
)
from wsss_tune.config import to_dict
from wsss_tune.spaces import SearchSpace, SpaceError, load_space, space_from_dict, validate
from wsss_tune.validate import require_preflight

from .search import STUDY_FILE, optuna_distributions
from .trainable import TrialSettings, trainable_for

__all__ = [
    "DEFAULT_STORAGE",
    "DEFAULT_WANDB_PROJECT",
    "WANDB_MODES",
    "PROGRESS_MODES",
    "STORE_DIR",
    "SMOKE_OVERRIDES",
    "SweepPlan",
    "check_data",
    "cluster_gpus",
    "trial_gpus",
    "settle_gpus",
    "plan_sweep",
    "plan_from_record",
]

#: Default experiment storage (relative to the working directory, made absolute).
DEFAULT_STORAGE = "experiments"
#: W&B project of the runs.
DEFAULT_WANDB_PROJECT = "wsss-tune"
WANDB_MODES = ("offline", "off", "online")
PROGRESS_MODES = ("rich", "ray", "off")
#: Folder of the shared artifact store inside the storage root (shared by all its experiments).
STORE_DIR = "artifacts"
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
    #: What ``sweep.json`` records (paths absolute; written relative by ``write_sweep``).
    record: ExperimentRecord
    #: Build the artifacts every trial shares before the trials start (``trainables.prebuild``).
    prebuild: bool = True
    #: The GPUs per trial were not given: they follow the Ray cluster's GPUs (:func:`settle_gpus`).
    gpus_default: bool = False
    #: One line saying what each trial gets and why, printed when the sweep starts.
    resources_line: str = ""


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    with contextlib.suppress(Exception):
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    return False


def cluster_gpus() -> float:
    """GPUs of the Ray cluster a sweep uses: the Ray instance running in this process, else those a
    local instance would register (the GPUs torch sees: both honour ``CUDA_VISIBLE_DEVICES``)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0))
    from wsss_tune.utils.runtime import gpu_inventory

    return float(len(gpu_inventory()))


def trial_gpus(gpus_per_trial: float | None, *, cpus_per_trial: float, cluster: float,
               device: str = "auto") -> tuple[float, str]:
    """The GPUs of one trial and the line saying so.

    ``gpus_per_trial`` None takes :func:`~wsss_tune.utils.runtime.default_gpus_per_trial` of the
    cluster's ``cluster`` GPUs and ``run.device`` (``device``): 1 where there are GPUs, 0 (the CPU)
    where there are none or ``run.device`` is ``cpu``.
    """
    from wsss_tune.utils.runtime import default_gpus_per_trial

    have = f"the Ray cluster has {cluster:g} GPU(s)"
    if gpus_per_trial is None:
        gpus = default_gpus_per_trial(cluster, device)
        why = "run.device is cpu" if device == "cpu" else have
        why = f"default, {why}; --gpus-per-trial sets another share" + (", 0 trains on the CPU" if gpus else "")
    else:
        gpus = float(gpus_per_trial)
        why = f"--gpus-per-trial {gpus:g}; {have}"
    cpus = f"{cpus_per_trial:g} CPU"
    if gpus == 0:
        return gpus, f"resources: each trial gets {cpus} and no GPU, and trains on the CPU ({why})"
    if gpus < 1:
        share = (f"{gpus:g} GPU: up to {math.floor(1 / gpus + 1e-9)} trials share a card, each capped at {gpus:.0%} of its "
                 "memory")
    else:
        share = f"{gpus:g} GPU" + (" (one trial per GPU)" if gpus == 1 else "")
    return gpus, f"resources: each trial gets {share} and {cpus} ({why})"


def settle_gpus(plan: SweepPlan, cluster: float) -> SweepPlan:
    """``plan`` with its default GPUs per trial chosen for the Ray cluster the sweep runs on (``cluster``
    GPUs), ``sweep.json`` rewritten when that changed it; a plan with a given share stays as it is."""
    if not plan.gpus_default:
        return plan
    res = plan.record.resources
    device = str((plan.settings.base.get("run") or {}).get("device", "auto"))
    gpus, line = trial_gpus(None, cpus_per_trial=res.cpus_per_trial, cluster=cluster, device=device)
    if gpus == res.gpus_per_trial:
        return dataclasses.replace(plan, resources_line=line)
    record = dataclasses.replace(plan.record, resources=dataclasses.replace(res, gpus_per_trial=gpus))
    write_sweep(plan.exp_dir, record)
    return dataclasses.replace(plan, record=record, resources_line=line)


def check_data(space: SearchSpace) -> None:
    """The space's data root exists and holds the id lists of the splits its base config reads.

    Raises:
        FileNotFoundError: no data root (with how to make one). DataError: an id list is missing.
    """
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
    gpus_per_trial: float | None = None,
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
    mode: str = "joint",
    stage_budgets: Mapping[str, Any] | None = None,
    reseed: ReseedRecord | None = None,
    compare: tuple[str, ...] = (),
    cluster: float | None = None,
) -> SweepPlan:
    """Validate a sweep without starting Ray (arguments as in :func:`~trainables.sweep.run_sweep`).

    ``gpus_per_trial`` None: :func:`trial_gpus` of ``cluster`` GPUs (default :func:`cluster_gpus`).

    Raises:
        SpaceError: the space (with ``overrides``) is invalid. FileNotFoundError / DataError: the data
        root or an id list is missing. ValueError: a bad argument or an existing experiment folder.
    """
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    if reseed is not None and (reseed.top_k < 0 or reseed.seeds < 0):
        raise ValueError(f"seed re-runs top_k={reseed.top_k}, seeds={reseed.seeds}: expected >= 0")
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
    if gpus_per_trial is not None and not gpus_per_trial >= 0:
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
    check_data(space)

    storage_root = Path(storage_text).expanduser().resolve()
    name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name={name!r}: expected a folder name (no '/', not starting with '.')")
    exp_dir = storage_root / name
    if (exp_dir / SWEEP_FILE).exists() or any(exp_dir.glob("experiment_state-*.json")):
        raise ValueError(f"{exp_dir} already holds an experiment; resume it (`wsss-tune resume {exp_dir}`) "
                         "or pick another name")

    cfg = space.base_config()
    gpus, resources_line = trial_gpus(gpus_per_trial, cpus_per_trial=cpus_per_trial, device=cfg.run.device,
                                      cluster=cluster_gpus() if cluster is None else cluster)
    if gpus == 0 and cfg.run.device == "cuda":
        raise ValueError(f"run.device is 'cuda' but trials get no GPU ({resources_line}); pass --gpus-per-trial "
                         "(1, or a fraction such as 0.5) or set run.device to auto")
    if store is None and cache:
        store = cfg.run.artifact_store or str(storage_root / STORE_DIR)
    store_uri = "" if not cache else str(store)
    if store_uri and "://" not in store_uri:
        store_uri = str(Path(store_uri).expanduser().resolve())
    # Every file, weight and storage location the trials need, checked before Ray starts.
    require_preflight(cfg, stages=space.stages, store=store_uri or None, experiments=storage_root,
                      gpus_per_trial=gpus, cpus_per_trial=cpus_per_trial)
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
    from .phases import compare_configs, experiment_phases

    if reseed is not None and compare:
        reseed = dataclasses.replace(reseed, configs=compare_configs(space, compare))
    elif compare:
        raise ValueError("--compare-config runs with the seed re-runs; they are off (--reseed-seeds 0 in a joint "
                         "search)")
    phases = experiment_phases(space, name=name, mode=mode, trials=trials, budgets=stage_budgets, reseed=reseed)
    if phases:
        num_samples = sum(p.requested for p in phases)
    record = ExperimentRecord(
        name=name,
        space_name=space.name,
        space_source=str(space.source.resolve()) if space.source else None,
        space=space_to_dict(space),
        base_config=to_dict(cfg),
        metric=space.metric,
        mode=space.mode,
        tune_split=space.tune_split,
        heldout_split=space.heldout_split,
        stages=tuple(space.stages),
        trainable=trainable,
        requested=num_samples,
        reference_point=dict(reference),
        store=store_uri or None,
        storage=str(storage_root),
        study=StudyRecord(name=name, storage=f"sqlite:///{exp_dir / STUDY_FILE}"),
        wandb=WandbRecord(mode=wandb, project=wandb_project, dir=str(exp_dir / "wandb") if wandb != "off" else None),
        resources=ResourcesRecord(cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus),
        seed=seed,
        max_failures=max_failures,
        max_concurrent=max_concurrent,
        settings=settings.to_dict(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        search_mode=mode,
        phases=phases,
        reseed=reseed if phases else None,
    )
    return SweepPlan(space=space, exp_dir=exp_dir, name=name, num_samples=num_samples, trainable=trainable,
                     settings=settings, reference_point=reference, record=record,
                     gpus_default=gpus_per_trial is None, resources_line=resources_line)


def plan_from_record(exp_dir: Path, record: ExperimentRecord, *, num_samples: int) -> SweepPlan:
    """The :class:`SweepPlan` of an experiment folder's record (``sweep.json``, paths resolved in
    ``exp_dir``), running ``num_samples`` trials.

    Raises:
        SpaceError: the recorded space is invalid (the message names ``sweep.json``).
        ValueError: the record lacks the trials' settings or trainable, or its settings are invalid.
    """
    try:
        space = space_from_dict(record.space, source=record.space_source, name=record.space_name)
    except SpaceError as exc:
        raise SpaceError(exc.source, exc.key, f"{exc.message} (the search space recorded in {exp_dir / SWEEP_FILE})") \
            from None
    if record.settings is None or record.trainable is None:
        raise ValueError(f"{exp_dir / SWEEP_FILE}: the sweep record lacks the trials' settings or trainable")
    settings = TrialSettings.from_dict(record.settings)
    return SweepPlan(space=space, exp_dir=exp_dir, name=record.name, num_samples=num_samples,
                     trainable=record.trainable, settings=settings, reference_point=record.reference_point,
                     record=record)
