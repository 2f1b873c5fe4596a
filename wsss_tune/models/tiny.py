"""A tiny CPU backbone for tests and the synthetic demo (DESIGN.md section 4).

Seven conv3x3 + BN + ReLU layers, widths 16/32/64, **no dilation**: the prototype showed that a large
receptive field bloats the CAMs until almost no class passes the EPS overlap threshold. All
downsampling happens before the first returned map, so the three maps share the output stride
(what AffinityNet concatenates):

=======  =================================================  ========
module   layers                                             returned
=======  =================================================  ========
stem     conv 3->w0 (stride 2), conv w0->w0 (stride 2)
layer1   conv w0->w0 (stride 2 when ``output_stride=8``)    w0
layer2   conv w0->w1, conv w1->w1                           w1
layer3   conv w1->w2, conv w2->w2                           w2
=======  =================================================  ========

Unlike ResNet-38 it is trained from scratch: BatchNorm trains and nothing is frozen.
"""

from __future__ import annotations

from torch import Tensor, nn

from wsss_tune.models.registry import register_backbone

__all__ = ["ConvBNReLU", "TinyBackbone", "tiny", "TINY_WIDTHS", "TINY_OUTPUT_STRIDES"]

#: Channel widths of the three returned stages (DESIGN.md section 4 prototype).
TINY_WIDTHS: tuple[int, int, int] = (16, 32, 64)
#: Supported output strides: 4 (prototype default) or 8 (the reference backbones' stride).
TINY_OUTPUT_STRIDES: tuple[int, ...] = (4, 8)
#: Downsampling done by the two stem convolutions (stride 2 each).
_STEM_STRIDE = 4


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias) + BatchNorm + ReLU.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class TinyBackbone(nn.Module):
    """Seven-layer plain CNN; returns three maps at ``output_stride`` (registry contract).

    Args:
        widths: channels of the three returned stages.
        output_stride: 4 or 8.

    Shape:
        - Input: ``(B, 3, H, W)``.
        - Output: list of ``(B, widths[i], ceil(H / s), ceil(W / s))`` with ``s = output_stride``
          (exact for ``H, W`` divisible by ``s``).
    """

    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, *, widths: tuple[int, int, int] = TINY_WIDTHS, output_stride: int = 4) -> None:
        super().__init__()
        if output_stride not in TINY_OUTPUT_STRIDES:
            raise ValueError(f"tiny backbone output_stride={output_stride!r}: expected one of "
                             f"{', '.join(map(str, TINY_OUTPUT_STRIDES))}")
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"tiny backbone widths={widths!r}: expected three positive integers")
        w0, w1, w2 = (int(w) for w in widths)
        self.output_stride = output_stride
        self.stage_channels: tuple[int, int, int] = (w0, w1, w2)
        self.out_channels = w2
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels=3, out_channels=w0, stride=2),
            ConvBNReLU(in_channels=w0, out_channels=w0, stride=2),
        )
        self.layer1 = ConvBNReLU(in_channels=w0, out_channels=w0, stride=output_stride // _STEM_STRIDE)
        self.layer2 = nn.Sequential(
            ConvBNReLU(in_channels=w0, out_channels=w1),
            ConvBNReLU(in_channels=w1, out_channels=w1),
        )
        self.layer3 = nn.Sequential(
            ConvBNReLU(in_channels=w1, out_channels=w2),
            ConvBNReLU(in_channels=w2, out_channels=w2),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init for ReLU networks trained from scratch (torchvision's ResNet choice).
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        """Three maps at the output stride (see class docstring for shapes)."""
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


@register_backbone("tiny")
def tiny(*, output_stride: int = 4, widths: tuple[int, int, int] = TINY_WIDTHS) -> TinyBackbone:
    """Build :class:`TinyBackbone` (random init)."""
    return TinyBackbone(widths=tuple(widths), output_stride=output_stride)  # type: ignore[arg-type]
