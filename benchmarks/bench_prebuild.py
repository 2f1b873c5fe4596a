"""GPUs held by trials that wait for shared artifacts, with and without building them first.

A CPU simulation of a 4-GPU box: a local Ray instance that advertises 4 GPUs (and 4 CPUs), a
``synth_rw`` sweep of 4 trials with 1 GPU each, all 4 at once, on an empty store (the trials train
on the CPU; Ray's accounting is what is measured). EPS trains :data:`EPS_STEPS` steps so that the
shared build is the long part, as on VOC.

* ``trials build``: the first trial builds EPS and AffinityNet; the other three hold their GPU
  while they wait for it;
* ``prebuild`` (the default): the sweep builds them first in one task with one trial's resources;
  the trials start when there is something for them to compute.

``GPU-s held`` is what Ray reserved: each trial's run time x 1 GPU, plus the shared build's time x 1
GPU; ``GPU-s waiting`` is the part of the trials' time spent waiting for another trial's build (the
seconds of their cache hits on the shared artifacts). The planner's estimate of the same
(``wsss-tune plan``: the shared build's device-hours times the other devices) is in the last row.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["run", "EPS_STEPS", "TRIALS"]

#: EPS training steps (full / quick) and trials (= GPUs of the simulated box).
EPS_STEPS, EPS_STEPS_QUICK = 120, 30
TRIALS = 4


def run(quick: bool) -> list[dict[str, Any]]:
    import ray

    from wsss_tune.data import generate_synthetic_voc
    from wsss_tune.trainables.planning import SMOKE_OVERRIDES
    from wsss_tune.trainables.prebuild import PREBUILD_PREFIX, shared_artifacts
    from wsss_tune.trainables.sweep import run_sweep

    rows: list[dict[str, Any]] = []
    overrides = {**SMOKE_OVERRIDES, "eps.iterations": EPS_STEPS_QUICK if quick else EPS_STEPS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_synthetic_voc(root / "data", preset="tiny", seed=0)
        if ray.is_initialized():
            raise RuntimeError("bench prebuild starts its own Ray instance (4 simulated GPUs); stop Ray first")
        ray.init(num_cpus=TRIALS, num_gpus=TRIALS, include_dashboard=False, log_to_driver=False)
        try:
            for label, prebuild in (("trials build", False), ("prebuild", True)):
                result = run_sweep("synth_rw", data=data, storage=root / "exps", name=label.replace(" ", "-"),
                                   trials=TRIALS, gpus_per_trial=1, cpus_per_trial=1, store=str(root / label),
                                   wandb="off", progress="off", overrides=overrides, reseed=None, prebuild=prebuild)
                shared = shared_artifacts(_space(), _base(overrides, data))
                held = sum(t.seconds or 0.0 for t in result.trials)
                waiting = 0.0
                for t in result.trials:
                    for name in shared:
                        if t.metrics.get(f"built/{name}") == 0:
                            waiting += float(t.metrics.get(f"seconds/{name}") or 0.0)
                record = result.path / "runs" / f"{PREBUILD_PREFIX}search" / "metrics.json"
                pre = 0.0
                if record.is_file():
                    stages = json.loads(record.read_text())["stages"]
                    pre = sum(float(s.get("seconds") or 0.0) for s in stages.values())
                rows.append({"arm": label, "trials": len(result.trials), "completed": result.counts["completed"],
                             "shared build s": pre if prebuild else None, "GPU-s held": held + pre,
                             "GPU-s waiting": waiting})
        finally:
            ray.shutdown()
        base = rows[0]["GPU-s held"]
        for r in rows:
            r["held vs trials build"] = r["GPU-s held"] / base if base else None
        rows.append(_planner_row(overrides, data))
    return rows


def _space() -> Any:
    from wsss_tune.spaces import load_space

    return load_space("synth_rw")


def _base(overrides: dict[str, Any], data: Path) -> Any:
    from wsss_tune.config import apply_overrides

    return apply_overrides(_space().base_config(), {**overrides, "data.root": str(data)})


def _planner_row(overrides: dict[str, Any], data: Path) -> dict[str, Any]:
    """The planner's view of the same sweep (its stage timings measured here): device-seconds of the
    shared build, and those the three other trials would hold waiting for it."""
    from wsss_tune.analysis.plan import dataset_sizes, estimate_cost, time_stages
    from wsss_tune.data import VOCLayout

    space = _space()
    cfg = _base(overrides, data)
    timings = time_stages(cfg, num_classes=VOCLayout.from_config(cfg.data).num_classes, stages=space.stages)
    est = estimate_cost(timings, space, cfg, TRIALS, TRIALS, sizes=dataset_sizes(cfg))
    return {"arm": "planner estimate (trials build)", "trials": TRIALS, "shared build s": est.shared_hours * 3600,
            "GPU-s waiting": est.waiting_device_hours * 3600}
