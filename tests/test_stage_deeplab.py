"""DeepLab stage runner: evaluation by hand, test-time averaging, training, optimiser groups, resume,
and (slow) the must-show ordering pseudo masks <= DeepLab on them < DeepLab on the ground truth."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from stage_helpers import CrashingReporter, Interrupt, logged
from torch import Tensor, nn

from wsss_tune.config import DeepLabConfig, PipelineConfig, apply_overrides, load_config
from wsss_tune.data import VOCLayout, generate_synthetic_voc, save_mask_png
from wsss_tune.models.deeplab import build_deeplab
from wsss_tune.reporting import DivergedError, RecordingReporter
from wsss_tune.stages import graph
from wsss_tune.stages.common import CheckpointManager, poly_lr
from wsss_tune.stages.deeplab import (
    INFER_FIELDS,
    MODEL_FILE,
    NEUTRAL_FIELDS,
    PREDICTION_DIR,
    SUMMARY_FILE,
    build_deeplab_optimizer,
    eval_subset_ids,
    evaluate_deeplab,
    evaluate_model,
    multiscale_probs,
    run_deeplab,
    train_deeplab,
    train_key,
    train_key_fields,
)
from wsss_tune.stages.evaluate import miou_metrics, score_masks, tune_heldout_ids

CPU = torch.device("cpu")

#: Tiny settings: 32 px crops, batches of 2; a step takes milliseconds on the CPU.
TINY = {
    "data.num_workers": 0,
    "run.device": "cpu",
    "deeplab.iterations": 4,
    "deeplab.batch_size": 2,
    "deeplab.crop_size": 32,
    "deeplab.scales": [0.75, 1.0],
    "deeplab.eval_every": 0,
    "deeplab.eval_images": 2,
    "deeplab.log_every": 1,
    "deeplab.checkpoint_every": 2,
}


def tiny_cfg(root: Path, **overrides: Any) -> PipelineConfig:
    """The built-in synth config shrunk by :data:`TINY`; ``overrides`` use ``section__field`` names."""
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config("synth", {**TINY, "data.root": str(root), **extra})


def gt_dir(root: Path) -> Path:
    return root / "SegmentationClassAug"


def read_state(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)




class FixedLogits(nn.Module):
    """A stand-in model whose logits do not depend on the input values (only on its size)."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)  # (K, h, w) at half the input size
        self.calls: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(self.training)
        assert x.shape[-2:] == (2 * self.logits.shape[-2], 2 * self.logits.shape[-1])
        return self.logits.expand(x.shape[0], -1, -1, -1)


def write_layout(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray], classes: list[str]) -> VOCLayout:
    """A hand-made VOC folder: ``class_names.txt``, JPEG images, PNG masks and a ``val`` split."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "class_names.txt").write_text("\n".join(classes) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(images) + "\n")
    for image_id, img in images.items():
        Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=100, subsampling=0)
        save_mask_png(root / "SegmentationClassAug" / f"{image_id}.png", masks[image_id])
    return VOCLayout(root=root)


# --------------------------------------------------------------------------------------------------
# Which fields matter to what
# --------------------------------------------------------------------------------------------------


def test_field_groups_partition_the_deeplab_config():
    """Every DeepLabConfig field is in exactly one of: training key, test-time only, neutral, the CRF on
    the training masks (keys those masks)."""
    names = [f.name for f in dataclasses.fields(DeepLabConfig)]
    groups = [set(train_key_fields()), set(INFER_FIELDS), set(NEUTRAL_FIELDS), set(graph.PSEUDO_CRF_FIELDS)]
    assert sorted(set().union(*groups)) == sorted(names)
    assert sum(len(g) for g in groups) == len(names)
    assert set(INFER_FIELDS) == {"test_scales", "test_flip", "crf", "save_predictions"}
    assert {"lr", "head_lr_mult", "head_bias_lr_mult", "accumulate", "arch", "scales"} <= set(train_key_fields())


def test_train_key_ignores_test_settings_but_not_the_masks(tmp_path):
    """Test-time and bookkeeping fields leave the key alone; lr, seed, train split and the mask
    content change it."""
    cfg = tiny_cfg(tmp_path)
    key = train_key(cfg, "masks-a")
    same = apply_overrides(cfg, {"deeplab.test_scales": [0.5, 1.0], "deeplab.test_flip": True, "deeplab.crf": True,
                                 "deeplab.eval_every": 7, "deeplab.log_every": 3, "deeplab.mask_source": "eps",
                                 "data.num_workers": 3, "data.val_split": "train"})
    assert train_key(same, "masks-a") == key
    assert train_key(cfg, "masks-b") != key
    for change in ({"deeplab.lr": 0.5}, {"run.seed": 1}, {"data.train_split": "train"}, {"deeplab.accumulate": 2}):
        assert train_key(apply_overrides(cfg, change), "masks-a") != key, change


def test_eval_subset_is_fixed_and_from_the_tuning_half_of_val(synth_root):
    """The periodic evaluation never sees held-out val ids, and picks the same ids every time."""
    cfg = tiny_cfg(synth_root, deeplab__eval_images=3)
    layout = VOCLayout.from_config(cfg.data)
    tune, held = tune_heldout_ids(layout, cfg.data, layout.split_ids(cfg.data.val_split))
    ids = eval_subset_ids(layout, cfg)
    assert len(ids) == min(3, len(tune)) and set(ids) <= set(tune) and not set(ids) & set(held)
    assert ids == eval_subset_ids(layout, cfg)
    assert eval_subset_ids(layout, apply_overrides(cfg, {"deeplab.eval_images": 10_000})) == tune


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def test_evaluation_of_fixed_logits_gives_the_hand_computed_miou(tmp_path):
    """A stub predicts class 1 on the left half and background on the right half of a 4x4 image.

    Its logits are 2x2 (stride 2): left column (bg 0, c1 10, c2 0), right column (10, 0, 0).
    Bilinear upsampling to 4x4 (align_corners=False) samples source columns 0, 0.25, 0.75, 1, so
    output column 1 has c1 = 7.5 > bg = 2.5 and column 2 has bg = 7.5 > c1 = 2.5: the prediction
    is columns 0-1 -> 1, columns 2-3 -> 0.

    Image ``a`` (GT: columns 0-1 class 1 with (0, 0) = 255, column 2 background, column 3 class 2):
    gt1->1: 7, gt0->0: 4, gt2->0: 4. Image ``b`` (GT all background): gt0->1: 8, gt0->0: 8.
    Both: [[12, 8, 0], [0, 7, 0], [4, 0, 0]] -> IoU bg 12 / (20 + 16 - 12) = 0.5,
    c1 7 / (7 + 15 - 7) = 7/15, c2 0 / 4 = 0 -> mIoU (0.5 + 7/15 + 0) / 3 = 32.22 %.
    ``a`` alone: IoU 4/8, 7/7, 0/4 -> 50 %. ``b`` alone: bg 8/16, c1 0/8 (c2 absent) -> 25 %.
    """
    gt_a = np.array([[255, 1, 0, 2]] + [[1, 1, 0, 2]] * 3, dtype=np.uint8)
    gt_b = np.zeros((4, 4), dtype=np.uint8)
    image = np.full((4, 4, 3), 128, dtype=np.uint8)
    layout = write_layout(tmp_path / "voc", {"a": image, "b": image}, {"a": gt_a, "b": gt_b}, ["c1", "c2"])
    logits = torch.zeros(3, 2, 2)
    logits[1, :, 0] = 10.0
    logits[0, :, 1] = 10.0
    model = FixedLogits(logits).train()

    per_image = evaluate_model(model, layout, ["a", "b"], test_scales=(1.0,), test_flip=False, crf=False,
                               amp=False, device=CPU, prediction_dir=tmp_path / "pred")

    assert model.calls == [False, False] and model.training  # eval mode inside, restored after
    np.testing.assert_array_equal(per_image["a"], [[4, 0, 0], [0, 7, 0], [4, 0, 0]])
    np.testing.assert_array_equal(per_image["b"], [[8, 8, 0], [0, 0, 0], [0, 0, 0]])
    metrics = miou_metrics("deeplab", per_image, tune_ids=["a"], heldout_ids=["b"], class_names=["c1", "c2"])
    assert metrics["deeplab_miou"] == pytest.approx(100 * (0.5 + 7 / 15) / 3)
    assert metrics["deeplab_miou_tune"] == pytest.approx(50.0)
    assert metrics["deeplab_miou_heldout"] == pytest.approx(25.0)
    assert metrics["deeplab_iou/c1"] == pytest.approx(100 * 7 / 15)
    expected = np.array([[1, 1, 0, 0]] * 4, dtype=np.uint8)
    for image_id in ("a", "b"):
        np.testing.assert_array_equal(layout.load_mask(image_id, tmp_path / "pred"), expected)


def test_multiscale_probs_average_by_hand():
    """Logits (0, log 3) at full size give probabilities (1/4, 3/4); zero logits at half size give
    (1/2, 1/2); with flips each counts twice: mean = (3/8, 5/8) everywhere, at the requested size."""

    def forward(batch: Tensor) -> Tensor:
        out = torch.zeros(batch.shape[0], 2, *batch.shape[-2:])
        if batch.shape[-1] == 8:
            out[:, 1] = math.log(3.0)
        return out

    probs = multiscale_probs(forward, torch.zeros(3, 6, 8), size=(12, 16), scales=(1.0, 0.5), flip=True)
    assert probs.shape == (2, 12, 16)
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([3 / 8, 5 / 8]))
    torch.testing.assert_close(probs, probs[:, :1, :1].expand(-1, 12, 16))


def test_test_time_flip_averaging_is_flip_equivariant():
    """With flip averaging P(x) = (p(x) + F p(F x)) / 2, so P(F x) = F P(x) for any network p.

    A random 3x3 conv is not mirror-symmetric, so without flips the equality fails; multi-scale
    resizing and bilinear upsampling are mirror-symmetric and keep it.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).eval()
    x = torch.randn(3, 13, 18)
    kwargs = {"size": (13, 18), "scales": (1.0, 0.75, 1.25)}
    with torch.no_grad():
        p = multiscale_probs(net, x, flip=True, **kwargs)
        p_mirror = multiscale_probs(net, x.flip(-1), flip=True, **kwargs)
        q = multiscale_probs(net, x, flip=False, **kwargs)
        q_mirror = multiscale_probs(net, x.flip(-1), flip=False, **kwargs)
    torch.testing.assert_close(p_mirror, p.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(0), torch.ones(13, 18))
    assert (q_mirror - q.flip(-1)).abs().max() > 1e-3


def test_dense_crf_snaps_the_prediction_to_the_colour_edge(tmp_path):
    """A 16x16 image, black left / white right (edge at column 8, on a JPEG block boundary), GT
    class 1 left, background right. The stub is slightly confident (logit margin 0.2) in class 1 on
    columns 0-9, background on 10-15: without the CRF columns 8-9 are wrong, 32 pixels gt0->1:
    IoU c1 128 / 160 = 0.8, bg 96 / 128 = 0.75 -> 77.5 %. The CRF's appearance kernel (rgb std 3)
    ties the white columns 8-9 to the six white background columns: 100 %.
    """
    pytest.importorskip("pydensecrf.densecrf")
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, 8:] = 255
    gt = np.zeros((16, 16), dtype=np.uint8)
    gt[:, :8] = 1
    layout = write_layout(tmp_path / "voc", {"a": image}, {"a": gt}, ["c1"])
    logits = torch.zeros(2, 8, 8)
    logits[1, :, :5] = 0.2  # stride 2: columns 0-9 at full size
    logits[0, :, 5:] = 0.2
    model = FixedLogits(logits)

    def score(crf: bool) -> float:
        per_image = evaluate_model(model, layout, ["a"], test_scales=(1.0,), test_flip=False, crf=crf, amp=False,
                                   device=CPU)
        return miou_metrics("x", per_image, tune_ids=[], heldout_ids=[], class_names=["c1"])["x_miou"]

    assert score(False) == pytest.approx(77.5)
    assert score(True) == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def test_one_training_step_reports_a_finite_loss_and_changes_the_weights(synth_root, tmp_path):
    """One Adam step from the seeded init: a finite positive loss at the base LR, head weights moved
    by exactly the head's learning rate."""
    cfg = tiny_cfg(synth_root, deeplab__iterations=1)
    rep = RecordingReporter()
    path = train_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path, reporter=rep, device=CPU)

    assert path == tmp_path / MODEL_FILE and (tmp_path / SUMMARY_FILE).is_file()
    (log,) = logged(rep.history, "deeplab/loss")
    assert log["step"] == 1 and math.isfinite(log["deeplab/loss"]) and log["deeplab/loss"] > 0
    assert log["deeplab/lr"] == pytest.approx(cfg.deeplab.lr)  # poly factor 1 at the first step
    torch.manual_seed(cfg.run.seed)
    init = build_deeplab(arch="v2", backbone="tiny", num_classes=6, freeze_bn=False).state_dict()
    trained = read_state(path)
    assert trained.keys() == init.keys()
    # Same seed, same init. Adam's first update is lr * g / (|g| + eps): a head weight with a
    # gradient far above eps moves by the head's LR, lr * head_lr_mult = 1e-3 * 10, and none by more.
    change = (trained["head.convs.0.weight"] - init["head.convs.0.weight"]).abs().max().item()
    assert change == pytest.approx(cfg.deeplab.lr * cfg.deeplab.head_lr_mult, rel=1e-4)


def test_runner_optimizer_groups_carry_the_configured_multipliers(synth_root, tmp_path):
    """The optimiser saved by the runner: backbone 1x with weight decay, BatchNorm of the tiny
    backbone (it trains) 1x without, head weights ``head_lr_mult`` with decay, the four ASPP biases
    ``head_bias_lr_mult`` without; LR = poly(lr, step 1 of 2) * multiplier, SGD momentum as set."""
    cfg = tiny_cfg(synth_root, deeplab__iterations=2, deeplab__optimizer="sgd", deeplab__lr=0.002,
                   deeplab__head_lr_mult=7.0, deeplab__head_bias_lr_mult=13.0, deeplab__weight_decay=1e-3,
                   deeplab__momentum=0.8)
    train_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path, reporter=RecordingReporter(), device=CPU)
    _, state = CheckpointManager(tmp_path / "checkpoints").latest()
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert {n: g["lr_mult"] for n, g in groups.items()} == {"backbone": 1.0, "bb_norm": 1.0, "head": 7.0,
                                                           "head_bias": 13.0}
    assert {n: g["weight_decay"] for n, g in groups.items()} == {"backbone": 1e-3, "bb_norm": 0.0, "head": 1e-3,
                                                                "head_bias": 0.0}
    assert len(groups["head_bias"]["params"]) == 4 and len(groups["head"]["params"]) == 4
    base = poly_lr(0.002, 1, 2, cfg.deeplab.poly_power)
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(
        {"backbone": base, "bb_norm": base, "head": 7 * base, "head_bias": 13 * base})
    assert all(g["momentum"] == 0.8 for g in groups.values())
    adam = build_deeplab_optimizer(build_deeplab(arch="v1", backbone="tiny", num_classes=6),
                                   apply_overrides(cfg, {"deeplab.optimizer": "adam"}).deeplab)
    assert isinstance(adam, torch.optim.Adam)


def test_resume_after_an_interruption_gives_the_same_weights(synth_root, tmp_path):
    """v1 (dropout draws from the RNG) with multi-scale inputs and 2 micro-batches per step: killed
    right after the checkpoint at step 2, restarted, it ends with exactly the weights and logs of an
    uninterrupted run."""
    cfg = tiny_cfg(synth_root, deeplab__arch="v1", deeplab__msc=True, deeplab__accumulate=2)
    masks = gt_dir(synth_root)
    full = RecordingReporter()
    train_deeplab(cfg, mask_dir=masks, out_dir=tmp_path / "full", reporter=full, device=CPU)

    crash = CrashingReporter(at=2)
    with pytest.raises(Interrupt):
        train_deeplab(cfg, mask_dir=masks, out_dir=tmp_path / "resumed", reporter=crash, device=CPU)
    assert not (tmp_path / "resumed" / MODEL_FILE).exists()
    assert crash.history[-1]["checkpoint_dir"] == str(tmp_path / "resumed" / "checkpoints")
    rest = RecordingReporter()
    train_deeplab(cfg, mask_dir=masks, out_dir=tmp_path / "resumed", reporter=rest, device=CPU)

    assert [h["step"] for h in logged(rest.history, "deeplab/loss")] == [3, 4]
    assert logged(crash.history + rest.history, "deeplab/loss") == logged(full.history, "deeplab/loss")
    a, b = read_state(tmp_path / "full" / MODEL_FILE), read_state(tmp_path / "resumed" / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = RecordingReporter()  # a finished folder is returned as is
    train_deeplab(cfg, mask_dir=masks, out_dir=tmp_path / "resumed", reporter=again, device=CPU)
    assert again.history == []


def test_a_folder_never_resumes_with_other_settings_or_masks(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, deeplab__iterations=1)
    train_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path / "run", reporter=RecordingReporter(),
                  device=CPU)
    with pytest.raises(ValueError, match="deeplab.lr"):
        train_deeplab(apply_overrides(cfg, {"deeplab.lr": 0.5}), mask_dir=gt_dir(synth_root), out_dir=tmp_path / "run",
                      reporter=RecordingReporter(), device=CPU)
    layout = VOCLayout.from_config(cfg.data)
    other = tmp_path / "other_masks"
    for image_id in layout.split_ids(cfg.data.train_split):
        save_mask_png(other / f"{image_id}.png", np.zeros_like(layout.load_mask(image_id)))
    with pytest.raises(ValueError, match="masks"):
        train_deeplab(cfg, mask_dir=other, out_dir=tmp_path / "run", reporter=RecordingReporter(), device=CPU)


def test_bad_settings_and_missing_masks_are_named(synth_root, tmp_path):
    rep = RecordingReporter()
    for change, message in (({"deeplab.accumulate": 0}, "deeplab.accumulate"),
                            ({"deeplab.test_scales": []}, "deeplab.test_scales"),
                            ({"deeplab.lr": 0.0}, "deeplab.lr")):
        with pytest.raises(ValueError, match=message):
            train_deeplab(apply_overrides(tiny_cfg(synth_root), change), mask_dir=gt_dir(synth_root),
                          out_dir=tmp_path / "x", reporter=rep, device=CPU)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_deeplab(tiny_cfg(synth_root), mask_dir=tmp_path / "nowhere", out_dir=tmp_path / "y", reporter=rep,
                      device=CPU)
    partial = tmp_path / "partial"
    save_mask_png(partial / "not_an_id.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="training masks are missing"):
        train_deeplab(tiny_cfg(synth_root), mask_dir=partial, out_dir=tmp_path / "z", reporter=rep, device=CPU)
    with pytest.raises(FileNotFoundError, match="DeepLab model not found"):
        evaluate_deeplab(tiny_cfg(synth_root), model_path=tmp_path / "none.pt", ids=["x"], device=CPU)


def test_divergence_is_caught_at_once(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, deeplab__optimizer="sgd", deeplab__lr=1e6, deeplab__iterations=20,
                   deeplab__checkpoint_every=100, deeplab__log_every=100)
    with pytest.raises(DivergedError, match="deeplab/loss"):
        train_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path, reporter=RecordingReporter(), device=CPU)


def test_run_deeplab_reports_val_miou_and_saved_predictions_score_the_same(synth_root, tmp_path):
    """The periodic ``deeplab_miou_tune`` comes with its step; the final metrics, computed in memory,
    equal :func:`score_masks` on the prediction PNGs the run saved."""
    cfg = tiny_cfg(synth_root, deeplab__eval_every=2, deeplab__save_predictions=True, deeplab__test_flip=True)
    rep = RecordingReporter()
    res = run_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path, reporter=rep, device=CPU)

    assert [h["step"] for h in rep.history if "deeplab_miou_tune" in h and "deeplab_miou" not in h] == [2, 4]
    layout = VOCLayout.from_config(cfg.data)
    val_ids = layout.split_ids(cfg.data.val_split)
    pred_dir = Path(res.paths["predictions"])
    assert pred_dir == tmp_path / PREDICTION_DIR and sorted(p.stem for p in pred_dir.glob("*.png")) == sorted(val_ids)
    for image_id in val_ids:
        pred = layout.load_mask(image_id, pred_dir)
        assert pred.shape == layout.load_mask(image_id).shape and pred.max() <= layout.num_classes
    scored = score_masks("deeplab", layout, cfg.data, val_ids, pred_dir)
    assert {k: res.metrics[k] for k in scored} == pytest.approx(scored)
    assert {"deeplab_miou", "deeplab_miou_tune", "deeplab_miou_heldout", "deeplab_iou/background",
            "deeplab/loss"} <= set(res.metrics)
    assert rep.history[-1]["step"] == cfg.deeplab.iterations and rep.history[-1]["deeplab_miou"] == res.metrics["deeplab_miou"]
    per_image = evaluate_deeplab(cfg, model_path=Path(res.paths["model"]), ids=val_ids[:2], out_dir=tmp_path / "again",
                                 device=CPU)
    assert set(per_image) == set(val_ids[:2])
    assert all(m.shape == (6, 6) and m.dtype == np.int64 for m in per_image.values())
    with pytest.raises(ValueError, match="save_predictions"):
        evaluate_deeplab(cfg, model_path=Path(res.paths["model"]), ids=val_ids, device=CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_with_mixed_precision(synth_root, tmp_path):
    """The CUDA path: model and batches on the GPU, autocast (and a GradScaler where float16)."""
    cfg = tiny_cfg(synth_root, deeplab__iterations=2, deeplab__amp=True, deeplab__eval_every=2,
                   deeplab__test_flip=True, run__device="cuda")
    res = run_deeplab(cfg, mask_dir=gt_dir(synth_root), out_dir=tmp_path, reporter=RecordingReporter())
    assert math.isfinite(res.metrics["deeplab/loss"]) and 0.0 <= res.metrics["deeplab_miou"] <= 100.0


# --------------------------------------------------------------------------------------------------
# Must show (slow)
# --------------------------------------------------------------------------------------------------


#: Degradation of the ground truth standing in for pseudo masks: objects dilated by this many
#: pixels, and each object dropped (labelled background) with this probability.
DEGRADE_DILATION = 4
DEGRADE_DROP = 0.25


def degrade_masks(layout: VOCLayout, ids: list[str], out: Path, *, seed: int = 0) -> Path:
    """Bloated, incomplete masks: the typical errors of CAM-based pseudo masks (no 255 band)."""
    rng = np.random.default_rng(seed)
    for image_id in ids:
        gt = layout.load_mask(image_id)
        mask = np.zeros_like(gt)
        for c in range(1, layout.num_classes + 1):
            obj = gt == c
            if obj.any() and rng.random() >= DEGRADE_DROP:
                mask[ndimage.binary_dilation(obj, iterations=DEGRADE_DILATION) & (mask == 0)] = c
        save_mask_png(out / f"{image_id}.png", mask)
    return out


@pytest.fixture(scope="module")
def synth_default(tmp_path_factory) -> Path:
    """The default synthetic dataset (600 train_aug / 200 train / 200 val, 96x96, 5 classes)."""
    return generate_synthetic_voc(tmp_path_factory.mktemp("dl") / "synth", seed=0)


@pytest.mark.slow
def test_deeplab_beats_its_training_masks_and_gt_training_is_the_upper_bound(synth_default, tmp_path):
    """With the built-in synth config (about a minute per run on 2 cores), on degraded ground truth
    (objects dilated by 4 px, a quarter dropped) scoring ~64 mIoU on ``train``, DeepLab reaches ~75
    val mIoU (it averages out the dropped objects), and ~92 trained on the ground truth itself."""
    cfg = load_config("synth", {"data.root": str(synth_default), "run.device": "cpu"})
    layout = VOCLayout.from_config(cfg.data)
    pseudo = degrade_masks(layout, layout.split_ids(cfg.data.train_split), tmp_path / "pseudo")
    pseudo_miou = score_masks("pseudo", layout, cfg.data, layout.split_ids(cfg.data.mask_eval_split),
                              pseudo)["pseudo_miou"]

    results, seconds = {}, {}
    for name, masks in (("pseudo", pseudo), ("gt", gt_dir(synth_default))):
        t0 = time.perf_counter()
        rep = RecordingReporter()
        results[name] = run_deeplab(cfg, mask_dir=masks, out_dir=tmp_path / name, reporter=rep).metrics
        seconds[name] = time.perf_counter() - t0
        assert [h["step"] for h in rep.history if "deeplab_miou_tune" in h][:3] == [100, 200, 300]
    print(f"pseudo masks {pseudo_miou:.1f}, DeepLab on them {results['pseudo']['deeplab_miou']:.1f} "
          f"({seconds['pseudo']:.0f} s), on GT {results['gt']['deeplab_miou']:.1f} ({seconds['gt']:.0f} s)")
    assert 50.0 < pseudo_miou < 80.0
    assert results["pseudo"]["deeplab_miou"] >= pseudo_miou
    assert results["gt"]["deeplab_miou"] > results["pseudo"]["deeplab_miou"] + 5.0
