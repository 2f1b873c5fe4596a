"""Device, precision, seeding and CPU accounting, decided in one place for every stage and every trial.

* **Device.** :func:`resolve_device` turns ``run.device`` into a torch device. A Ray trial's device
  follows the resources Ray gave it (:func:`trial_placement`): 0 GPUs is the CPU, explicitly (the
  trial's ``CUDA_VISIBLE_DEVICES`` is blanked, since Ray >= 2.60 no longer does it for 0-GPU workers),
  otherwise the GPU ids Ray assigned, with the card's memory capped at the trial's share when the
  share is a fraction. :func:`default_gpus_per_trial` is the sweep's default share.
* **Precision.** :func:`amp_dtype` is the one decision: with ``amp`` on CUDA, bfloat16 where the card
  runs it natively (compute capability >= 8.0), else float16 with a loss scaler
  (:func:`needs_grad_scaler`); full float32 on the CPU and with ``amp`` off.
* **CPU accounting.** A trial runs ``cpus`` torch threads and at most ``cpus - 1`` loader workers
  (:func:`loader_workers`): one CPU for the training process, the rest for loading.
* **Fixed-size inputs.** :func:`fixed_size_inputs` lets cuDNN pick the fastest kernels for training
  steps, whose crops all have one size.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BF16_MIN_CAPABILITY",
    "DEFAULT_GPUS_PER_TRIAL",
    "GpuInfo",
    "TrialPlacement",
    "resolve_device",
    "seed_everything",
    "gpu_inventory",
    "bf16_native",
    "amp_dtype",
    "needs_grad_scaler",
    "precision_name",
    "autocast",
    "full_precision",
    "fixed_size_inputs",
    "loader_workers",
    "default_gpus_per_trial",
    "trial_placement",
    "apply_placement",
]

#: Compute capability from which bfloat16 runs natively (Ampere, sm 8.0: bf16 tensor-core matmuls and
#: convolutions). Older cards (T4, RTX 20xx: sm 7.5) only emulate it, which torch's default
#: ``is_bf16_supported()`` counts as support.
BF16_MIN_CAPABILITY = (8, 0)
#: GPUs per trial a sweep takes when none is given and the Ray cluster has GPUs: one trial per GPU.
DEFAULT_GPUS_PER_TRIAL = 1.0
#: The variable through which CUDA (and Ray) tell a process which GPUs it may use.
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when visible (inside a trial: the GPUs Ray assigned it), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


# --------------------------------------------------------------------------------------------------
# GPUs and precision
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    capability: tuple[int, int]
    total_bytes: int

    @property
    def bf16_native(self) -> bool:
        return self.capability >= BF16_MIN_CAPABILITY

    def precision(self) -> str:
        """The mixed precision this card gets with ``amp`` on (see :func:`amp_dtype`)."""
        return "bf16 autocast" if self.bf16_native else "fp16 autocast + GradScaler (no native bf16)"


def gpu_inventory() -> list[GpuInfo]:
    """Every CUDA device torch sees (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(GpuInfo(i, str(props.name), (int(props.major), int(props.minor)), int(props.total_memory)))
    return out


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively: a CUDA card of compute capability >= 8.0 that torch
    supports bf16 on without emulation (``is_bf16_supported(including_emulation=False)``)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if tuple(torch.cuda.get_device_capability(index)) < BF16_MIN_CAPABILITY:
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype of a stage with ``amp = enabled`` on ``device``; None runs in float32.

    bfloat16 where native (:func:`bf16_native`), else float16 (which needs a loss scaler); None on the
    CPU, whose training stays in float32 (the reference numbers), and with ``amp`` off.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if bf16_native(device) else torch.float16


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    """Whether training with ``amp = enabled`` on ``device`` needs a loss scaler (float16 autocast)."""
    return amp_dtype(device, enabled) == torch.float16


def precision_name(device: torch.device, enabled: bool) -> str:
    """``bf16 autocast``, ``fp16 autocast + GradScaler`` or ``fp32``: what :func:`amp_dtype` chose."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return "fp32"
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast + GradScaler"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast to :func:`amp_dtype` on ``device``; a no-op where that is None (the CPU, ``amp`` off)."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (inputs must then be cast to float32 by the caller); a no-op
    on devices without autocast (e.g. ``meta``)."""
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def fixed_size_inputs(device: torch.device) -> Iterator[None]:
    """cuDNN autotuning (``cudnn.benchmark``) on CUDA while inputs keep one size (training crops);
    the previous setting is restored afterwards, so inference on images of every size does not
    autotune each new shape. A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------------------------------
# What a trial gets
# --------------------------------------------------------------------------------------------------


def loader_workers(configured: int, cpus: float) -> int:
    """Data-loader workers of a process holding ``cpus`` CPUs: ``min(configured, floor(cpus) - 1)``.

    One CPU runs the training process, the others may load (1 CPU: loading happens in the training
    process). Worker count never changes the batches (augmentation is seeded per sample).
    """
    return max(0, min(int(configured), math.floor(cpus) - 1))


def default_gpus_per_trial(cluster_gpus: float, device: str = "auto") -> float:
    """GPUs per trial when a sweep is given none: :data:`DEFAULT_GPUS_PER_TRIAL` where the Ray cluster
    has at least one GPU and ``run.device`` is not ``cpu``, else 0 (trials run on the CPU)."""
    if device == "cpu" or cluster_gpus < 1:
        return 0.0
    return DEFAULT_GPUS_PER_TRIAL


@dataclass(frozen=True)
class TrialPlacement:
    """Where one trial runs, from the resources Ray gave it (:func:`trial_placement`).

    Attributes:
        device: ``cpu`` or ``cuda`` (the trial's ``run.device``).
        gpus: the trial's GPU share (a fraction shares a card with other trials).
        gpu_ids: the GPU ids Ray assigned (empty for a CPU trial).
        visible_devices: the ``CUDA_VISIBLE_DEVICES`` of the trial process (empty: no GPU).
        memory_fraction: the cap on the card's memory (the share of a fractional GPU), or None.
        cpus: the trial's CPUs; ``threads`` torch threads and ``workers`` loader workers follow them.
    """

    device: str
    gpus: float
    gpu_ids: tuple[str, ...]
    visible_devices: str
    memory_fraction: float | None
    cpus: float
    threads: int
    workers: int

    def describe(self) -> str:
        """One line: device, GPU share and memory cap, CPU threads and loader workers."""
        if self.device == "cpu":
            where = "cpu" + (f" (run.device cpu; the {self.gpus:g} GPU it holds stays unused)" if self.gpus else "")
        else:
            ids = ",".join(self.gpu_ids)
            where = f"cuda (GPU {ids}" + (f", {self.gpus:g} of the card, memory capped at {self.memory_fraction:.0%}"
                                           if self.memory_fraction is not None else "") + ")"
        return (f"{where}; {self.cpus:g} CPU: {self.threads} torch thread(s), {self.workers} loader worker(s)")


def trial_placement(*, gpus: float, gpu_ids: Sequence[int | str], cpus: float, device: str = "auto",
                    num_workers: int = 0) -> TrialPlacement:
    """The device and CPU budget of a trial given ``gpus`` GPUs (ids ``gpu_ids``) and ``cpus`` CPUs.

    * 0 GPUs: the CPU, whatever ``run.device`` says except ``cuda`` (an error: the trial has no GPU);
      ``CUDA_VISIBLE_DEVICES`` is blanked.
    * Otherwise CUDA on the assigned ids (``run.device: cpu`` keeps the CPU); a fraction caps the
      card's memory at that share (``torch.cuda.set_per_process_memory_fraction``).
    * ``cpus`` torch threads (at least 1) and :func:`loader_workers` of ``num_workers``.

    Raises:
        ValueError: negative resources, or ``run.device: cuda`` in a trial without a GPU.
        RuntimeError: the trial has a GPU share but Ray assigned it no GPU id.
    """
    if not gpus >= 0 or not cpus > 0:
        raise ValueError(f"trial resources: {gpus!r} GPU, {cpus!r} CPU; expected GPU >= 0 and CPU > 0")
    threads = max(1, math.floor(cpus))
    workers = loader_workers(num_workers, cpus)
    ids = tuple(str(i) for i in gpu_ids)
    if gpus == 0:
        if device == "cuda":
            raise ValueError("run.device is 'cuda' but the trial has no GPU (--gpus-per-trial 0); give trials a GPU "
                             "share (--gpus-per-trial 1, or a fraction such as 0.5) or set run.device to auto or cpu")
        return TrialPlacement("cpu", 0.0, (), "", None, cpus, threads, workers)
    if not ids:
        raise RuntimeError(f"the trial holds {gpus:g} GPU but Ray assigned it no GPU id (ray.get_gpu_ids() is empty); "
                           "check that the Ray nodes were started with their GPUs (`ray status`)")
    if device == "cpu":
        return TrialPlacement("cpu", float(gpus), ids, "", None, cpus, threads, workers)
    fraction = float(gpus) if gpus < 1 else None
    return TrialPlacement("cuda", float(gpus), ids, ",".join(ids), fraction, cpus, threads, workers)


def apply_placement(p: TrialPlacement, environ: MutableMapping[str, str] | None = None) -> None:
    """Make this process follow ``p``: its ``CUDA_VISIBLE_DEVICES``, torch threads and memory cap.

    Call it before anything touches CUDA in the process (CUDA reads the variable once, when it starts).
    """
    env = os.environ if environ is None else environ
    env[CUDA_VISIBLE_DEVICES] = p.visible_devices
    torch.set_num_threads(p.threads)
    if p.device == "cuda" and p.memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(p.memory_fraction, 0)
