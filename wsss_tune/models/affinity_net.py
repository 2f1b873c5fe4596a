"""AffinityNet (Ahn & Kwak, CVPR 2018): a backbone and a small head giving per-pixel affinity features.

The last three backbone maps are each reduced by a 1x1 conv (widths 128/256/512 in the seed design,
half that in the public PSA code), passed through ELU, concatenated and mixed by a 1x1 conv + ELU.
Pair affinities ``exp(-mean_c |f_i - f_j|)`` are computed from these features by
:mod:`wsss_tune.ops.affinity`, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.models.eps_net import HEAD_LR_MULT, backbone_head_param_groups, check_backbone_contract
from wsss_tune.models.registry import create_backbone
from wsss_tune.models.weights import LoadReport, load_pretrained, load_state
from wsss_tune.utils.runtime import full_precision

__all__ = ["AffinityNet", "build_affinity_net", "AFFINITY_WIDTHS", "AFFINITY_OUT_CHANNELS"]

log = logging.getLogger(__name__)

#: Reduction widths for the last three backbone maps and the final width (seed design, DESIGN.md
#: section 2; the PSA reference uses 64/128/256 -> 448).
AFFINITY_WIDTHS: tuple[int, int, int] = (128, 256, 512)
AFFINITY_OUT_CHANNELS = 896
#: Xavier gain of the final 1x1 conv (PSA ``resnet38_aff.py``: ``xavier_uniform_(f9.weight, gain=4)``).
FUSE_INIT_GAIN = 4.0
#: Interpolation used when the three maps differ in size (our choice; equal sizes for the built-in
#: backbones, which return all three at the output stride).
RESIZE_MODE = "bilinear"


class AffinityNet(nn.Module):
    """Backbone + reduce (1x1 conv, ELU) x 3 + concat + fuse (1x1 conv, ELU).

    The reduction convs have no bias and Kaiming-normal init, the fuse conv no bias and Xavier-uniform
    init with gain 4 (PSA reference). Reduced maps whose size differs from the last map's are resized
    to it (bilinear) before concatenation. The fuse conv runs in float32 with autocast off, so the
    features (and the affinities made from them) are float32 under mixed precision too.

    Args:
        backbone: a registry backbone (three maps, ``stage_channels``).
        widths: output channels of the three reductions.
        out_channels: channels of the affinity features.

    Shape:
        - Input: ``(B, 3, H, W)``.
        - Output: ``(B, out_channels, h, w)`` with ``h, w`` the size of the backbone's last map.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        widths: Sequence[int] = AFFINITY_WIDTHS,
        out_channels: int = AFFINITY_OUT_CHANNELS,
    ) -> None:
        super().__init__()
        spec = check_backbone_contract(backbone, "AffinityNet")
        widths = tuple(int(w) for w in widths)
        in_channels = spec.stage_channels
        if len(widths) != len(in_channels) or any(w < 1 for w in widths):
            raise ValueError(f"AffinityNet widths={widths!r}: expected {len(in_channels)} positive integers, one "
                             f"per backbone map (channels {in_channels})")
        if out_channels < 1:
            raise ValueError(f"AffinityNet out_channels={out_channels!r}: expected a positive integer")
        self.backbone = backbone
        self.widths = widths
        self.out_channels = int(out_channels)
        self.output_stride = spec.output_stride
        reduce = [nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, widths, strict=True)]
        for conv in reduce:
            nn.init.kaiming_normal_(conv.weight)
        self.reduce = nn.ModuleList(reduce)
        self.fuse = nn.Conv2d(sum(widths), self.out_channels, 1, bias=False)
        nn.init.xavier_uniform_(self.fuse.weight, gain=FUSE_INIT_GAIN)
        #: Report of the weight load done by :func:`build_affinity_net` (None if none).
        self.init_report: LoadReport | None = None

    @property
    def new_layers(self) -> nn.ModuleList:
        """Layers trained from scratch (the ones at ``head_lr_mult``)."""
        return nn.ModuleList([*self.reduce, self.fuse])

    def forward(self, x: Tensor) -> Tensor:
        """Affinity features.

        Shape:
            - Input: ``(B, 3, H, W)``.
            - Output: ``(B, out_channels, h, w)``.
        """
        maps = self.backbone(x)
        size = maps[-1].shape[-2:]
        reduced = []
        for conv, m in zip(self.reduce, maps, strict=True):
            r = F.elu(conv(m))
            if r.shape[-2:] != size:
                r = F.interpolate(r, size=size, mode=RESIZE_MODE, align_corners=False)
            reduced.append(r)
        fused = torch.cat(reduced, dim=1)
        # The features become affinities exp(-mean|f_i - f_j|), raised to beta = 8 by the walk: they
        # are made in float32 even under autocast (bf16 keeps 8 bits, which would quantise the pairs).
        with full_precision(fused.device):
            return F.elu(self.fuse(fused.float()))

    def param_groups(self, lr: float, head_lr_mult: float = HEAD_LR_MULT,
                     weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Backbone at ``lr`` (frozen parameters excluded), new layers at ``lr * head_lr_mult``."""
        return backbone_head_param_groups(backbone=self.backbone, head=self.new_layers, lr=lr,
                                          head_lr_mult=head_lr_mult, weight_decay=weight_decay)


def build_affinity_net(
    *,
    backbone: str,
    widths: Sequence[int] = AFFINITY_WIDTHS,
    out_channels: int = AFFINITY_OUT_CHANNELS,
    init_state: Mapping[str, Any] | None = None,
    pretrained: str = "",
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> AffinityNet:
    """Create the named backbone, initialise it, and add the affinity head.

    Args:
        backbone: registry name.
        widths, out_channels: see :class:`AffinityNet`.
        init_state: an EPS checkpoint's state dict (:class:`~wsss_tune.models.eps_net.EPSNet` keys
            ``backbone.*``; ``head.*`` is ignored): the backbone starts from the trained EPS backbone.
        pretrained: otherwise, a local ImageNet weights file for the backbone.
        backbone_kwargs: extra builder arguments.

    Raises:
        ValueError: both ``init_state`` and ``pretrained`` given.
        WeightsError: the weights do not fit the backbone.
    """
    if init_state is not None and pretrained:
        raise ValueError(f"build_affinity_net: got both init_state and pretrained={pretrained!r}; pass one "
                         "(EPS backbone or ImageNet weights)")
    bb = create_backbone(backbone, **dict(backbone_kwargs or {}))
    report = None
    if init_state is not None:
        report = load_state(bb, init_state, source="EPS checkpoint state", strict_backbone=True)
    elif pretrained:
        report = load_pretrained(bb, pretrained, strict_backbone=True)
    if report is not None:
        log.info("AffinityNet backbone %s: %s", backbone, report.summary())
    net = AffinityNet(backbone=bb, widths=widths, out_channels=out_channels)
    net.init_report = report
    return net
