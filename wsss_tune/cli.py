"""The ``wsss-tune`` command: thin subcommands, each delegating to one library function.

This is the one place that ties the library, the trainables and the analysis together; heavy
imports (torch, ray, optuna) happen inside the commands so ``wsss-tune --help`` stays fast.

Errors. Every command runs inside :class:`_Commands`, which turns the project's expected failures
(a bad config value, a missing or damaged file, an unwritable output, a dataset problem: see
:func:`_expected_failure`) into one line on stderr, ``error: ...`` naming the file, key or value and
what to do, and exit code 2. Anything else is a bug and keeps its traceback. When a library's message
does not name the file it failed on (pyarrow, SQLite, JSON, YAML), the file is found among the inputs the
command declared with :func:`_reads`. Other exit codes: 1 for a finding (``data check``,
``preflight``, ``doctor``) or a sweep with failed trials (unless ``--allow-failures``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

#: Exit code of an expected failure (bad input, missing or damaged file, unwritable output).
EXIT_ERROR = 2
#: Exit code of a finding: problems found by a check command, failed trials of a sweep.
EXIT_FINDING = 1
#: The inputs the running command declared (:func:`_reads`); reset for every invocation.
_INPUTS: contextvars.ContextVar[list[_Input] | None] = contextvars.ContextVar("wsss_tune_inputs", default=None)


@dataclasses.dataclass(frozen=True)
class _Input:
    """A file a command reads: ``pattern`` (a path, or a glob), its format, what it is, what to do if damaged."""

    pattern: str
    kind: str  # json | parquet | sqlite | yaml
    what: str
    fix: str


def _reads(*inputs: _Input) -> None:
    """Declare files the running command reads, so that a parse error without a file name names it."""
    declared = _INPUTS.get()
    if declared is not None:
        declared.extend(inputs)


def _reads_yaml(name_or_path: str | Path | None, what: str, example: str) -> None:
    """Declare a config / search-space argument as an input when it is a file (not a built-in name)."""
    if name_or_path is not None and Path(name_or_path).suffix in (".yaml", ".yml"):
        _reads(_Input(str(name_or_path), "yaml", what, f"expected a UTF-8 YAML file like {example}"))


def _results_fix(exp: Path) -> str:
    return f"regenerate the results files from the study and the trial folders: `wsss-tune results rebuild {exp}`"


def _experiment_inputs(exp: Path, *, study: bool = True, runs: bool = True) -> list[_Input]:
    """The files of an experiment folder that the analysis commands read."""
    items = [
        _Input(str(exp / "experiment.json"), "json", "experiment record", _results_fix(exp)),
        _Input(str(exp / "trials.parquet"), "parquet", "trials table", _results_fix(exp)),
        _Input(str(exp / "reports.parquet"), "parquet", "reports table", _results_fix(exp)),
        _Input(str(exp / "sweep.json"), "json", "sweep record",
               "it is written once when the sweep starts: restore it from a copy of the experiment"),
    ]
    if study:
        items.append(_Input(str(exp / "optuna.db"), "sqlite", "Optuna study",
                            "restore it from a copy, or move it aside: the report is then written without "
                            "the study (no importances, trials in id order)"))
    if runs:
        items.append(_Input(str(exp / "runs" / "*" / "metrics.json"), "json", "trial metrics file",
                            "a trial writes it when it finishes: move the trial's run folder aside, or resume "
                            "the sweep to run it again"))
    return items


# --------------------------------------------------------------------------------------------------
# Expected failures -> one message and exit code 2
# --------------------------------------------------------------------------------------------------


#: The project's own error types, by module: their messages name the file, key or value and what was
#: expected. Looked up only in modules already imported (an exception's class is), so that an error
#: path never imports torch or Ray.
_NAMED_ERRORS = (
    ("wsss_tune.config", "ConfigError"),
    ("wsss_tune.spaces", "SpaceError"),
    ("wsss_tune.data.voc", "DataError"),
    ("wsss_tune.data.prepare", "PrepareError"),
    ("wsss_tune.models.weights", "WeightsError"),
    ("wsss_tune.validate", "PreflightError"),
    ("wsss_tune.analysis.results", "ResultsError"),
    ("wsss_tune.reporting", "DivergedError"),
    ("wsss_tune.stages.common", "TrainingOutOfMemoryError"),
    ("wsss_tune.trainables.cluster", "DriverStillRunsError"),
)
#: Parser errors that do not name their file, by module, and the file formats they mean.
_PARSE_ERRORS = (
    ("json", "JSONDecodeError", ("json",)),
    ("builtins", "UnicodeDecodeError", ("json", "yaml")),  # a text file holding binary bytes
    ("yaml", "YAMLError", ("yaml",)),
    ("pyarrow.lib", "ArrowException", ("parquet",)),
    ("sqlite3", "DatabaseError", ("sqlite",)),
    ("sqlalchemy.exc", "DatabaseError", ("sqlite",)),
)


def _loaded(module: str, name: str) -> type[BaseException] | None:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _named_error(exc: BaseException) -> bool:
    return any(cls is not None and isinstance(exc, cls) for cls in (_loaded(m, n) for m, n in _NAMED_ERRORS))


def _parse_error_kinds(exc: BaseException) -> tuple[str, ...]:
    """The file formats whose parser may have raised ``exc`` without naming the file (empty if none)."""
    for module, name, kinds in _PARSE_ERRORS:
        cls = _loaded(module, name)
        if cls is not None and isinstance(exc, cls):
            return kinds
    return ()


def _probe(path: Path, kind: str) -> str | None:
    """Read ``path`` as ``kind``; the parser's complaint, or None when it reads."""
    import sqlite3

    try:
        if kind == "json":
            json.loads(path.read_text())
        elif kind == "yaml":
            import yaml

            yaml.safe_load(path.read_text())
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pq.read_table(path)
        elif kind == "sqlite":
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
                rows = db.execute("PRAGMA quick_check").fetchall()
            if rows != [("ok",)]:
                return "; ".join(str(r[0]) for r in rows[:3])
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


def _locate(kinds: Sequence[str], inputs: Sequence[_Input]) -> list[str]:
    """Messages for the declared inputs of these formats that fail to read (each names its file)."""
    found = []
    for item in inputs:
        if item.kind not in kinds:
            continue
        paths = sorted(glob.glob(item.pattern)) if glob.has_magic(item.pattern) else [item.pattern]
        for p in map(Path, paths):
            if not p.is_file():
                continue
            problem = _probe(p, item.kind)
            if problem is not None:
                found.append(f"{p}: the {item.what} is unreadable ({problem}); {item.fix}")
    return found


def _os_message(exc: OSError) -> str:
    """An OSError as ``<file>: <what happened>``; a message without a file stays as it is."""
    if exc.filename is None:
        return str(exc)
    # A two-path failure (a rename into place): the destination is the path the user named.
    where = str(exc.filename if exc.filename2 is None else exc.filename2)
    what = exc.strerror or str(exc)
    if isinstance(exc, NotADirectoryError):
        what += " (a part of the path is a file: expected folders up to the last part)"
    elif isinstance(exc, FileExistsError):
        what += " (something is already there)"
    elif isinstance(exc, IsADirectoryError):
        what += " (expected a file)"
    elif isinstance(exc, PermissionError):
        what += " (pick a location this user can read / write)"
    if exc.filename2 is not None:
        what += f" (while moving {exc.filename} there)"
    return f"{where}: {what}"


def _expected_failure(exc: BaseException, inputs: Sequence[_Input] = ()) -> str | None:
    """The one-line message for an expected failure, or None for anything else (a bug: traceback)."""
    if isinstance(exc, typer.Exit | typer.Abort) or type(exc).__module__.split(".")[0] in ("click", "typer"):
        return None  # the command line's own outcomes (exit codes, usage errors)
    if _named_error(exc):
        return str(exc)
    kinds = _parse_error_kinds(exc)
    if kinds:
        found = _locate(kinds, inputs)
        if found:
            return "\n".join(found)
        detail = f"{type(exc).__name__}: {str(exc).strip()}"
        candidates = [i.pattern for i in inputs if i.kind in kinds]
        if candidates:
            return f"a file this command reads is unreadable ({detail}); it reads {', '.join(candidates)}"
        return f"a {' / '.join(kinds)} file is unreadable ({detail})"
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, ValueError):
        return str(exc)
    return None


class _Commands(TyperGroup):
    """The command group: expected failures become ``error: ...`` on stderr and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        token = _INPUTS.set([])
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _expected_failure(exc, _INPUTS.get() or ())
            if message is None:
                raise
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_ERROR) from None
        finally:
            _INPUTS.reset(token)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hyperparameter search for weakly supervised semantic segmentation (EPS -> AffinityNet "
                       "random walk -> DeepLab) on Ray Tune + Optuna.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare, generate and check datasets.")
config_app = typer.Typer(no_args_is_help=True, help="Show built-in and resolved configs.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and garbage-collect the stage-artifact cache.")
weights_app = typer.Typer(no_args_is_help=True, help="Inspect pretrained weight files.")
results_app = typer.Typer(no_args_is_help=True, help="Regenerate an experiment's results files.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(cache_app, name="cache")
app.add_typer(weights_app, name="weights")
app.add_typer(results_app, name="results")

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.field=value (repeatable).")]


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _require_writable(folder: Path, option: str) -> None:
    """The pre-flight writability check (the one ``run`` and ``sweep`` use) for an output option:
    raises :class:`~wsss_tune.validate.PreflightError` before any work when ``folder`` cannot be written."""
    from wsss_tune.validate import PreflightError, check_writable

    check = check_writable(str(folder), name=option)
    if check.status == "problem":
        raise PreflightError([dataclasses.replace(check, fix=f"{option} must be a path in a folder this user can write")])


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

    _reads_yaml(name, "config file", "wsss_tune/configs/synth.yaml")
    typer.echo(dump_yaml(_load(name, set_)), nl=False)


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
    _require_writable(out.expanduser().absolute().parent, "OUT")
    path = generate_synthetic_voc(out, seed=seed, preset=preset, overwrite=overwrite, **kwargs)
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
    found = check_dataset(layout, split_list, saliency=not no_saliency, warnings=True)
    if found:
        typer.echo(format_problems(found))
    errors = [p for p in found if p.severity != "warning"]
    if errors:
        typer.secho(f"{len(errors)} problem(s) in {root}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_FINDING)
    warned = f", {len(found)} warning(s)" if found else ""
    typer.secho(f"ok: {root} ({', '.join(split_list)}){warned}", fg=typer.colors.GREEN)


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
    from wsss_tune.data.prepare import prepare_voc

    report = prepare_voc(voc=voc, sbd=sbd, out=out, progress=progress, saliency_from_gt=saliency_from_gt)
    typer.echo(report.summary())
    if not report.ok:
        typer.secho("counts differ from the official VOC 2012 + SBD sets", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_FINDING)


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


#: Folder of the empty artifact store ``run --fresh`` uses, inside the run folder.
FRESH_STORE_DIR = "fresh_artifacts"


def _stage_lines(stages: dict[str, dict[str, Any]]) -> list[str]:
    """One line per artifact of a run: served from the cache, or trained / computed, and its folder."""
    from wsss_tune.stages import graph

    baseline = {v: k for k, v in graph.CAM_BASELINE.items()}
    width = max((len(label) for label in stages), default=0)
    lines = []
    for label, info in stages.items():
        trains = graph.spec(baseline.get(label, label)).trains
        built = info.get("build_seconds")
        took = f"{built:.1f} s" if isinstance(built, int | float) else "time unknown"
        if info.get("hit"):
            what = f"served from the cache (stored result, built earlier in {took})"
        else:
            what = f"{'trained' if trains else 'computed'} in {took}"
        lines.append(f"  {label:<{width}}  {what}: {info.get('path')}")
    return lines


@app.command("run")
def run(
    config: Annotated[str, typer.Argument(help="Built-in config name (synth, voc) or a YAML path.")],
    stages: Annotated[str, typer.Option(help="Comma-separated: eps, affinity (incl. the random walk), deeplab, or all.")] = "all",
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    synth_if_missing: Annotated[bool, typer.Option(help="Generate the synthetic dataset if data.root is missing.")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help=f"Use a new, empty artifact store (OUT/{FRESH_STORE_DIR}) instead of run.artifact_store, so "
                        "every stage is trained and computed from scratch (an exported config otherwise reads the "
                        "experiment's store and only reports the stored numbers).")] = False,
) -> None:
    """Run pipeline stages once, without Ray; writes the resolved config and metrics.json, and says for
    every stage whether it was served from the artifact cache or trained."""
    from wsss_tune.config import apply_overrides
    from wsss_tune.stages.pipeline import PipelineRun, parse_stages
    from wsss_tune.validate import require_preflight

    _reads_yaml(config, "config file", "wsss_tune/configs/synth.yaml")
    cfg = _load(config, set_, data)
    stage_list = parse_stages(stages)
    out_dir = (out or Path("runs") / cfg.name).resolve()
    if fresh:
        if any(o.split("=", 1)[0].strip() == "run.artifact_store" for o in set_ or ()):
            _fail("--fresh and --set run.artifact_store both choose the artifact store; give one of them")
        store_dir = out_dir / FRESH_STORE_DIR
        if store_dir.is_dir() and any(store_dir.iterdir()):
            _fail(f"--fresh: {store_dir} already holds the artifacts of an earlier fresh run; delete that folder "
                  "to retrain again, or give another run folder with --out")
        cfg = apply_overrides(cfg, {"run.artifact_store": str(store_dir)})
    if synth_if_missing and not Path(cfg.data.root).exists():
        from wsss_tune.data import generate_synthetic_voc

        generate_synthetic_voc(cfg.data.root, seed=cfg.run.seed)
    require_preflight(cfg, stages=stage_list, experiments=out_dir)
    pipeline = PipelineRun(cfg, out_dir=out_dir)
    metrics = pipeline.run(stage_list)
    infos = metrics.get("stages") or {}
    hits = sum(bool(i.get("hit")) for i in infos.values())
    typer.echo(f"artifact store: {pipeline.store.uri}{' (new and empty: --fresh)' if fresh else ''}")
    for line in _stage_lines(infos):
        typer.echo(line)
    if infos and hits == len(infos):
        typer.echo("every stage was served from the cache: these are the stored numbers, nothing was trained or "
                   "recomputed; add --fresh to retrain from scratch in an empty store")
    elif hits:
        typer.echo(f"{hits} of {len(infos)} stage artifacts were served from the cache, the others were built")
    # each stage's mIoU on its whole split and on the tune / held-out halves a sweep optimises / reports
    headline = {k: v for k, v in metrics.items()
                if k.endswith(("_miou", "_miou_tune", "_miou_heldout", "_method"))}
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

    info = describe_weights(file, backbone=backbone)
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

    _reads_yaml(config, "config file", "wsss_tune/configs/synth.yaml")
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
    if images < 0:
        _fail(f"--images {images}: expected >= 0")
    _reads(*_experiment_inputs(exp))
    if out is not None:
        _require_writable(out, "--out")
    make_report(exp, out=out, images=images, wandb=wandb)


@app.command("plan")
def plan(
    space: Annotated[str, typer.Argument(help="Built-in search space name or a YAML path.")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    gpus: Annotated[int, typer.Option(help="Devices the sweep will run on (one trial per device).")] = 1,
    trials: Annotated[int | None, typer.Option(help="Trials (default: the space's num_samples).")] = None,
    cache: Annotated[bool, typer.Option(help="Trials share stage artifacts through the cache.")] = True,
    asha: Annotated[bool, typer.Option(help="Early stopping on the space's fidelity.")] = True,
    steps: Annotated[int, typer.Option(help="Timed steps per stage.")] = 3,
    sizes: Annotated[str | None, typer.Option(
        help="Image counts instead of the dataset's: 'voc' (the official VOC lists) or TRAIN,MASKS,VAL.")] = None,
    tflops: Annotated[float | None, typer.Option(
        help="Unit times from counted FLOPs at this assumed sustained TFLOP/s, instead of timing here.")] = None,
) -> None:
    """Estimate a sweep's cost before launching it: times each stage here (or counts its FLOPs), then
    scales it up."""
    from wsss_tune.analysis.plan import parse_sizes
    from wsss_tune.analysis.plan import plan as make_plan

    _reads_yaml(space, "search space file", "search_spaces/synth_rw.yaml")
    if sizes is not None:
        try:
            parse_sizes(sizes)
        except ValueError as exc:
            _fail(f"--sizes: {exc}")
    if tflops is not None and not tflops > 0:
        _fail(f"--tflops {tflops}: expected a throughput > 0")
    _, text = make_plan(space, data=data, gpus=gpus, trials=trials, cache=cache, asha=asha, steps=steps,
                        sizes=sizes, tflops=tflops)
    typer.echo(text)


@app.command("compare")
def compare(
    exp_a: Annotated[Path, typer.Argument(help="First experiment folder.")],
    exp_b: Annotated[Path, typer.Argument(help="Second experiment folder.")],
    out: Annotated[Path | None, typer.Option(help="Also write the comparison (Markdown) to this file.")] = None,
) -> None:
    """Line up two experiments: best configs (fields that differ) and stage tables."""
    from wsss_tune.analysis.compare import compare as make_comparison

    _reads(*_experiment_inputs(exp_a, study=False), *_experiment_inputs(exp_b, study=False))
    if out is not None:
        _require_writable(out.expanduser().absolute().parent, "--out")
    make_comparison(exp_a, exp_b, out=out)


# --------------------------------------------------------------------------------------------------
# sweep, resume, export, demo
# --------------------------------------------------------------------------------------------------

WandbOpt = Annotated[str, typer.Option(help="W&B logging: offline (default; `wandb sync` later) | online | off.")]
ProgressOpt = Annotated[str, typer.Option(help="rich (live table) | ray (Tune's own output) | off.")]
AllowFailuresOpt = Annotated[bool, typer.Option(
    "--allow-failures", help="Exit 0 even if some trials failed (default: exit 1 when any trial failed).")]


def _check_failures(result: Any, allow_failures: bool) -> None:
    """Exit 1 when trials of the sweep failed, unless they are allowed (the summary above lists them)."""
    counts = getattr(result, "counts", None) or {}
    failed = int(counts.get("failed", 0) or 0)
    if failed and not allow_failures:
        _fail(f"{failed} of {counts.get('total', '?')} trial(s) of {result.path} failed (their errors are listed "
              f"above and in {Path(result.path) / 'trials.parquet'}); fix the cause and resume with "
              f"`wsss-tune resume {result.path} --restart-errored`, or pass --allow-failures to accept them",
              code=EXIT_FINDING)


@app.command("sweep")
def sweep(
    space: Annotated[str, typer.Argument(help="Search space: built-in name (synth_rw, eps, ...) or a YAML path.")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (overrides data.root).")] = None,
    trials: Annotated[int | None, typer.Option(help="Trials (default: the space's num_samples).")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(
        help="GPUs per trial; fractions share a GPU, each trial capped at its share of the memory; 0 trains on "
             "the CPU (default: 1 where the Ray cluster has GPUs, else 0; the sweep prints what it chose).")] = None,
    cpus_per_trial: Annotated[float, typer.Option(
        help="CPUs per trial: its torch threads; data loader workers at most CPUs - 1 (GPU trials: 4 or more).")] = 1,
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
    allow_failures: AllowFailuresOpt = False,
    mode: Annotated[str, typer.Option(help="joint (one search over every parameter) | cascade (one search per "
                                           "stage in order, each stage's best frozen downstream).")] = "joint",
    stage_budget: Annotated[list[str] | None, typer.Option(
        help="Cascade budget of one stage: STAGE=N trials or STAGE=Nsteps of its training (repeatable; "
             "e.g. eps=6, deeplab=1200steps). Stages not named get --trials.")] = None,
    reseed_top: Annotated[int, typer.Option(help="Configs of the search re-run with more seeds afterwards.")] = 3,
    reseed_seeds: Annotated[int, typer.Option(
        help="More seeds (run.seed) for each re-run config and the reference; the winner is the best mean. "
             "0: no re-runs.")] = 2,
    compare_config: Annotated[list[str] | None, typer.Option(
        help="A config (built-in name or YAML) also run in the seed re-runs, for comparison (repeatable).")] = None,
    prebuild: Annotated[bool, typer.Option(
        help="Build the artifacts every trial shares first, with one trial's resources, so that waiting "
             "trials hold no CPUs or GPUs.")] = True,
) -> None:
    """Search a space with Ray Tune + Optuna TPE (+ ASHA); the reference setting runs first, and the
    best configs re-run with more seeds before a winner is named."""
    from wsss_tune.analysis.results import ReseedRecord
    from wsss_tune.config import parse_override
    from wsss_tune.trainables.phases import SEARCH_MODES, parse_stage_budget
    from wsss_tune.trainables.sweep import sweep as run

    _reads_yaml(space, "search space file", "search_spaces/synth_rw.yaml")
    if mode not in SEARCH_MODES:
        _fail(f"--mode {mode!r}: expected one of {', '.join(SEARCH_MODES)}")
    if reseed_top < 0 or reseed_seeds < 0:
        _fail(f"--reseed-top {reseed_top} / --reseed-seeds {reseed_seeds}: expected >= 0")
    budgets = {}
    for text in stage_budget or []:
        try:
            stage, budget = parse_stage_budget(text)
        except ValueError as exc:
            _fail(f"--stage-budget: {exc}")
        budgets[stage] = budget
    for name_ in compare_config or []:
        _reads_yaml(name_, "config file", "wsss_tune/configs/synth.yaml")
    overrides = dict(parse_override(o) for o in set_ or [])
    reseed = ReseedRecord(top_k=reseed_top, seeds=reseed_seeds)
    result = run(space, data=data, trials=trials, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                 address=address, storage=storage, name=name, wandb=wandb, seed=seed, max_failures=max_failures,
                 max_concurrent=max_concurrent, overrides=overrides, store=store, cache=cache, progress=progress,
                 mode=mode, stage_budgets=budgets, reseed=reseed, compare=tuple(compare_config or ()),
                 prebuild=prebuild)
    _check_failures(result, allow_failures)


@app.command("resume")
def resume(
    exp: Annotated[Path, typer.Argument(help="Experiment folder of an interrupted sweep.")],
    resume_errored: Annotated[bool, typer.Option(help="Also resume failed trials from their last checkpoint.")] = False,
    restart_errored: Annotated[bool, typer.Option(help="Restart failed trials from scratch.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (auto or host:port).")] = None,
    progress: ProgressOpt = "rich",
    allow_failures: AllowFailuresOpt = False,
) -> None:
    """Continue an interrupted sweep (searcher state kept), then rewrite its results."""
    from wsss_tune.trainables.sweep import resume as run

    _reads(*_experiment_inputs(exp, runs=False))
    result = run(exp, resume_errored=resume_errored, restart_errored=restart_errored, address=address,
                 progress=progress)
    _check_failures(result, allow_failures)


@app.command("export")
def export(
    exp: Annotated[Path, typer.Argument(help="Experiment folder.")],
    out: Annotated[Path | None, typer.Option(help="Output YAML (default: EXP/best_config.yaml).")] = None,
    allow_incomplete: Annotated[bool, typer.Option(help="Export even if some trials failed or never ran.")] = False,
) -> None:
    """Write the best trial's full config as a YAML that `wsss-tune run` accepts."""
    from wsss_tune.config import load_config
    from wsss_tune.trainables.sweep import export as run

    _reads(*_experiment_inputs(exp, study=False, runs=False))
    if out is not None:
        _require_writable(out.expanduser().absolute().parent, "--out")
    path = run(exp, out=out, allow_incomplete=allow_incomplete)
    store = load_config(path).run.artifact_store
    if store:
        typer.echo(f"it reads the experiment's artifact store {store}: `wsss-tune run {path}` serves every stage "
                   "stored there (the trial's own numbers, nothing is retrained); add --fresh to retrain from "
                   "scratch in an empty store")


@results_app.command("rebuild")
def results_rebuild(
    exp: Annotated[Path, typer.Argument(help="Experiment folder.")],
) -> None:
    """Regenerate trials.parquet, reports.parquet and experiment.json from the Optuna study, the trial
    folders and Ray's state (read as JSON; nothing is unpickled); no trial any of them knows is dropped."""
    from wsss_tune.trainables.sweep import print_summary, rebuild_results

    _reads(*_experiment_inputs(exp, runs=False)[3:4])  # sweep.json: the one file that must be intact
    result = rebuild_results(exp)
    print_summary(result)


@app.command("demo")
def demo(
    data: Annotated[Path, typer.Option(help="Synthetic dataset folder (generated if missing).")] = Path("data/synth"),
    storage: Annotated[Path | None, typer.Option(help="Folder of experiments (default: ./experiments).")] = None,
    trials: Annotated[int | None, typer.Option(
        help="Trials of each stage's search (default: sized per stage by what its trials cost; the summary lists them).")] = None,
    wandb: WandbOpt = "offline",
    progress: ProgressOpt = "rich",
    allow_failures: AllowFailuresOpt = False,
) -> None:
    """The reproduction-gap search on the synthetic dataset: a cascade from the paper's setting, seed
    re-runs, and how much of the gap to the hand-tuned config it closed (CPU, about 15 minutes on 2 cores)."""
    from wsss_tune.trainables.sweep import demo as run

    result = run(data=data, storage=storage, trials=trials, wandb=wandb, progress=progress)
    _check_failures(result, allow_failures)


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
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"--older-than {text!r}: expected a finite age >= 0")
    return value


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _existing_store(uri: str) -> Any:
    """The artifact store at ``uri``, which must exist (listing a mistyped path is not "0 artifacts")."""
    from wsss_tune.artifacts import ArtifactStore

    store = ArtifactStore(uri=uri)
    store.require_exists()
    return store


@cache_app.command("ls")
def cache_ls(
    store: StoreArg,
    stage: Annotated[str | None, typer.Option(help="Only this stage (eps, affinity, rw, deeplab, ...).")] = None,
) -> None:
    """List published artifacts: stage/digest, age, size, files and build time."""
    infos = _existing_store(store).list(stage)
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
    age = _age_seconds(older_than) if older_than is not None else None
    report = _existing_store(store).gc(older_than=age, dry_run=dry_run)
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
    gpus_per_trial: Annotated[float | None, typer.Option(
        help="GPU share of each trial (default: as a sweep here would take it: 1 with GPUs, else 0).")] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs of each trial.")] = 1,
    gpu_memory: Annotated[float | None, typer.Option(
        help="GB of the trials' cards, to check memory where they are not visible (default: the smallest "
             "card here).")] = None,
) -> None:
    """Check every file, weight and storage location a run needs, the device each trial gets and whether
    each training step fits in its GPU memory; exit 1 listing every problem."""
    from wsss_tune.doctor import exit_code, format_checks
    from wsss_tune.stages.pipeline import parse_stages
    from wsss_tune.validate import preflight as run_preflight

    _reads_yaml(config, "config file", "wsss_tune/configs/synth.yaml")
    if gpus_per_trial is not None and not gpus_per_trial >= 0:
        _fail(f"--gpus-per-trial {gpus_per_trial}: expected a GPU share >= 0")
    if not cpus_per_trial > 0:
        _fail(f"--cpus-per-trial {cpus_per_trial}: expected > 0")
    if gpu_memory is not None and not gpu_memory > 0:
        _fail(f"--gpu-memory {gpu_memory}: expected the cards' memory in GB, > 0")
    cfg = _load(config, set_, data)
    checks = run_preflight(cfg, stages=parse_stages(stages), store=store, experiments=out,
                           gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                           gpu_memory=gpu_memory * 1e9 if gpu_memory is not None else None)
    typer.echo(format_checks(checks))
    raise typer.Exit(exit_code(checks))


@app.command("ray-clean")
def ray_clean(
    exp: Annotated[Path, typer.Argument(help="Experiment folder whose driver was killed.")],
    dry_run: Annotated[bool, typer.Option(help="Only list the processes.")] = False,
    grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = 5.0,
) -> None:
    """End the Ray processes a killed sweep driver left behind (only that sweep's recorded session):
    SIGTERM, then SIGKILL after --grace seconds; lists each process it ended."""
    from wsss_tune.trainables.cluster import clean_ray_session

    if not grace >= 0:
        _fail(f"--grace {grace}: expected seconds >= 0")
    report = clean_ray_session(exp, dry_run=dry_run, grace=grace)
    if report.skipped:
        typer.echo(f"nothing to end: {report.skipped}")
        return
    shown = report.processes if dry_run else report.ended
    verb = "would end" if dry_run else "ended"
    typer.echo(f"{verb} {len(shown)} process(es) of Ray session {report.session_name}" + (":" if shown else ""))
    for p in report.processes:
        typer.echo(f"  {p.line()}")
    if report.left:
        _fail(f"{len(report.left)} process(es) of Ray session {report.session_name} still run: "
              f"{', '.join(p.line() for p in report.left)}; end them as their owner (or root)", code=EXIT_FINDING)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (expected failures become one ``error:`` line in :class:`_Commands`)."""
    app(args=argv, standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    main()
