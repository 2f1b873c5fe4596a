"""EPS against EPS + pixel-to-prototype contrast (``eps.method: eps_ppc``) on the synthetic data.

For each synthetic preset (``default``: co-occurrence 0.4; ``hard``: every trap context always
present) and each arm, the whole pipeline of the built-in ``synth`` config (EPS, AffinityNet and the
random walk, DeepLab) runs for several training seeds (``run.seed``; the data is generated once per
preset, with seed 0). The arms differ in ``eps.method`` only; every ``ppc_*`` setting is the PPC
reference's (``docs/ppc.md``). Each stage is scored on its own split's two fixed halves: pseudo masks
(``eps``) and refined masks (``rw``) on ``train``, DeepLab on ``val``; tune / held-out.

Rows: one per preset, arm and seed with the six mIoUs and the wall time; then per preset and arm the
mean and standard deviation over the seeds; then per preset the gain (PPC mean - EPS mean) next to
the pooled seed spread, ``sqrt((s_eps^2 + s_ppc^2) / 2)``.

The runs go in-process through :func:`wsss_tune.stages.pipeline.run_pipeline` over one artifact store,
so the two arms share nothing but the data (their EPS models differ, and everything downstream is keyed
by them). ``deeplab_iterations`` lowers DeepLab's training for both arms alike when the full run would
take too long on a small machine.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run", "ARMS", "PRESETS", "summarize"]

#: The two arms: the config changes that make them.
ARMS: dict[str, dict[str, Any]] = {"EPS": {"eps.method": "eps"}, "EPS+PPC": {"eps.method": "eps_ppc"}}
#: Synthetic presets (full run / quick smoke run) and training seeds.
PRESETS, PRESETS_QUICK = ("default", "hard"), ("tiny",)
SEEDS, SEEDS_QUICK = (0, 1, 2), (0,)
#: Generation seed of every preset's data.
DATA_SEED = 0
#: Stage metric prefixes, in pipeline order, with their column labels.
STAGES = (("eps", "EPS masks"), ("rw", "refined"), ("deeplab", "DeepLab"))
HALVES = ("tune", "heldout")


def _columns() -> list[str]:
    return [f"{stage}_{half}" for stage, _ in STAGES for half in HALVES]


def _run_one(preset_root: Path, arm: Mapping[str, Any], seed: int, *, store: Any, out: Path, quick: bool,
             deeplab_iterations: int | None) -> dict[str, Any]:
    from wsss_tune.config import load_config
    from wsss_tune.reporting import NullReporter
    from wsss_tune.stages.pipeline import run_pipeline

    overrides: dict[str, Any] = {"data.root": str(preset_root), "data.num_workers": 0, "run.device": "cpu",
                                 "run.seed": seed, **arm}
    if quick:
        from wsss_tune.trainables.planning import SMOKE_OVERRIDES

        overrides.update(SMOKE_OVERRIDES)
    if deeplab_iterations is not None:
        overrides["deeplab.iterations"] = deeplab_iterations
    cfg = load_config("synth", overrides)
    return run_pipeline(cfg, out_dir=out, reporter=NullReporter(), store=store)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds per preset and arm, then per preset the gain of the
    second arm over the first next to the pooled seed spread. ``rows`` are the per-seed rows."""
    out: list[dict[str, Any]] = []
    cols = _columns()
    stats: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for arm in ARMS:
            mine = [r for r in rows if r["preset"] == preset and r["arm"] == arm]
            if not mine:
                continue
            entry: dict[str, tuple[float, float]] = {}
            row: dict[str, Any] = {"preset": preset, "arm": arm, "seed": f"mean ± std ({len(mine)})"}
            for c in cols:
                vals = [float(r[c]) for r in mine if r.get(c) is not None]
                if not vals:
                    continue
                mean = statistics.fmean(vals)
                std = statistics.stdev(vals) if len(vals) > 1 else math.nan
                entry[c] = (mean, std)
                row[c] = f"{mean:.2f} ± {std:.2f}"
            stats[(preset, arm)] = entry
            out.append(row)
        first, second = list(ARMS)
        if (preset, first) in stats and (preset, second) in stats:
            row = {"preset": preset, "arm": f"{second} - {first}", "seed": "gain (pooled std)"}
            for c in cols:
                if c in stats[(preset, first)] and c in stats[(preset, second)]:
                    (m1, s1), (m2, s2) = stats[(preset, first)][c], stats[(preset, second)][c]
                    row[c] = f"{m2 - m1:+.2f} ({math.sqrt((s1 * s1 + s2 * s2) / 2):.2f})"
            out.append(row)
    return out


def run(quick: bool, presets: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
        deeplab_iterations: int | None = None, workdir: str | Path | None = None) -> list[dict[str, Any]]:
    """The measurement table. ``presets`` default to ``default`` and ``hard`` (``tiny`` when ``quick``),
    ``seeds`` to 0, 1, 2 (0 when ``quick``); ``deeplab_iterations`` overrides ``deeplab.iterations`` for
    both arms; ``workdir`` keeps the data and the artifact store there (a rerun reuses every artifact
    it can), else a temporary folder is used and removed."""
    from wsss_tune.artifacts import ArtifactStore
    from wsss_tune.data import generate_synthetic_voc

    presets = tuple(presets or (PRESETS_QUICK if quick else PRESETS))
    seeds = tuple(seeds if seeds is not None else (SEEDS_QUICK if quick else SEEDS))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        store = ArtifactStore(uri=str(root / "store"))
        for preset in presets:
            data = generate_synthetic_voc(root / "data" / preset, preset=preset, seed=DATA_SEED)
            for arm, changes in ARMS.items():
                for seed in seeds:
                    t0 = time.perf_counter()
                    m = _run_one(data, changes, seed, store=store, quick=quick, deeplab_iterations=deeplab_iterations,
                                 out=root / "runs" / f"{preset}-{arm}-{seed}")
                    row: dict[str, Any] = {"preset": preset, "arm": arm, "seed": seed}
                    for stage, _ in STAGES:
                        for half in HALVES:
                            row[f"{stage}_{half}"] = m.get(f"{stage}_miou_{half}")
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    rows.append(row)
                    print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return rows + summarize(rows)
