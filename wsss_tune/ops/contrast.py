"""Pixel-to-prototype contrast (PPC; Du et al., CVPR 2022) as plain functions over tensors.

Reproduces the contrastive loss of the PPC reference code's EPS variant (``get_contrast_loss`` in
``module/train.py``; ``docs/ppc.md`` lists every fact and its source). Two views of a batch: the crops
and the crops resized by :func:`second_view`. Per view:

1. :func:`contrast_confidence` - each class map passed through ReLU and min-max normalised per image;
   the background channel (last) replaced by a constant score.
2. :func:`ppc_pseudo_labels` - per pixel, the argmax over the image's labelled classes and the
   background score.
3. :func:`class_prototypes` - per class, the confidence-weighted mean of the (detached) projected
   features of the class's ``k`` most confident pixels **of the whole batch**, L2-normalised.

Then three terms, each the mean of two directions (view 1 -> 2 and 2 -> 1), in
:func:`ppc_loss`:

* cross-view (:func:`prototype_nce`): a pixel of one view against the *other* view's prototypes, with
  its own pseudo label;
* cross-view pseudo labels: a pixel against its own view's prototypes, with the label the *other*
  view gives the same pixel;
* intra-view (:func:`intra_view_nce`): a pixel against its own view's prototypes, with *semi-hard
  prototype mining* (the negatives are the prototypes ranked ``skip``..``skip+keep-1`` by similarity,
  :func:`semi_hard_negatives`) on *hard pixel sampling* (per pseudo class, half the pixels at random
  and half from the low end of the similarity to the positive, :func:`hard_pixel_split`).

Total: ``weight * (cross + cross_labels + intra)``. Everything runs on the device of its inputs; random
draws come from the ``generator`` passed in (the global RNG by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "REFERENCE_WEIGHT",
    "REFERENCE_TEMPERATURE",
    "REFERENCE_BG_SCORE",
    "REFERENCE_CONFIDENT_SHARE",
    "REFERENCE_VIEW_SCALE",
    "REFERENCE_PROJ_DIM",
    "MINING_SKIP",
    "MINING_KEEP",
    "HARD_SHARE",
    "NORM_EPS",
    "PPCLossOutput",
    "view_size",
    "second_view",
    "contrast_confidence",
    "ppc_pseudo_labels",
    "confident_count",
    "class_prototypes",
    "prototype_nce",
    "semi_hard_negatives",
    "hard_pixel_split",
    "intra_view_nce",
    "ppc_loss",
]

#: Weight of each of the three terms (reference ``train_contrast``: ``gamma = 0.10``).
REFERENCE_WEIGHT = 0.1
#: Temperature of every pixel-to-prototype softmax (reference: ``/ 0.1`` inside each ``exp``).
REFERENCE_TEMPERATURE = 0.1
#: Constant background confidence (reference ``train_contrast`` passes ``bg_thres=0.10``).
REFERENCE_BG_SCORE = 0.10
#: Confident pixels per class for a prototype, as a share of one image's map (reference:
#: ``k = h * w // 16``, 16 pixels of a 16 x 16 map).
REFERENCE_CONFIDENT_SHARE = 1 / 16
#: Side of the second view over the side of the crop (reference: 448 px crops resized to 128 x 128).
REFERENCE_VIEW_SCALE = 128 / 448
#: Channels of the projection head (reference ``proj_fc``: 4096 -> 128).
REFERENCE_PROJ_DIM = 128
#: Semi-hard prototype mining: the ``MINING_SKIP`` most similar prototypes are skipped and the next
#: ``MINING_KEEP`` are the negatives (reference: ``topk(k=13)`` then ``[:, 3:]``, of 21 prototypes).
MINING_SKIP = 3
MINING_KEEP = 10
#: Hard pixel sampling: of a class's n pixels sorted by rising similarity to the positive, the hard
#: half ends at rank ``int(HARD_SHARE * n)`` (reference ``topk(k=int(len_class * 0.6), largest=False)``
#: then ``[int(len_class * 0.6) - len_class // 2:]``), so the very hardest ~10 % are left out.
HARD_SHARE = 0.6
#: The reference's min-max normalisation constant (``min + 1e-5``, ``max - min + 1e-5``).
NORM_EPS = 1e-5


@dataclass(frozen=True)
class PPCLossOutput:
    """Result of :func:`ppc_loss`.

    Attributes:
        loss: ``weight * (cross + cross_labels + intra)``, scalar, differentiable.
        cross: Cross-view prototype term (unweighted, mean of both directions).
        cross_labels: Cross-view pseudo-label term (unweighted).
        intra: Intra-view term with semi-hard mining and hard pixel sampling (unweighted).
    """

    loss: Tensor
    cross: Tensor
    cross_labels: Tensor
    intra: Tensor


def view_size(size: int, scale: float) -> int:
    """Side of the second view for a crop side ``size``: ``round(size * scale)``, at least 1."""
    if not scale > 0:
        raise ValueError(f"scale: expected a positive factor, got {scale!r}")
    return max(1, round(size * scale))


def second_view(x: Tensor, scale: float) -> Tensor:
    """The second view of a batch: bilinear resize with ``align_corners=True`` to
    :func:`view_size` of each side (reference: images and saliency maps alike).

    Shape:
        x: (B, C, H, W) -> (B, C, round(H * scale), round(W * scale))
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (B, C, H, W), got {tuple(x.shape)}")
    size = (view_size(x.shape[-2], scale), view_size(x.shape[-1], scale))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def contrast_confidence(maps: Tensor, *, bg_score: float = REFERENCE_BG_SCORE) -> Tensor:
    """Per-pixel class confidence for pseudo labels and prototypes, on detached maps.

    ReLU, then per image and channel ``x <- 0 where x < min + eps``, ``(x - min - eps) / (max - min + eps)``
    (the reference's formula: the minimum pixel of a map whose minimum is above 0 gets a slightly
    negative value ``-min / (max - min)``); the background channel (last) is set to ``bg_score``.
    Every class keeps its map whether the image is labelled with it or not (the reference's prototypes
    use them all).

    Shape:
        maps: (B, C+1, h, w) -> (B, C+1, h, w) float32
    """
    if maps.dim() != 4 or maps.shape[1] < 2:
        raise ValueError(f"maps: expected shape (B, C+1, h, w) with C >= 1, got {tuple(maps.shape)}")
    x = F.relu(maps.detach().float())
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    x = torch.where(x < low + NORM_EPS, torch.zeros_like(x), x)
    x = (x - low - NORM_EPS) / (high - low + NORM_EPS)
    x[:, -1] = bg_score
    return x


def ppc_pseudo_labels(confidence: Tensor, labels: Tensor) -> Tensor:
    """Pseudo label per pixel: argmax over the labelled classes' confidence (absent classes count as
    0) and the background score (last channel, always present); ties go to the lower channel.

    Returns:
        int64 channel indices, 0..C-1 for object classes and C for the background.

    Shape:
        confidence: (B, C+1, h, w); labels: (B, C) -> (B, h, w)
    """
    if labels.dim() != 2 or labels.shape[0] != confidence.shape[0] or labels.shape[1] + 1 != confidence.shape[1]:
        raise ValueError(f"labels: expected shape (B, C) = ({confidence.shape[0]}, {confidence.shape[1] - 1}) to "
                         f"match confidence {tuple(confidence.shape)}, got {tuple(labels.shape)}")
    present = torch.cat([labels.to(confidence.device) != 0,
                         torch.ones_like(labels[:, :1], dtype=torch.bool, device=confidence.device)], dim=1)
    return (confidence * present[:, :, None, None].to(confidence.dtype)).argmax(dim=1)


def confident_count(height: int, width: int, share: float) -> int:
    """Confident pixels per class: ``int(height * width * share)``, at least 1 (the reference's
    ``h * w // 16`` is 0 below 16 pixels, which would make a prototype 0 / 0)."""
    if not 0 < share <= 1:
        raise ValueError(f"share: expected a value in (0, 1], got {share!r}")
    return max(1, int(height * width * share))


def class_prototypes(features: Tensor, confidence: Tensor, *, k: int) -> Tensor:
    """One prototype per channel from the ``k`` most confident pixels of the whole batch.

    Per channel: the pixels of all images ranked by confidence (ties: the earlier pixel in batch,
    row, column order first; the constant background channel ties everywhere, so its prototype is
    the mean of the first ``k`` pixels, as the reference's ``topk`` gives on ties), the
    confidence-weighted mean of their features, L2-normalised. Features are detached: prototypes
    carry no gradient.

    Shape:
        features: (B, D, h, w); confidence: (B, K, h, w) -> (K, D)
    """
    if features.dim() != 4 or confidence.dim() != 4 or features.shape[0] != confidence.shape[0] \
            or features.shape[-2:] != confidence.shape[-2:]:
        raise ValueError(f"features/confidence: expected (B, D, h, w) and (B, K, h, w) of one size, got "
                         f"{tuple(features.shape)} and {tuple(confidence.shape)}")
    if k < 1:
        raise ValueError(f"k: expected at least 1 pixel, got {k}")
    feats = features.detach().float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    conf = confidence.float().transpose(0, 1).reshape(confidence.shape[1], -1)
    k = min(k, conf.shape[1])
    values, order = torch.sort(conf, dim=1, descending=True, stable=True)
    values, order = values[:, :k], order[:, :k]
    weighted = (values.unsqueeze(-1) * feats[order]).sum(dim=1)
    total = values.sum(dim=1, keepdim=True)
    protos = weighted / torch.where(total == 0, torch.ones_like(total), total)
    return F.normalize(protos, dim=-1)


def _check_nce(embeddings: Tensor, prototypes: Tensor, targets: Tensor, temperature: float) -> None:
    if embeddings.dim() != 2 or prototypes.dim() != 2 or embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(f"embeddings/prototypes: expected (N, D) and (K, D), got {tuple(embeddings.shape)} and "
                         f"{tuple(prototypes.shape)}")
    if targets.shape != embeddings.shape[:1]:
        raise ValueError(f"targets: expected shape ({embeddings.shape[0]},), got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature!r}")


def prototype_nce(embeddings: Tensor, prototypes: Tensor, targets: Tensor, *,
                  temperature: float = REFERENCE_TEMPERATURE) -> Tensor:
    """Pixel-to-prototype InfoNCE against every prototype, mean over the pixels:
    ``-log(exp(e.p_y / T) / sum_k exp(e.p_k / T))``.

    Args:
        embeddings: L2-normalised pixel embeddings.
        prototypes: L2-normalised prototypes (all of them are negatives, the positive included once).
        targets: Each pixel's prototype index.
        temperature: T.

    Shape:
        embeddings: (N, D); prototypes: (K, D); targets: (N,) -> ()
    """
    _check_nce(embeddings, prototypes, targets, temperature)
    return F.cross_entropy(embeddings @ prototypes.t() / temperature, targets)


def semi_hard_negatives(similarity: Tensor, *, skip: int = MINING_SKIP, keep: int = MINING_KEEP) -> Tensor:
    """Semi-hard prototype mining: per pixel, the prototypes ranked ``skip`` .. ``skip + keep - 1`` by
    falling similarity (clamped to the K prototypes there are; ties: the lower index first). The
    ranking runs over *every* prototype, the pixel's positive included, as in the reference.

    Shape:
        similarity: (N, K) -> (N, min(keep, max(K - skip, 0))) int64
    """
    if skip < 0 or keep < 0:
        raise ValueError(f"skip/keep: expected counts >= 0, got {skip} and {keep}")
    order = torch.sort(similarity.detach(), dim=1, descending=True, stable=True).indices
    return order[:, min(skip, order.shape[1]):min(skip + keep, order.shape[1])]


def hard_pixel_split(similarity: Tensor, *, hard_share: float = HARD_SHARE,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hard pixel sampling within one class: ``n // 2`` pixels drawn at random (without replacement)
    and the ``n // 2`` pixels ending at rank ``int(hard_share * n)`` of the rising similarity to the
    positive (ranks ``int(hard_share * n) - n // 2`` .. ``int(hard_share * n) - 1``: hard, but not
    the very hardest). The two sets may overlap, as in the reference.

    Args:
        similarity: Each pixel's similarity to its positive prototype (only its order matters).
        hard_share: Where the hard half ends, as a share of n; at least 0.5.
        generator: Source of the random draw (the global CPU RNG if None, whatever the device: the
            draw is tiny, and the CPU RNG is the one every checkpoint restores).

    Returns:
        ``(random, hard)``: indices into ``similarity``.

    Shape:
        similarity: (n,) -> (n // 2,), (n // 2,)
    """
    if similarity.dim() != 1:
        raise ValueError(f"similarity: expected shape (n,), got {tuple(similarity.shape)}")
    if not 0.5 <= hard_share <= 1:
        raise ValueError(f"hard_share: expected a value in [0.5, 1], got {hard_share!r}")
    n = similarity.shape[0]
    half, end = n // 2, int(n * hard_share)
    random = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    rising = torch.sort(similarity.detach(), stable=True).indices
    return random[:half].to(similarity.device), rising[end - half:end]


def intra_view_nce(
    embeddings: Tensor,
    prototypes: Tensor,
    targets: Tensor,
    *,
    temperature: float = REFERENCE_TEMPERATURE,
    skip: int = MINING_SKIP,
    keep: int = MINING_KEEP,
    hard_share: float = HARD_SHARE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Intra-view InfoNCE with semi-hard prototype mining and hard pixel sampling.

    Per pixel: ``-log(exp(s_y / T) / (exp(s_y / T) + sum_{j in N} exp(s_j / T)))`` with ``s = e . P``
    and ``N`` from :func:`semi_hard_negatives` (which may hold the positive again). Per pseudo class
    present in ``targets`` (rising order): the mean over the pixels :func:`hard_pixel_split` picks
    (a class with one pixel adds 0 but still counts); the loss is the sum over classes divided by the
    number of classes present, as in the reference.

    Shape:
        embeddings: (N, D); prototypes: (K, D); targets: (N,) -> ()
    """
    _check_nce(embeddings, prototypes, targets, temperature)
    sim = embeddings @ prototypes.t()
    positive = sim.gather(1, targets[:, None])
    negatives = sim.gather(1, semi_hard_negatives(sim, skip=skip, keep=keep))
    logits = torch.cat([positive, negatives], dim=1) / temperature
    per_pixel = torch.logsumexp(logits, dim=1) - positive[:, 0] / temperature
    total = per_pixel.new_zeros(())
    classes = torch.unique(targets).tolist()  # sorted
    for c in classes:
        members = torch.nonzero(targets == c).flatten()
        if members.numel() < 2:
            continue
        random, hard = hard_pixel_split(positive[members, 0], hard_share=hard_share, generator=generator)
        total = total + per_pixel[members[torch.cat([random, hard])]].mean()
    return total / max(len(classes), 1)


def _flat(x: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D), pixels in batch, row, column order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def ppc_loss(
    maps1: Tensor,
    features1: Tensor,
    maps2: Tensor,
    features2: Tensor,
    labels: Tensor,
    *,
    weight: float = REFERENCE_WEIGHT,
    temperature: float = REFERENCE_TEMPERATURE,
    confident_share: float = REFERENCE_CONFIDENT_SHARE,
    bg_score: float = REFERENCE_BG_SCORE,
    mining: Sequence[int] = (MINING_SKIP, MINING_KEEP),
    hard_share: float = HARD_SHARE,
    generator: torch.Generator | None = None,
) -> PPCLossOutput:
    """The PPC loss of two views of one batch.

    View 1's maps and features are first resized to view 2's map size (bilinear, ``align_corners=True``),
    so pixel i of one view faces pixel i of the other. Confidence, pseudo labels and prototypes per view
    as in the module docstring, with ``k = confident_count(h2, w2, confident_share)``; embeddings are the
    L2-normalised features. Terms (each the mean of its two directions):

    * ``cross``: view 1 pixels vs view 2 prototypes with view 1 labels, and the reverse;
    * ``cross_labels``: view 1 pixels vs view 1 prototypes with view 2 labels, and the reverse;
    * ``intra``: :func:`intra_view_nce` of each view with its own prototypes and labels.

    Args:
        maps1, maps2: Raw C+1 class maps of the views (background last).
        features1, features2: Projected features of the views (the projection head's output).
        labels: Image-level labels; nonzero = present.
        weight: Multiplies the sum of the three terms.
        temperature: Softmax temperature of every term.
        confident_share: Confident pixels per class as a share of one view-2 map.
        bg_score: Constant background confidence.
        mining: ``(skip, keep)`` of :func:`semi_hard_negatives`.
        hard_share: Of :func:`hard_pixel_split`.
        generator: Random draws of the hard pixel sampling.

    Shape:
        maps1: (B, C+1, h1, w1); features1: (B, D, h1, w1); maps2: (B, C+1, h2, w2);
        features2: (B, D, h2, w2); labels: (B, C) -> PPCLossOutput of scalars
    """
    for name, maps, feats in (("1", maps1, features1), ("2", maps2, features2)):
        if maps.dim() != 4 or feats.dim() != 4 or maps.shape[0] != feats.shape[0] or maps.shape[-2:] != feats.shape[-2:]:
            raise ValueError(f"maps{name}/features{name}: expected (B, C+1, h, w) and (B, D, h, w) of one size, got "
                             f"{tuple(maps.shape)} and {tuple(feats.shape)}")
    if maps1.shape[:2] != maps2.shape[:2] or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"the two views: expected the same batch, maps and feature channels, got maps "
                         f"{tuple(maps1.shape)} / {tuple(maps2.shape)}, features {tuple(features1.shape)} / "
                         f"{tuple(features2.shape)}")
    size = tuple(maps2.shape[-2:])
    maps1, features1 = maps1.float(), features1.float()
    if tuple(maps1.shape[-2:]) != size:
        maps1 = F.interpolate(maps1, size=size, mode="bilinear", align_corners=True)
        features1 = F.interpolate(features1, size=size, mode="bilinear", align_corners=True)
    features2 = features2.float()
    conf1 = contrast_confidence(maps1, bg_score=bg_score)
    conf2 = contrast_confidence(maps2, bg_score=bg_score)
    y1, y2 = ppc_pseudo_labels(conf1, labels).flatten(), ppc_pseudo_labels(conf2, labels).flatten()
    k = confident_count(size[0], size[1], confident_share)
    p1 = class_prototypes(features1, conf1, k=k)
    p2 = class_prototypes(features2, conf2, k=k)
    e1, e2 = F.normalize(_flat(features1), dim=-1), F.normalize(_flat(features2), dim=-1)

    def nce(e: Tensor, p: Tensor, y: Tensor) -> Tensor:
        return prototype_nce(e, p, y, temperature=temperature)

    def intra(e: Tensor, p: Tensor, y: Tensor) -> Tensor:
        return intra_view_nce(e, p, y, temperature=temperature, skip=mining[0], keep=mining[1],
                              hard_share=hard_share, generator=generator)

    cross = (nce(e1, p2, y1) + nce(e2, p1, y2)) / 2
    cross_labels = (nce(e1, p1, y2) + nce(e2, p2, y1)) / 2
    intra_term = (intra(e1, p1, y1) + intra(e2, p2, y2)) / 2
    return PPCLossOutput(loss=weight * (cross + cross_labels + intra_term), cross=cross, cross_labels=cross_labels,
                         intra=intra_term)
