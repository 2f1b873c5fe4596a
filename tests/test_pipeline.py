"""The pipeline over the artifact store: the plain-CAM baseline (``run.cam_baseline``) as a side
artifact shared by every tau/lam, reported as ``cam_miou*`` and never to the scheduler."""

from __future__ import annotations

from pathlib import Path

from wsss_tune.config import load_config
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages.pipeline import run_pipeline, stage_key_parts
from wsss_tune.trainables import SMOKE_OVERRIDES


def _cfg(root: Path, store: Path, **extra):
    return load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(root), "data.num_workers": 0,
                                 "run.artifact_store": str(store), "run.cam_baseline": True, **extra})


def test_cam_key_ignores_tau_and_lam_but_the_eps_key_does_not(synth_root: Path, tmp_path: Path) -> None:
    a = _cfg(synth_root, tmp_path, **{"eps.method": "cam", "eps.tau": 0.3})
    b = _cfg(synth_root, tmp_path, **{"eps.method": "cam", "eps.tau": 0.6, "eps.lam": 0.9})
    assert stage_key_parts(a, "fp")["eps_model"] == stage_key_parts(b, "fp")["eps_model"]
    e1 = _cfg(synth_root, tmp_path, **{"eps.tau": 0.3})
    e2 = _cfg(synth_root, tmp_path, **{"eps.tau": 0.6})
    assert stage_key_parts(e1, "fp")["eps_model"] != stage_key_parts(e2, "fp")["eps_model"]


def test_cam_baseline_is_a_quiet_shared_side_artifact(synth_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    rec = RecordingReporter()
    first = run_pipeline(_cfg(synth_root, store, **{"eps.tau": 0.3}), stages=("eps",), out_dir=tmp_path / "a",
                         reporter=rec)
    assert {"cam_miou", "cam_miou_tune", "cam_miou_heldout"} <= set(first)
    assert first["stages"]["cam_model"]["hit"] is False and first["stages"]["cam"]["hit"] is False
    # Nothing of the baseline reaches the scheduler: every report belongs to the EPS stage proper.
    assert {h["stage"] for h in rec.history} <= {"eps_model", "eps"}
    assert first["eps_method"] == "eps"

    second = run_pipeline(_cfg(synth_root, store, **{"eps.tau": 0.6}), stages=("eps",), out_dir=tmp_path / "b",
                          reporter=RecordingReporter())
    assert second["stages"]["eps_model"]["hit"] is False  # tau changes EPS ...
    assert second["stages"]["cam_model"]["hit"] is True and second["stages"]["cam"]["hit"] is True  # ... not CAM
    assert second["cam_miou_tune"] == first["cam_miou_tune"]


def test_a_cam_run_is_its_own_baseline(synth_root: Path, tmp_path: Path) -> None:
    m = run_pipeline(_cfg(synth_root, tmp_path / "store", **{"eps.method": "cam"}), stages=("eps",),
                     out_dir=tmp_path / "run", reporter=RecordingReporter())
    assert m["cam_miou_tune"] == m["eps_miou_tune"] and "cam_model" not in m["stages"]


def test_baseline_off_by_default(synth_root: Path, tmp_path: Path) -> None:
    m = run_pipeline(_cfg(synth_root, tmp_path / "store", **{"run.cam_baseline": False}), stages=("eps",),
                     out_dir=tmp_path / "run", reporter=RecordingReporter())
    assert not any(k.startswith("cam_") for k in m) and "cam_model" not in m["stages"]
