"""DeepLab forward FLOPs and train / inference throughput (batch 1).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes
only, so the full 321x321 count is cheap even in ``--quick``); one multiply-add counts as 2 FLOPs.
Throughput runs on the default device (CUDA when visible, else CPU): one untimed warm-up
iteration, then ``iterations`` timed ones. A training iteration is forward, the summed cross-entropy
over the outputs, backward and an SGD step with the DeepLab LR groups.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from wsss_tune.models.deeplab import build_deeplab, deeplab_param_groups
from wsss_tune.models.registry import list_backbones
from wsss_tune.ops.seg_loss import msc_loss
from wsss_tune.utils.runtime import resolve_device

__all__ = ["run"]

#: Reference DeepLab training crop (DESIGN.md section 2) and the VOC class count with background.
CROP = 321
NUM_CLASSES = 21
#: Smaller crop for ``--quick`` throughput runs (8k + 1 like 321).
QUICK_CROP = 97
#: Any learning rate works for timing; the reference DeepLab LR.
LR = 2.5e-4


def _forward_gflop(arch: Literal["v1", "v2"], backbone: str, size: int, backbone_kwargs: dict[str, Any]) -> float:
    with torch.device("meta"):
        model = build_deeplab(arch=arch, backbone=backbone, num_classes=NUM_CLASSES,
                              backbone_kwargs=backbone_kwargs).eval()
        x = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(arch: Literal["v1", "v2"], backbone: str, size: int, iterations: int, backbone_kwargs: dict[str, Any],
                device: torch.device) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = build_deeplab(arch=arch, backbone=backbone, num_classes=NUM_CLASSES,
                          backbone_kwargs=backbone_kwargs).to(device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.randn(1, 3, size, size, device=device)
    target = torch.randint(0, NUM_CLASSES, (1, size, size), device=device)

    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            model(x)
        _sync(device)
    infer = iterations / (time.perf_counter() - t0)

    model.train()
    opt = torch.optim.SGD(deeplab_param_groups(model, lr=LR, weight_decay=5e-4), lr=LR, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        msc_loss(model(x), target).backward()
        opt.step()

    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    train = iterations / (time.perf_counter() - t0)
    return params_m, infer, train


def run(quick: bool) -> list[dict]:
    """One row per model: parameters, forward GFLOP at 321, images/s for inference and training."""
    device = resolve_device("auto")
    size = QUICK_CROP if quick else CROP
    iterations = 1 if quick else 2
    models: list[tuple[Literal["v1", "v2"], str, dict[str, Any]]] = []
    if "tiny" in list_backbones():
        models.append(("v2", "tiny", {"output_stride": 8}))
    models += [("v2", "resnet101", {}), ("v1", "resnet101", {})]
    rows = []
    for arch, backbone, kwargs in models:
        row: dict[str, Any] = {"model": f"deeplab-{arch}/{backbone}",
                               "gflop@321": _forward_gflop(arch, backbone, CROP, kwargs)}
        if arch == "v2":  # v1 differs only in the head: FLOPs are enough
            params_m, infer, train = _throughput(arch, backbone, size, iterations, kwargs, device)
            row.update({"params_M": params_m, "device": device.type, "size": size, "batch": 1,
                        "iters": iterations, "infer_img_s": infer, "train_img_s": train})
        rows.append(row)
    return rows
