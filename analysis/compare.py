"""Two experiments side by side: their best configs (the fields that differ) and their stage tables.

:func:`compare_experiments` computes plain tables; :func:`format_comparison` renders them as
Markdown, which is what ``wsss-tune compare EXP_A EXP_B`` prints (and writes with ``--out``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from wsss_tune.analysis.export import best_config
from wsss_tune.analysis.report import markdown_table
from wsss_tune.analysis.results import ExperimentResult, load_experiment
from wsss_tune.analysis.tables import Table, stage_table
from wsss_tune.config import to_dict
from wsss_tune.utils.io import atomic_write_text

__all__ = ["Comparison", "flatten_config", "config_diff", "headline", "compare_experiments", "format_comparison",
           "compare"]

#: Config values are shown to 6 significant digits (a learning rate of 2.5e-4 stays readable).
_CONFIG_FLOATS = ".6g"
#: Config keys that name a run rather than configure it.
_IGNORED_KEYS = frozenset({"name"})


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The tables of a comparison of experiments ``a`` and ``b``."""

    a: ExperimentResult
    b: ExperimentResult
    headline: Table
    config: Table
    stages: Table


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eps": {"tau": 0.4}}`` -> ``{"eps.tau": 0.4}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def _best_fields(exp: ExperimentResult) -> dict[str, Any] | None:
    if exp.best is None:
        return None
    return flatten_config(to_dict(best_config(exp)))


def config_diff(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, *, searched: Collection[str] = ()) -> pd.DataFrame:
    """Rows ``field, a, b, searched`` for every flat config field whose value differs (a missing config
    counts as differing everywhere the other has a value)."""
    a, b = a or {}, b or {}
    rows = []
    for key in sorted(set(a) | set(b)):
        if key in _IGNORED_KEYS:
            continue
        va, vb = a.get(key), b.get(key)
        if va != vb:
            rows.append({"field": key, "a": va, "b": vb, "searched": key in searched})
    return pd.DataFrame(rows, columns=["field", "a", "b", "searched"], dtype=object)


def headline(a: ExperimentResult, b: ExperimentResult) -> pd.DataFrame:
    """One row per experiment: space, metric, trials, best trial and its tune and held-out values."""
    rows = []
    for label, e in (("a", a), ("b", b)):
        best = e.best
        rows.append({"": label, "experiment": e.name, "space": e.record.space_name, "metric": e.metric,
                     "trials": e.counts.get("total", 0), "completed": e.counts.get("completed", 0),
                     "best trial": best.trial_id if best else None,
                     "best tune": best.value(e.metric) if best else None,
                     "best held-out": best.value(e.heldout_metric) if best else None,
                     "gain over reference": e.gain_over_reference})
    return pd.DataFrame(rows)


def _stages_side_by_side(a: ExperimentResult, b: ExperimentResult) -> pd.DataFrame:
    cols = ["reference_tune", "reference_heldout", "best_tune", "best_heldout"]
    fa, fb = stage_table(a).frame, stage_table(b).frame
    stages = list(dict.fromkeys([*fa["stage"], *fb["stage"]]))
    rows = []
    for stage in stages:
        ra = fa[fa["stage"] == stage].to_dict("records")
        rb = fb[fb["stage"] == stage].to_dict("records")
        row: dict[str, Any] = {"stage": stage}
        for label, rec in (("a", ra[0] if ra else {}), ("b", rb[0] if rb else {})):
            row.update({f"{label} {c.replace('_', ' ').replace('heldout', 'held-out')}": rec.get(c) for c in cols})
        for name in ("tune", "held-out"):
            va, vb = row[f"a best {name}"], row[f"b best {name}"]
            row[f"b - a best {name}"] = vb - va if _number(va) and _number(vb) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def compare_experiments(a: ExperimentResult | str | Path, b: ExperimentResult | str | Path) -> Comparison:
    """Line up experiments ``a`` and ``b`` (results or folders)."""
    a = a if isinstance(a, ExperimentResult) else load_experiment(a)
    b = b if isinstance(b, ExperimentResult) else load_experiment(b)
    searched = {*a.record.searched_params, *b.record.searched_params}
    diff = config_diff(_best_fields(a), _best_fields(b), searched=searched)
    missing = [e.name for e in (a, b) if e.best is None]
    note = (f"no completed trial in {', '.join(missing)}: its config is shown as missing" if missing
            else f"{len(diff)} field(s) differ between the two best configs")
    return Comparison(
        a=a, b=b,
        headline=Table(name="headline", title="Experiments", frame=headline(a, b)),
        config=Table(name="config", title="Best configs: fields that differ", frame=diff, note=note),
        stages=Table(name="stages", title="Stage mIoU (%): a vs b", frame=_stages_side_by_side(a, b),
                     note="the held-out columns are the numbers to report; tune columns chose the best config"),
    )


def format_comparison(c: Comparison) -> str:
    """Markdown of the comparison."""
    lines = [f"# Compare: a = {c.a.name}, b = {c.b.name}", ""]
    for t in (c.headline, c.config, c.stages):
        lines += [f"## {t.title}", "", markdown_table(t.frame, floatfmt=_CONFIG_FLOATS if t is c.config else ""), ""]
        if t.note:
            lines += [f"_{t.note}_", ""]
    return "\n".join(lines)


def compare(exp_a: str | Path, exp_b: str | Path, *, out: str | Path | None = None) -> Comparison:
    """The ``wsss-tune compare`` command: print (and optionally write) the comparison."""
    c = compare_experiments(exp_a, exp_b)
    text = format_comparison(c)
    print(text)
    if out is not None:
        atomic_write_text(out, text + "\n")
    return c
