"""Prepare PASCAL VOC 2012 + SBD ("aug") from the official archives into the layout the loader reads.

Inputs are the official downloads, or the folders they unpack to:

* ``VOCtrainval_11-May-2012.tar``: members ``VOCdevkit/VOC2012/{JPEGImages,Annotations,
  SegmentationClass,ImageSets/Segmentation}/...``; the masks are palette PNGs whose palette indices are
  the class values (255 = object boundary, ignored).
* ``benchmark.tgz`` (SBD, Hariharan et al. 2011): members ``benchmark_RELEASE/dataset/{cls,img}/...``
  and ``benchmark_RELEASE/dataset/{train,val}.txt``; ``cls/<id>.mat`` holds a MATLAB struct ``GTcls``
  whose field ``Segmentation`` is the uint8 class mask (0..20, no boundary band).

Output (DESIGN.md §2, "Data layout")::

    OUT/JPEGImages/<id>.jpg  OUT/Annotations/<id>.xml  OUT/SegmentationClassAug/<id>.png
    OUT/ImageSets/Segmentation/{train_aug,train,val}.txt  OUT/cls_labels.npy  OUT/prepare_voc.json

``SegmentationClassAug`` holds VOC's own masks where VOC has one and SBD's otherwise; ``train_aug`` is
VOC train + SBD train + SBD val minus VOC val (10,582 ids on the official data). Every file is written
atomically and files already in place are kept, so an interrupted run continues where it stopped;
``prepare_voc.json`` is written last and makes a re-run on a complete output a no-op.

:func:`make_saliency_from_gt` writes saliency maps made from the ground-truth masks, for an upper-bound
study only: they hold information no weakly supervised method has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image
from scipy.ndimage import gaussian_filter

from wsss_tune.data.masks import MASK_MODES, save_mask_png
from wsss_tune.data.voc import (
    ANNOTATION_DIR,
    CLS_LABELS_FILE,
    IGNORE_INDEX,
    IMAGE_EXT,
    MASK_EXT,
    PIXEL_MAX,
    SALIENCY_EXT,
    SPLIT_DIR,
    VOC_CLASSES,
    DataError,
    VOCLayout,
)
from wsss_tune.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "PrepareError",
    "SplitCounts",
    "OFFICIAL_COUNTS",
    "PrepareReport",
    "SALIENCY_FROM_GT_DIR",
    "prepare_voc",
    "verify_counts",
    "gt_saliency",
    "make_saliency_from_gt",
]

# ---- the official inputs (VOC 2012 devkit; SBD "benchmark_RELEASE") ----
#: File names of the official downloads, for messages.
VOC_ARCHIVE_NAME = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE_NAME = "benchmark.tgz"
#: Dataset root inside each archive, and folders an unpacked copy may be given as (relative to the path).
VOC_ROOT_IN_ARCHIVE = "VOCdevkit/VOC2012"
SBD_ROOT_IN_ARCHIVE = "benchmark_RELEASE/dataset"
VOC_FOLDER_CANDIDATES = (".", "VOC2012", VOC_ROOT_IN_ARCHIVE)
SBD_FOLDER_CANDIDATES = (".", "dataset", SBD_ROOT_IN_ARCHIVE)
#: What we take from each source, relative to its root.
VOC_IMAGE_DIR = "JPEGImages"
VOC_ANNOTATION_DIR = "Annotations"
VOC_MASK_DIR = "SegmentationClass"
XML_EXT = ".xml"
VOC_SPLIT_FILES = {"train": f"{SPLIT_DIR}/train.txt", "val": f"{SPLIT_DIR}/val.txt"}
SBD_MASK_DIR = "cls"
SBD_IMAGE_DIR = "img"
SBD_SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}
SBD_MAT_EXT = ".mat"
#: MATLAB variable and field of SBD's class masks (``benchmark_RELEASE/README``).
SBD_STRUCT = "GTcls"
SBD_FIELD = "Segmentation"

# ---- the output ----
OUT_MASK_DIR = "SegmentationClassAug"
OUT_IMAGE_DIR = "JPEGImages"
#: Written last; its presence with the same inputs marks a complete output.
MARKER_FILE = "prepare_voc.json"
LOCK_FILE = ".prepare_voc.lock"
#: Bump when the output format changes, so an older complete output is refreshed.
PREPARE_VERSION = 1
#: Saliency maps made from GT masks (upper bound only): the name says where they come from.
SALIENCY_FROM_GT_DIR = "SaliencyFromGT"
#: Gaussian blur of the GT foreground, in pixels: the synthetic data's saliency blur (DESIGN.md §4).
GT_SALIENCY_SIGMA = 1.5
#: Saliency given to VOC's ignore band (object boundaries) before blurring: neither object nor background.
GT_SALIENCY_IGNORE = 0.5
#: Ids shown in an error message before "... and N more".
MAX_LISTED = 5


class PrepareError(ValueError):
    """An input archive/folder is wrong, truncated or incomplete; the message names the file."""


@dataclass(frozen=True)
class SplitCounts:
    """Ids per list: VOC's segmentation train/val, SBD's train/val, and the ``train_aug`` union."""

    voc_train: int
    voc_val: int
    sbd_train: int
    sbd_val: int
    train_aug: int


#: The official sizes: VOC 2012 ImageSets/Segmentation, SBD benchmark_RELEASE, and the usual union.
OFFICIAL_COUNTS = SplitCounts(voc_train=1464, voc_val=1449, sbd_train=8498, sbd_val=2857, train_aug=10582)


@dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_voc` produced.

    Attributes:
        out: the dataset root.
        counts: ids per list (see :class:`SplitCounts`).
        files: files in the output by kind (``images``, ``annotations``, ``voc_masks``, ``sbd_masks``,
            ``labels``, ``labels_from_masks``: labels taken from a mask for want of an annotation).
        written: data files (images, annotations, masks, saliency maps) written by this call; 0 when
            the output was already complete.
        official: the inputs are the full official sets, so the counts were checked against
            :data:`OFFICIAL_COUNTS`.
        mismatches: counts that differ from the official ones (empty when fine or not checked).
        skipped: the output was already complete; nothing was read.
        saliency_dir: folder of GT-derived saliency maps, if made.
    """

    out: str
    counts: SplitCounts
    files: dict[str, int]
    written: int
    official: bool
    mismatches: tuple[str, ...] = ()
    skipped: bool = False
    saliency_dir: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """No count differs from the official ones."""
        return not self.mismatches

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        c = self.counts
        check = " (official counts verified)" if self.official and self.ok else ""
        lines = [f"dataset at {self.out}" + (" (already complete; nothing to do)" if self.skipped else ""),
                 f"train_aug {c.train_aug:,}  train {c.voc_train:,}  val {c.voc_val:,} ids{check}",
                 *([f"SBD lists: train {c.sbd_train:,}  val {c.sbd_val:,}"] if c.sbd_train or c.sbd_val else []),
                 "files: " + ", ".join(f"{k} {v:,}" for k, v in self.files.items()),
                 f"written this run: {self.written:,}"]
        if self.saliency_dir:
            lines.append(f"GT saliency maps (upper bound only) in {self.saliency_dir}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"count mismatch: {m}" for m in self.mismatches]
        return "\n".join(lines)


def verify_counts(
    found: SplitCounts, *, with_sbd: bool, official: SplitCounts = OFFICIAL_COUNTS
) -> tuple[bool, list[str]]:
    """Compare the list sizes with the official ones when the inputs are the official sets.

    The VOC lists decide: when ``voc_train``/``voc_val`` have the official sizes the inputs are taken
    to be the official release and every other count must match too (SBD's lists and ``train_aug``,
    which is ``voc_train`` alone without SBD). Other inputs (a subset, custom data) are not checked.

    Returns:
        ``(inputs are official, mismatch messages)``.
    """
    if (found.voc_train, found.voc_val) != (official.voc_train, official.voc_val):
        return False, []
    expected = {"train_aug": official.train_aug if with_sbd else official.voc_train}
    if with_sbd:
        expected |= {"sbd_train": official.sbd_train, "sbd_val": official.sbd_val}
    mismatches = [f"{name} has {getattr(found, name):,} ids; the official sets give {want:,}"
                  for name, want in expected.items() if getattr(found, name) != want]
    return True, mismatches


# --------------------------------------------------------------------------------------------------
# Reading an archive or a folder the same way
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One file of a source: its path under the dataset root, its size, and how to read it."""

    rel: str
    size: int
    read: Callable[[], bytes]


@dataclass(frozen=True)
class _SourceSpec:
    """Where a dataset sits in its official archive, and which of its files we want."""

    what: str  # "VOC 2012" / "SBD"
    archive_name: str
    root_in_archive: str
    folder_candidates: tuple[str, ...]
    dirs: tuple[str, ...]
    files: tuple[str, ...]

    def wanted(self, rel: str) -> bool:
        return rel in self.files or os.path.dirname(rel) in self.dirs


_VOC = _SourceSpec("VOC 2012", VOC_ARCHIVE_NAME, VOC_ROOT_IN_ARCHIVE, VOC_FOLDER_CANDIDATES,
                   (VOC_IMAGE_DIR, VOC_ANNOTATION_DIR, VOC_MASK_DIR), tuple(VOC_SPLIT_FILES.values()))
_SBD = _SourceSpec("SBD", SBD_ARCHIVE_NAME, SBD_ROOT_IN_ARCHIVE, SBD_FOLDER_CANDIDATES,
                   (SBD_MASK_DIR, SBD_IMAGE_DIR), tuple(SBD_SPLIT_FILES.values()))

#: Errors of a damaged archive: tar structure, gzip/bz2/xz stream, short reads.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _describe(path: Path, spec: _SourceSpec, rel: str) -> str:
    """How to name a member in messages: ``X.tar:VOCdevkit/VOC2012/...`` or the file path."""
    if path.is_dir():
        return str(path / rel)
    return f"{path}:{spec.root_in_archive}/{rel}"


def _folder_root(path: Path, spec: _SourceSpec) -> Path:
    for candidate in spec.folder_candidates:
        base = path / candidate
        if (base / spec.dirs[0]).is_dir():
            return base.resolve()
    looked = ", ".join(str(path / c) for c in spec.folder_candidates)
    raise PrepareError(f"no {spec.dirs[0]} folder in {path} (looked in {looked}); expected the unpacked "
                       f"{spec.archive_name} ({spec.what}) or the archive itself")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read ({exc})") from None


def _folder_entries(root: Path, spec: _SourceSpec, tick: Callable[[int], None]) -> Iterator[_Entry]:
    for d in spec.dirs:
        folder = root / d
        if not folder.is_dir():
            continue
        for name in sorted(os.listdir(folder)):
            p = folder / name
            if p.is_file():
                tick(1)
                yield _Entry(f"{d}/{name}", p.stat().st_size, partial(_read_file, p))
    for rel in spec.files:
        p = root / rel
        if p.is_file():
            tick(1)
            yield _Entry(rel, p.stat().st_size, partial(_read_file, p))


def _count_folder_files(root: Path, spec: _SourceSpec) -> int:
    n = sum(len(os.listdir(root / d)) for d in spec.dirs if (root / d).is_dir())
    return n + sum((root / f).is_file() for f in spec.files)


def _truncated(path: Path, spec: _SourceSpec, exc: BaseException) -> PrepareError:
    return PrepareError(f"{path}: truncated or corrupt archive ({type(exc).__name__}: {exc}); expected the "
                        f"complete {spec.archive_name} ({spec.what}) - download it again")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, spec: _SourceSpec) -> bytes:
    try:
        f = tar.extractfile(member)
        if f is None:  # pragma: no cover - only regular files reach here
            return b""
        with f:
            return f.read()
    except _ARCHIVE_ERRORS as exc:
        raise _truncated(path, spec, exc) from None


def _tar_entries(path: Path, spec: _SourceSpec, tick: Callable[[int], None]) -> Iterator[_Entry]:
    top = spec.root_in_archive.split("/", 1)[0]
    prefix = spec.root_in_archive + "/"
    with open(path, "rb") as raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:*")
        except tarfile.ReadError as exc:
            raise PrepareError(f"{path}: not a tar archive ({exc}); expected {spec.archive_name} ({spec.what}) "
                               "as downloaded, or the folder it unpacks to") from None
        with tar:
            last = 0
            first = True
            for member in tar:
                tick(raw.tell() - last)
                last = raw.tell()
                name = member.name.removeprefix("./")
                if name in ("", "."):
                    continue
                if first and name.split("/", 1)[0] != top:
                    raise PrepareError(f"{path}: holds {name!r}; expected members under {prefix} (the official "
                                       f"{spec.archive_name}, {spec.what}) - wrong archive?")
                first = False
                if not member.isfile() or not name.startswith(prefix):
                    continue
                rel = name[len(prefix):]
                if spec.wanted(rel):
                    yield _Entry(rel, member.size, partial(_read_member, tar, member, path, spec))
            if first:
                raise PrepareError(f"{path}: empty archive; expected {spec.archive_name} ({spec.what})")
            # An uncompressed tar cut between two members ends the iteration silently; a complete one
            # has its end-of-archive zero blocks after the last member. (A cut compressed stream
            # raises EOFError from the decompressor instead.)
            if tar.fileobj is raw and os.path.getsize(path) - tar.offset < tarfile.BLOCKSIZE:
                raise EOFError(f"no end-of-archive marker after the last member (offset {tar.offset})")
            tick(os.path.getsize(path) - last)


@contextlib.contextmanager
def _source_errors(path: Path, spec: _SourceSpec) -> Iterator[None]:
    try:
        yield
    except PrepareError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise _truncated(path, spec, exc) from None


def _entries(path: Path, spec: _SourceSpec, progress: Any) -> Iterator[_Entry]:
    """Every wanted file of ``path`` (archive or folder) in storage order, with a progress bar."""
    if not path.exists():
        raise PrepareError(f"{path}: no such file or folder; expected {spec.archive_name} ({spec.what}) or "
                           "the folder it unpacks to")
    if path.is_dir():
        root = _folder_root(path, spec)
        task = progress.add_task(f"{spec.what} {path.name}", total=_count_folder_files(root, spec))
        yield from _folder_entries(root, spec, lambda n: progress.advance(task, n))
        return
    task = progress.add_task(f"{spec.what} {path.name}", total=os.path.getsize(path))
    with _source_errors(path, spec):
        yield from _tar_entries(path, spec, lambda n: progress.advance(task, n))


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


# --------------------------------------------------------------------------------------------------
# Converting one file
# --------------------------------------------------------------------------------------------------


def _stem(rel: str, ext: str) -> str | None:
    name = os.path.basename(rel)
    return name[: -len(ext)] if name.endswith(ext) and len(name) > len(ext) else None


def _parse_ids(data: bytes, where: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PrepareError(f"{where}: not a text list of image ids") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise PrepareError(f"{where}: lists no image ids")
    return ids


def _voc_mask(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, arr = img.mode, (np.array(img) if img.mode in MASK_MODES else None)
    except (OSError, ValueError, SyntaxError) as exc:
        raise PrepareError(f"{where}: cannot decode PNG ({exc}); truncated archive?") from None
    if arr is None:
        raise PrepareError(f"{where}: PNG has mode {mode!r}; expected VOC's palette PNG (mode 'P') of class indices")
    return _checked_mask(arr, where)


def _sbd_mask(data: bytes, where: str) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except (MatReadError, ValueError, OSError, TypeError) as exc:
        raise PrepareError(f"{where}: cannot read MATLAB file ({exc}); truncated archive?") from None
    seg = getattr(mat.get(SBD_STRUCT), SBD_FIELD, None)
    if not isinstance(seg, np.ndarray) or seg.ndim != 2:
        raise PrepareError(f"{where}: no 2-D {SBD_STRUCT}.{SBD_FIELD}; expected SBD's class-segmentation file "
                           f"(struct {SBD_STRUCT} with a uint8 field {SBD_FIELD})")
    return _checked_mask(seg, where)


def _checked_mask(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise PrepareError(f"{where}: mask has dtype {arr.dtype}; expected integer class indices")
    values = np.unique(arr)
    bad = values[((values > len(VOC_CLASSES)) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        raise PrepareError(f"{where}: mask values {bad.tolist()[:MAX_LISTED]} outside 0..{len(VOC_CLASSES)} and "
                           f"{IGNORE_INDEX}")
    return arr.astype(np.uint8)


def _listed(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    more = f" ... and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more


# --------------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """What the passes saw (ids by kind) and wrote."""

    voc_images: set[str] = field(default_factory=set)
    voc_annotations: set[str] = field(default_factory=set)
    voc_masks: set[str] = field(default_factory=set)
    sbd_masks: set[str] = field(default_factory=set)
    lists: dict[str, list[str]] = field(default_factory=dict)
    written: int = 0


def _copy(entry: _Entry, dest: Path, state: _State) -> None:
    if dest.is_file() and dest.stat().st_size == entry.size:
        return
    atomic_write_bytes(dest, entry.read())
    state.written += 1


def _voc_pass(path: Path, out: Path, state: _State, progress: Any) -> None:
    for entry in _entries(path, _VOC, progress):
        where = _describe(path, _VOC, entry.rel)
        folder = os.path.dirname(entry.rel)
        if folder == VOC_IMAGE_DIR and (i := _stem(entry.rel, IMAGE_EXT)):
            state.voc_images.add(i)
            _copy(entry, out / OUT_IMAGE_DIR / f"{i}{IMAGE_EXT}", state)
        elif folder == VOC_ANNOTATION_DIR and (i := _stem(entry.rel, XML_EXT)):
            state.voc_annotations.add(i)
            _copy(entry, out / ANNOTATION_DIR / f"{i}{XML_EXT}", state)
        elif folder == VOC_MASK_DIR and (i := _stem(entry.rel, MASK_EXT)):
            state.voc_masks.add(i)
            dest = out / OUT_MASK_DIR / f"{i}{MASK_EXT}"
            if not dest.is_file():
                save_mask_png(dest, _voc_mask(entry.read(), where))
                state.written += 1
        else:
            for split, rel in VOC_SPLIT_FILES.items():
                if entry.rel == rel:
                    state.lists[f"voc_{split}"] = _parse_ids(entry.read(), where)
    seen = {VOC_IMAGE_DIR: state.voc_images, VOC_ANNOTATION_DIR: state.voc_annotations,
            VOC_MASK_DIR: state.voc_masks}
    missing = [d for d, ids in seen.items() if not ids]
    missing += [rel for split, rel in VOC_SPLIT_FILES.items() if f"voc_{split}" not in state.lists]
    if missing:
        raise PrepareError(_missing_message(path, _VOC, missing))


def _sbd_pass(path: Path, out: Path, state: _State, progress: Any) -> None:
    for entry in _entries(path, _SBD, progress):
        where = _describe(path, _SBD, entry.rel)
        folder = os.path.dirname(entry.rel)
        if folder == SBD_MASK_DIR and (i := _stem(entry.rel, SBD_MAT_EXT)):
            state.sbd_masks.add(i)
            dest = out / OUT_MASK_DIR / f"{i}{MASK_EXT}"
            if i not in state.voc_masks and not dest.is_file():  # VOC's own mask takes precedence
                save_mask_png(dest, _sbd_mask(entry.read(), where))
                state.written += 1
        elif folder == SBD_IMAGE_DIR and (i := _stem(entry.rel, IMAGE_EXT)):
            if i not in state.voc_images:  # every SBD image is in VOC 2012; copy any that is not
                _copy(entry, out / OUT_IMAGE_DIR / f"{i}{IMAGE_EXT}", state)
        else:
            for split, rel in SBD_SPLIT_FILES.items():
                if entry.rel == rel:
                    state.lists[f"sbd_{split}"] = _parse_ids(entry.read(), where)
    missing = [SBD_MASK_DIR] if not state.sbd_masks else []
    missing += [rel for split, rel in SBD_SPLIT_FILES.items() if f"sbd_{split}" not in state.lists]
    if missing:
        raise PrepareError(_missing_message(path, _SBD, missing))


def _missing_message(path: Path, spec: _SourceSpec, missing: Sequence[str]) -> str:
    if path.is_dir():
        what = ", ".join(missing)
        return f"no {what} in {path}; expected the unpacked {spec.archive_name} ({spec.what})"
    what = ", ".join(f"{spec.root_in_archive}/{m}" for m in missing)
    return f"no {what} in {path} - wrong or truncated archive? Expected the official {spec.archive_name} ({spec.what})"


def _check_complete(out: Path, splits: dict[str, list[str]], voc: Path, sbd: Path | None) -> None:
    sources = f"{voc}" + (f" and {sbd}" if sbd else "")
    for split, ids in splits.items():
        for kind, folder, ext in (("image", OUT_IMAGE_DIR, IMAGE_EXT), ("mask", OUT_MASK_DIR, MASK_EXT)):
            absent = [i for i in ids if not (out / folder / f"{i}{ext}").is_file()]
            if absent:
                raise PrepareError(f"{len(absent)} id(s) of {split} have no {kind} in {sources}: {_listed(absent)}; "
                                   "truncated or incomplete input?")


def _write_labels(out: Path, ids: Sequence[str]) -> tuple[int, int]:
    """``cls_labels.npy`` from the XML annotations (the mask where an id has none)."""
    from_xml = VOCLayout(root=out, label_source="annotations")
    from_mask = VOCLayout(root=out, label_source="masks")
    labels: dict[str, np.ndarray] = {}
    fallback = 0
    for image_id in ids:
        if from_xml.annotation_path(image_id).is_file():
            labels[image_id] = from_xml.image_labels(image_id)
        else:
            labels[image_id] = from_mask.image_labels(image_id)
            fallback += 1
    buf = io.BytesIO()
    np.save(buf, np.array(labels, dtype=object), allow_pickle=True)  # a 0-d object array, as the reference
    atomic_write_bytes(out / CLS_LABELS_FILE, buf.getvalue())
    return len(labels), fallback


def _input_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    path = path.resolve()
    if path.is_dir():
        return {"path": str(path), "kind": "folder"}
    st = path.stat()
    return {"path": str(path), "kind": "archive", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _complete_report(out: Path, inputs: dict[str, Any]) -> PrepareReport | None:
    marker = out / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("version") != PREPARE_VERSION or saved.get("inputs") != inputs:
        return None
    needed = [out / CLS_LABELS_FILE] + [out / SPLIT_DIR / f"{s}.txt" for s in ("train_aug", "train", "val")]
    if not all(p.is_file() for p in needed):
        return None
    r = saved["report"]
    return PrepareReport(out=str(out), counts=SplitCounts(**r["counts"]), files=r["files"], written=0,
                         official=r["official"], mismatches=tuple(r["mismatches"]), skipped=True,
                         notes=tuple(r["notes"]))


def prepare_voc(
    *,
    voc: Path,
    sbd: Path | None,
    out: Path,
    progress: bool = True,
    saliency_from_gt: bool = False,
) -> PrepareReport:
    """Build a VOC 2012 + SBD dataset root from the official archives (or their unpacked folders).

    Args:
        voc: ``VOCtrainval_11-May-2012.tar`` or its unpacked folder (``VOCdevkit/VOC2012`` or a parent).
        sbd: SBD's ``benchmark.tgz`` or its unpacked folder; ``None`` = VOC alone (``train_aug`` is
            then VOC train, 1,464 ids).
        out: the dataset root to write (``data.root``).
        progress: show a progress bar.
        saliency_from_gt: also write :data:`SALIENCY_FROM_GT_DIR` (:func:`make_saliency_from_gt`);
            results with it are an upper bound, not a weakly supervised number.

    Returns:
        What was found and written; ``mismatches`` lists counts that differ from the official ones
        when the inputs are the official sets.

    Raises:
        PrepareError: missing, wrong, truncated or incomplete input (names the file and what was
            expected).
    """
    voc, out = Path(voc), Path(out)
    sbd = Path(sbd) if sbd is not None else None
    inputs = {"voc": _input_identity(voc) if voc.exists() else str(voc),
              "sbd": _input_identity(sbd) if sbd is not None and sbd.exists() else (str(sbd) if sbd else None)}
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / LOCK_FILE)):
        report = _complete_report(out, inputs)
        if report is None:
            report = _prepare(voc=voc, sbd=sbd, out=out, inputs=inputs, progress=progress)
        if saliency_from_gt:
            sal_dir = out / SALIENCY_FROM_GT_DIR
            made = make_saliency_from_gt(VOCLayout(root=out), sal_dir, progress=progress)
            report = dataclasses.replace(report, saliency_dir=str(sal_dir), written=report.written + made)
    return report


def _remove_stale_temps(out: Path) -> None:
    """Temporary files of writes killed mid-way (``atomic_write_bytes`` names them ``.<name>.*.tmp``)."""
    for folder in (out, out / OUT_IMAGE_DIR, out / ANNOTATION_DIR, out / OUT_MASK_DIR, out / SPLIT_DIR):
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                    os.unlink(entry.path)


def _prepare(*, voc: Path, sbd: Path | None, out: Path, inputs: dict[str, Any], progress: bool) -> PrepareReport:
    _remove_stale_temps(out)  # safe: the caller holds the output's lock
    state = _State()
    with _progress(progress) as bar:
        _voc_pass(voc, out, state, bar)
        if sbd is not None:
            _sbd_pass(sbd, out, state, bar)
    lists = state.lists
    train, val = lists["voc_train"], lists["voc_val"]
    notes: list[str] = []
    if sbd is None:
        train_aug = sorted(set(train))
        notes.append("no SBD given: train_aug is VOC train alone")
    else:
        train_aug = sorted((set(train) | set(lists["sbd_train"]) | set(lists["sbd_val"])) - set(val))
    splits = {"train_aug": train_aug, "train": train, "val": val}
    _check_complete(out, splits, voc, sbd)
    all_ids = sorted(set(train_aug) | set(train) | set(val))
    n_labels, fallback = _write_labels(out, all_ids)
    if fallback:
        notes.append(f"{fallback} id(s) have no annotation XML; their labels come from their masks")
    for name, ids in splits.items():
        atomic_write_text(out / SPLIT_DIR / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    counts = SplitCounts(voc_train=len(train), voc_val=len(val), sbd_train=len(lists.get("sbd_train", [])),
                         sbd_val=len(lists.get("sbd_val", [])), train_aug=len(train_aug))
    official, mismatches = verify_counts(counts, with_sbd=sbd is not None)
    files = {"images": sum(n.endswith(IMAGE_EXT) for n in os.listdir(out / OUT_IMAGE_DIR)),
             "annotations": len(state.voc_annotations),
             "voc_masks": len(state.voc_masks),
             "sbd_masks": len(state.sbd_masks - state.voc_masks),
             "labels": n_labels,
             "labels_from_masks": fallback}
    report = PrepareReport(out=str(out), counts=counts, files=files, written=state.written,
                           official=official, mismatches=tuple(mismatches), notes=tuple(notes))
    saved = {k: v for k, v in asdict(report).items() if k in ("counts", "files", "official", "mismatches", "notes")}
    atomic_write_json(out / MARKER_FILE, {"version": PREPARE_VERSION, "inputs": inputs, "report": saved})
    return report


# --------------------------------------------------------------------------------------------------
# Saliency maps from the ground truth (upper bound)
# --------------------------------------------------------------------------------------------------


def gt_saliency(mask: np.ndarray, *, num_classes: int, sigma: float = GT_SALIENCY_SIGMA) -> np.ndarray:
    """Saliency map from a GT mask: 1 on objects, 0 on background, :data:`GT_SALIENCY_IGNORE` on the
    ignore band, then a Gaussian blur of ``sigma`` pixels (edges reflected).

    Shape:
        ``mask``: ``(H, W)`` uint8 (0 background, 1..C objects, 255 ignore); returns ``(H, W)`` uint8
        (saliency x 255, rounded).
    """
    fg = ((mask >= 1) & (mask <= num_classes)).astype(np.float64)
    fg[mask == IGNORE_INDEX] = GT_SALIENCY_IGNORE
    blurred = gaussian_filter(fg, sigma=sigma, mode="reflect") if sigma > 0 else fg
    return np.clip(np.round(blurred * PIXEL_MAX), 0, PIXEL_MAX).astype(np.uint8)


def make_saliency_from_gt(
    layout: VOCLayout,
    out_dir: Path,
    *,
    splits: Sequence[str] = ("train_aug", "train", "val"),
    sigma: float = GT_SALIENCY_SIGMA,
    progress: bool = False,
) -> int:
    """Write ``out_dir/<id>.png`` saliency maps made from the GT masks (see :func:`gt_saliency`).

    For an **upper-bound study only**: these maps carry the ground truth, so an EPS run trained on
    them measures what perfect saliency would give, not a weakly supervised result. The folder name
    must say so (it must contain ``GT``, e.g. :data:`SALIENCY_FROM_GT_DIR`). Maps already written are
    kept, so an interrupted call continues.

    Args:
        layout: the dataset (its GT masks are read).
        out_dir: output folder (absolute, or relative to the dataset root).
        splits: id lists whose images get a map; lists that do not exist are skipped.
        sigma: blur in pixels.
        progress: show a progress bar.

    Returns:
        Number of maps written.
    """
    out_dir = Path(out_dir)
    out_dir = out_dir if out_dir.is_absolute() else layout.root / out_dir
    if "gt" not in out_dir.name.lower():
        raise ValueError(f"make_saliency_from_gt: folder name {out_dir.name!r} must say the maps come from the "
                         f"ground truth (e.g. {SALIENCY_FROM_GT_DIR!r}), so that results made with them are not "
                         "mistaken for weakly supervised ones")
    ids: list[str] = []
    for split in splits:
        with contextlib.suppress(DataError):
            layout.split_file(split)  # raises when the list does not exist
            ids += layout.split_ids(split)
    pending = [i for i in dict.fromkeys(ids) if not (out_dir / f"{i}{SALIENCY_EXT}").is_file()]
    with _progress(progress) as bar:
        task = bar.add_task("saliency from GT", total=len(pending))
        for image_id in pending:
            sal = gt_saliency(layout.load_mask(image_id), num_classes=layout.num_classes, sigma=sigma)
            buf = io.BytesIO()
            Image.fromarray(sal).save(buf, format="PNG")
            atomic_write_bytes(out_dir / f"{image_id}{SALIENCY_EXT}", buf.getvalue())
            bar.advance(task)
    return len(pending)
