"""Weight files: the MXNet .params reader/writer, ResNet-38 renaming, load reports, inspection."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsss_tune.models import registry
from wsss_tune.models.resnet38 import ResBlock, ResNet38
from wsss_tune.models.tiny import tiny
from wsss_tune.models.weights import (
    MXNET_LIST_MAGIC,
    NDARRAY_V2_MAGIC,
    WeightsError,
    convert_resnet38_mxnet,
    inspect_weights,
    load_pretrained,
    load_state,
    read_mxnet_params,
    read_weights,
    write_mxnet_params,
)


@pytest.fixture
def builtin_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the registry with whatever backbones are importable (this module imported ours)."""
    if importlib.util.find_spec("wsss_tune.models.resnet_dilated") is None:
        monkeypatch.setattr(registry, "_ensure_builtin", lambda: None)


def a1_names() -> list[str]:
    """Every array name of the MXNet ResNet-38 "A1" ImageNet file, spelled out from its layout:
    conv1a; stages 2-5 of basic blocks a, b1, b2, ... (b4 has six blocks) with conv branch2a,
    branch2b1 (+ branch1 in block a) and BN before each conv; bottlenecks 6a, 7a with conv 2a, 2b1,
    2b2, 1 and three BNs; bn7; the ImageNet classifier linear1000."""
    names = ["arg:conv1a_weight"]
    layout = {2: 3, 3: 3, 4: 6, 5: 3, 6: 1, 7: 1}
    for stage, n in layout.items():
        branches = ["2a", "2b1", "2b2"] if stage >= 6 else ["2a", "2b1"]
        for i in range(n):
            block = "a" if i == 0 else f"b{i}"
            for br in branches:
                names.append(f"arg:res{stage}{block}_branch{br}_weight")
                names += [f"arg:bn{stage}{block}_branch{br}_{p}" for p in ("gamma", "beta")]
                names += [f"aux:bn{stage}{block}_branch{br}_{p}" for p in ("moving_mean", "moving_var")]
            if i == 0:
                names.append(f"arg:res{stage}{block}_branch1_weight")
    names += [f"arg:bn7_{p}" for p in ("gamma", "beta")] + [f"aux:bn7_{p}" for p in ("moving_mean", "moving_var")]
    return names + ["arg:linear1000_weight", "arg:linear1000_bias"]


# ---- MXNet format --------------------------------------------------------------------------------


def test_mxnet_bytes_match_the_format(tmp_path: Path) -> None:
    """One float32 array of shape (2,) named "a" in V2 layout is, byte by byte (little-endian):
    header 8 (0x112) + 8 (reserved 0) + 8 (count 1) = 24; array 4 (magic) + 4 (storage 0) +
    4 (ndim 1) + 8 (dim 2) + 8 (context cpu=1, id 0) + 4 (dtype 0) + 8 (data) = 40; names 8 (count 1)
    + 8 (length 1) + 1 ("a") = 17. Total 81 bytes."""
    path = tmp_path / "one.params"
    write_mxnet_params(path, {"a": np.array([1.5, -2.0], np.float32)})
    data = path.read_bytes()
    assert len(data) == 81
    assert struct.unpack_from("<QQQ", data, 0) == (MXNET_LIST_MAGIC, 0, 1)
    assert struct.unpack_from("<IiiqiiI", data, 24) == (NDARRAY_V2_MAGIC, 0, 1, 2, 1, 0, 0)
    assert struct.unpack_from("<2f", data, 56) == (1.5, -2.0)
    assert struct.unpack_from("<QQ", data, 64) == (1, 1) and data[80:] == b"a"
    assert list(read_mxnet_params(path)) == ["a"]


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_mxnet_round_trip(tmp_path: Path, version: int) -> None:
    """Legacy (uint32 dims), V1 (int64 dims), V2 (+ storage type) and V3 layouts all read back."""
    rng = np.random.default_rng(0)
    arrays = {
        "arg:conv1a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "aux:bn7_moving_mean": rng.standard_normal(5).astype(np.float64),
        "arg:half": rng.standard_normal((2, 3)).astype(np.float16),
        "arg:ids": np.arange(6, dtype=np.int64).reshape(3, 2),
        "arg:bytes": np.array([0, 7, 255], np.uint8),
    }
    path = tmp_path / f"v{version}.params"
    write_mxnet_params(path, arrays, version=version)
    back = read_mxnet_params(path)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_mxnet_bfloat16_and_unnamed(tmp_path: Path) -> None:
    """bfloat16 (dtype flag 12) is the top half of a float32: 0x3F80 -> 1.0, 0xC000 -> -2.0. A file
    saved without names gets keys "0", "1", ..."""
    body = struct.pack("<QQQ", MXNET_LIST_MAGIC, 0, 1)
    body += struct.pack("<Iiiqiii", NDARRAY_V2_MAGIC, 0, 1, 2, 1, 0, 12) + struct.pack("<2H", 0x3F80, 0xC000)
    body += struct.pack("<Q", 0)
    path = tmp_path / "bf16.params"
    path.write_bytes(body)
    back = read_mxnet_params(path)
    assert list(back) == ["0"] and back["0"].dtype == np.float32
    np.testing.assert_array_equal(back["0"], [1.0, -2.0])


def test_mxnet_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.params"
    write_mxnet_params(path, {"arg:conv1a_weight": np.ones((8, 3, 3, 3), np.float32)})
    path.write_bytes(path.read_bytes()[:100])  # inside the data of array #0 (which starts at byte 56)
    with pytest.raises(WeightsError, match=r"cut\.params: truncated.*array #0 data"):
        read_mxnet_params(path)


def test_mxnet_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.params"
    bad.write_bytes(struct.pack("<QQQ", 0x113, 0, 0))
    with pytest.raises(WeightsError, match="bad.params: not an MXNet .params file.*0x112"):
        read_mxnet_params(bad)
    sparse = tmp_path / "sparse.params"
    sparse.write_bytes(struct.pack("<QQQIi", MXNET_LIST_MAGIC, 0, 1, NDARRAY_V2_MAGIC, 1))
    with pytest.raises(WeightsError, match="sparse storage type 1"):
        read_mxnet_params(sparse)
    names = tmp_path / "names.params"
    write_mxnet_params(names, {"a": np.zeros(1, np.float32)})
    data = names.read_bytes()
    names.write_bytes(data[:-17] + struct.pack("<Q", 2) + data[-9:] + data[-9:])  # two names, one array
    with pytest.raises(WeightsError, match="1 arrays but 2 names"):
        read_mxnet_params(names)
    with pytest.raises(WeightsError, match="no such weights file"):
        read_mxnet_params(tmp_path / "absent.params")


# ---- ResNet-38 renaming --------------------------------------------------------------------------


def test_convert_resnet38_subset() -> None:
    """The reference table: arg:/aux: dropped; res<S>a -> b<S>, res<S>b<K> -> b<S>_<K>; gamma/beta/
    moving_mean/moving_var -> weight/bias/running_mean/running_var; unknown names kept."""
    names = ["arg:conv1a_weight", "arg:res2a_branch1_weight", "arg:res4b5_branch2b1_weight",
             "arg:bn3b2_branch2a_gamma", "arg:bn5a_branch2b1_beta", "aux:bn6a_branch2b2_moving_mean",
             "aux:bn7_moving_var", "arg:linear1000_weight"]
    out = convert_resnet38_mxnet({n: np.zeros(1, np.float32) for n in names})
    assert list(out) == ["conv1a.weight", "b2.conv_branch1.weight", "b4_5.conv_branch2b1.weight",
                         "b3_2.bn_branch2a.weight", "b5.bn_branch2b1.bias", "b6.bn_branch2b2.running_mean",
                         "bn7.running_var", "linear1000_weight"]
    assert all(isinstance(v, torch.Tensor) for v in out.values())


def test_convert_resnet38_covers_every_key_once() -> None:
    """All A1 names map onto ResNet38's state dict one to one (num_batches_tracked needs no value);
    only the ImageNet classifier is left over."""
    with torch.device("meta"):
        model_keys = {k for k in ResNet38().state_dict() if not k.endswith("num_batches_tracked")}
    converted = convert_resnet38_mxnet({n: np.zeros(1, np.float32) for n in a1_names()})
    assert len(converted) == len(a1_names())
    assert set(converted) - model_keys == {"linear1000_weight", "linear1000_bias"}
    assert model_keys <= set(converted)


class Stem(nn.Module):
    """The first ResNet-38 layers under their real names: conv1a and block b2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = ResBlock(in_channels=64, mid_channels=128, out_channels=128, stride=2)


def stem_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"arg:conv1a_weight": (64, 3, 3, 3), "arg:res2a_branch2a_weight": (128, 64, 3, 3),
              "arg:res2a_branch2b1_weight": (128, 128, 3, 3), "arg:res2a_branch1_weight": (128, 64, 1, 1),
              "arg:linear1000_weight": (10, 4096), "arg:linear1000_bias": (10,)}
    for br, c in (("2a", 64), ("2b1", 128)):
        for p in ("gamma", "beta", "moving_mean", "moving_var"):
            shapes[f"{'aux' if 'moving' in p else 'arg'}:bn2a_branch{br}_{p}"] = (c,)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_load_mxnet_subset_into_resnet38_names(tmp_path: Path) -> None:
    """A .params file with ResNet-38 names loads by the default converter; the classifier is
    reported as unexpected and the values arrive unchanged."""
    arrays = stem_params(np.random.default_rng(1))
    path = tmp_path / "a1-subset.params"
    write_mxnet_params(path, arrays, version=1)
    model = Stem()
    report = load_pretrained(model, path)
    assert report.complete and report.unexpected == ["linear1000_bias", "linear1000_weight"]
    assert len(report.loaded) == 1 + 3 + 2 * 4
    np.testing.assert_array_equal(model.b2.bn_branch2b1.running_var.numpy(),
                                  arrays["aux:bn2a_branch2b1_moving_var"])
    np.testing.assert_array_equal(model.b2.conv_branch1.weight.detach().numpy(),
                                  arrays["arg:res2a_branch1_weight"])


def test_subset_file_does_not_fit_full_resnet38(tmp_path: Path) -> None:
    """The subset covers 12 of ResNet38's 191 keys (43 conv weights + 37 BatchNorms x 4): a strict
    load names the 179 missing keys, a lenient one says too little fits."""
    path = tmp_path / "a1-subset.params"
    write_mxnet_params(path, stem_params(np.random.default_rng(1)))
    model = ResNet38()
    with pytest.raises(WeightsError, match=r"a1-subset\.params: does not fit ResNet38.*missing \(b2_1\.") as err:
        load_pretrained(model, path)
    assert "179 missing" in str(err.value)
    with pytest.raises(WeightsError, match="only 12 of 191 ResNet38 keys fit"):
        load_pretrained(model, path, strict_backbone=False)


# ---- torch files and reports ---------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module."])
def test_load_torch_file_variants(tmp_path: Path, wrap: str) -> None:
    """Raw state dicts, {"state_dict": ...}, {"model": ...} and DataParallel "module." keys load."""
    torch.manual_seed(0)
    src = tiny()
    state = src.state_dict()
    obj = {"raw": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
           "module.": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    dst = tiny()
    report = load_pretrained(dst, path)
    assert report.complete and not report.unexpected
    assert report.stripped_prefix == ("module." if wrap == "module." else "")
    assert torch.equal(dst.layer3[1][0].weight, src.layer3[1][0].weight)
    assert torch.equal(dst.stem[0][1].running_mean, src.stem[0][1].running_mean)


def test_report_names_missing_and_unexpected_keys() -> None:
    """Drop one key and add one: a lenient load names both; a strict load raises naming the missing
    key."""
    state = dict(tiny().state_dict())
    del state["layer2.0.1.bias"]
    state["extra.weight"] = torch.zeros(3)
    report = load_state(tiny(), state, source="mem", strict_backbone=False)
    assert report.missing == ["layer2.0.1.bias"] and report.unexpected == ["extra.weight"]
    assert not report.complete and "1 missing (layer2.0.1.bias)" in report.summary()
    with pytest.raises(WeightsError, match=r"mem: does not fit TinyBackbone.*layer2\.0\.1\.bias"):
        load_state(tiny(), state, source="mem")


def test_report_shape_mismatches() -> None:
    """Widths 16/32/64 into 16/32/48: the layer3 tensors differ in shape and are named with both
    shapes; the first conv of layer3 is (64, 32, 3, 3) in the file and (48, 32, 3, 3) in the model."""
    state = tiny().state_dict()
    model = tiny(widths=(16, 32, 48))
    before = model.stem[0][0].weight.detach().clone()
    report = load_state(model, state, source="mem", strict_backbone=False)
    assert report.mismatched["layer3.0.0.weight"] == ((64, 32, 3, 3), (48, 32, 3, 3))
    assert all(k.startswith("layer3.") for k in report.mismatched) and not report.missing
    assert not torch.equal(before, model.stem[0][0].weight)  # the rest was loaded
    with pytest.raises(WeightsError, match=r"layer3\.0\.0\.weight file \[64, 32, 3, 3\] vs model \[48, 32, 3, 3\]"):
        load_state(tiny(widths=(16, 32, 48)), state, source="mem")
    with pytest.raises(WeightsError, match=r"mem: no key fits .* 35 keys match by name but not by shape \(stem"):
        load_state(tiny(widths=(8, 16, 32)), state, source="mem")


def test_eps_checkpoint_into_backbone_strips_prefix() -> None:
    """An EPSNet state dict (backbone.*, head.weight) loads into a bare backbone; the head is extra."""
    state = {f"backbone.{k}": v for k, v in tiny().state_dict().items()} | {"head.weight": torch.zeros(6, 64, 1, 1)}
    report = load_state(tiny(), state, source="eps")
    assert report.stripped_prefix == "backbone." and report.unexpected == ["head.weight"] and report.complete


def test_mismatched_file_is_a_clear_error(tmp_path: Path) -> None:
    """Tiny weights into ResNet-38 share no key: the error names the file and keys on both sides."""
    path = tmp_path / "tiny.pth"
    torch.save(tiny().state_dict(), path)
    with torch.device("meta"):
        model = ResNet38()
    with pytest.raises(WeightsError, match=r"tiny\.pth: no key fits ResNet38 .*b2\..*file has 42 keys such as stem"):
        load_pretrained(model, path, strict_backbone=False)


def test_unreadable_files(tmp_path: Path) -> None:
    cut = tmp_path / "cut.pth"
    torch.save(tiny().state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(WeightsError, match=r"cut\.pth: cannot read PyTorch weights"):
        read_weights(cut)
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"w\.npz: unknown weights format; expected .*\.params"):
        read_weights(odd)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(WeightsError, match="no tensors found.*'epoch'"):
        read_weights(empty)


def test_safetensors(tmp_path: Path) -> None:
    """Read through the safetensors package when installed; otherwise a clear error."""
    path = tmp_path / "w.safetensors"
    state = tiny().state_dict()
    if importlib.util.find_spec("safetensors") is None:
        path.write_bytes(b"\0" * 16)
        with pytest.raises(WeightsError, match="needs the 'safetensors' package"):
            read_weights(path)
        return
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = tiny()
    assert load_pretrained(model, path).complete


# ---- inspection ----------------------------------------------------------------------------------


def test_inspect_weights(tmp_path: Path, builtin_registry: None) -> None:
    """A tiny state dict has 7 conv weights + 7 BatchNorms x 5 entries = 42 keys, 35 of them needing a
    value (num_batches_tracked excluded); the stem holds 2 convs + 2 x 5 = 12. It fits "tiny"
    completely. An MXNet ResNet-38 subset fits "resnet38" best, after renaming; its b2 group holds
    3 convs (128x64x3x3, 128x128x3x3, 128x64x1x1) and 2 BatchNorms x 4 entries (64 and 128 channels)."""
    path = tmp_path / "tiny.pth"
    state = tiny().state_dict()
    torch.save(state, path)
    info = inspect_weights(path)
    assert info["format"] == "torch" and info["num_keys"] == len(state) == 42
    assert info["best_fit"] == "tiny"
    fit = next(f for f in info["fits"] if f["backbone"] == "tiny")
    assert fit == {"backbone": "tiny", "matched": 35, "model_keys": 35, "mismatched": 0, "fraction": 1.0}
    assert info["groups"]["stem"]["keys"] == 12
    assert info["num_params"] == sum(v.numel() for v in state.values())

    mx = tmp_path / "a1.params"
    write_mxnet_params(mx, stem_params(np.random.default_rng(0)))
    info = inspect_weights(mx)
    assert info["format"] == "mxnet" and info["best_fit"] == "resnet38"
    assert info["groups"]["b2"] == {"keys": 11, "params": 128 * 64 * 9 + 128 * 128 * 9 + 128 * 64 + 4 * 64 + 4 * 128}
