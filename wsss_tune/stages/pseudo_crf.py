"""CRF-refined training masks for DeepLab (``deeplab.pseudo_crf``): the ``pseudo_crf`` artifact.

The EPS DeepLab recipe trains on ``crf_5_8``: a dense CRF run on the EPS CAMs (wseg
``contrast_infer.py --crf_t 5 --crf_alpha 8``, ``_crf_with_alpha`` and ``util/imutils.py
crf_inference``): the labelled classes' max-normalised maps plus a background score
``(1 - max CAM) ** alpha``, taken as they are (no normalisation) into the unary ``-log(max(p, 1e-5))``,
a smoothness kernel (std 3 px, weight 3) and an appearance kernel (80 px, 13 RGB levels, weight 10), 5
mean-field iterations, then the argmax (wseg ``pseudo_label_gen.py``). One image's path:

* ``mask_source: eps`` - ``<eps>/cams/<id>.npz`` (:func:`~wsss_tune.stages.eps.load_cams`) ->
  :func:`refine_with_cams` -> ``<out>/masks/<id>.png``: the reference.
* any other source (the random walk's masks, the ground truth, a folder) - the mask alone ->
  :func:`refine_labels` (its labels scored by :func:`~wsss_tune.ops.label_scores.label_scores`, our
  extension) -> ``<out>/masks/<id>.png``; ignored pixels stay ignored.

Every parameter is a ``deeplab.pseudo_crf_*`` field. The CRF runs on the CPU and needs the optional
``pydensecrf2`` package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_tune.config import DeepLabConfig
from wsss_tune.data import VOCLayout, save_mask_png
from wsss_tune.ops.affinity import power_background
from wsss_tune.ops.label_scores import label_scores
from wsss_tune.ops.labelmap import score_argmax
from wsss_tune.ops.metric import IGNORE_INDEX

__all__ = ["MASK_DIR", "crf_kwargs", "require_crf", "refine_with_cams", "refine_labels", "refine_masks"]

#: Sub-folder of the artifact holding the refined masks (``<id>.png``, uint8 0..C, 255 ignore).
MASK_DIR = "masks"


def crf_kwargs(d: DeepLabConfig) -> dict[str, Any]:
    """:func:`~wsss_tune.ops.crf.dense_crf`'s parameters from the ``deeplab.pseudo_crf_*`` fields."""
    return {"iterations": d.pseudo_crf_iterations, "pos_xy_std": d.pseudo_crf_pos_xy_std, "pos_w": d.pseudo_crf_pos_w,
            "bi_xy_std": d.pseudo_crf_bi_xy_std, "bi_rgb_std": d.pseudo_crf_bi_rgb_std, "bi_w": d.pseudo_crf_bi_w}


def require_crf() -> None:
    """Raise a clear error when the optional dense CRF package is missing."""
    if importlib.util.find_spec("pydensecrf") is None:
        raise ModuleNotFoundError("deeplab.pseudo_crf is true but the optional dense CRF package is not installed: "
                                  "pip install 'wsss-tune[crf]' (pydensecrf2), or set deeplab.pseudo_crf=false")


def _crf_argmax(image: np.ndarray, scores: torch.Tensor, keys: torch.Tensor, d: DeepLabConfig) -> np.ndarray:
    from wsss_tune.ops.crf import dense_crf

    if keys.numel() == 1:  # background only: nothing for the CRF to decide
        return np.zeros(image.shape[:2], dtype=np.uint8)
    refined = torch.as_tensor(dense_crf(image, scores.float().cpu(), **crf_kwargs(d)))
    return keys[score_argmax(refined, dim=0)].to(torch.uint8).numpy()


def refine_with_cams(image: np.ndarray, cams: np.ndarray, keys: np.ndarray, d: DeepLabConfig) -> np.ndarray:
    """The reference's CRF-refined label map from one image's EPS CAMs (module docstring).

    Args:
        image: Raw RGB image.
        cams: The CAM file's maps: labelled classes' max-normalised maps, the learned background last
            (not used, as in the reference).
        keys: The CAM file's class value of each map (0 for the background map).
        d: The DeepLab section (``pseudo_crf_alpha`` and the kernel fields).

    Shape:
        image: (H, W, 3) uint8; cams: (K, H, W); keys: (K,) -> (H, W) uint8
    """
    fg = torch.from_numpy(np.asarray(cams[:-1], dtype=np.float32))
    scores = torch.cat([power_background(fg, d.pseudo_crf_alpha), fg])
    plane_keys = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(np.asarray(keys[:-1])).long()])
    return _crf_argmax(image, scores, plane_keys, d)


def refine_labels(image: np.ndarray, mask: np.ndarray, d: DeepLabConfig) -> np.ndarray:
    """A CRF-refined label map from a mask without scores (``pseudo_crf_label_prob`` on its labels);
    pixels it ignores stay ignored.

    Shape:
        image: (H, W, 3) uint8; mask: (H, W) integer -> (H, W) uint8
    """
    m = torch.from_numpy(np.asarray(mask).astype(np.int64))
    scores, keys = label_scores(m, prob=d.pseudo_crf_label_prob)
    out = _crf_argmax(image, scores, keys, d)
    out[np.asarray(mask) == IGNORE_INDEX] = IGNORE_INDEX
    return out


def refine_masks(d: DeepLabConfig, layout: VOCLayout, ids: Sequence[str], *, mask_dir: Path, out_dir: Path,
                 cam_dir: Path | None = None) -> Path:
    """CRF-refine the masks of ``ids`` into ``out_dir/masks/<id>.png`` (each written atomically; ids
    already there are skipped). With ``cam_dir`` (the EPS artifact's CAMs) :func:`refine_with_cams`,
    else :func:`refine_labels` on the masks of ``mask_dir``. Returns the mask folder.

    Raises:
        ModuleNotFoundError: no ``pydensecrf2``. FileNotFoundError: a CAM or mask file is missing.
        ValueError: an image and its CAMs or mask differ in size.
    """
    from wsss_tune.stages.eps import load_cams

    require_crf()
    out = Path(out_dir) / MASK_DIR
    out.mkdir(parents=True, exist_ok=True)
    for image_id in dict.fromkeys(ids):
        target = out / f"{image_id}.png"
        if target.is_file():
            continue
        image = layout.load_image(image_id)
        if cam_dir is not None:
            path = Path(cam_dir) / f"{image_id}.npz"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: CAM file not found (deeplab.pseudo_crf refines the EPS CAMs of "
                                        "every training image)")
            cams, keys = load_cams(path)
            if cams.shape[1:] != image.shape[:2]:
                raise ValueError(f"{path}: CAMs are {cams.shape[2]}x{cams.shape[1]} (WxH) but the image is "
                                 f"{image.shape[1]}x{image.shape[0]}")
            labels = refine_with_cams(image, cams, keys, d)
        else:
            mask = layout.load_mask(image_id, mask_dir)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{layout.mask_path(image_id, mask_dir)}: mask is {mask.shape[1]}x{mask.shape[0]} "
                                 f"(WxH) but the image is {image.shape[1]}x{image.shape[0]}")
            labels = refine_labels(image, mask, d)
        save_mask_png(target, labels)
    return out
