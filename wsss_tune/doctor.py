"""Is this machine ready for a run? ``wsss-tune doctor`` and ``wsss-tune weights inspect``.

:func:`run_doctor` returns one :class:`Check` per question - GPUs torch sees, GPUs Ray would see,
the device, precision and CPU threads each sweep trial gets by default, free disk against the planned artifacts, the dataset, the weight files, W&B, the Ray cluster - each
``ok``, ``warn`` (works, but worth knowing) or ``problem`` (a run would fail or mislead), with how to
fix it. Nothing here starts Ray, downloads, or writes outside a temporary folder; weight files are
tried on the ``meta`` device (shapes only, no memory for the model).

:func:`describe_weights` says what a weights file holds and which backbone it fits, by key name.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsss_tune.config import ConfigError, PipelineConfig, apply_overrides, load_config

__all__ = [
    "Status",
    "Check",
    "ArtifactEstimate",
    "run_doctor",
    "format_checks",
    "exit_code",
    "check_config",
    "check_torch_gpus",
    "check_ray_gpus",
    "check_trial_device",
    "check_data",
    "check_disk",
    "check_weights",
    "check_wandb",
    "check_ray_cluster",
    "estimate_artifacts",
    "weights_fit",
    "describe_weights",
    "format_weights_description",
]

Status = Literal["ok", "warn", "problem"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "problem")

#: Ids per split read by the data check unless ``full`` (enough to catch a systematic problem:
#: wrong folder, wrong mode, missing saliency maps; our choice).
DATA_SAMPLE_IDS = 100
#: Images whose header is read to estimate the mean image size and labels per image (our choice).
SIZE_SAMPLE_IDS = 32
#: Seed of the sampled ids, so two doctor runs read the same files.
SAMPLE_SEED = 0
#: Bytes per stored value: CAMs and affinities are float16, checkpoints float32.
FLOAT16_BYTES = 2
FLOAT32_BYTES = 4
#: Pseudo-mask PNG bytes per pixel: VOC-sized masks compress to a few KB (~0.02 B/px); generous.
MASK_PNG_BYTES_PER_PIXEL = 0.05
#: Masks stored per image and configuration: EPS pseudo masks and random-walk refined masks.
MASKS_PER_IMAGE = 2
#: Each checkpoint holds the model and an optimiser buffer of the same size (SGD momentum).
CHECKPOINT_STATE_COPIES = 2
#: Final model copies per stage: ``model.pt`` in the work folder and in the artifact.
FINAL_MODEL_COPIES = 2
#: Distinct upstream configurations a sweep builds at once: one per GPU on the reference 4-GPU box.
CONCURRENT_CONFIGS = 4
#: Fallback sizes when the dataset cannot be read (VOC 2012 + SBD): train_aug ids (train is a subset),
#: a typical 500x375 VOC image, and ~1.5 labelled classes per image plus the background CAM.
VOC_TRAIN_IMAGES = 10582
VOC_MEAN_PIXELS = 500 * 375
VOC_MEAN_CAM_CHANNELS = 2.5
#: Output stride of the reference backbones (DESIGN.md §2), if a backbone does not say its own.
REFERENCE_OUTPUT_STRIDE = 8
#: Seconds to wait for a TCP connection to the Ray head (our choice: short, it is a probe).
RAY_PROBE_TIMEOUT_S = 3.0
#: Ports Ray listens on by default: GCS for ``host:port`` addresses, the client server for ``ray://``.
RAY_DEFAULT_GCS_PORT = 6379
RAY_DEFAULT_CLIENT_PORT = 10001
#: File in which a local ``ray start --head`` records its address (what ``address="auto"`` reads).
RAY_CURRENT_CLUSTER_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
#: The weight files the reference setting starts from, by backbone (users download them; we never do).
REFERENCE_WEIGHTS = {
    "resnet38": "ilsvrc-cls_rna-a1_cls1000_ep-0001.params (MXNet ResNet-38 A1, ImageNet)",
    "resnet101": "deeplabv1_resnet101-coco.pth (deeplab-pytorch, COCO init) or a torchvision resnet101 .pth",
    "resnet50": "a torchvision resnet50 .pth (ImageNet)",
}
#: Backbones trained from scratch by design (no pretrained file expected).
SCRATCH_BACKBONES = ("tiny",)
#: Names listed per kind by :func:`format_weights_description` unless told otherwise.
DEFAULT_LISTED_KEYS = 20
#: Sweep experiment folder (``run_sweep``'s default storage; its artifact store is ``<storage>/artifacts``).
DEFAULT_EXPERIMENTS = "experiments"
#: Command that prepares real data, for fix lines.
PREPARE_HINT = ("wsss-tune data prepare-voc --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out {root} "
                "(or `wsss-tune data synth {root}` for synthetic data)")


@dataclass(frozen=True)
class Check:
    """One diagnostic: what was checked, the finding, and how to fix it when it is not ``ok``."""

    name: str
    status: Status
    message: str
    fix: str = ""

    def line(self) -> str:
        """One line: status, name, finding, and the fix."""
        text = f"{self.status:<8}{self.name:<20}{self.message}"
        return text + (f" | fix: {self.fix}" if self.fix and self.status != "ok" else "")


def format_checks(checks: Sequence[Check]) -> str:
    """The checks one per line, then a count of warnings and problems."""
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    tail = f"{counts['problem']} problem(s), {counts['warn']} warning(s), {counts['ok']} ok"
    return "\n".join([*(c.line() for c in checks), tail])


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any check is a problem, else 0."""
    return int(any(c.status == "problem" for c in checks))


def _gb(n: float) -> str:
    """Bytes as GB, or MB / kB when smaller."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


@contextmanager
def _meta_device() -> Iterator[None]:
    """Build models with shapes only; loading a file into them copies nothing (and warns; hushed)."""
    import torch

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# --------------------------------------------------------------------------------------------------
# Config, GPUs
# --------------------------------------------------------------------------------------------------


def check_config(config: str, overrides: Sequence[str] = (), data: Path | None = None
                 ) -> tuple[Check, PipelineConfig | None]:
    """Load the config (built-in name or YAML) with overrides and ``data`` as ``data.root``."""
    try:
        cfg = load_config(config, list(overrides))
        if data is not None:
            cfg = apply_overrides(cfg, {"data.root": str(Path(data).resolve())})
    except ConfigError as exc:
        return Check("config", "problem", str(exc), "`wsss-tune config list` shows the built-in configs; "
                     "`wsss-tune config show NAME` a resolved one"), None
    return Check("config", "ok", f"{cfg.name} (data.root {cfg.data.root})"), cfg


def check_torch_gpus(*, device: str = "auto") -> Check:
    """GPUs visible to torch, with the CUDA and cuDNN versions; none is a problem only for ``run.device=cuda``."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        status: Status = "problem" if device == "cuda" else "warn"
        return Check("gpus.torch", status, f"torch {torch.__version__} sees no CUDA GPU (CUDA build: "
                     f"{torch.version.cuda or 'none'}); runs use the CPU",
                     "install a CUDA build of torch and check `nvidia-smi`; the CPU is enough only for the "
                     "synth config")
    names: dict[str, int] = {}
    for i in range(count):
        name = torch.cuda.get_device_name(i)
        names[name] = names.get(name, 0) + 1
    listed = ", ".join(f"{n}x {name}" for name, n in names.items())
    return Check("gpus.torch", "ok", f"{count} GPU(s): {listed}; CUDA {torch.version.cuda}, cuDNN "
                 f"{torch.backends.cudnn.version()}")


def check_ray_gpus(*, torch_count: int | None = None) -> Check:
    """GPUs Ray would give trials on this node, without starting Ray: ``CUDA_VISIBLE_DEVICES`` when
    set (Ray honours it), else every GPU (compared with what torch sees)."""
    if torch_count is None:
        import torch

        torch_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return Check("gpus.ray", "ok" if torch_count else "warn",
                     f"CUDA_VISIBLE_DEVICES unset: Ray would see all {torch_count} GPU(s) torch sees"
                     + ("" if torch_count else "; trials asking for GPUs would never start"),
                     "sweeps here default to --gpus-per-trial 0 (trials train on the CPU); ask for GPUs only "
                     "when joining a cluster that has them")
    listed = [d.strip() for d in visible.split(",") if d.strip()]
    if listed == ["-1"]:
        listed = []
    if len(listed) != torch_count:
        return Check("gpus.ray", "problem", f"CUDA_VISIBLE_DEVICES={visible!r} lists {len(listed)} GPU(s) but "
                     f"torch sees {torch_count}: Ray would schedule trials on GPUs that do not work",
                     "unset CUDA_VISIBLE_DEVICES or list only existing GPU ids (see `nvidia-smi -L`)")
    return Check("gpus.ray", "ok" if listed else "warn",
                 f"CUDA_VISIBLE_DEVICES={visible!r}: Ray would see {len(listed)} GPU(s)",
                 "unset CUDA_VISIBLE_DEVICES to use every GPU")


def _amp_stages(cfg: PipelineConfig | None) -> list[str]:
    if cfg is None:
        return ["eps", "affinity", "deeplab"]
    return [name for name in ("eps", "affinity", "deeplab") if getattr(cfg, name).amp]


def check_trial_device(cfg: PipelineConfig | None, *, gpus_per_trial: float | None = None, cpus_per_trial: float = 1,
                       inventory: Sequence[Any] | None = None) -> Check:
    """The device, precision and CPU budget each sweep trial gets here: ``gpus_per_trial`` (None: the
    sweep's default for the GPUs seen here), the cards' precision with ``amp``, torch threads and loader
    workers from ``cpus_per_trial`` (:func:`~wsss_tune.utils.runtime.trial_placement`).

    Args:
        cfg: the run's config (``run.device``, ``data.num_workers``, each stage's ``amp``); None: defaults.
        inventory: the GPUs (default :func:`~wsss_tune.utils.runtime.gpu_inventory`).
    """
    from wsss_tune.utils.runtime import default_gpus_per_trial, gpu_inventory, trial_placement

    cards = list(gpu_inventory() if inventory is None else inventory)
    device = cfg.run.device if cfg is not None else "auto"
    workers = cfg.data.num_workers if cfg is not None else 0
    gpus = default_gpus_per_trial(len(cards), device) if gpus_per_trial is None else float(gpus_per_trial)
    chosen = f"{'default ' if gpus_per_trial is None else ''}--gpus-per-trial {gpus:g}"
    name = "trial.device"
    try:
        p = trial_placement(gpus=gpus, gpu_ids=("0",) if gpus else (), cpus=cpus_per_trial, device=device,
                            num_workers=workers)
    except ValueError as exc:
        return Check(name, "problem", f"{chosen}: {exc}", "pass --gpus-per-trial 1 (or a fraction) on a machine "
                     "with GPUs, or set run.device=auto")
    cpu = (f"{cpus_per_trial:g} CPU: {p.threads} torch thread(s), {p.workers} loader worker(s) "
           f"(data.num_workers {workers}, at most CPUs - 1)")
    if p.device == "cpu":
        why = "run.device is cpu" if device == "cpu" and gpus else f"{len(cards)} GPU(s) here"
        return Check(name, "ok", f"each trial ({chosen}, {why}): cpu, float32; {cpu}")
    share = f"{gpus:g} of a GPU, memory capped at {p.memory_fraction:.0%}" if p.memory_fraction is not None \
        else f"{gpus:g} GPU"
    if not cards:
        return Check(name, "warn", f"each trial ({chosen}): cuda, {share}, but no GPU is visible here: trials run "
                     f"only on Ray nodes that have GPUs; {cpu}", "check `nvidia-smi` here, or join a cluster with "
                     "GPUs (--address)")
    at_once = math.floor(len(cards) / gpus + 1e-9)
    if p.memory_fraction is not None:
        share += f" ({_gb(min(c.total_bytes for c in cards) * gpus)})"
    amp = _amp_stages(cfg)
    kinds: dict[str, list[str]] = {}
    for c in cards:
        kinds.setdefault(c.precision() if amp else "fp32 (amp off)", []).append(c.name)
    precision = "; ".join(f"{', '.join(sorted(set(names)))}: {kind}" for kind, names in kinds.items())
    return Check(name, "ok", f"each trial ({chosen}): cuda, {share}, {at_once} trial(s) at once on {len(cards)} "
                 f"GPU(s); precision with amp ({', '.join(amp) or 'none'}): {precision}; {cpu}")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _sample(ids: Sequence[str], n: int) -> list[str]:
    if len(ids) <= n:
        return list(ids)
    picked = np.random.default_rng(SAMPLE_SEED).choice(len(ids), size=n, replace=False)
    return [ids[i] for i in sorted(picked)]


def _eval_splits(cfg: PipelineConfig) -> list[str]:
    # tune/held-out halves named "<split>_tune"/"_heldout" are derived, not files: only real lists count.
    extra = [s for s in (cfg.data.tune_split, cfg.data.heldout_split)
             if s and not s.endswith(("_tune", "_heldout"))]
    return list(dict.fromkeys([cfg.data.mask_eval_split, cfg.data.val_split, *extra]))


def check_data(cfg: PipelineConfig, *, full: bool = False) -> list[Check]:
    """The dataset of ``cfg``: root and id lists present, then images, saliency maps (training split),
    GT masks (evaluation splits) and labels read with :func:`~wsss_tune.data.check_dataset` - on
    :data:`DATA_SAMPLE_IDS` ids per split unless ``full``."""
    from wsss_tune.data import DataError, VOCLayout, check_dataset

    root = Path(cfg.data.root)
    prepare = PREPARE_HINT.format(root=root)
    if not root.is_dir():
        return [Check("data", "problem", f"data.root {root} does not exist", prepare)]
    try:
        layout = VOCLayout.from_config(cfg.data)
    except DataError as exc:
        return [Check("data", "problem", str(exc), "set data.label_source to cls_labels, annotations or masks")]
    train = cfg.data.train_split
    ids: dict[str, list[str]] = {}
    for split in dict.fromkeys([train, *_eval_splits(cfg)]):
        try:
            ids[split] = layout.split_ids(split)
        except DataError as exc:
            return [Check("data", "problem", str(exc), prepare)]
    counts = ", ".join(f"{s} {len(v):,}" for s, v in ids.items())
    checks = [Check("data", "ok", f"{root}: {counts} ids")]

    with tempfile.TemporaryDirectory(prefix="wsss-doctor-") as tmp:
        def listed(split: str) -> str:
            if full or len(ids[split]) <= DATA_SAMPLE_IDS:
                return split
            path = Path(tmp) / f"{split}.sample.txt"  # an absolute .txt name is read as a list file
            path.write_text("".join(f"{i}\n" for i in _sample(ids[split], DATA_SAMPLE_IDS)))
            return str(path)

        evals = [s for s in ids if s != train]
        problems = check_dataset(layout, [listed(train)], saliency=True, masks_for=[])
        problems += check_dataset(layout, [listed(s) for s in evals], saliency=False,
                                  masks_for=[listed(s) for s in evals])
    scope = "every id" if full else f"up to {DATA_SAMPLE_IDS} sampled ids per split (--full: every id)"
    if not problems:
        checks.append(Check("data.files", "ok", f"images, saliency maps ({cfg.data.saliency_dir}), GT masks and "
                            f"labels of {scope} read fine"))
        return checks
    kinds = sorted({p.kind for p in problems})
    fix = f"`wsss-tune data check {root}` lists every problem"
    if any(p.kind == "missing_file" and str(layout.saliency_dir) in p.file for p in problems):
        fix += (f"; put the saliency maps in {layout.saliency_dir} or set data.saliency_dir "
                "(`prepare-voc --saliency-from-gt` makes GT maps for an upper-bound study only)")
    checks.append(Check("data.files", "problem", f"{len(problems)} problem(s) in {scope} ({', '.join(kinds)}); "
                        f"first: {problems[0].message}", fix))
    return checks


# --------------------------------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactEstimate:
    """Bytes one pipeline configuration stores, by kind (see :func:`estimate_artifacts`)."""

    cams: int
    affinities: int
    masks: int
    checkpoints: int

    @property
    def total(self) -> int:
        return self.cams + self.affinities + self.masks + self.checkpoints

    def text(self) -> str:
        return (f"{_gb(self.total)} (CAMs {_gb(self.cams)}, affinities {_gb(self.affinities)}, masks "
                f"{_gb(self.masks)}, checkpoints {_gb(self.checkpoints)})")


def estimate_artifacts(
    *,
    num_images: int,
    mean_pixels: float,
    mean_cam_channels: float,
    affinity_offsets: int,
    output_stride: int,
    model_params: Sequence[int],
    keep_checkpoints: int,
) -> ArtifactEstimate:
    """Disk one pipeline configuration (EPS -> AffinityNet + walk -> DeepLab) fills.

    * CAMs: float16 at image size, the labelled classes plus background, per image;
    * affinities: float16, one plane per neighbour offset at the output stride, per image;
    * masks: EPS and refined pseudo-mask PNGs (:data:`MASK_PNG_BYTES_PER_PIXEL`);
    * checkpoints: per stage, ``keep_checkpoints`` checkpoints of model + optimiser buffer (float32)
      and two copies of the final model.

    Args:
        num_images: images the CAMs / affinities are computed for.
        mean_pixels: mean H x W of those images.
        mean_cam_channels: mean stored CAM channels per image (labelled classes + 1).
        affinity_offsets: neighbour offsets of the affinity radius (34 for radius 5).
        output_stride: feature stride of the affinity maps.
        model_params: parameter count of each stage's model.
        keep_checkpoints: ``run.keep_checkpoints``.
    """
    cams = num_images * mean_cam_channels * mean_pixels * FLOAT16_BYTES
    affinities = num_images * affinity_offsets * math.ceil(mean_pixels / output_stride**2) * FLOAT16_BYTES
    masks = num_images * MASKS_PER_IMAGE * mean_pixels * MASK_PNG_BYTES_PER_PIXEL
    copies = CHECKPOINT_STATE_COPIES * keep_checkpoints + FINAL_MODEL_COPIES
    checkpoints = sum(model_params) * FLOAT32_BYTES * copies
    return ArtifactEstimate(cams=int(cams), affinities=int(affinities), masks=int(masks), checkpoints=int(checkpoints))


def _model_params(cfg: PipelineConfig, num_classes: int) -> tuple[list[int], int]:
    """Parameter count of each stage's model, and the affinity grid's stride (its backbone's)."""
    from wsss_tune.models.affinity_net import build_affinity_net
    from wsss_tune.models.deeplab import build_deeplab
    from wsss_tune.models.eps_net import build_eps_net

    a = cfg.affinity
    with _meta_device():
        models = [build_eps_net(backbone=cfg.eps.backbone, num_classes=num_classes),
                  build_affinity_net(backbone=a.backbone or cfg.eps.backbone, widths=a.widths,
                                     out_channels=a.out_channels),
                  build_deeplab(arch=cfg.deeplab.arch, backbone=cfg.deeplab.backbone, num_classes=num_classes + 1)]
    stride = int(getattr(models[1].backbone, "output_stride", REFERENCE_OUTPUT_STRIDE))
    return [sum(p.numel() for p in m.parameters()) for m in models], stride


def _dataset_sizes(cfg: PipelineConfig) -> tuple[int, float, float, int] | None:
    """(images, mean pixels, mean CAM channels, classes) from the dataset, or None if unreadable."""
    from PIL import Image

    from wsss_tune.data import DataError, VOCLayout

    try:
        layout = VOCLayout.from_config(cfg.data)
        ids = sorted(set(layout.split_ids(cfg.data.train_split)) | set(layout.split_ids(cfg.data.mask_eval_split)))
        pixels, channels = [], []
        for image_id in _sample(ids, SIZE_SAMPLE_IDS):
            with Image.open(layout.image_path(image_id)) as img:  # reads the header only
                pixels.append(img.size[0] * img.size[1])
            channels.append(1 + float(layout.image_labels(image_id).sum()))
        return len(ids), float(np.mean(pixels)), float(np.mean(channels)), layout.num_classes
    except (DataError, OSError, ValueError):
        return None


def _free_at(path: Path) -> tuple[Path, int]:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def check_disk(cfg: PipelineConfig, *, store: str | None = None, experiments: Path | None = None) -> list[Check]:
    """Free space at the artifact store and the experiment folder against :func:`estimate_artifacts`.

    A problem when the store cannot hold one configuration, a warning below
    :data:`CONCURRENT_CONFIGS` of them; the experiment folder (trial checkpoints) is judged against
    the largest stage's checkpoints for as many trials.
    """
    from wsss_tune.ops.neighbors import neighbor_offsets

    sizes = _dataset_sizes(cfg)
    basis = "from the dataset"
    if sizes is None:
        sizes, basis = (VOC_TRAIN_IMAGES, VOC_MEAN_PIXELS, VOC_MEAN_CAM_CHANNELS, 20), "VOC 2012 + SBD sizes"
    num_images, mean_pixels, mean_channels, num_classes = sizes
    params, stride = _model_params(cfg, num_classes)
    est = estimate_artifacts(num_images=num_images, mean_pixels=mean_pixels, mean_cam_channels=mean_channels,
                             affinity_offsets=len(neighbor_offsets(cfg.affinity.radius)), output_stride=stride,
                             model_params=params, keep_checkpoints=cfg.run.keep_checkpoints)
    experiments = experiments or Path(DEFAULT_EXPERIMENTS)
    store = store or cfg.run.artifact_store or str(experiments / "artifacts")
    checks = []
    if "://" in store:
        checks.append(Check("disk.artifacts", "ok", f"remote store {store}: free space not checked; one "
                            f"configuration stores about {est.text()}"))
    else:
        where, free = _free_at(Path(store))
        checks.append(_space_check("disk.artifacts", where, free, est.total,
                                   f"one pipeline configuration ({num_images:,} images, {basis}) stores about "
                                   f"{est.text()}",
                                   "free space, point run.artifact_store at a larger disk, or drop unused "
                                   "artifacts with `wsss-tune cache gc`"))
    trial = max(params) * FLOAT32_BYTES * CHECKPOINT_STATE_COPIES * cfg.run.keep_checkpoints
    where, free = _free_at(experiments)
    checks.append(_space_check("disk.experiments", where, free, trial,
                               f"a trial keeps up to {_gb(trial)} of checkpoints",
                               "free space or give the sweep a --storage folder on a larger disk"))
    return checks


def _space_check(name: str, where: Path, free: int, need: int, what: str, fix: str) -> Check:
    text = f"{_gb(free)} free at {where}; {what}"
    if free < need:
        return Check(name, "problem", text, fix)
    if free < CONCURRENT_CONFIGS * need:
        return Check(name, "warn", text + f"; fewer than {CONCURRENT_CONFIGS} fit (one per GPU)", fix)
    return Check(name, "ok", text)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _dry_load(role: str, cfg: PipelineConfig, path: str, num_classes: int) -> Any:
    """Build the stage's model on the meta device exactly as the stage does, loading ``path``."""
    from wsss_tune.models.affinity_net import build_affinity_net
    from wsss_tune.models.deeplab import build_deeplab
    from wsss_tune.models.eps_net import build_eps_net

    with _meta_device():
        if role == "eps":
            return build_eps_net(backbone=cfg.eps.backbone, num_classes=num_classes, pretrained=path).pretrained_report
        if role == "affinity":
            a = cfg.affinity
            return build_affinity_net(backbone=a.backbone or cfg.eps.backbone, widths=a.widths,
                                      out_channels=a.out_channels, pretrained=path).init_report
        model = build_deeplab(arch=cfg.deeplab.arch, backbone=cfg.deeplab.backbone, num_classes=num_classes + 1,
                              pretrained=path)
        return model.pretrained_report


def check_weights(cfg: PipelineConfig, *, num_classes: int | None = None) -> list[Check]:
    """Each configured weight file exists and fits its stage's backbone (a dry-run load on the meta device)."""
    from wsss_tune.models.weights import WeightsError

    if num_classes is None:
        sizes = _dataset_sizes(cfg)
        num_classes = sizes[3] if sizes else 20
    a = cfg.affinity
    roles = [("eps", cfg.eps.pretrained, cfg.eps.backbone),
             ("affinity", a.pretrained if a.init == "imagenet" else None, a.backbone or cfg.eps.backbone),
             ("deeplab", cfg.deeplab.pretrained, cfg.deeplab.backbone)]
    checks = []
    for role, path, backbone in roles:
        name = f"weights.{role}"
        expected = REFERENCE_WEIGHTS.get(backbone, "ImageNet weights for the backbone")
        if path is None:
            checks.append(Check(name, "ok", "affinity.init = eps: starts from the trained EPS backbone"))
        elif not path:
            if backbone in SCRATCH_BACKBONES:
                checks.append(Check(name, "ok", f"{backbone}: trained from scratch (no pretrained file)"))
            else:
                checks.append(Check(name, "warn", f"{role}.pretrained is empty: the {backbone} backbone starts from "
                                    "random weights, unlike the reference", f"set {role}.pretrained=PATH to "
                                    f"{expected}"))
        elif not Path(path).is_file():
            checks.append(Check(name, "problem", f"{path}: not found ({role}.pretrained, {backbone} backbone)",
                                f"put {expected} there or set {role}.pretrained=PATH; nothing is downloaded"))
        else:
            try:
                report = _dry_load(role, cfg, path, num_classes)
            except (WeightsError, ValueError, TypeError, RuntimeError) as exc:
                checks.append(Check(name, "problem", f"{path} does not fit the {backbone} backbone: {exc}",
                                    f"`wsss-tune weights inspect {path}` shows what it fits; expected {expected}"))
                continue
            checks.append(Check(name, "ok", f"{path} fits {backbone}: {report.summary() if report else 'loaded'}"))
    return checks


def _convert_for(raw: Mapping[str, Any], fmt: str) -> tuple[dict[str, Any], str]:
    """The file's arrays renamed as the pipeline would, and its layout (see ``deeplab_weights``)."""
    from wsss_tune.models.deeplab_weights import detect_source_format, to_deeplab_names
    from wsss_tune.models.weights import convert_resnet38_mxnet

    if fmt == "mxnet":
        return dict(convert_resnet38_mxnet(raw)), "mxnet_resnet38"
    layout = detect_source_format(raw)
    if layout == "deeplab_caffe":
        return to_deeplab_names(raw), layout
    return dict(raw), layout


def _create_meta_backbone(name: str, layout: str) -> Any:
    from wsss_tune.models.registry import create_backbone

    if layout == "deeplab_caffe":
        return create_backbone(name, layout="caffe")  # TypeError for a backbone without Caffe layout
    return create_backbone(name)


def weights_fit(path: str | Path, *, backbone: str) -> Any:
    """How a weights file fits ``backbone``, key by key, read as the pipeline reads it.

    MXNet files are renamed with the ResNet-38 converter, deeplab-pytorch (Caffe) files with the
    DeepLab converter onto a ``caffe``-layout backbone; the load is a dry run on the meta device and
    does not require a complete fit.

    Returns:
        A :class:`~wsss_tune.models.weights.LoadReport` (loaded, missing, unexpected, mismatched keys).

    Raises:
        WeightsError: unreadable file, or no key fits.
    """
    from wsss_tune.models.weights import load_state, read_weights

    fmt, raw = read_weights(path)
    state, layout = _convert_for(raw, fmt)
    with _meta_device():
        model = _create_meta_backbone(backbone, layout)
        return load_state(model, state, source=str(path), strict_backbone=False, min_match_fraction=0.0)


def _shape_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    by_ndim: dict[int, int] = {}
    for v in state.values():
        by_ndim[len(v.shape)] = by_ndim.get(len(v.shape), 0) + 1
    largest = sorted(state.items(), key=lambda kv: -math.prod(kv[1].shape))[:3]
    return {"by_ndim": dict(sorted(by_ndim.items())),
            "largest": [(k, tuple(int(d) for d in v.shape)) for k, v in largest]}


def describe_weights(path: str | Path, *, backbone: str | None = None) -> dict[str, Any]:
    """What a weights file holds and what it fits: :func:`~wsss_tune.models.weights.inspect_weights`
    plus the DeepLab (Caffe) layout, a shape summary, and the key-by-key fit to the best backbone.

    Args:
        path: ``.pth`` / ``.params`` / ``.safetensors`` file.
        backbone: compare with this backbone instead of the best fit.

    Returns:
        ``inspect_weights``'s dict plus ``"layout"`` (``mxnet_resnet38``, ``deeplab_caffe``,
        ``torchvision`` or ``other``), ``"shapes"`` (tensors per ndim, the largest three), ``"fit"``
        (the compared backbone: ``backbone``, ``loaded``, ``missing``, ``unexpected``, ``mismatched``,
        or ``error``).

    Raises:
        WeightsError: unreadable file.
    """
    from wsss_tune.models.registry import list_backbones
    from wsss_tune.models.weights import WeightsError, inspect_weights, read_weights

    info = inspect_weights(path)
    fmt, raw = read_weights(path)
    state, layout = _convert_for(raw, fmt)
    info["layout"] = layout
    info["shapes"] = _shape_summary(state)
    if layout == "deeplab_caffe":  # inspect_weights compares raw names; rank the renamed ones too
        for name in list_backbones():
            try:
                rep = weights_fit(path, backbone=name)
            except (TypeError, WeightsError):
                continue
            wanted = len(rep.loaded) + len(rep.missing) + len(rep.mismatched)
            info["fits"].append({"backbone": name, "matched": len(rep.loaded), "model_keys": wanted,
                                 "mismatched": len(rep.mismatched), "layout": "caffe",
                                 "fraction": round(len(rep.loaded) / max(wanted, 1), 4)})
        info["fits"].sort(key=lambda f: (-f["fraction"], f["backbone"]))
        info["best_fit"] = info["fits"][0]["backbone"] if info["fits"] and info["fits"][0]["fraction"] > 0 else None
    target = backbone or info["best_fit"]
    if target is None:
        info["fit"] = None
        return info
    try:
        rep = weights_fit(path, backbone=target)
    except (WeightsError, TypeError, ValueError) as exc:
        info["fit"] = {"backbone": target, "error": str(exc)}
        return info
    info["fit"] = {"backbone": target, "loaded": rep.loaded, "missing": rep.missing,
                   "unexpected": rep.unexpected,
                   "mismatched": {k: [list(a), list(b)] for k, (a, b) in rep.mismatched.items()}}
    return info


def format_weights_description(info: Mapping[str, Any], *, limit: int | None = DEFAULT_LISTED_KEYS) -> str:
    """Text of :func:`describe_weights`: summary, shapes, fits, then missing/unexpected keys by name
    (at most ``limit`` per kind; None = all)."""
    lines = [f"{info['path']}", f"  format {info['format']} (layout {info['layout']}), {info['num_keys']:,} keys, "
             f"{info['num_params']:,} values; dtypes " + ", ".join(f"{k} {v}" for k, v in info["dtypes"].items())]
    by_ndim = ", ".join(f"{n}-D {c}" for n, c in info["shapes"]["by_ndim"].items())
    lines.append(f"  tensors by rank: {by_ndim}; largest: "
                 + ", ".join(f"{k} {list(s)}" for k, s in info["shapes"]["largest"]))
    lines.append("  groups: " + ", ".join(f"{g} ({v['keys']} keys, {v['params']:,})" for g, v in info["groups"].items()))
    lines.append("fits (matched / backbone keys):")
    for f in info["fits"]:
        if "error" in f:
            lines.append(f"  {f['backbone']:<24} cannot build: {f['error']}")
            continue
        label = f["backbone"] + (" (caffe layout)" if f.get("layout") == "caffe" else "")
        lines.append(f"  {label:<24} {f['matched']}/{f['model_keys']} ({f['fraction']:.0%})"
                     + (f", {f['mismatched']} shape mismatches" if f["mismatched"] else ""))
    fit = info.get("fit")
    if fit is None:
        lines.append("best fit: none - the file fits no registered backbone")
        return "\n".join(lines)
    lines.append(f"compared with {fit['backbone']}:")
    if "error" in fit:
        lines.append(f"  {fit['error']}")
        return "\n".join(lines)

    def names(kind: str, items: Sequence[str]) -> None:
        shown = list(items) if limit is None else list(items)[:limit]
        lines.append(f"  {kind}: {len(items)}")
        lines.extend(f"    {k}" for k in shown)
        if len(shown) < len(items):
            lines.append(f"    ... and {len(items) - len(shown)} more (--all lists every key)")

    lines.append(f"  loaded: {len(fit['loaded'])}")
    names("missing (model keys the file lacks)", fit["missing"])
    names("unexpected (file keys the model lacks)", fit["unexpected"])
    names("shape mismatches (file vs model)",
          [f"{k} {a} vs {b}" for k, (a, b) in fit["mismatched"].items()])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# W&B and Ray cluster
# --------------------------------------------------------------------------------------------------


def check_wandb() -> Check:
    """W&B mode (``WANDB_MODE``) and whether an API key is set (the key itself is never shown)."""
    if importlib.util.find_spec("wandb") is None:
        return Check("wandb", "warn", "wandb is not installed: sweeps cannot log to W&B",
                     "pip install wandb, or run sweeps with --wandb off")
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if mode in ("offline", "dryrun"):
        return Check("wandb", "ok", f"WANDB_MODE={mode}: runs are logged locally (`wandb sync` uploads them later)")
    if mode == "disabled":
        return Check("wandb", "ok", "WANDB_MODE=disabled: nothing is logged to W&B")
    if not mode:
        return Check("wandb", "ok", "WANDB_MODE unset: sweeps log offline unless asked for --wandb online"
                     + ("; WANDB_API_KEY is set" if has_key else ""))
    if has_key:
        return Check("wandb", "ok", f"WANDB_MODE={mode}; WANDB_API_KEY is set")
    return Check("wandb", "warn", f"WANDB_MODE={mode} but WANDB_API_KEY is not set (a key stored by "
                 "`wandb login` is not checked here)", "export WANDB_API_KEY, run `wandb login`, or set "
                 "WANDB_MODE=offline")


def _ray_endpoint(address: str) -> tuple[str, int] | None:
    if address == "auto":
        if not RAY_CURRENT_CLUSTER_FILE.is_file():
            return None
        address = RAY_CURRENT_CLUSTER_FILE.read_text().strip()
    default = RAY_DEFAULT_GCS_PORT
    if address.startswith("ray://"):
        address, default = address[len("ray://"):], RAY_DEFAULT_CLIENT_PORT
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default
    return host.strip("[]"), int(port)


def check_ray_cluster(*, connect: Callable[..., Any] = socket.create_connection) -> Check:
    """With ``RAY_ADDRESS`` set, whether its head answers (a TCP connection of
    :data:`RAY_PROBE_TIMEOUT_S` seconds; no Ray client is started)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return Check("ray.cluster", "ok", "RAY_ADDRESS unset: sweeps start a local Ray instance on this machine")
    fix = ("start the head (`ray start --head`) and check the address and firewall, or unset RAY_ADDRESS to "
           "run on this machine")
    try:
        endpoint = _ray_endpoint(address)
    except ValueError:
        return Check("ray.cluster", "problem", f"RAY_ADDRESS={address!r}: expected host:port, ray://host:port or "
                     "auto", fix)
    if endpoint is None:
        return Check("ray.cluster", "problem", f"RAY_ADDRESS=auto but no local cluster is running "
                     f"({RAY_CURRENT_CLUSTER_FILE} not found)", fix)
    host, port = endpoint
    try:
        with connect((host, port), timeout=RAY_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        return Check("ray.cluster", "problem", f"RAY_ADDRESS={address!r}: cannot reach {host}:{port} ({exc})", fix)
    return Check("ray.cluster", "ok", f"RAY_ADDRESS={address!r}: {host}:{port} answers")


# --------------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------------


def run_doctor(
    *,
    data: Path | None,
    config: str | None,
    overrides: Sequence[str] = (),
    full: bool = False,
    store: str | None = None,
    experiments: Path | None = None,
) -> list[Check]:
    """Every check, in order: config, GPUs (torch, Ray, what each sweep trial gets), data, disk, weights,
    W&B, Ray cluster.

    Args:
        data: dataset root (overrides ``data.root``).
        config: built-in config name or YAML path; ``None`` = ``voc`` (the real-data setting).
        overrides: ``section.field=value`` strings.
        full: read every id of every split instead of a sample.
        store: artifact store to check (default ``run.artifact_store``, else ``<experiments>/artifacts``,
            where sweeps put it).
        experiments: sweep experiment folder (default ``./experiments``, the sweeps' default).
    """
    import torch

    cfg_check, cfg = check_config(config or "voc", overrides, data)
    checks = [cfg_check]
    gpu = check_torch_gpus(device=cfg.run.device if cfg else "auto")
    checks += [gpu, check_ray_gpus(torch_count=torch.cuda.device_count() if torch.cuda.is_available() else 0),
               check_trial_device(cfg)]
    if cfg is not None:
        checks += check_data(cfg, full=full)
        checks += check_disk(cfg, store=store, experiments=experiments)
        checks += check_weights(cfg)
    checks += [check_wandb(), check_ray_cluster()]
    return checks
