"""Each report table computed from the small saved experiment of ``test_analysis_data`` (known values)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from test_analysis_data import TRIALS, make_experiment, make_study

from wsss_tune.analysis.results import load_experiment
from wsss_tune.analysis.tables import (
    RAY_TRIAL_ATTR,
    cam_baseline,
    compute_line,
    compute_table,
    curves_table,
    experiment_tables,
    history_table,
    importance_table,
    load_study,
    overlap_table,
    per_class_table,
    stage_table,
    stopped_table,
    trial_order,
    trials_table,
)

HOUR = 3600.0


@pytest.fixture
def experiment(tmp_path: Path, synth_root: Path) -> Path:
    return make_experiment(tmp_path / "exp-a", synth_root)


def _row(frame: pd.DataFrame, column: str, value: object) -> dict:
    rows = frame[frame[column] == value].to_dict("records")
    assert len(rows) == 1, f"{column} == {value!r}: {len(rows)} rows"
    return rows[0]


def test_stage_table_values_and_gains(experiment: Path) -> None:
    """Reference t00000 vs best t00001, CAM baseline t00005 (eps_method cam: EPS-stage 30 / 28).

    CAM: 30 / 28 in both configs (the baseline), no gain, delta 0.
    EPS: ref 60 / 58, best 65 / 63; gain over CAM ref 60-30 = 30, 58-28 = 30; best 35, 35; delta 5, 5.
    refined: ref 64 / 61, best 70 / 68; gain over EPS ref 4, 3; best 5, 5; delta 6, 7.
    DeepLab: ref 66 / 63, best 72 / 70; gain over refined ref 2, 2; best 2, 2; delta 6, 7.
    """
    exp = load_experiment(experiment)
    assert cam_baseline(exp).trial_id == "t00005"
    t = stage_table(exp)
    f = t.frame
    assert list(f["stage"]) == ["CAM", "EPS pseudo-mask", "refined", "DeepLab"]
    expected = {
        "CAM": (30, 28, 30, 28, None, None, None, None, 0, 0),
        "EPS pseudo-mask": (60, 58, 65, 63, 30, 30, 35, 35, 5, 5),
        "refined": (64, 61, 70, 68, 4, 3, 5, 5, 6, 7),
        "DeepLab": (66, 63, 72, 70, 2, 2, 2, 2, 6, 7),
    }
    cols = ["reference_tune", "reference_heldout", "best_tune", "best_heldout", "reference_gain_tune",
            "reference_gain_heldout", "best_gain_tune", "best_gain_heldout", "delta_tune", "delta_heldout"]
    for stage, values in expected.items():
        row = _row(f, "stage", stage)
        for col, want in zip(cols, values, strict=True):
            got = row[col]
            if want is None:
                assert got is None or (isinstance(got, float) and math.isnan(got)), (stage, col, got)
            else:
                assert got == pytest.approx(want), (stage, col)
    assert "t00005" in t.note and "t00001" in t.note


def test_stage_table_without_cam_baseline(tmp_path: Path, synth_root: Path) -> None:
    """Without the cam trial there is no CAM number: the first row is EPS and its gain is empty."""
    exp = load_experiment(make_experiment(tmp_path / "e", synth_root, trials=TRIALS[:5]))
    f = stage_table(exp).frame
    assert list(f["stage"]) == ["EPS pseudo-mask", "refined", "DeepLab"]
    assert pd.isna(f.loc[0, "best_gain_heldout"])
    assert f.loc[1, "best_gain_heldout"] == pytest.approx(68 - 63)


def test_trials_history_and_stopped(experiment: Path) -> None:
    """Creation order t00000..t00005. Values: 66, 72, 62, - (pruned, last 50 at step 200), - (failed),
    40. History drops the failed trial; best so far over completed only: 66, 72, 72, 72, 72."""
    exp = load_experiment(experiment)
    trials = trials_table(exp)
    f = trials.frame
    assert list(f["trial_id"]) == [f"t0000{i}" for i in range(6)]
    pruned = _row(f, "trial_id", "t00003")
    assert pruned["status"] == "pruned" and pd.isna(pruned["value"])
    assert (pruned["last_value"], pruned["last_step"]) == (50.0, 200.0)
    assert _row(f, "trial_id", "t00001")["best"] and _row(f, "trial_id", "t00000")["reference"]
    assert _row(f, "trial_id", "t00004")["error"].startswith("DivergedError")
    h = history_table(exp, trials).frame
    assert list(h["trial_id"]) == ["t00000", "t00001", "t00002", "t00003", "t00005"]
    assert list(h["value"]) == [66.0, 72.0, 62.0, 50.0, 40.0]
    assert list(h["best_so_far"]) == [66.0, 72.0, 72.0, 72.0, 72.0]
    s = stopped_table(exp, trials)
    assert list(s.frame["trial_id"]) == ["t00003"]
    assert s.frame.loc[0, "eps.tau"] == pytest.approx(0.6)
    assert "max_t 400" in s.note


def test_curves_skip_final_rows(experiment: Path) -> None:
    """Each completed trial reported 4 below its final value at step 200 and its value at 400; the final
    summary row (also step 400) is not an intermediate value. t00001: (200, 68), (400, 72)."""
    c = curves_table(load_experiment(experiment)).frame
    best = c[c["trial_id"] == "t00001"].sort_values("step")
    assert list(zip(best["step"], best["value"], strict=True)) == [(200.0, 68.0), (400.0, 72.0)]
    assert len(c) == 4 * 2 + 1


def test_per_class(experiment: Path) -> None:
    """Best minus reference per class: eps disc 48 - 40 = 8, deeplab disc 58 - 47 = 11."""
    f = per_class_table(load_experiment(experiment)).frame
    assert set(f["stage"]) == {"EPS pseudo-mask", "DeepLab"}
    eps_disc = f[(f["stage"] == "EPS pseudo-mask") & (f["class"] == "disc")].iloc[0]
    assert (eps_disc["reference"], eps_disc["best"], eps_disc["delta"]) == (40.0, 48.0, 8.0)
    dl_disc = f[(f["stage"] == "DeepLab") & (f["class"] == "disc")].iloc[0]
    assert dl_disc["delta"] == pytest.approx(11.0)


def test_compute_table(experiment: Path) -> None:
    """Builds and hits from the stage records (see test_analysis_data):

    eps_model: built by t00000 (100 s), t00001 (100 s, from its manifest), t00005 (90 s): 3 builds,
    290 s; hit once by t00002, saving the reference's 100 s. rw: built 4 times, 4 x 2 = 8 s, no hits.
    deeplab: 4 x 80 = 320 s. Unrecorded trials: pruned 120 s + failed 30 s = 150 s.
    Total = eps_model 290 + eps 3 x 10 + affinity 3 x 50 + rw 8 + deeplab 320 + 150 = 948 s.
    One CPU per trial, no GPU: CPU-hours = seconds / 3600.
    """
    t = compute_table(load_experiment(experiment))
    f = t.frame
    assert list(f["stage"]) == ["eps_model", "eps", "affinity", "rw", "deeplab", "unrecorded trials", "total"]
    em = _row(f, "stage", "eps_model")
    assert (em["built"], em["hits"]) == (3, 1)
    assert em["hours"] * HOUR == pytest.approx(290.0)
    assert em["saved_hours"] * HOUR == pytest.approx(100.0)
    assert _row(f, "stage", "rw")["hours"] * HOUR == pytest.approx(8.0)
    assert _row(f, "stage", "unrecorded trials")["hours"] * HOUR == pytest.approx(150.0)
    total = _row(f, "stage", "total")
    assert total["hours"] * HOUR == pytest.approx(948.0)
    assert total["saved_hours"] * HOUR == pytest.approx(100 + 10 + 50)
    assert "CPU-hours" in t.title
    # the summary's line: 948 s = 0.263 h built, 160 s = 0.044 h saved by three hits
    assert compute_line(load_experiment(experiment)) == \
        f"compute: 0.263 CPU-hours ({int(total['built'])} builds), 0.044 saved by 3 cache hits"


def test_compute_table_gpu_hours(tmp_path: Path, synth_root: Path) -> None:
    """With 0.5 GPU per trial a build of 100 wall seconds is 50 GPU-seconds: eps_model 290 * 0.5 = 145."""
    exp = load_experiment(make_experiment(tmp_path / "g", synth_root, gpus=0.5))
    t = compute_table(exp)
    assert "GPU-hours" in t.title
    assert _row(t.frame, "stage", "eps_model")["hours"] * HOUR == pytest.approx(145.0)


def test_importances_fall_back_with_few_trials(experiment: Path) -> None:
    """The study has 4 completed trials for 3 parameters: below max(5, 3 + 1) = 5, so no fANOVA."""
    exp = load_experiment(experiment)
    assert load_study(exp) is not None
    t = importance_table(exp)
    assert t.empty and "at least 5 completed trials" in t.note and "has 4" in t.note


def _tau_only_study(tmp_path: Path) -> optuna.Study:
    """24 completed trials whose objective is exactly 100 * tau (beta random, method constant)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        tau, beta = float(rng.uniform(0.1, 0.7)), float(rng.uniform(2, 12))
        rows.append((f"r{i}", "completed", {"eps.tau": tau, "rw.beta": beta, "eps.method": "eps"}, 100 * tau))
    make_study(tmp_path / "s.db", "s", rows)
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")


def test_importances_fanova_finds_the_parameter_that_matters(experiment: Path, tmp_path: Path) -> None:
    """Objective = 100 * tau exactly, beta irrelevant: all the variance is tau's, so fANOVA gives tau
    (nearly) all the importance."""
    pytest.importorskip("sklearn", reason="Optuna's fANOVA needs scikit-learn")
    t = importance_table(load_experiment(experiment), _tau_only_study(tmp_path))
    imp = dict(zip(t.frame["param"], t.frame["importance"], strict=True))
    assert imp["eps.tau"] > 0.9
    assert list(t.frame["param"])[0] == "eps.tau"
    assert t.title.endswith("(fANOVA)") and "fANOVA over 24 completed trials" in t.note


def test_importances_without_sklearn_say_so(experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without scikit-learn the table comes from PED-ANOVA and the note names the reason; tau still
    ranks first (it is the only parameter the objective depends on)."""
    import wsss_tune.analysis.tables as tables

    monkeypatch.setattr(tables, "_fanova_available", lambda: False)
    t = importance_table(load_experiment(experiment), _tau_only_study(tmp_path))
    assert "PED-ANOVA" in t.title and "scikit-learn" in t.note
    assert list(t.frame["param"])[0] == "eps.tau"


def test_moved_experiment_still_finds_its_study(experiment: Path, tmp_path: Path) -> None:
    """The recorded storage URL points at the old folder; the study file is looked up beside the results."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(experiment, moved)
    shutil.rmtree(experiment)
    assert load_study(load_experiment(moved)) is not None


def test_experiment_tables_names(experiment: Path) -> None:
    tables = experiment_tables(load_experiment(experiment))
    assert set(tables) == {"stages", "trials", "history", "importances", "curves", "stopped", "per_class", "overlap",
                           "compute", "phases", "seeds", "references"}


def test_trial_order_follows_the_study_not_the_ids(tmp_path: Path, synth_root: Path) -> None:
    """Ray's trial ids are random; the study numbers the trials in creation order. With the trials
    entering the study in reverse, the trials table (and the history) lists them in reverse."""
    exp = load_experiment(make_experiment(tmp_path / "r", synth_root, study_order=[5, 4, 3, 2, 1, 0]))
    tables = experiment_tables(exp)
    assert list(tables["trials"].frame["trial_id"]) == [f"t0000{i}" for i in range(5, -1, -1)]
    h = tables["history"].frame
    assert list(h["trial_id"]) == ["t00005", "t00003", "t00002", "t00001", "t00000"]
    assert list(h["best_so_far"]) == [40.0, 40.0, 62.0, 72.0, 72.0]
    # Without a study, the first report's time stamp orders them; the failed t00004 reported nothing
    # and comes last.
    no_study = trial_order(exp, None, exp.reports().to_pandas())
    assert no_study == ["t00005", "t00003", "t00002", "t00001", "t00000", "t00004"]


def test_overlap_table(experiment: Path) -> None:
    """Last logged overlap of disc: reference 0.06 (below its tau 0.4: EPS files disc under
    background), best 0.81 (tau 0.3)."""
    t = overlap_table(load_experiment(experiment))
    row = t.frame.set_index("class").loc["disc"]
    assert (row["reference"], row["best"]) == (0.06, 0.81)
    assert "reference tau = 0.4" in t.note and "best tau = 0.3" in t.note


def test_ray_trial_attribute_matches_the_sweep() -> None:
    """The study attribute read here is the one the sweep's search writes."""
    search = pytest.importorskip("wsss_tune.trainables.search")
    assert RAY_TRIAL_ATTR == search.RAY_TRIAL_ATTR
