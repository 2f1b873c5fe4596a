"""ResNet-38 and the tiny backbone: shapes, output stride, frozen layers, BatchNorm mode."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from wsss_tune.models import registry
from wsss_tune.models.resnet38 import FROZEN_PREFIXES, ResNet38, resnet38
from wsss_tune.models.tiny import TinyBackbone, tiny


@pytest.fixture
def builtin_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the registry with whatever backbones are importable (this module imported ours)."""
    if importlib.util.find_spec("wsss_tune.models.resnet_dilated") is None:
        monkeypatch.setattr(registry, "_ensure_builtin", lambda: None)


@pytest.fixture(scope="module")
def net() -> ResNet38:
    torch.manual_seed(0)
    return resnet38()


def test_resnet38_shapes_at_output_stride_8(net: ResNet38) -> None:
    """64x64 input: three stride-2 stages (b2, b3, b4) give 64 / 2**3 = 8; b5-b7 keep the size.

    The maps are b5, b6 and the final b7+bn7 output with 1024, 2048 and 4096 channels.
    """
    net.eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 1024, 8, 8), (1, 2048, 8, 8), (1, 4096, 8, 8)]
    assert net.stage_channels == (1024, 2048, 4096)
    assert net.out_channels == 4096
    assert net.output_stride == 8
    # The last map is relu(bn7(.)): non-negative.
    assert maps[-1].min() >= 0


def test_resnet38_odd_size_rounds_up(net: ResNet38) -> None:
    """A 3x3 stride-2 conv with padding 1 maps n -> floor((n - 1) / 2) + 1 = ceil(n / 2):
    44 -> 22 -> 11 -> 6, so a 44x36 input gives 6x5 maps (36 -> 18 -> 9 -> 5)."""
    net.eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 44, 36))
    assert all(tuple(m.shape[-2:]) == (6, 5) for m in maps)


def test_resnet38_psa_feature_set() -> None:
    """``features='psa'`` returns b4, b5, b7 (512, 1024, 4096 channels), as the PSA AffinityNet."""
    bb = resnet38(features="psa").eval()
    with torch.no_grad():
        maps = bb(torch.randn(1, 3, 16, 16))
    assert bb.stage_channels == (512, 1024, 4096)
    assert [m.shape[1] for m in maps] == [512, 1024, 4096]
    with pytest.raises(ValueError, match="features='nope'"):
        resnet38(features="nope")  # type: ignore[arg-type]


def test_resnet38_dilations_and_strides(net: ResNet38) -> None:
    """Reference layout: b5's first conv undilated then dilation 2, b6/b7 dilation 4; only the first
    blocks of b2, b3, b4 are strided; b6 and b7 are bottlenecks out/4 -> out/2 -> out."""
    assert net.b5.conv_branch2a.dilation == (1, 1) and net.b5.conv_branch2b1.dilation == (2, 2)
    assert net.b5_2.conv_branch2a.dilation == (2, 2)
    assert net.b6.conv_branch2b1.dilation == (4, 4) and net.b7.conv_branch2b1.dilation == (4, 4)
    strided = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == ["b2.conv_branch2a", "b2.conv_branch1", "b3.conv_branch2a", "b3.conv_branch1",
                       "b4.conv_branch2a", "b4.conv_branch1"]
    assert tuple(net.b7.conv_branch2b1.weight.shape) == (2048, 1024, 3, 3)
    assert net.b6.dropout_2b1.p == 0.3 and net.b7.dropout_2b2.p == 0.5


def test_resnet38_bn_stays_eval_after_train(net: ResNet38) -> None:
    """After ``.train()`` every BatchNorm is in eval mode with frozen affine, while the Dropout2d
    layers do train; a training forward leaves the running statistics untouched."""
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 3 * 2 + 3 * 2 + 6 * 2 + 3 * 2 + 3 + 3  # bn7 + 2 per basic block + 3 per bottleneck
    assert not any(m.training for m in bns)
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    assert net.b6.dropout_2b1.training and net.training
    before = net.b3.bn_branch2a.running_mean.clone()
    net(torch.randn(1, 3, 16, 16))
    assert torch.equal(before, net.b3.bn_branch2a.running_mean)
    net.eval()


def test_resnet38_frozen_layers_get_no_grad(net: ResNet38) -> None:
    """conv1a and the three b2 blocks are frozen (reference ``not_training``); b3 onwards trains."""
    net.requires_grad_(True)  # generic code switching everything on; train() re-freezes
    net.train()
    net.zero_grad(set_to_none=True)
    net(torch.randn(1, 3, 16, 16))[-1].sum().backward()
    assert FROZEN_PREFIXES == ("conv1a", "b2", "b2_1", "b2_2")
    for name, p in net.named_parameters():
        frozen = name.split(".")[0] in FROZEN_PREFIXES or ".bn_" in name or name.startswith("bn7")
        assert p.requires_grad == (not frozen), name
        assert (p.grad is None) == frozen, name
    net.zero_grad(set_to_none=True)
    net.eval()


def test_resnet38_freeze_bn_false_trains_bn() -> None:
    """``freeze_bn=False`` leaves BatchNorm in training mode with trainable affine."""
    bb = resnet38(freeze_bn=False).train()
    assert bb.b3.bn_branch2a.training and bb.b3.bn_branch2a.weight.requires_grad
    assert not bb.conv1a.weight.requires_grad


def test_resnet38_registered(builtin_registry: None) -> None:
    with torch.device("meta"):  # structure only
        assert isinstance(registry.create_backbone("resnet38"), ResNet38)
    assert {"resnet38", "tiny"} <= set(registry.list_backbones())


# ---- tiny ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [4, 8])
def test_tiny_three_maps_at_output_stride(stride: int) -> None:
    """96x96 input: all three maps at 96 / stride, channels 16/32/64; 7 conv layers, no dilation."""
    bb = tiny(output_stride=stride)
    maps = bb(torch.randn(2, 3, 96, 96))
    assert [tuple(m.shape) for m in maps] == [(2, c, 96 // stride, 96 // stride) for c in (16, 32, 64)]
    assert (bb.stage_channels, bb.out_channels, bb.output_stride) == ((16, 32, 64), 64, stride)
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and all(c.dilation == (1, 1) and c.kernel_size == (3, 3) for c in convs)


def test_tiny_trains_everything() -> None:
    """Trained from scratch: no frozen prefixes, BatchNorm in training mode after ``.train()``."""
    bb = tiny().train()
    assert bb.frozen_prefixes == ()
    assert all(p.requires_grad for p in bb.parameters())
    assert all(m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))


def test_tiny_bad_arguments() -> None:
    with pytest.raises(ValueError, match="output_stride=16"):
        tiny(output_stride=16)
    with pytest.raises(ValueError, match="widths"):
        TinyBackbone(widths=(16, 32))  # type: ignore[arg-type]


def test_tiny_registered(builtin_registry: None) -> None:
    bb = registry.create_backbone("tiny", output_stride=8)
    assert isinstance(bb, TinyBackbone) and bb.output_stride == 8
