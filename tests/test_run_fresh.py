"""``wsss-tune run`` says, per stage, whether the artifact store served it or it was trained, and
``--fresh`` runs a config in a new, empty store; ``wsss-tune export`` says which store its file reads.
No Ray: the pipeline runs in-process on the tiny synthetic dataset with the smoke settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from wsss_tune.analysis import TrialRecord, write_experiment
from wsss_tune.cli import FRESH_STORE_DIR, app
from wsss_tune.config import apply_overrides, dump_yaml, load_config, to_dict
from wsss_tune.trainables import SMOKE_OVERRIDES

runner = CliRunner()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One CPU thread, as a trial runs: the same config gives bit-identical numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path, synth_root: Path) -> Path:
    """A config like an exported one: full, with ``run.artifact_store`` set to a shared store."""
    cfg = apply_overrides(load_config("synth", {"data.root": str(synth_root), "data.num_workers": 0}),
                          {**SMOKE_OVERRIDES, "run.artifact_store": str(tmp_path / "store"), "name": "exp-best"})
    path = tmp_path / "best.yaml"
    dump_yaml(cfg, path)
    return path


def _run(*args: str) -> tuple[str, dict[str, Any]]:
    res = runner.invoke(app, ["run", *args])
    assert res.exit_code == 0, res.output
    out = Path(res.output.rsplit("run folder: ", 1)[1].strip())
    return res.output, json.loads((out / "metrics.json").read_text())


def _stage_line(output: str, stage: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith(f"{stage} "))


def test_run_says_cache_or_trained_and_fresh_retrains_to_the_same_number(tmp_path: Path, synth_root: Path,
                                                                        one_thread: None) -> None:
    """First run: the store is empty, so eps_model is trained and eps (the CAMs and masks) computed.
    Second run of the same file (another run folder, same store): both served from the cache and the
    output says nothing was recomputed. ``--fresh``: store OUT/fresh_artifacts, trained again, the
    same eps_miou to the last bit. ``--fresh`` again into that folder is refused, naming it."""
    config = _config(tmp_path, synth_root)
    store = tmp_path / "store"

    first, m1 = _run(str(config), "--stages", "eps", "--out", str(tmp_path / "run1"))
    assert f"artifact store: {store}" in first
    assert "trained in" in _stage_line(first, "eps_model") and "computed in" in _stage_line(first, "eps")
    assert "served from the cache" not in first
    # the printout has the halves a sweep optimises and reports, not only the whole split
    assert all(f'"eps_miou{half}"' in first for half in ("", "_tune", "_heldout"))

    again, m2 = _run(str(config), "--stages", "eps", "--out", str(tmp_path / "run2"))
    assert all("served from the cache" in _stage_line(again, s) for s in ("eps_model", "eps"))
    assert "every stage was served from the cache" in again and "--fresh" in again
    assert m2["eps_miou_tune"] == m1["eps_miou_tune"] and all(i["hit"] for i in m2["stages"].values())

    fresh_out = tmp_path / "run3"
    fresh, m3 = _run(str(config), "--stages", "eps", "--out", str(fresh_out), "--fresh")
    fresh_store = fresh_out / FRESH_STORE_DIR
    assert f"artifact store: {fresh_store} (new and empty: --fresh)" in fresh
    assert "trained in" in _stage_line(fresh, "eps_model") and "served from the cache" not in fresh
    assert not any(i["hit"] for i in m3["stages"].values())
    assert all(Path(i["path"]).is_relative_to(fresh_store) for i in m3["stages"].values())
    assert m3["eps_miou_tune"] == m1["eps_miou_tune"]
    assert load_config(fresh_out / "config.yaml").run.artifact_store == str(fresh_store)

    res = runner.invoke(app, ["run", str(config), "--stages", "eps", "--out", str(fresh_out), "--fresh"])
    assert res.exit_code == 2 and str(fresh_store) in res.output and "already holds" in res.output


def test_fresh_and_an_explicit_store_conflict(tmp_path: Path, synth_root: Path) -> None:
    res = runner.invoke(app, ["run", str(_config(tmp_path, synth_root)), "--stages", "eps", "--fresh",
                              "--set", f"run.artifact_store={tmp_path / 'other'}", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--fresh" in res.output and "run.artifact_store" in res.output
    assert not (tmp_path / "r").exists()


def test_export_says_which_store_the_file_reads(tmp_path: Path) -> None:
    """The exported YAML reads the sweep's store; the command says so and offers ``--fresh``."""
    base = load_config("synth", {"data.root": str(tmp_path / "data")})
    sweep = {"name": "exp", "metric": "eps_miou_tune", "mode": "max", "requested": 1,
             "reference_point": {"eps.tau": 0.4}, "base_config": to_dict(base), "store": str(tmp_path / "store"),
             "stages": ["eps"]}
    trial = TrialRecord(trial_id="a", status="completed", params={"eps.tau": 0.4}, metrics={"eps_miou_tune": 50.0})
    write_experiment(tmp_path / "exp", sweep=sweep, trials=[trial], reports=[])
    res = runner.invoke(app, ["export", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert f"reads the experiment's artifact store {tmp_path / 'store'}" in " ".join(res.output.split())
    assert "--fresh" in res.output
