"""Typed configs: YAML in/out, overrides, clear errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from wsss_tune.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    builtin_configs,
    config_hash,
    dump_yaml,
    field_type,
    from_dict,
    load_config,
    to_dict,
)


def test_builtin_configs_load_and_roundtrip(tmp_path):
    assert {"synth", "voc"} <= set(builtin_configs())
    for name in builtin_configs():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        dump_yaml(cfg, path)
        again = load_config(path)
        assert again == cfg


def test_defaults_are_the_reference_values():
    """DESIGN.md §2: tau 0.4, lambda 0.5, LR 0.01, momentum quirk 5e-4, bg 0.20, beta 8, logt 8, alpha 16."""
    cfg = PipelineConfig()
    assert (cfg.eps.tau, cfg.eps.lam, cfg.eps.lr, cfg.eps.momentum) == (0.4, 0.5, 0.01, 5e-4)
    assert (cfg.eps.bg_threshold, cfg.eps.bg_mode, cfg.eps.cam_scales) == (0.2, "constant", (0.5, 1.0, 1.5, 2.0))
    assert (cfg.rw.beta, cfg.rw.logt, cfg.rw.alpha, cfg.rw.pad_border) == (8.0, 8, 16.0, False)
    assert (cfg.deeplab.lr, cfg.deeplab.momentum, cfg.deeplab.crop_size) == (2.5e-4, 0.9, 321)
    assert (cfg.affinity.widths, cfg.affinity.out_channels, cfg.affinity.radius) == ((128, 256, 512), 896, 5)


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(PipelineConfig(), ["eps.tau=0.3", "eps.cam_scales=[1.0, 2.0]", "rw.pad_border=true"])
    assert cfg.eps.tau == 0.3 and cfg.eps.cam_scales == (1.0, 2.0) and cfg.rw.pad_border is True
    cfg = apply_overrides(cfg, {"rw.logt": 4, "eps.lr": 1})  # int accepted for float
    assert cfg.rw.logt == 4 and cfg.eps.lr == 1.0 and isinstance(cfg.eps.lr, float)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["eps.taux=0.3"], "eps.taux"),
        (["epz.tau=0.3"], "epz.tau"),
        (["eps.tau=abc"], "eps.tau: expected float"),
        (["rw.logt=2.5"], "rw.logt: expected int"),
        (["eps.method=foo"], "eps.method"),
        (["eps.resize_long=[1, 2, 3]"], "eps.resize_long"),
        (["rw.pad_border=1"], "rw.pad_border: expected bool"),
        (["eps.tau"], "expected 'section.field=value'"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        apply_overrides(PipelineConfig(), override)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"eps": {"tua": 0.3}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: eps: unknown key\(s\) 'tua'"):
        load_config(bad)
    bad.write_text(yaml.safe_dump({"epss": {}}))
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(bad)
    bad.write_text("eps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file and not a built-in"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_become_absolute(tmp_path):
    cfg = load_config("synth", base_dir=tmp_path)
    assert cfg.data.root == str((tmp_path / "data" / "synth").resolve())
    cfg = load_config("synth", ["data.root=s3://bucket/voc"], base_dir=tmp_path)
    assert cfg.data.root == "s3://bucket/voc"


def test_config_hash_is_stable_and_sensitive():
    a = PipelineConfig()
    assert config_hash(a.eps) == config_hash(from_dict(to_dict(a)).eps)
    assert config_hash(a.eps) != config_hash(apply_overrides(a, ["eps.tau=0.41"]).eps)
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_field_type_lookup():
    assert field_type("eps.tau") is float
    with pytest.raises(ConfigError, match="section 'rw' has fields"):
        field_type("rw.nope")
