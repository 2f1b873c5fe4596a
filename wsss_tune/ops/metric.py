"""Confusion matrix, IoU and mIoU (DESIGN.md §2 "Metric").

Rows are ground truth, columns predictions. Ground-truth pixels outside ``0..K-1`` (255 = ignore)
are skipped; predicted :data:`IGNORE_INDEX` pixels are dropped; any other out-of-range prediction
is an error. Counting uses ``bincount`` on the inputs' own device (torch) or NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "ArrayLike", "confusion_matrix", "ConfusionMatrix", "miou"]

#: Label value for "ignore" in VOC masks and pseudo masks.
IGNORE_INDEX = 255

#: A label map as a torch tensor (any device) or a NumPy array.
ArrayLike = Tensor | np.ndarray


def _check_num_classes(num_classes: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")


def _check_args(pred: Any, gt: Any, num_classes: int) -> None:
    _check_num_classes(num_classes)
    for name, value in (("pred", pred), ("gt", gt)):
        if isinstance(value, Tensor):
            integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        elif isinstance(value, np.ndarray):
            integer = np.issubdtype(value.dtype, np.integer)
        else:
            raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
        if not integer:
            raise TypeError(f"{name}: expected integer class labels, got dtype {value.dtype}")
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred/gt: expected the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")


def _bad_prediction(values: Sequence[int], num_classes: int) -> ValueError:
    return ValueError(f"pred: expected class indices 0..{num_classes - 1} or {IGNORE_INDEX} (ignore), got "
                      f"value(s) {sorted(set(int(v) for v in values))[:8]}")


def confusion_matrix(pred: ArrayLike, gt: ArrayLike, num_classes: int) -> ArrayLike:
    """Pixel confusion matrix, rows = ground truth, columns = prediction.

    Torch inputs are counted on their own device (``gt`` is moved to ``pred``'s) and give a tensor;
    NumPy inputs give an array. A mix is counted in torch.

    Args:
        pred: Predicted labels in ``0..K-1``, or :data:`IGNORE_INDEX` (dropped).
        gt: Ground-truth labels; values outside ``0..K-1`` (255) are ignored.
        num_classes: K, background included (21 for VOC).

    Returns:
        int64 counts.

    Shape:
        pred: any; gt: same as pred -> (K, K)
    """
    _check_args(pred, gt, num_classes)
    k = num_classes
    if isinstance(pred, np.ndarray) and isinstance(gt, np.ndarray):
        p = pred.astype(np.int64, copy=False).ravel()
        g = gt.astype(np.int64, copy=False).ravel()
        keep = (g >= 0) & (g < k) & (p != IGNORE_INDEX)
        p, g = p[keep], g[keep]
        bad = (p < 0) | (p >= k)
        if bad.any():
            raise _bad_prediction(p[bad].tolist(), k)
        return np.bincount(g * k + p, minlength=k * k).reshape(k, k).astype(np.int64, copy=False)
    pred_t = torch.as_tensor(pred).reshape(-1).long()
    gt_t = torch.as_tensor(gt).to(pred_t.device).reshape(-1).long()
    keep_t = (gt_t >= 0) & (gt_t < k) & (pred_t != IGNORE_INDEX)
    pred_t, gt_t = pred_t[keep_t], gt_t[keep_t]
    bad_t = (pred_t < 0) | (pred_t >= k)
    if bool(bad_t.any()):
        raise _bad_prediction(pred_t[bad_t].unique().tolist(), k)
    return torch.bincount(gt_t * k + pred_t, minlength=k * k).reshape(k, k)


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix (int64, host memory) over many images.

    Args:
        num_classes: K, background included.
    """

    def __init__(self, *, num_classes: int) -> None:
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, gt: ArrayLike) -> ConfusionMatrix:
        """Add one prediction / ground-truth pair (torch on any device, or NumPy); returns ``self``.

        Shape:
            pred: any; gt: same as pred
        """
        return self.merge_matrix(confusion_matrix(pred, gt, self.num_classes))

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of another matrix (e.g. from another worker); returns ``self``."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            got = other.num_classes if isinstance(other, ConfusionMatrix) else type(other).__name__
            raise ValueError(f"merge: expected a ConfusionMatrix with num_classes={self.num_classes}, got {got}")
        self.matrix += other.matrix
        return self

    def merge_matrix(self, counts: ArrayLike) -> ConfusionMatrix:
        """Add raw counts, e.g. a stored per-image :func:`confusion_matrix`; returns ``self``.

        Shape:
            counts: (K, K)
        """
        array = counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
        k = self.num_classes
        if array.shape != (k, k) or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
            raise ValueError(f"merge_matrix: expected {k}x{k} non-negative integer counts, got shape "
                             f"{array.shape} dtype {array.dtype}")
        self.matrix += array.astype(np.int64, copy=False)
        return self

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix[...] = 0

    @property
    def total(self) -> int:
        """Number of counted pixels."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU ``diag / (row + col - diag)``; NaN for classes absent from GT and prediction.

        Shape:
            () -> (K,)
        """
        diag = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix)
        out = np.full(self.num_classes, np.nan)
        np.divide(diag, union, out=out, where=union > 0)
        return out

    def miou(self) -> float:
        """Mean IoU over the classes present (in GT or prediction); NaN when nothing was counted."""
        values = self.iou()
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    def per_class(self, names: Sequence[str]) -> dict[str, float]:
        """IoU by class name (NaN for absent classes); ``names`` has one entry per class, in order."""
        if len(names) != self.num_classes:
            raise ValueError(f"names: expected {self.num_classes} class names, got {len(names)}")
        return {str(n): float(v) for n, v in zip(names, self.iou(), strict=True)}

    def pixel_accuracy(self) -> float:
        """Share of counted pixels predicted correctly; NaN when nothing was counted."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable state for :meth:`from_state`."""
        return {"num_classes": self.num_classes, "matrix": self.matrix.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ConfusionMatrix:
        """Rebuild from :meth:`state_dict`, validating shape and counts."""
        if not isinstance(state, Mapping) or set(state) != {"num_classes", "matrix"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"confusion matrix state: expected keys ['matrix', 'num_classes'], got {keys}")
        out = cls(num_classes=state["num_classes"])
        try:
            return out.merge_matrix(np.asarray(state["matrix"]))
        except ValueError as exc:
            raise ValueError(f"confusion matrix state: 'matrix': {exc}") from None

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, miou={self.miou():.4f})"


def miou(pred: ArrayLike, gt: ArrayLike, num_classes: int) -> float:
    """Mean IoU of one prediction against its ground truth (see :class:`ConfusionMatrix`).

    Shape:
        pred: any; gt: same as pred -> ()
    """
    return ConfusionMatrix(num_classes=num_classes).update(pred, gt).miou()
