"""Joint training transforms that keep image, saliency map and label mask aligned.

Reference behaviour (DESIGN.md §2):

* EPS training: random long-side resize (bicubic, image and saliency together), horizontal flip,
  colour jitter (0.3, 0.3, 0.3, 0.1) on the image only, ImageNet normalisation, random crop with
  zero padding placed at a random offset when the image is smaller than the crop.
* DeepLab training: random scale from a list (bilinear image, nearest labels), flip, crop with
  padding at the bottom/right (0 for the normalised image, 255 for labels), as in the reference.
* DeepLab training of the EPS recipe (wseg ``datasets/transform.py``, named options): a random shift
  in OpenCV's 8-bit HSV space first (``RandomHSV``), a scale drawn uniformly from a range with bicubic
  image resizing (``RandomScale``), and a crop placed at a random offset when the image is smaller
  (``RandomCrop``).

All randomness comes from the ``numpy.random.Generator`` passed in, so a sample's augmentation is a
function of its seed only (see :class:`wsss_tune.data.voc.ClassificationDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from wsss_tune.data.voc import IGNORE_INDEX, DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize_image", "to_tensors", "rgb_to_hsv_cv", "hsv_to_rgb_cv",
           "shift_hsv", "TrainTransform"]

#: ImageNet channel statistics (RGB, on [0, 1] pixels) used by the EPS and PSA reference ``Normalize``.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: 8-bit pixel range (reference: ``img / 255.``).
PIXEL_MAX = 255.0
#: Crop padding: the reference pads the *normalised* image and the saliency with zeros, labels with 255.
IMAGE_PAD = 0.0
SALIENCY_PAD = 0.0
MASK_PAD = IGNORE_INDEX
#: Probability of a horizontal flip (reference: ``random.random() > 0.5``).
FLIP_PROB = 0.5
#: Image resampling: PIL bicubic for the EPS long-side resize (reference ``RandomResizeLong``),
#: bilinear for DeepLab's random scaling (reference ``cv2.INTER_LINEAR``); labels always nearest.
RESIZE_LONG_RESAMPLE = Image.Resampling.BICUBIC
SCALE_RESAMPLE = Image.Resampling.BILINEAR
#: Image resampling of a scale drawn from a range (wseg ``RandomScale``: ``cv2.INTER_CUBIC``); PIL's
#: bicubic kernel (a = -0.5, antialiased when shrinking) is close to OpenCV's (a = -0.75), not equal.
SCALE_RANGE_RESAMPLE = Image.Resampling.BICUBIC
#: OpenCV's 8-bit HSV: hue in [0, 180) (degrees / 2), saturation and value in 0..255.
HSV_HUE_RANGE = 180
#: Fixed-point shift of OpenCV's 8-bit RGB -> HSV division tables (``hsv_shift``).
_HSV_SHIFT = 12


def _check_image(img: np.ndarray, where: str = "image") -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"{where}: expected a uint8 RGB array of shape (H, W, 3), got dtype {img.dtype} "
                        f"shape {img.shape}")
    return img


def normalize_image(img: np.ndarray) -> torch.Tensor:
    """RGB/255, then ImageNet mean/std normalisation.

    Shape:
        ``img``: ``(H, W, 3)`` ``uint8``; returns ``(3, H, W)`` ``float32``.
    """
    img = _check_image(img)
    t = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1).contiguous().div_(PIXEL_MAX)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def _check_sample(sample: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    if "image" not in sample:
        raise DataError(f"sample has keys {sorted(sample)}; expected an 'image'")
    img = _check_image(sample["image"], "sample['image']")
    sal = sample.get("saliency")
    mask = sample.get("mask")
    h, w = img.shape[:2]
    if sal is not None:
        sal = np.asarray(sal, dtype=np.float32)
        if sal.shape != (h, w):
            raise DataError(f"sample['saliency'] has shape {sal.shape}; expected the image size {(h, w)}",
                            kind="size_mismatch")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (h, w) or not np.issubdtype(mask.dtype, np.integer):
            raise DataError(f"sample['mask'] has dtype {mask.dtype} shape {mask.shape}; expected integer labels "
                            f"of the image size {(h, w)}", kind="size_mismatch")
        if mask.dtype != np.uint8 and mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
            raise DataError(f"sample['mask'] values {int(mask.min())}..{int(mask.max())} do not fit 0..255",
                            kind="bad_mask_values")
        mask = mask.astype(np.uint8, copy=False)
    return img, sal, mask


def _pack(img: torch.Tensor, sal: np.ndarray | None, mask: np.ndarray | None) -> dict[str, torch.Tensor]:
    out = {"image": img}
    if sal is not None:
        out["saliency"] = torch.from_numpy(np.array(sal, dtype=np.float32)).unsqueeze(0)  # copy: writable
    if mask is not None:
        out["mask"] = torch.from_numpy(mask.astype(np.int64))
    return out


def to_tensors(sample: dict[str, np.ndarray], rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """No augmentation: normalise the image and turn saliency/mask into tensors (evaluation).

    Args:
        sample: ``image`` and optionally ``saliency`` and ``mask``.
        rng: Unused; accepted so this is a drop-in ``transform`` for the datasets.

    Shape:
        ``image`` ``(H, W, 3)`` uint8 -> ``(3, H, W)`` float; ``saliency`` ``(H, W)`` -> ``(1, H, W)``
        float; ``mask`` ``(H, W)`` -> ``(H, W)`` int64.
    """
    img, sal, mask = _check_sample(sample)
    return _pack(normalize_image(img), sal, mask)


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns (``[-0.5, 0.5]``), as torchvision does for PIL images: the
    8-bit H channel of PIL's HSV wraps around."""
    hue, sat, val = img.convert("HSV").split()
    h = (np.asarray(hue, dtype=np.int16) + int(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(h.astype(np.uint8)), sat, val)).convert("RGB")


def _division_table(numerator: float) -> np.ndarray:
    """OpenCV's fixed-point division table ``round(numerator / i)`` for i = 0..255 (entry 0 is 0)."""
    i = np.arange(256, dtype=np.float64)
    return np.rint(np.where(i > 0, numerator / np.maximum(i, 1.0), 0.0)).astype(np.int64)


#: OpenCV's ``sdiv_table`` and ``hdiv_table180`` of ``RGB2HSV_b``.
_SDIV = _division_table(float(255 << _HSV_SHIFT))
_HDIV = _division_table((HSV_HUE_RANGE << _HSV_SHIFT) / 6.0)


def rgb_to_hsv_cv(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit ``COLOR_RGB2HSV`` (its fixed-point formulas): H in [0, 180), S and V in 0..255.

    Shape:
        ``(H, W, 3)`` uint8 RGB -> ``(H, W, 3)`` uint8 HSV.
    """
    rgb = _check_image(img).astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + HSV_HUE_RANGE, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


#: Which of (v, v(1 - s), v(1 - s f), v(1 - s(1 - f))) each of R, G, B takes in each hue sector
#: (OpenCV ``HSV2RGB_f``'s ``sector_data``, reordered from BGR to RGB).
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb_cv(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit ``COLOR_HSV2RGB`` (float32 arithmetic, rounded to the nearest level).

    Shape:
        ``(H, W, 3)`` uint8 HSV (H in [0, 180)) -> ``(H, W, 3)`` uint8 RGB.
    """
    hsv = np.asarray(hsv)
    if hsv.dtype != np.uint8 or hsv.ndim != 3 or hsv.shape[2] != 3:
        raise DataError(f"hsv: expected a uint8 array of shape (H, W, 3), got dtype {hsv.dtype} shape {hsv.shape}")
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / HSV_HUE_RANGE)
    s = hsv[..., 1].astype(np.float32) / np.float32(255.0)
    v = hsv[..., 2].astype(np.float32) / np.float32(255.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    f = h - sector
    outside = (sector < 0) | (sector >= 6)  # rounding at the top of the range (OpenCV resets it)
    sector, f = np.where(outside, 0, sector), np.where(outside, np.float32(0.0), f)
    tab = np.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], axis=-1)
    rgb = np.take_along_axis(tab, _SECTOR_RGB[sector], axis=-1)
    rgb = np.where((s == 0)[..., None], v[..., None], rgb)
    return np.clip(np.rint(rgb * np.float32(255.0)), 0, 255).astype(np.uint8)


def shift_hsv(img: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """wseg ``RandomHSV`` with a given shift: hue ``(h + dh) mod 180``, saturation and value clipped to
    0..255, in OpenCV's 8-bit HSV space.

    Shape:
        ``(H, W, 3)`` uint8 RGB -> ``(H, W, 3)`` uint8 RGB.
    """
    hsv = rgb_to_hsv_cv(img).astype(np.int64)
    dh, ds, dv = (int(x) for x in shift)
    hsv[..., 0] = (hsv[..., 0] + dh) % HSV_HUE_RANGE
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + dv, 0, 255)
    return hsv_to_rgb_cv(hsv.astype(np.uint8))


#: ColorJitter's four operations, in the order of its arguments.
_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _jitter_op(img: Image.Image, name: str, factor: float) -> Image.Image:
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(factor)
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(factor)
    if name == "saturation":
        return ImageEnhance.Color(img).enhance(factor)
    return _adjust_hue(img, factor)


def _resize_float(arr: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a float map in PIL's 32-bit float mode; ``size`` is (W, H)."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))  # PIL mode "F"
    return np.asarray(img.resize(size, resample=resample), dtype=np.float32)


def _crop_offsets(size: int, crop: int, rng: np.random.Generator, *, pad_random: bool) -> tuple[int, int]:
    """(offset into the output, offset into the input) along one axis."""
    space = size - crop
    if space >= 0:
        return 0, int(rng.integers(space + 1))
    # Smaller than the crop: EPS places the image at a random offset, DeepLab at the top-left.
    return (int(rng.integers(-space + 1)) if pad_random else 0), 0


class TrainTransform:
    """Random resize, flip, colour jitter, normalise and crop, applied jointly.

    Args:
        crop_size: Side of the square output crop; smaller inputs are padded (image/saliency 0,
            mask 255).
        resize_long: ``(min, max)`` long-side length (inclusive) drawn per sample (EPS); bicubic for
            image and saliency, nearest for masks.
        scales: Scale factors to choose from instead (DeepLab); output size ``int(side * s)``.
        scale_range: ``(low, high)``: a factor drawn uniformly from the range instead, output size
            ``round(side * s)``, bicubic for the image, nearest for masks (wseg ``RandomScale``).
        hflip: Flip horizontally with probability 0.5.
        jitter: Colour jitter strengths (brightness, contrast, saturation, hue) on the image only, as
            ``torchvision.transforms.ColorJitter`` (factors in ``[max(0, 1 - b), 1 + b]``, hue shift in
            ``[-h, h]``, the four applied in random order).
        hsv: Largest (hue, saturation, value) shifts in OpenCV's 8-bit HSV space (:func:`shift_hsv`),
            each drawn as an integer in ``[-v, v]`` and applied to the image before any resizing (wseg
            ``RandomHSV``, which runs first).

    A crop larger than the image is padded; the image sits at a random offset unless ``scales`` is
    given (then at the top-left, as deeplab-pytorch).

    Call with a NumPy sample (``image`` uint8 (H, W, 3); optional ``saliency`` float (H, W) and
    ``mask`` integer (H, W)) and a generator; returns ``image`` float (3, s, s), ``saliency`` float
    (1, s, s), ``mask`` int64 (s, s) with ``s = crop_size``.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        resize_long: tuple[int, int] | None = None,
        scales: Sequence[float] | None = None,
        scale_range: tuple[float, float] | None = None,
        hflip: bool = True,
        jitter: tuple[float, float, float, float] | None = None,
        hsv: tuple[int, int, int] | None = None,
    ) -> None:
        if not isinstance(crop_size, int) or crop_size <= 0:
            raise ValueError(f"crop_size: expected a positive int, got {crop_size!r}")
        if sum(x is not None for x in (resize_long, scales, scale_range)) > 1:
            raise ValueError("resize_long, scales and scale_range are alternatives; give at most one")
        if scale_range is not None:
            low, high = (float(v) for v in scale_range)
            if not 0 < low <= high:
                raise ValueError(f"scale_range: expected (low, high) with 0 < low <= high, got {scale_range!r}")
            scale_range = (low, high)
        if hsv is not None:
            hsv = tuple(int(v) for v in hsv)  # type: ignore[assignment]
            if len(hsv) != 3 or min(hsv) < 0:
                raise ValueError(f"hsv: expected (hue, saturation, value) shifts >= 0, got {hsv!r}")
        if resize_long is not None:
            lo, hi = (int(v) for v in resize_long)
            if not 0 < lo <= hi:
                raise ValueError(f"resize_long: expected (min, max) with 0 < min <= max, got {resize_long!r}")
            resize_long = (lo, hi)
        if scales is not None:
            scales = tuple(float(s) for s in scales)
            if not scales or min(scales) <= 0:
                raise ValueError(f"scales: expected positive scale factors, got {scales!r}")
        if jitter is not None:
            jitter = tuple(float(j) for j in jitter)  # type: ignore[assignment]
            if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
                raise ValueError("jitter: expected (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                                 f"got {jitter!r}")
        self.crop_size = crop_size
        self.resize_long = resize_long
        self.scales = scales
        self.scale_range = scale_range
        self.hflip = hflip
        self.jitter = jitter
        self.hsv = hsv

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, resize_long={self.resize_long}, "
                f"scales={self.scales}, scale_range={self.scale_range}, hflip={self.hflip}, jitter={self.jitter}, "
                f"hsv={self.hsv})")

    def _target_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int] | None:
        """(W, H) to resize to, or None."""
        if self.resize_long is not None:
            target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
            # Reference RandomResizeLong: the long side becomes `target`, the other is rounded.
            if w < h:
                return round(w * target / h), target
            return target, round(h * target / w)
        if self.scales is not None:
            s = self.scales[int(rng.integers(len(self.scales)))]
            return int(w * s), int(h * s)
        if self.scale_range is not None:
            s = float(rng.uniform(*self.scale_range))
            return round(w * s), round(h * s)
        return None

    def _color_jitter(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """``torchvision.transforms.ColorJitter`` on a PIL image (the same PIL operations its functional
        API applies), with factors drawn from ``rng``."""
        assert self.jitter is not None
        ops: list[tuple[str, float]] = []
        for name, strength in zip(_JITTER_OPS, self.jitter, strict=True):
            if strength > 0:
                low, high = (-strength, strength) if name == "hue" else (max(0.0, 1 - strength), 1 + strength)
                ops.append((name, float(rng.uniform(low, high))))
        for i in rng.permutation(len(ops)):
            img = _jitter_op(img, *ops[i])
        return img

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        img_arr, sal, mask = _check_sample(sample)
        img = Image.fromarray(np.ascontiguousarray(img_arr))
        h, w = img_arr.shape[:2]

        # Geometry first (size, flip, crop window), then colour: the same generator gives the same
        # geometry whether or not jitter or the HSV shift is on.
        size = self._target_size(h, w, rng)
        flip = self.hflip and rng.random() < FLIP_PROB
        if size is not None and min(size) < 1:
            raise DataError(f"random resize of a {w}x{h} image to {size[0]}x{size[1]} leaves no pixels")
        out_w, out_h = size if size is not None else (w, h)
        window = self._crop_window(out_h, out_w, rng)
        if self.hsv is not None:  # on the image as loaded, before the resize (wseg order)
            shift = tuple(int(rng.integers(-m, m + 1)) for m in self.hsv)
            img = Image.fromarray(shift_hsv(img_arr, shift))  # type: ignore[arg-type]
        if size is not None and size != (w, h):
            resample = (RESIZE_LONG_RESAMPLE if self.resize_long is not None else
                        SCALE_RANGE_RESAMPLE if self.scale_range is not None else SCALE_RESAMPLE)
            img = img.resize(size, resample=resample)
            if sal is not None:
                # Bicubic overshoots; the reference resizes an 8-bit map, which saturates at 0 and 1.
                sal = np.clip(_resize_float(sal, size, resample), 0.0, 1.0)
            if mask is not None:
                mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize(
                    size, resample=Image.Resampling.NEAREST))

        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            sal = None if sal is None else sal[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if self.jitter is not None:
            img = self._color_jitter(img, rng)
        return self._crop(normalize_image(np.asarray(img)), sal, mask, window)

    def _crop_window(self, h: int, w: int, rng: np.random.Generator) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(output slices, input slices) of the crop of an ``h`` x ``w`` image."""
        cs = self.crop_size
        pad_random = self.scales is None
        out_x, in_x = _crop_offsets(w, cs, rng, pad_random=pad_random)
        out_y, in_y = _crop_offsets(h, cs, rng, pad_random=pad_random)
        ch, cw = min(cs, h), min(cs, w)
        dst = (slice(out_y, out_y + ch), slice(out_x, out_x + cw))
        src = (slice(in_y, in_y + ch), slice(in_x, in_x + cw))
        return dst, src

    def _crop(
        self,
        image: torch.Tensor,
        sal: np.ndarray | None,
        mask: np.ndarray | None,
        window: tuple[tuple[slice, slice], tuple[slice, slice]],
    ) -> dict[str, torch.Tensor]:
        cs = self.crop_size
        dst, src = window
        img_out = torch.full((3, cs, cs), IMAGE_PAD, dtype=torch.float32)
        img_out[:, dst[0], dst[1]] = image[:, src[0], src[1]]
        sal_out = mask_out = None
        if sal is not None:
            sal_out = np.full((cs, cs), SALIENCY_PAD, dtype=np.float32)
            sal_out[dst] = sal[src]
        if mask is not None:
            mask_out = np.full((cs, cs), MASK_PAD, dtype=np.uint8)
            mask_out[dst] = mask[src]
        return _pack(img_out, sal_out, mask_out)
