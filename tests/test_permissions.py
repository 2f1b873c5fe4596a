"""Every file the project writes gets the mode the umask gives (0o666 & ~umask; folders 0o777 & ~umask),
like any Unix tool: 0o644 / 0o755 under umask 0o022, 0o600 / 0o700 under 0o077.

Covered: the atomic-write helpers (the one place files are made), then what a pipeline run, the
results writer, the report and the export leave behind (artifacts, checkpoints, parquet, JSON, HTML,
figures, CSVs, YAML), and, slow, a real sweep's experiment folder and artifact store.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsss_tune.utils.io import (
    atomic_copy,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

UMASKS = [0o022, 0o077, 0o027]


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Set the process umask to the parameter for the test, and back afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _wrong_modes(root: Path, mask: int) -> list[str]:
    """Every file and folder under ``root`` (``root`` included) whose mode is not the umask's, as
    ``path mode``; symlinks are skipped (their target is checked where it lies)."""
    want = {"f": 0o666 & ~mask, "d": 0o777 & ~mask}
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
        if stat.S_IMODE(st.st_mode) != want[kind]:
            wrong.append(f"{path.relative_to(root.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return wrong


def _count(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("umask", UMASKS, indirect=True)
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Each helper makes its file (or folder) with the umask's mode, also when it replaces a file of
    another mode (0o600 before the fix, whatever the umask); no temporary file is left."""
    out = tmp_path / "out"
    out.mkdir()
    old = out / "replaced.txt"
    old.write_text("old")
    old.chmod(0o640 if umask != 0o027 else 0o600)
    atomic_write_bytes(out / "a.bin", b"x")
    atomic_write_text(old, "new")
    atomic_write_json(out / "sub" / "c.json", {"k": 1})
    atomic_copy(out / "a.bin", out / "copy.bin")
    with atomic_dir(out / "folder") as tmp:
        (tmp / "inner.txt").write_text("y")
    assert old.read_text() == "new" and (out / "copy.bin").read_bytes() == b"x"
    assert sorted(p.name for p in out.rglob("*")) == ["a.bin", "c.json", "copy.bin", "folder", "inner.txt",
                                                      "replaced.txt", "sub"]
    assert _wrong_modes(out, umask) == []


def test_a_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing", tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_run_results_report_and_export_follow_the_umask(tmp_path: Path, synth_root: Path, umask: int) -> None:
    """Without Ray: a pipeline run (EPS: checkpoints, model, CAMs, masks in the store; config.yaml and
    metrics.json in the run folder), the results files of an experiment over it, its HTML report
    (figures, CSVs) and the exported YAML all get the umask's modes."""
    from wsss_tune.analysis import TrialRecord, export_best, write_experiment
    from wsss_tune.analysis.report import compute_report, write_report
    from wsss_tune.config import apply_overrides, load_config, to_dict
    from wsss_tune.stages.pipeline import run_pipeline
    from wsss_tune.trainables import SMOKE_OVERRIDES

    out = tmp_path / "out"
    cfg = apply_overrides(load_config("synth", {"data.root": str(synth_root), "data.num_workers": 0}),
                          {**SMOKE_OVERRIDES, "run.artifact_store": str(out / "store")})
    exp = out / "exp"
    metrics = run_pipeline(cfg, stages=("eps",), out_dir=exp / "runs" / "a")
    sweep = {"name": "exp", "metric": "eps_miou_tune", "mode": "max", "requested": 1, "stages": ["eps"],
             "reference_point": {"eps.tau": cfg.eps.tau}, "base_config": to_dict(cfg), "store": str(out / "store")}
    trial = TrialRecord(trial_id="a", status="completed", params={"eps.tau": cfg.eps.tau},
                        metrics={k: v for k, v in metrics.items() if k != "stages"}, run_dir=str(exp / "runs" / "a"))
    write_experiment(exp, sweep=sweep, trials=[trial],
                     reports=[{"trial_id": "a", "stage": "eps", "eps_miou_tune": metrics["eps_miou_tune"]}])
    export_best(exp)
    write_report(compute_report(exp, images=1), exp / "report")

    for name in ("trials.parquet", "reports.parquet", "experiment.json", "best_config.yaml",
                 "report/report.html", "report/tables/trials.csv", "runs/a/metrics.json"):
        assert (exp / name).is_file(), name
    assert any((exp / "report" / "figures").glob("*.png"))
    assert any((out / "store").rglob("*.pt")) and any((out / "store").rglob("*.png"))
    assert _count(out) > 40
    assert _wrong_modes(out, umask) == []


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_a_sweep_and_its_rerun_follow_the_umask(tmp_path: Path, synth_root: Path, umask: int) -> None:
    """A real two-trial sweep (Ray started under the umask, so its workers have it too), its report,
    its export and ``wsss-tune run --fresh`` of the export: every file of the experiment folder, the
    artifact store and the run folder has the umask's mode (Ray's own files too)."""
    import ray
    from typer.testing import CliRunner

    from wsss_tune.analysis import export_best
    from wsss_tune.analysis.report import report
    from wsss_tune.cli import app
    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep

    out = tmp_path / "out"
    out.mkdir()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep("synth_eps", data=synth_root, storage=out, name="exp", trials=2, wandb="off",
                           progress="off", overrides=SMOKE_OVERRIDES, store=str(out / "store"), reseed=None)
    finally:
        ray.shutdown()
    assert result.complete, [t.error for t in result.trials]
    report(result.path, images=1)
    best = export_best(result.path)
    res = CliRunner().invoke(app, ["run", str(best), "--stages", "eps", "--fresh", "--out", str(out / "rerun")])
    assert res.exit_code == 0, res.output

    assert (result.path / "report" / "report.html").is_file() and best.is_file()
    assert any((out / "rerun" / "fresh_artifacts").rglob("*.pt"))
    assert _count(out / "store") > 20 and _count(result.path) > 20
    assert _wrong_modes(out, umask) == []
