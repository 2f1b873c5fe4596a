"""Multi-scale CAM fusion and the pseudo-label rules, on fake networks with known outputs."""

from __future__ import annotations

import math

import pytest
import torch

from wsss_tune.ops.cam import CAM_NORM_EPS, REFERENCE_CAM_SCALES, cam_to_mask, multiscale_cam

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


class ConstantMaps:
    """Fake network: constant logits per channel at half the input resolution; records its inputs."""

    def __init__(self, logits: list[float]) -> None:
        self.logits = torch.tensor(logits)
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        n, _, h, w = x.shape
        size = (max(1, h // 2), max(1, w // 2))
        return self.logits.to(x.device)[None, :, None, None].expand(n, -1, *size).clone()


def test_constant_maps_fuse_to_exact_values_over_eight_passes() -> None:
    """Logits (ln2, 0 | bg 0) -> softmax (0.5, 0.25 | 0.25) everywhere, at every scale and flip.

    8 passes sum to (4, 2 | 2); class 2 is absent -> 0; each map / (its max + 1e-5):
    class 1 = 4 / (4 + 1e-5), class 2 = 0, background = 2 / (2 + 1e-5).
    Scaled sizes of a 5x7 image: round(2.5)=2 (half to even), round(3.5)=4; 5x7; 7.5 -> 8, 10.5 -> 10;
    10x14. Each scale is one batch of 2 (image and its mirror).
    """
    net = ConstantMaps([math.log(2.0), 0.0, 0.0])
    image = torch.randn(3, 5, 7)
    cams = multiscale_cam(net, image, torch.tensor([1.0, 0.0]))
    assert REFERENCE_CAM_SCALES == (0.5, 1.0, 1.5, 2.0) and CAM_NORM_EPS == 1e-5
    assert [tuple(x.shape) for x in net.inputs] == [(2, 3, 2, 4), (2, 3, 5, 7), (2, 3, 8, 10), (2, 3, 10, 14)]
    for x in net.inputs:
        torch.testing.assert_close(x[1], x[0].flip(-1))
    assert cams.shape == (3, 5, 7) and cams.dtype == torch.float32
    torch.testing.assert_close(cams[0], torch.full((5, 7), 4 / (4 + 1e-5)))
    torch.testing.assert_close(cams[1], torch.zeros(5, 7))
    torch.testing.assert_close(cams[2], torch.full((5, 7), 2 / (2 + 1e-5)))


def test_relu_normalization_for_the_plain_cam_baseline() -> None:
    """Logits (-1, 2 | 3), scale 1, flip: ReLU -> (0, 2 | 3), summed (0, 4 | 6).

    Class 1 stays 0 (0 / 1e-5); class 2 = 4 / (4 + 1e-5); bg = 6 / (6 + 1e-5). Softmax would give
    class 1 a positive value instead.
    """
    net = ConstantMaps([-1.0, 2.0, 3.0])
    cams = multiscale_cam(net, torch.zeros(3, 4, 4), torch.tensor([1.0, 1.0]), scales=(1.0,), normalization="relu")
    torch.testing.assert_close(cams[0], torch.zeros(4, 4))
    torch.testing.assert_close(cams[1], torch.full((4, 4), 4 / (4 + 1e-5)))
    torch.testing.assert_close(cams[2], torch.full((4, 4), 6 / (6 + 1e-5)))


def test_flip_is_undone() -> None:
    """Network = identity on channel 0 (a ramp 0..3 along the width), ReLU, scale 1.

    With the flip undone both passes give the ramp: sum = 2 * ramp, normalised 2r / (2*3 + 1e-5).
    Without undoing it the sum would be ramp + mirrored ramp = 3 everywhere (a flat map).
    """

    def net(x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(x[:, :1])
        return torch.cat([x[:, :1], zeros, zeros], dim=1)

    ramp = torch.arange(4.0).expand(3, 2, 4).clone()
    labels = torch.tensor([1.0, 0.0])
    cams = multiscale_cam(net, ramp, labels, scales=(1.0,), normalization="relu")
    torch.testing.assert_close(cams[0], 2 * ramp[0] / (6 + 1e-5))
    single = multiscale_cam(net, ramp, labels, scales=(1.0,), flip=False, normalization="relu")
    torch.testing.assert_close(single[0], ramp[0] / (3 + 1e-5))


def test_bilinear_resize_in_and_out() -> None:
    """Scale 0.5 of a 4x4 image with values 4r + c, bilinear, align_corners=False.

    Source coordinate (i + 0.5) * 2 - 0.5 = 2i + 0.5: the mean of each 2x2 block,
    [[2.5, 4.5], [10.5, 12.5]]. The network returns class-1 logits [0, 4] on a 1x2 grid; ReLU and
    bilinear upsampling to width 4 sample at x = (j + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25,
    0.75, 1.25 (clamped to 1) -> [0, 1, 3, 4]; normalised by 4 + 1e-5.
    """
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        out = torch.zeros(x.shape[0], 2, 1, 2)
        out[:, 0, 0, 1] = 4.0
        return out

    image = torch.arange(16.0).reshape(1, 4, 4).expand(3, 4, 4).clone()
    cams = multiscale_cam(net, image, torch.tensor([1.0]), scales=(0.5,), flip=False, normalization="relu")
    torch.testing.assert_close(seen[0][0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    expected_row = torch.tensor([0.0, 1.0, 3.0, 4.0]) / (4 + 1e-5)
    torch.testing.assert_close(cams[0], expected_row.expand(4, 4))


def test_each_class_map_is_divided_by_its_own_max() -> None:
    """Scale 1, no flip, ReLU: class 1 = [[0, 1], [2, 3]] -> /3; class 2 = 10 -> 10/10; bg 5 -> 5/5."""

    def net(x: torch.Tensor) -> torch.Tensor:
        class1 = torch.arange(4.0).reshape(1, 1, 2, 2)
        return torch.cat([class1, torch.full((1, 1, 2, 2), 10.0), torch.full((1, 1, 2, 2), 5.0)], dim=1)

    cams = multiscale_cam(net, torch.zeros(3, 2, 2), torch.tensor([1, 1]), scales=(1.0,), flip=False,
                          normalization="relu")
    torch.testing.assert_close(cams[0], torch.arange(4.0).reshape(2, 2) / (3 + 1e-5))
    torch.testing.assert_close(cams[1], torch.full((2, 2), 10 / (10 + 1e-5)))
    torch.testing.assert_close(cams[2], torch.full((2, 2), 5 / (5 + 1e-5)))


def test_multiscale_cam_rejects_bad_shapes() -> None:
    net = ConstantMaps([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="forward_maps"):
        multiscale_cam(net, torch.zeros(3, 4, 4), torch.tensor([1.0]))  # 3 maps for 1 label
    with pytest.raises(ValueError, match="image"):
        multiscale_cam(net, torch.zeros(1, 3, 4, 4), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="normalization"):
        multiscale_cam(net, torch.zeros(3, 4, 4), torch.tensor([1.0, 0.0]), normalization="sigmoid")  # type: ignore[arg-type]


def _cams() -> tuple[torch.Tensor, torch.Tensor]:
    """C = 3 on a 1x4 image; class 3 is absent but scores 1.0 everywhere."""
    cams = torch.tensor(
        [
            [0.9, 0.1, 0.3, 0.15],  # class 1
            [0.5, 0.05, 0.6, 0.1],  # class 2
            [1.0, 1.0, 1.0, 1.0],  # class 3 (absent)
            [0.0, 0.3, 0.8, 0.05],  # learned background
        ]
    ).reshape(4, 1, 4)
    return cams, torch.tensor([1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # max of (0.2 | 0.9, 0.5), (0.2 | 0.1, 0.05), (0.2 | 0.3, 0.6), (0.2 | 0.15, 0.1)
        ({}, [1, 0, 2, 0]),
        # threshold 0.12: last pixel (0.12 | 0.15, 0.1) -> class 1
        ({"bg_threshold": 0.12}, [1, 0, 2, 1]),
        # learned: (0.0 | 0.9, 0.5), (0.3 | 0.1, 0.05), (0.8 | 0.3, 0.6), (0.05 | 0.15, 0.1)
        ({"bg_mode": "learned"}, [1, 0, 0, 1]),
    ],
)
def test_cam_to_mask_rules(kwargs: dict, expected: list[int]) -> None:
    """Argmax over [background score, class maps]; the absent class 3 (1.0 everywhere) never wins."""
    cams, labels = _cams()
    mask = cam_to_mask(cams, labels, **kwargs)
    assert mask.dtype == torch.int64 and mask.shape == (1, 4)
    assert mask.flatten().tolist() == expected


def test_cam_to_mask_ties_and_no_labels() -> None:
    """A class score equal to the threshold (0.2 == 0.2) goes to background; no labels -> all background."""
    cams = torch.tensor([[0.2, 0.21], [0.0, 0.0]]).reshape(2, 1, 2)
    assert cam_to_mask(cams, torch.tensor([1.0])).flatten().tolist() == [0, 1]
    assert cam_to_mask(cams, torch.tensor([0.0])).flatten().tolist() == [0, 0]
    with pytest.raises(ValueError, match="bg_mode"):
        cam_to_mask(cams, torch.tensor([1.0]), bg_mode="power")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cams"):
        cam_to_mask(cams, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_inputs_device(device: str) -> None:
    """CAMs and masks stay on the device of the image and network output."""
    net = ConstantMaps([math.log(2.0), 0.0, 0.0])
    cams = multiscale_cam(net, torch.randn(3, 6, 6, device=device), torch.tensor([1.0, 0.0]))
    assert cams.device.type == device
    mask = cam_to_mask(cams, torch.tensor([1.0, 0.0], device=device))
    assert mask.device.type == device
    assert mask.unique().tolist() == [1]  # class 1 normalises to ~1 > 0.2 everywhere
