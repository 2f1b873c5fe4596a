"""DeepLab stage runner: train DeepLab v1/v2 on a mask folder, score it on ``data.val_split``.

DESIGN.md §2 "DeepLab" and "Metric". One image's path through this module:

1. :func:`train_deeplab` - ``SegmentationDataset`` on ``data.train_split`` with the masks of any folder
   (pseudo masks, refined masks, their CRF-refined copy, or the ground truth for an upper bound);
   :func:`train_transform`: random scale from ``deeplab.scales`` (or uniform in ``scale_range``), flip,
   optional HSV shift, crop ``crop_size`` padded with 255 -> DeepLab (``arch`` v1/v2/v2_gp, optional
   multi-scale inputs) -> cross-entropy at the resolution of each output, or on the outputs upsampled to
   the crop (``loss_resize``; :func:`~wsss_tune.ops.seg_loss.msc_loss`)
   -> SGD momentum 0.9 (or Adam) with poly LR, backbone 1x, head weights ``head_lr_mult``, head biases
   ``head_bias_lr_mult`` without weight decay; ``accumulate`` micro-batches per update. Checkpoints resume
   exactly; the final weights go to ``<out>/model.pt``.
2. :func:`evaluate_deeplab` - full image, logits upsampled bilinearly to the label size, probabilities
   averaged over ``test_scales`` (and flips with ``test_flip``), optional dense CRF on the raw RGB image,
   argmax; one confusion matrix per image (and prediction PNGs with ``save_predictions``).
3. :func:`run_deeplab` - both, then :func:`~wsss_tune.stages.evaluate.miou_metrics` on ``data.val_split``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.config import DeepLabConfig, PipelineConfig
from wsss_tune.data import SegmentationDataset, TrainTransform, VOCLayout, normalize_image, save_mask_png
from wsss_tune.models.deeplab import build_deeplab, deeplab_param_groups
from wsss_tune.ops.crf import dense_crf
from wsss_tune.ops.labelmap import score_argmax
from wsss_tune.ops.metric import IGNORE_INDEX, ConfusionMatrix
from wsss_tune.ops.seg_loss import msc_loss, resize_labels, seg_cross_entropy
from wsss_tune.reporting import Reporter, check_finite
from wsss_tune.stages import distributed, graph
from wsss_tune.stages.common import (
    CheckpointManager,
    LogWindow,
    StageResult,
    TrainingLoop,
    TrainStep,
    backward,
    build_optimizer,
    claim_folder,
    make_grad_scaler,
    optimizer_step,
    prepare_model,
    save_state_dict,
    to_device,
)
from wsss_tune.stages.evaluate import miou_metrics, tune_heldout_ids
from wsss_tune.stages.graph import DEEPLAB_INFER_FIELDS
from wsss_tune.utils import atomic_write_json, autocast, resolve_device, seed_everything

__all__ = [
    "MODEL_FILE",
    "SUMMARY_FILE",
    "PREDICTION_DIR",
    "TRAIN_HFLIP",
    "INFER_FIELDS",
    "NEUTRAL_FIELDS",
    "train_key_fields",
    "train_key",
    "mask_fingerprint",
    "eval_subset_ids",
    "build_deeplab_optimizer",
    "load_deeplab",
    "multiscale_probs",
    "predict_probs",
    "evaluate_model",
    "make_deeplab_step",
    "model_kwargs",
    "train_transform",
    "train_deeplab",
    "evaluate_deeplab",
    "run_deeplab",
]

#: Final weights of a training run (a ``DeepLab`` state dict).
MODEL_FILE = "model.pt"
#: Written next to the model when training finished: the last logged loss.
SUMMARY_FILE = "train_summary.json"
#: Sub-folder of ``out_dir`` for prediction PNGs (``deeplab.save_predictions``).
PREDICTION_DIR = "predictions"
#: Horizontal flip during training: the reference (deeplab-pytorch ``VOCAug``) flips with p 0.5.
TRAIN_HFLIP = True
#: DeepLabConfig fields used only at test time, never by training.
INFER_FIELDS: tuple[str, ...] = DEEPLAB_INFER_FIELDS
#: DeepLabConfig fields that change neither the weights nor the predictions (bookkeeping only);
#: ``mask_source`` is replaced by the content of the mask folder actually used (:func:`mask_fingerprint`).
NEUTRAL_FIELDS: tuple[str, ...] = (*(f.name for f in dataclasses.fields(DeepLabConfig) if f.name in graph.NO_KEY_FIELDS),
                                   "mask_source")
#: Training settings of a folder, compared on every start so a resume never mixes two configs.
_TRAIN_KEY_FILE = "train_key.json"
_CHECKPOINT_DIR = "checkpoints"
#: Logits are upsampled to the label size bilinearly with ``align_corners=False`` (deeplab-pytorch
#: ``F.interpolate(..., mode="bilinear", align_corners=False)`` at test time).
_UPSAMPLE_MODE = "bilinear"


# --------------------------------------------------------------------------------------------------
# What affects what, and validation
# --------------------------------------------------------------------------------------------------


def train_key_fields() -> tuple[str, ...]:
    """DeepLabConfig fields that change the trained weights: all but :data:`INFER_FIELDS`, :data:`NEUTRAL_FIELDS`
    and the CRF on the training masks (:data:`~wsss_tune.stages.graph.PSEUDO_CRF_FIELDS`, which key those
    masks). The stage graph's ``deeplab_model`` key holds them, less the EPS recipe's options while
    they are at their defaults (:data:`~wsss_tune.stages.graph.DEEPLAB_RECIPE_FIELDS`)."""
    skip = {*INFER_FIELDS, *NEUTRAL_FIELDS, *graph.PSEUDO_CRF_FIELDS}
    return tuple(f.name for f in dataclasses.fields(DeepLabConfig) if f.name not in skip)


def train_key(cfg: PipelineConfig, masks: str) -> dict[str, Any]:
    """Everything that changes the trained DeepLab weights, as a plain dict: the stage graph's
    ``deeplab_model`` key (:meth:`~wsss_tune.stages.graph.ArtifactSpec.record`) plus the masks.

    Args:
        cfg: The pipeline config.
        masks: :func:`mask_fingerprint` of the training masks (where they live does not matter).
    """
    return {**graph.spec("deeplab_model").record(cfg), "masks": masks}


def mask_fingerprint(layout: VOCLayout, ids: Sequence[str], mask_dir: str | Path) -> str:
    """SHA-256 over the ids and the bytes of their mask files in ``mask_dir``.

    Raises:
        FileNotFoundError: ``mask_dir`` or one of the masks is missing (the first few are named).
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: mask folder not found (expected <id>.png label masks for the "
                                "training split)")
    paths = [layout.mask_path(i, mask_dir) for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {len(paths)} training masks are missing, e.g. "
                                f"{', '.join(missing[:3])}")
    digest = hashlib.sha256()
    for image_id, path in zip(ids, paths, strict=True):
        digest.update(image_id.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Model, optimiser, device helpers
# --------------------------------------------------------------------------------------------------


def model_kwargs(d: DeepLabConfig) -> dict[str, Any]:
    """:func:`~wsss_tune.models.deeplab.build_deeplab`'s arguments from the config (all but the class count
    and the weights file): the one place the DeepLab section becomes a model."""
    return {"arch": d.arch, "backbone": d.backbone, "msc": d.msc, "freeze_bn": d.freeze_bn,
            "head_bn_momentum": d.head_bn_momentum,
            # Passed only when set: backbones without the option (``tiny``) still build by default.
            "backbone_kwargs": {"contract_dilation": True} if d.contract_dilation else None}


def _build_model(d: DeepLabConfig, num_classes: int, *, pretrained: str) -> nn.Module:
    return build_deeplab(num_classes=num_classes + 1, pretrained=pretrained, **model_kwargs(d))


def build_deeplab_optimizer(model: nn.Module, d: DeepLabConfig) -> torch.optim.Optimizer:
    """The runner's optimiser: :func:`~wsss_tune.models.deeplab.deeplab_param_groups` (backbone 1x,
    head weights ``head_lr_mult`` with weight decay, head biases ``head_bias_lr_mult`` without, trainable
    BatchNorm at ``bn_lr_mult``) under SGD with ``momentum`` (reference 0.9) or Adam. Learning rates are
    set per step by the poly schedule.
    """
    groups = deeplab_param_groups(model, lr=d.lr, head_lr_mult=d.head_lr_mult, head_bias_lr_mult=d.head_bias_lr_mult,
                                  bn_lr_mult=d.bn_lr_mult, weight_decay=d.weight_decay)
    return build_optimizer(groups, kind=d.optimizer, lr=d.lr, momentum=d.momentum, weight_decay=d.weight_decay)


def load_deeplab(cfg: PipelineConfig, model_path: str | Path, *, device: torch.device) -> nn.Module:
    """A trained DeepLab from ``model_path`` (a :func:`train_deeplab` output) in eval mode on ``device``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: DeepLab model not found (train it with train_deeplab first)")
    layout = VOCLayout.from_config(cfg.data)
    model = _build_model(cfg.deeplab, layout.num_classes, pretrained="")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{model_path}: weights do not fit deeplab.arch={cfg.deeplab.arch!r}, "
                         f"backbone={cfg.deeplab.backbone!r}, msc={cfg.deeplab.msc} with "
                         f"{layout.num_classes + 1} classes ({exc})") from None
    return prepare_model(model, device, cfg.deeplab.channels_last).eval()


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


def multiscale_probs(
    forward: Callable[[Tensor], Tensor],
    image: Tensor,
    *,
    size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> Tensor:
    """Class probabilities averaged over input scales and (optionally) horizontal flips.

    Each pass resizes the image bilinearly to ``int(side * s)`` (the rule of the training scales),
    upsamples the logits bilinearly to ``size`` and takes the softmax; a flipped pass is flipped back.
    The flipped copy runs in the same batch as the original. With ``flip`` the result is
    flip-equivariant: the prediction for a mirrored image is the mirrored prediction.

    Args:
        forward: Maps a normalised batch to logits at any resolution (a model in eval mode).
        image: One normalised image.
        size: Output ``(H, W)``, normally the label size.
        scales: Input scale factors.
        flip: Also average over horizontally flipped inputs.

    Returns:
        float32 probabilities (summing to 1 over classes) on ``image``'s device.

    Shape:
        image: (3, h, w) -> (K, H, W)
    """
    if image.dim() != 3:
        raise ValueError(f"multiscale_probs: image must be (3, h, w), got shape {tuple(image.shape)}")
    if not scales:
        raise ValueError("multiscale_probs: expected at least one scale")
    h, w = image.shape[-2:]
    x = image[None]
    total: Tensor | None = None
    for s in scales:
        scaled_size = (max(1, int(h * s)), max(1, int(w * s)))
        xs = x if scaled_size == (h, w) else F.interpolate(x, size=scaled_size, mode=_UPSAMPLE_MODE,
                                                            align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = F.interpolate(forward(batch).float(), size=size, mode=_UPSAMPLE_MODE, align_corners=False)
        probs = logits.softmax(1)
        summed = probs[0] + probs[1].flip(-1) if flip else probs[0]
        total = summed if total is None else total + summed
    assert total is not None
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: np.ndarray,
    *,
    test_scales: Sequence[float],
    test_flip: bool,
    crf: bool,
    amp: bool,
    device: torch.device,
    channels_last: bool = False,
) -> Tensor:
    """Test-time class probabilities of one raw image (model in eval mode; ``channels_last``: the
    model was prepared NHWC, so inputs on CUDA are too).

    :func:`multiscale_probs` at the image size, then, with ``crf``, a dense CRF with the reference
    parameters (:func:`~wsss_tune.ops.crf.dense_crf`) on the raw RGB image.

    Shape:
        image: (H, W, 3) uint8 -> (K, H, W) float32 on ``device``
    """
    x = normalize_image(image).to(device, non_blocking=True)

    def forward(batch: Tensor) -> Tensor:
        with autocast(device, amp):
            return model(to_device(batch, device, channels_last))

    probs = multiscale_probs(forward, x, size=tuple(image.shape[:2]), scales=test_scales, flip=test_flip)
    if crf:
        refined = dense_crf(image, probs)
        assert isinstance(refined, Tensor)  # a tensor in gives a tensor out, on the same device
        probs = refined
    return probs


def evaluate_model(
    model: nn.Module,
    layout: VOCLayout,
    ids: Sequence[str],
    *,
    test_scales: Sequence[float],
    test_flip: bool,
    crf: bool,
    amp: bool,
    device: torch.device,
    prediction_dir: Path | None = None,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """Per-image confusion matrices (K x K, rows ground truth) of ``model``'s predictions on ``ids``.

    The model is switched to eval mode and back. With ``prediction_dir``, each prediction is written
    there atomically as ``<id>.png`` (uint8 0..C, VOC palette).

    Raises:
        ValueError: an image and its ground-truth mask differ in size.
    """
    was_training = model.training
    model.eval()
    k = layout.num_classes + 1
    out: dict[str, np.ndarray] = {}
    try:
        for image_id in ids:
            image = layout.load_image(image_id)
            gt = layout.load_mask(image_id)
            if gt.shape != image.shape[:2]:
                raise ValueError(f"{layout.mask_path(image_id)}: mask is {gt.shape[1]}x{gt.shape[0]} (WxH) but the "
                                 f"image {layout.image_path(image_id)} is {image.shape[1]}x{image.shape[0]}")
            probs = predict_probs(model, image, test_scales=test_scales, test_flip=test_flip, crf=crf, amp=amp,
                                  device=device, channels_last=channels_last)
            pred = score_argmax(probs, dim=0)
            gt_t = torch.from_numpy(gt).to(pred.device, non_blocking=True)
            out[image_id] = ConfusionMatrix(num_classes=k).update(pred, gt_t).matrix
            if prediction_dir is not None:
                save_mask_png(prediction_dir / f"{image_id}.png", pred.to(torch.uint8).cpu().numpy())
    finally:
        model.train(was_training)
    return out


def eval_subset_ids(layout: VOCLayout, cfg: PipelineConfig) -> list[str]:
    """The fixed images of the periodic evaluation: ``deeplab.eval_images`` ids, evenly spaced over the
    *tuning* half of ``data.val_split`` (the held-out half is never shown to a scheduler)."""
    tune, _ = tune_heldout_ids(layout, cfg.data, layout.split_ids(cfg.data.val_split))
    n = min(cfg.deeplab.eval_images, len(tune))
    if n == 0:
        return []
    picks = np.linspace(0, len(tune) - 1, n).round().astype(int)
    return [tune[i] for i in dict.fromkeys(picks.tolist())]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _seg_loss(outputs: Tensor | Sequence[Tensor], target: Tensor, *, balanced: bool,
              resize: Literal["labels", "logits"] = "labels") -> Tensor:
    """:func:`~wsss_tune.ops.seg_loss.msc_loss` (``resize``: labels shrunk to each output, or the output
    upsampled to the labels); on data-parallel ranks each output's mean over this rank's valid pixels
    scaled to its share of the mean over the global batch's
    (:func:`~wsss_tune.stages.distributed.mean_shares`). With ``balanced`` the class weights stay
    per rank (they come from the batch's class counts), so that loss differs from one process."""
    if distributed.world_size() == 1:
        return msc_loss(outputs, target, balanced=balanced, resize=resize)
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)

    def labels(o: Tensor) -> Tensor:
        return target if resize == "logits" else resize_labels(target, (o.shape[-2], o.shape[-1]))

    shares = distributed.mean_shares([(labels(o) != IGNORE_INDEX).sum() for o in outputs])
    assert shares is not None  # several ranks
    return (torch.stack([seg_cross_entropy(o, target, balanced=balanced, resize=resize) for o in outputs])
            * shares).sum()


def make_deeplab_step(d: DeepLabConfig, model: nn.Module, *, device: torch.device,
                      forward: nn.Module | None = None) -> TrainStep:
    """One DeepLab training step on ``model`` (already on ``device``), with :func:`build_deeplab_optimizer`.

    A step is ``accumulate`` micro-batches (each loss divided by ``accumulate``, as deeplab-pytorch's
    ``ITER_SIZE``; each checked finite before its backward), then one optimiser update. The loss is
    :func:`~wsss_tune.ops.seg_loss.msc_loss` (labels shrunk to each output, or each output upsampled to
    the crop with ``loss_resize: logits``, summed over the MSC outputs; class-balanced with ``balanced_ce``). It returns ``deeplab/loss``, the step's loss.

    Batches: ``accumulate`` of ``{"image": (B, 3, s, s), "mask": long (B, s, s)}``
    (:class:`~wsss_tune.data.SegmentationDataset`).

    ``forward``: the module the step calls, ``model``'s DistributedDataParallel wrapper on data-parallel
    ranks (default ``model``); there the loss is the global batch's mean (:func:`_seg_loss`). Each
    micro-batch's backward then averages the gradients over the ranks (no ``no_sync`` skipping).
    """
    optimizer = build_deeplab_optimizer(model, d)
    scaler = make_grad_scaler(device, d.amp)
    forward = model if forward is None else forward

    def run(batches: Sequence[Mapping[str, Tensor]], step: int) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for batch in batches:
            image = to_device(batch["image"], device, d.channels_last)
            target = batch["mask"].to(device, non_blocking=True)
            with autocast(device, d.amp):
                outputs = forward(image)
            loss = _seg_loss(outputs, target, balanced=d.balanced_ce, resize=d.loss_resize) / d.accumulate
            loss_value = loss.item()
            check_finite("deeplab/loss", loss_value * d.accumulate, step=step)
            backward(loss, scaler)
            step_loss += loss_value
        optimizer_step(optimizer, scaler)
        return {"deeplab/loss": step_loss}

    return TrainStep(model=model, optimizer=optimizer, scaler=scaler, run=run, micro_batches=d.accumulate)


def train_transform(d: DeepLabConfig) -> TrainTransform:
    """The training augmentation of the DeepLab section: random scale (from ``scales``, or uniform in
    ``scale_range``), flip with p 0.5, optional HSV shift (``hsv_jitter``), crop ``crop_size`` padded
    with 255 labels."""
    return TrainTransform(crop_size=d.crop_size, scales=None if d.scale_range else d.scales,
                          scale_range=tuple(d.scale_range) if d.scale_range else None, hflip=TRAIN_HFLIP,
                          hsv=tuple(d.hsv_jitter) if any(d.hsv_jitter) else None)


def train_deeplab(
    cfg: PipelineConfig,
    *,
    mask_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
) -> Path:
    """Train DeepLab on the masks in ``mask_dir`` and return ``out_dir/model.pt``.

    One step is :func:`make_deeplab_step`: ``accumulate`` micro-batches of ``batch_size`` crops, then one
    optimiser update. The shared :class:`~wsss_tune.stages.common.TrainingLoop` drives it, the LR
    following the poly schedule ``lr * (1 - step / iterations) ** poly_power`` per group multiplier.

    Every ``log_every`` steps reports ``deeplab/loss`` (mean over the window) and ``deeplab/lr``; every
    ``eval_every`` steps ``deeplab_miou_tune`` on :func:`eval_subset_ids` (test scales and flip as
    configured, no CRF). Checkpoints (model, optimizer, step, RNG, grad scaler, log window) go to
    ``out_dir/checkpoints`` every ``checkpoint_every`` steps and at the end; a restart resumes from the
    newest and ends with the weights of an uninterrupted run. A finished folder is returned as is.
    With ``run.ddp_ranks`` several processes train together, taking the same steps
    (:mod:`~wsss_tune.stages.distributed`).

    Raises:
        DivergedError: a loss became NaN/inf (checked every micro-batch, before the update).
        ValueError: bad config values, or ``out_dir`` holds a run with other settings or masks.
        FileNotFoundError: ``mask_dir`` or one of its training masks is missing.
    """
    d = cfg.deeplab
    device = device if device is not None else resolve_device(cfg.run.device)
    out_dir, mask_dir = Path(out_dir), Path(mask_dir)
    layout = VOCLayout.from_config(cfg.data)
    train_ids = layout.split_ids(cfg.data.train_split)
    key = train_key(cfg, mask_fingerprint(layout, train_ids, mask_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_folder(out_dir / _TRAIN_KEY_FILE, key, "DeepLab training run")
    model_path = out_dir / MODEL_FILE
    if model_path.is_file() and (out_dir / SUMMARY_FILE).is_file():
        return model_path

    transform = train_transform(d)
    dataset = SegmentationDataset(layout, train_ids, transform=transform, mask_dir=mask_dir)
    ranks = distributed.resolve_ranks(cfg.run.ddp_ranks, device)
    if ranks > 1 and d.balanced_ce:
        warnings.warn(f"deeplab.balanced_ce with run.ddp_ranks = {ranks}: each rank weighs the classes by its own "
                      "share of the batch, so the loss differs from one process's", stacklevel=2)
    distributed.launch(_fit_deeplab, cfg, dataset, out_dir, reporter=reporter, device=device, ranks=ranks,
                       batch_sizes={"deeplab.batch_size": d.batch_size})
    return model_path


def _fit_deeplab(cfg: PipelineConfig, dataset: SegmentationDataset, out_dir: Path, *, reporter: Reporter,
                 device: torch.device) -> None:
    """:func:`train_deeplab`'s training in this process: the whole run, or one rank's part of it (with
    ``run.ddp_ranks``, see :mod:`~wsss_tune.stages.distributed`); rank 0 writes the results."""
    d = cfg.deeplab
    layout = VOCLayout.from_config(cfg.data)
    eval_ids = eval_subset_ids(layout, cfg) if d.eval_every > 0 else []

    seed_everything(cfg.run.seed)
    model = prepare_model(_build_model(d, layout.num_classes, pretrained=d.pretrained), device, d.channels_last)
    step = make_deeplab_step(d, model, device=device, forward=distributed.wrap(model, device))

    def evaluate() -> float:
        per_image = evaluate_model(model, layout, eval_ids, test_scales=d.test_scales, test_flip=d.test_flip,
                                   crf=False, amp=d.amp, device=device, channels_last=d.channels_last)
        cm = ConfusionMatrix(num_classes=layout.num_classes + 1)
        for counts in per_image.values():
            cm.merge_matrix(counts)
        return 100.0 * cm.miou()

    loop = TrainingLoop(
        "deeplab", total=d.iterations, total_field="deeplab.iterations",
        ckpts=CheckpointManager(out_dir / _CHECKPOINT_DIR, keep=cfg.run.keep_checkpoints), reporter=reporter,
        model=model, optimizer=step.optimizer, scaler=step.scaler, new_window=LogWindow,
        log_every=d.log_every, checkpoint_every=d.checkpoint_every,
        evaluate=evaluate if eval_ids else None, eval_every=d.eval_every)
    last_logged = loop.run(step, dataset, batch_size=d.batch_size, seed=cfg.run.seed, lr=d.lr, poly_power=d.poly_power,
                           num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    if distributed.is_main():
        save_state_dict(out_dir / MODEL_FILE, model)
        atomic_write_json(out_dir / SUMMARY_FILE, {"iterations": d.iterations, **last_logged})


# --------------------------------------------------------------------------------------------------
# Evaluation and the stage
# --------------------------------------------------------------------------------------------------


def evaluate_deeplab(
    cfg: PipelineConfig,
    *,
    model_path: Path,
    ids: Sequence[str],
    out_dir: Path | None = None,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Per-image confusion matrices of a trained model on ``ids`` (see :func:`evaluate_model`).

    Test settings come from ``deeplab.test_scales``, ``test_flip`` and ``crf``; with
    ``save_predictions`` the predicted masks go to ``out_dir/predictions/<id>.png``.

    Raises:
        ValueError: ``save_predictions`` is set but no ``out_dir`` was given.
    """
    d = cfg.deeplab
    if d.save_predictions and out_dir is None:
        raise ValueError("deeplab.save_predictions is true but evaluate_deeplab got no out_dir to write "
                         f"{PREDICTION_DIR}/ into")
    device = device if device is not None else resolve_device(cfg.run.device)
    layout = VOCLayout.from_config(cfg.data)
    model = load_deeplab(cfg, model_path, device=device)
    prediction_dir = Path(out_dir) / PREDICTION_DIR if d.save_predictions and out_dir is not None else None
    return evaluate_model(model, layout, list(dict.fromkeys(ids)), test_scales=d.test_scales,
                          test_flip=d.test_flip, crf=d.crf, amp=d.amp, device=device, channels_last=d.channels_last,
                          prediction_dir=prediction_dir)


def run_deeplab(
    cfg: PipelineConfig,
    *,
    mask_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
) -> StageResult:
    """Train on ``mask_dir`` in ``out_dir``, evaluate on ``data.val_split``.

    Metrics: ``deeplab_miou``, ``deeplab_miou_tune``, ``deeplab_miou_heldout``, ``deeplab_iou/<class>``
    and the last logged ``deeplab/loss``; they are also reported at step ``deeplab.iterations``.
    """
    device = device if device is not None else resolve_device(cfg.run.device)
    out_dir = Path(out_dir)
    model_path = train_deeplab(cfg, mask_dir=mask_dir, out_dir=out_dir, reporter=reporter, device=device)
    layout = VOCLayout.from_config(cfg.data)
    val_ids = layout.split_ids(cfg.data.val_split)
    per_image = evaluate_deeplab(cfg, model_path=model_path, ids=val_ids, out_dir=out_dir, device=device)
    tune, held = tune_heldout_ids(layout, cfg.data, val_ids)
    metrics = miou_metrics("deeplab", per_image, tune_ids=tune, heldout_ids=held, class_names=layout.class_names)
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    metrics.update({k: v for k, v in summary.items() if k.startswith("deeplab/")})
    reporter.report(metrics, step=cfg.deeplab.iterations)
    paths = {"model": str(model_path), "checkpoints": str(out_dir / _CHECKPOINT_DIR), "masks": str(mask_dir)}
    if cfg.deeplab.save_predictions:
        paths["predictions"] = str(out_dir / PREDICTION_DIR)
    return StageResult(metrics=metrics, paths=paths)
