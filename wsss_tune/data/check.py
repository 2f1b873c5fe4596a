"""Dataset validation: read every file a run will need and report all problems at once.

The checks reuse the readers of :class:`~wsss_tune.data.voc.VOCLayout`, so a problem found here is
the same :class:`~wsss_tune.data.voc.DataError` a training run would raise; here it is collected as a
:class:`Problem` instead of stopping at the first one.

Warnings are findings a run survives but its user should know of (:data:`WARNING_KINDS`): an image
whose label vector is all zero trains as pure background and is silently useless to a weakly
supervised method. They are reported only when asked for (``check_dataset(..., warnings=True)``), as
problems with ``severity == "warning"``, so that "no problems" still means an empty list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from wsss_tune.data.voc import DataError, VOCLayout

__all__ = ["Problem", "WARNING_KINDS", "check_dataset", "format_problems"]

#: Problems listed per kind by :func:`format_problems` before the rest are counted.
DEFAULT_SHOWN_PER_KIND = 20
#: Kinds of warning :func:`check_dataset` reports with ``warnings=True``.
WARNING_KINDS = (
    "no_class",  # an image whose label vector is all zero: no class at all, pure background
)


@dataclass(frozen=True)
class Problem:
    """One problem with one file. ``kind`` is one of :data:`wsss_tune.data.voc.PROBLEM_KINDS` for an
    error, of :data:`WARNING_KINDS` for a warning (``severity == "warning"``)."""

    file: str
    kind: str
    message: str
    severity: Literal["error", "warning"] = "error"

    @classmethod
    def from_error(cls, exc: DataError) -> Problem:
        return cls(file=exc.file, kind=exc.kind, message=str(exc))


def _size_problem(what: str, path: Path, shape: tuple[int, ...], image_path: Path,
                  image_shape: tuple[int, ...]) -> Problem:
    return Problem(str(path), "size_mismatch",
                   f"{path}: {what} is {shape[1]}x{shape[0]} (WxH) but the image {image_path} is "
                   f"{image_shape[1]}x{image_shape[0]}")


def check_dataset(
    layout: VOCLayout,
    splits: Sequence[str],
    *,
    saliency: bool = True,
    masks_for: Sequence[str] | None = None,
    warnings: bool = False,
) -> list[Problem]:
    """Read every image, saliency map, mask and label of ``splits`` and report every problem.

    Detects missing or empty split files, missing files, unreadable or truncated images, mask
    values outside 0..C and 255, image/mask/saliency size mismatches, saliency maps of the wrong
    mode, and ids missing from the label file. With ``warnings``, also reports (as warnings) the
    images whose label vector is all zero.

    Args:
        layout: The dataset.
        splits: Split names to check (e.g. ``["train_aug", "train", "val"]``).
        saliency: Also check saliency maps (EPS needs them for its training split).
        masks_for: Splits whose ground-truth masks must exist (those scored against GT); default all
            of ``splits``. With ``label_source="masks"`` masks are always checked.
        warnings: Also report :data:`WARNING_KINDS` (``severity == "warning"``); a caller that fails on
            problems should fail on the errors only.

    Returns:
        Problems in the order found (empty when the dataset is fine).
    """
    problems: list[Problem] = []

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DataError as exc:
            problems.append(Problem.from_error(exc))
            return None

    mask_splits = list(splits) if masks_for is None else list(masks_for)
    ids_by_split: dict[str, list[str]] = {}
    for split in dict.fromkeys([*splits, *mask_splits]):
        ids = attempt(partial(layout.split_ids, split))
        if ids is not None:
            ids_by_split[split] = ids

    if attempt(lambda: layout.class_names) is None:
        return problems  # without the class list neither masks nor labels can be judged
    labels_ok = True
    if layout.label_source == "cls_labels":
        labels_ok = attempt(layout.load_cls_labels) is not None

    need_mask = layout.label_source == "masks"
    checked_image: dict[str, tuple[int, ...] | None] = {}
    checked_mask: set[str] = set()
    for split, ids in ids_by_split.items():
        want_mask = need_mask or split in mask_splits
        for image_id in ids:
            if image_id not in checked_image:
                img = attempt(partial(layout.load_image, image_id))
                checked_image[image_id] = None if img is None else img.shape
                if saliency:
                    sal = attempt(partial(layout.load_saliency, image_id))
                    if img is not None and sal is not None and sal.shape != img.shape[:2]:
                        problems.append(_size_problem("saliency map", layout.saliency_path(image_id), sal.shape,
                                                      layout.image_path(image_id), img.shape))
                if labels_ok and layout.label_source != "masks":
                    labels = attempt(partial(layout.image_labels, image_id))
                    if warnings and labels is not None and not labels.any():
                        problems.append(_no_class(layout, image_id))
            if want_mask and image_id not in checked_mask:
                checked_mask.add(image_id)
                mask = attempt(partial(layout.load_mask, image_id))
                shape = checked_image[image_id]
                if mask is not None and shape is not None and mask.shape != shape[:2]:
                    problems.append(_size_problem("mask", layout.mask_path(image_id), mask.shape,
                                                  layout.image_path(image_id), shape))
                if warnings and need_mask and mask is not None and not layout.image_labels(image_id).any():
                    problems.append(_no_class(layout, image_id))
    return problems


def _no_class(layout: VOCLayout, image_id: str) -> Problem:
    """Warning: ``image_id``'s label vector (from ``layout.label_source``) has no class at all."""
    source = layout.label_source
    path = (layout.cls_labels_path if source == "cls_labels"
            else layout.annotation_path(image_id) if source == "annotations" else layout.mask_path(image_id))
    return Problem(str(path), "no_class", f"{image_id}: no class at all (its label vector from {path} is all zero); "
                   "it trains as pure background", severity="warning")


def format_problems(problems: Sequence[Problem], *, limit: int | None = DEFAULT_SHOWN_PER_KIND) -> str:
    """Human-readable report grouped by kind, errors first, then warnings; at most ``limit`` lines per
    kind (None = all)."""
    errors = [p for p in problems if p.severity != "warning"]
    warned = [p for p in problems if p.severity == "warning"]
    lines = [f"{len(errors)} problem(s) found:" if errors else "no problems found"]
    lines += _grouped(errors, limit)
    if warned:
        lines.append(f"{len(warned)} warning(s):")
        lines += _grouped(warned, limit)
    return "\n".join(lines)


def _grouped(problems: Sequence[Problem], limit: int | None) -> list[str]:
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for kind, items in by_kind.items():
        lines.append(f"{kind} ({len(items)}):")
        shown = items if limit is None else items[:limit]
        lines += [f"  {p.message}" for p in shown]
        if len(shown) < len(items):
            lines.append(f"  ... and {len(items) - len(shown)} more")
    return lines
