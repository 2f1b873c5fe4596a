"""check_dataset: every failure kind is found, with its file, in one pass over a corrupted copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_tune.data import (
    ClassificationDataset,
    DataError,
    Problem,
    SegmentationDataset,
    VOCLayout,
    check_dataset,
    format_problems,
    save_mask_png,
    to_tensors,
)
from wsss_tune.data.check import WARNING_KINDS

SPLITS = ["train_aug", "train", "val"]


def _corrupt(root: Path) -> set[tuple[str, str]]:
    """Break one file per failure kind; return the expected (file name, kind) pairs."""
    layout = VOCLayout(root=root)
    train = layout.split_ids("train")
    val = layout.split_ids("val")
    expected: set[tuple[str, str]] = set()

    jpg = layout.image_path(train[1])
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])  # truncated JPEG
    expected.add((jpg.name, "unreadable"))

    layout.image_path(train[2]).unlink()
    expected.add((layout.image_path(train[2]).name, "missing_file"))

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(layout.saliency_path(train[3]))
    expected.add((layout.saliency_path(train[3]).name, "size_mismatch"))

    Image.fromarray(np.zeros((64, 64), np.uint16)).save(layout.saliency_path(train[4]))  # 16-bit
    expected.add((layout.saliency_path(train[4]).name, "bad_mode"))

    mask = layout.load_mask(train[5])
    mask[0, 0] = 9  # C = 5 classes: valid values are 0..5 and 255
    save_mask_png(layout.mask_path(train[5]), mask)
    expected.add((layout.mask_path(train[5]).name, "bad_mask_values"))

    save_mask_png(layout.mask_path(train[6]), np.zeros((64, 48), np.uint8))
    expected.add((layout.mask_path(train[6]).name, "size_mismatch"))

    labels = layout.load_cls_labels()
    del labels[train[7]]
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    expected.add(("cls_labels.npy", "missing_label"))

    layout.saliency_path(val[0]).unlink()
    expected.add((layout.saliency_path(val[0]).name, "missing_file"))
    layout.mask_path(val[1]).unlink()
    expected.add((layout.mask_path(val[1]).name, "missing_file"))

    (root / "ImageSets/Segmentation/empty.txt").write_text("\n")
    expected.add(("empty.txt", "empty_split"))
    expected.add(("nosuch.txt", "missing_split"))
    return expected


def test_clean_dataset_has_no_problems(synth_layout: VOCLayout) -> None:
    problems = check_dataset(synth_layout, SPLITS)
    assert problems == []
    assert format_problems(problems) == "no problems found"


def test_every_problem_kind_found_with_its_file(synth_copy: Path) -> None:
    expected = _corrupt(synth_copy)
    problems = check_dataset(VOCLayout(root=synth_copy), [*SPLITS, "empty", "nosuch"])
    found = {(Path(p.file).name, p.kind) for p in problems}
    assert found == expected
    assert len(problems) == len(expected)  # ids shared by train and train_aug are checked once
    for p in problems:
        assert Path(p.file).name in p.message

    text = format_problems(problems)
    assert text.startswith(f"{len(expected)} problem(s) found:")
    assert "size_mismatch (2):" in text and "missing_file (3):" in text
    short = format_problems(problems, limit=1)
    assert "... and 2 more" in short


def test_options_skip_saliency_and_masks(synth_copy: Path) -> None:
    _corrupt(synth_copy)
    problems = check_dataset(VOCLayout(root=synth_copy), SPLITS, saliency=False, masks_for=[])
    kinds = {p.kind for p in problems}
    assert kinds == {"unreadable", "missing_file", "missing_label"}
    assert {Path(p.file).parent.name for p in problems if p.kind == "missing_file"} == {"JPEGImages"}


def test_annotation_and_class_name_problems(synth_copy: Path) -> None:
    layout = VOCLayout(root=synth_copy, label_source="annotations")
    ids = layout.split_ids("val")
    layout.annotation_path(ids[0]).write_text("<annotation><object>")
    layout.annotation_path(ids[1]).write_text("<annotation><object><name>dragon</name></object></annotation>")
    found = {(Path(p.file).name, p.kind) for p in check_dataset(layout, ["val"])}
    assert found == {(f"{ids[0]}.xml", "unreadable"), (f"{ids[1]}.xml", "bad_label")}

    (synth_copy / "class_names.txt").write_text("disc\ndisc\n")
    problems = check_dataset(VOCLayout(root=synth_copy), ["val"])
    assert [(Path(p.file).name, p.kind) for p in problems] == [("class_names.txt", "bad_class_names")]
    assert "duplicated class name(s) disc" in problems[0].message


def test_loaders_raise_the_same_clear_error(synth_copy: Path) -> None:
    """What check_dataset reports is what a training run would hit, as a DataError naming the file."""
    _corrupt(synth_copy)
    layout = VOCLayout(root=synth_copy)
    train = layout.split_ids("train")
    problems = {Path(p.file).name: p for p in check_dataset(layout, ["train"])}

    cls_ds = ClassificationDataset(layout, [train[1], train[3]], transform=to_tensors)
    with pytest.raises(DataError) as err:
        cls_ds[0]  # truncated JPEG
    assert Problem.from_error(err.value) == problems[f"{train[1]}.jpg"]
    with pytest.raises(DataError, match="saliency map is 32x32 \\(WxH\\) but the image") as err:
        cls_ds[1]
    assert err.value.kind == "size_mismatch"

    seg_ds = SegmentationDataset(layout, [train[5]], transform=to_tensors)
    with pytest.raises(DataError, match="mask values 9 outside 0..5 and 255") as err:
        seg_ds[0]
    assert Problem.from_error(err.value) == problems[f"{train[5]}.png"]


# --------------------------------------------------------------------------------------------------
# warnings: images with no class at all
# --------------------------------------------------------------------------------------------------


def test_clean_dataset_has_no_warnings_either(synth_layout: VOCLayout) -> None:
    assert check_dataset(synth_layout, SPLITS, warnings=True) == []


def test_images_without_any_class_are_warnings_listing_the_ids(synth_copy: Path) -> None:
    """Two train images get an all-zero label vector in cls_labels.npy: with ``warnings=True`` each is a
    ``no_class`` warning naming its id; without it, and among the errors, nothing changes."""
    layout = VOCLayout(root=synth_copy)
    train = layout.split_ids("train")
    labels = layout.load_cls_labels()
    for image_id in train[:2]:
        labels[image_id] = np.zeros_like(labels[image_id])
    np.save(synth_copy / "cls_labels.npy", labels, allow_pickle=True)

    assert check_dataset(VOCLayout(root=synth_copy), SPLITS) == []  # a warning is no problem
    found = check_dataset(VOCLayout(root=synth_copy), SPLITS, warnings=True)
    assert [(p.kind, p.severity, Path(p.file).name) for p in found] == [("no_class", "warning", "cls_labels.npy")] * 2
    assert [p.message.split(":")[0] for p in found] == train[:2]  # ids shared by train and train_aug once
    assert set(WARNING_KINDS) == {"no_class"}

    text = format_problems(found)
    assert text.splitlines()[:3] == ["no problems found", "2 warning(s):", "no_class (2):"]
    assert all(image_id in text for image_id in train[:2])


def test_warnings_follow_the_errors_in_the_report(synth_copy: Path) -> None:
    layout = VOCLayout(root=synth_copy)
    val = layout.split_ids("val")
    labels = layout.load_cls_labels()
    labels[val[2]] = np.zeros_like(labels[val[2]])
    np.save(synth_copy / "cls_labels.npy", labels, allow_pickle=True)
    layout.mask_path(val[1]).unlink()
    found = check_dataset(VOCLayout(root=synth_copy), ["val"], warnings=True)
    assert sorted((p.kind, p.severity) for p in found) == [("missing_file", "error"), ("no_class", "warning")]
    lines = format_problems(found).splitlines()
    assert lines[0] == "1 problem(s) found:" and lines[1] == "missing_file (1):"
    assert lines[3:5] == ["1 warning(s):", "no_class (1):"] and lines[5].startswith(f"  {val[2]}: no class at all")


def test_no_class_from_masks_and_annotations_names_their_file(synth_copy: Path) -> None:
    """Labels derived from an all-background mask, or from an annotation without objects."""
    masks = VOCLayout(root=synth_copy, label_source="masks")
    image_id = masks.split_ids("val")[0]
    mask = masks.load_mask(image_id)
    save_mask_png(masks.mask_path(image_id), np.where(mask == 255, 255, 0).astype(np.uint8))
    found = check_dataset(VOCLayout(root=synth_copy, label_source="masks"), ["val"], saliency=False, warnings=True)
    assert [(p.kind, p.file) for p in found] == [("no_class", str(masks.mask_path(image_id)))]

    notes = VOCLayout(root=synth_copy, label_source="annotations")
    other = notes.split_ids("val")[1]
    notes.annotation_path(other).write_text("<annotation><filename>x.jpg</filename></annotation>")
    found = check_dataset(notes, ["val"], saliency=False, masks_for=[], warnings=True)
    assert [(p.kind, p.file) for p in found] == [("no_class", str(notes.annotation_path(other)))]
