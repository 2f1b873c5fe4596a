"""EPS loss pieces pinned on tiny tensors with hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from wsss_tune.ops.eps_loss import (
    OVERLAP_EPS,
    EPSLoss,
    classification_loss,
    eps_loss,
    estimated_saliency,
    overlap_ratio,
    present_class_overlap,
    resize_saliency,
    saliency_loss,
)

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


def test_resize_saliency_nearest_samples_every_kth_pixel() -> None:
    """4x4 -> 2x2 nearest takes source index floor(i * 4/2) = 0, 2 in each axis, no averaging.

    With S[r, c] = 4r + c: kept pixels (0,0)=0, (0,2)=2, (2,0)=8, (2,2)=10 (bilinear would give 2.5...).
    4 -> 3 takes floor(i * 4/3) = 0, 1, 2.
    """
    sal = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    assert resize_saliency(sal, (2, 2)).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert resize_saliency(sal, (3, 3))[0, 0, :, 0].tolist() == [0.0, 4.0, 8.0]
    assert resize_saliency(sal, (4, 4)) is sal
    with pytest.raises(ValueError, match="saliency"):
        resize_saliency(sal[0], (2, 2))


def _probs_2x2() -> torch.Tensor:
    """(1, 3, 2, 2) probabilities: class 1, class 2, background per pixel (row-major)."""
    per_pixel = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    return per_pixel.T.reshape(1, 3, 2, 2)


def test_overlap_ratio_rounds_half_to_even_and_adds_eps_per_pixel() -> None:
    """Hand-derived overlap on a 2x2 image with C = 2.

    p_1 = [0.7, 0.5, 0.6, 0.1] -> round [1, 0, 1, 0] (0.5 -> 0, half to even)
    p_2 = [0.2, 0.3, 0.3, 0.8] -> round [0, 0, 0, 1]
    S   = [1.0, 1.0, 0.5, 0.9] -> round [1, 1, 0, 1] (0.5 -> 0)
    O_1 = (1*1 + 1*0) / (2 + 4 * 1e-4) = 1 / 2.0004
    O_2 = (1*1) / (1 + 4 * 1e-4) = 1 / 1.0004
    (Rounding half up would give O_1 = 3 / 3.0004 instead.)
    """
    probs = _probs_2x2().requires_grad_(True)
    sal = torch.tensor([1.0, 1.0, 0.5, 0.9]).reshape(1, 1, 2, 2)
    overlap = overlap_ratio(probs, sal)
    assert OVERLAP_EPS == 1e-4
    assert overlap.shape == (1, 2)
    assert not overlap.requires_grad
    torch.testing.assert_close(overlap, torch.tensor([[1 / 2.0004, 1 / 1.0004]]))


def test_overlap_ratio_of_an_empty_class_is_zero_and_sizes_must_match() -> None:
    """A class map that rounds to 0 everywhere: 0 / (4 * 1e-4) = 0."""
    probs = torch.zeros(1, 2, 2, 2)
    probs[:, 1] = 1.0
    assert overlap_ratio(probs, torch.ones(1, 1, 2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="resize_saliency"):
        overlap_ratio(probs, torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize(
    ("tau", "lam", "expected"),
    [
        (0.4, 0.5, 0.25),  # class 1 fg (0.5 > 0.4), class 2 bg: M_fg=0.1, M_bg=0.4+0.2 -> .05 + .2
        (0.5, 0.5, 0.15),  # O_1 = 0.5 is not > 0.5: both bg, M_fg=0, M_bg=0.7 -> 0 + 0.5 * 0.3
        (0.29, 0.5, 0.45),  # both fg: M_fg=0.3, M_bg=0.4 -> 0.15 + 0.3
        (0.4, 1.0, 0.1),  # lam = 1: S_hat = M_fg
        (0.4, 0.25, 0.325),  # 0.25 * 0.1 + 0.75 * (1 - 0.6)
    ],
)
def test_estimated_saliency_fg_bg_split(tau: float, lam: float, expected: float) -> None:
    """One pixel, C = 3, probs (0.1, 0.2, 0.3 | bg 0.4), labels (1, 1, 0), overlap (0.5, 0.3, 0.9).

    Class 3 is absent: despite O = 0.9 it counts on neither side (else M_fg would include 0.3).
    S_hat = lam * M_fg + (1 - lam) * (1 - M_bg), values per case in the parameter comments.
    """
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(1, 4, 1, 1)
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    overlap = torch.tensor([[0.5, 0.3, 0.9]])
    out = estimated_saliency(probs, labels, overlap, tau=tau, lam=lam)
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def _two_image_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit maps (2, 2, 1, 2), saliency (2, 1, 2, 4), labels (2, 1); both images share the maps."""
    ln3 = math.log(3.0)
    maps = torch.tensor([[[ln3, 0.0]], [[0.0, ln3]]]).expand(2, 2, 1, 2).clone()
    sal = torch.full((2, 1, 2, 4), 0.5)
    sal[:, 0, 0, 0] = 0.9
    sal[:, 0, 0, 2] = 0.2
    labels = torch.tensor([[1.0], [0.0]])
    return maps, sal, labels


def test_saliency_loss_by_hand() -> None:
    """Two images, C = 1, 1x2 maps, saliency 2x4 resized by nearest to (S[0,0], S[0,2]) = (0.9, 0.2).

    softmax: pixel 1 logits (ln3, 0) -> p = (0.75 | bg 0.25); pixel 2 (0, ln3) -> (0.25 | 0.75).
    Image 1 (class present): round(p_1) = (1, 0), round(S) = (1, 0), O = 1 / (1 + 2e-4) > 0.4 -> fg;
      S_hat = 0.5 * p_1 + 0.5 * (1 - p_bg) = (0.75, 0.25); sq. errors 0.15^2, 0.05^2 = .0225, .0025.
    Image 2 (class absent): S_hat = 0.5 * (1 - p_bg) = (0.375, 0.125); errors .275625, .005625.
    L_sal = (.0225 + .0025 + .275625 + .005625) / 4 = 0.0765625 (the 0.5 pixels are never sampled).
    """
    maps, sal, labels = _two_image_batch()
    maps.requires_grad_(True)
    loss, overlap = saliency_loss(maps, sal, labels)
    assert loss.item() == pytest.approx(0.0765625, abs=1e-6)
    torch.testing.assert_close(overlap, torch.full((2, 1), 1 / 1.0002))
    loss.backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_classification_loss_excludes_background_logit() -> None:
    """Logits (0, ln3 | bg 5), labels (1, 0).

    L = -(1/2) [log sigma(0) + log(1 - sigma(ln3))] = (1/2)(ln 2 + ln 4) = 1.5 ln 2;
    the background logit 5 must not enter.
    """
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])
    loss = classification_loss(logits, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    with pytest.raises(ValueError, match="image_logits"):
        classification_loss(logits, torch.tensor([[1.0, 0.0, 0.0]]))


def test_eps_loss_is_cls_plus_sal_with_pooled_logits() -> None:
    """Same batch as the saliency test; image logits = spatial mean of the maps = (ln3/2 | ln3/2).

    Image 1 (label 1): -log sigma(x) = log(1 + e^-x) = log(1 + 1/sqrt 3); image 2 (label 0):
    -log(1 - sigma(x)) = log(1 + e^x) = log(1 + sqrt 3). L_cls = mean of both; L = L_cls + 0.0765625.
    """
    maps, sal, labels = _two_image_batch()
    out = eps_loss(maps, sal, labels)
    cls = (math.log(1 + 1 / math.sqrt(3)) + math.log(1 + math.sqrt(3))) / 2
    assert out.cls.item() == pytest.approx(cls, abs=1e-6)
    assert out.sal.item() == pytest.approx(0.0765625, abs=1e-6)
    assert out.loss.item() == pytest.approx(cls + 0.0765625, abs=1e-6)
    assert out.overlap.shape == (2, 1)
    module = EPSLoss(tau=0.4, lam=0.5)
    assert module(maps, sal, labels).loss.item() == pytest.approx(out.loss.item())
    explicit = eps_loss(maps, sal, labels, image_logits=torch.zeros(2, 2))
    assert explicit.cls.item() == pytest.approx(math.log(2.0), abs=1e-6)  # -log sigma(0) = -log(1 - sigma(0))


def test_present_class_overlap_averages_over_images_with_the_class() -> None:
    """Class 1 present in both images: (0.8 + 0.6) / 2 = 0.7; class 2 present in none: NaN."""
    overlap = torch.tensor([[0.8, 0.1], [0.6, 0.3]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = present_class_overlap(overlap, labels)
    assert out[0].item() == pytest.approx(0.7)
    assert math.isnan(out[1].item())


def test_bad_arguments_are_named() -> None:
    maps, sal, labels = _two_image_batch()
    with pytest.raises(ValueError, match="labels"):
        saliency_loss(maps, sal, torch.ones(2, 2))
    with pytest.raises(ValueError, match="saliency"):
        saliency_loss(maps, sal[:1], labels)
    with pytest.raises(ValueError, match="lam"):
        EPSLoss(lam=1.5)
    with pytest.raises(TypeError):
        EPSLoss(0.4)  # type: ignore[misc]


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_inputs_device(device: str) -> None:
    """Every output lives on the device of the inputs (nothing is moved to a fixed device)."""
    maps, sal, labels = (t.to(device) for t in _two_image_batch())
    out = EPSLoss()(maps, sal, labels)
    assert out.loss.device.type == device and out.overlap.device.type == device
    assert out.loss.item() == pytest.approx(eps_loss(*(t.cpu() for t in (maps, sal, labels))).loss.item(), abs=1e-5)
    assert present_class_overlap(out.overlap, labels).device.type == device
