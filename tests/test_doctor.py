"""`run_doctor` / `wsss-tune doctor`: each check's ok / warn / problem and its fix line."""

from __future__ import annotations

import socket
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsss_tune import doctor
from wsss_tune.cli import app
from wsss_tune.config import load_config
from wsss_tune.data import VOCLayout
from wsss_tune.doctor import (
    ArtifactEstimate,
    Check,
    check_disk,
    check_ray_cluster,
    check_ray_gpus,
    check_torch_gpus,
    check_wandb,
    estimate_artifacts,
    exit_code,
    format_checks,
    run_doctor,
)
from wsss_tune.models.tiny import tiny
from wsss_tune.models.weights import write_mxnet_params

runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster, W&B offline, all GPUs visible: the environment checks do not depend on the machine."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_synth_data_and_config_pass(synth_root: Path, tmp_path: Path) -> None:
    """The tiny synthetic dataset with the synth config: every data, weights and disk check is ok
    (tiny backbones train from scratch) and the exit code is 0."""
    checks = run_doctor(data=synth_root, config="synth", store=str(tmp_path / "store"),
                        experiments=tmp_path / "exp")
    found = by_name(checks)
    for name in ("config", "data", "data.files", "disk.artifacts", "disk.experiments", "weights.eps",
                 "weights.affinity", "weights.deeplab", "wandb", "ray.cluster"):
        assert found[name].status == "ok", found[name].line()
    assert "train_aug 24, train 8, val 8 ids" in found["data"].message
    assert exit_code(checks) == 0


def test_missing_data_root_is_a_problem_with_a_fix(tmp_path: Path) -> None:
    checks = run_doctor(data=tmp_path / "nothere", config="synth", store=str(tmp_path))
    data = by_name(checks)["data"]
    assert data.status == "problem" and "does not exist" in data.message
    assert "wsss-tune data prepare-voc --voc" in data.fix and str(tmp_path / "nothere") in data.fix
    assert "| fix: wsss-tune data prepare-voc" in data.line()
    assert exit_code(checks) == 1


def test_missing_weights_file_is_a_problem_with_a_fix(synth_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    checks = run_doctor(data=synth_root, config="synth", overrides=[f"eps.pretrained={missing}"],
                        store=str(tmp_path))
    eps = by_name(checks)["weights.eps"]
    assert eps.status == "problem" and f"{missing}: not found" in eps.message
    assert "set eps.pretrained=PATH" in eps.fix and "nothing is downloaded" in eps.fix
    assert exit_code(checks) == 1


def test_weights_dry_run_fits_or_names_the_mismatch(synth_root: Path, tmp_path: Path) -> None:
    """A tiny backbone state fits eps (tiny): ok with the load summary (35 keys). A ResNet-38 MXNet
    file given to the tiny DeepLab backbone fits nothing: a problem pointing at `weights inspect`."""
    good = tmp_path / "tiny.pth"
    torch.save(tiny().state_dict(), good)
    bad = tmp_path / "a1.params"
    write_mxnet_params(bad, {"arg:conv1a_weight": np.zeros((64, 3, 3, 3), np.float32)})
    cfg = load_config("synth", [f"data.root={synth_root}", f"eps.pretrained={good}",
                                f"deeplab.pretrained={bad}"])
    checks = by_name(doctor.check_weights(cfg))
    assert checks["weights.eps"].status == "ok" and "loaded 35 keys" in checks["weights.eps"].message
    dl = checks["weights.deeplab"]
    assert dl.status == "problem" and "does not fit the tiny backbone" in dl.message
    assert f"wsss-tune weights inspect {bad}" in dl.fix


def test_empty_pretrained_warns_for_a_reference_backbone() -> None:
    cfg = load_config("voc", ["eps.pretrained=", "deeplab.pretrained="])
    checks = by_name(doctor.check_weights(cfg, num_classes=20))
    assert checks["weights.eps"].status == "warn" and "ilsvrc-cls_rna-a1" in checks["weights.eps"].fix


def test_data_check_samples_unless_full(synth_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a sample of 4 ids per split, a saliency map deleted for a train_aug id outside the sample
    goes unseen; --full reads it and reports the missing file, with the saliency hint in the fix."""
    monkeypatch.setattr(doctor, "DATA_SAMPLE_IDS", 4)
    layout = VOCLayout(root=synth_copy)
    ids = layout.split_ids("train_aug")
    unseen = next(i for i in ids if i not in doctor._sample(ids, 4))
    layout.saliency_path(unseen).unlink()
    cfg = load_config("synth", [f"data.root={synth_copy}"])
    sampled = by_name(doctor.check_data(cfg))
    assert sampled["data.files"].status == "ok" and "up to 4 sampled ids" in sampled["data.files"].message
    full = by_name(doctor.check_data(cfg, full=True))["data.files"]
    assert full.status == "problem" and "missing_file" in full.message and unseen in full.message
    assert "put the saliency maps in" in full.fix and "--saliency-from-gt" in full.fix


def test_estimate_artifacts_by_hand() -> None:
    """10 images of 64x64 = 4,096 px, 2.5 CAM channels, 34 offsets at stride 8 (64 cells), models of
    100 and 200 parameters, 2 checkpoints kept:
    CAMs 10 x 2.5 x 4096 x 2 B = 204,800; affinities 10 x 34 x 64 x 2 B = 43,520;
    masks 10 x 2 x 4096 x 0.05 B = 4,096; checkpoints 300 x 4 B x (2 x 2 + 2) = 7,200; total 259,616."""
    est = estimate_artifacts(num_images=10, mean_pixels=4096, mean_cam_channels=2.5, affinity_offsets=34,
                             output_stride=8, model_params=[100, 200], keep_checkpoints=2)
    assert est == ArtifactEstimate(cams=204800, affinities=43520, masks=4096, checkpoints=7200)
    assert est.total == 259616


@pytest.mark.parametrize(("free", "status"), [(500, "problem"), (2000, "warn"), (10_000, "ok")])
def test_disk_thresholds(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int,
                         status: str) -> None:
    """One configuration needs 1,000 B (patched estimate): below that a problem, below 4 x 1,000 a
    warning, above it ok."""
    monkeypatch.setattr(doctor, "estimate_artifacts", lambda **_: ArtifactEstimate(1000, 0, 0, 0))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda _: usage(10**6, 0, free))
    cfg = load_config("synth", [f"data.root={synth_root}"])
    check = by_name(check_disk(cfg, store=str(tmp_path / "a" / "b")))["disk.artifacts"]
    assert check.status == status and str(tmp_path) in check.message


def test_disk_remote_store_is_not_checked(synth_root: Path) -> None:
    cfg = load_config("synth", [f"data.root={synth_root}"])
    check = by_name(check_disk(cfg, store="s3://bucket/artifacts"))["disk.artifacts"]
    assert check.status == "ok" and "not checked" in check.message


def test_gpu_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU: a warning, a problem when the config demands cuda. Two fake GPUs: named with the
    CUDA/cuDNN versions. Ray's view: CUDA_VISIBLE_DEVICES listing 4 ids while torch sees 2 is a
    problem; listing 2 is ok."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_torch_gpus().status == "warn"
    cuda = check_torch_gpus(device="cuda")
    assert cuda.status == "problem" and "nvidia-smi" in cuda.fix
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    ok = check_torch_gpus()
    assert ok.status == "ok" and ok.message.startswith("2 GPU(s): 2x Fake GPU") and "cuDNN 90100" in ok.message
    assert check_ray_gpus(torch_count=2).status == "ok"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    bad = check_ray_gpus(torch_count=2)
    assert bad.status == "problem" and "lists 4 GPU(s) but torch sees 2" in bad.message
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert check_ray_gpus(torch_count=2).status == "ok"


def test_ray_cluster_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset: ok (local Ray). A listening port answers: ok. A closed port: a problem with a fix.
    ``ray://host`` defaults to the client port 10001; ``auto`` without a running local cluster is a problem."""
    assert check_ray_cluster().status == "ok"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{server.getsockname()[1]}")
        assert check_ray_cluster().status == "ok"
    closed = check_ray_cluster()  # the same port, now closed
    assert closed.status == "problem" and "cannot reach 127.0.0.1" in closed.message and "ray start" in closed.fix
    seen = []
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example")

    def fake_connect(addr: tuple[str, int], timeout: float) -> socket.socket:
        seen.append((addr, timeout))
        raise OSError("refused")

    assert check_ray_cluster(connect=fake_connect).status == "problem"
    assert seen == [(("head.example", 10001), doctor.RAY_PROBE_TIMEOUT_S)]
    monkeypatch.setattr(doctor, "RAY_CURRENT_CLUSTER_FILE", tmp_path / "ray_current_cluster")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert check_ray_cluster().status == "problem"


def test_wandb_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """offline: ok; online without a key: a warning; with a key: ok, and the key is never printed."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert check_wandb().status == "ok"
    monkeypatch.setenv("WANDB_MODE", "online")
    warn = check_wandb()
    assert warn.status == "warn" and "WANDB_API_KEY is not set" in warn.message
    monkeypatch.setenv("WANDB_API_KEY", "secret-value-123")
    ok = check_wandb()
    assert ok.status == "ok" and "secret-value-123" not in ok.line()


def test_format_checks() -> None:
    text = format_checks([Check("a", "ok", "fine", "unused"), Check("b", "problem", "broken", "do this")])
    assert text.splitlines() == ["ok      a                   fine",
                                 "problem b                   broken | fix: do this",
                                 "1 problem(s), 0 warning(s), 1 ok"]


def test_cli_doctor_exit_codes(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wsss-tune doctor` prints one line per check; exit 0 on the synth setup, 1 with a missing weights file."""
    monkeypatch.chdir(tmp_path)
    ok = runner.invoke(app, ["doctor", "--config", "synth", "--data", str(synth_root)])
    assert ok.exit_code == 0, ok.output
    assert any(line.startswith("ok      data.files") for line in ok.output.splitlines())
    bad = runner.invoke(app, ["doctor", "--config", "synth", "--data", str(synth_root),
                              "--set", f"eps.pretrained={tmp_path / 'missing.pth'}"])
    assert bad.exit_code == 1
    assert any(line.startswith("problem weights.eps") and "| fix:" in line for line in bad.output.splitlines())
