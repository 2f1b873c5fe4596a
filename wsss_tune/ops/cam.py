"""Class activation maps to pseudo masks (DESIGN.md §2 "CAMs to pseudo masks").

:func:`multiscale_cam` fuses the C+1 maps of a network over scales and horizontal flips into
max-normalised maps at the image size; :func:`cam_to_mask` turns them into a label map 0..C
(0 = background, c = object class c, whose map is channel c-1; the background map is the last channel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_tune.ops.labelmap import score_argmax

__all__ = [
    "CAM_NORM_EPS",
    "REFERENCE_CAM_SCALES",
    "REFERENCE_BG_THRESHOLD",
    "multiscale_cam",
    "cam_to_mask",
]

#: Added to each class map's maximum before dividing by it (reference EPS/PSA CAM inference).
CAM_NORM_EPS = 1e-5
#: Inference scales of the reference EPS CAM inference, each also run flipped (8 passes).
REFERENCE_CAM_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
#: Constant background score of the reference pseudo-label rule.
REFERENCE_BG_THRESHOLD = 0.20


def _activate(maps: Tensor, normalization: str) -> Tensor:
    if normalization == "softmax":
        return F.softmax(maps, dim=1)
    return F.relu(maps)


def multiscale_cam(
    forward_maps: Callable[[Tensor], Tensor],
    image: Tensor,
    labels: Tensor,
    *,
    scales: Sequence[float] = REFERENCE_CAM_SCALES,
    flip: bool = True,
    normalization: Literal["softmax", "relu"] = "softmax",
) -> Tensor:
    """Multi-scale, flip-augmented, max-normalised class maps of one image.

    For each scale the image is resized (bilinear, ``align_corners=False``, size
    ``round(H*s) x round(W*s)``) and, with ``flip``, batched with its horizontal mirror; the network's
    C+1 maps go through softmax over channels (``"softmax"``, EPS) or ReLU (``"relu"``, the plain CAM
    baseline, whose background channel is untrained), are upsampled bilinearly to ``(H, W)``
    (flipped outputs are flipped back) and summed over all passes. Classes not in ``labels`` are set
    to zero; each remaining map, and the background map, is divided by its own maximum
    (+ :data:`CAM_NORM_EPS`).

    The caller runs this under ``torch.no_grad()`` / ``torch.inference_mode()`` with the network in
    eval mode (so batching a pass with its flip does not change BatchNorm statistics).

    Args:
        forward_maps: Maps a normalised image batch to raw C+1 maps (background last), e.g. the
            EPS model's CAM forward; called once per scale with a batch of 2 (image, flip) or 1.
        image: Normalised image.
        labels: Image-level labels; nonzero = present.
        scales: Resize factors.
        flip: Also run every scale horizontally flipped.
        normalization: ``"softmax"`` or ``"relu"``.

    Returns:
        Float32 maps on the device of ``forward_maps``' output: C class maps then the background.

    Shape:
        forward_maps: (N, 3, h, w) -> (N, C+1, h', w'); image: (3, H, W); labels: (C,) -> (C+1, H, W)
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a normalised (3, H, W) tensor, got shape {tuple(image.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels: expected shape (C,), got {tuple(labels.shape)}")
    if normalization not in ("softmax", "relu"):
        raise ValueError(f"normalization: expected 'softmax' or 'relu', got {normalization!r}")
    if len(scales) == 0 or any(not s > 0 for s in scales):
        raise ValueError(f"scales: expected one or more positive factors, got {tuple(scales)!r}")
    height, width = image.shape[-2:]
    num_maps = labels.shape[0] + 1
    total: Tensor | None = None
    for scale in scales:
        x = image.unsqueeze(0)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        maps = forward_maps(x)
        if maps.dim() != 4 or maps.shape[0] != x.shape[0] or maps.shape[1] != num_maps:
            raise ValueError(f"forward_maps: expected output shape ({x.shape[0]}, {num_maps}, h', w') "
                             f"(C+1 maps for {num_maps - 1} labels) for input {tuple(x.shape)}, "
                             f"got {tuple(maps.shape)}")
        maps = _activate(maps.float(), normalization)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        fused = maps[0] + maps[1].flip(-1) if flip else maps[0]
        total = fused if total is None else total + fused
    assert total is not None
    keep = torch.cat([labels.to(total.device) != 0, torch.ones(1, dtype=torch.bool, device=total.device)])
    total = torch.where(keep[:, None, None], total, total.new_zeros(()))
    return total / (total.amax(dim=(1, 2), keepdim=True) + CAM_NORM_EPS)


def cam_to_mask(
    cams: Tensor,
    labels: Tensor,
    *,
    bg_threshold: float = REFERENCE_BG_THRESHOLD,
    bg_mode: Literal["constant", "learned"] = "constant",
) -> Tensor:
    """Pseudo mask from normalised CAMs: the argmax over a background score and the class maps.

    ``"constant"`` (the reference rule) scores the background with ``bg_threshold`` everywhere and
    ignores the learned channel; ``"learned"`` uses the normalised background channel instead.
    Classes not in ``labels`` never win; ties go to the background, then to the lower class.

    Args:
        cams: From :func:`multiscale_cam` (C class maps, background last).
        labels: Image-level labels; nonzero = present.
        bg_threshold: Constant background score (``"constant"`` mode only).
        bg_mode: ``"constant"`` or ``"learned"``.

    Returns:
        int64 labels in 0..C (0 = background, c = class map c-1).

    Shape:
        cams: (C+1, H, W); labels: (C,) -> (H, W)
    """
    if cams.dim() != 3 or labels.dim() != 1 or cams.shape[0] != labels.shape[0] + 1:
        raise ValueError(f"cams/labels: expected (C+1, H, W) and (C,), got {tuple(cams.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = labels.shape[0]
    present = labels.to(cams.device) != 0
    class_maps = torch.where(present[:, None, None], cams[:num_classes], cams.new_full((), float("-inf")))
    if bg_mode == "constant":
        background = cams.new_full((1, *cams.shape[1:]), float(bg_threshold))
    elif bg_mode == "learned":
        background = cams[num_classes:]
    else:
        raise ValueError(f"bg_mode: expected 'constant' or 'learned', got {bg_mode!r}")
    return score_argmax(torch.cat([background, class_maps], dim=0), dim=0)
