"""W&B logging of a sweep: one run per trial, each stage on its own step axis, a status at the end.

What a trial's run holds (``docs/wandb.md`` says the same for users):

* **config**: the trial's searched values by config path, plus one small entry, :data:`REFERENCE_KEY`,
  naming the experiment, the search space, its base config (its name, the space's fixed overrides
  and, when the trial config has one, ``base_ref``: the stored base's file and SHA-256), the search
  phase, the trainable, the stages and the metric. Nothing of Ray's (no trial log path, host or
  pid), and the base config itself is not copied.
* **history**: the numbers each stage reports while it runs, each against that stage's own step,
  ``<axis>/step`` (``wandb.define_metric``): ``eps/step``, ``affinity/step``, ``rw/step`` (the random
  walk's t) and ``deeplab/step``; an artifact with a metric of its own (the walk's ``rw_miou``) gets
  its own axis, because its steps mean something else than its stage's training steps.
  Bookkeeping keys (``stage``, ``fidelity``, ``cache_repairs`` ...) and the config are never logged.
* **at the end of each stage**: ``<axis>/iou`` (per-class IoU table), ``<axis>/samples`` (a few
  image | ground truth | stage output panels, from the stage's mask folder in the artifact store) at
  the stage's last step, and ``<axis>/seconds`` in the summary. The pipeline ends every scored
  artifact, built or served from the cache, with a report of its scores and its folder
  (``artifact_dir``); the stage-end record is logged then. For a trial that never sent one (an
  interrupted build), what there is is logged when the run ends, the folders then read from the run
  folder's ``metrics.json``.
* **summary**: the final metrics, ``status`` (``completed``: the trial sent its final result;
  ``pruned``: stopped before it; ``failed``: it raised; ``incomplete``: still running when the
  search ended), the same status as a tag, and ``error`` for a failed trial. A failed run also
  ends with a non-zero exit code, so W&B shows it as failed.

Design: the driver stays cheap; the work happens in one logging actor.
Ray's ``WandbLoggerCallback`` is not used: its per-result cost in the driver (a blocking put into a
queue actor that must start first, and a recursive clean-up of the whole trial config), its
``__del__`` (which raises at interpreter exit once ``Tuner.restore`` has unpickled it) and its
logging actor (which writes Ray's log path into the config) are exactly what this module replaces,
and they are private parts of Ray that change between releases. :class:`WandbTrialLogger` is a plain
``LoggerCallback`` (public Ray API). Per result, the driver drops Ray's keys and everything that is
not a plain value (:func:`trial_payload`) and submits it to the logging actor without waiting
(``actor.log.remote``: Ray runs one caller's calls to an actor in order). The actor
(:class:`RunLogger`, in its own process on the driver's node, no CPU reserved) holds every open
run of the search (W&B's ``reinit="create_new"``, wandb 0.19.10 or newer), one :class:`TrialRun`
each: ``wandb.init``, the step axes, reading sample images and building ``wandb.Image`` and
``wandb.Table`` values, the summary and ``finish``. One actor rather than one per trial: a process
that imports this package and starts W&B costs seconds of CPU, once per search instead of once per
trial. W&B inside the trainable (``setup_wandb``) was the other option; it would put W&B work
into the trial's own time and could not know the trial's status, which only the driver sees
(``on_trial_complete`` fires for stopped trials too). Errors of the logging never stop a sweep: the
actor collects them and the driver logs them as warnings when the run is finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from wsss_tune.analysis.results import RUNS_DIR
from wsss_tune.stages import graph
from wsss_tune.stages.pipeline import ARTIFACT_DIR_KEY, ARTIFACT_KEY

from .callbacks import PRUNED_KEY
from .reporter import CACHE_REPAIRS_KEY, FINAL_KEY, STAGE_STEP_KEY, STEP_KEY
from .trainable import NODE_KEY, SETTINGS_KEY, trial_dirname

__all__ = [
    "REFERENCE_KEY",
    "SAMPLE_IMAGES",
    "TILE_SIZE",
    "STATUSES",
    "PRUNED_KEY",
    "StageAxis",
    "stage_axes",
    "trial_payload",
    "trial_status",
    "run_config",
    "TrialRun",
    "RunLogger",
    "WandbTrialLogger",
    "wandb_callback",
]

log = logging.getLogger(__name__)

#: W&B config entry holding the reference to the base config (the trial config's settings key).
REFERENCE_KEY = SETTINGS_KEY
#: Sample panels logged per stage.
SAMPLE_IMAGES = 3
#: Longer side (pixels) of each tile of a sample panel.
TILE_SIZE = 256
#: Run statuses (summary ``status`` and a tag).
STATUSES = ("completed", "pruned", "failed", "incomplete")
#: Result key of the reporting artifact (the pipeline adds it to every stage report).
STAGE_KEY = "stage"
#: Ray's seconds since the trial started (used for stage times; not logged as a metric).
_TIME_KEY = "time_total_s"
#: Keys of a result that never reach the logging actor: Ray's own (its clock excepted) and the config.
_RAY_KEYS = (frozenset(AUTO_RESULT_KEYS) | {"config", "done", "trial_id", "experiment_tag", "should_checkpoint",
                                            "__duplicate__", "__trial_info__"}) - {_TIME_KEY}
#: Keys of a result that are never logged as metrics: the pipeline's and the search's bookkeeping.
_BOOKKEEPING = frozenset({STAGE_KEY, STAGE_STEP_KEY, STEP_KEY, "fidelity", CACHE_REPAIRS_KEY, NODE_KEY,
                          "cache_hit", FINAL_KEY, PRUNED_KEY, _TIME_KEY, ARTIFACT_KEY, ARTIFACT_DIR_KEY})
#: Folders of a stage artifact holding one label PNG per image (the first that exists is shown).
_OUTPUT_FOLDERS = ("masks", "predictions")
#: Pixels between the tiles of a sample panel.
_GAP = 4


# --------------------------------------------------------------------------------------------------
# Pure helpers (driver and actor)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageAxis:
    """One step axis of a trial's run.

    Attributes:
        name: Axis name; its step is ``<name>/step``.
        artifacts: Artifacts whose reports and timings belong to it.
        prefix: Its metric prefix (``<prefix>_iou/<class>``), or None when it reports no mask quality.
        output: The artifact whose folder holds its masks or predictions (None: none).
        label: What its output is called in sample captions.
        split_field: ``DataConfig`` field naming the split its output is scored on.
    """

    name: str
    artifacts: tuple[str, ...]
    prefix: str | None = None
    output: str | None = None
    label: str = ""
    split_field: str = ""


def stage_axes() -> dict[str, StageAxis]:
    """The step axes of the stage graph, in pipeline order: one per stage, plus one for each
    artifact with a metric prefix other than its stage's name (the walk, ``rw``)."""
    order: list[str] = []
    members: dict[str, list[str]] = {}
    metric: dict[str, Any] = {}
    for s in graph.graph():
        name = s.metric.prefix if s.metric is not None else s.stage
        if name not in members:
            order.append(name)
            members[name] = []
        members[name].append(s.name)
        if s.report_as and s.report_as != s.name:
            members[name].append(s.report_as)
        if s.metric is not None:
            metric[name] = s
    out = {}
    for name in order:
        s = metric.get(name)
        out[name] = StageAxis(name=name, artifacts=tuple(dict.fromkeys(members[name])),
                              prefix=s.metric.prefix if s else None, output=s.name if s else None,
                              label=s.metric.label if s else "", split_field=s.metric.split_field if s else "")
    return out


def trial_payload(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the driver sends the logging actor of one result: plain values only, Ray's keys and the
    config left out (one pass over the keys; no copy of the config)."""
    return {k: v for k, v in result.items()
            if k not in _RAY_KEYS and isinstance(v, bool | int | float | str)}


def trial_status(last: Mapping[str, Any] | None, *, failed: bool) -> str:
    """``failed`` (it raised), ``pruned`` (stopped before its final result, or marked so) or
    ``completed`` (its last result carries ``final: True``)."""
    if failed:
        return "failed"
    last = last or {}
    if last.get(PRUNED_KEY):
        return "pruned"
    return "completed" if last.get(FINAL_KEY) else "pruned"


def run_config(trial_config: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B config of a trial: its searched values (every plain entry of the trial config but
    :data:`~trainables.trainable.SETTINGS_KEY`) and ``reference`` under :data:`REFERENCE_KEY`, with
    the settings' ``base_ref`` (the stored base config's file and SHA-256) when they have one."""
    searched = {k: v for k, v in trial_config.items()
                if k != SETTINGS_KEY and isinstance(v, bool | int | float | str | type(None))}
    ref = dict(reference)
    settings = trial_config.get(SETTINGS_KEY)
    if isinstance(settings, Mapping) and isinstance(settings.get("base_ref"), Mapping):
        ref["base_ref"] = dict(settings["base_ref"])
    return {**searched, REFERENCE_KEY: ref}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tile(array: Any, size: int, *, nearest: bool) -> Any:
    from PIL import Image

    img = Image.fromarray(array)
    scale = size / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    return img


def sample_panel(image: Any, masks: Sequence[Any], *, size: int = TILE_SIZE) -> Any:
    """One row: the RGB image, then each label mask in VOC colours, each at most ``size`` pixels on
    its longer side, on white."""
    import numpy as np
    from PIL import Image

    from wsss_tune.data import colorize

    tiles = [_tile(np.asarray(image, dtype=np.uint8), size, nearest=False)]
    tiles += [_tile(colorize(np.asarray(m)), size, nearest=True) for m in masks]
    width = sum(t.width for t in tiles) + _GAP * (len(tiles) - 1)
    panel = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + _GAP
    return panel


# --------------------------------------------------------------------------------------------------
# The logging actor's body: one W&B run
# --------------------------------------------------------------------------------------------------


@dataclass
class _AxisState:
    start: float = 0.0
    end: float | None = None
    step: int = 0
    ious: dict[str, float] | None = None
    logged: bool = False
    samples_tried: bool = False


class TrialRun:
    """The W&B run of one trial (the body of the logging actor; usable without Ray in tests).

    Args:
        init: ``wandb.init`` arguments (``mode`` among them).
        axes: :func:`stage_axes` of the driver (plugins' stages included).
        run_dir: The trial's run folder (``config.yaml``, and ``metrics.json`` once it finished):
            where the sample panels find the data and the stages' folders.
        samples: Sample panels per stage.
    """

    def __init__(self, init: Mapping[str, Any], *, axes: Mapping[str, StageAxis], run_dir: str | None,
                 samples: int = SAMPLE_IMAGES) -> None:
        from wsss_tune.analysis.wandb_log import start_run

        self.axes = dict(axes)
        self._by_artifact = {a: ax.name for ax in self.axes.values() for a in ax.artifacts}
        self.run_dir = Path(run_dir) if run_dir else None
        self.samples = samples
        self.errors: list[str] = []
        self.name = str(init.get("name") or init.get("id"))
        self.state: dict[str, _AxisState] = {}
        self.current: str | None = None
        self.last_time = 0.0
        self.defined: set[str] = set()
        self.outputs: dict[str, Path] = {}
        self._layout: Any = None
        self.run: Any = None
        init = dict(init)
        mode = str(init.pop("mode", "offline"))
        try:
            self.run = start_run(mode, **init)
        except Exception as exc:  # the sweep goes on without this run
            self._error(f"could not start the W&B run ({exc})")

    # -- entry points -------------------------------------------------------------------------------

    def log(self, result: Mapping[str, Any]) -> None:
        """Log one result (:func:`trial_payload`)."""
        if self.run is None:
            return
        try:
            if result.get(FINAL_KEY):
                self._final(result)
            else:
                self._result(result)
        except Exception as exc:
            self._error(f"could not log the result of stage {result.get(STAGE_KEY)!r} "
                        f"step {result.get(STAGE_STEP_KEY)!r} ({type(exc).__name__}: {exc})")

    def finish(self, status: str, error: str | None = None) -> list[str]:
        """End the run with ``status`` (one of :data:`STATUSES`): the stage-end records still
        pending, ``status`` in the summary and the tags; returns the errors met on the way."""
        if self.run is None:
            return self.errors
        try:
            for axis in list(self.state):
                self._stage_end(axis, force=True)
            self.run.summary["status"] = status
            if error:
                self.run.summary["error"] = error
            self.run.tags = (*[t for t in self.run.tags if t not in STATUSES], status)
        except Exception as exc:
            self._error(f"could not record status {status!r} ({type(exc).__name__}: {exc})")
        try:
            self.run.finish(exit_code=1 if status == "failed" else 0)
        except Exception as exc:
            self._error(f"could not finish the W&B run ({type(exc).__name__}: {exc})")
        return self.errors

    # -- results --------------------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        self.errors.append(f"W&B run {self.name}: {text}")

    def _scalars(self, result: Mapping[str, Any], prefix: str | None) -> dict[str, Any]:
        iou = f"{prefix}_iou/" if prefix else None
        return {k: v for k, v in result.items()
                if k not in _BOOKKEEPING and _number(v) and not (iou and k.startswith(iou))}

    def _axis_of(self, report: str) -> str:
        return self._by_artifact.get(report, report)

    def _result(self, result: Mapping[str, Any]) -> None:
        from wsss_tune.analysis.wandb_log import class_ious

        report = result.get(STAGE_KEY)
        if not isinstance(report, str):  # not a pipeline report: plain metrics on W&B's own step
            scalars = self._scalars(result, None)
            if scalars:
                self.run.log(scalars)
            return
        axis = self._axis_of(report)
        info = self.axes.get(axis)
        folder, artifact = result.get(ARTIFACT_DIR_KEY), result.get(ARTIFACT_KEY)
        if isinstance(folder, str) and isinstance(artifact, str):  # a stage-end record names its folder
            self.outputs[artifact] = Path(folder)
        st = self.state.get(axis)
        if st is None:
            st = self.state[axis] = _AxisState(start=self.last_time)
        if self.current is not None and self.current != axis:
            self._stage_end(self.current)
        self.current = axis
        if _number(result.get(_TIME_KEY)):
            st.end = self.last_time = float(result[_TIME_KEY])
        ious = class_ious(result, info.prefix) if info is not None and info.prefix else {}
        if ious:
            st.ious = ious
        step = result.get(STAGE_STEP_KEY)
        scalars = self._scalars(result, info.prefix if info else None)
        if _number(step):
            st.step = int(step)
            if scalars:
                self._define(axis, scalars)
                self.run.log({f"{axis}/step": st.step, **scalars})
        # A stage-end result: a stage served from the cache (no step), or one with its scores.
        if not _number(step) or ious:
            self._stage_end(axis)

    def _define(self, axis: str, keys: Any) -> None:
        step = f"{axis}/step"
        if step not in self.defined:
            self.run.define_metric(step)
            self.defined.add(step)
        for key in keys:
            if key not in self.defined:
                self.run.define_metric(key, step_metric=step)
                self.defined.add(key)

    def _stage_end(self, axis: str, *, force: bool = False) -> None:
        """Log ``axis``'s stage-end record once: when it has its scores, or has none to wait for,
        or (``force``) at the end of the trial with what there is."""
        st = self.state[axis]
        if st.logged:
            if not st.samples_tried and self.outputs:  # its folders became known with the final result
                self._log_row(axis, st, ious=False)
            return
        info = self.axes.get(axis)
        if not force and info is not None and info.prefix and not st.ious:
            return  # its scores come later (the final result)
        st.logged = True
        self._log_row(axis, st, ious=True)
        if st.end is not None:  # wall time between stage boundaries; a final result sets the pipeline's own
            self.run.summary[f"{axis}/seconds"] = round(st.end - st.start, 2)

    def _log_row(self, axis: str, st: _AxisState, *, ious: bool) -> None:
        from wsss_tune.analysis.wandb_log import iou_table

        row: dict[str, Any] = {}
        if ious and st.ious:
            row[f"{axis}/iou"] = iou_table(st.ious)
        if self.outputs:
            st.samples_tried = True
            images = self._samples(axis)
            if images:
                row[f"{axis}/samples"] = images
        if row:
            self._define(axis, row)
            self.run.log({f"{axis}/step": st.step, **row})

    # -- the final result -----------------------------------------------------------------------------

    def _final(self, result: Mapping[str, Any]) -> None:
        from wsss_tune.analysis.wandb_log import class_ious

        self.outputs = self._stage_folders()
        seconds: dict[str, float] = {}
        built: dict[str, int] = {}
        for key, value in result.items():
            kind, _, artifact = key.partition("/")
            if kind in ("seconds", "built") and artifact in self._by_artifact and _number(value):
                axis = self._by_artifact[artifact]
                if kind == "seconds":
                    seconds[axis] = seconds.get(axis, 0.0) + float(value)
                else:
                    built[axis] = built.get(axis, 0) + int(value)
        for axis, info in self.axes.items():
            ious = class_ious(result, info.prefix) if info.prefix else {}
            if ious or axis in seconds:
                st = self.state.setdefault(axis, _AxisState(start=self.last_time))
                st.ious = ious or st.ious
        summary = {k: v for k, v in result.items()
                   if k not in _BOOKKEEPING or k == CACHE_REPAIRS_KEY}
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
        for axis, value in seconds.items():
            summary[f"{axis}/seconds"] = round(value, 2)
            summary[f"{axis}/cached"] = int(built.get(axis, 0) == 0)
        for axis in [a for a in self.axes if a in self.state]:
            self._stage_end(axis, force=True)
        self.run.summary.update(summary)

    def _stage_folders(self) -> dict[str, Path]:
        """Each stage artifact's folder, from the run folder's ``metrics.json`` (empty if unreadable)."""
        if self.run_dir is None:
            return {}
        path = self.run_dir / "metrics.json"
        try:
            stages = json.loads(path.read_text()).get("stages") or {}
            return {name: Path(info["path"]) for name, info in stages.items()
                    if isinstance(info, Mapping) and info.get("path")}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._error(f"{path}: cannot read the stages' folders ({exc}); no sample images")
            return {}

    def _data(self) -> Any:
        """(config, layout) of the trial's data, from the run folder's ``config.yaml``."""
        if self._layout is None:
            from wsss_tune.config import load_config
            from wsss_tune.data import VOCLayout

            assert self.run_dir is not None
            cfg = load_config(self.run_dir / "config.yaml")
            self._layout = (cfg, VOCLayout.from_config(cfg.data))
        return self._layout

    def _samples(self, axis: str) -> list[Any]:
        """Up to :attr:`samples` panels (image | ground truth | the stage's output) of the first ids
        of the stage's evaluation split that it wrote an output for."""
        from wsss_tune.analysis.wandb_log import wandb_image

        info = self.axes.get(axis)
        if info is None or info.output is None or info.output not in self.outputs or self.samples <= 0:
            return []
        root = self.outputs[info.output]
        folder = next((root / f for f in _OUTPUT_FOLDERS if (root / f).is_dir()), None)
        if folder is None:
            return []  # e.g. DeepLab without deeplab.save_predictions
        try:
            cfg, layout = self._data()
            split = getattr(cfg.data, info.split_field)
            ids = [i for i in layout.split_ids(split) if (folder / f"{i}.png").is_file()][: self.samples]
            out = []
            for i in ids:
                panel = sample_panel(layout.load_image(i), [layout.load_mask(i), layout.load_mask(i, mask_dir=folder)])
                out.append(wandb_image(panel, caption=f"{i}: image | ground truth | {info.label} ({folder.name})"))
            return out
        except Exception as exc:
            self._error(f"could not make the {axis} sample images from {folder} ({type(exc).__name__}: {exc})")
            return []


# --------------------------------------------------------------------------------------------------
# The driver's callback
# --------------------------------------------------------------------------------------------------


class RunLogger:
    """The logging actor's body: the W&B runs of a search's trials, one :class:`TrialRun` each, in
    one process (W&B's ``reinit="create_new"``: several open runs, each used through its object).

    Args:
        axes: :func:`stage_axes` of the driver.
        samples: Sample panels per stage.
    """

    def __init__(self, *, axes: Mapping[str, StageAxis], samples: int = SAMPLE_IMAGES) -> None:
        self.axes = dict(axes)
        self.samples = samples
        self.runs: dict[str, TrialRun] = {}

    def start(self, trial_id: str, init: Mapping[str, Any], run_dir: str | None) -> None:
        if trial_id not in self.runs:
            self.runs[trial_id] = TrialRun(init, axes=self.axes, run_dir=run_dir, samples=self.samples)

    def log(self, trial_id: str, result: Mapping[str, Any]) -> None:
        run = self.runs.get(trial_id)
        if run is not None:
            run.log(result)

    def finish(self, trial_id: str, status: str, error: str | None) -> list[str]:
        run = self.runs.pop(trial_id, None)
        return run.finish(status, error) if run is not None else []


class WandbTrialLogger(LoggerCallback):
    """Ray Tune callback: one W&B run per trial, all logged by one Ray actor (see the module
    docstring). Holds only plain data until the first trial starts (Tune pickles its callbacks).

    Args:
        project / group / mode / dir: Where the runs go (``mode``: ``online`` or ``offline``; ``dir``:
            W&B writes ``<dir>/wandb/<run folder>``).
        runs_dir: The experiment's run folders (``<runs_dir>/<trial id>``).
        reference: The :data:`REFERENCE_KEY` entry of every run's config.
        job_type: The runs' job type (the phase's stage, or ``trial``).
        tags: Tags of every run (the status is added at the end).
        upload_timeout: Seconds to wait at the experiment's end for the runs to finish.
    """

    def __init__(self, *, project: str, group: str, mode: str, dir: str, runs_dir: str,
                 reference: Mapping[str, Any], job_type: str = "trial", tags: Sequence[str] = (),
                 upload_timeout: float = 30) -> None:
        self.project, self.group, self.mode, self.dir = project, group, mode, dir
        self.runs_dir = runs_dir
        self.reference = dict(reference)
        self.job_type = job_type
        self.tags = tuple(tags)
        self.upload_timeout = upload_timeout
        self.axes = stage_axes()
        self._actor: Any = None
        self._open: set[str] = set()
        self._last: dict[str, dict[str, Any]] = {}
        self._finishing: dict[Any, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_actor=None, _open=set(), _last={}, _finishing={})
        return state

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Start the logging actor when the search starts (its first call costs a class export)."""
        super().setup(*args, **kwargs)
        self._logger()

    def _logger(self) -> Any:
        if self._actor is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the driver's node (the run folders and W&B's folder are the driver's), no CPU
            # reserved; W&B settings of the driver's environment (mode, key, silence) go along.
            env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
            node = ray.get_runtime_context().get_node_id()
            self._actor = ray.remote(RunLogger).options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
                runtime_env={"env_vars": env}).remote(axes=self.axes)
        return self._actor

    def log_trial_start(self, trial: Any) -> None:
        if trial.trial_id in self._open:  # a trial started again after a failure: same run
            return
        init = {"project": self.project, "group": self.group, "job_type": self.job_type, "mode": self.mode,
                "dir": self.dir, "id": trial.trial_id, "name": trial_dirname(trial), "tags": list(self.tags),
                "config": run_config(trial.config, self.reference), "reinit": "create_new"}
        self._logger().start.remote(trial.trial_id, init, str(Path(self.runs_dir) / trial.trial_id))
        self._open.add(trial.trial_id)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial.trial_id not in self._open:
            self.log_trial_start(trial)
        payload = trial_payload(result)
        self._last[trial.trial_id] = payload
        self._actor.log.remote(trial.trial_id, payload)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial.trial_id not in self._open:
            return
        self._open.discard(trial.trial_id)
        status = trial_status(self._last.pop(trial.trial_id, None), failed=failed)
        self._finish(trial.trial_id, status, _error_line(trial) if failed else None)
        self._collect(timeout=0)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in sorted(self._open):
            self._finish(trial_id, "incomplete", None)
        self._open.clear()
        self._collect(timeout=self.upload_timeout)
        if self._actor is not None:
            import ray

            for trial_id in self._finishing.values():
                log.warning(f"W&B run {trial_id}: not finished within {self.upload_timeout} s at the end of the "
                            "search; its files may be incomplete")
            self._finishing.clear()
            ray.kill(self._actor)
            self._actor = None

    def _finish(self, trial_id: str, status: str, error: str | None) -> None:
        self._finishing[self._actor.finish.remote(trial_id, status, error)] = trial_id

    def _collect(self, *, timeout: float) -> None:
        """Take the finished runs (waiting up to ``timeout`` seconds) and warn of their errors."""
        if not self._finishing:
            return
        import ray

        futures = list(self._finishing)
        done, _ = ray.wait(futures, num_returns=len(futures), timeout=timeout)
        for future in done:
            trial_id = self._finishing.pop(future)
            try:
                errors = ray.get(future)
            except Exception as exc:
                errors = [f"W&B run {trial_id}: the logging actor failed ({type(exc).__name__}: {exc})"]
            for text in errors:
                log.warning(text)


def _error_line(trial: Any) -> str | None:
    """The last line of a failed trial's error (its type and message), from the error file Ray
    writes in the trial folder before it calls the callbacks; None if there is none."""
    try:
        path = trial.error_file
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except (OSError, TypeError, AttributeError):
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def wandb_callback(plan: Any, *, upload_timeout: float = 30) -> WandbTrialLogger:
    """The :class:`WandbTrialLogger` of a sweep plan (``plan.record.wandb`` on, not ``off``): runs
    grouped by experiment, ``job_type`` the phase's stage (else ``trial``), the base config referenced."""
    space = plan.space
    phase = plan.settings.phase
    reference = {"experiment": plan.name, "space": space.name, "base": str(space.base),
                 "overrides": dict(space.overrides), "phase": phase, "trainable": plan.trainable, "stages": list(space.stages),
                 "metric": space.metric, "mode": space.mode}
    w = plan.record.wandb
    return WandbTrialLogger(project=w.project, group=plan.name, mode=w.mode, dir=str(plan.exp_dir),
                            runs_dir=str(plan.exp_dir / RUNS_DIR), reference=reference,
                            job_type=phase if phase in graph.stage_names() else "trial",
                            tags=(phase,) if phase else (), upload_timeout=upload_timeout)
