"""The ``wsss-tune`` command: thin subcommands, each delegating to one library function.

This is the one place that ties the library, the trainables and the analysis together; heavy
imports (torch, ray, optuna) happen inside the commands so ``wsss-tune --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from wsss_tune.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter search for weakly supervised semantic segmentation (EPS -> AffinityNet "
                       "random walk -> DeepLab) on Ray Tune + Optuna.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare, generate and check datasets.")
config_app = typer.Typer(no_args_is_help=True, help="Show built-in and resolved configs.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and garbage-collect the stage-artifact cache.")
weights_app = typer.Typer(no_args_is_help=True, help="Inspect pretrained weight files.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(cache_app, name="cache")
app.add_typer(weights_app, name="weights")

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).")]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _load(config: str, overrides: list[str] | None, data: Path | None = None):
    from wsss_tune.config import apply_overrides, load_config

    cfg = load_config(config, overrides or [])
    if data is not None:
        cfg = apply_overrides(cfg, {"data.root": str(data.resolve())})
    return cfg


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@config_app.command("show")
def config_show(
    name: Annotated[str, typer.Argument(help="Built-in config name (synth, voc) or a YAML path.")],
    set_: SetOpt = None,
) -> None:
    """Print a config fully resolved (defaults filled in, overrides applied, paths absolute)."""
    from wsss_tune.config import dump_yaml

    try:
        typer.echo(dump_yaml(_load(name, set_)), nl=False)
    except ConfigError as exc:
        _fail(str(exc))


@config_app.command("list")
def config_list() -> None:
    """List the built-in configs."""
    from wsss_tune.config import builtin_configs

    for name, path in builtin_configs().items():
        typer.echo(f"{name}\t{path}")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output folder (VOC layout).")],
    seed: Annotated[int, typer.Option(help="Random seed; the output is deterministic for a seed.")] = 0,
    preset: Annotated[str, typer.Option(help="default | hard (co-occurrence ~1.0) | tiny")] = "default",
    n_train: Annotated[int | None, typer.Option(help="Training images (train_aug).")] = None,
    n_mask_eval: Annotated[int | None, typer.Option(help="Of those, with GT scored for pseudo masks (train).")] = None,
    n_val: Annotated[int | None, typer.Option(help="Validation images.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Object classes.")] = None,
    cooccur: Annotated[float | None, typer.Option(help="P(context | class) for the co-occurrence traps.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset.")] = False,
) -> None:
    """Generate a synthetic dataset in the real VOC layout (images, masks, saliency, labels, lists)."""
    from wsss_tune.data import generate_synthetic_voc

    kwargs = {k: v for k, v in dict(n_train=n_train, n_mask_eval=n_mask_eval, n_val=n_val, image_size=image_size,
                                     num_classes=num_classes, cooccur=cooccur).items() if v is not None}
    try:
        path = generate_synthetic_voc(out, seed=seed, preset=preset, overwrite=overwrite, **kwargs)
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    typer.echo(f"synthetic dataset at {path}")


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset root (VOC layout).")],
    saliency: Annotated[str | None, typer.Option(help="Saliency folder (absolute or relative to ROOT).")] = None,
    splits: Annotated[str, typer.Option(help="Comma-separated id lists to check.")] = "train_aug,train,val",
    label_source: Annotated[str, typer.Option(help="cls_labels | annotations | masks")] = "cls_labels",
    no_saliency: Annotated[bool, typer.Option("--no-saliency", help="Do not check saliency maps.")] = False,
) -> None:
    """Validate a dataset; prints every problem with its file and exits non-zero if there is any."""
    from wsss_tune.data import VOCLayout, check_dataset, format_problems

    kwargs = {"saliency_dir": saliency} if saliency else {}
    layout = VOCLayout(root=str(root.resolve()), label_source=label_source, **kwargs)
    split_list = [s for s in splits.split(",") if s]
    problems = check_dataset(layout, split_list, saliency=not no_saliency)
    if problems:
        typer.echo(format_problems(problems))
        typer.secho(f"{len(problems)} problem(s) in {root}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.secho(f"ok: {root} ({', '.join(split_list)})", fg=typer.colors.GREEN)


@data_app.command("prepare-voc")
def data_prepare_voc(
    voc: Annotated[Path, typer.Option(help="VOCtrainval_11-May-2012.tar, or the folder it unpacks to.")],
    out: Annotated[Path, typer.Option(help="Dataset root to write (data.root).")],
    sbd: Annotated[Path | None, typer.Option(help="SBD benchmark.tgz, or the folder it unpacks to (omit: VOC only).")] = None,
    saliency_from_gt: Annotated[bool, typer.Option(
        "--saliency-from-gt", help="Also write SaliencyFromGT/: saliency from the GT masks, for an upper-bound "
                                   "study only (results with it are not weakly supervised).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build VOC 2012 + SBD (train_aug, train, val, cls_labels.npy) from the official archives; resumable."""
    from wsss_tune.data.prepare import PrepareError, prepare_voc

    try:
        report = prepare_voc(voc=voc, sbd=sbd, out=out, progress=progress, saliency_from_gt=saliency_from_gt)
    except PrepareError as exc:
        _fail(str(exc))
    typer.echo(report.summary())
    if not report.ok:
        typer.secho("counts differ from the official VOC 2012 + SBD sets", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


@app.command("run")
def run(
    config: Annotated[str, typer.Argument(help="Built-in config name (synth, voc) or a YAML path.")],
    stages: Annotated[str, typer.Option(help="Comma-separated: eps, affinity (incl. the random walk), deeplab, or all.")] = "all",
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    synth_if_missing: Annotated[bool, typer.Option(help="Generate the synthetic dataset if data.root is missing.")] = False,
) -> None:
    """Run pipeline stages once, without Ray; writes the resolved config and metrics.json."""
    from wsss_tune.stages.pipeline import parse_stages, run_pipeline

    try:
        cfg = _load(config, set_, data)
        stage_list = parse_stages(stages)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    out_dir = (out or Path("runs") / cfg.name).resolve()
    if synth_if_missing and not Path(cfg.data.root).exists():
        from wsss_tune.data import generate_synthetic_voc

        generate_synthetic_voc(cfg.data.root, seed=cfg.run.seed)
    from wsss_tune.validate import PreflightError, require_preflight

    try:
        require_preflight(cfg, stages=stage_list, experiments=out_dir)
    except PreflightError as exc:
        _fail(str(exc))
    metrics = run_pipeline(cfg, stages=stage_list, out_dir=out_dir)
    headline = {k: v for k, v in metrics.items() if k.endswith("_miou") or k.endswith("_method")}
    typer.echo(json.dumps(headline, indent=2, default=str))
    typer.echo(f"run folder: {out_dir}")


# --------------------------------------------------------------------------------------------------
# weights, doctor
# --------------------------------------------------------------------------------------------------


@weights_app.command("inspect")
def weights_inspect(
    file: Annotated[Path, typer.Argument(help="Weights file (.pth, .pt, MXNet .params, .safetensors).")],
    backbone: Annotated[str | None, typer.Option(help="Compare with this backbone instead of the best fit.")] = None,
    all_keys: Annotated[bool, typer.Option("--all", help="List every missing/unexpected key.")] = False,
) -> None:
    """What a weights file holds, which backbone it fits, and its missing/unexpected keys by name."""
    from wsss_tune.doctor import describe_weights, format_weights_description
    from wsss_tune.models.weights import WeightsError

    try:
        info = describe_weights(file, backbone=backbone)
    except WeightsError as exc:
        _fail(str(exc))
    typer.echo(format_weights_description(info, **({"limit": None} if all_keys else {})))


@app.command("doctor")
def doctor(
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    config: Annotated[str | None, typer.Option(help="Built-in config name or YAML path (default: voc).")] = None,
    set_: SetOpt = None,
    full: Annotated[bool, typer.Option(help="Read every id of every split, not a sample.")] = False,
    store: Annotated[str | None, typer.Option(
        help="Artifact store to check (default: run.artifact_store, else STORAGE/artifacts).")] = None,
    storage: Annotated[Path | None, typer.Option(help="Sweep experiment folder (default: ./experiments).")] = None,
) -> None:
    """Check GPUs, data, disk, weights, W&B and the Ray cluster; one line each; non-zero exit on a problem."""
    from wsss_tune.doctor import exit_code, format_checks, run_doctor

    checks = run_doctor(data=data, config=config, overrides=set_ or [], full=full, store=store,
                        experiments=storage)
    typer.echo(format_checks(checks))
    raise typer.Exit(exit_code(checks))


# --------------------------------------------------------------------------------------------------
# report, plan, compare
# --------------------------------------------------------------------------------------------------


@app.command("report")
def report(
    exp: Annotated[Path, typer.Argument(help="Experiment folder (written by `wsss-tune sweep`).")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: EXP/report).")] = None,
    images: Annotated[int, typer.Option(help="Images in the qualitative figure.")] = 4,
    wandb: Annotated[str, typer.Option(help="Also log to W&B: off | offline | online.")] = "off",
) -> None:
    """Write a self-contained HTML report (figures embedded), a Markdown summary and the tables as CSV."""
    from wsss_tune.analysis.report import report as make_report

    if wandb not in ("off", "offline", "online"):
        _fail(f"--wandb {wandb!r}: expected off, offline or online")
    try:
        make_report(exp, out=out, images=images, wandb=wandb)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command("plan")
def plan(
    space: Annotated[str, typer.Argument(help="Built-in search space name or a YAML path.")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    gpus: Annotated[int, typer.Option(help="Devices the sweep will run on (one trial per device).")] = 1,
    trials: Annotated[int | None, typer.Option(help="Trials (default: the space's num_samples).")] = None,
    cache: Annotated[bool, typer.Option(help="Trials share stage artifacts through the cache.")] = True,
    asha: Annotated[bool, typer.Option(help="Early stopping on the space's fidelity.")] = True,
    steps: Annotated[int, typer.Option(help="Timed steps per stage.")] = 3,
) -> None:
    """Estimate a sweep's cost before launching it: times each stage here, then scales it up."""
    from wsss_tune.analysis.plan import plan as make_plan
    from wsss_tune.spaces import SpaceError

    try:
        _, text = make_plan(space, data=data, gpus=gpus, trials=trials, cache=cache, asha=asha, steps=steps)
    except (SpaceError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(text)


@app.command("compare")
def compare(
    exp_a: Annotated[Path, typer.Argument(help="First experiment folder.")],
    exp_b: Annotated[Path, typer.Argument(help="Second experiment folder.")],
    out: Annotated[Path | None, typer.Option(help="Also write the comparison (Markdown) to this file.")] = None,
) -> None:
    """Line up two experiments: best configs (fields that differ) and stage tables."""
    from wsss_tune.analysis.compare import compare as make_comparison

    try:
        make_comparison(exp_a, exp_b, out=out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


# --------------------------------------------------------------------------------------------------
# sweep, resume, export, demo
# --------------------------------------------------------------------------------------------------

WandbOpt = Annotated[str, typer.Option(help="W&B logging: offline (default; `wandb sync` later) | online | off.")]
ProgressOpt = Annotated[str, typer.Option(help="rich (live table) | ray (Tune's own output) | off.")]


def _sweep_errors() -> tuple[type[BaseException], ...]:
    from wsss_tune.data import DataError
    from wsss_tune.spaces import SpaceError

    return (SpaceError, ConfigError, DataError, FileNotFoundError, ValueError)


@app.command("sweep")
def sweep(
    space: Annotated[str, typer.Argument(help="Search space: built-in name (synth_rw, eps, ...) or a YAML path.")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    trials: Annotated[int | None, typer.Option(help="Trials (default: the space's num_samples).")] = None,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs per trial; fractions share a GPU.")] = 0,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs per trial.")] = 1,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (auto or host:port).")] = None,
    storage: Annotated[Path | None, typer.Option(help="Folder of experiments (default: ./experiments).")] = None,
    name: Annotated[str | None, typer.Option(help="Experiment name (default: <space>-<date>-<time>).")] = None,
    wandb: WandbOpt = "offline",
    seed: Annotated[int, typer.Option(help="Seed of the TPE sampler.")] = 0,
    max_failures: Annotated[int, typer.Option(help="Retries of a failing trial (-1: unlimited).")] = 0,
    max_concurrent: Annotated[int | None, typer.Option(help="At most this many trials at once.")] = None,
    set_: SetOpt = None,
    store: Annotated[str | None, typer.Option(help="Artifact store (default: <storage>/artifacts).")] = None,
    cache: Annotated[bool, typer.Option(help="Share stage artifacts between trials.")] = True,
    progress: ProgressOpt = "rich",
) -> None:
    """Search a space with Ray Tune + Optuna TPE (+ ASHA); the reference setting runs first."""
    from wsss_tune.config import parse_override
    from wsss_tune.trainables.sweep import sweep as run

    try:
        overrides = dict(parse_override(o) for o in set_ or [])
        run(space, data=data, trials=trials, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
            address=address, storage=storage, name=name, wandb=wandb, seed=seed, max_failures=max_failures,
            max_concurrent=max_concurrent, overrides=overrides, store=store, cache=cache, progress=progress)
    except _sweep_errors() as exc:
        _fail(str(exc))


@app.command("resume")
def resume(
    exp: Annotated[Path, typer.Argument(help="Experiment folder of an interrupted sweep.")],
    resume_errored: Annotated[bool, typer.Option(help="Also resume failed trials from their last checkpoint.")] = False,
    restart_errored: Annotated[bool, typer.Option(help="Restart failed trials from scratch.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (auto or host:port).")] = None,
    progress: ProgressOpt = "rich",
) -> None:
    """Continue an interrupted sweep (searcher state kept), then rewrite its results."""
    from wsss_tune.trainables.sweep import resume as run

    try:
        run(exp, resume_errored=resume_errored, restart_errored=restart_errored, address=address, progress=progress)
    except _sweep_errors() as exc:
        _fail(str(exc))


@app.command("export")
def export(
    exp: Annotated[Path, typer.Argument(help="Experiment folder.")],
    out: Annotated[Path | None, typer.Option(help="Output YAML (default: EXP/best_config.yaml).")] = None,
    allow_incomplete: Annotated[bool, typer.Option(help="Export even if some trials failed or never ran.")] = False,
) -> None:
    """Write the best trial's full config as a YAML that `wsss-tune run` accepts."""
    from wsss_tune.trainables.sweep import export as run

    try:
        run(exp, out=out, allow_incomplete=allow_incomplete)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command("demo")
def demo(
    data: Annotated[Path, typer.Option(help="Synthetic dataset folder (generated if missing).")] = Path("data/synth"),
    storage: Annotated[Path | None, typer.Option(help="Folder of experiments (default: ./experiments).")] = None,
    trials: Annotated[int, typer.Option(help="Trials of the synth_pipeline sweep.")] = 6,
    wandb: WandbOpt = "offline",
    progress: ProgressOpt = "rich",
) -> None:
    """A real sweep over the whole pipeline on the synthetic dataset (CPU, about 10 minutes on 2 cores)."""
    from wsss_tune.trainables.sweep import demo as run

    try:
        run(data=data, storage=storage, trials=trials, wandb=wandb, progress=progress)
    except _sweep_errors() as exc:
        _fail(str(exc))


# --------------------------------------------------------------------------------------------------
# cache, pre-flight, Ray clean-up
# --------------------------------------------------------------------------------------------------

StoreArg = Annotated[str, typer.Argument(help="Artifact store: a folder (e.g. experiments/artifacts) or a URI.")]
#: Seconds per unit of an ``--older-than`` value (``90s``, ``30m``, ``12h``, ``7d``; a bare number is seconds).
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age_seconds(text: str) -> float:
    unit = text[-1:].lower()
    number = text[:-1] if unit in _AGE_UNITS else text
    try:
        value = float(number) * _AGE_UNITS.get(unit, 1)
    except ValueError:
        raise ValueError(f"--older-than {text!r}: expected a number with an optional unit s, m, h or d "
                         "(e.g. 7d)") from None
    if value < 0:
        raise ValueError(f"--older-than {text!r}: expected >= 0")
    return value


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@cache_app.command("ls")
def cache_ls(
    store: StoreArg,
    stage: Annotated[str | None, typer.Option(help="Only this stage (eps, affinity, rw, deeplab, ...).")] = None,
) -> None:
    """List published artifacts: stage/digest, age, size, files and build time."""
    from wsss_tune.artifacts import ArtifactStore

    try:
        infos = ArtifactStore(uri=store).list(stage)
    except ValueError as exc:
        _fail(str(exc))
    for i in sorted(infos, key=lambda i: (i.key.stage, i.created)):
        typer.echo(f"{i.key.stage}/{i.key.digest}  age {i.age_seconds / 3600:7.1f} h  {_size(i.size_bytes):>9}  "
                   f"{i.num_files:4d} files  built in {i.build_seconds:.1f} s")
    typer.echo(f"{len(infos)} artifact(s), {_size(sum(i.size_bytes for i in infos))}")


@cache_app.command("gc")
def cache_gc(
    store: StoreArg,
    older_than: Annotated[str | None, typer.Option(help="Remove artifacts older than this (90s, 30m, 12h, 7d).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only report what would be removed.")] = False,
) -> None:
    """Remove old artifacts (with --older-than) and clean leftovers of crashed builds and stale locks."""
    from wsss_tune.artifacts import ArtifactStore

    try:
        age = _age_seconds(older_than) if older_than is not None else None
        report = ArtifactStore(uri=store).gc(older_than=age, dry_run=dry_run)
    except ValueError as exc:
        _fail(str(exc))
    verb = "would remove" if dry_run else "removed"
    for i in report.removed:
        typer.echo(f"{verb} {i.key.stage}/{i.key.digest} ({_size(i.size_bytes)})")
    typer.echo(f"{verb} {len(report.removed)} artifact(s), {_size(report.freed_bytes)}; "
               f"cleaned {len(report.cleaned)} leftover(s)")


@app.command("preflight")
def preflight(
    config: Annotated[str, typer.Argument(help="Built-in config name (synth, voc) or a YAML path.")],
    stages: Annotated[str, typer.Option(help="Comma-separated stages, or all.")] = "all",
    set_: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    store: Annotated[str | None, typer.Option(help="Artifact store to probe (default run.artifact_store).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run / experiment folder to probe for writing.")] = None,
) -> None:
    """Check every file, weight and storage location a run needs; exit 1 listing every problem."""
    from wsss_tune.stages.pipeline import parse_stages
    from wsss_tune.validate import PreflightError, require_preflight

    try:
        cfg = _load(config, set_, data)
        checks = require_preflight(cfg, stages=parse_stages(stages), store=store, experiments=out)
    except PreflightError as exc:
        _fail(str(exc), code=1)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    for c in checks:
        typer.echo(c.line())


@app.command("ray-clean")
def ray_clean(
    exp: Annotated[Path, typer.Argument(help="Experiment folder whose driver was killed.")],
    dry_run: Annotated[bool, typer.Option(help="Only list the processes.")] = False,
) -> None:
    """End the Ray processes a killed sweep driver left behind (only that sweep's recorded session)."""
    from wsss_tune.trainables.cluster import clean_ray_session

    try:
        pids = clean_ray_session(exp, dry_run=dry_run)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{'would end' if dry_run else 'ended'} {len(pids)} process(es): {' '.join(map(str, pids))}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: clear one-line errors for user mistakes instead of tracebacks."""
    from wsss_tune.data import DataError

    try:
        app(args=argv, standalone_mode=True)
    except (ConfigError, DataError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
