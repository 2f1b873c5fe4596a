"""A small saved experiment with known values, shared by the analysis tests (and its own round trip).

:func:`make_experiment` writes what a sweep leaves behind, without Ray: ``trials.parquet``,
``reports.parquet`` and ``experiment.json`` through :func:`~wsss_tune.analysis.results.write_experiment`,
each trial's ``runs/<id>/metrics.json`` with its stage records, artifact folders with masks and CAMs
for the best trial, and an Optuna SQLite study created with Optuna directly.

The trials (metric ``deeplab_miou_tune``, mode max; values in %):

=======  =========  ====  =====  ======  ==========  ==========  ==============  =======
trial    status     tau   beta   method  EPS t / h   RW t / h    DeepLab t / h   seconds
=======  =========  ====  =====  ======  ==========  ==========  ==============  =======
t00000   completed  0.4   8      eps     60 / 58     64 / 61     66 / 63         242
t00001   completed  0.3   10     eps     65 / 63     70 / 68     72 / 70         242
t00002   completed  0.4   4      eps     60 / 58     62 / 60     62 / 60         82
t00003   pruned     0.6   6      eps     -           -           (50 at 200)     120
t00004   failed     0.2   3      eps     -           -           -               30
t00005   completed  0.5   7      cam     30 / 28     35 / 33     40 / 38         232
=======  =========  ====  =====  ======  ==========  ==========  ==============  =======

t00000 is the reference point (tau 0.4, beta 8, method eps), t00001 the best. Their EPS training
logged the overlap ratio of class disc: 0.5 then 0.06 (reference), 0.6 then 0.81 (best). Stage records (build
seconds; ``hit`` = served from the cache): t00000 and t00001 build everything (eps_model 100,
eps 10, affinity 50, rw 2, deeplab 80; t00001's eps_model record has no build time, its manifest
has 100), t00002 shares tau with the reference and hits eps_model/eps/affinity, builds rw 2 and
deeplab 80; t00005 builds eps_model in 90 and the rest as above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from wsss_tune.analysis.results import TrialRecord, load_experiment, write_experiment
from wsss_tune.config import load_config, to_dict
from wsss_tune.data import VOCLayout, save_mask_png

METRIC = "deeplab_miou_tune"
SPACE = {
    "base": "synth",
    "stages": ["eps", "affinity", "deeplab"],
    "metric": METRIC,
    "mode": "max",
    "tune_split": "val_tune",
    "heldout_split": "val_heldout",
    "num_samples": 6,
    "overrides": {},
    "params": {
        "eps.tau": {"kind": "uniform", "low": 0.1, "high": 0.7},
        "rw.beta": {"kind": "uniform", "low": 2.0, "high": 12.0},
        "eps.method": {"kind": "categorical", "choices": ["eps", "cam"]},
    },
    "fidelity": {"time_attr": "fidelity", "max_t": 400, "grace_period": 200, "reduction_factor": 2.0},
}
#: (id, status, tau, beta, method, (eps t, h), (rw t, h), (deeplab t, h), seconds)
TRIALS: list[tuple[Any, ...]] = [
    ("t00000", "completed", 0.4, 8.0, "eps", (60, 58), (64, 61), (66, 63), 242.0),
    ("t00001", "completed", 0.3, 10.0, "eps", (65, 63), (70, 68), (72, 70), 242.0),
    ("t00002", "completed", 0.4, 4.0, "eps", (60, 58), (62, 60), (62, 60), 82.0),
    ("t00003", "pruned", 0.6, 6.0, "eps", None, None, None, 120.0),
    ("t00004", "failed", 0.2, 3.0, "eps", None, None, None, 30.0),
    ("t00005", "completed", 0.5, 7.0, "cam", (30, 28), (35, 33), (40, 38), 232.0),
]
#: Per-class IoU of the reference and best trials: {trial: {metric: value}}.
PER_CLASS = {
    "t00000": {"eps_iou/background": 80.0, "eps_iou/disc": 40.0, "deeplab_iou/background": 85.0,
               "deeplab_iou/disc": 47.0},
    "t00001": {"eps_iou/background": 82.0, "eps_iou/disc": 48.0, "deeplab_iou/background": 86.0,
               "deeplab_iou/disc": 58.0},
}
#: Build seconds of each stage when a trial builds it.
BUILD = {"eps_model": 100.0, "eps": 10.0, "affinity": 50.0, "rw": 2.0, "deeplab": 80.0}
#: Pruned trial t00003 reported the metric at these fidelity steps before it was stopped.
PRUNED_REPORTS = [(200, 50.0)]
#: EPS overlap ratio of class disc logged at EPS steps 2 and 4: {trial: (step 2, step 4)}.
OVERLAP = {"t00000": (0.5, 0.06), "t00001": (0.6, 0.81)}


def _stage_records(exp: Path, trial_id: str) -> dict[str, dict[str, Any]]:
    store = exp / "store"
    hits = {"t00002": {"eps_model", "eps", "affinity"}}.get(trial_id, set())
    owner = {"t00002": "t00000"}
    out = {}
    for name, seconds in BUILD.items():
        hit = name in hits
        folder = store / name / (owner.get(trial_id, trial_id) if hit else trial_id)
        folder.mkdir(parents=True, exist_ok=True)
        build = 90.0 if (trial_id == "t00005" and name == "eps_model") else seconds
        (folder / "MANIFEST.json").write_text(json.dumps({"build_seconds": build}))
        record = {"key": f"{name}/{trial_id}", "hit": hit, "path": str(folder), "seconds": 0.5 if hit else build,
                  "build_seconds": None if (trial_id == "t00001" and name == "eps_model") else build}
        out[name] = record
    return out


def _write_artifacts(exp: Path, synth_root: Path, records: dict[str, dict[str, Any]]) -> None:
    """Masks for the EPS and random-walk artifacts of a trial: the GT with a square cut out; CAMs."""
    layout = VOCLayout(root=synth_root)
    rng = np.random.default_rng(0)
    for image_id in layout.split_ids("train"):
        gt = layout.load_mask(image_id)
        eps = gt.copy()
        eps[:8, :8] = 0
        save_mask_png(Path(records["eps"]["path"]) / "masks" / f"{image_id}.png", eps)
        save_mask_png(Path(records["rw"]["path"]) / "masks" / f"{image_id}.png", gt)
        cams = rng.random((2, *gt.shape)).astype(np.float16)
        (Path(records["eps"]["path"]) / "cams").mkdir(parents=True, exist_ok=True)
        np.savez(Path(records["eps"]["path"]) / "cams" / f"{image_id}.npz", cams=cams, keys=np.array([1, 0]))


def _metrics(row: tuple[Any, ...]) -> dict[str, Any]:
    trial_id, status, _tau, _beta, method, eps, rw, dl, _seconds = row
    if status != "completed":
        return {}
    m: dict[str, Any] = {"eps_method": method, "final": True}
    for prefix, (tune, held) in (("eps", eps), ("rw", rw), ("deeplab", dl)):
        m[f"{prefix}_miou_tune"], m[f"{prefix}_miou_heldout"] = float(tune), float(held)
        m[f"{prefix}_miou"] = (tune + held) / 2.0
    m.update(PER_CLASS.get(trial_id, {}))
    return m


def make_study(path: Path, name: str, rows: list[tuple[str, str, dict[str, Any], float | None]]) -> None:
    """An Optuna study in ``path`` (SQLite) holding ``(ray id, state, params, value)`` trials."""
    dists = {
        "eps.tau": optuna.distributions.FloatDistribution(0.1, 0.7),
        "rw.beta": optuna.distributions.FloatDistribution(2.0, 12.0),
        "eps.method": optuna.distributions.CategoricalDistribution(["eps", "cam"]),
    }
    states = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
              "failed": optuna.trial.TrialState.FAIL}
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    for ray_id, status, params, value in rows:
        used = {k: dists[k] for k in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=used, state=states[status],
                                                  value=value if status == "completed" else None,
                                                  user_attrs={"ray_trial_id": ray_id}))


def make_experiment(exp: Path, synth_root: Path, *, name: str = "exp-a", gpus: float = 0.0,
                    trials: list[tuple[Any, ...]] | None = None, space: dict[str, Any] | None = None,
                    base_overrides: dict[str, Any] | None = None, study_order: list[int] | None = None) -> Path:
    """Write the experiment of the module docstring into ``exp`` and return it.

    ``study_order``: the order (indices into ``trials``) in which the trials enter the Optuna study,
    i.e. their creation order; reports are time-stamped in the same order (default: as listed).
    """
    trials = TRIALS if trials is None else trials
    space = SPACE if space is None else space
    exp.mkdir(parents=True, exist_ok=True)
    cfg = load_config("synth", {"data.root": str(synth_root), **(base_overrides or {})})
    records, reports, study_rows = [], [], []
    order = study_order if study_order is not None else list(range(len(trials)))
    stamp = {trials[i][0]: 1000 * rank for rank, i in enumerate(order)}
    for row in trials:
        trial_id, status, tau, beta, method, _eps, _rw, dl, seconds = row
        params = {"eps.tau": tau, "rw.beta": beta, "eps.method": method}
        run_dir = exp / "runs" / trial_id
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = _metrics(row)
        first = len(reports)
        for step, ratio in zip((2, 4), OVERLAP.get(trial_id, ()), strict=False):
            reports.append({"trial_id": trial_id, "stage": "eps", "stage_step": step, "eps/overlap/disc": ratio})
        if status == "completed":
            stages = _stage_records(exp, trial_id)
            (run_dir / "metrics.json").write_text(json.dumps({**metrics, "stages": stages}))
            if trial_id == "t00001":
                _write_artifacts(exp, synth_root, stages)
            reports.append({"trial_id": trial_id, "fidelity": 200, "stage": "deeplab", METRIC: dl[0] - 4.0})
            reports.append({"trial_id": trial_id, "fidelity": 400, "stage": "deeplab", METRIC: float(dl[0])})
            reports.append({"trial_id": trial_id, "fidelity": 400, **metrics})
        elif status == "pruned":
            for step, value in PRUNED_REPORTS:
                reports.append({"trial_id": trial_id, "fidelity": step, "stage": "deeplab", METRIC: value})
        for k, rep in enumerate(reports[first:]):
            rep["timestamp"] = stamp[trial_id] + k
        records.append(TrialRecord(trial_id=trial_id, status=status, params=params, metrics=metrics,
                                   error="DivergedError: eps/loss became nan at step 3" if status == "failed" else None,
                                   run_dir=str(run_dir), reports=2, seconds=seconds))
        study_rows.append((trial_id, status, params, float(dl[0]) if dl else None))
    make_study(exp / "optuna.db", name, [study_rows[i] for i in order])
    sweep = {"name": name, "space_name": "test", "space": space, "base_config": to_dict(cfg), "metric": METRIC,
             "mode": "max", "tune_split": space["tune_split"], "heldout_split": space["heldout_split"],
             "stages": space["stages"], "requested": len(trials),
             "reference_point": {"eps.tau": 0.4, "rw.beta": 8.0, "eps.method": "eps"},
             "study": {"name": name, "storage": f"sqlite:///{exp / 'optuna.db'}"},
             "wandb": {"mode": "off", "project": "wsss-tune", "dir": None},
             "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus}}
    write_experiment(exp, sweep=sweep, trials=records, reports=reports)
    return exp


@pytest.fixture
def experiment(tmp_path: Path, synth_root: Path) -> Path:
    return make_experiment(tmp_path / "exp-a", synth_root)


def test_fixture_round_trip(experiment: Path) -> None:
    """``load_experiment`` reads the fixture back: 6 trials, reference t00000, best t00001 (72 is the
    largest completed deeplab_miou_tune), counts 4 completed / 1 pruned / 1 failed."""
    exp = load_experiment(experiment)
    assert [t.trial_id for t in exp.trials] == [r[0] for r in TRIALS]
    assert exp.reference is not None and exp.reference.trial_id == "t00000"
    assert exp.best is not None and exp.best.trial_id == "t00001"
    assert (exp.counts["completed"], exp.counts["pruned"], exp.counts["failed"]) == (4, 1, 1)
    study = optuna.load_study(study_name="exp-a", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert len(study.trials) == 6
