"""EPS stage runner: train the classifier, turn its CAMs into pseudo masks, score them.

DESIGN.md §2 "EPS training" and "CAMs to pseudo masks". One image's path through this module:

1. :func:`train_eps` - ``ClassificationDataset`` on ``data.train_split`` (random long-side resize, flip,
   colour jitter, crop) -> ``EPSNet`` -> ``L_cls + L_sal`` (``method: eps``), ``L_cls`` alone
   (``method: cam``, the plain CAM baseline) or, for ``method: eps_ppc``, the EPS loss averaged over
   the crops and a downscaled second view plus the pixel-to-prototype contrast of the two views
   (:mod:`wsss_tune.ops.contrast`) -> SGD/Adam with poly LR. Checkpoints every ``checkpoint_every``
   steps resume exactly; the final weights go to ``<train_dir>/model.pt``.
2. :func:`infer_eps` - multi-scale + flip CAMs of every image (softmax for EPS, ReLU for CAM), saved
   compactly as ``<out>/cams/<id>.npz`` and turned into pseudo masks ``<out>/masks/<id>.png`` (0..C).
3. :func:`run_eps` - both, then :func:`~wsss_tune.stages.evaluate.score_masks` on ``data.mask_eval_split``.

Which :class:`~wsss_tune.config.EPSConfig` fields matter to which step is spelled out by
:data:`INFER_FIELDS`, :data:`NEUTRAL_FIELDS` and :func:`train_key_fields`, so an artifact cache can reuse
a trained model when only inference settings change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsss_tune.config import EPSConfig, PipelineConfig, field_type, to_dict
from wsss_tune.data import (
    ClassificationDataset,
    TrainTransform,
    VOCLayout,
    normalize_image,
    save_mask_png,
)
from wsss_tune.models.eps_net import EPSNet, build_eps_net
from wsss_tune.ops.cam import cam_to_mask, multiscale_cam
from wsss_tune.ops.contrast import ppc_loss, second_view
from wsss_tune.ops.eps_loss import classification_loss, eps_loss
from wsss_tune.ops.metric import ConfusionMatrix
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
from wsss_tune.stages.evaluate import tune_heldout_ids
from wsss_tune.stages.graph import EPS_INFER_FIELDS
from wsss_tune.stages.graph import SALIENCY_FIELDS as _SALIENCY_FIELDS
from wsss_tune.utils import (
    atomic_write_bytes,
    atomic_write_json,
    autocast,
    file_sha256,
    resolve_device,
    seed_everything,
)

__all__ = [
    "SALIENCY_FIELDS",
    "INFER_FIELDS",
    "NEUTRAL_FIELDS",
    "MODEL_FILE",
    "SUMMARY_FILE",
    "TRAIN_HFLIP",
    "train_key_fields",
    "train_key",
    "cam_normalization",
    "build_model",
    "eval_subset_ids",
    "make_eps_step",
    "train_eps",
    "infer_eps",
    "load_cams",
    "run_eps",
]

#: EPSConfig fields used only by CAM inference / pseudo-labelling, never by training.
INFER_FIELDS: tuple[str, ...] = EPS_INFER_FIELDS
#: EPSConfig fields that change neither the trained weights nor the pseudo masks (bookkeeping only).
NEUTRAL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EPSConfig) if f.name in graph.NO_KEY_FIELDS)
#: EPSConfig fields only the saliency loss reads: they do not change a ``method: cam`` model.
SALIENCY_FIELDS: tuple[str, ...] = _SALIENCY_FIELDS
#: Horizontal flip during training: the reference always flips.
TRAIN_HFLIP = True
#: Final weights of a training run (an ``EPSNet`` state dict, backbone keys ``backbone.*``).
MODEL_FILE = "model.pt"
#: Written next to the model when training finished: last logged losses and per-class overlap.
SUMMARY_FILE = "train_summary.json"
#: Training settings of a folder, compared on every start so a resume never mixes two configs.
_TRAIN_KEY_FILE = "train_key.json"
#: Inference settings of a CAM/mask folder; a change invalidates the files already there.
_INFER_KEY_FILE = "infer_key.json"
_CHECKPOINT_DIR = "checkpoints"


# --------------------------------------------------------------------------------------------------
# What affects what
# --------------------------------------------------------------------------------------------------


def train_key_fields() -> tuple[str, ...]:
    """EPSConfig fields that change the trained weights of some method: all but :data:`INFER_FIELDS` and
    :data:`NEUTRAL_FIELDS` (the stage graph's ``eps_model`` key fields; each method's key leaves out the
    fields it never reads, :data:`SALIENCY_FIELDS` for ``cam``, the ``ppc_*`` fields but for ``eps_ppc``)."""
    spec = graph.spec("eps_model")
    keyed = {name for method in typing.get_args(field_type("eps.method"))
             for name in spec.own_fields(PipelineConfig(eps=EPSConfig(method=method)))}
    return tuple(f.name for f in dataclasses.fields(EPSConfig) if f.name in keyed)


def train_key(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything in ``cfg`` that changes the trained EPS weights, as a plain dict: the stage graph's
    ``eps_model`` key (:meth:`~wsss_tune.stages.graph.ArtifactSpec.record`), so the folder's record
    and the artifact store's key are one key. ``tau``/``lam`` are left out for ``method: cam``, which
    has no saliency loss. The data fingerprint (file contents) is not included: the store adds it.
    """
    return graph.spec("eps_model").record(cfg)


def cam_normalization(method: str) -> str:
    """CAM activation for inference: softmax over the C+1 maps for EPS (with or without pixel-to-prototype
    contrast), ReLU for the plain CAM baseline."""
    if method in ("eps", "eps_ppc"):
        return "softmax"
    if method == "cam":
        return "relu"
    raise ValueError(f"eps.method: expected 'eps', 'cam' or 'eps_ppc', got {method!r}")


def build_model(e: EPSConfig, num_classes: int, *, pretrained: str = "") -> EPSNet:
    """The EPS net of ``e``: with the projection head of ``ppc_proj_dim`` channels for ``method: eps_ppc``
    (its weights are saved with the model, so inference builds it too), without one otherwise."""
    return build_eps_net(backbone=e.backbone, num_classes=num_classes, pretrained=pretrained,
                         proj_dim=e.ppc_proj_dim if e.method == "eps_ppc" else 0)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_config(e: EPSConfig) -> None:
    """What the config cannot check: the method has a CAM normalisation. Every range (iterations,
    learning rate, scales, ...) is checked when the config is made (:mod:`wsss_tune.config`)."""
    cam_normalization(e.method)


@torch.no_grad()
def _predict(
    model: EPSNet,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    e: EPSConfig,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """CAMs and pseudo mask of one image with the model in eval mode.

    Shape:
        image: (H, W, 3) uint8; labels: (C,) -> cams (C+1, H, W) float32, mask (H, W) int64
    """
    x = normalize_image(image).to(device, non_blocking=True)
    lab = torch.as_tensor(labels, device=device)

    def forward_maps(batch: Tensor) -> Tensor:
        with autocast(device, e.amp):
            return model.forward_maps(to_device(batch, device, e.channels_last))

    cams = multiscale_cam(forward_maps, x, lab, scales=e.cam_scales, flip=e.cam_flip,
                          normalization=cam_normalization(e.method))
    mask = cam_to_mask(cams, lab, bg_threshold=e.bg_threshold, bg_mode=e.bg_mode)
    return cams, mask


def eval_subset_ids(layout: VOCLayout, cfg: PipelineConfig) -> list[str]:
    """The fixed images of the periodic evaluation: ``eps.eval_images`` ids, evenly spaced over the
    *tuning* half of ``data.mask_eval_split`` (the held-out half is never shown to a scheduler)."""
    ids = layout.split_ids(cfg.data.mask_eval_split)
    tune, _ = tune_heldout_ids(layout, cfg.data, ids)
    n = min(cfg.eps.eval_images, len(tune))
    if n == 0:
        return []
    picks = np.linspace(0, len(tune) - 1, n).round().astype(int)
    return [tune[i] for i in dict.fromkeys(picks.tolist())]


def _evaluate(model: EPSNet, layout: VOCLayout, ids: Sequence[str], *, e: EPSConfig, device: torch.device) -> float:
    """Pseudo-mask mIoU (percent) of ``ids`` against the ground truth, in memory."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes=layout.num_classes + 1)
    for image_id in ids:
        _, mask = _predict(model, layout.load_image(image_id), layout.image_labels(image_id), e=e, device=device)
        cm.update(mask.cpu().numpy(), layout.load_mask(image_id).astype(np.int64))
    model.train(was_training)
    return 100.0 * cm.miou()


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class _LogWindow(LogWindow):
    """The losses' :class:`~wsss_tune.stages.common.LogWindow`, plus each class's overlap ratio summed
    over the images where the class is present; saved in checkpoints so reports resume too."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.overlap_sum = torch.zeros(len(class_names), dtype=torch.float64)
        self.overlap_count = torch.zeros(len(class_names), dtype=torch.float64)

    def add(self, *, overlap: Tensor | None = None, labels: Tensor | None = None, **values: float) -> None:
        """Add the scalars ``values`` and, with ``overlap``, the per-class overlap of the images' labelled
        classes.

        Shape:
            overlap, labels: (B, C)
        """
        super().add(**values)
        if overlap is not None and labels is not None:
            present = (labels != 0).double().cpu()  # absent classes do not count
            self.overlap_sum += (overlap.detach().double().cpu() * present).sum(0)
            self.overlap_count += present.sum(0)

    def summary(self) -> dict[str, float]:
        out = super().summary()
        for c, name in enumerate(self.class_names):
            if self.overlap_count[c] > 0:
                out[f"eps/overlap/{name}"] = float(self.overlap_sum[c] / self.overlap_count[c])
        return out

    def state(self) -> dict[str, Any]:
        return {**super().state(), "overlap_sum": self.overlap_sum, "overlap_count": self.overlap_count}

    def load(self, state: Mapping[str, Any]) -> None:
        if "sums" not in state and "steps" in state:  # a checkpoint written before the shared window
            sums = {"eps/loss": float(state["loss"]), "eps/loss_cls": float(state["cls"])}
            if float(state["sal"]):
                sums["eps/loss_sal"] = float(state["sal"])
            state = {**state, "sums": sums, "count": int(state["steps"])}
        super().load(state)
        self.overlap_sum = state["overlap_sum"].clone()
        self.overlap_count = state["overlap_count"].clone()


@contextlib.contextmanager
def _running_stats_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers that train still normalise with the batch's statistics inside the block, but
    leave their running statistics alone (momentum 0). For the contrast's second view: the reference
    backbone's BatchNorm is frozen, so its downscaled view never reaches the statistics that inference
    uses; the ``tiny`` backbone trains BatchNorm, and its running statistics stay those of the crops."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def make_eps_step(e: EPSConfig, model: EPSNet, *, device: torch.device, forward: nn.Module | None = None) -> TrainStep:
    """One EPS training step on ``model`` (already on ``device``), with the optimiser of ``e``.

    Optimiser groups follow the reference: backbone at ``lr``, the new layers (class head, and the
    projection head of ``eps_ppc``) at ``lr * head_lr_mult``. ``eps.momentum`` is passed explicitly: its
    default 5e-4 reproduces the reference, which hands its weight decay to SGD's momentum slot by
    mistake (0.9 is the usual value). Adam ignores it.

    The step: forward (autocast with ``amp``), ``L_cls + L_sal`` (``method: eps``) or ``L_cls`` alone
    (``cam``) in float32, the loss checked finite, backward and update. It returns ``eps/loss``,
    ``eps/loss_cls``, ``eps/loss_sal`` (EPS only), and the overlap ratios with the labels for the
    per-class means.

    ``method: eps_ppc`` (the PPC reference's EPS variant, ``docs/ppc.md``): the batch and its saliency
    maps are also seen as a second view (:func:`~wsss_tune.ops.contrast.second_view`, ``ppc_view_scale``;
    BatchNorm running statistics are not updated by it, see :func:`_running_stats_kept`);
    ``L_cls`` and ``L_sal`` are each the mean of the two views' and the contrast
    (:func:`~wsss_tune.ops.contrast.ppc_loss` on the class maps and projected features of both views) is
    added: ``L = L_cls + L_sal + L_ppc``. It also returns ``eps/loss_ppc`` (weighted) and its unweighted
    parts ``eps/ppc_cross``, ``eps/ppc_cross_labels``, ``eps/ppc_intra``; the overlap ratios are the
    first view's.

    Batches: ``{"image": (B, 3, s, s), "label": (B, C), "saliency": (B, 1, s, s)}`` (no saliency for
    ``cam``), as :class:`~wsss_tune.data.ClassificationDataset` makes them.

    ``forward``: the module the step calls, ``model``'s DistributedDataParallel wrapper on data-parallel
    ranks (default ``model``). There each rank's losses, means over its images, are scaled to its share
    of the global batch's (:func:`~wsss_tune.stages.distributed.mean_shares`), the contrast included.
    The contrast's prototypes and pixel sampling couple the images of a batch, so on N ranks they come
    from each rank's share: close to one process, not equal to it.
    """
    _check_config(e)
    forward = model if forward is None else forward
    optimizer = build_optimizer(model.param_groups(e.lr, e.head_lr_mult, e.weight_decay), kind=e.optimizer,
                                lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay)
    scaler = make_grad_scaler(device, e.amp)
    use_saliency = e.method in ("eps", "eps_ppc")
    use_ppc = e.method == "eps_ppc"
    if use_ppc and model.proj is None:
        raise ValueError("eps.method is 'eps_ppc' but the model has no projection head (build it with "
                         "wsss_tune.stages.eps.build_model)")
    if use_ppc and distributed.world_size() > 1 and distributed.is_main():
        warnings.warn(f"eps.method 'eps_ppc' on {distributed.world_size()} ranks: the contrast's prototypes and "
                      "pixel sampling come from each rank's share of the batch, so the steps differ from one "
                      "process", stacklevel=2)

    def eps_terms(image_logits: Tensor, maps: Tensor, saliency: Tensor, labels: Tensor) -> Any:
        return eps_loss(maps.float(), saliency, labels, image_logits=image_logits.float(), tau=e.tau, lam=e.lam)

    def run(batches: Sequence[Mapping[str, Tensor]], step: int) -> dict[str, Any]:
        (batch,) = batches
        image = to_device(batch["image"], device, e.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        sal = overlap = ppc = None
        if use_ppc:
            saliency = batch["saliency"].to(device, non_blocking=True)
            with autocast(device, e.amp):
                image_logits, maps, feats = forward(image, project=True)
                with _running_stats_kept(model):
                    logits2, maps2, feats2 = forward(second_view(image, e.ppc_view_scale), project=True)
            out = eps_terms(image_logits, maps, saliency, labels)
            out2 = eps_terms(logits2, maps2, second_view(saliency, e.ppc_view_scale), labels)
            ppc = ppc_loss(maps, feats, maps2, feats2, labels, weight=e.ppc_weight, temperature=e.ppc_temperature,
                           confident_share=e.ppc_confident_share, bg_score=e.ppc_bg_score)
            cls, sal, overlap = (out.cls + out2.cls) / 2, (out.sal + out2.sal) / 2, out.overlap
            loss = cls + sal + ppc.loss
        else:
            with autocast(device, e.amp):
                image_logits, maps = forward(image)
            if use_saliency:
                saliency = batch["saliency"].to(device, non_blocking=True)
                out = eps_terms(image_logits, maps, saliency, labels)
                loss, cls, sal, overlap = out.loss, out.cls, out.sal, out.overlap
            else:
                loss = cls = classification_loss(image_logits.float(), labels)
        share = distributed.mean_shares([image.shape[0]])  # the losses are means over the images
        if share is not None:
            loss, cls, sal = loss * share[0], cls * share[0], None if sal is None else sal * share[0]
        loss_value = loss.item()
        check_finite("eps/loss", loss_value, step=step)
        optimizer.zero_grad(set_to_none=True)
        backward(loss, scaler)
        optimizer_step(optimizer, scaler)
        values: dict[str, Any] = {"eps/loss": loss_value, "eps/loss_cls": cls.item()}
        if sal is not None:
            values["eps/loss_sal"] = sal.item()
        if ppc is not None:
            scale = 1.0 if share is None else float(share[0])
            values.update({"eps/loss_ppc": ppc.loss.item() * scale, "eps/ppc_cross": ppc.cross.item() * scale,
                           "eps/ppc_cross_labels": ppc.cross_labels.item() * scale,
                           "eps/ppc_intra": ppc.intra.item() * scale})
        return {**values, "overlap": overlap, "labels": labels}

    return TrainStep(model=model, optimizer=optimizer, scaler=scaler, run=run)


def train_eps(
    cfg: PipelineConfig,
    *,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
) -> Path:
    """Train the EPS classifier (or the plain CAM baseline) and return ``out_dir/model.pt``.

    Each step is :func:`make_eps_step` (optimiser groups, loss), driven by the shared
    :class:`~wsss_tune.stages.common.TrainingLoop` with poly decay every step.

    Every ``log_every`` steps reports ``eps/loss``, ``eps/loss_cls``, ``eps/loss_sal``, ``eps/lr``,
    ``eps/overlap/<class>`` (mean over the window, images where the class is present) and, for
    ``eps_ppc``, the contrast's ``eps/loss_ppc`` and parts (:func:`make_eps_step`); every
    ``eval_every`` steps ``eps_miou_tune`` on :func:`eval_subset_ids`. Checkpoints (model, optimizer,
    step, RNG, grad scaler, log window) go to ``out_dir/checkpoints`` every ``checkpoint_every`` steps and
    at the end; a restart resumes from the newest one and ends with the same weights as an
    uninterrupted run. A finished folder is returned as is. With ``run.ddp_ranks`` several processes
    train together, taking the same steps (:mod:`~wsss_tune.stages.distributed`).

    Raises:
        DivergedError: a loss became NaN/inf (checked every step, before the update).
        ValueError: bad config values, or ``out_dir`` holds a run with other training settings.
    """
    e = cfg.eps
    _check_config(e)
    device = device if device is not None else resolve_device(cfg.run.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_folder(out_dir / _TRAIN_KEY_FILE, train_key(cfg), "EPS training run")
    model_path = out_dir / MODEL_FILE
    if model_path.is_file() and (out_dir / SUMMARY_FILE).is_file():
        return model_path
    distributed.launch(_fit_eps, cfg, out_dir, reporter=reporter, device=device,
                       ranks=distributed.resolve_ranks(cfg.run.ddp_ranks, device),
                       batch_sizes={"eps.batch_size": e.batch_size})
    return model_path


def _fit_eps(cfg: PipelineConfig, out_dir: Path, *, reporter: Reporter, device: torch.device) -> None:
    """:func:`train_eps`'s training in this process: the whole run, or one rank's part of it (with
    ``run.ddp_ranks``, see :mod:`~wsss_tune.stages.distributed`); rank 0 writes the results."""
    e = cfg.eps
    layout = VOCLayout.from_config(cfg.data)
    transform = TrainTransform(resize_long=e.resize_long, hflip=TRAIN_HFLIP, jitter=e.jitter, crop_size=e.crop_size)
    dataset = ClassificationDataset(layout, layout.split_ids(cfg.data.train_split), transform=transform,
                                    with_saliency=e.method != "cam")
    eval_ids = eval_subset_ids(layout, cfg) if e.eval_every > 0 else []
    if e.eval_every > 0 and e.eval_images > 0 and not eval_ids:
        warnings.warn(f"eps.eval_every = {e.eval_every} but the tuning half of data.mask_eval_split "
                      f"{cfg.data.mask_eval_split!r} is empty: no periodic eps_miou_tune", stacklevel=2)

    seed_everything(cfg.run.seed)
    model = build_model(e, layout.num_classes, pretrained=e.pretrained)
    model = prepare_model(model, device, e.channels_last)
    step = make_eps_step(e, model, device=device, forward=distributed.wrap(model, device))
    loop = TrainingLoop(
        "eps", total=e.iterations, total_field="eps.iterations",
        ckpts=CheckpointManager(out_dir / _CHECKPOINT_DIR, keep=cfg.run.keep_checkpoints), reporter=reporter,
        model=model, optimizer=step.optimizer, scaler=step.scaler, new_window=lambda: _LogWindow(layout.class_names),
        log_every=e.log_every, checkpoint_every=e.checkpoint_every,
        evaluate=(lambda: _evaluate(model, layout, eval_ids, e=e, device=device)) if eval_ids else None,
        eval_every=e.eval_every)
    last_logged = loop.run(step, dataset, batch_size=e.batch_size, seed=cfg.run.seed, lr=e.lr, poly_power=e.poly_power,
                           num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    if distributed.is_main():
        save_state_dict(out_dir / MODEL_FILE, model)
        atomic_write_json(out_dir / SUMMARY_FILE, {"method": e.method, "iterations": e.iterations, **last_logged})


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------


def load_cams(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CAM file written by :func:`infer_eps`.

    Returns:
        ``(cams, keys)``: float32 maps, one per labelled class and the background map last, each
        max-normalised to [0, 1]; ``keys`` holds the mask label of every channel (``c`` in 1..C for
        object class ``c``, 0 for the background channel). ``keys[cams.argmax(0)]`` is a label map.

    Shape:
        cams: (K, H, W); keys: (K,)
    """
    path = Path(path)
    try:
        with np.load(path) as f:
            cams, keys = f["cams"].astype(np.float32), f["keys"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a CAM file with arrays 'cams' and 'keys' ({exc})") from None
    if cams.ndim != 3 or keys.shape != (cams.shape[0],) or keys[-1] != 0:
        raise ValueError(f"{path}: expected cams (K, H, W) and keys (K,) ending with the background key 0, "
                         f"got {cams.shape} and {keys.tolist()}")
    return cams, keys


def _cam_file_bytes(cams: Tensor, labels: np.ndarray) -> bytes:
    present = np.flatnonzero(labels)
    channels = torch.as_tensor(np.append(present, cams.shape[0] - 1), device=cams.device)
    keys = np.append(present + 1, 0).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, cams=cams[channels].cpu().numpy().astype(np.float16), keys=keys)
    return buf.getvalue()


def infer_eps(
    cfg: PipelineConfig,
    *,
    model_path: Path,
    ids: Sequence[str],
    out_dir: Path,
    device: torch.device | None = None,
) -> dict[str, Path]:
    """CAMs and pseudo masks of ``ids`` with a trained EPS model.

    Per image: :func:`~wsss_tune.ops.cam.multiscale_cam` over ``eps.cam_scales`` (and flips with
    ``eps.cam_flip``; softmax for ``method: eps``, ReLU for ``cam``), then
    :func:`~wsss_tune.ops.cam.cam_to_mask` with ``bg_threshold``/``bg_mode``. Writes, atomically,
    ``out_dir/cams/<id>.npz`` (float16 ``cams`` of the labelled classes + background last, int64
    ``keys``: see :func:`load_cams`) and ``out_dir/masks/<id>.png`` (uint8 0..C). Ids already done are
    skipped; if the inference settings or the model changed since those files were written, both
    folders are cleared first.

    Returns:
        ``{"cams": folder, "masks": folder}``.
    """
    e = cfg.eps
    _check_config(e)
    device = device if device is not None else resolve_device(cfg.run.device)
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: EPS model not found (train it with train_eps first)")
    cam_dir, mask_dir = out_dir / "cams", out_dir / "masks"
    key = {**{k: v for k, v in to_dict(e).items() if k in INFER_FIELDS}, "method": e.method,
           "model_sha256": file_sha256(model_path)}
    key_path = out_dir / _INFER_KEY_FILE
    if key_path.is_file() and json.loads(key_path.read_text()) != json.loads(json.dumps(key)):
        key_path.unlink()
        shutil.rmtree(cam_dir, ignore_errors=True)
        shutil.rmtree(mask_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_folder(key_path, key, "EPS inference output")

    pending = [i for i in dict.fromkeys(ids)
               if not ((cam_dir / f"{i}.npz").is_file() and (mask_dir / f"{i}.png").is_file())]
    if pending:
        layout = VOCLayout.from_config(cfg.data)
        model = build_model(e, layout.num_classes)
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        model = prepare_model(model, device, e.channels_last).eval()
        for image_id in pending:
            labels = layout.image_labels(image_id)
            cams, mask = _predict(model, layout.load_image(image_id), labels, e=e, device=device)
            atomic_write_bytes(cam_dir / f"{image_id}.npz", _cam_file_bytes(cams, labels))
            save_mask_png(mask_dir / f"{image_id}.png", mask.to(torch.uint8).cpu().numpy())
    cam_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    return {"cams": cam_dir, "masks": mask_dir}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run_eps(
    cfg: PipelineConfig,
    *,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
    train_dir: Path | None = None,
) -> StageResult:
    """Train (in ``train_dir`` if given, else ``out_dir``), infer on ``train_split`` ∪ ``mask_eval_split``,
    score the pseudo masks on ``mask_eval_split``.

    Metrics: ``eps_miou``, ``eps_miou_tune``, ``eps_miou_heldout``, ``eps_iou/<class>``, the final
    ``eps/overlap/<class>`` (EPS only; ~0.8 when a class works, < 0.1 when it collapsed into the
    background), the last logged losses and ``eps_method``. They are also reported at step
    ``eps.iterations``.
    """
    device = device if device is not None else resolve_device(cfg.run.device)
    out_dir = Path(out_dir)
    train_dir = Path(train_dir) if train_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # The pipeline's own build functions (the stage graph's ``eps_model`` and ``eps``), without the cache;
    # the model stays in ``train_dir``.
    layout = VOCLayout.from_config(cfg.data)
    model_ctx = graph.BuildContext(cfg=cfg, layout=layout, inputs={}, out=train_dir, work=train_dir,
                                   reporter=reporter, device=device)
    metrics: dict[str, Any] = dict(graph.spec("eps_model").build(model_ctx) or {})
    masks_ctx = graph.BuildContext(cfg=cfg, layout=layout, inputs={"eps_model": train_dir}, out=out_dir,
                                   work=out_dir, reporter=reporter, device=device)
    metrics.update(graph.spec("eps").build(masks_ctx) or {})
    reporter.report(metrics, step=cfg.eps.iterations)
    model_path = train_dir / MODEL_FILE
    paths = {"cams": out_dir / "cams", "masks": out_dir / "masks"}
    return StageResult(metrics=metrics, paths={"model": str(model_path), "train_dir": str(train_dir),
                                               "checkpoints": str(train_dir / _CHECKPOINT_DIR),
                                               "cams": str(paths["cams"]), "masks": str(paths["masks"])})
