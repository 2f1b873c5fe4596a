"""Shared fixtures: a tiny synthetic VOC-format dataset generated once per test session.

``synth_root`` is shared by every test module: treat it as read-only. A test that corrupts or adds
files takes ``synth_copy`` (a private copy in the test's own tmp folder) instead.

``synth_eps`` and ``synth_refined`` (slow tests only) run the built-in ``synth`` config's EPS, then
AffinityNet + random-walk stages once per session on the default synthetic dataset.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsss_tune.config import PipelineConfig, load_config
from wsss_tune.data.synth import SYNTH_PRESETS, generate_synthetic_voc
from wsss_tune.data.voc import VOCLayout
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages.common import StageResult

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


@pytest.fixture(scope="session")
def synth_eps(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Path]:
    """The built-in ``synth`` config on a default synthetic dataset (600 train_aug / 200 train /
    200 val, 96x96), with its EPS stage run once (~50 s on 2 cores)."""
    from wsss_tune.stages.eps import run_eps

    work = tmp_path_factory.mktemp("synth_pipeline")
    root = generate_synthetic_voc(work / "data", preset="default", seed=0)
    cfg = load_config("synth", {"data.root": str(root), "data.num_workers": 0, "run.device": "cpu"})
    run_eps(cfg, out_dir=work / "eps", reporter=RecordingReporter())
    return cfg, work / "eps"


@pytest.fixture(scope="session")
def synth_refined(synth_eps: tuple[PipelineConfig, Path]) -> StageResult:
    """``synth_eps`` refined: AffinityNet trained on its masks, affinities cached, random walk run
    (~30 s). The result's metrics hold ``eps_miou`` and ``rw_miou`` (per ``t`` too); ``paths["masks"]``
    the refined masks."""
    from wsss_tune.stages.affinity import run_affinity
    from wsss_tune.stages.random_walk import run_random_walk

    cfg, eps_dir = synth_eps
    work = eps_dir.parent
    aff = run_affinity(cfg, eps_dir=eps_dir, out_dir=work / "affinity", reporter=RecordingReporter())
    return run_random_walk(cfg, eps_dir=eps_dir, aff_dir=Path(aff.paths["aff"]), out_dir=work / "rw",
                           reporter=RecordingReporter())
