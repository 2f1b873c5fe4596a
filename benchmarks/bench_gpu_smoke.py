"""GPU smoke check, for the day a GPU is lent: every stage on CUDA, the walk's CUDA stencils, data-parallel
ranks, and AMP on/off training throughput against the FLOP count, as one table to paste into the README.

``python -m benchmarks gpu_smoke`` (``--quick``: fewer timed steps) takes a few minutes on one GPU,
well under ten. Without a CUDA device it is a dry run: every check runs on the CPU at tiny size, the
first row says "no CUDA device: dry run on CPU" and every row names its device.

Columns: ``check``, ``device``, ``amp``, ``status`` (``ok``, ``FAIL``, ``out of memory``, ``skipped``),
``seconds``, ``result``, ``expected``. Rows:

* ``device``: what torch sees (GPU name and count, CUDA version, bfloat16 support), or the dry run.
* ``stage <artifact>``: the built-in ``synth`` pipeline (EPS, AffinityNet and the random walk,
  DeepLab) on a tiny synthetic dataset, 10-20 steps per stage, with AMP and channels-last on
  CUDA: each artifact's build seconds and its mIoU (a smoke value, not a result).
* ``ddp eps x2``: EPS trained by 2 ranks against one process (:mod:`wsss_tune.stages.distributed`):
  the largest relative gap of the logged losses. NCCL on 2 GPUs, where the tiny backbone's BatchNorm
  becomes SyncBatchNorm and the gap is round-off; 2 gloo ranks on the CPU, where BatchNorm normalises
  per rank and the gap is not small. Skipped with a single GPU.
* ``walk <stencil>``: :func:`~wsss_tune.ops.random_walk.random_walk` with the stencils that run on
  CUDA (``unfold``, which ``auto`` picks there, and ``shifts``) against the dense reference on the
  same inputs, as ``bench_random_walk`` measures them: labels that agree, largest score difference.
* ``train eps/<backbone>``, ``train deeplab-v2/<backbone>``: the stage's own training step (the
  timing of ``wsss-tune plan``, :func:`wsss_tune.analysis.plan.time_stages`) at the ``voc`` config's
  backbone, crop and batch (CUDA) or at tiny ones (CPU), AMP off and on: images/s; achieved TFLOP/s
  against the FLOP count of a step, 3 forwards' worth (a backward costs about two forwards; forwards
  counted on the meta device by ``bench_eps_model`` / ``bench_deeplab_model``); and the training
  hours of the configured iterations by the plan's cost model (:mod:`wsss_tune.stages.graph`).
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["run", "failed", "COLUMNS", "DRY_RUN"]

#: The table's columns, in order (every row has each of them).
COLUMNS = ("check", "device", "amp", "status", "seconds", "result", "expected")
#: What the device row says without CUDA.
DRY_RUN = "no CUDA device: dry run on CPU"
#: Object classes of the throughput models (VOC; the FLOP counters of the model benchmarks use 20 too).
NUM_CLASSES = 20
#: The synthetic pipeline of the stage check: a tiny dataset, 10-20 steps per stage, evaluation
#: and checkpoints inside training, single-scale inference.
SYNTH_PRESET = "tiny"
STAGE_OVERRIDES: dict[str, Any] = {
    "data.num_workers": 0,
    "eps.iterations": 20, "eps.batch_size": 8, "eps.crop_size": 64, "eps.resize_long": [56, 80],
    "eps.eval_every": 10, "eps.eval_images": 4, "eps.checkpoint_every": 10, "eps.log_every": 5,
    "eps.cam_scales": [1.0],
    "affinity.iterations": 10, "affinity.crop_size": 64, "affinity.resize_long": [56, 80],
    "affinity.checkpoint_every": 5, "affinity.log_every": 5,
    "deeplab.iterations": 20, "deeplab.crop_size": 64, "deeplab.eval_every": 10, "deeplab.eval_images": 4,
    "deeplab.checkpoint_every": 10, "deeplab.log_every": 5, "deeplab.test_scales": [1.0],
    "deeplab.test_flip": False,
}
#: The metric a stage artifact's row shows.
STAGE_METRICS = {"eps": "eps_miou", "rw": "rw_miou", "deeplab": "deeplab_miou"}
#: EPS steps of the data-parallel check, and the largest relative loss gap it accepts on CUDA.
DDP_STEPS = 3
DDP_GAP_CUDA = 1e-2
#: Walk map size (cells at the affinity stride) per device type; the dense reference's N^2 matrices
#: at 56 x 56 take 0.1 GB on a GPU, at 32 x 32 the CPU squares them in about a second.
WALK_SIZE = {"cuda": 56, "cpu": 32}
WALK_STENCILS = ("unfold", "shifts")
#: Labels of a stencil must agree with the dense walk on at least this share of pixels.
WALK_AGREEMENT_PERCENT = 99.0
#: Throughput settings on the CPU (tiny models, tiny crops); on CUDA the ``voc`` config's own.
CPU_THROUGHPUT: dict[str, Any] = {
    "eps.backbone": "tiny", "eps.crop_size": 64, "eps.batch_size": 4,
    "deeplab.backbone": "tiny", "deeplab.crop_size": 65, "deeplab.batch_size": 2,
}
#: Forwards a training step costs: the forward and a backward of about twice its FLOPs.
STEP_FORWARDS = 3
#: The issue's estimate for EPS on one RTX 3090 in bfloat16 (20k steps, batch 8, 448 crops).
EPS_3090_ESTIMATE = "3.5-5.5 h for 20k steps on one 3090 (bf16)"


def _row(check: str, device: str, status: str, seconds: float | str = "", result: str = "", expected: str = "",
         amp: str = "") -> dict[str, Any]:
    return dict(zip(COLUMNS, (check, device, amp, status, seconds, result, expected), strict=True))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu x{torch.get_num_threads()}"


def _guarded(check: str, device: str, fn: Callable[[], list[dict[str, Any]]], amp: str = "") -> list[dict[str, Any]]:
    """``fn()``'s rows, or one row that says how it failed: the table is complete whatever breaks."""
    t0 = time.perf_counter()
    try:
        return fn()
    except torch.OutOfMemoryError as exc:
        status, text = "out of memory", str(exc).strip().split("\n")[0]
    except Exception as exc:  # noqa: BLE001 - a smoke check reports every failure as a row
        status, text = "FAIL", f"{type(exc).__name__}: {exc}".split("\n")[0]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [_row(check, device, status, time.perf_counter() - t0, text[:240], amp=amp)]


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _device_row(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return _row("device", _device_name(device), "dry run", result=f"{DRY_RUN}, every check at tiny size",
                    expected="a CUDA device")
    count = torch.cuda.device_count()
    return _row("device", _device_name(device), "ok",
                result=f"{count} CUDA device(s), CUDA {torch.version.cuda}, torch {torch.__version__}, "
                       f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (float16 + loss scaling)'}")


def _synth_config(root: Path, device: torch.device, extra: dict[str, Any] | None = None) -> Any:
    from wsss_tune.config import load_config

    on_cuda = device.type == "cuda"
    cuda = {f"{s}.{f}": on_cuda for s in ("eps", "affinity", "deeplab") for f in ("amp", "channels_last")}
    return load_config("synth", {**STAGE_OVERRIDES, **cuda, "data.root": str(root), "run.device": device.type,
                                 **(extra or {})})


def _stage_rows(root: Path, work: Path, device: torch.device) -> list[dict[str, Any]]:
    from wsss_tune.reporting import RecordingReporter
    from wsss_tune.stages.pipeline import run_pipeline

    cfg = _synth_config(root, device)
    result = run_pipeline(cfg, out_dir=work / "pipeline", reporter=RecordingReporter(), device=device)
    rows = []
    for label, info in result["stages"].items():
        metric = STAGE_METRICS.get(label)
        value = float(result.get(metric, math.nan)) if metric else math.nan
        ok = math.isfinite(value) if metric else True
        text = f"{metric} {value:.1f} (smoke value)" if metric else "trained"
        rows.append(_row(f"stage {label}", _device_name(device), "ok" if ok else "FAIL", float(info["seconds"]), text,
                         "finite mIoU" if metric else "", amp="on" if device.type == "cuda" else "off"))
    return rows


def _ddp_rows(root: Path, work: Path, device: torch.device) -> list[dict[str, Any]]:
    from wsss_tune.reporting import RecordingReporter
    from wsss_tune.stages.eps import train_eps

    name = "cuda:0 + cuda:1" if device.type == "cuda" else "cpu, 2 gloo ranks"
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return [_row("ddp eps x2", _device_name(device), "skipped", result="needs 2 CUDA devices, 1 visible")]
    t0 = time.perf_counter()
    losses = []
    for ranks in (1, 2):
        cfg = _synth_config(root, device, {"eps.iterations": DDP_STEPS, "eps.log_every": 1, "eps.eval_every": 0,
                                           "eps.amp": False, "run.ddp_ranks": ranks})
        rec = RecordingReporter()
        train_eps(cfg, out_dir=work / f"ddp{ranks}", reporter=rec, device=device)
        losses.append([h["eps/loss"] for h in rec.history if "eps/loss" in h])
    gap = max(abs(a - b) / abs(a) for a, b in zip(*losses, strict=True))
    if device.type == "cuda":
        status, expected = ("ok" if gap < DDP_GAP_CUDA else "FAIL"), f"gap < {DDP_GAP_CUDA:g} (SyncBatchNorm)"
    else:
        status, expected = ("ok" if math.isfinite(gap) else "FAIL"), "a gap: BatchNorm per rank on the CPU"
    return [_row("ddp eps x2", name, status, time.perf_counter() - t0,
                 f"loss gap {gap:.2e} over {DDP_STEPS} steps, 2 ranks vs 1", expected, amp="off")]


def _walk_rows(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    import numpy as np

    from benchmarks.bench_random_walk import _measure

    size = WALK_SIZE["cuda" if device.type == "cuda" else "cpu"]
    repeats = 1 if quick else 3
    dense = _measure({"size": size, "method": "dense", "repeats": 1})
    rows = []
    for stencil in WALK_STENCILS:
        res = _measure({"size": size, "method": "sparse", "stencil": stencil, "repeats": repeats})
        agree = 100.0 * float(np.mean(res["labels"] == dense["labels"]))
        diff = float(np.abs(res["scores"] - dense["scores"]).max() / np.abs(dense["scores"]).max())
        rows.append(_row(f"walk {stencil} {size}x{size}", _device_name(device),
                         "ok" if agree >= WALK_AGREEMENT_PERCENT else "FAIL", res["time_s"],
                         f"labels agree {agree:.2f}%, max rel diff {diff:.1e}, {dense['time_s'] / res['time_s']:.0f}x "
                         "faster than dense", f">= {WALK_AGREEMENT_PERCENT:g}% agree"))
    return rows


def _throughput_config(device: torch.device, amp: bool) -> Any:
    from wsss_tune.config import load_config

    both = {"eps.amp": amp, "deeplab.amp": amp, "deeplab.mask_source": "gt", "run.device": device.type}
    if device.type == "cuda":
        return load_config("voc", {**both, "eps.pretrained": "", "deeplab.pretrained": ""})
    return load_config("synth", {**both, **CPU_THROUGHPUT})


def _train_row(stage: str, device: torch.device, amp: bool, quick: bool) -> list[dict[str, Any]]:
    from benchmarks.bench_deeplab_model import _forward_gflop
    from benchmarks.bench_eps_model import forward_flops
    from wsss_tune.analysis.plan import time_stages
    from wsss_tune.stages import graph

    cfg = _throughput_config(device, amp)
    t0 = time.perf_counter()
    timings = time_stages(cfg, num_classes=NUM_CLASSES, stages=(stage,), device=device, steps=1 if quick else 3,
                          warmup=1)
    if stage == "eps":
        section, artifact, step_s = cfg.eps, "eps_model", timings.eps_step
        name = f"train eps/{section.backbone}"
        images = section.batch_size
        forward = forward_flops(section.backbone, section.crop_size)
    else:
        section, artifact, step_s = cfg.deeplab, "deeplab_model", timings.deeplab_step
        name = f"train deeplab-{section.arch}/{section.backbone}"
        images = section.batch_size * section.accumulate
        forward = _forward_gflop(section.arch, section.backbone, section.crop_size, {}) * 1e9
    cost = graph.spec(artifact).cost
    train_s = cost(timings, cfg, None)[0] if cost is not None else math.nan
    tflops = STEP_FORWARDS * forward * images / step_s / 1e12
    result = (f"{images / step_s:.1f} img/s ({images}x{section.crop_size}px), {tflops:.3g} TFLOP/s of "
              f"{STEP_FORWARDS * forward * images / 1e12:.3g} TFLOP/step, {_duration(train_s)} for "
              f"{section.iterations} steps")
    expected = EPS_3090_ESTIMATE if stage == "eps" and amp and device.type == "cuda" else ""
    if amp and device.type != "cuda":
        expected = "autocast is CUDA-only: as amp off"
    return [_row(name, _device_name(device), "ok", time.perf_counter() - t0, result, expected,
                 amp="on" if amp else "off")]


# --------------------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    """Every check's rows, the device row first (see the module docstring)."""
    from wsss_tune.data.synth import generate_synthetic_voc
    from wsss_tune.utils.runtime import resolve_device

    device = resolve_device("auto")
    name = _device_name(device)
    rows = [_device_row(device)]
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(tmp)
        root = generate_synthetic_voc(work / "data", preset=SYNTH_PRESET, seed=0)
        rows += _guarded("stages", name, lambda: _stage_rows(root, work, device))
        rows += _guarded("ddp eps x2", name, lambda: _ddp_rows(root, work, device))
        rows += _guarded("walk", name, lambda: _walk_rows(device, quick))
        for stage, amp in itertools.product(("eps", "deeplab"), (False, True)):
            rows += _guarded(f"train {stage}", name, functools.partial(_train_row, stage, device, amp, quick),
                             amp="on" if amp else "off")
    return rows


def failed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose check did not pass (``FAIL`` or ``out of memory``)."""
    return [r for r in rows if r["status"] in ("FAIL", "out of memory")]
