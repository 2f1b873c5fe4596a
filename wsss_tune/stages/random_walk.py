"""Random-walk refinement stage: the EPS scores propagated over the cached AffinityNet affinities.

DESIGN.md §2 "Random walk". :func:`run_random_walk` rebuilds the stride-level scores from the EPS CAMs
(background ``(1 - max CAM)^α`` and the class maps, pooled as the reference), propagates them with the
sparse walk for several t in one pass, upsamples and takes the argmax: refined masks
``masks/<id>.png`` and their mIoU per t. The affinities come from
:func:`wsss_tune.stages.affinity.compute_affinities` (``aff/<id>.npy``), so β, α, t and the border
handling change without a network forward.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_tune.config import PipelineConfig, RWConfig
from wsss_tune.data import VOCLayout, save_mask_png
from wsss_tune.ops.affinity import scores_at_stride
from wsss_tune.ops.labelmap import score_argmax
from wsss_tune.ops.metric import ConfusionMatrix
from wsss_tune.ops.random_walk import random_walk, rw_labels, rw_scores_from_cams
from wsss_tune.reporting import Reporter
from wsss_tune.stages.affinity import _read_meta, _require, _union_ids, load_affinity
from wsss_tune.stages.common import StageResult
from wsss_tune.stages.eps import load_cams
from wsss_tune.stages.evaluate import miou_metrics, score_masks, tune_heldout_ids
from wsss_tune.utils import resolve_device

__all__ = ["rw_t_values", "run_random_walk"]

#: Floor of the per-pixel score sum when walked scores become probabilities for the CRF.
_PROB_EPS = 1e-8


def rw_t_values(cfg: RWConfig, t_values: Sequence[int] | None = None) -> list[int]:
    """Walk lengths to evaluate: ``t_values`` (default ``1, 2, 4, ..., 2**logt``) plus the configured ``2**logt``."""
    base = [2**k for k in range(cfg.logt + 1)] if t_values is None else list(t_values)
    bad = [t for t in base if isinstance(t, bool) or not isinstance(t, int) or t < 0]
    if bad:
        raise ValueError(f"t_values: expected non-negative integers, got {bad!r}")
    return sorted({*base, 2**cfg.logt})



def _walk_scores(cams: np.ndarray, keys: np.ndarray, r: RWConfig, stride: int) -> tuple[Tensor, Tensor]:
    """Input scores of the walk at the feature stride, background first, and each plane's class value.

    ``power`` (reference): ``(1 - max CAM)^alpha`` from the full-resolution class maps, then zero-padded
    to a multiple of the stride and average-pooled (``infer_aff.py``). ``learned``: the EPS background
    channel (max-normalised) instead, pooled the same way; ``alpha`` is not used.

    Shape:
        cams: (K, H, W) labelled class maps + background last; keys: (K,) -> (K, h, w), (K,)
    """
    cls = torch.from_numpy(cams[:-1])
    class_keys = torch.from_numpy(keys[:-1]).long()
    plane_keys = torch.cat([torch.zeros(1, dtype=torch.long), class_keys])
    if r.bg_mode == "power":
        scores, _ = rw_scores_from_cams(cls, torch.ones(cls.shape[0]), alpha=r.alpha, stride=stride)
    elif r.bg_mode == "learned":
        scores = scores_at_stride(torch.cat([torch.from_numpy(cams[-1:]), cls]), stride)
    else:
        raise ValueError(f"rw.bg_mode: expected 'power' or 'learned', got {r.bg_mode!r}")
    return scores, plane_keys


def _crf_labels(walked: Tensor, image: np.ndarray, keys: Tensor, stride: int) -> Tensor:
    """Labels after a dense CRF on the walked scores, upsampled as :func:`rw_labels` does (on the CPU,
    where the CRF runs).

    Shape:
        walked: (K, h, w); image: (H, W, 3) uint8 -> (H, W) long
    """
    from wsss_tune.ops.crf import dense_crf

    height, width = image.shape[:2]
    up = F.interpolate(walked[None], size=(walked.shape[1] * stride, walked.shape[2] * stride), mode="bilinear",
                       align_corners=False)[0, :, :height, :width]
    probs = up.clamp_min(0) / up.clamp_min(0).sum(0, keepdim=True).clamp_min(_PROB_EPS)
    refined = torch.as_tensor(dense_crf(image, probs.cpu()))
    return keys[score_argmax(refined, dim=0)]


def run_random_walk(
    cfg: PipelineConfig,
    *,
    eps_dir: Path,
    aff_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    t_values: Sequence[int] | None = None,
    device: torch.device | None = None,
) -> StageResult:
    """Refine the EPS scores with the cached affinities and score the result for several walk lengths.

    For every id of ``train_split`` ∪ ``mask_eval_split``: the walk's input scores from
    ``eps_dir/cams/<id>.npz`` (background ``(1 - max CAM)^rw.alpha`` by default, see ``rw.bg_mode``),
    pooled to the affinity stride; the sparse random walk with ``rw.beta`` for every t of
    :func:`rw_t_values` in one pass (``rw.pad_border`` picks the border geometry); bilinear upsampling
    and argmax (optionally a dense CRF first, ``rw.crf``). The masks of the configured ``t = 2**rw.logt``
    go to ``out_dir/masks/<id>.png`` (uint8 0..C, written atomically; a rerun rewrites them).

    ``aff_dir`` is the folder of ``<id>.npy`` files written by :func:`compute_affinities`.

    Metrics: ``rw_miou``, ``rw_miou_tune``, ``rw_miou_heldout``, ``rw_iou/<class>`` for the configured t;
    ``rw_miou_t/<t>`` and ``rw_miou_tune_t/<t>`` for every t; ``eps_*`` of the EPS masks the walk
    started from, ``rw_gain`` (``rw_miou - eps_miou``) and ``rw_t``. Each t is reported with
    ``step = t`` and the *tuning* mIoU only (``rw_miou_tune``), so a scheduler can use t as a fidelity
    without seeing held-out images. No network runs here.

    Raises:
        FileNotFoundError: a CAM or affinity file is missing; ModuleNotFoundError: ``rw.crf`` without
        the optional CRF package.
    """
    r = cfg.rw
    if r.crf and importlib.util.find_spec("pydensecrf") is None:
        raise ModuleNotFoundError("rw.crf is true but the optional dense CRF package is not installed: "
                                  "pip install 'wsss-tune[crf]' (pydensecrf2), or set rw.crf=false")
    device = device if device is not None else resolve_device(cfg.run.device)
    eps_dir, aff_dir, out_dir = Path(eps_dir), Path(aff_dir), Path(out_dir)
    meta = _read_meta(aff_dir)
    radius, stride = int(meta["radius"]), int(meta["stride"])
    steps = rw_t_values(r, t_values)
    t_conf = 2**r.logt

    layout = VOCLayout.from_config(cfg.data)
    eval_ids = layout.split_ids(cfg.data.mask_eval_split)
    eval_set = set(eval_ids)
    ids = _union_ids(layout, cfg)
    _require([eps_dir / "cams" / f"{i}.npz" for i in ids], "EPS CAM", f"expected the EPS output in {eps_dir}")
    _require([aff_dir / f"{i}.npy" for i in ids], "affinity", "run compute_affinities for these ids")
    k = layout.num_classes + 1
    per_image: dict[int, dict[str, np.ndarray]] = {t: {} for t in steps}
    mask_dir = out_dir / "masks"

    for image_id in ids:
        cam_path = eps_dir / "cams" / f"{image_id}.npz"
        cams, keys = load_cams(cam_path)
        height, width = cams.shape[1:]
        scores, plane_keys = _walk_scores(cams, keys, r, stride)
        aff = load_affinity(aff_dir, image_id, pad_border=r.pad_border, meta=meta)
        grid = (aff.shape[1], aff.shape[2]) if r.pad_border else (aff.shape[1] + radius - 1,
                                                                 aff.shape[2] + 2 * (radius - 1))
        if tuple(scores.shape[1:]) != grid:
            raise ValueError(f"{aff_dir / (image_id + '.npy')}: affinity grid {grid} does not match the CAMs "
                             f"{cam_path} ({height}x{width} at stride {stride} -> {tuple(scores.shape[1:])})")
        gt = layout.load_mask(image_id) if image_id in eval_set else None
        # Images without ground truth only need the masks of the configured t.
        walked = random_walk(aff.to(device), scores.to(device), radius=radius, beta=r.beta,
                             t_values=steps if gt is not None else [t_conf], pad_border=r.pad_border)
        image = layout.load_image(image_id) if r.crf else None
        for t, out in walked.items():
            if image is not None:
                pred = _crf_labels(out.cpu(), image, plane_keys, stride)
            else:
                pred = rw_labels(out, (height, width), plane_keys, stride=stride)
            pred_np = pred.to(torch.uint8).cpu().numpy()
            if t == t_conf:
                save_mask_png(mask_dir / f"{image_id}.png", pred_np)
            if gt is not None:
                if gt.shape != pred_np.shape:
                    raise ValueError(f"{layout.mask_path(image_id)}: ground truth {gt.shape} differs from the "
                                     f"CAM size {pred_np.shape} of {cam_path}")
                per_image[t][image_id] = ConfusionMatrix(num_classes=k).update(pred_np, gt).matrix.copy()
    mask_dir.mkdir(parents=True, exist_ok=True)

    tune, held = tune_heldout_ids(layout, cfg.data, eval_ids)
    names = layout.class_names
    metrics: dict[str, Any] = {}
    for t in steps:
        m = miou_metrics("rw", per_image[t], tune_ids=tune, heldout_ids=held, class_names=names)
        metrics[f"rw_miou_t/{t}"] = m["rw_miou"]
        if "rw_miou_tune" in m:
            metrics[f"rw_miou_tune_t/{t}"] = m["rw_miou_tune"]
            reporter.report({"rw_miou_tune": m["rw_miou_tune"], "rw/t": t}, step=t)
        if t == t_conf:
            metrics.update(m)
    metrics.update(score_masks("eps", layout, cfg.data, eval_ids, eps_dir / "masks"))
    metrics["rw_gain"] = metrics["rw_miou"] - metrics["eps_miou"]
    metrics["rw_t"] = t_conf
    return StageResult(metrics=metrics, paths={"masks": str(mask_dir)})
