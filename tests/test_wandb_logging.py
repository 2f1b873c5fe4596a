"""W&B logging of the trials (``trainables.wandb_logging``), checked by reading the offline runs back.

An offline run folder holds ``run-<id>.wandb``: W&B's record log (a 7-byte header, then LevelDB-log
blocks of 32 KiB whose chunks carry ``wandb_internal_pb2.Record`` messages). The installed wandb has
no reader of its own, so :func:`read_offline_run` parses it with the protobuf classes wandb ships.

The runs come from a real pipeline trial on the tiny synthetic dataset (smoke overrides) fed to the
logging actor's body in this process, from a stand-in trainable under ASHA, and from a real sweep.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from wsss_tune.spaces import load_space
from wsss_tune.trainables import SMOKE_OVERRIDES, plan_sweep
from wsss_tune.trainables.trainable import SETTINGS_KEY, run_trial
from wsss_tune.trainables.wandb_logging import (
    REFERENCE_KEY,
    SAMPLE_IMAGES,
    TrialRun,
    WandbTrialLogger,
    run_config,
    stage_axes,
    trial_payload,
    trial_status,
)

#: Step axes of the built-in graph and the keys each must carry (a training metric or a score).
AXES = {"eps": "eps/loss", "affinity": "affinity/loss", "rw": "rw_miou_tune", "deeplab": "deeplab/loss"}
#: Result keys that must never become W&B metrics.
NOT_METRICS = ("stage", "stage_step", "fidelity", "step", "cache_repairs", "time_total_s", "training_iteration",
               "timestamp", "time_this_iter_s", "node_id", "final", "pruned")
#: The tiny preset's classes plus background: rows of a per-class IoU table.
TINY_CLASSES = 6


# --------------------------------------------------------------------------------------------------
# Reading an offline run
# --------------------------------------------------------------------------------------------------

_BLOCK = 32 * 1024
_HEADER = 7  # file header (":W&B", magic, version) and chunk header (CRC, length, type) alike
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes, path: Path) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:7]!r})")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too small for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if pos + _HEADER + length > len(data):
            return  # the writer is not done with this chunk yet
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""
        elif kind != 0 or length != 0:
            raise ValueError(f"{path}: chunk type {kind} at byte {pos - _HEADER - length}")


def _set(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What a run file says: the run record's fields, config, history rows, summary, metric axes."""

    folder: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    step_metric: dict[str, str] = field(default_factory=dict)
    defined: set[str] = field(default_factory=set)
    exit_code: int | None = None

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.history if key in r]

    def history_keys(self) -> set[str]:
        return {k for r in self.history for k in r}


#: Seconds to wait for W&B's writer to finish a run's file (it may still be writing after ``finish``).
_WRITE_WAIT_S = 30.0


def read_offline_run(folder: Path) -> OfflineRun:
    """Parse ``<folder>/run-*.wandb`` (see the module docstring), once it holds the run's exit record."""
    deadline = time.monotonic() + _WRITE_WAIT_S
    while True:
        run = _read_run_file(folder)
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read_run_file(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(folder.glob("run-*.wandb"))
    assert len(files) == 1, f"{folder}: expected one run-*.wandb file, found {files}"
    out = OfflineRun(folder=folder)
    for raw in _chunks(files[0].read_bytes(), files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.run_id, out.name, out.group, out.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            out.tags = tuple(r.tags)
            for item in r.config.update:
                _set(out.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(out.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out.summary, item)
        elif kind == "metric":
            out.defined.add(record.metric.name)
            if record.metric.step_metric:
                out.step_metric[record.metric.name] = record.metric.step_metric
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    out.config.pop("_wandb", None)
    return out


def offline_runs(exp_dir: Path) -> dict[str, OfflineRun]:
    """Every offline run under ``<exp_dir>/wandb``, by run id."""
    runs = [read_offline_run(f) for f in sorted((exp_dir / "wandb").glob("offline-run-*"))]
    return {r.run_id: r for r in runs}


# --------------------------------------------------------------------------------------------------
# One real pipeline trial, logged in this process
# --------------------------------------------------------------------------------------------------


@dataclass
class RecordedTrial:
    plan: Any
    config: dict[str, Any]
    results: list[dict[str, Any]]
    run_dir: Path


@pytest.fixture(scope="module")
def recorded_trial(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> RecordedTrial:
    """The reference point of ``synth_pipeline`` (smoke overrides) run once without Ray; its results
    as Tune would hand them to a callback (Ray's keys and the trial config added)."""
    storage = tmp_path_factory.mktemp("wandb_trial")
    plan = plan_sweep("synth_pipeline", data=synth_root, storage=storage, name="wb", overrides=SMOKE_OVERRIDES,
                      wandb="offline", reseed=None)
    config = {SETTINGS_KEY: plan.settings.to_dict(), **plan.reference_point}
    results: list[dict[str, Any]] = []
    start = time.time()

    def report(result: dict[str, Any], **_: Any) -> None:
        results.append({**result, "time_total_s": time.time() - start, "training_iteration": len(results) + 1,
                        "config": config, "trial_id": "t1", "done": False, "pid": os.getpid()})

    run_trial(config, trial_id="t1", report_fn=report)
    return RecordedTrial(plan=plan, config=config, results=results, run_dir=Path(plan.settings.runs_dir) / "t1")


def _log_trial(rec: RecordedTrial, folder: Path, results: list[dict[str, Any]], status: str,
               error: str | None = None, run_id: str = "t1") -> tuple[OfflineRun, list[str]]:
    reference = {"experiment": "wb", "space": "synth_pipeline"}
    init = {"project": "wsss-tune", "group": "wb", "job_type": "trial", "mode": "offline", "dir": str(folder),
            "id": run_id, "name": f"pipeline_{run_id}", "config": run_config(rec.config, reference)}
    run = TrialRun(init, axes=stage_axes(), run_dir=str(rec.run_dir))
    for r in results:
        run.log(trial_payload(r))
    errors = run.finish(status, error)
    (found,) = (folder / "wandb").glob(f"offline-run-*-{run_id}")
    return read_offline_run(found), errors


def test_completed_trial_run_has_stage_axes_tables_samples_and_status(recorded_trial: RecordedTrial,
                                                                     tmp_path: Path) -> None:
    """A completed pipeline trial's run: the searched values and the reference as config, no
    config or bookkeeping as metrics; each stage's metrics on its own step axis; at each stage's
    end its per-class IoU table and sample panels (EPS, walk; DeepLab saves no predictions by
    default) at that stage's last step; the status and per-stage seconds in the summary."""
    rec = recorded_trial
    run, errors = _log_trial(rec, tmp_path, rec.results, "completed")
    assert errors == []
    final = rec.results[-1]
    assert final["final"] is True

    searched = dict(rec.plan.reference_point)
    assert run.config == {**searched, REFERENCE_KEY: {"experiment": "wb", "space": "synth_pipeline"}}
    assert (run.group, run.job_type, run.name) == ("wb", "trial", "pipeline_t1")
    assert "completed" in run.tags and run.exit_code == 0

    keys = run.history_keys() | set(run.summary)
    assert not [k for k in keys if k.startswith("config") or "wsss_tune" in k or "trial_log_path" in k], keys
    assert not [k for k in run.history_keys() if k in NOT_METRICS], run.history_keys()

    for axis, key in AXES.items():
        step = f"{axis}/step"
        assert step in run.defined and run.step_metric[key] == step, (axis, run.step_metric.get(key))
        rows = run.rows_with(key)
        assert rows and all(step in r for r in rows), axis
        others = {f"{a}/step" for a in AXES if a != axis}
        assert not [r for r in rows if others & set(r)], f"{axis} metrics logged with another stage's step"
    assert [r["rw/step"] for r in run.rows_with("rw_miou_tune")] == [1, 2, 4, 8]  # the walk's t
    eps_steps = [r["eps/step"] for r in run.rows_with("eps/loss")]
    assert eps_steps == sorted(eps_steps) and eps_steps[-1] == SMOKE_OVERRIDES["eps.iterations"]

    for axis, samples in (("eps", SAMPLE_IMAGES), ("rw", SAMPLE_IMAGES), ("deeplab", 0)):
        assert run.step_metric[f"{axis}/iou"] == f"{axis}/step"
        (row,) = run.rows_with(f"{axis}/iou")
        table = row[f"{axis}/iou"]
        assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (TINY_CLASSES, 2)
        assert (run.folder / "files" / table["path"]).is_file()
        last = max(r[f"{axis}/step"] for r in run.rows_with(f"{axis}/step") if f"{axis}/iou" not in r)
        assert row[f"{axis}/step"] == last, f"{axis} table not at the stage's last step"
        images = [r[f"{axis}/samples"] for r in run.rows_with(f"{axis}/samples")]
        assert len(images) == (1 if samples else 0), axis
        if samples:
            assert images[0]["_type"] == "images/separated" and images[0]["count"] == samples
            assert len(images[0]["captions"]) == samples and "ground truth" in images[0]["captions"][0]
    media = list((run.folder / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2 * SAMPLE_IMAGES, media
    assert not run.rows_with("affinity/iou")

    s = run.summary
    assert s["status"] == "completed"
    assert s[rec.plan.space.metric] == pytest.approx(final[rec.plan.space.metric])
    assert s["eps_iou/background"] == pytest.approx(final["eps_iou/background"])
    assert s["eps/seconds"] == pytest.approx(final["seconds/eps_model"] + final["seconds/eps"], abs=0.011)
    assert s["rw/seconds"] == pytest.approx(final["seconds/rw"], abs=0.011)
    assert s["deeplab/seconds"] == pytest.approx(final["seconds/deeplab_model"] + final["seconds/deeplab"], abs=0.011)
    assert s["eps/cached"] == 0 and s["affinity/seconds"] == pytest.approx(final["seconds/affinity"], abs=0.011)


def test_pruned_and_failed_runs_say_so(recorded_trial: RecordedTrial, tmp_path: Path) -> None:
    """A trial stopped during DeepLab training: ``pruned`` in summary and tags, a normal exit, no
    final metrics, no DeepLab scores; the stages it passed get their wall seconds. A failed one:
    ``failed``, its error, exit code 1 (W&B shows the run as failed)."""
    rec = recorded_trial
    first_deeplab = next(i for i, r in enumerate(rec.results) if r.get("stage") == "deeplab")
    pruned, errors = _log_trial(rec, tmp_path, rec.results[:first_deeplab + 1], "pruned", run_id="p1")
    assert errors == []
    assert pruned.summary["status"] == "pruned" and "pruned" in pruned.tags and pruned.exit_code == 0
    assert "completed" not in pruned.tags
    assert "deeplab_miou" not in pruned.summary and not pruned.rows_with("deeplab/iou")
    # the stages it finished before it was stopped have their stage-end records (the pipeline's
    # stage-end reports name each artifact's folder)
    assert pruned.rows_with("eps/samples") and pruned.rows_with("eps/iou") and pruned.rows_with("rw/samples")
    assert pruned.rows_with("deeplab/loss")
    for axis in ("eps", "affinity", "rw", "deeplab"):
        assert pruned.summary[f"{axis}/seconds"] >= 0, axis

    failed, _ = _log_trial(rec, tmp_path, rec.results[:2], "failed", error="RuntimeError: boom", run_id="f1")
    assert failed.summary["status"] == "failed" and failed.summary["error"] == "RuntimeError: boom"
    assert "failed" in failed.tags and failed.exit_code == 1


def test_driver_side_helpers() -> None:
    """The driver sends plain values without the config or Ray's keys; the status follows the
    last result; the W&B config is the searched values plus the reference (``base_ref`` kept)."""
    result = {"eps/loss": 0.5, "stage": "eps_model", "stage_step": 2, "config": {"wsss_tune": {"base": {}}},
              "date": "today", "pid": 7, "time_total_s": 3.0, "weird": [1, 2], "final": False}
    assert trial_payload(result) == {"eps/loss": 0.5, "stage": "eps_model", "stage_step": 2, "time_total_s": 3.0,
                                     "final": False}
    assert trial_status({"final": True}, failed=False) == "completed"
    assert trial_status({"final": True, "pruned": True}, failed=False) == "pruned"
    assert trial_status({"stage_step": 4}, failed=False) == "pruned"
    assert trial_status(None, failed=False) == "pruned"
    assert trial_status({"final": True}, failed=True) == "failed"
    cfg = {"eps.tau": 0.3, SETTINGS_KEY: {"base_ref": {"path": "b.json", "sha256": "ab"}, "runs_dir": "/x"}}
    assert run_config(cfg, {"experiment": "e"}) == {
        "eps.tau": 0.3, REFERENCE_KEY: {"experiment": "e", "base_ref": {"path": "b.json", "sha256": "ab"}}}
    assert set(stage_axes()) == set(AXES)


# --------------------------------------------------------------------------------------------------
# Under Ray
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass
class _Timed:
    """Seconds each call of the wrapped driver hooks took."""

    calls: dict[str, list[float]] = field(default_factory=dict)

    def wrap(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        original = getattr(WandbTrialLogger, name)

        def timed(cb: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(cb, *args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - t0)

        monkeypatch.setattr(WandbTrialLogger, name, timed)

    def summary(self) -> str:
        return "driver seconds per call: " + ", ".join(
            f"{k} n={len(v)} mean={sum(v) / len(v):.4f} max={max(v):.4f}" for k, v in self.calls.items())


#: Most seconds a driver hook may take per call.
DRIVER_BUDGET_S = 0.05


def _curve_trainable(config: dict[str, Any]) -> None:
    """EPS-like reports ``m = x * s`` at stage steps 1..4, then a final result; x = 3 raises."""
    from ray import tune

    x = config["x"]
    if x == 3.0:
        raise RuntimeError("x = 3 is broken")
    for s in (1, 2, 3, 4):
        tune.report({"eps_miou_tune": x * s, "eps/loss": 1 / (x * s), "stage": "eps_model", "stage_step": s})
    tune.report({"eps_miou_tune": x * 4, "stage_step": 4, "final": True})


@pytest.mark.ray
def test_status_of_each_trial_under_asha(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x = 1, 0.5, 2, 3 one at a time under the sweeps' ASHA (rungs at steps 1, 2, 4; a trial at
    max_t may send its final result): x = 0.5 is stopped at step 1 (pruned), x = 3 raises (failed),
    the others complete. Each trial's run says so; the driver's hooks stay under the per-result
    budget."""
    import ray.cloudpickle
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from wsss_tune.trainables.search import FullBudgetASHA

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    timed = _Timed()
    for hook in ("log_trial_start", "log_trial_result", "log_trial_end"):
        timed.wrap(monkeypatch, hook)
    xs = [1.0, 0.5, 2.0, 3.0]
    logger = WandbTrialLogger(project="wsss-tune", group="curves", mode="offline", dir=str(tmp_path),
                              runs_dir=str(tmp_path / "runs"), reference={"experiment": "curves"}, job_type="eps")
    Tuner(_curve_trainable, param_space={"x": tune.grid_search(xs)},
          tune_config=TuneConfig(scheduler=FullBudgetASHA(time_attr="stage_step", metric="eps_miou_tune", mode="max",
                                                          max_t=4, grace_period=1, reduction_factor=2),
                                 max_concurrent_trials=1),
          run_config=RunConfig(storage_path=str(tmp_path), name="curves", verbose=0, callbacks=[logger])).fit()

    runs = offline_runs(tmp_path)
    by_x = {r.config["x"]: r for r in runs.values()}
    assert set(by_x) == {1.0, 0.5, 2.0, 3.0}, runs
    expected = {1.0: "completed", 0.5: "pruned", 2.0: "completed", 3.0: "failed"}
    assert {x: r.summary.get("status") for x, r in by_x.items()} == expected
    for x, status in expected.items():
        r = by_x[x]
        assert status in r.tags and r.job_type == "eps" and r.group == "curves"
        assert r.exit_code == (1 if status == "failed" else 0)
        assert r.config[REFERENCE_KEY] == {"experiment": "curves"}
    assert "x = 3 is broken" in by_x[3.0].summary["error"]
    assert [row["eps/step"] for row in by_x[0.5].rows_with("eps/loss")] == [1]
    assert [row["eps/step"] for row in by_x[1.0].rows_with("eps/loss")] == [1, 2, 3, 4]
    assert by_x[1.0].summary["eps_miou_tune"] == 4.0
    print(timed.summary())
    slow = {k: max(v) for k, v in timed.calls.items() if max(v) > DRIVER_BUDGET_S}
    assert not slow, f"driver hooks over {DRIVER_BUDGET_S} s: {slow}"
    assert len(timed.calls["log_trial_result"]) >= 10


_RESTORE = textwrap.dedent("""
    import sys
    import ray
    from ray.tune import Tuner
    from wsss_tune.trainables.trainable import TRAINABLES
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    Tuner.restore(sys.argv[1], trainable=TRAINABLES[sys.argv[2]])
    print("restored")
""")


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_logs_one_run_per_trial_cheaply_and_restores_cleanly(
        ray_cluster: None, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real synth_rw sweep (2 trials, offline): one run per trial in the experiment's group with
    job type ``trial``, the searched values and the reference as config, each stage's records; the
    driver spends under 50 ms per hook call. ``Tuner.restore`` of the experiment, then interpreter
    exit, prints no exception (Ray's W&B callback raised in ``__del__`` there)."""
    from wsss_tune.trainables import run_sweep

    timed = _Timed()
    for hook in ("log_trial_start", "log_trial_result", "log_trial_end"):
        timed.wrap(monkeypatch, hook)
    result = run_sweep("synth_rw", data=synth_root, storage=tmp_path, name="wb", trials=2, wandb="offline",
                       progress="off", overrides=SMOKE_OVERRIDES, reseed=None, store=str(tmp_path / "store"))
    assert result.counts["completed"] == 2, [t.error for t in result.trials]
    runs = offline_runs(result.path)
    assert set(runs) == {t.trial_id for t in result.trials}
    searched = {p.path for p in load_space("synth_rw").params}
    for trial in result.trials:
        run = runs[trial.trial_id]
        assert (run.group, run.job_type, run.summary["status"]) == ("wb", "trial", "completed")
        assert set(run.config) == searched | {REFERENCE_KEY}
        assert {k: run.config[k] for k in searched} == pytest.approx(dict(trial.params))
        ref = run.config[REFERENCE_KEY]
        assert ref["experiment"] == "wb" and ref["space"] == "synth_rw" and ref["base"] == "synth"
        assert not any("trial_log_path" in k or k.startswith("config") for k in run.history_keys() | set(run.summary))
        assert run.step_metric["rw_miou_tune"] == "rw/step"
        for axis in ("eps", "rw"):
            assert len(run.rows_with(f"{axis}/iou")) == 1 and len(run.rows_with(f"{axis}/samples")) == 1, axis
        assert run.summary["rw_miou_tune"] == pytest.approx(trial.metrics["rw_miou_tune"])
        # EPS and AffinityNet are the same for every trial: built once (before the trials or by the
        # first), found in the store otherwise; training curves only where built, the flag always.
        for stage, axis, curve in (("eps_model", "eps", "eps/loss"), ("affinity", "affinity", "affinity/loss")):
            built = trial.metrics[f"built/{stage}"] == 1
            assert run.summary[f"{axis}/cached"] == (0 if built else 1), axis
            assert bool(run.rows_with(curve)) == built, axis
    calls = timed.calls
    print(timed.summary())
    assert len(calls["log_trial_result"]) >= 2 * 5
    slow = {k: round(max(v), 3) for k, v in calls.items() if max(v) > DRIVER_BUDGET_S}
    assert not slow, f"driver hooks over {DRIVER_BUDGET_S} s: {slow}"

    proc = subprocess.run([sys.executable, "-c", _RESTORE, str(result.path), result.record.trainable],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0 and "restored" in proc.stdout, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
