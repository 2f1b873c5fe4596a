"""Pre-flight validation: everything a run or a sweep reads, checked before any compute is spent.

:func:`preflight` reads every file of the splits the stages use (images, saliency maps of the EPS
training split, GT masks of the scored splits, labels), dry-loads each configured weight file into its
stage's backbone on the ``meta`` device (missing and unexpected keys by name), and writes a probe
file into the artifact store and the experiment folder (local paths or pyarrow URIs). For the trials
it says which device, precision and CPU budget each gets and whether each training stage's step fits
in the trial's share of GPU memory (:func:`check_trial_resources`, on the memory model of
:func:`wsss_tune.analysis.plan.check_gpu_memory`). :func:`require_preflight` raises
:class:`PreflightError` listing every problem at once, each naming its file, key or URI and what was
expected.

The individual checks are the ones ``wsss-tune doctor`` runs (:mod:`wsss_tune.doctor`) and the
dataset reader's own errors (:func:`wsss_tune.data.check_dataset`); here they run on every id, not a
sample, and a problem stops the run.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsss_tune.config import PipelineConfig
from wsss_tune.doctor import Check, _eval_splits, check_trial_device, check_weights

__all__ = ["PreflightError", "check_writable", "preflight_data", "check_trial_resources", "preflight",
           "require_preflight"]

log = logging.getLogger(__name__)

#: Name prefix of the probe file written (then removed) to prove a storage location is writable.
PROBE_PREFIX = ".wsss-preflight-"
#: Problems listed in a :class:`PreflightError` message before the rest are counted (our choice).
SHOWN_PROBLEMS = 30
#: Object classes assumed for the memory estimate when the dataset cannot be read (VOC).
VOC_CLASSES = 20


class PreflightError(ValueError):
    """A run or sweep would fail: ``problems`` are the failed checks (each names its file/key/URI)."""

    def __init__(self, problems: Sequence[Check]) -> None:
        self.problems = tuple(problems)
        lines = [f"pre-flight check failed: {len(self.problems)} problem(s) before any compute was spent"]
        for c in self.problems[:SHOWN_PROBLEMS]:
            lines.append(f"  {c.name}: {c.message}" + (f" (fix: {c.fix})" if c.fix else ""))
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more")
        super().__init__("\n".join(lines))


def check_writable(uri: str, *, name: str) -> Check:
    """Write and delete a probe file under ``uri`` (a local folder, created if missing, or a pyarrow URI).

    Args:
        uri: The storage location.
        name: Check name, e.g. ``storage.artifacts`` (the config key or option it came from).
    """
    probe = f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if "://" in uri:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(uri)
            fs.create_dir(root, recursive=True)
            path = f"{root.rstrip('/')}/{probe}"
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            fs.delete_file(path)
        else:
            folder = Path(uri).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            path_l = folder / probe
            path_l.write_bytes(b"ok")
            path_l.unlink()
    except (OSError, ValueError) as exc:
        return Check(name, "problem", f"{uri}: cannot write there ({type(exc).__name__}: {exc})",
                     "expected a writable local folder or a filesystem URI every node can write "
                     "(file:///shared/..., s3://bucket/prefix)")
    return Check(name, "ok", f"{uri} is writable")


def preflight_data(cfg: PipelineConfig, *, stages: Sequence[str]) -> list[Check]:
    """Every id of the splits ``stages`` read: one problem :class:`Check` per bad file (empty when fine).

    The EPS training split needs images, saliency maps and labels; the scored splits (pseudo-mask
    evaluation, validation, tune/held-out lists) need images and GT masks.
    """
    from wsss_tune.data import DataError, VOCLayout, check_dataset

    root = Path(cfg.data.root)
    if not root.is_dir():
        return [Check("data.root", "problem", f"{root} does not exist",
                      "expected a VOC-format dataset folder (`wsss-tune data prepare-voc` or `wsss-tune data synth`)")]
    try:
        layout = VOCLayout.from_config(cfg.data)
    except DataError as exc:
        return [Check("data.label_source", "problem", str(exc))]
    problems = []
    if "eps" in stages or "affinity" in stages:
        problems += check_dataset(layout, [cfg.data.train_split], saliency="eps" in stages, masks_for=[],
                                  warnings=True)
    evals = _eval_splits(cfg)
    problems += check_dataset(layout, evals, saliency=False, masks_for=evals)
    seen: set[tuple[str, str]] = set()
    out = []
    warned: dict[str, list[str]] = {}
    for p in problems:
        if p.severity == "warning":
            warned.setdefault(p.kind, []).append(p.message)
        elif (p.file, p.kind) not in seen:
            seen.add((p.file, p.kind))
            out.append(Check(f"data.{p.kind}", "problem", p.message))
    for kind, messages in warned.items():  # one line per kind, naming the ids: there can be many
        ids = [m.split(":", 1)[0] for m in messages]
        shown = ", ".join(ids[:SHOWN_PROBLEMS]) + (f" and {len(ids) - SHOWN_PROBLEMS} more"
                                                   if len(ids) > SHOWN_PROBLEMS else "")
        out.append(Check(f"data.{kind}", "warn", f"{len(ids)} image(s): {shown}; e.g. {messages[0]}"))
    return out


def check_trial_resources(
    cfg: PipelineConfig,
    *,
    stages: Sequence[str],
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1,
    gpu_memory: float | None = None,
    inventory: Sequence[Any] | None = None,
) -> list[Check]:
    """What each trial gets (:func:`~wsss_tune.doctor.check_trial_device`) and whether each training
    stage's step fits in its GPU memory (:func:`~wsss_tune.analysis.plan.check_gpu_memory`).

    Args:
        gpus_per_trial: The trials' GPU share; None: the sweep's default for the GPUs seen here (1 with
            ``gpu_memory`` given).
        cpus_per_trial: The trials' CPUs.
        gpu_memory: Bytes of the trials' cards (default: the smallest card seen here).
        inventory: The GPUs seen here (default :func:`~wsss_tune.utils.runtime.gpu_inventory`).
    """
    from wsss_tune.analysis.plan import check_gpu_memory
    from wsss_tune.utils.runtime import DEFAULT_GPUS_PER_TRIAL, gpu_inventory

    cards = list(gpu_inventory() if inventory is None else inventory)
    if gpus_per_trial is None and gpu_memory is not None:
        gpus_per_trial = DEFAULT_GPUS_PER_TRIAL
    checks = [check_trial_device(cfg, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, inventory=cards)]
    if checks[0].status == "problem":
        return checks
    if gpus_per_trial is None:
        from wsss_tune.utils.runtime import default_gpus_per_trial

        gpus_per_trial = default_gpus_per_trial(len(cards), cfg.run.device)
    smallest = min(cards, key=lambda c: c.total_bytes) if cards else None
    if gpu_memory is None and smallest is not None:
        gpu_memory = float(smallest.total_bytes)
    name = smallest.name if smallest is not None and gpu_memory == smallest.total_bytes else ""
    return checks + check_gpu_memory(cfg, stages, gpu_bytes=gpu_memory, gpus_per_trial=gpus_per_trial,
                                     num_classes=_num_classes(cfg), gpu_name=name)


def _num_classes(cfg: PipelineConfig) -> int:
    from wsss_tune.data import DataError, VOCLayout

    try:
        return VOCLayout.from_config(cfg.data).num_classes
    except (DataError, OSError, ValueError):
        return VOC_CLASSES


def preflight(
    cfg: PipelineConfig,
    *,
    stages: Sequence[str] = ("eps", "affinity", "deeplab"),
    store: str | None = None,
    experiments: str | Path | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1,
    gpu_memory: float | None = None,
) -> list[Check]:
    """Run every pre-flight check and return them all (``ok``, ``warn`` and ``problem``).

    Args:
        cfg: The resolved pipeline config.
        stages: Stages about to run; data and weights of other stages are not required.
        store: Artifact store URI (default ``cfg.run.artifact_store``; not checked when both are empty).
        experiments: Folder the run or sweep writes its results to (not checked when None).
        gpus_per_trial, cpus_per_trial, gpu_memory: The trials' resources (:func:`check_trial_resources`).
    """
    checks = preflight_data(cfg, stages=stages)
    if not any(c.status == "problem" for c in checks):
        checks.insert(0, Check("data", "ok", f"{cfg.data.root}: every file of the splits used reads fine"))
    roles = {"weights.eps": "eps", "weights.affinity": "affinity", "weights.deeplab": "deeplab"}
    checks += [c for c in check_weights(cfg) if roles.get(c.name) in stages]
    store = store or cfg.run.artifact_store
    if store:
        checks.append(check_writable(store, name="storage.artifacts (run.artifact_store)"))
    if experiments is not None:
        checks.append(check_writable(str(experiments), name="storage.experiments"))
    checks += check_trial_resources(cfg, stages=stages, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                                    gpu_memory=gpu_memory)
    return checks


def require_preflight(
    cfg: PipelineConfig,
    *,
    stages: Sequence[str] = ("eps", "affinity", "deeplab"),
    store: str | None = None,
    experiments: str | Path | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float = 1,
) -> list[Check]:
    """:func:`preflight`, raising :class:`PreflightError` with every problem when there is any; the
    warnings (e.g. training images with no class) are logged and do not stop the run."""
    checks = preflight(cfg, stages=stages, store=store, experiments=experiments, gpus_per_trial=gpus_per_trial,
                       cpus_per_trial=cpus_per_trial)
    problems = [c for c in checks if c.status == "problem"]
    if problems:
        raise PreflightError(problems)
    for c in checks:
        if c.status == "warn":
            log.warning("warning: %s: %s", c.name, c.message)
    return checks
