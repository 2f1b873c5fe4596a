"""The artifact cache in a random-walk sweep, and Tune's per-trial overhead.

A ``synth_rw`` sweep fixes EPS and AffinityNet and searches only the walk (β, logt, α), so with the
artifact store every trial after the first reuses their artifacts and costs one random walk. The
benchmark runs the same sweep (same seed, so the same trials: TPE's start-up samples are seeded) on
the ``tiny`` synthetic preset twice, on a local Ray instance with one CPU per trial:

* ``cache``: one shared store (empty at the start);
* ``no cache``: a private store per trial, so every trial trains EPS and AffinityNet again.

Rows give the wall time of the sweep (``run_sweep``, Ray already running), ``stage_s`` (the sum over
trials of the seconds each spent in pipeline stages, including waiting for another trial's build),
the number of stage artifacts built, and the ratios. Then Tune's overhead: the cached sweep is run
again one trial at a time (every trial now a full cache hit), against calling ``run_trial`` (what the
trainable runs) directly for the same configs in this process; the difference per trial is what Ray
Tune adds (actor reuse on, result and checkpoint bookkeeping, experiment snapshots, results files).

``quick``: 4 trials at ``SMOKE_OVERRIDES`` (a few steps per stage). Full: 8 trials, EPS 100 and
AffinityNet 50 steps on the tiny preset (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]

#: Trials per sweep (the issue's 8-trial sweep; 4 in quick mode).
TRIALS, QUICK_TRIALS = 8, 4
#: Training steps of the full run (the ``synth`` config's own 600/300 would make the no-cache sweep
#: take tens of minutes on 2 cores; these keep EPS and AffinityNet clearly the expensive stages).
FULL_STEPS = {"eps.iterations": 100, "eps.eval_every": 50, "eps.checkpoint_every": 50, "eps.log_every": 25,
              "affinity.iterations": 50, "affinity.checkpoint_every": 25}
#: Seed of the TPE sampler (same trials in every sweep of the benchmark).
SEED = 0


def _sweep(space: str, **kwargs: Any) -> tuple[Any, float]:
    from wsss_tune.trainables import run_sweep

    t0 = time.perf_counter()
    result = run_sweep(space, wandb="off", progress="off", seed=SEED, cpus_per_trial=1, **kwargs)
    return result, time.perf_counter() - t0


def _totals(result: Any) -> dict[str, Any]:
    trials = result.trials
    return {"completed": result.counts["completed"],
            "stage_s": round(sum(t.metrics.get("stage_seconds", 0.0) for t in trials), 2),
            "stages_built": sum(int(t.metrics.get("stages_built", 0)) for t in trials)}


def run(quick: bool) -> list[dict]:
    import ray

    from wsss_tune.data.synth import generate_synthetic_voc
    from wsss_tune.trainables import SETTINGS_KEY, SMOKE_OVERRIDES, plan_sweep, run_trial

    trials = QUICK_TRIALS if quick else TRIALS
    overrides = dict(SMOKE_OVERRIDES) if quick else {**SMOKE_OVERRIDES, **FULL_STEPS}
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_cache_"))
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    try:
        data = generate_synthetic_voc(tmp / "data", preset="tiny", seed=0)
        common = {"data": data, "trials": trials, "storage": tmp / "exp", "overrides": overrides}
        cached, cached_s = _sweep("synth_rw", name="cache", store=str(tmp / "store"), **common)
        fresh, fresh_s = _sweep("synth_rw", name="no-cache", cache=False, **common)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        for label, result, wall in (("cache", cached, cached_s), ("no cache", fresh, fresh_s)):
            rows.append({"case": f"synth_rw sweep, {label}", "trials": trials, "ray_cpus": cpus,
                         "wall_s": round(wall, 2), **_totals(result)})
        rows.append({"case": "no cache / cache", "wall_s": round(fresh_s / cached_s, 2),
                     "stage_s": round(rows[1]["stage_s"] / max(rows[0]["stage_s"], 1e-9), 2),
                     "stages_built": round(rows[1]["stages_built"] / max(rows[0]["stages_built"], 1), 2)})

        again, again_s = _sweep("synth_rw", name="cached-again", store=str(tmp / "store"), max_concurrent=1,
                                **common)
        assert {tuple(sorted(t.params.items())) for t in again.trials} == \
            {tuple(sorted(t.params.items())) for t in cached.trials}, "the re-run drew other trials"
        plan = plan_sweep("synth_rw", name="direct", store=str(tmp / "store"), **common)
        settings = plan.settings.to_dict()
        t0 = time.perf_counter()
        for i, t in enumerate(again.trials):
            run_trial({**t.params, SETTINGS_KEY: settings}, trial_id=f"direct{i}", report_fn=lambda *a, **k: None)
        direct_s = time.perf_counter() - t0
        tune_per, direct_per = again_s / trials, direct_s / trials
        rows.append({"case": "cached trial via Tune (one at a time)", "trials": trials,
                     "per_trial_s": round(tune_per, 3), **_totals(again)})
        rows.append({"case": "cached trial via run_trial directly", "trials": trials, "per_trial_s": round(direct_per, 3)})
        rows.append({"case": "Tune overhead per trial", "per_trial_s": round(tune_per - direct_per, 3)})
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
