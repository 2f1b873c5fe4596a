"""VOC-format reader, label sources, mask/palette files and the torch datasets."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wsss_tune.config import DataConfig
from wsss_tune.data import (
    IGNORE_INDEX,
    VOC_CLASSES,
    ClassificationDataset,
    DataError,
    ImageDataset,
    SegmentationDataset,
    TrainTransform,
    VOCLayout,
    collate_raw,
    colorize,
    read_mask_png,
    save_mask_png,
    to_tensors,
    voc_palette,
)

# --------------------------------------------------------------------------------------------------
# A hand-made 2-image dataset with known contents
# --------------------------------------------------------------------------------------------------


def _write_xml(path: Path, objects: list[tuple[str, int]]) -> None:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>x.jpg</filename>{objs}</annotation>")


@pytest.fixture
def hand_root(tmp_path: Path) -> Path:
    """VOC layout without class_names.txt (so the 20 VOC classes apply), two 4x6 images."""
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClassAug", "SaliencyMaps", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for image_id in ("a", "b"):
        Image.fromarray(np.full((4, 6, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(np.zeros((4, 6), np.uint8)).save(root / "SaliencyMaps" / f"{image_id}.png")
    # a: background, class 2 (bicycle) and ignore; b: class 20 (tvmonitor) and class 15 (person).
    mask_a = np.array([[0, 0, 2, 2, 255, 0]] * 4, np.uint8)
    mask_b = np.array([[20, 20, 15, 0, 0, 0]] * 4, np.uint8)
    save_mask_png(root / "SegmentationClassAug" / "a.png", mask_a)
    Image.fromarray(mask_b).save(root / "SegmentationClassAug" / "b.png")  # plain grey 'L' PNG
    _write_xml(root / "Annotations" / "a.xml", [("bicycle", 0)])
    _write_xml(root / "Annotations" / "b.xml", [("tvmonitor", 0), ("person", 1)])  # difficult person
    labels = {"a": np.eye(20, dtype=np.float32)[1], "b": np.eye(20, dtype=np.float32)[[14, 19]].sum(0)}
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    return root


def test_voc_class_list_is_the_reference_order() -> None:
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person" and VOC_CLASSES[-1] == "tvmonitor"
    assert IGNORE_INDEX == 255


def test_all_three_label_sources_on_hand_dataset(hand_root: Path) -> None:
    """a: mask {0, 2, 255} and XML 'bicycle' -> only index 1 (bicycle is class 2 in masks, 0-based 1).
    b: mask {20, 15, 0}, XML tvmonitor + a 'difficult' person (counts as present) -> indices 14, 19.
    cls_labels.npy holds the same vectors; all three sources must agree."""
    expected = {"a": {1}, "b": {14, 19}}
    for source in ("cls_labels", "annotations", "masks"):
        layout = VOCLayout(root=hand_root, label_source=source)
        assert layout.num_classes == 20 and layout.class_names == VOC_CLASSES
        for image_id, idx in expected.items():
            lab = layout.image_labels(image_id)
            assert lab.dtype == np.float32 and lab.shape == (20,)
            assert set(np.nonzero(lab)[0].tolist()) == idx, (source, image_id)


def test_label_errors_name_file_and_id(hand_root: Path) -> None:
    layout = VOCLayout(root=hand_root)
    with pytest.raises(DataError, match="no label for id 'zzz'") as err:
        layout.image_labels("zzz")
    assert err.value.kind == "missing_label" and err.value.file.endswith("cls_labels.npy")

    _write_xml(hand_root / "Annotations" / "a.xml", [("unicorn", 0)])
    with pytest.raises(DataError, match="unicorn") as err:
        VOCLayout(root=hand_root, label_source="annotations").image_labels("a")
    assert err.value.kind == "bad_label" and err.value.file.endswith("a.xml")

    np.save(hand_root / "cls_labels.npy", {"a": np.ones(5, np.float32)}, allow_pickle=True)
    with pytest.raises(DataError, match="5 entries; expected C = 20"):
        VOCLayout(root=hand_root).image_labels("a")

    with pytest.raises(DataError, match="label_source 'bogus'"):
        VOCLayout(root=hand_root, label_source="bogus")


def test_mask_modes_and_values(hand_root: Path) -> None:
    layout = VOCLayout(root=hand_root)
    assert layout.load_mask("a")[0].tolist() == [0, 0, 2, 2, 255, 0]  # palette 'P' file
    assert layout.load_mask("b")[0].tolist() == [20, 20, 15, 0, 0, 0]  # grey 'L' file
    # 21 is outside 0..20 for the 20 VOC classes.
    Image.fromarray(np.full((4, 6), 21, np.uint8)).save(hand_root / "SegmentationClassAug" / "a.png")
    with pytest.raises(DataError, match="mask values 21 outside 0..20") as err:
        layout.load_mask("a")
    assert err.value.kind == "bad_mask_values" and err.value.file.endswith("a.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(hand_root / "SegmentationClassAug" / "a.png")
    with pytest.raises(DataError, match="mode 'RGB'") as err:
        layout.load_mask("a")
    assert err.value.kind == "bad_mode"


def test_saliency_rgb_is_channel_mean_over_255(hand_root: Path) -> None:
    """Pixel (30, 60, 90): mean 60, so 60 / 255 = 0.235294...; grey 255 -> 1.0."""
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = (30, 60, 90)
    rgb[1, 1] = (255, 255, 255)
    Image.fromarray(rgb).save(hand_root / "SaliencyMaps" / "a.png")
    sal = VOCLayout(root=hand_root).load_saliency("a")
    assert sal.dtype == np.float32 and sal.shape == (4, 6)
    assert sal[0, 0] == pytest.approx(60 / 255) and sal[1, 1] == pytest.approx(1.0) and sal[2, 2] == 0.0
    Image.fromarray(np.zeros((4, 6), np.uint16)).save(hand_root / "SaliencyMaps" / "a.png")  # 16-bit
    with pytest.raises(DataError, match="mode 'I"):
        VOCLayout(root=hand_root).load_saliency("a")


def test_split_list_formats_and_lookup_order(hand_root: Path) -> None:
    layout = VOCLayout(root=hand_root)
    assert layout.split_ids("train") == ["a", "b"]
    # Two-column form at the root (the PSA/EPS reference lists).
    (hand_root / "pairs.txt").write_text("/JPEGImages/b.jpg /SegmentationClassAug/b.png\n\n"
                                         "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n")
    assert layout.split_ids("pairs") == ["b", "a"]
    # ImageSets/Segmentation wins over the root.
    (hand_root / "train.txt").write_text("b\n")
    assert layout.split_ids("train") == ["a", "b"]
    with pytest.raises(DataError, match="nope.txt") as err:
        layout.split_ids("nope")
    assert err.value.kind == "missing_split"
    (hand_root / "ImageSets/Segmentation/empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="lists no image ids") as err:
        layout.split_ids("empty")
    assert err.value.kind == "empty_split"
    (hand_root / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="dup.txt:3: id 'a' repeats line 1"):
        layout.split_ids("dup")


def test_reader_on_synthetic_dataset(synth_layout: VOCLayout, synth_settings: dict) -> None:
    layout = synth_layout
    assert layout.class_names == ("disc", "square", "cross", "boat", "train")
    assert layout.num_classes == synth_settings["num_classes"]
    train_aug, train, val = (layout.split_ids(s) for s in ("train_aug", "train", "val"))
    assert len(train_aug) == synth_settings["n_train"] and len(val) == synth_settings["n_val"]
    assert set(train) <= set(train_aug) and not set(val) & set(train_aug)
    size = synth_settings["image_size"]
    image_id = train[0]
    img, mask, sal = layout.load_image(image_id), layout.load_mask(image_id), layout.load_saliency(image_id)
    assert img.dtype == np.uint8 and img.shape == (size, size, 3)
    assert mask.dtype == np.uint8 and mask.shape == (size, size)
    assert sal.dtype == np.float32 and sal.shape == (size, size) and 0.0 <= sal.min() <= sal.max() <= 1.0
    for source in ("annotations", "masks"):
        other = VOCLayout(root=layout.root, label_source=source)
        for i in train:
            np.testing.assert_array_equal(other.image_labels(i), layout.image_labels(i))


def test_from_config_and_mask_dir(synth_root: Path, tmp_path: Path) -> None:
    sal_abs = tmp_path / "elsewhere"
    cfg = DataConfig(root=str(synth_root), saliency_dir=str(sal_abs), label_source="masks")
    layout = VOCLayout.from_config(cfg)
    assert layout.saliency_path("x") == sal_abs / "x.png"
    assert layout.image_path("x") == synth_root / "JPEGImages" / "x.jpg"
    assert layout.label_source == "masks"
    # Pseudo-mask folder, relative to the root or absolute.
    pseudo = np.zeros((3, 5), np.uint8)
    pseudo[1, 2] = 4
    save_mask_png(tmp_path / "pseudo" / "x.png", pseudo)
    np.testing.assert_array_equal(layout.load_mask("x", mask_dir=tmp_path / "pseudo"), pseudo)
    assert layout.mask_path("x", "pseudo") == synth_root / "pseudo" / "x.png"


def test_mask_png_roundtrip_and_palette(tmp_path: Path) -> None:
    """VOC colour map (devkit bit rule): index 1 -> bit0 of R set in the top bit -> (128, 0, 0);
    2 -> (0, 128, 0); 15 = 0b1111: bits 0-2 -> (128,128,128), bit 3 -> R += 64 -> (192, 128, 128);
    255 -> (224, 224, 192)."""
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]
    mask = np.array([[0, 1, 2], [15, 255, 20]], np.uint8)
    path = tmp_path / "m" / "mask.png"
    save_mask_png(path, mask)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(read_mask_png(path), mask)
    np.testing.assert_array_equal(colorize(mask)[1, 0], [192, 128, 128])
    with pytest.raises(DataError, match="0..255"):
        save_mask_png(path, np.array([[300]]))
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp files


def test_fingerprint_tracks_ids_and_sizes(synth_copy: Path, tmp_path: Path) -> None:
    layout = VOCLayout(root=synth_copy)
    fp = layout.fingerprint(["train_aug", "val"])
    assert fp == VOCLayout(root=synth_copy).fingerprint(["train_aug", "val"])
    moved = tmp_path / "moved"
    shutil.copytree(synth_copy, moved)
    assert VOCLayout(root=moved).fingerprint(["train_aug", "val"]) == fp  # location-independent
    assert layout.fingerprint(["train"]) != fp

    sal = layout.saliency_path(layout.split_ids("val")[0])
    sal.write_bytes(sal.read_bytes() + b"\0")  # same file, one byte longer
    fp_sal = VOCLayout(root=synth_copy).fingerprint(["train_aug", "val"])
    assert fp_sal != fp

    split = synth_copy / "ImageSets/Segmentation/val.txt"
    split.write_text(split.read_text() + "train_00000\n")
    assert VOCLayout(root=synth_copy).fingerprint(["train_aug", "val"]) != fp_sal


def test_data_error_pickles_with_file_and_kind() -> None:
    err = pickle.loads(pickle.dumps(DataError("x.png: bad", file="x.png", kind="bad_mode")))
    assert str(err) == "x.png: bad" and err.file == "x.png" and err.kind == "bad_mode"


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def test_classification_dataset_items(synth_layout: VOCLayout) -> None:
    ids = synth_layout.split_ids("train")
    ds = ClassificationDataset(synth_layout, ids, transform=TrainTransform(crop_size=48, resize_long=(40, 80),
                                                                           jitter=(0.3, 0.3, 0.3, 0.1)))
    item = ds[0]
    assert item["id"] == ids[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert item["saliency"].shape == (1, 48, 48) and item["saliency"].dtype == torch.float32
    assert item["label"].shape == (5,) and item["label"].dtype == torch.float32
    np.testing.assert_array_equal(item["label"].numpy(), synth_layout.image_labels(ids[0]))
    no_sal = ClassificationDataset(synth_layout, ids, transform=to_tensors, with_saliency=False)[0]
    assert "saliency" not in no_sal and no_sal["image"].shape == (3, 64, 64)


def test_augmentation_is_per_sample_and_worker_independent(synth_layout: VOCLayout) -> None:
    """Each sample's generator is seeded by (seed, epoch, index): direct indexing, a 0-worker and a
    2-worker loader give identical tensors; a new epoch gives different crops; ``get`` takes the
    generator from the caller."""
    ids = synth_layout.split_ids("train")[:4]
    ds = ClassificationDataset(synth_layout, ids, transform=TrainTransform(crop_size=40, resize_long=(40, 80)), seed=3)
    direct = torch.stack([ds[i]["image"] for i in range(len(ds))])
    for workers in (0, 2):
        batch = next(iter(DataLoader(ds, batch_size=4, num_workers=workers)))
        torch.testing.assert_close(batch["image"], direct, rtol=0, atol=0)
        assert batch["id"] == ids
    ds.set_epoch(1)
    assert not torch.equal(torch.stack([ds[i]["image"] for i in range(len(ds))]), direct)
    # A sampler may pass its own generator: get(i, rng) with the (seed, epoch, i) generator is ds[i].
    assert torch.equal(ds.get(2, np.random.default_rng([3, 1, 2]))["image"], ds[2]["image"])


def test_segmentation_and_image_datasets(synth_layout: VOCLayout, synth_root: Path) -> None:
    ids = synth_layout.split_ids("val")[:2]
    seg = SegmentationDataset(synth_layout, ids, transform=TrainTransform(crop_size=80, scales=(1.0,)))
    item = seg[0]
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (80, 80)
    assert item["mask"][64:, :].eq(IGNORE_INDEX).all()  # padded below the 64-pixel image
    values = set(item["mask"].unique().tolist())
    assert values <= set(range(6)) | {IGNORE_INDEX}

    raw = ImageDataset(synth_layout, ids)
    batch = next(iter(DataLoader(raw, batch_size=1, collate_fn=collate_raw)))
    assert batch["id"] == [ids[0]]
    assert isinstance(batch["image"][0], np.ndarray) and batch["image"][0].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][0], synth_layout.load_image(ids[0]))


def test_datasets_fail_early_with_clear_errors(synth_copy: Path) -> None:
    layout = VOCLayout(root=synth_copy)
    ids = layout.split_ids("train")
    (synth_copy / "JPEGImages" / f"{ids[1]}.jpg").unlink()
    with pytest.raises(DataError, match=f"1 image file\\(s\\) not found: .*{ids[1]}.jpg") as err:
        ClassificationDataset(layout, ids, transform=to_tensors)
    assert err.value.kind == "missing_file"

    # An image without an entry in cls_labels.npy is reported at construction, not in a worker.
    shutil.copy(layout.image_path(ids[0]), layout.image_path("ghost"))
    with pytest.raises(DataError, match="no label for 1 id\\(s\\): 'ghost'") as err:
        ClassificationDataset(layout, [ids[0], "ghost"], transform=to_tensors, with_saliency=False)
    assert err.value.kind == "missing_label"
    with pytest.raises(DataError, match="no image ids"):
        SegmentationDataset(layout, [], transform=to_tensors)


def test_fingerprint_without_masks_ignores_the_ground_truth(synth_copy: Path) -> None:
    """``masks=False`` (what image-label training reads): a GT mask that changes, or another mask
    folder, leaves it as it was; the default fingerprint changes. With ``label_source="masks"`` the
    masks are the labels and always count."""
    layout = VOCLayout(root=synth_copy)
    split = ["train_aug"]
    no_masks, full = layout.fingerprint(split, masks=False), layout.fingerprint(split)
    mask = layout.mask_path(layout.split_ids("train_aug")[0])
    mask.write_bytes(mask.read_bytes() + b"\0")
    layout = VOCLayout(root=synth_copy)
    assert layout.fingerprint(split, masks=False) == no_masks
    assert layout.fingerprint(split) != full
    other_dir = VOCLayout(root=synth_copy, mask_dir="Elsewhere")
    assert other_dir.fingerprint(split, masks=False) == no_masks
    by_masks = VOCLayout(root=synth_copy, label_source="masks")
    assert by_masks.fingerprint(split, masks=False) == by_masks.fingerprint(split)
