"""Confusion matrix, IoU and mIoU against counts made by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsss_tune.ops.metric import IGNORE_INDEX, ConfusionMatrix, confusion_matrix, miou

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]

GT = [[0, 0, 1, 1], [2, 255, 1, 0]]
PRED = [[0, 1, 1, 255], [2, 0, 1, 1]]
#: (gt, pred) pairs: (0,0) (0,1) (1,1) (1,255 dropped) (2,2) (255 ignored,0) (1,1) (0,1).
EXPECTED = [[1, 2, 0], [0, 2, 0], [0, 0, 1]]


def test_confusion_matrix_by_hand_numpy_and_torch() -> None:
    """Rows = GT, columns = prediction; GT 255 and predicted 255 pixels are not counted (6 of 8 remain)."""
    assert IGNORE_INDEX == 255
    m_np = confusion_matrix(np.array(PRED, dtype=np.uint8), np.array(GT, dtype=np.uint8), 3)
    assert isinstance(m_np, np.ndarray) and m_np.dtype == np.int64
    assert m_np.tolist() == EXPECTED
    m_t = confusion_matrix(torch.tensor(PRED), torch.tensor(GT, dtype=torch.uint8), 3)
    assert isinstance(m_t, torch.Tensor) and m_t.dtype == torch.int64
    assert m_t.tolist() == EXPECTED
    mixed = confusion_matrix(np.array(PRED), torch.tensor(GT), 3)
    assert isinstance(mixed, torch.Tensor) and mixed.tolist() == EXPECTED


def test_iou_miou_and_accuracy_by_hand() -> None:
    """From EXPECTED: row sums (3, 2, 1), column sums (1, 4, 1), diagonal (1, 2, 1).

    IoU = diag / (row + col - diag) = 1/3, 2/4, 1/1; mIoU = (1/3 + 1/2 + 1) / 3 = 11/18;
    pixel accuracy = 4 / 6. With K = 4, class 3 is absent from both: IoU NaN, mIoU unchanged.
    """
    cm = ConfusionMatrix(num_classes=3).update(np.array(PRED), np.array(GT))
    np.testing.assert_allclose(cm.iou(), [1 / 3, 0.5, 1.0])
    assert cm.miou() == pytest.approx(11 / 18)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    assert cm.per_class(["background", "a", "b"]) == pytest.approx({"background": 1 / 3, "a": 0.5, "b": 1.0})
    cm4 = ConfusionMatrix(num_classes=4).update(torch.tensor(PRED), torch.tensor(GT))
    assert math.isnan(cm4.iou()[3])
    assert cm4.miou() == pytest.approx(11 / 18)
    assert miou(torch.tensor(PRED), torch.tensor(GT), 3) == pytest.approx(11 / 18)


def test_class_only_predicted_counts_as_zero() -> None:
    """GT (0, 0), pred (0, 3), K = 4: IoU_0 = 1 / (2 + 1 - 1) = 0.5, IoU_3 = 0 / (0 + 1 - 0) = 0;
    classes 1 and 2 are absent from both (NaN) -> mIoU = (0.5 + 0) / 2 = 0.25."""
    cm = ConfusionMatrix(num_classes=4).update(np.array([0, 3]), np.array([0, 0]))
    iou = cm.iou()
    assert iou[0] == 0.5 and iou[3] == 0.0 and np.isnan(iou[1:3]).all()
    assert cm.miou() == 0.25


def test_uint8_labels_do_not_overflow() -> None:
    """K = 21: GT 20 with prediction 20 is cell 20 * 21 + 20 = 440 > 255, so indices must be int64."""
    gt = torch.tensor([20, 0], dtype=torch.uint8)
    pred = torch.tensor([20, 20], dtype=torch.uint8)
    m = confusion_matrix(pred, gt, 21)
    assert m[20, 20] == 1 and m[0, 20] == 1 and m.sum() == 2


def test_accumulate_merge_and_persist() -> None:
    """Two updates double every count; merging two matrices adds them; the state survives JSON."""
    a = ConfusionMatrix(num_classes=3)
    a.update(np.array(PRED), np.array(GT)).update(torch.tensor(PRED), torch.tensor(GT))
    assert a.matrix.tolist() == [[2 * v for v in row] for row in EXPECTED]
    b = ConfusionMatrix(num_classes=3).update(np.array(PRED), np.array(GT))
    a.merge(b)
    assert a.total == 18
    per_image = confusion_matrix(np.array(PRED), np.array(GT), 3)
    assert ConfusionMatrix(num_classes=3).merge_matrix(per_image).merge_matrix(torch.from_numpy(per_image)).total == 12
    restored = ConfusionMatrix.from_state(json.loads(json.dumps(a.state_dict())))
    assert restored.matrix.tolist() == a.matrix.tolist() and restored.num_classes == 3
    assert restored.miou() == pytest.approx(11 / 18)
    a.reset()
    assert a.total == 0 and math.isnan(a.miou()) and math.isnan(a.pixel_accuracy())


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"pred: .*\[7\]"):
        confusion_matrix(torch.tensor([7, 0]), torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match=r"pred: .*\[-1\]"):
        confusion_matrix(np.array([-1]), np.array([1]), 3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64), 3)
    with pytest.raises(TypeError, match="gt: expected integer"):
        confusion_matrix(np.zeros(3, dtype=np.int64), np.zeros(3), 3)
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(num_classes=0)
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(num_classes=3).merge(ConfusionMatrix(num_classes=4))
    with pytest.raises(ValueError, match="merge_matrix: expected 3x3"):
        ConfusionMatrix(num_classes=3).merge_matrix(np.ones((3, 3)))  # float counts
    with pytest.raises(ValueError, match="state.*3x3"):
        ConfusionMatrix.from_state({"num_classes": 3, "matrix": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match="names"):
        ConfusionMatrix(num_classes=3).per_class(["a", "b"])
    with pytest.raises(TypeError):
        ConfusionMatrix(3)  # type: ignore[misc]


@pytest.mark.parametrize("device", DEVICES)
def test_counts_on_the_inputs_device(device: str) -> None:
    """Counting happens on the device of ``pred``; ``gt`` may come from the CPU."""
    pred = torch.tensor(PRED, device=device)
    m = confusion_matrix(pred, torch.tensor(GT), 3)
    assert m.device.type == device and m.tolist() == EXPECTED
    assert ConfusionMatrix(num_classes=3).update(pred, torch.tensor(GT, device=device)).miou() == pytest.approx(11 / 18)
