"""Figures of a sweep, drawn with matplotlib from the tables of :mod:`wsss_tune.analysis.tables`.

Each ``plot_*`` function takes computed tables (no file reading) and returns a
``matplotlib.figure.Figure`` built without pyplot (no global state, safe in threads and without a
display). :func:`qualitative_data` is the one reader: it collects the images and masks of the
qualitative figure (input, ground truth, CAM, EPS, refined, DeepLab) as arrays, which
:func:`plot_qualitative` then lays out. :func:`figure_png` encodes a figure as PNG bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wsss_tune.analysis.results import ExperimentResult, TrialRecord
from wsss_tune.analysis.tables import Table, cam_baseline, fidelity_attr

__all__ = [
    "FIGURE_DPI",
    "figure_png",
    "plot_stages",
    "plot_history",
    "plot_importances",
    "plot_slices",
    "plot_parallel",
    "plot_curves",
    "plot_per_class",
    "plot_compute",
    "QualitativeData",
    "qualitative_data",
    "plot_qualitative",
    "experiment_figures",
]

#: PNG resolution: sharp enough on screen, small enough to embed several in one HTML file.
FIGURE_DPI = 100
#: Width of a full-width figure (inches).
_WIDTH = 9.0
#: Colours of the two configs and of the trial statuses (matplotlib's default cycle).
_REF_COLOR, _BEST_COLOR = "tab:gray", "tab:blue"
_STATUS_STYLE = {"completed": ("o", "tab:blue"), "pruned": ("v", "tab:orange")}
#: Images in the qualitative figure by default.
DEFAULT_QUALITATIVE_IMAGES = 4
#: Opacity of the CAM heat map over the image.
_CAM_ALPHA = 0.5
#: Columns of the qualitative figure, in order.
QUALITATIVE_COLUMNS = ("input", "ground truth", "CAM", "EPS", "refined", "DeepLab")
#: Where a DeepLab stage may leave prediction PNGs (``deeplab.save_predictions``), inside its artifact
#: folder or the trial's run folder.
_PREDICTIONS = "predictions"


def figure_png(fig: Figure, *, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _message(text: str, *, height: float = 1.2) -> Figure:
    fig = Figure(figsize=(_WIDTH, height), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def _num(value: Any) -> float:
    return float("nan") if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def plot_stages(table: Table) -> Figure:
    """Grouped bars: held-out (solid) and tune (hatched) mIoU per stage, reference vs best."""
    f = table.frame
    if f.empty:
        return _message("No stage results: no trial completed.")
    fig = Figure(figsize=(_WIDTH, 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(f))
    width = 0.2
    for i, (cfg, color) in enumerate((("reference", _REF_COLOR), ("best", _BEST_COLOR))):
        for j, split in enumerate(("heldout", "tune")):
            values = [_num(v) for v in f[f"{cfg}_{split}"]]
            offset = (2 * i + j - 1.5) * width
            bars = ax.bar(x + offset, values, width, color=color, alpha=1.0 if split == "heldout" else 0.55,
                          hatch=None if split == "heldout" else "//",
                          label=f"{cfg} ({'held-out' if split == 'heldout' else 'tune'})")
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, list(f["stage"]))
    ax.set_ylabel("mIoU (%)")
    ax.set_title(table.title)
    ax.legend(fontsize=8, ncols=2)
    return fig


def plot_history(table: Table, *, metric: str, mode: str) -> Figure:
    """Each trial's value in creation order (stopped trials at their last intermediate value) and the
    best so far."""
    f = table.frame
    if f.empty:
        return _message("No trial reported the metric yet.")
    fig = Figure(figsize=(_WIDTH, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for status, (marker, color) in _STATUS_STYLE.items():
        sub = f[f["status"] == status]
        if not sub.empty:
            label = "completed" if status == "completed" else "stopped early (last value)"
            ax.scatter(sub["order"], sub["value"].map(_num), marker=marker, color=color, label=label, zorder=3)
    ax.step(f["order"], f["best_so_far"].map(_num), where="post", color="tab:red", label=f"best so far ({mode})")
    ax.set_xlabel("trial (creation order)")
    ax.set_ylabel(metric)
    ax.set_title(table.title)
    ax.legend(fontsize=8)
    return fig


def plot_importances(table: Table) -> Figure:
    """Horizontal bars of the importances, or the reason there are none."""
    f = table.frame
    if f.empty:
        return _message(f"Parameter importances: {table.note}")
    fig = Figure(figsize=(_WIDTH, 0.5 + 0.4 * len(f)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(list(f["param"])[::-1], list(f["importance"])[::-1], color=_BEST_COLOR)
    ax.set_xlabel("importance (share of variance)")
    ax.set_title(table.title)
    return fig


def _axis_values(values: pd.Series, spec: Mapping[str, Any]) -> tuple[np.ndarray, list[str] | None]:
    """Plot coordinates of a parameter's values (categories become indices) and the tick labels."""
    if spec.get("kind") == "categorical" or values.map(lambda v: isinstance(v, str)).any():
        choices = [str(c) for c in spec.get("choices", [])] or sorted({str(v) for v in values.dropna()})
        index = {c: i for i, c in enumerate(choices)}
        return np.array([index.get(str(v), np.nan) if v is not None else np.nan for v in values], float), choices
    return np.array([_num(v) for v in values], float), None


def plot_slices(trials: Table, *, params: Mapping[str, Mapping[str, Any]], metric: str) -> Figure:
    """One panel per searched parameter: value against the metric (stopped trials at their last value)."""
    f = trials.frame
    names = [p for p in params if p in f.columns]
    if f.empty or not names:
        return _message("No searched parameters to slice.")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(_WIDTH, 2.8 * rows), layout="constrained")
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        for status, (marker, color) in _STATUS_STYLE.items():
            sub = f[f["status"] == status]
            if sub.empty:
                continue
            x, ticks = _axis_values(sub[name], params[name])
            y = sub["value" if status == "completed" else "last_value"].map(_num)
            ax.scatter(x, y, marker=marker, color=color, s=18, label=status)
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks)
        if params[name].get("kind") == "loguniform" or params[name].get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        if k % cols == 0:
            ax.set_ylabel(metric)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Slices: each searched parameter against the metric")
    return fig


def _normalise(x: np.ndarray, spec: Mapping[str, Any], ticks: list[str] | None) -> np.ndarray:
    if ticks is not None:
        return x / max(len(ticks) - 1, 1)
    lo, hi = spec.get("low"), spec.get("high")
    if lo is None or hi is None:
        finite = x[np.isfinite(x)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if (spec.get("kind") == "loguniform" or spec.get("log")) and lo > 0:
        x, lo, hi = np.log(x), math.log(lo), math.log(hi)
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def plot_parallel(trials: Table, *, params: Mapping[str, Mapping[str, Any]], metric: str, mode: str) -> Figure:
    """Parallel coordinates: one axis per searched parameter (its range, log where searched on a log
    scale) and one for the metric; completed trials coloured by value, stopped ones dashed grey."""
    f = trials.frame
    names = [p for p in params if p in f.columns]
    if f.empty or not names:
        return _message("No searched parameters to draw.")
    f = f[f["status"].isin(["completed", "pruned"])]
    if f.empty:
        return _message("No completed or stopped trials.")
    coords = []
    for name in names:
        x, ticks = _axis_values(f[name], params[name])
        coords.append(_normalise(x, params[name], ticks))
    values = np.array([_num(v) if s == "completed" else _num(lv)
                       for s, v, lv in zip(f["status"], f["value"], f["last_value"], strict=True)])
    finite = values[np.isfinite(values)]
    vlo, vhi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    coords.append((values - vlo) / (vhi - vlo) if vhi > vlo else np.full_like(values, 0.5))
    data = np.stack(coords, axis=1)
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = Figure(figsize=(_WIDTH, 3.8), layout="constrained")
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"]
    xs = np.arange(data.shape[1])
    for row, status, v in zip(data, f["status"], values, strict=True):
        if status == "completed" and np.isfinite(v):
            t = (v - vlo) / (vhi - vlo) if vhi > vlo else 0.5
            ax.plot(xs, row, color=colors(t), alpha=0.9, lw=1.5)
        else:
            ax.plot(xs, row, color="tab:gray", ls="--", alpha=0.6, lw=1)
    for axis in range(data.shape[1]):
        ax.axvline(axis, color="black", lw=0.6)
    ax.set_xticks(xs, [*names, metric], rotation=15, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    fig.colorbar(ScalarMappable(norm=Normalize(vlo, vhi), cmap=colors), ax=ax, label=metric)
    ax.set_title("Parallel coordinates (each axis spans its searched range; stopped trials dashed)")
    return fig


def plot_curves(curves: Table, *, attr: str, metric: str, rungs: Sequence[float] = ()) -> Figure:
    """The metric against the fidelity for every trial: completed solid, stopped early dashed, with the
    scheduler's rungs as vertical lines."""
    f = curves.frame
    if f.empty:
        return _message("No intermediate values were reported.")
    fig = Figure(figsize=(_WIDTH, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for trial_id, sub in f.groupby("trial_id", sort=False):
        sub = sub.sort_values("step")
        status = sub["status"].iloc[0]
        done = status == "completed"
        ax.plot(sub["step"], sub["value"], marker=".", alpha=0.8, ls="-" if done else "--",
                color="tab:blue" if done else "tab:orange")
        if status == "pruned":
            ax.annotate(str(trial_id), (sub["step"].iloc[-1], sub["value"].iloc[-1]), fontsize=6)
    for r in rungs:
        ax.axvline(r, color="black", lw=0.5, ls=":")
    ax.set_xlabel(attr)
    ax.set_ylabel(metric)
    ax.set_title("Learning curves (completed solid, stopped early dashed; rungs dotted)")
    return fig


def plot_per_class(table: Table) -> Figure:
    """Per-class IoU of the best config against the reference, one panel per stage."""
    f = table.frame
    if f.empty:
        return _message("No per-class IoU was reported.")
    stages = list(dict.fromkeys(f["stage"]))
    fig = Figure(figsize=(_WIDTH, 1.2 + 0.35 * int(f.groupby("stage").size().max())), layout="constrained")
    for k, stage in enumerate(stages):
        sub = f[f["stage"] == stage]
        ax = fig.add_subplot(1, len(stages), k + 1)
        y = np.arange(len(sub))
        ax.barh(y - 0.2, sub["reference"].map(_num), 0.4, color=_REF_COLOR, label="reference")
        ax.barh(y + 0.2, sub["best"].map(_num), 0.4, color=_BEST_COLOR, label="best")
        ax.set_yticks(y, list(sub["class"]), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("IoU (%)")
        ax.set_title(stage, fontsize=9)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(table.title)
    return fig


def plot_compute(table: Table) -> Figure:
    """Hours spent building each stage artifact, and hours the cache saved."""
    f = table.frame[~table.frame["stage"].isin(["total"])]
    if f.empty:
        return _message("No stage records: no trial finished.")
    fig = Figure(figsize=(_WIDTH, 3.0), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(f))
    ax.bar(x - 0.2, f["hours"].map(_num), 0.4, color="tab:red", label="spent")
    ax.bar(x + 0.2, f["saved_hours"].map(_num), 0.4, color="tab:green", label="saved by the cache")
    ax.set_xticks(x, list(f["stage"]), fontsize=8)
    ax.set_ylabel(table.title.split("(")[-1].rstrip(")"))
    ax.set_title(table.title)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------------
# Qualitative figure
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QualitativeData:
    """Images of the qualitative figure: ``rows[i][column]`` is an ``(H, W, 3)`` uint8 array.

    Attributes:
        ids: image ids, one per row.
        columns: the columns that exist (of :data:`QUALITATIVE_COLUMNS`), in order.
        rows: per image, the arrays of those columns.
        trial: the trial whose masks are shown; ``note`` says where CAMs came from and what is missing.
    """

    ids: tuple[str, ...]
    columns: tuple[str, ...]
    rows: tuple[Mapping[str, np.ndarray], ...]
    trial: str
    note: str


def _stages_of(trial: TrialRecord) -> dict[str, Any]:
    path = Path(trial.run_dir) / "metrics.json" if trial.run_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("stages") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def _folder(stages: Mapping[str, Any], name: str, sub: str) -> Path | None:
    info = stages.get(name) or {}
    path = Path(info["path"]) / sub if info.get("path") else None
    return path if path is not None and path.is_dir() else None


def _cam_heat(image: np.ndarray, cam_file: Path) -> np.ndarray:
    """The image with the maximum of its object CAMs (background channel excluded) as a heat map."""
    import matplotlib

    from wsss_tune.stages.eps import load_cams

    cams, keys = load_cams(cam_file)
    objects = cams[keys != 0]
    heat = objects.max(axis=0) if objects.size else np.zeros(cams.shape[1:], np.float32)
    if heat.shape != image.shape[:2]:
        from PIL import Image

        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(image.shape[1::-1], Image.Resampling.BILINEAR))
    rgb = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return ((1 - _CAM_ALPHA) * image + _CAM_ALPHA * rgb).astype(np.uint8)


def qualitative_data(exp: ExperimentResult, *, images: int = DEFAULT_QUALITATIVE_IMAGES,
                     ids: Sequence[str] | None = None) -> QualitativeData | None:
    """Collect the qualitative figure's arrays for the best trial (None when there is no best trial).

    Images are the first ``images`` ids (sorted) of the held-out half of the mask-evaluation split
    that have an EPS mask (or ``ids``). Columns: the input, the ground truth, the CAM (the pseudo
    mask of the CAM-baseline trial when the sweep has one, else the best trial's CAMs as a heat
    map), and the EPS, refined and DeepLab masks from the artifact folders recorded in the best
    trial's ``metrics.json``; a column whose files do not exist is left out. Masks are coloured with
    the VOC palette.
    """
    from wsss_tune.config import from_dict
    from wsss_tune.data import VOCLayout, colorize, read_mask_png
    from wsss_tune.stages.evaluate import tune_heldout_ids

    best = exp.best
    if best is None:
        return None
    cfg = from_dict(exp.info.get("base_config") or {}, source=f"{exp.path}/experiment.json base_config")
    layout = VOCLayout.from_config(cfg.data)
    stages = _stages_of(best)
    folders = {
        "EPS": _folder(stages, "eps", "masks"),
        "refined": _folder(stages, "rw", "masks"),
        "DeepLab": _folder(stages, "deeplab", _PREDICTIONS) or (
            Path(best.run_dir) / _PREDICTIONS if best.run_dir and (Path(best.run_dir) / _PREDICTIONS).is_dir()
            else None),
    }
    notes = []
    baseline = cam_baseline(exp)
    cam_masks = _folder(_stages_of(baseline), "eps", "masks") if baseline is not None else None
    cam_files = _folder(stages, "eps", "cams") if cam_masks is None else None
    if cam_masks is not None:
        notes.append(f"CAM: pseudo masks of the CAM-baseline trial {baseline.trial_id}")  # type: ignore[union-attr]
    elif cam_files is not None:
        notes.append("CAM: the best trial's class activation maps (maximum over its classes)")
    if ids is None:
        eval_ids = layout.split_ids(cfg.data.mask_eval_split)
        _, held = tune_heldout_ids(layout, cfg.data, eval_ids)
        pool = sorted(held) or sorted(eval_ids)
        if folders["EPS"] is not None:
            pool = [i for i in pool if (folders["EPS"] / f"{i}.png").is_file()] or pool
        ids = pool[:images]
    rows = []
    present: list[str] = []
    for image_id in ids:
        image = layout.load_image(image_id)
        row: dict[str, np.ndarray] = {"input": image}
        gt = layout.mask_path(image_id)
        if gt.is_file():
            row["ground truth"] = colorize(read_mask_png(gt))
        if cam_masks is not None and (cam_masks / f"{image_id}.png").is_file():
            row["CAM"] = colorize(read_mask_png(cam_masks / f"{image_id}.png"))
        elif cam_files is not None and (cam_files / f"{image_id}.npz").is_file():
            row["CAM"] = _cam_heat(image, cam_files / f"{image_id}.npz")
        for col, folder in folders.items():
            if folder is not None and (folder / f"{image_id}.png").is_file():
                row[col] = colorize(read_mask_png(folder / f"{image_id}.png"))
        present += [c for c in row if c not in present]
        rows.append(row)
    columns = tuple(c for c in QUALITATIVE_COLUMNS if c in present)
    missing = [c for c in QUALITATIVE_COLUMNS if c not in columns]
    if missing:
        notes.append(f"not available: {', '.join(missing)}")
    return QualitativeData(ids=tuple(ids), columns=columns, rows=tuple(rows), trial=best.trial_id,
                           note="; ".join(notes))


def plot_qualitative(data: QualitativeData | None) -> Figure:
    """Images side by side: one row per image, one column per :attr:`QualitativeData.columns`."""
    if data is None or not data.rows:
        return _message("No qualitative figure: no completed trial with masks.")
    n, m = len(data.rows), len(data.columns)
    fig = Figure(figsize=(1.6 * m, 1.6 * n + 0.4), layout="constrained")
    for i, (image_id, row) in enumerate(zip(data.ids, data.rows, strict=True)):
        for j, col in enumerate(data.columns):
            ax = fig.add_subplot(n, m, i * m + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col in row:
                ax.imshow(row[col], interpolation="nearest")
            else:
                ax.set_facecolor("whitesmoke")
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(image_id, fontsize=7)
    fig.suptitle(f"Best trial {data.trial}", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------------


def experiment_figures(exp: ExperimentResult, tables: Mapping[str, Table], *,
                       qualitative: QualitativeData | None = None) -> dict[str, Figure]:
    """Every figure of the report, by name, drawn from ``tables`` (and the qualitative arrays)."""
    from wsss_tune.spaces import Fidelity

    from .plan import asha_rungs

    params = dict((exp.info.get("space") or {}).get("params") or {})
    fid = (exp.info.get("space") or {}).get("fidelity")
    rungs: list[float] = []
    if fid:
        rungs = asha_rungs(Fidelity(time_attr=fid["time_attr"], max_t=int(fid["max_t"]),
                                    grace_period=int(fid["grace_period"]),
                                    reduction_factor=float(fid["reduction_factor"])))
    return {
        "stages": plot_stages(tables["stages"]),
        "history": plot_history(tables["history"], metric=exp.metric, mode=exp.mode),
        "importances": plot_importances(tables["importances"]),
        "slices": plot_slices(tables["trials"], params=params, metric=exp.metric),
        "parallel": plot_parallel(tables["trials"], params=params, metric=exp.metric, mode=exp.mode),
        "curves": plot_curves(tables["curves"], attr=fidelity_attr(exp), metric=exp.metric, rungs=rungs),
        "per_class": plot_per_class(tables["per_class"]),
        "compute": plot_compute(tables["compute"]),
        "qualitative": plot_qualitative(qualitative),
    }
