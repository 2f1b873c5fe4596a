"""The stage graph: one declaration of every artifact the pipeline builds.

Each :class:`ArtifactSpec` says, in one place,

* its name and the artifacts it reads (``upstream``; DeepLab's depends on ``deeplab.mask_source``);
* the user-facing stage that builds it and its config section;
* the fields that key it, training and inference kept apart: a training artifact (weights) is keyed by
  what changes the weights only, an evaluation artifact by what changes its predictions and scores,
  so a sweep over test-time settings or evaluation splits trains once;
* the metric it reports, the split that metric is measured on, and whether its training steps are
  the fidelity early stopping counts;
* its build function (``build(ctx) -> metrics``), which writes the artifact's files.

:data:`GRAPH` is the list of specs in pipeline order. Everything else is derived from it: the
pipeline runner (:mod:`wsss_tune.stages.pipeline` walks the graph), the artifact keys
(:func:`key_parts`), the stage names (:func:`stage_names`), the spaces' section -> stage and metric
mappings (:func:`section_stages`, :func:`tune_metrics`), the per-stage trainables
(:func:`stage_requirements`), the planner's chain (:func:`artifact_chain`) and the result tables'
stage columns (:func:`metric_columns`). :func:`extended` adds specs for a while (a toy stage in a
test, an experimental stage in a notebook).

Artifacts (key parts besides the upstream keys):

=================  =====================================================  ===========================
artifact           keyed by                                               contents
=================  =====================================================  ===========================
``eps_model``      EPS training fields, training data and its fingerprint, ``model.pt``
                   seed
``eps``            CAM-inference fields, evaluation data                   ``cams/``, ``masks/``
``affinity``       affinity section, training data, seed                   ``model.pt``, ``aff/``
``rw``             rw section, evaluation data                             ``masks/`` (refined)
``pseudo_crf``     ``deeplab.pseudo_crf*`` fields, training data, mask     ``masks/`` (CRF-refined)
                   source (only with ``deeplab.pseudo_crf``)
``deeplab_model``  DeepLab training fields, training data, mask source,    ``model.pt``
                   seed
``deeplab``        DeepLab test-time fields, validation data              ``predictions/`` (optional)
=================  =====================================================  ===========================

DeepLab trains on the masks of ``deeplab.mask_source``, or with ``deeplab.pseudo_crf`` on their
CRF-refined copy (``pseudo_crf``, an optional artifact: only a spec that reads it makes a run build it).

With ``run.cam_baseline`` the runner also builds the EPS artifacts for ``eps.method: cam`` as
``cam_model`` / ``cam`` (their keys drop the saliency fields, so every trial of a sweep shares them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_tune.config import PipelineConfig, config_hash, to_dict

__all__ = [
    "Metric",
    "ArtifactSpec",
    "BuildContext",
    "GRAPH",
    "SIDE_METRICS",
    "CAM_BASELINE",
    "NO_KEY_FIELDS",
    "EPS_INFER_FIELDS",
    "SALIENCY_FIELDS",
    "PPC_FIELDS",
    "DEEPLAB_INFER_FIELDS",
    "PSEUDO_CRF_FIELDS",
    "DEEPLAB_RECIPE_FIELDS",
    "graph",
    "spec",
    "extended",
    "register",
    "load_plugins",
    "stage_names",
    "section_stages",
    "tune_metrics",
    "stage_requirements",
    "artifact_names",
    "artifact_chain",
    "needed_artifacts",
    "key_parts",
    "metric_columns",
    "fidelity_artifact",
    "mask_dir",
    "replace",
]

#: Fields that never change an artifact (logging, evaluation and checkpoint cadence, data loading).
NO_KEY_FIELDS = frozenset({"eval_every", "eval_images", "log_every", "checkpoint_every", "num_workers"})
#: EPS's CAM-inference fields (the rest of the section keys the model).
EPS_INFER_FIELDS: tuple[str, ...] = ("cam_scales", "cam_flip", "bg_threshold", "bg_mode")
#: EPS fields of the saliency loss (a plain-CAM model ignores them).
SALIENCY_FIELDS: tuple[str, ...] = ("tau", "lam")
#: EPS fields of pixel-to-prototype contrast (only ``eps.method: eps_ppc`` reads them).
PPC_FIELDS: tuple[str, ...] = ("ppc_weight", "ppc_temperature", "ppc_confident_share", "ppc_bg_score",
                               "ppc_view_scale", "ppc_proj_dim")
#: DeepLab's test-time fields (they never change the weights).
DEEPLAB_INFER_FIELDS: tuple[str, ...] = ("test_scales", "test_flip", "crf", "save_predictions")
#: DeepLab's fields of the CRF on its training masks: they key the ``pseudo_crf`` masks, and only them.
PSEUDO_CRF_FIELDS: tuple[str, ...] = ("pseudo_crf", "pseudo_crf_iterations", "pseudo_crf_alpha", "pseudo_crf_pos_xy_std",
                                      "pseudo_crf_pos_w", "pseudo_crf_bi_xy_std", "pseudo_crf_bi_rgb_std",
                                      "pseudo_crf_bi_w", "pseudo_crf_label_prob")
#: DeepLab training options added for the EPS recipe. At their defaults (deeplab-pytorch's behaviour)
#: they leave the ``deeplab_model`` key as it was before they existed, so models already stored stay
#: valid; ``head_bn_momentum`` keys only the ``v2_gp`` head, the one that has BatchNorm.
DEEPLAB_RECIPE_FIELDS: tuple[str, ...] = ("scale_range", "hsv_jitter", "bn_lr_mult", "head_bn_momentum",
                                          "contract_dilation", "loss_resize")


@dataclass(frozen=True, kw_only=True)
class Metric:
    """A stage's mask-quality metric: ``<prefix>_miou_tune`` (searched), ``<prefix>_miou_heldout``,
    measured on the split the ``DataConfig`` field ``split_field`` names; ``label`` heads its columns."""

    prefix: str
    label: str
    split_field: str

    @property
    def tuned(self) -> str:
        return f"{self.prefix}_miou_tune"


@dataclass
class BuildContext:
    """What a build function gets: the config, the dataset, the folders of the artifacts upstream
    (``inputs[name]``), the folder to write into (``out``), a stable work folder for training
    (``work``: a killed build resumes there), the stage's reporter and the device."""

    cfg: PipelineConfig
    layout: Any
    inputs: Mapping[str, Path]
    out: Path
    work: Path
    reporter: Any
    device: Any = None


@dataclass(frozen=True, kw_only=True)
class ArtifactSpec:
    """One artifact of the graph (see the module docstring).

    Attributes:
        name: Artifact name (the store's stage folder, the planner's row).
        stage: User-facing stage that builds it (``--stages``).
        section: Config section of its own fields (None: none).
        upstream: Artifacts it reads, whatever the config.
        dynamic_upstream: More artifacts it reads, chosen by the config (DeepLab's mask source).
        train_fields: Fields of ``section`` that key it when it is a training artifact (None: all of
            the section but ``infer_fields`` and :data:`NO_KEY_FIELDS`); ``()`` for an inference artifact.
        infer_fields: Fields of ``section`` that key an inference artifact.
        drop_fields: ``cfg -> fields`` left out of the key for that config (a plain-CAM model ignores
            the saliency fields).
        data_fields: ``DataConfig`` fields that key it.
        fingerprint: Splits (``DataConfig`` field names) whose ids and files key it, and whether the
            GT masks count (``cfg -> bool``; None: they do).
        seeded: ``run.seed`` keys it.
        extra_key: ``cfg -> value`` keying it besides (DeepLab: which masks it trains on).
        trains: It trains (gets a stable work folder; ``fidelity`` says whether its steps are the
            fidelity of its stage's early stopping).
        optional: Its stage alone does not build it; a run builds it only when an artifact it builds
            reads it (``pseudo_crf``, read by DeepLab's training with ``deeplab.pseudo_crf``).
        metric: The metric it reports.
        report_as: Stage name in its reports (default ``name``); artifacts sharing one continue its steps.
        cost: ``(timings, cfg, sizes) -> (training s, other s, detail)`` of one build, for ``plan``
            (None: not modelled; ``plan`` counts it as free and says so).
        build: ``BuildContext -> metrics`` (writes ``ctx.out``).
    """

    name: str
    stage: str
    section: str | None
    upstream: tuple[str, ...] = ()
    dynamic_upstream: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    train_fields: tuple[str, ...] | None = None
    infer_fields: tuple[str, ...] = ()
    drop_fields: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    data_fields: tuple[str, ...] = ()
    fingerprint: tuple[str, ...] = ()
    fingerprint_masks: Callable[[PipelineConfig], bool] | None = None
    seeded: bool = False
    extra_key: Callable[[PipelineConfig], Any] | None = None
    trains: bool = False
    fidelity: bool = False
    optional: bool = False
    metric: Metric | None = None
    report_as: str | None = None
    cost: Callable[[Any, PipelineConfig, Any], tuple[float, float, str]] | None = None
    build: Callable[[BuildContext], Mapping[str, Any] | None]

    def reads(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """Every artifact it reads for ``cfg``."""
        extra = self.dynamic_upstream(cfg) if self.dynamic_upstream is not None else ()
        return tuple(dict.fromkeys((*self.upstream, *extra)))

    def record(self, cfg: PipelineConfig) -> dict[str, Any]:
        """Its key parts that come from ``cfg`` as a plain dict (``{section: fields, "data": ...,
        "seed": ...}``): what a stage runner records in its work folder (``claim_folder``) so a restart
        never resumes a folder written with other settings. Upstream keys and the data fingerprint
        are the artifact store's part."""
        out: dict[str, Any] = {self.section or self.name: self.own_fields(cfg)}
        if self.data_fields:
            out["data"] = {f: getattr(cfg.data, f) for f in self.data_fields}
        if self.seeded:
            out["seed"] = cfg.run.seed
        return out

    def own_fields(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The fields of its section that key it."""
        if self.section is None:
            return {}
        values = to_dict(getattr(cfg, self.section))
        drop = set(NO_KEY_FIELDS) | set(self.drop_fields(cfg) if self.drop_fields else ())
        if self.train_fields is None:  # a training artifact: everything but the inference fields
            keep = set(values) - set(self.infer_fields)
        else:
            keep = set(self.train_fields) | set(self.infer_fields)
        return {k: v for k, v in sorted(values.items()) if k in keep and k not in drop}


# --------------------------------------------------------------------------------------------------
# Build functions (each calls its stage module; imports are lazy so the graph imports no torch)
# --------------------------------------------------------------------------------------------------


def _copy_into(work: Path, out: Path, names: Sequence[str]) -> None:
    for name in names:
        src = work / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.exists():
            shutil.copy2(src, out / name)


def _summary(work: Path, file: str, prefix: str) -> dict[str, Any]:
    """The last logged values of a training run (``<prefix>/...``: losses, EPS overlaps)."""
    import json

    path = work / file
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith(prefix + "/")}


def _build_eps_model(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import eps

    model = eps.train_eps(ctx.cfg, out_dir=ctx.work, reporter=ctx.reporter, device=ctx.device)
    if Path(model).resolve() != (ctx.out / eps.MODEL_FILE).resolve():  # run_eps trains in its output folder
        shutil.copy2(model, ctx.out / eps.MODEL_FILE)
    # The final per-class overlap ratios (DESIGN.md §4: the quickest diagnostic) and losses.
    return _summary(ctx.work, eps.SUMMARY_FILE, "eps")


def _build_eps(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import eps
    from wsss_tune.stages.evaluate import score_masks

    data = ctx.cfg.data
    eval_ids = ctx.layout.split_ids(data.mask_eval_split)
    ids = list(dict.fromkeys([*ctx.layout.split_ids(data.train_split), *eval_ids]))
    eps.infer_eps(ctx.cfg, model_path=ctx.inputs["eps_model"] / eps.MODEL_FILE, ids=ids, out_dir=ctx.out,
                  device=ctx.device)
    out = score_masks("eps", ctx.layout, data, eval_ids, ctx.out / "masks")
    out["eps_method"] = ctx.cfg.eps.method
    return out


def _build_affinity(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import affinity, eps

    res = affinity.run_affinity(ctx.cfg, eps_dir=ctx.inputs["eps"], out_dir=ctx.work, reporter=ctx.reporter,
                                device=ctx.device, eps_model=ctx.inputs["eps_model"] / eps.MODEL_FILE)
    _copy_into(ctx.work, ctx.out, (affinity.MODEL_FILE, affinity.AFF_DIR))
    return {k: v for k, v in res.metrics.items() if not k.startswith("eps_")}


def _build_rw(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import affinity, random_walk

    res = random_walk.run_random_walk(ctx.cfg, eps_dir=ctx.inputs["eps"], aff_dir=ctx.inputs["affinity"] / affinity.AFF_DIR,
                                      out_dir=ctx.out, reporter=ctx.reporter)
    return {k: v for k, v in res.metrics.items() if not k.startswith("eps_")}


#: Where DeepLab's training masks come from, by ``deeplab.mask_source``: the artifact and its folder.
_MASK_SOURCES = {"refined": "rw", "eps": "eps"}


def _source_upstream(cfg: PipelineConfig) -> tuple[str, ...]:
    """The artifact holding the masks of ``deeplab.mask_source`` (none for the GT or a folder)."""
    src = _MASK_SOURCES.get(cfg.deeplab.mask_source)
    return (src,) if src else ()


def _mask_upstream(cfg: PipelineConfig) -> tuple[str, ...]:
    """What DeepLab's training reads: the CRF-refined masks with ``deeplab.pseudo_crf``, else the source's."""
    return ("pseudo_crf",) if cfg.deeplab.pseudo_crf else _source_upstream(cfg)


def _mask_key(cfg: PipelineConfig) -> Any:
    """What DeepLab trains on when no artifact provides it: the GT masks (the fingerprint covers
    them) or a folder of masks (its file names)."""
    src = cfg.deeplab.mask_source
    if src in _MASK_SOURCES or src == "gt":
        return src
    folder = Path(src)
    if not folder.is_dir():
        raise ValueError(f"deeplab.mask_source: {src!r} is not 'refined', 'eps', 'gt' or an existing folder")
    return f"folder:{folder}:{config_hash(sorted(p.name for p in folder.iterdir()))}"


def _source_mask_dir(ctx: BuildContext) -> Path:
    """The folder of the masks of ``deeplab.mask_source`` (see :func:`_mask_key`)."""
    src = ctx.cfg.deeplab.mask_source
    if src in _MASK_SOURCES:
        return ctx.inputs[_MASK_SOURCES[src]] / "masks"
    if src == "gt":
        return Path(ctx.layout.mask_path("x")).parent
    _mask_key(ctx.cfg)  # checks the folder exists
    return Path(src)


def mask_dir(ctx: BuildContext) -> Path:
    """The folder of masks DeepLab trains on: the CRF-refined masks with ``deeplab.pseudo_crf``, else
    those of ``deeplab.mask_source``."""
    if ctx.cfg.deeplab.pseudo_crf:
        from wsss_tune.stages.pseudo_crf import MASK_DIR

        return ctx.inputs["pseudo_crf"] / MASK_DIR
    return _source_mask_dir(ctx)


def _build_pseudo_crf(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages.pseudo_crf import refine_masks

    cfg = ctx.cfg
    cams = ctx.inputs["eps"] / "cams" if cfg.deeplab.mask_source == "eps" else None
    refine_masks(cfg.deeplab, ctx.layout, ctx.layout.split_ids(cfg.data.train_split), mask_dir=_source_mask_dir(ctx),
                 out_dir=ctx.out, cam_dir=cams)
    return {}


def _build_deeplab_model(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import deeplab

    model = deeplab.train_deeplab(ctx.cfg, mask_dir=mask_dir(ctx), out_dir=ctx.work, reporter=ctx.reporter,
                                  device=ctx.device)
    shutil.copy2(model, ctx.out / deeplab.MODEL_FILE)
    return _summary(ctx.work, deeplab.SUMMARY_FILE, "deeplab")


def _build_deeplab(ctx: BuildContext) -> dict[str, Any]:
    from wsss_tune.stages import deeplab
    from wsss_tune.stages.evaluate import miou_metrics, tune_heldout_ids

    cfg = ctx.cfg
    val_ids = ctx.layout.split_ids(cfg.data.val_split)
    per_image = deeplab.evaluate_deeplab(cfg, model_path=ctx.inputs["deeplab_model"] / deeplab.MODEL_FILE,
                                         ids=val_ids, out_dir=ctx.out, device=ctx.device)
    tune, held = tune_heldout_ids(ctx.layout, cfg.data, val_ids)
    metrics = miou_metrics("deeplab", per_image, tune_ids=tune, heldout_ids=held, class_names=ctx.layout.class_names)
    ctx.reporter.report(metrics, step=cfg.deeplab.iterations)  # at the end of the training it continues
    return metrics


# --------------------------------------------------------------------------------------------------
# Cost models (``plan``): (training seconds, other seconds, detail) of one complete build, from the
# measured per-unit times (``analysis.plan.StageTimings``) and the dataset sizes (``DatasetSizes``)
# --------------------------------------------------------------------------------------------------

Cost = tuple[float, float, str]


def _passes(scales: Sequence[float], flip: bool) -> int:
    return len(scales) * (2 if flip else 1)


def _training_cost(section: Any, passes: int, step_s: float, forward_s: float) -> Cost:
    """A trained model: its steps plus its periodic evaluations (``eval_images`` x ``passes`` forwards)."""
    n, every, images = section.iterations, section.eval_every, section.eval_images
    evals = n // every if every > 0 else 0
    return (n * step_s, evals * images * passes * forward_s,
            f"{n} steps x {step_s:.3g} s + {evals} evals x {images} images x {passes} passes")


def _cost_eps_model(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    return _training_cost(cfg.eps, _passes(cfg.eps.cam_scales, cfg.eps.cam_flip), t.eps_step, t.eps_forward)


def _cost_eps(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    passes = _passes(cfg.eps.cam_scales, cfg.eps.cam_flip)
    return (0.0, sizes.masks * passes * t.eps_forward,
            f"{sizes.masks} images x {passes} passes x {t.eps_forward:.3g} s")


def _cost_affinity(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    from wsss_tune.stages.affinity import max_steps

    steps = max_steps(cfg.affinity, sizes.train)
    return (steps * t.affinity_step, sizes.masks * t.affinity_forward,
            f"{steps} steps x {t.affinity_step:.3g} s + {sizes.masks} images x {t.affinity_forward:.3g} s")


def _cost_rw(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    return (0.0, sizes.masks * t.rw_image, f"{sizes.masks} images x {t.rw_image:.3g} s")


def _cost_deeplab_model(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    d = cfg.deeplab
    return _training_cost(d, _passes(d.test_scales, d.test_flip), t.deeplab_step, t.deeplab_forward)


def _cost_deeplab(t: Any, cfg: PipelineConfig, sizes: Any) -> Cost:
    passes = _passes(cfg.deeplab.test_scales, cfg.deeplab.test_flip)
    return (0.0, sizes.val * passes * t.deeplab_forward,
            f"{sizes.val} val images x {passes} passes x {t.deeplab_forward:.3g} s")


def _eps_drops(cfg: PipelineConfig) -> tuple[str, ...]:
    """Fields the EPS model's method never reads: a plain-CAM model has no saliency loss (tau and lam do
    not change it, so the CAM baseline is shared), and only ``eps_ppc`` reads the contrast fields (so
    ``eps`` and ``cam`` models keep the keys they had before those fields existed)."""
    method = cfg.eps.method
    return (*(SALIENCY_FIELDS if method == "cam" else ()), *(PPC_FIELDS if method != "eps_ppc" else ()))


def _at_default(section: Any, names: Sequence[str]) -> tuple[str, ...]:
    """The fields of ``names`` whose value in ``section`` is the field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    return tuple(n for n in names if getattr(section, n) == defaults[n])


def _deeplab_model_drops(cfg: PipelineConfig) -> tuple[str, ...]:
    """Fields that do not key DeepLab's weights themselves: the mask source (its masks do, upstream), the
    CRF on the masks (it keys the ``pseudo_crf`` masks), and the recipe options at their defaults or
    without effect (:data:`DEEPLAB_RECIPE_FIELDS`)."""
    d = cfg.deeplab
    unused = ("head_bn_momentum",) if d.arch != "v2_gp" else ()
    return ("mask_source", *PSEUDO_CRF_FIELDS, *unused, *_at_default(d, DEEPLAB_RECIPE_FIELDS))


def _pseudo_crf_drops(cfg: PipelineConfig) -> tuple[str, ...]:
    """CAMs need the background exponent, masks without scores the label probability; not both."""
    return ("pseudo_crf_label_prob",) if cfg.deeplab.mask_source == "eps" else ("pseudo_crf_alpha",)


#: DataConfig fields every training artifact is keyed by (what training reads, besides the upstream).
_TRAIN_DATA = ("root", "image_dir", "label_source", "train_split")
#: DataConfig fields every evaluation artifact is keyed by (what scoring reads).
_EVAL_DATA = ("root", "image_dir", "mask_dir", "label_source", "tune_split", "heldout_split")


#: The pipeline, in order.
GRAPH: tuple[ArtifactSpec, ...] = (
    ArtifactSpec(name="eps_model", stage="eps", section="eps", infer_fields=EPS_INFER_FIELDS, drop_fields=_eps_drops,
                 data_fields=(*_TRAIN_DATA, "saliency_dir"), fingerprint=("train_split",),
                 fingerprint_masks=lambda cfg: cfg.data.label_source == "masks", seeded=True, trains=True,
                 fidelity=True, cost=_cost_eps_model, build=_build_eps_model),
    ArtifactSpec(name="eps", stage="eps", section="eps", upstream=("eps_model",), train_fields=(),
                 infer_fields=EPS_INFER_FIELDS, data_fields=(*_EVAL_DATA, "train_split", "mask_eval_split"),
                 fingerprint=("train_split", "mask_eval_split"),
                 metric=Metric(prefix="eps", label="EPS", split_field="mask_eval_split"), cost=_cost_eps, build=_build_eps),
    ArtifactSpec(name="affinity", stage="affinity", section="affinity", upstream=("eps_model", "eps"),
                 data_fields=_TRAIN_DATA, seeded=True, trains=True, cost=_cost_affinity, build=_build_affinity),
    ArtifactSpec(name="rw", stage="affinity", section="rw", upstream=("eps", "affinity"),
                 data_fields=(*_EVAL_DATA, "mask_eval_split"),
                 metric=Metric(prefix="rw", label="refined", split_field="mask_eval_split"), cost=_cost_rw, build=_build_rw),
    ArtifactSpec(name="pseudo_crf", stage="deeplab", section="deeplab", dynamic_upstream=_source_upstream,
                 train_fields=PSEUDO_CRF_FIELDS, drop_fields=_pseudo_crf_drops, data_fields=_TRAIN_DATA,
                 fingerprint=("train_split",), fingerprint_masks=lambda cfg: cfg.deeplab.mask_source == "gt",
                 extra_key=_mask_key, optional=True, build=_build_pseudo_crf),
    ArtifactSpec(name="deeplab_model", stage="deeplab", section="deeplab", dynamic_upstream=_mask_upstream,
                 infer_fields=DEEPLAB_INFER_FIELDS, drop_fields=_deeplab_model_drops,
                 data_fields=_TRAIN_DATA, fingerprint=("train_split",),
                 fingerprint_masks=lambda cfg: cfg.deeplab.mask_source == "gt", seeded=True, extra_key=_mask_key,
                 trains=True, fidelity=True, report_as="deeplab", cost=_cost_deeplab_model, build=_build_deeplab_model),
    ArtifactSpec(name="deeplab", stage="deeplab", section="deeplab", upstream=("deeplab_model",), train_fields=(),
                 infer_fields=DEEPLAB_INFER_FIELDS, data_fields=(*_EVAL_DATA, "val_split"), fingerprint=("val_split",),
                 metric=Metric(prefix="deeplab", label="DeepLab", split_field="val_split"), cost=_cost_deeplab, build=_build_deeplab),
)
#: Metrics of side artifacts that report to no scheduler (the plain-CAM baseline of ``run.cam_baseline``),
#: as (column label, metric prefix), placed before the stage they belong to.
SIDE_METRICS: dict[str, tuple[str, str]] = {"eps": ("CAM", "cam")}
#: The plain-CAM baseline: the EPS stage's artifacts built for ``eps.method: cam``, recorded under these names.
CAM_BASELINE: dict[str, str] = {"eps_model": "cam_model", "eps": "cam"}

_extra: list[ArtifactSpec] = []


def graph() -> tuple[ArtifactSpec, ...]:
    """The specs in pipeline order (:data:`GRAPH` plus any added by :func:`extended`)."""
    return (*GRAPH, *_extra)


def spec(name: str) -> ArtifactSpec:
    for s in graph():
        if s.name == name:
            return s
    raise KeyError(f"no artifact {name!r} in the stage graph (artifacts: {', '.join(artifact_names())})")


def _check_new(specs: Sequence[ArtifactSpec]) -> None:
    names = set(artifact_names())
    for s in specs:
        if s.name in names:
            raise ValueError(f"artifact {s.name!r} is in the stage graph already")
        missing = [u for u in s.upstream if u not in names]
        if missing:
            raise ValueError(f"artifact {s.name!r}: upstream {missing} not in the stage graph "
                             f"(artifacts: {', '.join(sorted(names))})")
        names.add(s.name)


@contextlib.contextmanager
def extended(*specs: ArtifactSpec) -> Iterator[None]:
    """Add ``specs`` at the end of the graph while the block runs (their upstream must exist)."""
    _check_new(specs)
    _extra.extend(specs)
    try:
        yield
    finally:
        for s in specs:
            _extra.remove(s)


def register(*specs: ArtifactSpec) -> None:
    """Add ``specs`` at the end of the graph for good (a plugin's entry point calls this; registering
    the very same spec again is a no-op)."""
    _check_new([s for s in specs if s not in _extra])
    _extra.extend(s for s in specs if s not in _extra)


def load_plugins(names: Sequence[str]) -> None:
    """Import each ``module`` or ``module:function`` of ``run.stage_plugins`` (calling the function), so
    the stages they declare join the graph; in every process that runs the pipeline (Ray workers too).

    Raises:
        ValueError: a module or function that cannot be imported or called, named.
    """
    import importlib

    for entry in names:
        module_name, _, func = str(entry).partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"run.stage_plugins: cannot import {module_name!r} ({exc}); expected an importable "
                             "module (on PYTHONPATH) that adds stages with wsss_tune.stages.graph.register") from None
        if func:
            fn = getattr(module, func, None)
            if not callable(fn):
                raise ValueError(f"run.stage_plugins: {module_name!r} has no function {func!r}")
            fn()


# --------------------------------------------------------------------------------------------------
# Derived views
# --------------------------------------------------------------------------------------------------


def artifact_names() -> tuple[str, ...]:
    return tuple(s.name for s in graph())


def stage_names() -> tuple[str, ...]:
    """User-facing stage names, in pipeline order."""
    return tuple(dict.fromkeys(s.stage for s in graph()))


def section_stages() -> dict[str, str]:
    """Config section -> the stage that reads it (``rw`` -> ``affinity``: the walk is part of it)."""
    return {s.section: s.stage for s in graph() if s.section is not None}


def tune_metrics() -> dict[str, tuple[str, str]]:
    """Searchable metric -> (stage that reports it, ``DataConfig`` field of its split)."""
    return {s.metric.tuned: (s.stage, s.metric.split_field) for s in graph() if s.metric is not None}


def metric_columns() -> tuple[tuple[str, str], ...]:
    """(column label, metric prefix) of every stage's mask quality, in pipeline order, side metrics
    (the CAM baseline) before the stage they belong to."""
    out: list[tuple[str, str]] = []
    for s in graph():
        if s.stage in SIDE_METRICS and SIDE_METRICS[s.stage] not in out:
            out.append(SIDE_METRICS[s.stage])
        if s.metric is not None:
            out.append((s.metric.label, s.metric.prefix))
    return tuple(out)


def stage_requirements() -> dict[str, tuple[str, ...]]:
    """Stage -> the stages its artifacts always read (itself included, pipeline order): what a
    per-stage trainable runs. Upstream chosen by the config (DeepLab's masks) comes from the cache."""
    by_name = {s.name: s for s in graph()}
    out: dict[str, tuple[str, ...]] = {}
    for stage in stage_names():
        seen: set[str] = set()
        todo = [s.name for s in graph() if s.stage == stage]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(by_name[name].upstream)
        stages = {by_name[n].stage for n in seen}
        out[stage] = tuple(s for s in stage_names() if s in stages)
    return out


def fidelity_artifact(stage: str) -> str | None:
    """The artifact whose training steps are ``stage``'s fidelity (None: its metric comes after training)."""
    return next((s.name for s in graph() if s.stage == stage and s.fidelity), None)


def fidelity_report_name(stage: str) -> str | None:
    """The ``stage`` value of the reports that carry ``stage``'s training steps (None: it trains nothing
    with a fidelity)."""
    return next(((s.report_as or s.name) for s in graph() if s.stage == stage and s.fidelity), None)


def needed_artifacts(cfg: PipelineConfig, stages: Sequence[str]) -> tuple[str, ...]:
    """The artifacts a run of ``stages`` builds, in graph order: those of the stages and all they read."""
    by_name = {s.name: s for s in graph()}
    wanted: set[str] = set()
    todo = [s.name for s in graph() if s.stage in stages and not s.optional]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].reads(cfg))
    return tuple(n for n in artifact_names() if n in wanted)


def artifact_chain(cfg: PipelineConfig, stages: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each artifact a run of ``stages`` builds, with every artifact upstream of it (itself last)."""
    by_name = {s.name: s for s in graph()}
    out: dict[str, tuple[str, ...]] = {}
    for name in needed_artifacts(cfg, stages):
        ups = [u for up in by_name[name].reads(cfg) for u in out.get(up, (up,))]
        out[name] = (*dict.fromkeys(ups), name)
    return out


def key_parts(cfg: PipelineConfig, fingerprint: Callable[[Sequence[str], bool], str] | str) -> dict[str, tuple[Any, ...]]:
    """Every artifact's own key parts (the runner chains the upstream keys in).

    Args:
        fingerprint: ``(splits, masks) -> str`` fingerprint of the data (the dataset's
            :meth:`~wsss_tune.data.VOCLayout.fingerprint`), or one string for every artifact (the
            planner compares keys of two configs, not datasets).
    """
    out: dict[str, tuple[Any, ...]] = {}
    for s in graph():
        parts: list[Any] = [s.name, s.own_fields(cfg)]
        if s.data_fields:
            parts.append({f: getattr(cfg.data, f) for f in s.data_fields})
        if s.fingerprint:
            splits = sorted({getattr(cfg.data, f) for f in s.fingerprint})
            masks = s.fingerprint_masks(cfg) if s.fingerprint_masks is not None else True
            parts.append(fingerprint if isinstance(fingerprint, str) else fingerprint(splits, masks))
        if s.seeded:
            parts.append(cfg.run.seed)
        if s.extra_key is not None:
            parts.append(s.extra_key(cfg))
        out[s.name] = tuple(parts)
    return out


def replace(s: ArtifactSpec, **changes: Any) -> ArtifactSpec:
    """A copy of ``s`` with ``changes`` (e.g. another build function in a test)."""
    return dataclasses.replace(s, **changes)
