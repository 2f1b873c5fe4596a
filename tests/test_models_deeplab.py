"""Dilated ResNets, DeepLab v1/v2 heads, MSC, LR groups, frozen BN and the deeplab-pytorch key mapping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss_tune.models.deeplab import (
    ASPP_RATES,
    MSC,
    ASPPHead,
    DeepLab,
    LargeFOVHead,
    build_deeplab,
    deeplab_param_groups,
)
from wsss_tune.models.deeplab_weights import (
    convert_deeplab_caffe,
    convert_torchvision_resnet,
    detect_source_format,
    to_deeplab_names,
)
from wsss_tune.models.resnet_dilated import (
    CAFFE_MEAN_BGR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DilatedResNet,
    resnet50,
)
from wsss_tune.models.tiny import tiny
from wsss_tune.models.weights import WeightsError

NUM_CLASSES = 21


@pytest.fixture(scope="module")
def r50() -> DilatedResNet:
    torch.manual_seed(0)
    return resnet50()


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


# ---- heads ----------------------------------------------------------------------------------------


def test_aspp_head_branches() -> None:
    """v2: four 3x3 convs with dilation = padding = 6, 12, 18, 24, straight 2048 -> classes, with
    bias; weights ~ N(0, 0.01) (sample std of 4 x 2048*9*21 ~ 1.5M values is within 1 % of 0.01)
    and zero bias."""
    torch.manual_seed(0)
    head = ASPPHead(in_channels=2048, num_classes=NUM_CLASSES)
    assert len(head.convs) == 4
    assert [c.dilation for c in head.convs] == [(r, r) for r in (6, 12, 18, 24)]
    assert [c.padding for c in head.convs] == [(r, r) for r in (6, 12, 18, 24)]
    for conv in head.convs:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
        assert (conv.in_channels, conv.out_channels) == (2048, NUM_CLASSES)
        assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0
    weights = torch.cat([c.weight.flatten() for c in head.convs])
    assert weights.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(weights.mean().item()) < 1e-4


def test_aspp_output_is_the_sum_of_the_branches() -> None:
    torch.manual_seed(0)
    head = ASPPHead(in_channels=8, num_classes=3)
    for conv in head.convs:  # non-zero biases so that a missing bias term would show
        nn.init.uniform_(conv.bias, -1.0, 1.0)
    x = torch.randn(2, 8, 30, 30)
    expected = sum(F.conv2d(x, c.weight, c.bias, padding=r, dilation=r) for c, r in zip(head.convs, ASPP_RATES, strict=True))
    out = head(x)
    assert out.shape == (2, 3, 30, 30)
    assert torch.allclose(out, expected, atol=1e-5)


def test_largefov_head_layers() -> None:
    """v1: fc6 3x3 dilation 12 (padding 12) 2048 -> 1024, ReLU, dropout 0.5, fc7 1x1 1024 -> 1024,
    ReLU, dropout 0.5, fc8 1x1 1024 -> classes; all with bias."""
    head = LargeFOVHead(in_channels=2048, num_classes=NUM_CLASSES)
    assert (head.fc6.kernel_size, head.fc6.dilation, head.fc6.padding) == ((3, 3), (12, 12), (12, 12))
    assert (head.fc6.in_channels, head.fc6.out_channels) == (2048, 1024)
    assert (head.fc7.kernel_size, head.fc7.in_channels, head.fc7.out_channels) == ((1, 1), 1024, 1024)
    assert (head.fc8.kernel_size, head.fc8.in_channels, head.fc8.out_channels) == ((1, 1), 1024, NUM_CLASSES)
    assert head.drop6.p == 0.5 and head.drop7.p == 0.5
    assert all(c.bias is not None for c in (head.fc6, head.fc7, head.fc8))
    order = [type(m).__name__ for m in head.children()]
    assert order == ["Conv2d", "ReLU", "Dropout", "Conv2d", "ReLU", "Dropout", "Conv2d"]


def test_largefov_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    head = LargeFOVHead(in_channels=4, num_classes=3, channels=16)
    x = torch.randn(1, 4, 9, 9)
    head.eval()
    assert torch.equal(head(x), head(x))
    head.train()
    assert not torch.equal(head(x), head(x))


# ---- backbone: output stride, dilations, layouts ----------------------------------------------------


@pytest.mark.parametrize("layout", ["torchvision", "caffe"])
def test_resnet101_output_stride_8(layout: str) -> None:
    """Shapes only (meta device, no compute). 321: conv1 /2 -> 161, max pool -> 81, layer2 /2 -> 41;
    layer3/layer4 keep 41 (dilated). Every 8k+1 size gives k+1 (513 -> 65, 65 -> 9)."""
    with torch.device("meta"):
        model = build_deeplab(arch="v2", backbone="resnet101", num_classes=NUM_CLASSES,
                              backbone_kwargs={"layout": layout})
        for size, expected in ((321, 41), (513, 65), (65, 9)):
            maps = model.backbone(torch.empty(1, 3, size, size))
            logits = model(torch.empty(1, 3, size, size))
            assert [tuple(m.shape) for m in maps] == [(1, c, expected, expected) for c in (512, 1024, 2048)]
            assert tuple(logits.shape) == (1, NUM_CLASSES, expected, expected)
    assert model.output_stride == 8


def test_dilations_per_block() -> None:
    """Reference: every block of layer3 has dilation 2 and of layer4 dilation 4 (padding equal);
    ``contract_dilation`` (torchvision) gives the first blocks 1 and 2."""
    with torch.device("meta"):
        ref = DilatedResNet(depth=101)
        tv = DilatedResNet(depth=101, contract_dilation=True)
    assert len(ref.layer3) == 23 and len(ref.layer4) == 3
    assert {b.conv2.dilation for b in ref.layer3} == {(2, 2)}
    assert {b.conv2.padding for b in ref.layer3} == {(2, 2)}
    assert {b.conv2.dilation for b in ref.layer4} == {(4, 4)}
    assert {b.conv2.dilation for b in ref.layer2} == {(1, 1)}
    assert tv.layer3[0].conv2.dilation == (1, 1) and tv.layer4[0].conv2.dilation == (2, 2)
    assert tv.layer3[1].conv2.dilation == (2, 2) and tv.layer4[1].conv2.dilation == (4, 4)
    for m in (ref, tv):  # no striding after layer2
        assert all(c.stride == (1, 1) for c in m.layer3.modules() if isinstance(c, nn.Conv2d))
        assert all(c.stride == (1, 1) for c in m.layer4.modules() if isinstance(c, nn.Conv2d))


def test_caffe_layout_moves_the_stride_and_rounds_the_pool_up() -> None:
    with torch.device("meta"):
        tv = DilatedResNet(depth=50, layout="torchvision")
        caffe = DilatedResNet(depth=50, layout="caffe")
    assert (tv.layer2[0].conv1.stride, tv.layer2[0].conv2.stride) == ((1, 1), (2, 2))
    assert (caffe.layer2[0].conv1.stride, caffe.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert caffe.layer2[0].downsample[0].stride == (2, 2)
    assert not tv.maxpool.ceil_mode and caffe.maxpool.ceil_mode
    # Same parameter names and shapes: one file fits both layouts.
    assert {k: v.shape for k, v in tv.state_dict().items()} == {k: v.shape for k, v in caffe.state_dict().items()}


def test_caffe_layout_input_conversion() -> None:
    """An RGB pixel (1, 0.5, 0) in [0, 1], ImageNet-normalised, reaches a Caffe-layout network as
    BGR 0..255 minus the Caffe mean: (0, 127.5, 255) - (104.008, 116.669, 122.675)
    = (-104.008, 10.831, 132.325). The torchvision layout passes the input through."""
    rgb = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    x = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.device("meta"):
        caffe = DilatedResNet(depth=50, layout="caffe")
        tv = DilatedResNet(depth=50)
    out = caffe.to_network_input(x).flatten()
    assert torch.allclose(out, torch.tensor([-104.008, 10.831, 132.325]), atol=1e-3)
    assert CAFFE_MEAN_BGR == (104.008, 116.669, 122.675)
    assert tv.to_network_input(x) is x


def test_contracted_torchvision_layout_equals_torchvision(r50: DilatedResNet) -> None:
    """With torchvision's own layout our backbone computes exactly torchvision's dilated ResNet-50
    (same weights, eval mode): its layer4 output equals ours."""
    torch.manual_seed(1)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]).eval()
    ours = DilatedResNet(depth=50, contract_dilation=True).eval()
    report = ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    assert not report.missing_keys and not report.unexpected_keys
    x = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        stem = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(stem))))
        got = ours(x)[-1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_bad_backbone_options() -> None:
    with pytest.raises(ValueError, match="output_stride=16"):
        resnet50(output_stride=16)
    with pytest.raises(ValueError, match="layout='mxnet'"):
        resnet50(layout="mxnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth=34"):
        DilatedResNet(depth=34)


# ---- frozen BatchNorm ---------------------------------------------------------------------------


def test_frozen_bn_stays_frozen(r50: DilatedResNet) -> None:
    """``freeze_bn`` (default): after ``train()`` every BN is in eval mode, its affine parameters
    take no gradient and no optimizer group, and a training step leaves BN statistics and
    affine parameters untouched while the convs move."""
    model = DeepLab(backbone=r50, head=ASPPHead(in_channels=2048, num_classes=3))
    model.train()
    bns = _batchnorms(model)
    assert len(bns) == 53  # stem + 3 per bottleneck (16) + 4 downsample BNs
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "downsample.1" in k}
    conv_before = model.backbone.layer4[2].conv3.weight.clone()
    groups = deeplab_param_groups(model, lr=0.1, weight_decay=0.0)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(p) for bn in bns for p in bn.parameters()}
    opt = torch.optim.SGD(groups, lr=0.1)
    out = model(torch.randn(2, 3, 17, 17))
    out.square().mean().backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(conv_before, model.backbone.layer4[2].conv3.weight)


def test_unfrozen_bn_trains() -> None:
    with torch.device("meta"):
        model = build_deeplab(arch="v2", backbone="resnet50", num_classes=3, freeze_bn=False)
    model.train()
    assert all(bn.training and bn.weight.requires_grad for bn in _batchnorms(model))


# ---- LR groups ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_param_groups_multipliers(arch: str) -> None:
    """Backbone convs at 1x with weight decay, head weights at 10x with weight decay, head biases at
    20x without; frozen BN in no group; every trainable parameter in exactly one group."""
    with torch.device("meta"):
        model = build_deeplab(arch=arch, backbone="resnet50", num_classes=NUM_CLASSES, msc=True)
    groups = {g["name"]: g for g in deeplab_param_groups(model, lr=2.5e-4, weight_decay=5e-4)}
    assert set(groups) == {"backbone", "head", "head_bias"}
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"], groups["backbone"]["lr_mult"]) == \
        (2.5e-4, 5e-4, 1.0)
    assert groups["head"]["lr"] == pytest.approx(2.5e-3) and groups["head"]["weight_decay"] == 5e-4
    assert groups["head_bias"]["lr"] == pytest.approx(5e-3) and groups["head_bias"]["weight_decay"] == 0.0
    assert groups["head_bias"]["lr_mult"] == 20.0
    head = model.base.head
    n_head_convs = 4 if arch == "v2" else 3
    assert [p.ndim for p in groups["head_bias"]["params"]] == [1] * n_head_convs
    assert len(groups["head"]["params"]) == n_head_convs
    assert {id(p) for p in groups["head"]["params"] + groups["head_bias"]["params"]} == \
        {id(p) for p in head.parameters()}
    n_convs = sum(1 for m in model.base.backbone.modules() if isinstance(m, nn.Conv2d))
    assert len(groups["backbone"]["params"]) == n_convs == 53
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_param_groups_with_trainable_bn() -> None:
    """Trainable BN (``freeze_bn=False`` or a from-scratch backbone) gets its own 1x group with no
    weight decay."""
    model = build_deeplab(arch="v2", backbone="tiny", num_classes=4)
    groups = {g["name"]: g for g in model.param_groups(0.01, weight_decay=1e-4)}
    assert set(groups) == {"backbone", "bb_norm", "head", "head_bias"}
    assert groups["bb_norm"]["weight_decay"] == 0.0 and groups["bb_norm"]["lr"] == 0.01
    assert len(groups["bb_norm"]["params"]) == 2 * len(_batchnorms(model.backbone))


# ---- DeepLab and MSC ----------------------------------------------------------------------------


@pytest.fixture()
def tiny_deeplab() -> DeepLab:
    torch.manual_seed(0)
    return DeepLab(backbone=tiny(output_stride=8), head=ASPPHead(in_channels=64, num_classes=5))


def test_deeplab_logits_at_output_stride(tiny_deeplab: DeepLab) -> None:
    out = tiny_deeplab.eval()(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 5, 8, 6)
    assert tiny_deeplab.num_classes == 5


def test_msc_outputs_train_and_eval(tiny_deeplab: DeepLab) -> None:
    """64x64 input, stride 8: full logits 8x8; scale 0.5 -> 32 -> 4x4; 0.75 -> 48 -> 6x6; fused 8x8.
    Training returns the four; eval returns the fused map only, equal to the pixel-wise max of the
    full logits and the bilinearly upsampled scaled ones."""
    model = MSC(base=tiny_deeplab)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    outs = model(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, 5, 8, 8), (2, 5, 4, 4), (2, 5, 6, 6), (2, 5, 8, 8)]
    model.eval()
    with torch.no_grad():
        fused = model(x)
        full = tiny_deeplab(x)
        ups = [F.interpolate(tiny_deeplab(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)),
                             size=(8, 8), mode="bilinear", align_corners=False) for s in (32, 48)]
    assert isinstance(fused, torch.Tensor) and fused.shape == (2, 5, 8, 8)
    assert torch.allclose(fused, torch.maximum(full, torch.maximum(*ups)), atol=1e-6)
    assert torch.all(fused >= full)


def test_build_deeplab_arch_and_wrappers() -> None:
    v1 = build_deeplab(arch="v1", backbone="tiny", num_classes=6, msc=True, backbone_kwargs={"output_stride": 8})
    assert isinstance(v1, MSC) and isinstance(v1.base.head, LargeFOVHead)
    assert v1.base.head.fc6.in_channels == 64 and v1.num_classes == 6
    v2 = build_deeplab(arch="v2", backbone="tiny", num_classes=6)
    assert isinstance(v2, DeepLab) and isinstance(v2.head, ASPPHead)
    with pytest.raises(ValueError, match="arch='v3'"):
        build_deeplab(arch="v3", backbone="tiny", num_classes=6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes=1"):
        build_deeplab(arch="v2", backbone="tiny", num_classes=1)
    with pytest.raises(ValueError, match="head expects 2048"):
        DeepLab(backbone=tiny(), head=ASPPHead(in_channels=2048, num_classes=3))


# ---- deeplab-pytorch / torchvision key mapping ----------------------------------------------------


def test_convert_deeplab_caffe_fake_state() -> None:
    """Key names as in the deeplab-pytorch files (MSC-trained: under ``base.``) map onto
    torchvision names: layer<L>.block<B> -> layer<L-1>.<B-1>; reduce/conv3x3/increase ->
    conv1/conv2/conv3 (bn1/bn2/bn3); shortcut -> downsample.0/.1; aspp.c<i> -> head.convs.<i>."""
    names = {
        "base.layer1.conv1.conv.weight": "backbone.conv1.weight",
        "base.layer1.conv1.bn.weight": "backbone.bn1.weight",
        "base.layer1.conv1.bn.running_var": "backbone.bn1.running_var",
        "base.layer2.block1.reduce.conv.weight": "backbone.layer1.0.conv1.weight",
        "base.layer2.block1.shortcut.conv.weight": "backbone.layer1.0.downsample.0.weight",
        "base.layer2.block1.shortcut.bn.bias": "backbone.layer1.0.downsample.1.bias",
        "base.layer3.block2.conv3x3.bn.running_mean": "backbone.layer2.1.bn2.running_mean",
        "base.layer4.block23.increase.conv.weight": "backbone.layer3.22.conv3.weight",
        "base.layer5.block3.increase.bn.num_batches_tracked": "backbone.layer4.2.bn3.num_batches_tracked",
        "base.aspp.c0.weight": "head.convs.0.weight",
        "base.aspp.c3.bias": "head.convs.3.bias",
    }
    state = {k: torch.full((1,), float(i)) for i, k in enumerate(names)}
    state["fc.weight"] = torch.zeros(91, 2048, 1, 1)  # the v1 COCO classifier: no counterpart
    assert detect_source_format(state) == "deeplab_caffe"
    out, report = convert_deeplab_caffe(state)
    assert {names[k]: v.item() for k, v in state.items() if k in names} == {k: v.item() for k, v in out.items()}
    assert report.renamed == len(names) and report.unmatched == ("fc.weight",)
    # The converter for load_pretrained keeps unmatched keys so that the load reports them.
    assert "fc.weight" in to_deeplab_names(state)
    # DataParallel + no base prefix (the COCO init file) gives the same names.
    plain = {k.replace("base.", "module."): v for k, v in state.items()}
    assert set(convert_deeplab_caffe(plain)[0]) == set(out)


def test_convert_torchvision_fake_state() -> None:
    state = {"conv1.weight": torch.zeros(1), "bn1.running_mean": torch.zeros(1),
             "layer1.0.downsample.1.weight": torch.zeros(1), "layer4.2.conv3.weight": torch.zeros(1),
             "fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
    assert detect_source_format(state) == "other"  # no layer1.0.conv1.weight: not a whole ResNet
    state["layer1.0.conv1.weight"] = torch.zeros(1)
    assert detect_source_format(state) == "torchvision"
    out, report = convert_torchvision_resnet(state)
    assert set(out) == {"backbone." + k for k in state if not k.startswith("fc.")}
    assert report.unmatched == ("fc.weight", "fc.bias")


def _to_caffe_names(tv_key: str) -> str:
    """torchvision ResNet key -> deeplab-pytorch key (the inverse direction, written out for the test)."""
    parts = tv_key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return f"layer1.conv1.{'conv' if parts[0] == 'conv1' else 'bn'}.{parts[1]}"
    layer, block = int(parts[0][5:]), int(parts[1])
    branch = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
              "conv3": "increase.conv", "bn3": "increase.bn"}
    sub = branch.get(parts[2]) or {"0": "shortcut.conv", "1": "shortcut.bn"}[parts[3]]
    return f"layer{layer + 1}.block{block + 1}.{sub}.{parts[-1]}"


def test_caffe_file_round_trip(tmp_path, r50: DilatedResNet) -> None:
    """A ResNet-50 DeepLab v2 saved in deeplab-pytorch names (MSC ``base.`` prefix, ASPP for 21
    classes) loads back exactly: the backbone is built with the caffe layout, every weight and
    BN statistic matches, and the head loads because its shapes fit. With 5 classes the head is
    skipped and reported as mismatched."""
    torch.manual_seed(3)
    src = {("base." + _to_caffe_names(k)): torch.randn_like(v) if v.is_floating_point() else v
           for k, v in r50.state_dict().items()}
    aspp = ASPPHead(in_channels=2048, num_classes=NUM_CLASSES)
    for i, conv in enumerate(aspp.convs):
        src[f"base.aspp.c{i}.weight"] = torch.randn_like(conv.weight)
        src[f"base.aspp.c{i}.bias"] = torch.randn_like(conv.bias)
    path = tmp_path / "deeplabv2_resnet50_msc.pth"
    torch.save(src, path)

    model = build_deeplab(arch="v2", backbone="resnet50", num_classes=NUM_CLASSES, pretrained=str(path))
    assert model.backbone.layout == "caffe"
    state = model.state_dict()
    for k in r50.state_dict():
        assert torch.equal(state[f"backbone.{k}"], src["base." + _to_caffe_names(k)]), k
    assert torch.equal(state["head.convs.2.bias"], src["base.aspp.c2.bias"])
    report = model.pretrained_report
    assert report is not None and report.complete and not report.unexpected

    other = build_deeplab(arch="v2", backbone="resnet50", num_classes=5, pretrained=str(path))
    assert set(other.pretrained_report.mismatched) == {f"head.convs.{i}.{p}" for i in range(4)
                                                       for p in ("weight", "bias")}
    assert torch.count_nonzero(other.head.convs[0].bias) == 0  # kept its initialisation


def test_torchvision_file_loads_with_torchvision_layout(tmp_path) -> None:
    """A torchvision ImageNet file: torchvision layout, weights copied, fc reported as unexpected;
    the same file without one backbone key fails and names it."""
    torch.manual_seed(4)
    tv_state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(tv_state, path)
    model = build_deeplab(arch="v1", backbone="resnet50", num_classes=NUM_CLASSES, pretrained=str(path))
    assert model.backbone.layout == "torchvision"
    assert torch.equal(model.backbone.layer3[5].conv2.weight, tv_state["layer3.5.conv2.weight"])
    assert sorted(model.pretrained_report.unexpected) == ["fc.bias", "fc.weight"]
    del tv_state["layer2.0.conv2.weight"]
    torch.save(tv_state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"layer2\.0\.conv2\.weight"):
        resnet50(pretrained=str(tmp_path / "broken.pth"))


def test_head_init_is_small() -> None:
    """Sanity of the v1 head init: N(0, 0.01) weights and zero bias in fc6, fc7 and fc8."""
    torch.manual_seed(0)
    head = LargeFOVHead(in_channels=2048, num_classes=NUM_CLASSES)
    for conv in (head.fc6, head.fc7, head.fc8):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert torch.count_nonzero(conv.bias) == 0
    assert math.isclose(head.drop6.p, 0.5)
