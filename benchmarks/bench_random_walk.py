"""Sparse local random walk vs the reference's dense walk: time, peak memory, agreement.

Each case runs in a fresh process (spawned) on synthetic inputs made from a fixed seed: a map with
two discs, AffinityNet-like affinities from region features with noise, and walk scores
``[(1 - max CAM)^16, 2 class maps]`` (K = 3) from blurred, bloated CAMs; β = 8, t = 256 (logt = 8),
radius 5, float32, reference border geometry.

* ``method``: the dense reference, or :func:`random_walk` with one ``stencil`` (``auto`` is what it
  picks on the device: the fused compiled kernel on a CPU); the fused kernel is compiled (or loaded
  from its cache) during a warm-up call on a small map, not in the measured calls.
* ``time_s``: wall time of one walk, best of ``repeats`` runs (the machine may be shared: the best
  run is the least disturbed one).
* ``peak_mem_MB``: on a CPU, the growth of the process's peak resident memory during its first walk
  (Linux: the high-water mark is reset through ``/proc/self/clear_refs`` right before the call and
  read from ``VmHWM``; elsewhere ``ru_maxrss`` of the fresh process minus the resident memory before
  the call); on CUDA, ``torch.cuda.max_memory_allocated`` growth.
* ``load_1min``: the machine's 1-minute load average after the case (timings on a shared machine
  are only comparable at similar load).
* ``labels_agree_%``: pixels of the final masks (bilinear upsampling by 8, argmax) on which the case
  agrees with the dense reference; ``max_rel_diff``: largest score difference over the largest score.

The dense form is skipped where it does not fit: on a CPU above 64 x 64 (N² float32 matrices and
O(N³) squarings: ~31 TFLOP at 112 x 112), on a GPU when three N x N matrices exceed half the free memory.
"""

from __future__ import annotations

import gc
import math
import os
import re
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

__all__ = ["run"]

#: Reference walk settings (PSA ``infer_aff.py``): β = 8, logt = 8, α = 16; radius 5 at stride 8.
BETA = 8.0
LOGT = 8
ALPHA = 16.0
RADIUS = 5
STRIDE = 8
#: Implementations of the walk step compared (``auto``: what :func:`random_walk` picks on this device).
STENCILS = ("auto", "fused", "shifts", "unfold")
#: Seed of the synthetic inputs (same inputs for every method of a size).
SEED = 0
#: Map size of the warm-up call that precedes the measured one.
WARMUP_SIZE = 12
#: Largest map (pixels) for which the dense walk runs on a CPU: 64 x 64 (~10 s on 2 cores).
CPU_DENSE_MAX_PIXELS = 64 * 64
#: The dense walk runs on a GPU when its three N x N float32 matrices take at most this share of free memory.
GPU_DENSE_MEMORY_SHARE = 0.5


def _inputs(size: int, device: Any) -> tuple[Any, Any, Any]:
    """Affinities (34, h', w'), scores (3, h, w) and plane keys for a size x size walk map."""
    import torch
    import torch.nn.functional as F

    from wsss_tune.ops.affinity import affinity_from_features
    from wsss_tune.ops.random_walk import rw_scores_from_cams

    gen = torch.Generator().manual_seed(SEED)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    region = torch.zeros(size, size, dtype=torch.long)
    for cls, (cy, cx, rad) in enumerate([(0.35, 0.3, 0.22), (0.6, 0.7, 0.25)], start=1):
        region[(yy - cy * size) ** 2 + (xx - cx * size) ** 2 < (rad * size) ** 2] = cls
    embed = torch.randn(3, 16, generator=gen)
    feat = embed[region].permute(2, 0, 1)[None] + 0.3 * torch.randn(1, 16, size, size, generator=gen)
    aff = affinity_from_features(feat, radius=RADIUS)[0]
    # CAMs: the discs blurred (bloated past their borders) plus noise, max-normalised.
    masks = torch.stack([(region == c).float() for c in (1, 2)])[:, None]
    kernel = torch.ones(1, 1, 7, 7) / 49.0
    cams = F.conv2d(F.conv2d(masks, kernel, padding=3), kernel, padding=3)[:, 0]
    cams = (cams + 0.05 * torch.rand(2, size, size, generator=gen)).clamp_min(0)
    cams = cams / (cams.flatten(1).amax(1)[:, None, None] + 1e-5)
    scores, keys = rw_scores_from_cams(cams, torch.ones(2), alpha=ALPHA)
    return aff.to(device), scores.to(device), keys


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(rf"{field}:\s+(\d+) kB", fh.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux: "5" resets the peak resident set size (VmHWM).
        return True
    except OSError:
        return False


def _measure(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process; returns time, peak memory, scores and labels."""
    import torch

    from wsss_tune.ops.random_walk import dense_random_walk_reference, random_walk, rw_labels
    from wsss_tune.utils.runtime import resolve_device

    device = resolve_device("auto")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_values = case.get("t_values", (2**LOGT,))

    def walk(aff: Any, scores: Any) -> Any:
        if case["method"] == "dense":
            return dense_random_walk_reference(aff, scores, radius=RADIUS, beta=BETA, logt=LOGT)
        return random_walk(aff, scores, radius=RADIUS, beta=BETA, t_values=t_values, stencil=case["stencil"])[2**LOGT]

    # Warm-up on a tiny map: lazy initialisation (and the fused kernel's compilation, or its load
    # from the on-disk cache) happens here, while the allocations that the measured call could reuse
    # stay small.
    walk(*_inputs(WARMUP_SIZE, device)[:2])
    aff, scores, keys = _inputs(case["size"], device)
    sync()

    def call() -> Any:
        return walk(aff, scores)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        rss = _rss_bytes("VmRSS")
        if rss is not None and _reset_peak():
            out = call()
            peak = (_rss_bytes("VmHWM") or 0) - rss
        else:  # fresh process: its peak so far is about its resident memory now
            base = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out = call()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    size = case["size"]
    labels = rw_labels(out.float(), (size * STRIDE, size * STRIDE), keys.to(out.device), stride=STRIDE)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return {"time_s": min(times), "peak_bytes": max(peak, 0), "scores": out.float().cpu().numpy(),
            "labels": labels.cpu().numpy(), "load": load}


def _dense_fits(size: int) -> bool:
    import torch

    pixels = size * size
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return 3 * pixels * pixels * 4 <= GPU_DENSE_MEMORY_SHARE * free
    return pixels <= CPU_DENSE_MAX_PIXELS


def _in_fresh_process(case: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, case).result()


def run(quick: bool) -> list[dict]:
    """One row per (map size, method); see the module docstring for the columns."""
    import numpy as np
    import torch

    on_gpu = torch.cuda.is_available()
    sizes = (32, 40) if quick else (56, 64, 112)
    repeats = 3 if quick else 5
    rows: list[dict] = []
    for size in sizes:
        stencils = tuple(s for s in STENCILS if s != "fused" or not on_gpu)  # the fused kernel is CPU-only
        cases: list[dict[str, Any]] = [{"method": "sparse", "stencil": stencil} for stencil in stencils] + [
            {"method": "sparse", "stencil": "auto", "t_values": tuple(2**k for k in range(LOGT + 1)),
             "label": "sparse auto, t=1,2,..,256 in one pass"},
        ]
        dense = None
        if _dense_fits(size):
            dense = _in_fresh_process({"size": size, "method": "dense", "repeats": 2 if size * size > 2000 else 3})
        for case in cases:
            res = _in_fresh_process({"size": size, "repeats": repeats, **case})
            row: dict[str, Any] = {
                "map": f"{size}x{size}",
                "N": size * size,
                "method": case.get("label", f"sparse {case['stencil']}"),
                "time_s": res["time_s"],
                "peak_mem_MB": res["peak_bytes"] / 2**20,
                "load_1min": res["load"],
            }
            if dense is not None:
                row["speedup_vs_dense"] = dense["time_s"] / res["time_s"]
                row["labels_agree_%"] = 100.0 * float(np.mean(res["labels"] == dense["labels"]))
                row["max_rel_diff"] = float(np.abs(res["scores"] - dense["scores"]).max()
                                            / np.abs(dense["scores"]).max())
            rows.append(row)
        if dense is not None:
            rows.append({"map": f"{size}x{size}", "N": size * size, "method": "dense reference (float32)",
                         "time_s": dense["time_s"], "peak_mem_MB": dense["peak_bytes"] / 2**20,
                         "load_1min": dense["load"], "speedup_vs_dense": 1.0, "labels_agree_%": 100.0, "max_rel_diff": 0.0})
        else:
            n = size * size
            rows.append({"map": f"{size}x{size}", "N": n, "method": "dense reference: skipped",
                         "time_s": math.nan, "peak_mem_MB": 3 * n * n * 4 / 2**20,
                         "note": f"~{2 * n**3 * LOGT / 1e12:.0f} TFLOP, 3 N x N float32 (estimated)"})
    return rows
