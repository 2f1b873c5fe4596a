"""Typed, frozen configuration for every stage, with YAML in / YAML out.

One section per stage (`data`, `eps`, `affinity`, `rw`, `deeplab`) plus `run` (device, seed, output,
artifact store). Defaults reproduce the public reference implementations (DESIGN.md §2); the built-in
`synth` config shrinks them to tiny backbones on the synthetic dataset.

Turning YAML/overrides into dataclasses happens only here (:func:`from_dict`, :func:`apply_overrides`),
so a wrong key or type is reported once, by its dotted path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
]


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
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
    num_workers: int = 2


@dataclass(frozen=True)
class EPSConfig:
    """EPS classifier (Lee et al., CVPR 2021) training and CAM inference."""

    #: ``eps`` = classification + saliency loss; ``cam`` = the plain CAM baseline (no saliency loss).
    method: Literal["eps", "cam"] = "eps"
    backbone: str = "resnet38"
    #: Local ImageNet weights (.pth / MXNet .params); empty = random init.
    pretrained: str = ""
    tau: float = 0.4
    lam: float = 0.5
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 5e-4
    #: The reference passes weight decay into SGD's momentum slot, so its *effective* momentum is
    #: 5e-4. We keep that as the default to reproduce the published numbers; 0.9 is the usual choice.
    momentum: float = 5e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    iterations: int = 20000
    batch_size: int = 8
    crop_size: int = 448
    resize_long: tuple[int, int] = (256, 512)
    #: Colour jitter (brightness, contrast, saturation, hue) on the image only.
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    #: Evaluate pseudo-mask mIoU on ``eval_images`` images every ``eval_every`` iterations (0 = never).
    eval_every: int = 1000
    eval_images: int = 64
    checkpoint_every: int = 1000
    log_every: int = 50
    cam_scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    cam_flip: bool = True
    #: Constant background score of the reference pseudo-label rule.
    bg_threshold: float = 0.20
    #: ``constant`` = reference rule; ``learned`` = use the background channel of the C+1 maps.
    bg_mode: Literal["constant", "learned"] = "constant"
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class AffinityConfig:
    """AffinityNet (Ahn & Kwak, CVPR 2018) training on the EPS output."""

    #: ``eps_masks`` = final EPS pseudo masks (the seed's design); ``cam_dual`` = the PSA reference's
    #: dual-threshold CAM labels (confident bg from ``alpha_low``, fg from ``alpha_high``).
    label_source: Literal["eps_masks", "cam_dual"] = "eps_masks"
    alpha_low: float = 4.0
    alpha_high: float = 32.0
    #: ``eps`` = start from the EPS checkpoint's backbone; ``imagenet`` = from ``pretrained``.
    init: Literal["eps", "imagenet"] = "eps"
    backbone: str = ""  # empty = the EPS backbone
    pretrained: str = ""
    #: Reduction widths for the last three backbone stages and the final 1x1 conv (seed: 896).
    widths: tuple[int, int, int] = (128, 256, 512)
    out_channels: int = 896
    radius: int = 5
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 5e-4  # same reference quirk as EPS
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    epochs: int = 8
    #: If > 0, overrides ``epochs`` with a fixed number of iterations.
    iterations: int = 0
    batch_size: int = 8
    crop_size: int = 448
    resize_long: tuple[int, int] = (448, 768)
    log_every: int = 50
    checkpoint_every: int = 1000
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class RWConfig:
    """Random walk refinement of the EPS class scores with AffinityNet affinities."""

    beta: float = 8.0
    #: Number of propagation steps is ``t = 2**logt`` (reference: logt = 8, t = 256).
    logt: int = 8
    #: Background score ``(1 - max_c CAM) ** alpha`` (reference: 16).
    alpha: float = 16.0
    #: Pad by the radius first so border pixels get all their neighbours (fixes a reference quirk;
    #: off by default to reproduce the reference).
    pad_border: bool = False
    #: Which CAMs feed the walk: the EPS CAMs (default) or ``learned`` background channel scores.
    bg_mode: Literal["power", "learned"] = "power"
    crf: bool = False


@dataclass(frozen=True)
class DeepLabConfig:
    """DeepLab v1 (LargeFOV) / v2 (ASPP) on the refined masks."""

    arch: Literal["v1", "v2"] = "v2"
    backbone: str = "resnet101"
    #: Local initialisation weights (ImageNet or COCO-trained); empty = random init.
    pretrained: str = ""
    #: Which masks to train on: ``refined`` (random walk), ``eps``, ``gt`` (upper bound), or a folder.
    mask_source: str = "refined"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    head_bias_lr_mult: float = 20.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    iterations: int = 20000
    batch_size: int = 10
    accumulate: int = 1
    crop_size: int = 321
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    freeze_bn: bool = True
    msc: bool = False
    balanced_ce: bool = False
    eval_every: int = 1000
    eval_images: int = 100
    checkpoint_every: int = 1000
    log_every: int = 50
    test_scales: tuple[float, ...] = (1.0,)
    test_flip: bool = False
    crf: bool = False
    save_predictions: bool = False
    amp: bool = True
    channels_last: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    #: Stage artifact store: local path or pyarrow filesystem URI. Empty = ``<out>/artifacts``.
    artifact_store: str = ""
    #: Keep at most this many training checkpoints per stage run.
    keep_checkpoints: int = 2
    #: Also run the plain-CAM baseline (``eps.method: cam``, every other EPS setting the same) with the
    #: EPS stage and report its pseudo masks as ``cam_miou*``. Cached: its key ignores tau and lam, so
    #: a sweep trains it once. Costs one more EPS training; the stage table's CAM row comes from it.
    cam_baseline: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline: one section per stage."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    eps: EPSConfig = field(default_factory=EPSConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    rw: RWConfig = field(default_factory=RWConfig)
    deeplab: DeepLabConfig = field(default_factory=DeepLabConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "eps": EPSConfig,
    "affinity": AffinityConfig,
    "rw": RWConfig,
    "deeplab": DeepLabConfig,
    "run": RunConfig,
}


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


def _section_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                          f"known: {', '.join(hints)}")
    kwargs = {k: check_value(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], *, source: str = "config") -> PipelineConfig:
    """Build a :class:`PipelineConfig` from a nested mapping, rejecting unknown keys and wrong types."""
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
            kwargs[section] = _section_from_dict(cls, data[section], f"{source}: {section}")
    return PipelineConfig(**kwargs)


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
    """Return ``cfg`` with dotted-key overrides applied (``{'eps.tau': 0.3}`` or ``['eps.tau=0.3']``)."""
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    cfg = from_dict(data, source=str(path))
    cfg = apply_overrides(cfg, overrides)
    return _resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())
