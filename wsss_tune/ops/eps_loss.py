"""EPS loss: classification + saliency pseudo-pixel supervision (Lee et al., CVPR 2021).

Reproduces the reference ``get_eps_loss`` (DESIGN.md §2 "EPS loss") as plain functions over
tensors, then a thin :class:`EPSLoss` module. The network has C+1 maps with the background **last**.

Steps, per batch:

1. :func:`resize_saliency` - nearest resize of the saliency map S to the CAM size (it stays soft).
2. :func:`overlap_ratio` - per image and class, the share of the rounded class map inside the
   rounded saliency map (on detached probabilities).
3. :func:`estimated_saliency` - present classes with overlap > tau are foreground, the other
   present classes join the background channel; ``S_hat = lam*M_fg + (1-lam)*(1-M_bg)``.
4. :func:`saliency_loss` - mean squared error between ``S_hat`` and S.
5. :func:`classification_loss` - multilabel soft-margin on the C object logits.

Everything runs on the device of its inputs; the loss itself is computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OVERLAP_EPS",
    "REFERENCE_TAU",
    "REFERENCE_LAM",
    "EPSLossOutput",
    "resize_saliency",
    "overlap_ratio",
    "estimated_saliency",
    "saliency_loss",
    "classification_loss",
    "eps_loss",
    "present_class_overlap",
    "EPSLoss",
]

#: Added to the rounded class map at *every pixel* of the overlap denominator
#: (reference ``get_eps_loss``: ``(round(p) + 1e-04).sum()``), so an empty map gives overlap 0.
OVERLAP_EPS = 1e-4
#: Overlap threshold above which a present class counts as foreground (reference VOC default).
REFERENCE_TAU = 0.4
#: Weight of the foreground map against the inverted background map (reference VOC default).
REFERENCE_LAM = 0.5


@dataclass(frozen=True)
class EPSLossOutput:
    """Result of :func:`eps_loss`.

    Attributes:
        loss: ``cls + sal``, scalar, differentiable.
        cls: Classification loss, scalar.
        sal: Saliency loss, scalar.
        overlap: Overlap ratio of every class with the saliency map (detached), the quickest
            diagnostic of EPS: near 0.8 when a class works, below 0.1 when it has collapsed into
            the background. Absent classes have a value too; mask them with the labels.

    Shape:
        overlap: (B, C)
    """

    loss: Tensor
    cls: Tensor
    sal: Tensor
    overlap: Tensor


def _check_maps_labels(maps: Tensor, labels: Tensor, maps_name: str) -> int:
    """Validate (B, C+1, h, w) maps against (B, C) labels; return C."""
    if maps.dim() != 4:
        raise ValueError(f"{maps_name}: expected shape (B, C+1, h, w), got {tuple(maps.shape)}")
    if labels.dim() != 2 or labels.shape[0] != maps.shape[0] or labels.shape[1] + 1 != maps.shape[1]:
        raise ValueError(
            f"labels: expected shape (B, C) = ({maps.shape[0]}, {maps.shape[1] - 1}) to match {maps_name} "
            f"{tuple(maps.shape)} (C object classes + background last), got {tuple(labels.shape)}"
        )
    return labels.shape[1]


def _check_saliency(saliency: Tensor, batch: int) -> None:
    if saliency.dim() != 4 or saliency.shape[1] != 1 or saliency.shape[0] != batch:
        raise ValueError(f"saliency: expected shape (B, 1, H, W) with B = {batch}, got {tuple(saliency.shape)}")


def _check_weights(tau: float, lam: float) -> None:
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau: expected an overlap threshold in [0, 1], got {tau!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a blending weight in [0, 1], got {lam!r}")


def resize_saliency(saliency: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a soft saliency map to the CAM size with nearest interpolation, as the reference does.

    For an integer reduction factor k, nearest sampling keeps every k-th pixel starting at the first
    (no averaging), which changes which classes pass tau on real maps; keep it.

    Args:
        saliency: Saliency in [0, 1].
        size: Target ``(h, w)``.

    Shape:
        saliency: (B, 1, H, W) -> (B, 1, h, w)
    """
    if saliency.dim() != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency: expected shape (B, 1, H, W), got {tuple(saliency.shape)}")
    if len(size) != 2:
        raise ValueError(f"size: expected (h, w), got {tuple(size)!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(saliency.shape[-2:]) == size:
        return saliency
    return F.interpolate(saliency, size=size, mode="nearest")


def overlap_ratio(probs: Tensor, saliency: Tensor) -> Tensor:
    """Overlap of each rounded class map with the rounded saliency map.

    ``O_c = sum(round(p_c) * round(S)) / sum(round(p_c) + OVERLAP_EPS)`` over the pixels of one image,
    with ``torch.round`` (round half to even: 0.5 -> 0) on detached probabilities.

    Args:
        probs: Softmax over the C+1 maps (background last); detached here.
        saliency: Saliency at the same size, in [0, 1].

    Shape:
        probs: (B, C+1, h, w); saliency: (B, 1, h, w) -> (B, C)
    """
    if probs.dim() != 4:
        raise ValueError(f"probs: expected shape (B, C+1, h, w), got {tuple(probs.shape)}")
    _check_saliency(saliency, probs.shape[0])
    if saliency.shape[-2:] != probs.shape[-2:]:
        raise ValueError(f"saliency: expected spatial size {tuple(probs.shape[-2:])} to match probs, got "
                         f"{tuple(saliency.shape[-2:])}; resize it with resize_saliency first")
    binary = torch.round(probs[:, :-1].detach())
    inside = (binary * torch.round(saliency)).flatten(2).sum(-1)
    return inside / (binary + OVERLAP_EPS).flatten(2).sum(-1)


def estimated_saliency(probs: Tensor, labels: Tensor, overlap: Tensor, *, tau: float, lam: float) -> Tensor:
    """Saliency estimated from the class probabilities: ``lam*M_fg + (1-lam)*(1-M_bg)``.

    A present class with ``overlap > tau`` goes to the foreground map ``M_fg``; a present class with
    ``overlap <= tau`` joins the background channel in ``M_bg``; absent classes count on neither side.

    Args:
        probs: Softmax over the C+1 maps (background last).
        labels: Image-level labels; nonzero = present.
        overlap: From :func:`overlap_ratio`.
        tau: Overlap threshold.
        lam: Foreground weight.

    Shape:
        probs: (B, C+1, h, w); labels: (B, C); overlap: (B, C) -> (B, 1, h, w)
    """
    num_classes = _check_maps_labels(probs, labels, "probs")
    if overlap.shape != labels.shape:
        raise ValueError(f"overlap: expected shape {tuple(labels.shape)} (B, C), got {tuple(overlap.shape)}")
    _check_weights(tau, lam)
    present = labels.to(probs.device) != 0
    is_fg = present & (overlap.to(probs.device) > tau)
    is_bg = present & ~is_fg
    class_probs = probs[:, :num_classes]
    zero = probs.new_zeros(())
    # torch.where (not a 0/1 product) so a masked-out channel can never leak into the sums.
    m_fg = torch.where(is_fg[:, :, None, None], class_probs, zero).sum(1, keepdim=True)
    m_bg = torch.where(is_bg[:, :, None, None], class_probs, zero).sum(1, keepdim=True) + probs[:, -1:]
    return lam * m_fg + (1.0 - lam) * (1.0 - m_bg)


def saliency_loss(
    logit_maps: Tensor,
    saliency: Tensor,
    labels: Tensor,
    *,
    tau: float = REFERENCE_TAU,
    lam: float = REFERENCE_LAM,
) -> tuple[Tensor, Tensor]:
    """EPS saliency loss: mean squared error between the estimated and the given saliency.

    Softmax over the C+1 raw maps (no ReLU, no max-normalisation), saliency resized to the map size
    with nearest interpolation, mean over every pixel of the batch.

    Args:
        logit_maps: Raw class activation maps, background last.
        saliency: Saliency in [0, 1] at any size (usually the crop size).
        labels: Image-level labels; nonzero = present.
        tau: Overlap threshold for foreground classes.
        lam: Foreground weight in the estimated saliency.

    Returns:
        ``(loss, overlap)``: scalar loss and the detached overlap ratio.

    Shape:
        logit_maps: (B, C+1, h, w); saliency: (B, 1, H, W); labels: (B, C) -> (), (B, C)
    """
    _check_maps_labels(logit_maps, labels, "logit_maps")
    _check_saliency(saliency, logit_maps.shape[0])
    _check_weights(tau, lam)
    probs = F.softmax(logit_maps.float(), dim=1)
    target = resize_saliency(saliency.to(device=probs.device, dtype=torch.float32), probs.shape[-2:])
    overlap = overlap_ratio(probs, target)
    estimate = estimated_saliency(probs, labels, overlap, tau=tau, lam=lam)
    return F.mse_loss(estimate, target), overlap


def classification_loss(image_logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft-margin loss on the C object logits (the background logit is excluded).

    Shape:
        image_logits: (B, C+1); labels: (B, C) -> ()
    """
    if image_logits.dim() != 2 or labels.shape != (image_logits.shape[0], image_logits.shape[1] - 1):
        raise ValueError(f"image_logits/labels: expected (B, C+1) and (B, C), got {tuple(image_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return F.multilabel_soft_margin_loss(image_logits[:, :-1].float(), labels.to(image_logits.device).float())


def eps_loss(
    logit_maps: Tensor,
    saliency: Tensor,
    labels: Tensor,
    *,
    image_logits: Tensor | None = None,
    tau: float = REFERENCE_TAU,
    lam: float = REFERENCE_LAM,
) -> EPSLossOutput:
    """Total EPS loss ``L_cls + L_sal`` with its parts and the per-class overlap.

    Args:
        logit_maps: Raw C+1 maps, background last.
        saliency: Saliency in [0, 1].
        labels: Image-level labels; nonzero = present.
        image_logits: Image logits; default: global average pool of ``logit_maps`` (the EPS head).
        tau: Overlap threshold.
        lam: Foreground weight.

    Shape:
        logit_maps: (B, C+1, h, w); saliency: (B, 1, H, W); labels: (B, C); image_logits: (B, C+1)
    """
    if image_logits is None:
        image_logits = logit_maps.float().mean(dim=(2, 3))
    cls = classification_loss(image_logits, labels)
    sal, overlap = saliency_loss(logit_maps, saliency, labels, tau=tau, lam=lam)
    return EPSLossOutput(loss=cls + sal, cls=cls, sal=sal, overlap=overlap)


def present_class_overlap(overlap: Tensor, labels: Tensor) -> Tensor:
    """Mean overlap of each class over the images where it is present; NaN where it is in none.

    Shape:
        overlap: (B, C); labels: (B, C) -> (C,)
    """
    if overlap.shape != labels.shape or overlap.dim() != 2:
        raise ValueError(f"overlap/labels: expected two (B, C) tensors, got {tuple(overlap.shape)} and "
                         f"{tuple(labels.shape)}")
    present = (labels.to(overlap.device) != 0).to(overlap.dtype)
    count = present.sum(0)
    total = (overlap * present).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


class EPSLoss(nn.Module):
    """Thin module around :func:`eps_loss`.

    Args:
        tau: Overlap threshold for foreground classes.
        lam: Foreground weight in the estimated saliency.
    """

    def __init__(self, *, tau: float = REFERENCE_TAU, lam: float = REFERENCE_LAM) -> None:
        super().__init__()
        _check_weights(tau, lam)
        self.tau = float(tau)
        self.lam = float(lam)

    def forward(
        self,
        logit_maps: Tensor,
        saliency: Tensor,
        labels: Tensor,
        image_logits: Tensor | None = None,
    ) -> EPSLossOutput:
        """See :func:`eps_loss`.

        Shape:
            logit_maps: (B, C+1, h, w); saliency: (B, 1, H, W); labels: (B, C); image_logits: (B, C+1)
        """
        return eps_loss(logit_maps, saliency, labels, image_logits=image_logits, tau=self.tau, lam=self.lam)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, lam={self.lam}"
