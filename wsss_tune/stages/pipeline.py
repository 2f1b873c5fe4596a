"""The whole pipeline: a generic runner over the stage graph, each artifact cached.

:mod:`wsss_tune.stages.graph` declares every artifact (what it reads, what keys it, what it reports,
how it is built). :class:`PipelineRun` walks it: for the requested stages it builds the artifacts
they need in graph order, each stored in an :class:`~wsss_tune.artifacts.ArtifactStore` under a key
that hashes its own key parts and the keys of what it reads. A run whose upstream configuration was
computed before reuses that artifact; two trials that need the same missing artifact compute it once.
Training happens in a stable work folder per key, so a killed run resumes from its last checkpoint
instead of starting over.

With ``run.cam_baseline`` the EPS stage also builds the plain-CAM baseline (``eps.method: cam``) as
``cam_model`` + ``cam`` (stored as EPS artifacts, keys without tau and lam, so every trial of a sweep
shares them) after the requested stages, without reporting to the scheduler; its scores are
``cam_miou*``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsss_tune.config import PipelineConfig, apply_overrides, dump_yaml
from wsss_tune.reporting import ConsoleReporter, NullReporter, Reporter
from wsss_tune.stages import graph
from wsss_tune.utils.io import atomic_write_json

__all__ = ["STAGES", "FINGERPRINT_KEY", "ARTIFACT_KEY", "ARTIFACT_DIR_KEY", "parse_stages", "run_pipeline", "PipelineRun", "stage_key_parts"]

#: User-facing stage names of the built-in graph, in order. ``affinity`` includes the random walk.
STAGES = graph.stage_names()
#: The run's metric holding its data fingerprint (split ids, labels, file sizes: what keys the cache).
FINGERPRINT_KEY = "fingerprint"
#: A stage-end report's artifact (its name in the run's records) and the artifact's folder.
ARTIFACT_KEY, ARTIFACT_DIR_KEY = "artifact", "artifact_dir"


def parse_stages(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"eps,affinity"`` / ``["deeplab"]`` / ``"all"`` -> ordered stage names; unknown names are errors."""
    names = graph.stage_names()
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if items == ["all"]:
        return names
    unknown = [s for s in items if s not in names]
    if unknown or not items:
        raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"expected a comma-separated subset of {', '.join(names)} or 'all'")
    return tuple(s for s in names if s in items)


def stage_key_parts(cfg: PipelineConfig, fingerprint: Any) -> dict[str, tuple[Any, ...]]:
    """The key parts of every artifact (without upstream keys, which :class:`PipelineRun` chains in);
    see :func:`wsss_tune.stages.graph.key_parts`."""
    return graph.key_parts(cfg, fingerprint)


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
    """One pipeline run over an artifact store; :meth:`run` builds what the requested stages need."""

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

        graph.load_plugins(cfg.run.stage_plugins)
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.reporter = reporter or ConsoleReporter(self.out_dir)
        self.store = store or ArtifactStore(uri=cfg.run.artifact_store or str(self.out_dir / "artifacts"))
        self.device = device
        self.layout = VOCLayout.from_config(cfg.data)
        self._fingerprints: dict[tuple[tuple[str, ...], bool], str] = {}
        splits = sorted({cfg.data.train_split, cfg.data.mask_eval_split, cfg.data.val_split})
        self.fingerprint = self._fingerprint(splits, True)
        self.metrics: dict[str, Any] = {}
        self.side_metrics: dict[str, dict[str, Any]] = {}
        self.stage_info: dict[str, dict[str, Any]] = {}
        #: Artifact keys and folders of this run's config, by artifact name.
        self.keys: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        self._offset = 0
        self._group_start: dict[str, int] = {}

    def _fingerprint(self, splits: Sequence[str], masks: bool) -> str:
        memo = (tuple(splits), bool(masks))
        if memo not in self._fingerprints:
            self._fingerprints[memo] = self.layout.fingerprint(list(splits), masks=masks)
        return self._fingerprints[memo]

    def _artifact(self, label: str, key: Any, build: Callable[[Path, Reporter], Mapping[str, Any] | None], *,
                  quiet: bool, report_as: str) -> Path:
        """Get or build one artifact; its metrics join the run's. ``quiet``: a side artifact (the CAM
        baseline) that reports nothing to the scheduler, adds no fidelity and keeps its metrics apart.
        Artifacts reported under one name (DeepLab's weights, then its scores) share its steps."""
        start = self._group_start.setdefault(report_as, self._offset)
        rep = _StageReporter(NullReporter() if quiet else self.reporter, report_as, start)
        t0 = time.time()
        art = self.store.get_or_create(key, lambda tmp: dict(build(Path(tmp), rep) or {}))
        stage_metrics = dict(art.metadata or {})
        self.stage_info[label] = {"key": str(key), "hit": bool(art.hit), "path": str(art.path),
                                  "seconds": round(time.time() - t0, 2), "build_seconds": art.build_seconds}
        if quiet:
            self.side_metrics[label] = stage_metrics
            return Path(art.path)
        self.metrics.update(stage_metrics)
        self._offset = max(self._offset, start + max(rep.last_step, 1))
        if stage_metrics:
            # The artifact's scores once more at its end, without a stage step (a scheduler files
            # nothing at a rung for it), with its folder: for a cache hit the scheduler's only sight
            # of them, for a build the stage-end record (loggers show its masks from the folder).
            self.reporter.report({**stage_metrics, "stage": report_as, "cache_hit": bool(art.hit),
                                  "fidelity": self._offset, ARTIFACT_KEY: label, ARTIFACT_DIR_KEY: str(art.path)},
                                 step=self._offset)
        return Path(art.path)

    def build(self, names: Sequence[str], *, cfg: PipelineConfig | None = None, labels: Mapping[str, str] | None = None,
              quiet: bool = False) -> dict[str, Path]:
        """Get or build the artifacts ``names`` (graph order; what they read must be among them) for
        ``cfg`` (default: the run's); ``labels`` renames them in the run's records (the CAM baseline)."""
        cfg = cfg or self.cfg
        keys = self.artifact_keys(names, cfg=cfg)
        paths: dict[str, Path] = {}
        for name in names:
            spec = graph.spec(name)
            key = keys[name]
            inputs = {r: paths[r] for r in spec.reads(cfg)}

            def make(tmp: Path, rep: Reporter, spec: graph.ArtifactSpec = spec, key: Any = key,
                     inputs: dict[str, Path] = inputs) -> Mapping[str, Any] | None:
                work = self.store.work_dir(key) if spec.trains else tmp
                ctx = graph.BuildContext(cfg=cfg, layout=self.layout, inputs=inputs, out=tmp, work=Path(work),
                                         reporter=rep, device=self.device)
                return spec.build(ctx)

            label = (labels or {}).get(name, name)
            paths[name] = self._artifact(label, key, make, quiet=quiet, report_as=spec.report_as or label)
            keys[name] = key
        return paths if cfg is not self.cfg else self._remember(keys, paths)

    def artifact_keys(self, names: Sequence[str], *, cfg: PipelineConfig | None = None) -> dict[str, Any]:
        """The store keys of the artifacts ``names`` (graph order; what they read must be among them)
        for ``cfg`` (default: the run's): each hashes its own key parts and the keys of what it reads."""
        cfg = cfg or self.cfg
        parts = graph.key_parts(cfg, self._fingerprint)
        keys: dict[str, Any] = {}
        for name in names:
            reads = graph.spec(name).reads(cfg)
            missing = [r for r in reads if r not in keys]
            if missing:
                raise ValueError(f"artifact {name!r} reads {missing}, which this run does not build")
            keys[name] = self.store.key(name, *(str(keys[r]) for r in reads), *parts[name])
        return keys

    def _remember(self, keys: dict[str, Any], paths: dict[str, Path]) -> dict[str, Path]:
        self.keys.update(keys)
        self.paths.update(paths)
        return paths

    def cam_baseline(self) -> None:
        """The plain-CAM baseline of this config's EPS stage; its pseudo-mask scores become ``cam_*``."""
        if self.cfg.eps.method == "cam":  # this run's EPS stage is the baseline
            scores = self.metrics
        else:
            cam_cfg = apply_overrides(self.cfg, {"eps.method": "cam"})
            names = graph.needed_artifacts(cam_cfg, ("eps",))
            self.build(names, cfg=cam_cfg, labels=graph.CAM_BASELINE, quiet=True)
            scores = self.side_metrics[graph.CAM_BASELINE["eps"]]
        self.metrics.update({"cam" + k[len("eps"):]: v for k, v in scores.items() if k.startswith("eps_miou")})

    def run(self, stages: Sequence[str]) -> dict[str, Any]:
        stages = parse_stages(stages)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.cfg, self.out_dir / "config.yaml")
        self.build(graph.needed_artifacts(self.cfg, stages))
        if self.cfg.run.cam_baseline and "eps" in stages:
            self.cam_baseline()
        result = {**self.metrics, "stages": self.stage_info, FINGERPRINT_KEY: self.fingerprint}
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

