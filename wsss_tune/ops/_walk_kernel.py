"""Fused CPU kernel of the local random walk (compiled by Numba on first use, cached on disk).

One walk step ``x'[p] = Σ_s W[s, p] · x[p + o_s]`` done by PyTorch ops costs one dispatch per tap
(``1 + 2D`` = 69 at radius 5), each moving only a few thousand numbers: at a 56 x 56 map the step
is bound by dispatch overhead, not by arithmetic. This kernel does every tap of every step of a run
in one call: the score planes live in zero-bordered buffers flattened row by row, so a tap is a
constant offset ``o_s = sy · row_length + sx`` into the flat plane and its loop is a contiguous
multiply-add that the compiler vectorises. Weights are zero on the border, so the border stays zero
and what is read across a row end is multiplied by zero.

Layout (see :func:`walk_steps`): ``top = radius`` rows of zeros above the map (one more than the
stencil reach, so that ``p + o_s`` stays inside the buffer for the first pixels), ``radius - 1``
columns on each side, ``radius`` rows below.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["walk_steps"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def walk_steps(src: np.ndarray, dst: np.ndarray, weights: np.ndarray, offsets: np.ndarray, lo: int, hi: int,
               n_steps: int) -> None:  # pragma: no cover - compiled; its Python body is never run
    """Run ``n_steps`` steps, reading and writing ``src`` and ``dst`` in turn.

    After an even number of steps the result is in ``src``, after an odd number in ``dst``. Only
    the flat range ``[lo, hi)`` (the rows of the map, with their side borders) is written.

    Shape:
        src, dst: ``(B, K, P)`` flat zero-bordered planes; weights: ``(B, S, P)``, zero on the
        border; offsets: int64 ``(S,)`` flat tap offsets, with ``0 <= lo + o`` and ``hi + o <= P``.
    """
    bsz, k, _ = src.shape
    taps = offsets.shape[0]
    n = hi - lo
    for _ in range(n_steps):
        for b in range(bsz):
            # First tap assigns, so that the output needs no zeroing pass.
            o = offsets[0]
            ws = weights[b, 0, lo:hi]
            for c in range(k):
                out = dst[b, c, lo:hi]
                x = src[b, c, lo + o:hi + o]
                for p in range(n):
                    out[p] = ws[p] * x[p]
            for s in range(1, taps):
                o = offsets[s]
                ws = weights[b, s, lo:hi]
                for c in range(k):
                    out = dst[b, c, lo:hi]
                    # A slice starting at 0 and a loop from 0: no negative-index wrap-around checks,
                    # so the loop vectorises.
                    x = src[b, c, lo + o:hi + o]
                    for p in range(n):
                        out[p] += ws[p] * x[p]
        src, dst = dst, src
