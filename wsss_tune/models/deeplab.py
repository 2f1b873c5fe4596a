"""DeepLab v1 (LargeFOV head) and v2 (ASPP head) over a registry backbone, with multi-scale inputs.

* v2 (Chen et al., TPAMI 2017; deeplab-pytorch ``_ASPP``): :class:`ASPPHead`, the **sum** of four
  3x3 convs with dilation 6/12/18/24 that go straight from the backbone's 2048 channels to the
  classes, with bias, weights ~ N(0, 0.01) and zero bias.
* v2 with global pooling (``v2_gp``; the DeepLab v2 of the EPS recipe, wseg ``net/operators/ASPP.py``
  with ``MODEL_ASPP_HASGLOBAL``): :class:`ASPPPoolingHead`, four 3x3 dilated convs (6/12/18/24) and a
  global-average-pool branch, each to 256 channels with BatchNorm and ReLU, concatenated and fused by
  a 1x1 conv, then dropout and a 1x1 classifier.
* v1 (Chen et al., ICLR 2015, "DeepLab-LargeFOV"): :class:`LargeFOVHead`. LargeFOV was defined on
  VGG-16, whose fc6/fc7 became a 3x3 conv with dilation 12 to 1024 channels and a 1x1 conv
  1024 -> 1024, each followed by ReLU and dropout 0.5, then the 1x1 classifier fc8. The ResNet
  variant used by WSSS papers (EPS's "DeepLab-v1, ResNet-101") puts these three layers on the
  2048-channel output of the dilated ResNet-101 at output stride 8. All three are new layers here,
  initialised like fc8 in the LargeFOV prototxt (N(0, 0.01), zero bias); dropout is element-wise
  as Caffe's ``Dropout`` layer.
* :class:`DeepLab` = backbone + head, logits at the backbone's output stride (321 -> 41).
* :class:`MSC` = deeplab-pytorch's multi-scale inputs: the model also runs on the input scaled by
  0.5 and 0.75; training returns ``[full, 0.5, 0.75, max-fused]`` (each at its own size except the
  fused one), eval the max-fused logits only.
* :func:`deeplab_param_groups`: the reference's ``lr_mult``: backbone 1x, head weights 10x, head
  biases 20x without weight decay; BatchNorm affine parameters that train at ``bn_lr_mult``.

``num_classes`` everywhere includes the background (C + 1 = 21 on VOC).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.models.deeplab_weights import load_deeplab_state, read_deeplab_weights
from wsss_tune.models.eps_net import check_backbone_contract, trainable_backbone_parameters
from wsss_tune.models.registry import create_backbone
from wsss_tune.models.weights import LoadReport

__all__ = [
    "ASPP_RATES",
    "LARGEFOV_DILATION",
    "LARGEFOV_CHANNELS",
    "LARGEFOV_DROPOUT",
    "HEAD_INIT_STD",
    "MSC_SCALES",
    "HEAD_LR_MULT",
    "HEAD_BIAS_LR_MULT",
    "BN_LR_MULT",
    "ASPP_GP_CHANNELS",
    "ASPP_GP_DROPOUT",
    "HEAD_BN_MOMENTUM",
    "ASPPHead",
    "ASPPPoolingHead",
    "LargeFOVHead",
    "DeepLab",
    "MSC",
    "build_deeplab",
    "deeplab_param_groups",
]

log = logging.getLogger(__name__)

#: Dilation rates of the four ASPP branches (DeepLab v2 "ASPP-L"; deeplab-pytorch ``ATROUS_RATES``).
ASPP_RATES: tuple[int, ...] = (6, 12, 18, 24)
#: Dilation of the LargeFOV fc6 3x3 conv (DeepLab-LargeFOV prototxt, ``dilation: 12``).
LARGEFOV_DILATION = 12
#: Width of LargeFOV fc6 / fc7 (reduced from VGG's 4096 in the LargeFOV model).
LARGEFOV_CHANNELS = 1024
#: Dropout after fc6 and fc7 (LargeFOV prototxt ``dropout_ratio: 0.5``).
LARGEFOV_DROPOUT = 0.5
#: Std of the Gaussian init of new head layers; biases start at 0 (deeplab-pytorch ``_ASPP``,
#: LargeFOV prototxt fc8 ``gaussian std: 0.01``).
HEAD_INIT_STD = 0.01
#: Extra input scales of MSC besides the full image (deeplab-pytorch ``MSC`` default).
MSC_SCALES: tuple[float, ...] = (0.5, 0.75)
#: LR multipliers of the head weights and biases (Caffe DeepLab ``lr_mult`` 10 / 20; deeplab-pytorch
#: ``get_params`` "10x" / "20x").
HEAD_LR_MULT = 10.0
HEAD_BIAS_LR_MULT = 20.0
#: LR multiplier of the BatchNorm affine parameters that train (our default 1x; the EPS recipe's 0 leaves
#: them out of the optimiser, see ``DeepLabConfig.bn_lr_mult``).
BN_LR_MULT = 1.0
#: Width of every branch and of the fusion of :class:`ASPPPoolingHead` (wseg ``MODEL_ASPP_OUTDIM: 256``).
ASPP_GP_CHANNELS = 256
#: Dropout after the fusion and again before the classifier of :class:`ASPPPoolingHead` (wseg
#: ``ASPP.conv_cat`` ``nn.Dropout(0.5)`` and ``deeplabv2.dropout1``).
ASPP_GP_DROPOUT = 0.5
#: Running-statistics momentum of the head's BatchNorm layers (wseg ``TRAIN_BN_MOM: 0.0003``, passed as
#: PyTorch's ``momentum``).
HEAD_BN_MOMENTUM = 3e-4

_ARCHS: tuple[str, ...] = ("v1", "v2", "v2_gp")


def _init_new_conv(conv: nn.Conv2d) -> None:
    nn.init.normal_(conv.weight, mean=0.0, std=HEAD_INIT_STD)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r}: expected a positive integer")


class ASPPHead(nn.Module):
    """DeepLab v2 ASPP: sum of parallel 3x3 dilated convs, each straight to the classes.

    Args:
        in_channels: backbone channels (2048 for ResNet-101).
        num_classes: classes including background.
        rates: dilation (and padding) of each branch.

    Shape:
        - Input: ``(B, in_channels, h, w)`` -> Output: ``(B, num_classes, h, w)``.
    """

    def __init__(self, *, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        _check_positive_int(in_channels, "ASPPHead in_channels")
        _check_positive_int(num_classes, "ASPPHead num_classes")
        if len(rates) == 0 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"ASPPHead rates={tuple(rates)!r}: expected one or more positive integers")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.rates = tuple(rates)
        convs = [nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in self.rates]
        for conv in convs:
            _init_new_conv(conv)
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Tensor:
        """Sum of the branches (see class docstring for shapes)."""
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class ASPPPoolingHead(nn.Module):
    """ASPP with a global-pooling branch (the DeepLab v2 of the EPS recipe; wseg ``ASPP`` with
    ``has_global=True`` and ``deeplabv2``).

    Each of ``len(rates)`` branches is a 3x3 conv with that dilation (no bias), BatchNorm and ReLU; the
    pooling branch averages the whole map, applies a 1x1 conv (no bias), BatchNorm and ReLU and is
    spread back over the map. The ``len(rates) + 1`` maps are concatenated, fused by a 1x1 conv (no
    bias), BatchNorm, ReLU and dropout, then dropout again and a 1x1 classifier with bias. As the
    reference, every conv starts Kaiming-normal (fan out, ReLU gain), BatchNorm at weight 1 and bias 0,
    and the classifier's bias keeps PyTorch's default initialisation.

    Args:
        in_channels: backbone channels (2048 for ResNet-101).
        num_classes: classes including background.
        channels: width of every branch and of the fusion.
        rates: dilation (and padding) of each 3x3 branch.
        bn_momentum: running-statistics momentum of every BatchNorm of the head.
        dropout: dropout probability after the fusion and before the classifier.

    Shape:
        - Input: ``(B, in_channels, h, w)`` -> Output: ``(B, num_classes, h, w)``. In training the
          pooling branch's BatchNorm needs ``B >= 2`` (one value per channel otherwise).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int = ASPP_GP_CHANNELS,
        rates: Sequence[int] = ASPP_RATES,
        bn_momentum: float = HEAD_BN_MOMENTUM,
        dropout: float = ASPP_GP_DROPOUT,
    ) -> None:
        super().__init__()
        _check_positive_int(in_channels, "ASPPPoolingHead in_channels")
        _check_positive_int(num_classes, "ASPPPoolingHead num_classes")
        _check_positive_int(channels, "ASPPPoolingHead channels")
        if len(rates) == 0 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"ASPPPoolingHead rates={tuple(rates)!r}: expected one or more positive integers")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"ASPPPoolingHead bn_momentum={bn_momentum!r}: expected a value in (0, 1]")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ASPPPoolingHead dropout={dropout!r}: expected a probability in [0, 1)")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.rates = tuple(rates)

        def bn_relu(conv: nn.Conv2d) -> list[nn.Module]:
            return [conv, nn.BatchNorm2d(channels, momentum=bn_momentum), nn.ReLU(inplace=True)]

        self.branches = nn.ModuleList(
            nn.Sequential(*bn_relu(nn.Conv2d(in_channels, channels, 3, padding=r, dilation=r, bias=False)))
            for r in self.rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *bn_relu(nn.Conv2d(in_channels, channels, 1, bias=False)))
        self.fuse = nn.Sequential(*bn_relu(nn.Conv2d(channels * (len(self.rates) + 1), channels, 1, bias=False)),
                                  nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (see class docstring for shapes)."""
        h, w = x.shape[-2:]
        pooled = self.pool(x).expand(-1, -1, h, w)  # a 1x1 map upsampled is the same value everywhere
        fused = self.fuse(torch.cat([*(branch(x) for branch in self.branches), pooled], dim=1))
        return self.classifier(self.drop(fused))


class LargeFOVHead(nn.Module):
    """DeepLab v1 LargeFOV head: fc6 (3x3, dilation 12) -> fc7 (1x1) -> fc8 (1x1 to the classes).

    Args:
        in_channels: backbone channels (2048 for ResNet-101).
        num_classes: classes including background.
        channels: width of fc6 / fc7.
        dilation: dilation (and padding) of fc6.
        dropout: element-wise dropout after the fc6 and fc7 ReLUs.

    Shape:
        - Input: ``(B, in_channels, h, w)`` -> Output: ``(B, num_classes, h, w)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int = LARGEFOV_CHANNELS,
        dilation: int = LARGEFOV_DILATION,
        dropout: float = LARGEFOV_DROPOUT,
    ) -> None:
        super().__init__()
        _check_positive_int(in_channels, "LargeFOVHead in_channels")
        _check_positive_int(num_classes, "LargeFOVHead num_classes")
        _check_positive_int(channels, "LargeFOVHead channels")
        _check_positive_int(dilation, "LargeFOVHead dilation")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LargeFOVHead dropout={dropout!r}: expected a probability in [0, 1)")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.fc6 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(channels, channels, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Conv2d(channels, num_classes, 1)
        for conv in (self.fc6, self.fc7, self.fc8):
            _init_new_conv(conv)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (see class docstring for shapes)."""
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)


class _ParamGroups:
    """``param_groups`` of a DeepLab model: the optimiser groups of :func:`deeplab_param_groups`."""

    def param_groups(
        self,
        lr: float,
        *,
        head_lr_mult: float = HEAD_LR_MULT,
        head_bias_lr_mult: float = HEAD_BIAS_LR_MULT,
        bn_lr_mult: float = BN_LR_MULT,
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Optimizer groups of :func:`deeplab_param_groups`."""
        return deeplab_param_groups(self, lr=lr, head_lr_mult=head_lr_mult, head_bias_lr_mult=head_bias_lr_mult,
                                    bn_lr_mult=bn_lr_mult, weight_decay=weight_decay)


class DeepLab(_ParamGroups, nn.Module):
    """Backbone + segmentation head on the backbone's last map.

    Args:
        backbone: a registry backbone (:mod:`wsss_tune.models.registry` contract).
        head: :class:`ASPPHead` or :class:`LargeFOVHead` (anything mapping the last map to logits).

    Shape:
        - Input: ``(B, 3, H, W)``, ImageNet-normalised RGB.
        - Output: ``(B, K, h, w)`` logits at the backbone's output stride (``h = 41`` for
          ``H = 321`` with the dilated ResNets).
    """

    def __init__(self, *, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        check_backbone_contract(backbone, "DeepLab")
        head_in = getattr(head, "in_channels", None)
        if head_in is not None and head_in != backbone.out_channels:
            raise ValueError(f"DeepLab: head expects {head_in} input channels but backbone "
                             f"{type(backbone).__name__} gives {backbone.out_channels}")
        self.backbone = backbone
        self.head = head
        #: Report of the initialisation load done by :func:`build_deeplab` (None if none).
        self.pretrained_report: LoadReport | None = None

    @property
    def output_stride(self) -> int:
        return int(cast(int, self.backbone.output_stride))

    @property
    def num_classes(self) -> int:
        return int(cast(int, self.head.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits at the output stride (see class docstring for shapes)."""
        return self.head(self.backbone(x)[-1])



class MSC(_ParamGroups, nn.Module):
    """Multi-scale inputs (deeplab-pytorch ``MSC``): full image plus ``scales``, max-fused.

    Each scaled input is ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)``
    (size ``floor(H * s)``); its logits are upsampled bilinearly to the full-image logits for the
    pixel-wise max.

    Args:
        base: the single-scale model (a :class:`DeepLab`).
        scales: extra input scales.

    Shape:
        - Input: ``(B, 3, H, W)``.
        - Output (training): list of ``len(scales) + 2`` logits: ``(B, K, h, w)`` for the full
          image, ``(B, K, h_s, w_s)`` per scale, then the fused ``(B, K, h, w)``.
        - Output (eval): the fused ``(B, K, h, w)``.
    """

    def __init__(self, *, base: nn.Module, scales: Sequence[float] = MSC_SCALES) -> None:
        super().__init__()
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 for s in scales):
            raise ValueError(f"MSC scales={tuple(scales)!r}: expected positive numbers")
        self.base = base
        self.scales = tuple(float(s) for s in scales)

    @property
    def output_stride(self) -> int:
        return int(cast(int, self.base.output_stride))

    @property
    def num_classes(self) -> int:
        return int(cast(int, self.base.num_classes))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Per-scale and fused logits in training, fused logits in eval (see class docstring)."""
        logits = self.base(x)
        size = logits.shape[-2:]
        pyramid = [self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.scales]
        upsampled = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        fused = torch.stack([logits, *upsampled]).amax(dim=0)
        if self.training:
            return [logits, *pyramid, fused]
        return fused



def _unwrap(model: nn.Module) -> DeepLab:
    inner = model.base if isinstance(model, MSC) else model
    if not isinstance(inner, DeepLab):
        raise TypeError(f"expected a DeepLab or MSC(DeepLab) model, got {type(model).__name__}")
    return inner


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def deeplab_param_groups(
    model: nn.Module,
    *,
    lr: float,
    head_lr_mult: float = HEAD_LR_MULT,
    head_bias_lr_mult: float = HEAD_BIAS_LR_MULT,
    bn_lr_mult: float = BN_LR_MULT,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the DeepLab reference's learning-rate multipliers.

    =========  ===============================  ==================  ============
    name       parameters                       lr                  weight decay
    =========  ===============================  ==================  ============
    backbone   trainable backbone weights       lr                  weight_decay
    bb_norm    trainable backbone norm params   lr * bn_lr_mult     0
    head       head weights                     lr * head_lr_mult   weight_decay
    head_bias  head biases                      lr * bias_lr_mult   0
    head_norm  head norm params (``v2_gp``)     lr * bn_lr_mult     0
    =========  ===============================  ==================  ============

    Parameters with ``requires_grad=False`` (frozen BatchNorm, the reference default) or under the
    backbone's ``frozen_prefixes`` are left out, as are empty groups and, with ``bn_lr_mult`` 0, the
    norm groups (the EPS recipe's optimiser holds conv weights and biases only). ``bb_norm`` exists only
    when BatchNorm trains (not in the deeplab-pytorch reference, which freezes it; no decay on it is our
    choice, as is ``bn_lr_mult`` 1 by default). Each group carries ``name`` and ``lr_mult`` so a schedule
    can set ``lr = base_lr * lr_mult * factor``.

    Args:
        model: a :class:`DeepLab` or :class:`MSC` around one.
        lr: base learning rate.
        head_lr_mult: multiplier of the head weights.
        head_bias_lr_mult: multiplier of the head biases.
        bn_lr_mult: multiplier of the trainable norm parameters (0: not optimised).
        weight_decay: L2 weight decay of the backbone and head weights.
    """
    deeplab = _unwrap(model)

    def norm_ids(module: nn.Module) -> set[int]:
        return {id(p) for m in module.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}

    bb_norm = norm_ids(deeplab.backbone)
    head_norm = norm_ids(deeplab.head)
    trainable = trainable_backbone_parameters(deeplab.backbone)
    head_weights: list[nn.Parameter] = []
    head_biases: list[nn.Parameter] = []
    head_norms: list[nn.Parameter] = []
    for module in deeplab.head.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (head_norms if id(p) in head_norm else head_biases if name == "bias" else head_weights).append(p)
    groups = [
        {"name": "backbone", "params": [p for p in trainable if id(p) not in bb_norm], "lr": lr,
         "lr_mult": 1.0, "weight_decay": weight_decay},
        {"name": "bb_norm", "params": [p for p in trainable if id(p) in bb_norm], "lr": lr * bn_lr_mult,
         "lr_mult": bn_lr_mult, "weight_decay": 0.0},
        {"name": "head", "params": head_weights, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult,
         "weight_decay": weight_decay},
        {"name": "head_bias", "params": head_biases, "lr": lr * head_bias_lr_mult, "lr_mult": head_bias_lr_mult,
         "weight_decay": 0.0},
        {"name": "head_norm", "params": head_norms, "lr": lr * bn_lr_mult, "lr_mult": bn_lr_mult,
         "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"] and not (g["name"].endswith("norm") and bn_lr_mult == 0)]


def _builder_parameters(name: str) -> set[str]:
    # The registry keeps builders private; their keyword names decide which options apply.
    from wsss_tune.models import registry

    registry.list_backbones()  # registers the built-in backbones
    builder = registry._REGISTRY.get(name)
    return set(inspect.signature(builder).parameters) if builder is not None else set()


def build_deeplab(
    *,
    arch: Literal["v1", "v2", "v2_gp"],
    backbone: str,
    num_classes: int,
    pretrained: str = "",
    msc: bool = False,
    freeze_bn: bool = True,
    head_bn_momentum: float = HEAD_BN_MOMENTUM,
    msc_scales: Sequence[float] = MSC_SCALES,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> DeepLab | MSC:
    """Build DeepLab v1/v2 on a registry backbone, optionally initialised and wrapped in :class:`MSC`.

    Args:
        arch: ``v1`` (:class:`LargeFOVHead`), ``v2`` (:class:`ASPPHead`) or ``v2_gp``
            (:class:`ASPPPoolingHead`).
        backbone: registry name (``resnet101``, ``resnet50``, ``tiny``, ...).
        num_classes: classes including background (C + 1).
        pretrained: local initialisation file: torchvision ImageNet, a deeplab-pytorch Caffe file
            (COCO init or a trained model; the backbone then takes the ``caffe`` layout), an MXNet
            ResNet-38 file or one of our checkpoints; empty = random init. The backbone must be
            complete; the head is loaded only if the file has one of the same shape (see
            :func:`~wsss_tune.models.deeplab_weights.load_deeplab_pretrained`).
        msc: wrap in :class:`MSC` (multi-scale inputs).
        freeze_bn: freeze the backbone's BatchNorm (reference). Applies to backbones whose builder
            has a ``freeze_bn`` argument (the ResNets); backbones trained from scratch (``tiny``)
            have none and always train their BatchNorm.
        head_bn_momentum: running-statistics momentum of the ``v2_gp`` head's BatchNorm.
        msc_scales: extra MSC input scales.
        backbone_kwargs: further builder arguments (e.g. ``{"output_stride": 8}`` for ``tiny``,
            ``{"contract_dilation": True}`` for the ResNets); one the builder does not take is an error.

    Raises:
        ValueError: unknown ``arch`` or bad ``num_classes``; WeightsError: a file that does not fit.
    """
    if arch not in _ARCHS:
        raise ValueError(f"build_deeplab arch={arch!r}: expected one of {', '.join(map(repr, _ARCHS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"build_deeplab num_classes={num_classes!r}: expected an integer >= 2 "
                         "(object classes plus background)")
    accepted = _builder_parameters(backbone)
    kwargs: dict[str, Any] = dict(backbone_kwargs or {})
    unknown = sorted(set(kwargs) - accepted) if accepted else []
    if unknown:
        raise ValueError(f"build_deeplab: backbone {backbone!r} takes no {', '.join(map(repr, unknown))} "
                         f"(it takes {', '.join(sorted(accepted))})")
    if "freeze_bn" in accepted:
        kwargs.setdefault("freeze_bn", freeze_bn)
    elif freeze_bn:
        log.info("DeepLab backbone %s has no freeze_bn option; its BatchNorm trains", backbone)
    state, source_format = read_deeplab_weights(pretrained) if pretrained else ({}, None)
    if source_format == "deeplab_caffe" and "layout" in accepted:
        kwargs.setdefault("layout", "caffe")
    net = create_backbone(backbone, **kwargs)
    in_channels = int(cast(int, net.out_channels))
    if arch == "v2":
        head: nn.Module = ASPPHead(in_channels=in_channels, num_classes=num_classes)
    elif arch == "v2_gp":
        head = ASPPPoolingHead(in_channels=in_channels, num_classes=num_classes, bn_momentum=head_bn_momentum)
    else:
        head = LargeFOVHead(in_channels=in_channels, num_classes=num_classes)
    model = DeepLab(backbone=net, head=head)
    if pretrained:
        model.pretrained_report = load_deeplab_state(model, state, source=pretrained,
                                                      source_format=source_format or "other")
    return MSC(base=model, scales=msc_scales) if msc else model
