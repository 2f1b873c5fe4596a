"""AffinityNet + random-walk stage runners: training, resume, cached affinities, the walk and its gain."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stage_helpers import CrashingReporter, Interrupt

from wsss_tune.config import PipelineConfig, load_config
from wsss_tune.data import VOCLayout, save_mask_png
from wsss_tune.models.eps_net import build_eps_net
from wsss_tune.ops.affinity import affinity_from_features
from wsss_tune.ops.cam import cam_to_mask
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages.affinity import (
    AFF_META_FILE,
    DualThresholdLabels,
    compute_affinities,
    load_affinity,
    max_steps,
    run_affinity,
    train_affinity,
)
from wsss_tune.stages.common import StageResult
from wsss_tune.stages.random_walk import run_random_walk, rw_t_values
from wsss_tune.utils import atomic_write_bytes

#: Tiny settings: 48 px crops (12 x 12 features at the tiny backbone's stride 4, enough for radius 5,
#: the reference radius), batches of 2; a step takes milliseconds on the CPU.
TINY = {
    "affinity.radius": 5,
    "data.num_workers": 0,
    "run.device": "cpu",
    "affinity.iterations": 4,
    "affinity.batch_size": 2,
    "affinity.crop_size": 48,
    "affinity.resize_long": [48, 64],
    "affinity.log_every": 1,
    "affinity.checkpoint_every": 2,
    "rw.logt": 3,
}
#: Stride of the tiny backbone (its default output stride).
STRIDE = 4


def tiny_cfg(root: Path, **overrides: Any) -> PipelineConfig:
    """The built-in synth config shrunk by :data:`TINY`; ``overrides`` use ``section__field`` names."""
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config("synth", {**TINY, "data.root": str(root), **extra})


def _cam_file(cams: np.ndarray, keys: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, cams=cams.astype(np.float16), keys=keys.astype(np.int64))
    return buf.getvalue()


def write_fake_eps(root: Path, out: Path, *, seed: int = 0) -> Path:
    """An EPS output folder in the runner's format, made from the ground truth plus noise.

    For every train_aug/train id: ``cams/<id>.npz`` (the labelled classes' maps: GT indicator blurred
    by noise, max-normalised, then a background channel; keys = mask labels, 0 last), ``masks/<id>.png``
    (argmax with the constant background 0.2, as the EPS rule) and ``model.pt`` (a tiny EPSNet).
    """
    layout = VOCLayout(root=root)
    rng = np.random.default_rng(seed)
    ids = dict.fromkeys([*layout.split_ids("train_aug"), *layout.split_ids("train")])
    for image_id in ids:
        gt = layout.load_mask(image_id)
        labels = layout.image_labels(image_id)
        present = np.flatnonzero(labels)
        maps = []
        for c in present:
            m = (gt == c + 1).astype(np.float32) * 0.8 + rng.uniform(0, 0.4, gt.shape).astype(np.float32)
            maps.append(m / (m.max() + 1e-5))
        bg = 1.0 - np.max(maps, axis=0) if maps else np.ones(gt.shape, np.float32)
        cams = np.stack([*maps, bg]).astype(np.float32)
        keys = np.append(present + 1, 0)
        atomic_write_bytes(out / "cams" / f"{image_id}.npz", _cam_file(cams, keys))
        full = np.zeros((layout.num_classes + 1, *gt.shape), np.float32)
        full[present] = cams[:-1]
        full[-1] = bg
        mask = cam_to_mask(torch.from_numpy(full), torch.from_numpy(labels))
        save_mask_png(out / "masks" / f"{image_id}.png", mask.numpy().astype(np.uint8))
    torch.manual_seed(seed)
    net = build_eps_net(backbone="tiny", num_classes=layout.num_classes)
    torch.save(net.state_dict(), out / "model.pt")
    return out


@pytest.fixture(scope="module")
def fake_eps(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake EPS output over ``synth_root`` (read-only)."""
    return write_fake_eps(synth_root, tmp_path_factory.mktemp("fake_eps"))


@pytest.fixture(scope="module")
def trained(synth_root: Path, fake_eps: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Path]:
    """A tiny finished AffinityNet run on the fake EPS output: (config, stage folder)."""
    cfg = tiny_cfg(synth_root)
    out = tmp_path_factory.mktemp("aff_stage")
    run_affinity(cfg, eps_dir=fake_eps, out_dir=out, reporter=RecordingReporter())
    return cfg, out


# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------


def test_max_steps_follows_epochs_unless_iterations_given(synth_root: Path) -> None:
    """24 images, batch 8, 8 epochs -> 24 // 8 * 8 = 24 steps (PSA); iterations = 5 overrides."""
    cfg = tiny_cfg(synth_root, affinity__iterations=0, affinity__batch_size=8, affinity__epochs=8)
    assert max_steps(cfg.affinity, 24) == 24
    assert max_steps(tiny_cfg(synth_root, affinity__iterations=5).affinity, 24) == 5
    with pytest.raises(ValueError, match="no full batch"):
        max_steps(cfg.affinity, 7)


def test_rw_t_values_default_and_extra(synth_root: Path) -> None:
    """logt = 3: powers 1, 2, 4, 8; given [3, 0] the configured 8 is added: [0, 3, 8]."""
    r = tiny_cfg(synth_root).rw
    assert rw_t_values(r) == [1, 2, 4, 8]
    assert rw_t_values(r, [3, 0]) == [0, 3, 8]
    with pytest.raises(ValueError, match="non-negative"):
        rw_t_values(r, [-1])


def test_dual_threshold_labels_from_a_cam_file(tmp_path: Path) -> None:
    """One labelled class (key 3, i.e. class index 2 of C = 5) with CAM values m = 1, 0.5, 0.2, 0.

    Low α = 4 background (1-m)^4: 0, 0.0625, 0.41, 1 -> class wins at m = 1 and 0.5.
    High α = 32 background (1-m)^32: 0, 2e-10, 8e-4, 1 -> background wins only at m = 0.
    Combined: m = 1 -> 3, m = 0.5 -> 3, m = 0.2 -> 255 (neither confident), m = 0 -> 0.
    """
    cams = np.array([[[1.0, 0.5, 0.2, 0.0]], [[0.0, 0.5, 0.8, 1.0]]], np.float32)  # class 3, background
    atomic_write_bytes(tmp_path / "x.npz", _cam_file(cams, np.array([3, 0])))
    labels = DualThresholdLabels(num_classes=5, cam_dir=tmp_path, alpha_low=4.0, alpha_high=32.0)("x")
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[3, 3, 255, 0]]


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_source", ["eps_masks", "cam_dual"])
def test_one_training_step_is_finite_and_learns(synth_root: Path, fake_eps: Path, tmp_path: Path,
                                                label_source: str) -> None:
    """One step per label source: finite loss equal to bg/4 + fg/4 + neg/2 of its reported parts,
    pairs of every kind, the backbone starts from the EPS checkpoint and moves away from it."""
    cfg = tiny_cfg(synth_root, affinity__iterations=1, affinity__label_source=label_source)
    rep = RecordingReporter()
    model_path = train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path, reporter=rep)
    (log,) = [h for h in rep.history if "affinity/loss" in h]
    assert log["step"] == 1 and math.isfinite(log["affinity/loss"])
    parts = 0.25 * log["affinity/loss_bg"] + 0.25 * log["affinity/loss_fg"] + 0.5 * log["affinity/loss_neg"]
    assert log["affinity/loss"] == pytest.approx(parts, rel=1e-6)
    assert log["affinity/pairs_bg"] > 0 and log["affinity/pairs_neg"] > 0 and log["affinity/pairs_fg"] > 0
    assert log["affinity/lr"] == pytest.approx(cfg.affinity.lr)  # poly factor (1 - 0/1)^0.9 = 1
    eps_state = torch.load(fake_eps / "model.pt", weights_only=True)
    state = torch.load(model_path, weights_only=True)
    name = "backbone.layer3.0.0.weight"
    assert state[name].shape == eps_state[name].shape
    assert not torch.equal(state[name], eps_state[name])
    # Init from the EPS backbone: after one Adam step of lr 1e-3 every weight is within ~1e-3 of it.
    assert (state[name] - eps_state[name]).abs().max() < 1e-2


def test_imagenet_init_without_weights_needs_no_eps_model(synth_root: Path, fake_eps: Path, tmp_path: Path) -> None:
    """``init: imagenet`` with no weights file trains from random init and ignores the EPS model."""
    cfg = tiny_cfg(synth_root, affinity__iterations=1, affinity__init="imagenet")
    path = train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path, reporter=RecordingReporter(),
                          eps_model=tmp_path / "missing.pt")
    assert path.is_file()


def test_missing_labels_and_model_are_named(synth_root: Path, fake_eps: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synth_root, affinity__iterations=1)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path / "a", reporter=RecordingReporter(),
                       eps_model=tmp_path / "missing.pt")
    empty = tmp_path / "eps_without_masks"
    empty.mkdir()
    (empty / "model.pt").write_bytes((fake_eps / "model.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"label file\(s\) not found: .*eps_without_masks/masks/"):
        train_affinity(cfg, eps_dir=empty, out_dir=tmp_path / "b", reporter=RecordingReporter())


def test_bad_crop_for_the_stride_is_rejected(synth_root: Path, fake_eps: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synth_root, affinity__crop_size=50)
    with pytest.raises(ValueError, match="affinity.crop_size: 50 is not a multiple"):
        train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path, reporter=RecordingReporter())




def test_resume_gives_the_uninterrupted_weights(synth_root: Path, fake_eps: Path, tmp_path: Path) -> None:
    """4 steps with a checkpoint at step 2: a run killed after step 2 and restarted ends with the same
    weights and the same logged losses as a run that was never interrupted."""
    cfg = tiny_cfg(synth_root)
    full_rep = RecordingReporter()
    full = torch.load(train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path / "full", reporter=full_rep),
                      weights_only=True)
    crash = CrashingReporter(at=2)
    with pytest.raises(Interrupt):
        train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path / "cut", reporter=crash)
    assert (tmp_path / "cut" / "checkpoints" / "step_2.pt").is_file()
    assert not (tmp_path / "cut" / "model.pt").exists()
    rest = RecordingReporter()
    resumed = torch.load(train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path / "cut", reporter=rest),
                         weights_only=True)
    assert [h["step"] for h in rest.history] == [3, 4]
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key

    def losses(history: list[dict[str, Any]]) -> list[float]:
        return [h["affinity/loss"] for h in history]

    assert losses(crash.history) + losses(rest.history) == losses(full_rep.history)


def test_changed_settings_refuse_to_resume(synth_root: Path, fake_eps: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synth_root, affinity__iterations=1)
    train_affinity(cfg, eps_dir=fake_eps, out_dir=tmp_path, reporter=RecordingReporter())
    other = tiny_cfg(synth_root, affinity__iterations=1, affinity__lr=0.5)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.5"):
        train_affinity(other, eps_dir=fake_eps, out_dir=tmp_path, reporter=RecordingReporter())


# --------------------------------------------------------------------------------------------------
# Cached affinities
# --------------------------------------------------------------------------------------------------


def test_affinity_files_shapes_and_geometry(trained: tuple[PipelineConfig, Path], synth_root: Path) -> None:
    """64 x 64 images at stride 4 -> 16 x 16 features; radius 5 -> D = 34 directions. Stored padded:
    (34, 16, 16) float16. The reference geometry is rows 0..11, columns 4..11: (34, 12, 8), and equals
    the affinities of the model's features computed in that geometry directly."""
    cfg, out = trained
    layout = VOCLayout(root=synth_root)
    ids = dict.fromkeys([*layout.split_ids("train_aug"), *layout.split_ids("train")])
    aff_dir = out / "aff"
    meta = json.loads((aff_dir / AFF_META_FILE).read_text())
    assert (meta["radius"], meta["stride"], meta["directions"]) == (5, STRIDE, 34)
    assert sorted(p.stem for p in aff_dir.glob("*.npy")) == sorted(ids)
    image_id = next(iter(ids))
    stored = np.load(aff_dir / f"{image_id}.npy")
    assert stored.dtype == np.float16 and stored.shape == (34, 16, 16)
    assert stored.min() >= 0 and stored.max() <= 1
    ref = load_affinity(aff_dir, image_id, pad_border=False)
    assert ref.shape == (34, 12, 8)

    from wsss_tune.data import normalize_image
    from wsss_tune.models.affinity_net import build_affinity_net

    net = build_affinity_net(backbone="tiny", widths=cfg.affinity.widths, out_channels=cfg.affinity.out_channels)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    with torch.no_grad():
        feats = net.eval()(normalize_image(layout.load_image(image_id))[None])
    direct = affinity_from_features(feats, radius=5)[0]
    torch.testing.assert_close(ref, direct, atol=1e-3, rtol=0)  # float16 storage


def test_compute_affinities_skips_done_ids(trained: tuple[PipelineConfig, Path], tmp_path: Path) -> None:
    """Existing files are kept (same bytes, same mtime); a deleted one is recomputed identically."""
    cfg, out = trained
    aff_dir = out / "aff"
    files = sorted(aff_dir.glob("*.npy"))
    ids = [p.stem for p in files]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    victim = files[0]
    victim.unlink()
    time.sleep(0.01)
    compute_affinities(cfg, model_path=out / "model.pt", ids=ids, out_dir=out)
    for p in files[1:]:
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    assert victim.read_bytes() == before[victim.name][1]


# --------------------------------------------------------------------------------------------------
# Random walk
# --------------------------------------------------------------------------------------------------


def test_random_walk_writes_masks_and_one_metric_per_t(trained: tuple[PipelineConfig, Path], fake_eps: Path,
                                                       synth_root: Path, tmp_path: Path) -> None:
    """logt = 3 -> t in 1, 2, 4, 8: one report per t (step = t, tuning mIoU only) and one
    ``rw_miou_t/<t>`` each; masks of every id at the image size with values in 0..C."""
    cfg, out = trained
    rep = RecordingReporter()
    res = run_random_walk(cfg, eps_dir=fake_eps, aff_dir=out / "aff", out_dir=tmp_path, reporter=rep)
    assert [h["step"] for h in rep.history] == [1, 2, 4, 8]
    assert all(set(h) == {"step", "rw_miou_tune", "rw/t"} for h in rep.history)
    assert sorted(k for k in res.metrics if k.startswith("rw_miou_t/")) == [f"rw_miou_t/{t}" for t in (1, 2, 4, 8)]
    assert res.metrics["rw_miou"] == res.metrics["rw_miou_t/8"]
    assert res.metrics["rw_gain"] == pytest.approx(res.metrics["rw_miou"] - res.metrics["eps_miou"])
    for key in ("rw_miou_tune", "rw_miou_heldout", "eps_miou", "rw_iou/background"):
        assert 0 <= res.metrics[key] <= 100
    layout = VOCLayout(root=synth_root)
    ids = dict.fromkeys([*layout.split_ids("train_aug"), *layout.split_ids("train")])
    masks = sorted(Path(res.paths["masks"]).glob("*.png"))
    assert sorted(p.stem for p in masks) == sorted(ids)
    for image_id in list(ids)[:4]:
        mask = layout.load_mask(image_id, Path(res.paths["masks"]))  # raises for values outside 0..C/255
        assert mask.shape == layout.load_image(image_id).shape[:2]
        assert mask.max() <= layout.num_classes


def _square_case(synth_root: Path, tmp_path: Path) -> tuple[VOCLayout, str, Path, Path, str]:
    """One image with a square class-2 CAM on rows/columns 16..47, zero affinities and a one-id split.

    Returns (layout, image id, eps folder, affinity folder, split file).
    """
    layout = VOCLayout(root=synth_root)
    image_id = layout.split_ids("train")[0]
    cams = np.zeros((2, 64, 64), np.float32)
    cams[0, 16:48, 16:48] = 1.0
    cams[1] = 1.0 - cams[0]
    eps_dir, aff_dir = tmp_path / "eps", tmp_path / "aff"
    atomic_write_bytes(eps_dir / "cams" / f"{image_id}.npz", _cam_file(cams, np.array([2, 0])))
    save_mask_png(eps_dir / "masks" / f"{image_id}.png", (cams[0] * 2).astype(np.uint8))
    aff_dir.mkdir()
    (aff_dir / AFF_META_FILE).write_text(json.dumps({"radius": 5, "stride": 4, "geometry": "padded",
                                                     "directions": 34, "model_sha256": "none"}))
    np.save(aff_dir / f"{image_id}.npy", np.zeros((34, 16, 16), np.float16))
    (tmp_path / "one.txt").write_text(image_id + "\n")
    return layout, image_id, eps_dir, aff_dir, str(tmp_path / "one.txt")


def test_zero_affinities_keep_the_cam_argmax(synth_root: Path, tmp_path: Path) -> None:
    """With every affinity 0, A = a^β is the identity, T = I and the walk changes nothing.

    One image (64 x 64), class 2 CAM = 1 on rows/columns 16..47 (stride-4 cells 4..11), 0 elsewhere.
    α = 4: background (1 - m)^4 = 0 inside, 1 outside; pooled by 4 the planes stay 0/1 per cell.
    Bilinear upsampling (align_corners=False) samples cell coordinate (p + 0.5) / 4 - 0.5: pixel 16 ->
    3.625 (class weight 0.625 > 0.5), pixel 15 -> 3.375 (0.375), pixel 47 -> 11.375 (0.625),
    pixel 48 -> 11.625 (0.375). In 2-D the class weight is the product of the two axes' weights, so a
    corner pixel of the square gets 0.625² = 0.39 < 0.5 (background) and its edge neighbours
    0.625 · 0.875 = 0.55 (class): the refined mask is the square without its four corner pixels, for
    every t and with pad_border on or off.
    """
    layout, image_id, eps_dir, aff_dir, split = _square_case(synth_root, tmp_path)
    expected = np.zeros((64, 64), np.uint8)
    expected[16:48, 16:48] = 2
    expected[[16, 16, 47, 47], [16, 47, 16, 47]] = 0
    for pad in (False, True):
        cfg = tiny_cfg(synth_root, data__train_split=split, data__mask_eval_split=split, rw__pad_border=pad,
                       rw__alpha=4.0)
        res = run_random_walk(cfg, eps_dir=eps_dir, aff_dir=aff_dir, out_dir=tmp_path / f"rw{pad}",
                              reporter=RecordingReporter())
        got = layout.load_mask(image_id, tmp_path / f"rw{pad}" / "masks")
        np.testing.assert_array_equal(got, expected)
        assert res.metrics["rw_miou_t/1"] == res.metrics["rw_miou_t/8"]


def test_crf_option_refines_the_walked_scores(synth_root: Path, tmp_path: Path) -> None:
    """``rw.crf`` runs the dense CRF on the walked scores: the mask keeps the image size and the two
    classes of the input (0 and 2), and stays inside what the CAM allows (no other class appears)."""
    pytest.importorskip("pydensecrf")
    layout, image_id, eps_dir, aff_dir, split = _square_case(synth_root, tmp_path)
    cfg = tiny_cfg(synth_root, data__train_split=split, data__mask_eval_split=split, rw__crf=True, rw__alpha=4.0)
    run_random_walk(cfg, eps_dir=eps_dir, aff_dir=aff_dir, out_dir=tmp_path / "rw", reporter=RecordingReporter())
    got = layout.load_mask(image_id, tmp_path / "rw" / "masks")
    assert got.shape == (64, 64)
    assert set(np.unique(got).tolist()) == {0, 2}


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is not None, reason="pydensecrf is installed")
def test_crf_without_the_package_is_a_clear_error(synth_root: Path, tmp_path: Path) -> None:
    _, _, eps_dir, aff_dir, split = _square_case(synth_root, tmp_path)
    cfg = tiny_cfg(synth_root, data__train_split=split, data__mask_eval_split=split, rw__crf=True)
    with pytest.raises(ModuleNotFoundError, match="rw.crf"):
        run_random_walk(cfg, eps_dir=eps_dir, aff_dir=aff_dir, out_dir=tmp_path / "rw", reporter=RecordingReporter())


def test_missing_affinities_are_named(fake_eps: Path, synth_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synth_root)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        run_random_walk(cfg, eps_dir=fake_eps, aff_dir=tmp_path, out_dir=tmp_path / "rw", reporter=RecordingReporter())


# --------------------------------------------------------------------------------------------------
# Must show: on the synthetic dataset the walk improves the EPS masks
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refined_masks_beat_the_eps_masks(synth_refined: StageResult) -> None:
    """DESIGN.md §4: EPS pseudo masks (~75 mIoU on the synthetic train split) -> random walk with a
    trained affinity head (β 8, 8 steps, α 4) ~77. The refined masks must beat the masks they came
    from, on the tuning and on the held-out half."""
    m = synth_refined.metrics
    print(f"\neps_miou {m['eps_miou']:.2f} -> rw_miou {m['rw_miou']:.2f} (t = {m['rw_t']}); per t: "
          + ", ".join(f"{k.split('/')[1]}: {v:.2f}" for k, v in m.items() if k.startswith("rw_miou_t/")))
    assert m["rw_miou"] > m["eps_miou"] + 1.0
    assert m["rw_miou_tune"] > m["eps_miou_tune"]
    assert m["rw_miou_heldout"] > m["eps_miou_heldout"]
