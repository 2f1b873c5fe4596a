"""`wsss-tune weights inspect`: what a file holds, what it fits, and its keys by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsss_tune.cli import app
from wsss_tune.doctor import describe_weights, weights_fit
from wsss_tune.models.tiny import tiny
from wsss_tune.models.weights import WeightsError, write_mxnet_params

runner = CliRunner()


@pytest.fixture
def tiny_pth(tmp_path: Path) -> Path:
    """The tiny backbone's 42 keys minus ``stem.0.0.weight``, plus a classifier ``fc.weight`` (10 x 64)."""
    state = tiny().state_dict()
    del state["stem.0.0.weight"]
    state["fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def a1_subset(tmp_path: Path) -> Path:
    """An MXNet ResNet-38 "A1" subset: conv1a (64x3x3x3), block 2a's three convs and two BNs x 4
    entries, and the ImageNet classifier: 1 + 3 + 8 + 2 = 14 arrays."""
    rng = np.random.default_rng(0)
    shapes = {"arg:conv1a_weight": (64, 3, 3, 3), "arg:res2a_branch2a_weight": (128, 64, 3, 3),
              "arg:res2a_branch2b1_weight": (128, 128, 3, 3), "arg:res2a_branch1_weight": (128, 64, 1, 1),
              "arg:linear1000_weight": (1000, 4096), "arg:linear1000_bias": (1000,)}
    for br, c in (("2a", 64), ("2b1", 128)):
        for p in ("gamma", "beta", "moving_mean", "moving_var"):
            shapes[f"{'aux' if 'moving' in p else 'arg'}:bn2a_branch{br}_{p}"] = (c,)
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    write_mxnet_params(path, {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    return path


def test_inspect_tiny_pth_names_missing_and_unexpected(tiny_pth: Path) -> None:
    """42 - 1 + 1 = 42 keys; tiny needs 35 values (7 convs + 7 BNs x 4; step counters excluded), 34
    of them present: best fit tiny at 34/35 (97%); missing stem.0.0.weight, unexpected fc.weight."""
    result = runner.invoke(app, ["weights", "inspect", str(tiny_pth)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format torch (layout other), 42 keys" in out
    assert "tiny                     34/35 (97%)" in out
    assert "compared with tiny:" in out and "loaded: 34" in out
    assert "missing (model keys the file lacks): 1\n    stem.0.0.weight" in out
    assert "unexpected (file keys the model lacks): 1\n    fc.weight" in out


def test_inspect_mxnet_subset(a1_subset: Path) -> None:
    """After renaming, the subset fits resnet38 best: 12 of its 191 keys (conv1a, b2's 3 convs and
    2 x 4 BN entries); the classifier's 2 arrays are unexpected; 179 keys are missing, listed 20 at a
    time unless --all. The largest tensor is the 1000 x 4096 classifier."""
    result = runner.invoke(app, ["weights", "inspect", str(a1_subset)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format mxnet (layout mxnet_resnet38), 14 keys" in out
    assert "resnet38                 12/191" in out and "compared with resnet38:" in out
    assert "linear1000_weight [1000, 4096]" in out
    assert "unexpected (file keys the model lacks): 2\n    linear1000_bias\n    linear1000_weight" in out
    assert "missing (model keys the file lacks): 179" in out and "... and 159 more" in out
    full = runner.invoke(app, ["weights", "inspect", str(a1_subset), "--all"])
    assert "... and" not in full.output and "b7.conv_branch2b2.weight" not in out
    assert "bn7.running_var" in full.output


def test_inspect_against_a_chosen_backbone(a1_subset: Path) -> None:
    """--backbone tiny: no key of the ResNet-38 file fits tiny, which the fit section says."""
    result = runner.invoke(app, ["weights", "inspect", str(a1_subset), "--backbone", "tiny"])
    assert result.exit_code == 0, result.output
    assert "compared with tiny:" in result.output and "no key fits TinyBackbone" in result.output


def test_caffe_named_file_fits_a_caffe_layout_resnet(tmp_path: Path) -> None:
    """A deeplab-pytorch (Caffe) file with the stem (conv 64x3x7x7 + BN x 4 + step counter) and the
    first 1x1 reduce conv (64x64x1x1 = layer1.0.conv1): inspect_weights' raw names fit nothing, but
    renamed onto a caffe-layout ResNet it fits resnet50 and resnet101 with 1 + 4 + 1 = 6 keys each;
    resnet50 has fewer keys, so its fraction is higher and it is the best fit."""
    state = {"layer1.conv1.conv.weight": torch.zeros(64, 3, 7, 7)}
    for p in ("weight", "bias", "running_mean", "running_var"):
        state[f"layer1.conv1.bn.{p}"] = torch.zeros(64)
    state["layer1.conv1.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    state["layer2.block1.reduce.conv.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "deeplabv1_resnet101-coco-stem.pth"
    torch.save(state, path)
    info = describe_weights(path)
    assert info["layout"] == "deeplab_caffe" and info["best_fit"] == "resnet50"
    caffe = {f["backbone"]: f for f in info["fits"] if f.get("layout") == "caffe"}
    assert caffe["resnet50"]["matched"] == caffe["resnet101"]["matched"] == 6
    assert caffe["resnet50"]["fraction"] > caffe["resnet101"]["fraction"]
    assert "conv1.weight" in info["fit"]["loaded"] and "layer1.0.conv1.weight" in info["fit"]["loaded"]
    result = runner.invoke(app, ["weights", "inspect", str(path)])
    assert "resnet50 (caffe layout)" in result.output


def test_weights_fit_reads_like_the_pipeline(a1_subset: Path) -> None:
    """The dry run renames MXNet arrays like load_pretrained and touches no real memory."""
    report = weights_fit(a1_subset, backbone="resnet38")
    assert "b2.conv_branch1.weight" in report.loaded and report.unexpected == ["linear1000_bias",
                                                                               "linear1000_weight"]
    with pytest.raises(WeightsError, match="no key fits"):
        weights_fit(a1_subset, backbone="tiny")


def test_inspect_unreadable_file(tmp_path: Path) -> None:
    """A truncated .pth is an error naming the file (exit 2), not a traceback."""
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    result = runner.invoke(app, ["weights", "inspect", str(path)])
    assert result.exit_code == 2 and "broken.pth: cannot read PyTorch weights" in result.output
    result = runner.invoke(app, ["weights", "inspect", str(tmp_path / "nothere.params")])
    assert result.exit_code == 2 and "nothere.params: no such weights file" in result.output
