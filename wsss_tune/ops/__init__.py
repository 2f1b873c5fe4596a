"""Pure tensor math: EPS loss, pixel-to-prototype contrast, CAM -> mask, mIoU, affinity pairs/labels/loss,
the random walk.

No file I/O, no config objects, no device placement: every function runs on the device of its inputs.
"""

from wsss_tune.ops.affinity import (
    affinity_from_features,
    affinity_labels,
    affinity_loss,
    dual_threshold_labels,
    labels_at_stride,
)
from wsss_tune.ops.cam import cam_to_mask, multiscale_cam
from wsss_tune.ops.contrast import ppc_loss
from wsss_tune.ops.eps_loss import EPSLoss, classification_loss, eps_loss, overlap_ratio, saliency_loss
from wsss_tune.ops.metric import IGNORE_INDEX, ConfusionMatrix, confusion_matrix, miou
from wsss_tune.ops.neighbors import neighbor_offsets, pair_indices
from wsss_tune.ops.random_walk import dense_random_walk_reference, random_walk, rw_labels, rw_scores_from_cams
from wsss_tune.ops.seg_loss import msc_loss, seg_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "EPSLoss",
    "affinity_from_features",
    "affinity_labels",
    "affinity_loss",
    "cam_to_mask",
    "classification_loss",
    "confusion_matrix",
    "dense_random_walk_reference",
    "dual_threshold_labels",
    "eps_loss",
    "labels_at_stride",
    "miou",
    "msc_loss",
    "multiscale_cam",
    "neighbor_offsets",
    "overlap_ratio",
    "pair_indices",
    "ppc_loss",
    "random_walk",
    "rw_labels",
    "rw_scores_from_cams",
    "saliency_loss",
    "seg_cross_entropy",
]
