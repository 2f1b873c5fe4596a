"""Search spaces: the shipped files, every validation error, the reference point and the grid."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsss_tune.config import load_config
from wsss_tune.spaces import SearchSpace, SpaceError, list_spaces, load_space, space_from_dict

SHIPPED = {"eps", "rw", "deeplab", "pipeline", "synth_eps", "synth_rw", "synth_deeplab", "synth_pipeline",
           "synth_gap", "recipes"}

#: A valid space on the built-in ``synth`` config (rw.beta 8.0, rw.logt 3, rw.bg_mode 'power').
VALID: dict[str, Any] = {
    "base": "synth",
    "stages": ["eps", "affinity"],
    "metric": "rw_miou_tune",
    "mode": "max",
    "tune_split": "train_tune",
    "heldout_split": "train_heldout",
    "num_samples": 4,
    "overrides": {"rw.pad_border": True},
    "fidelity": {"time_attr": "stage_step", "max_t": 8, "grace_period": 2, "reduction_factor": 2},
    "params": {
        "rw.beta": {"kind": "uniform", "low": 2, "high": 12},
        "rw.logt": {"kind": "int", "low": 1, "high": 5},
        "rw.bg_mode": {"kind": "categorical", "choices": ["power", "learned"]},
    },
}


def write(tmp_path: Path, data: Any, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# shipped files
# --------------------------------------------------------------------------------------------------


def test_every_shipped_space_loads_and_validates() -> None:
    """Each VOC space has a synthetic twin over the same parameters; all optimise a *_tune metric,
    upwards, with distinct tune and held-out splits."""
    spaces = list_spaces()
    assert set(spaces) == SHIPPED
    loaded = {name: load_space(name) for name in spaces}
    for name, space in loaded.items():
        assert space.name == name and space.source == spaces[name]
        assert space.metric.endswith("_miou_tune") and space.mode == "max"
        assert space.tune_split != space.heldout_split
        expected_base = "synth_paper" if name == "synth_gap" else "synth" if name.startswith("synth_") else "voc"
        assert space.base == expected_base
    for name in ("eps", "rw", "deeplab", "pipeline"):
        twin = loaded[f"synth_{name}"]
        assert [p.path for p in loaded[name].params] == [p.path for p in twin.params]
        assert (loaded[name].metric, loaded[name].stages) == (twin.metric, twin.stages)


def test_reference_points_are_the_papers_settings() -> None:
    """Hand-copied from DESIGN.md §2 (EPS tau 0.4, lam 0.5; walk beta 8, logt 8, alpha 16; DeepLab
    LR 2.5e-4, head 10x, biases 20x), from the PPC reference (plain EPS first; weight 0.1, temperature
    0.1, 1/16 of a map's pixels per prototype: docs/ppc.md) and from the built-in synth config (beta 8,
    logt 3, alpha 4)."""
    assert load_space("eps").reference_point() == {
        "eps.tau": 0.4, "eps.lam": 0.5, "eps.method": "eps", "eps.ppc_weight": 0.1, "eps.ppc_temperature": 0.1,
        "eps.ppc_confident_share": 1 / 16}
    assert load_space("rw").reference_point() == {"rw.beta": 8.0, "rw.logt": 8, "rw.alpha": 16.0}
    assert load_space("deeplab").reference_point() == {
        "deeplab.lr": 2.5e-4, "deeplab.head_lr_mult": 10.0, "deeplab.head_bias_lr_mult": 20.0,
        "deeplab.pseudo_crf": False}
    assert load_space("synth_rw").reference_point() == {"rw.beta": 8.0, "rw.logt": 3, "rw.alpha": 4.0}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_reference_point_equals_the_base_config(name: str) -> None:
    space = load_space(name)
    cfg = load_config(space.base)
    expected = {p.path: getattr(getattr(cfg, p.path.split(".")[0]), p.path.split(".")[1]) for p in space.params}
    assert space.reference_point() == expected
    assert all(p.contains(expected[p.path]) for p in space.params)


# --------------------------------------------------------------------------------------------------
# loading and the protocol's splits
# --------------------------------------------------------------------------------------------------


def test_derived_halves_leave_the_split_fields_to_the_data_layer(tmp_path: Path) -> None:
    """train_tune/train_heldout are the halves of rw's evaluation split (data.mask_eval_split =
    'train'), so the config keeps data.tune_split/heldout_split empty (the data layer derives them);
    id-list files are passed on by name. Overrides apply either way."""
    derived = load_space(write(tmp_path, VALID)).base_config()
    assert (derived.data.tune_split, derived.data.heldout_split) == ("", "")
    assert derived.rw.pad_border is True
    files = load_space(write(tmp_path, {**VALID, "tune_split": "ids_a", "heldout_split": "ids_b"}))
    cfg = files.base_config()
    assert (cfg.data.tune_split, cfg.data.heldout_split) == ("ids_a", "ids_b")


def test_base_path_is_relative_to_the_space_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """base 'configs/mine.yaml' next to the space sets rw.beta 5.0 (and logt 3, inside the space's
    [1, 5]): the reference point reads them from that file, whatever the working directory."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("name: mine\nrw:\n  beta: 5.0\n  logt: 3\n")
    path = write(tmp_path, {**VALID, "base": "configs/mine.yaml"})
    monkeypatch.chdir("/")
    assert load_space(str(path)).reference_point()["rw.beta"] == 5.0


def test_a_space_file_that_is_not_text_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "x")
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert (info.value.source, info.value.key) == (str(path), "<file>") and "UTF-8" in info.value.message


def test_unknown_space_names_the_built_ins() -> None:
    with pytest.raises(SpaceError, match="built-in: deeplab, eps, pipeline"):
        load_space("no_such_space")


def test_space_from_dict_and_error_pickling() -> None:
    """A dict without a file is named by its name; SpaceError survives pickling (Ray ships it)."""
    space = space_from_dict(copy.deepcopy(VALID), name="inline")
    assert isinstance(space, SearchSpace) and space.name == "inline" and space.source is None
    with pytest.raises(SpaceError) as info:
        space_from_dict({**VALID, "mode": "up"}, name="inline")
    err = pickle.loads(pickle.dumps(info.value))
    assert (err.source, err.key, str(err)) == ("<search space 'inline'>", "mode", str(info.value))


# --------------------------------------------------------------------------------------------------
# every invalid case -> SpaceError naming the file and the key
# --------------------------------------------------------------------------------------------------


def _param(path: str, **spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data["params"][path] = spec
    return data


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    for k, v in changes.items():
        if v is None:
            del data[k]
        else:
            data[k] = v
    return data


INVALID: list[tuple[str, Any, str]] = [
    # parameters: path, distribution, range, choices
    ("unknown param field name", _param("rw.betta", kind="uniform", low=1, high=2), "params.rw.betta"),
    ("unknown param section", _param("foo.bar", kind="uniform", low=1, high=2), "params.foo.bar"),
    ("unknown distribution", _param("rw.beta", kind="gaussian", low=2, high=12), "params.rw.beta.kind"),
    ("uniform on an int field", _param("rw.logt", kind="uniform", low=1, high=5), "params.rw.logt.kind"),
    ("int on a float field", _param("rw.beta", kind="int", low=2, high=12), "params.rw.beta.kind"),
    ("loguniform on a str field", _param("rw.bg_mode", kind="loguniform", low=1, high=2), "params.rw.bg_mode.kind"),
    ("empty range low == high", _param("rw.beta", kind="uniform", low=5, high=5), "params.rw.beta"),
    ("empty range low > high", _param("rw.beta", kind="uniform", low=12, high=2), "params.rw.beta"),
    ("empty int range", _param("rw.logt", kind="int", low=5, high=1), "params.rw.logt"),
    ("log scale from zero", _param("rw.beta", kind="loguniform", low=0, high=12), "params.rw.beta.low"),
    ("empty choices", _param("rw.bg_mode", kind="categorical", choices=[]), "params.rw.bg_mode.choices"),
    ("choice not in the Literal", _param("rw.bg_mode", kind="categorical", choices=["power", "sigmoid"]),
     "params.rw.bg_mode.choices[1]"),
    ("choice of the wrong type", _param("rw.logt", kind="categorical", choices=[3, "four"]),
     "params.rw.logt.choices[1]"),
    ("unknown field of a parameter", _param("rw.beta", kind="uniform", low=2, hi=12), "params.rw.beta.hi"),
    ("missing bound", _param("rw.beta", kind="uniform", low=2), "params.rw.beta.high"),
    ("fractional int bound", _param("rw.logt", kind="int", low=1.5, high=5), "params.rw.logt.low"),
    ("step does not divide the range", _param("rw.logt", kind="int", low=1, high=5, step=3), "params.rw.logt.step"),
    ("log int with a step", _param("rw.logt", kind="int", low=1, high=5, step=2, log=True), "params.rw.logt.step"),
    ("reference point outside the range", _param("rw.beta", kind="uniform", low=9, high=12), "params.rw.beta"),
    # parameters against the config's declared valid values
    ("range past a field's upper limit", _param("eps.tau", kind="uniform", low=0.3, high=1.5), "params.eps.tau.high"),
    ("range below a field's lower limit", _param("eps.lam", kind="uniform", low=-0.5, high=0.8),
     "params.eps.lam.low"),
    ("range from an excluded end", _param("eps.lr", kind="uniform", low=0, high=0.01), "params.eps.lr.low"),
    ("walk steps past the limit", _param("rw.logt", kind="int", low=1, high=40), "params.rw.logt.high"),
    ("choice outside the valid values", _param("rw.alpha", kind="categorical", choices=[4.0, -1.0]),
     "params.rw.alpha.choices[1]"),
    # each range is fine with the base (alpha_low 4, alpha_high 32); alpha_low 20 with alpha_high 10 is not
    ("ranges whose corners break a rule", _with(params={
        **VALID["params"], "affinity.alpha_low": {"kind": "uniform", "low": 2, "high": 20},
        "affinity.alpha_high": {"kind": "uniform", "low": 10, "high": 40}}), "params.affinity.alpha_low"),
    ("no parameters", _with(params={}), "params"),
    # top level
    ("unknown top-level key", _with(sampler="tpe"), "sampler"),
    ("missing required key", _with(metric=None), "metric"),
    ("metric over held-out images", _with(metric="rw_miou"), "metric"),
    ("metric of a stage not run", _with(metric="deeplab_miou_tune"), "metric"),
    ("bad mode", _with(mode="maximize"), "mode"),
    ("unknown stage", _with(stages=["eps", "rw"]), "stages"),
    ("no stages", _with(stages=[]), "stages"),
    ("param of a stage not run", _with(stages=["eps"], metric="eps_miou_tune"), "params.rw.beta"),
    ("tune split is the held-out split", _with(heldout_split="train_tune"), "heldout_split"),
    ("halves of the wrong split", _with(tune_split="val_tune", heldout_split="val_heldout"), "tune_split"),
    ("unknown base config", _with(base="no_such_config"), "base"),
    ("num_samples below 1", _with(num_samples=0), "num_samples"),
    # overrides
    ("override of a searched parameter", _with(overrides={"rw.beta": 8.0}), "overrides.rw.beta"),
    ("override of an unknown field", _with(overrides={"rw.nope": 1}), "overrides.rw.nope"),
    ("override of the wrong type", _with(overrides={"rw.pad_border": "yes"}), "overrides.rw.pad_border"),
    ("override of the split fields", _with(overrides={"data.tune_split": "x"}), "overrides.data.tune_split"),
    ("override outside the valid values", _with(overrides={"rw.alpha": 0}), "overrides.rw.alpha"),
    ("override breaking a rule over fields", _with(overrides={"eps.resize_long": [200, 100]}),
     "overrides.eps.resize_long"),
    # fidelity
    ("grace period above max_t", _with(fidelity={"max_t": 8, "grace_period": 9}), "fidelity.grace_period"),
    ("unknown fidelity key", _with(fidelity={"max_t": 8, "grace_period": 2, "milestones": [2]}),
     "fidelity.milestones"),
    ("reduction factor 1", _with(fidelity={"max_t": 8, "grace_period": 2, "reduction_factor": 1}),
     "fidelity.reduction_factor"),
    # YAML itself
    ("a key given twice", "base: synth\nbase: voc\n", "<yaml>"),
]


def test_every_invalid_case_is_listed_once() -> None:
    assert len(INVALID) == 48 and len({name for name, _, _ in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("data", "key"), [(d, k) for _, d, k in INVALID], ids=[n for n, _, _ in INVALID])
def test_invalid_space_names_file_and_key(tmp_path: Path, data: Any, key: str) -> None:
    path = write(tmp_path, data, name="bad_space.yaml")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert info.value.key == key and info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_range_errors_carry_the_config_message_with_the_full_key(tmp_path: Path) -> None:
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, _param("eps.tau", kind="uniform", low=0.3, high=1.5)))
    assert "eps.tau: expected a value in [0, 1], got 1.5" in info.value.message
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, _param("rw.logt", kind="int", low=1, high=40)))
    assert "rw.logt: expected a value <= 12" in info.value.message and "run.allow_expensive" in info.value.message


def test_walk_steps_past_the_limit_are_searchable_when_allowed(tmp_path: Path) -> None:
    """run.allow_expensive in the overrides lifts the rw.logt cap for the whole space."""
    data = _param("rw.logt", kind="int", low=1, high=14)
    data["overrides"] = {**data["overrides"], "run.allow_expensive": True}
    space = load_space(write(tmp_path, data))
    assert space.base_config().run.allow_expensive is True
    assert next(p for p in space.params if p.path == "rw.logt").high == 14


def test_the_valid_space_is_valid(tmp_path: Path) -> None:
    """The base of every invalid case above loads, so each case fails for its one change."""
    space = load_space(write(tmp_path, VALID))
    assert space.reference_point() == {"rw.beta": 8.0, "rw.logt": 3, "rw.bg_mode": "power"}
    assert space.fidelity is not None and space.fidelity.max_t == 8


# --------------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------------


def test_stages_are_put_in_pipeline_order(tmp_path: Path) -> None:
    assert load_space(write(tmp_path, _with(stages=["affinity", "eps"]))).stages == ("eps", "affinity")
    assert load_space(write(tmp_path, _with(stages="all"))).stages == ("eps", "affinity", "deeplab")


def test_sample_grid(tmp_path: Path) -> None:
    """n = 3: rw.beta uniform [2, 12] -> 2, 7, 12; rw.logt int [1, 5] -> 1, 3, 5; rw.bg_mode ->
    both choices: 3 * 3 * 2 = 18 points, first parameter slowest."""
    space = load_space(write(tmp_path, VALID))
    grid = space.sample_grid(3)
    assert len(grid) == 18
    assert grid[0] == {"rw.beta": 2.0, "rw.logt": 1, "rw.bg_mode": "power"}
    assert grid[1] == {"rw.beta": 2.0, "rw.logt": 1, "rw.bg_mode": "learned"}
    assert grid[-1] == {"rw.beta": 12.0, "rw.logt": 5, "rw.bg_mode": "learned"}
    assert sorted({g["rw.beta"] for g in grid}) == [2.0, 7.0, 12.0]
    assert sorted({g["rw.logt"] for g in grid}) == [1, 3, 5]
    with pytest.raises(ValueError, match="n=0"):
        space.sample_grid(0)


def test_param_grid_log_int_and_step() -> None:
    """loguniform [1, 16], n = 3 -> 1, 4, 16 (4 = sqrt(1 * 16)); n = 1 -> the geometric midpoint 4.
    int [1, 5], n = 9: 1, 1.5, ..., 5 rounded (half to even) = 1,2,2,2,3,4,4,4,5 -> 1..5 once each.
    uniform [0.1, 0.7] step 0.1, n = 3 -> 0.1, 0.4, 0.7 (already on the step grid)."""
    alpha, logt = load_space("synth_pipeline").params[4], load_space("synth_rw").params[1]
    assert alpha.path == "rw.alpha" and alpha.grid(3) == pytest.approx([1.0, 4.0, 16.0])
    assert alpha.grid(1) == pytest.approx([4.0])
    assert logt.path == "rw.logt" and logt.grid(9) == [1, 2, 3, 4, 5]
    data = _param("eps.tau", kind="uniform", low=0.1, high=0.7, step=0.1)
    data.update(stages=["eps", "affinity"])
    tau = next(p for p in space_from_dict(data).params if p.path == "eps.tau")
    assert tau.grid(3) == pytest.approx([0.1, 0.4, 0.7])
    assert tau.contains(0.4) and not tau.contains(0.45) and not tau.contains(0.8)
