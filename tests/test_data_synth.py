"""Synthetic VOC generator: determinism, idempotence, and agreement of masks, labels, XML, saliency."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from wsss_tune.data import SYNTH_PRESETS, DataError, VOCLayout, generate_synthetic_voc
from wsss_tune.data.synth import SYNTH_CLASSES, render_image

#: A dataset small enough to generate several times per test.
SMALL = {"n_train": 6, "n_mask_eval": 2, "n_val": 2, "image_size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_presets() -> None:
    assert set(SYNTH_PRESETS) >= {"default", "hard", "tiny"}
    d = SYNTH_PRESETS["default"]
    assert (d["image_size"], d["num_classes"], d["n_train"], d["cooccur"]) == (96, 5, 600, 0.4)
    assert SYNTH_PRESETS["hard"]["cooccur"] >= 0.95
    assert SYNTH_PRESETS["tiny"]["n_train"] <= 32


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_synthetic_voc(tmp_path / "a", seed=7, **SMALL))
    b = _files(generate_synthetic_voc(tmp_path / "b", seed=7, **SMALL))
    c = _files(generate_synthetic_voc(tmp_path / "c", seed=8, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/train_00000.jpg"] != c["JPEGImages/train_00000.jpg"]
    # 6 + 2 ids, each with image, mask, saliency and annotation.
    assert sum(k.startswith("JPEGImages/") for k in a) == 8
    assert sum(k.startswith("Annotations/") for k in a) == 8


def test_val_images_do_not_depend_on_train_size(tmp_path: Path) -> None:
    """Each image has its own generator seeded by (seed, split, index)."""
    a = generate_synthetic_voc(tmp_path / "a", **SMALL)
    b = generate_synthetic_voc(tmp_path / "b", **{**SMALL, "n_train": 3, "n_mask_eval": 1})
    assert (a / "JPEGImages/val_00001.jpg").read_bytes() == (b / "JPEGImages/val_00001.jpg").read_bytes()


def test_idempotent_and_protective(tmp_path: Path) -> None:
    out = generate_synthetic_voc(tmp_path / "d", **SMALL)
    stamp = os.stat(out / "synth.json").st_mtime_ns
    assert generate_synthetic_voc(out, **SMALL) == out
    assert os.stat(out / "synth.json").st_mtime_ns == stamp  # complete with same settings: untouched

    with pytest.raises(DataError, match="other settings"):
        generate_synthetic_voc(out, **{**SMALL, "cooccur": 0.9})
    generate_synthetic_voc(out, **{**SMALL, "cooccur": 0.9}, overwrite=True)
    assert json.loads((out / "synth.json").read_text())["settings"]["cooccur"] == 0.9

    (out / "SaliencyMaps/val_00000.png").unlink()  # incomplete, ours: rebuilt silently
    generate_synthetic_voc(out, **{**SMALL, "cooccur": 0.9})
    assert (out / "SaliencyMaps/val_00000.png").is_file()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        generate_synthetic_voc(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no partial output left


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="n_mask_eval=9"):
        generate_synthetic_voc("unused", n_train=4, n_mask_eval=9)
    with pytest.raises(ValueError, match=f"num_classes=99; expected between 1 and {len(SYNTH_CLASSES)}"):
        generate_synthetic_voc("unused", num_classes=99)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate_synthetic_voc("unused", preset="huge")


def test_layout_and_splits(synth_root: Path, synth_settings: dict) -> None:
    layout = VOCLayout(root=synth_root)
    assert (synth_root / "class_names.txt").read_text().split() == list(SYNTH_CLASSES[: synth_settings["num_classes"]])
    train_aug, train, val = (layout.split_ids(s) for s in ("train_aug", "train", "val"))
    assert len(train_aug) == synth_settings["n_train"] and len(train) == synth_settings["n_mask_eval"]
    assert set(train) < set(train_aug) and not set(val) & set(train_aug)
    labels = layout.load_cls_labels()
    assert set(labels) == set(train_aug) | set(val)
    assert all(v.dtype == np.float32 and v.shape == (synth_settings["num_classes"],) for v in labels.values())
    record = json.loads((synth_root / "synth.json").read_text())
    assert record["settings"]["image_size"] == synth_settings["image_size"]


def test_masks_labels_annotations_and_saliency_agree(synth_root: Path) -> None:
    """Per image: labels == classes present in the mask == object names in the XML; the mask has a
    255 band between labels; saliency is high on objects and low on background on average."""
    layout = VOCLayout(root=synth_root)
    fg_sal, bg_sal = [], []
    for image_id in layout.split_ids("train_aug") + layout.split_ids("val"):
        mask = layout.load_mask(image_id)
        present = set(np.unique(mask).tolist()) - {0, 255}
        labelled = {int(c) + 1 for c in np.nonzero(layout.image_labels(image_id))[0]}
        assert labelled == present and present, image_id
        names = {o.findtext("name") for o in ET.parse(layout.annotation_path(image_id)).getroot().iter("object")}
        assert names == {layout.class_names[c - 1] for c in present}
        assert (mask == 255).any()
        sal = layout.load_saliency(image_id)
        fg_sal.append(sal[(mask > 0) & (mask < 255)].mean())
        bg_sal.append(sal[mask == 0].mean())
    assert np.mean(fg_sal) > 0.6 and np.mean(bg_sal) < 0.1


def test_cooccurrence_contexts_follow_probability() -> None:
    """The mask depends only on the objects, so the same generator with cooccur 0 and 1 gives the same
    mask but, where a boat or train is present, a different image (its context band is drawn, and
    labelled background). Over 300 images the context rate for cooccur 0.4 lies near 0.4."""
    kwargs = {"image_size": 48, "num_classes": 5}
    seen_trap = 0
    for i in range(20):
        never = render_image(np.random.default_rng([1, i]), cooccur=0.0, **kwargs)
        always = render_image(np.random.default_rng([1, i]), cooccur=1.0, **kwargs)
        np.testing.assert_array_equal(never.mask, always.mask)
        # boat (class index 3) is mask value 4 with a water context; train (4) is 5 with rails.
        expected = {ctx for ctx, value in (("water", 4), ("rails", 5)) if (always.mask == value).any()}
        assert never.contexts == []
        if expected:
            seen_trap += 1
            assert set(always.contexts) >= expected
            assert not np.array_equal(never.image, always.image)
    assert seen_trap >= 5

    with_trap = with_context = 0
    for i in range(300):
        r = render_image(np.random.default_rng([2, i]), cooccur=0.4, **kwargs)
        has_boat = any(o["cls"] == 3 for o in r.objects)
        if has_boat:
            with_trap += 1
            with_context += "water" in r.contexts
    assert with_trap > 60
    assert 0.25 < with_context / with_trap < 0.55


@pytest.mark.slow
def test_default_preset_generates_quickly(tmp_path: Path) -> None:
    """The DESIGN.md §4 setting (600 + 200 images at 96x96) should take seconds, not minutes."""
    import time

    t0 = time.perf_counter()
    root = generate_synthetic_voc(tmp_path / "default")
    elapsed = time.perf_counter() - t0
    assert len(VOCLayout(root=root).split_ids("train_aug")) == 600
    assert elapsed < 30.0
