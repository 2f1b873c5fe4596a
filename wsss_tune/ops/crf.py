"""Fully connected CRF post-processing (Kraehenbuehl & Koltun) of segmentation probabilities.

Thin wrapper over the optional ``pydensecrf2`` package (``pip install 'wsss-tune[crf]'``), imported
only when :func:`dense_crf` runs. Defaults are the DeepLab v2 ResNet-101 values that the reference
(deeplab-pytorch ``configs/voc12.yaml``, EPS README) uses: 10 mean-field iterations, a smoothness
Gaussian of std 1 px and weight 3, and an appearance kernel of std 67 px / 3 RGB levels and weight 4,
applied to the raw RGB image.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "CRF_ITERATIONS",
    "CRF_POS_XY_STD",
    "CRF_POS_W",
    "CRF_BI_XY_STD",
    "CRF_BI_RGB_STD",
    "CRF_BI_W",
    "UNARY_CLIP",
    "dense_crf",
]

# Reference DeepLab v2 CRF settings (deeplab-pytorch configs/voc12.yaml ``CRF``; EPS README).
#: Mean-field iterations (``ITER_MAX``).
CRF_ITERATIONS = 10
#: Spatial std (pixels) of the smoothness kernel (``POS_XY_STD``).
CRF_POS_XY_STD = 1.0
#: Weight of the smoothness kernel (``POS_W``).
CRF_POS_W = 3.0
#: Spatial std (pixels) of the appearance kernel (``BI_XY_STD``).
CRF_BI_XY_STD = 67.0
#: Colour std (RGB levels) of the appearance kernel (``BI_RGB_STD``).
CRF_BI_RGB_STD = 3.0
#: Weight of the appearance kernel (``BI_W``).
CRF_BI_W = 4.0
#: Probabilities are clipped to at least this before ``-log`` (``pydensecrf.utils.unary_from_softmax``).
UNARY_CLIP = 1e-5

_INSTALL_HINT = ("dense_crf needs the optional package 'pydensecrf2' (module 'pydensecrf'): "
                 "install it with `pip install 'wsss-tune[crf]'` or `pip install pydensecrf2` "
                 "(it compiles C++ code, so a compiler and Cython must be available)")


def _import_densecrf():  # noqa: ANN202 - returns the extension module
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise ModuleNotFoundError(_INSTALL_HINT) from exc
    return dcrf


def dense_crf(
    image: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    *,
    iterations: int = CRF_ITERATIONS,
    pos_xy_std: float = CRF_POS_XY_STD,
    pos_w: float = CRF_POS_W,
    bi_xy_std: float = CRF_BI_XY_STD,
    bi_rgb_std: float = CRF_BI_RGB_STD,
    bi_w: float = CRF_BI_W,
) -> np.ndarray | torch.Tensor:
    """Refine class probabilities with a dense CRF on the image.

    Args:
        image: Raw RGB image, uint8 (not normalised).
        probs: Class probabilities (softmax over K), at the image resolution.
        iterations: Mean-field iterations.
        pos_xy_std: Spatial std of the smoothness (Gaussian) kernel.
        pos_w: Weight of the smoothness kernel.
        bi_xy_std: Spatial std of the appearance (bilateral) kernel.
        bi_rgb_std: Colour std of the appearance kernel.
        bi_w: Weight of the appearance kernel.

    Returns:
        Refined probabilities, float32; a NumPy array, or a tensor on ``probs``' device when
        ``probs`` is a tensor (the CRF itself runs on the CPU).

    Shape:
        image: (H, W, 3); probs: (K, H, W) -> (K, H, W).
    """
    device = probs.device if isinstance(probs, torch.Tensor) else None
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if isinstance(probs, torch.Tensor):
        p = probs.detach().float().cpu().numpy()
    else:
        p = np.asarray(probs, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be uint8 of shape (H, W, 3), got {img.dtype} {img.shape}")
    if p.ndim != 3 or p.shape[1:] != img.shape[:2]:
        raise ValueError(f"dense_crf: probs must be (K, H, W) with (H, W) = image size {img.shape[:2]}, "
                         f"got {p.shape}")
    if iterations < 0:
        raise ValueError(f"dense_crf: iterations must be >= 0, got {iterations}")
    dcrf = _import_densecrf()
    num_classes, height, width = p.shape
    unary = -np.log(np.clip(p, UNARY_CLIP, 1.0)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(img), compat=bi_w)
    q = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(num_classes, height, width)
    return torch.from_numpy(q).to(device) if device is not None else q
