"""EPS network throughput (training step and inference, images/s) and ResNet-38 forward FLOPs.

Tiny and ResNet-38 EPS nets (20 classes) on the default device. On the CPU ResNet-38 runs at batch 1
with one timed iteration (a 448 training step takes tens of seconds on 2 cores); ``quick`` uses
smaller inputs. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta
device (2 FLOPs per multiply-add); the ResNet-38 EPS forward at 448x448 is about 0.8 TFLOP.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from wsss_tune.models.eps_net import EPSNet
from wsss_tune.models.registry import create_backbone, list_backbones
from wsss_tune.utils.runtime import autocast, resolve_device, seed_everything

__all__ = ["run", "forward_flops"]

#: VOC object classes (the EPS head has one more, the background).
NUM_CLASSES = 20
#: Reference EPS crop size, at which the FLOPs of ResNet-38 are always reported.
REFERENCE_CROP = 448
#: (backbone, input size, batch, timed iterations, warm-up iterations) per device type and mode.
CASES: dict[tuple[str, bool], list[tuple[str, int, int, int, int]]] = {
    ("cpu", False): [("tiny", 96, 16, 5, 1), ("resnet38", 448, 1, 1, 1)],
    ("cpu", True): [("tiny", 64, 8, 2, 1), ("resnet38", 160, 1, 1, 1)],
    ("cuda", False): [("tiny", 96, 64, 20, 3), ("resnet38", 448, 8, 10, 2)],
    ("cuda", True): [("tiny", 96, 64, 5, 1), ("resnet38", 448, 4, 3, 1)],
}


def forward_flops(backbone: str, size: int) -> float:
    """FLOPs of one EPS forward on a ``size`` x ``size`` image (meta device: no compute, no memory)."""
    list_backbones()  # import the backbone modules outside the meta-device context
    with torch.device("meta"):
        net = EPSNet(backbone=create_backbone(backbone), num_classes=NUM_CLASSES).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, size, size))
    return float(counter.get_total_flops())


def _timed(fn: Callable[[], None], *, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def _measure(backbone: str, size: int, batch: int, iters: int, warmup: int, device: torch.device,
             amp: bool) -> dict:
    seed_everything(0)
    net = EPSNet(backbone=create_backbone(backbone), num_classes=NUM_CLASSES).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = (torch.rand(batch, NUM_CLASSES, device=device) < 0.2).float()
    opt = torch.optim.SGD(net.param_groups(1e-3, 10.0, 5e-4), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with autocast(device, amp):
            logits, maps = net(x)
            # Classification loss plus a pixel term, so the backward pass covers the maps as EPS does.
            loss = F.multilabel_soft_margin_loss(logits[:, :NUM_CLASSES], labels) + maps.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step() -> None:
        with torch.no_grad(), autocast(device, amp):
            net.forward_maps(x)

    net.train()
    t_train = _timed(train_step, iters=iters, warmup=warmup, device=device)
    net.eval()
    t_infer = _timed(infer_step, iters=iters, warmup=warmup, device=device)
    return {
        "model": f"eps/{backbone}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "amp": amp,
        "input": f"{batch}x3x{size}x{size}",
        "iters": iters,
        "train_img_s": batch / t_train,
        "infer_img_s": batch / t_infer,
        "fwd_GFLOP_img": forward_flops(backbone, size) / 1e9,
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
    }


def run(quick: bool) -> list[dict]:
    device = resolve_device("auto")
    rows = []
    for backbone, size, batch, iters, warmup in CASES[(device.type, quick)]:
        for amp in ((False, True) if device.type == "cuda" else (False,)):
            rows.append(_measure(backbone, size, batch, iters, warmup, device, amp))
    if not any(r["model"] == "eps/resnet38" and r["input"].endswith(f"x{REFERENCE_CROP}") for r in rows):
        rows.append({"model": "eps/resnet38", "input": f"1x3x{REFERENCE_CROP}x{REFERENCE_CROP}",
                     "fwd_GFLOP_img": forward_flops("resnet38", REFERENCE_CROP) / 1e9})
    return rows
