"""Train-step time of normalizer-free ResNets against their BatchNorm twins, as normfree trains them.

Pairs: each small normalizer-free ResNet and its BatchNorm twin (one-channel images, 10 classes) at batch 64, 32 px
and at batch 2, 16 px (micro-batches, where normalizer-free training is wanted for its accuracy and weight
standardisation, whose cost does not shrink with the batch, weighs most); timm's nf_resnet50 with `fast_nf` against
timm's resnet50 (three channels, batch 8, 96 px). One step is forward, cross-entropy, backward and an Adam step with
torch's fused kernel (`normfree.learner.optim.fast_adam`'s, normfree's default) on a fixed batch. The two members of
a pair alternate within a round (which goes first changes every round), round 0 warms up the allocator and oneDNN's
kernel caches and is not counted; the ratio is taken within each round and its median reported, so a noisy shared
machine slows both members of a round alike.
"""
from __future__ import annotations

import statistics
import time

import timm
import torch
import torch.nn.functional as F

from normfree import fast_nf
from normfree.models.small_resnets import FAMILY, batchnorm_twin_name

ROUNDS = 20
CLASSES = 10
# (NF model, BatchNorm model, batch, image size, channels, target for NF time / BN time)
PAIRS = [
    *[(f"nf_resnet_{size}", batchnorm_twin_name(f"nf_resnet_{size}"), 64, 32, 1, 0.85) for size in FAMILY],
    *[(f"nf_resnet_{size}", batchnorm_twin_name(f"nf_resnet_{size}"), 2, 16, 1, 1.0) for size in FAMILY],
    ("nf_resnet50", "resnet50", 8, 96, 3, 0.9),
]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def time_pair(names: tuple[str, str], batch: int, size: int, channels: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, CLASSES, (batch,))
    models = {name: fast_nf(timm.create_model(name, num_classes=CLASSES, in_chans=channels)).train()
              for name in names}
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-5, fused=True)
                  for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(ROUNDS + 1):
        for name in names[round_ % 2:] + names[: round_ % 2]:
            elapsed = train_step(models[name], optimizers[name], x, y)
            if round_:
                times[name].append(elapsed)
    return times


def run() -> list[dict]:
    rows = []
    for nf, bn, batch, size, channels, target in PAIRS:
        benchmark = f"train step (fused Adam), batch {batch}, {size} px, {channels} channel{'s' * (channels > 1)}"
        times = time_pair((nf, bn), batch, size, channels)
        ratio = statistics.median(t_nf / t_bn for t_nf, t_bn in zip(times[nf], times[bn]))
        setting = f"{nf} vs {bn}, {ROUNDS} rounds"
        rows += [
            dict(benchmark=benchmark, setting=setting, measurement=f"{name} median ms",
                 value=f"{statistics.median(times[name]) * 1e3:.1f}", target="")
            for name in (nf, bn)
        ]
        rows.append(dict(benchmark=benchmark, setting=setting, measurement="NF time / BN time (median of round ratios)",
                         value=f"{ratio:.2f}x", target=f"<= {target}x", ok=ratio <= target))
    return rows
