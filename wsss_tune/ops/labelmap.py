"""Score maps -> label maps: the one argmax every stage uses."""

from __future__ import annotations

from torch import Tensor

__all__ = ["score_argmax"]


def score_argmax(scores: Tensor, dim: int) -> Tensor:
    """Index of the highest score along ``dim``; ties go to the first (lowest) index.

    Same result as ``scores.argmax(dim)``, computed as ``scores.max(dim).indices``: on a CPU the
    latter is 4-10x faster for reductions over the leading class dimension of a ``(K, H, W)`` or
    ``(B, K, H, W)`` map (PyTorch's ``argmax`` kernel is slow for such non-innermost reductions),
    which is what every mask decision here does, once per image.

    Shape:
        scores: any, with ``dim`` the class dimension. Returns: long, ``scores`` without ``dim``.
    """
    return scores.max(dim=dim).indices
