"""Data-parallel training inside one run or trial: N processes ("ranks") train one stage together.

``run.ddp_ranks`` = N > 1 makes a stage's training start N processes (one CUDA device each, NCCL; or
N CPU processes, gloo, which is how the tests run it) that build the same model, wrap it in
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP) and run the same
:class:`~wsss_tune.stages.common.TrainingLoop`, each on its share of every batch. ``run.ddp_ranks: 0``
takes one rank per visible CUDA device, which is what a Ray trial given ``--gpus-per-trial N`` sees.

Why the stage launches ``torch.distributed`` itself rather than Ray Train's ``TorchTrainer``: a stage
runner stays one plain function (``train_eps(cfg, ...)``) that the CLI, a Ray Tune trial and the
tests call alike, and returns when its ranks are done. A ``TorchTrainer`` inside a Tune trial would
make the trial a second Ray job with its own worker group, resource request, report and checkpoint
API: the runner would have to know Ray (the library's stages must not), and the exactness below would
rest on its sampler and launch order instead of ours. Here every piece of it is in this file and
:mod:`~wsss_tune.stages.common`.

N ranks with per-rank batches that add up to b give the steps of one process with batch b:

1. **Data.** Every step's global batch is the one a single process draws (``ResumableSampler``'s
   stream cut into batches of b); rank r takes its positions r, r + N, r + 2N, ... of it
   (:func:`~wsss_tune.stages.common.make_loader`). The ranks' shares of one step are together the
   single-process batch, so a resume from step k (by any number of ranks) continues the same stream.
2. **Gradients.** DDP averages the ranks' gradients. A loss that is a mean over the items of a batch
   (images, valid pixels, labelled pairs) becomes the mean over the global batch when each rank scales
   its own mean by ``N * n_r / n`` (:func:`mean_shares`): the average over the ranks is then
   ``sum of all items / n``. The stage steps do this for each of their means. Logged values are the
   global batch's too (:func:`reduce_values`).
3. **Nothing else may couple the images of a batch.** BatchNorm in training mode does: its
   statistics are per batch. The reference backbones freeze it (ResNet-38, and the DeepLab ResNets
   with ``deeplab.freeze_bn``: eval mode, no gradient on the affine), so a batch of 2 per GPU on 4 GPUs
   gives exactly the gradients of batch 8 on one GPU, up to the order of floating-point sums. Where
   BatchNorm trains (the ``tiny`` backbone, ``deeplab.freeze_bn: false``), CUDA ranks switch it to
   :class:`~torch.nn.SyncBatchNorm` (statistics over the global batch); that does not exist on the
   CPU, where :func:`wrap` warns that each rank normalises over its own share.
4. **Randomness inside the model** (Dropout2d in ResNet-38's b6/b7, DeepLab v1's dropout) cannot
   repeat one process's draws. Each rank reseeds torch from ``(run.seed, step, rank)`` before every
   step (:func:`reseed`): the ranks draw independent masks, and a resumed run draws the same ones.

Only rank 0 logs, evaluates, writes checkpoints and the final weights, and reports; its reports
travel to the launching process, which owns the reporter (a Ray Tune session can only be reported to
from the trial's own process) and hands each on before rank 0 continues, as one process would.
Checkpoints hold no per-rank state, so a run resumes with any number of ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from multiprocessing import connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from wsss_tune.reporting import NullReporter, Reporter

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "RankError",
    "rank",
    "world_size",
    "is_main",
    "resolve_ranks",
    "launch",
    "batch_coupled",
    "wrap",
    "mean_shares",
    "reduce_values",
    "reseed",
]

#: How long a rank waits for the others in one collective. Rank 0 evaluates, writes a checkpoint and
#: waits for the reporter (which may upload it) while the others wait at the next step; a rank that
#: fails ends the run at once (the launcher stops the others), so this only bounds a real hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
#: Seconds a rank gets to exit after SIGTERM before it is killed, when the run stops early.
_STOP_GRACE_S = 10.0
#: Linux ``prctl`` option: the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


class RankError(RuntimeError):
    """A rank failed: its traceback, as the cause of the rank's own exception that :func:`launch`
    re-raises, or how the rank ended when it left no exception (killed)."""


# --------------------------------------------------------------------------------------------------
# Where this process stands
# --------------------------------------------------------------------------------------------------


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of ranks training together (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process logs, checkpoints and writes results: rank 0, or the only process."""
    return rank() == 0


def _collective_device() -> torch.device:
    """Where tensors for collectives live: this rank's CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Launching the ranks
# --------------------------------------------------------------------------------------------------


def resolve_ranks(requested: int, device: torch.device) -> int:
    """The number of ranks a stage trains with on ``device`` for ``run.ddp_ranks = requested``.

    0 means one rank per visible CUDA device (1 without CUDA). With one rank on a machine where more
    CUDA devices are visible, warns that the others stay idle.

    Raises:
        ValueError: more ranks than visible CUDA devices, or ranks on a device type other than
            ``cuda`` and ``cpu``; the message names ``run.ddp_ranks``.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"run.ddp_ranks: expected an integer >= 0, got {requested!r}")
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        ranks = requested or visible
        if ranks > visible:
            raise ValueError(f"run.ddp_ranks: {ranks} ranks need {ranks} CUDA devices, torch sees {visible} "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give the "
                             f"run or trial {ranks} GPUs (--gpus-per-trial {ranks}) or lower run.ddp_ranks")
        if ranks == 1 and visible > 1:
            warnings.warn(f"{visible} CUDA devices are visible but run.ddp_ranks is 1: this stage trains on "
                          f"{device} only; set run.ddp_ranks: 0 to train on all {visible}", stacklevel=2)
        return ranks
    if requested > 1 and device.type != "cpu":
        raise ValueError(f"run.ddp_ranks: {requested} ranks on {device.type!r}: data-parallel training runs on "
                         "'cuda' (one device per rank) or 'cpu' (gloo) only; set run.ddp_ranks: 1")
    return max(requested, 1)


def launch(
    fn: Callable[..., Any],
    *args: Any,
    ranks: int,
    device: torch.device,
    reporter: Reporter,
    batch_sizes: Mapping[str, int] | None = None,
) -> None:
    """Run ``fn(*args, reporter=..., device=...)`` once here (``ranks`` = 1), or in ``ranks`` processes.

    With one rank this is a plain call with the caller's ``reporter`` and ``device``. With more, each
    rank is a fresh process (``forkserver``, else ``spawn``: CUDA cannot be forked) in one
    ``torch.distributed`` group (NCCL on CUDA devices 0..N-1, gloo on the CPU) that calls ``fn`` with
    its own device; rank 0's reports come back here and go to ``reporter`` in order, each handed on
    before rank 0 goes on. ``fn`` must be a module-level function and ``args`` picklable.

    Args:
        fn: the stage's training body (it builds the data, model and loop itself).
        ranks: from :func:`resolve_ranks`.
        device: this run's device (its type picks the backend).
        reporter: receives rank 0's reports.
        batch_sizes: the stage's global batch sizes by config field (``{"eps.batch_size": 8}``); each
            must give every rank at least one image.

    Raises:
        ValueError: a batch smaller than ``ranks``.
        BaseException: the first failing rank's own exception (a :class:`~wsss_tune.reporting.DivergedError`
            stays one), with its traceback as the :class:`RankError` cause; ``reporter``'s own errors.
        RankError: a rank ended without an exception to report (killed, e.g. out of memory).
    """
    if ranks == 1:
        fn(*args, reporter=reporter, device=device)
        return
    for field, size in (batch_sizes or {}).items():
        if size < ranks:
            raise ValueError(f"{field}: {size} image(s) per step cannot be split over run.ddp_ranks = {ranks} ranks "
                             f"(each needs at least one); use a multiple of {ranks} or fewer ranks")
    ctx = _mp_context(fn)
    with tempfile.TemporaryDirectory(prefix="wsss-ddp-") as tmp:
        store = Path(tmp) / "store"  # the group's rendezvous file: no port to pick or collide on
        parent_end, rank0_end = ctx.Pipe()
        errors = ctx.SimpleQueue()
        procs = [ctx.Process(target=_rank_main, name=f"rank {r}",
                             args=(r, ranks, device.type, str(store), fn, args, rank0_end if r == 0 else None, errors))
                 for r in range(ranks)]
        try:
            for p in procs:
                p.start()
            rank0_end.close()  # rank 0 holds its own copy; its exit then reads as end-of-file here
            _serve(procs, parent_end, errors, reporter)
        finally:
            _stop(procs)
            parent_end.close()


def _mp_context(fn: Callable[..., Any]) -> Any:
    """A fresh-interpreter start method: ``forkserver`` (torch and the stage imported once, in its
    server; each rank forks from it) where it exists, else ``spawn``."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, fn.__module__])
        return ctx
    return mp.get_context("spawn")


def _serve(procs: Sequence[Any], reports: connection.Connection, errors: Any, reporter: Reporter) -> None:
    """Hand rank 0's reports to ``reporter`` until every rank exits; raise at the first failure."""
    waiting = {p.sentinel: (r, p) for r, p in enumerate(procs)}
    listening = [reports]
    while waiting:
        ready = connection.wait([*listening, *waiting])
        if reports in ready:
            try:
                metrics, step, checkpoint_dir = reports.recv()
            except EOFError:  # rank 0 has exited
                listening = []
            else:
                reporter.report(metrics, step=step, checkpoint_dir=checkpoint_dir)
                reports.send(True)
        ended = [waiting.pop(s) for s in ready if s in waiting]
        for _, proc in ended:
            proc.join()
        failed = [(r, proc.exitcode) for r, proc in ended if proc.exitcode != 0]
        if failed:
            raise _failure(failed, errors, len(procs))


def _failure(failed: Sequence[tuple[int, int]], errors: Any, ranks: int) -> BaseException:
    """The exception to raise when the ranks ``failed`` (rank, exit code) ended: a rank that left no
    exception (killed) caused the others' (their peer vanished); else the first exception any rank
    reported, re-raised with its traceback as the :class:`RankError` cause."""
    texts: dict[int, str] = {}  # in the order the ranks reported them
    excs: dict[int, BaseException] = {}
    while not errors.empty():
        try:
            who, exc, text = errors.get()
        except Exception:  # noqa: BLE001 - an exception that does not unpickle is reported by its text
            continue
        if text is not None:
            texts.setdefault(who, text)
        elif isinstance(exc, BaseException):
            excs.setdefault(who, exc)
    for failed_rank, code in failed:
        if failed_rank not in texts:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return RankError(f"rank {failed_rank} of {ranks} {how} without an error of its own (out of memory?)")
    first = next(iter(texts))
    cause = RankError(f"rank {first} of {ranks} failed:\n{texts[first]}")
    exc = excs.get(first)
    if exc is None:
        return cause
    exc.__cause__ = cause
    return exc


def _stop(procs: Sequence[Any]) -> None:
    """Stop the ranks still running (SIGTERM, then SIGKILL after a grace period) and reap them all."""
    running = [p for p in procs if p.is_alive()]
    for p in running:
        p.terminate()
    for p in running:
        p.join(_STOP_GRACE_S)
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent ends, so no rank outlives a killed trial."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _ParentReporter:
    """Rank 0's reporter: sends each report to the launching process and waits until it is handed on."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        self.conn.send((dict(metrics), step, checkpoint_dir))
        self.conn.recv()


def _rank_main(rank_: int, ranks: int, device_type: str, store: str, fn: Callable[..., Any], args: tuple[Any, ...],
               conn: Any, errors: Any) -> None:
    """One rank: join the group, run ``fn`` on this rank's device, report a failure to the launcher."""
    _die_with_parent()
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank_)
            device, backend = torch.device("cuda", rank_), "nccl"
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cpus // ranks))  # the ranks share the cores
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend, init_method=Path(store).as_uri(), rank=rank_, world_size=ranks,
                                timeout=COLLECTIVE_TIMEOUT)
        fn(*args, reporter=_ParentReporter(conn) if conn is not None else NullReporter(), device=device)
        dist.destroy_process_group()
    except BaseException as exc:
        # The text always arrives; the exception itself where it pickles (the launcher re-raises it).
        errors.put((rank_, None, traceback.format_exc()))
        with contextlib.suppress(Exception):
            errors.put((rank_, exc, None))
        raise


# --------------------------------------------------------------------------------------------------
# Inside a rank
# --------------------------------------------------------------------------------------------------


def batch_coupled(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers of ``model`` that normalise with batch statistics in training
    mode (after ``model.train()``): the layers that make a batch split over ranks differ from the
    whole batch. Empty for the reference backbones, which keep BatchNorm frozen."""
    was_training = model.training
    model.train()
    names = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    model.train(was_training)
    return names


def _sync_batchnorm(model: nn.Module, names: Collection[str]) -> None:
    """Replace the BatchNorm layers ``names`` of ``model`` with SyncBatchNorm (same parameters and buffers)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(parent, child)))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: ``model`` itself in one process, else ``model`` in DDP.

    BatchNorm layers that train (:func:`batch_coupled`) become SyncBatchNorm on CUDA; on the CPU they
    stay per rank, with a warning. The checkpoints and final weights stay ``model``'s (no ``module.``
    prefix), so they load in one process and resume with any number of ranks.
    """
    if world_size() == 1:
        return model
    coupled = batch_coupled(model)
    if coupled and device.type == "cuda":
        _sync_batchnorm(model, coupled)
    elif coupled and is_main():
        warnings.warn(f"{len(coupled)} BatchNorm layer(s) train with batch statistics ({coupled[0]}, ...); on the CPU "
                      f"each of the {world_size()} ranks normalises over its own share of the batch (SyncBatchNorm "
                      "needs CUDA), so the steps differ from one process", stacklevel=2)
    model.train()
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_shares(counts: Sequence[Tensor | float], *, eps: float = 0.0) -> Tensor | None:
    """Factors that turn this rank's means into its share of the global batch's means, or None in one
    process (nothing to do, no communication).

    A mean over this rank's ``n_r`` items, ``sum_r / (n_r + eps)``, times ``N * (n_r + eps) / (n + eps)``
    (``n`` the items of all N ranks) is ``N * sum_r / (n + eps)``; DDP's gradient average over the ranks
    then gives ``sum / (n + eps)``, the mean one process takes over the whole batch. A factor is 0
    where no rank has an item (the mean is 0 then).

    Args:
        counts: the item count behind each mean (one number or 0-d tensor per mean); one all-reduce.
        eps: added to each count in the mean's denominator (AffinityNet's ``count + 1e-5``).

    Shape:
        Returns: ``(len(counts),)`` float32, on this rank's device.
    """
    if world_size() == 1:
        return None
    device = _collective_device()
    local = torch.stack([torch.as_tensor(c).detach().to(device=device, dtype=torch.float64) for c in counts])
    total = local.clone()
    dist.all_reduce(total)
    shares = torch.where(total + eps > 0, world_size() * (local + eps) / (total + eps), torch.zeros_like(total))
    return shares.float()


def reduce_values(values: Mapping[str, Any], *, summed: Collection[str] = ()) -> dict[str, Any]:
    """A step's logged values over all ranks, as one process would have logged them for the batch.

    Numbers are averaged (the steps scale their means by :func:`mean_shares`, so the average is the
    global batch's mean), those named in ``summed`` are added (counts), tensors of per-image rows are
    concatenated in rank order (to the CPU), ``None`` stays ``None``. One collective; the identity in
    one process.
    """
    if world_size() == 1:
        return dict(values)
    local = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in values.items()}
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    out: dict[str, Any] = {}
    for key, value in local.items():
        parts = [g[key] for g in gathered]
        if value is None:
            out[key] = None
        elif isinstance(value, Tensor) and value.dim() > 0:
            out[key] = torch.cat(parts)
        else:
            total = sum(float(p) for p in parts)
            out[key] = total if key in summed else total / len(parts)
    return out


def reseed(seed: int, step: int) -> None:
    """Seed torch's generators (CPU and CUDA) from ``(seed, step, rank)``: independent draws on every
    rank, the same ones again after a resume."""
    state = np.random.SeedSequence([seed, step, rank()]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(state))
