"""Search efficiency: the compute TPE (+ fidelity-aware ASHA) and random search need to reach 98 % of
the best value either found, at equal compute, over several seeds.

Two objectives, each labelled in its rows:

* ``real: synth_rw`` - the shipped ``synth_rw`` space (random-walk beta, logt, alpha) on a freshly
  generated synthetic dataset, each trial a real :func:`~wsss_tune.stages.pipeline.run_pipeline`
  call over one artifact store: EPS and AffinityNet are trained once and served from the cache, a
  trial costs one random walk. Compute = the walk stage's measured seconds. The space has no
  fidelity (one pass of the walk yields every t), so this row compares TPE with random search only.
* ``real: synth_deeplab`` - the shipped ``synth_deeplab`` space (DeepLab lr, head weight and bias
  multipliers) on the same dataset and store, with its fidelity: every trial trains DeepLab on the
  cached refined masks and reports ``deeplab_miou_tune`` every ``deeplab.eval_every`` (100) of its
  300 steps; TPE runs with ASHA (Optuna's ``SuccessiveHalvingPruner``, grace and
  reduction factor from the space) and random search runs every trial to the end. Compute = DeepLab
  training steps.
* ``surrogate (not a pipeline)`` - a labelled stand-in with a fidelity: three parameters in the
  synth pipeline's ranges, a smooth optimum, learning curves that rise with the training steps and
  seeded noise; compute = training steps. Here TPE runs with ASHA (Optuna's
  ``SuccessiveHalvingPruner``, the asynchronous successive halving of Li et al. 2020) and stopped
  trials are told as PRUNED with their intermediate values, never as complete with a truncated value
  (Optuna's TPE ranks a pruned trial by how far it got, then by its last value): the fidelity-aware
  setup of the sweeps.

Both arms start from the space's reference point (as every sweep does) and stop at the same compute
budget. The searches run in-process with Optuna's ask-and-tell API (no Ray), so the numbers measure
the search algorithms, not the cluster. Per seed: ``target = 0.98 x`` the best value of either arm;
``*_to_target`` = compute spent until an arm's first completed trial at or above it;
``ratio = random / TPE`` (above 1: TPE got there with less compute; when random search never got
there within the budget, ``budget / TPE`` is reported as a lower bound). Published anchors: ASHA matched
Google Vizier in half the time (Li et al., MLSys 2020); Hyperband reports over 10x speed-ups over
Bayesian optimisation on some tasks (Li et al., JMLR 2018).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run", "surrogate_value", "compute_to_target", "speedup"]

#: Share of the best value an arm must reach (the task's criterion).
TARGET_SHARE = 0.98
#: Seeds of the samplers (and of the surrogate noise); the real objective costs minutes per seed.
SEEDS_QUICK, SEEDS_FULL = (0, 1, 2), (0, 1, 2, 3, 4)
RW_SEEDS_QUICK, RW_SEEDS_FULL = (0,), (0, 1, 2)
#: Compute budget in reference-trial equivalents (real) / full-fidelity trials (surrogate). TPE
#: samples its first 10 trials at random (Optuna's ``n_startup_trials``, which the sweeps keep), the
#: same points as random search with the same seed: a budget of about 10 trials compares nothing.
BUDGET_QUICK, BUDGET_FULL = 20, 30
#: Surrogate fidelity: ASHA rungs at 3 and 9 of 27 steps (grace 3, eta 3), like the spaces' schedules.
SURROGATE_MAX_T, SURROGATE_GRACE, SURROGATE_ETA = 27, 3, 3
#: Surrogate optimum and axis weights in the unit cube of (log lr, log head multiplier, tau).
_OPT = (0.62, 0.35, 0.45)
_WEIGHTS = (1.0, 0.6, 0.8)
#: Surrogate mIoU at the optimum and its fall-off; the floor keeps it in a plausible range.
_TOP, _FALL, _FLOOR = 75.0, 60.0, 20.0
#: Surrogate learning curve ``final * (1 - _CURVE_DEPTH * exp(-_CURVE_RATE * t / max_t))`` and noise.
_CURVE_DEPTH, _CURVE_RATE, _NOISE = 0.5, 4.0, 0.5
#: Surrogate ranges (the synth pipeline space's deeplab.lr, deeplab.head_lr_mult, eps.tau).
_RANGES = {"deeplab.lr": (1e-4, 1e-2, True), "deeplab.head_lr_mult": (1.0, 30.0, True), "eps.tau": (0.1, 0.7, False)}
_SURROGATE_REFERENCE = {"deeplab.lr": 1e-3, "deeplab.head_lr_mult": 10.0, "eps.tau": 0.4}
#: Synthetic dataset of the real objective: the ``tiny`` preset (24 training images, 64 px) keeps a walk
#: under a second on 2 CPU cores; on the ``default`` preset (600 images) one takes 10-20 s there, and
#: 3 seeds x 2 arms x 30 trials take over an hour.
RW_PRESET = "tiny"
#: Quick runs shrink the shared EPS / AffinityNet training of the real objective (built once).
_QUICK_OVERRIDES = {"eps.iterations": 100, "eps.eval_every": 0, "affinity.iterations": 60}
#: DeepLab objective: single-scale evaluation keeps a trial at seconds on the tiny preset (the search
#: compares learning rates; the test-time augmentation adds the same to every trial).
_DEEPLAB_OVERRIDES = {"deeplab.test_scales": [1.0], "deeplab.test_flip": False}
DEEPLAB_SEEDS_QUICK, DEEPLAB_SEEDS_FULL = (0,), (0, 1, 2)


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def compute_to_target(history: list[tuple[float, float | None]], target: float) -> float:
    """Cumulative compute at the first completed trial whose value reaches ``target`` (inf if none).

    ``history`` is ``(compute of the trial, value or None when stopped early)`` in order.
    """
    spent = 0.0
    for cost, value in history:
        spent += cost
        if value is not None and value >= target:
            return spent
    return math.inf


def surrogate_value(params: dict[str, float], step: int, seed: int) -> float:
    """The labelled surrogate's mIoU of ``params`` after ``step`` of :data:`SURROGATE_MAX_T` steps."""
    import numpy as np

    u = []
    for name, (lo, hi, log) in _RANGES.items():
        x = params[name]
        u.append((math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo)) if log else (x - lo) / (hi - lo))
    dist = sum(w * (a - b) ** 2 for w, a, b in zip(_WEIGHTS, u, _OPT, strict=True))
    final = max(_FLOOR, _TOP - _FALL * dist)
    rng = np.random.default_rng([seed, step, *(int(1e6 * v) for v in u)])
    curve = 1.0 - _CURVE_DEPTH * math.exp(-_CURVE_RATE * step / SURROGATE_MAX_T)
    return final * curve + float(rng.normal(0.0, _NOISE))


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


def _study(seed: int, *, tpe: bool, asha: tuple[int, int] | None) -> Any:
    """A maximising Optuna study: TPE or random sampling, and with ``asha = (grace, eta)`` Optuna's
    successive-halving pruner (no pruning otherwise)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed) if tpe else optuna.samplers.RandomSampler(seed=seed)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=asha[0], reduction_factor=asha[1])
              if asha else optuna.pruners.NopPruner())
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def _surrogate_arm(seed: int, budget: float, *, tpe: bool) -> list[tuple[float, float | None]]:
    import optuna

    dists = {n: optuna.distributions.FloatDistribution(lo, hi, log=log) for n, (lo, hi, log) in _RANGES.items()}
    study = _study(seed, tpe=tpe, asha=(SURROGATE_GRACE, SURROGATE_ETA) if tpe else None)
    study.enqueue_trial(_SURROGATE_REFERENCE)
    history: list[tuple[float, float | None]] = []
    spent = 0.0
    while spent < budget:
        trial = study.ask(dists)
        steps, value = 0, None
        for step in range(1, SURROGATE_MAX_T + 1):
            steps = step
            v = surrogate_value(trial.params, step, seed)
            trial.report(v, step)
            if trial.should_prune():
                break
        else:
            value = v
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
        history.append((float(steps), value))
        spent += steps
    return history


def _walk_seconds(metrics: dict[str, Any]) -> float:
    """Build seconds of the run's random-walk artifact, the same whether this run built it or the cache
    served it (an arm pays for every trial it asks for, even one another arm already computed)."""
    from wsss_tune.analysis.tables import artifact_build_seconds

    info = metrics["stages"]["rw"]
    seconds = artifact_build_seconds(info)
    return float(seconds if seconds is not None else info["seconds"])


def _rw_setup(root: Path, quick: bool) -> tuple[Any, Any, Any, dict[str, Any], float]:
    """Generate the data, train EPS and AffinityNet once into a store; returns (space, cfg, store,
    reference point, seconds of the reference point's walk)."""
    from wsss_tune.artifacts import ArtifactStore
    from wsss_tune.config import apply_overrides
    from wsss_tune.data import generate_synthetic_voc
    from wsss_tune.reporting import NullReporter
    from wsss_tune.spaces import load_space
    from wsss_tune.stages.pipeline import run_pipeline

    space = load_space("synth_rw")
    data = generate_synthetic_voc(root / "data", preset=RW_PRESET, seed=0)
    overrides = {"data.root": str(data), "data.num_workers": 0, **(_QUICK_OVERRIDES if quick else {})}
    cfg = apply_overrides(space.base_config(), overrides)
    store = ArtifactStore(uri=str(root / "store"))
    m = run_pipeline(cfg, stages=space.stages, out_dir=root / "runs" / "warmup", reporter=NullReporter(), store=store)
    return space, cfg, store, space.reference_point(), _walk_seconds(m)


def _rw_arm(seed: int, budget: float, *, tpe: bool, setup: tuple[Any, Any, Any, dict[str, Any], float],
            root: Path) -> list[tuple[float, float | None]]:
    from wsss_tune.config import apply_overrides
    from wsss_tune.reporting import NullReporter
    from wsss_tune.stages.pipeline import run_pipeline

    space, cfg, store, reference, _ = setup
    dists = _distributions(space)
    study = _study(seed, tpe=tpe, asha=None)
    study.enqueue_trial(reference)
    history: list[tuple[float, float | None]] = []
    spent = 0.0
    while spent < budget:
        trial = study.ask(dists)
        out = root / "runs" / f"{'tpe' if tpe else 'random'}{seed}_{trial.number}"
        m = run_pipeline(apply_overrides(cfg, trial.params), stages=space.stages, out_dir=out, reporter=NullReporter(),
                         store=store)
        value = float(m[space.metric])
        cost = _walk_seconds(m)
        study.tell(trial, value)
        history.append((cost, value))
        spent += cost
    return history


class Pruned(Exception):
    """Raised from the reporter when ASHA stops a trial (ends the pipeline run mid-stage)."""


class RungReporter:
    """Hands the space's metric to an Optuna trial at each of the stage's reports and stops the run
    when the pruner says so; remembers the values (a cache hit reports none: they are replayed)."""

    def __init__(self, trial: Any, *, stage: str, metric: str, max_t: int, prune: bool) -> None:
        self.trial, self.stage, self.metric, self.max_t, self.prune = trial, stage, metric, max_t, prune
        self.values: list[tuple[int, float]] = []

    def report(self, metrics: Any, *, step: int, checkpoint_dir: str | None = None) -> None:
        # A cache hit reports the stage's final metrics without a step: its curve is replayed instead.
        if metrics.get("stage") != self.stage or self.metric not in metrics or "stage_step" not in metrics:
            return
        at = int(metrics["stage_step"])
        if at >= self.max_t or any(s == at for s, _ in self.values):
            return
        self.values.append((at, float(metrics[self.metric])))
        self.step(at, float(metrics[self.metric]))

    def step(self, at: int, value: float) -> None:
        self.trial.report(value, at)
        if self.prune and self.trial.should_prune():
            raise Pruned(at)


def _deeplab_arm(seed: int, budget: float, *, tpe: bool, setup: tuple[Any, Any, Any, dict[str, Any], float],
                 root: Path, memo: dict[tuple, list[tuple[int, float]]]) -> list[tuple[float, float | None]]:
    import optuna

    from wsss_tune.config import apply_overrides
    from wsss_tune.spaces import load_space
    from wsss_tune.stages.pipeline import run_pipeline

    _, cfg, store, _, _ = setup
    space = load_space("synth_deeplab")
    f = space.fidelity
    dists = _distributions(space)
    study = _study(seed, tpe=tpe, asha=(f.grace_period, f.reduction_factor) if tpe else None)
    study.enqueue_trial(space.reference_point())
    history: list[tuple[float, float | None]] = []
    spent = 0.0
    while spent < budget:
        trial = study.ask(dists)
        key = tuple(sorted(trial.params.items()))
        reporter = RungReporter(trial, stage="deeplab", metric=space.metric, max_t=f.max_t, prune=tpe)
        out = root / "runs" / f"dl_{'tpe' if tpe else 'random'}{seed}_{trial.number}"
        try:
            if key in memo:  # this arm asks for a point already trained: replay its curve
                for at, v in memo[key]:
                    reporter.step(at, v)
            m = run_pipeline(apply_overrides(cfg, {**_DEEPLAB_OVERRIDES, **trial.params}), stages=space.stages,
                             out_dir=out, reporter=reporter, store=store)
        except Pruned as stop:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            history.append((float(stop.args[0]), None))
            spent += stop.args[0]
            continue
        memo.setdefault(key, reporter.values)
        value = float(m[space.metric])
        study.tell(trial, value)
        history.append((float(f.max_t), value))
        spent += f.max_t
    return history


def _distributions(space: Any) -> dict[str, Any]:
    """Optuna distributions of a search space (the sweep's conversion; it lives with the trainables)."""
    from wsss_tune.trainables.search import optuna_distributions

    return optuna_distributions(space)


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


def speedup(c_tpe: float, c_random: float, budget: float) -> tuple[float, str]:
    """``random / TPE`` compute to the target, and how to read it: ``exact``; ``lower bound`` when random
    search never reached the target (it would have needed more than ``budget``); ``upper bound`` when
    TPE never did; ``nan`` when neither did."""
    if math.isfinite(c_tpe) and math.isfinite(c_random):
        return c_random / c_tpe, "exact"
    if math.isfinite(c_tpe):
        return budget / c_tpe, "lower bound"
    if math.isfinite(c_random):
        return c_random / budget, "upper bound"
    return math.nan, "neither reached"


def _compare(label: str, unit: str, seeds: tuple[int, ...], budget: float,
             arm: Callable[[int, float, bool], list[tuple[float, float | None]]]) -> list[dict[str, Any]]:
    rows, ratios = [], []
    for seed in seeds:
        t0 = time.perf_counter()
        tpe, rnd = arm(seed, budget, True), arm(seed, budget, False)
        best = max(v for _, v in tpe + rnd if v is not None)
        target = TARGET_SHARE * best
        c_tpe, c_rnd = compute_to_target(tpe, target), compute_to_target(rnd, target)
        ratio, kind = speedup(c_tpe, c_rnd, budget)
        ratios.append(ratio)
        rows.append({"objective": label, "seed": seed, "unit": unit, "budget": budget,
                     "tpe_trials": len(tpe), "tpe_stopped": sum(v is None for _, v in tpe), "random_trials": len(rnd),
                     "best": best, "tpe_best": max((v for _, v in tpe if v is not None), default=math.nan),
                     "random_best": max((v for _, v in rnd if v is not None), default=math.nan),
                     "tpe_to_target": c_tpe, "random_to_target": c_rnd, "ratio": ratio, "ratio_is": kind,
                     "wall_s": time.perf_counter() - t0})
    known = [r for r in ratios if not math.isnan(r)]
    bounds = sum(r["ratio_is"] != "exact" for r in rows)
    rows.append({"objective": label, "seed": "median", "unit": unit, "budget": budget,
                 "ratio": statistics.median(known) if known else math.nan,
                 "ratio_is": "exact" if not bounds else f"{bounds} of {len(rows)} seeds are bounds"})
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    seeds = SEEDS_QUICK if quick else SEEDS_FULL
    budget = BUDGET_QUICK if quick else BUDGET_FULL
    rows = _compare("surrogate (not a pipeline): TPE+ASHA vs random", "steps", seeds,
                    float(budget * SURROGATE_MAX_T), lambda s, b, tpe: _surrogate_arm(s, b, tpe=tpe))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = _rw_setup(root, quick)
        walk_s = setup[-1]  # budget: `budget` walks of the reference point
        rw_seeds = RW_SEEDS_QUICK if quick else RW_SEEDS_FULL
        rows += _compare("real: synth_rw (no fidelity: TPE vs random)", "walk seconds", rw_seeds, budget * walk_s,
                         lambda s, b, tpe: _rw_arm(s, b, tpe=tpe, setup=setup, root=root))
        from wsss_tune.spaces import load_space

        max_t = load_space("synth_deeplab").fidelity.max_t
        memo: dict[tuple, list[tuple[int, float]]] = {}
        dl_seeds = DEEPLAB_SEEDS_QUICK if quick else DEEPLAB_SEEDS_FULL
        rows += _compare("real: synth_deeplab (TPE+ASHA vs random)", "DeepLab steps", dl_seeds, float(budget * max_t),
                         lambda s, b, tpe: _deeplab_arm(s, b, tpe=tpe, setup=setup, root=root, memo=memo))
    return rows
