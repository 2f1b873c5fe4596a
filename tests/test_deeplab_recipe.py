"""The published EPS DeepLab recipe (``voc_eps_recipe``) and the options it needs: the ``v2_gp`` head,
BatchNorm on batch statistics with a fixed affine, the HSV shift and the scale range, the loss on
upsampled logits, and the CRF on the training masks (``deeplab.pseudo_crf``) with its own artifact."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from wsss_tune.config import ConfigError, DeepLabConfig, PipelineConfig, apply_overrides, load_config
from wsss_tune.data.transforms import TrainTransform, hsv_to_rgb_cv, rgb_to_hsv_cv, shift_hsv
from wsss_tune.models.deeplab import ASPPPoolingHead, build_deeplab, deeplab_param_groups
from wsss_tune.ops.label_scores import label_scores
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages import graph
from wsss_tune.stages.deeplab import make_deeplab_step, model_kwargs, train_transform
from wsss_tune.stages.pipeline import run_pipeline, stage_key_parts
from wsss_tune.stages.pseudo_crf import refine_labels, refine_with_cams
from wsss_tune.trainables import SMOKE_OVERRIDES

HAVE_CRF = importlib.util.find_spec("pydensecrf") is not None
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="needs the optional pydensecrf2 package")

# --------------------------------------------------------------------------------------------------
# The v2_gp head
# --------------------------------------------------------------------------------------------------


def _head(**kw: Any) -> ASPPPoolingHead:
    torch.manual_seed(0)
    return ASPPPoolingHead(**{"in_channels": 4, "num_classes": 3, "channels": 2, "rates": (1, 2), **kw})


def test_v2_gp_head_parameters_by_hand() -> None:
    """in 4, classes 3, width 2, rates (1, 2): each 3x3 branch 4*2*9 = 72 weights + BN 2*2 = 76, two of
    them 152; pooling 1x1 4*2 = 8 + BN 4 = 12; fusion 1x1 (3 maps x 2)*2 = 12 + BN 4 = 16; classifier
    2*3 + 3 biases = 9. Total 189; the only biases are the classifier's."""
    head = _head()
    assert sum(p.numel() for p in head.parameters()) == 189
    biases = [n for n, p in head.named_parameters() if n.endswith("bias") and "classifier" not in n]
    assert all(".1." in n or n.startswith("pool.2") or n.startswith("fuse.1") for n in biases)  # BN biases only
    assert head.classifier.bias is not None and head.branches[0][0].bias is None


def test_v2_gp_head_shapes_and_bn_momentum() -> None:
    """Logits keep the map size; every BatchNorm has the configured momentum (reference 3e-4)."""
    head = _head().eval()
    assert head(torch.randn(2, 4, 7, 9)).shape == (2, 3, 7, 9)
    assert {m.momentum for m in head.modules() if isinstance(m, nn.BatchNorm2d)} == {3e-4}
    other = _head(bn_momentum=0.1)
    assert {m.momentum for m in other.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ValueError, match="bn_momentum"):
        _head(bn_momentum=0.0)


def test_v2_gp_head_sees_the_whole_map_through_its_pooling_branch() -> None:
    """Two inputs differ only in the far corner (63, 63), beyond the reach of the 3x3 branches at (0, 0)
    (dilation 2: two pixels). The logits at (0, 0) differ - through the pooling branch: with its conv
    zeroed they are equal."""
    head = _head().eval()
    a = torch.randn(1, 4, 64, 64)
    b = a.clone()
    b[..., 63, 63] += 100.0
    with torch.no_grad():
        assert not torch.allclose(head(a)[..., 0, 0], head(b)[..., 0, 0])
        head.pool[1].weight.zero_()
        assert torch.allclose(head(a)[..., 0, 0], head(b)[..., 0, 0])


def test_build_v2_gp_and_its_optimiser_groups() -> None:
    """``v2_gp`` on the tiny backbone: head conv weights 10x with decay, the classifier bias 20x without,
    the head's BatchNorm at ``bn_lr_mult`` without decay; ``bn_lr_mult`` 0 leaves every norm parameter
    out of the optimiser (the recipe's conv-only groups)."""
    model = build_deeplab(arch="v2_gp", backbone="tiny", num_classes=3, freeze_bn=False,
                          backbone_kwargs={"output_stride": 8})
    head_norm = {id(p) for m in model.head.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    groups = {g["name"]: g for g in deeplab_param_groups(model, lr=1e-3, weight_decay=5e-4, bn_lr_mult=0.5)}
    assert set(groups) == {"backbone", "bb_norm", "head", "head_bias", "head_norm"}
    assert {id(p) for p in groups["head_norm"]["params"]} == head_norm
    assert groups["head_norm"]["lr"] == pytest.approx(5e-4) and groups["head_norm"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == pytest.approx(1e-2) and groups["head"]["weight_decay"] == 5e-4
    assert [p.shape for p in groups["head_bias"]["params"]] == [torch.Size([3])]
    assert groups["head_bias"]["lr"] == pytest.approx(2e-2)
    none = {g["name"] for g in deeplab_param_groups(model, lr=1e-3, weight_decay=5e-4, bn_lr_mult=0.0)}
    assert none == {"backbone", "head", "head_bias"}


def test_backbone_options_reach_the_backbone() -> None:
    """``contract_dilation`` gives layer4's first block dilation 2 (else 4); a builder option the
    backbone does not take is named."""
    with torch.device("meta"):
        plain = build_deeplab(arch="v2_gp", backbone="resnet50", num_classes=3)
        contracted = build_deeplab(arch="v2_gp", backbone="resnet50", num_classes=3,
                                   backbone_kwargs={"contract_dilation": True})
    assert plain.backbone.layer4[0].conv2.dilation == (4, 4)
    assert contracted.backbone.layer4[0].conv2.dilation == (2, 2)
    with pytest.raises(ValueError, match="takes no 'contract_dilation'"):
        build_deeplab(arch="v2", backbone="tiny", num_classes=3, backbone_kwargs={"contract_dilation": True})


# --------------------------------------------------------------------------------------------------
# Config: the recipe, the new fields, the defaults
# --------------------------------------------------------------------------------------------------

#: The published settings (usr922/wseg segmentation/experiment/EPS_deeplabv2_resnet101/config.py and
#: its lib/), as recorded in voc_eps_recipe.yaml: field -> value.
PUBLISHED = {
    "arch": "v2_gp",                        # MODEL_NAME deeplabv2, MODEL_ASPP_HASGLOBAL True
    "backbone": "resnet101",                # MODEL_BACKBONE resnet101 (output stride 8)
    "contract_dilation": True,              # resnet.py _make_layer
    "mask_source": "eps",                   # DATA_PSEUDO_GT .../crf_5_8_png
    "pseudo_crf": True,
    "pseudo_crf_iterations": 5,             # --crf_t 5
    "pseudo_crf_alpha": 8.0,                # --crf_alpha 8
    "pseudo_crf_pos_xy_std": 3.0, "pseudo_crf_pos_w": 3.0,  # crf_inference Gaussian sxy 3, compat 3
    "pseudo_crf_bi_xy_std": 80.0, "pseudo_crf_bi_rgb_std": 13.0, "pseudo_crf_bi_w": 10.0,  # bilateral 80/13/10
    "optimizer": "sgd",
    "lr": 1e-3,                             # TRAIN_LR
    "momentum": 0.9,                        # TRAIN_MOMENTUM
    "weight_decay": 5e-4,                   # TRAIN_WEIGHT_DECAY
    "poly_power": 0.9,                      # TRAIN_POWER
    "head_lr_mult": 10.0, "head_bias_lr_mult": 20.0,  # train.py groups 10x / 20x
    "freeze_bn": False,                     # MODEL_FREEZEBN False
    "bn_lr_mult": 0.0,                      # get_parameter_groups: conv weights and biases only
    "head_bn_momentum": 3e-4,               # TRAIN_BN_MOM
    "batch_size": 10,                       # TRAIN_BATCHES
    "iterations": 20000,                    # TRAIN_ITERATION
    "crop_size": 448,                       # DATA_RANDOMCROP
    "scale_range": (0.5, 1.5),              # DATA_RANDOMSCALE
    "hsv_jitter": (10, 10, 10),             # DATA_RANDOM_H / _S / _V
    "loss_resize": "logits",                # deeplabv2.forward upsamples before the loss
    "test_scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),  # TEST_MULTISCALE
    "test_flip": True,                      # TEST_FLIP
    "crf": True,                            # TEST_CRF
}


def test_the_recipe_holds_the_published_values() -> None:
    cfg = load_config("voc_eps_recipe")
    assert cfg.name == "voc_eps_recipe"
    got = {k: getattr(cfg.deeplab, k) for k in PUBLISHED}
    assert got == PUBLISHED
    voc = load_config("voc")
    for section in ("eps", "affinity", "rw"):  # the EPS paper's upstream, as in voc
        assert getattr(cfg, section) == getattr(voc, section), section


def test_config_show_prints_the_recipe() -> None:
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    res = CliRunner().invoke(app, ["config", "show", "voc_eps_recipe"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)["deeplab"]
    assert (shown["arch"], shown["pseudo_crf"], shown["scale_range"]) == ("v2_gp", True, [0.5, 1.5])


def test_new_deeplab_defaults_are_deeplab_pytorch() -> None:
    """Every option the recipe added is off by default: list scales, no HSV, the backbone's BN
    frozen, norm parameters (if any train) at 1x, every block at its stage's dilation, labels shrunk
    to the logits, no CRF on the masks."""
    d = DeepLabConfig()
    assert (d.arch, d.scale_range, d.hsv_jitter, d.freeze_bn, d.bn_lr_mult) == ("v2", (), (0, 0, 0), True, 1.0)
    assert (d.contract_dilation, d.loss_resize, d.pseudo_crf) == (False, "labels", False)
    t = train_transform(d)
    assert (t.scales, t.scale_range, t.hsv) == (d.scales, None, None)


@pytest.mark.parametrize(("override", "fragment"), [
    ({"deeplab.scale_range": [0.5]}, "deeplab.scale_range: expected [] (use deeplab.scales) or [low, high]"),
    ({"deeplab.scale_range": [1.5, 0.5]}, "deeplab.scale_range: expected [low, high] with low <= high"),
    ({"deeplab.scale_range": [0.0, 1.0]}, "deeplab.scale_range[0]: expected a value > 0"),
    ({"deeplab.hsv_jitter": [10, 10, 256]}, "deeplab.hsv_jitter[2]: expected a value in [0, 255]"),
    ({"deeplab.head_bn_momentum": 0.0}, "deeplab.head_bn_momentum: expected a value in (0, 1]"),
    ({"deeplab.bn_lr_mult": -1.0}, "deeplab.bn_lr_mult: expected a value >= 0"),
    ({"deeplab.pseudo_crf_label_prob": 1.0}, "deeplab.pseudo_crf_label_prob: expected a value in (0, 1)"),
    ({"deeplab.arch": "v3"}, "deeplab.arch"),
])
def test_bad_recipe_values_name_the_key(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(PipelineConfig(), override)
    assert fragment in str(err.value)


# --------------------------------------------------------------------------------------------------
# Keys: the recipe options key DeepLab's weights only when set; the CRF keys only its masks
# --------------------------------------------------------------------------------------------------

#: The DeepLab fields that keyed ``deeplab_model`` before the recipe's options existed.
OLD_KEY_FIELDS = {"arch", "backbone", "pretrained", "optimizer", "lr", "head_lr_mult", "head_bias_lr_mult", "momentum",
                  "weight_decay", "poly_power", "iterations", "batch_size", "accumulate", "crop_size", "scales",
                  "freeze_bn", "msc", "balanced_ce", "amp", "channels_last"}


def _parts(cfg: PipelineConfig) -> dict[str, Any]:
    return stage_key_parts(cfg, lambda splits, masks: f"{splits}{masks}")


def test_stored_deeplab_models_keep_their_keys() -> None:
    """At the defaults the model's own key holds exactly the fields it held before the recipe options:
    a model stored earlier is found again."""
    for name in ("voc", "synth"):
        assert set(graph.spec("deeplab_model").own_fields(load_config(name))) == OLD_KEY_FIELDS, name


@pytest.mark.parametrize("change", [{"deeplab.scale_range": [0.5, 1.5]}, {"deeplab.hsv_jitter": [10, 10, 10]},
                                    {"deeplab.bn_lr_mult": 0.0}, {"deeplab.contract_dilation": True},
                                    {"deeplab.loss_resize": "logits"}, {"deeplab.arch": "v2_gp"}])
def test_a_recipe_option_keys_the_model_only(change: dict[str, Any]) -> None:
    base = _parts(load_config("synth"))
    parts = _parts(load_config("synth", change))
    assert {n for n in parts if parts[n] != base[n]} == {"deeplab_model"}


def test_head_bn_momentum_keys_only_the_head_that_has_batchnorm() -> None:
    v2 = _parts(load_config("synth", {"deeplab.head_bn_momentum": 0.1}))
    assert v2 == _parts(load_config("synth"))
    gp = {"deeplab.arch": "v2_gp"}
    assert _parts(load_config("synth", {**gp, "deeplab.head_bn_momentum": 0.1}))["deeplab_model"] != \
        _parts(load_config("synth", gp))["deeplab_model"]


@pytest.mark.parametrize("change", [{"deeplab.pseudo_crf_bi_w": 4.0}, {"deeplab.pseudo_crf_iterations": 10},
                                    {"deeplab.pseudo_crf_label_prob": 0.9}])
def test_a_pseudo_crf_field_keys_only_the_refined_masks(change: dict[str, Any]) -> None:
    """With the CRF on, its fields change the ``pseudo_crf`` artifact's own key and no other (DeepLab's
    models follow through the upstream chain); on refined masks the CAM exponent keys nothing."""
    on = {"deeplab.pseudo_crf": True}
    base = _parts(load_config("synth", on))
    parts = _parts(load_config("synth", {**on, **change}))
    assert {n for n in parts if parts[n] != base[n]} == {"pseudo_crf"}
    alpha = _parts(load_config("synth", {**on, "deeplab.pseudo_crf_alpha": 4.0}))
    assert alpha == base  # refined masks have no CAMs: the exponent is not read
    eps = {**on, "deeplab.mask_source": "eps"}
    assert _parts(load_config("synth", {**eps, "deeplab.pseudo_crf_alpha": 4.0}))["pseudo_crf"] != \
        _parts(load_config("synth", eps))["pseudo_crf"]


def test_the_crf_switch_changes_what_deeplab_reads_not_its_own_key() -> None:
    off, on = load_config("synth"), load_config("synth", {"deeplab.pseudo_crf": True})
    assert _parts(off)["deeplab_model"] == _parts(on)["deeplab_model"]
    assert graph.spec("deeplab_model").reads(off) == ("rw",)
    assert graph.spec("deeplab_model").reads(on) == ("pseudo_crf",)
    chain = graph.artifact_chain(load_config("synth", {"deeplab.pseudo_crf": True, "deeplab.mask_source": "eps"}),
                                 ("deeplab",))
    assert chain["deeplab_model"] == ("eps_model", "eps", "pseudo_crf", "deeplab_model")
    assert "pseudo_crf" not in graph.needed_artifacts(off, ("eps", "affinity", "deeplab"))


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def test_opencv_hsv_by_hand() -> None:
    """OpenCV's 8-bit formulas: pure red/green/blue have hue 0/60/120 (degrees / 2), grey no saturation.
    (10, 200, 90): V = 200 = G, diff 190; S = round(190 * round(255 * 4096 / 200) / 4096) = 242;
    H = round((B - R + 2 diff) * round(122880 / 190) / 4096) = round(460 * 647 / 4096) = 73."""
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [10, 200, 90]]], np.uint8)
    assert rgb_to_hsv_cv(rgb).tolist() == [[[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128],
                                            [73, 242, 200]]]
    assert hsv_to_rgb_cv(rgb_to_hsv_cv(rgb))[0, :4].tolist() == rgb[0, :4].tolist()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert np.abs(hsv_to_rgb_cv(rgb_to_hsv_cv(noise)).astype(int) - noise).max() <= 6  # 8-bit HSV rounding


def test_hsv_shift_wraps_hue_and_clips_the_rest() -> None:
    """Hue +60 (120 degrees) turns red into green; -10 wraps 0 to 170; value -300 gives black."""
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert shift_hsv(red, (60, 0, 0)).tolist() == [[[0, 255, 0]]]
    assert rgb_to_hsv_cv(shift_hsv(red, (-10, 0, 0)))[0, 0, 0] == 170
    assert shift_hsv(red, (0, 0, -300)).tolist() == [[[0, 0, 0]]]


def _sample(h: int = 20, w: int = 30) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 8, yy * 8, np.full_like(xx, 7)], -1).astype(np.uint8)
    return {"image": image, "mask": ((xx + 2 * yy) % 6).astype(np.uint8)}


def test_scale_range_sizes_and_random_padding_offsets() -> None:
    """A scale drawn from [0.5, 1.5] gives round(30 s) x round(20 s) pixels (every crop of 64 shows the
    whole image: 20 x 30 -> at most 30 x 45); the image sits at a random offset (not always the
    corner, unlike a list of scales) and the padding is ignored in the mask."""
    t = TrainTransform(crop_size=64, scale_range=(0.5, 1.5), hflip=False)
    offsets = set()
    for seed in range(12):
        out = t(_sample(), np.random.default_rng(seed))
        valid = (out["mask"] != 255).nonzero()
        rows, cols = valid[:, 0], valid[:, 1]
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 10 <= h <= 30 and 15 <= w <= 45 and abs(w / h - 1.5) < 0.1
        offsets.add((int(rows.min()), int(cols.min())))
    assert len(offsets) > 3
    listed = TrainTransform(crop_size=64, scales=(0.5, 1.0, 1.5), hflip=False)
    assert all((listed(_sample(), np.random.default_rng(s))["mask"][0, 0] != 255) for s in range(5))


def test_hsv_shift_leaves_the_geometry_alone() -> None:
    """The same generator gives the same mask crop with and without the HSV shift; the image changes."""
    plain = TrainTransform(crop_size=16, scale_range=(0.5, 1.5))
    shifted = TrainTransform(crop_size=16, scale_range=(0.5, 1.5), hsv=(10, 10, 10))
    a, b = plain(_sample(), np.random.default_rng(3)), shifted(_sample(), np.random.default_rng(3))
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError, match="alternatives"):
        TrainTransform(crop_size=8, scales=(1.0,), scale_range=(0.5, 1.5))


def test_the_recipe_transform_and_model_arguments() -> None:
    d = load_config("voc_eps_recipe").deeplab
    t = train_transform(d)
    assert (t.scales, t.scale_range, t.hsv, t.crop_size, t.hflip) == (None, (0.5, 1.5), (10, 10, 10), 448, True)
    assert model_kwargs(d) == {"arch": "v2_gp", "backbone": "resnet101", "msc": False, "freeze_bn": False,
                               "head_bn_momentum": 3e-4, "backbone_kwargs": {"contract_dilation": True}}


def test_loss_on_upsampled_logits_changes_the_step() -> None:
    """``loss_resize: logits`` compares at the crop's resolution: another loss than on shrunk labels."""
    cfg = load_config("synth", {"deeplab.amp": False, "deeplab.channels_last": False})
    losses = []
    for mode in ("labels", "logits"):
        d = dataclasses.replace(cfg.deeplab, loss_resize=mode)
        torch.manual_seed(0)
        model = build_deeplab(num_classes=6, **model_kwargs(d))
        step = make_deeplab_step(d, model, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        batch = {"image": torch.randn(2, 3, 32, 32, generator=g),
                 "mask": torch.randint(0, 6, (2, 32, 32), generator=g)}
        losses.append(step([batch], 1)["deeplab/loss"])
    assert np.isfinite(losses).all() and losses[0] != pytest.approx(losses[1], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# The CRF on the training masks
# --------------------------------------------------------------------------------------------------


def test_label_scores_by_hand() -> None:
    """Labels {0, 2, 5} and one ignored pixel, prob 0.7: own label 0.7, each other (1 - 0.7) / 2 = 0.15,
    the ignored pixel 1/3 everywhere; planes in the order 0, 2, 5."""
    mask = torch.tensor([[0, 2], [5, 255]])
    scores, keys = label_scores(mask, prob=0.7)
    assert keys.tolist() == [0, 2, 5]
    assert torch.allclose(scores[:, 0, 0], torch.tensor([0.7, 0.15, 0.15]))
    assert torch.allclose(scores[:, 0, 1], torch.tensor([0.15, 0.7, 0.15]))
    assert torch.allclose(scores[:, 1, 1], torch.full((3,), 1 / 3))
    assert torch.allclose(scores.sum(0), torch.ones(2, 2))
    only_bg, k = label_scores(torch.zeros(2, 2, dtype=torch.long), prob=0.7)
    assert k.tolist() == [0] and torch.equal(only_bg, torch.ones(1, 2, 2))


def _edge_image() -> np.ndarray:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, 8:] = 255
    return image


@needs_crf
def test_crf_on_cams_snaps_the_mask_to_the_colour_edge() -> None:
    """Black left / white right, edge at column 8. The CAM of class 3 (file key 3) is 0.9 on columns
    0-7, 0.25 on 8-9, 0.05 after: without the CRF columns 8-9 are class 3 (0.25 > (1 - 0.25)^8 = 0.10),
    beyond it background ((1 - 0.05)^8 = 0.66). The appearance kernel ties the white columns 8-9 to the
    white background: class 3 on exactly columns 0-7. The learned background map (last) is not read."""
    cams = np.zeros((2, 16, 16), np.float32)
    cams[0, :, :8], cams[0, :, 8:10], cams[0, :, 10:] = 0.9, 0.25, 0.05
    cams[1] = 1.0
    out = refine_with_cams(_edge_image(), cams, np.array([3, 0]), DeepLabConfig())
    expected = np.zeros((16, 16), np.uint8)
    expected[:, :8] = 3
    assert np.array_equal(out, expected)


@needs_crf
def test_crf_on_labels_snaps_the_mask_and_keeps_ignored_pixels() -> None:
    """A mask of class 1 on columns 0-9 (two past the edge) and one ignored pixel: class 1 on columns 0-7
    after the CRF, the ignored pixel still ignored."""
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :10] = 1
    mask[0, 0] = 255
    out = refine_labels(_edge_image(), mask, DeepLabConfig())
    expected = np.zeros((16, 16), np.uint8)
    expected[:, :8] = 1
    expected[0, 0] = 255
    assert np.array_equal(out, expected)


def test_without_the_crf_package_the_option_names_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from wsss_tune.stages import pseudo_crf

    monkeypatch.setattr(pseudo_crf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="deeplab.pseudo_crf is true"):
        pseudo_crf.refine_masks(DeepLabConfig(), None, [], mask_dir=tmp_path, out_dir=tmp_path)  # type: ignore[arg-type]


@needs_crf
def test_pipeline_builds_the_refined_masks_once_and_trains_on_them(synth_root: Path, tmp_path: Path) -> None:
    """DeepLab on the GT masks with the CRF: the ``pseudo_crf`` artifact is built and DeepLab trains on
    it; a second run with another test-time setting reuses both; another kernel weight rebuilds the
    masks and DeepLab, not the ground truth's fingerprint."""
    def run(i: int, **extra: Any) -> dict[str, Any]:
        cfg = load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(synth_root), "data.num_workers": 0,
                                    "run.artifact_store": str(tmp_path / "store"), "deeplab.mask_source": "gt",
                                    "deeplab.pseudo_crf": True, **extra})
        return run_pipeline(cfg, stages=("deeplab",), out_dir=tmp_path / f"run{i}", reporter=RecordingReporter())

    first = run(0)
    assert set(first["stages"]) == {"pseudo_crf", "deeplab_model", "deeplab"}
    masks = Path(first["stages"]["pseudo_crf"]["path"]) / "masks"
    assert len(list(masks.glob("*.png"))) > 0 and "deeplab_miou_tune" in first
    again = run(1, **{"deeplab.test_flip": False})
    assert again["stages"]["pseudo_crf"]["hit"] and again["stages"]["deeplab_model"]["hit"]
    other = run(2, **{"deeplab.pseudo_crf_bi_w": 4.0})
    assert not other["stages"]["pseudo_crf"]["hit"] and not other["stages"]["deeplab_model"]["hit"]
