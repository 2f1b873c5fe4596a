"""Bad input gets a clear error before compute is spent (:mod:`wsss_tune.validate`).

Each case breaks one thing in a private copy of the tiny synthetic dataset (or a space, a config, a
weights file, a storage URI) and checks that the pre-flight check (or the loader that runs first)
raises an error naming the file / key / URI and saying what was expected. No stage runs in any case.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_tune.config import ConfigError, apply_overrides, load_config
from wsss_tune.spaces import SpaceError, space_from_dict
from wsss_tune.validate import PreflightError, check_writable, preflight, require_preflight

#: An id of the tiny preset that is in train_aug (the EPS training split of ``synth``) and in train.
TRAIN_ID = "train_00000"
#: An id of the validation split of the tiny preset.
VAL_ID = "val_00000"


def _cfg(root: Path, **overrides: object):
    return apply_overrides(load_config("synth", [f"data.root={root}"]), dict(overrides))


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``make(root, tmp)`` breaks it and returns the call that must fail."""

    name: str
    make: Callable[[Path, Path], Callable[[], object]]
    error: type[BaseException]
    #: Substrings the message must hold: what is wrong (file / key / value) and what was expected.
    expect: tuple[str, ...]


def _preflight(root: Path, **overrides: object) -> Callable[[], object]:
    return lambda: require_preflight(_cfg(root, **overrides), experiments=None)


def _missing_image(root: Path, tmp: Path) -> Callable[[], object]:
    (root / "JPEGImages" / f"{TRAIN_ID}.jpg").unlink()
    return _preflight(root)


def _truncated_image(root: Path, tmp: Path) -> Callable[[], object]:
    path = root / "JPEGImages" / f"{TRAIN_ID}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return _preflight(root)


def _saliency_wrong_size(root: Path, tmp: Path) -> Callable[[], object]:
    path = root / "SaliencyMaps" / f"{TRAIN_ID}.png"
    Image.open(path).resize((17, 13)).save(path)
    return _preflight(root)


def _saliency_wrong_mode(root: Path, tmp: Path) -> Callable[[], object]:
    path = root / "SaliencyMaps" / f"{TRAIN_ID}.png"
    Image.open(path).convert("RGBA").save(path)
    return _preflight(root)


def _mask_out_of_range(root: Path, tmp: Path) -> Callable[[], object]:
    path = root / "SegmentationClassAug" / f"{VAL_ID}.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 77  # 5 classes: valid values are 0..5 and 255
    Image.fromarray(mask).save(path)
    return _preflight(root)


def _label_missing(root: Path, tmp: Path) -> Callable[[], object]:
    path = root / "cls_labels.npy"
    labels = np.load(path, allow_pickle=True).item()
    del labels[TRAIN_ID]
    np.save(path, labels)
    return _preflight(root)


def _empty_split(root: Path, tmp: Path) -> Callable[[], object]:
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    return _preflight(root)


_SPACE = {"base": "synth", "stages": ["eps", "affinity"], "metric": "rw_miou_tune", "mode": "max",
          "tune_split": "train_tune", "heldout_split": "train_heldout",
          "params": {"rw.beta": {"kind": "uniform", "low": 2, "high": 12}}}


def _space_unknown_key(root: Path, tmp: Path) -> Callable[[], object]:
    data = {**_SPACE, "params": {"rw.betta": {"kind": "uniform", "low": 2, "high": 12}}}
    return lambda: space_from_dict(data, name="bad")


def _space_empty_range(root: Path, tmp: Path) -> Callable[[], object]:
    data = {**_SPACE, "params": {"rw.beta": {"kind": "uniform", "low": 5, "high": 5}}}
    return lambda: space_from_dict(data, name="bad")


def _config_wrong_type(root: Path, tmp: Path) -> Callable[[], object]:
    return lambda: load_config("synth", ["eps.iterations=many"])


def _weights_mismatch(root: Path, tmp: Path) -> Callable[[], object]:
    from wsss_tune.models.registry import create_backbone

    state = create_backbone("tiny").state_dict()
    state["bogus.weight"] = state.pop("layer1.0.weight")
    torch.save(state, tmp / "wrong.pth")
    return _preflight(root, **{"eps.pretrained": str(tmp / "wrong.pth")})


def _storage_not_writable(root: Path, tmp: Path) -> Callable[[], object]:
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return _preflight(root, **{"run.artifact_store": str(blocker / "store")})


CASES = [
    Case("missing image", _missing_image, PreflightError, (f"{TRAIN_ID}.jpg", "missing")),
    Case("truncated image", _truncated_image, PreflightError, (f"{TRAIN_ID}.jpg",)),
    Case("saliency wrong size", _saliency_wrong_size, PreflightError, (f"{TRAIN_ID}.png", "17x13", "64x64")),
    Case("saliency wrong mode", _saliency_wrong_mode, PreflightError, (f"{TRAIN_ID}.png", "RGBA")),
    Case("mask value out of range", _mask_out_of_range, PreflightError, (f"{VAL_ID}.png", "77")),
    Case("labels missing for an id", _label_missing, PreflightError, ("cls_labels.npy", TRAIN_ID)),
    Case("empty split", _empty_split, PreflightError, ("val.txt", "empty")),
    Case("space unknown key", _space_unknown_key, SpaceError, ("rw.betta",)),
    Case("space empty range", _space_empty_range, SpaceError, ("rw.beta", "low")),
    Case("config wrong type", _config_wrong_type, ConfigError, ("eps.iterations", "many", "int")),
    Case("weights do not fit the backbone", _weights_mismatch, PreflightError,
         ("wrong.pth", "missing (layer1.0.weight)", "unexpected (bogus.weight)")),
    Case("storage not writable", _storage_not_writable, PreflightError, ("a_file", "cannot write", "expected")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_named(case: Case, synth_copy: Path, tmp_path: Path) -> None:
    """The error names the broken file / key / value and what was expected."""
    call = case.make(synth_copy, tmp_path)
    with pytest.raises(case.error) as info:
        call()
    text = str(info.value)
    for part in case.expect:
        assert part in text, f"{case.name}: {part!r} not in:\n{text}"


def test_bad_input_case_count() -> None:
    """The twelve kinds of bad input of the reliability issue, each covered once."""
    assert len(CASES) == 12
    assert len({c.name for c in CASES}) == len(CASES)


def test_preflight_reports_every_problem_at_once(synth_copy: Path) -> None:
    """Two broken files give two problems in one error (a user fixes both before re-running)."""
    (synth_copy / "JPEGImages" / f"{TRAIN_ID}.jpg").unlink()
    (synth_copy / "SaliencyMaps" / "train_00001.png").unlink()
    with pytest.raises(PreflightError) as info:
        require_preflight(_cfg(synth_copy))
    files = " ".join(c.message for c in info.value.problems)
    assert f"{TRAIN_ID}.jpg" in files and "train_00001.png" in files


def test_preflight_clean_dataset_passes(synth_root: Path, tmp_path: Path) -> None:
    """The intact fixture dataset with a writable store and experiment folder has no problem."""
    checks = require_preflight(_cfg(synth_root), store=str(tmp_path / "store"), experiments=tmp_path / "exp")
    assert all(c.status != "problem" for c in checks)
    assert {c.name for c in checks} >= {"data", "storage.experiments"}
    assert not any(p.name.startswith(".wsss-preflight-") for p in (tmp_path / "store").iterdir())


def test_preflight_warns_of_training_images_with_no_class(synth_copy: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A training image whose label vector is all zero is named in a warning (logged by
    ``require_preflight``, which still lets the run go: it trains as pure background)."""
    labels_path = synth_copy / "cls_labels.npy"
    labels = np.load(labels_path, allow_pickle=True).item()
    labels[TRAIN_ID] = np.zeros_like(labels[TRAIN_ID])
    np.save(labels_path, labels, allow_pickle=True)
    with caplog.at_level("WARNING", logger="wsss_tune.validate"):
        checks = require_preflight(_cfg(synth_copy), stages=("eps",))
    warned = [c for c in checks if c.status == "warn"]
    assert [c.name for c in warned] == ["data.no_class"] and TRAIN_ID in warned[0].message
    assert TRAIN_ID in caplog.text
    assert not any(c.status == "problem" for c in checks)


def test_preflight_only_checks_stages_used(synth_copy: Path) -> None:
    """Saliency maps are read by EPS only: a missing one fails an EPS run, not a DeepLab-only run."""
    (synth_copy / "SaliencyMaps" / f"{TRAIN_ID}.png").unlink()
    assert any(c.status == "problem" for c in preflight(_cfg(synth_copy), stages=("eps",)))
    assert not any(c.status == "problem" for c in preflight(_cfg(synth_copy), stages=("deeplab",)))


def test_writable_uri(tmp_path: Path) -> None:
    """A ``file://`` URI is probed through pyarrow; a read-only folder is a problem."""
    assert check_writable((tmp_path / "s").as_uri(), name="s").status == "ok"
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permission bits do not stop writes")
        assert check_writable(str(ro), name="s").status == "problem"
    finally:
        os.chmod(ro, 0o700)

