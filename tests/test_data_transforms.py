"""Joint transforms: normalisation values, alignment of image/saliency/mask, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_tune.data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    TrainTransform,
    normalize_image,
    to_tensors,
)
from wsss_tune.data.transforms import _adjust_hue


def _unnormalize(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) float pixel values in 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((img * std + mean) * 255.0).permute(1, 2, 0).numpy()


def _coordinate_sample(h: int, w: int) -> dict[str, np.ndarray]:
    """Planted pattern: R = x, G = y, B = 7; mask = (x + 2y) mod 6; saliency = (x mod 10) / 10."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx, yy, np.full_like(xx, 7)], axis=-1).astype(np.uint8)
    mask = ((xx + 2 * yy) % 6).astype(np.uint8)
    sal = ((xx % 10) / 10.0).astype(np.float32)
    return {"image": image, "mask": mask, "saliency": sal}


def test_normalize_image_hand_values() -> None:
    """Pixel (255, 0, 128): ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128/255 - 0.406) / 0.225)
    = (2.2489, -2.0357, 0.4265)."""
    img = np.array([[[255, 0, 128]]], dtype=np.uint8)
    out = normalize_image(img)
    assert out.shape == (3, 1, 1) and out.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float32))
    assert expected[0] == pytest.approx(2.2489, abs=1e-4) and expected[2] == pytest.approx(0.4265, abs=1e-4)
    with pytest.raises(DataError, match="uint8 RGB"):
        normalize_image(np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize("crop", [16, 50])  # smaller than the 30x40 input, and larger (padding)
@pytest.mark.parametrize("mode", ["eps", "deeplab"])
def test_flip_and_crop_keep_planted_pattern_aligned(crop: int, mode: str) -> None:
    """Without resizing every output pixel comes from one input pixel, so the coordinates decoded from
    the image must reproduce the mask and saliency exactly; padded pixels are exactly image 0,
    saliency 0, mask 255, and there are crop^2 - min(crop, 30) * min(crop, 40) of them."""
    h, w = 30, 40
    sample = _coordinate_sample(h, w)
    kwargs = {"resize_long": None} if mode == "eps" else {"scales": (1.0,)}
    tf = TrainTransform(crop_size=crop, hflip=True, **kwargs)
    flips = set()
    for seed in range(12):
        out = tf(sample, np.random.default_rng(seed))
        assert out["image"].shape == (3, crop, crop) and out["saliency"].shape == (1, crop, crop)
        assert out["mask"].shape == (crop, crop) and out["mask"].dtype == torch.int64
        mask = out["mask"].numpy()
        pad = mask == IGNORE_INDEX
        assert pad.sum() == crop * crop - min(crop, h) * min(crop, w)
        assert (out["image"].numpy()[:, pad] == 0).all() and (out["saliency"][0].numpy()[pad] == 0).all()
        pix = np.rint(_unnormalize(out["image"])).astype(int)
        x, y = pix[..., 0][~pad], pix[..., 1][~pad]
        assert (pix[..., 2][~pad] == 7).all()
        np.testing.assert_array_equal(mask[~pad], (x + 2 * y) % 6)
        np.testing.assert_allclose(out["saliency"][0].numpy()[~pad], (x % 10) / 10.0, atol=1e-6)
        row = pix[..., 0][np.nonzero(~pad)[0][0]][~pad[np.nonzero(~pad)[0][0]]]
        flips.add(bool(row[0] > row[-1]))
        if mode == "deeplab" and crop > h:
            assert not pad[:h, :w].any()  # DeepLab reference pads at the bottom/right only
    assert flips == {True, False}  # both flipped and unflipped draws were seen


def test_random_resize_keeps_block_aligned() -> None:
    """A white 20x20 block at rows 10-29, cols 5-24 of a black 40x60 image, labelled 1 in the mask and
    1.0 in the saliency. After random long-side resize (bicubic image/saliency, nearest mask), flip
    and crop, bright image pixels, salient pixels and mask == 1 overlap with IoU > 0.85 (they differ
    only by interpolation at the block edge; a missed flip would give IoU 0)."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 5:25] = 255
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:25] = 1
    sal = mask.astype(np.float32)
    tf = TrainTransform(crop_size=48, resize_long=(30, 90), hflip=True)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / max((a | b).sum(), 1)

    for seed in range(10):
        out = tf({"image": image, "mask": mask, "saliency": sal}, np.random.default_rng(seed))
        m = out["mask"].numpy() == 1
        if m.sum() < 20:
            continue  # block cropped away almost entirely
        bright = _unnormalize(out["image"])[..., 0] > 127
        assert iou(bright, m) > 0.85
        assert iou(out["saliency"][0].numpy() > 0.5, m) > 0.85
        s = out["saliency"].numpy()
        assert s.min() >= 0.0 and s.max() <= 1.0  # bicubic overshoot clipped


def test_resize_sizes_hand_derived() -> None:
    """resize_long=(30, 30) on a 20x40 (HxW) image: long side 40 -> 30, short 20 * 30/40 = 15, so a
    32 crop holds 15 * 30 = 450 real pixels. scales=(0.5,): int(20*0.5) x int(40*0.5) = 10 x 20,
    placed at the top-left."""
    sample = _coordinate_sample(20, 40)
    out = TrainTransform(crop_size=32, resize_long=(30, 30), hflip=False)(sample, np.random.default_rng(0))
    assert (out["mask"] != IGNORE_INDEX).sum() == 450
    out = TrainTransform(crop_size=32, scales=(0.5,), hflip=False)(sample, np.random.default_rng(0))
    valid = (out["mask"] != IGNORE_INDEX).numpy()
    assert valid.sum() == 200 and valid[:10, :20].all()


def test_jitter_changes_image_only_and_is_deterministic() -> None:
    sample = _coordinate_sample(30, 40)
    plain = TrainTransform(crop_size=24, resize_long=(30, 50))
    jitter = TrainTransform(crop_size=24, resize_long=(30, 50), jitter=(0.3, 0.3, 0.3, 0.1))
    a = plain(sample, np.random.default_rng(5))
    b = jitter(sample, np.random.default_rng(5))
    c = jitter(sample, np.random.default_rng(5))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["saliency"], b["saliency"])
    assert not torch.equal(a["image"], b["image"])
    for key in b:
        assert torch.equal(b[key], c[key])


def test_adjust_hue_rotates_red_towards_green() -> None:
    """Pure red has hue 0; a shift of 1/3 turn adds int(255/3) = 85 to PIL's 8-bit hue, i.e. 120
    degrees: green, with R and B near 0. A shift of -1/3 wraps to 256 - 85 = 171: blue."""
    from PIL import Image

    red = Image.fromarray(np.array([[[255, 0, 0]]], np.uint8))
    g = np.asarray(_adjust_hue(red, 1 / 3))[0, 0].astype(int)
    b = np.asarray(_adjust_hue(red, -1 / 3))[0, 0].astype(int)
    assert g[1] == 255 and g[0] < 10 and g[2] < 10
    assert b[2] == 255 and b[0] < 10 and b[1] < 10


def test_to_tensors_and_input_validation() -> None:
    sample = _coordinate_sample(5, 7)
    out = to_tensors(sample)
    assert out["image"].shape == (3, 5, 7) and out["saliency"].shape == (1, 5, 7) and out["mask"].shape == (5, 7)
    with pytest.raises(DataError, match="saliency.*expected the image size") as err:
        to_tensors({"image": sample["image"], "saliency": np.zeros((4, 7), np.float32)})
    assert err.value.kind == "size_mismatch"
    with pytest.raises(ValueError, match="alternatives"):
        TrainTransform(crop_size=8, resize_long=(8, 16), scales=(1.0,))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=0)
    with pytest.raises(ValueError, match="jitter"):
        TrainTransform(crop_size=8, jitter=(0.3, 0.3, 0.3, 0.7))
