"""Pixel-to-prototype contrast pinned on tiny tensors with hand-derived values.

Most cases use temperature 1 and unit embeddings along the axes, so every dot product is 0 or 1 and
every softmax over two prototypes is one of

* ``a = -log(e / (e + 1)) = log(1 + e^-1) ~ 0.313262`` (the pixel is nearer its positive), or
* ``b = -log(1 / (e + 1)) = log(1 + e) ~ 1.313262`` (nearer the other prototype).
"""

from __future__ import annotations

import math

import pytest
import torch

from wsss_tune.ops.contrast import (
    NORM_EPS,
    REFERENCE_VIEW_SCALE,
    class_prototypes,
    confident_count,
    contrast_confidence,
    hard_pixel_split,
    intra_view_nce,
    ppc_loss,
    ppc_pseudo_labels,
    prototype_nce,
    second_view,
    semi_hard_negatives,
    view_size,
)

A = math.log1p(math.exp(-1.0))
B = math.log1p(math.e)


def _maps(*channels: list[float]) -> torch.Tensor:
    """One image's (1, K, 2, 2) maps from per-channel pixel lists in row-major order."""
    return torch.tensor(channels, dtype=torch.float32).reshape(1, len(channels), 2, 2)


def _feats(*pixels: tuple[float, float]) -> torch.Tensor:
    """One image's (1, 2, 2, 2) features from four 2-dim pixel vectors in row-major order."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, 2, 2, 2)


def test_second_view_follows_the_reference_size_and_resampling() -> None:
    """448 px crops become 128 px (2/7, the reference's fixed 128 x 128); bilinear with
    align_corners=True keeps the corner pixels and interpolates linearly in between: a 1 x 5 ramp
    0..4 resized to 3 samples at source positions 0, 2, 4."""
    assert view_size(448, REFERENCE_VIEW_SCALE) == 128
    assert view_size(96, REFERENCE_VIEW_SCALE) == 27  # 27.43 rounds down
    assert view_size(2, 0.01) == 1
    ramp = torch.arange(5, dtype=torch.float32).reshape(1, 1, 1, 5)
    assert second_view(ramp, 0.6)[0, 0, 0].tolist() == pytest.approx([0.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="scale"):
        view_size(10, 0.0)


def test_confidence_is_the_references_min_max_with_a_constant_background() -> None:
    """Class map [2, 3, 6, 4]: ReLU keeps it; min 2, max 6; the minimum pixel (2 < 2 + 1e-5) is set to
    0 first, so it becomes (0 - 2 - eps) / (4 + eps) ~ -0.5 (the reference's quirk), the others
    (x - 2 - eps) / (4 + eps) ~ 0.25, 1.0, 0.5. A negative map [-1, 0, 0, 2]: ReLU -> [0, 0, 0, 2],
    min 0, max 2 -> ~[0, 0, 0, 1]. The background channel is the constant 0.1 whatever it held."""
    conf = contrast_confidence(_maps([2, 3, 6, 4], [-1, 0, 0, 2], [9, 9, 9, 9]), bg_score=0.1)
    eps = NORM_EPS
    assert conf[0, 0].flatten().tolist() == pytest.approx([(-2 - eps) / (4 + eps), (1 - eps) / (4 + eps),
                                                           (4 - eps) / (4 + eps), (2 - eps) / (4 + eps)])
    assert conf[0, 1].flatten().tolist() == pytest.approx([-eps / (2 + eps)] * 3 + [(2 - eps) / (2 + eps)])
    assert conf[0, 2].flatten().tolist() == pytest.approx([0.1] * 4)


def test_pseudo_labels_take_labelled_classes_over_the_background_score() -> None:
    """Confidences of 2 classes + background 0.5 at 4 pixels; class 1 absent from the image labels.

    pixel 0: c0 0.9, c1 0.95 (absent -> 0), bg 0.5 -> c0
    pixel 1: c0 0.2, c1 0.95 (absent), bg 0.5 -> bg (index 2)
    pixel 2: c0 0.5, bg 0.5 -> tie: the lower channel, c0
    pixel 3: c0 -0.1 -> bg
    """
    conf = _maps([0.9, 0.2, 0.5, -0.1], [0.95, 0.95, 0.95, 0.95], [0.5, 0.5, 0.5, 0.5])
    labels = torch.tensor([[1.0, 0.0]])
    assert ppc_pseudo_labels(conf, labels).flatten().tolist() == [0, 2, 0, 2]
    with pytest.raises(ValueError, match="labels"):
        ppc_pseudo_labels(conf, torch.ones(1, 3))


def test_prototypes_are_confidence_weighted_means_of_the_top_pixels_of_the_batch() -> None:
    """k = 2 over a batch of 2 images with 1 x 2 pixels each (pixel order: image, row, column).

    Class confidences [0.2, 0.8 | 0.6, 0.1] -> top 2: pixel 1 (0.8), pixel 2 (0.6). Features
    f0 = (3, 4), f1 = (1, 0), f2 = (0, 2), f3 = (5, 5): weighted mean (0.8 (1, 0) + 0.6 (0, 2)) / 1.4 = (0.8, 1.2) / 1.4,
    normalised: (0.8, 1.2) / sqrt(0.64 + 1.44) = (0.5547, 0.8321).
    Background confidence 0.1 everywhere: the tie is broken by pixel order, pixels 0 and 1:
    (0.1 (3, 4) + 0.1 (1, 0)) / 0.2 = (2, 2) -> (0.7071, 0.7071).
    """
    feats = torch.zeros(2, 2, 1, 2)  # (image, channel, row, column)
    feats[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    feats[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    feats[1, :, 0, 0] = torch.tensor([0.0, 2.0])
    feats[1, :, 0, 1] = torch.tensor([5.0, 5.0])
    conf = torch.zeros(2, 2, 1, 2)
    conf[:, 0, 0] = torch.tensor([[0.2, 0.8], [0.6, 0.1]])
    conf[:, 1] = 0.1
    protos = class_prototypes(feats.requires_grad_(), conf, k=2)
    norm = math.hypot(0.8, 1.2)
    assert protos[0].tolist() == pytest.approx([0.8 / norm, 1.2 / norm], abs=1e-6)
    assert protos[1].tolist() == pytest.approx([math.sqrt(0.5)] * 2, abs=1e-6)
    assert not protos.requires_grad
    assert confident_count(16, 16, 1 / 16) == 16  # the reference's h * w // 16 at 16 x 16
    assert confident_count(7, 7, 1 / 16) == 3
    assert confident_count(2, 2, 1 / 16) == 1  # never 0
    with pytest.raises(ValueError, match="share"):
        confident_count(4, 4, 0.0)


def test_prototype_nce_is_infonce_over_every_prototype() -> None:
    """T = 1, prototypes P0 = (1, 0), P1 = (0, 1). e = (1, 0) with target 0 -> a; with target 1 -> b;
    mean (a + b) / 2. At T = 0.5 the logits double: -log(e^2 / (e^2 + 1)) = log(1 + e^-2)."""
    protos = torch.eye(2)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert prototype_nce(emb, protos, torch.tensor([0, 1]), temperature=1.0).item() == pytest.approx((A + B) / 2)
    assert prototype_nce(emb[:1], protos, torch.tensor([0]), temperature=0.5).item() == pytest.approx(
        math.log1p(math.exp(-2.0)))
    with pytest.raises(ValueError, match="temperature"):
        prototype_nce(emb, protos, torch.tensor([0, 1]), temperature=0.0)


def test_semi_hard_mining_skips_the_most_similar_and_may_hold_the_positive() -> None:
    """Similarities of one pixel to 5 prototypes [0.1, 0.9, 0.5, 0.7, 0.3]: descending order
    1, 3, 2, 4, 0. skip 1, keep 2 -> [3, 2]; skip 3, keep 10 -> what is left: [4, 0]; skip 5 -> none.

    Intra-view loss with the positive among the mined negatives (the reference ranks every prototype):
    e = (1, 0), prototypes (1, 0), (0, 1), (-1, 0), target 1 (similarity 0), T = 1, skip 1, keep 2:
    descending order 0, 1, 2 -> negatives 1 (the positive again) and 2. Loss
    -log(e^0 / (e^0 + e^0 + e^-1)) = log(2 + e^-1) ~ 0.8620 (one pixel: no sampling to do).
    """
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    assert semi_hard_negatives(sim, skip=1, keep=2).tolist() == [[3, 2]]
    assert semi_hard_negatives(sim, skip=3, keep=10).tolist() == [[4, 0]]
    assert semi_hard_negatives(sim, skip=5, keep=10).shape == (1, 0)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # two pixels of class 1, so the class has the 2 pixels sampling needs: each adds log(2 + e^-1)
    loss = intra_view_nce(emb, protos, torch.tensor([1, 1]), temperature=1.0, skip=1, keep=2)
    assert loss.item() == pytest.approx(math.log(2 + math.exp(-1.0)))


def test_hard_pixel_sampling_takes_half_random_and_half_hard_but_not_the_hardest() -> None:
    """n = 10 pixels of one class, similarities [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0].
    Rising order: 9, 1, 5, 3, 7, 2, 8, 6, 4, 0. int(0.6 * 10) = 6 and n // 2 = 5, so the hard half is
    ranks 1..5: pixels [1, 5, 3, 7, 2] (pixel 9, the very hardest, is left out). The random half is
    5 distinct pixels."""
    sim = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    gen = torch.Generator().manual_seed(0)
    random, hard = hard_pixel_split(sim, generator=gen)
    assert hard.tolist() == [1, 5, 3, 7, 2]
    assert len(random) == 5 and len(set(random.tolist())) == 5 and all(0 <= i < 10 for i in random.tolist())
    again, _ = hard_pixel_split(sim, generator=torch.Generator().manual_seed(0))
    assert again.tolist() == random.tolist()
    # n = 3: int(1.8) = 1, n // 2 = 1 -> the single hardest pixel; n = 1 -> nothing
    assert hard_pixel_split(torch.tensor([0.5, 0.2, 0.9]))[1].tolist() == [1]
    assert [len(x) for x in hard_pixel_split(torch.tensor([0.5]))] == [0, 0]


def test_intra_view_loss_is_a_mean_over_pseudo_classes_and_a_lone_pixel_counts_as_zero() -> None:
    """Prototypes P0 = (1, 0), P1 = (0, 1), T = 1, skip 1, keep 1 (the one other prototype).
    Class 0: two pixels (1, 0) -> each a, class mean a. Class 1: one pixel -> adds 0 but counts.
    Loss (a + 0) / 2."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = intra_view_nce(emb, torch.eye(2), torch.tensor([0, 0, 1]), temperature=1.0, skip=1, keep=1)
    assert loss.item() == pytest.approx(A / 2)


def test_ppc_loss_on_a_case_worked_on_paper() -> None:
    """One image, C = 1 object class + background, 2 x 2 maps in both views (no resizing), T = 1,
    k = 1 (share 1/4), background score 0.5, weight 1.

    View 1 class map [0, 1, 4, 3] -> confidence ~[0, 0.25, 1, 0.75] -> labels y1 = [bg, bg, c, c].
    View 2 class map [0, 3, 4, 1] -> confidence ~[0, 0.75, 1, 0.25] -> labels y2 = [bg, c, c, bg].
    (channel 0 = c, channel 1 = bg.) Prototypes from k = 1 pixel: the class's most confident pixel
    (pixel 2 in both views); background: every pixel ties at 0.5, so pixel 0.
    Features f = [(0, 1), (0, 1), (1, 0), (1, 0)], g = [(0, 1), (1, 0), (1, 0), (0, 1)] give
    P1_c = P2_c = (1, 0), P1_bg = P2_bg = (0, 1); embeddings are the features (already unit).

    cross: view 1 pixels vs P2 with y1: all 4 pixels point at their label's prototype -> a each;
    view 2 vs P1 with y2: a each; cross = a.
    cross_labels: view 1 vs P1 with y2: pixel 0 (0, 1) bg -> a; pixel 1 (0, 1) c -> b; pixel 2 -> a;
    pixel 3 (1, 0) bg -> b: (a + b) / 2; view 2 vs P2 with y1: a, b, a, b: (a + b) / 2.
    intra with the reference mining (skip 3 of 2 prototypes): no negatives, every term
    -log(e^s / e^s) = 0. With skip 1, keep 1 the negative is the other prototype: every pixel agrees
    with its own view's label -> a per pixel, a per class, intra = a.
    Loss = a + (a + b) / 2 + intra.
    """
    maps1 = _maps([0, 1, 4, 3], [0, 0, 0, 0])
    maps2 = _maps([0, 3, 4, 1], [7, 7, 7, 7])
    f = _feats((0, 1), (0, 1), (1, 0), (1, 0)).requires_grad_()
    g = _feats((0, 1), (1, 0), (1, 0), (0, 1))
    labels = torch.ones(1, 1)
    kw = {"weight": 1.0, "temperature": 1.0, "confident_share": 0.25, "bg_score": 0.5}
    out = ppc_loss(maps1, f, maps2, g, labels, **kw)
    assert out.cross.item() == pytest.approx(A, abs=1e-6)
    assert out.cross_labels.item() == pytest.approx((A + B) / 2, abs=1e-6)
    assert out.intra.item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(A + (A + B) / 2, abs=1e-6)
    mined = ppc_loss(maps1, f, maps2, g, labels, mining=(1, 1), **kw)
    assert mined.intra.item() == pytest.approx(A, abs=1e-6)
    assert mined.loss.item() == pytest.approx(2 * A + (A + B) / 2, abs=1e-6)
    half = ppc_loss(maps1, f, maps2, g, labels, **{**kw, "weight": 0.5})
    assert half.loss.item() == pytest.approx(out.loss.item() / 2)
    out.loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_ppc_loss_aligns_view_one_to_view_two_and_checks_shapes() -> None:
    """View 1 at 4 x 4 is resized to view 2's 2 x 2 (align_corners=True keeps the corners): a view 1
    that is view 2 upsampled gives the same loss as view 2 against itself."""
    torch.manual_seed(0)
    maps2, feats2 = torch.randn(2, 3, 2, 2), torch.rand(2, 4, 2, 2)
    up = torch.nn.functional.interpolate
    maps1 = up(maps2, size=(4, 4), mode="bilinear", align_corners=True)
    feats1 = up(feats2, size=(4, 4), mode="bilinear", align_corners=True)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    kw = {"temperature": 1.0, "confident_share": 0.5, "mining": (1, 1)}
    a = ppc_loss(maps1, feats1, maps2, feats2, labels, **kw, generator=torch.Generator().manual_seed(1))
    b = ppc_loss(maps2, feats2, maps2, feats2, labels, **kw, generator=torch.Generator().manual_seed(1))
    for name in ("loss", "cross", "cross_labels", "intra"):
        assert getattr(a, name).item() == pytest.approx(getattr(b, name).item(), abs=1e-5), name
    with pytest.raises(ValueError, match="the two views"):
        ppc_loss(maps1, feats1, maps2[:1], feats2[:1], labels)
    with pytest.raises(ValueError, match="maps1/features1"):
        ppc_loss(maps1, feats2, maps2, feats2, labels)
