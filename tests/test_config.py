"""Typed configs: YAML in/out, overrides, clear errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from wsss_tune.config import (
    MAX_LOGT,
    SECTIONS,
    ConfigError,
    EPSConfig,
    PipelineConfig,
    Range,
    RWConfig,
    apply_overrides,
    builtin_configs,
    check_field,
    config_hash,
    dump_yaml,
    field_rule,
    field_type,
    from_dict,
    load_config,
    parse_override,
    parse_yaml,
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


# --------------------------------------------------------------------------------------------------
# valid values: declared once per field, checked whenever a config is made
# --------------------------------------------------------------------------------------------------

#: (override, fragment of the message): every bad value is refused at load time, naming the full key.
OUT_OF_RANGE: list[tuple[str, str]] = [
    ("eps.lr=0", "eps.lr: expected a value > 0, got 0.0"),
    ("eps.lr=-1", "eps.lr: expected a value > 0, got -1.0"),
    ("eps.lr=.inf", "eps.lr: expected a finite value > 0, got inf"),
    ("eps.batch_size=0", "eps.batch_size: expected a value >= 1, got 0"),
    ("eps.iterations=0", "eps.iterations: expected a value >= 1, got 0"),
    ("eps.crop_size=0", "eps.crop_size: expected a value >= 1, got 0"),
    ("eps.tau=1.5", "eps.tau: expected a value in [0, 1], got 1.5"),
    ("eps.tau=.nan", "eps.tau: expected a finite value in [0, 1], got nan"),
    ("eps.lam=-0.5", "eps.lam: expected a value in [0, 1], got -0.5"),
    ("eps.momentum=1", "eps.momentum: expected a value in [0, 1), got 1.0"),
    ("eps.weight_decay=-0.0001", "eps.weight_decay: expected a value >= 0, got -0.0001"),
    ("eps.bg_threshold=-0.2", "eps.bg_threshold: expected a value >= 0, got -0.2"),
    ("eps.eval_every=-1", "eps.eval_every: expected a value >= 0, got -1"),
    ("eps.checkpoint_every=0", "eps.checkpoint_every: expected a value >= 1, got 0"),
    ("eps.cam_scales=[]", "eps.cam_scales: expected at least 1 value(s), got []"),
    ("eps.cam_scales=[1.0, -0.5]", "eps.cam_scales[1]: expected a value > 0, got -0.5"),
    ("eps.resize_long=[0, 512]", "eps.resize_long[0]: expected a value >= 1, got 0"),
    ("eps.resize_long=[512, 256]", "eps.resize_long: expected [low, high] with low <= high, got [512, 256]"),
    ("eps.jitter=[0.3, 0.3, 0.3, 0.7]", "eps.jitter[3]: expected a value in [0, 0.5], got 0.7"),
    ("eps.jitter=[-0.1, 0.3, 0.3, 0.1]", "eps.jitter[0]: expected a value >= 0, got -0.1"),
    ("affinity.lr=0", "affinity.lr: expected a value > 0, got 0.0"),
    ("affinity.radius=1", "affinity.radius: expected a value >= 2, got 1"),
    ("affinity.iterations=-1", "affinity.iterations: expected a value >= 0, got -1"),
    ("affinity.epochs=0", "affinity.epochs: expected a value >= 1, got 0"),
    ("affinity.widths=[16, 0, 64]", "affinity.widths[1]: expected a value >= 1, got 0"),
    ("affinity.alpha_low=40", "affinity.alpha_low: expected a value below affinity.alpha_high (32), got 40.0"),
    ("rw.beta=-3", "rw.beta: expected a value > 0, got -3.0"),
    ("rw.alpha=0", "rw.alpha: expected a value > 0, got 0.0"),
    ("rw.logt=-1", "rw.logt: expected a value >= 0, got -1"),
    ("rw.logt=40", "rw.logt: expected a value <= 12"),
    ("deeplab.accumulate=0", "deeplab.accumulate: expected a value >= 1, got 0"),
    ("deeplab.test_scales=[]", "deeplab.test_scales: expected at least 1 value(s), got []"),
    ("deeplab.head_bias_lr_mult=-1", "deeplab.head_bias_lr_mult: expected a value >= 0, got -1.0"),
    ("data.num_workers=-1", "data.num_workers: expected a value >= 0, got -1"),
    ("run.seed=-1", "run.seed: expected a value >= 0, got -1"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints: expected a value >= 1, got 0"),
]


@pytest.mark.parametrize(("override", "fragment"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_at_load_naming_the_full_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("synth", [override])
    assert fragment in str(info.value)
    assert re.match(rf"{re.escape(override.split('=')[0])}(\[\d\])?: ", str(info.value))


@pytest.mark.parametrize(("override", "fragment"), OUT_OF_RANGE[:12], ids=[o for o, _ in OUT_OF_RANGE[:12]])
def test_out_of_range_values_in_a_file_name_the_file_and_the_key(tmp_path, override, fragment):
    key, value = parse_override(override)
    section, _, name = key.partition(".")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}: ") and fragment in str(info.value)


def test_every_range_is_also_checked_when_a_section_is_made_directly():
    """No config with a bad value exists: constructors and dataclasses.replace check too."""
    with pytest.raises(ConfigError, match=r"^eps\.tau: expected a value in \[0, 1\], got 1\.5$"):
        EPSConfig(tau=1.5)
    with pytest.raises(ConfigError, match=r"^rw\.beta: "):
        dataclasses.replace(RWConfig(), beta=0.0)
    with pytest.raises(ConfigError, match=r"^rw\.logt: expected a value <= 12"):
        dataclasses.replace(PipelineConfig(), rw=RWConfig(logt=13))


def test_boundary_values_are_accepted():
    """Closed ends are valid: tau/lam 0 and 1, hue 0.5, logt 0 and 12, momentum 0, zero intervals."""
    cfg = load_config("synth", ["eps.tau=0", "eps.lam=1", "eps.jitter=[0, 0, 0, 0.5]", "rw.logt=12",
                                "eps.momentum=0", "eps.eval_every=0", "affinity.radius=2",
                                "eps.resize_long=[300, 300]", "affinity.iterations=0"])
    assert (cfg.eps.tau, cfg.eps.lam, cfg.rw.logt, cfg.eps.jitter[3]) == (0.0, 1.0, 12, 0.5)
    assert load_config("synth", ["rw.logt=0"]).rw.logt == 0


def test_walk_steps_above_the_limit_need_allow_expensive():
    """2**logt walk steps: above MAX_LOGT only with run.allow_expensive, which the message names."""
    with pytest.raises(ConfigError) as info:
        load_config("synth", ["rw.logt=13"])
    assert "rw.logt" in str(info.value) and "run.allow_expensive" in str(info.value)
    assert "8,192 steps" in str(info.value)
    cfg = load_config("synth", ["rw.logt=13", "run.allow_expensive=true"])
    assert cfg.rw.logt == 13 and cfg.run.allow_expensive is True
    assert MAX_LOGT == 12 and PipelineConfig().run.allow_expensive is False
    with pytest.raises(ConfigError, match=r"rw\.logt: .*2\*\*100000 steps"):  # no giant number printed
        load_config("synth", ["rw.logt=100000"])


def test_check_field_checks_type_and_range_of_one_value():
    assert check_field("eps.tau", 1) == 1.0 and check_field("rw.logt", 20) == 20  # the cap needs the whole config
    for path, value, fragment in [("eps.tau", 1.5, "eps.tau: expected a value in [0, 1]"),
                                  ("eps.tau", "high", "eps.tau: expected float"),
                                  ("eps.cam_scales", [0.0], "eps.cam_scales[0]: expected a value > 0"),
                                  ("rw.nope", 1, "unknown config key 'rw.nope'")]:
        with pytest.raises(ConfigError) as info:
            check_field(path, value)
        assert fragment in str(info.value)


def test_every_numeric_field_declares_its_valid_values():
    """A new int/float field (or list of them) must say what it accepts; a declared default is valid."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            numbers = {int, float}
            is_number = tp in numbers or (typing.get_origin(tp) is tuple
                                          and set(typing.get_args(tp)) - {Ellipsis} <= numbers)
            rule = field_rule(cls, f.name)
            assert (rule is not None) == is_number, f"{section}.{f.name}"
            if rule is not None:
                rule.check(getattr(cls(), f.name), f"{section}.{f.name}")


def test_range_describe():
    assert Range(0, 1).describe() == "a value in [0, 1]"
    assert Range(0, 1, high_open=True).describe() == "a value in [0, 1)"
    assert Range(0, low_open=True).describe() == "a value > 0"
    assert Range(high=2.5).describe() == "a value <= 2.5"
    assert 0.0 not in Range(0, low_open=True) and 1e-12 in Range(0, low_open=True)
    assert float("inf") not in Range(0) and True not in Range(0) and "1" not in Range(0)


# --------------------------------------------------------------------------------------------------
# the file itself: empty, comment-only, duplicate keys
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "---\n"])
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: the file is empty"):
        load_config(path)


def test_an_explicit_empty_mapping_means_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    cfg = load_config(path)
    assert (cfg.eps, cfg.rw, cfg.deeplab) == (PipelineConfig().eps, PipelineConfig().rw, PipelineConfig().deeplab)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("eps:\n  tau: 0.3\n  lr: 0.1\n  tau: 0.5\n", "eps.tau", 4),
        ("name: a\neps: {tau: 0.3}\nname: b\n", "name", 3),
        ("eps:\n  tau: 0.3\neps:\n  lam: 0.4\n", "eps", 3),
        ("deeplab:\n  scales: [1.0]\n  test_scales: [1.0]\n  scales: [0.5]\n", "deeplab.scales", 4),
    ],
)
def test_a_duplicate_key_is_an_error_naming_the_file_and_key(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: duplicate key {key!r} (again on line {line}); YAML would keep only "
                               "the last value")


def test_yaml_anchors_and_merges_are_not_duplicates(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("eps: &e {tau: 0.3, lam: 0.6}\naffinity:\n  lr: 0.05\n")
    assert load_config(path).eps.tau == 0.3
    text = "a: &x {b: 1}\nc:\n  <<: *x\n  b: 2\n"
    assert parse_yaml(text) == {"a": {"b": 1}, "c": {"b": 2}}


def test_a_file_that_is_not_text_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: cannot read it as UTF-8 text"):
        load_config(path)
