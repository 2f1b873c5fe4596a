"""Shared fixtures: a tiny synthetic VOC-format dataset generated once per test session.

``synth_root`` is shared by every test module: treat it as read-only. A test that corrupts or adds
files takes ``synth_copy`` (a private copy in the test's own tmp folder) instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsss_tune.data.synth import SYNTH_PRESETS, generate_synthetic_voc
from wsss_tune.data.voc import VOCLayout

#: The fixture dataset: preset ``tiny`` (24 train_aug images of which 8 form train, 8 val, 64x64,
#: 5 classes), seed 0.
SYNTH_FIXTURE_PRESET = "tiny"
SYNTH_FIXTURE_SEED = 0


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the session's tiny synthetic dataset (read-only: use ``synth_copy`` to modify)."""
    out = tmp_path_factory.mktemp("data") / "synth"
    return generate_synthetic_voc(out, preset=SYNTH_FIXTURE_PRESET, seed=SYNTH_FIXTURE_SEED)


@pytest.fixture(scope="session")
def synth_settings() -> dict:
    """The preset settings of ``synth_root`` (split sizes, image size, class count)."""
    return dict(SYNTH_PRESETS[SYNTH_FIXTURE_PRESET])


@pytest.fixture
def synth_layout(synth_root: Path) -> VOCLayout:
    """A fresh :class:`VOCLayout` over ``synth_root`` (labels from ``cls_labels.npy``)."""
    return VOCLayout(root=synth_root)


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic dataset."""
    dst = tmp_path / "synth_copy"
    shutil.copytree(synth_root, dst)
    return dst
