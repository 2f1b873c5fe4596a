"""Segmentation loss (plain / balanced CE, label resizing, multi-scale sum) and dense CRF."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_tune.ops.crf import dense_crf
from wsss_tune.ops.seg_loss import class_balance_weights, msc_loss, resize_labels, seg_cross_entropy

LN2, LN3 = math.log(2.0), math.log(3.0)


def _four_pixel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, one row of five pixels (the last one ignored).

    pixel  label  logits (class 0, class 1)   -log p(label)
    0      0      (0, 0)                      ln 2
    1      0      (0, ln 3)                   ln 4       (p0 = 1 / (1 + 3))
    2      0      (0, 0)                      ln 2
    3      1      (0, ln 3)                   ln 4/3     (p1 = 3 / 4)
    4      255    (5, -5)                     (ignored)
    """
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0],
                           [0.0, LN3, 0.0, LN3, -5.0]]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 1, 255]]])
    return logits, target


def test_plain_ce_hand_value() -> None:
    """Mean over the four valid pixels: (ln2 + ln4 + ln2 + ln4/3) / 4 = (6 ln2 - ln3) / 4."""
    logits, target = _four_pixel_case()
    loss = seg_cross_entropy(logits, target)
    assert loss.item() == pytest.approx((6 * LN2 - LN3) / 4, abs=1e-6)


def test_balanced_ce_hand_value() -> None:
    """Inverse-frequency weights (1/3 for class 0, 1 for class 1) under the weighted mean give the
    mean over classes of each class's mean loss:
    class 0: (ln2 + ln4 + ln2) / 3 = 4 ln2 / 3; class 1: ln 4/3 = 2 ln2 - ln3;
    balanced = (4 ln2 / 3 + 2 ln2 - ln3) / 2 = 5 ln2 / 3 - ln3 / 2 (about 0.6059, vs 0.7651 plain)."""
    logits, target = _four_pixel_case()
    loss = seg_cross_entropy(logits, target, balanced=True)
    assert loss.item() == pytest.approx(5 * LN2 / 3 - LN3 / 2, abs=1e-6)


def test_class_balance_weights_ignore_and_absent_classes() -> None:
    """Counts over non-ignored pixels: class 0 x3, class 1 x1, class 2 absent -> (1/3, 1, 0)."""
    _, target = _four_pixel_case()
    w = class_balance_weights(target, 3)
    assert torch.allclose(w, torch.tensor([1 / 3, 1.0, 0.0]))


def test_resize_labels_hand_example() -> None:
    """4 -> 2 with pixel-centre sampling picks source index floor((i + 0.5) * 2) = 1, 3 (plain
    ``nearest`` would pick 0, 2)."""
    target = torch.arange(16).view(1, 4, 4)
    out = resize_labels(target, (2, 2))
    assert out.tolist() == [[[5, 7], [13, 15]]]
    assert out.dtype == target.dtype


@pytest.mark.parametrize("size", [(41, 41), (21, 31), (81, 61)])
def test_resize_labels_matches_pil_nearest(size: tuple[int, int]) -> None:
    """The reference shrinks labels with ``Image.fromarray(label).resize((w, h), Image.NEAREST)``."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 21, (2, 321, 257), generator=gen)
    labels[:, :10] = 255
    ours = resize_labels(labels, size)
    h, w = size
    for b in range(labels.shape[0]):
        ref = np.asarray(Image.fromarray(labels[b].numpy().astype(np.float32)).resize((w, h), Image.NEAREST))
        assert np.array_equal(ours[b].numpy(), ref.astype(np.int64))


def test_labels_are_resized_to_logits_by_default() -> None:
    """Logits 1x2: class 1 wins on the left, class 0 on the right (logits 10 vs 0). Labels 2x4,
    left half 1, right half 0.

    ``resize='labels'``: the labels shrink to [[1, 0]] (columns 1 and 3 sampled), both pixels are
    right by a margin of 10: loss = ln(1 + e^-10).
    ``resize='logits'``: bilinear 2 -> 4 (align_corners=False) samples source x = -0.25, 0.25, 0.75,
    1.25, clamped to 0, 0.25, 0.75, 1, so the class-0 logits become 0, 2.5, 7.5, 10 (class 1 the
    reverse): margins 10, 5, 5, 10, loss = (ln(1 + e^-10) + ln(1 + e^-5)) / 2.
    """
    logits = torch.tensor([[0.0, 10.0], [10.0, 0.0]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0]]])
    loss = seg_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10.0)), rel=1e-3)
    up = seg_cross_entropy(logits, target, resize="logits")
    assert up.item() == pytest.approx((math.log1p(math.exp(-10.0)) + math.log1p(math.exp(-5.0))) / 2, rel=1e-3)


def test_resize_logits_with_constant_logits() -> None:
    """Spatially constant logits stay constant under bilinear upsampling, so every label pixel of
    class 0 with logits (ln 3, 0) costs -log(3/4) = ln 4/3, whatever the sizes."""
    logits = torch.tensor([LN3, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3).contiguous()
    target = torch.zeros(1, 7, 5, dtype=torch.long)
    loss = seg_cross_entropy(logits, target, resize="logits")
    assert loss.item() == pytest.approx(2 * LN2 - LN3, abs=1e-6)


def test_all_ignored_gives_zero_loss_not_nan() -> None:
    """No valid pixel: loss 0 (``F.cross_entropy`` would give NaN), still attached to the graph."""
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    for balanced in (False, True):
        loss = seg_cross_entropy(logits, target, balanced=balanced)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_labels_and_shapes_raise() -> None:
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"labels \[5\] outside 0\.\.2"):
        seg_cross_entropy(logits, torch.tensor([[[0, 1], [5, 255]]]))
    with pytest.raises(ValueError, match="integer labels"):
        seg_cross_entropy(logits, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        seg_cross_entropy(torch.zeros(3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="resize must be"):
        seg_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long), resize="both")  # type: ignore[arg-type]


def test_msc_loss_sums_per_scale_losses() -> None:
    """Zero logits give ln K per pixel at every size: four outputs (full, 0.5, 0.75, fused) with
    K = 3 sum to 4 ln 3, and a single tensor gives ln 3."""
    target = torch.randint(0, 3, (2, 17, 17))
    outputs = [torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 5)]
    assert msc_loss(outputs, target).item() == pytest.approx(4 * LN3, abs=1e-5)
    assert msc_loss(outputs[0], target).item() == pytest.approx(LN3, abs=1e-5)


def test_msc_loss_equals_sum_of_seg_ce() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (1, 33, 33), generator=gen)
    outputs = [torch.randn(1, 4, s, s, generator=gen) for s in (5, 3, 4, 5)]
    expected = sum(seg_cross_entropy(o, target, balanced=True).item() for o in outputs)
    assert msc_loss(outputs, target, balanced=True).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        msc_loss([], target)


# ---- dense CRF ------------------------------------------------------------------------------------

_HAS_CRF = importlib.util.find_spec("pydensecrf") is not None


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """A 12x12 image, black left half and white right half; probabilities favour class 0 (0.7) on
    the left and class 1 on the right, except one left pixel at (5, 2) that leans to class 1 (0.55)."""
    image = np.zeros((12, 12, 3), np.uint8)
    image[:, 6:] = 255
    probs = np.zeros((2, 12, 12), np.float32)
    probs[0, :, :6], probs[0, :, 6:] = 0.7, 0.3
    probs[0, 5, 2] = 0.45
    probs[1] = 1.0 - probs[0]
    return image, probs


@pytest.mark.skipif(not _HAS_CRF, reason="pydensecrf2 (optional extra 'crf') is not installed")
def test_dense_crf_smooths_an_outlier_within_a_region() -> None:
    """The smoothness and appearance kernels pull the outlier towards its 71 same-colour
    neighbours, which favour class 0; probabilities stay normalised."""
    image, probs = _two_region_case()
    assert probs[:, 5, 2].argmax() == 1
    q = dense_crf(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1.0, atol=1e-4)
    labels = q.argmax(0)
    assert labels[5, 2] == 0
    assert (labels[:, :6] == 0).all() and (labels[:, 6:] == 1).all()


@pytest.mark.skipif(not _HAS_CRF, reason="pydensecrf2 (optional extra 'crf') is not installed")
def test_dense_crf_zero_iterations_returns_the_input_probabilities() -> None:
    """With no mean-field step the CRF returns softmax(-unary) = the clipped input probabilities."""
    image, probs = _two_region_case()
    q = dense_crf(image, torch.from_numpy(probs), iterations=0)
    assert isinstance(q, torch.Tensor)
    assert torch.allclose(q, torch.from_numpy(probs), atol=1e-5)


def test_dense_crf_bad_inputs() -> None:
    image, probs = _two_region_case()
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        dense_crf(image, probs[:, :5])


def test_dense_crf_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    image, probs = _two_region_case()
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'wsss-tune\[crf\]'"):
        dense_crf(image, probs)
