"""The EPS classifier (Lee et al., CVPR 2021): a backbone and a 1x1 head giving C+1 class maps.

The head has no bias and Xavier-uniform init; the background map is the **last** channel; image
logits are the global average pool of the maps (reference ``network/resnet38_eps.py``).

For pixel-to-prototype contrast (``eps.method: eps_ppc``) the net also has a projection head: a 1x1
conv without bias, Xavier-uniform init, on the same backbone map as the class head, followed by ReLU
(PPC reference ``network/resnet38_contrast.py``, ``proj_fc``: 4096 -> 128); it trains at the head's
learning rate and is not used at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.models.registry import create_backbone
from wsss_tune.models.weights import LoadReport, load_pretrained

__all__ = [
    "EPSNet",
    "build_eps_net",
    "backbone_head_param_groups",
    "trainable_backbone_parameters",
    "convert_reference_eps",
    "check_backbone_contract",
    "BackboneSpec",
    "HEAD_LR_MULT",
    "NORM_TYPES",
]

log = logging.getLogger(__name__)

#: Learning-rate multiplier of newly initialised layers (reference: 10x the backbone LR).
HEAD_LR_MULT = 10.0
#: Name of the classifier in the reference EPS / PSA checkpoints.
_REFERENCE_HEAD = "fc8"


def _is_frozen(name: str, prefixes: tuple[str, ...]) -> bool:
    # "b2" freezes "b2.<...>" but not "b2_1.<...>" (a frozen prefix names whole modules).
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def trainable_backbone_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """Backbone parameters that train: ``requires_grad`` and not under ``frozen_prefixes``."""
    prefixes = tuple(getattr(backbone, "frozen_prefixes", ()))
    return [p for n, p in backbone.named_parameters() if p.requires_grad and not _is_frozen(n, prefixes)]


#: Normalisation layers whose affine parameters get no weight decay when they train (our choice,
#: shared with DeepLab's groups; the references freeze BatchNorm, so it never arises there).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def backbone_head_param_groups(
    *, backbone: nn.Module, head: nn.Module, lr: float, head_lr_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: backbone at ``lr``, new layers at ``lr * head_lr_mult``.

    ========  ==============================  =================  ============
    name      parameters                      lr                 weight decay
    ========  ==============================  =================  ============
    backbone  trainable backbone parameters   lr                 weight_decay
    bb_norm   trainable backbone norm params  lr                 0
    head      new layers                      lr * head_lr_mult  weight_decay
    ========  ==============================  =================  ============

    Frozen parameters (``requires_grad=False`` or under ``frozen_prefixes``) are left out and
    empty groups dropped; ``bb_norm`` exists only for backbones whose BatchNorm trains (tiny).
    Each group carries ``name`` and ``lr_mult`` so that a schedule can set
    ``lr = base_lr * lr_mult * factor``.
    """
    norm_ids = {id(p) for m in backbone.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    trainable = trainable_backbone_parameters(backbone)
    groups = [
        {"name": "backbone", "params": [p for p in trainable if id(p) not in norm_ids], "lr": lr, "lr_mult": 1.0,
         "weight_decay": weight_decay},
        {"name": "bb_norm", "params": [p for p in trainable if id(p) in norm_ids], "lr": lr, "lr_mult": 1.0,
         "weight_decay": 0.0},
        {"name": "head", "params": [p for p in head.parameters() if p.requires_grad], "lr": lr * head_lr_mult,
         "lr_mult": head_lr_mult, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


class BackboneSpec(NamedTuple):
    """The registry-contract attributes of a backbone, read once."""

    stage_channels: tuple[int, ...]
    out_channels: int
    output_stride: int


def check_backbone_contract(backbone: nn.Module, owner: str) -> BackboneSpec:
    """Read ``stage_channels`` / ``out_channels`` / ``output_stride``; raise naming ``owner`` if absent."""
    names = ("stage_channels", "out_channels", "output_stride")
    missing = [a for a in names if not hasattr(backbone, a)]
    if missing:
        raise TypeError(f"{owner}: backbone {type(backbone).__name__} lacks {', '.join(missing)}; expected a "
                        "backbone built by wsss_tune.models.registry.create_backbone")
    stages, out, stride = (getattr(backbone, a) for a in names)
    return BackboneSpec(tuple(int(c) for c in stages), int(out), int(stride))


class EPSNet(nn.Module):
    """Backbone + 1x1 conv head with ``num_classes + 1`` outputs (background last).

    Args:
        backbone: a registry backbone; the head reads its last map (``out_channels`` channels).
        num_classes: number of object classes C (without background).
        proj_dim: channels of the projection head for pixel-to-prototype contrast (0 = no head).

    Shape:
        - Input: ``(B, 3, H, W)``.
        - Output of :meth:`forward`: image logits ``(B, C+1)`` and maps ``(B, C+1, h, w)`` with
          ``h, w`` the backbone's map size (``H / output_stride``); with ``project=True`` also the
          projected features ``(B, proj_dim, h, w)``.
    """

    def __init__(self, *, backbone: nn.Module, num_classes: int, proj_dim: int = 0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"EPSNet num_classes={num_classes!r}: expected a positive integer "
                             "(object classes, without background)")
        spec = check_backbone_contract(backbone, "EPSNet")
        self.backbone = backbone
        self.num_classes = num_classes
        self.output_stride = spec.output_stride
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 0:
            raise ValueError(f"EPSNet proj_dim={proj_dim!r}: expected an integer >= 0 (0 = no projection head)")
        self.head = nn.Conv2d(spec.out_channels, num_classes + 1, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)
        #: Projection head of pixel-to-prototype contrast (None without one).
        self.proj: nn.Conv2d | None = None
        if proj_dim:
            self.proj = nn.Conv2d(spec.out_channels, proj_dim, 1, bias=False)
            nn.init.xavier_uniform_(self.proj.weight)
        #: Report of the pretrained-weight load done by :func:`build_eps_net` (None if none).
        self.pretrained_report: LoadReport | None = None

    def forward_maps(self, x: Tensor) -> Tensor:
        """Class maps (raw scores, background last).

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: ``(B, C+1, h, w)``.
        """
        return self.head(self.backbone(x)[-1])

    def forward(self, x: Tensor, *, project: bool = False) -> tuple[Tensor, ...]:
        """Image logits (global average pool of the maps) and the maps; with ``project`` also the
        projected features, ``ReLU(proj(feature map))``.

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: ``(B, C+1)``, ``(B, C+1, h, w)`` [, ``(B, proj_dim, h, w)``].
        """
        if not project:
            maps = self.forward_maps(x)
            return maps.mean(dim=(2, 3)), maps
        if self.proj is None:
            raise ValueError("EPSNet.forward(project=True): this net has no projection head (build it with proj_dim > 0)")
        feats = self.backbone(x)[-1]
        maps = self.head(feats)
        return maps.mean(dim=(2, 3)), maps, F.relu(self.proj(feats))

    def new_layers(self) -> nn.Module:
        """The layers trained from scratch: the class head, and the projection head if there is one."""
        return self.head if self.proj is None else nn.ModuleList([self.head, self.proj])

    def param_groups(self, lr: float, head_lr_mult: float = HEAD_LR_MULT,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Backbone at ``lr`` (frozen parameters excluded), the new layers (:meth:`new_layers`) at
        ``lr * head_lr_mult``."""
        return backbone_head_param_groups(backbone=self.backbone, head=self.new_layers(), lr=lr,
                                          head_lr_mult=head_lr_mult, weight_decay=weight_decay)


def convert_reference_eps(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a reference EPS / PSA classifier checkpoint (``conv1a.weight``, ..., ``fc8.weight``,
    optionally under ``module.``) onto :class:`EPSNet` over ResNet-38 (``backbone.*``, ``head.weight``).

    Use as ``load_pretrained(eps_net, path, converter=convert_reference_eps)``.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.split(".", 1)[0] == _REFERENCE_HEAD:
            out["head." + key.split(".", 1)[1]] = value
        else:
            out["backbone." + key] = value
    return out


def build_eps_net(
    *,
    backbone: str,
    num_classes: int,
    pretrained: str = "",
    backbone_kwargs: Mapping[str, Any] | None = None,
    proj_dim: int = 0,
) -> EPSNet:
    """Create the named backbone, load ``pretrained`` into it (backbone weights only) and add the head.

    Args:
        backbone: registry name (``resnet38``, ``resnet101``, ``tiny``, ...).
        num_classes: object classes C.
        pretrained: local weights file for the backbone (``.pth``, MXNet ``.params``, ...); empty =
            random init. Every backbone key must be in the file; extra keys (an ImageNet classifier)
            are reported and ignored.
        backbone_kwargs: extra builder arguments.
        proj_dim: channels of the projection head for pixel-to-prototype contrast (0 = none).
    """
    bb = create_backbone(backbone, **dict(backbone_kwargs or {}))
    report = load_pretrained(bb, pretrained, strict_backbone=True) if pretrained else None
    if report is not None:
        log.info("EPS backbone %s: %s", backbone, report.summary())
    net = EPSNet(backbone=bb, num_classes=num_classes, proj_dim=proj_dim)
    net.pretrained_report = report
    return net
