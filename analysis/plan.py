"""What a sweep will cost, before launching it: time each stage briefly, then do the arithmetic.

Two halves, kept apart so the arithmetic can be checked by hand:

* :func:`time_stages` measures, on the available device, one optimiser step of EPSNet, AffinityNet
  and DeepLab at the configured crop and batch, one inference forward of each at the crop size, and
  one random walk on a map of the crop's size at the affinity stride.
* :func:`estimate_cost` (pure) multiplies those by the configured iterations and image counts, by
  how many times each stage artifact is built in a sweep of ``trials`` trials (once when the cache
  shares it, once per trial otherwise), and by ASHA's expected share of the early-stopped stage's
  work, and turns the device-seconds into wall-clock time on ``gpus`` devices.
* :func:`expected_cost` prices what a search space's choices change: the mean of :func:`estimate_cost`
  over the combinations of its categorical parameters (a crop size, a DeepLab head, PPC cost more),
  with each reference point (the base config's and the space's named ones) priced as one whole trial
  at its own settings, as the scheduler never stops it.

Without the device the sweep will run on, :func:`count_stages` gives the unit times from counted
FLOPs (the models run on the ``meta`` device, shapes only) at an assumed sustained throughput, and
``sizes`` (:data:`SIZE_PRESETS`: ``voc``) the image counts without the dataset: ``plan SPACE --sizes voc
--tflops 100`` prices a VOC sweep on a machine that has neither.

The same split for GPU memory: :func:`measure_memory_profile` counts, once per model, the bytes a
training step saves for its backward pass per input pixel (the model run on the ``meta`` device: shapes
only), and :func:`estimate_memory` (pure) adds weights, gradients, optimiser state and those activations
scaled by the batch's pixels; :func:`check_gpu_memory` is the pre-flight check built on it.

Artifacts follow :mod:`wsss_tune.stages.pipeline`: ``eps_model`` (EPS training), ``eps`` (CAM
inference and pseudo masks), ``affinity`` (AffinityNet training and affinity inference), ``rw`` (the
random walk) and ``deeplab`` (training and evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss_tune.config import PipelineConfig, apply_overrides, to_dict
from wsss_tune.spaces import Fidelity, Param, SearchSpace
from wsss_tune.stages import graph

__all__ = [
    "StageTimings",
    "DatasetSizes",
    "ArtifactCost",
    "CostEstimate",
    "artifact_chain",
    "param_artifacts",
    "param_cardinality",
    "expected_distinct",
    "asha_rungs",
    "asha_fractions",
    "estimate_cost",
    "expected_cost",
    "SIZE_PRESETS",
    "parse_sizes",
    "dataset_sizes",
    "time_stages",
    "count_stages",
    "format_plan",
    "plan",
    "MemoryProfile",
    "MemoryEstimate",
    "optimizer_states",
    "estimate_memory",
    "saved_tensor_bytes",
    "measure_memory_profile",
    "stage_memory",
    "check_gpu_memory",
]

#: Seconds in an hour.
_HOUR = 3600.0
#: Optimiser steps and warm-up steps :func:`time_stages` runs per stage by default: enough for a
#: stable per-step time once cuDNN has picked its kernels, few enough to take seconds on a GPU.
DEFAULT_TIMED_STEPS = 3
DEFAULT_WARMUP_STEPS = 1


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StageTimings:
    """Measured seconds of each stage's unit of work on one device.

    Attributes:
        device: where they were measured (``cuda:0 (NVIDIA ...)``, ``cpu x2``).
        eps_step, affinity_step, deeplab_step: one optimiser step at the configured batch and crop.
        eps_forward, affinity_forward, deeplab_forward: one inference forward of one crop-sized image.
        rw_image: one random walk (``2**rw.logt`` steps) of one crop-sized image.
    """

    device: str
    eps_step: float
    eps_forward: float
    affinity_step: float
    affinity_forward: float
    rw_image: float
    deeplab_step: float
    deeplab_forward: float

    def __post_init__(self) -> None:
        for name in ("eps_step", "eps_forward", "affinity_step", "affinity_forward", "rw_image", "deeplab_step",
                     "deeplab_forward"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StageTimings.{name}: expected a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DatasetSizes:
    """Image counts the stages iterate over.

    Attributes:
        train: the training split (``data.train_split``: EPS and AffinityNet epochs, DeepLab training).
        masks: images that get a CAM, an affinity map and a refined mask (train split ∪ mask-eval split).
        val: DeepLab's evaluation split (``data.val_split``).
    """

    train: int
    masks: int
    val: int


@dataclass(frozen=True, kw_only=True)
class ArtifactCost:
    """One stage artifact in the estimate.

    Attributes:
        artifact: name (an artifact of :mod:`wsss_tune.stages.graph`).
        seconds: device-seconds of one complete build.
        builds: expected number of builds in the sweep (fractional: an expectation).
        work_fraction: share of a build's work a trial does on average (ASHA; 1 without it).
        shared: built once and shared by every trial (the cache, no searched parameter upstream).
        device_seconds: ``seconds * builds * work_fraction``.
        detail: how ``seconds`` was composed.
    """

    artifact: str
    seconds: float
    builds: float
    work_fraction: float
    shared: bool
    device_seconds: float
    detail: str


@dataclass(frozen=True, kw_only=True)
class CostEstimate:
    """The result of :func:`estimate_cost`; hours are device-hours on the timed device."""

    rows: tuple[ArtifactCost, ...]
    trials: int
    gpus: int
    cache: bool
    asha: Fidelity | None
    device: str
    device_hours: float
    wall_hours: float
    per_trial_hours: float
    #: Device-hours of the shared artifacts (one build each, before any trial can go on).
    shared_hours: float = 0.0
    #: Device-hours the other ``min(gpus, trials) - 1`` trials would hold while they wait for the
    #: shared build if trials built it themselves; building it first (the sweep's default,
    #: ``trainables.prebuild``) leaves those devices free.
    waiting_device_hours: float = 0.0
    assumptions: tuple[str, ...] = field(default_factory=tuple)
    #: Reference points priced as whole trials at their own settings (:func:`expected_cost`): (label,
    #: device-hours of its trial beyond the shared artifacts); included in the totals.
    references: tuple[tuple[str, float], ...] = ()
    #: Combinations of the categorical parameters the rows are the mean over (1: the base config only).
    combinations: int = 1

    def as_rows(self) -> list[dict[str, Any]]:
        """Plain rows (one per artifact) for tables and files."""
        return [{"artifact": r.artifact, "hours_per_build": r.seconds / _HOUR, "builds": r.builds,
                 "work_fraction": r.work_fraction, "shared": r.shared, "device_hours": r.device_seconds / _HOUR,
                 "detail": r.detail} for r in self.rows]


# --------------------------------------------------------------------------------------------------
# Which artifacts a trial builds, and how many distinct ones a sweep needs
# --------------------------------------------------------------------------------------------------


def artifact_chain(cfg: PipelineConfig, stages: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The artifacts a run of ``stages`` builds, each with the artifacts upstream of it (itself included):
    :func:`wsss_tune.stages.graph.artifact_chain`, the pipeline's own walk of the graph."""
    return graph.artifact_chain(cfg, stages)


def param_artifacts(p: Param, cfg: PipelineConfig) -> tuple[str, ...]:
    """The artifacts whose own key changes when ``p`` changes (upstream keys aside).

    Found by setting ``p`` to two values of its domain and comparing
    :func:`~wsss_tune.stages.pipeline.stage_key_parts`, so it follows the pipeline's keys exactly:
    ``eps.tau`` keys ``eps_model``, ``eps.bg_threshold`` keys ``eps``, ``run.seed`` keys every
    trained artifact, a bookkeeping field such as ``eps.eval_every`` keys nothing.
    """
    from wsss_tune.stages.pipeline import stage_key_parts

    values = p.grid(2)[:2]
    if len(values) < 2:
        return ()
    a, b = (stage_key_parts(apply_overrides(cfg, {p.path: v}), "") for v in values)
    return tuple(name for name in graph.artifact_names() if a[name] != b[name])


def param_cardinality(p: Param) -> float:
    """Number of distinct values ``p`` can take (``inf`` for a continuous range)."""
    if p.kind == "categorical":
        return float(len(p.choices))
    assert p.low is not None and p.high is not None
    if p.kind == "int":
        return float(int(p.high - p.low) // int(p.step or 1) + 1)
    if p.step:
        return float(math.floor((p.high - p.low) / p.step + 1e-9) + 1)
    return math.inf


def expected_distinct(k: float, n: int) -> float:
    """Expected number of distinct values among ``n`` uniform draws from ``k`` equally likely values.

    ``k (1 - (1 - 1/k)^n)`` (occupancy: each value is missed by all draws with probability
    ``(1 - 1/k)^n``); ``n`` when ``k`` is infinite (a continuous parameter never repeats).
    """
    if n <= 0:
        return 0.0
    if math.isinf(k):
        return float(n)
    if k < 1:
        raise ValueError(f"expected_distinct: k={k} must be >= 1")
    return k * (1.0 - (1.0 - 1.0 / k) ** n)


def asha_rungs(f: Fidelity) -> list[float]:
    """ASHA's milestones, ascending, in units of ``time_attr``.

    As Ray Tune's ``ASHAScheduler``: ``int(log(max_t / grace) / log(eta) + 1)`` rungs at
    ``grace * eta**k``.
    """
    n = int(math.log(f.max_t / f.grace_period) / math.log(f.reduction_factor) + 1)
    return [f.grace_period * f.reduction_factor**k for k in range(n)]


def asha_fractions(f: Fidelity) -> tuple[float, float]:
    """``(work, complete)``: expected share of ``max_t`` a trial trains, and share of trials finishing.

    With many trials, a trial passes each rung with probability ``1/eta`` (ASHA promotes the top
    ``1/eta``), so it stops at rung ``k`` (milestone ``r_k``, below ``max_t``) with probability
    ``eta^-k (1 - 1/eta)`` and finishes with ``eta^-K``, ``K`` = rungs below ``max_t``::

        work = (sum_k eta^-k (1 - 1/eta) r_k + eta^-K max_t) / max_t

    This is the asymptotic rate: Ray promotes more freely while a rung holds few results.
    """
    eta = f.reduction_factor
    rungs = [r for r in asha_rungs(f) if r < f.max_t]
    work = sum(eta**-k * (1.0 - 1.0 / eta) * r for k, r in enumerate(rungs))
    complete = eta ** -len(rungs)
    return (work + complete * f.max_t) / f.max_t, complete


# --------------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------------


def estimate_cost(
    timings: StageTimings,
    space: SearchSpace,
    cfg: PipelineConfig,
    trials: int,
    gpus: int,
    cache: bool = True,
    asha: bool | Fidelity = True,
    *,
    sizes: DatasetSizes,
) -> CostEstimate:
    """Expected device-hours and wall-clock hours of a sweep (pure arithmetic, no I/O).

    Per artifact: ``seconds`` of one build from :class:`StageTimings` (iterations x step time, plus
    images x inference passes x forward time), times the expected number of builds: with the cache,
    the number of distinct upstream configurations among ``trials`` (1 when the space searches
    nothing at or upstream of it; :func:`expected_distinct` over the product of the searched
    parameters' cardinalities, ``trials`` when one is continuous); without it, one per trial. ASHA
    cuts the training of the metric's stage to :func:`asha_fractions` ``work`` per build, and the
    artifacts after it run only for the ``complete`` share of trials.

    Wall clock: shared artifacts first (every trial waits for them), then the rest spread over
    ``min(gpus, trials)`` devices, one trial per device, but never less than one whole trial.

    Args:
        timings: measured unit times (:func:`time_stages`, or stubs in tests).
        space: the search space (its stages, searched parameters, metric and fidelity).
        cfg: the resolved base config of the space (iterations, batch, scales).
        trials: number of trials.
        gpus: devices running trials in parallel.
        cache: whether trials share stage artifacts (the artifact store).
        asha: ``True`` = the space's fidelity (none if it has none), ``False`` = every trial runs to
            the end, or an explicit :class:`~wsss_tune.spaces.Fidelity`.
        sizes: image counts of the dataset.

    Raises:
        ValueError: ``trials`` or ``gpus`` below 1.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"estimate_cost: trials={trials!r}, expected an integer >= 1")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"estimate_cost: gpus={gpus!r}, expected an integer >= 1")
    fidelity = space.fidelity if asha is True else (asha or None)
    chain = artifact_chain(cfg, space.stages)
    metric_stage = graph.tune_metrics().get(space.metric, (None, None))[0]
    asha_artifact = graph.fidelity_artifact(metric_stage) if (fidelity is not None and metric_stage) else None
    if asha_artifact not in chain:
        asha_artifact = None
    work, complete = asha_fractions(fidelity) if asha_artifact and fidelity is not None else (1.0, 1.0)

    keyed: dict[str, list[Param]] = {a: [] for a in graph.artifact_names()}
    for p in space.params:
        for a in param_artifacts(p, cfg):
            keyed[a].append(p)

    rows: list[ArtifactCost] = []
    per_trial = 0.0
    shared_seconds = 0.0
    for name in graph.artifact_names():
        if name not in chain:
            continue
        upstream = list({p.path: p for a in chain[name] for p in keyed[a]}.values())
        cardinality = math.prod(param_cardinality(p) for p in upstream) if upstream else 1.0
        shared = cache and cardinality == 1.0
        # Each artifact's own cost model (an artifact without one counts as free, and says so).
        cost = graph.spec(name).cost
        train_s, other_s, detail = cost(timings, cfg, sizes) if cost is not None else (0.0, 0.0, "no cost model")
        seconds = train_s + other_s
        after_asha = asha_artifact is not None and asha_artifact in chain[name] and name != asha_artifact
        if name == asha_artifact and not shared:
            fraction = (work * train_s + complete * other_s) / seconds if seconds > 0 else 1.0
        elif after_asha and not shared:
            fraction = complete
        else:
            fraction = 1.0
        builds = expected_distinct(cardinality, trials) if cache else float(trials)
        device_s = seconds * builds * fraction
        rows.append(ArtifactCost(artifact=name, seconds=seconds, builds=builds, work_fraction=fraction, shared=shared,
                                 device_seconds=device_s, detail=detail))
        if shared:
            shared_seconds += seconds
        else:
            per_trial += seconds
    total = sum(r.device_seconds for r in rows)
    lanes = min(gpus, trials)
    wall = shared_seconds + max((total - shared_seconds) / lanes, per_trial)
    return CostEstimate(rows=tuple(rows), trials=trials, gpus=gpus, cache=cache, asha=fidelity if asha_artifact else None,
                        device=timings.device, device_hours=total / _HOUR, wall_hours=wall / _HOUR,
                        per_trial_hours=(shared_seconds + per_trial) / _HOUR, shared_hours=shared_seconds / _HOUR,
                        waiting_device_hours=shared_seconds * (lanes - 1) / _HOUR,
                        assumptions=_assumptions(space, cfg, timings, asha_artifact, fidelity, cache, gpus))


def _assumptions(space: SearchSpace, cfg: PipelineConfig, t: StageTimings, asha_artifact: str | None,
                 fidelity: Fidelity | None, cache: bool, gpus: int) -> tuple[str, ...]:
    out = [
        (f"unit times from {t.device}: FLOPs of the models' convolutions and matrix products (no data loading, "
         "element-wise work or optimiser); hours scale inversely with the throughput"
         if "counted FLOPs" in t.device else f"unit times measured on {t.device}; device-hours are hours of that device"),
        "one trial per device; trials start as soon as a device is free",
        "an inference pass costs one forward at the crop size (real images differ in size)",
        "steps after the timed ones take as long (no data-loading stalls, no contention between trials)",
    ]
    if cache:
        out.append("cache on: an artifact whose upstream searched parameters repeat is built once; discrete "
                   "parameters are drawn uniformly (TPE concentrates draws, so it repeats more often)")
    else:
        out.append("cache off: every trial builds every stage it runs")
    if asha_artifact and fidelity is not None:
        work, complete = asha_fractions(fidelity)
        out.append(f"ASHA on the {asha_artifact} training: rungs {asha_rungs(fidelity)} of max_t {fidelity.max_t}, "
                   f"eta {fidelity.reduction_factor:g}; a trial trains {work:.0%} of it on average and "
                   f"{complete:.0%} of trials finish (the asymptotic rate; early trials are promoted more)")
    elif fidelity is not None:
        out.append(f"no early stopping: the metric {space.metric} comes after the training its fidelity would cut")
    else:
        out.append("no early stopping: every trial runs to the end")
    if gpus > 1:
        out.append(f"{gpus} devices: wall clock = shared stages + the rest / min(devices, trials)")
    return tuple(out)


#: Most combinations of categorical parameters :func:`expected_cost` averages over; past it, the base
#: config's choices stand for all (and the assumptions say so).
MAX_COMBINATIONS = 1024


def _with(cfg: PipelineConfig, values: Mapping[str, Any]) -> PipelineConfig:
    return apply_overrides(cfg, dict(values)) if values else cfg


def expected_cost(
    timer: Callable[[PipelineConfig], StageTimings],
    space: SearchSpace,
    cfg: PipelineConfig,
    trials: int,
    gpus: int,
    cache: bool = True,
    asha: bool | Fidelity = True,
    *,
    sizes: DatasetSizes,
) -> CostEstimate:
    """:func:`estimate_cost` of a sweep whose trials differ in cost: the expectation under uniform draws.

    * Searched trials: the mean of :func:`estimate_cost` over every combination of the space's
      categorical parameters (each applied to ``cfg`` and timed with ``timer``), for ``trials`` minus
      the reference points. The cost is linear in each artifact's build time, so the mean is the
      expected cost when each choice is equally likely (a TPE search concentrates its draws).
    * Reference points (:meth:`~wsss_tune.spaces.SearchSpace.reference_points`, each distinct point
      once): one trial each at its own settings, every artifact built in full (the scheduler never stops
      it), counted as far as the searched trials would not build the same artifact anyway: with the
      cache, an artifact whose upstream searched parameters take ``k`` values is new with probability
      ``(1 - 1/k)^n`` after ``n`` searched trials (1 for a continuous one, 0 for a shared artifact),
      and two reference points with the same upstream values build it once.

    Wall clock: the shared artifacts first, then the rest over ``min(gpus, trials)`` devices, never less
    than the longest single trial.
    """
    cats = [p for p in space.params if p.kind == "categorical"]
    count = math.prod(len(p.choices) for p in cats) if cats else 1
    combos: list[dict[str, Any]] = [{}]
    if cats and count <= MAX_COMBINATIONS:
        combos = [dict(zip((p.path for p in cats), values, strict=True))
                  for values in itertools.product(*(p.choices for p in cats))]
    points: dict[str, dict[str, Any]] = {}
    for label, values in space.reference_points().items():
        if values not in points.values():
            points[label] = values
    searched = max(1, trials - len(points))
    parts = [estimate_cost(timer(c), space, c, searched, gpus, cache=cache, asha=asha, sizes=sizes)
             for c in (_with(cfg, combo) for combo in combos)]
    mean = _mean_estimate(parts)
    keyed = {p.path: set(param_artifacts(p, cfg)) for p in space.params}
    counted: set[tuple[str, str]] = set()
    refs: list[tuple[str, float]] = []
    longest = (mean.per_trial_hours - mean.shared_hours) * _HOUR
    for label, values in points.items():
        ref_cfg = _with(cfg, values)
        one = estimate_cost(timer(ref_cfg), space, ref_cfg, 1, 1, cache=cache, asha=False, sizes=sizes)
        chain = artifact_chain(ref_cfg, space.stages)
        seconds = 0.0
        for row in one.rows:
            upstream = [p for p in space.params if keyed[p.path] & set(chain[row.artifact])]
            k = math.prod(param_cardinality(p) for p in upstream) if upstream else 1.0
            signature = (row.artifact, json.dumps({p.path: values[p.path] for p in upstream}, sort_keys=True,
                                                  default=str))
            if signature in counted:
                continue
            counted.add(signature)
            new = 1.0 if not cache or math.isinf(k) else (1.0 - 1.0 / k) ** searched
            seconds += row.seconds * new
        refs.append((label, seconds / _HOUR))
        longest = max(longest, sum(r.seconds for r in one.rows if not r.shared))
    total = mean.device_hours * _HOUR + sum(h for _, h in refs) * _HOUR
    lanes = min(gpus, searched + len(points))
    shared_s = mean.shared_hours * _HOUR
    wall = shared_s + max((total - shared_s) / lanes, longest)
    extra = []
    if len(combos) > 1:
        extra.append(f"searched trials: the mean over the {len(combos)} combinations of "
                     f"{', '.join(p.path for p in cats)} (each choice equally likely)")
    elif cats:
        extra.append(f"{count} combinations of the categorical parameters (over {MAX_COMBINATIONS}): priced at the "
                     "base config's choices")
    extra.append(f"{len(points)} reference point(s) ({', '.join(points)}): one trial each at its own settings, never "
                 f"stopped early, besides the {searched} searched trial(s); an artifact a searched trial would "
                 "build anyway is not counted twice")
    return dataclasses.replace(mean, trials=searched + len(points), device_hours=total / _HOUR, wall_hours=wall / _HOUR,
                               references=tuple(refs), combinations=len(combos),
                               waiting_device_hours=shared_s * (lanes - 1) / _HOUR,
                               assumptions=(*mean.assumptions, *extra))


def _mean_estimate(parts: Sequence[CostEstimate]) -> CostEstimate:
    """The mean of several estimates of one sweep: each artifact's row averaged (an artifact a
    combination does not build counts 0 there)."""
    n = len(parts)
    names = list(dict.fromkeys(r.artifact for e in parts for r in e.rows))
    rows = []
    for name in names:
        mine = [r for e in parts for r in e.rows if r.artifact == name]
        device_s = sum(r.device_seconds for r in mine) / n
        seconds = sum(r.seconds for r in mine) / n
        builds = sum(r.builds for r in mine) / n
        hours = sorted(r.seconds / _HOUR for r in mine)
        detail = mine[0].detail if len({r.detail for r in mine}) == 1 else \
            f"mean over the combinations: {hours[0]:.3g} to {hours[-1]:.3g} h per build"
        if len(mine) < n:
            detail += f" (built in {len(mine)} of {n} combinations)"
        rows.append(ArtifactCost(artifact=name, seconds=seconds, builds=builds,
                                 work_fraction=device_s / (seconds * builds) if seconds * builds > 0 else 1.0,
                                 shared=all(r.shared for r in mine), device_seconds=device_s, detail=detail))
    first = parts[0]

    def avg(attr: str) -> float:
        return sum(getattr(e, attr) for e in parts) / n

    return dataclasses.replace(first, rows=tuple(rows), device_hours=avg("device_hours"), wall_hours=avg("wall_hours"),
                               per_trial_hours=avg("per_trial_hours"), shared_hours=avg("shared_hours"),
                               waiting_device_hours=avg("waiting_device_hours"))


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def dataset_sizes(cfg: PipelineConfig) -> DatasetSizes:
    """Count the images of ``cfg``'s splits (reads the id lists of ``cfg.data.root``)."""
    from wsss_tune.data import VOCLayout

    layout = VOCLayout.from_config(cfg.data)
    train = layout.split_ids(cfg.data.train_split)
    masks = set(train) | set(layout.split_ids(cfg.data.mask_eval_split))
    return DatasetSizes(train=len(train), masks=len(masks), val=len(layout.split_ids(cfg.data.val_split)))


def _timed(fn: Callable[[], object], *, steps: int, warmup: int, device: Any) -> float:
    """Mean seconds of ``fn()`` over ``steps`` calls after ``warmup`` untimed ones (CUDA synchronised)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def time_stages(
    cfg: PipelineConfig,
    *,
    num_classes: int,
    stages: Sequence[str] = ("eps", "affinity", "deeplab"),
    device: Any = None,
    steps: int = DEFAULT_TIMED_STEPS,
    warmup: int = DEFAULT_WARMUP_STEPS,
) -> StageTimings:
    """Time each stage's model on ``device`` at ``cfg``'s crop and batch (random inputs, random init).

    A training step is the stage's own step function (:func:`~wsss_tune.stages.eps.make_eps_step`,
    :func:`~wsss_tune.stages.affinity.make_affinity_step`, :func:`~wsss_tune.stages.deeplab.make_deeplab_step`:
    forward, loss, backward, update; DeepLab's with its ``accumulate`` micro-batches) on one random
    batch of the configured crop and batch size, already on the device, with every learning rate set
    to 0: an update at LR 0 costs what any other does, and the random-init weights cannot diverge over
    the timed steps. Forwards run under ``no_grad`` in eval mode; the walk is
    :func:`~wsss_tune.ops.random_walk.random_walk` with ``2**rw.logt`` steps on ``C + 1`` score planes.
    Only the models the pipeline ``stages`` run are timed (:func:`artifact_chain`); the others get 0.

    Args:
        cfg: resolved config (backbones, crops, batches, amp).
        num_classes: object classes C.
        stages: pipeline stages the sweep runs.
        device: torch device (default: ``cfg.run.device`` resolved).
        steps, warmup: timed and untimed repetitions of each step.
    """
    import torch

    from wsss_tune.models.affinity_net import build_affinity_net
    from wsss_tune.models.deeplab import build_deeplab
    from wsss_tune.models.eps_net import build_eps_net
    from wsss_tune.ops.affinity import affinity_from_features
    from wsss_tune.ops.random_walk import random_walk
    from wsss_tune.stages.affinity import make_affinity_step
    from wsss_tune.stages.common import TrainStep, prepare_model, to_device
    from wsss_tune.stages.deeplab import make_deeplab_step, model_kwargs
    from wsss_tune.stages.eps import make_eps_step
    from wsss_tune.utils.runtime import autocast, resolve_device, seed_everything

    if steps < 1 or warmup < 0:
        raise ValueError(f"time_stages: steps={steps} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device) if device is not None else resolve_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    e, a, r, d = cfg.eps, cfg.affinity, cfg.rw, cfg.deeplab
    c = num_classes
    timed = {"steps": steps, "warmup": warmup, "device": device}

    def images(batch: int, crop: int, last: bool) -> torch.Tensor:
        # Placed as the stage runners place their batches (NHWC on CUDA when the stage's flag is set).
        return to_device(torch.randn(batch, 3, crop, crop), device, last)

    def masks(batch: int, crop: int) -> torch.Tensor:
        return torch.randint(0, c + 1, (batch, crop, crop), device=device)

    def time_step(step: TrainStep, batch: dict[str, torch.Tensor]) -> float:
        for group in step.optimizer.param_groups:
            group["lr"] = 0.0
        step.model.train()
        batches = [batch] * step.micro_batches
        seconds = _timed(lambda: step(batches, 1), **timed)
        step.model.eval()
        return seconds

    def time_eps() -> tuple[float, float]:
        eps_net = prepare_model(build_eps_net(backbone=e.backbone, num_classes=c), device, e.channels_last)
        batch = {"image": images(e.batch_size, e.crop_size, e.channels_last),
                 "label": (torch.rand(e.batch_size, c, device=device) < 0.3).float(),
                 "saliency": torch.rand(e.batch_size, 1, e.crop_size, e.crop_size, device=device)}
        eps_step_s = time_step(make_eps_step(e, eps_net, device=device), batch)
        one = images(1, e.crop_size, e.channels_last)

        def eps_forward() -> None:
            with torch.no_grad(), autocast(device, e.amp):
                eps_net.forward_maps(one)

        return eps_step_s, _timed(eps_forward, **timed)

    def time_affinity() -> tuple[float, float, float]:
        aff_net = prepare_model(build_affinity_net(backbone=a.backbone or e.backbone, widths=a.widths,
                                                   out_channels=a.out_channels), device, a.channels_last)
        batch = {"image": images(a.batch_size, a.crop_size, a.channels_last), "mask": masks(a.batch_size, a.crop_size)}
        aff_step_s = time_step(make_affinity_step(a, aff_net, device=device), batch)
        one = images(1, a.crop_size, a.channels_last)
        last: dict[str, torch.Tensor] = {}

        def aff_forward() -> None:
            with torch.no_grad(), autocast(device, a.amp):
                last["feats"] = aff_net(one)
                last["aff"] = affinity_from_features(last["feats"].float(), radius=a.radius)[0]

        aff_forward_s = _timed(aff_forward, **timed)
        scores = torch.rand(c + 1, *last["feats"].shape[-2:], device=device)

        def walk() -> None:
            random_walk(last["aff"], scores, radius=a.radius, beta=r.beta, logt=r.logt, pad_border=False)

        return aff_step_s, aff_forward_s, _timed(walk, **timed)

    def time_deeplab() -> tuple[float, float]:
        dl = build_deeplab(num_classes=c + 1, **model_kwargs(d))
        dl = prepare_model(dl, device, d.channels_last)
        batch = {"image": images(d.batch_size, d.crop_size, d.channels_last), "mask": masks(d.batch_size, d.crop_size)}
        dl_step_s = time_step(make_deeplab_step(d, dl, device=device), batch)
        one = images(1, d.crop_size, d.channels_last)

        def dl_forward() -> None:
            with torch.no_grad(), autocast(device, d.amp):
                dl(one)

        return dl_step_s, _timed(dl_forward, **timed)

    run = {graph.spec(name).stage for name in artifact_chain(cfg, stages)}  # the stages whose models it needs
    eps_step_s, eps_forward_s = time_eps() if "eps" in run else (0.0, 0.0)
    aff_step_s, aff_forward_s, rw_s = time_affinity() if "affinity" in run else (0.0, 0.0, 0.0)
    dl_step_s, dl_forward_s = time_deeplab() if "deeplab" in run else (0.0, 0.0)
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu x{torch.get_num_threads()}"
    return StageTimings(device=name, eps_step=eps_step_s, eps_forward=eps_forward_s, affinity_step=aff_step_s,
                        affinity_forward=aff_forward_s, rw_image=rw_s, deeplab_step=dl_step_s,
                        deeplab_forward=dl_forward_s)


#: Image counts without the dataset (``plan --sizes voc``): the official VOC 2012 + SBD lists
#: (``train_aug`` 10,582 ids, VOC ``train`` 1,464 inside it, ``val`` 1,449; DESIGN.md §2) and their classes.
SIZE_PRESETS: dict[str, tuple[DatasetSizes, int]] = {
    "voc": (DatasetSizes(train=10582, masks=10582, val=1449), 20),
}


def parse_sizes(text: str) -> tuple[DatasetSizes, int | None]:
    """``voc`` (a preset: sizes and class count) or ``TRAIN,MASKS,VAL`` image counts (class count None).

    Raises:
        ValueError: neither (the message names the text and the presets).
    """
    if text in SIZE_PRESETS:
        return SIZE_PRESETS[text]
    try:
        train, masks, val = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"sizes {text!r}: expected a preset ({', '.join(SIZE_PRESETS)}) or TRAIN,MASKS,VAL image "
                         "counts such as 10582,10582,1449") from None
    if min(train, masks, val) < 1 or masks < train:
        raise ValueError(f"sizes {text!r}: expected counts >= 1 with MASKS (train split plus mask-eval split) >= TRAIN")
    return DatasetSizes(train=train, masks=masks, val=val), None


def _model_flops(build: Callable[[], Any], shape: tuple[int, ...], *, train: bool,
                 output: Callable[[Any], Any] = lambda y: y) -> float:
    """FLOPs of one forward (and with ``train`` its backward) of the model ``build()`` makes, on the
    ``meta`` device (shapes only: nothing is computed or allocated)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().train(train)
        x = torch.empty(*shape)
        with FlopCounterMode(display=False) as counter:
            if train:
                y = output(model(x))
                outs = y if isinstance(y, list | tuple) else [y]
                sum(o.float().sum() for o in outs).backward()
            else:
                with torch.no_grad():
                    model(x)
    return float(counter.get_total_flops())


#: Multiply-adds per pixel, plane and neighbour of one random-walk step (weight times score, summed).
_WALK_FLOPS_PER_TAP = 2


# Each model's FLOPs counted once per setting that changes them (a plan averages over many configs).
@functools.lru_cache(maxsize=64)
def _eps_flops(backbone: str, num_classes: int, proj_dim: int, batch: int, crop: int, view: int) -> tuple[float, float]:
    from wsss_tune.models.eps_net import build_eps_net

    def net() -> Any:
        return build_eps_net(backbone=backbone, num_classes=num_classes, proj_dim=proj_dim)

    def maps(y: Any) -> Any:
        return y[0] if isinstance(y, tuple) else y

    step = _model_flops(net, (batch, 3, crop, crop), train=True, output=maps)
    if view:
        step += _model_flops(net, (batch, 3, view, view), train=True, output=maps)
    return step, _model_flops(net, (1, 3, crop, crop), train=False)


@functools.lru_cache(maxsize=64)
def _affinity_flops(backbone: str, widths: tuple[int, ...], out_channels: int, batch: int,
                    crop: int) -> tuple[float, float, int]:
    import torch

    from wsss_tune.models.affinity_net import build_affinity_net

    def net() -> Any:
        return build_affinity_net(backbone=backbone, widths=widths, out_channels=out_channels)

    with torch.device("meta"):
        stride = int(net().output_stride)
    return (_model_flops(net, (batch, 3, crop, crop), train=True), _model_flops(net, (1, 3, crop, crop), train=False),
            stride)


@functools.lru_cache(maxsize=256)
def _deeplab_flops(kwargs: str, num_classes: int, batch: int, crop: int) -> tuple[float, float]:
    from wsss_tune.models.deeplab import build_deeplab

    def net() -> Any:
        return build_deeplab(num_classes=num_classes, **json.loads(kwargs))

    return _model_flops(net, (batch, 3, crop, crop), train=True), _model_flops(net, (1, 3, crop, crop), train=False)


def count_stages(cfg: PipelineConfig, *, num_classes: int, stages: Sequence[str] = ("eps", "affinity", "deeplab"),
                 tflops: float) -> StageTimings:
    """:class:`StageTimings` from counted FLOPs at ``tflops`` TFLOP/s sustained (an assumption, not a
    measurement): for a device that is not here.

    A training step counts its model's forward and backward on one batch of the configured crop (torch's
    ``FlopCounterMode``: convolutions and matrix products, a multiply-add = 2 FLOPs; the loss, the
    optimiser and element-wise work are left out); DeepLab's times ``accumulate`` micro-batches, EPS
    with ``method: eps_ppc`` adds the second view (its side ``ppc_view_scale`` x the crop) and the
    projection head. A forward is one image at the crop. The walk is counted by hand: ``2**logt`` steps
    x ``C + 1`` planes x the crop's pixels at the affinity stride x (2 x neighbours + 1) taps x 2.
    """
    from wsss_tune.ops.neighbors import neighbor_offsets
    from wsss_tune.stages.deeplab import model_kwargs

    if not (isinstance(tflops, int | float) and math.isfinite(tflops) and tflops > 0):
        raise ValueError(f"count_stages: tflops={tflops!r}, expected a throughput > 0")
    rate = tflops * 1e12
    e, a, r, d = cfg.eps, cfg.affinity, cfg.rw, cfg.deeplab
    run = {graph.spec(name).stage for name in artifact_chain(cfg, stages)}
    out = dict.fromkeys(("eps_step", "eps_forward", "affinity_step", "affinity_forward", "rw_image", "deeplab_step",
                         "deeplab_forward"), 0.0)
    if "eps" in run:
        ppc = getattr(e, "method", "eps") == "eps_ppc"
        view = max(1, round(e.crop_size * float(getattr(e, "ppc_view_scale", 1.0)))) if ppc else 0
        step, forward = _eps_flops(e.backbone, num_classes, int(getattr(e, "ppc_proj_dim", 0)) if ppc else 0,
                                   e.batch_size, e.crop_size, view)
        out["eps_step"], out["eps_forward"] = step / rate, forward / rate
    if "affinity" in run:
        step, forward, stride = _affinity_flops(a.backbone or e.backbone, tuple(a.widths), a.out_channels,
                                                a.batch_size, a.crop_size)
        cells = math.ceil(a.crop_size / stride) ** 2
        taps = 2 * len(neighbor_offsets(a.radius)) + 1
        out["affinity_step"], out["affinity_forward"] = step / rate, forward / rate
        out["rw_image"] = 2**r.logt * (num_classes + 1) * cells * taps * _WALK_FLOPS_PER_TAP / rate
    if "deeplab" in run:
        micro, forward = _deeplab_flops(json.dumps(model_kwargs(d), sort_keys=True), num_classes + 1, d.batch_size,
                                        d.crop_size)
        out["deeplab_step"], out["deeplab_forward"] = micro * d.accumulate / rate, forward / rate
    return StageTimings(device=f"an assumed {tflops:g} TFLOP/s device (counted FLOPs)", **out)


# --------------------------------------------------------------------------------------------------
# Presenting
# --------------------------------------------------------------------------------------------------


def format_plan(est: CostEstimate, *, alternatives: Mapping[str, CostEstimate] | None = None) -> str:
    """Plain-text plan: one line per artifact, totals, the scenarios compared, the assumptions."""
    lines = [f"Sweep cost estimate: {est.trials} trials on {est.gpus} device(s), cache {'on' if est.cache else 'off'}, "
             f"early stopping {'ASHA' if est.asha else 'off'}", ""]
    width = max([10, *(len(r.artifact) for r in est.rows), *(len(label) + 5 - 25 for label, _ in est.references)])
    head = f"{'artifact':<{width}} {'h/build':>9} {'builds':>7} {'work':>6} {'device-h':>10}  composition"
    lines += [head, "-" * len(head)]
    for r in est.rows:
        lines.append(f"{r.artifact:<{width}} {r.seconds / _HOUR:>9.3f} {r.builds:>7.2f} {r.work_fraction:>6.0%} "
                     f"{r.device_seconds / _HOUR:>10.2f}  {'shared, ' if r.shared else ''}{r.detail}")
    for label, hours in est.references:
        lines.append(f"{'ref. ' + label:<{width + 25}} {hours:>10.2f}  reference point: one trial at its own "
                     "settings, never stopped early")
    lines += ["", f"one trial, start to end:   {est.per_trial_hours:10.2f} h",
              f"total device time:         {est.device_hours:10.2f} device-hours",
              f"expected wall clock:       {est.wall_hours:10.2f} h on {est.gpus} device(s)"]
    if est.shared_hours > 0 and est.waiting_device_hours > 0:
        lines.append(f"shared build first:        {est.waiting_device_hours:10.2f} device-hours not held idle "
                     f"({min(est.gpus, est.trials) - 1} device(s) x {est.shared_hours:.2f} h of shared build)")
    if alternatives:
        lines += ["", f"{'scenario':<28} {'device-h':>10} {'wall h':>9}"]
        for label, alt in alternatives.items():
            lines.append(f"{label:<28} {alt.device_hours:>10.2f} {alt.wall_hours:>9.2f}")
    lines += ["", "Assumptions:", *(f"  - {a}" for a in est.assumptions)]
    return "\n".join(lines)


#: Config fields no unit time depends on (:func:`time_stages` and :func:`count_stages` time one step at
#: LR 0, one forward, one walk of ``2**rw.logt`` steps): a plan times each setting of the others once.
_UNTIMED = frozenset({
    "lr", "head_lr_mult", "head_bias_lr_mult", "bn_lr_mult", "momentum", "weight_decay", "poly_power", "iterations",
    "epochs", "eval_every", "eval_images", "checkpoint_every", "log_every", "tau", "lam", "bg_threshold", "bg_mode",
    "cam_scales", "cam_flip", "beta", "alpha", "pad_border", "test_scales", "test_flip", "crf", "save_predictions",
    "pretrained", "seed", *graph.PSEUDO_CRF_FIELDS})


def plan(
    space: str | Path,
    *,
    data: str | Path | None = None,
    gpus: int = 1,
    trials: int | None = None,
    cache: bool = True,
    asha: bool = True,
    steps: int = DEFAULT_TIMED_STEPS,
    device: str | None = None,
    sizes: str | None = None,
    tflops: float | None = None,
) -> tuple[CostEstimate, str]:
    """Load ``space``, time its stages, estimate the sweep (:func:`expected_cost`); returns the estimate
    and its text, which compares the four scenarios (cache on/off x ASHA on/off) under the chosen one.

    Args:
        sizes: Image counts instead of the dataset's (:func:`parse_sizes`: ``voc`` or ``T,M,V``); then the
            dataset need not exist.
        tflops: Unit times from counted FLOPs at this throughput (:func:`count_stages`) instead of timing
            the models on this machine's ``device``.
    """
    from wsss_tune.data import VOCLayout
    from wsss_tune.spaces import load_space

    sp = load_space(space)
    cfg = sp.base_config()
    if data is not None:
        cfg = apply_overrides(cfg, {"data.root": str(Path(data).expanduser().resolve())})
    have_data = Path(cfg.data.root).is_dir()
    classes: int | None = None
    if sizes is not None:
        counts, classes = parse_sizes(sizes)
    elif not have_data:
        raise FileNotFoundError(f"data root {cfg.data.root!r} does not exist (pass --data ROOT, or --sizes voc to price "
                                "the official VOC image counts)")
    else:
        counts = dataset_sizes(cfg)
    if classes is None:
        classes = VOCLayout.from_config(cfg.data).num_classes if have_data else SIZE_PRESETS["voc"][1]
    n = trials if trials is not None else sp.num_samples
    memo: dict[str, StageTimings] = {}

    def timer(c: PipelineConfig) -> StageTimings:
        # Timed once per setting that can change a unit time (the schedule and test-time fields cannot).
        key = json.dumps({k: {f: v for f, v in to_dict(getattr(c, k)).items() if f not in _UNTIMED}
                          for k in ("eps", "affinity", "rw", "deeplab")}, sort_keys=True)
        if key not in memo:
            memo[key] = (count_stages(c, num_classes=classes, stages=sp.stages, tflops=tflops) if tflops is not None
                         else time_stages(c, num_classes=classes, stages=sp.stages, device=device, steps=steps))
        return memo[key]

    est = expected_cost(timer, sp, cfg, n, gpus, cache=cache, asha=asha, sizes=counts)
    if sizes is not None:
        est = dataclasses.replace(est, assumptions=(*est.assumptions, f"image counts {sizes!r}: train {counts.train:,}, "
                                                    f"CAM/refined masks {counts.masks:,}, val {counts.val:,}; "
                                                    f"{classes} classes"))
    alternatives = {f"cache {'on' if c else 'off'}, ASHA {'on' if s else 'off'}":
                    expected_cost(timer, sp, cfg, n, gpus, cache=c, asha=s, sizes=counts)
                    for c in (True, False) for s in (True, False)}
    return est, format_plan(est, alternatives=alternatives)


# --------------------------------------------------------------------------------------------------
# GPU memory: does a stage's training step fit on a trial's share of a card?
# --------------------------------------------------------------------------------------------------

#: Bytes of a float32 value (weights, gradients, optimiser state) and of a 16-bit value.
FLOAT32_BYTES = 4
HALF_BYTES = 2
#: Share of the float32 activation bytes kept under autocast: the saved activations are 16-bit (an
#: approximation: the few float32 ones, such as BN statistics, are small).
AMP_ACTIVATION_SHARE = 0.5
#: Peak memory of a step over its saved activations: the backward pass's gradients of activations,
#: the forward's unsaved temporaries and allocator fragmentation (our choice, a margin).
ACTIVATION_PEAK_FACTOR = 1.25
#: Per-process CUDA context and cuDNN / cuBLAS workspaces, outside the caching allocator (our choice).
CUDA_OVERHEAD_BYTES = 1.0e9
#: An estimate above this share of the trial's GPU memory is a warning (tight: fragmentation, other
#: processes), above 1 a problem.
MEMORY_WARN_SHARE = 0.9
#: Optimiser state tensors per trainable parameter: SGD's momentum buffer (none without momentum), Adam's
#: two moments.
OPTIMIZER_STATES = {"sgd": 1, "adam": 2}
#: The stages whose training the memory model knows (their config sections have batch_size, crop_size, amp).
MEMORY_STAGES = ("eps", "affinity", "deeplab")


@dataclass(frozen=True, kw_only=True)
class MemoryProfile:
    """What a stage's model holds in one training step, per input pixel (:func:`measure_memory_profile`).

    Attributes:
        model: what was measured (``deeplab v2 resnet101 msc``).
        params, trainable: parameter counts (all, and those the optimiser updates).
        activation_bytes_per_pixel: float32 bytes autograd saves for the backward pass, per input pixel
            of one image; 16-bit under autocast.
        fp32_bytes_per_pixel: saved bytes per pixel that stay float32 under autocast (AffinityNet's
            pair affinities).
    """

    model: str
    params: int
    trainable: int
    activation_bytes_per_pixel: float
    fp32_bytes_per_pixel: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes one training step of a stage needs on its GPU (:func:`estimate_memory`)."""

    stage: str
    model: str
    batch: int
    crop: int
    amp: bool
    weights: float
    casts: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.casts + self.gradients + self.optimizer + self.activations + self.overhead

    def text(self) -> str:
        return (f"{self.stage} ({self.model}, batch {self.batch}, crop {self.crop}, amp {'on' if self.amp else 'off'}): "
                f"~{self.total / 1e9:.1f} GB = activations {self.activations / 1e9:.1f} + weights, gradients and "
                f"optimiser {(self.weights + self.casts + self.gradients + self.optimizer) / 1e9:.1f} + CUDA "
                f"{self.overhead / 1e9:.1f}")


def optimizer_states(kind: str, momentum: float) -> int:
    """State tensors per trainable parameter of the stage's optimiser (:data:`OPTIMIZER_STATES`)."""
    if kind == "sgd" and momentum == 0:
        return 0
    return OPTIMIZER_STATES[kind]


def estimate_memory(profile: MemoryProfile, *, stage: str, batch: int, crop: int, amp: bool,
                    optimizer_states: int) -> MemoryEstimate:
    """GPU bytes of one training step (pure arithmetic)::

        weights     = 4 B x params
        casts       = 2 B x params under autocast (its 16-bit copies of the weights), else 0
        gradients   = 4 B x trainable
        optimizer   = 4 B x trainable x optimizer_states
        activations = (activation_bytes_per_pixel x (0.5 under autocast, else 1) + fp32_bytes_per_pixel)
                      x crop^2 x batch x 1.25 (ACTIVATION_PEAK_FACTOR)
        overhead    = 1 GB (CUDA_OVERHEAD_BYTES)

    Activations scale with the pixels of the batch (``crop^2 x batch``; per micro-batch with gradient
    accumulation).
    """
    if batch < 1 or crop < 1:
        raise ValueError(f"estimate_memory: batch={batch} and crop={crop} must be >= 1")
    per_pixel = profile.activation_bytes_per_pixel * (AMP_ACTIVATION_SHARE if amp else 1.0) + profile.fp32_bytes_per_pixel
    return MemoryEstimate(
        stage=stage, model=profile.model, batch=batch, crop=crop, amp=amp,
        weights=FLOAT32_BYTES * profile.params,
        casts=HALF_BYTES * profile.params if amp else 0.0,
        gradients=FLOAT32_BYTES * profile.trainable,
        optimizer=FLOAT32_BYTES * profile.trainable * optimizer_states,
        activations=per_pixel * crop * crop * batch * ACTIVATION_PEAK_FACTOR,
        overhead=CUDA_OVERHEAD_BYTES,
    )


def saved_tensor_bytes(fn: Callable[[], Any], *, exclude: Any = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``fn()`` runs (tensors
    sharing a storage count once; ``exclude``: tensors such as parameters not to count)."""
    import torch

    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in skip:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


#: Images of the forward :func:`measure_memory_profile` runs (the bytes are per image pixel).
_PROFILE_BATCH = 2


@functools.lru_cache(maxsize=32)
def _profile(stage: str, label: str, model_args: tuple[tuple[str, Any], ...], crop: int, radius: int) -> MemoryProfile:
    import torch

    from wsss_tune.models.affinity_net import build_affinity_net
    from wsss_tune.models.deeplab import build_deeplab
    from wsss_tune.models.eps_net import build_eps_net
    from wsss_tune.ops.affinity import affinity_from_features

    args = dict(model_args)
    build: Callable[..., Any] = {"eps": build_eps_net, "affinity": build_affinity_net, "deeplab": build_deeplab}[stage]
    with torch.device("meta"):
        model = build(**args).train()  # frozen BatchNorm stays in eval mode (the models' own train())
        # Two images (per image below): BatchNorm after a global pool needs more than one in training.
        x = torch.empty(_PROFILE_BATCH, 3, crop, crop)
        params = list(model.parameters())
        out: dict[str, Any] = {}
        act = saved_tensor_bytes(lambda: out.setdefault("y", model(x)), exclude=params)
        fp32 = 0
        if stage == "affinity":
            fp32 = saved_tensor_bytes(lambda: affinity_from_features(out["y"], radius=radius), exclude=params)
    pixels = _PROFILE_BATCH * crop**2
    return MemoryProfile(model=label, params=sum(p.numel() for p in params),
                         trainable=sum(p.numel() for p in params if p.requires_grad),
                         activation_bytes_per_pixel=act / pixels, fp32_bytes_per_pixel=fp32 / pixels)


def measure_memory_profile(cfg: PipelineConfig, stage: str, *, num_classes: int) -> MemoryProfile:
    """The :class:`MemoryProfile` of ``stage``'s model as ``cfg`` builds it, measured once per model.

    The model is built on the ``meta`` device (shapes only: no memory, no compute, no weights read) and
    run forward in training mode on one image of the stage's crop, counting the bytes autograd saves
    (:func:`saved_tensor_bytes`, parameters excluded; for AffinityNet the pair affinities separately, as
    they stay float32). Training-time BatchNorm freezing of DeepLab is honoured; the loss is left out
    (its saved tensors are at the output stride, small next to the backbone's).
    """
    e, a, d = cfg.eps, cfg.affinity, cfg.deeplab
    if stage == "eps":
        args: dict[str, Any] = {"backbone": e.backbone, "num_classes": num_classes}
        label, crop = f"EPSNet {e.backbone}", e.crop_size
    elif stage == "affinity":
        args = {"backbone": a.backbone or e.backbone, "widths": tuple(a.widths), "out_channels": a.out_channels}
        label, crop = f"AffinityNet {args['backbone']}", a.crop_size
    elif stage == "deeplab":
        args = {"arch": d.arch, "backbone": d.backbone, "num_classes": num_classes + 1, "msc": d.msc,
                "freeze_bn": d.freeze_bn}
        label, crop = f"DeepLab {d.arch} {d.backbone}{' msc' if d.msc else ''}", d.crop_size
    else:
        raise ValueError(f"measure_memory_profile: stage {stage!r}; expected one of {', '.join(MEMORY_STAGES)}")
    return _profile(stage, label, tuple(args.items()), crop, a.radius)


def stage_memory(cfg: PipelineConfig, stage: str, *, num_classes: int, ranks: int = 1) -> MemoryEstimate:
    """:func:`estimate_memory` of ``stage``'s training step with ``cfg``'s batch (per micro-batch; split
    over ``ranks`` data-parallel GPUs, each holding ``ceil(batch / ranks)``), crop, amp and optimiser."""
    section = getattr(cfg, stage)
    profile = measure_memory_profile(cfg, stage, num_classes=num_classes)
    return estimate_memory(profile, stage=stage, batch=math.ceil(section.batch_size / max(1, ranks)),
                           crop=section.crop_size, amp=section.amp,
                           optimizer_states=optimizer_states(section.optimizer, section.momentum))


def check_gpu_memory(cfg: PipelineConfig, stages: Sequence[str], *, gpu_bytes: float | None, gpus_per_trial: float,
                     num_classes: int = 20, gpu_name: str = "") -> list[Any]:
    """One check per training stage a run of ``stages`` builds: does its step fit on the trial's GPU
    memory, ``gpu_bytes x min(gpus_per_trial, 1)`` (a fractional trial is capped at its share; a trial
    with several GPUs holds its share of the batch on each)?

    ``problem`` above that budget, ``warn`` above :data:`MEMORY_WARN_SHARE` of it; nothing for trials on
    the CPU (``gpus_per_trial`` 0 or ``run.device: cpu``); one ``warn`` when the card is unknown
    (``gpu_bytes`` None: no GPU visible here).

    Returns:
        :class:`~wsss_tune.doctor.Check` s named ``memory.<stage>``.
    """
    from wsss_tune.doctor import Check

    if gpus_per_trial <= 0 or cfg.run.device == "cpu":
        return []
    if gpu_bytes is None:
        return [Check("memory", "warn", f"trials get {gpus_per_trial:g} GPU but no GPU is visible here: their memory "
                      "is not checked", "run the pre-flight check on a GPU node, or give the card's memory "
                      "(`wsss-tune preflight CONFIG --gpu-memory 24`)")]
    share = min(float(gpus_per_trial), 1.0)
    budget = gpu_bytes * share
    card = f"{gpu_name + ' ' if gpu_name else ''}{gpu_bytes / 1e9:.1f} GB" + (f" x {share:g}" if share < 1 else "")
    trained = {graph.spec(name).stage for name in artifact_chain(cfg, stages) if graph.spec(name).trains}
    checks = []
    for stage in (s for s in MEMORY_STAGES if s in trained):
        try:
            est = stage_memory(cfg, stage, num_classes=num_classes, ranks=math.floor(max(1.0, gpus_per_trial)))
        except Exception as exc:  # noqa: BLE001 - a model the meta device cannot run is not a reason to stop
            checks.append(Check(f"memory.{stage}", "warn", f"not estimated: its model does not run on the meta "
                                f"device ({type(exc).__name__}: {exc})"))
            continue
        fix = (f"lower {stage}.batch_size" + (" (raise deeplab.accumulate to keep the effective batch)"
                                              if stage == "deeplab" else "")
               + f" or {stage}.crop_size" + ("" if est.amp else f", set {stage}.amp=true")
               + ", or give each trial a larger GPU share (--gpus-per-trial)")
        text = f"{est.text()}; the trial has {budget / 1e9:.1f} GB ({card})"
        if est.total > budget:
            checks.append(Check(f"memory.{stage}", "problem", f"{text}: does not fit", fix))
        elif est.total > MEMORY_WARN_SHARE * budget:
            checks.append(Check(f"memory.{stage}", "warn", f"{text}: tight (over {MEMORY_WARN_SHARE:.0%})", fix))
        else:
            checks.append(Check(f"memory.{stage}", "ok", text))
    return checks
