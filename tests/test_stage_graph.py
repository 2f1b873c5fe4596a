"""The stage graph: one declaration per artifact, everything else derived from it.

* Keys hold only what changes an artifact: test-time DeepLab settings train DeepLab once; evaluation
  splits and evaluation cadence train EPS once (counted as builds in the store).
* A toy stage declared here, in this file alone, runs through the pipeline, the search-space checks
  and ``plan``; a sweep runs it in Ray's workers through ``run.stage_plugins``.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest

from wsss_tune.config import load_config
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages import graph
from wsss_tune.stages.pipeline import parse_stages, run_pipeline, stage_key_parts
from wsss_tune.trainables import SMOKE_OVERRIDES


def _cfg(root: Path, store: Path, **extra: Any):
    return load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(root), "data.num_workers": 0,
                                 "run.artifact_store": str(store), **extra})


def _built(metrics: dict[str, Any], name: str) -> int:
    return int(not metrics["stages"][name]["hit"])


# --------------------------------------------------------------------------------------------------
# Derived views agree with the graph
# --------------------------------------------------------------------------------------------------


def test_everything_is_derived_from_the_graph() -> None:
    from wsss_tune.analysis.plan import artifact_chain
    from wsss_tune.spaces import SECTION_STAGE, TUNE_METRICS
    from wsss_tune.stages.pipeline import STAGES
    from wsss_tune.trainables.trainable import _STAGE_TRAINABLE_STAGES

    assert STAGES == ("eps", "affinity", "deeplab")
    assert SECTION_STAGE == {"eps": "eps", "affinity": "affinity", "rw": "affinity", "deeplab": "deeplab"}
    assert TUNE_METRICS == {"eps_miou_tune": ("eps", "mask_eval_split"), "rw_miou_tune": ("affinity", "mask_eval_split"),
                            "deeplab_miou_tune": ("deeplab", "val_split")}
    assert _STAGE_TRAINABLE_STAGES == {"eps": ("eps",), "affinity": ("eps", "affinity"), "deeplab": ("deeplab",)}
    assert graph.metric_columns() == (("CAM", "cam"), ("EPS", "eps"), ("refined", "rw"), ("DeepLab", "deeplab"))
    cfg = load_config("synth")
    for source, chain in (("refined", ("eps_model", "eps", "affinity", "rw", "deeplab_model", "deeplab")),
                          ("eps", ("eps_model", "eps", "deeplab_model", "deeplab")),
                          ("gt", ("deeplab_model", "deeplab"))):
        got = artifact_chain(load_config("synth", {"deeplab.mask_source": source}), ("deeplab",))
        assert tuple(got) == chain and got["deeplab"] == chain, source
    assert artifact_chain(cfg, ("eps",)) == {"eps_model": ("eps_model",), "eps": ("eps_model", "eps")}
    assert graph.fidelity_artifact("deeplab") == "deeplab_model" and graph.fidelity_artifact("affinity") is None


def test_training_keys_ignore_evaluation_only_fields() -> None:
    """Test-time DeepLab fields key its scores, not its weights; evaluation splits and cadence key no
    training artifact; the EPS model ignores DeepLab and the walk entirely."""
    base = stage_key_parts(load_config("synth"), lambda splits, masks: f"{splits}{masks}")
    for change in ({"deeplab.crf": True}, {"deeplab.test_flip": False}, {"deeplab.test_scales": [1.0]},
                   {"deeplab.save_predictions": True}, {"data.val_split": "train"}, {"data.mask_eval_split": "val"},
                   {"data.mask_dir": "OtherMasks"}, {"eps.eval_images": 3}, {"eps.eval_every": 7},
                   {"deeplab.eval_images": 3}, {"rw.beta": 4.0}, {"data.num_workers": 0}):
        parts = stage_key_parts(load_config("synth", change), lambda splits, masks: f"{splits}{masks}")
        changed = {name for name in parts if parts[name] != base[name]}
        assert not changed & {"eps_model", "affinity", "deeplab_model"}, (change, changed)
    crf = stage_key_parts(load_config("synth", {"deeplab.crf": True}), "fp")
    assert crf["deeplab"] != stage_key_parts(load_config("synth"), "fp")["deeplab"]
    lr = stage_key_parts(load_config("synth", {"deeplab.lr": 0.5}), "fp")
    assert lr["deeplab_model"] != stage_key_parts(load_config("synth"), "fp")["deeplab_model"]


# --------------------------------------------------------------------------------------------------
# Build counts
# --------------------------------------------------------------------------------------------------


def test_deeplab_test_time_settings_train_deeplab_once(synth_root: Path, tmp_path: Path) -> None:
    """DeepLab on the GT masks under 4 test-time settings (flip x CRF, or x test scales where the CRF
    package is missing): 1 training build, 4 scoring builds."""
    have_crf = importlib.util.find_spec("pydensecrf") is not None
    second = ("deeplab.crf", [False, True]) if have_crf else ("deeplab.test_scales", [[1.0], [0.75, 1.0]])
    store = tmp_path / "store"
    runs = []
    for flip, other in itertools.product([False, True], second[1]):
        cfg = _cfg(synth_root, store, **{"deeplab.mask_source": "gt", "deeplab.test_flip": flip, second[0]: other})
        runs.append(run_pipeline(cfg, stages=("deeplab",), out_dir=tmp_path / f"run{len(runs)}",
                                 reporter=RecordingReporter()))
    assert sum(_built(m, "deeplab_model") for m in runs) == 1
    assert sum(_built(m, "deeplab") for m in runs) == 4
    assert all("deeplab_miou_tune" in m for m in runs)


def test_evaluation_splits_and_cadence_train_eps_once(synth_root: Path, tmp_path: Path) -> None:
    """EPS under another validation split and another evaluation subset size: one EPS training."""
    store = tmp_path / "store"
    runs = [run_pipeline(_cfg(synth_root, store, **extra), stages=("eps",), out_dir=tmp_path / f"run{i}",
                         reporter=RecordingReporter())
            for i, extra in enumerate(({}, {"data.val_split": "train"}, {"eps.eval_images": 2}))]
    assert sum(_built(m, "eps_model") for m in runs) == 1
    assert sum(_built(m, "eps") for m in runs) == 1
    assert runs[0]["eps_miou_tune"] == runs[1]["eps_miou_tune"] == runs[2]["eps_miou_tune"]
    assert any(k.startswith("eps/overlap/") for k in runs[0]), "the final per-class overlap is recorded"


def test_deeplab_reports_continue_its_training_steps(synth_root: Path, tmp_path: Path) -> None:
    """Weights and scores are two artifacts but one stage to the scheduler: the scores arrive at the
    training's last step, as the stage ``deeplab``."""
    rec = RecordingReporter()
    cfg = _cfg(synth_root, tmp_path / "store", **{"deeplab.mask_source": "gt"})
    run_pipeline(cfg, stages=("deeplab",), out_dir=tmp_path / "run", reporter=rec)
    final = [h for h in rec.history if "deeplab_miou_tune" in h and "stage_step" in h][-1]
    assert final["stage"] == "deeplab" and final["stage_step"] == cfg.deeplab.iterations
    assert {h["stage"] for h in rec.history} == {"deeplab"}


# --------------------------------------------------------------------------------------------------
# A toy stage, declared here
# --------------------------------------------------------------------------------------------------


def _build_toy(ctx: graph.BuildContext) -> dict[str, Any]:
    """The EPS masks copied as they are, scored as the toy stage's."""
    from wsss_tune.stages.evaluate import score_masks

    shutil.copytree(ctx.inputs["eps"] / "masks", ctx.out / "masks")
    ctx.reporter.report({"toy/copied": 1.0}, step=1)
    return score_masks("toy", ctx.layout, ctx.cfg.data, ctx.layout.split_ids(ctx.cfg.data.mask_eval_split),
                       ctx.out / "masks")


TOY = graph.ArtifactSpec(name="toy", stage="toy", section=None, upstream=("eps",), data_fields=("mask_eval_split",),
                         metric=graph.Metric(prefix="toy", label="Toy", split_field="mask_eval_split"),
                         build=_build_toy)


def register() -> None:
    """Plugin entry (``run.stage_plugins: [test_stage_graph:register]``): add the toy stage."""
    graph.register(TOY)


def test_toy_stage_runs_through_the_pipeline_the_space_checks_and_plan(synth_root: Path, tmp_path: Path) -> None:
    from wsss_tune.analysis.plan import DatasetSizes, StageTimings, estimate_cost
    from wsss_tune.spaces import space_from_dict

    with graph.extended(TOY):
        assert parse_stages("eps,toy") == ("eps", "toy")
        cfg = _cfg(synth_root, tmp_path / "store")
        m = run_pipeline(cfg, stages=("toy",), out_dir=tmp_path / "run", reporter=RecordingReporter())
        assert m["toy_miou_tune"] == m["eps_miou_tune"]  # the same masks, scored on the same split
        assert set(m["stages"]) == {"eps_model", "eps", "toy"}
        again = run_pipeline(cfg, stages=("toy",), out_dir=tmp_path / "again", reporter=RecordingReporter())
        assert again["stages"]["toy"]["hit"] is True

        space = space_from_dict({"base": "synth", "stages": ["eps", "toy"], "metric": "toy_miou_tune", "mode": "max",
                                 "tune_split": "train_tune", "heldout_split": "train_heldout", "num_samples": 4,
                                 "overrides": {"data.root": str(synth_root)},
                                 "params": {"eps.tau": {"kind": "uniform", "low": 0.3, "high": 0.5}}}, name="toy")
        timings = StageTimings(device="stub", eps_step=1.0, eps_forward=0.1, affinity_step=0.0, affinity_forward=0.0,
                               rw_image=0.0, deeplab_step=0.0, deeplab_forward=0.0)
        sizes = DatasetSizes(train=10, masks=10, val=10)
        cost = estimate_cost(timings, space, space.base_config(), 4, 1, sizes=sizes)
        rows = {r.artifact: r for r in cost.rows}
        assert set(rows) == {"eps_model", "eps", "toy"} and rows["toy"].detail == "no cost model"
    with pytest.raises(ValueError, match="unknown stage"):
        parse_stages("toy")


def test_a_spec_with_an_unknown_upstream_or_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="upstream"):
        with graph.extended(graph.replace(TOY, upstream=("nope",))):
            pass
    with pytest.raises(ValueError, match="already"):
        with graph.extended(graph.replace(TOY, name="eps")):
            pass


# --------------------------------------------------------------------------------------------------
# Sweeps (Ray)
# --------------------------------------------------------------------------------------------------


def _space_file(path: Path, space: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.slow
@pytest.mark.ray
def test_sweeps_train_deeplab_once_over_test_time_settings_and_run_a_plugin_stage(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-trial sweep over deeplab.test_flip x deeplab.crf (x save_predictions where the CRF package
    is missing) trains DeepLab once. A 2-trial sweep whose metric is the toy stage's runs it in Ray's
    workers, which load it through ``run.stage_plugins`` (this file, on their PYTHONPATH)."""
    import os

    import ray

    from wsss_tune.trainables import run_sweep

    have_crf = importlib.util.find_spec("pydensecrf") is not None
    other = "deeplab.crf" if have_crf else "deeplab.save_predictions"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(Path(__file__).parent),
                                                                  os.environ.get("PYTHONPATH", "")) if p))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        space = _space_file(tmp_path / "dl.yaml", {
            "base": "synth", "stages": ["deeplab"], "metric": "deeplab_miou_tune", "mode": "max",
            "tune_split": "val_tune", "heldout_split": "val_heldout", "num_samples": 4,
            "overrides": {"deeplab.mask_source": "gt"},
            "params": {"deeplab.test_flip": {"kind": "categorical", "choices": [False, True]},
                       other: {"kind": "categorical", "choices": [False, True]}}})
        result = run_sweep(space, data=synth_root, storage=tmp_path / "exps", name="dl", wandb="off", progress="off",
                           overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), reseed=None)
        assert result.counts["completed"] == 4, [t.error for t in result.trials]
        # DeepLab's weights are shared by every trial: built once, before the trials (the sweep's
        # shared build); the compute table counts builds wherever they happened
        from wsss_tune.analysis.tables import compute_table

        assert sum(t.metrics["built/deeplab_model"] for t in result.trials) == 0
        assert int(compute_table(result).frame.set_index("stage").loc["deeplab_model", "built"]) == 1
        assert sum(t.metrics["built/deeplab"] for t in result.trials) == len({
            (t.params["deeplab.test_flip"], t.params[other]) for t in result.trials})

        toy_space = _space_file(tmp_path / "toy.yaml", {
            "base": "synth", "stages": ["eps", "toy"], "metric": "toy_miou_tune", "mode": "max",
            "tune_split": "train_tune", "heldout_split": "train_heldout", "num_samples": 2,
            "overrides": {"run.stage_plugins": [f"{Path(__file__).stem}:register"]},
            "params": {"eps.tau": {"kind": "uniform", "low": 0.3, "high": 0.5}}})
        with graph.extended(TOY):  # this process; the workers import the plugin themselves
            toy = run_sweep(toy_space, data=synth_root, storage=tmp_path / "exps", name="toy", wandb="off",
                            progress="off", overrides=SMOKE_OVERRIDES, store=str(tmp_path / "store"), reseed=None)
        assert toy.counts["completed"] == 2, [t.error for t in toy.trials]
        assert all(t.value("toy_miou_tune") == t.value("eps_miou_tune") for t in toy.trials)
    finally:
        ray.shutdown()
