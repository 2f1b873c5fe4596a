"""The ``wsss-tune`` command: thin subcommands with clear errors and non-zero exits on failure."""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

from wsss_tune.cli import app

runner = CliRunner()


def test_config_show_resolves_and_applies_overrides():
    res = runner.invoke(app, ["config", "show", "synth", "--set", "eps.tau=0.25"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["eps"]["tau"] == 0.25 and cfg["name"] == "synth"
    assert cfg["data"]["root"].startswith("/")  # absolute: Ray runs trials in other folders


def test_config_errors_name_the_key():
    res = runner.invoke(app, ["config", "show", "synth", "--set", "eps.tau=abc"])
    assert res.exit_code == 2 and "eps.tau: expected float" in res.output
    res = runner.invoke(app, ["run", "synth", "--set", "rw.nope=1"])
    assert res.exit_code == 2 and "rw.nope" in res.output
    res = runner.invoke(app, ["run", "synth", "--stages", "eps,segment"])
    assert res.exit_code == 2 and "segment" in res.output


def test_data_synth_then_check(tmp_path, synth_root):
    out = tmp_path / "ds"
    res = runner.invoke(app, ["data", "synth", str(out), "--preset", "tiny", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert (out / "cls_labels.npy").is_file() and (out / "ImageSets" / "Segmentation" / "val.txt").is_file()
    res = runner.invoke(app, ["data", "check", str(out)])
    assert res.exit_code == 0, res.output
    victim = sorted((out / "SaliencyMaps").iterdir())[0]
    victim.unlink()
    res = runner.invoke(app, ["data", "check", str(out)])
    assert res.exit_code == 1
    assert victim.name in res.output


def test_data_check_without_saliency_ignores_missing_maps(tmp_path, synth_root):
    ds = tmp_path / "ds"
    shutil.copytree(synth_root, ds)
    shutil.rmtree(ds / "SaliencyMaps")
    assert runner.invoke(app, ["data", "check", str(ds)]).exit_code == 1
    assert runner.invoke(app, ["data", "check", str(ds), "--no-saliency"]).exit_code == 0


# ---- sweeps with failed trials -------------------------------------------------------------------


class _FakeResult:
    """What the sweep entry points return, as far as the CLI reads it."""

    def __init__(self, path, failed: int, total: int = 3) -> None:
        self.path = path
        self.counts = {"total": total, "completed": total - failed, "failed": failed}


@pytest.mark.parametrize("command", ["sweep", "resume", "demo"])
def test_failed_trials_exit_1_unless_allowed(command, tmp_path, monkeypatch):
    """A sweep, resume or demo whose result counts a failed trial exits 1 naming how many failed and
    how to go on; ``--allow-failures`` exits 0; without failures the exit is 0."""
    import wsss_tune.trainables.sweep as sweep_module

    failed = {"n": 1}
    fake = lambda *args, **kwargs: _FakeResult(tmp_path / "exp", failed["n"])  # noqa: E731
    monkeypatch.setattr(sweep_module, command, fake)
    argv = {"sweep": ["sweep", "synth_rw"], "resume": ["resume", str(tmp_path / "exp")], "demo": ["demo"]}[command]
    res = runner.invoke(app, argv)
    assert res.exit_code == 1, res.output
    assert "error: 1 of 3 trial(s)" in res.stderr and "--allow-failures" in res.stderr
    assert runner.invoke(app, [*argv, "--allow-failures"]).exit_code == 0
    failed["n"] = 0
    assert runner.invoke(app, argv).exit_code == 0


@pytest.fixture(scope="module")
def ray_local():
    """A local CPU-only Ray instance for this module (the CLI's sweeps use it)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_with_a_diverging_trial_exits_1(ray_local, synth_root, tmp_path, monkeypatch):
    """The failure of tests/test_reliability_trials.py (an EPS learning rate of 1e30 makes the loss
    non-finite at step 2; the value passes validation) in a one-trial sweep through the CLI: the trial
    fails, the summary names it, the command exits 1; ``resume --allow-failures`` of the same
    experiment (nothing left to run) exits 0, plain ``resume`` exits 1 again."""
    from wsss_tune.trainables import SMOKE_OVERRIDES

    monkeypatch.setenv("WANDB_MODE", "offline")
    space = tmp_path / "tau.yaml"
    space.write_text(yaml.safe_dump({
        "base": "synth", "stages": ["eps"], "metric": "eps_miou_tune", "mode": "max",
        "tune_split": "train_tune", "heldout_split": "train_heldout", "num_samples": 1,
        "params": {"eps.tau": {"kind": "categorical", "choices": [0.4, 0.5]}},  # 0.4: the synth value
    }))
    # "1.0e+30": YAML (which reads --set values) takes "1e+30", without the point, for a string.
    sets = [a for k, v in {**SMOKE_OVERRIDES, "eps.lr": "1.0e+30"}.items() for a in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["sweep", str(space), "--data", str(synth_root), "--storage", str(tmp_path),
                              "--name", "diverging", "--wandb", "off", "--progress", "off",
                              "--store", str(tmp_path / "store"), "--reseed-seeds", "0", *sets])
    assert res.exit_code == 1, res.output
    assert "eps/loss became" in res.output and "error: 1 of 1 trial(s)" in res.stderr
    exp = str(tmp_path / "diverging")
    assert runner.invoke(app, ["resume", exp, "--progress", "off", "--allow-failures"]).exit_code == 0
    again = runner.invoke(app, ["resume", exp, "--progress", "off"])
    assert again.exit_code == 1 and "error: 1 of 1 trial(s)" in again.stderr


def test_data_check_warns_of_images_with_no_class_and_still_passes(tmp_path, synth_root):
    """An all-zero label vector is listed by id as a warning; the check still exits 0."""
    import numpy as np

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    victim = sorted(labels)[0]
    labels[victim] = np.zeros_like(labels[victim])
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    res = runner.invoke(app, ["data", "check", str(root), "--splits", "train_aug"])
    assert res.exit_code == 0, res.output
    assert victim in res.output and "no class at all" in res.output and "1 warning(s)" in res.output
