"""Backbones (ResNet-38, dilated ResNet-50/101, a tiny CPU one), the EPS head, AffinityNet, DeepLab."""

from wsss_tune.models.affinity_net import AffinityNet, build_affinity_net
from wsss_tune.models.deeplab import MSC, ASPPHead, DeepLab, LargeFOVHead, build_deeplab, deeplab_param_groups
from wsss_tune.models.eps_net import EPSNet, build_eps_net
from wsss_tune.models.registry import create_backbone, list_backbones, register_backbone
from wsss_tune.models.weights import (
    LoadReport,
    WeightsError,
    inspect_weights,
    load_pretrained,
    read_mxnet_params,
)

__all__ = [
    "ASPPHead",
    "AffinityNet",
    "DeepLab",
    "EPSNet",
    "LargeFOVHead",
    "LoadReport",
    "MSC",
    "WeightsError",
    "build_affinity_net",
    "build_deeplab",
    "build_eps_net",
    "create_backbone",
    "deeplab_param_groups",
    "inspect_weights",
    "list_backbones",
    "load_pretrained",
    "read_mxnet_params",
    "register_backbone",
]
