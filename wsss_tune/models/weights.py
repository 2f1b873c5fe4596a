"""Pretrained weights: read PyTorch / MXNet / safetensors files, rename, load with a by-name report.

* :func:`read_mxnet_params` / :func:`write_mxnet_params` handle MXNet's binary ``.params`` format
  (``mx.nd.save``) without MXNet, so the ResNet-38 ImageNet file of the reference
  (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``) loads directly.
* :func:`convert_resnet38_mxnet` renames its arrays onto :class:`~wsss_tune.models.resnet38.ResNet38`.
* :func:`load_pretrained` / :func:`load_state` load what fits and return a :class:`LoadReport` naming
  every missing, unexpected and shape-mismatched key; a file that does not fit raises
  :class:`WeightsError`.
* :func:`inspect_weights` summarises a file and says which registered backbone it fits best.

MXNet ``.params`` layout (all little-endian; ``src/ndarray/ndarray.cc`` ``NDArray::Save/Load``)::

    uint64 0x112 (list magic)   uint64 reserved   uint64 n   NDArray x n   uint64 m   string x m
    string   = uint64 length, bytes (UTF-8), e.g. "arg:conv1a_weight", "aux:bn7_moving_mean"
    NDArray  = uint32 magic, then by magic:
      V2 0xF993FAC9 / V3 0xF993FACA:  int32 storage type (0 = dense), shape, context, int32 dtype, data
      V1 0xF993FAC8:                  shape, context, int32 dtype, data
      legacy (no magic):              the uint32 read is ndim, then ndim x uint32 dims, context, ...
    shape    = int32 ndim, ndim x int64 dims (ndim 0 = "none" array in V1/V2; V3 has scalars, -1 = none)
    context  = int32 device type (1 cpu, 2 gpu, 3 cpu pinned, 5 cpu shared), int32 device id
    data     = prod(dims) x itemsize bytes, C order
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsss_tune.utils.io import atomic_write_bytes

__all__ = [
    "WeightsError",
    "LoadReport",
    "read_mxnet_params",
    "write_mxnet_params",
    "convert_resnet38_mxnet",
    "read_weights",
    "load_state",
    "load_pretrained",
    "inspect_weights",
]

log = logging.getLogger(__name__)

# ---- MXNet format constants (src/ndarray/ndarray.cc, include/mxnet/base.h, mshadow/base.h) ----
#: ``kMXAPINDArrayListMagic``: first uint64 of a file written by ``mx.nd.save``.
MXNET_LIST_MAGIC = 0x112
#: Per-array magics: V1 = int64 shape dims; V2 = + storage type; V3 = numpy shape semantics.
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA
#: Storage type of a dense array (``kDefaultStorage``); 1 and 2 are row-sparse and CSR.
MXNET_DENSE_STORAGE = 0
#: Valid ``Context`` device types: kCPU, kGPU, kCPUPinned, kCPUShared.
MXNET_DEVICE_TYPES = (1, 2, 3, 5)
#: mshadow ``TypeFlag`` -> numpy dtype (12 = bfloat16, converted to float32 on read).
MXNET_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
    5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"), 8: np.dtype("<i2"), 9: np.dtype("<u2"),
    10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
MXNET_BFLOAT16 = 12
#: Sanity bound on ndim when reading (our choice; MXNet arrays have at most a handful of axes).
MXNET_MAX_NDIM = 32
#: Prefixes MXNet checkpoints put on names: trained arguments and auxiliary states (BN statistics).
MXNET_NAME_PREFIXES = ("arg:", "aux:")

# ---- loading policy (our choices) ----
#: Prefixes stripped from file keys when that makes more keys match: DataParallel and wrappers.
STRIP_PREFIXES = ("module.", "backbone.")
#: Model keys that need no value from a file (BatchNorm's step counter).
IGNORED_SUFFIXES = ("num_batches_tracked",)
#: With ``strict_backbone=False``, fewer matched model keys than this fraction means the wrong file.
MIN_MATCH_FRACTION = 0.5
#: Names listed in an error message before "... and N more".
MAX_LISTED = 8
#: File suffixes by format.
TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt")
MXNET_SUFFIXES = (".params",)
SAFETENSORS_SUFFIXES = (".safetensors",)

#: A renaming function: file name -> array/tensor in, model name -> tensor/array out.
Converter = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class WeightsError(ValueError):
    """A weights file cannot be read or does not fit the model; the message names file and keys."""


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


# --------------------------------------------------------------------------------------------------
# MXNet .params
# --------------------------------------------------------------------------------------------------


class _Reader:
    """Little-endian cursor over a file's bytes; every short read names the file and offset."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = memoryview(data)
        self.path = path
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise WeightsError(f"{self.path}: truncated or not an MXNet .params file: needed {n} bytes for "
                               f"{what} at offset {self.pos}, but the file has {len(self.data)} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return values[0] if len(values) == 1 else values


def _read_shape(r: _Reader, what: str, *, legacy_ndim: int | None = None) -> tuple[int, ...] | None:
    if legacy_ndim is not None:  # pre-V1: dims are uint32
        ndim, fmt = legacy_ndim, "I"
    else:
        ndim, fmt = r.unpack("i", f"{what} ndim"), "q"
    if ndim == -1:  # unknown shape (V3): a "none" array
        return None
    if not 0 <= ndim <= MXNET_MAX_NDIM:
        raise WeightsError(f"{r.path}: {what} has ndim {ndim} at offset {r.pos - 4}; expected 0..{MXNET_MAX_NDIM} "
                           "(corrupt file or not an MXNet .params file)")
    dims = tuple(int(d) for d in struct.unpack(f"<{ndim}{fmt}", r.take(ndim * struct.calcsize(fmt), f"{what} dims")))
    if any(d < 0 for d in dims):
        raise WeightsError(f"{r.path}: {what} has negative dims {dims}")
    return dims


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    what = f"array #{index}"
    magic = r.unpack("I", f"{what} magic")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        stype = r.unpack("i", f"{what} storage type")
        if stype != MXNET_DENSE_STORAGE:
            raise WeightsError(f"{r.path}: {what} has sparse storage type {stype}; only dense arrays "
                               f"(storage type {MXNET_DENSE_STORAGE}) are supported")
        shape = _read_shape(r, what)
        if shape is None or (magic == NDARRAY_V2_MAGIC and len(shape) == 0):
            return np.empty((0,), np.float32)  # "none" array: nothing else stored
    elif magic == NDARRAY_V1_MAGIC:
        shape = _read_shape(r, what)
        if not shape:
            return np.empty((0,), np.float32)
    else:  # legacy layout: the word just read is ndim
        if magic > MXNET_MAX_NDIM:
            raise WeightsError(f"{r.path}: {what} starts with 0x{magic:08X} at offset {r.pos - 4}; expected an "
                               f"NDArray magic (0x{NDARRAY_V1_MAGIC:08X}..0x{NDARRAY_V3_MAGIC:08X}) or a legacy ndim "
                               "(corrupt file or not an MXNet .params file)")
        shape = _read_shape(r, what, legacy_ndim=magic)
        if not shape:
            return np.empty((0,), np.float32)
    dev_type, _dev_id = r.unpack("ii", f"{what} context")
    if dev_type not in MXNET_DEVICE_TYPES:
        raise WeightsError(f"{r.path}: {what} has device type {dev_type} at offset {r.pos - 8}; expected one of "
                           f"{MXNET_DEVICE_TYPES} (corrupt file)")
    flag = r.unpack("i", f"{what} dtype")
    count = math.prod(shape)
    if flag == MXNET_BFLOAT16:
        halves = np.frombuffer(r.take(2 * count, f"{what} data ({count} bfloat16)"), dtype="<u2")
        return (halves.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if flag not in MXNET_DTYPES:
        raise WeightsError(f"{r.path}: {what} has unknown dtype flag {flag}; expected one of "
                           f"{sorted([*MXNET_DTYPES, MXNET_BFLOAT16])}")
    dtype = MXNET_DTYPES[flag]
    raw = r.take(dtype.itemsize * count, f"{what} data ({count} x {dtype.name})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """Read an MXNet ``.params`` file (``mx.nd.save``) without MXNet.

    Names keep MXNet's ``arg:`` / ``aux:`` prefixes; a file saved without names gets keys ``"0"``,
    ``"1"``, ... Dense arrays of every MXNet version (legacy, V1, V2, V3) are supported.

    Raises:
        WeightsError: missing, truncated or malformed file (the message names file and offset).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    r = _Reader(path.read_bytes(), str(path))
    magic = r.unpack("Q", "list magic")
    if magic != MXNET_LIST_MAGIC:
        raise WeightsError(f"{path}: not an MXNet .params file: starts with 0x{magic:X}, "
                           f"expected list magic 0x{MXNET_LIST_MAGIC:X}")
    r.unpack("Q", "reserved word")
    n = r.unpack("Q", "array count")
    arrays = [_read_ndarray(r, i) for i in range(n)]
    m = r.unpack("Q", "name count")
    names = []
    for i in range(m):
        length = r.unpack("Q", f"name #{i} length")
        try:
            names.append(bytes(r.take(length, f"name #{i}")).decode("utf-8"))
        except UnicodeDecodeError:
            raise WeightsError(f"{path}: name #{i} is not UTF-8 text (corrupt file)") from None
    if m == 0:
        names = [str(i) for i in range(n)]
    elif m != n:
        raise WeightsError(f"{path}: {n} arrays but {m} names; expected one name per array")
    if len(set(names)) != len(names):
        dup = sorted({k for k in names if names.count(k) > 1})
        raise WeightsError(f"{path}: duplicate array names {_listed(dup)}")
    return dict(zip(names, arrays, strict=True))


def _encode_array(name: str, array: np.ndarray, version: int) -> bytes:
    flags = {dt: flag for flag, dt in MXNET_DTYPES.items()}
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in flags:
        raise ValueError(f"write_mxnet_params: array {name!r} has dtype {array.dtype}; expected one of "
                         f"{', '.join(sorted({d.name for d in MXNET_DTYPES.values()}))}")
    if array.ndim == 0 and version != 3:
        raise ValueError(f"write_mxnet_params: array {name!r} is a scalar; version {version} stores only "
                         "arrays with at least one axis (reshape it to (1,))")
    out = bytearray()
    if version in (2, 3):
        out += struct.pack("<Ii", NDARRAY_V2_MAGIC if version == 2 else NDARRAY_V3_MAGIC, MXNET_DENSE_STORAGE)
    if version == 0:
        out += struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)
    else:
        if version == 1:
            out += struct.pack("<I", NDARRAY_V1_MAGIC)
        out += struct.pack(f"<i{array.ndim}q", array.ndim, *array.shape)
    out += struct.pack("<iii", 1, 0, flags[dtype])  # cpu(0), dtype flag
    out += np.ascontiguousarray(array, dtype=dtype).tobytes()
    return bytes(out)


def write_mxnet_params(path: str | Path, arrays: Mapping[str, np.ndarray], *, version: int = 2) -> None:
    """Write ``arrays`` in MXNet's ``.params`` format (what ``mx.nd.save`` writes; atomic).

    Args:
        path: output file.
        arrays: name -> array (names as MXNet stores them, e.g. ``"arg:conv1a_weight"``).
        version: per-array layout: 2 (MXNet >= 1.0, default), 3 (numpy-shape mode), 1 (int64
            shapes, no storage type) or 0 (legacy uint32 shapes).
    """
    if version not in (0, 1, 2, 3):
        raise ValueError(f"write_mxnet_params: version={version!r}; expected 0, 1, 2 or 3")
    out = bytearray(struct.pack("<QQQ", MXNET_LIST_MAGIC, 0, len(arrays)))
    for name, array in arrays.items():
        out += _encode_array(name, np.asarray(array), version)
    out += struct.pack("<Q", len(arrays))
    for name in arrays:
        encoded = name.encode("utf-8")
        out += struct.pack("<Q", len(encoded)) + encoded
    atomic_write_bytes(path, bytes(out))


# --------------------------------------------------------------------------------------------------
# Renaming
# --------------------------------------------------------------------------------------------------

#: ``res4b3_branch2b1_weight`` (conv) / ``bn4b3_branch2b1_gamma`` (BatchNorm) of a residual block.
_MX_BLOCK = re.compile(r"^(?P<kind>res|bn)(?P<stage>\d)(?P<block>a|b\d+)_branch(?P<branch>1|2a|2b1|2b2)_"
                       r"(?P<param>weight|gamma|beta|moving_mean|moving_var)$")
#: ``bn7_gamma``: the final BatchNorm.
_MX_BN7 = re.compile(r"^bn7_(?P<param>gamma|beta|moving_mean|moving_var)$")
#: MXNet BatchNorm parameter -> PyTorch name (the reference ``convert_mxnet_to_torch`` table).
_MX_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def _resnet38_name(name: str) -> str | None:
    if name == "conv1a_weight":
        return "conv1a.weight"
    m = _MX_BN7.match(name)
    if m:
        return f"bn7.{_MX_BN_PARAMS[m['param']]}"
    m = _MX_BLOCK.match(name)
    if not m:
        return None
    block = f"b{m['stage']}" if m["block"] == "a" else f"b{m['stage']}_{m['block'][1:]}"
    if m["kind"] == "res":
        return f"{block}.conv_branch{m['branch']}.weight" if m["param"] == "weight" else None
    if m["param"] == "weight":
        return None
    return f"{block}.bn_branch{m['branch']}.{_MX_BN_PARAMS[m['param']]}"


def _as_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def convert_resnet38_mxnet(arrays: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename the MXNet ResNet-38 ("A1") arrays onto :class:`~wsss_tune.models.resnet38.ResNet38`.

    ``arg:``/``aux:`` prefixes are dropped; ``res<S><a|bK>_branch<X>_weight`` becomes
    ``b<S>[_K].conv_branch<X>.weight``; ``bn<S><a|bK>_branch<X>_{gamma,beta,moving_mean,moving_var}``
    becomes ``b<S>[_K].bn_branch<X>.{weight,bias,running_mean,running_var}``; ``bn7_*`` -> ``bn7.*``;
    ``conv1a_weight`` -> ``conv1a.weight``. Any other name (the ImageNet classifier ``linear1000_*``)
    is kept as it is, so that :func:`load_state` reports it as unexpected.
    """
    out: dict[str, Tensor] = {}
    for raw_name, value in arrays.items():
        name = raw_name
        for prefix in MXNET_NAME_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[_resnet38_name(name) or name] = _as_tensor(value)
    return out


# --------------------------------------------------------------------------------------------------
# Reading any format
# --------------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for fmt, suffixes in (("torch", TORCH_SUFFIXES), ("mxnet", MXNET_SUFFIXES),
                          ("safetensors", SAFETENSORS_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    raise WeightsError(f"{path}: unknown weights format; expected a file ending in "
                       f"{', '.join(TORCH_SUFFIXES + MXNET_SUFFIXES + SAFETENSORS_SUFFIXES)}")


def _unwrap_torch(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
        found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:MAX_LISTED])
        raise WeightsError(f"{path}: no tensors found; expected a state dict or a mapping with 'state_dict' "
                           f"or 'model', found keys {found or '(none)'}")
    raise WeightsError(f"{path}: holds a {type(obj).__name__}; expected a state dict (name -> tensor) "
                       "or a mapping with 'state_dict' or 'model'")


def read_weights(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read a weights file as it is stored: ``(format, name -> tensor/array)``.

    Formats by suffix: ``torch`` (``.pth``/``.pt``/``.pth.tar``/``.ckpt``, loaded with
    ``weights_only=True``; a raw state dict or ``{"state_dict": ...}`` / ``{"model": ...}``),
    ``mxnet`` (``.params``) and ``safetensors`` (needs the ``safetensors`` package).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    fmt = _format_of(path)
    if fmt == "mxnet":
        return fmt, dict(read_mxnet_params(path))
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{path}: reading .safetensors needs the 'safetensors' package "
                               "(pip install safetensors), or convert the file to .pth") from None
        try:
            return fmt, dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # the package raises its own error types
            raise WeightsError(f"{path}: cannot read safetensors file: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle refused by weights_only, ...
        raise WeightsError(f"{path}: cannot read PyTorch weights ({type(exc).__name__}: {exc}); expected a "
                           "file written by torch.save holding only tensors and plain containers") from None
    return fmt, _unwrap_torch(obj, path)


# --------------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_state` did, by key name (model key names, after prefix stripping)."""

    source: str
    #: Model keys given a value from the file.
    loaded: list[str] = field(default_factory=list)
    #: Model keys the file has no value for (BatchNorm step counters are not counted).
    missing: list[str] = field(default_factory=list)
    #: File keys the model has no place for.
    unexpected: list[str] = field(default_factory=list)
    #: Keys in both whose shapes differ: key -> (file shape, model shape); not loaded.
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: Prefix stripped from the file's keys ("" if none).
    stripped_prefix: str = ""

    @property
    def complete(self) -> bool:
        """Every model key was loaded."""
        return not self.missing and not self.mismatched

    def mismatch_text(self) -> str:
        """Shape mismatches as ``key file [..] vs model [..]``, the first few."""
        return _listed(f"{k} file {list(a)} vs model {list(b)}" for k, (a, b) in self.mismatched.items())

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"loaded {len(self.loaded)} keys from {self.source}"]
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_listed(self.missing)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches ({self.mismatch_text()})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_listed(self.unexpected)})")
        return "; ".join(parts)


def _match_count(state: Mapping[str, Any], model_keys: set[str]) -> int:
    return sum(1 for k in state if k in model_keys)


def _strip_prefixes(state: dict[str, Any], model_keys: set[str]) -> tuple[dict[str, Any], str]:
    stripped = ""
    for prefix in STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in model_keys) or not any(k.startswith(prefix) for k in state):
            continue
        candidate = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        if len(candidate) == len(state) and _match_count(candidate, model_keys) >= _match_count(state, model_keys):
            state, stripped = candidate, stripped + prefix
    return state, stripped


def load_state(
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    source: str,
    strict_backbone: bool = True,
    min_match_fraction: float = MIN_MATCH_FRACTION,
) -> LoadReport:
    """Copy the entries of ``state`` that fit ``model`` (same name and shape) and report the rest.

    File keys lose a leading ``module.`` / ``backbone.`` when the model's keys have none and that
    makes more keys match (a DataParallel checkpoint, or an EPS checkpoint loaded into a backbone).

    Args:
        model: the module to fill (its parameters keep their device and dtype).
        state: name -> tensor or numpy array.
        source: what ``state`` came from, for messages (a file name).
        strict_backbone: raise unless every model key is loaded; unexpected keys (a classifier, an
            EPS head) are allowed.
        min_match_fraction: with ``strict_backbone=False``, raise when fewer model keys than this
            fraction are loaded.

    Raises:
        WeightsError: nothing matches, a strict load is incomplete, or too little matches; the
            message names the file and the keys.
    """
    model_state = model.state_dict()
    wanted = {k for k in model_state if not k.endswith(IGNORED_SUFFIXES)}
    items, stripped = _strip_prefixes(dict(state), set(model_state))
    report = LoadReport(source=source, stripped_prefix=stripped)
    to_load: dict[str, Tensor] = {}
    for key, value in items.items():
        if key not in model_state:
            if not key.endswith(IGNORED_SUFFIXES):
                report.unexpected.append(key)
            continue
        tensor = _as_tensor(value)
        target = model_state[key]
        if tuple(tensor.shape) != tuple(target.shape):
            report.mismatched[key] = (tuple(tensor.shape), tuple(target.shape))
            continue
        to_load[key] = tensor
    report.unexpected.sort()
    report.loaded = sorted(k for k in to_load if k in wanted)
    report.missing = sorted(wanted - set(to_load) - set(report.mismatched))
    name = type(model).__name__
    if not report.loaded:
        shapes = ""
        if report.mismatched:
            shapes = f"; {len(report.mismatched)} keys match by name but not by shape ({report.mismatch_text()})"
        raise WeightsError(f"{source}: no key fits {name} ({len(wanted)} keys such as {_listed(sorted(wanted))}); "
                           f"the file has {len(items)} keys such as {_listed(list(items))}{shapes}")
    if strict_backbone and not report.complete:
        raise WeightsError(f"{source}: does not fit {name}: {report.summary()}")
    if not strict_backbone and len(report.loaded) < min_match_fraction * len(wanted):
        raise WeightsError(f"{source}: only {len(report.loaded)} of {len(wanted)} {name} keys fit "
                           f"(need {min_match_fraction:.0%}): {report.summary()}")
    model.load_state_dict(to_load, strict=False)
    return report


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    strict_backbone: bool = True,
    converter: Converter | None = None,
) -> LoadReport:
    """Read ``path`` (see :func:`read_weights`), rename with ``converter`` and load into ``model``.

    MXNet ``.params`` files default to :func:`convert_resnet38_mxnet` (the only MXNet file the
    pipeline uses); other formats default to no renaming.

    Raises:
        WeightsError: unreadable file or a file that does not fit (see :func:`load_state`).
    """
    fmt, raw = read_weights(path)
    if converter is None and fmt == "mxnet":
        converter = convert_resnet38_mxnet
    state = converter(raw) if converter is not None else raw
    report = load_state(model, state, source=str(path), strict_backbone=strict_backbone)
    log.debug("%s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------


def _fit(name: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    from wsss_tune.models.registry import create_backbone

    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = create_backbone(name)
    except Exception as exc:  # a builder that needs arguments: report, do not fail the inspection
        return {"backbone": name, "error": f"{type(exc).__name__}: {exc}", "fraction": 0.0}
    model_state = model.state_dict()
    wanted = {k for k in model_state if not k.endswith(IGNORED_SUFFIXES)}
    items, _ = _strip_prefixes(dict(state), set(model_state))
    matched = [k for k in wanted if k in items and tuple(items[k].shape) == tuple(model_state[k].shape)]
    mismatched = [k for k in wanted if k in items and k not in matched]
    return {"backbone": name, "matched": len(matched), "model_keys": len(wanted), "mismatched": len(mismatched),
            "fraction": round(len(matched) / max(len(wanted), 1), 4)}


def inspect_weights(path: str | Path, *, backbones: Iterable[str] | None = None) -> dict[str, Any]:
    """Summarise a weights file and how well it fits each registered backbone.

    Returns:
        ``{"path", "format", "num_keys", "num_params", "dtypes": {dtype: keys},
        "groups": {first name component: {"keys", "params"}}, "fits": [per backbone: "backbone",
        "matched", "model_keys", "mismatched", "fraction"], "best_fit": name or None}``.
        MXNet files are described after :func:`convert_resnet38_mxnet`.
    """
    from wsss_tune.models.registry import list_backbones

    registered = list_backbones()  # imports the backbone modules outside the meta-device context below
    fmt, raw = read_weights(path)
    state = convert_resnet38_mxnet(raw) if fmt == "mxnet" else {k: _as_tensor(v) for k, v in raw.items()}
    dtypes: dict[str, int] = {}
    groups: dict[str, dict[str, int]] = {}
    for key, value in state.items():
        dtype = str(value.dtype).removeprefix("torch.")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        group = groups.setdefault(key.split(".", 1)[0], {"keys": 0, "params": 0})
        group["keys"] += 1
        group["params"] += value.numel()
    names = list(backbones) if backbones is not None else registered
    fits = sorted((_fit(n, state) for n in names), key=lambda f: (-f["fraction"], f["backbone"]))
    best = fits[0]["backbone"] if fits and fits[0]["fraction"] > 0 else None
    return {
        "path": str(path),
        "format": fmt,
        "num_keys": len(state),
        "num_params": int(sum(v.numel() for v in state.values())),
        "dtypes": dtypes,
        "groups": groups,
        "fits": fits,
        "best_fit": best,
    }
