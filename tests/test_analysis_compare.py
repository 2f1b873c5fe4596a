"""``compare`` on two saved experiments: differing config fields and the stage tables side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_analysis_data import TRIALS, make_experiment

from wsss_tune.analysis.compare import compare_experiments, config_diff, flatten_config, format_comparison


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> tuple[Path, Path]:
    """Experiment a: the shared fixture (best t00001: tau 0.3, beta 10, DeepLab 72 / 70). Experiment b:
    the same, except trial t00002 now wins (tau 0.45, beta 11; EPS 66 / 64, refined 71 / 70, DeepLab
    75 / 73) and its base config walks with rw.logt 4 instead of the synth setting's 3."""
    root = tmp_path_factory.mktemp("compare")
    a = make_experiment(root / "a", synth_root, name="exp-a")
    trials = list(TRIALS)
    trials[2] = ("t00002", "completed", 0.45, 11.0, "eps", (66, 64), (71, 70), (75, 73), 82.0)
    b = make_experiment(root / "b", synth_root, name="exp-b", trials=trials, base_overrides={"rw.logt": 4})
    return a, b


def test_config_diff_lists_only_differing_fields(pair: tuple[Path, Path]) -> None:
    """Best configs differ in the searched eps.tau (0.3 vs 0.45) and rw.beta (10 vs 11) and in the fixed
    rw.logt (3 vs 4); nothing else (same data root, same store, names ignored)."""
    c = compare_experiments(*pair)
    rows = {r["field"]: r for r in c.config.frame.to_dict("records")}
    assert set(rows) == {"eps.tau", "rw.beta", "rw.logt"}
    assert (rows["eps.tau"]["a"], rows["eps.tau"]["b"], rows["eps.tau"]["searched"]) == (0.3, 0.45, True)
    assert (rows["rw.logt"]["a"], rows["rw.logt"]["b"], rows["rw.logt"]["searched"]) == (3, 4, False)


def test_stage_tables_side_by_side(pair: tuple[Path, Path]) -> None:
    """Best held-out b - a per stage: EPS 64 - 63 = 1, refined 70 - 68 = 2, DeepLab 73 - 70 = 3; the CAM
    baseline (trial t00005 in both) gives 0."""
    f = compare_experiments(*pair).stages.frame.set_index("stage")
    assert f.loc["EPS pseudo-mask", "b - a best held-out"] == pytest.approx(1.0)
    assert f.loc["refined", "b - a best held-out"] == pytest.approx(2.0)
    assert f.loc["DeepLab", "b - a best held-out"] == pytest.approx(3.0)
    assert f.loc["CAM", "b - a best held-out"] == pytest.approx(0.0)
    assert f.loc["DeepLab", "a reference held-out"] == pytest.approx(63.0)


def test_format_and_cli(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The Markdown shows both experiments and the differing fields; the CLI prints and writes it."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    text = format_comparison(compare_experiments(*pair))
    assert "| a | exp-a |" in text and "| b | exp-b |" in text
    assert "| rw.logt | 3 | 4 |  |" in text
    res = CliRunner().invoke(app, ["compare", str(pair[0]), str(pair[1]), "--out", str(tmp_path / "c.md")])
    assert res.exit_code == 0, res.output
    assert "| eps.tau | 0.3 | 0.45 | yes |" in res.output
    assert (tmp_path / "c.md").read_text().startswith("# Compare: a = exp-a, b = exp-b")


def test_flatten_and_diff_of_missing_config() -> None:
    """A missing best config (no completed trial) differs in every field the other one has."""
    flat = flatten_config({"eps": {"tau": 0.4, "cam_scales": [1.0]}, "name": "x"})
    assert flat == {"eps.tau": 0.4, "eps.cam_scales": [1.0], "name": "x"}
    diff = config_diff(flat, None)
    assert list(diff["field"]) == ["eps.cam_scales", "eps.tau"]
    assert diff["b"].isna().all()
