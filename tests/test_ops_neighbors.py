"""Neighbour offsets and pair geometry of AffinityNet (wsss_tune.ops.neighbors)."""

from __future__ import annotations

import pytest
import torch

from wsss_tune.ops.neighbors import (
    DEFAULT_RADIUS,
    PairCrop,
    border_padding,
    neighbor_offsets,
    pair_crop,
    pair_indices,
    pair_valid,
    pair_views,
)


def test_radius5_offsets_are_the_reference_list():
    """(0,1..4); dy=1 and dy=2: dx=-4..4 (dx²+dy² <= 16+4 < 25); dy=3: |dx|<=3 (9+16=25 is out);
    dy=4: |dx|<=2 (16+9=25 is out). 4 + 9 + 9 + 7 + 5 = 34 directions."""
    expected = (
        [(0, 1), (0, 2), (0, 3), (0, 4)]
        + [(1, dx) for dx in range(-4, 5)]
        + [(2, dx) for dx in range(-4, 5)]
        + [(3, dx) for dx in range(-3, 4)]
        + [(4, dx) for dx in range(-2, 3)]
    )
    assert DEFAULT_RADIUS == 5
    assert neighbor_offsets() == expected
    assert len(expected) == 34


def test_radius2_offsets_are_the_half_8_neighbourhood():
    """radius 2: (0,1), then dy=1 with |dx|<2 and 1+dx²<4: dx=-1,0,1."""
    assert neighbor_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]


def test_offsets_are_a_copy():
    offsets = neighbor_offsets(3)
    offsets.append((9, 9))
    assert (9, 9) not in neighbor_offsets(3)


def test_pair_crop_and_pair_count_at_56():
    """56x56, r=5, f=4: "from" rows 0..51 (52), columns 4..51 (48); 34 * 52 * 48 = 84,864 pairs."""
    crop = pair_crop(56, 56, 5)
    assert crop == PairCrop(top=0, left=4, height=52, width=48)
    src, dst = pair_indices(56, 56, 5)
    assert src.shape == (52 * 48,)
    assert dst.shape == (34, 52 * 48)
    assert dst.numel() == 84_864


def test_pair_indices_small_map_by_hand():
    """3x4 map (indices 0..11 row-major), r=2, f=1: "from" = rows 0..1, columns 1..2 = [1, 2, 5, 6].
    (0,1): +1 -> [2,3,6,7]; (1,-1): +3 -> [4,5,8,9]; (1,0): +4 -> [5,6,9,10]; (1,1): +5 -> [6,7,10,11]."""
    src, dst = pair_indices(3, 4, 2)
    assert src.tolist() == [1, 2, 5, 6]
    assert dst.tolist() == [[2, 3, 6, 7], [4, 5, 8, 9], [5, 6, 9, 10], [6, 7, 10, 11]]


def test_pair_indices_padded_by_hand():
    """2x2 map [[0,1],[2,3]], r=2, pad_border: every pixel is a "from" pixel; -1 = outside.
    (0,1): 0->1, 1->out, 2->3, 3->out; (1,-1): 0->out, 1->2, 2,3->out; (1,0): 0->2, 1->3;
    (1,1): 0->3 only."""
    src, dst = pair_indices(2, 2, 2, pad_border=True)
    assert src.tolist() == [0, 1, 2, 3]
    assert dst.tolist() == [[1, -1, 3, -1], [-1, 2, -1, -1], [2, 3, -1, -1], [3, -1, -1, -1]]
    assert pair_valid(2, 2, 2, pad_border=True).reshape(4, 4).tolist() == (dst >= 0).tolist()


def _all_pairs(h: int, w: int, radius: int) -> set[frozenset[int]]:
    out = set()
    for y in range(h):
        for x in range(w):
            for y2 in range(h):
                for x2 in range(w):
                    d2 = (y - y2) ** 2 + (x - x2) ** 2
                    if 0 < d2 < radius * radius:
                        out.add(frozenset((y * w + x, y2 * w + x2)))
    return out


@pytest.mark.parametrize("radius", [2, 3, 5])
def test_padded_geometry_holds_every_pair_within_radius_once(radius):
    """Against brute force: every unordered pixel pair at distance < radius, each stored once."""
    h, w = 7, 9
    src, dst = pair_indices(h, w, radius, pad_border=True)
    keep = dst >= 0
    pairs = [frozenset((int(a), int(b))) for a, b in zip(src.expand_as(dst)[keep], dst[keep], strict=True)]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == _all_pairs(h, w, radius)


def test_reference_geometry_is_a_subset_without_duplicates():
    h, w, radius = 7, 11, 3
    src, dst = pair_indices(h, w, radius)
    pairs = [frozenset((int(a), int(b))) for a, b in zip(src.expand_as(dst).flatten(), dst.flatten(), strict=True)]
    assert len(pairs) == len(set(pairs)) == len(neighbor_offsets(radius)) * (h - 2) * (w - 4)
    assert set(pairs) < _all_pairs(h, w, radius)
    assert bool(pair_valid(h, w, radius).all())


def test_pair_views_line_up_with_indices_on_batched_input():
    x = torch.arange(2 * 6 * 10).reshape(2, 6, 10)
    src, dst = pair_views(x, 3)
    idx_src, idx_dst = pair_indices(6, 10, 3)
    assert src.shape == (2, 4, 6)
    assert torch.equal(src[1].flatten(), x[1].flatten()[idx_src])
    for d, view in enumerate(dst):
        assert torch.equal(view[1].flatten(), x[1].flatten()[idx_dst[d]])


def test_border_padding_and_errors():
    assert border_padding(5) == (4, 4, 0, 4)
    with pytest.raises(ValueError, match="too small for radius 5"):
        pair_crop(4, 20, 5)
    with pytest.raises(ValueError, match="radius"):
        neighbor_offsets(1)
    # Padding makes any size work.
    src, dst = pair_views(torch.zeros(1, 1), 5, pad_border=True)
    assert src.shape == (1, 1) and len(dst) == 34
