"""DeepLab initialisation files: rename deeplab-pytorch (Caffe-converted) and torchvision keys.

Output names are those of :class:`~wsss_tune.models.deeplab.DeepLab`: ``backbone.<torchvision
ResNet name>`` and ``head.convs.<i>.<weight|bias>``. :func:`~wsss_tune.models.weights.load_state`
strips the ``backbone.`` prefix by itself when the target is the backbone alone.

deeplab-pytorch (``libs/models/resnet.py``, ``deeplabv2.py``, ``msc.py``; converted from the Caffe
DeepLab models by its ``convert.py``) names a ResNet-101 as::

    layer1.conv1.{conv,bn}.*                      stem 7x7 conv + BN        -> conv1 / bn1
    layer<L>.block<B>.reduce.{conv,bn}.*          1x1 (L = 2..5, B >= 1)    -> layer<L-1>.<B-1>.conv1 / bn1
    layer<L>.block<B>.conv3x3.{conv,bn}.*         3x3                       -> ... conv2 / bn2
    layer<L>.block<B>.increase.{conv,bn}.*        1x1                       -> ... conv3 / bn3
    layer<L>.block<B>.shortcut.{conv,bn}.*        projection (B = 1)        -> ... downsample.0 / downsample.1
    aspp.c<i>.{weight,bias}                       v2 ASPP branch i          -> head.convs.<i>
    fc.{weight,bias}                              v1 1x1 classifier         -> (no counterpart)

with BN entries ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``.
Files of a trained MSC model (``deeplabv2_resnet101_msc-cocostuff164k-100000.pth``,
``deeplabv2_resnet101_msc-vocaug-20000.pth``) put everything under ``base.``; the COCO
initialisation (``deeplabv1_resnet101-coco.pth``) and ImageNet initialisations have no prefix and a
1x1 ``fc`` classifier. A ``module.`` prefix (DataParallel) is dropped too. The Caffe weights need
the ``caffe`` layout of :class:`~wsss_tune.models.resnet_dilated.DilatedResNet`, which
:func:`~wsss_tune.models.resnet_dilated.resnet101` picks by itself for these files.

torchvision ImageNet files (``resnet101-63fe2227.pth``) already use our backbone names; their
``fc`` classifier has no counterpart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from torch import nn

from wsss_tune.models.weights import (
    LoadReport,
    WeightsError,
    convert_resnet38_mxnet,
    load_state,
    read_weights,
)

__all__ = [
    "SourceFormat",
    "ConversionReport",
    "detect_source_format",
    "convert_deeplab_caffe",
    "convert_torchvision_resnet",
    "to_deeplab_names",
    "read_deeplab_weights",
    "load_deeplab_pretrained",
    "load_deeplab_state",
]

log = logging.getLogger(__name__)

SourceFormat = Literal["deeplab_caffe", "torchvision", "mxnet_resnet38", "other"]

#: Wrapper prefixes of saved models: DataParallel, then deeplab-pytorch's ``MSC.base``.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "base.")

#: Stem conv / BN of deeplab-pytorch's ``_Stem`` (``layer1.conv1`` is a ``_ConvBnReLU``).
_CAFFE_STEM = re.compile(r"^layer1\.conv1\.(?P<part>conv|bn)\.(?P<param>\w+)$")
#: Bottleneck conv / BN of deeplab-pytorch's ``_ResLayer`` (layer2..layer5 = torchvision layer1..4).
_CAFFE_BLOCK = re.compile(r"^layer(?P<stage>[2-5])\.block(?P<block>[1-9]\d*)\."
                          r"(?P<branch>reduce|conv3x3|increase|shortcut)\.(?P<part>conv|bn)\.(?P<param>\w+)$")
#: ASPP branch ``c<i>`` of deeplab-pytorch's ``_ASPP`` (DeepLab v2).
_CAFFE_ASPP = re.compile(r"^aspp\.c(?P<index>\d+)\.(?P<param>weight|bias)$")
#: deeplab-pytorch bottleneck branch -> torchvision ``Bottleneck`` (conv module, BN module).
_BRANCHES: dict[str, tuple[str, str]] = {
    "reduce": ("conv1", "bn1"),
    "conv3x3": ("conv2", "bn2"),
    "increase": ("conv3", "bn3"),
    "shortcut": ("downsample.0", "downsample.1"),
}
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: torchvision ResNet backbone keys (everything but the ``fc`` classifier).
_TORCHVISION_KEY = re.compile(r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.\w+(\.\d+)?\.\w+)$")


@dataclass(frozen=True)
class ConversionReport:
    """What a renaming did, by the file's key names.

    Attributes:
        source_format: the detected layout of the file.
        renamed: number of keys given a DeepLab name.
        unmatched: file keys (after dropping wrapper prefixes) with no DeepLab counterpart, e.g.
            the ImageNet / COCO ``fc`` classifier.
    """

    source_format: SourceFormat
    renamed: int
    unmatched: tuple[str, ...] = field(default_factory=tuple)


def _strip_wrappers(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def detect_source_format(state: Mapping[str, Any]) -> SourceFormat:
    """Which layout a state dict is in: ``deeplab_caffe``, ``torchvision`` or ``other``.

    ``deeplab_caffe`` = has deeplab-pytorch block keys (``layer2.block1.reduce.conv.weight``, with
    or without ``base.``/``module.``); ``torchvision`` = has ``conv1.weight`` and
    ``layer1.0.conv1.weight``.
    """
    keys = {_strip_wrappers(k) for k in state}
    if any(_CAFFE_BLOCK.match(k) or _CAFFE_STEM.match(k) for k in keys):
        return "deeplab_caffe"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision"
    return "other"


def _caffe_name(key: str) -> str | None:
    m = _CAFFE_STEM.match(key)
    if m:
        if m["part"] == "conv":
            return "backbone.conv1.weight" if m["param"] == "weight" else None
        return f"backbone.bn1.{m['param']}" if m["param"] in _BN_PARAMS else None
    m = _CAFFE_BLOCK.match(key)
    if m:
        conv, bn = _BRANCHES[m["branch"]]
        prefix = f"backbone.layer{int(m['stage']) - 1}.{int(m['block']) - 1}"
        if m["part"] == "conv":
            return f"{prefix}.{conv}.weight" if m["param"] == "weight" else None
        return f"{prefix}.{bn}.{m['param']}" if m["param"] in _BN_PARAMS else None
    m = _CAFFE_ASPP.match(key)
    if m:
        return f"head.convs.{int(m['index'])}.{m['param']}"
    return None


def _rename(
    state: Mapping[str, Any], rename: Any, source_format: SourceFormat
) -> tuple[dict[str, Any], ConversionReport]:
    out: dict[str, Any] = {}
    unmatched: list[str] = []
    for raw_key, value in state.items():
        key = _strip_wrappers(raw_key)
        new = rename(key)
        if new is None:
            unmatched.append(key)
            continue
        if new in out:
            raise WeightsError(f"two keys of the {source_format} file map to {new!r} (second: {raw_key!r}); "
                               "expected one model per file")
        out[new] = value
    return out, ConversionReport(source_format=source_format, renamed=len(out), unmatched=tuple(unmatched))


def convert_deeplab_caffe(state: Mapping[str, Any]) -> tuple[dict[str, Any], ConversionReport]:
    """Rename a deeplab-pytorch (Caffe-converted) ResNet DeepLab state dict onto :class:`DeepLab`.

    Returns:
        ``(renamed entries, report)``; keys without counterpart (``fc.*``) are only reported.
    """
    return _rename(state, _caffe_name, "deeplab_caffe")


def _torchvision_name(key: str) -> str | None:
    return f"backbone.{key}" if _TORCHVISION_KEY.match(key) else None


def convert_torchvision_resnet(state: Mapping[str, Any]) -> tuple[dict[str, Any], ConversionReport]:
    """Prefix the backbone keys of a torchvision ImageNet ResNet with ``backbone.``.

    Returns:
        ``(renamed entries, report)``; the ``fc`` classifier is only reported.
    """
    return _rename(state, _torchvision_name, "torchvision")


def to_deeplab_names(state: Mapping[str, Any]) -> dict[str, Any]:
    """Converter for :func:`~wsss_tune.models.weights.load_pretrained`: detect and rename.

    Unmatched keys stay under their own names so that the load reports them as unexpected; a
    state dict in no known layout is returned with wrapper prefixes dropped.
    """
    source_format = detect_source_format(state)
    if source_format == "other":
        return {_strip_wrappers(k): v for k, v in state.items()}
    convert = convert_deeplab_caffe if source_format == "deeplab_caffe" else convert_torchvision_resnet
    renamed, report = convert(state)
    stripped = {_strip_wrappers(k): v for k, v in state.items()}
    return {**renamed, **{k: stripped[k] for k in report.unmatched}}


def read_deeplab_weights(path: str | Path) -> tuple[dict[str, Any], SourceFormat]:
    """Read a weights file and rename it onto :class:`DeepLab` names.

    deeplab-pytorch and torchvision files are renamed (:func:`to_deeplab_names`); an MXNet
    ResNet-38 file is converted and put under ``backbone.``; anything else (one of our own
    checkpoints) keeps its keys, minus ``module.``/``base.``.

    Returns:
        ``(state, source format)``.

    Raises:
        WeightsError: unreadable file (names the file).
    """
    fmt, raw = read_weights(path)
    if fmt == "mxnet":
        return {f"backbone.{k}": v for k, v in convert_resnet38_mxnet(raw).items()}, "mxnet_resnet38"
    return to_deeplab_names(raw), detect_source_format(raw)


def _deeplab_of(model: nn.Module) -> nn.Module:
    # An MSC wrapper holds the DeepLab as ``base``.
    inner = getattr(model, "base", model)
    if not (hasattr(inner, "backbone") and hasattr(inner, "head")):
        raise TypeError(f"load_deeplab_pretrained: expected a DeepLab or MSC(DeepLab), got {type(model).__name__}")
    return inner


def load_deeplab_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load an initialisation file into a DeepLab (or MSC) model: the whole backbone, the head if it fits.

    Reads ``path`` with :func:`read_deeplab_weights`, then :func:`load_deeplab_state`. A
    deeplab-pytorch file needs a backbone built with the ``caffe`` layout
    (:func:`~wsss_tune.models.deeplab.build_deeplab` does that).
    """
    state, source_format = read_deeplab_weights(path)
    return load_deeplab_state(model, state, source=str(path), source_format=source_format)


def load_deeplab_state(
    model: nn.Module, state: Mapping[str, Any], *, source: str, source_format: str = "other"
) -> LoadReport:
    """Load DeepLab-named weights (see :func:`read_deeplab_weights`) into a DeepLab or MSC model.

    Every backbone key must be in ``state`` (else :class:`WeightsError`). Head weights are loaded
    only when ``state`` has all of them with the model's shapes (a trained v2 model with the same
    classes); otherwise the head keeps its initialisation and the report lists them as mismatched
    or unexpected.

    Args:
        model: :class:`DeepLab` or ``MSC(DeepLab)``.
        state: name -> tensor, with ``backbone.`` / ``head.`` names.
        source: file name for messages.
        source_format: detected layout of the file, for the log line.

    Returns:
        A report whose key names are relative to the DeepLab module (``backbone.conv1.weight``).
    """
    deeplab = _deeplab_of(model)
    backbone, head = cast(nn.Module, deeplab.backbone), cast(nn.Module, deeplab.head)
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    rest = {k: v for k, v in state.items() if not k.startswith("head.")}
    bb = load_state(backbone, rest, source=source, strict_backbone=True)
    report = LoadReport(
        source=source,
        loaded=[f"backbone.{k}" for k in bb.loaded],
        missing=[f"backbone.{k}" for k in bb.missing],
        unexpected=list(bb.unexpected),
        mismatched={f"backbone.{k}": v for k, v in bb.mismatched.items()},
        stripped_prefix=bb.stripped_prefix,
    )
    if head_state:
        model_head = head.state_dict()
        shapes_fit = {k: tuple(v.shape) == tuple(model_head[k].shape)
                      for k, v in head_state.items() if k in model_head}
        for k, v in head_state.items():
            if k not in model_head:
                report.unexpected.append(f"head.{k}")
            elif not shapes_fit[k]:
                report.mismatched[f"head.{k}"] = (tuple(v.shape), tuple(model_head[k].shape))
        if set(head_state) == set(model_head) and all(shapes_fit.values()):
            head.load_state_dict(head_state)
            report.loaded += [f"head.{k}" for k in sorted(head_state)]
        else:  # the head is all or nothing: keys that would fit alone are not loaded either
            report.unexpected += [f"head.{k}" for k, fits in shapes_fit.items() if fits]
    log.info("DeepLab init from %s file: %s", source_format, report.summary())
    return report
