"""The PASCAL VOC colour map, so that label masks open in image viewers with the usual colours."""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["voc_palette", "colorize"]

#: Entries of a palette PNG (8-bit indices).
PALETTE_SIZE = 256
#: Bits spread over R, G, B per label index (the VOC development kit's ``labelcolormap``).
_BITS_PER_INDEX = 8


@functools.lru_cache(maxsize=1)
def _palette() -> np.ndarray:
    index = np.arange(PALETTE_SIZE)
    cmap = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    # VOC devkit rule: bit 3k, 3k+1, 3k+2 of the index set bit (7 - k) of R, G, B respectively.
    for k in range(_BITS_PER_INDEX):
        for channel in range(3):
            bit = (index >> (3 * k + channel)) & 1
            cmap[:, channel] |= (bit << (7 - k)).astype(np.uint8)
    cmap.setflags(write=False)
    return cmap


def voc_palette() -> np.ndarray:
    """The standard VOC colour map: index 0 black, 1 (aeroplane) dark red, ..., 255 (ignore) cream.

    Returns:
        A fresh ``uint8`` array.

    Shape:
        ``(256, 3)`` RGB rows indexed by label value.
    """
    return _palette().copy()


def colorize(mask: np.ndarray) -> np.ndarray:
    """Colour a label mask with :func:`voc_palette`.

    Args:
        mask: Integer label mask with values in ``0..255``.

    Shape:
        ``mask``: ``(H, W)``; returns ``(H, W, 3)`` ``uint8``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"colorize: expected an integer (H, W) mask, got dtype {mask.dtype} shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() >= PALETTE_SIZE):
        raise ValueError(f"colorize: mask values must lie in 0..{PALETTE_SIZE - 1}, "
                         f"got {mask.min()}..{mask.max()}")
    return _palette()[mask]
