"""Search spaces: YAML files that describe a sweep and do nothing else.

A space names the config fields it varies by their dotted config path (``eps.tau``), each with a
distribution; the metric a trial reports and whether to maximise it; the early-stopping fidelity;
the pipeline stages a trial runs; the base config (built-in name or path) plus fixed overrides;
and the evaluation protocol: ``tune_split``, the ground-truth images the metric is computed on
during the search, and ``heldout_split``, on which the best configuration is scored once,
afterwards. A file looks like::

    base: voc                      # built-in config name, or a path relative to this file
    stages: [eps]                  # pipeline stages (eps, affinity, deeplab) or `all`
    metric: eps_miou_tune
    mode: max
    tune_split: train_tune         # the two fixed halves of VOC train, see below
    heldout_split: train_heldout
    num_samples: 24                # default number of trials
    overrides: {eps.eval_images: 256}
    references: [voc_eps_recipe]   # more settings evaluated first (see below)
    fidelity: {time_attr: stage_step, max_t: 20000, grace_period: 4000, reduction_factor: 3}
    params:
      eps.tau: {kind: uniform, low: 0.1, high: 0.7}
      rw.logt: {kind: int, low: 2, high: 8}            # optional: step, log
      deeplab.lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}
      eps.bg_mode: {kind: categorical, choices: [constant, learned]}

Splits. Every stage scores its masks on an evaluation split (``data.mask_eval_split`` for the EPS
and random-walk masks, ``data.val_split`` for DeepLab) and reports the mIoU of its tuning and
held-out parts separately (``<stage>_miou_tune`` / ``_heldout``; see
:func:`wsss_tune.stages.evaluate.tune_heldout_ids`). ``<eval split>_tune`` and
``<eval split>_heldout`` name the two fixed halves of the evaluation split that the data layer
derives from a hash of each image id when ``data.tune_split``/``data.heldout_split`` are empty; any
other names are id-list files of the dataset. A search may only optimise a ``*_tune`` metric.

Reference points. The base config's values of the searched parameters are the reference point,
evaluated first. ``references`` names more configs (built-in names, or YAML paths relative to the
space file) whose values of the searched parameters are evaluated first as well: several published
settings as starting points, each a trial the scheduler never stops, each shown beside the searched
best in the report. Only the searched parameters are taken from a named config; the rest of a trial's
config is the base's. Loading resolves the names to their values (:func:`config_point`, the mapping
``--compare-config`` uses too); the recorded space holds the values (``references: {label: {path:
value}}``), so a resumed sweep or a report never reads the configs again.

Loading validates everything against the config schema - types and the valid values each field
declares - and raises :class:`SpaceError` naming the file and the key (``params.eps.tau.high``).
Turning a space into Ray Tune or Optuna distributions happens in ``wsss_tune.trainables``; this
module imports neither.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from wsss_tune.config import (
    ConfigError,
    DuplicateKeyError,
    PipelineConfig,
    apply_overrides,
    builtin_configs,
    check_field,
    check_value,
    field_type,
    load_config,
    parse_yaml,
)
from wsss_tune.stages import graph
from wsss_tune.stages.pipeline import parse_stages

__all__ = [
    "SECTION_STAGE",
    "TUNE_METRICS",
    "TUNE_SUFFIX",
    "HELDOUT_SUFFIX",
    "KINDS",
    "DEFAULT_NUM_SAMPLES",
    "SpaceError",
    "Param",
    "Fidelity",
    "SearchSpace",
    "REFERENCE_LABEL",
    "config_point",
    "list_spaces",
    "load_space",
    "space_from_dict",
    "validate",
]

#: Which pipeline stage reads each stage's config section (the ``affinity`` stage runs the random
#: walk too; ``data`` and ``run`` concern every stage), and the metrics a search may optimise (the
#: tuning-half mIoU each stage reports, with that stage and the ``DataConfig`` field naming the split
#: it is measured on): both derived from the stage graph (:mod:`wsss_tune.stages.graph`), which
#: the functions below read at call time, so a stage added to the graph is searchable at once.
SECTION_STAGE: dict[str, str] = graph.section_stages()
TUNE_METRICS: dict[str, tuple[str, str]] = graph.tune_metrics()
#: Suffixes of the two derived halves of an evaluation split (``train_tune``, ``val_heldout``).
TUNE_SUFFIX, HELDOUT_SUFFIX = "_tune", "_heldout"
#: Distributions a parameter may use.
KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "categorical")
#: Trials a sweep runs when the space file names no ``num_samples``.
DEFAULT_NUM_SAMPLES = 16
#: Default ASHA reduction factor: keep the best 1/3 at each rung (Li et al., "Massively Parallel
#: Hyperparameter Tuning", 2020, use eta = 3 in their experiments).
DEFAULT_REDUCTION_FACTOR = 3.0
#: Default reported counter that ASHA reads as training time: the reporting stage's own step, which
#: the pipeline reports beside ``step`` (counted across stages, so it depends on upstream cache hits).
DEFAULT_TIME_ATTR = "stage_step"

_PARAM_FIELDS: dict[str, frozenset[str]] = {
    "uniform": frozenset({"low", "high", "step"}),
    "loguniform": frozenset({"low", "high"}),
    "int": frozenset({"low", "high", "step", "log"}),
    "categorical": frozenset({"choices"}),
}
_REQUIRED_KEYS = ("base", "stages", "metric", "mode", "tune_split", "heldout_split", "params")
_OPTIONAL_KEYS = ("description", "num_samples", "overrides", "fidelity", "references")
_FIDELITY_KEYS = ("time_attr", "max_t", "grace_period", "reduction_factor")
#: The protocol's splits are top-level keys; overriding them as well would make two sources of truth.
_SPLIT_FIELDS = ("data.tune_split", "data.heldout_split")
#: Relative tolerance when checking that a float lies in a range or on a step grid.
_REL_TOL = 1e-9
#: Most combinations of the parameters' ends :func:`validate` tries against the config's rules.
_MAX_CORNERS = 4096
#: Label of the base config's reference point among the reference points (:meth:`SearchSpace.reference_points`).
REFERENCE_LABEL = "reference"


class SpaceError(ValueError):
    """A search space is invalid; ``source`` is the file and ``key`` the offending key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.source, self.key, self.message = source, key, message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.key, self.message))


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=_REL_TOL)


@dataclass(frozen=True, kw_only=True)
class Param:
    """One searched config field.

    ``uniform``/``loguniform`` draw a float in [low, high] (``uniform`` may have a ``step``);
    ``int`` draws an integer in [low, high] (inclusive) with an optional ``step`` or ``log``;
    ``categorical`` picks one of ``choices``.
    """

    path: str
    kind: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        extra = (f", step {self.step}" if self.step else "") + (", log scale" if self.log else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this parameter's domain."""
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if self.kind == "int" and not float(value).is_integer():
            return False
        if (value < self.low and not _close(value, self.low)) or (value > self.high and not _close(value, self.high)):
            return False
        if self.step:
            k = (value - self.low) / self.step
            return _close(k, round(k))
        return True

    def grid(self, n: int) -> list[Any]:
        """``n`` evenly spaced values (log-spaced when ``log``), snapped to ``step``/integers and
        de-duplicated; ``n = 1`` gives the (geometric) midpoint. Categorical: every choice."""
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        ts = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
        values = [lo + t * (hi - lo) for t in ts]
        values = [math.exp(v) for v in values] if self.log else values
        if n > 1:
            values[0], values[-1] = self.low, self.high  # exact ends, no rounding error
        if self.step:
            values = [min(self.low + round((v - self.low) / self.step) * self.step, self.high) for v in values]
        out: list[Any] = []
        for v in values:
            v = int(round(v)) if self.kind == "int" else round(float(v), 12)
            if v not in out:
                out.append(v)
        return out


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """Early stopping (ASHA): which reported counter measures training time, and the rungs."""

    time_attr: str = DEFAULT_TIME_ATTR
    max_t: int
    grace_period: int
    reduction_factor: float = DEFAULT_REDUCTION_FACTOR


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """A validated search space (see the module docstring for the file format)."""

    name: str
    base: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...]
    metric: str
    mode: Literal["max", "min"]
    stages: tuple[str, ...]
    fidelity: Fidelity | None = None
    tune_split: str
    heldout_split: str
    num_samples: int = DEFAULT_NUM_SAMPLES
    source: Path | None = None
    description: str = ""
    #: Named reference points (label -> config path -> value), resolved from the configs the file names
    #: (``references``); they hold at least the searched parameters.
    references: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """How errors name this space: its file, or its name if it has none."""
        return str(self.source) if self.source is not None else f"<search space {self.name!r}>"

    def base_config(self) -> PipelineConfig:
        """The base config with the fixed overrides and the protocol's splits applied.

        A relative ``base`` path is relative to the space file's folder. Derived halves
        (``<eval split>_tune``/``_heldout``) leave ``data.tune_split``/``data.heldout_split`` empty,
        which tells the data layer to derive them; other names are passed on as id-list files.
        """
        cfg = self._config_without_splits()
        derived = self._derived_halves(cfg)
        tune, held = ("", "") if derived else (self.tune_split, self.heldout_split)
        return apply_overrides(cfg, {"data.tune_split": tune, "data.heldout_split": held})

    def _config_without_splits(self, *, overrides: bool = True) -> PipelineConfig:
        base: str | Path = self.base
        if self.base not in builtin_configs():
            path = Path(self.base).expanduser()
            base = path if path.is_absolute() or self.source is None else self.source.parent / path
        return load_config(base, dict(self.overrides) if overrides else {})

    def _derived_halves(self, cfg: PipelineConfig) -> str | None:
        """The evaluation split whose derived halves ``tune_split``/``heldout_split`` name, if they do."""
        if self.metric not in graph.tune_metrics():
            return None
        eval_split = getattr(cfg.data, graph.tune_metrics()[self.metric][1])
        if self.tune_split == eval_split + TUNE_SUFFIX and self.heldout_split == eval_split + HELDOUT_SUFFIX:
            return eval_split
        return None

    def reference_point(self) -> dict[str, Any]:
        """Values of the searched parameters in the base config: the paper's (or the built-in)
        setting, evaluated first as the warm start. Keys are config paths."""
        cfg = self.base_config()
        out = {}
        for p in self.params:
            section, _, name = p.path.partition(".")
            out[p.path] = getattr(getattr(cfg, section), name)
        return out

    def reference_points(self) -> dict[str, dict[str, Any]]:
        """Every point evaluated first, by label: the base config's (:data:`REFERENCE_LABEL`,
        :meth:`reference_point`), then each named reference's values of the searched parameters, in
        the file's order. Two labels may share a point; a sweep evaluates it once."""
        paths = [p.path for p in self.params]
        out = {REFERENCE_LABEL: self.reference_point()}
        for label, values in self.references.items():
            out[label] = {path: values[path] for path in paths}
        return out

    def sample_grid(self, n: int) -> list[dict[str, Any]]:
        """Cartesian grid with :meth:`Param.grid` ``(n)`` values per parameter (all choices for a
        categorical one), first parameter varying slowest. Deterministic; for smoke sweeps."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample_grid n={n!r}: expected an integer >= 1")
        axes = [p.grid(n) for p in self.params]
        paths = [p.path for p in self.params]
        return [dict(zip(paths, values, strict=True)) for values in itertools.product(*axes)]


# --------------------------------------------------------------------------------------------------
# Parsing (structure) and validation (meaning)
# --------------------------------------------------------------------------------------------------


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(where, key, f"expected a number, got {value!r}")
    return value


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpaceError(where, key, f"expected a non-empty string, got {value!r}")
    return value


def _parse_param(path: Any, spec: Any, where: str) -> Param:
    key = f"params.{path}"
    if not isinstance(path, str):
        raise SpaceError(where, key, "parameter names are config paths such as 'eps.tau'")
    if not isinstance(spec, Mapping):
        raise SpaceError(where, key, f"expected a mapping with 'kind' ({', '.join(KINDS)}), got {spec!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise SpaceError(where, f"{key}.kind", f"unknown distribution {kind!r}; expected one of {', '.join(KINDS)}")
    extra = sorted(set(spec) - {"kind"} - _PARAM_FIELDS[kind])
    if extra:
        raise SpaceError(where, f"{key}.{extra[0]}", f"not a field of a {kind} parameter; allowed: "
                         f"{', '.join(sorted(_PARAM_FIELDS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise SpaceError(where, f"{key}.choices", f"expected a list, got {choices!r}")
        return Param(path=path, kind=kind, choices=tuple(tuple(c) if isinstance(c, list) else c for c in choices))
    for bound in ("low", "high"):
        if spec.get(bound) is None:
            raise SpaceError(where, f"{key}.{bound}", f"required for a {kind} parameter")
    log = spec.get("log", kind == "loguniform")
    if not isinstance(log, bool):
        raise SpaceError(where, f"{key}.log", f"expected true or false, got {log!r}")
    def num(name: str) -> float | None:
        if spec.get(name) is None:
            return None
        v = _number(spec[name], where, f"{key}.{name}")
        if kind != "int":
            return float(v)
        return int(v) if float(v).is_integer() else v  # a fractional bound is reported by validate()

    return Param(path=path, kind=kind, low=num("low"), high=num("high"), log=log, step=num("step"))


def _parse_fidelity(spec: Any, where: str) -> Fidelity | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise SpaceError(where, "fidelity", f"expected a mapping with {', '.join(_FIDELITY_KEYS)}, got {spec!r}")
    extra = sorted(set(spec) - set(_FIDELITY_KEYS))
    if extra:
        raise SpaceError(where, f"fidelity.{extra[0]}", f"unknown key; known: {', '.join(_FIDELITY_KEYS)}")
    for k in ("max_t", "grace_period"):
        if k not in spec:
            raise SpaceError(where, f"fidelity.{k}", "required")
        if isinstance(spec[k], bool) or not isinstance(spec[k], int):
            raise SpaceError(where, f"fidelity.{k}", f"expected an integer, got {spec[k]!r}")
    return Fidelity(
        time_attr=_string(spec.get("time_attr", DEFAULT_TIME_ATTR), where, "fidelity.time_attr"),
        max_t=spec["max_t"],
        grace_period=spec["grace_period"],
        reduction_factor=_number(spec.get("reduction_factor", DEFAULT_REDUCTION_FACTOR), where,
                                 "fidelity.reduction_factor"),
    )


def config_point(params: Sequence[Param], name: str | Path, *, base_dir: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The values of ``params`` in a named config: ``(label, {path: value})``.

    ``name`` is a built-in config name or a YAML path (a relative one is relative to ``base_dir``, default
    the working directory); the label is the built-in name or the file's stem. Whether the values lie in
    a space is the caller's check (:func:`validate` for ``references``, ``--compare-config`` its own).

    Raises:
        ConfigError: the config does not exist or does not load.
    """
    text = str(name)
    target: str | Path = text
    if text not in builtin_configs():
        path = Path(text).expanduser()
        target = path if path.is_absolute() or base_dir is None else base_dir / path
    cfg = load_config(target)
    label = Path(text).stem if text.endswith((".yaml", ".yml")) else text
    values = {}
    for p in params:
        section, _, field_name = p.path.partition(".")
        values[p.path] = getattr(getattr(cfg, section), field_name)
    return label, values


def _parse_references(spec: Any, params: Sequence[Param], where: str, source: Path | None) -> dict[str, dict[str, Any]]:
    """``references``: a list of config names (resolved here), or the recorded ``{label: {path: value}}``."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        out: dict[str, dict[str, Any]] = {}
        for label, values in spec.items():
            if not isinstance(label, str) or not isinstance(values, Mapping):
                raise SpaceError(where, f"references.{label}", f"expected config path -> value, got {values!r}")
            out[label] = {str(k): tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return out
    if not isinstance(spec, list) or not all(isinstance(n, str) and n.strip() for n in spec):
        raise SpaceError(where, "references", f"expected a list of config names or YAML paths, got {spec!r}")
    out = {}
    for i, name in enumerate(spec):
        try:
            label, values = config_point(params, name, base_dir=source.parent if source is not None else None)
        except ConfigError as exc:
            raise SpaceError(where, f"references[{i}]", str(exc)) from None
        if label in out or label == REFERENCE_LABEL:
            raise SpaceError(where, f"references[{i}]", f"the label {label!r} is taken (the base config's point is "
                             f"{REFERENCE_LABEL!r}; each named config once)")
        out[label] = values
    return out


def space_from_dict(data: Any, *, source: str | Path | None = None, name: str | None = None) -> SearchSpace:
    """Build and :func:`validate` a space from its YAML mapping; ``source`` is the file it came from."""
    name = name or (Path(source).stem if source is not None else "space")
    where = str(source) if source is not None else f"<search space {name!r}>"
    if not isinstance(data, Mapping):
        raise SpaceError(where, "<top level>", f"expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _REQUIRED_KEYS + _OPTIONAL_KEYS:
            raise SpaceError(where, str(key), f"unknown key; known: {', '.join(_REQUIRED_KEYS + _OPTIONAL_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise SpaceError(where, key, "required key is missing")
    stages = data["stages"]
    if not (stages == "all" or isinstance(stages, list) and all(isinstance(s, str) for s in stages)):
        raise SpaceError(where, "stages", f"expected a list of stage names ({', '.join(graph.stage_names())}) or 'all', "
                         f"got {stages!r}")
    plugins = (data.get("overrides") or {}).get("run.stage_plugins") if isinstance(data.get("overrides"), Mapping) \
        else None
    if plugins:  # stages they add are named in this space
        try:
            graph.load_plugins(list(plugins))
        except ValueError as exc:
            raise SpaceError(where, "overrides.run.stage_plugins", str(exc)) from None
    try:
        stages = parse_stages(stages)
    except ValueError as exc:
        raise SpaceError(where, "stages", str(exc)) from None
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
        raise SpaceError(where, "overrides", f"expected a mapping of config paths to values, got {overrides!r}")
    params = data["params"]
    if not isinstance(params, Mapping):
        raise SpaceError(where, "params", f"expected a mapping of config paths to distributions, got {params!r}")
    num_samples = data.get("num_samples", DEFAULT_NUM_SAMPLES)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise SpaceError(where, "num_samples", f"expected an integer, got {num_samples!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpaceError(where, "description", f"expected text, got {description!r}")
    parsed = tuple(_parse_param(path, spec, where) for path, spec in params.items())
    space = SearchSpace(
        name=name,
        base=_string(data["base"], where, "base"),
        overrides=dict(overrides),
        params=parsed,
        references=_parse_references(data.get("references"), parsed, where, Path(source) if source is not None else None),
        metric=_string(data["metric"], where, "metric"),
        mode=data["mode"],
        stages=tuple(stages),
        fidelity=_parse_fidelity(data.get("fidelity"), where),
        tune_split=_string(data["tune_split"], where, "tune_split"),
        heldout_split=_string(data["heldout_split"], where, "heldout_split"),
        num_samples=num_samples,
        source=Path(source) if source is not None else None,
        description=description,
    )
    validate(space)
    return space


def _validate_param(p: Param, space: SearchSpace) -> None:
    where, key = space.where, f"params.{p.path}"
    try:
        tp = field_type(p.path)
    except ConfigError as exc:
        raise SpaceError(where, key, f"unknown parameter path ({exc})") from None
    section = p.path.partition(".")[0]
    stage = graph.section_stages().get(section)
    if stage is not None and stage not in space.stages:
        raise SpaceError(where, key, f"section {section!r} is read by the {stage!r} stage, which stages "
                         f"{list(space.stages)} do not run")
    if p.kind not in KINDS:
        raise SpaceError(where, f"{key}.kind", f"unknown distribution {p.kind!r}; expected one of {', '.join(KINDS)}")
    if p.kind == "categorical":
        if not p.choices:
            raise SpaceError(where, f"{key}.choices", "no choices: a categorical parameter needs at least one")
        for i, choice in enumerate(p.choices):
            try:
                check_value(tp, choice, p.path)
            except ConfigError as exc:
                raise SpaceError(where, f"{key}.choices[{i}]", f"wrong type for the field ({exc})") from None
            _check_valid(p.path, choice, where, f"{key}.choices[{i}]")
        if len(set(map(repr, p.choices))) != len(p.choices):
            raise SpaceError(where, f"{key}.choices", f"repeated choices in {list(p.choices)}")
        return
    needed = float if p.kind in ("uniform", "loguniform") else int
    if tp is not needed:
        hint = "int or categorical" if tp is int else "categorical" if tp is not float else "uniform or loguniform"
        raise SpaceError(where, f"{key}.kind", f"a {p.kind} distribution needs a {needed.__name__} field, but "
                         f"{p.path} is {getattr(tp, '__name__', tp)}; use {hint}")
    assert p.low is not None and p.high is not None
    if p.kind == "int":
        for bound, v in (("low", p.low), ("high", p.high), ("step", p.step)):
            if v is not None and (isinstance(v, bool) or not float(v).is_integer()):
                raise SpaceError(where, f"{key}.{bound}", f"expected an integer, got {v!r}")
    if not p.low < p.high:
        raise SpaceError(where, key, f"empty range: low {p.low} must be below high {p.high}")
    if p.log and p.low <= 0:
        raise SpaceError(where, f"{key}.low", f"a log-scale range needs low > 0, got {p.low}")
    if p.kind == "loguniform" and not p.log:
        raise SpaceError(where, f"{key}.log", "a loguniform parameter is log-scaled")
    if p.step is not None:
        if not p.step > 0:
            raise SpaceError(where, f"{key}.step", f"expected a positive step, got {p.step}")
        if p.log and p.step != 1:
            raise SpaceError(where, f"{key}.step", "a log-scaled parameter takes no step (Optuna forbids both)")
        k = (p.high - p.low) / p.step
        if not _close(k, round(k)):
            raise SpaceError(where, f"{key}.step", f"step {p.step} does not divide the range [{p.low}, {p.high}]")
    # The field's valid values are an interval, so a range inside it has both ends inside it.
    _check_valid(p.path, p.low, where, f"{key}.low")
    _check_valid(p.path, p.high, where, f"{key}.high")


def _check_valid(path: str, value: Any, where: str, key: str) -> None:
    """``value`` must be one the config accepts for ``path`` (its declared valid values)."""
    try:
        check_field(path, value)
    except ConfigError as exc:
        raise SpaceError(where, key, f"outside the values the config accepts ({exc})") from None


def _corners(params: tuple[Param, ...]) -> list[dict[str, Any]]:
    """Every combination of each parameter's extreme values (low and high, or every choice)."""
    axes = [list(p.choices) if p.kind == "categorical" else [p.low, p.high] for p in params]
    return [dict(zip((p.path for p in params), values, strict=True)) for values in itertools.product(*axes)]


def _validate_points(space: SearchSpace, cfg: PipelineConfig) -> None:
    """Every point a trial may draw makes a valid config with the base: each parameter's ends (or
    choices) with the other fields at the base values, then - up to :data:`_MAX_CORNERS` of them - the
    combinations of all parameters' ends, which catches rules over several fields (``low <= high``,
    ``rw.logt`` against ``run.allow_expensive``): these rules are monotone in each field, so the
    corners of the box are the points that can break them."""
    where = space.where
    for p in space.params:
        key = f"params.{p.path}"
        ends = ((f"{key}.choices[{i}]", c) for i, c in enumerate(p.choices)) if p.kind == "categorical" \
            else ((f"{key}.low", p.low), (f"{key}.high", p.high))
        for end_key, value in ends:
            try:
                apply_overrides(cfg, {p.path: value})
            except ConfigError as exc:
                raise SpaceError(where, end_key, f"with the base config this value is refused ({exc})") from None
    if math.prod(len(p.choices) if p.kind == "categorical" else 2 for p in space.params) > _MAX_CORNERS:
        return
    for combo in _corners(space.params):
        try:
            apply_overrides(cfg, combo)
        except ConfigError as exc:
            named = str(exc).split(":", 1)[0]
            key = f"params.{named}" if named in combo else "params"
            raise SpaceError(where, key, f"the combination {combo} is refused by the config ({exc})") from None


def _validate_splits(space: SearchSpace, cfg: PipelineConfig) -> None:
    """Derived halves must be halves of the split the metric is measured on; no mixing with files."""
    where = space.where
    field_name = graph.tune_metrics()[space.metric][1]
    eval_split = getattr(cfg.data, field_name)
    if space._derived_halves(cfg):
        return
    for key, name in (("tune_split", space.tune_split), ("heldout_split", space.heldout_split)):
        if name.endswith((TUNE_SUFFIX, HELDOUT_SUFFIX)):
            raise SpaceError(where, key, f"{name!r} looks like a derived half, but {space.metric} is measured on "
                             f"data.{field_name} = {eval_split!r}: use {eval_split + TUNE_SUFFIX!r} and "
                             f"{eval_split + HELDOUT_SUFFIX!r}, or names of id-list files without these suffixes")


def validate(space: SearchSpace) -> None:
    """Check a space against the config schema and the pipeline; raise :class:`SpaceError`.

    Checks: stage names and order, the metric (a ``*_tune`` metric of a stage that runs), the mode,
    the protocol's two splits (distinct; derived halves of the metric's evaluation split, or both
    id-list files), the fidelity, every override (known path, right type, not a searched
    parameter, inside the field's valid values), every parameter (known path, a distribution that
    fits the field's type, a non-empty range or choice list, choices of the field's type, ends and
    choices inside the field's valid values as :mod:`wsss_tune.config` declares them, alone and
    combined with the base config and each other), that the base config's values - the reference
    point - lie inside the space, and that so does each named reference point, with the base config. So
    no trial draws a value the config would refuse mid-sweep.
    """
    where = space.where
    try:
        if tuple(space.stages) != parse_stages(list(space.stages)):
            raise ValueError(f"expected them once each, in pipeline order {', '.join(graph.stage_names())}")
    except ValueError as exc:
        raise SpaceError(where, "stages", f"{list(space.stages)}: {exc}") from None
    if space.metric not in graph.tune_metrics():
        hint = ""
        if space.metric.endswith(("_miou", HELDOUT_SUFFIX)):
            hint = " (it covers held-out images; a search optimises the *_tune half only)"
        raise SpaceError(where, "metric", f"{space.metric!r} cannot be optimised{hint}; expected one of "
                         f"{', '.join(graph.tune_metrics())}")
    metric_stage = graph.tune_metrics()[space.metric][0]
    if metric_stage not in space.stages:
        raise SpaceError(where, "metric", f"{space.metric!r} is reported by the {metric_stage!r} stage, which "
                         f"stages {list(space.stages)} do not run")
    if space.mode not in ("max", "min"):
        raise SpaceError(where, "mode", f"expected 'max' or 'min', got {space.mode!r}")
    if space.tune_split == space.heldout_split:
        raise SpaceError(where, "heldout_split", f"{space.heldout_split!r} is also the tune_split; the best config "
                         "must be scored on images the search never saw")
    if space.num_samples < 1:
        raise SpaceError(where, "num_samples", f"expected at least 1 trial, got {space.num_samples}")
    f = space.fidelity
    if f is not None:
        if f.max_t < 1:
            raise SpaceError(where, "fidelity.max_t", f"expected >= 1, got {f.max_t}")
        if not 1 <= f.grace_period <= f.max_t:
            raise SpaceError(where, "fidelity.grace_period", f"expected 1 <= grace_period <= max_t ({f.max_t}), "
                             f"got {f.grace_period}")
        if not f.reduction_factor > 1:
            raise SpaceError(where, "fidelity.reduction_factor", f"expected > 1, got {f.reduction_factor}")
    searched = {p.path for p in space.params}
    for path, value in space.overrides.items():
        key = f"overrides.{path}"
        if path in _SPLIT_FIELDS:
            raise SpaceError(where, key, "set the protocol's splits with the top-level tune_split/heldout_split")
        if path in searched:
            raise SpaceError(where, key, "is also a searched parameter; a fixed override would hide the search")
        try:
            check_field(path, value)
        except ConfigError as exc:
            raise SpaceError(where, key, str(exc)) from None
    if not space.params:
        raise SpaceError(where, "params", "no parameters to search")
    if len(searched) != len(space.params):
        raise SpaceError(where, "params", "a parameter path appears twice")
    for p in space.params:
        _validate_param(p, space)
    try:
        base = space._config_without_splits(overrides=False)
    except ConfigError as exc:
        raise SpaceError(where, "base", str(exc)) from None
    try:
        cfg = apply_overrides(base, dict(space.overrides))
    except ConfigError as exc:  # a rule over several fields: name the override it is about, if any
        named = str(exc).split(":", 1)[0]
        raise SpaceError(where, f"overrides.{named}" if named in space.overrides else "overrides", str(exc)) from None
    _validate_splits(space, cfg)
    _validate_points(space, cfg)
    reference = space.reference_point()
    for p in space.params:
        value = reference[p.path]
        if not p.contains(value):
            raise SpaceError(where, f"params.{p.path}", f"the base config's value {value!r} lies outside "
                             f"{p.describe()}; the reference point is evaluated first as the warm start, "
                             "so the space must contain it")
    _validate_references(space, cfg)


def _validate_references(space: SearchSpace, cfg: PipelineConfig) -> None:
    """Each named reference point gives every searched parameter a value of its domain, and makes a
    valid config with the base (it runs as a trial)."""
    where = space.where
    if REFERENCE_LABEL in space.references:
        raise SpaceError(where, f"references.{REFERENCE_LABEL}", "the label is the base config's reference point")
    for label, values in space.references.items():
        key = f"references.{label}"
        for path, value in values.items():
            try:
                check_field(path, value)
            except ConfigError as exc:
                raise SpaceError(where, f"{key}.{path}", str(exc)) from None
        for p in space.params:
            if p.path not in values:
                raise SpaceError(where, key, f"has no value of {p.path}")
            if not p.contains(values[p.path]):
                raise SpaceError(where, f"{key}.{p.path}", f"the value {values[p.path]!r} of {label} lies outside "
                                 f"{p.describe()}; a reference point is evaluated first, so the space must contain it")
        point = {p.path: values[p.path] for p in space.params}
        try:
            apply_overrides(cfg, point)
        except ConfigError as exc:
            raise SpaceError(where, key, f"its values {point} are refused with the base config ({exc})") from None


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def list_spaces() -> dict[str, Path]:
    """Built-in search spaces by name (``eps``, ``synth_rw``, ...), shipped as package data."""
    root = resources.files("wsss_tune.search_spaces")
    out = {entry.name[: -len(".yaml")]: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}
    return dict(sorted(out.items()))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a built-in space by name or a YAML file by path."""
    builtins = list_spaces()
    text = str(name_or_path)
    if text in builtins:
        path = builtins[text]
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SpaceError(text, "<file>", f"no such file and not a built-in search space "
                             f"(built-in: {', '.join(builtins)})")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as exc:
        raise SpaceError(str(path), "<file>", f"cannot read it as UTF-8 text ({exc})") from None
    except DuplicateKeyError as exc:
        raise SpaceError(str(path), "<yaml>", f"not valid YAML ({exc.problem})") from None
    except yaml.YAMLError as exc:
        raise SpaceError(str(path), "<yaml>", f"not valid YAML ({exc})") from None
    return space_from_dict(data if data is not None else {}, source=path, name=path.stem)
