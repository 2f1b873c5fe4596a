"""A self-contained report of what a sweep found: HTML (figures embedded as base64 PNG), Markdown,
and every table as CSV, all from one computation (:func:`compute_report`).

``<out>/report.html``   one file, no external references (styles inline, images as ``data:`` URIs)
``<out>/report.md``     the summary and the tables in Markdown, figures linked from ``figures/``
``<out>/figures/``      each figure as PNG
``<out>/tables/``       each table as CSV
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from wsss_tune.analysis.figures import (
    DEFAULT_QUALITATIVE_IMAGES,
    QualitativeData,
    experiment_figures,
    figure_png,
    qualitative_data,
)
from wsss_tune.analysis.results import ExperimentResult, load_experiment
from wsss_tune.analysis.tables import Table, experiment_tables, gain_lines, reference_table
from wsss_tune.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "REPORT_DIR",
    "Report",
    "ReportFiles",
    "compute_report",
    "markdown_table",
    "html_table",
    "render_markdown",
    "render_html",
    "write_report",
    "report",
]

#: Default report folder inside the experiment folder.
REPORT_DIR = "report"
#: Decimals of the numbers shown in tables (mIoU in % to 0.01, hours to 0.01).
_DECIMALS = 2
#: Shown for a missing number.
_MISSING = "-"
#: Report sections in order: (table name, figure name or None, heading).
_SECTIONS: tuple[tuple[str | None, str | None, str], ...] = (
    ("stages", "stages", "Stages: reference config vs best found"),
    ("references", None, "Reference points beside the best"),
    ("phases", None, "Searches"),
    ("seeds", None, "Seed re-runs"),
    ("history", "history", "Optimisation history"),
    ("importances", "importances", "Parameter importances"),
    (None, "slices", "Slices"),
    (None, "parallel", "Parallel coordinates"),
    ("stopped", "curves", "Trials stopped early"),
    ("per_class", "per_class", "Per-class IoU"),
    ("overlap", None, "EPS overlap ratio per class"),
    (None, "qualitative", "Qualitative results"),
    ("compute", "compute", "Compute spent"),
    ("trials", None, "All trials"),
)
#: Sections shown only when their table has rows.
_OPTIONAL = frozenset({"phases", "seeds", "references"})
#: Human headers of the stage table's columns.
_STAGE_HEADERS = {
    "stage": "stage", "reference_tune": "reference tune", "reference_heldout": "reference held-out",
    "best_tune": "best tune", "best_heldout": "best held-out", "reference_gain_tune": "ref. gain tune",
    "reference_gain_heldout": "ref. gain held-out", "best_gain_tune": "best gain tune",
    "best_gain_heldout": "best gain held-out", "delta_tune": "best - ref. tune", "delta_heldout": "best - ref. held-out",
}
_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.85em; } img { max-width: 100%; } code { background: #f5f5f5; }
"""


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything a report shows, computed once: the tables, the figures as PNG, the summary lines."""

    exp: ExperimentResult
    tables: Mapping[str, Table]
    figures: Mapping[str, bytes]
    summary: tuple[str, ...]
    qualitative_note: str = ""


@dataclass(frozen=True, kw_only=True)
class ReportFiles:
    """Where :func:`write_report` put things."""

    folder: Path
    html: Path
    markdown: Path
    figures: Mapping[str, Path]
    tables: Mapping[str, Path]


# --------------------------------------------------------------------------------------------------
# Computing
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, floatfmt: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if floatfmt:
            return format(value, floatfmt)
        return f"{value:.{_DECIMALS}f}" if abs(value) >= 10 ** -_DECIMALS or value == 0 else f"{value:.3g}"
    return str(value)


def _or_unknown(value: str | None) -> str:
    return "?" if value is None else value


def _summary(exp: ExperimentResult) -> tuple[str, ...]:
    c, r = exp.counts, exp.record
    lines = [
        f"Experiment **{exp.name}** (space `{_or_unknown(r.space_name)}`), metric `{exp.metric}` ({exp.mode}), "
        f"selected on the tune split `{_or_unknown(r.tune_split)}`, reported on the held-out split "
        f"`{_or_unknown(r.heldout_split)}`.",
        f"Trials: {c.get('total', 0)} of {exp.requested} requested: {c.get('completed', 0)} completed, "
        f"{c.get('pruned', 0)} stopped early, {c.get('failed', 0)} failed, {c.get('incomplete', 0)} incomplete.",
    ]
    if exp.best is not None:
        params = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in exp.best.params.items())
        lines.append(f"Best trial {exp.best.trial_id}: {exp.metric} = {_fmt(exp.best.value(exp.metric))}, held-out "
                     f"{exp.heldout_metric} = {_fmt(exp.best.value(exp.heldout_metric))}; values: {params}.")
    if exp.reference is not None:
        lines.append(f"Reference point (trial {exp.reference.trial_id}, {exp.reference.status}): {exp.metric} = "
                     f"{_fmt(exp.reference.value(exp.metric))}, held-out = "
                     f"{_fmt(exp.reference.value(exp.heldout_metric))}.")
    named = reference_table(exp).frame
    for r in named[~named["config"].isin(["reference", "best"])].to_dict("records"):
        lines.append(f"Reference point {r['config']} (trial {_fmt(r['trial_id'])}, {r['status']}): {exp.metric} = "
                     f"{_fmt(r['tune'])}, held-out = {_fmt(r['heldout'])}; the best's gain over it: tune "
                     f"{_fmt(r['best_gain_tune'])}, held-out {_fmt(r['best_gain_heldout'])}.")
    lines += gain_lines(exp)
    failed = [t for t in exp.trials if t.status == "failed"]
    for t in failed[:5]:
        lines.append(f"Failed trial {t.trial_id}: {t.error}")
    return tuple(lines)


def compute_report(exp: ExperimentResult | str | Path, *, images: int = DEFAULT_QUALITATIVE_IMAGES,
                   study: Any = None, qualitative: QualitativeData | None = None) -> Report:
    """Compute every table and figure of the report of ``exp`` (an experiment or its folder)."""
    if not isinstance(exp, ExperimentResult):
        exp = load_experiment(exp)
    tables = experiment_tables(exp, study=study)
    qual = qualitative if qualitative is not None else qualitative_data(exp, images=images)
    figs = experiment_figures(exp, tables, qualitative=qual)
    pngs = {name: figure_png(fig) for name, fig in figs.items()}
    return Report(exp=exp, tables=tables, figures=pngs, summary=_summary(exp),
                  qualitative_note=qual.note if qual is not None else "")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _display(table: Table) -> pd.DataFrame:
    f = table.frame
    if table.name == "stages":
        return f.rename(columns=_STAGE_HEADERS)
    if table.name == "trials":
        return f.drop(columns=["error"])
    return f


def markdown_table(frame: pd.DataFrame, *, floatfmt: str = "") -> str:
    """A pipe table of ``frame``: floats to :data:`_DECIMALS` decimals (or ``floatfmt``, a format
    spec such as ``.6g``), missing values as ``-``."""
    if frame.empty:
        return "_(none)_"
    cols = [str(c) for c in frame.columns]
    esc = [c.replace("|", "\\|") for c in cols]
    lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, floatfmt).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def html_table(frame: pd.DataFrame) -> str:
    """An HTML table of ``frame`` (text escaped)."""
    if frame.empty:
        return "<p class='note'>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_inline(text: str) -> str:
    """Markdown emphasis/code of the summary lines as HTML (only ``**bold**`` and `` `code` ``)."""
    out, parts = [], text.split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            bold = html.escape(part).split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


def _sections(report: Report) -> list[tuple[str, Table | None, str | None, str]]:
    out = []
    for table_name, figure_name, heading in _SECTIONS:
        table = report.tables.get(table_name) if table_name else None
        if table_name in _OPTIONAL and (table is None or table.empty):
            continue  # an experiment of one search without re-runs has no such section
        note = table.note if table is not None else ""
        if figure_name == "qualitative":
            note = report.qualitative_note
        out.append((heading, table, figure_name if figure_name in report.figures else None, note))
    return out


def render_markdown(report: Report, *, figure_dir: str = "figures") -> str:
    """The Markdown summary: headline, then each section's table (and a link to its figure)."""
    lines = [f"# Sweep report: {report.exp.name}", "", *(f"- {s}" for s in report.summary), ""]
    for heading, table, figure, note in _sections(report):
        lines += [f"## {heading}", ""]
        if table is not None:
            lines += [f"**{table.title}**", "", markdown_table(_display(table)), ""]
        if note:
            lines += [f"_{note}_", ""]
        if figure is not None:
            lines += [f"![{heading}]({figure_dir}/{figure}.png)", ""]
    return "\n".join(lines)


def render_html(report: Report) -> str:
    """One HTML file: styles inline, figures as base64 ``data:`` URIs, nothing fetched from elsewhere."""
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>Sweep report: {html.escape(report.exp.name)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>Sweep report: {html.escape(report.exp.name)}</h1>", "<ul>"]
    parts += [f"<li>{_md_inline(s)}</li>" for s in report.summary]
    parts.append("</ul>")
    for heading, table, figure, note in _sections(report):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if figure is not None:
            data = base64.b64encode(report.figures[figure]).decode("ascii")
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
        if table is not None:
            parts.append(f"<h3>{html.escape(table.title)}</h3>{html_table(_display(table))}")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, out: str | Path) -> ReportFiles:
    """Write ``report`` into the folder ``out`` (see the module docstring); files are written atomically."""
    folder = Path(out)
    figures = {}
    for name, png in report.figures.items():
        figures[name] = folder / "figures" / f"{name}.png"
        atomic_write_bytes(figures[name], png)
    tables = {}
    for name, table in report.tables.items():
        tables[name] = folder / "tables" / f"{name}.csv"
        atomic_write_text(tables[name], table.frame.to_csv(index=False))
    md, page = folder / "report.md", folder / "report.html"
    atomic_write_text(md, render_markdown(report))
    atomic_write_text(page, render_html(report))
    atomic_write_text(folder / "notes.json", json.dumps({n: t.note for n, t in report.tables.items()}, indent=2) + "\n")
    return ReportFiles(folder=folder, html=page, markdown=md, figures=figures, tables=tables)


def report(exp_dir: str | Path, *, out: str | Path | None = None, images: int = DEFAULT_QUALITATIVE_IMAGES,
           wandb: str = "off") -> ReportFiles:
    """The ``wsss-tune report`` command: compute, write, optionally log to W&B; prints where things are.

    Args:
        exp_dir: The experiment folder.
        out: Report folder (default ``<exp_dir>/report``).
        images: Images in the qualitative figure.
        wandb: ``off``, ``offline`` or ``online``: also log the tables and figures to the experiment's
            W&B project (:func:`~wsss_tune.analysis.wandb_log.log_report_to_wandb`).
    """
    rep = compute_report(exp_dir, images=images)
    files = write_report(rep, out if out is not None else rep.exp.path / REPORT_DIR)
    print(f"report: {files.html}")
    print(f"summary: {files.markdown}")
    print(f"tables (CSV): {files.folder / 'tables'}")
    for line in rep.summary:
        print(line.replace("**", "").replace("`", ""))
    if wandb != "off":
        from wsss_tune.analysis.wandb_log import log_report_to_wandb

        where = log_report_to_wandb(rep.exp, rep.tables, rep.figures, wandb)
        print(f"W&B ({wandb}): {where}" + (f"  (upload: wandb sync {where})" if wandb == "offline" else ""))
    return files
