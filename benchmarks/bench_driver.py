"""What a sweep's callbacks cost the Tune driver per result.

Every result of every trial passes through the driver's callbacks one at a time (Ray's
``process_trial_result``), so a callback that takes a second per result serialises the reporting of
all trials. This benchmark runs Ray Tune on a stand-in trainable that reports as fast as it can
(:data:`RESULTS` results per trial, each shaped like a stage's result: :data:`KEYS` numbers plus the
stage and its step), :data:`TRIALS` trials two at a time, so the driver is the bottleneck and results
per second is what it absorbs. Rows, each in the same process against the first:

* ``Ray's defaults``: no callback of ours (Ray's own JSON, CSV and TensorBoard loggers);
* ``outcome + CSV``: the outcome marks and the complete ``progress.csv`` (every sweep has them);
* ``+ live table``: the rich trial table, drawn to a terminal-like console in memory;
* ``+ W&B offline``: a sweep's W&B logging (``--wandb offline``), i.e. a sweep's full driver.

``ours ms/result`` is the time our callbacks' ``on_trial_result`` took per result (timed around each
call; mean and max over the run): what they add to the driver's work per result (target: at most
50 ms). ``results/s`` is what the driver absorbed end to end (it also holds each trial's start and
end: a W&B run starts and finishes per trial). ``slow warnings`` counts Ray's "operation took ...
which may be a performance bottleneck" messages during the run.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run", "RESULTS", "KEYS", "TRIALS"]

#: Results per trial, numbers per result and trials (full / quick).
RESULTS, KEYS, TRIALS = 200, 100, 4
QUICK = (40, 100, 2)


def _trainable(config: dict[str, Any]) -> None:
    from ray import tune

    n, keys = int(config["n"]), int(config["keys"])
    for i in range(n):
        stage = ("eps", "affinity", "deeplab")[min(2, 3 * i // n)]
        result: dict[str, Any] = {f"{stage}/v{k}": 0.001 * (i + k) for k in range(keys)}
        result.update(stage=stage, stage_step=i, deeplab_miou_tune=0.5 + 0.001 * i, loss=1.0 / (i + 1))
        if i == n - 1:
            result["final"] = True
        tune.report(result)


class _Timed:
    """Times every ``on_trial_result`` call of the callbacks it wraps (per result: the sum over them)."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.per_result: dict[tuple[str, int], float] = {}
        for cb in callbacks:
            self._wrap(cb)

    def _wrap(self, cb: Any) -> None:
        inner = cb.on_trial_result
        totals = self.per_result

        def timed(iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            t0 = time.perf_counter()
            inner(iteration=iteration, trials=trials, trial=trial, result=result, **info)
            key = (trial.trial_id, int(result.get("training_iteration", 0)))
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0

        cb.on_trial_result = timed


class _SlowWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "may be a performance bottleneck" in record.getMessage():
            self.count += 1


def _variant_callbacks(name: str, plan: Any) -> list[Any]:
    from rich.console import Console

    from wsss_tune.trainables.callbacks import CompleteCSVLogger, TrialOutcome
    from wsss_tune.trainables.progress import TrialTable
    from wsss_tune.trainables.tuner import callbacks

    if name == "Ray's defaults":
        return []
    out: list[Any] = [TrialOutcome(metric="deeplab_miou_tune"), CompleteCSVLogger()]
    if name in ("+ live table", "+ W&B offline"):
        out.append(TrialTable(metric="deeplab_miou_tune", mode="max", params=["x"], title="bench", total=None,
                              console=Console(file=io.StringIO(), force_terminal=True, width=160)))
    if name == "+ W&B offline":
        out += [c for c in callbacks(plan, progress="off")]
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    import sys

    import ray
    import ray.cloudpickle
    from ray import tune

    from wsss_tune.data import generate_synthetic_voc
    from wsss_tune.trainables.planning import plan_sweep
    from wsss_tune.trainables.session import tune_env

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import benchmarks/
    n, keys, trials = QUICK if quick else (RESULTS, KEYS, TRIALS)
    rows: list[dict[str, Any]] = []
    warn = _SlowWarnings()
    logging.getLogger("ray.tune").addHandler(warn)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_synthetic_voc(root / "data", preset="tiny", seed=0)
        plan = plan_sweep("synth_deeplab", data=data, storage=root / "exps", name="bench", wandb="offline")
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
        try:
            base_rate = None
            for name in ("Ray's defaults", "outcome + CSV", "+ live table", "+ W&B offline"):
                warn.count = 0
                cbs = _variant_callbacks(name, plan)
                timer = _Timed(cbs)
                with tune_env("offline" if name == "+ W&B offline" else "off", "off"):
                    t0 = time.perf_counter()
                    tune.Tuner(
                        tune.with_resources(_trainable, {"cpu": 1}),
                        param_space={"n": n, "keys": keys, "x": tune.grid_search(list(range(trials)))},
                        tune_config=tune.TuneConfig(max_concurrent_trials=2),
                        run_config=tune.RunConfig(storage_path=str(root / "ray"), name=name.replace(" ", "_")
                                                  .replace("'", "").replace("+", "plus"), callbacks=cbs,
                                                  verbose=0),
                    ).fit()
                    wall = time.perf_counter() - t0
                rate = n * trials / wall
                base_rate = base_rate or rate
                times = list(timer.per_result.values()) or [0.0]
                rows.append({"callbacks": name, "results": n * trials, "wall_s": wall, "results/s": rate,
                             "vs Ray's": rate / base_rate,
                             "ours ms/result (mean)": 1000 * sum(times) / len(times),
                             "ours ms/result (max)": 1000 * max(times), "slow warnings": warn.count})
        finally:
            logging.getLogger("ray.tune").removeHandler(warn)
            if started:
                ray.shutdown()
    return rows
