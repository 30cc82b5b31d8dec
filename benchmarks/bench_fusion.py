"""Inference speed of nf_resnet50 after normfree.fuse_standardization, against timm's resnet50.

Eval forward under torch.inference_mode(), batch 16, 128x128 px, float32, three models:

- resnet50 (timm) with its BatchNorm folded into the convolutions by torch.fx's `fuse`, the speed an
  NF-ResNet has to match once Scaled Weight Standardization is constant;
- nf_resnet50 as timm builds it (standardises every weight at every forward);
- nf_resnet50 after fuse_standardization.

The two have the same convolutions; what is left after fusion is structure: nf_resnet50's shortcut
downsamples with a 2x2 average pool before its 1x1 conv (resnet50 strides the conv), and CPU
avg_pool2d on NCHW tensors costs about 4% of the forward; its pre-activation blocks also run one ReLU
per block out of place, since the block input is also the shortcut.

One forward of each model per round, in an order that rotates every round; ratios are taken within a
round and the median over rounds is reported, so a noisy shared machine shifts every model alike.
Round 0 warms up (oneDNN primitive caches, allocator) and is not counted. On a loaded machine the
rounds stop at a time budget, and the table says how many were run.
"""
from __future__ import annotations

import statistics
import time

import timm
import torch
from torch.fx.experimental.optimization import fuse

from normfree.models.fusion import fuse_standardization

ROUNDS = 40
BUDGET_S = 75  # seconds for the timed rounds (~20 s on an idle 2-core machine)
BATCH, SIZE = 16, 128


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    nf_resnet50 = timm.create_model("nf_resnet50").eval()
    return {
        "resnet50+BN folded": fuse(timm.create_model("resnet50").eval()),
        "nf_resnet50": nf_resnet50,
        "nf_resnet50 fused": fuse_standardization(nf_resnet50),
    }


def forward_times(run: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in run}
    names = list(run)
    deadline = time.perf_counter() + BUDGET_S
    with torch.inference_mode():
        for round_ in range(ROUNDS + 1):
            if round_ > 3 and time.perf_counter() > deadline:
                break
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                start = time.perf_counter()
                run[name](x)
                elapsed = time.perf_counter() - start
                if round_:  # round 0 warms up
                    times[name].append(elapsed)
    return times


def run() -> list[dict]:
    times = forward_times(models(), torch.randn(BATCH, 3, SIZE, SIZE))
    fused, plain, resnet = times["nf_resnet50 fused"], times["nf_resnet50"], times["resnet50+BN folded"]
    over_resnet = statistics.median(f / r for f, r in zip(fused, resnet))
    over_plain = statistics.median(f / p for f, p in zip(fused, plain))
    setting = f"eval forward, inference_mode, batch {BATCH}, {SIZE} px, float32, {len(fused)} rounds"
    ms = ", ".join(f"{name} {statistics.median(t) * 1e3:.1f}" for name, t in times.items())
    bench = "SWS fusion, nf_resnet50"
    return [
        dict(benchmark=bench, setting=setting, measurement=f"median ms: {ms}", value="", target=""),
        dict(benchmark=bench, setting=setting, measurement="fused nf_resnet50 time / BN-folded resnet50 time",
             value=f"{over_resnet:.3f}x", target="<= 1.05x", ok=over_resnet <= 1.05),
        dict(benchmark=bench, setting=setting, measurement="fused nf_resnet50 time / unfused nf_resnet50 time",
             value=f"{over_plain:.3f}x", target="<= 1.0x", ok=over_plain <= 1.0),
    ]
