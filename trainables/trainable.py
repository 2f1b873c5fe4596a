"""Ray Tune function trainables: flat config dict -> pipeline config -> ``run_pipeline`` -> ``tune.report``.

A trial's config is flat: searched config fields by their dotted path (``{"eps.tau": 0.3, ...}``)
plus one fixed entry, :data:`SETTINGS_KEY`, holding a :class:`TrialSettings` dict (the stages, the
artifact store, where run folders go, ...). The base config is not in it: a sweep stores each base
once in the experiment folder (:func:`store_base`, ``base_configs/<digest>.json``) and the trial
config names it (``base_ref``: its path and SHA-256), so Ray's trial table, ``params.json`` and W&B
hold the searched values and a dozen settings, not the ~70 fields of the base. A trainable applies the searched values
to the base config with :func:`~wsss_tune.config.apply_overrides`, runs
:func:`~wsss_tune.stages.pipeline.run_pipeline` with a :class:`~trainables.reporter.TuneReporter` and
an :class:`~wsss_tune.artifacts.ArtifactStore` on the shared store, and ends with a result holding
every metric of the run plus ``final: True``.

Devices: a trial runs where its Ray resources say (:func:`place_trial`): with 0 GPUs on the CPU,
explicitly (``run.device`` forced, ``CUDA_VISIBLE_DEVICES`` blanked: Ray >= 2.60 leaves it set for
0-GPU workers, so ``auto`` would find GPU 0), else on the GPUs Ray assigned, memory capped at a
fractional share; torch threads and loader workers follow its CPUs.

All paths are absolute: Ray runs a trial in its own working directory. A trial's run folder
(``<runs_dir>/<trial id>``, with its resolved ``config.yaml`` and ``metrics.json``) has the same
path when Tune restores the trial, and training resumes from the artifact store's work folders,
which are keyed by the config (a restored trial finds them); Tune checkpoints put a work folder
back where the store keeps it per host (:func:`~trainables.reporter.restore_work_checkpoint`).

One trainable per stage (``eps``; ``affinity``, which includes the random walk; ``deeplab``) and one
for the whole pipeline; upstream stages a stage needs come from the artifact cache.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_tune.config import ConfigError, PipelineConfig, apply_overrides, from_dict
from wsss_tune.stages import graph
from wsss_tune.stages.pipeline import parse_stages

__all__ = [
    "SETTINGS_KEY",
    "NODE_KEY",
    "BASE_CONFIGS_DIR",
    "TrialSettings",
    "store_base",
    "split_trial_config",
    "trial_pipeline_config",
    "run_trial",
    "place_trial",
    "eps_trainable",
    "affinity_trainable",
    "deeplab_trainable",
    "pipeline_trainable",
    "TRAINABLES",
    "trainable_for",
    "trial_dirname",
]

#: The one fixed entry of a trial config; every other entry is a searched config field.
SETTINGS_KEY = "wsss_tune"
#: Result key holding the id of the Ray node that ran the trial (Ray adds ``node_ip`` and ``hostname``,
#: which are the same for every node of a single-host cluster).
NODE_KEY = "node_id"
#: Stages each per-stage trainable runs: the stage and those it always reads (from the stage graph;
#: upstream a config chooses, such as DeepLab's masks, comes from the cache).
_STAGE_TRAINABLE_STAGES: dict[str, tuple[str, ...]] = graph.stage_requirements()
#: Folder of a run's short-lived Tune checkpoint packages, inside its run folder.
_STAGING = ".tune_checkpoints"
#: Folder of the experiment holding the base configs its trial configs name (``base_ref``).
BASE_CONFIGS_DIR = "base_configs"
#: Base configs read in this process, by SHA-256 (a worker reuses it across trials).
_BASES: dict[str, dict[str, Any]] = {}


def _base_digest(base: Mapping[str, Any]) -> tuple[bytes, str]:
    import hashlib
    import json

    data = (json.dumps(base, sort_keys=True, indent=1) + "\n").encode()
    return data, hashlib.sha256(data).hexdigest()


def store_base(base: Mapping[str, Any], folder: str | Path) -> dict[str, str]:
    """Write ``base`` once to ``<folder>/base_configs/<digest>.json`` (content-addressed; an existing
    file is kept) and return the reference a trial config holds: ``{"path", "sha256"}``."""
    from wsss_tune.utils.io import atomic_write_bytes

    data, digest = _base_digest(base)
    path = Path(folder).resolve() / BASE_CONFIGS_DIR / f"{digest[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    _BASES[digest] = dict(base)
    return {"path": str(path), "sha256": digest}


def _load_base(ref: Any) -> dict[str, Any]:
    """The base config a trial config's ``base_ref`` names, checked against its SHA-256."""
    import hashlib
    import json

    where = f"trial config {SETTINGS_KEY}.base_ref"
    if not isinstance(ref, Mapping) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str):
        raise ValueError(f"{where} = {ref!r}: expected {{'path': <file>, 'sha256': <hex digest>}}")
    digest = ref["sha256"]
    if digest in _BASES:
        return _BASES[digest]
    path = Path(ref["path"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the base config {path} ({exc.strerror or exc}); the experiment "
                         "folder must be visible at the same path on every node") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{path}: the base config changed since the sweep started (SHA-256 differs from {where})")
    try:
        base = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    _BASES[digest] = base
    return base


@dataclass(frozen=True, kw_only=True)
class TrialSettings:
    """Everything a trial needs besides the searched values (JSON-plain, stored in the trial config).

    Attributes:
        base: The base pipeline config as a nested dict (``to_dict``), overrides of the space applied.
        stages: Pipeline stages the trial runs.
        runs_dir: Absolute folder; a trial writes its run folder ``<runs_dir>/<trial id>``.
        store: Artifact store URI shared by the trials; empty = a private store per trial (no cache).
        metric: The searched metric (the final result must carry it).
        time_attr: Result key ASHA reads as training time; None without early stopping.
        final_t: Value of ``time_attr`` in the final result (the budget a finished run had), or None.
        threads: torch CPU threads per trial (the trial's CPUs); 0 = leave torch's default.
        tune_checkpoints: Attach training checkpoints to Tune results.
        phase: The search of the experiment the trial belongs to (a cascade's stage, ``reseed``;
            empty for a one-search experiment).
    """

    base: Mapping[str, Any]
    stages: tuple[str, ...]
    runs_dir: str
    store: str = ""
    metric: str
    time_attr: str | None = None
    final_t: int | None = None
    threads: int = 0
    tune_checkpoints: bool = True
    phase: str = ""

    def __post_init__(self) -> None:
        plugins = (self.base.get("run") or {}).get("stage_plugins") if isinstance(self.base, Mapping) else None
        if plugins:  # in a Ray worker: the stages the sweep's plugins add
            graph.load_plugins(list(plugins))
        object.__setattr__(self, "stages", parse_stages(list(self.stages)))
        if not Path(self.runs_dir).is_absolute():
            raise ValueError(f"trial settings runs_dir {self.runs_dir!r}: expected an absolute path "
                             "(Ray runs each trial in its own working directory)")
        if self.store and "://" not in self.store and not Path(self.store).is_absolute():
            raise ValueError(f"trial settings store {self.store!r}: expected an absolute path or a URI")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["base"], d["stages"] = dict(self.base), list(self.stages)
        return d

    def to_trial_config(self, folder: str | Path) -> dict[str, Any]:
        """The dict a trial config holds: :meth:`to_dict` with the base replaced by ``base_ref``, a
        reference to its copy stored once under ``folder`` (:func:`store_base`)."""
        d = self.to_dict()
        d["base_ref"] = store_base(d.pop("base"), folder)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSettings:
        """Settings from :meth:`to_dict` or :meth:`to_trial_config` (the base read from its file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"base_ref"})
        if unknown:
            raise ValueError(f"trial config {SETTINGS_KEY!r}: unknown key(s) {unknown}; known: {sorted(names)}")
        data = dict(data)
        if "base_ref" in data:
            if "base" in data:
                raise ValueError(f"trial config {SETTINGS_KEY!r}: has both 'base' and 'base_ref'; expected one")
            data["base"] = _load_base(data.pop("base_ref"))
        return cls(**{**data, "stages": tuple(data.get("stages", ()))})


def split_trial_config(config: Mapping[str, Any]) -> tuple[TrialSettings, dict[str, Any]]:
    """A trial config -> (its settings, the searched values by config path)."""
    if SETTINGS_KEY not in config:
        raise ValueError(f"trial config has no {SETTINGS_KEY!r} entry (keys: {sorted(config)}); build it "
                         "with trainables.sweep (or pass TrialSettings(...).to_dict() under that key)")
    settings = TrialSettings.from_dict(config[SETTINGS_KEY])
    return settings, {k: v for k, v in config.items() if k != SETTINGS_KEY}


def trial_pipeline_config(settings: TrialSettings, params: Mapping[str, Any], *, store: str) -> PipelineConfig:
    """Base config + searched values, with ``run.artifact_store`` set to the store the trial uses
    (recorded in the run's ``config.yaml``; it takes no part in artifact keys)."""
    cfg = from_dict(settings.base, source=f"trial config {SETTINGS_KEY}.base")
    try:
        return apply_overrides(cfg, {**params, "run.artifact_store": store})
    except ConfigError as exc:
        raise ConfigError(f"trial config: {exc}") from None


def _metrics_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat per-stage bookkeeping of a pipeline run: built (1) or served from the cache (0), seconds."""
    out: dict[str, Any] = {}
    stages = result.get("stages") or {}
    built = 0
    seconds = 0.0
    for name, info in stages.items():
        hit = bool(info.get("hit"))
        out[f"built/{name}"] = 0 if hit else 1
        out[f"seconds/{name}"] = float(info.get("seconds") or 0.0)
        built += 0 if hit else 1
        seconds += float(info.get("seconds") or 0.0)
    out["stages_built"] = built
    out["stages_cached"] = len(stages) - built
    out["stage_seconds"] = round(seconds, 3)
    return out


def run_trial(
    config: Mapping[str, Any],
    *,
    stages: Sequence[str] | None = None,
    trial_id: str,
    report_fn: Callable[..., None] | None = None,
    checkpoint_dir: str | Path | None = None,
    resources: Mapping[str, float] | None = None,
    gpu_ids: Sequence[int | str] = (),
) -> dict[str, Any]:
    """Run one trial: the body of every trainable, callable without Ray (``report_fn``).

    Args:
        config: The flat trial config (searched values + :data:`SETTINGS_KEY`).
        stages: Stages to run (default: the settings' stages).
        trial_id: Names the run folder ``<runs_dir>/<trial_id>``.
        report_fn: Receives each result (default ``ray.tune.report``).
        checkpoint_dir: A restored Tune checkpoint to put back into the store's work folder first.
        resources: The trial's Ray resources (``{"CPU": 1, "GPU": 0.5}``); with them the trial runs where
            they say (:func:`place_trial`). None (a call without Ray): ``run.device`` as configured.
        gpu_ids: The GPU ids Ray assigned the trial (``ray.get_gpu_ids()``).

    Returns:
        The final result (all metrics, ``cache_repairs``: corrupted cache artifacts this trial found
        and rebuilt, ``final: True``).

    Raises:
        wsss_tune.reporting.DivergedError: training diverged (the trial fails; Optuna records it as failed).
    """
    from wsss_tune.artifacts import ArtifactStore
    from wsss_tune.stages.pipeline import run_pipeline

    from .reporter import TuneReporter, restore_work_checkpoint

    settings, params = split_trial_config(config)
    run_dir = Path(settings.runs_dir) / trial_id
    store_uri = settings.store or str(run_dir / "artifacts")
    cfg = trial_pipeline_config(settings, params, store=store_uri)
    if resources is not None:  # first: nothing may touch CUDA before the trial's GPUs are set
        cfg, placement = place_trial(cfg, resources=resources, gpu_ids=gpu_ids, default_cpus=settings.threads)
        print(f"trial {trial_id}: {placement.describe()}", file=sys.stderr, flush=True)
    elif settings.threads > 0:
        import torch

        torch.set_num_threads(settings.threads)
    store = ArtifactStore(uri=store_uri)
    if checkpoint_dir is not None:
        restore_work_checkpoint(checkpoint_dir, store)
    # Every result carries the store's repair count (corrupted artifacts found and rebuilt).
    reporter = TuneReporter(report_fn=report_fn, staging_dir=run_dir / _STAGING, checkpoints=settings.tune_checkpoints,
                            store=store)
    result = run_pipeline(cfg, stages=stages or settings.stages, out_dir=run_dir, reporter=reporter, store=store)
    extra = _metrics_summary(result)
    if settings.time_attr is not None and settings.final_t is not None:
        last = reporter.latest.get(settings.time_attr)
        last_t = last if isinstance(last, int | float) and not isinstance(last, bool) else 0
        extra[settings.time_attr] = max(int(settings.final_t), int(last_t))
    metrics = {k: v for k, v in result.items() if k not in ("stages",)}
    if settings.metric not in metrics:
        raise RuntimeError(f"the pipeline run in {run_dir} did not produce the searched metric {settings.metric!r} "
                           f"(stages {list(stages or settings.stages)}; metrics: {sorted(metrics)})")
    return reporter.report_final(metrics, **extra)


def place_trial(cfg: PipelineConfig, *, resources: Mapping[str, float], gpu_ids: Sequence[int | str],
                default_cpus: float = 1, environ: MutableMapping[str, str] | None = None,
                ) -> tuple[PipelineConfig, Any]:
    """Make this process run the trial where its Ray resources say, and the config say so too.

    :func:`~wsss_tune.utils.runtime.trial_placement` decides (0 GPUs: the CPU, ``CUDA_VISIBLE_DEVICES``
    blanked; a GPU share: the assigned ids, the card's memory capped at a fractional share; torch
    threads = CPUs, loader workers at most CPUs - 1) and :func:`~wsss_tune.utils.runtime.apply_placement`
    applies it. The returned config has ``run.device`` and ``data.num_workers`` set to what the trial
    uses (neither keys an artifact), so every stage and the run's ``config.yaml`` follow it.

    Args:
        resources: ``{"CPU": ..., "GPU": ...}`` of the trial (Ray's trial resources).
        gpu_ids: GPU ids Ray assigned (``ray.get_gpu_ids()``).
        default_cpus: CPUs when ``resources`` names none (the trial settings' ``threads``).
        environ: The environment to set (default ``os.environ``).

    Returns:
        The config and the :class:`~wsss_tune.utils.runtime.TrialPlacement`.
    """
    from wsss_tune.utils.runtime import apply_placement, trial_placement

    cpus = float(resources.get("CPU") or default_cpus or 1)
    placement = trial_placement(gpus=float(resources.get("GPU") or 0), gpu_ids=gpu_ids, cpus=cpus,
                                device=cfg.run.device, num_workers=cfg.data.num_workers)
    apply_placement(placement, environ)
    cfg = apply_overrides(cfg, {"run.device": placement.device, "data.num_workers": placement.workers})
    return cfg, placement


def _tune_trial(config: dict[str, Any], stages: Sequence[str] | None) -> None:
    import ray
    from ray import tune

    ctx = tune.get_context()
    # Every result names the Ray node that produced it (trials.parquet shows where each trial ran).
    node_id = ray.get_runtime_context().get_node_id()
    # What Ray gave this trial: its CPUs and GPU share, and which GPUs.
    placed: dict[str, Any] = {"resources": dict(ctx.get_trial_resources().required_resources),
                              "gpu_ids": list(ray.get_gpu_ids())}

    def report(result: Mapping[str, Any], **kwargs: Any) -> None:
        tune.report({**result, NODE_KEY: node_id}, **kwargs)

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run_trial(config, stages=stages, trial_id=ctx.get_trial_id(), report_fn=report, checkpoint_dir=folder,
                      **placed)
    else:
        run_trial(config, stages=stages, trial_id=ctx.get_trial_id(), report_fn=report, **placed)


def eps_trainable(config: dict[str, Any]) -> None:
    """Ray Tune trainable: the EPS stage (train, CAMs, pseudo masks, ``eps_miou_*``)."""
    _tune_trial(config, _STAGE_TRAINABLE_STAGES["eps"])


def affinity_trainable(config: dict[str, Any]) -> None:
    """Ray Tune trainable: AffinityNet and the random walk (``rw_miou_*``); EPS from the cache."""
    _tune_trial(config, _STAGE_TRAINABLE_STAGES["affinity"])


def deeplab_trainable(config: dict[str, Any]) -> None:
    """Ray Tune trainable: DeepLab on its mask source (``deeplab_miou_*``); upstream from the cache."""
    _tune_trial(config, _STAGE_TRAINABLE_STAGES["deeplab"])


def pipeline_trainable(config: dict[str, Any]) -> None:
    """Ray Tune trainable: the stages named in the trial settings (default all three)."""
    _tune_trial(config, None)


#: Trainables by name.
TRAINABLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "eps": eps_trainable,
    "affinity": affinity_trainable,
    "deeplab": deeplab_trainable,
    "pipeline": pipeline_trainable,
}


def trainable_for(stages: Sequence[str]) -> tuple[str, Callable[[dict[str, Any]], None]]:
    """The trainable whose stages are exactly ``stages`` (``pipeline`` for any other set)."""
    wanted = parse_stages(list(stages))
    for name, own in graph.stage_requirements().items():
        if name not in TRAINABLES:
            continue
        if wanted == own:
            return name, TRAINABLES[name]
    return "pipeline", TRAINABLES["pipeline"]


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default puts every searched value into the name)."""
    return f"{trial.trainable_name}_{trial.trial_id}"
