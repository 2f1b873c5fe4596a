"""ResNet-38 ("model A1" of Wu et al., "Wider or Deeper", 2016) as used by the PSA and EPS code.

Pre-activation residual network at output stride 8 (a 448x448 crop gives 56x56 maps):

========  ===================================  ===========  ========
module    blocks                               out channels stride
========  ===================================  ===========  ========
conv1a    3x3 conv                             64           1
b2        3 basic blocks (first: stride 2)     128          2
b3        3 basic blocks (first: stride 2)     256          4
b4        6 basic blocks (first: stride 2)     512          8
b5        3 basic blocks, dilation 2           1024         8
b6        1 bottleneck, dilation 4, drop 0.3   2048         8
b7        1 bottleneck, dilation 4, drop 0.5   4096         8
bn7       BN + ReLU on the b7 output           4096         8
========  ===================================  ===========  ========

Module and parameter names follow the public PyTorch port (``b4_3.bn_branch2b1.weight``) so that
the MXNet ImageNet file maps onto them by a fixed rename (:func:`wsss_tune.models.weights.
convert_resnet38_mxnet`) and checkpoints of the reference code load as they are.

As in the reference, every BatchNorm layer stays in eval mode with a frozen affine transform, and
``conv1a`` and the ``b2`` blocks are never trained.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.models.registry import register_backbone

__all__ = ["ResBlock", "BottleneckBlock", "ResNet38", "resnet38", "FEATURE_SETS"]

#: BatchNorm epsilon: the PyTorch default, which the reference port uses for the converted weights.
BN_EPS = 1e-5
#: Output stride of the network (three stride-2 stages after conv1a; b5-b7 are dilated instead).
OUTPUT_STRIDE = 8
#: Dropout2d probabilities inside the b6 and b7 bottlenecks (reference ``resnet38d.py``).
B6_DROPOUT = 0.3
B7_DROPOUT = 0.5
#: Parameters the EPS / PSA-AffinityNet references never train (their ``not_training`` list).
FROZEN_PREFIXES: tuple[str, ...] = ("conv1a", "b2", "b2_1", "b2_2")

#: Which normalised stage outputs :meth:`ResNet38.forward` returns, by ``features`` name.
#: Each entry is the stage's output after the pre-activation BN+ReLU of the block that follows it
#: (``bn7`` for b7), i.e. the same tensors the reference calls ``conv4`` (b4), ``conv5`` (b5) and
#: ``conv6`` (b7).
#: ``stages``: b5, b6, b7 (1024, 2048, 4096 channels) - the last three stages.
#: ``psa``: b4, b5, b7 (512, 1024, 4096 channels) - what the public PSA AffinityNet reads.
FEATURE_SETS: dict[str, tuple[str, str, str]] = {
    "stages": ("b5", "b6", "b7"),
    "psa": ("b4", "b5", "b7"),
}
_STAGE_CHANNELS = {"b4": 512, "b5": 1024, "b6": 2048, "b7": 4096}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class ResBlock(nn.Module):
    """Pre-activation basic block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    The projection shortcut ``conv_branch1`` (1x1, strided) exists when the shape changes and is
    applied to the pre-activated input, as in the reference.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``(B, out_channels, H / stride, W / stride)`` (rounded up), plus the pre-activated
          input ``(B, in_channels, H, W)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        first_dilation: int | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = _bn(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = _bn(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(output, relu(bn_branch2a(x)))``."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y, pre


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck (1x1 -> dilated 3x3 -> 1x1, widths out/4, out/2, out) with Dropout2d.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``(B, out_channels, H, W)``, plus the pre-activated input ``(B, in_channels, H, W)``.
    """

    def __init__(self, *, in_channels: int, out_channels: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.same_shape = in_channels == out_channels
        self.bn_branch2a = _bn(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = _bn(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = _bn(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(output, relu(bn_branch2a(x)))``."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y, pre


class ResNet38(nn.Module):
    """ResNet-38 backbone (registry contract: three maps at output stride 8).

    Args:
        features: which three stage outputs :meth:`forward` returns (see :data:`FEATURE_SETS`);
            ``stages`` (b5, b6, b7) by default, ``psa`` for the PSA AffinityNet's (b4, b5, b7).
        freeze_bn: keep every BatchNorm in eval mode with ``requires_grad=False`` on its affine
            parameters (the reference behaviour). ``False`` lets them train (from-scratch runs).

    Shape:
        - Input: ``(B, 3, H, W)``, ImageNet-normalised RGB.
        - Output: three maps ``(B, C_i, ceil(H/8), ceil(W/8))`` with ``C_i = stage_channels[i]``.
    """

    output_stride: int = OUTPUT_STRIDE
    frozen_prefixes: tuple[str, ...] = FROZEN_PREFIXES

    def __init__(self, *, features: Literal["stages", "psa"] = "stages", freeze_bn: bool = True) -> None:
        super().__init__()
        if features not in FEATURE_SETS:
            raise ValueError(f"ResNet38 features={features!r}: expected one of {', '.join(FEATURE_SETS)}")
        self.features = features
        self.freeze_bn = freeze_bn
        self.stage_channels: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            _STAGE_CHANNELS[s] for s in FEATURE_SETS[features])
        self.out_channels = self.stage_channels[-1]

        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(in_channels=64, mid_channels=128, out_channels=128, stride=2)
        self.b2_1 = ResBlock(in_channels=128, mid_channels=128, out_channels=128)
        self.b2_2 = ResBlock(in_channels=128, mid_channels=128, out_channels=128)

        self.b3 = ResBlock(in_channels=128, mid_channels=256, out_channels=256, stride=2)
        self.b3_1 = ResBlock(in_channels=256, mid_channels=256, out_channels=256)
        self.b3_2 = ResBlock(in_channels=256, mid_channels=256, out_channels=256)

        self.b4 = ResBlock(in_channels=256, mid_channels=512, out_channels=512, stride=2)
        self.b4_1 = ResBlock(in_channels=512, mid_channels=512, out_channels=512)
        self.b4_2 = ResBlock(in_channels=512, mid_channels=512, out_channels=512)
        self.b4_3 = ResBlock(in_channels=512, mid_channels=512, out_channels=512)
        self.b4_4 = ResBlock(in_channels=512, mid_channels=512, out_channels=512)
        self.b4_5 = ResBlock(in_channels=512, mid_channels=512, out_channels=512)

        # The first b5 conv keeps dilation 1 (reference: first_dilation=1, dilation=2).
        self.b5 = ResBlock(in_channels=512, mid_channels=512, out_channels=1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(in_channels=1024, mid_channels=512, out_channels=1024, dilation=2)
        self.b5_2 = ResBlock(in_channels=1024, mid_channels=512, out_channels=1024, dilation=2)

        self.b6 = BottleneckBlock(in_channels=1024, out_channels=2048, dilation=4, dropout=B6_DROPOUT)
        self.b7 = BottleneckBlock(in_channels=2048, out_channels=4096, dilation=4, dropout=B7_DROPOUT)
        self.bn7 = _bn(4096)

        self._freeze()

    def _freeze(self) -> None:
        for name, param in self.named_parameters():
            if name.split(".", 1)[0] in self.frozen_prefixes:
                param.requires_grad_(False)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.requires_grad_(False)
                    module.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet38:
        """Set training mode; BatchNorm layers stay in eval mode when ``freeze_bn`` (reference).

        Like the reference, this also re-freezes the frozen parameters, in case generic code
        switched ``requires_grad`` back on.
        """
        super().train(mode)
        self._freeze()
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward_dict(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised outputs of stages b4-b7 (see :data:`FEATURE_SETS`).

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: ``{"b4": (B, 512, h, w), "b5": (B, 1024, h, w), "b6": (B, 2048, h, w),
              "b7": (B, 4096, h, w)}`` with ``h, w = ceil(H/8), ceil(W/8)``.
        """
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x, _ = block(x)
        x, b4 = self.b5(x)
        x, _ = self.b5_1(x)
        x, _ = self.b5_2(x)
        x, b5 = self.b6(x)
        x, b6 = self.b7(x)
        b7 = F.relu(self.bn7(x))
        return {"b4": b4, "b5": b5, "b6": b6, "b7": b7}

    def forward(self, x: Tensor) -> list[Tensor]:
        """Three stage maps at output stride 8, chosen by ``features``.

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: list of ``(B, stage_channels[i], ceil(H/8), ceil(W/8))``.
        """
        maps = self.forward_dict(x)
        return [maps[name] for name in FEATURE_SETS[self.features]]


@register_backbone("resnet38")
def resnet38(*, features: Literal["stages", "psa"] = "stages", freeze_bn: bool = True) -> ResNet38:
    """Build :class:`ResNet38` (random init; load ImageNet weights with ``weights.load_pretrained``)."""
    return ResNet38(features=features, freeze_bn=freeze_bn)

