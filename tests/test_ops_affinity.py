"""AffinityNet math (wsss_tune.ops.affinity): affinities, pair labels, loss, label sources."""

from __future__ import annotations

import math

import pytest
import torch

from wsss_tune.ops.affinity import (
    affinity_from_features,
    affinity_labels,
    affinity_loss,
    cam_scores_with_background,
    dual_threshold_labels,
    labels_at_stride,
    power_background,
    scores_at_stride,
)

# Offsets for radius 2, in order: R = (0,1), DL = (1,-1), D = (1,0), DR = (1,1).
R, DL, D, DR = range(4)


def _features_2x3() -> torch.Tensor:
    """2 channels on a 2x3 map; radius 2 has one "from" pixel, (0, 1) = [0, 0]."""
    feat = torch.zeros(1, 2, 2, 3)
    feat[0, :, 0, 0] = torch.tensor([7.0, 7.0])  # not a "from" pixel, not reached: unused
    feat[0, :, 0, 2] = torch.tensor([0.5, -0.5])
    feat[0, :, 1, 0] = torch.tensor([2.0, 0.0])
    feat[0, :, 1, 1] = torch.tensor([0.0, 0.0])
    feat[0, :, 1, 2] = torch.tensor([-1.0, 3.0])
    return feat


def test_affinity_from_features_by_hand():
    """From (0,1) = [0,0]: R -> (0,2) mean|.| = (0.5+0.5)/2 = 0.5; DL -> (1,0) (2+0)/2 = 1;
    D -> (1,1) 0; DR -> (1,2) (1+3)/2 = 2. a = exp(-mean): [e^-0.5, e^-1, 1, e^-2]."""
    aff = affinity_from_features(_features_2x3(), radius=2)
    assert aff.shape == (1, 4, 1, 1)
    expected = torch.tensor([math.exp(-0.5), math.exp(-1.0), 1.0, math.exp(-2.0)])
    torch.testing.assert_close(aff.flatten(), expected)


def test_affinity_from_features_padded_keeps_values_and_zeroes_outside_pairs():
    """pad_border: one value per pixel; the reference pairs of (0,1) keep their values, pairs that
    leave the map are 0: (0,2) -> R is (0,3), outside; (1,x) -> DL/D/DR are row 2, outside."""
    aff = affinity_from_features(_features_2x3(), radius=2, pad_border=True)
    assert aff.shape == (1, 4, 2, 3)
    ref = affinity_from_features(_features_2x3(), radius=2)
    torch.testing.assert_close(aff[:, :, 0, 1], ref[:, :, 0, 0])
    assert aff[0, R, 0, 2] == 0
    assert torch.all(aff[0, DL:, 1, :] == 0)
    assert aff[0, DL, 0, 0] == 0  # (0,0) -> (1,-1) is outside


def test_affinity_from_features_default_radius_shape_and_half_precision():
    feat = torch.randn(2, 3, 10, 12)
    aff = affinity_from_features(feat)
    assert aff.shape == (2, 34, 6, 4)
    assert bool(((aff > 0) & (aff <= 1)).all())
    half = affinity_from_features(feat.to(torch.bfloat16))
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="feat"):
        affinity_from_features(torch.randn(3, 10, 12))


# Hand-made 4x4 map; radius 2 -> "from" pixels rows 0..2, columns 1..2 (6 pixels, 24 pairs).
LABEL_4X4 = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 255, 1, 1],
        [2, 2, 2, 2],
    ],
    dtype=torch.uint8,
)


def test_affinity_labels_hand_counts_4x4():
    """Pairs (from -> R, DL, D, DR):
    (0,1)=0: 1 neg, 0 bg, 0 bg, 1 neg        (0,2)=1: 1 fg, 0 neg, 1 fg, 1 fg
    (1,1)=0: 1 neg, 0 bg, 255 -, 1 neg      (1,2)=1: 1 fg, 255 -, 1 fg, 1 fg
    (2,1)=255: 4 unused                      (2,2)=1: 1 fg, 2 neg, 2 neg, 2 neg
    bg = 3, fg = 3 + 3 + 1 = 7, neg = 2 + 1 + 2 + 3 = 8, unused = 1 + 1 + 4 = 6 (24 in all)."""
    bg, fg, neg = affinity_labels(LABEL_4X4, radius=2)
    assert bg.shape == fg.shape == neg.shape == (4, 3, 2)
    assert bg.dtype == torch.bool
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (3, 7, 8)
    assert not bool((bg & fg).any() or (bg & neg).any() or (fg & neg).any())
    # A few positions: window (row, col - 1).
    assert bool(bg[DL, 0, 0]) and bool(bg[D, 0, 0])        # (0,1) -> (1,0), (1,1): both 0
    assert bool(neg[R, 0, 0])                               # (0,1)=0 -> (0,2)=1
    assert not bool(bg[D, 1, 0] | fg[D, 1, 0] | neg[D, 1, 0])  # (1,1) -> (2,1)=255
    assert bool(fg[R, 2, 1]) and bool(neg[DR, 2, 1])        # (2,2)=1 -> (2,3)=1, (3,3)=2


def test_affinity_labels_two_halves_at_radius5():
    """6x10 map, columns 0..4 = 0 and 5..9 = 1; r=5: "from" rows 0..1, columns 4..5 (4 pixels).
    From column 4 (class 0) the "to" class is 0 iff dx <= 0: dy=0: 0, dy=1: 5, dy=2: 5, dy=3: 4,
    dy=4: 3 -> 17 bg, 17 neg. From column 5 (class 1) it is 1 iff dx >= 0: 4+5+5+4+3 = 21 fg, 13 neg.
    Two rows: bg = 34, fg = 42, neg = 2 * (17 + 13) = 60; 136 = 4 * 34 pairs."""
    label = torch.zeros(2, 6, 10, dtype=torch.long)
    label[:, :, 5:] = 1
    bg, fg, neg = affinity_labels(label)
    assert bg.shape == (2, 34, 2, 2)
    assert (int(bg[0].sum()), int(fg[0].sum()), int(neg[0].sum())) == (34, 42, 60)
    assert torch.equal(bg[0], bg[1])


def test_affinity_labels_ignore_pairs_are_never_positive():
    """255 == 255 is "same class" but not a valid pair: the reference masks fg_pos by validity."""
    bg, fg, neg = affinity_labels(torch.full((3, 4), 255, dtype=torch.uint8), radius=2)
    assert not bool(bg.any() or fg.any() or neg.any())


def test_affinity_labels_padded_marks_outside_pairs_unused():
    """pad_border: one entry per pixel; a uniform class-1 2x2 map has exactly its 6 pairs
    (0-1, 2-3 by R; 1-2 by DL; 0-2, 1-3 by D; 0-3 by DR) as fg positives."""
    bg, fg, neg = affinity_labels(torch.ones(2, 2, dtype=torch.long), radius=2, pad_border=True)
    assert fg.shape == (4, 2, 2)
    assert int(fg.sum()) == 6 and not bool(bg.any() or neg.any())


def test_affinity_labels_errors():
    with pytest.raises(ValueError, match="integer class map"):
        affinity_labels(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="ignore_index"):
        affinity_labels(torch.zeros(4, 4, dtype=torch.long), radius=2, ignore_index=0)


def test_affinity_loss_hand_value():
    """a = [0.5, 0.9, 0.2, 0.7]; bg = {0.5}, fg = {0.9}, neg = {0.2, 0.7}.
    bg  = -ln(0.5 + 1e-5) / (1 + 1e-5)                         ~ 0.693127
    fg  = -ln(0.9 + 1e-5) / (1 + 1e-5)                         ~ 0.105349
    neg = (-ln(1 + 1e-5 - 0.2) - ln(1 + 1e-5 - 0.7)) / (2 + 1e-5) ~ (0.223131 + 1.203940) / 2
    loss = bg/4 + fg/4 + neg/2 ~ 0.17328 + 0.02634 + 0.35677 = 0.55639."""
    aff = torch.tensor([0.5, 0.9, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    bg = torch.tensor([True, False, False, False])
    fg = torch.tensor([False, True, False, False])
    neg = torch.tensor([False, False, True, True])
    loss, parts = affinity_loss(aff, bg, fg, neg)
    eps = 1e-5
    exp_bg = -math.log(0.5 + eps) / (1 + eps)
    exp_fg = -math.log(0.9 + eps) / (1 + eps)
    exp_neg = (-math.log(1 + eps - 0.2) - math.log(1 + eps - 0.7)) / (2 + eps)
    assert parts["bg"].item() == pytest.approx(exp_bg, rel=1e-12)
    assert parts["fg"].item() == pytest.approx(exp_fg, rel=1e-12)
    assert parts["neg"].item() == pytest.approx(exp_neg, rel=1e-12)
    assert (parts["bg_count"].item(), parts["fg_count"].item(), parts["neg_count"].item()) == (1, 1, 2)
    assert loss.item() == pytest.approx(exp_bg / 4 + exp_fg / 4 + exp_neg / 2, rel=1e-12)
    assert loss.item() == pytest.approx(0.55639, abs=1e-4)
    loss.backward()
    assert torch.isfinite(aff.grad).all()


def test_affinity_loss_empty_part_is_zero_and_half_precision_is_safe():
    """No fg pairs: 0 / (0 + 1e-5) = 0, as in the reference. A bf16 affinity of exactly 1 on a negative
    pair: in float32 -ln(1e-5) ~ 11.51 (bf16 would give -ln(0) = inf)."""
    aff = torch.tensor([[0.5, 1.0]], dtype=torch.bfloat16)
    bg = torch.tensor([[True, False]])
    none = torch.zeros(1, 2, dtype=torch.bool)
    neg = torch.tensor([[False, True]])
    loss, parts = affinity_loss(aff, bg, none, neg)
    assert parts["fg"].item() == 0.0 and parts["fg_count"].item() == 0
    assert parts["neg"].item() == pytest.approx(-math.log(1e-5) / (1 + 1e-5), rel=1e-3)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="fg_pos"):
        affinity_loss(aff, bg, torch.zeros(2, 1, dtype=torch.bool), neg)


def test_affinity_loss_accepts_float_masks_like_the_reference():
    aff = torch.rand(2, 34, 3, 3)
    bg, fg, neg = affinity_labels(torch.randint(0, 3, (2, 7, 11)))
    loss_b, _ = affinity_loss(aff, bg, fg, neg)
    loss_f, _ = affinity_loss(aff, bg.float(), fg.float(), neg.float())
    torch.testing.assert_close(loss_b, loss_f)


def _cams_1x4() -> torch.Tensor:
    """3 classes, 1x4 map; class 1 unlabelled (zeros). Class maps (c0, c2) per pixel:
    p0 (0.5, 0.1), p1 (0.02, 0.01), p2 (0.15, 0), p3 (0.1, 0.9)."""
    cams = torch.zeros(3, 1, 4, dtype=torch.float64)
    cams[0, 0] = torch.tensor([0.5, 0.02, 0.15, 0.1])
    cams[2, 0] = torch.tensor([0.1, 0.01, 0.0, 0.9])
    return cams


def test_dual_threshold_labels_by_hand():
    """m = max class score; low α=4 background (1-m)^4, high α=32 background (1-m)^32.
    p0 m=0.5: low bg 0.0625 < 0.5 -> class 0 (value 1); high agrees -> 1.
    p1 m=0.02: low bg 0.98^4 = 0.922 -> bg -> 255; high bg 0.98^32 = 0.524 > 0.02 -> 0.
    p2 m=0.15: low bg 0.85^4 = 0.522 -> bg -> 255; high bg 0.85^32 = 0.0055 < 0.15 -> fg -> stays 255.
    p3 m=0.9: low bg 1e-4 -> class 2 (value 3) -> 3."""
    expected = [[1, 0, 255, 3]]
    out = dual_threshold_labels(_cams_1x4(), labels=torch.tensor([1.0, 0.0, 1.0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == expected
    assert dual_threshold_labels(_cams_1x4()).tolist() == expected  # labels from non-zero maps


def test_dual_threshold_labels_crf_hook():
    """A "CRF" that makes the background win everywhere gives 0 everywhere (high-α background wins);
    one that returns all zeros leaves no score anywhere (< 1e-5) -> 255 everywhere."""
    def all_background(scores: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(scores)
        out[0] = 1.0
        return out

    assert dual_threshold_labels(_cams_1x4(), crf=all_background).tolist() == [[0, 0, 0, 0]]
    assert dual_threshold_labels(_cams_1x4(), crf=torch.zeros_like).tolist() == [[255] * 4]
    with pytest.raises(ValueError, match="crf"):
        dual_threshold_labels(_cams_1x4(), crf=lambda s: s[:1])


def test_dual_threshold_labels_pools_scores_before_the_argmax():
    """One class, 2x4 map, stride 2 -> 1x2. Block A = [[0.6, 0.4], [0.6, 0.4]]: low bg mean
    (0.4^4 + 0.6^4) / 2 = (0.0256 + 0.1296) / 2 = 0.0776 < class mean 0.5 -> class 1.
    Block B = [[0, 0], [0, 0.2]]: low bg mean (1 + 1 + 1 + 0.4096) / 4 = 0.8524 > 0.05 -> 255;
    high bg mean (3 + 0.8^32) / 4 = 0.7502 > 0.05 -> 0. Result [[1, 0]]; per pixel, (1,3) alone would
    be 255 (low bg 0.4096 > 0.2, high bg 0.0008 < 0.2)."""
    cams = torch.tensor([[[0.6, 0.4, 0.0, 0.0], [0.6, 0.4, 0.0, 0.2]]], dtype=torch.float64)
    assert dual_threshold_labels(cams, stride=2).tolist() == [[1, 0]]
    assert dual_threshold_labels(cams)[1, 3].item() == 255


def test_cam_scores_with_background_and_power_background():
    """labels [1, 0, 1]: planes = [bg, c0, c2], keys [0, 1, 3]; bg = (1 - max(c0, c2))^2."""
    cams = _cams_1x4()
    scores, keys = cam_scores_with_background(cams, torch.tensor([1, 0, 1]), alpha=2)
    assert keys.tolist() == [0, 1, 3]
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.25, 0.98**2, 0.85**2, 0.01], dtype=torch.float64))
    torch.testing.assert_close(scores[1:], cams[[0, 2]])
    assert power_background(torch.zeros(0, 2, 2), 16.0).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]
    with pytest.raises(ValueError, match="labels"):
        cam_scores_with_background(cams, torch.ones(2), alpha=2)


def test_labels_at_stride_keeps_top_left_of_each_block():
    """5x5 map of values 10*y + x, stride 2 -> rows/columns 0, 2, 4 (ceil(5/2) = 3)."""
    label = (10 * torch.arange(5)[:, None] + torch.arange(5)[None]).to(torch.uint8)
    out = labels_at_stride(label[None], 2)
    assert out.tolist() == [[[0, 2, 4], [20, 22, 24], [40, 42, 44]]]
    assert out.dtype == torch.uint8
    with pytest.raises(ValueError, match="stride"):
        labels_at_stride(label, 0)


def test_scores_at_stride_padding_dilution():
    """3x3 ones, stride 2, zero-padded to 4x4: block sums 4, 2, 2, 1 over 4 pixels -> [[1, .5], [.5, .25]]
    with the reference's count_padding; averaging inside pixels only gives ones."""
    ones = torch.ones(2, 3, 3)
    torch.testing.assert_close(scores_at_stride(ones, 2), torch.tensor([[1.0, 0.5], [0.5, 0.25]]).expand(2, 2, 2))
    torch.testing.assert_close(scores_at_stride(ones, 2, count_padding=False), torch.ones(2, 2, 2))
    assert scores_at_stride(ones, 1) is ones
