"""The whole pipeline: EPS -> AffinityNet + random walk -> DeepLab, each stage a cached artifact.

Every stage output is stored in an :class:`~wsss_tune.artifacts.ArtifactStore` under a key that hashes
everything upstream that produced it (its own config fields, the upstream keys, the data fingerprint,
the seed). A run whose upstream configuration was computed before reuses that artifact; two trials
that need the same missing artifact compute it once. Training happens in a stable work folder per key,
so a killed run resumes from its last checkpoint instead of starting over.

Artifacts:

==============  ===============================================  =====================================
stage           key parts                                        contents
==============  ===============================================  =====================================
``eps_model``   EPS training fields, data fingerprint, seed       ``model.pt``
``eps``         ``eps_model`` key, CAM-inference fields          ``cams/``, ``masks/`` (pseudo masks)
``affinity``    ``eps`` key, affinity section, seed              ``model.pt``, ``aff/`` (affinities)
``rw``          ``affinity`` key, rw section                      ``masks/`` (refined masks)
``deeplab``     mask-source key, DeepLab fields, seed            ``model.pt``
==============  ===============================================  =====================================

With ``run.cam_baseline`` the EPS stage also builds the plain-CAM baseline (``eps.method: cam``) as
``eps_model`` + ``eps`` artifacts of its own (keys without tau and lam, so every trial of a sweep shares
them) after the requested stages, without reporting to the scheduler; its scores are ``cam_miou*``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsss_tune.config import PipelineConfig, apply_overrides, config_hash, dump_yaml, to_dict
from wsss_tune.reporting import ConsoleReporter, NullReporter, Reporter
from wsss_tune.utils.io import atomic_write_json

__all__ = ["STAGES", "parse_stages", "run_pipeline", "PipelineRun", "stage_key_parts"]

#: User-facing stage names, in order. ``affinity`` includes the random walk.
STAGES = ("eps", "affinity", "deeplab")

#: Fields that never change a stage's output (logging/evaluation cadence).
_NO_KEY_FIELDS = frozenset({"eval_every", "eval_images", "log_every", "checkpoint_every"})


def parse_stages(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"eps,affinity"`` / ``["deeplab"]`` / ``"all"`` -> ordered stage names; unknown names are errors."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if items == ["all"]:
        return STAGES
    unknown = [s for s in items if s not in STAGES]
    if unknown or not items:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"expected a comma-separated subset of {', '.join(STAGES)} or 'all'")
    return tuple(s for s in STAGES if s in items)


def _fields(section: Any, *, only: Sequence[str] | None = None, drop: Sequence[str] = ()) -> dict[str, Any]:
    d = to_dict(section)
    keep = set(only) if only is not None else set(d)
    return {k: v for k, v in d.items() if k in keep and k not in _NO_KEY_FIELDS and k not in drop}


def stage_key_parts(cfg: PipelineConfig, fingerprint: str) -> dict[str, tuple[Any, ...]]:
    """The key parts of every artifact (without upstream keys, which :class:`PipelineRun` chains in)."""
    from wsss_tune.stages import eps as eps_stage

    data = _fields(cfg.data, drop=("num_workers", "tune_split", "heldout_split"))
    eps_infer = tuple(eps_stage.INFER_FIELDS)
    # A plain-CAM model has no saliency loss: tau and lam do not change it (the CAM baseline is shared).
    eps_train_drop = eps_infer + (eps_stage.SALIENCY_FIELDS if cfg.eps.method == "cam" else ())
    return {
        "eps_model": ("eps_model", fingerprint, cfg.run.seed, data, _fields(cfg.eps, drop=eps_train_drop)),
        "eps": ("eps", _fields(cfg.eps, only=tuple(eps_infer))),
        "affinity": ("affinity", cfg.run.seed, _fields(cfg.affinity)),
        "rw": ("rw", _fields(cfg.rw)),
        "deeplab": ("deeplab", fingerprint, cfg.run.seed, data, _fields(cfg.deeplab)),
    }


class _StageReporter:
    """Forwards a stage's reports with a pipeline-wide ``fidelity`` counter and the stage name."""

    def __init__(self, inner: Reporter, stage: str, offset: int) -> None:
        self.inner, self.stage, self.offset = inner, stage, offset
        self.last_step = 0

    def report(self, metrics: Mapping[str, Any], *, step: int, checkpoint_dir: str | None = None) -> None:
        self.last_step = max(self.last_step, step)
        # ``stage_step`` is the stage's own step: the time a scheduler compares trials on within a stage.
        self.inner.report({**metrics, "stage": self.stage, "stage_step": step, "fidelity": self.offset + step},
                          step=self.offset + step, checkpoint_dir=checkpoint_dir)


class PipelineRun:
    """One pipeline run over an artifact store; :meth:`run` executes the requested stages."""

    def __init__(
        self,
        cfg: PipelineConfig,
        *,
        out_dir: str | Path,
        reporter: Reporter | None = None,
        store: Any = None,
        device: Any = None,
    ) -> None:
        from wsss_tune.artifacts import ArtifactStore
        from wsss_tune.data import VOCLayout

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.reporter = reporter or ConsoleReporter(self.out_dir)
        self.store = store or ArtifactStore(uri=cfg.run.artifact_store or str(self.out_dir / "artifacts"))
        self.device = device
        self.layout = VOCLayout.from_config(cfg.data)
        splits = sorted({cfg.data.train_split, cfg.data.mask_eval_split, cfg.data.val_split})
        self.fingerprint = self.layout.fingerprint(splits)
        self.parts = stage_key_parts(cfg, self.fingerprint)
        self.metrics: dict[str, Any] = {}
        self.side_metrics: dict[str, dict[str, Any]] = {}
        self.stage_info: dict[str, dict[str, Any]] = {}
        self._offset = 0

    # -- helpers -----------------------------------------------------------------------------------

    def _work_dir(self, key: Any) -> Path:
        return self.store.work_dir(key)

    def _artifact(self, name: str, key: Any, build: Callable[[Path, Reporter], dict[str, Any] | None], *,
                  quiet: bool = False) -> Path:
        """Get or build one artifact; its metrics join the run's. ``quiet``: a side artifact (the CAM
        baseline) that reports nothing to the scheduler, adds no fidelity and keeps its metrics apart."""
        rep = _StageReporter(NullReporter() if quiet else self.reporter, name, self._offset)
        t0 = time.time()
        art = self.store.get_or_create(key, lambda tmp: build(Path(tmp), rep) or {})
        stage_metrics = dict(art.metadata or {})
        self.stage_info[name] = {"key": str(key), "hit": bool(art.hit), "path": str(art.path),
                                 "seconds": round(time.time() - t0, 2), "build_seconds": art.build_seconds}
        if quiet:
            self.side_metrics[name] = stage_metrics
            return Path(art.path)
        self.metrics.update(stage_metrics)
        self._offset += max(rep.last_step, 1)
        if art.hit and stage_metrics:
            # Reuse: the scheduler still sees this stage's numbers once.
            self.reporter.report({**stage_metrics, "stage": name, "cache_hit": True, "fidelity": self._offset},
                                 step=self._offset)
        return Path(art.path)

    # -- stages ------------------------------------------------------------------------------------

    def eps(self) -> Path:
        model_key, model_dir, key, eps_dir = self._eps_artifacts(self.cfg, names=("eps_model", "eps"), quiet=False)
        self.keys = {"eps_model": model_key, "eps": key}
        self.eps_model_path = model_dir / "model.pt"
        return eps_dir

    def cam_baseline(self) -> None:
        """The plain-CAM baseline of this config's EPS stage; its pseudo-mask scores become ``cam_*``."""
        if self.cfg.eps.method == "cam":  # this run's EPS stage is the baseline
            scores = self.metrics
        else:
            self._eps_artifacts(apply_overrides(self.cfg, {"eps.method": "cam"}), names=("cam_model", "cam"), quiet=True)
            scores = self.side_metrics["cam"]
        self.metrics.update({"cam" + k[len("eps"):]: v for k, v in scores.items() if k.startswith("eps_miou")})

    def _eps_artifacts(self, cfg: PipelineConfig, *, names: tuple[str, str], quiet: bool) -> tuple[Any, Path, Any, Path]:
        """EPS training and inference artifacts of ``cfg``: (model key, model folder, key, CAM/mask folder)."""
        from wsss_tune.stages import eps as eps_stage
        from wsss_tune.stages.evaluate import score_masks

        data = cfg.data
        parts = self.parts if cfg is self.cfg else stage_key_parts(cfg, self.fingerprint)
        model_key = self.store.key("eps_model", *parts["eps_model"])

        def build_model(tmp: Path, rep: Reporter) -> dict[str, Any]:
            work = self._work_dir(model_key)
            model = eps_stage.train_eps(cfg, out_dir=work, reporter=rep, device=self.device)
            shutil.copy2(model, tmp / "model.pt")
            return {}

        model_dir = self._artifact(names[0], model_key, build_model, quiet=quiet)
        key = self.store.key("eps", str(model_key), *parts["eps"])

        def build(tmp: Path, rep: Reporter) -> dict[str, Any]:
            ids = sorted(set(self.layout.split_ids(data.train_split)) | set(self.layout.split_ids(data.mask_eval_split)))
            eps_stage.infer_eps(cfg, model_path=model_dir / "model.pt", ids=ids, out_dir=tmp, device=self.device)
            eval_ids = self.layout.split_ids(data.mask_eval_split)
            out = score_masks("eps", self.layout, data, eval_ids, tmp / "masks")
            out["eps_method"] = cfg.eps.method
            return out

        return model_key, model_dir, key, self._artifact(names[1], key, build, quiet=quiet)

    def affinity(self, eps_dir: Path) -> Path:
        from wsss_tune.stages import affinity as aff_stage
        from wsss_tune.stages import random_walk as rw_stage

        cfg = self.cfg
        key = self.store.key("affinity", str(self.keys["eps"]), *self.parts["affinity"])
        self.keys["affinity"] = key

        def build(tmp: Path, rep: Reporter) -> dict[str, Any]:
            work = self._work_dir(key)
            res = aff_stage.run_affinity(cfg, eps_dir=eps_dir, out_dir=work, reporter=rep, device=self.device,
                                         eps_model=self.eps_model_path)
            for name in ("model.pt", "aff"):
                src = work / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.exists():
                    shutil.copy2(src, tmp / name)
            return {k: v for k, v in res.metrics.items() if not k.startswith("eps_")}

        aff_dir = self._artifact("affinity", key, build)
        rw_key = self.store.key("rw", str(key), *self.parts["rw"])
        self.keys["rw"] = rw_key

        def build_rw(tmp: Path, rep: Reporter) -> dict[str, Any]:
            res = rw_stage.run_random_walk(cfg, eps_dir=eps_dir, aff_dir=aff_dir / "aff", out_dir=tmp, reporter=rep)
            return {k: v for k, v in res.metrics.items() if not k.startswith("eps_")}

        return self._artifact("rw", rw_key, build_rw)

    def deeplab(self, mask_dir: Path, mask_key: str) -> Path:
        from wsss_tune.stages import deeplab as dl_stage

        cfg = self.cfg
        key = self.store.key("deeplab", mask_key, *self.parts["deeplab"])
        self.keys["deeplab"] = key

        def build(tmp: Path, rep: Reporter) -> dict[str, Any]:
            work = self._work_dir(key)
            res = dl_stage.run_deeplab(cfg, mask_dir=mask_dir, out_dir=work, reporter=rep, device=self.device)
            shutil.copy2(work / "model.pt", tmp / "model.pt")
            return dict(res.metrics)

        return self._artifact("deeplab", key, build)

    def _mask_source(self, eps_dir: Path | None, rw_dir: Path | None) -> tuple[Path, str]:
        src = self.cfg.deeplab.mask_source
        if src == "gt":
            return Path(self.layout.mask_path("x")).parent, "gt"
        if src == "refined":
            if rw_dir is None:
                raise ValueError("deeplab.mask_source is 'refined' but the affinity stage did not run; "
                                 "add it to --stages or set deeplab.mask_source=eps")
            return rw_dir / "masks", str(self.keys["rw"])
        if src == "eps":
            if eps_dir is None:
                raise ValueError("deeplab.mask_source is 'eps' but the eps stage did not run")
            return eps_dir / "masks", str(self.keys["eps"])
        folder = Path(src)
        if not folder.is_dir():
            raise ValueError(f"deeplab.mask_source: {src!r} is not 'refined', 'eps', 'gt' or an existing folder")
        return folder, f"folder:{folder}:{config_hash(sorted(p.name for p in folder.iterdir()))}"

    def run(self, stages: Sequence[str]) -> dict[str, Any]:
        stages = parse_stages(stages)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.cfg, self.out_dir / "config.yaml")
        needs_eps = "eps" in stages or "affinity" in stages or (
            "deeplab" in stages and self.cfg.deeplab.mask_source in ("eps", "refined"))
        needs_aff = "affinity" in stages or ("deeplab" in stages and self.cfg.deeplab.mask_source == "refined")
        eps_dir = self.eps() if needs_eps else None
        rw_dir = self.affinity(eps_dir) if needs_aff and eps_dir is not None else None
        if "deeplab" in stages:
            mask_dir, mask_key = self._mask_source(eps_dir, rw_dir)
            self.deeplab(mask_dir, mask_key)
        if self.cfg.run.cam_baseline and "eps" in stages:
            self.cam_baseline()
        result = {**self.metrics, "stages": self.stage_info, "fingerprint": self.fingerprint}
        atomic_write_json(self.out_dir / "metrics.json", result)
        return result


def run_pipeline(
    cfg: PipelineConfig,
    *,
    stages: Sequence[str] = STAGES,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    store: Any = None,
    device: Any = None,
) -> dict[str, Any]:
    """Run ``stages`` of the pipeline for ``cfg``; returns (and writes ``metrics.json`` with) all metrics."""
    return PipelineRun(cfg, out_dir=out_dir, reporter=reporter, store=store, device=device).run(stages)

