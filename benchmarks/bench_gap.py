"""Reproduction gap: how much of the gap between the paper's setting and the best reachable config
each search closes, against the compute it spent.

The setting is the ``synth_gap`` space: every parameter the mission searches (EPS tau/lam, the
walk's beta/t/alpha, DeepLab's learning rate and head multipliers), starting from ``synth_paper``
(the paper's values on the synthetic pipeline). Three arms, each starting from that reference point,
at equal compute, for several sampler seeds:

* ``cascade``   - EPS on ``eps_miou_tune``, then the walk on ``rw_miou_tune`` (EPS and AffinityNet from
  the cache), then DeepLab on ``deeplab_miou_tune`` with ASHA; each stage's best frozen downstream;
  the budget split :data:`CASCADE_SHARES` between the stages (the product's ``--mode cascade``);
* ``joint``     - TPE + ASHA over every parameter at once, judged by ``deeplab_miou_tune``;
* ``random``    - random search over every parameter, every trial to its end.

The searches run in-process with Optuna's ask-and-tell API over one artifact store (no Ray, so the
numbers measure the search strategies); ASHA is Optuna's ``SuccessiveHalvingPruner`` on DeepLab's
steps with the space's grace period and reduction factor. **Compute** is the build time of every
artifact a trial needed (training and evaluation: the seconds the store recorded when it built it),
charged once per arm, whether this arm's trial built it or the shared store already held it from
another arm: each arm pays as if it had a cache of its own. An arm's **choice** at any point is its
completed trial with the best *tune* metric so far; its value is that config's *held-out*
``deeplab_miou_heldout`` (for the cascade: the best DeepLab trial, which carries the frozen EPS and
walk values). **Gap closed** = (chosen held-out - paper held-out) / (oracle held-out - paper held-out),
1 - normalised regret, with the oracle recorded in ``search_spaces/oracles.json`` (``gap_oracle``).
Rows print as each arm finishes; a row per arm and seed lists the gap closed at 25/50/75/100 % of
the budget, and the compute at which the arm first reached 90 % of the oracle's gain.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .bench_search_efficiency import Pruned, RungReporter

__all__ = ["run", "gap_closed_curve", "ORACLE_SHARE"]

#: The space and the recorded oracle's key.
SPACE = "synth_gap"
#: Sampler seeds per arm (full run / quick smoke run).
SEEDS_FULL, SEEDS_QUICK = (0, 1, 2), (0,)
#: Compute budget in multiples of one full reference run's compute (EPS + AffinityNet + walk + DeepLab).
BUDGET_FULL, BUDGET_QUICK = 8.0, 3.0
#: Share of the budget each cascade stage may spend, in pipeline order.
CASCADE_SHARES = {"eps": 0.35, "affinity": 0.15, "deeplab": 0.5}
#: "Reached the oracle": this share of the oracle's gain over the paper setting.
ORACLE_SHARE = 0.9
#: Checkpoints of the gap curve (shares of the budget).
CURVE_AT = (0.25, 0.5, 0.75, 1.0)
#: Quick runs: the tiny preset and a few steps per stage (numbers mean nothing; the code paths run).
QUICK_PRESET, FULL_PRESET = "tiny", "default"


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


def gap_closed_curve(history: list[tuple[float, float | None, float | None]], *, paper: float, oracle: float,
                     at: list[float]) -> list[float | None]:
    """The share of the gap closed by the arm's choice after each compute in ``at``.

    ``history`` is ``(cumulative compute, tune value or None if stopped, held-out value)`` per trial
    in order; the choice is the best tune value among completed trials so far, valued by its held-out.
    """
    from wsss_tune.analysis.tables import gap_closed

    out: list[float | None] = []
    for limit in at:
        done = [(t, h) for c, t, h in history if c <= limit + 1e-9 and t is not None]
        if not done:
            out.append(None)
            continue
        _, held = max(done, key=lambda x: x[0])
        out.append(gap_closed(held, paper, oracle))
    return out


def compute_to_share(history: list[tuple[float, float | None, float | None]], *, paper: float, oracle: float,
                     share: float = ORACLE_SHARE) -> float:
    """Compute at which the arm's choice first closed ``share`` of the gap (inf if never)."""
    from wsss_tune.analysis.tables import gap_closed

    best_tune = -math.inf
    for cost, tune, held in history:
        if tune is not None and tune > best_tune:
            best_tune = tune
            closed = gap_closed(held, paper, oracle)
            if closed is not None and closed >= share:
                return cost
    return math.inf


# --------------------------------------------------------------------------------------------------
# Running trials in-process
# --------------------------------------------------------------------------------------------------


class _Bench:
    """The shared setting: data, base config, store, and each arm's compute ledger."""

    def __init__(self, root: Path, quick: bool) -> None:
        from wsss_tune.artifacts import ArtifactStore
        from wsss_tune.config import apply_overrides
        from wsss_tune.data import generate_synthetic_voc
        from wsss_tune.spaces import load_space

        self.root, self.quick = root, quick
        self.space = load_space(SPACE)
        data = generate_synthetic_voc(root / "data", preset=QUICK_PRESET if quick else FULL_PRESET, seed=0)
        overrides: dict[str, Any] = {"data.root": str(data), "data.num_workers": 0}
        if quick:
            from wsss_tune.trainables.planning import SMOKE_OVERRIDES

            overrides.update(SMOKE_OVERRIDES)
        self.cfg = apply_overrides(self.space.base_config(), overrides)
        self.store = ArtifactStore(uri=str(root / "store"))
        self.memo: dict[tuple, list[tuple[int, float]]] = {}
        self.runs = 0
        #: Build seconds of one full DeepLab training (a stopped run is charged its share of them).
        self.deeplab_seconds = 0.0

    def run(self, params: Mapping[str, Any], *, stages: tuple[str, ...], reporter: Any, paid: set[str]) \
            -> tuple[dict[str, Any] | None, float]:
        """One pipeline run of ``params``; (metrics or None when pruned, compute charged to the arm).
        A DeepLab curve seen before is replayed to the pruner first (the store would serve the run)."""
        from wsss_tune.config import apply_overrides
        from wsss_tune.reporting import NullReporter
        from wsss_tune.stages.pipeline import run_pipeline

        self.runs += 1
        out = self.root / "runs" / f"r{self.runs}"
        cfg = apply_overrides(self.cfg, dict(params))
        key = tuple(sorted(params.items()))
        try:
            if reporter is not None:
                for at, v in self.memo.get(key, ()):
                    reporter.step(at, v)
            m = run_pipeline(cfg, stages=stages, out_dir=out, reporter=reporter or NullReporter(), store=self.store)
        except Pruned as stop:
            # the DeepLab steps it trained, at the full run's seconds per step, plus what upstream cost
            m = None
            cost = self._upstream_cost(cfg, paid) + self._partial_deeplab_cost(cfg, int(stop.args[0]))
            return m, cost
        if reporter is not None:
            self.memo.setdefault(key, reporter.values)
        return m, self._charge(m, paid)

    def _charge(self, metrics: Mapping[str, Any], paid: set[str]) -> float:
        from wsss_tune.analysis.tables import artifact_build_seconds

        cost = 0.0
        for info in (metrics.get("stages") or {}).values():
            key = str(info.get("key") or info.get("path"))
            if key in paid:
                continue
            paid.add(key)
            seconds = artifact_build_seconds(info)
            cost += float(seconds if seconds is not None else info.get("seconds") or 0.0)
        return cost

    def _upstream_cost(self, cfg: Any, paid: set[str]) -> float:
        """A pruned run's upstream artifacts (EPS, AffinityNet, the walk), charged as for a full run."""
        from wsss_tune.reporting import NullReporter
        from wsss_tune.stages.pipeline import run_pipeline

        m = run_pipeline(cfg, stages=("eps", "affinity"), out_dir=self.root / "runs" / f"u{self.runs}",
                         reporter=NullReporter(), store=self.store)  # cached: served at once
        return self._charge(m, paid)

    def _partial_deeplab_cost(self, cfg: Any, steps: int) -> float:
        per_step = self.deeplab_seconds / max(1, int(cfg.deeplab.iterations))
        return per_step * steps


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


def _study(seed: int, *, tpe: bool, prune: bool, space: Any) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed) if tpe else optuna.samplers.RandomSampler(seed=seed)
    f = space.fidelity
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=f.grace_period, reduction_factor=f.reduction_factor)
              if prune and f is not None else optuna.pruners.NopPruner())
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def _search(bench: _Bench, space: Any, *, seed: int, budget: float, spent: float, tpe: bool, prune: bool,
            frozen: Mapping[str, Any], paid: set[str], history: list[tuple[float, float | None, float | None]],
            final: bool) -> tuple[float, dict[str, Any]]:
    """One search over ``space`` until ``budget`` (cumulative compute) is spent; appends its trials to
    ``history`` when ``final`` (they carry the DeepLab metric). Returns (compute spent, best values)."""
    import optuna

    from wsss_tune.trainables.search import optuna_distributions

    dists = optuna_distributions(space)
    study = _study(seed, tpe=tpe, prune=prune, space=space)
    study.enqueue_trial(space.reference_point())
    f = space.fidelity
    best: tuple[float, dict[str, Any]] | None = None
    while spent < budget:
        trial = study.ask(dists)
        params = {**frozen, **trial.params}
        reporter = None
        if f is not None:
            reporter = RungReporter(trial, metric=space.metric, stage="deeplab", max_t=f.max_t, prune=prune)
        m, cost = bench.run(params, stages=space.stages, reporter=reporter, paid=paid)
        spent += cost
        if m is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            if final:
                history.append((spent, None, None))
            continue
        value = float(m[space.metric])
        study.tell(trial, value)
        if best is None or value > best[0]:
            best = (value, params)
        if final:
            held = m.get(space.metric.replace("_tune", "_heldout"))
            history.append((spent, value, float(held) if held is not None else None))
    return spent, (best[1] if best is not None else dict(frozen))


def _cascade(bench: _Bench, seed: int, budget: float) -> list[tuple[float, float | None, float | None]]:
    from wsss_tune.trainables.phases import cascade_spaces

    history: list[tuple[float, float | None, float | None]] = []
    paid: set[str] = set()
    spent, frozen, share = 0.0, {}, 0.0
    parts = cascade_spaces(bench.space)
    for stage, sub in parts:
        share += CASCADE_SHARES[stage]
        limit = budget if stage == parts[-1][0] else budget * share
        sub = _with_frozen(sub, frozen)
        spent, frozen = _search(bench, sub, seed=seed, budget=limit, spent=spent, tpe=True,
                                prune=sub.fidelity is not None, frozen=frozen, paid=paid, history=history,
                                final=stage == parts[-1][0])
    return history


def _with_frozen(space: Any, frozen: Mapping[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(space, overrides={**space.overrides, **frozen}) if frozen else space


def _joint(bench: _Bench, seed: int, budget: float, *, tpe: bool) -> list[tuple[float, float | None, float | None]]:
    history: list[tuple[float, float | None, float | None]] = []
    _search(bench, bench.space, seed=seed, budget=budget, spent=0.0, tpe=tpe, prune=tpe, frozen={}, paid=set(),
            history=history, final=True)
    return history


ARMS: dict[str, Callable[[_Bench, int, float], list[tuple[float, float | None, float | None]]]] = {
    "cascade": _cascade,
    "joint TPE+ASHA": lambda b, s, budget: _joint(b, s, budget, tpe=True),
    "random": lambda b, s, budget: _joint(b, s, budget, tpe=False),
}


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def _oracle(bench: _Bench, reference: Mapping[str, Any]) -> tuple[float, float, str]:
    """(paper held-out, oracle held-out, where the oracle came from)."""
    from wsss_tune.trainables.sweep import oracle

    held = reference[bench.space.metric.replace("_tune", "_heldout")]
    recorded = oracle(SPACE) if not bench.quick else None
    if recorded is not None:
        return float(held), float(recorded["deeplab_miou_heldout"]), "recorded oracle"
    return float(held), math.nan, "no oracle for this setting: the best held-out of all arms stands in"


def run(quick: bool, seeds: tuple[int, ...] | None = None, arms: tuple[str, ...] | None = None,
        budget_runs: float | None = None) -> list[dict[str, Any]]:
    """The arms at equal compute. ``seeds`` (sampler seeds per arm) defaults to 3 (1 when ``quick``);
    ``arms`` (names in :data:`ARMS`) to all of them; ``budget_runs`` (in reference runs of compute) to
    :data:`BUDGET_FULL` (:data:`BUDGET_QUICK` when ``quick``)."""
    seeds = seeds if seeds is not None else SEEDS_QUICK if quick else SEEDS_FULL
    unknown = sorted(set(arms or ()) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; expected some of: {', '.join(ARMS)}")
    chosen = {name: arm for name, arm in ARMS.items() if arms is None or name in arms}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = _Bench(Path(tmp), quick)
        from wsss_tune.reporting import NullReporter
        from wsss_tune.stages.pipeline import run_pipeline

        ref = run_pipeline(bench.cfg, stages=bench.space.stages, out_dir=Path(tmp) / "runs" / "reference",
                           reporter=NullReporter(), store=bench.store)
        unit = bench._charge(ref, set())
        bench.deeplab_seconds = float(ref["stages"]["deeplab_model"].get("build_seconds") or 0.0)
        budget = unit * (budget_runs if budget_runs is not None else BUDGET_QUICK if quick else BUDGET_FULL)
        rows += _setting_rows(bench, ref)
        paper, oracle_value, source = _oracle(bench, ref)
        histories: dict[tuple[str, int], list[tuple[float, float | None, float | None]]] = {}
        for name, arm in chosen.items():
            for seed in seeds:
                t0 = time.perf_counter()
                histories[(name, seed)] = arm(bench, seed, budget)
                row = _row(name, seed, histories[(name, seed)], paper=paper, oracle=oracle_value, budget=budget,
                           unit=unit, wall=time.perf_counter() - t0)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items()}, default=str), file=sys.stderr, flush=True)
        if math.isnan(oracle_value):  # no recorded oracle: the best held-out any arm chose stands in
            oracle_value = max((h for hist in histories.values() for _, t, h in hist if t is not None and h is not None),
                               default=math.nan)
            rows = [_row(r["arm"], r["seed"], histories[(r["arm"], r["seed"])], paper=paper, oracle=oracle_value,
                         budget=budget, unit=unit, wall=r["wall_s"]) if r["arm"] in ARMS else r for r in rows]
        rows += _medians(rows, source, tuple(chosen))
    return rows


def _setting_rows(bench: _Bench, paper_metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper setting and the hand-tuned ``synth`` config, stage by stage, tune and held-out (seed 0)."""
    from wsss_tune.config import apply_overrides, load_config
    from wsss_tune.reporting import NullReporter
    from wsss_tune.stages.pipeline import run_pipeline

    synth = load_config("synth")
    values = {p.path: getattr(getattr(synth, p.path.split(".")[0]), p.path.split(".")[1]) for p in bench.space.params}
    tuned = run_pipeline(apply_overrides(bench.cfg, values), stages=bench.space.stages,
                         out_dir=bench.root / "runs" / "synth", reporter=NullReporter(), store=bench.store)
    rows = []
    for label, m in (("setting: synth_paper", paper_metrics), ("setting: synth (hand-tuned)", tuned)):
        row: dict[str, Any] = {"arm": label, "seed": 0}
        for stage in ("eps", "rw", "deeplab"):
            for half in ("tune", "heldout"):
                row[f"{stage}_{half}"] = m.get(f"{stage}_miou_{half}")
        rows.append(row)
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return rows


def _row(arm: str, seed: int, history: list[tuple[float, float | None, float | None]], *, paper: float,
         oracle: float, budget: float, unit: float, wall: float) -> dict[str, Any]:
    curve = gap_closed_curve(history, paper=paper, oracle=oracle, at=[budget * a for a in CURVE_AT])
    to_share = compute_to_share(history, paper=paper, oracle=oracle)
    row: dict[str, Any] = {"arm": arm, "seed": seed, "trials": len(history),
                           "stopped": sum(t is None for _, t, _ in history), "paper": paper, "oracle": oracle}
    for a, v in zip(CURVE_AT, curve, strict=True):
        row[f"gap@{int(100 * a)}%"] = v
    row["to_90%_oracle (runs)"] = to_share / unit if math.isfinite(to_share) else math.inf
    row["budget (runs)"] = budget / unit
    row["wall_s"] = wall
    return row


def _medians(rows: list[dict[str, Any]], source: str, arms: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        med: dict[str, Any] = {"arm": arm, "seed": "median", "oracle": source}
        for k in [f"gap@{int(100 * a)}%" for a in CURVE_AT] + ["to_90%_oracle (runs)"]:
            vals = [r[k] for r in mine if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
            med[k] = statistics.median(vals) if vals else None
        out.append(med)
    if not {"cascade", "joint TPE+ASHA"} <= set(arms):
        return out
    casc = next(r for r in out if r["arm"] == "cascade")["to_90%_oracle (runs)"]
    joint = next(r for r in out if r["arm"] == "joint TPE+ASHA")["to_90%_oracle (runs)"]
    if casc is not None and joint is not None and math.isfinite(casc) and casc > 0:
        out.append({"arm": "joint / cascade compute to 90% of the oracle's gain", "seed": "median",
                    "to_90%_oracle (runs)": joint / casc if math.isfinite(joint) else math.inf})
    return out
