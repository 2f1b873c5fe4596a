"""What Ray's own records say: outcome marks, the complete progress.csv, the slim trial config, the
live view's counts and clean end, and the Optuna study's names (unit level; the sweep-level checks
with Ray's API are in ``test_sweep.py``)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from wsss_tune.trainables.callbacks import OBJECTIVE_KEY, PRUNED_KEY, CompleteCSVLogger, mark
from wsss_tune.trainables.reporter import FINAL_KEY


def test_outcome_marks_completed_and_pruned_results() -> None:
    final = {"m": 0.7, FINAL_KEY: True, "done": False}
    mark(final, metric="m")
    assert final[PRUNED_KEY] is False and final[OBJECTIVE_KEY] == 0.7
    stopped = {"m": 0.9, "stage": "deeplab", "done": True}  # the scheduler stopped it here
    mark(stopped, metric="m")
    assert stopped[PRUNED_KEY] is True and stopped[FINAL_KEY] is False and OBJECTIVE_KEY not in stopped
    assert stopped["m"] == 0.9  # the truncated value stays, marked
    running = {"m": 0.5, "done": False}
    mark(running, metric="m")
    assert running == {"m": 0.5, "done": False}
    nan_final = {"m": float("nan"), FINAL_KEY: True}
    mark(nan_final, metric="m")
    assert OBJECTIVE_KEY not in nan_final and nan_final[PRUNED_KEY] is False


class _Trial:
    def __init__(self, folder: Path) -> None:
        self.local_path = str(folder)
        folder.mkdir(parents=True, exist_ok=True)

    def init_local_path(self) -> None:
        pass


def test_progress_csv_keeps_every_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's CSV logger fixes its header at the first result; ours widens it when a later stage
    reports new metrics, keeping the earlier rows."""
    logger = CompleteCSVLogger()
    monkeypatch.setattr(logger, "_restore_from_remote", lambda *a, **k: None)
    trial = _Trial(tmp_path / "t1")
    logger.log_trial_result(1, trial, {"stage": "eps", "loss": 1.5, "config": {"x": 1}})
    logger.log_trial_result(2, trial, {"stage": "eps", "loss": 1.2})
    logger.log_trial_result(3, trial, {"stage": "deeplab", "loss": 0.8, "deeplab_miou_tune": 61.5,
                                       "nested": {"a": 1}})
    logger.log_trial_result(4, trial, {"stage": "deeplab", FINAL_KEY: True, "deeplab_miou_tune": 62.0})
    logger.log_trial_end(trial)
    with (tmp_path / "t1" / "progress.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0]) == ["stage", "loss", "deeplab_miou_tune", "nested/a", FINAL_KEY]
    assert [r["stage"] for r in rows] == ["eps", "eps", "deeplab", "deeplab"]
    assert rows[0]["deeplab_miou_tune"] == "" and rows[2]["deeplab_miou_tune"] == "61.5"
    assert rows[3][FINAL_KEY] == "True" and rows[2]["nested/a"] == "1"
    assert "config" not in rows[0]
    # a restored trial appends under the same header
    again = CompleteCSVLogger()
    monkeypatch.setattr(again, "_restore_from_remote", lambda *a, **k: None)
    again.log_trial_result(5, trial, {"stage": "deeplab", "deeplab_miou_tune": 63.0})
    again.log_trial_end(trial)
    with (tmp_path / "t1" / "progress.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[4]["deeplab_miou_tune"] == "63.0" and rows[4]["stage"] == "deeplab"


def test_trial_config_names_the_base_instead_of_holding_it(tmp_path: Path) -> None:
    from wsss_tune.config import load_config, to_dict
    from wsss_tune.trainables import SETTINGS_KEY, TrialSettings, split_trial_config
    from wsss_tune.trainables import trainable as trainable_mod

    base = to_dict(load_config("synth"))
    settings = TrialSettings(base=base, stages=("eps",), runs_dir=str(tmp_path / "runs"), metric="eps_miou_tune",
                             phase="eps")
    small = settings.to_trial_config(tmp_path / "exp")
    assert "base" not in small and small["phase"] == "eps"
    ref = small["base_ref"]
    stored = Path(ref["path"])
    assert stored.parent == (tmp_path / "exp" / trainable_mod.BASE_CONFIGS_DIR).resolve()
    assert json.loads(stored.read_text()) == base
    assert len(json.dumps(small)) < len(json.dumps(settings.to_dict())) / 5
    # a second search with the same base reuses the file
    assert settings.to_trial_config(tmp_path / "exp")["base_ref"] == ref
    # a worker process (no cache) reads it back
    trainable_mod._BASES.clear()
    got, params = split_trial_config({"eps.tau": 0.3, SETTINGS_KEY: small})
    assert got == settings and params == {"eps.tau": 0.3}
    # a changed file is refused, naming it
    trainable_mod._BASES.clear()
    stored.write_text(stored.read_text().replace('"synth"', '"other"', 1) + " ")
    with pytest.raises(ValueError, match="changed since the sweep started"):
        split_trial_config({SETTINGS_KEY: small})
    stored.unlink()
    with pytest.raises(ValueError, match="cannot read the base config"):
        split_trial_config({SETTINGS_KEY: small})
    with pytest.raises(ValueError, match="both 'base' and 'base_ref'"):
        split_trial_config({SETTINGS_KEY: {**settings.to_dict(), "base_ref": ref}})


def test_live_view_counts_best_and_eta() -> None:
    from rich.console import Console

    from wsss_tune.trainables.progress import TrialTable

    out = io.StringIO()
    table = TrialTable(metric="m", mode="max", params=["eps.tau"], title="exp", total=5,
                       console=Console(file=out, width=160))
    table.setup()
    assert table._started is not None
    t0 = table._started
    trials = {tid: SimpleNamespace(trial_id=tid, config={"eps.tau": 0.1}) for tid in "abcd"}
    for tid, value, outcome in (("a", 0.7, "final"), ("b", 0.9, "pruned"), ("c", 0.5, "final")):
        table.on_trial_start(0, [], trials[tid])
        table.on_trial_result(0, [], trials[tid], {"m": value, **({FINAL_KEY: True} if outcome == "final" else {})})
        table.on_trial_complete(0, [], trials[tid])
    table.on_trial_start(0, [], trials["d"])
    table.on_trial_error(0, [], trials["d"])
    assert table.counts() == {"done": 2, "pruned": 1, "failed": 1, "running": 0, "pending": 1}
    # 4 of 5 finished in 120 s: one left at that rate is 30 s
    caption = table.caption(now=t0 + 120)
    assert caption.startswith("4/5 finished (2 done, 1 pruned, 1 failed)")
    assert "0 running" in caption and "best 0.7" in caption and "elapsed 2m00s" in caption
    assert "ETA 30s" in caption
    table.on_experiment_end([])
    text = out.getvalue()
    assert text.endswith("\n")  # the summary that follows starts on its own line
    assert "4/5 finished" in text and "failed" in text and "FAILED" not in text


def test_optuna_study_names_its_metric_and_records_stage_metrics(tmp_path: Path) -> None:
    import optuna

    from wsss_tune.trainables.search import STUDY_FILE, FidelitySearch, study_storage

    storage = study_storage(str(tmp_path / STUDY_FILE))
    search = FidelitySearch(space={"eps.tau": optuna.distributions.FloatDistribution(0.1, 0.9)},
                            metric="rw_miou_tune", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                            study_name="s", storage=storage)
    config = search.suggest("t1")
    assert config is not None
    search.on_trial_complete("t1", result={"rw_miou_tune": 71.0, "rw_miou_heldout": 70.0, "eps_miou_tune": 60.0,
                                           "loss": 0.3, FINAL_KEY: True})
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == ["rw_miou_tune"]
    frozen = study.trials[0]
    assert frozen.value == 71.0
    assert frozen.user_attrs["rw_miou_heldout"] == 70.0 and frozen.user_attrs["eps_miou_tune"] == 60.0
    assert "loss" not in frozen.user_attrs
    df = study.trials_dataframe()
    assert "value_rw_miou_tune" in df.columns  # named, not "value" / "Objective 0"
