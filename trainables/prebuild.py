"""Shared upstream artifacts built once, before the trials that need them claim their resources.

In an ``rw`` or ``deeplab`` sweep every trial reads the same EPS and AffinityNet artifacts: no
searched parameter keys them. Started together, the first trial builds them and the others wait in
:meth:`~wsss_tune.artifacts.ArtifactStore.get_or_create` holding a GPU each: on VOC hours of EPS
training with 3 of 4 GPUs idle. So before a search's trials start, :func:`prebuild_shared` builds
those artifacts in one Ray task with the resources of one trial; the trials then find them in the
store. The other GPUs stay free for Ray (other work of the cluster) until trials that have
something to compute claim them.

**Shared** means: the artifact and everything upstream of it have keys that no searched parameter
changes (:func:`shared_artifacts`, from the planner's :func:`~wsss_tune.analysis.plan.param_artifacts`,
which compares the pipeline's own keys). The build writes a run folder like a trial's
(``<runs>/prebuild-<search>/`` with ``config.yaml`` and ``metrics.json``), which the compute table
counts. Without a shared store (``--no-cache``) there is nothing to share and nothing is built.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsss_tune.analysis.tables import PREBUILD_PREFIX

__all__ = ["PREBUILD_PREFIX", "shared_artifacts", "prebuild_shared", "build_artifacts"]


def shared_artifacts(space: Any, cfg: Any) -> tuple[str, ...]:
    """The artifacts of a run of ``space.stages`` whose keys, and their upstream's, no parameter of
    ``space`` changes (graph order); empty when the space searches nothing."""
    from wsss_tune.analysis.plan import param_artifacts
    from wsss_tune.stages import graph

    if not space.params:
        return ()
    varying: set[str] = set()
    for p in space.params:
        varying.update(param_artifacts(p, cfg))
    chain = graph.artifact_chain(cfg, space.stages)
    return tuple(name for name, upstream in chain.items() if not set(upstream) & varying)


def build_artifacts(settings: Mapping[str, Any], point: Mapping[str, Any], names: Sequence[str],
                    run_dir: str, *, resources: Mapping[str, float] | None = None,
                    gpu_ids: Sequence[int | str] = ()) -> dict[str, Any]:
    """Build ``names`` for the trial settings ``settings`` (a ``TrialSettings`` dict) at ``point`` in
    ``run_dir`` (``config.yaml``, ``metrics.json`` with the stage records); returns the records.
    The body of the Ray task :func:`prebuild_shared` starts (plain arguments, runs anywhere); with
    ``resources`` (the task's Ray resources) it runs where they say, as a trial does
    (:func:`~trainables.trainable.place_trial`)."""
    from wsss_tune.artifacts import ArtifactStore
    from wsss_tune.config import dump_yaml
    from wsss_tune.reporting import NullReporter
    from wsss_tune.stages.pipeline import FINGERPRINT_KEY, PipelineRun
    from wsss_tune.utils.io import atomic_write_json

    from .trainable import TrialSettings, place_trial, trial_pipeline_config

    s = TrialSettings.from_dict(settings)
    out = Path(run_dir)
    cfg = trial_pipeline_config(s, point, store=s.store)
    if resources is not None:  # before anything touches CUDA
        cfg, _ = place_trial(cfg, resources=resources, gpu_ids=gpu_ids, default_cpus=s.threads)
    elif s.threads > 0:
        import torch

        torch.set_num_threads(s.threads)
    run = PipelineRun(cfg, out_dir=out, reporter=NullReporter(), store=ArtifactStore(uri=s.store))
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml")
    run.build(list(names))
    record = {"stages": run.stage_info, FINGERPRINT_KEY: run.fingerprint, "prebuilt": list(names)}
    atomic_write_json(out / "metrics.json", record)
    return record


def prebuild_shared(plan: Any, *, log: Any = None) -> dict[str, Any] | None:
    """Build the shared artifacts of ``plan``'s search that the store lacks, in one Ray task with one
    trial's CPUs and GPUs; returns its ``metrics.json`` record, or None when there was nothing to do.

    Raises:
        RuntimeError: the build failed (no trial is started on a broken upstream).
    """
    import ray

    from wsss_tune.artifacts import ArtifactStore

    settings = plan.settings
    if not settings.store or plan.num_samples < 2:
        return None
    from .trainable import trial_pipeline_config

    cfg = trial_pipeline_config(settings, plan.reference_point, store=settings.store)
    names = shared_artifacts(plan.space, cfg)
    if not names:
        return None
    from wsss_tune.stages.pipeline import PipelineRun

    store = ArtifactStore(uri=settings.store)
    keys = PipelineRun(cfg, out_dir=Path(settings.runs_dir), store=store).artifact_keys(names)
    if all(store.exists(k) for k in keys.values()):
        return None
    res = plan.record.resources
    run_dir = Path(settings.runs_dir) / f"{PREBUILD_PREFIX}{settings.phase or 'search'}"
    if log is not None:
        log(f"building the artifacts every trial shares first ({', '.join(names)}), with one trial's "
            f"resources ({res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU)")
    task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=0)(_placed_build)
    t0 = time.time()
    try:
        record = ray.get(task.remote(settings.to_dict(), dict(plan.reference_point), list(names), str(run_dir),
                                     {"CPU": res.cpus_per_trial, "GPU": res.gpus_per_trial}))
    except ray.exceptions.RayTaskError as exc:
        raise RuntimeError(f"building the shared artifacts {', '.join(names)} failed (run folder {run_dir}): "
                           f"{exc.cause if hasattr(exc, 'cause') else exc}") from None
    record["seconds"] = round(time.time() - t0, 2)
    return record


def _placed_build(settings: Mapping[str, Any], point: Mapping[str, Any], names: Sequence[str], run_dir: str,
                  resources: Mapping[str, float]) -> dict[str, Any]:
    """:func:`build_artifacts` in a Ray task, on the GPUs Ray assigned it (none: the CPU)."""
    import ray

    return build_artifacts(settings, point, names, run_dir, resources=resources, gpu_ids=list(ray.get_gpu_ids()))
