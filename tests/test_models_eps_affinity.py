"""EPSNet (head, logits, parameter groups, builder) and AffinityNet (widths, resize, init)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from wsss_tune.models import registry
from wsss_tune.models.affinity_net import AffinityNet, build_affinity_net
from wsss_tune.models.eps_net import EPSNet, build_eps_net, convert_reference_eps
from wsss_tune.models.resnet38 import resnet38
from wsss_tune.models.tiny import tiny
from wsss_tune.models.weights import WeightsError


@pytest.fixture
def builtin_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the registry with whatever backbones are importable (this module imported ours)."""
    if importlib.util.find_spec("wsss_tune.models.resnet_dilated") is None:
        monkeypatch.setattr(registry, "_ensure_builtin", lambda: None)


class FixedMaps(nn.Module):
    """A stand-in backbone that ignores its input and returns given maps."""

    output_stride = 1
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, maps: list[Tensor]) -> None:
        super().__init__()
        self.maps = maps
        self.stage_channels = tuple(m.shape[1] for m in maps)
        self.out_channels = self.stage_channels[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.maps


# ---- EPSNet -------------------------------------------------------------------------------------


def test_eps_head_layout() -> None:
    """1x1 conv 64 -> C+1 = 6 without bias; Xavier-uniform bound sqrt(6 / (64 + 6)) = 0.2928."""
    torch.manual_seed(0)
    net = EPSNet(backbone=tiny(), num_classes=5)
    assert net.head.bias is None and tuple(net.head.weight.shape) == (6, 64, 1, 1)
    bound = math.sqrt(6 / (64 + 6))
    assert net.head.weight.abs().max() <= bound and net.head.weight.abs().max() > 0.8 * bound
    logits, maps = net(torch.randn(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 6) and tuple(maps.shape) == (2, 6, 8, 8)
    assert torch.allclose(logits, maps.mean(dim=(2, 3)))
    assert torch.equal(net.forward_maps(torch.zeros(1, 3, 32, 32)), net(torch.zeros(1, 3, 32, 32))[1])


def test_eps_logits_are_mean_of_maps_by_hand() -> None:
    """Backbone map with channel 0 = [[1, 2], [3, 4]] and channel 1 = [[0, 0], [0, 4]]; C = 1, head
    rows (1, 0) and (1, -1). Maps: [[1, 2], [3, 4]] (mean 2.5) and [[1, 2], [3, 0]] (mean 1.5), so
    the image logits are (2.5, 1.5), the background (last) logit 1.5."""
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 4.0]]]])
    net = EPSNet(backbone=FixedMaps([feat, feat, feat]), num_classes=1)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]).view(2, 2, 1, 1))
    logits, maps = net(torch.zeros(1, 3, 2, 2))
    assert logits.tolist() == [[2.5, 1.5]]
    assert maps[0, 1].tolist() == [[1.0, 2.0], [3.0, 0.0]]


def test_eps_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        EPSNet(backbone=tiny(), num_classes=0)
    with pytest.raises(TypeError, match="Conv2d lacks stage_channels, output_stride"):
        EPSNet(backbone=nn.Conv2d(3, 3, 1), num_classes=2)


def test_eps_param_groups_tiny() -> None:
    """Everything of the tiny backbone trains at lr: its 7 conv weights with weight decay, its
    7 BatchNorms' weight and bias (14 tensors) without; the head at 10 x lr with decay."""
    net = EPSNet(backbone=tiny(), num_classes=5)
    groups = net.param_groups(0.01, 10.0, 5e-4)
    assert [(g["name"], g["lr"], g["lr_mult"], g["weight_decay"]) for g in groups] == [
        ("backbone", 0.01, 1.0, 5e-4), ("bb_norm", 0.01, 1.0, 0.0), ("head", pytest.approx(0.1), 10.0, 5e-4)]
    assert [len(g["params"]) for g in groups] == [7, 14, 1]
    assert all(p.ndim == 4 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert groups[2]["params"] == [net.head.weight]
    torch.optim.SGD(groups, lr=0.01)  # a valid optimizer spec


def test_eps_param_groups_resnet38_exclude_frozen() -> None:
    """ResNet-38 trains its 43 conv weights minus the 8 frozen ones (conv1a, 3 in b2, 2 in b2_1,
    2 in b2_2); BatchNorm is frozen, so the backbone group holds 35 tensors."""
    with torch.device("meta"):
        net = EPSNet(backbone=resnet38(), num_classes=20)
    backbone, head = net.param_groups(0.01)
    ids = {id(p) for p in backbone["params"]}
    assert len(ids) == 35 and id(net.backbone.conv1a.weight) not in ids
    assert id(net.backbone.b2_2.conv_branch2b1.weight) not in ids and id(net.backbone.b3.conv_branch1.weight) in ids
    assert head["params"] == [net.head.weight]


def test_convert_reference_eps() -> None:
    state = {"module.conv1a.weight": 1, "module.b7.bn_branch2a.running_mean": 2, "module.fc8.weight": 3}
    assert convert_reference_eps(state) == {"backbone.conv1a.weight": 1, "backbone.b7.bn_branch2a.running_mean": 2,
                                            "head.weight": 3}


def test_build_eps_net_loads_backbone(tmp_path: Path, builtin_registry: None) -> None:
    torch.manual_seed(0)
    src = tiny(output_stride=8)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    net = build_eps_net(backbone="tiny", num_classes=3, pretrained=str(path), backbone_kwargs={"output_stride": 8})
    assert net.output_stride == 8 and net.pretrained_report is not None and net.pretrained_report.complete
    assert torch.equal(net.backbone.layer2[0][0].weight, src.layer2[0][0].weight)
    assert build_eps_net(backbone="tiny", num_classes=3).pretrained_report is None
    with pytest.raises(WeightsError, match=r"tiny\.pth: does not fit TinyBackbone.*shape mismatches"):
        build_eps_net(backbone="tiny", num_classes=3, pretrained=str(path), backbone_kwargs={"widths": (16, 32, 48)})


# ---- AffinityNet --------------------------------------------------------------------------------


def test_affinity_width_on_tiny() -> None:
    """Three 1x1 reductions to the widths, concat, 1x1 conv to out_channels; tiny maps share the
    stride so the output is at 32 / 4 = 8."""
    net = AffinityNet(backbone=tiny(), widths=(4, 8, 12), out_channels=20)
    assert [tuple(c.weight.shape) for c in net.reduce] == [(4, 16, 1, 1), (8, 32, 1, 1), (12, 64, 1, 1)]
    assert tuple(net.fuse.weight.shape) == (20, 24, 1, 1)
    assert all(c.bias is None for c in [*net.reduce, net.fuse])
    out = net(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 20, 8, 8)
    assert out.min() >= -1.0  # ELU output


def test_affinity_default_widths_on_resnet38() -> None:
    """Seed design: 1024/2048/4096 -> 128/256/512 -> concat 896 -> 896 channels at stride 8."""
    torch.manual_seed(0)
    net = AffinityNet(backbone=resnet38()).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32))
    assert tuple(out.shape) == (1, 896, 4, 4)
    assert [c.in_channels for c in net.reduce] == [1024, 2048, 4096]


def test_affinity_resizes_to_last_map_by_hand() -> None:
    """Maps 4x4, 2x2, 2x2 with one channel each; reductions = 1, fuse = identity, so each output
    channel is elu(elu(map)) after resizing to 2x2.
    Map 0 has rows [0, 0, 2, 2]; bilinear 4 -> 2 (align_corners=False) samples input x = 0.5 and
    2.5, i.e. the means (0 + 0) / 2 = 0 and (2 + 2) / 2 = 2, so channel 0 is [[0, 2], [0, 2]].
    Map 1 = [[-1, 0], [1, 3]]: elu(-1) = e^-1 - 1 = -0.63212, elu(-0.63212) = e^-0.63212 - 1 = -0.46854.
    Map 2 = 5 everywhere stays 5."""
    m0 = torch.tensor([0.0, 0.0, 2.0, 2.0]).repeat(4, 1).view(1, 1, 4, 4)
    m1 = torch.tensor([[-1.0, 0.0], [1.0, 3.0]]).view(1, 1, 2, 2)
    m2 = torch.full((1, 1, 2, 2), 5.0)
    net = AffinityNet(backbone=FixedMaps([m0, m1, m2]), widths=(1, 1, 1), out_channels=3)
    with torch.no_grad():
        for conv in net.reduce:
            conv.weight.fill_(1.0)
        net.fuse.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    out = net(torch.zeros(1, 3, 8, 8))
    assert tuple(out.shape) == (1, 3, 2, 2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 2.0], [0.0, 2.0]]))
    e = math.expm1(math.expm1(-1.0))
    assert torch.allclose(out[0, 1], torch.tensor([[e, 0.0], [1.0, 3.0]]), atol=1e-6)
    assert abs(e - (-0.46854)) < 1e-5
    assert torch.allclose(out[0, 2], torch.full((2, 2), 5.0))


def test_affinity_init_and_param_groups() -> None:
    """Reductions Kaiming-normal (std sqrt(2 / fan_in)), fuse Xavier-uniform with gain 4 (bound
    4 * sqrt(6 / (fan_in + fan_out))); backbone 1x, the four new convs 10x."""
    torch.manual_seed(0)
    net = AffinityNet(backbone=tiny(widths=(64, 64, 64)), widths=(64, 64, 64), out_channels=192)
    std = net.reduce[2].weight.std().item()
    assert abs(std - math.sqrt(2 / 64)) < 0.1 * math.sqrt(2 / 64)
    bound = 4 * math.sqrt(6 / (192 + 192))
    assert bound * 0.9 < net.fuse.weight.abs().max().item() <= bound
    backbone, norm, new = net.param_groups(0.1, 10.0, 5e-4)
    assert new["lr"] == pytest.approx(1.0) and len(new["params"]) == 4
    assert len(backbone["params"]) + len(norm["params"]) == len(list(net.backbone.parameters()))


def test_affinity_bad_widths() -> None:
    with pytest.raises(ValueError, match=r"widths=\(8, 8\): expected 3 positive integers"):
        AffinityNet(backbone=tiny(), widths=(8, 8))


def test_build_affinity_from_eps_state(builtin_registry: None) -> None:
    """The EPS checkpoint's backbone.* initialises the AffinityNet backbone; head.weight is reported
    as unexpected and ignored."""
    torch.manual_seed(0)
    eps = EPSNet(backbone=tiny(), num_classes=5)
    net = build_affinity_net(backbone="tiny", widths=(8, 8, 8), out_channels=16, init_state=eps.state_dict())
    assert torch.equal(net.backbone.layer3[1][0].weight, eps.backbone.layer3[1][0].weight)
    assert net.init_report is not None and net.init_report.unexpected == ["head.weight"]
    assert build_affinity_net(backbone="tiny", widths=(8, 8, 8), out_channels=16).init_report is None
    with pytest.raises(ValueError, match="both init_state and pretrained"):
        build_affinity_net(backbone="tiny", init_state=eps.state_dict(), pretrained="x.pth")
    with pytest.raises(WeightsError, match="EPS checkpoint state: no key fits"):
        build_affinity_net(backbone="tiny", init_state={"backbone.other": torch.zeros(1)})


def test_build_affinity_from_pretrained_file(tmp_path: Path, builtin_registry: None) -> None:
    src = tiny()
    path = tmp_path / "imagenet.pt"
    torch.save(src.state_dict(), path)
    net = build_affinity_net(backbone="tiny", widths=(8, 8, 8), out_channels=16, pretrained=str(path))
    assert net.init_report is not None and net.init_report.complete
    assert torch.equal(net.backbone.stem[1][0].weight, src.stem[1][0].weight)
