"""Trainables without a Ray cluster: results, checkpoints, trial configs, and one trial end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wsss_tune.artifacts import ArtifactStore
from wsss_tune.config import ConfigError, load_config, to_dict
from wsss_tune.stages.common import CheckpointManager
from wsss_tune.trainables import (
    FINAL_KEY,
    SETTINGS_KEY,
    SMOKE_OVERRIDES,
    TRAINABLES,
    TrialSettings,
    TuneReporter,
    pack_work_checkpoint,
    restore_work_checkpoint,
    run_trial,
    split_trial_config,
    trainable_for,
    trial_pipeline_config,
    tune_result,
)
from wsss_tune.trainables.reporter import CHECKPOINT_META


def _work_checkpoints(store: ArtifactStore, steps: tuple[int, ...]) -> tuple[Any, Path]:
    """A key's work folder holding ``checkpoints/step_<n>.pt`` for ``steps`` (as a stage runner leaves it)."""
    key = store.key("eps_model", {"demo": 1})
    folder = store.work_dir(key) / "checkpoints"
    manager = CheckpointManager(folder, keep=len(steps))
    for s in steps:
        manager.save(s, {"step": s, "w": torch.full((2,), float(s))})
    return key, folder


class _Recorder:
    """``report_fn`` stand-in: keeps each result and what its checkpoint folder held at report time."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, result: dict[str, Any], checkpoint: Any = None) -> None:
        entry: dict[str, Any] = {"result": dict(result), "files": None, "meta": None}
        if checkpoint is not None:
            folder = Path(checkpoint.path)
            entry["files"] = sorted(p.name for p in folder.iterdir())
            entry["meta"] = json.loads((folder / CHECKPOINT_META).read_text())
            entry["folder"] = folder
        self.calls.append(entry)


def test_tune_result_keeps_plain_values_and_adds_the_step() -> None:
    """Numbers, bools and strings pass; numpy scalars become Python values; ``checkpoint_dir`` and
    nested values are left out; ``step`` is the step the reporter was called with (7)."""
    metrics = {"eps/loss": 0.5, "stage": "eps_model", "stage_step": 4, "fidelity": 4, "checkpoint_dir": "/x",
               "n": np.int64(3), "nested": {"a": 1}, "flag": True}
    assert tune_result(metrics, step=7) == {"eps/loss": 0.5, "stage": "eps_model", "stage_step": 4, "fidelity": 4,
                                            "n": 3, "flag": True, "step": 7}
    assert type(tune_result(metrics)["n"]) is int
    assert "step" not in tune_result(metrics)


def test_reporter_attaches_the_newest_checkpoint_with_its_artifact(tmp_path: Path) -> None:
    """A report with a checkpoint folder holding steps 2 and 4 sends one Tune checkpoint with
    ``step_4.pt`` and a record naming the artifact ``eps_model/<digest>`` and the folder
    ``checkpoints``; the package is deleted after the report. Without a folder, or with
    ``checkpoints=False``, no checkpoint goes out."""
    store = ArtifactStore(uri=str(tmp_path / "store"))
    key, folder = _work_checkpoints(store, (2, 4))
    rec = _Recorder()
    rep = TuneReporter(report_fn=rec, staging_dir=tmp_path / "staging")
    rep.report({"eps/loss": 1.0, "stage": "eps_model"}, step=4, checkpoint_dir=str(folder))
    rep.report({"eps/loss": 0.9}, step=5)
    assert rec.calls[0]["files"] == sorted(["step_4.pt", CHECKPOINT_META])
    assert rec.calls[0]["meta"] == {"stage": "eps_model", "file": "step_4.pt", "step": 4,
                                    "artifact": str(key), "folder": "checkpoints"}
    assert not rec.calls[0]["folder"].exists()
    assert rec.calls[1]["files"] is None and rec.calls[1]["result"] == {"eps/loss": 0.9, "step": 5}
    assert rep.latest["step"] == 5 and rep.count == 2

    off = _Recorder()
    TuneReporter(report_fn=off, checkpoints=False).report({"x": 1.0}, step=1, checkpoint_dir=str(folder))
    assert off.calls[0]["files"] is None


def test_report_final_marks_the_result(tmp_path: Path) -> None:
    rec = _Recorder()
    out = TuneReporter(report_fn=rec).report_final({"m": 1.5, "stages": {"eps": {}}}, stage_step=600)
    assert out == {"m": 1.5, "stage_step": 600, FINAL_KEY: True}
    assert rec.calls[0]["result"] == out


def test_restore_puts_a_checkpoint_back_into_another_hosts_work_folder(tmp_path: Path) -> None:
    """Packed from store A, restored into store B (another root, as on another host): B's work
    folder for the same key gets ``checkpoints/step_4.pt`` byte for byte. A second restore, or one
    for an artifact B has already published, does nothing."""
    a = ArtifactStore(uri=str(tmp_path / "a"))
    key, folder = _work_checkpoints(a, (2, 4))
    package = tmp_path / "package"
    assert pack_work_checkpoint(folder, package, stage="eps_model") == package / "step_4.pt"

    b = ArtifactStore(uri=str(tmp_path / "b"))
    restored = restore_work_checkpoint(package, b)
    assert restored == b.work_dir(key) / "checkpoints" / "step_4.pt"
    assert restored.read_bytes() == (folder / "step_4.pt").read_bytes()
    assert CheckpointManager(restored.parent).latest()[0] == 4
    assert restore_work_checkpoint(package, b) is None

    c = ArtifactStore(uri=str(tmp_path / "c"))

    def build(folder: Path) -> None:
        (folder / "model.pt").write_bytes(b"x")

    c.get_or_create(key, build)
    assert restore_work_checkpoint(package, c) is None

    (package / CHECKPOINT_META).unlink()
    with pytest.raises(ValueError, match=CHECKPOINT_META):
        restore_work_checkpoint(package, b)


def test_pack_without_checkpoints_gives_none(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert pack_work_checkpoint(tmp_path / "empty", tmp_path / "out") is None


def _settings(tmp_path: Path, **kw: Any) -> TrialSettings:
    base = load_config("synth", {"data.root": str(tmp_path / "data")})
    return TrialSettings(base=to_dict(base), stages=("eps",), runs_dir=str(tmp_path / "runs"),
                         metric="eps_miou_tune", **kw)


def test_trial_config_applies_searched_values_to_the_base(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    got, params = split_trial_config({"eps.tau": 0.3, "rw.logt": 2, SETTINGS_KEY: settings.to_dict()})
    assert got == settings and params == {"eps.tau": 0.3, "rw.logt": 2}
    cfg = trial_pipeline_config(got, params, store="/stores/s")
    assert (cfg.eps.tau, cfg.rw.logt, cfg.run.artifact_store) == (0.3, 2, "/stores/s")
    assert cfg.eps.lam == load_config("synth").eps.lam
    with pytest.raises(ConfigError, match="eps.tauu"):
        trial_pipeline_config(got, {"eps.tauu": 0.3}, store="/s")
    with pytest.raises(ValueError, match=SETTINGS_KEY):
        split_trial_config({"eps.tau": 0.3})
    with pytest.raises(ValueError, match="runs_dir"):
        TrialSettings(base={}, stages=("eps",), runs_dir="relative/runs", metric="m")
    with pytest.raises(ValueError, match="unknown stage"):
        TrialSettings(base={}, stages=("cam",), runs_dir=str(tmp_path), metric="m")


def test_trainable_for_picks_the_stage_trainable() -> None:
    assert trainable_for(["eps"]) == ("eps", TRAINABLES["eps"])
    assert trainable_for(["eps", "affinity"])[0] == "affinity"
    assert trainable_for(["deeplab"])[0] == "deeplab"
    assert trainable_for(["eps", "affinity", "deeplab"])[0] == "pipeline"
    assert trainable_for(["eps", "deeplab"])[0] == "pipeline"


def test_run_trial_reports_each_stage_then_a_final_result(synth_root: Path, tmp_path: Path) -> None:
    """EPS only, 4 iterations (eval and checkpoint every 2). The first trial builds ``eps_model`` and
    ``eps``: training reports at stage steps 2 and 4 with a checkpoint each, then the final result
    with ``final: True``, the metric, ``built/*`` = 1 and ``stage_step`` = max(final_t 600, 4) = 600.
    A second trial with the same config is served from the store: nothing built, no training report."""
    base = load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(synth_root)})
    settings = TrialSettings(base=to_dict(base), stages=("eps",), runs_dir=str(tmp_path / "runs"),
                             store=str(tmp_path / "store"), metric="eps_miou_tune", time_attr="stage_step",
                             final_t=600, threads=1)
    config = {"eps.tau": 0.35, SETTINGS_KEY: settings.to_dict()}
    rec = _Recorder()
    final = run_trial(config, trial_id="t0", report_fn=rec)
    results = [c["result"] for c in rec.calls]
    training = [r for r in results if r.get("stage") == "eps_model" and "artifact" not in r]
    assert [r["stage_step"] for r in training] == [2, 4]
    # Each scored artifact ends with one stage-end report naming it (what W&B's stage-end panels read).
    ends = [r["stage"] for r in results if "artifact" in r]
    assert ends == ["eps_model", "eps"]
    assert all(c["meta"]["artifact"].startswith("eps_model/") for c in rec.calls[: len(training)])
    fidelity = [r["fidelity"] for r in results if "fidelity" in r]
    assert fidelity == sorted(fidelity)
    assert results[-1] == final and final[FINAL_KEY] is True
    assert final["stage_step"] == 600 and final["built/eps_model"] == 1 and final["built/eps"] == 1
    written = json.loads((tmp_path / "runs" / "t0" / "metrics.json").read_text())
    assert final["eps_miou_tune"] == written["eps_miou_tune"]
    assert load_config(tmp_path / "runs" / "t0" / "config.yaml").eps.tau == 0.35

    again = _Recorder()
    cached = run_trial(config, trial_id="t1", report_fn=again)
    assert cached["stages_built"] == 0 and cached["eps_miou_tune"] == final["eps_miou_tune"]
    assert all(c["result"].get("cache_hit") or c["result"].get(FINAL_KEY) for c in again.calls)


def test_trial_table_marks_the_best_finished_trial() -> None:
    """Trial a finishes with m = 0.7, b is stopped after reporting 0.9, c finishes with 0.5: the
    best *finished* trial is a (b's 0.9 is a truncated value), b shows as pruned."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from wsss_tune.trainables.progress import TrialTable

    table = TrialTable(metric="m", mode="max", params=["eps.tau"], title="exp")
    trials = {tid: SimpleNamespace(trial_id=tid, config={"eps.tau": tau}) for tid, tau in
              (("a", 0.3), ("b", 0.4), ("c", 0.5))}
    for tid, value, final in (("a", 0.7, True), ("b", 0.9, False), ("c", 0.5, True)):
        table.on_trial_start(0, [], trials[tid])
        table.on_trial_result(0, [], trials[tid], {"m": value, "stage": "eps", "stage_step": 4,
                                                   **({FINAL_KEY: True} if final else {})})
        table.on_trial_complete(0, [], trials[tid])
    assert table._best() == "a"
    assert [table._rows[t]["status"] for t in "abc"] == ["done", "pruned", "done"]
    out = io.StringIO()
    Console(file=out, width=160).print(table._table())
    assert "a *" in out.getvalue() and "0.9" in out.getvalue()
