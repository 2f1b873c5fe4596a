"""Scoring a folder of masks against ground truth, with the honest tuning / held-out protocol.

Every stage (EPS pseudo masks, refined masks, DeepLab predictions) is scored the same way: a
confusion matrix per image, summed over the whole evaluation split and over its *tuning* and
*held-out* parts. A sweep optimises ``<stage>_miou_tune``; the held-out number is what it never saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsss_tune.config import DataConfig
from wsss_tune.data import VOCLayout
from wsss_tune.ops.metric import ConfusionMatrix

__all__ = ["tune_heldout_ids", "evaluate_mask_dir", "confusion_for", "miou_metrics", "score_masks"]


def tune_heldout_ids(layout: VOCLayout, data: DataConfig, eval_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``eval_ids`` into the tuning part and the held-out part.

    ``data.tune_split`` / ``data.heldout_split`` name id lists when given; otherwise each id goes to one
    half by a hash of the id (stable across runs and machines, independent of list order).
    """
    ids = list(eval_ids)
    if data.tune_split or data.heldout_split:
        tune = set(layout.split_ids(data.tune_split)) if data.tune_split else None
        held = set(layout.split_ids(data.heldout_split)) if data.heldout_split else None
        if tune is None:
            tune = set(ids) - set(held or ())
        if held is None:
            held = set(ids) - tune
        return [i for i in ids if i in tune], [i for i in ids if i in held]
    tune_ids, held_ids = [], []
    for i in ids:
        (tune_ids if hashlib.sha1(i.encode()).digest()[0] % 2 == 0 else held_ids).append(i)
    return tune_ids, held_ids


def confusion_for(per_image: Mapping[str, np.ndarray], ids: Iterable[str], num_classes: int) -> ConfusionMatrix:
    """Sum the per-image confusion matrices of ``ids``."""
    cm = ConfusionMatrix(num_classes=num_classes)
    for i in ids:
        cm.merge_matrix(per_image[i])
    return cm


def evaluate_mask_dir(layout: VOCLayout, ids: Sequence[str], mask_dir: str | Path) -> dict[str, np.ndarray]:
    """Per-image confusion matrices (K x K, K = C + 1) of the masks in ``mask_dir`` against the GT."""
    k = layout.num_classes + 1
    out = {}
    for i in ids:
        gt = layout.load_mask(i)
        pred = layout.load_mask(i, mask_dir=str(mask_dir))
        if pred.shape != gt.shape:
            raise ValueError(f"{layout.mask_path(i, mask_dir=str(mask_dir))}: size {pred.shape} differs from the "
                             f"ground truth {gt.shape}")
        cm = ConfusionMatrix(num_classes=k)
        cm.update(pred, gt)
        out[i] = cm.matrix.copy()
    return out


def miou_metrics(
    prefix: str,
    per_image: Mapping[str, np.ndarray],
    *,
    tune_ids: Sequence[str],
    heldout_ids: Sequence[str],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """``{prefix}_miou``, ``_miou_tune``, ``_miou_heldout`` (percent) and per-class IoU of the whole split."""
    k = len(class_names) + 1
    full = confusion_for(per_image, per_image.keys(), k)
    out: dict[str, Any] = {f"{prefix}_miou": 100.0 * full.miou()}
    for name, ids in (("tune", tune_ids), ("heldout", heldout_ids)):
        if ids:
            out[f"{prefix}_miou_{name}"] = 100.0 * confusion_for(per_image, ids, k).miou()
    iou = full.iou()
    for c, cname in enumerate(("background", *class_names)):
        if not np.isnan(iou[c]):
            out[f"{prefix}_iou/{cname}"] = 100.0 * float(iou[c])
    return out


def score_masks(
    prefix: str,
    layout: VOCLayout,
    data: DataConfig,
    eval_ids: Sequence[str],
    mask_dir: str | Path,
) -> dict[str, Any]:
    """Evaluate ``mask_dir`` on ``eval_ids`` and return :func:`miou_metrics` for it."""
    per_image = evaluate_mask_dir(layout, eval_ids, mask_dir)
    tune, held = tune_heldout_ids(layout, data, eval_ids)
    return miou_metrics(prefix, per_image, tune_ids=tune, heldout_ids=held, class_names=layout.class_names)
