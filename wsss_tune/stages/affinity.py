"""AffinityNet stage and random-walk refinement: train on the EPS output, cache affinities, walk.

DESIGN.md §2 "AffinityNet" and "Random walk". One image's path through this module:

1. :func:`train_affinity` - the image and its label map (the EPS pseudo mask, or dual-threshold labels
   from the EPS CAMs) are resized, flipped, jittered and cropped together (255 padding), the label map
   is reduced to the feature stride (:func:`~wsss_tune.ops.affinity.labels_at_stride`) and turned into
   background-positive / foreground-positive / negative pairs within the radius; the AffinityNet
   features give pair affinities and the three-part loss. Checkpoints resume exactly; the final
   weights go to ``out_dir/model.pt``.
2. :func:`compute_affinities` - one forward per image at full size (zero-padded to a multiple of the
   stride, as the reference), affinities saved once as ``aff/<id>.npy`` (float16), so β, α, t and the
   border handling of the walk can change without a network forward.
3. :func:`run_random_walk` - the stride-level scores rebuilt from the EPS CAMs (background
   ``(1 - max CAM)^α`` and the class maps, pooled as the reference), propagated by the sparse walk for
   several t in one pass, upsampled, argmax: refined masks ``masks/<id>.png`` and their mIoU per t.

Stored affinities use the padded pair geometry of :mod:`wsss_tune.ops.neighbors` (one entry per pixel
and offset, 0 for pairs that leave the map). The reference geometry is a crop of it: a pair that lies
inside the map has the same affinity in both, so one file serves ``rw.pad_border`` on and off.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_tune.config import AffinityConfig, PipelineConfig
from wsss_tune.data import TrainTransform, VOCLayout, normalize_image
from wsss_tune.models.affinity_net import AffinityNet, build_affinity_net
from wsss_tune.ops.affinity import (
    BG_POS_WEIGHT,
    COUNT_EPS,
    FG_POS_WEIGHT,
    NEG_WEIGHT,
    affinity_from_features,
    affinity_labels,
    affinity_loss,
    dual_threshold_labels,
    labels_at_stride,
)
from wsss_tune.ops.neighbors import neighbor_offsets, pair_crop
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
from wsss_tune.stages.eps import load_cams
from wsss_tune.utils import (
    atomic_write_bytes,
    atomic_write_json,
    autocast,
    file_sha256,
    resolve_device,
    seed_everything,
)

__all__ = [
    "MODEL_FILE",
    "SUMMARY_FILE",
    "AFF_DIR",
    "AFF_META_FILE",
    "TRAIN_HFLIP",
    "TRAIN_JITTER",
    "AffinityTrainSet",
    "EPSMaskLabels",
    "DualThresholdLabels",
    "max_steps",
    "make_affinity_step",
    "train_affinity",
    "compute_affinities",
    "load_affinity",
    "run_affinity",
]

#: Final weights of a training run (an ``AffinityNet`` state dict).
MODEL_FILE = "model.pt"
#: Written next to the model when training finished: the last logged losses.
SUMMARY_FILE = "train_summary.json"
#: Folder (inside the stage folder) of the cached affinities ``<id>.npy``.
AFF_DIR = "aff"
#: Geometry, radius and stride of the cached affinities, and the model they came from.
AFF_META_FILE = "meta.json"
#: Horizontal flip during training (PSA ``train_aff.py``: ``imutils.RandomHorizontalFlip``).
TRAIN_HFLIP = True
#: Colour jitter (brightness, contrast, saturation, hue) on the image only (PSA ``train_aff.py``:
#: ``ColorJitter(0.3, 0.3, 0.3, 0.1)``).
TRAIN_JITTER: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
#: Training settings of a folder, compared on every start so a resume never mixes two configs.
_TRAIN_KEY_FILE = "train_key.json"
_CHECKPOINT_DIR = "checkpoints"
#: Stored affinity geometry: every pixel is a "from" pixel (``pad_border=True`` of the ops).
_GEOMETRY = "padded"


# --------------------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------------------


def _backbone_name(cfg: PipelineConfig) -> str:
    return cfg.affinity.backbone or cfg.eps.backbone


def max_steps(cfg: AffinityConfig, num_images: int) -> int:
    """Training length: ``iterations`` if > 0, else ``num_images // batch_size * epochs`` (PSA ``train_aff.py``)."""
    if cfg.iterations > 0:
        return cfg.iterations
    steps = num_images // cfg.batch_size * cfg.epochs
    if steps <= 0:
        raise ValueError(f"affinity: {num_images} training images make no full batch of {cfg.batch_size}; "
                         "lower affinity.batch_size or set affinity.iterations")
    return steps


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _union_ids(layout: VOCLayout, cfg: PipelineConfig) -> list[str]:
    return list(dict.fromkeys([*layout.split_ids(cfg.data.train_split), *layout.split_ids(cfg.data.mask_eval_split)]))


def _require(paths: Sequence[Path], what: str, hint: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} {what} file(s) not found: {shown} ({hint})")


# --------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------


class EPSMaskLabels:
    """Label source ``eps_masks``: the EPS pseudo mask ``<mask_dir>/<id>.png`` (0..C, 255), the seed's design."""

    def __init__(self, *, layout: VOCLayout, mask_dir: Path) -> None:
        self.layout, self.mask_dir = layout, Path(mask_dir)

    def paths(self, ids: Sequence[str]) -> list[Path]:
        return [self.mask_dir / f"{i}.png" for i in ids]

    def __call__(self, image_id: str) -> np.ndarray:
        """Shape: returns uint8 ``(H, W)``."""
        return self.layout.load_mask(image_id, self.mask_dir)


class DualThresholdLabels:
    """Label source ``cam_dual``: the PSA reference's labels from the EPS CAMs ``<cam_dir>/<id>.npz``.

    Confident foreground from the low-α background, confident background from the high-α one, the rest
    255 (:func:`~wsss_tune.ops.affinity.dual_threshold_labels`, without the reference's dense CRF). The
    labels are made at the image resolution and reduced to the feature stride after the crop, like the
    EPS masks.
    """

    def __init__(self, *, num_classes: int, cam_dir: Path, alpha_low: float, alpha_high: float) -> None:
        self.num_classes, self.cam_dir = num_classes, Path(cam_dir)
        self.alpha_low, self.alpha_high = alpha_low, alpha_high

    def paths(self, ids: Sequence[str]) -> list[Path]:
        return [self.cam_dir / f"{i}.npz" for i in ids]

    def __call__(self, image_id: str) -> np.ndarray:
        """Shape: returns uint8 ``(H, W)``."""
        path = self.cam_dir / f"{image_id}.npz"
        cams, keys = load_cams(path)
        if keys.max() > self.num_classes:
            raise ValueError(f"{path}: class key {int(keys.max())} exceeds the dataset's {self.num_classes} classes")
        full = torch.zeros(self.num_classes, *cams.shape[1:])
        labels = torch.zeros(self.num_classes)
        cls = torch.from_numpy(keys[:-1] - 1)
        full[cls] = torch.from_numpy(cams[:-1])
        labels[cls] = 1.0
        out = dual_threshold_labels(full, alpha_low=self.alpha_low, alpha_high=self.alpha_high, labels=labels)
        return out.numpy()


class AffinityTrainSet:
    """Images with label maps, augmented together (the ``get(i, rng)`` protocol of ``make_loader``).

    Args:
        layout: dataset.
        ids: training image ids.
        labels: ``id -> (H, W) uint8`` label map (:class:`EPSMaskLabels` or :class:`DualThresholdLabels`).
        transform: joint resize / flip / jitter / crop; the mask is padded with 255.

    Items: ``{"image": float (3, s, s), "mask": long (s, s)}``, ``s`` the crop size.
    """

    def __init__(
        self,
        *,
        layout: VOCLayout,
        ids: Sequence[str],
        labels: Callable[[str], np.ndarray],
        transform: TrainTransform,
    ) -> None:
        if not ids:
            raise ValueError("AffinityTrainSet: no training ids")
        self.layout, self.ids, self.labels, self.transform = layout, list(ids), labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Tensor]:
        image_id = self.ids[index]
        image = self.layout.load_image(image_id)
        label = self.labels(image_id)
        if label.shape != image.shape[:2]:
            raise ValueError(f"labels of {image_id!r}: size {label.shape} differs from the image "
                             f"{self.layout.image_path(image_id)} ({image.shape[0]}, {image.shape[1]})")
        out = self.transform({"image": image, "mask": label}, rng)
        return {"image": out["image"], "mask": out["mask"]}


def _label_source(cfg: PipelineConfig, layout: VOCLayout, eps_dir: Path) -> EPSMaskLabels | DualThresholdLabels:
    a = cfg.affinity
    if a.label_source == "eps_masks":
        return EPSMaskLabels(layout=layout, mask_dir=eps_dir / "masks")
    if a.label_source == "cam_dual":
        return DualThresholdLabels(num_classes=layout.num_classes, cam_dir=eps_dir / "cams",
                                   alpha_low=a.alpha_low, alpha_high=a.alpha_high)
    raise ValueError(f"affinity.label_source: expected 'eps_masks' or 'cam_dual', got {a.label_source!r}")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


_PARTS = ("bg", "fg", "neg")


def _train_key(cfg: PipelineConfig, eps_model: Path | None) -> dict[str, Any]:
    """The stage graph's ``affinity`` key (:meth:`~wsss_tune.stages.graph.ArtifactSpec.record`) with the
    backbone resolved, plus the EPS weights it starts from (``init: eps``)."""
    key = graph.spec("affinity").record(cfg)
    key["affinity"] = {**key["affinity"], "backbone": _backbone_name(cfg)}
    if eps_model is not None:
        key["eps_model_sha256"] = file_sha256(eps_model)
    return key


def _build_model(cfg: PipelineConfig, *, init_state: Mapping[str, Any] | None, pretrained: str) -> AffinityNet:
    a = cfg.affinity
    return build_affinity_net(backbone=_backbone_name(cfg), widths=a.widths, out_channels=a.out_channels,
                              init_state=init_state, pretrained=pretrained)


def make_affinity_step(a: AffinityConfig, model: AffinityNet, *, device: torch.device,
                       forward: nn.Module | None = None) -> TrainStep:
    """One AffinityNet training step on ``model`` (already on ``device``), with the optimiser of ``a``.

    SGD/Adam, backbone at ``lr`` and the new layers at ``lr * head_lr_mult``; ``affinity.momentum`` is
    explicit (its default 5e-4 reproduces the reference's weight-decay-in-the-momentum-slot quirk).
    The step: features (autocast with ``amp``), the label map reduced to the feature stride, pair
    labels and affinities within ``affinity.radius``, the ``bg/4 + fg/4 + neg/2`` loss checked finite,
    backward and update. It returns ``affinity/loss``, ``affinity/loss_{bg,fg,neg}`` and
    ``affinity/pairs_{bg,fg,neg}`` (pair counts of the batch).

    Batches: ``{"image": (B, 3, s, s), "mask": long (B, s, s)}`` (:class:`AffinityTrainSet`).

    ``forward``: the module the step calls, ``model``'s DistributedDataParallel wrapper on data-parallel
    ranks (default ``model``). There each part's mean over this rank's pairs is scaled to its share of
    the mean over the global batch's pairs (:func:`~wsss_tune.stages.distributed.mean_shares`).

    Raises:
        ValueError: ``affinity.crop_size`` is not a multiple of the model's output stride.
    """
    stride = model.output_stride
    if a.crop_size % stride:
        raise ValueError(f"affinity.crop_size: {a.crop_size} is not a multiple of the backbone's output stride "
                         f"{stride}, so labels and features would not line up")
    optimizer = build_optimizer(model.param_groups(a.lr, a.head_lr_mult, a.weight_decay), kind=a.optimizer,
                                lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    scaler = make_grad_scaler(device, a.amp)
    forward = model if forward is None else forward

    def run(batches: Sequence[Mapping[str, Tensor]], step: int) -> dict[str, float]:
        (batch,) = batches
        image = to_device(batch["image"], device, a.channels_last)
        mask = batch["mask"].to(device, non_blocking=True)
        with autocast(device, a.amp):
            feats = forward(image)
        small = labels_at_stride(mask, stride)
        if small.shape[-2:] != feats.shape[-2:]:
            raise ValueError(f"labels at stride {stride} are {tuple(small.shape[-2:])} but the features are "
                             f"{tuple(feats.shape[-2:])} for crop {a.crop_size}")
        aff = affinity_from_features(feats.float(), radius=a.radius)
        bg_pos, fg_pos, neg = affinity_labels(small, radius=a.radius)
        loss, parts = affinity_loss(aff, bg_pos, fg_pos, neg)
        shares = distributed.mean_shares([parts[f"{p}_count"] for p in _PARTS], eps=COUNT_EPS)
        if shares is not None:  # the parts re-weighted as affinity_loss weighs them
            parts = {**parts, **{p: parts[p] * s for p, s in zip(_PARTS, shares, strict=True)}}
            loss = BG_POS_WEIGHT * parts["bg"] + FG_POS_WEIGHT * parts["fg"] + NEG_WEIGHT * parts["neg"]
        loss_value = loss.item()
        check_finite("affinity/loss", loss_value, step=step)
        optimizer.zero_grad(set_to_none=True)
        backward(loss, scaler)
        optimizer_step(optimizer, scaler)
        return {"affinity/loss": loss_value,
                **{f"affinity/loss_{p}": float(parts[p].detach()) for p in _PARTS},
                **{f"affinity/pairs_{p}": float(parts[f"{p}_count"].detach()) for p in _PARTS}}

    return TrainStep(model=model, optimizer=optimizer, scaler=scaler, run=run,
                     summed=tuple(f"affinity/pairs_{p}" for p in _PARTS))


def train_affinity(
    cfg: PipelineConfig,
    *,
    eps_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
    eps_model: Path | None = None,
) -> Path:
    """Train AffinityNet on the EPS output and return ``out_dir/model.pt``.

    The backbone starts from the EPS checkpoint (``affinity.init: eps``; ``eps_model``, default
    ``eps_dir/model.pt``) or from ``affinity.pretrained`` (``imagenet``; empty = random init). Labels
    per ``affinity.label_source``: the EPS pseudo masks ``eps_dir/masks`` (the seed's design) or the
    PSA dual-threshold labels from ``eps_dir/cams``. Each batch: joint augmentation with 255 mask
    padding, then :func:`make_affinity_step` (labels at the feature stride, pair labels within
    ``affinity.radius``, the ``bg/4 + fg/4 + neg/2`` loss), driven by the shared
    :class:`~wsss_tune.stages.common.TrainingLoop` with poly decay every step. ``iterations > 0``
    overrides ``epochs`` (``len(train) // batch * epochs`` steps otherwise).

    Reports ``affinity/loss``, ``affinity/loss_{bg,fg,neg}``, ``affinity/pairs_{bg,fg,neg}`` (mean pair
    counts per batch) and ``affinity/lr`` every ``log_every`` steps; checkpoints (model, optimizer,
    step, RNG, grad scaler, log window) every ``checkpoint_every`` steps and at the end, and a restart
    resumes from the newest one. A finished folder is returned as is. With ``run.ddp_ranks`` several
    processes train together, taking the same steps (:mod:`~wsss_tune.stages.distributed`).

    Raises:
        DivergedError: the loss became NaN/inf (checked every step, before the update).
        FileNotFoundError: the EPS model or label files are missing.
        ValueError: bad config values, or ``out_dir`` holds a run with other training settings.
    """
    a = cfg.affinity
    device = device if device is not None else resolve_device(cfg.run.device)
    eps_dir, out_dir = Path(eps_dir), Path(out_dir)
    eps_model = Path(eps_model) if eps_model is not None else eps_dir / MODEL_FILE
    if a.init == "eps" and not eps_model.is_file():
        raise FileNotFoundError(f"{eps_model}: EPS model not found; affinity.init is 'eps', which starts "
                                "AffinityNet from the EPS backbone (pass eps_model or set affinity.init=imagenet)")
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_folder(out_dir / _TRAIN_KEY_FILE, _train_key(cfg, eps_model if a.init == "eps" else None),
                  "AffinityNet training run")
    model_path = out_dir / MODEL_FILE
    if model_path.is_file() and (out_dir / SUMMARY_FILE).is_file():
        return model_path

    layout = VOCLayout.from_config(cfg.data)
    ids = layout.split_ids(cfg.data.train_split)
    labels = _label_source(cfg, layout, eps_dir)
    _require(labels.paths(ids), f"affinity.label_source={a.label_source!r} label",
             f"expected the EPS output of every {cfg.data.train_split!r} image in {eps_dir}")
    transform = TrainTransform(crop_size=a.crop_size, resize_long=a.resize_long, hflip=TRAIN_HFLIP,
                               jitter=TRAIN_JITTER)
    dataset = AffinityTrainSet(layout=layout, ids=ids, labels=labels, transform=transform)
    distributed.launch(_fit_affinity, cfg, dataset, eps_model, out_dir, reporter=reporter, device=device,
                       ranks=distributed.resolve_ranks(cfg.run.ddp_ranks, device),
                       batch_sizes={"affinity.batch_size": a.batch_size})
    return model_path


def _fit_affinity(cfg: PipelineConfig, dataset: AffinityTrainSet, eps_model: Path, out_dir: Path, *,
                  reporter: Reporter, device: torch.device) -> None:
    """:func:`train_affinity`'s training in this process: the whole run, or one rank's part of it (with
    ``run.ddp_ranks``, see :mod:`~wsss_tune.stages.distributed`); rank 0 writes the results."""
    a = cfg.affinity
    total = max_steps(a, len(dataset))
    seed_everything(cfg.run.seed)
    init_state = torch.load(eps_model, map_location="cpu", weights_only=True) if a.init == "eps" else None
    model = _build_model(cfg, init_state=init_state, pretrained=a.pretrained if a.init == "imagenet" else "")
    model = prepare_model(model, device, a.channels_last)
    step = make_affinity_step(a, model, device=device, forward=distributed.wrap(model, device))
    loop = TrainingLoop(
        "affinity", total=total, total_field="the training steps (affinity.epochs or affinity.iterations)",
        ckpts=CheckpointManager(out_dir / _CHECKPOINT_DIR, keep=cfg.run.keep_checkpoints), reporter=reporter,
        model=model, optimizer=step.optimizer, scaler=step.scaler, new_window=LogWindow,
        log_every=a.log_every, checkpoint_every=a.checkpoint_every)
    last_logged = loop.run(step, dataset, batch_size=a.batch_size, seed=cfg.run.seed, lr=a.lr, poly_power=a.poly_power,
                           num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    if distributed.is_main():
        save_state_dict(out_dir / MODEL_FILE, model)
        atomic_write_json(out_dir / SUMMARY_FILE, {"steps": total, "stride": model.output_stride, **last_logged})


# --------------------------------------------------------------------------------------------------
# Affinity cache
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _image_affinity(model: AffinityNet, image: np.ndarray, *, radius: int, amp: bool, device: torch.device,
                    channels_last: bool) -> Tensor:
    """Affinities of one image in the padded geometry.

    The normalised image is zero-padded at the bottom and right to a multiple of the stride, as the
    reference (``infer_aff.py``), and the features cover that padded grid.

    Shape:
        image: (H, W, 3) uint8 -> (D, ceil(H/s), ceil(W/s)) float32 on ``device``
    """
    stride = model.output_stride
    x = normalize_image(image)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % stride, 0, -h % stride))[None]
    with autocast(device, amp):
        feats = model(to_device(x, device, channels_last))
    want = (x.shape[-2] // stride, x.shape[-1] // stride)
    if tuple(feats.shape[-2:]) != want:
        raise ValueError(f"AffinityNet features are {tuple(feats.shape[-2:])} for a padded input "
                         f"{tuple(x.shape[-2:])}; expected {want} at stride {stride}")
    return affinity_from_features(feats.float(), radius=radius, pad_border=True)[0]


def compute_affinities(
    cfg: PipelineConfig,
    *,
    model_path: Path,
    ids: Sequence[str],
    out_dir: Path,
    device: torch.device | None = None,
) -> Path:
    """Affinities of ``ids`` with a trained AffinityNet, one forward per image, cached.

    Writes ``out_dir/aff/<id>.npy`` (float16 ``(D, h, w)``: ``D`` offsets of ``affinity.radius``, ``h, w``
    the feature grid of the image zero-padded to a multiple of the stride; padded pair geometry, see the
    module docstring) and ``out_dir/aff/meta.json`` (radius, stride, geometry, model hash). Files are
    written atomically; ids already done are skipped, and a different model or radius clears the folder.

    Returns:
        The ``aff`` folder.
    """
    a = cfg.affinity
    device = device if device is not None else resolve_device(cfg.run.device)
    model_path, aff_dir = Path(model_path), Path(out_dir) / AFF_DIR
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: AffinityNet model not found (train it with train_affinity first)")
    model = _build_model(cfg, init_state=None, pretrained="")
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    meta = {"radius": a.radius, "stride": model.output_stride, "geometry": _GEOMETRY,
            "directions": len(neighbor_offsets(a.radius)), "model_sha256": file_sha256(model_path)}
    meta_path = aff_dir / AFF_META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        shutil.rmtree(aff_dir)
    aff_dir.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file():
        atomic_write_json(meta_path, meta)

    pending = [i for i in dict.fromkeys(ids) if not (aff_dir / f"{i}.npy").is_file()]
    if pending:
        layout = VOCLayout.from_config(cfg.data)
        model = prepare_model(model, device, a.channels_last).eval()
        for image_id in pending:
            aff = _image_affinity(model, layout.load_image(image_id), radius=a.radius, amp=a.amp, device=device,
                                  channels_last=a.channels_last)
            atomic_write_bytes(aff_dir / f"{image_id}.npy", _npy_bytes(aff.to(torch.float16).cpu().numpy()))
    return aff_dir


def _read_meta(aff_dir: Path) -> dict[str, Any]:
    path = aff_dir / AFF_META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected an affinity folder written by compute_affinities")
    meta = json.loads(path.read_text())
    if meta.get("geometry") != _GEOMETRY:
        raise ValueError(f"{path}: affinity geometry {meta.get('geometry')!r}; expected {_GEOMETRY!r}")
    return meta


def load_affinity(aff_dir: Path, image_id: str, *, pad_border: bool, meta: Mapping[str, Any] | None = None) -> Tensor:
    """Cached affinities of one image in the walk's geometry.

    ``pad_border=False`` crops the reference's "from" window (rows ``0..h-r``, columns ``r-1..w-r``) out
    of the stored padded geometry; ``True`` returns it whole.

    Shape:
        returns float32 ``(D, h - r + 1, w - 2r + 2)``, or ``(D, h, w)`` with ``pad_border``.
    """
    aff_dir = Path(aff_dir)
    meta = meta if meta is not None else _read_meta(aff_dir)
    path = aff_dir / f"{image_id}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: affinities of {image_id!r} not found (run compute_affinities for it)")
    aff = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    if aff.dim() != 3 or aff.shape[0] != meta["directions"]:
        raise ValueError(f"{path}: expected ({meta['directions']}, h, w) affinities for radius {meta['radius']}, "
                         f"got {tuple(aff.shape)}")
    if pad_border:
        return aff
    rows, cols = pair_crop(aff.shape[1], aff.shape[2], int(meta["radius"])).from_slices()
    return aff[:, rows, cols]


def run_affinity(
    cfg: PipelineConfig,
    *,
    eps_dir: Path,
    out_dir: Path,
    reporter: Reporter,
    device: torch.device | None = None,
    eps_model: Path | None = None,
) -> StageResult:
    """Train AffinityNet (:func:`train_affinity`) and cache the affinities of ``train_split`` ∪
    ``mask_eval_split`` (:func:`compute_affinities`).

    Metrics: the last logged ``affinity/*`` losses and pair counts, and ``affinity/steps``.
    """
    device = device if device is not None else resolve_device(cfg.run.device)
    out_dir = Path(out_dir)
    model_path = train_affinity(cfg, eps_dir=eps_dir, out_dir=out_dir, reporter=reporter, device=device,
                                eps_model=eps_model)
    layout = VOCLayout.from_config(cfg.data)
    aff_dir = compute_affinities(cfg, model_path=model_path, ids=_union_ids(layout, cfg), out_dir=out_dir,
                                 device=device)
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    metrics = {k: v for k, v in summary.items() if k.startswith("affinity/")}
    metrics["affinity/steps"] = summary["steps"]
    return StageResult(metrics=metrics, paths={"model": str(model_path), "aff": str(aff_dir),
                                               "checkpoints": str(out_dir / _CHECKPOINT_DIR)})
