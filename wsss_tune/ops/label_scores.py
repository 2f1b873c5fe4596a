"""Class scores from a hard label map, for a dense CRF over masks that carry no scores of their own.

A label map says one class per pixel. :func:`label_scores` turns it into scores over the labels the
image holds (background always first): ``prob`` for the pixel's own label, the rest ``1 - prob``
spread evenly over the other labels, and a uniform score on ignored pixels (as pydensecrf's
``unary_from_labels`` with ``zero_unsure=False``, which IRN's ``crf_inference_label`` uses with
``gt_prob=0.7``). Everything runs on the device of its input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_tune.ops.metric import IGNORE_INDEX

__all__ = ["label_scores"]


def label_scores(mask: Tensor, *, prob: float, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Scores over the labels of ``mask``, and which label each plane is.

    Args:
        mask: Integer labels, ``ignore_index`` where unknown.
        prob: Score of a pixel's own label, in (0, 1).
        ignore_index: Label of the pixels that get a uniform score.

    Returns:
        ``scores`` float32 ``(K, H, W)`` summing to 1 over the planes, and ``keys`` long ``(K,)``: the
        label of each plane, 0 (background) first, then the other labels present in ascending order.
        With background alone (``K = 1``) every score is 1.

    Shape:
        mask: ``(H, W)`` -> scores ``(K, H, W)``, keys ``(K,)``.
    """
    if mask.dim() != 2 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(f"label_scores: mask must be integer labels (H, W), got {mask.dtype} {tuple(mask.shape)}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"label_scores: prob must be in (0, 1), got {prob!r}")
    mask = mask.long()
    present = torch.unique(mask[(mask != ignore_index) & (mask != 0)])
    keys = torch.cat([torch.zeros(1, dtype=torch.long, device=mask.device), present])
    k = keys.numel()
    if k == 1:
        return torch.ones((1, *mask.shape), dtype=torch.float32, device=mask.device), keys
    own = (mask[None] == keys[:, None, None]).float()
    scores = own * prob + (1.0 - own) * ((1.0 - prob) / (k - 1))
    unknown = (mask == ignore_index)[None].expand_as(scores)
    scores = torch.where(unknown, torch.full_like(scores, 1.0 / k), scores)
    return scores, keys
