"""Typed, frozen configuration for every stage, with YAML in / YAML out.

One section per stage (`data`, `eps`, `affinity`, `rw`, `deeplab`) plus `run` (device, seed, output,
artifact store). Defaults reproduce the public reference implementations (DESIGN.md §2); the built-in
`synth` config shrinks them to tiny backbones on the synthetic dataset.

Turning YAML/overrides into dataclasses happens only here (:func:`from_dict`, :func:`apply_overrides`),
so a wrong key or type is reported once, by its dotted path.

Valid values. Every numeric field declares its valid values next to its default (:func:`_valid`, a
:class:`Range` in the field's metadata; for a list field, the range of each element). A section checks
its fields when it is made, and :class:`PipelineConfig` checks the rules that span fields or sections,
so no config with a value out of range exists: a bad value in a YAML file, an override, a trial's
parameters or a direct ``dataclasses.replace`` is a :class:`ConfigError` naming the full key
(``eps.tau: expected a value in [0, 1], got 1.5``) before anything runs. Search spaces check their
ranges against the same declaration (:func:`check_field`, :mod:`wsss_tune.spaces`).

Costly settings. A field whose cost grows without bound has a sane maximum that only
``run.allow_expensive: true`` lifts; today that is ``rw.logt`` (:data:`MAX_LOGT`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "EPSConfig",
    "AffinityConfig",
    "RWConfig",
    "DeepLabConfig",
    "RunConfig",
    "PipelineConfig",
    "SECTIONS",
    "from_dict",
    "to_dict",
    "load_config",
    "builtin_configs",
    "apply_overrides",
    "parse_override",
    "dump_yaml",
    "config_hash",
    "field_type",
    "check_value",
    "check_field",
    "Range",
    "field_rule",
    "MAX_LOGT",
    "UniqueKeyLoader",
    "DuplicateKeyError",
    "parse_yaml",
]


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it."""


# --------------------------------------------------------------------------------------------------
# Valid values, declared once per field
# --------------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: an interval, closed unless ``low_open``/``high_open``;
    ``None`` leaves that side unbounded. Floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """``a value in [0, 1]``, ``a value > 0``, ``a value >= 1``, ..."""
        if self.low is not None and self.high is not None:
            return (f"a value in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"a value {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"a value {'<' if self.high_open else '<='} {_num(self.high)}"
        return "a finite value"


#: Shorthands for the ranges most fields use.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT = Range(0, 1)
#: SGD momentum: 1 or more never decays the velocity (the run diverges).
MOMENTUM = Range(0, 1, high_open=True)

#: ``rw.logt`` above this (``2**12`` = 4,096 walk steps; the reference uses 8) is refused unless
#: ``run.allow_expensive`` is true: the walk's cost doubles with every step of ``logt``.
MAX_LOGT = 12


@dataclass(frozen=True)
class FieldRule:
    """What a field accepts beyond its type: ``valid`` for a number or for every element of a list,
    or one range per position of a fixed-length list; ``min_items`` for a variable-length list."""

    valid: Range | tuple[Range, ...]
    min_items: int = 0

    def check(self, value: Any, key: str) -> None:
        if isinstance(value, tuple):
            if len(value) < self.min_items:
                raise ConfigError(f"{key}: expected at least {self.min_items} value(s), got {list(value)}")
            ranges = self.valid if isinstance(self.valid, tuple) else (self.valid,) * len(value)
            for i, (rng, v) in enumerate(zip(ranges, value, strict=False)):
                _check_in(rng, v, f"{key}[{i}]")
            return
        assert isinstance(self.valid, Range), key
        _check_in(self.valid, value, key)


def _check_in(rng: Range, value: Any, key: str) -> None:
    if value in rng:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
    wanted = rng.describe()
    if not math.isfinite(value):
        wanted = wanted.replace("a value", "a finite value", 1)
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


_RULE = "wsss_tune.valid"


def _valid(default: Any, valid: Range | tuple[Range, ...], *, min_items: int = 0) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``valid`` (see :class:`FieldRule`)."""
    return field(default=default, metadata={_RULE: FieldRule(valid, min_items)})


def field_rule(cls: type, name: str) -> FieldRule | None:
    """The declared valid values of field ``name`` of section class ``cls`` (None: any value of its type)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get(_RULE)
    raise KeyError(name)


class _Checked:
    """Base of the config sections: every field is checked against its declared rule when a section
    is made (also by ``dataclasses.replace``), then :meth:`_check_together` runs the rules that tie
    fields of the section together."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES.get(type(self), type(self).__name__)
        for f in fields(self):  # type: ignore[arg-type]
            rule = f.metadata.get(_RULE)
            if rule is not None:
                rule.check(getattr(self, f.name), f"{section}.{f.name}")
        self._check_together(section)

    def _check_together(self, section: str) -> None:
        """Rules over several fields of the section; none by default."""


def _check_resize_long(value: tuple[int, int], key: str) -> None:
    low, high = value
    if low > high:
        raise ConfigError(f"{key}: expected [low, high] with low <= high, got {list(value)}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(_Checked):
    """Where the VOC-format dataset lives and which splits each stage uses.

    Relative paths are resolved against the working directory when the config is loaded
    (:func:`load_config`), so a trial that runs in another directory still finds them.
    """

    root: str = "data/synth"
    #: Saliency folder of ``<id>.png``; relative to ``root`` unless absolute.
    saliency_dir: str = "SaliencyMaps"
    image_dir: str = "JPEGImages"
    mask_dir: str = "SegmentationClassAug"
    #: Where image-level labels come from: the reference ``cls_labels.npy``, VOC XML, or the masks.
    label_source: Literal["cls_labels", "annotations", "masks"] = "cls_labels"
    train_split: str = "train_aug"
    #: Split with ground truth on which pseudo-mask quality is measured (the reference uses VOC train).
    mask_eval_split: str = "train"
    val_split: str = "val"
    #: Search protocol: metric a sweep optimises comes from ``tune_split``, the best config is then
    #: scored on ``heldout_split`` which the search never saw. Empty = derived by halving ``val_split``.
    tune_split: str = ""
    heldout_split: str = ""
    #: Data-loader worker processes (0 = load in the training process).
    num_workers: int = _valid(2, NON_NEGATIVE)


@dataclass(frozen=True)
class EPSConfig(_Checked):
    """EPS classifier (Lee et al., CVPR 2021) training and CAM inference."""

    #: ``eps`` = classification + saliency loss; ``cam`` = the plain CAM baseline (no saliency loss);
    #: ``eps_ppc`` = EPS with pixel-to-prototype contrast (Du et al., CVPR 2022; ``docs/ppc.md``): a
    #: projection head, a second view of each batch with its own EPS loss, and the ``ppc_*`` settings.
    method: Literal["eps", "cam", "eps_ppc"] = "eps"
    backbone: str = "resnet38"
    #: Local ImageNet weights (.pth / MXNet .params); empty = random init.
    pretrained: str = ""
    #: Overlap threshold: a present class whose CAM overlaps the saliency map by more than tau is
    #: foreground. An overlap ratio, so in [0, 1].
    tau: float = _valid(0.4, UNIT)
    #: Weight of the foreground term of the estimated saliency map, in [0, 1].
    lam: float = _valid(0.5, UNIT)
    # Pixel-to-prototype contrast (``method: eps_ppc`` only; the other methods ignore these fields and
    # their artifacts are keyed without them). Defaults: the PPC reference code's EPS variant, file
    # named per field (``docs/ppc.md`` has the whole list).
    #: Weight of the contrastive loss (each of its three terms; ``module/train.py``: ``gamma = 0.10``).
    ppc_weight: float = _valid(0.1, NON_NEGATIVE)
    #: Temperature of the pixel-to-prototype softmax (``module/train.py``: ``/ 0.1`` in every term).
    ppc_temperature: float = _valid(0.1, POSITIVE)
    #: Confident pixels per class that make its prototype, as a share of one image's contrast map:
    #: ``k = int(h * w * share)``, at least 1 (``module/train.py``: ``k = h * w // 16``, so 1/16).
    ppc_confident_share: float = _valid(1 / 16, Range(0, 1, low_open=True))
    #: Constant background confidence for the contrast's pseudo labels (``module/train.py``:
    #: ``bg_thres=0.10``); an object pixel needs a min-max normalised class score above it.
    ppc_bg_score: float = _valid(0.1, UNIT)
    #: Side of the second view over the crop side (``module/train.py``: 448 px crops resized to
    #: 128 x 128, so 2/7).
    ppc_view_scale: float = _valid(128 / 448, POSITIVE)
    #: Channels of the projection head (``network/resnet38_contrast.py``: ``proj_fc`` 4096 -> 128).
    ppc_proj_dim: int = _valid(128, AT_LEAST_ONE)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = _valid(0.01, POSITIVE)
    weight_decay: float = _valid(5e-4, NON_NEGATIVE)
    #: The reference passes weight decay into SGD's momentum slot, so its *effective* momentum is
    #: 5e-4. We keep that as the default to reproduce the published numbers; 0.9 is the usual choice.
    momentum: float = _valid(5e-4, MOMENTUM)
    #: LR multiplier of the new head (0 freezes it).
    head_lr_mult: float = _valid(10.0, NON_NEGATIVE)
    #: Poly decay power (0 = constant LR).
    poly_power: float = _valid(0.9, NON_NEGATIVE)
    iterations: int = _valid(20000, AT_LEAST_ONE)
    batch_size: int = _valid(8, AT_LEAST_ONE)
    crop_size: int = _valid(448, AT_LEAST_ONE)
    #: Random long-side resize range [low, high] in pixels, low <= high.
    resize_long: tuple[int, int] = _valid((256, 512), AT_LEAST_ONE)
    #: Colour jitter (brightness, contrast, saturation, hue) on the image only; hue at most 0.5.
    jitter: tuple[float, float, float, float] = _valid(
        (0.3, 0.3, 0.3, 0.1), (NON_NEGATIVE, NON_NEGATIVE, NON_NEGATIVE, Range(0, 0.5)))
    #: Evaluate pseudo-mask mIoU on ``eval_images`` images every ``eval_every`` iterations (either 0 = never).
    eval_every: int = _valid(1000, NON_NEGATIVE)
    eval_images: int = _valid(64, NON_NEGATIVE)
    checkpoint_every: int = _valid(1000, AT_LEAST_ONE)
    log_every: int = _valid(50, AT_LEAST_ONE)
    #: Inference scales (one or more, each > 0).
    cam_scales: tuple[float, ...] = _valid((0.5, 1.0, 1.5, 2.0), POSITIVE, min_items=1)
    cam_flip: bool = True
    #: Constant background score of the reference pseudo-label rule. Class maps are max-normalised to
    #: [0, 1), so 1 or more labels every pixel background (a harmless extreme, not refused).
    bg_threshold: float = _valid(0.20, NON_NEGATIVE)
    #: ``constant`` = reference rule; ``learned`` = use the background channel of the C+1 maps.
    bg_mode: Literal["constant", "learned"] = "constant"
    amp: bool = True
    channels_last: bool = True

    def _check_together(self, section: str) -> None:
        _check_resize_long(self.resize_long, f"{section}.resize_long")


@dataclass(frozen=True)
class AffinityConfig(_Checked):
    """AffinityNet (Ahn & Kwak, CVPR 2018) training on the EPS output."""

    #: ``eps_masks`` = final EPS pseudo masks (the seed's design); ``cam_dual`` = the PSA reference's
    #: dual-threshold CAM labels (confident bg from ``alpha_low``, fg from ``alpha_high``);
    #: 0 < alpha_low < alpha_high.
    label_source: Literal["eps_masks", "cam_dual"] = "eps_masks"
    alpha_low: float = _valid(4.0, POSITIVE)
    alpha_high: float = _valid(32.0, POSITIVE)
    #: ``eps`` = start from the EPS checkpoint's backbone; ``imagenet`` = from ``pretrained``.
    init: Literal["eps", "imagenet"] = "eps"
    backbone: str = ""  # empty = the EPS backbone
    pretrained: str = ""
    #: Reduction widths for the last three backbone stages and the final 1x1 conv (seed: 896).
    widths: tuple[int, int, int] = _valid((128, 256, 512), AT_LEAST_ONE)
    out_channels: int = _valid(896, AT_LEAST_ONE)
    #: Pairs within this many feature cells (a pair needs |offset| < radius, so at least 2).
    radius: int = _valid(5, Range(2))
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = _valid(0.1, POSITIVE)
    weight_decay: float = _valid(5e-4, NON_NEGATIVE)
    momentum: float = _valid(5e-4, MOMENTUM)  # same reference quirk as EPS
    head_lr_mult: float = _valid(10.0, NON_NEGATIVE)
    poly_power: float = _valid(0.9, NON_NEGATIVE)
    epochs: int = _valid(8, AT_LEAST_ONE)
    #: If > 0, overrides ``epochs`` with a fixed number of iterations.
    iterations: int = _valid(0, NON_NEGATIVE)
    batch_size: int = _valid(8, AT_LEAST_ONE)
    crop_size: int = _valid(448, AT_LEAST_ONE)
    resize_long: tuple[int, int] = _valid((448, 768), AT_LEAST_ONE)
    log_every: int = _valid(50, AT_LEAST_ONE)
    checkpoint_every: int = _valid(1000, AT_LEAST_ONE)
    amp: bool = True
    channels_last: bool = True

    def _check_together(self, section: str) -> None:
        _check_resize_long(self.resize_long, f"{section}.resize_long")
        if not self.alpha_low < self.alpha_high:
            raise ConfigError(f"{section}.alpha_low: expected a value below {section}.alpha_high "
                              f"({_num(self.alpha_high)}), got {self.alpha_low!r}")


@dataclass(frozen=True)
class RWConfig(_Checked):
    """Random walk refinement of the EPS class scores with AffinityNet affinities."""

    #: Affinity power ``A = a**beta``.
    beta: float = _valid(8.0, POSITIVE)
    #: Number of propagation steps is ``t = 2**logt`` (reference: logt = 8, t = 256). The cost doubles
    #: with each step of logt: above :data:`MAX_LOGT` (12, 4,096 steps) it needs ``run.allow_expensive``.
    logt: int = _valid(8, NON_NEGATIVE)
    #: Background score ``(1 - max_c CAM) ** alpha`` (reference: 16).
    alpha: float = _valid(16.0, POSITIVE)
    #: Pad by the radius first so border pixels get all their neighbours (fixes a reference quirk;
    #: off by default to reproduce the reference).
    pad_border: bool = False
    #: Which CAMs feed the walk: the EPS CAMs (default) or ``learned`` background channel scores.
    bg_mode: Literal["power", "learned"] = "power"
    crf: bool = False


@dataclass(frozen=True)
class DeepLabConfig(_Checked):
    """DeepLab v1 (LargeFOV) / v2 (ASPP) on the refined masks.

    Defaults are deeplab-pytorch's reading of the paper (DESIGN.md §2 "DeepLab"); the fields after
    ``scales`` up to ``loss_resize`` and the ``pseudo_crf*`` fields are the named options the published
    EPS DeepLab recipe needs (built-in config ``voc_eps_recipe``), each default the deeplab-pytorch
    behaviour (no change unless set).
    """

    #: ``v1`` LargeFOV, ``v2`` ASPP (sum of four dilated convs to the classes), ``v2_gp`` the ASPP of
    #: the EPS recipe (wseg ``net/operators/ASPP.py``): four 256-channel dilated branches with
    #: BatchNorm plus a global-pooling branch, concatenated, fused by a 1x1 conv, then the classifier.
    arch: Literal["v1", "v2", "v2_gp"] = "v2"
    backbone: str = "resnet101"
    #: Local initialisation weights (ImageNet or COCO-trained); empty = random init.
    pretrained: str = ""
    #: Which masks to train on: ``refined`` (random walk), ``eps``, ``gt`` (upper bound), or a folder.
    mask_source: str = "refined"
    #: Refine the training masks with a dense CRF first (the EPS recipe trains on ``crf_5_8``: wseg
    #: ``contrast_infer.py --crf_t 5 --crf_alpha 8``). With ``mask_source: eps`` the CRF runs on the
    #: EPS CAMs as the reference does: background ``(1 - max CAM) ** pseudo_crf_alpha`` and the
    #: labelled class maps. Masks without scores (``refined``, ``gt``, a folder) get a unary of
    #: ``pseudo_crf_label_prob`` on their label (our extension). Keys only the refined-mask artifact.
    #: Needs the optional ``pydensecrf2`` package.
    pseudo_crf: bool = False
    #: Mean-field iterations (``--crf_t 5``).
    pseudo_crf_iterations: int = _valid(5, AT_LEAST_ONE)
    #: Background exponent on CAMs (``--crf_alpha 8``); not used by masks without scores.
    pseudo_crf_alpha: float = _valid(8.0, POSITIVE)
    #: Smoothness kernel std (px) and weight (wseg ``util/imutils.py crf_inference``: ``sxy=3``,
    #: ``compat=3``).
    pseudo_crf_pos_xy_std: float = _valid(3.0, POSITIVE)
    pseudo_crf_pos_w: float = _valid(3.0, NON_NEGATIVE)
    #: Appearance kernel std (px, RGB levels) and weight (``crf_inference``: ``sxy=80``, ``srgb=13``,
    #: ``compat=10``).
    pseudo_crf_bi_xy_std: float = _valid(80.0, POSITIVE)
    pseudo_crf_bi_rgb_std: float = _valid(13.0, POSITIVE)
    pseudo_crf_bi_w: float = _valid(10.0, NON_NEGATIVE)
    #: Probability of a mask's own label in the unary of masks without scores, the rest spread evenly
    #: over the other labels of the image (IRN ``imutils.crf_inference_label``: ``gt_prob=0.7``).
    pseudo_crf_label_prob: float = _valid(0.7, Range(0, 1, low_open=True, high_open=True))
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = _valid(2.5e-4, POSITIVE)
    head_lr_mult: float = _valid(10.0, NON_NEGATIVE)
    head_bias_lr_mult: float = _valid(20.0, NON_NEGATIVE)
    momentum: float = _valid(0.9, MOMENTUM)
    weight_decay: float = _valid(5e-4, NON_NEGATIVE)
    poly_power: float = _valid(0.9, NON_NEGATIVE)
    iterations: int = _valid(20000, AT_LEAST_ONE)
    batch_size: int = _valid(10, AT_LEAST_ONE)
    #: Gradient accumulation steps per optimiser step.
    accumulate: int = _valid(1, AT_LEAST_ONE)
    crop_size: int = _valid(321, AT_LEAST_ONE)
    #: Random training scales (one or more, each > 0), drawn from the list (deeplab-pytorch).
    scales: tuple[float, ...] = _valid((0.5, 0.75, 1.0, 1.25, 1.5), POSITIVE, min_items=1)
    #: Empty: ``scales``. ``[low, high]`` (0 < low <= high): a scale drawn uniformly from the range instead,
    #: the image resized bicubically to ``round(side * s)``, and a crop larger than the image placed at a
    #: random offset (wseg ``RandomScale``, ``DATA_RANDOMSCALE: [0.5, 1.5]``, and ``RandomCrop``).
    scale_range: tuple[float, ...] = _valid((), POSITIVE)
    #: Random HSV shift (hue, saturation, value) in OpenCV 8-bit units, each drawn as an integer in
    #: ``[-v, v]``, hue wrapping at 180, saturation and value clipped to 0..255, before the geometry
    #: (wseg ``RandomHSV``, ``DATA_RANDOM_H/S/V: 10``). All 0 (default): none.
    hsv_jitter: tuple[int, int, int] = _valid((0, 0, 0), (Range(0, 90), Range(0, 255), Range(0, 255)))
    #: Freeze the backbone's BatchNorm (eval mode, affine frozen): deeplab-pytorch. False: batch
    #: statistics in training (the EPS recipe, ``MODEL_FREEZEBN: False``).
    freeze_bn: bool = True
    #: Learning-rate multiplier of the BatchNorm affine parameters that train (backbone with
    #: ``freeze_bn: false``, and the ``v2_gp`` head), without weight decay. 0 leaves them out of the
    #: optimiser, as the EPS recipe's does (wseg ``get_parameter_groups`` collects conv weights and biases
    #: only): its BatchNorm layers normalise with batch statistics but keep their initial affine.
    bn_lr_mult: float = _valid(1.0, NON_NEGATIVE)
    #: Running-statistics momentum (PyTorch convention) of the BatchNorm layers of the ``v2_gp`` head
    #: (wseg ``TRAIN_BN_MOM: 0.0003``; the backbone keeps PyTorch's 0.1, as wseg's ``resnet.py``).
    head_bn_momentum: float = _valid(3e-4, Range(0, 1, low_open=True))
    #: Give the first block of the dilated ResNet stages the previous stage's dilation (1 in layer3, 2
    #: in layer4), as torchvision and wseg's ``resnet.py`` do; False (deeplab-pytorch): every block of
    #: a stage uses its dilation. ResNet backbones only.
    contract_dilation: bool = False
    #: Where the loss compares: ``labels`` shrinks the labels to the logits (deeplab-pytorch);
    #: ``logits`` upsamples the logits bilinearly to the crop (wseg ``deeplabv2.forward``).
    loss_resize: Literal["labels", "logits"] = "labels"
    msc: bool = False
    balanced_ce: bool = False
    #: Evaluate every ``eval_every`` iterations on ``eval_images`` images (either 0 = never).
    eval_every: int = _valid(1000, NON_NEGATIVE)
    eval_images: int = _valid(100, NON_NEGATIVE)
    checkpoint_every: int = _valid(1000, AT_LEAST_ONE)
    log_every: int = _valid(50, AT_LEAST_ONE)
    #: Test-time scales (one or more, each > 0).
    test_scales: tuple[float, ...] = _valid((1.0,), POSITIVE, min_items=1)
    test_flip: bool = False
    crf: bool = False
    save_predictions: bool = False
    amp: bool = True
    channels_last: bool = True

    def _check_together(self, section: str) -> None:
        if len(self.scale_range) not in (0, 2):
            raise ConfigError(f"{section}.scale_range: expected [] (use {section}.scales) or [low, high], "
                              f"got {list(self.scale_range)}")
        if self.scale_range:
            _check_resize_long(self.scale_range, f"{section}.scale_range")  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunConfig(_Checked):
    """Where and how a run executes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = _valid(0, NON_NEGATIVE)
    #: Stage artifact store: local path or pyarrow filesystem URI. Empty = ``<out>/artifacts``.
    artifact_store: str = ""
    #: Keep at most this many training checkpoints per stage run (at least 1: resuming needs one).
    keep_checkpoints: int = _valid(2, AT_LEAST_ONE)
    #: Processes ("ranks") that train each stage together with DistributedDataParallel: 0 (the
    #: default) = one rank per visible CUDA device, so a Ray trial given ``--gpus-per-trial N`` (Ray
    #: shows it N devices) or a ``run`` on a machine with N GPUs trains on all N, and anything without
    #: CUDA trains in one process; 1 = one process on one device; N > 1 = N ranks, one CUDA device each
    #: (NCCL), or N CPU processes with gloo (for tests: slower than one). A stage's batch size stays
    #: the global batch, split over the ranks (at least one image each), and N ranks take the same steps
    #: as one process (``wsss_tune.stages.distributed``). Inference and scoring run on one device.
    #: Keys no artifact.
    ddp_ranks: int = _valid(0, NON_NEGATIVE)
    #: Also run the plain-CAM baseline (``eps.method: cam``, every other EPS setting the same) with the
    #: EPS stage and report its pseudo masks as ``cam_miou*``. Cached: its key ignores tau and lam, so
    #: a sweep trains it once. Costs one more EPS training; the stage table's CAM row comes from it.
    cam_baseline: bool = False
    #: Allow settings whose cost grows without bound past their sane maximum. Off, the config refuses
    #: ``rw.logt`` above :data:`MAX_LOGT` (12: ``2**12`` = 4,096 walk steps per image; the reference
    #: uses 8), which would otherwise run for hours or never finish. Set it on purpose, per run.
    allow_expensive: bool = False
    #: Modules (``module`` or ``module:function``) that add stages to the stage graph
    #: (:func:`wsss_tune.stages.graph.register`), imported before a run or sweep and in every Ray
    #: worker; they must be importable there (on ``PYTHONPATH``). Empty: the built-in graph.
    stage_plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: one section per stage. Rules spanning sections are checked when it is made."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    eps: EPSConfig = field(default_factory=EPSConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    rw: RWConfig = field(default_factory=RWConfig)
    deeplab: DeepLabConfig = field(default_factory=DeepLabConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.rw.logt > MAX_LOGT and not self.run.allow_expensive:
            steps = f"{2**self.rw.logt:,}" if self.rw.logt <= 64 else f"2**{self.rw.logt}"
            raise ConfigError(f"rw.logt: expected a value <= {MAX_LOGT} (2**{MAX_LOGT} = {2**MAX_LOGT:,} random-walk "
                              f"steps per image), got {self.rw.logt} ({steps} steps); set run.allow_expensive: true "
                              "to allow more")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "eps": EPSConfig,
    "affinity": AffinityConfig,
    "rw": RWConfig,
    "deeplab": DeepLabConfig,
    "run": RunConfig,
}
_SECTION_NAMES: dict[type, str] = {cls: name for name, cls in SECTIONS.items()}


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def check_value(tp: Any, value: Any, where: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise :class:`ConfigError` naming ``where``."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return check_value(arg, value, where)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(check_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad  # pragma: no cover - every field type is listed above


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(path: str) -> Any:
    """Type of a dotted config field such as ``eps.tau``; raises :class:`ConfigError` if unknown."""
    section, _, name = path.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {path!r}: expected '<section>.<field>' with section one of "
                          f"{', '.join(SECTIONS)}")
    hints = _hints(SECTIONS[section])
    if name not in hints:
        raise ConfigError(f"unknown config key {path!r}: section {section!r} has fields "
                          f"{', '.join(hints)}")
    return hints[name]


def check_field(path: str, value: Any) -> Any:
    """Check one value of the dotted field ``path`` on its own: its type (coerced as :func:`check_value`)
    and its declared valid values. Rules that tie several fields together (``low <= high``,
    ``rw.logt`` against ``run.allow_expensive``) are checked when a whole config is made.

    Raises:
        ConfigError: naming ``path`` (``eps.tau: expected a value in [0, 1], got 1.5``).
    """
    value = check_value(field_type(path), value, path)
    section, _, name = path.partition(".")
    rule = field_rule(SECTIONS[section], name)
    if rule is not None:
        rule.check(value, path)
    return value


def _section_from_dict(cls: type, data: Mapping[str, Any], source: str, section: str) -> Any:
    where = f"{source}: {section}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                          f"known: {', '.join(hints)}")
    kwargs = {k: check_value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a value out of range: the message names the key, add the file
        raise ConfigError(f"{source}: {exc}") from None


def from_dict(data: Mapping[str, Any], *, source: str = "config") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a nested mapping, rejecting unknown keys, wrong types and
    values outside a field's valid values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS) - {"name"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(repr(k) for k in unknown)}; "
                          f"known: name, {', '.join(SECTIONS)}")
    kwargs: dict[str, Any] = {}
    if "name" in data:
        kwargs["name"] = check_value(str, data["name"], f"{source}: name")
    for section, cls in SECTIONS.items():
        if section in data and data[section] is not None:
            kwargs[section] = _section_from_dict(cls, data[section], source, section)
    try:
        return PipelineConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) of a config or a section."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
    return out


def dump_yaml(cfg: PipelineConfig, path: str | Path | None = None) -> str:
    """YAML text of ``cfg``; also written (atomically) to ``path`` if given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        from wsss_tune.utils.io import atomic_write_text

        atomic_write_text(path, text)
    return text


def config_hash(*parts: Any, length: int = 16) -> str:
    """Stable short hash of configs/sections/plain values (order of keys does not matter)."""

    def norm(p: Any) -> Any:
        if dataclasses.is_dataclass(p) and not isinstance(p, type):
            return {"__type__": type(p).__name__, **to_dict(p)}
        return p

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------------------------------
# Overrides and loading
# --------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.field=value``; the value is read as YAML (``0.4``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected 'section.field=value'")
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(cfg: PipelineConfig, overrides: Mapping[str, Any] | Sequence[str]) -> PipelineConfig:
    """Return ``cfg`` with dotted-key overrides applied (``{'eps.tau': 0.3}`` or ``['eps.tau=0.3']``).

    Every value is checked for its type and valid values, and the result for the rules that tie fields
    together; a :class:`ConfigError` names the key.
    """
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    sections: dict[str, dict[str, Any]] = {}
    name = cfg.name
    for key, value in overrides.items():
        if key == "name":
            name = check_value(str, value, "name")
            continue
        tp = field_type(key)
        section, _, fname = key.partition(".")
        sections.setdefault(section, {})[fname] = check_value(tp, value, key)
    updates = {s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    return dataclasses.replace(cfg, name=name, **updates)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping; ``key`` is its dotted path (``eps.tau``), ``line`` the
    line (1-based) where it is given again."""

    def __init__(self, key: str, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (again on line {mark.line + 1}); YAML would keep "
                         "only the last value", mark)
        self.key, self.line = key, mark.line + 1


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (plain YAML keeps the last silently), naming
    it by its dotted path. Config files and search-space files are both read with it."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique(node, "", set())
        return super().construct_document(node)

    def _check_unique(self, node: yaml.Node, path: str, visited: set[int]) -> None:
        if id(node) in visited:  # an alias of a node already checked
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in node.value:
                plain = isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge"
                key = self.construct_object(key_node, deep=True) if plain else None  # '<<' merges are no keys
                name = f"{path}.{key}" if path else str(key)
                if key is not None:
                    if key in seen:
                        raise DuplicateKeyError(name, key_node.start_mark)
                    seen.add(key)
                self._check_unique(value_node, name, visited)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique(item, f"{path}[{i}]", visited)


def parse_yaml(text: str) -> Any:
    """Parse YAML ``text`` safely (no Python objects) with :class:`UniqueKeyLoader`; ``None`` if it has no
    document. Raises ``yaml.YAMLError`` (:class:`DuplicateKeyError` for a repeated key)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def builtin_configs() -> dict[str, Path]:
    """Built-in configs by name (``synth``, ``voc``, ...), shipped as package data."""
    root = resources.files("wsss_tune.configs")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    def absolute(p: str) -> str:
        if not p or "://" in p:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root))
    eps = dataclasses.replace(cfg.eps, pretrained=absolute(cfg.eps.pretrained))
    aff = dataclasses.replace(cfg.affinity, pretrained=absolute(cfg.affinity.pretrained))
    dl = cfg.deeplab
    dl = dataclasses.replace(dl, pretrained=absolute(dl.pretrained))
    if dl.mask_source not in ("refined", "eps", "gt"):
        dl = dataclasses.replace(dl, mask_source=absolute(dl.mask_source))
    run = dataclasses.replace(cfg.run, artifact_store=absolute(cfg.run.artifact_store))
    return dataclasses.replace(cfg, data=data, eps=eps, affinity=aff, deeplab=dl, run=run)


def load_config(
    name_or_path: str | Path,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    *,
    base_dir: str | Path | None = None,
) -> PipelineConfig:
    """Load a built-in config by name or a YAML file, apply overrides, make paths absolute.

    Relative paths are resolved against ``base_dir`` (default: the current directory), because Ray
    Tune runs each trial in its own working directory.
    """
    builtins = builtin_configs()
    text_source = str(name_or_path)
    if text_source in builtins:
        path = builtins[text_source]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config {text_source!r}: no such file and not a built-in config "
                              f"(built-in: {', '.join(builtins)})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (no keys, only blank lines or comments); write the "
                          "settings it should change, or '{}' to mean every default on purpose")
    cfg = from_dict(data, source=str(path))
    cfg = apply_overrides(cfg, overrides)
    return _resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())
