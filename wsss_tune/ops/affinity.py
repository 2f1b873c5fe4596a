"""AffinityNet math: pair affinities, pair labels, the affinity loss and the label sources.

Public references: PSA (Ahn & Kwak, CVPR 2018, ``jiwoon-ahn/psa``) ``network/resnet38_aff.py``
(affinities), ``voc12/data.py`` (pair labels, dual-threshold labels), ``train_aff.py`` (loss) and
``infer_cls.py`` (the power background). Pair geometry lives in :mod:`wsss_tune.ops.neighbors`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from wsss_tune.ops.labelmap import score_argmax
from wsss_tune.ops.metric import IGNORE_INDEX
from wsss_tune.ops.neighbors import DEFAULT_RADIUS, pair_valid, pair_views
from wsss_tune.utils.runtime import full_precision

__all__ = [
    "IGNORE_INDEX",
    "LOG_EPS",
    "COUNT_EPS",
    "BG_POS_WEIGHT",
    "FG_POS_WEIGHT",
    "NEG_WEIGHT",
    "DEFAULT_ALPHA_LOW",
    "DEFAULT_ALPHA_HIGH",
    "NO_SCORE_EPS",
    "affinity_from_features",
    "affinity_labels",
    "affinity_loss",
    "power_background",
    "cam_scores_with_background",
    "dual_threshold_labels",
    "labels_at_stride",
    "scores_at_stride",
]

#: Inside the logs of the loss: ``log(a + 1e-5)`` and ``log(1 + 1e-5 - a)`` (PSA ``train_aff.py``).
LOG_EPS = 1e-5
#: Added to each pair count before dividing (PSA ``train_aff.py``: ``torch.sum(label) + 1e-5``).
COUNT_EPS = 1e-5
#: ``loss = bg_loss/4 + fg_loss/4 + neg_loss/2`` (PSA ``train_aff.py``).
BG_POS_WEIGHT = 0.25
FG_POS_WEIGHT = 0.25
NEG_WEIGHT = 0.5
#: Background exponents of the two label maps (PSA ``infer_cls.py``: ``--low_alpha 4``,
#: ``--high_alpha 32``).
DEFAULT_ALPHA_LOW = 4.0
DEFAULT_ALPHA_HIGH = 32.0
#: A pixel whose every score is below this is unlabelled (PSA ``voc12/data.py``,
#: ``VOC12AffDataset``: ``np.max(label, -1) < 1e-5``, the zero fill of a random crop).
NO_SCORE_EPS = 1e-5


def affinity_from_features(
    feat: torch.Tensor, *, radius: int = DEFAULT_RADIUS, pad_border: bool = False
) -> torch.Tensor:
    """Pair affinities ``a_ij = exp(-mean_c |f_i - f_j|)`` over the radius-γ neighbour offsets.

    Computed one offset at a time: without autograd there is no ``(B, C, D, h'·w')`` intermediate (the
    reference materialises one); with autograd the saved differences add up to that size. Half-precision
    features are cast to float32 first and the whole computation runs with autocast off, giving
    float32 affinities: the loss takes ``log(1 + 1e-5 - a)`` (1e-5 is below half precision's resolution
    near 1) and the random walk raises them to the power beta.

    Args:
        feat: AffinityNet features.
        radius: neighbourhood radius γ.
        pad_border: use the padded pair geometry of :mod:`wsss_tune.ops.neighbors` (every pixel is a
            "from" pixel; pairs that leave the map get affinity 0). Off by default (reference).

    Shape:
        feat: ``(B, C, h, w)``.
        Returns: ``(B, D, h', w')``, ``D = 34`` for radius 5, ``(h', w') = (h - r + 1, w - 2r + 2)``
        (reference) or ``(h, w)`` with ``pad_border``.
    """
    if feat.dim() != 4 or not feat.is_floating_point():
        raise ValueError(f"feat: expected a float tensor (B, C, h, w), got {feat.dtype} {tuple(feat.shape)}")
    feat = feat.to(torch.promote_types(feat.dtype, torch.float32))
    with full_precision(feat.device):
        src, dst = pair_views(feat, radius, pad_border=pad_border, fill=0.0)
        aff = torch.stack([torch.exp(-(src - t).abs().mean(dim=1)) for t in dst], dim=1)
    if pad_border:
        valid = pair_valid(feat.shape[-2], feat.shape[-1], radius, pad_border=True, device=feat.device)
        aff = aff.masked_fill(~valid, 0.0)
    return aff


def affinity_labels(
    label: torch.Tensor,
    *,
    radius: int = DEFAULT_RADIUS,
    ignore_index: int = IGNORE_INDEX,
    pad_border: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels of a class map at the feature resolution (PSA ``ExtractAffinityLabelInRadius``).

    Same class on both ends is a positive pair, background-positive when the class is 0 and
    foreground-positive otherwise; different classes are a negative pair; a pair with an
    ``ignore_index`` end is unused. The reference tests ``label < 255``; here any value other than
    ``ignore_index`` is a class.

    Shape:
        label: integer ``(B, h, w)`` or ``(h, w)``.
        Returns: three bool masks ``(B, D, h', w')`` (``(D, h', w')`` for an unbatched map), the
        geometry of :func:`affinity_from_features`.
    """
    if label.dim() not in (2, 3) or label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"label: expected an integer class map (B, h, w) or (h, w), got "
                         f"{label.dtype} {tuple(label.shape)}")
    if ignore_index == 0:
        raise ValueError("ignore_index: 0 is the background class; expected another value (255)")
    src, dst = pair_views(label, radius, pad_border=pad_border, fill=ignore_index)
    src = src.unsqueeze(-3)
    to = torch.stack(dst, dim=-3)
    valid = (src != ignore_index) & (to != ignore_index)
    same = src == to
    bg_pos = same & (src == 0)
    fg_pos = same & (src != 0) & valid
    neg = ~same & valid
    return bg_pos, fg_pos, neg


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AffinityNet loss ``bg/4 + fg/4 + neg/2`` over a batch (PSA ``train_aff.py``).

    Each part sums ``-log(a + 1e-5)`` (positives) or ``-log(1 + 1e-5 - a)`` (negatives) over its pairs
    in the whole batch and divides by ``count + 1e-5``, exactly as the reference: a part with no
    pairs is ``0 / 1e-5 = 0`` (no NaN), and a part with ``n`` pairs is its mean times
    ``n / (n + 1e-5)``. Computed in at least float32.

    Args:
        aff: affinities in [0, 1] from :func:`affinity_from_features`.
        bg_pos, fg_pos, neg: pair masks from :func:`affinity_labels` (bool, or 0/1 numbers).

    Shape:
        aff, bg_pos, fg_pos, neg: the same shape, e.g. ``(B, D, h', w')``.
        Returns: the scalar loss and ``{"bg", "fg", "neg"}`` part losses plus ``{"bg_count",
        "fg_count", "neg_count"}`` pair counts (scalars).
    """
    for name, mask in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
        if mask.shape != aff.shape:
            raise ValueError(f"{name}: expected the shape of aff {tuple(aff.shape)}, got {tuple(mask.shape)}")
    a = aff.to(torch.promote_types(aff.dtype, torch.float32))
    pos_term = -torch.log(a + LOG_EPS)
    neg_term = -torch.log(1.0 + LOG_EPS - a)
    parts: dict[str, torch.Tensor] = {}
    for name, mask, term in (("bg", bg_pos, pos_term), ("fg", fg_pos, pos_term), ("neg", neg, neg_term)):
        m = mask if mask.dtype == torch.bool else mask != 0
        count = m.sum().to(a.dtype)
        parts[name] = torch.where(m, term, torch.zeros((), dtype=a.dtype, device=a.device)).sum() / (
            count + COUNT_EPS)
        parts[f"{name}_count"] = count
    loss = BG_POS_WEIGHT * parts["bg"] + FG_POS_WEIGHT * parts["fg"] + NEG_WEIGHT * parts["neg"]
    return loss, parts


def power_background(cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """Background score ``(1 - max_c cam)^alpha`` (PSA ``infer_cls.py`` / ``infer_aff.py``).

    With no class maps (``C = 0``) the maximum is taken as 0, so the background is 1.

    Shape:
        cams: ``(..., C, H, W)`` max-normalised, in [0, 1].
        Returns: ``(..., 1, H, W)``.
    """
    if cams.shape[-3] == 0:
        return torch.ones((*cams.shape[:-3], 1, *cams.shape[-2:]), dtype=cams.dtype, device=cams.device)
    return (1.0 - cams.amax(dim=-3, keepdim=True)).pow(alpha)


def cam_scores_with_background(
    cams: torch.Tensor, labels: torch.Tensor | None = None, *, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[power background, labelled class maps]`` and say which class each plane is.

    Args:
        cams: max-normalised class maps (one per object class, no background plane).
        labels: image-level labels; positive entries are the labelled classes. ``None`` takes the
            classes whose map is not all zero.
        alpha: background exponent (:func:`power_background`).

    Shape:
        cams: ``(C, H, W)``; labels: ``(C,)``.
        Returns: scores ``(K, H, W)`` with ``K = 1 +`` number of labelled classes, background first,
        and ``keys`` long ``(K,)``: the class value of each plane (0 = background, ``c + 1`` for class
        index ``c``), as in the pseudo masks.
    """
    if cams.dim() != 3 or not cams.is_floating_point():
        raise ValueError(f"cams: expected float class maps (C, H, W), got {cams.dtype} {tuple(cams.shape)}")
    if labels is None:
        present = cams.flatten(1).ne(0).any(dim=1)
    else:
        if labels.shape != (cams.shape[0],):
            raise ValueError(f"labels: expected shape ({cams.shape[0]},) to match cams {tuple(cams.shape)}, "
                             f"got {tuple(labels.shape)}")
        present = labels.to(cams.device) > 0
    cls = torch.nonzero(present).flatten()
    fg = cams.index_select(0, cls)
    scores = torch.cat([power_background(fg, alpha), fg], dim=0)
    keys = torch.cat([torch.zeros(1, dtype=torch.long, device=cams.device), cls + 1])
    return scores, keys


def dual_threshold_labels(
    cams: torch.Tensor,
    *,
    alpha_low: float = DEFAULT_ALPHA_LOW,
    alpha_high: float = DEFAULT_ALPHA_HIGH,
    labels: torch.Tensor | None = None,
    crf: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stride: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The PSA reference's AffinityNet labels: confident foreground and background, the rest ignored.

    Derivation. With ``m`` the largest class score at a pixel, the background score is
    ``(1 - m)^α`` and ``0 <= 1 - m <= 1``, so a small α gives a *large* background:

    * low α (4): the argmax picks a class only where the class map is clearly high (above ≈ 0.28 for
      α = 4, where ``m = (1 - m)^4``): **confident foreground**;
    * high α (32): the background wins only where every class map is nearly zero (below ≈ 0.08 for
      α = 32):
      **confident background**.

    As ``VOC12AffDataset`` combines them: start from the low-α argmax; its background pixels become
    ``ignore_index`` (not confidently foreground); pixels where the high-α argmax is background become
    0 (this wins over the low-α class, which only a CRF can make disagree); pixels where every score of
    both maps is below 1e-5 become ``ignore_index``. Between the thresholds the label is ignored.

    The reference passes both score stacks through a dense CRF on the image (``infer_cls.py``,
    ``crf_inference``) before combining; pass that as ``crf`` (it gets and returns the ``(K, H, W)``
    stack, background first). It also average-pools the (cropped) score stacks by the feature stride
    before the argmax (``imutils.AvgPool2d(8)``); ``stride`` does that here, with the zero fill of a
    partial block as in ``skimage.measure.block_reduce``. The reference's argmax gives positions among
    the labelled classes; here they are mapped to class values (same pairs, readable masks).

    Args:
        cams: max-normalised class maps of the labelled classes (zeros elsewhere).
        alpha_low, alpha_high: background exponents.
        labels: image-level labels ``(C,)``; ``None`` takes the classes whose map is not all zero.
        crf: optional score refinement applied to each stack before pooling and the argmax.
        stride: average-pool factor applied to the scores before the argmax (1 = none).
        ignore_index: value of unlabelled pixels.

    Shape:
        cams: ``(C, H, W)``.
        Returns: uint8 ``(ceil(H / stride), ceil(W / stride))``, values ``0..C`` and ``ignore_index``.
    """
    if not 0 < alpha_low < alpha_high:
        raise ValueError(f"alpha_low, alpha_high: expected 0 < alpha_low < alpha_high, got {alpha_low}, {alpha_high}")

    def stack(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        scores, keys = cam_scores_with_background(cams, labels, alpha=alpha)
        if crf is not None:
            refined = crf(scores)
            if refined.shape != scores.shape:
                raise ValueError(f"crf: expected it to return the shape of its input {tuple(scores.shape)}, "
                                 f"got {tuple(refined.shape)}")
            scores = refined
        return scores_at_stride(scores, stride), keys

    low, keys = stack(alpha_low)
    high, _ = stack(alpha_high)
    no_score = torch.maximum(low.amax(dim=0), high.amax(dim=0)) < NO_SCORE_EPS
    low_idx = score_argmax(low, dim=0)
    high_idx = score_argmax(high, dim=0)
    out = keys[low_idx]
    out[low_idx == 0] = ignore_index
    out[high_idx == 0] = 0
    out[no_score] = ignore_index
    return out.to(torch.uint8)


def _check_stride(stride: int) -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected an int >= 1, got {stride!r}")
    return stride


def labels_at_stride(label: torch.Tensor, stride: int) -> torch.Tensor:
    """Nearest downsampling of a (cropped) label map to the feature resolution.

    Keeps the top-left pixel of every ``stride x stride`` block: what nearest resizing by ``1/stride``
    does in OpenCV (``cv2.INTER_NEAREST``, PSA ``imutils.RescaleNearest``) and in
    ``F.interpolate(mode="nearest")`` when the size is a multiple of ``stride``; otherwise the output
    has ``ceil`` rows and columns, the size of a stride-``stride`` feature map.

    Shape:
        label: ``(..., H, W)``.
        Returns: ``(..., ceil(H / stride), ceil(W / stride))``, same dtype.
    """
    stride = _check_stride(stride)
    if label.dim() < 2:
        raise ValueError(f"label: expected (..., H, W), got shape {tuple(label.shape)}")
    return label[..., ::stride, ::stride].contiguous()


def scores_at_stride(scores: torch.Tensor, stride: int, *, count_padding: bool = True) -> torch.Tensor:
    """Average-pool score maps by ``stride`` after zero-padding bottom and right to a multiple of it.

    With ``count_padding`` (the reference: ``infer_aff.py`` pads the score planes with zeros, then
    ``F.avg_pool2d(cam, 8, 8)``) the zeros count in the mean of an edge block, which dilutes the
    scores of the bottom row and right column; ``count_padding=False`` averages the pixels inside
    the map only.

    Shape:
        scores: ``(..., H, W)`` float.
        Returns: ``(..., ceil(H / stride), ceil(W / stride))``.
    """
    stride = _check_stride(stride)
    if scores.dim() < 2 or not scores.is_floating_point():
        raise ValueError(f"scores: expected float (..., H, W), got {scores.dtype} {tuple(scores.shape)}")
    if stride == 1:
        return scores
    lead, (h, w) = scores.shape[:-2], scores.shape[-2:]
    pad = (0, -w % stride, 0, -h % stride)
    flat = F.pad(scores.reshape(-1, 1, h, w), pad)
    pooled = F.avg_pool2d(flat, stride, stride)
    if not count_padding and any(pad):
        inside = F.pad(torch.ones(1, 1, h, w, dtype=scores.dtype, device=scores.device), pad)
        pooled = pooled / F.avg_pool2d(inside, stride, stride)
    return pooled.reshape(*lead, *pooled.shape[-2:])
