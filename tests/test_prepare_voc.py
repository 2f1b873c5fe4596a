"""`prepare_voc` on miniature archives in the official formats (VOC 2012 tar, SBD tgz), and the errors."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from wsss_tune.data import VOCLayout, check_dataset, encode_mask_png, read_mask_png
from wsss_tune.data.prepare import (
    MARKER_FILE,
    OFFICIAL_COUNTS,
    SALIENCY_FROM_GT_DIR,
    PrepareError,
    SplitCounts,
    gt_saliency,
    make_saliency_from_gt,
    prepare_voc,
    verify_counts,
)
from wsss_tune.data.voc import VOC_CLASSES

#: Image size of every miniature image (W x H = 10 x 8).
H, W = 8, 10
#: VOC segmentation lists and SBD lists of the miniature sets, chosen so that every rule shows:
#: "b" is in VOC train and SBD train (VOC's mask wins), "c" is VOC val and SBD train (left out of
#: train_aug, VOC's mask wins), "e" and "f" exist only in SBD, "g" is a VOC image in no list.
VOC_TRAIN, VOC_VAL = ["2007_000a", "2007_000b"], ["2007_000c", "2007_000d"]
SBD_TRAIN, SBD_VAL = ["2007_000b", "2008_000e", "2007_000c"], ["2008_000f"]
VOC_IMAGES = VOC_TRAIN + VOC_VAL + ["2008_000e", "2008_000f", "2009_000g"]
#: train_aug = (VOC train | SBD train | SBD val) - VOC val = {a, b} | {b, e, c} | {f} - {c, d}.
TRAIN_AUG = ["2007_000a", "2007_000b", "2008_000e", "2008_000f"]
#: Class of each id's object (mask value = class index + 1); VOC and SBD disagree on purpose for "b", "c".
VOC_CLASS = {"2007_000a": "dog", "2007_000b": "cat", "2007_000c": "car", "2007_000d": "person"}
SBD_CLASS = {"2007_000b": "bird", "2008_000e": "horse", "2007_000c": "bus", "2008_000f": "train"}
XML_CLASSES = {**SBD_CLASS, **VOC_CLASS, "2009_000g": "sofa"}


def class_value(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


def object_mask(value: int, *, boundary: bool) -> np.ndarray:
    """An object in rows 2..5, columns 3..7; with ``boundary`` a 255 ring around it (VOC style)."""
    mask = np.zeros((H, W), np.uint8)
    if boundary:
        mask[1:7, 2:9] = 255
    mask[2:6, 3:8] = value
    return mask


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def xml_bytes(image_id: str, names: list[str]) -> bytes:
    objects = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
                      f"<difficult>0</difficult><bndbox><xmin>4</xmin><ymin>3</ymin><xmax>8</xmax>"
                      f"<ymax>6</ymax></bndbox></object>" for n in names)
    return (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size><segmented>1</segmented>{objects}</annotation>").encode()


def mat_bytes(mask: np.ndarray) -> bytes:
    """SBD's cls/<id>.mat: MATLAB struct GTcls with Segmentation (uint8), Boundaries, CategoriesPresent."""
    buf = io.BytesIO()
    present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
    savemat(buf, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros((20, 1), dtype=object),
                            "CategoriesPresent": present}})
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def voc_members() -> dict[str, bytes]:
    root = "VOCdevkit/VOC2012"
    m: dict[str, bytes] = {}
    for i in VOC_IMAGES:
        m[f"{root}/Annotations/{i}.xml"] = xml_bytes(i, [XML_CLASSES[i]])
    m[f"{root}/ImageSets/Main/train.txt"] = b"unrelated\n"
    m[f"{root}/ImageSets/Segmentation/train.txt"] = "".join(f"{i}\n" for i in VOC_TRAIN).encode()
    m[f"{root}/ImageSets/Segmentation/val.txt"] = "".join(f"{i}\n" for i in VOC_VAL).encode()
    m[f"{root}/ImageSets/Segmentation/trainval.txt"] = "".join(f"{i}\n" for i in VOC_TRAIN + VOC_VAL).encode()
    for k, i in enumerate(VOC_IMAGES):
        m[f"{root}/JPEGImages/{i}.jpg"] = jpeg_bytes(k)
    for i, name in VOC_CLASS.items():
        m[f"{root}/SegmentationClass/{i}.png"] = encode_mask_png(object_mask(class_value(name), boundary=True))
        m[f"{root}/SegmentationObject/{i}.png"] = encode_mask_png(object_mask(1, boundary=True))
    return m


def sbd_members() -> dict[str, bytes]:
    root = "benchmark_RELEASE/dataset"
    m: dict[str, bytes] = {"benchmark_RELEASE/benchmark_code_RELEASE/README": b"code\n"}
    for i, name in SBD_CLASS.items():
        m[f"{root}/cls/{i}.mat"] = mat_bytes(object_mask(class_value(name), boundary=False))
        m[f"{root}/inst/{i}.mat"] = b"not read"
        m[f"{root}/img/{i}.jpg"] = jpeg_bytes(100)
    m[f"{root}/train.txt"] = "".join(f"{i}\n" for i in SBD_TRAIN).encode()
    m[f"{root}/val.txt"] = "".join(f"{i}\n" for i in SBD_VAL).encode()
    return m


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            add(tar, name, data)
    return path


@pytest.fixture
def archives(tmp_path: Path) -> tuple[Path, Path]:
    voc = write_tar(tmp_path / "VOCtrainval_11-May-2012.tar", voc_members())
    sbd = write_tar(tmp_path / "benchmark.tgz", sbd_members(), "w:gz")
    return voc, sbd


def read_list(root: Path, name: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{name}.txt").read_text().split()


def test_prepare_from_archives(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """Lists: train_aug = (VOC train | SBD train | SBD val) - VOC val = a, b, e, f; train and val are VOC's.
    Masks: VOC's palette PNGs keep their indices (object value, 255 ring); "b" and "c" exist in both and
    keep VOC's class (cat, car), not SBD's (bird, bus); "e", "f" come from SBD's GTcls.Segmentation.
    Labels: one-hot of each image's XML object class, float32[20]. All seven JPEGs are copied."""
    voc, sbd = archives
    out = tmp_path / "VOC2012"
    report = prepare_voc(voc=voc, sbd=sbd, out=out, progress=False)

    assert read_list(out, "train_aug") == TRAIN_AUG
    assert read_list(out, "train") == VOC_TRAIN and read_list(out, "val") == VOC_VAL
    assert report.counts == SplitCounts(voc_train=2, voc_val=2, sbd_train=3, sbd_val=1, train_aug=4)
    assert not report.official and report.ok and not report.skipped
    assert report.files == {"images": 7, "annotations": 7, "voc_masks": 4, "sbd_masks": 2, "labels": 6,
                            "labels_from_masks": 0}
    # 7 images + 7 annotations + 4 VOC masks + 2 SBD masks
    assert report.written == 20

    for i, name in VOC_CLASS.items():
        np.testing.assert_array_equal(read_mask_png(out / "SegmentationClassAug" / f"{i}.png"),
                                      object_mask(class_value(name), boundary=True))
    for i in ("2008_000e", "2008_000f"):
        np.testing.assert_array_equal(read_mask_png(out / "SegmentationClassAug" / f"{i}.png"),
                                      object_mask(class_value(SBD_CLASS[i]), boundary=False))
    assert sorted(p.stem for p in (out / "SegmentationClassAug").iterdir()) == sorted(
        VOC_TRAIN + VOC_VAL + ["2008_000e", "2008_000f"])
    assert (out / "JPEGImages" / "2009_000g.jpg").read_bytes() == jpeg_bytes(VOC_IMAGES.index("2009_000g"))

    labels = np.load(out / "cls_labels.npy", allow_pickle=True).item()
    assert sorted(labels) == sorted(TRAIN_AUG + VOC_VAL)
    for i, vec in labels.items():
        expected = np.zeros(20, np.float32)
        expected[VOC_CLASSES.index(XML_CLASSES[i])] = 1
        assert vec.dtype == np.float32
        np.testing.assert_array_equal(vec, expected)

    assert check_dataset(VOCLayout(root=out), ["train_aug", "train", "val"], saliency=False) == []


def test_prepare_from_unpacked_folders_matches_archives(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """The same inputs unpacked (VOC given as the folder holding VOCdevkit, SBD as benchmark_RELEASE)
    give byte-identical lists, labels and masks."""
    voc, sbd = archives
    unpacked = tmp_path / "unpacked"
    for archive in (voc, sbd):
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    a = prepare_voc(voc=voc, sbd=sbd, out=tmp_path / "a", progress=False)
    b = prepare_voc(voc=unpacked, sbd=unpacked / "benchmark_RELEASE", out=tmp_path / "b", progress=False)
    assert a.counts == b.counts and a.files == b.files
    for rel in ["ImageSets/Segmentation/train_aug.txt", "cls_labels.npy",
                *(f"SegmentationClassAug/{i}.png" for i in TRAIN_AUG + VOC_VAL)]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_rerun_is_a_noop_and_an_interrupted_run_resumes(
    archives: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run on a complete output reads nothing and writes nothing (mtimes unchanged). A run killed
    at the second SBD conversion (SBD's b and c are skipped for VOC's masks, e is written, f dies)
    leaves 4 + 1 masks and no marker or labels; the next run keeps everything in place and writes
    only f's mask, and ends with the same files as an uninterrupted run."""
    voc, sbd = archives
    out = tmp_path / "out"
    prepare_voc(voc=voc, sbd=sbd, out=out, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = prepare_voc(voc=voc, sbd=sbd, out=out, progress=False)
    assert again.skipped and again.written == 0 and again.counts.train_aug == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    from wsss_tune.data import prepare as prepare_mod

    resumed = tmp_path / "resumed"
    real = prepare_mod._sbd_mask
    calls = {"n": 0}

    def dies_on_second(data: bytes, where: str) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(data, where)

    monkeypatch.setattr(prepare_mod, "_sbd_mask", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_voc(voc=voc, sbd=sbd, out=resumed, progress=False)
    assert not (resumed / MARKER_FILE).exists() and not (resumed / "cls_labels.npy").exists()
    assert len(list((resumed / "SegmentationClassAug").glob("*.png"))) == 5  # 4 VOC + 1 SBD
    monkeypatch.setattr(prepare_mod, "_sbd_mask", real)
    stale = resumed / "JPEGImages" / ".2007_000a.jpg.x1y2.tmp"  # left by a write killed with SIGKILL
    stale.write_bytes(b"half")
    report = prepare_voc(voc=voc, sbd=sbd, out=resumed, progress=False)
    assert report.written == 1  # the one SBD mask that was missing
    assert not list(resumed.rglob("*.tmp"))
    for rel in ["ImageSets/Segmentation/train_aug.txt", "cls_labels.npy",
                *(f"SegmentationClassAug/{i}.png" for i in TRAIN_AUG + VOC_VAL)]:
        assert (out / rel).read_bytes() == (resumed / rel).read_bytes(), rel


def test_voc_alone(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """Without SBD, train_aug is VOC train (a, b) and the report says so."""
    voc, _ = archives
    report = prepare_voc(voc=voc, sbd=None, out=tmp_path / "out", progress=False)
    assert read_list(tmp_path / "out", "train_aug") == VOC_TRAIN
    assert report.counts.train_aug == 2 and any("no SBD" in n for n in report.notes)


def test_progress_bar_runs(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """With the progress bar on (rich, not a terminal here) the result is the same."""
    voc, sbd = archives
    report = prepare_voc(voc=voc, sbd=sbd, out=tmp_path / "out", progress=True)
    assert report.counts.train_aug == 4


def test_cli_prepare_voc(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """The command prints the counts and exits 0; a wrong input exits 2 with the message."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    voc, sbd = archives
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "prepare-voc", "--voc", str(voc), "--sbd", str(sbd), "--out", str(out),
                                 "--no-progress", "--saliency-from-gt"])
    assert result.exit_code == 0, result.output
    assert "train_aug 4  train 2  val 2 ids" in result.output and "upper bound only" in result.output
    bad = runner.invoke(app, ["data", "prepare-voc", "--voc", str(sbd), "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2 and "expected members under VOCdevkit/VOC2012/" in bad.output


# ---- errors --------------------------------------------------------------------------------------


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"nothere\.tar: no such file or folder; expected VOCtrainval"):
        prepare_voc(voc=tmp_path / "nothere.tar", sbd=None, out=tmp_path / "out", progress=False)


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "VOCtrainval_11-May-2012.tar"
    bad.write_bytes(b"<html>404 not found</html>" * 40)
    with pytest.raises(PrepareError, match=r"VOCtrainval_11-May-2012\.tar: not a tar archive"):
        prepare_voc(voc=bad, sbd=None, out=tmp_path / "out", progress=False)


def test_wrong_archive_names_what_was_expected(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """SBD's archive given as VOC is refused at its first member; a VOC tar without JPEGImages is
    refused naming the folder."""
    voc, sbd = archives
    with pytest.raises(PrepareError, match=r"benchmark\.tgz: holds 'benchmark_RELEASE/.*expected members under "
                                           r"VOCdevkit/VOC2012/"):
        prepare_voc(voc=sbd, sbd=None, out=tmp_path / "out", progress=False)
    members = {k: v for k, v in voc_members().items() if "/JPEGImages/" not in k}
    no_images = write_tar(tmp_path / "noimg.tar", members)
    with pytest.raises(PrepareError, match=r"no VOCdevkit/VOC2012/JPEGImages in .*noimg\.tar"):
        prepare_voc(voc=no_images, sbd=None, out=tmp_path / "out2", progress=False)


@pytest.mark.parametrize("which", ["voc_mid_member", "voc_between_members", "sbd_gzip"])
def test_truncated_archive(archives: tuple[Path, Path], tmp_path: Path, which: str) -> None:
    """A download cut short is reported as truncated, naming the file: inside a member's data, exactly
    between two members of a plain tar (no end-of-archive blocks), or anywhere in a gzip stream."""
    voc, sbd = archives
    if which == "sbd_gzip":
        cut = tmp_path / "benchmark.tgz"
        data = sbd.read_bytes()
        shutil.move(sbd, tmp_path / "full.tgz")
        cut.write_bytes(data[: len(data) * 2 // 3])
        voc_in, sbd_in = voc, cut
    else:
        data = voc.read_bytes()
        with tarfile.open(voc) as tar:
            members = tar.getmembers()
        last = members[-1]
        # mid-member: inside the last member's data; between: right after the previous member ends
        size = last.offset_data + 3 if which == "voc_mid_member" else last.offset
        cut = tmp_path / "cut" / voc.name
        cut.parent.mkdir()
        cut.write_bytes(data[:size])
        voc_in, sbd_in = cut, sbd
    with pytest.raises(PrepareError, match=rf"{cut.name}: truncated or corrupt archive"):
        prepare_voc(voc=voc_in, sbd=sbd_in, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MARKER_FILE).exists()


def test_incomplete_input_lists_missing_ids(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """An id listed in SBD train whose cls/<id>.mat is absent has no mask: the error names it."""
    voc, _ = archives
    members = {k: v for k, v in sbd_members().items() if not k.endswith("cls/2008_000e.mat")}
    sbd = write_tar(tmp_path / "benchmark.tgz", members, "w:gz")
    with pytest.raises(PrepareError, match=r"1 id\(s\) of train_aug have no mask .*2008_000e"):
        prepare_voc(voc=voc, sbd=sbd, out=tmp_path / "out", progress=False)


def test_bad_sbd_mat(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """A .mat without the GTcls struct is named with its member path."""
    voc, _ = archives
    members = sbd_members()
    buf = io.BytesIO()
    savemat(buf, {"GTinst": {"Segmentation": np.zeros((H, W), np.uint8)}})
    members["benchmark_RELEASE/dataset/cls/2008_000e.mat"] = buf.getvalue()
    sbd = write_tar(tmp_path / "benchmark.tgz", members, "w:gz")
    with pytest.raises(PrepareError, match=r"benchmark\.tgz:benchmark_RELEASE/dataset/cls/2008_000e\.mat: "
                                           r"no 2-D GTcls\.Segmentation"):
        prepare_voc(voc=voc, sbd=sbd, out=tmp_path / "out", progress=False)


# ---- counts --------------------------------------------------------------------------------------


def test_verify_counts() -> None:
    """Official VOC list sizes (1,464 / 1,449) mark official inputs: then SBD's 8,498 / 2,857 and
    train_aug 10,582 must match (1,464 without SBD). Other sizes are a subset: nothing is checked."""
    assert verify_counts(OFFICIAL_COUNTS, with_sbd=True) == (True, [])
    short = SplitCounts(voc_train=1464, voc_val=1449, sbd_train=8498, sbd_val=2857, train_aug=10581)
    official, mismatches = verify_counts(short, with_sbd=True)
    assert official and mismatches == ["train_aug has 10,581 ids; the official sets give 10,582"]
    alone = SplitCounts(voc_train=1464, voc_val=1449, sbd_train=0, sbd_val=0, train_aug=1464)
    assert verify_counts(alone, with_sbd=False) == (True, [])
    assert verify_counts(SplitCounts(2, 2, 3, 1, 4), with_sbd=True) == (False, [])


# ---- saliency from GT ----------------------------------------------------------------------------


def test_gt_saliency_values() -> None:
    """One foreground pixel at the centre of a 13x13 mask, blurred with sigma 1.5 (kernel radius
    4 sigma = 6 px, so the edges do not matter): the centre keeps the 2-D kernel's centre weight
    1 / sum_k exp(-k^2 / 4.5) ** 2 = 1 / 3.7599^2 = 0.07074 -> 255 x 0.07074 = 18.04 -> 18.
    A 20x20 object: pixels more than 6 px inside it stay 255, background 6+ px away stays 0. The
    ignore value 255 counts as 0.5 -> 127.5 -> 128 in a uniform ignore area."""
    mask = np.zeros((13, 13), np.uint8)
    mask[6, 6] = 3
    assert gt_saliency(mask, num_classes=20)[6, 6] == 18
    big = np.zeros((40, 40), np.uint8)
    big[10:30, 10:30] = 5
    sal = gt_saliency(big, num_classes=20)
    assert sal[20, 20] == 255 and sal[2, 2] == 0
    assert gt_saliency(np.full((5, 5), 255, np.uint8), num_classes=20)[2, 2] == 128


def test_saliency_from_gt(archives: tuple[Path, Path], tmp_path: Path) -> None:
    """`--saliency-from-gt` writes one grey map per listed id into SaliencyFromGT; the result passes
    the saliency checks; a folder name that hides where the maps come from is refused."""
    voc, sbd = archives
    out = tmp_path / "out"
    report = prepare_voc(voc=voc, sbd=sbd, out=out, progress=False, saliency_from_gt=True)
    assert report.saliency_dir == str(out / SALIENCY_FROM_GT_DIR)
    maps = sorted(p.stem for p in (out / SALIENCY_FROM_GT_DIR).glob("*.png"))
    assert maps == sorted(TRAIN_AUG + VOC_VAL)
    with Image.open(out / SALIENCY_FROM_GT_DIR / "2007_000a.png") as img:
        assert img.mode == "L" and img.size == (W, H)
    layout = VOCLayout(root=out, saliency_dir=SALIENCY_FROM_GT_DIR)
    assert check_dataset(layout, ["train_aug", "val"]) == []
    assert make_saliency_from_gt(layout, out / SALIENCY_FROM_GT_DIR) == 0  # all there already
    with pytest.raises(ValueError, match="must say the maps come from the ground truth"):
        make_saliency_from_gt(layout, out / "SALImages")
    assert not os.path.exists(out / "SALImages")
