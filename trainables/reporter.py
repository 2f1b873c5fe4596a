"""The Ray Tune side of the :class:`~wsss_tune.reporting.Reporter` protocol, and Tune checkpoints.

A stage runner reports ``metrics`` with a ``step`` and, after saving a training checkpoint, the folder
it saved it in. :class:`TuneReporter` turns each report into one Tune result (``tune.report``):

* the runner's metrics, with ``checkpoint_dir`` left out and anything that is not a plain number,
  bool or string dropped (Tune writes results as CSV/JSON rows and W&B logs them);
* ``stage``, ``stage_step`` (the stage's own step: the counter the shipped search spaces give ASHA
  as ``fidelity.time_attr``) and ``fidelity`` as the pipeline sends them, and ``step``, the step the
  reporter was called with (for the pipeline, counted across stages). A stage served from the
  artifact cache reports its metrics once, without a ``stage_step``, so ASHA does not file them at a
  rung the trial never trained to.

When the runner passes a checkpoint folder, the newest ``step_<n>.pt`` in it is attached as a Tune
checkpoint together with a small record saying which artifact's work folder it belongs to
(:data:`CHECKPOINT_META`). A trial that Tune restores on a host whose artifact store cannot see that
work folder (a remote store keeps work folders in a host-local cache) puts the file back with
:func:`restore_work_checkpoint` before the pipeline starts, and the stage runner resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from wsss_tune.artifacts import ArtifactKey, ArtifactStore
from wsss_tune.stages.common import CheckpointManager
from wsss_tune.utils.io import atomic_copy

__all__ = [
    "CACHE_REPAIRS_KEY",
    "CHECKPOINT_META",
    "FINAL_KEY",
    "STEP_KEY",
    "STAGE_STEP_KEY",
    "TuneReporter",
    "tune_result",
    "pack_work_checkpoint",
    "restore_work_checkpoint",
]

#: Record written next to the checkpoint file inside a Tune checkpoint.
CHECKPOINT_META = "wsss_tune_checkpoint.json"
#: Marks a trial's last result: the pipeline finished and every metric is at full fidelity. The
#: searcher tells Optuna COMPLETE only for trials that sent it (see ``trainables.search``).
FINAL_KEY = "final"
#: Result key holding how many corrupted cache artifacts the trial found and rebuilt so far
#: (:attr:`~wsss_tune.artifacts.ArtifactStore.repairs` of the trial's store); in every result.
CACHE_REPAIRS_KEY = "cache_repairs"
#: Result key holding the step the reporter was called with.
STEP_KEY = "step"
#: The reporting stage's own step, which the pipeline adds to a stage's metrics.
STAGE_STEP_KEY = "stage_step"
#: Folder of in-progress builds under a local store root, and the artifact's ``<stage>/<digest>``
#: below it (the layout documented in ``wsss_tune.artifacts``).
_WORK_FOLDER = ".work"

ReportFn = Callable[..., None]


def _plain_value(value: Any) -> Any:
    """A value Tune, CSV and W&B all take (bool, int, float - NaN included - or str); else None."""
    if isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain_value(value.item())
        except (TypeError, ValueError):
            return None
    return None


def tune_result(metrics: Mapping[str, Any], *, step: int | None = None) -> dict[str, Any]:
    """One report as a flat Tune result (see the module docstring for the keys)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "checkpoint_dir":
            continue
        plain = _plain_value(value)
        if plain is not None:
            out[str(key)] = plain
    if step is not None:
        out[STEP_KEY] = int(step)
    return out


def _work_location(checkpoint_dir: Path) -> tuple[str, str] | None:
    """``("<stage>/<digest>", "<folder inside the work folder>")`` of a checkpoint folder, if it is
    inside an artifact store's work folder."""
    parts = checkpoint_dir.parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i] == _WORK_FOLDER and i + 2 < len(parts):
            try:
                key = ArtifactKey(stage=parts[i + 1], digest=parts[i + 2])
            except ValueError:
                return None
            return str(key), "/".join(parts[i + 3:])
    return None


def pack_work_checkpoint(checkpoint_dir: str | Path, dest: str | Path, *, stage: str | None = None) -> Path | None:
    """Put the newest ``step_<n>.pt`` of ``checkpoint_dir`` and its :data:`CHECKPOINT_META` into ``dest``.

    The file is hard-linked when possible (no copy of a large checkpoint). Returns the packed file,
    or None when the folder holds no checkpoint.
    """
    src = CheckpointManager(Path(checkpoint_dir))
    steps = src.steps()
    if not steps:
        return None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = src.path(steps[-1])
    target = dest / path.name
    try:
        os.link(path, target)
    except OSError:
        shutil.copy2(path, target)
    location = _work_location(Path(checkpoint_dir).resolve())
    meta = {"stage": stage, "file": path.name, "step": steps[-1],
            "artifact": location[0] if location else None, "folder": location[1] if location else None}
    (dest / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return target


def restore_work_checkpoint(checkpoint_dir: str | Path, store: ArtifactStore) -> Path | None:
    """Put a Tune checkpoint made by :func:`pack_work_checkpoint` back into ``store``'s work folder.

    Nothing is done when the artifact is already published, when the work folder already holds a
    checkpoint at the same or a later step (the trial resumes from that), or when the checkpoint
    names no work folder. Returns the restored file, or None.

    Raises:
        ValueError: ``checkpoint_dir`` has no readable :data:`CHECKPOINT_META`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    meta_path = checkpoint_dir / CHECKPOINT_META
    try:
        meta = json.loads(meta_path.read_text())
        artifact, folder, name, step = meta["artifact"], meta["folder"], meta["file"], int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: not a checkpoint written by this package ({exc})") from None
    if not artifact:
        return None
    key = ArtifactKey.parse(artifact)
    if store.exists(key):
        return None
    target_dir = store.work_dir(key) / folder if folder else store.work_dir(key)
    manager = CheckpointManager(target_dir)
    if manager.steps() and manager.steps()[-1] >= step:
        return None
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    atomic_copy(checkpoint_dir / name, target)
    return target


class TuneReporter:
    """Reports stage metrics to Ray Tune (one ``tune.report`` per report); implements ``Reporter``.

    Args:
        report_fn: Called as ``report_fn(result, checkpoint=...)``; default ``ray.tune.report``.
        staging_dir: Folder for the short-lived checkpoint packages (default: the system temp folder).
        checkpoints: Attach the runner's training checkpoints as Tune checkpoints.
        store: The trial's artifact store: every result carries its repair count
            (:data:`CACHE_REPAIRS_KEY`), so trials.parquet shows it also for a trial stopped early.
    """

    def __init__(
        self,
        *,
        report_fn: ReportFn | None = None,
        staging_dir: str | Path | None = None,
        checkpoints: bool = True,
        store: ArtifactStore | None = None,
    ) -> None:
        if report_fn is None:
            from ray import tune

            report_fn = tune.report
        self._report_fn = report_fn
        self.staging_dir = Path(staging_dir) if staging_dir is not None else None
        self.checkpoints = checkpoints
        self.store = store
        self.count = 0
        #: Last value of each key over all reports (the final report starts from it).
        self.latest: dict[str, Any] = {}

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        result = tune_result(metrics, step=step)
        self._send(result, checkpoint_dir=checkpoint_dir, stage=result.get("stage"))

    def report_final(self, metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        """Send the trial's last result: every metric of the run, ``extra``, and ``final: True``."""
        result = {**tune_result(metrics), **extra, FINAL_KEY: True}
        self._send(result, checkpoint_dir=None, stage=None)
        return result

    def _send(self, result: dict[str, Any], *, checkpoint_dir: str | None, stage: Any) -> None:
        self.count += 1
        if self.store is not None:
            result[CACHE_REPAIRS_KEY] = int(self.store.repairs)
        for key, value in result.items():
            if not (isinstance(value, float) and math.isnan(value)):
                self.latest[key] = value
        if not (checkpoint_dir and self.checkpoints):
            self._report_fn(result)
            return
        if self.staging_dir is not None:
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        package = Path(tempfile.mkdtemp(prefix="tune-ckpt-", dir=self.staging_dir))
        try:
            if pack_work_checkpoint(checkpoint_dir, package, stage=stage if isinstance(stage, str) else None) is None:
                self._report_fn(result)
                return
            from ray.tune import Checkpoint

            # Tune copies the folder into the trial's storage before report() returns.
            self._report_fn(result, checkpoint=Checkpoint.from_directory(str(package)))
        finally:
            shutil.rmtree(package, ignore_errors=True)
