"""Label masks on disk: single-channel 8-bit palette PNGs, the format of VOC's SegmentationClass(Aug)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from wsss_tune.data.palette import voc_palette
from wsss_tune.utils.io import atomic_write_bytes

__all__ = ["MASK_MODES", "encode_mask_png", "save_mask_png", "read_mask_png"]

#: PIL modes a mask PNG may have: palette indices (VOC's own files) or plain 8-bit grey (SBD "aug").
MASK_MODES = ("P", "L")


def _error(message: str, *, file: str | Path, kind: str) -> Exception:
    # ``voc`` imports this module, so its error class is imported on use to avoid an import cycle.
    from wsss_tune.data.voc import DataError

    return DataError(message, file=str(file), kind=kind)


def encode_mask_png(mask: np.ndarray, *, where: str | Path = "mask") -> bytes:
    """PNG bytes of a label mask: 8-bit palette image with the VOC colours.

    Args:
        mask: Integer labels in ``0..255`` (0 background, 1..C objects, 255 ignore).
        where: Name used in error messages (the destination file).

    Shape:
        ``mask``: ``(H, W)``.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise _error(f"{where}: expected an integer (H, W) mask, got dtype {arr.dtype} shape {arr.shape}",
                     file=where, kind="bad_mask_values")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise _error(f"{where}: mask values must lie in 0..255 to fit an 8-bit PNG, "
                     f"got {int(arr.min())}..{int(arr.max())}", file=where, kind="bad_mask_values")
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    img.putpalette(voc_palette().reshape(-1).tolist())  # turns the grey image into mode "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """Write a label mask as a VOC-coloured palette PNG, atomically (see :func:`encode_mask_png`).

    Shape:
        ``mask``: ``(H, W)`` integer labels in ``0..255``.
    """
    atomic_write_bytes(path, encode_mask_png(mask, where=path))


def read_mask_png(path: str | Path) -> np.ndarray:
    """Read a mask PNG (palette or grey) as raw label values (palette indices, not colours).

    Raises:
        DataError: the file is missing, unreadable, or not a single-channel 8-bit image.

    Shape:
        returns ``(H, W)`` ``uint8``.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(f"{path}: mask file not found", file=path, kind="missing_file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img) if mode in MASK_MODES else None
    except (OSError, ValueError, SyntaxError) as exc:
        raise _error(f"{path}: cannot read mask image ({exc})", file=path, kind="unreadable") from None
    if arr is None:
        raise _error(f"{path}: mask has PIL mode {mode!r}; expected a single-channel 8-bit PNG "
                     f"(mode {' or '.join(MASK_MODES)}) holding class indices", file=path, kind="bad_mode")
    return arr.astype(np.uint8, copy=False)
