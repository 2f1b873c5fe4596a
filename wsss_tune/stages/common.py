"""Training plumbing shared by every stage runner: optimiser groups, poly LR, checkpoints, loaders.

Written once here so the EPS, AffinityNet and DeepLab runners differ only in their model and loss.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from wsss_tune.reporting import Reporter, check_finite
from wsss_tune.stages import distributed
from wsss_tune.utils import runtime
from wsss_tune.utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "poly_lr",
    "build_optimizer",
    "set_poly_lr",
    "CheckpointManager",
    "ResumableSampler",
    "RankBatches",
    "make_loader",
    "capture_rng",
    "restore_rng",
    "StageResult",
    "claim_folder",
    "diff_keys",
    "prepare_model",
    "to_device",
    "make_grad_scaler",
    "save_state_dict",
    "LogWindow",
    "newest_checkpoint",
    "restore_training",
    "training_state",
    "backward",
    "optimizer_step",
    "TrainStep",
    "TrainingLoop",
    "TrainingOutOfMemoryError",
    "out_of_memory_message",
]


def poly_lr(base_lr: float, step: int, max_step: int, power: float = 0.9) -> float:
    """Polynomial decay ``base_lr * (1 - step / max_step) ** power`` (reference schedule, power 0.9)."""
    return base_lr * (1.0 - min(step, max_step) / max_step) ** power


def build_optimizer(
    param_groups: Sequence[dict[str, Any]],
    *,
    kind: str,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """SGD or Adam over groups that carry an ``lr_mult`` (and optionally their own ``weight_decay``).

    Each group's learning rate is ``lr * lr_mult``; :func:`set_poly_lr` keeps that ratio while decaying.
    """
    groups = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        mult = float(g.get("lr_mult", 1.0))
        groups.append({
            "params": params,
            "lr": lr * mult,
            "lr_mult": mult,
            "weight_decay": g.get("weight_decay", weight_decay),
            "name": g.get("name", ""),
        })
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty or frozen")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, max_step: int, power: float) -> float:
    """Set every group's LR to ``poly_lr(base_lr) * lr_mult``; returns the base LR at ``step``."""
    lr = poly_lr(base_lr, step, max_step, power)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


# --------------------------------------------------------------------------------------------------
# RNG state and checkpoints
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]] if random.getstate()[2] is not None
        else list(random.getstate()[1]),
        "python_has_gauss": random.getstate()[2] is not None,
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # One state per visible device, by index, and which one this process trains on.
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        state["cuda_device"] = torch.cuda.current_device()
    return state


def _restore_cuda_rng(states: Sequence[Tensor], saved_device: int) -> None:
    """Put per-device CUDA RNG states back on the devices that exist now, however many were saved.

    The current device gets the state of the device the checkpoint was trained on (``saved_device``),
    so a run saved with N GPUs visible continues its random stream with M; every other existing device
    gets the saved state of its own index; states of devices that are gone are ignored.
    """
    if not states or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    current = torch.cuda.current_device()
    torch.cuda.set_rng_state(states[saved_device if saved_device < len(states) else 0], current)
    for i in range(min(count, len(states))):
        if i != current:
            torch.cuda.set_rng_state(states[i], i)


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s states; CUDA states as far as the devices of this process allow
    (a checkpoint made with another number of visible GPUs resumes too)."""
    py = list(state["python"])
    gauss = py.pop() if state.get("python_has_gauss") else None
    random.setstate((3, tuple(int(v) for v in py), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    _restore_cuda_rng(list(state.get("cuda") or ()), int(state.get("cuda_device", 0)))


class CheckpointManager:
    """Atomic ``step_<n>.pt`` checkpoints in one folder, keeping the newest ``keep``.

    A checkpoint is a dict of tensors / plain values (model, optimizer, step, RNG), saved with
    ``torch.save`` to a temporary file and renamed, and loaded with ``weights_only=True``.
    """

    _PATTERN = re.compile(r"^step_(\d+)\.pt$")

    def __init__(self, directory: str | Path, *, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (self._PATTERN.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.path(step)
        atomic_write_bytes(path, buf.getvalue())
        for old in self.steps()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return path

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest readable checkpoint; an unreadable one (e.g. truncated) is skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                return step, torch.load(self.path(step), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not stop a resume
                import warnings

                warnings.warn(f"checkpoint {self.path(step)} is unreadable ({exc}); trying an older one",
                              stacklevel=2)
        return None


# --------------------------------------------------------------------------------------------------
# Data loading that resumes exactly
# --------------------------------------------------------------------------------------------------


class ResumableSampler(Sampler[int]):
    """Endless shuffled indices, one permutation per epoch seeded by ``(seed, epoch)``.

    Starting at ``start_index`` (a count of samples already drawn) skips exactly what a run that was
    never interrupted would have drawn, without loading those samples.
    """

    def __init__(self, n: int, *, seed: int, start_index: int = 0, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.start_index, self.shuffle = n, seed, start_index, shuffle

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start_index, self.n)
        while True:
            perm = self._perm(epoch)
            for i in perm[offset:]:
                yield int(i) + epoch * self.n  # encodes the epoch for per-sample augmentation seeds
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader only needs it for len()
        return 2**62


class _EpochIndexed(Dataset):
    """Maps ``epoch * n + i`` to item ``i`` with an augmentation RNG seeded by ``(seed, epoch, i)``."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        epoch, i = divmod(index, len(self.dataset))
        return self.dataset.get(i, np.random.default_rng([self.seed, epoch, i]))


class RankBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from ``sampler``'s stream, of which rank ``rank`` of
    ``num_ranks`` takes the positions ``rank, rank + num_ranks, ...``.

    The ranks' shares of one batch are together the batch one process draws (one rank takes it
    whole), so N data-parallel ranks see the single-process stream: with ``batch_size`` a multiple of
    N, rank r takes every N-th index of it. An incomplete last batch is dropped.
    """

    def __init__(self, sampler: Sampler[int], *, batch_size: int, rank: int = 0, num_ranks: int = 1) -> None:
        if not 0 <= rank < num_ranks or batch_size < num_ranks:
            raise ValueError(f"RankBatches: rank {rank} of {num_ranks} ranks with batch size {batch_size}: expected "
                             "0 <= rank < num_ranks <= batch_size")
        self.sampler, self.batch_size, self.rank, self.num_ranks = sampler, batch_size, rank, num_ranks

    def __iter__(self) -> Iterator[list[int]]:
        stream = iter(self.sampler)
        while len(batch := list(itertools.islice(stream, self.batch_size))) == self.batch_size:
            yield batch[self.rank :: self.num_ranks]

    def __len__(self) -> int:  # pragma: no cover - endless, as ResumableSampler
        return 2**62 // self.batch_size


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    num_ranks: int = 1,
) -> Iterator[Any]:
    """Endless training batches that continue exactly where ``start_step`` left off.

    ``dataset`` provides ``__len__`` and ``get(i, rng)`` (augment item ``i`` with ``rng``), so the
    augmentation of a sample depends on ``(seed, epoch, i)`` only, not on worker count or resume point.
    ``batch_size`` is the global batch: with ``num_ranks`` > 1 this is rank ``rank``'s share of each
    (:class:`RankBatches`), and ``start_step`` counts global batches, so ranks resume where one process
    (or any other number of ranks) stopped.
    """
    sampler = ResumableSampler(len(dataset), seed=seed, start_index=start_step * batch_size)
    batches = RankBatches(sampler, batch_size=batch_size, rank=rank, num_ranks=num_ranks)
    loader = DataLoader(_EpochIndexed(dataset, seed), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return iter(loader)


@dataclass
class StageResult:
    """What a stage runner returns: its metrics and the folders/files it wrote."""

    metrics: dict[str, Any]
    paths: dict[str, str]

    def __post_init__(self) -> None:
        for k, v in self.metrics.items():
            if isinstance(v, float) and math.isnan(v):
                self.metrics[k] = float("nan")


# --------------------------------------------------------------------------------------------------
# Run folders: one training configuration per folder
# --------------------------------------------------------------------------------------------------


def claim_folder(path: Path, key: Mapping[str, Any], what: str) -> None:
    """Record ``key`` in the JSON file ``path`` or check it matches the one recorded there, so a restart
    never resumes a folder written with other settings. ``what`` names the folder's content in the error."""
    text = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        old = json.loads(path.read_text())
        if json.dumps(old, sort_keys=True, default=str) != text:
            diff = diff_keys(old, json.loads(text))
            raise ValueError(f"{path.parent}: holds an {what} with different settings ({diff}); "
                             "use a fresh folder or delete it")
        return
    atomic_write_json(path, key)


def diff_keys(old: Any, new: Any, prefix: str = "") -> str:
    """``a.b: old -> new`` for every leaf where two nested dicts differ, comma-separated."""
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [diff_keys(old.get(k), new.get(k), f"{prefix}{k}.") for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        return ", ".join(parts)
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


# --------------------------------------------------------------------------------------------------
# Device placement and mixed precision
# --------------------------------------------------------------------------------------------------


_Model = TypeVar("_Model", bound=nn.Module)


def prepare_model(model: _Model, device: torch.device, channels_last: bool) -> _Model:
    """Move ``model`` to ``device``; on CUDA with ``channels_last`` also switch its memory format
    (NHWC convolutions on tensor cores). On the CPU the format stays contiguous."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """Move a batch to ``device`` (non-blocking from pinned memory), NHWC on CUDA with ``channels_last``."""
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """A loss scaler where mixed precision runs in float16, else ``None``: the autocast dtype is
    :func:`~wsss_tune.utils.runtime.amp_dtype`'s (bfloat16 on cards that run it natively, which needs
    no scaling; float16 on older cards)."""
    if runtime.needs_grad_scaler(device, amp):
        return torch.amp.GradScaler(device.type)
    return None


def backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, through the scaler when there is one."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """``optimizer.step()``, through the scaler (unscale, skip on inf, update) when there is one."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def save_state_dict(path: Path, model: nn.Module) -> None:
    """Write ``model``'s weights (CPU, contiguous) atomically: a crash leaves the old file or none."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Logging windows and exact resume
# --------------------------------------------------------------------------------------------------


class LogWindow:
    """Running sums of named scalars between two log steps; ``mean()`` averages them.

    Its state goes into every checkpoint, so a resumed run logs the same numbers as one never stopped.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, **values: Any) -> None:
        """Add each named scalar (a float or a one-element tensor) to its running sum."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def summary(self) -> dict[str, float]:
        """Each scalar's mean over the window."""
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load(self, state: Mapping[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])


def newest_checkpoint(ckpts: CheckpointManager, total: int, field: str) -> tuple[int, dict[str, Any] | None]:
    """The step to start from and the newest checkpoint's state (``(0, None)`` for a fresh run).

    Raises:
        ValueError: the checkpoint lies past ``total`` steps (``field`` names the setting that was lowered).
    """
    latest = ckpts.latest()
    if latest is None:
        return 0, None
    if latest[0] > total:
        raise ValueError(f"{ckpts.directory}: newest checkpoint is at step {latest[0]}, past {field} = {total}")
    return latest


def training_state(step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, window: Any,
                   last_logged: Mapping[str, float]) -> dict[str, Any]:
    """Everything :func:`restore_training` needs to continue exactly: weights, optimiser, step, RNGs,
    loss scaler, the open log window and the last logged values."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": capture_rng(), "window": window.state(), "last_logged": dict(last_logged)}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def restore_training(state: Mapping[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, window: Any) -> dict[str, float]:
    """Load a :func:`training_state` into the run's objects (RNGs last) and return its last logged values.

    Call it after the data loader was created: creating one draws from the global RNG, as it did at
    step 0 of the uninterrupted run.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    window.load(state["window"])
    restore_rng(state["rng"])
    return {k: float(v) for k, v in state["last_logged"].items()}


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """A training step ran out of GPU memory; the message (:func:`out_of_memory_message`) names the
    stage, step, batch and crop and what to change."""


#: Characters of torch's own out-of-memory message kept in :func:`out_of_memory_message`.
OOM_DETAIL_CHARS = 300


def out_of_memory_message(stage: str, *, step: int, batch_size: int, crop: str, micro_batches: int = 1,
                          detail: str = "") -> str:
    """What to tell the user when step ``step`` of ``stage`` ran out of memory (``crop``: ``HxW``;
    ``detail``: torch's own message, whose first line is kept)."""
    accumulated = f" x {micro_batches} accumulated micro-batches" if micro_batches > 1 else ""
    torch_says = detail.strip().split("\n")[0][:OOM_DETAIL_CHARS]
    return (f"{stage}: out of GPU memory at step {step}, batch {batch_size}{accumulated} of {crop} crops"
            f"{f' ({torch_says})' if torch_says else ''}; the trial stops. Fixes: lower {stage}.batch_size or "
            f"{stage}.crop_size, set {stage}.amp=true (16-bit activations), or run fewer trials per GPU (a larger "
            "--gpus-per-trial share); `wsss-tune preflight CONFIG --gpus-per-trial F` estimates what fits")


def _input_size(batches: Sequence[Any]) -> str:
    """``HxW`` of the first image-like (4-D) tensor of a step's batches, or ``unknown-size``."""
    for batch in batches:
        values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else [batch]
        for v in values:
            if isinstance(v, Tensor) and v.dim() == 4:
                return f"{v.shape[-2]}x{v.shape[-1]}"
    return "unknown-size"


class Window(Protocol):
    """What :class:`TrainingLoop` needs of a log window (:class:`LogWindow` or a stage's own)."""

    def add(self, **values: Any) -> None: ...

    def summary(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TrainStep:
    """One optimiser step of a stage, with the objects it updates; calling it runs the step.

    Each stage builds its own (``make_eps_step``, ``make_affinity_step``, ``make_deeplab_step``):
    :meth:`TrainingLoop.run` drives it in training, and ``wsss-tune plan`` times the very same
    function on random batches.

    Attributes:
        model, optimizer, scaler: what the step trains (the loop checkpoints and restores them).
        run: ``(batches, step) -> values`` on ``micro_batches`` loader batches: forward, loss (checked
            finite before the update, ``step`` names the 1-based step in the error), backward and one
            optimiser update. ``values`` are keyword arguments for the log window's ``add``.
        micro_batches: loader batches one step consumes (gradient accumulation).
        summed: ``values`` that are counts over the batch: with data-parallel ranks they are added
            over the ranks, the others (means, scaled by :func:`~wsss_tune.stages.distributed.mean_shares`)
            averaged (:func:`~wsss_tune.stages.distributed.reduce_values`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    run: Callable[[Sequence[Any], int], dict[str, Any]]
    micro_batches: int = 1
    summed: tuple[str, ...] = ()

    def __call__(self, batches: Sequence[Any], step: int) -> dict[str, Any]:
        return self.run(batches, step)


class TrainingLoop:
    """The training loop every stage shares, around its own :class:`TrainStep`.

    A stage builds its model and step, creates this (which finds the newest checkpoint: :attr:`start`
    is the step to continue from) and calls :meth:`run`, which creates the data loader from
    ``start``, calls :meth:`restore` (weights, optimiser, scaler, log window, RNGs; a no-op for a
    fresh run), then for each ``step in range(start + 1, total + 1)`` draws the step's batches, sets
    the poly LR, runs the step, adds its values to :attr:`window` and calls :meth:`after_step`, which
    in this order:

    1. every ``log_every`` steps and at the last one, closes the window: its summary (checked finite)
       is reported with ``<stage>/lr`` and kept as :attr:`last_logged`;
    2. every ``eval_every`` steps (when an ``evaluate`` callable is given), reports its value as
       ``<stage>_miou_tune``, the metric the scheduler reads;
    3. every ``checkpoint_every`` steps and at the last one, saves a checkpoint that resumes exactly
       (see :func:`training_state`) and hands its folder to the reporter;
    4. reports whatever of that happened at this step, always with ``<stage>/lr``.
    """

    def __init__(self, stage: str, *, total: int, total_field: str, ckpts: CheckpointManager, reporter: Reporter,
                 model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 new_window: Callable[[], Window], log_every: int, checkpoint_every: int,
                 evaluate: Callable[[], float] | None = None, eval_every: int = 0) -> None:
        self.stage, self.total = stage, total
        self.ckpts, self.reporter = ckpts, reporter
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.new_window = new_window
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.evaluate, self.eval_every = evaluate, eval_every
        self.window = new_window()
        self.last_logged: dict[str, float] = {}
        self.start, self._resume = newest_checkpoint(ckpts, total, total_field)

    def restore(self) -> None:
        """Load the newest checkpoint, if any; call it after creating the data loader (see
        :func:`restore_training`)."""
        if self._resume is not None:
            self.last_logged = restore_training(self._resume, model=self.model, optimizer=self.optimizer,
                                                scaler=self.scaler, window=self.window)
            self._resume = None

    def after_step(self, step: int, lr: float) -> None:
        """Log, evaluate, checkpoint and report after optimiser step ``step`` (1-based) taken at ``lr``."""
        last = step == self.total
        metrics: dict[str, Any] = {}
        if step % self.log_every == 0 or last:
            self.last_logged = self.window.summary()
            for name, value in self.last_logged.items():
                check_finite(name, value, step=step)
            metrics.update(self.last_logged)
            self.window = self.new_window()
        if self.evaluate is not None and self.eval_every > 0 and step % self.eval_every == 0:
            metrics[f"{self.stage}_miou_tune"] = self.evaluate()
        checkpoint_dir = None
        if step % self.checkpoint_every == 0 or last:
            self.ckpts.save(step, training_state(step, model=self.model, optimizer=self.optimizer,
                                                 scaler=self.scaler, window=self.window,
                                                 last_logged=self.last_logged))
            checkpoint_dir = str(self.ckpts.directory)
        if metrics or checkpoint_dir:
            metrics[f"{self.stage}/lr"] = lr
            self.reporter.report(metrics, step=step, checkpoint_dir=checkpoint_dir)

    def run(self, step: TrainStep, dataset: Any, *, batch_size: int, seed: int, lr: float, poly_power: float,
            num_workers: int = 0, pin_memory: bool = False) -> dict[str, float]:
        """Train from :attr:`start` to ``total`` and return :attr:`last_logged`.

        Args:
            step: the stage's step; it must train this loop's model, optimiser and scaler.
            dataset: training items for :func:`make_loader` (``__len__`` and ``get(i, rng)``).
            batch_size, seed, num_workers, pin_memory: passed to :func:`make_loader`; ``batch_size`` is
                the global batch, of which each data-parallel rank loads its share.
            lr, poly_power: base LR and power of the poly schedule, set before each step
                (``poly_lr(lr, step - 1, total, poly_power)`` times each group's ``lr_mult``).

        Under ``torch.distributed`` (:mod:`~wsss_tune.stages.distributed`) every rank runs this with its
        share of each batch; each step's values are those of the global batch, and only rank 0 logs,
        evaluates, checkpoints and reports (:meth:`after_step`).
        """
        if step.model is not self.model or step.optimizer is not self.optimizer or step.scaler is not self.scaler:
            raise ValueError(f"{self.stage}: the step trains other objects than the loop checkpoints")
        # The loader is created before the RNG is restored: creating it draws from the global RNG, as it
        # did at step 0 of the uninterrupted run. It counts loader batches, `micro_batches` per step.
        ranks = distributed.world_size()
        loader = make_loader(dataset, batch_size=batch_size, seed=seed, start_step=self.start * step.micro_batches,
                             num_workers=num_workers, pin_memory=pin_memory, rank=distributed.rank(), num_ranks=ranks)
        self.restore()
        self.model.train()
        for i in range(self.start + 1, self.total + 1):
            batches = [next(loader) for _ in range(step.micro_batches)]
            current_lr = set_poly_lr(self.optimizer, lr, i - 1, self.total, poly_power)
            if ranks > 1:
                distributed.reseed(seed, i)
            values = self._step(step, batches, i, batch_size)
            if ranks > 1:
                values = distributed.reduce_values(values, summed=step.summed)
                if not distributed.is_main():
                    continue
            self.window.add(**values)
            self.after_step(i, current_lr)
        return self.last_logged

    def _step(self, step: TrainStep, batches: Sequence[Any], i: int, batch_size: int) -> dict[str, Any]:
        """Run step ``i``: cuDNN autotuning on (training crops have one size); out of memory, the trial
        fails at once with :class:`TrainingOutOfMemoryError` (no retry: a smaller setting is needed)."""
        device = next(self.model.parameters()).device
        try:
            with runtime.fixed_size_inputs(device):
                return step(batches, i)
        except torch.OutOfMemoryError as exc:
            raise TrainingOutOfMemoryError(out_of_memory_message(
                self.stage, step=i, batch_size=batch_size, crop=_input_size(batches),
                micro_batches=step.micro_batches, detail=str(exc))) from exc
