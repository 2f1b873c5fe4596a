"""Several named reference points: a space's ``references`` (config names -> their values of the
searched parameters), evaluated first and protected from early stopping, shown beside the best in the
report and priced as whole trials by ``plan``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsss_tune.analysis.plan import DatasetSizes, StageTimings, count_stages, expected_cost, parse_sizes
from wsss_tune.analysis.results import load_experiment, space_to_dict
from wsss_tune.analysis.tables import reference_table
from wsss_tune.config import load_config
from wsss_tune.spaces import Param, SearchSpace, SpaceError, load_space, space_from_dict

# --------------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------------


def test_the_deeplab_space_starts_from_both_recipes() -> None:
    """``deeplab``: the base (voc: deeplab-pytorch's LR 2.5e-4, no CRF on the masks) and voc_eps_recipe's
    values of the same parameters (LR 1e-3, 10x, 20x, CRF on)."""
    points = load_space("deeplab").reference_points()
    assert points == {
        "reference": {"deeplab.lr": 2.5e-4, "deeplab.head_lr_mult": 10.0, "deeplab.head_bias_lr_mult": 20.0,
                      "deeplab.pseudo_crf": False},
        "voc_eps_recipe": {"deeplab.lr": 1e-3, "deeplab.head_lr_mult": 10.0, "deeplab.head_bias_lr_mult": 20.0,
                           "deeplab.pseudo_crf": True}}
    recipes = load_space("recipes").reference_points()["voc_eps_recipe"]
    assert (recipes["deeplab.arch"], recipes["deeplab.crop_size"], recipes["deeplab.mask_source"]) == ("v2_gp", 448, "eps")


def _space_file(folder: Path, references: Any, **params: Any) -> Path:
    doc = {"base": "synth", "stages": ["eps", "affinity"], "metric": "rw_miou_tune", "mode": "max",
           "tune_split": "train_tune", "heldout_split": "train_heldout", "references": references,
           "params": params or {"rw.beta": {"kind": "uniform", "low": 2, "high": 12},
                                "rw.logt": {"kind": "int", "low": 1, "high": 8}}}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_named_configs_resolve_to_their_values(tmp_path: Path) -> None:
    """A built-in name and a YAML path relative to the space file (labelled by its stem); only the
    searched parameters are taken, in the file's order after the base's point."""
    (tmp_path / "mine.yaml").write_text("rw: {beta: 5.0, logt: 2}\n")
    space = load_space(_space_file(tmp_path, ["synth_paper", "mine.yaml"]))
    assert space.reference_points() == {"reference": {"rw.beta": 8.0, "rw.logt": 3},
                                        "synth_paper": {"rw.beta": 8.0, "rw.logt": 8},
                                        "mine": {"rw.beta": 5.0, "rw.logt": 2}}


@pytest.mark.parametrize(("references", "key"), [
    (["no_such_config"], "references[0]"),
    ("synth_paper", "references"),
    (["synth_paper", "synth_paper"], "references[1]"),
    ({"reference": {"rw.beta": 8.0, "rw.logt": 3}}, "references.reference"),
    ({"x": {"rw.beta": 8.0}}, "references.x"),
    ({"x": {"rw.beta": 20.0, "rw.logt": 3}}, "references.x.rw.beta"),
    ({"x": {"rw.beta": 8.0, "rw.logt": 3, "rw.nope": 1}}, "references.x.rw.nope"),
])
def test_bad_references_name_the_key(tmp_path: Path, references: Any, key: str) -> None:
    with pytest.raises(SpaceError) as err:
        load_space(_space_file(tmp_path, references))
    assert err.value.key == key, err.value


def test_a_named_value_outside_the_space_is_refused(tmp_path: Path) -> None:
    """synth_paper's logt 8 lies outside [1, 4]: its trial could not be a point of the search."""
    params = {"rw.beta": {"kind": "uniform", "low": 2, "high": 12}, "rw.logt": {"kind": "int", "low": 1, "high": 4}}
    with pytest.raises(SpaceError, match="synth_paper lies outside") as err:
        load_space(_space_file(tmp_path, ["synth_paper"], **params))
    assert err.value.key == "references.synth_paper.rw.logt"


def test_the_record_holds_the_values_and_reads_back(tmp_path: Path) -> None:
    """``space_to_dict`` writes the resolved values, so a resumed sweep or a report never loads the
    configs again; a cascade's parts keep them, the seed re-runs (their own points) drop them."""
    from wsss_tune.trainables.phases import _reseed_space

    space = load_space("recipes")
    doc = space_to_dict(space)
    assert doc["references"]["voc_eps_recipe"]["deeplab.arch"] == "v2_gp"
    again = space_from_dict(doc, name="recipes")
    assert again.reference_points() == space.reference_points()
    assert _reseed_space(space, 3).references == {}
    sub = dataclasses.replace(space, params=space.params[:2])
    assert sub.reference_points()["voc_eps_recipe"] == {"eps.method": "eps", "deeplab.arch": "v2_gp"}


# --------------------------------------------------------------------------------------------------
# The search: points first, protected
# --------------------------------------------------------------------------------------------------


def test_the_searcher_protects_every_reference_point(tmp_path: Path) -> None:
    import optuna
    from optuna.distributions import FloatDistribution

    from wsss_tune.trainables.search import REFERENCE_ATTR, STUDY_FILE, FidelitySearch, study_storage

    s = FidelitySearch(space={"x": FloatDistribution(0.1, 4.0)}, metric="m", mode="max",
                       sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                       storage=study_storage(str(tmp_path / STUDY_FILE)), time_attr="t",
                       points_to_evaluate=[{"x": 1.0}, {"x": 3.0}, {"x": 2.0}], reference={"x": 1.0},
                       references=[{"x": 3.0}])
    assert [s.suggest(t) for t in "abc"] == [{"x": 1.0}, {"x": 3.0}, {"x": 2.0}]
    assert [s.protected(t) for t in "abc"] == [True, True, False]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / STUDY_FILE}")
    assert [t.user_attrs.get(REFERENCE_ATTR) for t in sorted(study.trials, key=lambda t: t.number)] == \
        [True, True, None]


def test_the_tuner_evaluates_the_base_point_then_each_named_one(synth_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_tuner`` hands the searcher the base point and the named ones as its first points (one
    named point equal to the base's is evaluated once) and marks them all as reference points."""
    from wsss_tune.trainables import planning, search, tuner

    (tmp_path / "same.yaml").write_text("rw: {beta: 8.0, logt: 3}\n")  # synth's own values
    path = _space_file(tmp_path, ["synth_paper", "same.yaml"])
    plan = planning.plan_sweep(path, data=synth_root, storage=tmp_path / "exp", name="r", wandb="off")
    plan.exp_dir.mkdir(parents=True)
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def capture(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(search, "FidelitySearch", capture)
    with pytest.raises(Stop):
        tuner.build_tuner(plan, progress="off", seed=0, max_failures=0, max_concurrent=None)
    assert seen["points_to_evaluate"] == [{"rw.beta": 8.0, "rw.logt": 3}, {"rw.beta": 8.0, "rw.logt": 8}]
    assert seen["reference"] == {"rw.beta": 8.0, "rw.logt": 3}
    assert seen["references"] == [{"rw.beta": 8.0, "rw.logt": 8}, {"rw.beta": 8.0, "rw.logt": 3}]


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def test_the_report_shows_each_reference_point_beside_the_best(tmp_path: Path, synth_root: Path) -> None:
    """The fixture experiment (test_analysis_data) with two named points: ``paper_like`` = trial t00002
    (tau 0.4, beta 4: DeepLab 62 / 60), ``unrun`` = no trial. Best t00001 (72 / 70) gains 10 / 10 over
    paper_like; the base's reference t00000 (66 / 63) 6 / 7."""
    from test_analysis_data import SPACE, make_experiment

    from wsss_tune.analysis.report import compute_report, render_markdown

    space = {**SPACE, "references": {"paper_like": {"eps.tau": 0.4, "rw.beta": 4.0, "eps.method": "eps"},
                                     "unrun": {"eps.tau": 0.25, "rw.beta": 4.0, "eps.method": "eps"}}}
    exp = load_experiment(make_experiment(tmp_path / "exp", synth_root, space=space))
    rows = {r["config"]: r for r in reference_table(exp).frame.to_dict("records")}
    assert list(rows) == ["reference", "paper_like", "unrun", "best"]
    assert (rows["paper_like"]["trial_id"], rows["paper_like"]["tune"], rows["paper_like"]["heldout"]) == \
        ("t00002", 62.0, 60.0)
    assert (rows["paper_like"]["best_gain_tune"], rows["paper_like"]["best_gain_heldout"]) == (10.0, 10.0)
    assert (rows["reference"]["trial_id"], rows["reference"]["best_gain_tune"]) == ("t00000", 6.0)
    assert rows["unrun"]["status"] == "not run" and math.isnan(rows["unrun"]["tune"])
    assert rows["best"]["trial_id"] == "t00001"
    text = render_markdown(compute_report(exp, images=0))
    assert "Reference points beside the best" in text
    assert "Reference point paper_like (trial t00002, completed)" in text
    plain = load_experiment(make_experiment(tmp_path / "plain", synth_root))
    assert reference_table(plain).empty


# --------------------------------------------------------------------------------------------------
# Pricing
# --------------------------------------------------------------------------------------------------


def test_expected_cost_averages_the_choices_and_prices_the_reference_points() -> None:
    """DeepLab alone on GT masks, 1000 steps, no periodic evaluation, one test pass over 50 val images;
    a step takes crop / 32 s (64 px: 2 s, 96 px: 3 s), a forward 0.1 s. The space searches the crop
    {64, 96}; the base (96) and ``small`` (64) are the reference points, so 6 trials = 4 searched + 2.

    Searched: each artifact keyed by the crop is built 2 (1 - 1/2^4) = 1.875 times; mean per build
    (2000 + 3000) / 2 = 2500 s of training + 5 s of scoring: 1.875 x 2505 = 4696.875 s. Each reference
    trial builds what the searched ones have not, with probability (1 - 1/2)^4 = 1/16: (3005 + 2005) / 16
    = 313.125 s. Total 5010 s. Without the cache: 4 x 2505 + 3005 + 2005 = 15030 s. Wall clock on 2
    devices: the longest trial (3005 s) exceeds 5010 / 2."""
    base = load_config("synth", {"deeplab.mask_source": "gt", "deeplab.iterations": 1000, "deeplab.eval_every": 0,
                                 "deeplab.test_scales": [1.0], "deeplab.test_flip": False, "deeplab.crop_size": 96})
    space = SearchSpace(name="t", base="synth", overrides={"deeplab.mask_source": "gt", "deeplab.iterations": 1000,
                                                           "deeplab.eval_every": 0, "deeplab.test_scales": [1.0],
                                                           "deeplab.test_flip": False, "deeplab.crop_size": 96},
                        params=(Param(path="deeplab.crop_size", kind="categorical", choices=(64, 96)),),
                        metric="deeplab_miou_tune", mode="max", stages=("deeplab",), tune_split="val_tune",
                        heldout_split="val_heldout", references={"small": {"deeplab.crop_size": 64}})

    def timer(cfg: Any) -> StageTimings:
        return StageTimings(device="stub", eps_step=0.0, eps_forward=0.0, affinity_step=0.0, affinity_forward=0.0,
                            rw_image=0.0, deeplab_step=cfg.deeplab.crop_size / 32, deeplab_forward=0.1)

    sizes = DatasetSizes(train=100, masks=100, val=50)
    est = expected_cost(timer, space, base, 6, 2, cache=True, sizes=sizes)
    assert est.combinations == 2 and est.trials == 6
    assert est.device_hours * 3600 == pytest.approx(5010.0)
    assert dict(est.references) == pytest.approx({"reference": 3005 / 16 / 3600, "small": 2005 / 16 / 3600})
    assert est.wall_hours * 3600 == pytest.approx(3005.0)
    off = expected_cost(timer, space, base, 6, 2, cache=False, sizes=sizes)
    assert off.device_hours * 3600 == pytest.approx(15030.0)


def test_counted_flops_scale_with_the_pixels() -> None:
    """FLOP-based unit times (tiny backbone, 1 TFLOP/s): a DeepLab step at twice the crop side costs about
    4 times as much; the forward is far cheaper than a training step of a batch; PPC's second view
    adds to the EPS step."""
    small = count_stages(load_config("synth", {"deeplab.crop_size": 64}), num_classes=5, tflops=1.0)
    large = count_stages(load_config("synth", {"deeplab.crop_size": 128}), num_classes=5, tflops=1.0)
    assert 3.6 < large.deeplab_step / small.deeplab_step < 4.4
    assert 0 < small.deeplab_forward < small.deeplab_step
    assert small.rw_image > 0 and "1 TFLOP/s" in small.device
    if "eps_ppc" in str(load_config("synth").eps.__dataclass_fields__["method"].type):
        ppc = count_stages(load_config("synth", {"eps.method": "eps_ppc"}), num_classes=5, tflops=1.0)
        assert ppc.eps_step > small.eps_step


def test_sizes_presets_and_the_cli_without_data(tmp_path: Path) -> None:
    """``--sizes voc`` is the official lists (10,582 / 10,582 / 1,449, 20 classes); a plan needs no dataset
    with it, and a bad value names the option."""
    from typer.testing import CliRunner

    from wsss_tune.cli import app

    assert parse_sizes("voc") == (DatasetSizes(train=10582, masks=10582, val=1449), 20)
    assert parse_sizes("10,12,5") == (DatasetSizes(train=10, masks=12, val=5), None)
    with pytest.raises(ValueError, match="TRAIN,MASKS,VAL"):
        parse_sizes("many")
    res = CliRunner().invoke(app, ["plan", "synth_deeplab", "--data", str(tmp_path / "none"), "--sizes", "100,100,50",
                                   "--tflops", "1", "--trials", "4"])
    assert res.exit_code == 0, res.output
    assert "assumed 1 TFLOP/s" in res.output and "ref. reference" in res.output
    bad = CliRunner().invoke(app, ["plan", "synth_deeplab", "--sizes", "many"])
    assert bad.exit_code != 0 and "--sizes" in bad.output


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_runs_every_reference_point_first(synth_root: Path, tmp_path: Path) -> None:
    """A 2-trial synthetic DeepLab sweep naming synth_paper: trial 1 is synth's point, trial 2
    synth_paper's (LR 2.5e-4); both run their whole budget and the report lists synth_paper's row."""
    import optuna
    import ray

    from wsss_tune.trainables import SMOKE_OVERRIDES, run_sweep
    from wsss_tune.trainables.search import REFERENCE_ATTR

    doc = yaml.safe_load(load_space("synth_deeplab").source.read_text())  # type: ignore[union-attr]
    doc["params"].pop("deeplab.pseudo_crf")  # the optional CRF package is not needed here
    doc["references"] = ["synth_paper"]
    path = tmp_path / "refs.yaml"
    path.write_text(yaml.safe_dump(doc))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(path, data=synth_root, storage=tmp_path / "exp", name="refs", trials=2, wandb="off",
                           progress="off", overrides=SMOKE_OVERRIDES, reseed=None)
    finally:
        ray.shutdown()
    assert result.complete, [t.error for t in result.trials]
    study = optuna.load_study(study_name="refs", storage=result.record.study.storage)  # type: ignore[union-attr]
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.params["deeplab.lr"] for t in trials] == pytest.approx([1e-3, 2.5e-4])
    assert all(t.user_attrs.get(REFERENCE_ATTR) for t in trials)
    rows = {r["config"]: r for r in reference_table(result).frame.to_dict("records")}
    assert rows["synth_paper"]["status"] == "completed" and rows["synth_paper"]["trial_id"] is not None
