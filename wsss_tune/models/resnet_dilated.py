"""Dilated ResNet-50/101 at output stride 8: the DeepLab v1/v2 backbone (torchvision modules).

torchvision's ResNet with ``replace_stride_with_dilation=[False, True, True]``: ``layer3`` runs at
dilation 2 and ``layer4`` at dilation 4 instead of striding, so a 321x321 crop gives 41x41 maps.
``fc`` and ``avgpool`` are dropped. Parameter names are torchvision's (``layer3.5.conv2.weight``),
so a torchvision ImageNet file loads as it is; the Caffe-converted DeepLab files of deeplab-pytorch
are renamed by :mod:`wsss_tune.models.deeplab_weights`.

=======  ==========================  ========  =======  ========
module   blocks (ResNet-50 / -101)   channels  stride   returned
=======  ==========================  ========  =======  ========
stem     conv 7x7/2, BN, max pool    64        4
layer1   3 / 3 bottlenecks           256       4
layer2   4 / 4 bottlenecks           512       8        yes
layer3   6 / 23, dilation 2          1024      8        yes
layer4   3 / 3, dilation 4           2048      8        yes
=======  ==========================  ========  =======  ========

Two layouts of the same weights (``layout``):

* ``torchvision``: the downsampling stride of ``layer2`` sits in the 3x3 conv, the max pool
  rounds down; inputs are ImageNet-normalised RGB (the project's convention).
* ``caffe``: the MSRA/Caffe ResNet of the DeepLab reference (deeplab-pytorch ``_Bottleneck`` and
  ``_Stem``): the stride sits in the first 1x1 conv, the max pool rounds up (``ceil_mode``), and the
  weights expect BGR in 0..255 minus the Caffe mean. The network converts the project's
  ImageNet-normalised RGB input to that itself (:meth:`DilatedResNet.to_network_input`), so data
  code never needs to know which weights are loaded.

In both layouts every block of a dilated stage uses the stage's dilation, as the DeepLab reference
does. torchvision instead gives the first block of ``layer3``/``layer4`` the previous dilation
(1 and 2); ``contract_dilation=True`` reproduces that.

BatchNorm is frozen by default (eval mode, no gradient on its affine parameters), as the DeepLab
reference trains with ``freeze_bn()``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from wsss_tune.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # the project's input convention
from wsss_tune.models.registry import register_backbone

__all__ = [
    "DilatedResNet",
    "resnet50",
    "resnet101",
    "RESNET_BLOCKS",
    "STAGE_CHANNELS",
    "STAGE_DILATIONS",
    "CAFFE_MEAN_BGR",
    "freeze_batchnorm",
]

log = logging.getLogger(__name__)

#: Bottleneck blocks per stage (He et al. 2016, Table 1).
RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
#: Channels of the returned maps (layer2, layer3, layer4).
STAGE_CHANNELS: tuple[int, int, int] = (512, 1024, 2048)
#: Dilation of layer3 and layer4 at output stride 8 (DeepLab v2; DESIGN.md section 2).
STAGE_DILATIONS: tuple[int, int] = (2, 4)
#: The only output stride DeepLab v1/v2 use; at 16 layer2 would no longer share the stride of the
#: other returned maps (registry contract).
OUTPUT_STRIDE = 8
#: BGR mean (0..255 scale) the Caffe DeepLab weights were trained with (deeplab-pytorch
#: ``configs/voc12.yaml`` ``IMAGE.MEAN``); Caffe inputs are not divided by a std.
CAFFE_MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)
#: Pixel scale of Caffe inputs (0..255) relative to the project's [0, 1] images.
CAFFE_PIXEL_SCALE = 255.0

Layout = Literal["torchvision", "caffe"]
_LAYOUTS: tuple[str, ...] = ("torchvision", "caffe")


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode and stop gradients to its affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


class DilatedResNet(nn.Module):
    """ResNet-50/101 at output stride 8 (registry contract: three maps, see the module docstring).

    Args:
        depth: 50 or 101.
        layout: ``torchvision`` or ``caffe`` (see the module docstring).
        freeze_bn: keep BatchNorm in eval mode with frozen affine parameters (reference).
        contract_dilation: give the first block of layer3/layer4 the previous dilation (1, 2), as
            torchvision does; the reference uses the full dilation in every block.

    Shape:
        - Input: ``(B, 3, H, W)``, ImageNet-normalised RGB.
        - Output: three maps ``(B, C_i, h, w)`` with ``C_i = (512, 1024, 2048)[i]`` and
          ``h = ceil(H / 8)`` for ``H = 8k + 1`` (321 -> 41); other sizes follow the conv arithmetic.
    """

    frozen_prefixes: tuple[str, ...] = ()
    output_stride: int = OUTPUT_STRIDE

    def __init__(
        self,
        *,
        depth: int = 101,
        layout: Layout = "torchvision",
        freeze_bn: bool = True,
        contract_dilation: bool = False,
    ) -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"DilatedResNet depth={depth!r}: expected one of {sorted(RESNET_BLOCKS)}")
        if layout not in _LAYOUTS:
            raise ValueError(f"DilatedResNet layout={layout!r}: expected one of {', '.join(_LAYOUTS)}")
        self.depth = depth
        self.layout = layout
        self.freeze_bn = freeze_bn
        self.contract_dilation = contract_dilation
        self.stage_channels: tuple[int, int, int] = STAGE_CHANNELS
        self.out_channels = STAGE_CHANNELS[-1]

        net = ResNet(Bottleneck, list(RESNET_BLOCKS[depth]), replace_stride_with_dilation=[False, True, True])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

        if not contract_dilation:
            for layer, dilation in zip((self.layer3, self.layer4), STAGE_DILATIONS, strict=True):
                first: Bottleneck = layer[0]
                first.conv2.dilation = (dilation, dilation)
                first.conv2.padding = (dilation, dilation)
        if layout == "caffe":
            first = self.layer2[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
            self.maxpool.ceil_mode = True
        if freeze_bn:
            freeze_batchnorm(self)

    def train(self, mode: bool = True) -> DilatedResNet:
        """Set training mode; BatchNorm stays in eval mode when ``freeze_bn`` (reference)."""
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self

    def to_network_input(self, x: Tensor) -> Tensor:
        """Map ImageNet-normalised RGB to what the weights of this layout expect.

        ``torchvision``: unchanged. ``caffe``: ``255 * (x * std + mean)`` in BGR order minus the
        Caffe BGR mean.

        Shape:
            - Input: ``(B, 3, H, W)`` -> Output: ``(B, 3, H, W)``.
        """
        if self.layout == "torchvision":
            return x
        mean = torch.tensor(IMAGENET_MEAN[::-1], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD[::-1], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        caffe_mean = torch.tensor(CAFFE_MEAN_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        bgr = x.flip(1)
        return (bgr * std + mean) * CAFFE_PIXEL_SCALE - caffe_mean

    def forward(self, x: Tensor) -> list[Tensor]:
        """Maps of layer2, layer3 and layer4 (all at stride 8).

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: ``[(B, 512, h, w), (B, 1024, h, w), (B, 2048, h, w)]``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.to_network_input(x)))))
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c2, c3, c4]


def _build(
    depth: int,
    *,
    pretrained: str,
    freeze_bn: bool,
    output_stride: int,
    layout: Literal["auto", "torchvision", "caffe"],
    contract_dilation: bool,
) -> DilatedResNet:
    if output_stride != OUTPUT_STRIDE:
        raise ValueError(f"resnet{depth} output_stride={output_stride!r}: only {OUTPUT_STRIDE} is supported "
                         "(DeepLab v1/v2 reference)")
    if layout not in ("auto", *_LAYOUTS):
        raise ValueError(f"resnet{depth} layout={layout!r}: expected 'auto', {', '.join(map(repr, _LAYOUTS))}")
    state = None
    if pretrained:
        # Imported here: deeplab_weights imports the weights reader, which needs nothing from here.
        from wsss_tune.models.deeplab_weights import read_deeplab_weights

        state, source_format = read_deeplab_weights(pretrained)
        if layout == "auto":
            layout = "caffe" if source_format == "deeplab_caffe" else "torchvision"
    if layout == "auto":
        layout = "torchvision"
    model = DilatedResNet(depth=depth, layout=layout, freeze_bn=freeze_bn, contract_dilation=contract_dilation)
    if state is not None:
        from wsss_tune.models.weights import load_state

        report = load_state(model, state, source=pretrained, strict_backbone=True)
        log.info("resnet%d (%s layout): %s", depth, layout, report.summary())
    return model


@register_backbone("resnet50")
def resnet50(
    *,
    pretrained: str = "",
    freeze_bn: bool = True,
    output_stride: int = OUTPUT_STRIDE,
    layout: Literal["auto", "torchvision", "caffe"] = "auto",
    contract_dilation: bool = False,
) -> DilatedResNet:
    """Dilated ResNet-50 (see :class:`DilatedResNet`).

    Args:
        pretrained: local weights (torchvision ImageNet ``.pth`` or a deeplab-pytorch Caffe file);
            every backbone key must be in it; never downloads.
        freeze_bn: freeze BatchNorm (reference).
        output_stride: must be 8.
        layout: ``auto`` = ``caffe`` for deeplab-pytorch Caffe weights, else ``torchvision``.
        contract_dilation: torchvision's smaller dilation in the first block of layer3/layer4.
    """
    return _build(50, pretrained=pretrained, freeze_bn=freeze_bn, output_stride=output_stride, layout=layout,
                  contract_dilation=contract_dilation)


@register_backbone("resnet101")
def resnet101(
    *,
    pretrained: str = "",
    freeze_bn: bool = True,
    output_stride: int = OUTPUT_STRIDE,
    layout: Literal["auto", "torchvision", "caffe"] = "auto",
    contract_dilation: bool = False,
) -> DilatedResNet:
    """Dilated ResNet-101, the DeepLab v1/v2 backbone (arguments as :func:`resnet50`)."""
    return _build(101, pretrained=pretrained, freeze_bn=freeze_bn, output_stride=output_stride, layout=layout,
                  contract_dilation=contract_dilation)
