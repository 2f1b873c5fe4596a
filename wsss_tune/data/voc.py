"""PASCAL VOC-format datasets: where the files are, how to read them, and torch datasets over them.

A dataset folder holds ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (0 background,
1..C object classes, 255 ignore), ``<saliency_dir>/<id>.png``, image-level labels (``cls_labels.npy``,
``Annotations/<id>.xml`` or the masks themselves) and split lists ``ImageSets/Segmentation/<split>.txt``
(DESIGN.md §2, "Data layout"). :class:`VOCLayout` knows that layout; every reader raises
:class:`DataError` naming the file and what was expected, so a bad file is reported where it is read
and not as a shape error deep inside a training step.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsss_tune.data.masks import read_mask_png
from wsss_tune.ops.metric import IGNORE_INDEX
from wsss_tune.utils.safe_pickle import load_pickled_npy

if TYPE_CHECKING:
    from wsss_tune.config import DataConfig

__all__ = [
    "VOC_CLASSES",
    "IGNORE_INDEX",
    "LABEL_SOURCES",
    "PROBLEM_KINDS",
    "DataError",
    "VOCLayout",
    "SampleTransform",
    "ClassificationDataset",
    "SegmentationDataset",
    "ImageDataset",
    "collate_raw",
]

#: The 20 PASCAL VOC object classes in the reference order (label index c is class c + 1 in masks).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
#: Where image-level labels may come from (``DataConfig.label_source``).
LABEL_SOURCES = ("cls_labels", "annotations", "masks")
#: Every ``DataError.kind`` (and ``check.Problem.kind``) the data layer produces.
PROBLEM_KINDS = (
    "missing_split",     # split list file not found
    "empty_split",       # split list has no ids
    "bad_split",         # split list line malformed, or an id repeated
    "missing_file",      # image / mask / saliency / label / annotation file not found
    "unreadable",        # file exists but cannot be decoded (truncated, not an image, bad XML/npy)
    "bad_mode",          # image mode not allowed (saliency not grey/RGB, mask not single-channel)
    "bad_mask_values",   # mask values outside 0..C and 255
    "size_mismatch",     # image, mask and saliency of one id differ in size
    "missing_label",     # id missing from cls_labels.npy
    "bad_label",         # label vector of the wrong length/values, unknown class name
    "bad_class_names",   # class_names.txt empty, duplicated or too long
    "invalid",           # anything else
)

#: File names and folders of the VOC layout.
IMAGE_EXT = ".jpg"
MASK_EXT = ".png"
SALIENCY_EXT = ".png"
SPLIT_DIR = "ImageSets/Segmentation"
ANNOTATION_DIR = "Annotations"
CLS_LABELS_FILE = "cls_labels.npy"
CLASS_NAMES_FILE = "class_names.txt"
#: Saliency PNG modes: grey, or RGB whose channels are averaged (the EPS reference reads
#: ``convert("RGB")`` and averages the channels).
SALIENCY_MODES = ("L", "RGB")
#: 8-bit saliency / image range (EPS reference: ``saliency / 255.``).
PIXEL_MAX = 255.0
#: Bump to invalidate every cached artifact keyed by :meth:`VOCLayout.fingerprint`.
FINGERPRINT_VERSION = 1

#: Exceptions PIL raises for files it cannot decode (truncated, not an image, too large).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """A dataset file is missing or not what was expected; the message names it.

    Attributes:
        file: Path of the offending file (empty when not about one file).
        kind: One of :data:`PROBLEM_KINDS`.
    """

    def __init__(self, message: str, *, file: str | Path = "", kind: str = "invalid") -> None:
        super().__init__(message)
        self.file = str(file)
        self.kind = kind


def _sizes_agree(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return tuple(a[:2]) == tuple(b[:2])


class VOCLayout:
    """Where the files of a VOC-format dataset are, and how to read them.

    Folder arguments are relative to ``root`` unless absolute. Readers return NumPy arrays and raise
    :class:`DataError` on any problem.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClassAug",
        saliency_dir: str = "SaliencyMaps",
        label_source: str = "cls_labels",
    ) -> None:
        if label_source not in LABEL_SOURCES:
            raise DataError(f"label_source {label_source!r}: expected one of {', '.join(LABEL_SOURCES)}",
                            kind="invalid")
        self.root = Path(root)
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir
        self.saliency_dir = self.root / saliency_dir
        self.label_source = label_source
        self._dir_names = {"image_dir": image_dir, "mask_dir": mask_dir, "saliency_dir": saliency_dir}
        self._class_names: tuple[str, ...] | None = None
        self._cls_labels: dict[str, Any] | None = None
        self._derived_labels: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig) -> VOCLayout:
        """Layout of ``cfg`` (a :class:`wsss_tune.config.DataConfig`)."""
        return cls(root=cfg.root, image_dir=cfg.image_dir, mask_dir=cfg.mask_dir,
                   saliency_dir=cfg.saliency_dir, label_source=cfg.label_source)

    def __repr__(self) -> str:
        return (f"VOCLayout(root={str(self.root)!r}, label_source={self.label_source!r}, "
                + ", ".join(f"{k}={v!r}" for k, v in self._dir_names.items()) + ")")

    # ---------------------------------------------------------------------------------------------
    # Classes and splits
    # ---------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        """Object class names (no background): ``<root>/class_names.txt`` if present, else VOC's 20."""
        if self._class_names is None:
            path = self.root / CLASS_NAMES_FILE
            if not path.is_file():
                self._class_names = VOC_CLASSES
            else:
                names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
                if not names:
                    raise DataError(f"{path}: no class names; expected one object class per line",
                                    file=path, kind="bad_class_names")
                if "background" in names:
                    raise DataError(f"{path}: lists 'background'; expected object classes only "
                                    "(background is label 0 implicitly)", file=path, kind="bad_class_names")
                dupes = sorted({n for n in names if names.count(n) > 1})
                if dupes:
                    raise DataError(f"{path}: duplicated class name(s) {', '.join(dupes)}",
                                    file=path, kind="bad_class_names")
                if len(names) >= IGNORE_INDEX:
                    raise DataError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX - 1} fit in "
                                    f"uint8 masks next to the ignore value {IGNORE_INDEX}",
                                    file=path, kind="bad_class_names")
                self._class_names = names
        return self._class_names

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (masks hold 0 = background, 1..C, 255 = ignore)."""
        return len(self.class_names)

    def split_file(self, name: str) -> Path:
        """The list file of split ``name``.

        Looks for ``<root>/ImageSets/Segmentation/<name>.txt``, then ``<root>/<name>.txt``; a name
        ending in ``.txt`` is taken as a path (relative to ``root`` unless absolute).
        """
        if name.endswith(".txt"):
            candidates = [self.root / name]
        else:
            candidates = [self.root / SPLIT_DIR / f"{name}.txt", self.root / f"{name}.txt"]
        for path in candidates:
            if path.is_file():
                return path
        where = " or ".join(str(p) for p in candidates)
        hint = "" if self.root.is_dir() else f" (the dataset root {self.root} does not exist)"
        raise DataError(f"split {name!r}: list file not found; looked for {where}{hint}",
                        file=candidates[0], kind="missing_split")

    def split_ids(self, name: str) -> list[str]:
        """Image ids of split ``name``, in file order.

        Accepts bare ids (``2007_000032``) and the two-column form
        ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``.
        """
        path = self.split_file(name)
        ids: list[str] = []
        seen: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) > 2:
                raise DataError(f"{path}:{lineno}: expected an id or 'image mask' paths, got {line.strip()!r}",
                                file=path, kind="bad_split")
            first = tokens[0]
            image_id = PurePosixPath(first).stem if ("/" in first or first.endswith(IMAGE_EXT)) else first
            if image_id in seen:
                raise DataError(f"{path}:{lineno}: id {image_id!r} repeats line {seen[image_id]}",
                                file=path, kind="bad_split")
            seen[image_id] = lineno
            ids.append(image_id)
        if not ids:
            raise DataError(f"{path}: split {name!r} lists no image ids", file=path, kind="empty_split")
        return ids

    # ---------------------------------------------------------------------------------------------
    # Paths
    # ---------------------------------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}{IMAGE_EXT}"

    def mask_path(self, image_id: str, mask_dir: str | Path | None = None) -> Path:
        """GT mask path, or the mask in ``mask_dir`` (absolute or relative to ``root``) if given."""
        folder = self.mask_dir if mask_dir is None else self.root / mask_dir
        return folder / f"{image_id}{MASK_EXT}"

    def saliency_path(self, image_id: str) -> Path:
        return self.saliency_dir / f"{image_id}{SALIENCY_EXT}"

    def annotation_path(self, image_id: str) -> Path:
        return self.root / ANNOTATION_DIR / f"{image_id}.xml"

    @property
    def cls_labels_path(self) -> Path:
        return self.root / CLS_LABELS_FILE

    # ---------------------------------------------------------------------------------------------
    # Readers
    # ---------------------------------------------------------------------------------------------

    def load_image(self, image_id: str) -> np.ndarray:
        """RGB image of ``image_id``.

        Shape:
            returns ``(H, W, 3)`` ``uint8``.
        """
        path = self.image_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: image not found (id {image_id!r})", file=path, kind="missing_file")
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except _IMAGE_ERRORS as exc:
            raise DataError(f"{path}: cannot decode image ({exc})", file=path, kind="unreadable") from None
        return np.array(rgb, dtype=np.uint8)

    def load_mask(self, image_id: str, mask_dir: str | Path | None = None) -> np.ndarray:
        """Label mask of ``image_id`` (GT, or from ``mask_dir`` such as a pseudo-mask folder).

        Values must be 0 (background), 1..C or 255 (ignore).

        Shape:
            returns ``(H, W)`` ``uint8``.
        """
        path = self.mask_path(image_id, mask_dir)
        mask = read_mask_png(path)
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes + 1] = True
        valid[IGNORE_INDEX] = True
        bad = ~valid[mask]
        if bad.any():
            values = np.unique(mask[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise DataError(f"{path}: mask values {shown} outside 0..{self.num_classes} and {IGNORE_INDEX} "
                            f"({bad.sum()} pixels; C = {self.num_classes} classes)",
                            file=path, kind="bad_mask_values")
        return mask

    def load_saliency(self, image_id: str) -> np.ndarray:
        """Saliency map of ``image_id`` in ``[0, 1]`` (PNG / 255, channels averaged if RGB).

        Shape:
            returns ``(H, W)`` ``float32``.
        """
        path = self.saliency_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: saliency map not found (id {image_id!r})", file=path, kind="missing_file")
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                arr = np.array(img) if mode in SALIENCY_MODES else None
        except _IMAGE_ERRORS as exc:
            raise DataError(f"{path}: cannot decode saliency map ({exc})", file=path, kind="unreadable") from None
        if arr is None:
            raise DataError(f"{path}: saliency map has PIL mode {mode!r}; expected 8-bit grey ('L') or 'RGB'",
                            file=path, kind="bad_mode")
        sal = arr.astype(np.float32)
        if sal.ndim == 3:
            sal = sal.mean(axis=2, dtype=np.float32)
        return sal / np.float32(PIXEL_MAX)

    def load_cls_labels(self) -> dict[str, Any]:
        """The reference label file ``cls_labels.npy``: a pickled dict id -> float32[C] (read once)."""
        if self._cls_labels is None:
            path = self.cls_labels_path
            if not path.is_file():
                raise DataError(f"{path}: label file not found (label_source 'cls_labels' expects a pickled "
                                "dict id -> float32[C]); use label_source 'annotations' or 'masks' otherwise",
                                file=path, kind="missing_file")
            try:
                labels = load_pickled_npy(path)
            except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
                raise DataError(f"{path}: cannot read label file ({exc})", file=path, kind="unreadable") from None
            if not isinstance(labels, dict):
                raise DataError(f"{path}: expected a pickled dict id -> float32[C], got {type(labels).__name__}",
                                file=path, kind="unreadable")
            self._cls_labels = labels
        return self._cls_labels

    def _check_label(self, vec: Any, image_id: str, path: Path) -> np.ndarray:
        arr = np.asarray(vec, dtype=np.float32).reshape(-1)
        if arr.shape != (self.num_classes,):
            raise DataError(f"{path}: label of {image_id!r} has {arr.size} entries; expected C = "
                            f"{self.num_classes} (one per class in class_names)", file=path, kind="bad_label")
        if not np.all((arr >= 0) & (arr <= 1)):
            raise DataError(f"{path}: label of {image_id!r} has values outside [0, 1]: {arr.tolist()}",
                            file=path, kind="bad_label")
        return arr.copy()

    def _labels_from_annotation(self, image_id: str) -> np.ndarray:
        path = self.annotation_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: annotation not found (label_source 'annotations')", file=path,
                            kind="missing_file")
        try:
            tree = ET.parse(path)
        except (ET.ParseError, OSError) as exc:
            raise DataError(f"{path}: cannot parse VOC XML ({exc})", file=path, kind="unreadable") from None
        index = {name: i for i, name in enumerate(self.class_names)}
        labels = np.zeros(self.num_classes, dtype=np.float32)
        # Like the reference label files, objects marked 'difficult' count as present.
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                raise DataError(f"{path}: object class {name!r} is not one of the dataset's classes "
                                f"({', '.join(self.class_names)})", file=path, kind="bad_label")
            labels[index[name]] = 1.0
        return labels

    def _labels_from_mask(self, image_id: str) -> np.ndarray:
        mask = self.load_mask(image_id)
        counts = np.bincount(mask.reshape(-1), minlength=256)
        return (counts[1 : self.num_classes + 1] > 0).astype(np.float32)

    def image_labels(self, image_id: str) -> np.ndarray:
        """Multi-hot image-level label of ``image_id`` from ``label_source``.

        Shape:
            returns ``(C,)`` ``float32``.
        """
        if self.label_source == "cls_labels":
            labels = self.load_cls_labels()
            if image_id not in labels:
                raise DataError(f"{self.cls_labels_path}: no label for id {image_id!r}", file=self.cls_labels_path,
                                kind="missing_label")
            return self._check_label(labels[image_id], image_id, self.cls_labels_path)
        if image_id not in self._derived_labels:
            if self.label_source == "annotations":
                self._derived_labels[image_id] = self._labels_from_annotation(image_id)
            else:
                self._derived_labels[image_id] = self._labels_from_mask(image_id)
        return self._derived_labels[image_id].copy()

    def require_labels(self, ids: Sequence[str]) -> None:
        """Raise :class:`DataError` now if ``cls_labels.npy`` lacks any of ``ids`` (cheap check; no-op
        for the other label sources, whose files are read lazily)."""
        if self.label_source != "cls_labels":
            return
        labels = self.load_cls_labels()
        missing = [i for i in ids if i not in labels]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{self.cls_labels_path}: no label for {len(missing)} id(s): {shown}",
                            file=self.cls_labels_path, kind="missing_label")

    # ---------------------------------------------------------------------------------------------
    # Cache key
    # ---------------------------------------------------------------------------------------------

    def fingerprint(self, splits: Sequence[str], *, masks: bool = True) -> str:
        """Cheap stable hash of the split ids, class names, labels and file sizes of ``splits``.

        Used as an artifact-cache key: it changes when an id is added or removed, a file changes size
        or appears/disappears, or the label file changes. It does not read image contents, and does not
        depend on where the dataset root is. ``masks=False`` leaves the ground-truth masks (their
        folder and files) out, for what never reads them (training on image labels); with
        ``label_source="masks"`` the masks are the labels and always count.
        """
        masks = masks or self.label_source == "masks"
        h = hashlib.sha256()
        dirs = self._dir_names if masks else {k: v for k, v in self._dir_names.items() if k != "mask_dir"}
        head = {"version": FINGERPRINT_VERSION, "classes": list(self.class_names),
                "label_source": self.label_source, "dirs": dirs}
        h.update(json.dumps(head, sort_keys=True).encode())

        def size(path: Path) -> int:
            try:
                return os.stat(path).st_size
            except OSError:
                return -1

        if self.label_source == "cls_labels":
            path = self.cls_labels_path
            h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"no-labels")
        for split in splits:
            ids = self.split_ids(split)
            h.update(f"\nsplit {split} {len(ids)}\n".encode())
            for image_id in ids:
                sizes = [size(self.image_path(image_id)), size(self.mask_path(image_id)) if masks else 0,
                         size(self.saliency_path(image_id))]
                if self.label_source == "annotations":
                    sizes.append(size(self.annotation_path(image_id)))
                h.update(f"{image_id} {' '.join(map(str, sizes))}\n".encode())
        return h.hexdigest()[:16]


# -------------------------------------------------------------------------------------------------
# Torch datasets
# -------------------------------------------------------------------------------------------------

#: A joint transform: NumPy sample (``image`` uint8 HxWx3, optional ``saliency`` float HxW, optional
#: ``mask`` uint8 HxW) and a per-sample generator -> tensors (see :mod:`wsss_tune.data.transforms`).
SampleTransform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, torch.Tensor]]


def _check_ids(ids: Sequence[str], where: str) -> list[str]:
    ids = list(ids)
    if not ids:
        raise DataError(f"{where}: no image ids given", kind="empty_split")
    bad = [i for i in ids if not isinstance(i, str)]
    if bad:
        raise DataError(f"{where}: ids must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    return ids


def _require_files(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} {what} file(s) not found: {shown}", file=missing[0], kind="missing_file")


def _check_same_size(image: np.ndarray, other: np.ndarray, image_path: Path, other_path: Path, what: str) -> None:
    if not _sizes_agree(image.shape, other.shape):
        raise DataError(f"{other_path}: {what} is {other.shape[1]}x{other.shape[0]} (WxH) but the image "
                        f"{image_path} is {image.shape[1]}x{image.shape[0]}", file=other_path, kind="size_mismatch")


class _SeededDataset(Dataset):
    """Base: per-sample random generators seeded from ``(seed, epoch, index)``.

    Augmentations therefore do not depend on the number of DataLoader workers or on which worker
    draws a sample. Call :meth:`set_epoch` before iterating an epoch (new workers copy the dataset
    when an iterator is created; persistent workers keep the epoch they were started with), or
    let a sampler pass its own generator to :meth:`get`.
    """

    def __init__(self, layout: VOCLayout, ids: Sequence[str], *, seed: int) -> None:
        self.layout = layout
        self.ids = _check_ids(ids, type(self).__name__)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, self.rng(index))

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Item ``index`` augmented with ``rng`` (for samplers that seed each draw themselves)."""
        raise NotImplementedError


class ClassificationDataset(_SeededDataset):
    """Images with image-level labels (and saliency maps) for the EPS classifier.

    Each item is ``{"image": float (3, h, w), "saliency": float (1, h, w), "label": float (C,),
    "id": str}`` (no ``saliency`` when ``with_saliency`` is false).
    """

    def __init__(
        self,
        layout: VOCLayout,
        ids: Sequence[str],
        *,
        transform: SampleTransform,
        with_saliency: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(layout, ids, seed=seed)
        self.transform = transform
        self.with_saliency = with_saliency
        _require_files([layout.image_path(i) for i in self.ids], "image")
        if with_saliency:
            _require_files([layout.saliency_path(i) for i in self.ids], "saliency")
        layout.require_labels(self.ids)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image_id = self.ids[index]
        sample = {"image": self.layout.load_image(image_id)}
        if self.with_saliency:
            sal = self.layout.load_saliency(image_id)
            _check_same_size(sample["image"], sal, self.layout.image_path(image_id),
                             self.layout.saliency_path(image_id), "saliency map")
            sample["saliency"] = sal
        out: dict[str, Any] = dict(self.transform(sample, rng))
        out["label"] = torch.from_numpy(self.layout.image_labels(image_id))
        out["id"] = image_id
        return out


class SegmentationDataset(_SeededDataset):
    """Images with label masks (GT, or pseudo masks from ``mask_dir``) for DeepLab and AffinityNet.

    Each item is ``{"image": float (3, h, w), "mask": long (h, w), "id": str}``.
    """

    def __init__(
        self,
        layout: VOCLayout,
        ids: Sequence[str],
        *,
        transform: SampleTransform,
        mask_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(layout, ids, seed=seed)
        self.transform = transform
        self.mask_dir = mask_dir
        _require_files([layout.image_path(i) for i in self.ids], "image")
        _require_files([layout.mask_path(i, mask_dir) for i in self.ids], "mask")

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        image_id = self.ids[index]
        image = self.layout.load_image(image_id)
        mask = self.layout.load_mask(image_id, self.mask_dir)
        _check_same_size(image, mask, self.layout.image_path(image_id),
                         self.layout.mask_path(image_id, self.mask_dir), "mask")
        out: dict[str, Any] = dict(self.transform({"image": image, "mask": mask}, rng))
        out["id"] = image_id
        return out


class ImageDataset(Dataset):
    """Raw images for inference: ``{"image": uint8 ndarray (H, W, 3), "id": str}``.

    Images differ in size; batch them with :func:`collate_raw`.
    """

    def __init__(self, layout: VOCLayout, ids: Sequence[str]) -> None:
        self.layout = layout
        self.ids = _check_ids(ids, type(self).__name__)
        _require_files([layout.image_path(i) for i in self.ids], "image")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        return {"image": self.layout.load_image(image_id), "id": image_id}


def collate_raw(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Collate items of different sizes into lists: ``{"image": [arr, ...], "id": [str, ...]}``."""
    if not batch:
        return {}
    return {key: [item[key] for item in batch] for key in batch[0]}
