"""Random walk (wsss_tune.ops.random_walk): the local sparse walk against a dense float64 walk."""

from __future__ import annotations

import importlib

import pytest
import torch

from wsss_tune.ops.affinity import affinity_from_features
from wsss_tune.ops.random_walk import (
    dense_random_walk_reference,
    random_walk,
    rw_labels,
    rw_scores_from_cams,
)


def dense_walk_f64(aff: torch.Tensor, scores: torch.Tensor, *, radius: int, beta: float, t: int,
                   pad_border: bool = False) -> torch.Tensor:
    """An independent dense walk written from the definition, pixel pair by pixel pair.

    Reference geometry: "from" pixels are rows 0..h-radius, columns radius-1..w-radius, and aff[d] is
    stored at (y, x - (radius-1)); padded geometry: every pixel, stored at (y, x), pairs leaving the
    map dropped. A[i,j] = A[j,i] = a^beta for each pair, A[i,i] = 1; T = A / column sums;
    result = scores @ T^t (matrix_power, so any t).
    """
    k, h, w = scores.shape
    f = radius - 1
    offsets = [(0, dx) for dx in range(1, radius)] + [
        (dy, dx) for dy in range(1, radius) for dx in range(-f, radius) if dx * dx + dy * dy < radius * radius
    ]
    a = torch.eye(h * w, dtype=torch.float64)
    rows = range(h) if pad_border else range(h - f)
    cols = range(w) if pad_border else range(f, w - f)
    for y in rows:
        for x in cols:
            for d, (dy, dx) in enumerate(offsets):
                y2, x2 = y + dy, x + dx
                if not (0 <= y2 < h and 0 <= x2 < w):
                    continue
                val = float(aff[d, y, x if pad_border else x - f]) ** beta
                a[y * w + x, y2 * w + x2] = val
                a[y2 * w + x2, y * w + x] = val
    trans = a / a.sum(dim=0, keepdim=True)
    return (scores.double().reshape(k, -1) @ torch.linalg.matrix_power(trans, t)).reshape(k, h, w)


def _inputs(h: int, w: int, k: int, *, radius: int, pad_border: bool = False, seed: int = 0):
    """Affinities from smooth random features with two regions (so the walk has structure)."""
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(1, 4, h, w, generator=gen, dtype=torch.float64) * 0.3
    feat[:, :, :, w // 2:] += 1.0
    aff = affinity_from_features(feat, radius=radius, pad_border=pad_border)[0]
    scores = torch.rand(k, h, w, generator=gen, dtype=torch.float64)
    return aff, scores


@pytest.mark.parametrize("stencil", ["fused", "shifts"])
@pytest.mark.parametrize("radius,h,w", [(5, 8, 12), (3, 7, 9)])
@pytest.mark.parametrize("beta", [1.0, 4.0, 8.0])
def test_sparse_walk_matches_dense_f64_for_several_t_from_one_pass(radius, h, w, beta, stencil):
    """Every requested t (powers of two, odd, and t = 0) from one call equals scores @ T^t; labels agree."""
    aff, scores = _inputs(h, w, 3, radius=radius)
    t_values = (0, 1, 3, 8, 13, 64)
    out = random_walk(aff, scores, radius=radius, beta=beta, t_values=t_values, stencil=stencil)
    assert sorted(out) == list(t_values)
    for t in t_values:
        dense = dense_walk_f64(aff, scores, radius=radius, beta=beta, t=t)
        torch.testing.assert_close(out[t], dense, rtol=1e-10, atol=1e-12)
        assert torch.equal(out[t].argmax(0), dense.argmax(0))


@pytest.mark.parametrize("pad_border", [False, True])
def test_stencils_and_batching_give_the_same_walk(pad_border):
    a1, s1 = _inputs(8, 11, 2, radius=5, pad_border=pad_border, seed=1)
    a2, s2 = _inputs(8, 11, 2, radius=5, pad_border=pad_border, seed=2)
    kwargs = dict(beta=8.0, t_values=(5, 16), pad_border=pad_border)
    batched = {stencil: random_walk(torch.stack([a1, a2]), torch.stack([s1, s2]), stencil=stencil, **kwargs)
               for stencil in ("fused", "shifts", "unfold")}
    for t in (5, 16):
        single = [random_walk(a, s, **kwargs)[t] for a, s in ((a1, s1), (a2, s2))]
        for stencil, out in batched.items():
            torch.testing.assert_close(out[t], torch.stack(single), rtol=1e-10, atol=1e-12, msg=stencil)
        dense = dense_walk_f64(a2, s2, radius=5, beta=8.0, t=t, pad_border=pad_border)
        torch.testing.assert_close(single[1], dense, rtol=1e-10, atol=1e-12)


def test_dense_reference_matches_the_definition_and_the_sparse_walk_in_float32():
    """logt = 3 -> t = 8. In float64 the dense reference is the definition; in float32 (its default,
    like the reference) it is close to the sparse walk, with the same labels."""
    aff, scores = _inputs(9, 13, 3, radius=5, seed=3)
    ref64 = dense_random_walk_reference(aff, scores, beta=8.0, logt=3, dtype=None)
    torch.testing.assert_close(ref64, dense_walk_f64(aff, scores, radius=5, beta=8.0, t=8), rtol=1e-10, atol=1e-12)
    ref32 = dense_random_walk_reference(aff, scores, beta=8.0, logt=3)
    for stencil in ("fused", "shifts", "unfold"):
        sparse32 = random_walk(aff.float(), scores.float(), beta=8.0, logt=3, stencil=stencil)[8]
        assert ref32.dtype == sparse32.dtype == torch.float32
        torch.testing.assert_close(sparse32, ref32, rtol=1e-4, atol=1e-5)
        assert torch.equal(sparse32.argmax(0), ref32.argmax(0))


def test_default_logt_is_the_reference_t256():
    aff, scores = _inputs(6, 10, 2, radius=5, seed=4)
    out = random_walk(aff, scores)
    assert list(out) == [256]
    torch.testing.assert_close(out[256], dense_walk_f64(aff, scores, radius=5, beta=8.0, t=256),
                               rtol=1e-8, atol=1e-10)


def test_border_quirk_corner_keeps_its_score_and_padding_fixes_it():
    """Reference geometry at r=5: pixel (0,0) is no "from" pixel (column 0 < 4), and as a "to" pixel
    it would need dy = 0 and dx > 0 from column -dx < 0: it has no pair, so its column of T is the unit
    vector and it keeps its input score. Same for (h-1, w-1). With pad_border it has 12 neighbours
    (4 to the right, 8 below within the radius) and its score changes."""
    h, w = 8, 12
    aff, scores = _inputs(h, w, 2, radius=5, seed=5)
    out = random_walk(aff, scores, t_values=(1, 256))
    for t in (1, 256):
        torch.testing.assert_close(out[t][:, 0, 0], scores[:, 0, 0], rtol=0, atol=0)
        torch.testing.assert_close(out[t][:, h - 1, w - 1], scores[:, h - 1, w - 1], rtol=0, atol=0)
    aff_pad, _ = _inputs(h, w, 2, radius=5, pad_border=True, seed=5)
    padded = random_walk(aff_pad, scores, t_values=(1, 256), pad_border=True)
    assert (padded[1][:, 0, 0] - scores[:, 0, 0]).abs().max() > 1e-3
    assert (padded[256][:, 0, 0] - scores[:, 0, 0]).abs().max() > 1e-3


def test_walk_preserves_a_constant_field():
    """T's columns sum to 1, so x = c (a constant row) maps to c T = c: every score plane stays constant."""
    aff, _ = _inputs(7, 10, 1, radius=5, seed=6)
    ones = torch.full((2, 7, 10), 0.3, dtype=torch.float64)
    torch.testing.assert_close(random_walk(aff, ones, t_values=17)[17], ones, rtol=1e-12, atol=1e-14)


def test_random_walk_errors():
    aff, scores = _inputs(6, 10, 2, radius=5)
    with pytest.raises(ValueError, match="either t_values or logt"):
        random_walk(aff, scores, t_values=4, logt=2)
    with pytest.raises(ValueError, match=r"aff: expected \(\.\.\., 34, 2, 2\)"):
        random_walk(aff[:, :, :1], scores)
    with pytest.raises(ValueError, match="pad_border=True"):
        random_walk(aff, scores, pad_border=True)
    with pytest.raises(ValueError, match="beta"):
        random_walk(aff, scores, beta=0.0)
    with pytest.raises(ValueError, match="stencil: expected one of 'auto', 'fused'"):
        random_walk(aff, scores, stencil="dense")


def test_auto_stencil_is_the_fused_kernel_on_a_cpu_and_shifts_without_numba(monkeypatch):
    rw = importlib.import_module("wsss_tune.ops.random_walk")  # the package re-exports the function's name
    aff, scores = _inputs(6, 10, 2, radius=5, seed=7)
    calls: list[str] = []
    for name in ("_walk_fused", "_walk_shifts"):
        real = getattr(rw, name)
        monkeypatch.setattr(rw, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    random_walk(aff, scores, t_values=3)
    assert calls == ["_walk_fused"]
    monkeypatch.setattr(rw, "fused_available", lambda: False)
    random_walk(aff, scores, t_values=3)
    assert calls == ["_walk_fused", "_walk_shifts"]
    with pytest.raises(ModuleNotFoundError, match="needs Numba.*stencil='shifts'"):
        random_walk(aff, scores, stencil="fused")


def test_fused_stencil_refuses_a_gpu_tensor():
    aff, scores = _inputs(6, 10, 2, radius=5)
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="CPU only.*'unfold'"):
        random_walk(aff.to(meta), scores.to(meta), stencil="fused")
    with pytest.raises(ValueError, match="same batch size"):
        random_walk(aff[None].expand(2, -1, -1, -1), scores[None])
    with pytest.raises(ValueError, match="t_values"):
        random_walk(aff, scores, t_values=[-1])
    with pytest.raises(ValueError, match="t_values"):
        random_walk(aff, scores, t_values=2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_walk(-aff, scores)


def test_rw_scores_from_cams_walk_resolution_and_reference_pooling():
    """labels [0, 1, 1] -> planes [bg, c1, c2], keys [0, 2, 3], alpha = 2.
    stride 1: bg = (1 - max)^2 per pixel: max = [0.5, 1.0] -> [0.25, 0].
    stride 2 on a 1x3 map (padded to 2x4): bg per pixel (1 - [0.5, 1.0, 0.0])^2 = [0.25, 0, 1];
    blocks of 4 pixels: bg [(0.25 + 0) / 4, 1 / 4] = [0.0625, 0.25] (diluted by the padding zeros),
    count_padding=False: [0.125, 1.0]."""
    cams = torch.zeros(3, 1, 3, dtype=torch.float64)
    cams[1, 0] = torch.tensor([0.5, 0.2, 0.0])
    cams[2, 0] = torch.tensor([0.1, 1.0, 0.0])
    labels = torch.tensor([0, 1, 1])
    scores, keys = rw_scores_from_cams(cams[:, :, :2], labels, alpha=2.0)
    assert keys.tolist() == [0, 2, 3]
    assert scores[0].tolist() == [[0.25, 0.0]]
    pooled, _ = rw_scores_from_cams(cams, labels, alpha=2.0, stride=2)
    assert pooled.shape == (3, 1, 2)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([0.0625, 0.25], dtype=torch.float64))
    torch.testing.assert_close(pooled[1, 0], torch.tensor([0.7 / 4, 0.0], dtype=torch.float64))
    valid, _ = rw_scores_from_cams(cams, labels, alpha=2.0, stride=2, count_padding=False)
    torch.testing.assert_close(valid[0, 0], torch.tensor([0.125, 1.0], dtype=torch.float64))


def test_rw_labels_upsample_argmax_and_keys():
    """1x2 map -> 1x4, align_corners=False: source x = (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0),
    0.25, 0.75, 1.25 (clamped to 1). bg [1, 0] -> [1, .75, .25, 0]; class [0, 1] -> [0, .25, .75, 1];
    argmax -> [bg, bg, class, class] -> keys [0, 5] -> [0, 0, 5, 5]."""
    scores = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    keys = torch.tensor([0, 5])
    assert rw_labels(scores, (1, 4), keys).tolist() == [[0, 0, 5, 5]]
    assert rw_labels(scores[None], (1, 4), keys).shape == (1, 1, 4)
    # Reference pad-and-crop: upsample to (2, 4) (stride 2), keep the top-left 1x3.
    assert rw_labels(scores, (1, 3), keys, stride=2).tolist() == [[0, 0, 5]]
    # Ties go to the first plane (background).
    assert rw_labels(torch.ones(2, 2, 2), (2, 2), keys).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="size"):
        rw_labels(scores, (1, 9), keys, stride=2)
    with pytest.raises(ValueError, match="keys"):
        rw_labels(scores, (1, 4), torch.tensor([0]))
