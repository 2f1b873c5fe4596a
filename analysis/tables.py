"""What a sweep found, as plain tables computed once from an experiment folder.

Every table here is a :class:`Table` (a pandas frame with a title and a note) computed from the
experiment's results (:func:`~wsss_tune.analysis.results.load_experiment`: ``trials.parquet``,
``reports.parquet``, ``experiment.json``), its Optuna study and its trials' ``metrics.json``. The
report, the W&B upload and the figures all draw from these same tables, so a number in a file, a
plot and a table come from one computation.

=================  ==========================================================================
``stages``         reference vs best config: CAM (when a CAM-baseline trial exists), EPS pseudo
                   mask, refined mask, DeepLab; mIoU on the tune and held-out halves, each
                   stage's gain over the previous one, and best minus reference
``references``     each reference point (the base config's and the space's named ones, e.g. a
                   published recipe) beside the searched best: its trial, status, metric on
                   both halves and the best's gain over it; empty without named references
``trials``         one row per trial: order, status, searched values, final and last reported
                   value of the metric, how far it got
``history``        the optimisation history: value per trial and the best so far
``importances``    fANOVA parameter importances (Optuna), or why there are none
``curves``         the metric at each reported fidelity step of every trial
``stopped``        the trials stopped early: where, with which value and values
``per_class``      per-class IoU of the best config against the reference config
``overlap``        EPS's per-class overlap ratio of both configs (the diagnostic of a failed class)
``compute``        device-hours per stage artifact: built, served from the cache, hours saved
=================  ==========================================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from wsss_tune.analysis.results import (
    RUNS_DIR,
    ExperimentResult,
    TrialRecord,
    find_reference,
    stage_miou_rows,
)
from wsss_tune.analysis.schema import MAP_COLUMNS, report_column
from wsss_tune.stages import graph

__all__ = [
    "STAGE_PREFIXES",
    "stage_prefixes",
    "MIN_FANOVA_TRIALS",
    "Table",
    "cam_baseline",
    "stage_table",
    "reference_points",
    "reference_table",
    "trial_order",
    "trials_table",
    "overlap_table",
    "history_table",
    "load_study",
    "importance_table",
    "curves_table",
    "stopped_table",
    "per_class_table",
    "stage_infos",
    "artifact_build_seconds",
    "compute_table",
    "compute_line",
    "experiment_tables",
    "fidelity_attr",
    "reports_frame",
]

#: Row labels of the report's stage table where they differ from the stage graph's column labels.
_REPORT_LABELS: dict[str, str] = {"eps": "EPS pseudo-mask"}


def stage_prefixes() -> tuple[tuple[str, str], ...]:
    """Row label and metric prefix of each stage, in pipeline order (from the stage graph). ``cam`` is
    the plain-CAM baseline: ``cam_miou*`` metrics if a run reports them, else the EPS-stage numbers of
    a trial whose ``eps_method`` is ``cam`` (``eps.method: cam``, the baseline without the saliency loss)."""
    return tuple((_REPORT_LABELS.get(prefix, label), prefix) for label, prefix in graph.metric_columns())


#: The stages of the built-in graph (:func:`stage_prefixes` reads the graph at call time).
STAGE_PREFIXES: tuple[tuple[str, str], ...] = stage_prefixes()
#: fANOVA (Hutter et al., ICML 2014) fits a random forest to (values -> objective); with fewer
#: completed trials than this, or not more than there are searched parameters, the forest fits
#: noise and the importances mean nothing. Our threshold; Optuna itself needs only 2 trials.
MIN_FANOVA_TRIALS = 5
#: fANOVA forest size and seed: Optuna's defaults (64 trees), seeded so a report is reproducible.
FANOVA_TREES = 64
FANOVA_SEED = 0
#: The artifact store's manifest (holds ``build_seconds``) inside each artifact folder.
_MANIFEST = "MANIFEST.json"
#: Optuna user attribute holding a study trial's Ray trial id: the name
#: ``wsss_tune.trainables.search.RAY_TRIAL_ATTR`` writes (not imported: that module imports Ray).
RAY_TRIAL_ATTR = "ray_trial_id"
#: Result key counting a trial's reports when the space has no fidelity (Ray Tune's).
_TRAINING_ITERATION = "training_iteration"
#: ``reports.parquet`` column of the time of a report.
_TIME = report_column("timestamp")
_HOUR = 3600.0


@dataclass(frozen=True, kw_only=True)
class Table:
    """A computed table: ``name`` is its file stem, ``note`` says what a reader must know about it."""

    name: str
    title: str
    frame: pd.DataFrame
    note: str = ""

    @property
    def empty(self) -> bool:
        return self.frame.empty


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


# --------------------------------------------------------------------------------------------------
# Stage table
# --------------------------------------------------------------------------------------------------


def cam_baseline(exp: ExperimentResult) -> TrialRecord | None:
    """The CAM-baseline trial: the completed trial with ``eps_method == 'cam'`` and the best
    ``eps_miou_tune`` (None when the sweep ran no CAM trial)."""
    best: TrialRecord | None = None
    for t in exp.trials:
        v = t.value("eps_miou_tune")
        if t.status != "completed" or t.metrics.get("eps_method") != "cam" or v is None:
            continue
        if best is None or v > (best.value("eps_miou_tune") or -math.inf):
            best = t
    return best


def _stage_values(exp: ExperimentResult) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """``{"reference"|"best": {prefix: (tune, heldout)}}`` from :func:`stage_miou_rows` plus ``cam_*``."""
    out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    trials = {"reference": exp.reference, "best": exp.best}
    for row in stage_miou_rows(exp):
        values: dict[str, tuple[float | None, float | None]] = {}
        side = {p for _, p in graph.SIDE_METRICS.values()}  # the CAM baseline: handled below
        for label, prefix in (c for c in graph.metric_columns() if c[1] not in side):
            if f"{label} tune" in row or f"{label} held-out" in row:
                values[prefix] = (_finite(row.get(f"{label} tune")), _finite(row.get(f"{label} held-out")))
        trial = trials[row["config"]]
        if trial is not None and trial.metrics.get("eps_method") == "cam" and "eps" in values:
            values["cam"] = values.pop("eps")  # this config's "EPS" masks are plain CAM masks
        elif trial is not None and (trial.value("cam_miou_tune") is not None or trial.value("cam_miou_heldout") is not None):
            values["cam"] = (trial.value("cam_miou_tune"), trial.value("cam_miou_heldout"))
        out[row["config"]] = values
    return out


def stage_table(exp: ExperimentResult) -> Table:
    """Reference config vs best found, stage by stage (the seed's results table).

    Columns: ``stage``; ``reference_tune``/``_heldout`` and ``best_tune``/``_heldout`` (mIoU, %);
    ``reference_gain_*``/``best_gain_*``: the stage minus the previous stage of the same config;
    ``delta_*``: best minus reference. A CAM row appears when a CAM number exists: the trial's own
    ``cam_miou_*`` metrics, else a CAM-baseline trial of the sweep (:func:`cam_baseline`), whose
    number then stands in both configs' columns (it is the baseline both are measured against).
    """
    values = _stage_values(exp)
    baseline = cam_baseline(exp)
    note = []
    if baseline is not None:
        cam = (baseline.value("eps_miou_tune"), baseline.value("eps_miou_heldout"))
        for cfg in values:
            values[cfg].setdefault("cam", cam)
        note.append(f"CAM: trial {baseline.trial_id} (eps.method = cam), the plain-CAM baseline")
    rows = []
    previous: dict[str, tuple[float | None, float | None]] = {}
    for label, prefix in stage_prefixes():
        if not any(prefix in v for v in values.values()):
            continue
        row: dict[str, Any] = {"stage": label}
        for cfg in ("reference", "best"):
            tune, held = values.get(cfg, {}).get(prefix, (None, None))
            row[f"{cfg}_tune"], row[f"{cfg}_heldout"] = tune, held
            prev = previous.get(cfg)
            for i, split in enumerate(("tune", "heldout")):
                now = (tune, held)[i]
                before = prev[i] if prev else None
                row[f"{cfg}_gain_{split}"] = now - before if now is not None and before is not None else None
            if tune is not None or held is not None:
                previous[cfg] = (tune, held)
        for split in ("tune", "heldout"):
            b, r = row[f"best_{split}"], row[f"reference_{split}"]
            row[f"delta_{split}"] = b - r if b is not None and r is not None else None
        rows.append(row)
    if exp.reference is None:
        note.append("no trial evaluated the reference point")
    if exp.best is None:
        note.append("no trial completed, so there is no best config")
    else:
        note.append(f"best = trial {exp.best.trial_id}, chosen by {exp.metric} (tune half); the held-out "
                    "column is the number to report")
    if exp.reference is not None:
        note.append(f"reference = trial {exp.reference.trial_id} (the space's reference point)")
    cols = ["stage", "reference_tune", "reference_heldout", "best_tune", "best_heldout", "reference_gain_tune",
            "reference_gain_heldout", "best_gain_tune", "best_gain_heldout", "delta_tune", "delta_heldout"]
    return Table(name="stages", title="Mask quality by stage (mIoU %): reference config vs best found",
                 frame=pd.DataFrame(rows, columns=cols), note="; ".join(note))


def reference_points(exp: ExperimentResult) -> dict[str, dict[str, Any]]:
    """The experiment's reference points by label: the base config's (``reference``), then the named
    ones its space recorded (``references``: label -> values of the searched parameters)."""
    out: dict[str, dict[str, Any]] = {"reference": dict(exp.record.reference_point)}
    named = exp.record.space.get("references") or {}
    if isinstance(named, Mapping):
        out.update({str(k): dict(v) for k, v in named.items() if isinstance(v, Mapping)})
    return out


def reference_table(exp: ExperimentResult) -> Table:
    """Each reference point beside the searched best (empty when the space names no reference).

    Columns: ``config`` (the point's label, or ``best``), ``trial_id`` and ``status`` of the trial that
    evaluated it (``not run`` when none did), ``tune`` and ``heldout`` (the experiment's metric on
    the two halves), ``best_gain_tune``/``_heldout`` (the best's value minus this one, sign following
    the mode: positive = the search found better), ``values`` (the point's searched values).
    """
    points = reference_points(exp)
    cols = ["config", "trial_id", "status", "tune", "heldout", "best_gain_tune", "best_gain_heldout", "values"]
    if len(points) < 2:
        return Table(name="references", title="Reference points beside the searched best",
                     frame=pd.DataFrame([], columns=cols), note="the space names no reference point besides its base")
    sign = 1.0 if exp.mode == "max" else -1.0
    best = exp.best
    best_values = (best.value(exp.metric), best.value(exp.heldout_metric)) if best is not None else (None, None)

    def row(label: str, trial: TrialRecord | None, values: Mapping[str, Any]) -> dict[str, Any]:
        tune = trial.value(exp.metric) if trial is not None else None
        held = trial.value(exp.heldout_metric) if trial is not None else None
        gains = [sign * (b - v) if b is not None and v is not None and label != "best" else None
                 for b, v in zip(best_values, (tune, held), strict=True)]
        return {"config": label, "trial_id": trial.trial_id if trial is not None else None,
                "status": trial.status if trial is not None else "not run", "tune": tune, "heldout": held,
                "best_gain_tune": gains[0], "best_gain_heldout": gains[1],
                "values": json.dumps(dict(values), default=str)}

    rows = [row(label, exp.reference if label == "reference" else find_reference(exp.trials, values), values)
            for label, values in points.items()]
    rows.append(row("best", best, best.params if best is not None else {}))
    note = (f"{exp.metric} on the tune half and {exp.heldout_metric} on the held-out half; a reference point's "
            "trial runs its whole budget (never stopped early); only the searched parameters come from a named "
            "config, the rest is the base config")
    return Table(name="references", title="Reference points beside the searched best", frame=pd.DataFrame(rows, columns=cols),
                 note=note)


# --------------------------------------------------------------------------------------------------
# Trials, history, curves, stopped trials
# --------------------------------------------------------------------------------------------------


def fidelity_attr(exp: ExperimentResult) -> str:
    """The reported counter the scheduler compares trials on (the space's fidelity ``time_attr``),
    or Ray's ``training_iteration`` when the space has none."""
    fid = exp.record.fidelity or {}
    return str(fid.get("time_attr") or _TRAINING_ITERATION)


def reports_frame(reports: pa.Table) -> pd.DataFrame:
    """``reports.parquet`` (:data:`~wsss_tune.analysis.schema.REPORTS_SCHEMA`) as a wide frame: its
    fixed columns, and one column per name of its ``metrics`` and ``tags`` maps (a fixed column wins
    over a metric of the same name)."""
    fixed = [n for n in reports.column_names if n not in MAP_COLUMNS]
    frame = reports.select(fixed).to_pandas()
    extra: dict[str, list[Any]] = {}
    for col in ("metrics", "tags"):
        if col not in reports.column_names:
            continue
        for i, entries in enumerate(reports.column(col).to_pylist()):
            for k, v in entries or ():
                if k not in fixed:
                    extra.setdefault(k, [None] * reports.num_rows)[i] = v
    if not extra:
        return frame
    return pd.concat([frame, pd.DataFrame(extra, index=frame.index)], axis=1)


def _reports_frame(exp: ExperimentResult) -> pd.DataFrame:
    return reports_frame(exp.reports())


def curves_table(exp: ExperimentResult, reports: pd.DataFrame | None = None) -> Table:
    """The searched metric at each reported fidelity step of every trial (rows without it are skipped).

    Columns: ``trial_id``, ``status``, ``step`` (:func:`fidelity_attr`), ``value``.
    """
    reports = _reports_frame(exp) if reports is None else reports
    attr = fidelity_attr(exp)
    status = {t.trial_id: t.status for t in exp.trials}
    rows = []
    if exp.metric in reports.columns:
        step_col = next((c for c in (attr, report_column(attr)) if c in reports.columns), report_column(_TRAINING_ITERATION))
        for rec in reports.to_dict("records"):
            v, s = _finite(rec.get(exp.metric)), _finite(rec.get(step_col))
            if v is None or s is None or rec.get("final"):
                continue
            rows.append({"trial_id": rec["trial_id"], "status": status.get(rec["trial_id"], "incomplete"),
                         "step": int(s) if s.is_integer() else s, "value": v})
    frame = pd.DataFrame(rows, columns=["trial_id", "status", "step", "value"])
    frame = frame.drop_duplicates(["trial_id", "step"], keep="first").reset_index(drop=True)
    return Table(name="curves", title=f"{exp.metric} at each {attr} step", frame=frame,
                 note=f"intermediate values as the scheduler saw them (x = {attr})")


def trial_order(exp: ExperimentResult, study: Any = None, reports: pd.DataFrame | None = None) -> list[str]:
    """Trial ids in the order the search created them.

    Ray's trial ids are random, so their order says nothing. The order is the Optuna trial number
    (each study trial records its Ray trial id), then, for trials the study does not know, the time
    of their first report, then the order of the results file.
    """
    number: dict[str, int] = {}
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            rid = t.user_attrs.get(RAY_TRIAL_ATTR)
            if rid is not None:
                number.setdefault(str(rid), t.number)
    first: dict[str, float] = {}
    if reports is not None and _TIME in reports.columns and not reports.empty:
        times = reports.dropna(subset=[_TIME]).groupby("trial_id")[_TIME].min()
        first = {str(k): float(v.timestamp()) for k, v in times.items()}
    index = {t.trial_id: i for i, t in enumerate(exp.trials)}
    return sorted(index, key=lambda tid: (number.get(tid, math.inf), first.get(tid, math.inf), index[tid]))


def trials_table(exp: ExperimentResult, curves: Table | None = None, order: list[str] | None = None) -> Table:
    """One row per trial, in creation order (:func:`trial_order`; default: the results file's order).

    Columns: ``order`` (0-based), ``trial_id``, ``status``, ``reference``, ``best``, ``value`` (final
    metric, completed trials only), ``last_value`` and ``last_step`` (the last intermediate value and
    where it was reported: how far a stopped trial got), ``heldout``, ``seconds``, ``error``, and one
    column per searched parameter (its config path).
    """
    curves = curves_table(exp) if curves is None else curves
    last = curves.frame.sort_values("step").groupby("trial_id").tail(1).set_index("trial_id")
    params = list(exp.record.searched_params)
    for t in exp.trials:
        params += [k for k in t.params if k not in params]
    rows = []
    best_id = exp.best.trial_id if exp.best else None
    by_id = {t.trial_id: t for t in exp.trials}
    ids = order if order is not None else list(by_id)
    for i, t in enumerate(by_id[tid] for tid in ids):
        row: dict[str, Any] = {
            "order": i, "trial_id": t.trial_id, "phase": t.phase, "status": t.status, "reference": t.reference,
            "best": t.trial_id == best_id, "value": t.value(exp.metric) if t.status == "completed" else None,
            "last_value": float(last.loc[t.trial_id, "value"]) if t.trial_id in last.index else t.value(exp.metric),
            "last_step": last.loc[t.trial_id, "step"].item() if t.trial_id in last.index else None,
            "heldout": t.value(exp.heldout_metric), "seconds": t.seconds, "error": t.error,
        }
        row.update({p: t.params.get(p) for p in params})
        rows.append(row)
    cols = ["order", "trial_id", "phase", "status", "reference", "best", "value", "last_value", "last_step", "heldout",
            "seconds", "error", *params]
    return Table(name="trials", title=f"All trials ({exp.metric}, {exp.mode})", frame=pd.DataFrame(rows, columns=cols),
                 note="value: final metric of a completed trial; last_value/last_step: last intermediate value "
                      "and its step (a stopped trial's truncated number)")


def history_table(exp: ExperimentResult, trials: Table | None = None) -> Table:
    """The optimisation history: each completed trial's value in creation order and the best so far.

    Columns: ``order``, ``trial_id``, ``status``, ``value`` (final, or the last intermediate value of a
    stopped trial, marked by its status), ``best_so_far`` (over completed trials only).
    """
    trials = trials_table(exp) if trials is None else trials
    rows = []
    best: float | None = None
    for rec in trials.frame.to_dict("records"):
        value = _finite(rec["value"]) if rec["status"] == "completed" else _finite(rec["last_value"])
        if rec["status"] == "completed" and value is not None and (best is None or _better(value, best, exp.mode)):
            best = value
        if rec["status"] in ("completed", "pruned"):
            rows.append({"order": rec["order"], "trial_id": rec["trial_id"], "status": rec["status"],
                         "value": value, "best_so_far": best})
    return Table(name="history", title=f"Optimisation history ({exp.metric})",
                 frame=pd.DataFrame(rows, columns=["order", "trial_id", "status", "value", "best_so_far"]),
                 note="stopped trials show their last intermediate value and never count as the best")


def stopped_table(exp: ExperimentResult, trials: Table | None = None) -> Table:
    """Trials stopped early by the scheduler: where they stopped, their last value, their values."""
    trials = trials_table(exp) if trials is None else trials
    f = trials.frame
    params = [c for c in f.columns if "." in c]
    frame = f.loc[f["status"] == "pruned", ["trial_id", "last_step", "last_value", *params]].reset_index(drop=True)
    fid = exp.record.fidelity or {}
    note = (f"ASHA on {fid.get('time_attr')}: max_t {fid.get('max_t')}, grace period {fid.get('grace_period')}, "
            f"reduction factor {fid.get('reduction_factor')}" if fid else "the space has no fidelity: no early stopping")
    return Table(name="stopped", title=f"Trials stopped early ({len(frame)} of {len(f)})", frame=frame, note=note)


# --------------------------------------------------------------------------------------------------
# Parameter importances
# --------------------------------------------------------------------------------------------------


def load_study(exp: ExperimentResult) -> Any:
    """The experiment's Optuna study, or None when it has none.

    The record resolves the study's file inside the experiment folder it was read from, so a copied
    or moved folder reads its own study (never the original's).
    """
    import optuna

    study = exp.record.study
    if study is None or not study.storage or not study.name:
        return None
    if study.storage.startswith("sqlite:///") and not Path(study.storage[len("sqlite:///"):]).is_file():
        return None
    try:
        return optuna.load_study(study_name=study.name, storage=study.storage)
    except KeyError:  # the file holds no study of that name
        return None


def _fanova_available() -> bool:
    """Optuna's fANOVA evaluator fits its forest with scikit-learn."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def importance_table(exp: ExperimentResult, study: Any = None) -> Table:
    """fANOVA parameter importances (``optuna.importance.FanovaImportanceEvaluator``) of the searched
    parameters over the completed trials of the study, normalised to sum to 1.

    Falls back, saying so in the note: to an empty table when there is no study or fewer completed
    trials than ``max(MIN_FANOVA_TRIALS, parameters + 1)``; to Optuna's PED-ANOVA evaluator (Watanabe
    et al., IJCAI 2023; numpy only) when scikit-learn, which fANOVA needs, is not installed.
    """
    import optuna
    from optuna.importance import (
        FanovaImportanceEvaluator,
        PedAnovaImportanceEvaluator,
        get_param_importances,
    )

    study = load_study(exp) if study is None else study
    cols = ["param", "importance"]
    if study is None:
        return Table(name="importances", title="Parameter importances", frame=pd.DataFrame(columns=cols),
                     note="not computed: the experiment has no Optuna study")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = sorted({k for t in completed for k in t.params})
    need = max(MIN_FANOVA_TRIALS, len(names) + 1)
    if len(completed) < need:
        return Table(name="importances", title="Parameter importances", frame=pd.DataFrame(columns=cols),
                     note=f"not computed: fANOVA needs at least {need} completed trials for {len(names)} "
                          f"parameter(s), the study has {len(completed)}; see the slices instead")
    if _fanova_available():
        evaluator: Any = FanovaImportanceEvaluator(n_trees=FANOVA_TREES, seed=FANOVA_SEED)
        method = "fANOVA"
        how = f"fANOVA over {len(completed)} completed trials ({FANOVA_TREES} trees, seed {FANOVA_SEED})"
    else:
        evaluator, method = PedAnovaImportanceEvaluator(), "PED-ANOVA"
        how = (f"PED-ANOVA over {len(completed)} completed trials, because fANOVA needs scikit-learn, which is "
               "not installed (pip install scikit-learn)")
    values = get_param_importances(study, evaluator=evaluator)
    frame = pd.DataFrame([{"param": k, "importance": float(v)} for k, v in values.items()], columns=cols)
    frame = frame.sort_values("importance", ascending=False).reset_index(drop=True)
    return Table(name="importances", title=f"Parameter importances ({method})", frame=frame,
                 note=f"{how}; share of the objective's variation each parameter explains on its own")


# --------------------------------------------------------------------------------------------------
# Per-class IoU
# --------------------------------------------------------------------------------------------------


def per_class_table(exp: ExperimentResult) -> Table:
    """Per-class IoU (%) of the best config against the reference config, for every stage that
    reports ``<stage>_iou/<class>``.

    Columns: ``stage`` (metric prefix), ``class``, ``reference``, ``best``, ``delta``.
    """
    rows = []
    ref = exp.reference.metrics if exp.reference else {}
    best = exp.best.metrics if exp.best else {}
    for label, prefix in stage_prefixes():
        key = f"{prefix}_iou/"
        classes = list(dict.fromkeys(k[len(key):] for m in (ref, best) for k in m if k.startswith(key)))
        for cls in classes:
            r, b = _finite(ref.get(key + cls)), _finite(best.get(key + cls))
            rows.append({"stage": label, "class": cls, "reference": r, "best": b,
                         "delta": b - r if b is not None and r is not None else None})
    return Table(name="per_class", title="Per-class IoU (%): best config vs reference config",
                 frame=pd.DataFrame(rows, columns=["stage", "class", "reference", "best", "delta"]),
                 note="IoU over the whole evaluation split of each stage (both halves)")


def overlap_table(exp: ExperimentResult, reports: pd.DataFrame | None = None) -> Table:
    """EPS's per-class overlap ratio (``eps/overlap/<class>``, the last value the EPS training logged)
    of the reference and the best trial: about 0.8 where a class works, below 0.1 where EPS filed it
    under background (DESIGN.md §4), the quickest diagnostic of a failed class.

    Columns: ``class``, ``reference``, ``best``, ``tau`` (the threshold each config used: a class
    below its ``tau`` counts as background).
    """
    reports = _reports_frame(exp) if reports is None else reports
    key = "eps/overlap/"
    cols = [c for c in reports.columns if c.startswith(key)]
    values: dict[str, dict[str, float | None]] = {}
    for label, trial in (("reference", exp.reference), ("best", exp.best)):
        if trial is None or not cols:
            continue
        rows = reports[reports["trial_id"] == trial.trial_id]
        for c in cols:
            series = rows[c].dropna()
            values.setdefault(c[len(key):], {})[label] = float(series.iloc[-1]) if len(series) else None
    frame = pd.DataFrame([{"class": k, "reference": v.get("reference"), "best": v.get("best")}
                          for k, v in values.items()], columns=["class", "reference", "best"])
    taus = []
    for label, trial in (("reference", exp.reference), ("best", exp.best)):
        tau = _tau(exp, trial)
        if tau is not None:
            taus.append(f"{label} tau = {tau:g}")
    return Table(name="overlap", title="EPS overlap ratio per class (last logged value)", frame=frame,
                 note=("; ".join(taus) + "; a present class whose overlap stays below tau is learned as background")
                 if not frame.empty else "the EPS stage logged no overlap ratios")


def _tau(exp: ExperimentResult, trial: TrialRecord | None) -> float | None:
    if trial is None:
        return None
    if "eps.tau" in trial.params:
        return _finite(trial.params["eps.tau"])
    return _finite((exp.record.base_config.get("eps") or {}).get("tau"))


# --------------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------------


def stage_infos(exp: ExperimentResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``trial_id -> metrics.json["stages"]`` of every trial that wrote one (completed runs)."""
    out = {}
    for t in exp.trials:
        path = Path(t.run_dir) / "metrics.json" if t.run_dir else None
        if path is None or not path.is_file():
            continue
        try:
            stages = json.loads(path.read_text()).get("stages") or {}
        except (OSError, json.JSONDecodeError):
            continue
        out[t.trial_id] = stages
    return out


#: Run folders of the artifacts a sweep built before its trials (``<runs>/prebuild-<search>``,
#: written by ``trainables.prebuild``).
PREBUILD_PREFIX = "prebuild-"


def prebuild_infos(exp: ExperimentResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``prebuild-<search> -> metrics.json["stages"]`` of the shared builds the sweep ran before its trials."""
    runs = Path(exp.record.runs_dir or Path(exp.path) / RUNS_DIR)
    out = {}
    for path in sorted(runs.glob(f"{PREBUILD_PREFIX}*/metrics.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text()).get("stages") or {}
        except (OSError, json.JSONDecodeError):
            continue
    return out


def artifact_build_seconds(info: Mapping[str, Any]) -> float | None:
    """The build time of the artifact a ``metrics.json`` stage record points at: the record's
    ``build_seconds``, else its manifest's (the same for a build and for a cache hit)."""
    value = _finite(info.get("build_seconds"))
    if value is not None:
        return value
    path = info.get("path")
    manifest = Path(path) / _MANIFEST if path else None
    if manifest is not None and manifest.is_file():
        try:
            return _finite(json.loads(manifest.read_text()).get("build_seconds"))
        except (OSError, json.JSONDecodeError):
            return None
    return None


def compute_table(exp: ExperimentResult, infos: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> Table:
    """Compute spent per stage artifact, and what the cache saved.

    From every finished trial's ``metrics.json`` ``stages`` records, and those of the shared builds
    the sweep ran before its trials (:func:`prebuild_infos`): ``built`` (builds, i.e. cache
    misses), ``hits``, ``hours`` (sum of the build time of the builds), ``saved_hours`` (sum of the
    build time of the artifacts served from the cache: the work a hit did not repeat). A last row
    adds the run time of the trials that wrote no record (stopped early, failed): their partial and
    full builds are not itemised. Hours are GPU-hours (wall hours x ``gpus_per_trial``) when trials had
    GPUs, else CPU core-hours (wall hours x ``cpus_per_trial``).
    """
    infos = {**stage_infos(exp), **prebuild_infos(exp)} if infos is None else infos
    unit, scale, per = _compute_unit(exp)
    agg: dict[str, dict[str, Any]] = {}
    unknown = 0
    for stages in infos.values():
        for name, info in stages.items():
            a = agg.setdefault(name, {"built": 0, "hits": 0, "seconds": 0.0, "saved": 0.0})
            seconds = artifact_build_seconds(info)
            if seconds is None:
                unknown += 1
                seconds = 0.0 if info.get("hit") else (_finite(info.get("seconds")) or 0.0)
            if info.get("hit"):
                a["hits"] += 1
                a["saved"] += seconds
            else:
                a["built"] += 1
                a["seconds"] += seconds
    known = graph.artifact_names()  # + the CAM baseline's, after the graph's own
    order = [n for n in known if n in agg] + sorted(n for n in agg if n not in known)
    rows = [{"stage": n, "built": agg[n]["built"], "hits": agg[n]["hits"], "hours": agg[n]["seconds"] * scale / _HOUR,
             "saved_hours": agg[n]["saved"] * scale / _HOUR} for n in order]
    rest = [t for t in exp.trials if t.trial_id not in infos]
    rest_s = sum(t.seconds or 0.0 for t in rest)
    if rest:
        rows.append({"stage": "unrecorded trials", "built": None, "hits": None, "hours": rest_s * scale / _HOUR,
                     "saved_hours": None})
    rows.append({"stage": "total", "built": sum(a["built"] for a in agg.values()),
                 "hits": sum(a["hits"] for a in agg.values()),
                 "hours": sum(r["hours"] or 0.0 for r in rows), "saved_hours": sum(a["saved"] for a in agg.values())
                 * scale / _HOUR})
    note = [f"{unit}: wall hours of each artifact's build x {per} per trial; saved = the same work skipped by "
            "every cache hit"]
    if rest:
        note.append(f"{len(rest)} trial(s) stopped early, failed or unfinished wrote no stage record: their "
                    "run time is the 'unrecorded trials' row")
    if unknown:
        note.append(f"{unknown} record(s) had no build time; their wall seconds were used")
    return Table(name="compute", title=f"Compute spent ({unit})",
                 frame=pd.DataFrame(rows, columns=["stage", "built", "hits", "hours", "saved_hours"]),
                 note="; ".join(note))


def _compute_unit(exp: ExperimentResult) -> tuple[str, float, str]:
    """(unit, devices per trial, their description): GPU-hours when trials had GPUs, else CPU core-hours."""
    resources = exp.record.resources
    gpus = _finite(resources.gpus_per_trial) or 0.0
    cpus = _finite(resources.cpus_per_trial) or 1.0
    if gpus > 0:
        return "GPU-hours", gpus, f"{gpus:g} GPU"
    return "CPU-hours", cpus, f"{cpus:g} CPU core(s)"


def compute_line(exp: ExperimentResult) -> str:
    """One line of :func:`compute_table`'s total: the compute the experiment spent and what the cache saved."""
    total = compute_table(exp).frame.iloc[-1]
    unit = _compute_unit(exp)[0]
    return (f"compute: {total['hours']:.3f} {unit} ({int(total['built'])} builds), {total['saved_hours']:.3f} "
            f"saved by {int(total['hits'])} cache hits")


# --------------------------------------------------------------------------------------------------
# Searches (phases) and seed re-runs
# --------------------------------------------------------------------------------------------------


def phases_table(exp: ExperimentResult) -> Table:
    """One row per search of the experiment (a cascade's stages, the joint search, the re-runs):
    its metric, trials by status, its best value and the values it froze for the next stages."""
    rows = []
    phases = exp.record.phases
    for i, phase in enumerate(phases):
        trials = [t for t in exp.trials if t.phase == phase.name]
        done = [t for t in trials if t.status == "completed" and t.value(phase.metric) is not None]
        best = max((t.value(phase.metric) for t in done), default=None) if exp.mode == "max" else \
            min((t.value(phase.metric) for t in done), default=None)
        nxt = phases[i + 1] if i + 1 < len(phases) else None
        chosen = {k: v for k, v in (nxt.frozen if nxt is not None else {}).items() if k not in phase.frozen}
        rows.append({"search": phase.name, "metric": phase.metric, "trials": len(trials),
                     "completed": len(done), "pruned": sum(t.status == "pruned" for t in trials),
                     "failed": sum(t.status == "failed" for t in trials),
                     "budget": f"{phase.step_budget} steps" if phase.step_budget else f"{phase.requested} trials",
                     "best": best, "frozen_next": ", ".join(f"{k}={_short(v)}" for k, v in chosen.items())})
    cols = ["search", "metric", "trials", "completed", "pruned", "failed", "budget", "best", "frozen_next"]
    return Table(name="phases", title="Searches in order", frame=pd.DataFrame(rows, columns=cols),
                 note="a cascade searches each stage on its own tune metric and freezes its best (frozen_next) "
                      "for the stages after it; reseed re-runs the best configs and the reference with more seeds")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def seeds_table(exp: ExperimentResult) -> Table:
    """The seed re-runs: one row per config with its seeds and mean +- std (sample) of the tune and
    held-out metric; the winner is the best mean tune value among the searched configs and the reference."""
    rows = [{"config": r.label, "winner": r.winner, "runs": len(r.trials), "seeds": ",".join(map(str, r.seeds)),
             "tune_mean": r.tune_mean, "tune_std": r.tune_std, "heldout_mean": r.heldout_mean,
             "heldout_std": r.heldout_std, **{k: r.params.get(k) for k in exp.record.searched_params}}
            for r in exp.seeds]
    cols = ["config", "winner", "runs", "seeds", "tune_mean", "tune_std", "heldout_mean", "heldout_std",
            *exp.record.searched_params]
    return Table(name="seeds", title=f"Seed re-runs ({exp.metric} and {exp.heldout_metric})",
                 frame=pd.DataFrame(rows, columns=cols), note=" ".join(gain_lines(exp)))


def gain_lines(exp: ExperimentResult) -> list[str]:
    """What the experiment found against its reference, in words: the gain on both halves from
    completed runs only (means over seeds when re-run), next to the seed spread, or why there is none."""
    ref = exp.reference
    out: list[str] = []
    if ref is not None and ref.status != "completed":
        why = f" ({ref.error})" if ref.error else ""
        out.append(f"The reference trial {ref.trial_id} {ref.status}{why}; it has no value to compare with.")
    elif ref is None and not exp.seeds:
        out.append("The reference setting has no completed run in this experiment; no gain is reported.")
    gain, held = exp.gain_over_reference, exp.gain_over_reference_heldout
    if gain is None and held is None:
        return out
    winner = next((r for r in exp.seeds if r.winner), None)
    basis = f"means of {len(winner.trials)} run(s) each" if winner is not None else "single runs"
    text = f"Gain over the reference ({basis}): tune {_signed(gain)}, held-out {_signed(held)}."
    spread = exp.outcome.seed_spread
    if spread is not None and held is not None:
        ratio = held / spread if spread > 0 else math.inf
        verdict = "exceeds" if held > spread else "does not exceed"
        text += (f" Seed spread (pooled std, held-out): {spread:.2f}; the held-out gain {verdict} it "
                 f"({ratio:.1f}x).")
    elif winner is None:
        text += " Single runs: re-run the top configs with more seeds before calling a winner."
    if winner is not None and winner.label == "reference":
        text += " The reference had the best mean: the search did not beat it."
    out.append(text)
    return out


def gap_closed(found: float | None, start: float | None, target: float | None) -> float | None:
    """The share of the gap from ``start`` to ``target`` that ``found`` closed, 1 - normalised regret:
    ``(found - start) / (target - start)`` (1.0 = reached the target; above 1 = passed it; None when a
    value is missing or the target does not differ from the start)."""
    if found is None or start is None or target is None or math.isclose(target, start, abs_tol=1e-9):
        return None
    return (found - start) / (target - start)


def gap_table(exp: ExperimentResult, target: str) -> Table:
    """The reproduction gap: the reference (the paper's setting) -> the winner of the search -> the
    comparison config ``target`` (e.g. the hand-tuned ``synth``), each as mean +- std over its seed
    re-runs, tune and held-out; the note says how much of the gap the search closed on each half."""
    rows_by = {r.label: r for r in exp.seeds}
    winner = next((r for r in exp.seeds if r.winner), None)
    order = [("paper setting (reference)", rows_by.get("reference")), ("searched (winner)", winner),
             (f"hand-tuned ({target})", rows_by.get(target))]
    rows = [{"config": label, "runs": len(r.trials) if r else 0,
             "tune_mean": r.tune_mean if r else None, "tune_std": r.tune_std if r else None,
             "heldout_mean": r.heldout_mean if r else None, "heldout_std": r.heldout_std if r else None}
            for label, r in order]
    ref, tgt = rows_by.get("reference"), rows_by.get(target)
    notes = []
    for half, attr in (("tune", "tune_mean"), ("held-out", "heldout_mean")):
        share = gap_closed(*(getattr(r, attr) if r is not None else None for r in (winner, ref, tgt)))
        notes.append(f"gap closed ({half}): " + ("-" if share is None else f"{100 * share:.0f}%"))
    return Table(name="gap", title=f"Reproduction gap ({exp.metric} / {exp.heldout_metric}, mean +- std over seeds)",
                 frame=pd.DataFrame(rows, columns=["config", "runs", "tune_mean", "tune_std", "heldout_mean",
                                                   "heldout_std"]),
                 note="; ".join(notes))


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


# --------------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------------


def experiment_tables(exp: ExperimentResult, *, study: Any = None) -> dict[str, Table]:
    """Every table of the report, by name, each computed once (reports and the study are read once)."""
    study = load_study(exp) if study is None else study
    reports = _reports_frame(exp)
    curves = curves_table(exp, reports)
    trials = trials_table(exp, curves, trial_order(exp, study, reports))
    tables = [stage_table(exp), reference_table(exp), phases_table(exp), seeds_table(exp), trials,
              history_table(exp, trials),
              importance_table(exp, study), curves, stopped_table(exp, trials), per_class_table(exp),
              overlap_table(exp, reports), compute_table(exp)]
    return {t.name: t for t in tables}
