"""Radius-γ neighbour pairs of AffinityNet, written once for labels, model and random walk.

A pixel pair is stored once, at its "from" pixel, for each of the D offsets ``(dy, dx)`` of
:func:`neighbor_offsets`; the offsets cover one half-plane (``dy > 0``, or ``dy == 0`` and
``dx > 0``), so the other direction of every pair is implied by symmetry.

Reference geometry (PSA ``tool/pyutils.py::get_indices_of_pairs``,
``voc12/data.py::ExtractAffinityLabelInRadius``, ``infer_aff.py::get_indices_in_radius``): with
``f = radius - 1`` the "from" pixels of an ``h x w`` map are rows ``0 .. h-f-1`` and columns
``f .. w-f-1`` (a window of ``(h - f) x (w - 2f)``), the window that every offset keeps inside the
map. Pixels outside it only take part as the "to" end of a pair, so the bottom rows and the left and
right columns get fewer neighbours, and a few corner pixels none at all.

``pad_border=True`` pads the map by ``f`` rows at the bottom and ``f`` columns left and right first,
so that the "from" window is the whole map; pairs whose "to" pixel falls in the padding do not exist
(see :func:`pair_valid`). It fixes the border quirk and is off by default.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_RADIUS",
    "PairCrop",
    "neighbor_offsets",
    "pair_crop",
    "border_padding",
    "pair_views",
    "pair_valid",
    "pair_indices",
]

#: AffinityNet neighbourhood radius γ at stride 8 (Ahn & Kwak, CVPR 2018; PSA ``radius=5``).
DEFAULT_RADIUS = 5


def _check_radius(radius: int) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 2:
        raise ValueError(f"radius: expected an int >= 2 (a pair needs |offset| < radius), got {radius!r}")
    return radius


@cache
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    out = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                out.append((dy, dx))
    return tuple(out)


def neighbor_offsets(radius: int = DEFAULT_RADIUS) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` pair offsets within ``radius``, in the reference order.

    First ``(0, 1) .. (0, radius-1)``, then for ``dy = 1 .. radius-1`` every ``dx`` with
    ``|dx| < radius`` and ``dx² + dy² < radius²``, ``dx`` ascending: 34 offsets for radius 5.
    """
    return list(_offsets(_check_radius(radius)))


class PairCrop(NamedTuple):
    """The "from" window ``[top : top+height, left : left+width]`` of a (possibly padded) map."""

    top: int
    left: int
    height: int
    width: int

    def from_slices(self) -> tuple[slice, slice]:
        """Row and column slices of the "from" window."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def to_slices(self, dy: int, dx: int) -> tuple[slice, slice]:
        """Row and column slices of the "to" window for offset ``(dy, dx)``."""
        top, left = self.top + dy, self.left + dx
        return slice(top, top + self.height), slice(left, left + self.width)


def pair_crop(h: int, w: int, radius: int = DEFAULT_RADIUS) -> PairCrop:
    """The reference "from" window of an ``h x w`` map: rows ``0..h-f-1``, columns ``f..w-f-1``.

    ``f = radius - 1``. For a map padded with :func:`border_padding`, pass the padded size.

    Raises:
        ValueError: if the map is too small to hold one pair (``h < radius`` or ``w < 2·radius - 1``).
    """
    f = _check_radius(radius) - 1
    if h - f < 1 or w - 2 * f < 1:
        raise ValueError(f"map of {h}x{w} is too small for radius {radius}: need h >= {f + 1} and "
                         f"w >= {2 * f + 1} (pad_border=True accepts any size)")
    return PairCrop(top=0, left=f, height=h - f, width=w - 2 * f)


def border_padding(radius: int = DEFAULT_RADIUS) -> tuple[int, int, int, int]:
    """``F.pad`` widths ``(left, right, top, bottom)`` that make the "from" window the whole map."""
    f = _check_radius(radius) - 1
    return (f, f, 0, f)


def pair_views(
    x: torch.Tensor, radius: int = DEFAULT_RADIUS, *, pad_border: bool = False, fill: float = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Views of ``x`` at the "from" pixels and at the "to" pixels of each offset.

    With ``pad_border`` the map is first padded (a copy) with ``fill`` by :func:`border_padding`.

    Shape:
        x: ``(..., h, w)``.
        Returns: the "from" view ``(..., h', w')`` and D "to" views ``(..., h', w')``, with
        ``(h', w') = (h - f, w - 2f)`` by default and ``(h, w)`` with ``pad_border``.
    """
    if x.dim() < 2:
        raise ValueError(f"pair_views: expected a tensor (..., h, w), got shape {tuple(x.shape)}")
    if pad_border:
        # Constant padding works on any dtype (bool masks, integer labels and indices included).
        x = F.pad(x, border_padding(radius), mode="constant", value=fill)
    crop = pair_crop(x.shape[-2], x.shape[-1], radius)
    rows, cols = crop.from_slices()
    src = x[..., rows, cols]
    dst = []
    for dy, dx in _offsets(radius):
        rows, cols = crop.to_slices(dy, dx)
        dst.append(x[..., rows, cols])
    return src, dst


def pair_valid(h: int, w: int, radius: int = DEFAULT_RADIUS, *, pad_border: bool = False,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Which stored pairs exist: all of them by default, those inside the map with ``pad_border``.

    Shape:
        Returns: bool ``(D, h', w')`` (see :func:`pair_views`).
    """
    ones = torch.ones(h, w, dtype=torch.bool, device=device)
    _, dst = pair_views(ones, radius, pad_border=pad_border, fill=False)
    return torch.stack(dst)


def pair_indices(h: int, w: int, radius: int = DEFAULT_RADIUS, *, pad_border: bool = False,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row-major) pixel indices of the pairs, as the reference's ``get_indices_of_pairs``.

    ``to_idx[d].reshape(h', w')`` lines up with ``aff[d]`` of :func:`affinity_from_features`. With
    ``pad_border``, a pair whose "to" pixel lies outside the map has ``to_idx == -1``.

    Shape:
        Returns: ``from_idx`` long ``(P,)`` and ``to_idx`` long ``(D, P)``, ``P = h'·w'``.
    """
    idx = torch.arange(h * w, dtype=torch.long, device=device).reshape(h, w)
    src, dst = pair_views(idx, radius, pad_border=pad_border, fill=-1)
    return src.reshape(-1), torch.stack(dst).reshape(len(dst), -1)
