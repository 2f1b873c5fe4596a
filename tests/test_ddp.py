"""Data-parallel training inside a run (``run.ddp_ranks``): N gloo ranks on the CPU take the steps of one
process with the same global batch, resume exactly, and only rank 0 writes and reports.

The exact comparisons need a model in which nothing couples the images of a batch. The reference
backbones freeze BatchNorm; the ``tiny`` CPU backbone trains it, so these tests register
``tiny_frozen_bn``: the tiny backbone with BatchNorm frozen the way ResNet-38 freezes it (eval mode in
``train()``, no gradient on the affine). The ranks are fresh processes, so the launcher is wrapped to
register it there too (:func:`_with_test_backbone`); everything else is the stages' own code path.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stage_helpers import CrashingReporter, Interrupt, logged
from torch import nn

from wsss_tune.config import ConfigError, PipelineConfig, load_config
from wsss_tune.data import ClassificationDataset, TrainTransform, VOCLayout
from wsss_tune.models import registry
from wsss_tune.models.deeplab import build_deeplab
from wsss_tune.models.eps_net import build_eps_net
from wsss_tune.models.tiny import TinyBackbone
from wsss_tune.ops.eps_loss import eps_loss
from wsss_tune.reporting import RecordingReporter
from wsss_tune.stages import distributed
from wsss_tune.stages.affinity import train_affinity
from wsss_tune.stages.common import RankBatches, ResumableSampler
from wsss_tune.stages.deeplab import train_deeplab
from wsss_tune.stages.eps import train_eps
from wsss_tune.utils import seed_everything

#: The test backbone's registry name.
FROZEN_TINY = "tiny_frozen_bn"
#: Two ranks against one process: the same sums in another order, so float32 round-off only.
REL, ABS = 1e-4, 1e-6


# --------------------------------------------------------------------------------------------------
# A tiny backbone whose BatchNorm is frozen, registered here and in every rank
# --------------------------------------------------------------------------------------------------


class FrozenBNTiny(TinyBackbone):
    """:class:`~wsss_tune.models.tiny.TinyBackbone` with BatchNorm frozen as the reference backbones
    freeze it: eval mode whatever ``train()`` says, and ``requires_grad=False`` on its affine."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBNTiny:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def _register() -> None:
    registry.list_backbones()  # the built-in ones first (they register on import)
    if FROZEN_TINY not in registry._REGISTRY:
        registry.register_backbone(FROZEN_TINY)(lambda *, output_stride=4: FrozenBNTiny(output_stride=output_stride))


def _with_test_backbone(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A rank's entry: register the test backbone in this fresh process, then run the stage's own body."""
    _register()
    return fn(*args, **kwargs)


@pytest.fixture
def frozen_backbone() -> Iterator[str]:
    """Registers ``tiny_frozen_bn`` for the test; removed afterwards."""
    _register()
    yield FROZEN_TINY
    registry._REGISTRY.pop(FROZEN_TINY, None)


@pytest.fixture
def frozen_tiny(frozen_backbone: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``tiny_frozen_bn`` registered for the test and in the ranks the stages launch."""
    launch = distributed.launch

    def launch_with_backbone(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if kwargs.get("ranks", 1) == 1:
            return launch(fn, *args, **kwargs)
        return launch(_with_test_backbone, fn, *args, **kwargs)

    monkeypatch.setattr(distributed, "launch", launch_with_backbone)
    return frozen_backbone


#: Tiny settings of the three stages: 32-48 px crops, a few steps, every step logged.
TINY = {
    "data.num_workers": 0,
    "run.device": "cpu",
    "eps.iterations": 4,
    "eps.batch_size": 4,
    "eps.crop_size": 32,
    "eps.resize_long": [32, 48],
    "eps.eval_every": 0,
    "eps.log_every": 1,
    "eps.checkpoint_every": 2,
    "eps.cam_scales": [1.0],
    "affinity.init": "imagenet",
    "affinity.radius": 3,
    "affinity.iterations": 3,
    "affinity.batch_size": 3,
    "affinity.crop_size": 48,
    "affinity.resize_long": [48, 64],
    "affinity.log_every": 1,
    "affinity.checkpoint_every": 2,
    "deeplab.iterations": 3,
    "deeplab.batch_size": 3,
    "deeplab.accumulate": 2,
    "deeplab.msc": True,
    "deeplab.crop_size": 32,
    "deeplab.scales": [0.75, 1.0, 1.25],
    "deeplab.eval_every": 0,
    "deeplab.log_every": 1,
    "deeplab.checkpoint_every": 2,
}


def tiny_cfg(root: Path, backbone: str, **overrides: Any) -> PipelineConfig:
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config("synth", {**TINY, "data.root": str(root), "eps.backbone": backbone,
                                 "deeplab.backbone": backbone, **extra})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a: RecordingReporter, b: RecordingReporter, loss_key: str, *, exact: bool = False) -> None:
    """Two runs logged the same steps with the same values (equal, or within float32 round-off)."""
    la, lb = logged(a.history, loss_key), logged(b.history, loss_key)
    assert [h["step"] for h in la] == [h["step"] for h in lb] and la
    for ha, hb in zip(la, lb, strict=True):
        assert ha.keys() == hb.keys()
        for key, value in ha.items():
            assert hb[key] == (value if exact else pytest.approx(value, rel=REL, abs=ABS)), (ha["step"], key)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=REL, atol=ABS, msg=k)


# --------------------------------------------------------------------------------------------------
# Pure pieces: batch sharding, batch coupling, ranks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "ranks"), [(4, 2), (8, 4), (3, 2), (10, 4)])
def test_rank_shares_of_each_batch_make_up_the_single_process_batch(batch, ranks):
    """Rank r takes positions r, r + N, ... of every global batch (every N-th index of the stream when N
    divides the batch), so the shares interleave back into one process's batch, also from a resume point."""
    one = list(itertools.islice(iter(RankBatches(ResumableSampler(7, seed=3), batch_size=batch)), 6))
    for start_step in (0, 2):
        shares = [list(itertools.islice(iter(RankBatches(ResumableSampler(7, seed=3, start_index=start_step * batch),
                                                         batch_size=batch, rank=r, num_ranks=ranks)), 6 - start_step))
                  for r in range(ranks)]
        for step, whole in enumerate(one[start_step:]):
            parts = [shares[r][step] for r in range(ranks)]
            assert sorted(len(p) for p in parts) == sorted(len(whole[r::ranks]) for r in range(ranks))
            rebuilt = [None] * batch
            for r, part in enumerate(parts):
                rebuilt[r::ranks] = part
            assert rebuilt == whole
    with pytest.raises(ValueError, match="rank 2 of 2"):
        RankBatches(ResumableSampler(7, seed=3), batch_size=4, rank=2, num_ranks=2)


def _eps_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits, maps = model(batch["image"])
    eps_loss(maps, batch["saliency"], batch["label"], image_logits=logits).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("frozen", "ranks"), [(True, 2), (True, 4), (False, 2)])
def test_frozen_batchnorm_makes_2_images_on_each_rank_equal_one_batch(synth_root, frozen_backbone, frozen, ranks):
    """What DDP computes on N ranks with 2 images each is the mean of the N shares' gradients (each
    share's EPS loss a mean over its images). With BatchNorm frozen (the reference backbones) that is
    the gradient of the whole batch: 2 x 2 = 4 and 4 x 2 = 8, to float32 round-off. With BatchNorm
    training on batch statistics (the plain tiny backbone) it is not, which is why such layers become
    SyncBatchNorm on CUDA."""
    layout = VOCLayout(root=synth_root)
    data = ClassificationDataset(layout, layout.split_ids("train_aug")[:2 * ranks], with_saliency=True,
                                 transform=TrainTransform(resize_long=(32, 48), hflip=True, crop_size=32))
    items = [data.get(i, np.random.default_rng(i)) for i in range(2 * ranks)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "label", "saliency")}
    seed_everything(0)
    model = build_eps_net(backbone=frozen_backbone if frozen else "tiny", num_classes=layout.num_classes).train()
    assert bool(distributed.batch_coupled(model)) is not frozen
    whole = _eps_grads(model, batch)
    shares = [_eps_grads(model, {k: v[r::ranks] for k, v in batch.items()}) for r in range(ranks)]
    averaged = {n: sum(share[n] for share in shares) / ranks for n in whole}
    gap = max(float((averaged[n] - whole[n]).abs().max() / whole[n].abs().max()) for n in whole)
    assert gap < 1e-5 if frozen else gap > 1e-2


def test_reference_backbones_keep_batchnorm_frozen_in_training_mode():
    """ResNet-38 (EPS, AffinityNet) and the DeepLab ResNets with freeze_bn (the reference) couple no
    images of a batch; the tiny backbone and DeepLab with freeze_bn off do. Built on the meta device:
    module structure only, no memory."""
    registry.list_backbones()
    with torch.device("meta"):
        assert distributed.batch_coupled(build_eps_net(backbone="resnet38", num_classes=20)) == []
        for backbone in ("resnet50", "resnet101"):
            assert distributed.batch_coupled(build_deeplab(arch="v2", backbone=backbone, num_classes=21)) == []
            assert distributed.batch_coupled(build_deeplab(arch="v1", backbone=backbone, num_classes=21,
                                                           freeze_bn=False))
        assert distributed.batch_coupled(build_eps_net(backbone="tiny", num_classes=20))


def test_batchnorm_that_trains_becomes_syncbatchnorm_keeping_its_parameters():
    """On CUDA ranks; the optimiser, built before, must still hold the very parameters, and the weights
    keep their names (checkpoints load in one process)."""
    model = build_eps_net(backbone="tiny", num_classes=5)
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    names = distributed.batch_coupled(model)
    distributed._sync_batchnorm(model, names)
    assert names and all(isinstance(model.get_submodule(n), nn.SyncBatchNorm) for n in names)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert list(model.state_dict()) == keys and distributed.batch_coupled(model) == names


def test_one_process_needs_no_communication():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.mean_shares([3, torch.tensor(5.0)]) is None
    values = {"a/loss": 0.5, "overlap": torch.ones(2, 3), "none": None}
    assert distributed.reduce_values(values, summed=("a/loss",)) == values
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


def test_ranks_resolve_from_the_config_field(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [distributed.resolve_ranks(n, cpu) for n in (0, 1, 3)] == [1, 1, 3]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.resolve_ranks(0, cuda) == 4 and distributed.resolve_ranks(2, cuda) == 2
    with pytest.raises(ValueError, match=r"run\.ddp_ranks: 5 ranks need 5 CUDA devices, torch sees 4"):
        distributed.resolve_ranks(5, cuda)
    with pytest.warns(UserWarning, match="4 CUDA devices are visible but run.ddp_ranks is 1"):
        assert distributed.resolve_ranks(1, cuda) == 1
    with pytest.raises(ValueError, match=r"run\.ddp_ranks: 2 ranks on 'mps'"):
        distributed.resolve_ranks(2, torch.device("mps"))
    with pytest.raises(ConfigError, match=r"run\.ddp_ranks: expected a value >= 0, got -1"):
        load_config("synth", {"run.ddp_ranks": -1})
    assert PipelineConfig().run.ddp_ranks == 0  # every visible GPU; one process without CUDA


def test_a_batch_smaller_than_the_ranks_is_refused_before_any_process_starts(synth_root, tmp_path):
    cfg = tiny_cfg(synth_root, "tiny", eps__batch_size=1, run__ddp_ranks=2)
    with pytest.raises(ValueError, match=r"eps\.batch_size: 1 image\(s\) per step cannot be split over "
                                         r"run\.ddp_ranks = 2 ranks"):
        train_eps(cfg, out_dir=tmp_path / "eps", reporter=RecordingReporter())


# --------------------------------------------------------------------------------------------------
# Two gloo ranks against one process, through the stage runners
# --------------------------------------------------------------------------------------------------


def _eps_run(root: Path, out: Path, ranks: int, reporter: Any = None, **overrides: Any) -> RecordingReporter:
    rec = reporter or RecordingReporter()
    train_eps(tiny_cfg(root, FROZEN_TINY, run__ddp_ranks=ranks, **overrides), out_dir=out, reporter=rec)
    return rec


def test_two_ranks_train_eps_as_one_process_and_only_rank_0_writes(synth_root, tmp_path, frozen_tiny):
    """EPS on 2 ranks x 2 images = one process with batch 4: the same losses, per-class overlaps and
    weights. Rank 0 alone reports (each step once), checkpoints and writes the model."""
    one = _eps_run(synth_root, tmp_path / "one", 1)
    two = _eps_run(synth_root, tmp_path / "two", 2)
    assert_same_run(one, two, "eps/loss")
    assert any(k.startswith("eps/overlap/") for k in logged(two.history, "eps/loss")[0])
    assert [h["step"] for h in two.history] == [h["step"] for h in one.history] == [1, 2, 3, 4]
    assert [h.get("checkpoint_dir") for h in two.history] == [None, str(tmp_path / "two" / "checkpoints")] * 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_2.pt", "step_4.pt"]
    assert_same_weights(_weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "two" / "model.pt"))


def test_two_ranks_train_affinity_and_deeplab_as_one_process(synth_root, tmp_path, frozen_tiny):
    """Batches of 3 split 2 + 1: AffinityNet's three pair means and DeepLab's per-output pixel means
    (multi-scale inputs, 2 accumulated micro-batches) are scaled to the global batch's, pair counts
    add up. The labels are the ground-truth masks."""
    eps_dir = tmp_path / "eps_out"
    shutil.copytree(synth_root / "SegmentationClassAug", eps_dir / "masks")
    runs = {}
    for ranks in (1, 2):
        cfg = tiny_cfg(synth_root, FROZEN_TINY, run__ddp_ranks=ranks)
        aff, dl = RecordingReporter(), RecordingReporter()
        train_affinity(cfg, eps_dir=eps_dir, out_dir=tmp_path / f"aff{ranks}", reporter=aff)
        train_deeplab(cfg, mask_dir=synth_root / "SegmentationClassAug", out_dir=tmp_path / f"dl{ranks}", reporter=dl)
        runs[ranks] = aff, dl
    assert_same_run(runs[1][0], runs[2][0], "affinity/loss")
    assert_same_run(runs[1][1], runs[2][1], "deeplab/loss")
    assert all(h["affinity/pairs_neg"] == int(h["affinity/pairs_neg"]) for h in logged(runs[2][0].history, "affinity/loss"))
    for name in ("aff", "dl"):
        assert_same_weights(_weights(tmp_path / f"{name}1" / "model.pt"), _weights(tmp_path / f"{name}2" / "model.pt"))


def test_a_two_rank_run_resumes_exactly_with_two_ranks_or_one(synth_root, tmp_path, frozen_tiny):
    """Six EPS steps of batch 3 (split 2 + 1), checkpoints at 2, 4, 6. A 2-rank run whose reporter dies
    at step 3 (the reporter's own exception comes back) resumes from step 2: with 2 ranks it ends
    bit-identical to an uninterrupted 2-rank run, logging the same values for steps 3..6; with 1 process
    (a checkpoint holds no per-rank state) it ends where an uninterrupted single process does, to
    round-off. SGD with momentum 0.9, so its buffers must come back too."""
    steps = {"eps__iterations": 6, "eps__batch_size": 3, "eps__momentum": 0.9, "eps__optimizer": "sgd",
             "eps__lr": 0.01}
    full_two = _eps_run(synth_root, tmp_path / "full2", 2, **steps)
    full_one = _eps_run(synth_root, tmp_path / "full1", 1, **steps)
    with pytest.raises(Interrupt):
        _eps_run(synth_root, tmp_path / "cut", 2, CrashingReporter(at=3), **steps)
    assert not (tmp_path / "cut" / "model.pt").exists()
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    again_two = _eps_run(synth_root, tmp_path / "cut", 2, **steps)
    again_one = _eps_run(synth_root, tmp_path / "cut1", 1, **steps)

    assert [h["step"] for h in logged(again_two.history, "eps/loss")] == [3, 4, 5, 6]
    assert logged(again_two.history, "eps/loss") == logged(full_two.history, "eps/loss")[2:]
    assert_same_weights(_weights(tmp_path / "full2" / "model.pt"), _weights(tmp_path / "cut" / "model.pt"), exact=True)
    assert_same_weights(_weights(tmp_path / "full1" / "model.pt"), _weights(tmp_path / "cut1" / "model.pt"))
    one_tail = RecordingReporter()
    one_tail.history = [h for h in full_one.history if h["step"] >= 3]
    assert_same_run(one_tail, again_one, "eps/loss")


def test_each_rank_reseeds_every_step_from_the_seed_the_step_and_its_rank(monkeypatch):
    """Dropout draws differ between ranks and steps, and repeat after a resume."""
    draws = {}
    for r, step in itertools.product((0, 1), (1, 2)):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        distributed.reseed(7, step)
        draws[r, step] = torch.rand(4)
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    distributed.reseed(7, 2)
    assert torch.equal(torch.rand(4), draws[1, 2])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_train_eps_as_one_with_syncbatchnorm(synth_root, tmp_path):
    """NCCL ranks on cuda:0 and cuda:1; the tiny backbone's BatchNorm trains, so it runs as SyncBatchNorm
    and the losses match one GPU's to TF32 round-off."""
    runs = []
    for ranks in (1, 2):
        rec = RecordingReporter()
        cfg = tiny_cfg(synth_root, "tiny", run__ddp_ranks=ranks, run__device="cuda", eps__amp=False)
        train_eps(cfg, out_dir=tmp_path / f"r{ranks}", reporter=rec)
        runs.append([h["eps/loss"] for h in logged(rec.history, "eps/loss")])
    assert runs[1] == pytest.approx(runs[0], rel=1e-2)


# --------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------


class BoomError(ValueError):
    """Raised by rank 1 of :func:`_rank_1_fails`."""


def _rank_1_fails(*, reporter: Any, device: torch.device) -> None:
    if distributed.rank() == 1:
        raise BoomError("rank 1 broke")
    reporter.report({"alive": 1.0}, step=1)
    torch.distributed.barrier()  # rank 0 waits here for a rank that never comes


def _rank_1_dies(*, reporter: Any, device: torch.device) -> None:
    if distributed.rank() == 1:
        os._exit(3)  # as the out-of-memory killer would end it: no exception, no clean-up
    torch.distributed.barrier()


def test_a_rank_that_dies_without_an_error_is_reported_by_how_it_ended():
    with pytest.raises(distributed.RankError, match="rank 1 of 2 exited with code 3"):
        distributed.launch(_rank_1_dies, ranks=2, device=torch.device("cpu"), reporter=RecordingReporter())


def test_a_failing_rank_raises_its_own_error_and_stops_the_others(tmp_path):
    rec = RecordingReporter()
    with pytest.raises(BoomError, match="rank 1 broke") as info:
        distributed.launch(_rank_1_fails, ranks=2, device=torch.device("cpu"), reporter=rec)
    cause = info.value.__cause__
    assert isinstance(cause, distributed.RankError) and "rank 1 of 2 failed" in str(cause)
    assert "_rank_1_fails" in str(cause)  # the rank's own traceback
    assert rec.history in ([], [{"step": 1, "alive": 1.0}])


class KeywordError(Exception):
    """Pickles, but does not unpickle: ``__init__`` needs a keyword ``args`` does not hold."""

    def __init__(self, *, what: str) -> None:
        super().__init__(f"rank 1 lost {what}")


def _rank_1_fails_oddly(*, reporter: Any, device: torch.device) -> None:
    if distributed.rank() == 1:
        raise KeywordError(what="its shard")
    torch.distributed.barrier()


def test_a_rank_error_that_does_not_unpickle_is_reported_by_its_traceback():
    with pytest.raises(distributed.RankError, match="rank 1 of 2 failed") as info:
        distributed.launch(_rank_1_fails_oddly, ranks=2, device=torch.device("cpu"), reporter=RecordingReporter())
    assert "KeywordError: rank 1 lost its shard" in str(info.value)
