"""Random walk with AffinityNet affinities: a local sparse propagation equal to the dense reference.

Reference (PSA ``infer_aff.py`` with ``network/resnet38_aff.py``, ``to_dense=True``): the pair
affinities ``a`` build a dense ``N x N`` matrix (``N = h·w`` at stride 8) holding ``a`` at both
``(i, j)`` and ``(j, i)`` of every pair and 1 on the diagonal; ``A = matrix^β``;
``T = A / A.sum(0)`` (each column divided by its sum); ``T`` is squared ``logt`` times and the
class scores ``(K, N)`` are multiplied by ``T^(2^logt)``.

Since ``A`` is symmetric, one step ``x <- x T`` is, for every pixel ``j``,
``x'_j = (x_j + Σ_i a_ij^β x_i) / (1 + Σ_i a_ij^β)``, the sum running over the pixels paired with
``j``: at most ``2D`` of them inside the radius. :func:`random_walk` applies that step as a stencil of
``1 + 2D`` shifted maps with precomputed weights, ``t`` times, and can return every ``t`` it passes.
At 56 x 56 and t = 256 that is about 0.1 GFLOP per score plane instead of ~0.5 TFLOP for the eight
squarings, and no ``N x N`` matrix.

Three implementations of the step give the same result (see ``stencil`` in :func:`random_walk`):
a fused compiled CPU kernel (:mod:`wsss_tune.ops._walk_kernel`, all taps of all steps in one call),
``1 + 2D`` PyTorch multiply-adds of shifted views, and one ``unfold`` + weighted sum (few kernel
launches, for GPUs).
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from wsss_tune.ops.affinity import cam_scores_with_background, scores_at_stride
from wsss_tune.ops.labelmap import score_argmax
from wsss_tune.ops.neighbors import DEFAULT_RADIUS, neighbor_offsets, pair_crop, pair_indices, pair_valid

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_LOGT",
    "DEFAULT_ALPHA",
    "random_walk",
    "dense_random_walk_reference",
    "rw_scores_from_cams",
    "rw_labels",
]

#: Affinity exponent β (PSA ``infer_aff.py --beta 8``).
DEFAULT_BETA = 8.0
#: Number of squarings of T; the walk runs ``t = 2**logt`` steps (PSA ``infer_aff.py --logt 8``).
DEFAULT_LOGT = 8
#: Background exponent of the walk's input scores (PSA ``infer_aff.py --alpha 16``).
DEFAULT_ALPHA = 16.0

Stencil = Literal["auto", "fused", "shifts", "unfold"]
STENCILS = ("auto", "fused", "shifts", "unfold")


def _check_positive_int(name: str, value: Any, *, minimum: int) -> int:
    try:
        number = operator.index(value)  # int, NumPy or 0-d integer tensors; not floats
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return number


def _resolve_steps(t_values: int | Sequence[int] | None, logt: int | None) -> list[int]:
    if t_values is not None and logt is not None:
        raise ValueError(f"give either t_values or logt, not both (got t_values={t_values!r}, logt={logt!r})")
    if t_values is None:
        logt = DEFAULT_LOGT if logt is None else _check_positive_int("logt", logt, minimum=0)
        return [2**logt]
    given: Any = t_values
    try:
        operator.index(given)  # a single number of steps (int, NumPy or 0-d integer tensor)
        values = [given]
    except TypeError:
        try:
            if isinstance(given, (str, bytes)):
                raise TypeError
            values = list(given)
        except TypeError:
            raise ValueError(f"t_values: expected an int or a sequence of ints, got {given!r}") from None
    if not values:
        raise ValueError("t_values: expected at least one number of steps, got an empty sequence")
    return sorted({_check_positive_int("t_values", t, minimum=0) for t in values})


def _batched(aff: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if aff.dim() == 3 and scores.dim() == 3:
        return aff[None], scores[None], False
    if aff.dim() == 4 and scores.dim() == 4:
        if aff.shape[0] != scores.shape[0]:
            raise ValueError(f"aff and scores: expected the same batch size, got {aff.shape[0]} and {scores.shape[0]}")
        return aff, scores, True
    raise ValueError(f"aff and scores: expected (D, h', w') with (K, h, w), or (B, D, h', w') with (B, K, h, w); "
                     f"got aff {tuple(aff.shape)} and scores {tuple(scores.shape)}")


def _check_aff_shape(aff: torch.Tensor, h: int, w: int, radius: int, pad_border: bool) -> None:
    d = len(neighbor_offsets(radius))
    if pad_border:
        want = (d, h, w)
        how = "pad_border=True: one per pixel"
    else:
        crop = pair_crop(h, w, radius)
        want = (d, crop.height, crop.width)
        how = f"reference geometry h - {radius - 1}, w - {2 * (radius - 1)}"
    if tuple(aff.shape[-3:]) != want:
        raise ValueError(f"aff: expected (..., {', '.join(map(str, want))}) for scores of {h}x{w} and radius "
                         f"{radius} ({how}), got {tuple(aff.shape)}")


def _stencil_weights(
    aff: torch.Tensor, h: int, w: int, *, radius: int, beta: float, pad_border: bool
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Taps ``(sy, sx)`` and weights ``W`` with ``x'[p] = Σ_s W[s, p] · x[p + s]`` (one step of x T).

    Shape:
        aff: ``(B, D, h', w')``.
        Returns: ``1 + 2D`` taps and ``W`` of ``(B, 1 + 2D, h, w)``.
    """
    f = radius - 1
    offsets = neighbor_offsets(radius)
    bsz = aff.shape[0]
    power = aff.pow(beta)
    if pad_border:
        power = power.masked_fill(~pair_valid(h, w, radius, pad_border=True, device=aff.device), 0.0)
        back = power
    else:
        back = aff.new_zeros(bsz, len(offsets), h, w)
        rows, cols = pair_crop(h, w, radius).from_slices()
        back[..., rows, cols] = power
    # back[:, d, p]: weight of the pair (p, p + o_d), read at x[p + o_d];
    # fwd[:, d, p] = back[:, d, p - o_d]: weight of the pair (p - o_d, p), read at x[p - o_d].
    padded = F.pad(back, (f, f, f, f))
    fwd = torch.stack([padded[:, d, f - dy:f - dy + h, f - dx:f - dx + w] for d, (dy, dx) in enumerate(offsets)], 1)
    inv_deg = 1.0 / (1.0 + back.sum(1, keepdim=True) + fwd.sum(1, keepdim=True))
    taps = [(0, 0)] + list(offsets) + [(-dy, -dx) for dy, dx in offsets]
    weights = torch.cat([inv_deg, back * inv_deg, fwd * inv_deg], dim=1)
    return taps, weights


def _walk_shifts(x: torch.Tensor, taps: list[tuple[int, int]], weights: torch.Tensor, steps: list[int],
                 f: int) -> dict[int, torch.Tensor]:
    """``1 + 2D`` in-place multiply-adds of shifted views per step (best where kernel launches are cheap)."""
    bsz, k, h, w = x.shape
    # Two zero-bordered buffers, read and written in turn; the views into them are made once, since
    # slicing costs about as much as the multiply-add itself at these sizes.
    bufs = x.new_zeros(2, bsz, k, h + 2 * f, w + 2 * f)
    views = [[buf[..., f + sy:f + sy + h, f + sx:f + sx + w] for sy, sx in taps] for buf in bufs]
    tap_weights = [weights[:, s:s + 1] for s in range(len(taps))]
    views[0][0].copy_(x)
    out: dict[int, torch.Tensor] = {0: x.clone()} if steps[0] == 0 else {}
    cur = 0
    for step in range(1, steps[-1] + 1):
        src, y = views[cur], views[1 - cur][0]
        torch.mul(src[0], tap_weights[0], out=y)
        for view, weight in zip(src[1:], tap_weights[1:], strict=True):
            y.addcmul_(view, weight)
        cur = 1 - cur
        if step in steps:
            out[step] = y.clone()
    return out


@functools.cache
def fused_available() -> bool:
    """Whether the fused CPU kernel can run (its compiler, Numba, is installed)."""
    return importlib.util.find_spec("numba") is not None


def _walk_fused(x: torch.Tensor, taps: list[tuple[int, int]], weights: torch.Tensor, steps: list[int],
                f: int) -> dict[int, torch.Tensor]:
    """All taps of all steps in one compiled call per requested ``t`` (CPU; see :mod:`._walk_kernel`)."""
    from wsss_tune.ops._walk_kernel import walk_steps

    bsz, k, h, w = x.shape
    top, row = f + 1, w + 2 * f
    rows = top + h + f + 1
    inner = (slice(top, top + h), slice(f, f + w))
    planes = x.new_zeros(2, bsz, k, rows, row)
    planes[0][(..., *inner)] = x
    grid = weights.new_zeros(bsz, len(taps), rows, row)
    grid[(..., *inner)] = weights
    flat = planes.reshape(2, bsz, k, rows * row).numpy()
    flat_weights = grid.reshape(bsz, len(taps), rows * row).numpy()
    offsets = np.array([sy * row + sx for sy, sx in taps], dtype=np.int64)
    lo, hi = top * row, (top + h) * row
    out: dict[int, torch.Tensor] = {0: x.clone()} if steps[0] == 0 else {}
    cur, done = 0, 0
    for t in steps:
        if t == 0:
            continue
        walk_steps(flat[cur], flat[1 - cur], flat_weights, offsets, lo, hi, t - done)
        cur, done = (cur + t - done) % 2, t
        out[t] = planes[cur][(..., *inner)].clone()
    return out


def _walk_unfold(x: torch.Tensor, taps: list[tuple[int, int]], weights: torch.Tensor, steps: list[int],
                 f: int) -> dict[int, torch.Tensor]:
    """One ``unfold`` + weighted sum over the ``(2f+1)²`` window per step (few kernels: for GPUs)."""
    bsz, k, h, w = x.shape
    side = 2 * f + 1
    grid = weights.new_zeros(bsz, side * side, h * w)
    index = torch.tensor([(sy + f) * side + (sx + f) for sy, sx in taps], device=weights.device)
    grid[:, index] = weights.reshape(bsz, len(taps), h * w)
    grid = grid.unsqueeze(1)
    out: dict[int, torch.Tensor] = {0: x.clone()} if steps[0] == 0 else {}
    for step in range(1, steps[-1] + 1):
        cols = F.unfold(x, side, padding=f).reshape(bsz, k, side * side, h * w)
        x = (cols * grid).sum(dim=2).reshape(bsz, k, h, w)
        if step in steps:
            out[step] = x
    return out


@torch.no_grad()
def random_walk(
    aff: torch.Tensor,
    scores: torch.Tensor,
    *,
    radius: int = DEFAULT_RADIUS,
    beta: float = DEFAULT_BETA,
    t_values: int | Sequence[int] | None = None,
    logt: int | None = None,
    pad_border: bool = False,
    stencil: Stencil = "auto",
) -> dict[int, torch.Tensor]:
    """Propagate class scores with the affinities: ``scores @ T^t``, for every requested ``t``.

    Equal (up to float rounding) to :func:`dense_random_walk_reference` for ``t = 2**logt``, but local:
    each step only reads the ``2D`` neighbours within the radius, with the column sums of ``A``
    computed once, so one pass of ``max(t)`` steps yields every requested ``t`` (any integers,
    not only powers of two).

    Border geometry: by default the reference's (see :mod:`wsss_tune.ops.neighbors`): its "from"
    pixels are rows ``0..h-r`` and columns ``r-1..w-r``, so the pixels near the bottom, left and
    right edges have fewer neighbours and some corner pixels none at all (for radius 5: (0, 0..3),
    and (h-2, 0), (h-1, 0), (h-1, 1) and their mirror images at the bottom right): they keep their
    input scores. That is the default because it reproduces the reference's masks. ``pad_border=True`` fixes it: ``aff`` then holds one affinity per pixel and
    offset (from :func:`~wsss_tune.ops.affinity.affinity_from_features` with ``pad_border=True``) and
    pairs leaving the map are dropped.

    Args:
        aff: pair affinities in [0, 1].
        scores: class scores at the same resolution (e.g. from :func:`rw_scores_from_cams`).
        radius: neighbourhood radius γ of ``aff``.
        beta: affinity exponent β (> 0).
        t_values: number(s) of steps to return; default ``2**logt``.
        logt: ``t = 2**logt`` (reference); give ``t_values`` or ``logt``, not both.
        pad_border: padded pair geometry (see above). Off by default (reference).
        stencil: ``fused`` (CPU only: one compiled kernel runs every tap of every step; needs
            Numba, a dependency of the package), ``shifts`` (``1 + 2D`` PyTorch multiply-adds of
            shifted views per step; any device, no compiler), ``unfold`` (one im2col and one weighted
            sum per step; few kernel launches, for GPUs), or ``auto`` (``fused`` on a CPU, ``shifts``
            there if Numba is missing, ``unfold`` elsewhere). Same result up to float rounding.

    Shape:
        aff: ``(D, h', w')`` or ``(B, D, h', w')``; ``(h', w') = (h - r + 1, w - 2r + 2)``, or
        ``(h, w)`` with ``pad_border``.
        scores: ``(K, h, w)`` or ``(B, K, h, w)``.
        Returns: ``{t: scores after t steps}``, each shaped like ``scores``, in the promoted dtype of
        ``aff``, ``scores`` and float32.
    """
    steps = _resolve_steps(t_values, logt)
    radius = _check_positive_int("radius", radius, minimum=2)
    if not beta > 0:
        raise ValueError(f"beta: expected > 0 (a^0 would link every pixel pair of the dense reference), got {beta!r}")
    if stencil not in STENCILS:
        raise ValueError(f"stencil: expected one of {', '.join(map(repr, STENCILS))}, got {stencil!r}")
    if not (aff.is_floating_point() and scores.is_floating_point()):
        raise ValueError(f"aff and scores: expected float tensors, got {aff.dtype} and {scores.dtype}")
    aff_b, x, batched = _batched(aff, scores)
    h, w = x.shape[-2:]
    _check_aff_shape(aff_b, h, w, radius, pad_border)
    on_cpu = x.device.type == "cpu"
    if stencil == "auto":
        stencil = ("fused" if fused_available() else "shifts") if on_cpu else "unfold"
    if stencil == "fused" and not on_cpu:
        raise ValueError(f"stencil='fused' runs on the CPU only, got tensors on {x.device}: use 'unfold' or 'shifts'")
    if stencil == "fused" and not fused_available():
        raise ModuleNotFoundError("stencil='fused' needs Numba (a dependency of wsss-tune: pip install numba), "
                                  "or use stencil='shifts'")
    if aff_b.numel() and bool(aff_b.min() < 0):
        raise ValueError(f"aff: expected affinities in [0, 1], got a minimum of {aff_b.min().item():.4g}")
    # At least float32, as the reference: 256 steps in half precision would accumulate its rounding.
    dtype = torch.promote_types(torch.promote_types(aff.dtype, scores.dtype), torch.float32)
    x = x.to(dtype)
    taps, weights = _stencil_weights(aff_b.to(dtype), h, w, radius=radius, beta=beta, pad_border=pad_border)
    walk = {"fused": _walk_fused, "shifts": _walk_shifts, "unfold": _walk_unfold}[stencil]
    out = walk(x, taps, weights, steps, radius - 1)
    return {t: (v if batched else v[0]) for t, v in sorted(out.items())}


@torch.no_grad()
def dense_random_walk_reference(
    aff: torch.Tensor,
    scores: torch.Tensor,
    *,
    radius: int = DEFAULT_RADIUS,
    beta: float = DEFAULT_BETA,
    logt: int = DEFAULT_LOGT,
    pad_border: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """The reference's dense random walk, for tests and benchmarks: ``O(N²)`` memory, ``O(N³)`` time.

    Builds the ``N x N`` matrix from the pair indices (both directions, unit diagonal), raises it
    to β, divides each column by its sum, squares it ``logt`` times and multiplies the scores by it,
    in float32 like the reference (``dtype=None`` keeps the inputs' dtype).

    Shape:
        aff: ``(D, h', w')`` (geometry as in :func:`random_walk`); scores: ``(K, h, w)``.
        Returns: ``(K, h, w)``.
    """
    if aff.dim() != 3 or scores.dim() != 3:
        raise ValueError(f"aff and scores: expected unbatched (D, h', w') and (K, h, w), got "
                         f"{tuple(aff.shape)} and {tuple(scores.shape)}")
    k, h, w = scores.shape
    _check_aff_shape(aff, h, w, radius, pad_border)
    dtype = dtype or torch.promote_types(aff.dtype, scores.dtype)
    n = h * w
    src, dst = pair_indices(h, w, radius, pad_border=pad_border, device=aff.device)
    src = src.expand_as(dst)
    vals = aff.to(dtype).reshape(dst.shape)
    keep = dst >= 0
    src, dst, vals = src[keep], dst[keep], vals[keep]
    mat = torch.zeros(n, n, dtype=dtype, device=aff.device)
    # The reference sums duplicate entries (sparse -> dense); there are none, but keep the semantics.
    mat.index_put_((src, dst), vals, accumulate=True)
    mat.index_put_((dst, src), vals, accumulate=True)
    mat.diagonal().add_(1.0)
    mat = mat.pow(beta)
    trans = mat / mat.sum(dim=0, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    return (scores.to(dtype).reshape(k, n) @ trans).reshape(k, h, w)


def rw_scores_from_cams(
    cams: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    stride: int = 1,
    count_padding: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The walk's input scores: ``[(1 - max_c CAM)^α, labelled class maps]``, background first.

    The reference (``infer_aff.py``) computes the background plane from the full-resolution CAMs,
    then zero-pads all planes to a multiple of 8 and average-pools them by 8. ``stride > 1`` does
    exactly that (``cams`` at image resolution, ``count_padding=True``: the padding zeros dilute the
    bottom and right cells, the reference quirk; ``False`` averages only the pixels inside the image).
    With ``stride=1`` the CAMs are taken as already at the walk resolution and the background is
    computed there: not the reference order, since the mean of ``(1 - m)^α`` over a block is at least
    ``(1 - mean m)^α`` (convexity), so the background comes out weaker than the reference's.

    Args:
        cams: max-normalised class maps (no background plane).
        labels: image-level labels; positive entries are the labelled classes.
        alpha: background exponent.
        stride: pooling factor from ``cams`` to the walk resolution (1 = already there).
        count_padding: see above; only matters when ``stride`` does not divide the size.

    Shape:
        cams: ``(C, H, W)``; labels: ``(C,)``.
        Returns: scores ``(K, ceil(H/stride), ceil(W/stride))`` with ``K = 1 +`` number of labelled
        classes, and ``keys`` long ``(K,)``: class value of each plane (0 = background, ``c + 1``).
    """
    scores, keys = cam_scores_with_background(cams, labels, alpha=alpha)
    return scores_at_stride(scores, stride, count_padding=count_padding), keys


def rw_labels(
    scores: torch.Tensor,
    size: tuple[int, int],
    keys: torch.Tensor,
    *,
    stride: int | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Class map from walked scores: bilinear upsampling, argmax, planes mapped to class values.

    The reference upsamples to the size of the image zero-padded to a multiple of 8 and crops the
    top-left ``size``; pass that ``stride`` to do the same. ``stride=None`` upsamples straight to
    ``size`` (identical when ``size`` is ``(h·stride, w·stride)``). Ties go to the first plane (the
    background). ``align_corners=False`` is what the reference's ``nn.Upsample(mode='bilinear')``
    does since PyTorch 0.4, the version it targets.

    Args:
        scores: one entry of :func:`random_walk`'s output.
        size: output ``(H, W)``.
        keys: class value of each plane, from :func:`rw_scores_from_cams`.
        stride: the walk map's stride in the image, to reproduce the reference's pad-and-crop.
        align_corners: passed to ``F.interpolate``.

    Shape:
        scores: ``(K, h, w)`` or ``(B, K, h, w)``; keys: ``(K,)``.
        Returns: long ``(H, W)`` or ``(B, H, W)``.
    """
    if scores.dim() not in (3, 4) or not scores.is_floating_point():
        raise ValueError(f"scores: expected float (K, h, w) or (B, K, h, w), got {scores.dtype} {tuple(scores.shape)}")
    x = scores if scores.dim() == 4 else scores[None]
    k, h, w = x.shape[1:]
    if keys.shape != (k,):
        raise ValueError(f"keys: expected shape ({k},), one class value per score plane, got {tuple(keys.shape)}")
    height, width = (int(v) for v in size)
    if stride is None:
        up = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=align_corners)
    else:
        stride = _check_positive_int("stride", stride, minimum=1)
        if not (h * stride >= height > (h - 1) * stride and w * stride >= width > (w - 1) * stride):
            raise ValueError(f"size: {height}x{width} is not covered by a {h}x{w} map at stride {stride} "
                             f"(expected ({(h - 1) * stride}, {h * stride}] x ({(w - 1) * stride}, {w * stride}])")
        up = F.interpolate(x, size=(h * stride, w * stride), mode="bilinear", align_corners=align_corners)
        up = up[..., :height, :width]
    out = keys.to(device=x.device, dtype=torch.long)[score_argmax(up, dim=1)]
    return out if scores.dim() == 4 else out[0]
