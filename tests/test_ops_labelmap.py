"""score_argmax (wsss_tune.ops.labelmap): argmax with ties to the first index, as every mask decision uses."""

from __future__ import annotations

import torch

from wsss_tune.ops.labelmap import score_argmax


def test_ties_go_to_the_first_index():
    scores = torch.tensor([[[0.5, 0.2], [0.1, 0.7]],
                           [[0.5, 0.9], [0.3, 0.7]],
                           [[0.4, 0.9], [0.3, 0.7]]])  # (K=3, 2, 2): ties at (0,0), (0,1), (1,1)
    assert score_argmax(scores, dim=0).tolist() == [[0, 1], [1, 0]]


def test_equals_argmax_on_random_maps_with_ties():
    gen = torch.Generator().manual_seed(0)
    for shape, dim in [((6, 17, 23), 0), ((2, 21, 9, 11), 1)]:
        scores = torch.randint(0, 4, shape, generator=gen).float()  # many ties
        out = score_argmax(scores, dim=dim)
        assert out.dtype == torch.long
        assert torch.equal(out, scores.argmax(dim=dim))
