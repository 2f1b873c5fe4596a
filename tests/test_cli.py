"""The ``wsss-tune`` command: thin subcommands with clear errors and non-zero exits on failure."""

from __future__ import annotations

import shutil

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
