"""Segmentation cross-entropy for DeepLab, with the reference label resizing and multi-scale sum.

The reference (deeplab-pytorch ``main.py``) computes the loss at the resolution of the logits: the
label map is shrunk to each output's size with PIL's nearest filter (``Image.NEAREST``), which
samples the source pixel ``floor((i + 0.5) * H / h)`` - the pixel-centre rule that torch calls
``nearest-exact``. With multi-scale inputs (MSC) it sums one such loss per output (full, each
scale, max-fused). :func:`seg_cross_entropy` does the same by default (``resize="labels"``);
``resize="logits"`` instead upsamples the logits bilinearly to the label size, as many WSSS
segmentation codes do.

``balanced=True`` weights each class by its inverse pixel frequency in the batch. Under the weighted
mean this is the mean over the classes present in the batch of each class's mean pixel loss, so a
rare class weighs as much as the background.

Everything runs on the device of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_tune.ops.metric import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "LABEL_RESIZE_MODE",
    "resize_labels",
    "class_balance_weights",
    "seg_cross_entropy",
    "msc_loss",
]

#: torch interpolation mode equal to PIL ``Image.NEAREST`` (pixel-centre sampling), which the
#: reference uses to shrink labels; plain ``nearest`` samples ``floor(i * H / h)`` and shifts labels.
LABEL_RESIZE_MODE = "nearest-exact"


def resize_labels(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize integer label maps with the reference's nearest rule (PIL ``NEAREST``).

    Args:
        target: Integer labels.
        size: Output ``(h, w)``.

    Returns:
        Labels of the same dtype at ``size`` (the input itself when the size already matches).

    Shape:
        target: (B, H, W) -> (B, h, w).
    """
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    # float32 holds every label value exactly (they are < 2**24).
    resized = F.interpolate(target[:, None].float(), size=size, mode=LABEL_RESIZE_MODE)
    return resized[:, 0].to(target.dtype)


def _check_inputs(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    if logits.ndim != 4:
        raise ValueError(f"seg_cross_entropy: logits must be (B, K, h, w), got shape {tuple(logits.shape)}")
    if target.ndim != 3:
        raise ValueError(f"seg_cross_entropy: target must be (B, H, W), got shape {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"seg_cross_entropy: target must hold integer labels, got dtype {target.dtype}")
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"seg_cross_entropy: batch sizes differ: logits {logits.shape[0]}, "
                         f"target {target.shape[0]}")
    num_classes = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(f"seg_cross_entropy: target has labels {values} outside 0..{num_classes - 1} "
                         f"(logits have {num_classes} classes) that are not ignore_index={ignore_index}")


def class_balance_weights(target: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-class weights ``1 / n_k`` from the pixel counts ``n_k`` of the batch (0 for absent classes).

    Only the ratios matter under the weighted mean of :func:`seg_cross_entropy`, so the usual
    normalisation ``N / (K_present * n_k)`` is left out.

    Shape:
        target: (B, H, W) -> (num_classes,), float32.
    """
    valid = target[target != ignore_index]
    counts = torch.bincount(valid.flatten().long(), minlength=num_classes)[:num_classes].float()
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1.0), torch.zeros_like(counts))


def seg_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    balanced: bool = False,
    resize: Literal["labels", "logits"] = "labels",
) -> Tensor:
    """Pixel-wise cross-entropy between logits and an integer label map.

    Args:
        logits: Class scores (background included) at any resolution.
        target: Labels ``0..K-1`` or ``ignore_index``.
        ignore_index: Label of pixels that do not count.
        balanced: Weight classes by inverse pixel frequency in the batch (a named option; the
            reference uses the plain mean over pixels).
        resize: ``labels`` (reference) shrinks the labels to the logits with
            :func:`resize_labels`; ``logits`` upsamples the logits bilinearly to the labels.

    Returns:
        Scalar loss, float32. When every pixel is ``ignore_index`` the loss is 0 (still attached to
        the graph), where plain ``F.cross_entropy`` returns NaN (0/0) and would poison the weights.

    Raises:
        ValueError: wrong shapes or dtype, or labels outside ``0..K-1`` that are not
            ``ignore_index`` (checked up front, one device sync, instead of a CUDA device assert).

    Shape:
        logits: (B, K, h, w); target: (B, H, W).
    """
    _check_inputs(logits, target, ignore_index)
    if resize == "labels":
        target = resize_labels(target, (logits.shape[-2], logits.shape[-1]))
    elif resize == "logits":
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"seg_cross_entropy: resize must be 'labels' or 'logits', got {resize!r}")
    target = target.long()
    logits = logits.float()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    weight = class_balance_weights(target, logits.shape[1], ignore_index=ignore_index) if balanced else None
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


def msc_loss(
    outputs: Tensor | Sequence[Tensor],
    target: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    balanced: bool = False,
    resize: Literal["labels", "logits"] = "labels",
) -> Tensor:
    """Sum of :func:`seg_cross_entropy` over the outputs of a multi-scale model (the reference sums).

    Args:
        outputs: One logits tensor, or the training outputs of :class:`~wsss_tune.models.deeplab.MSC`
            (full, each scale, max-fused), each at its own resolution.
        target: Labels, resized to each output separately.
        ignore_index: As in :func:`seg_cross_entropy`.
        balanced: As in :func:`seg_cross_entropy`.
        resize: As in :func:`seg_cross_entropy`.

    Returns:
        Scalar loss.

    Shape:
        outputs: (B, K, h_i, w_i) each; target: (B, H, W).
    """
    if isinstance(outputs, Tensor):
        outputs = [outputs]
    if len(outputs) == 0:
        raise ValueError("msc_loss: got an empty list of outputs")
    def one(logits: Tensor) -> Tensor:
        return seg_cross_entropy(logits, target, ignore_index=ignore_index, balanced=balanced, resize=resize)

    total = one(outputs[0])
    for logits in outputs[1:]:
        total = total + one(logits)
    return total
