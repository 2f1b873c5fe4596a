"""Ready for a multi-GPU box, tested on the CPU by simulating it: the device each trial gets, the
precision each card gets, portable CUDA RNG states, the out-of-memory guard, the GPU memory model and
what ``doctor`` / ``preflight`` say about all of it.

The simulated environment: fake CUDA devices (``torch.cuda`` functions monkeypatched to a list of
cards), ``CUDA_VISIBLE_DEVICES`` and the Ray resources handed to a trial.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from wsss_tune.analysis import plan as planmod
from wsss_tune.analysis.plan import (
    MemoryProfile,
    check_gpu_memory,
    estimate_memory,
    optimizer_states,
    saved_tensor_bytes,
)
from wsss_tune.analysis.results import load_sweep
from wsss_tune.cli import _expected_failure, app
from wsss_tune.config import load_config
from wsss_tune.doctor import check_trial_device, run_doctor
from wsss_tune.models.affinity_net import build_affinity_net
from wsss_tune.ops.affinity import affinity_from_features
from wsss_tune.stages.common import (
    CheckpointManager,
    LogWindow,
    TrainingLoop,
    TrainingOutOfMemoryError,
    TrainStep,
    backward,
    capture_rng,
    make_grad_scaler,
    optimizer_step,
    restore_rng,
)
from wsss_tune.trainables.planning import SMOKE_OVERRIDES, plan_sweep, settle_gpus, trial_gpus
from wsss_tune.trainables.trainable import place_trial
from wsss_tune.utils import runtime
from wsss_tune.utils.runtime import (
    GpuInfo,
    amp_dtype,
    apply_placement,
    autocast,
    default_gpus_per_trial,
    fixed_size_inputs,
    loader_workers,
    needs_grad_scaler,
    precision_name,
    resolve_device,
    trial_placement,
)

runner = CliRunner()
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0), 80e9)
T4 = ("Tesla T4", (7, 5), 16e9)
RTX3090 = ("NVIDIA GeForce RTX 3090", (8, 6), 24e9)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, cards: list[tuple[str, tuple[int, int], float]], *,
              current: int = 0) -> None:
    """Make torch see ``cards`` (name, compute capability, bytes). ``is_bf16_supported`` behaves as
    torch's: True from capability 8.0, and on older cards too unless emulation is excluded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(cards))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: cards[i or 0][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cards[current if i is None else i][1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=cards[i][0], major=cards[i][1][0], minor=cards[i][1][1], total_memory=int(cards[i][2])))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(cards) and (
        cards[current][1] >= (8, 0) or including_emulation))


@pytest.fixture
def keep_threads():
    """Tests that apply a placement change torch's thread count: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# 1. The right device, always
# --------------------------------------------------------------------------------------------------


def test_a_zero_gpu_trial_runs_on_the_cpu_and_blanks_cuda_visible_devices(keep_threads) -> None:
    """Ray >= 2.60 leaves CUDA_VISIBLE_DEVICES=0,1,2,3 in a 0-GPU worker: the placement blanks it, the
    device is the CPU, 1 CPU gives 1 torch thread and 0 loader workers (data.num_workers 2 capped at
    CPUs - 1)."""
    p = trial_placement(gpus=0, gpu_ids=[], cpus=1, device="auto", num_workers=2)
    assert (p.device, p.visible_devices, p.memory_fraction, p.threads, p.workers) == ("cpu", "", None, 1, 0)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    apply_placement(p, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and torch.get_num_threads() == 1
    assert "cpu" in p.describe() and "0 loader worker" in p.describe()


def test_a_gpu_trial_gets_its_ids_and_a_fraction_caps_the_memory(monkeypatch, keep_threads) -> None:
    """0.5 GPU on id 2: cuda, CUDA_VISIBLE_DEVICES=2, memory capped at 50% of (visible) device 0.
    A whole GPU: no cap. run.device cpu keeps the CPU (and hides the GPU)."""
    caps: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d)))
    half = trial_placement(gpus=0.5, gpu_ids=[2], cpus=4, num_workers=2)
    assert (half.device, half.visible_devices, half.memory_fraction, half.threads, half.workers) == \
        ("cuda", "2", 0.5, 4, 2)
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    apply_placement(half, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and caps == [(0.5, 0)]
    whole = trial_placement(gpus=1, gpu_ids=["3"], cpus=2)
    apply_placement(whole, env)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and whole.memory_fraction is None and caps == [(0.5, 0)]
    assert trial_placement(gpus=1, gpu_ids=[0], cpus=1, device="cpu").visible_devices == ""


def test_placement_errors_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"run.device is 'cuda' but the trial has no GPU \(--gpus-per-trial 0\)"):
        trial_placement(gpus=0, gpu_ids=[], cpus=1, device="cuda")
    with pytest.raises(RuntimeError, match="no GPU id"):
        trial_placement(gpus=1, gpu_ids=[], cpus=1)
    with pytest.raises(ValueError, match="expected GPU >= 0 and CPU > 0"):
        trial_placement(gpus=-1, gpu_ids=[], cpus=1)


@pytest.mark.parametrize(("configured", "cpus", "workers"), [(2, 1, 0), (2, 2, 1), (2, 4, 2), (0, 8, 0), (4, 2.5, 1)])
def test_loader_workers_follow_the_cpus(configured: int, cpus: float, workers: int) -> None:
    """min(configured, floor(cpus) - 1): one CPU trains, the others load."""
    assert loader_workers(configured, cpus) == workers


def test_default_gpus_per_trial() -> None:
    assert default_gpus_per_trial(4) == 1 and default_gpus_per_trial(1) == 1
    assert default_gpus_per_trial(0) == 0 and default_gpus_per_trial(0.5) == 0
    assert default_gpus_per_trial(4, "cpu") == 0


def test_place_trial_forces_the_device_a_zero_gpu_trial_would_otherwise_miss(monkeypatch, keep_threads) -> None:
    """The finding: 4 GPUs visible, Ray gives the trial 0 GPUs and leaves CUDA_VISIBLE_DEVICES set, so
    ``run.device: auto`` alone would pick GPU 0. The placed config says cpu; a 0.25-GPU trial with
    4 CPUs gets cuda on its id, 2 loader workers and a 25% memory cap."""
    fake_cuda(monkeypatch, [A100] * 4)
    caps: list = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append(f))
    cfg = load_config("voc")
    assert resolve_device(cfg.run.device).type == "cuda"  # what every trial did before
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    placed, p = place_trial(cfg, resources={"CPU": 1.0, "GPU": 0.0}, gpu_ids=[], environ=env)
    assert placed.run.device == "cpu" and resolve_device(placed.run.device) == CPU
    assert placed.data.num_workers == 0 and env["CUDA_VISIBLE_DEVICES"] == ""
    placed, p = place_trial(cfg, resources={"CPU": 4.0, "GPU": 0.25}, gpu_ids=[1], environ=env)
    assert (placed.run.device, placed.data.num_workers, env["CUDA_VISIBLE_DEVICES"], caps) == ("cuda", 2, "1", [0.25])


def test_run_trial_with_ray_resources_trains_on_the_cpu(synth_root: Path, tmp_path: Path, monkeypatch,
                                                       keep_threads) -> None:
    """A trial given 0 GPUs records run.device cpu and 0 loader workers in its config.yaml, and its
    process no longer lists the GPUs."""
    from wsss_tune.config import to_dict
    from wsss_tune.trainables.trainable import SETTINGS_KEY, TrialSettings, run_trial

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    base = load_config("synth", {**SMOKE_OVERRIDES, "data.root": str(synth_root), "run.device": "auto",
                                 "data.num_workers": 2})
    settings = TrialSettings(base=to_dict(base), stages=("eps",), runs_dir=str(tmp_path / "runs"),
                             store=str(tmp_path / "store"), metric="eps_miou_tune", threads=1)
    run_trial({SETTINGS_KEY: settings.to_dict()}, trial_id="t0", report_fn=lambda *a, **k: None,
              resources={"CPU": 1.0, "GPU": 0.0}, gpu_ids=[])
    written = load_config(tmp_path / "runs" / "t0" / "config.yaml")
    assert written.run.device == "cpu" and written.data.num_workers == 0
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_sweep_default_gpus_follow_the_cluster(synth_root: Path, tmp_path: Path) -> None:
    """No --gpus-per-trial: 1 GPU per trial on a 4-GPU cluster (and the line says it is the default),
    0 without GPUs or with run.device cpu; a given share is kept and described."""
    gpus, line = trial_gpus(None, cpus_per_trial=4, cluster=4)
    assert gpus == 1 and "1 GPU (one trial per GPU)" in line and "default, the Ray cluster has 4 GPU(s)" in line
    gpus, line = trial_gpus(None, cpus_per_trial=1, cluster=0)
    assert gpus == 0 and "trains on the CPU" in line
    assert trial_gpus(None, cpus_per_trial=1, cluster=4, device="cpu")[0] == 0
    gpus, line = trial_gpus(0.5, cpus_per_trial=2, cluster=4)
    assert gpus == 0.5 and "up to 2 trials share a card, each capped at 50%" in line

    plan = plan_sweep("synth_rw", data=synth_root, storage=tmp_path, name="p", cluster=4)
    assert plan.gpus_default and plan.record.resources.gpus_per_trial == 1
    # Ray came up on a cluster without GPUs: the default follows it and sweep.json records it.
    plan.exp_dir.mkdir(parents=True)
    from wsss_tune.analysis.results import write_sweep

    write_sweep(plan.exp_dir, plan.record)
    settled = settle_gpus(plan, 0)
    assert settled.record.resources.gpus_per_trial == 0 and "trains on the CPU" in settled.resources_line
    assert load_sweep(plan.exp_dir).resources.gpus_per_trial == 0
    given = plan_sweep("synth_rw", data=synth_root, storage=tmp_path, name="q", gpus_per_trial=0.5, cluster=0)
    assert not given.gpus_default and settle_gpus(given, 4) is given
    with pytest.raises(ValueError, match="run.device is 'cuda' but trials get no GPU"):
        plan_sweep("synth_rw", data=synth_root, storage=tmp_path, name="r", cluster=0,
                   overrides={"run.device": "cuda"})


# --------------------------------------------------------------------------------------------------
# 2. Precision that fits the card
# --------------------------------------------------------------------------------------------------


def test_bf16_only_where_native(monkeypatch) -> None:
    """A T4 (sm 7.5) passes torch's default bf16 check (emulation counts) but gets fp16 + a GradScaler;
    an A100 (sm 8.0) gets bf16 and no scaler; the CPU and amp off stay float32."""
    fake_cuda(monkeypatch, [T4])
    assert torch.cuda.is_bf16_supported()  # the trap
    assert amp_dtype(CUDA) == torch.float16 and needs_grad_scaler(CUDA, True)
    assert precision_name(CUDA, True) == "fp16 autocast + GradScaler"
    assert isinstance(make_grad_scaler(CUDA, True), torch.amp.GradScaler)
    fake_cuda(monkeypatch, [A100])
    assert amp_dtype(CUDA) == torch.bfloat16 and make_grad_scaler(CUDA, True) is None
    assert amp_dtype(CUDA, enabled=False) is None and make_grad_scaler(CUDA, False) is None
    assert amp_dtype(CPU) is None and precision_name(CPU, True) == "fp32" and make_grad_scaler(CPU, True) is None
    assert isinstance(autocast(CPU, True), type(autocast(CPU, False)))  # both no-ops on the CPU


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """The CPU treated as a card without native bf16: autocast float16 and a GradScaler("cpu")."""
    monkeypatch.setattr(runtime, "amp_dtype", lambda device, enabled=True: torch.float16 if enabled else None)


def test_fp16_grad_scaler_path_trains_skips_an_overflow_and_resumes(tmp_path, fp16_on_cpu) -> None:
    """fp16 autocast + GradScaler on the CPU: a step runs the conv in float16 and updates the weights;
    a step with an infinite loss is skipped (weights unchanged) and halves the scale; the scale is
    checkpointed and a resumed loop continues with it."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = make_grad_scaler(CPU, True)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 65536.0
    dtypes: list[torch.dtype] = []
    blow_up = {3}

    def run(batches, step):
        with autocast(CPU, True):
            out = model(batches[0]["image"])
        dtypes.append(out.dtype)
        loss = out.float().pow(2).mean() * (float("inf") if step in blow_up else 1.0)
        optimizer.zero_grad(set_to_none=True)
        backward(loss, scaler)
        optimizer_step(optimizer, scaler)
        return {"toy/loss": 0.0}

    class Images:
        def __len__(self):
            return 4

        def get(self, i, rng):
            return {"image": torch.from_numpy(rng.normal(size=(3, 8, 8)).astype("float32"))}

    def loop(total):
        return TrainingLoop("toy", total=total, total_field="toy.iterations", ckpts=CheckpointManager(tmp_path),
                            reporter=SimpleNamespace(report=lambda *a, **k: None), model=model, optimizer=optimizer,
                            scaler=scaler, new_window=LogWindow, log_every=1, checkpoint_every=1)

    step = TrainStep(model=model, optimizer=optimizer, scaler=scaler, run=run)
    before = model.weight.detach().clone()
    loop(2).run(step, Images(), batch_size=2, seed=0, lr=0.01, poly_power=0.0)
    assert dtypes == [torch.float16] * 2 and not torch.equal(before, model.weight)
    scale = scaler.get_scale()
    after_two = model.weight.detach().clone()
    loop(3).run(step, Images(), batch_size=2, seed=0, lr=0.01, poly_power=0.0)
    assert torch.equal(after_two, model.weight) and scaler.get_scale() == scale / 2
    saved = CheckpointManager(tmp_path).latest()[1]["scaler"]
    scaler.update(1.0)  # a fresh process's scaler ...
    loop(3).restore()  # ... restored from the checkpoint
    assert scaler.get_scale() == saved["scale"] == scale / 2


def test_affinity_step_under_fp16_keeps_the_affinities_in_float32(fp16_on_cpu) -> None:
    """The AffinityNet stage step with amp on a card without bf16: the backbone runs in float16, the
    fuse conv and the affinities in float32, and the scaler is the stage's."""
    from wsss_tune.stages.affinity import make_affinity_step

    a = load_config("synth", {"affinity.amp": True}).affinity
    torch.manual_seed(0)
    model = build_affinity_net(backbone="tiny", widths=a.widths, out_channels=a.out_channels)
    seen: dict[str, torch.dtype] = {}
    model.reduce[0].register_forward_hook(lambda m, i, o: seen.update(reduce=o.dtype))
    model.fuse.register_forward_hook(lambda m, i, o: seen.update(fuse=o.dtype))
    step = make_affinity_step(a, model, device=CPU)
    assert isinstance(step.scaler, torch.amp.GradScaler)
    s = a.crop_size
    values = step([{"image": torch.randn(2, 3, s, s), "mask": torch.randint(0, 3, (2, s, s))}], 1)
    assert seen == {"reduce": torch.float16, "fuse": torch.float32}
    assert torch.isfinite(torch.tensor(values["affinity/loss"]))


def test_affinity_features_and_affinities_are_float32_under_bf16_autocast() -> None:
    """Under bf16 autocast the reductions run in bf16 but the fuse conv gets its input cast to float32
    and runs in float32: the features equal a float32 conv of that input exactly. The affinities of
    bf16 features are those of the same features in float32, computed with autocast off."""
    torch.manual_seed(0)
    model = build_affinity_net(backbone="tiny", widths=(4, 4, 8), out_channels=8).eval()
    seen: dict[str, torch.Tensor] = {}
    model.reduce[0].register_forward_hook(lambda m, i, o: seen.update(reduce=o))
    model.fuse.register_forward_hook(lambda m, i, o: seen.update(fuse_in=i[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model(torch.randn(1, 3, 48, 48))
        aff = affinity_from_features(feats.to(torch.bfloat16), radius=2)
    assert seen["reduce"].dtype == torch.bfloat16 and seen["fuse_in"].dtype == torch.float32
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, F.elu(F.conv2d(seen["fuse_in"], model.fuse.weight)), rtol=0, atol=0)
    assert aff.dtype == torch.float32
    torch.testing.assert_close(aff, affinity_from_features(feats.to(torch.bfloat16).float(), radius=2), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# 4. Portable resume
# --------------------------------------------------------------------------------------------------


def fake_rng_devices(monkeypatch, count: int, current: int = 0) -> list[tuple[int, int]]:
    """``count`` fake devices whose RNG state is one byte, its index + 10; returns the
    ``(state byte, device)`` pairs ``set_rng_state`` receives."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i: torch.tensor([10 + i], dtype=torch.uint8))

    def set_state(state, device):
        if not 0 <= device < count:
            raise IndexError(f"no device {device}")
        calls.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    return calls


@pytest.mark.parametrize(("saved", "saved_current", "now", "now_current", "expected"), [
    (4, 0, 1, 0, [(10, 0)]),  # 4 GPUs -> 1: device 0 gets its state, the other three are ignored
    (4, 2, 1, 0, [(12, 0)]),  # trained on device 2: its stream continues on the one device there is
    (1, 0, 4, 0, [(10, 0)]),  # 1 -> 4: device 0 gets it, the others keep their seeded state
    (2, 1, 3, 2, [(11, 2), (10, 0), (11, 1)]),  # current device first, then the others by index
])
def test_cuda_rng_state_restores_with_another_device_count(tmp_path, monkeypatch, saved, saved_current, now,
                                                          now_current, expected) -> None:
    fake_rng_devices(monkeypatch, saved, saved_current)
    state = capture_rng()
    assert [int(s[0]) for s in state["cuda"]] == [10 + i for i in range(saved)]
    assert state["cuda_device"] == saved_current
    CheckpointManager(tmp_path).save(1, {"rng": state})  # through a weights_only checkpoint
    state = CheckpointManager(tmp_path).latest()[1]["rng"]
    calls = fake_rng_devices(monkeypatch, now, now_current)
    restore_rng(state)
    assert calls == expected


def test_a_checkpoint_from_before_the_device_index_was_saved_still_resumes(monkeypatch) -> None:
    """Old checkpoints hold the list only: the current device gets device 0's state; no GPU now: the
    CUDA states are ignored."""
    fake_rng_devices(monkeypatch, 4)
    state = capture_rng()
    del state["cuda_device"]
    calls = fake_rng_devices(monkeypatch, 2, current=1)
    restore_rng(state)
    assert calls == [(10, 1), (10, 0)]
    calls = fake_rng_devices(monkeypatch, 0)
    restore_rng(state)
    assert calls == []


# --------------------------------------------------------------------------------------------------
# 5. Fractional GPUs that behave: the out-of-memory guard and the memory model
# --------------------------------------------------------------------------------------------------


def test_out_of_memory_fails_the_trial_once_with_what_to_change(tmp_path) -> None:
    """A step that runs out of memory at step 2 is called exactly twice (no retry) and the error names
    the stage, the step, the batch and the crop, keeps torch's first line, and lists the fixes; the CLI
    prints it as one line."""
    model = torch.nn.Conv2d(3, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = itertools.count(1)

    def run(batches, step):
        if next(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
        return {}

    class Crops:
        def __len__(self):
            return 4

        def get(self, i, rng):
            return {"image": torch.zeros(3, 32, 40)}

    loop = TrainingLoop("deeplab", total=5, total_field="deeplab.iterations", ckpts=CheckpointManager(tmp_path),
                        reporter=SimpleNamespace(report=lambda *a, **k: None), model=model, optimizer=optimizer,
                        scaler=None, new_window=LogWindow, log_every=1, checkpoint_every=10)
    with pytest.raises(TrainingOutOfMemoryError) as err:
        loop.run(TrainStep(model=model, optimizer=optimizer, scaler=None, run=run), Crops(), batch_size=2, seed=0,
                 lr=0.1, poly_power=0.0)
    assert next(calls) == 3  # two calls, then the trial stopped
    text = str(err.value)
    assert isinstance(err.value, torch.OutOfMemoryError)
    assert text.startswith("deeplab: out of GPU memory at step 2, batch 2 of 32x40 crops (CUDA out of memory. "
                           "Tried to allocate 2.00 GiB.)")
    for fix in ("deeplab.batch_size", "deeplab.crop_size", "deeplab.amp=true", "--gpus-per-trial"):
        assert fix in text
    assert _expected_failure(err.value) == text and "\n" not in text


def test_cudnn_benchmark_is_on_for_training_steps_on_cuda_only(tmp_path) -> None:
    """Training crops have one size: a step on CUDA runs with cudnn.benchmark, restored afterwards;
    on the CPU the setting is left alone."""
    before = torch.backends.cudnn.benchmark
    with fixed_size_inputs(CUDA):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with fixed_size_inputs(CPU):
        assert torch.backends.cudnn.benchmark == before

    class OnCuda(torch.nn.Module):  # reports its parameters on CUDA without needing a GPU
        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=CUDA)])

    model, seen = OnCuda(), []
    optimizer = SimpleNamespace(param_groups=[])
    loop = TrainingLoop("toy", total=1, total_field="t", ckpts=CheckpointManager(tmp_path), reporter=None,
                        model=model, optimizer=optimizer, scaler=None, new_window=LogWindow, log_every=1,
                        checkpoint_every=1)
    step = TrainStep(model=model, optimizer=optimizer, scaler=None,
                     run=lambda b, i: seen.append(torch.backends.cudnn.benchmark) or {})
    loop._step(step, [{}], 1, 1)
    assert seen == [True] and torch.backends.cudnn.benchmark == before


def test_memory_estimate_by_hand() -> None:
    """1e6 parameters (5e5 trainable), 1,000 B/px of activations (100 B/px kept float32), batch 2 of
    100x100 crops, amp on, SGD with momentum:

    weights 4 B x 1e6 = 4e6; casts 2 B x 1e6 = 2e6; gradients 4 B x 5e5 = 2e6; optimiser 2e6;
    activations (1000 x 0.5 + 100) x 1e4 px x 2 x 1.25 = 1.5e7; CUDA 1e9: total 1.025e9.
    Without amp: no casts, activations (1000 + 100) x 2e4 x 1.25 = 2.75e7."""
    prof = MemoryProfile(model="toy", params=1_000_000, trainable=500_000, activation_bytes_per_pixel=1000.0,
                         fp32_bytes_per_pixel=100.0)
    est = estimate_memory(prof, stage="toy", batch=2, crop=100, amp=True, optimizer_states=1)
    assert (est.weights, est.casts, est.gradients, est.optimizer) == (4e6, 2e6, 2e6, 2e6)
    assert est.activations == pytest.approx(1.5e7) and est.total == pytest.approx(1.025e9)
    fp32 = estimate_memory(prof, stage="toy", batch=2, crop=100, amp=False, optimizer_states=2)
    assert fp32.casts == 0 and fp32.optimizer == 4e6 and fp32.activations == pytest.approx(2.75e7)
    assert (optimizer_states("sgd", 0.9), optimizer_states("sgd", 0.0), optimizer_states("adam", 0.9)) == (1, 0, 2)
    with pytest.raises(ValueError, match="batch=0"):
        estimate_memory(prof, stage="toy", batch=0, crop=100, amp=True, optimizer_states=1)


def test_saved_tensor_bytes_by_hand() -> None:
    """exp saves its output: 1,000 floats = 4,000 B. x * x saves x twice, one storage: 4,000 B; x
    excluded (a parameter): 0."""
    x = torch.randn(10, 100, requires_grad=True)
    assert saved_tensor_bytes(lambda: torch.exp(x)) == 4000
    assert saved_tensor_bytes(lambda: x * x) == 4000
    assert saved_tensor_bytes(lambda: x * x, exclude=[x]) == 0


def test_gpu_memory_check_thresholds_by_hand(monkeypatch) -> None:
    """Each stage at 1,000 B/px, no weights, batch 1 of 100x100, amp off: 1e3 x 1e4 x 1.25 = 1.25e7 B
    of activations + 1e9 CUDA = 1.0125e9 B. A 2e9 B card: ok; half of it (0.5 GPU): a problem; a
    1.1e9 B card (over 90%): a warning. Trials on the CPU: nothing to check; an unknown card: a warning."""
    prof = MemoryProfile(model="toy", params=0, trainable=0, activation_bytes_per_pixel=1000.0)
    monkeypatch.setattr(planmod, "measure_memory_profile", lambda cfg, stage, num_classes: prof)
    cfg = load_config("synth", {"eps.crop_size": 100, "eps.batch_size": 1})
    (ok,) = check_gpu_memory(cfg, ("eps",), gpu_bytes=2e9, gpus_per_trial=1)
    assert ok.name == "memory.eps" and ok.status == "ok" and "~1.0 GB" in ok.message
    (half,) = check_gpu_memory(cfg, ("eps",), gpu_bytes=2e9, gpus_per_trial=0.5)
    assert half.status == "problem" and "the trial has 1.0 GB" in half.message and "eps.batch_size" in half.fix
    assert check_gpu_memory(cfg, ("eps",), gpu_bytes=1.1e9, gpus_per_trial=1)[0].status == "warn"
    assert check_gpu_memory(cfg, ("eps",), gpu_bytes=2e9, gpus_per_trial=0) == []
    assert check_gpu_memory(load_config("synth", {"run.device": "cpu"}), ("eps",), gpu_bytes=1.0,
                            gpus_per_trial=1) == []
    assert check_gpu_memory(cfg, ("eps",), gpu_bytes=None, gpus_per_trial=1)[0].status == "warn"
    # Batch 2: 2.5e7 + 1e9 = 1.025e9 B, over a 1.02e9 B card; 2 GPUs per trial hold batch 1 each: fits.
    two = load_config("synth", {"eps.crop_size": 100, "eps.batch_size": 2})
    assert check_gpu_memory(two, ("eps",), gpu_bytes=1.02e9, gpus_per_trial=1)[0].status == "problem"
    assert check_gpu_memory(two, ("eps",), gpu_bytes=1.02e9, gpus_per_trial=2)[0].status == "warn"


def test_deeplab_msc_at_448_without_amp_does_not_fit_a_24gb_card() -> None:
    """The reference DeepLab v2 (ResNet-101, batch 10) with MSC at 448: in float32 over 24 GB; with
    amp it fits; with amp on half a card it does not (measured on the meta device)."""
    cfg = load_config("voc", {"deeplab.msc": True, "deeplab.crop_size": 448, "deeplab.amp": False,
                              "deeplab.mask_source": "gt"})
    (fp32,) = check_gpu_memory(cfg, ("deeplab",), gpu_bytes=24e9, gpus_per_trial=1, gpu_name="RTX 3090")
    assert fp32.status == "problem" and "DeepLab v2 resnet101 msc" in fp32.message and "deeplab.amp=true" in fp32.fix
    amp = load_config("voc", {"deeplab.msc": True, "deeplab.crop_size": 448, "deeplab.mask_source": "gt"})
    assert check_gpu_memory(amp, ("deeplab",), gpu_bytes=24e9, gpus_per_trial=1)[0].status == "ok"
    assert check_gpu_memory(amp, ("deeplab",), gpu_bytes=24e9, gpus_per_trial=0.5)[0].status == "problem"


# --------------------------------------------------------------------------------------------------
# doctor and preflight say what each trial gets
# --------------------------------------------------------------------------------------------------


def cards(*specs: tuple[str, tuple[int, int], float]) -> list[GpuInfo]:
    return [GpuInfo(i, name, cap, int(total)) for i, (name, cap, total) in enumerate(specs)]


def test_trial_device_check_reports_device_precision_and_cpus() -> None:
    cfg = load_config("voc")
    four = check_trial_device(cfg, inventory=cards(A100, A100, A100, A100), cpus_per_trial=4)
    assert four.status == "ok" and "default --gpus-per-trial 1" in four.message
    assert "cuda, 1 GPU, 4 trial(s) at once on 4 GPU(s)" in four.message
    assert "NVIDIA A100-SXM4-80GB: bf16 autocast" in four.message and "4 torch thread(s), 2 loader worker(s)" in four.message
    t4 = check_trial_device(cfg, inventory=cards(T4, T4), gpus_per_trial=0.5)
    assert "memory capped at 50% (8.0 GB)" in t4.message and "4 trial(s) at once" in t4.message
    assert "Tesla T4: fp16 autocast + GradScaler (no native bf16)" in t4.message
    none = check_trial_device(cfg, inventory=[])
    assert none.status == "ok" and "cpu, float32" in none.message and "0 GPU(s) here" in none.message
    assert check_trial_device(load_config("voc", {"run.device": "cuda"}), inventory=[]).status == "problem"
    assert check_trial_device(cfg, inventory=[], gpus_per_trial=1).status == "warn"


def test_doctor_reports_the_trial_device_on_a_simulated_gpu_box(synth_root: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    fake_cuda(monkeypatch, [RTX3090] * 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    checks = {c.name: c for c in run_doctor(data=synth_root, config="synth", store=str(tmp_path / "store"),
                                            experiments=tmp_path / "exp")}
    trial = checks["trial.device"]
    assert trial.status == "ok" and "cuda, 1 GPU, 4 trial(s) at once on 4 GPU(s)" in trial.message
    assert "amp (none)" in trial.message  # the synth config trains in float32


def test_preflight_cli_reports_the_device_and_rejects_what_cannot_fit(synth_root: Path, tmp_path: Path) -> None:
    """No GPU here: with --gpu-memory the memory of the trials' cards is checked anyway. The tiny synth
    models need about the CUDA overhead: 0.5 GB cannot hold them, 24 GB can."""
    args = ["preflight", "synth", "--data", str(synth_root), "--set", f"run.artifact_store={tmp_path / 'store'}",
            "--cpus-per-trial", "2"]
    small = runner.invoke(app, [*args, "--gpu-memory", "0.5"])
    assert small.exit_code == 1, small.output
    assert "problem memory.eps" in small.output and "does not fit" in small.output
    assert "trial.device" in small.output and "--gpus-per-trial 1" in small.output
    big = runner.invoke(app, [*args, "--gpu-memory", "24"])
    assert big.exit_code == 0, big.output
    assert "ok      memory.deeplab" in big.output
    cpu = runner.invoke(app, args)
    assert cpu.exit_code == 0 and "cpu, float32; 2 CPU: 2 torch thread(s)" in cpu.output and "memory." not in cpu.output
    bad = runner.invoke(app, [*args, "--gpu-memory", "-1"])
    assert bad.exit_code == 2 and "--gpu-memory -1" in bad.output
