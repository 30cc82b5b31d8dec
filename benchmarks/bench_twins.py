"""Train-step time of each small normalizer-free ResNet against its BatchNorm twin.

One step is forward, cross-entropy, backward and an SGD step, on a fixed batch of 64 one-channel
32 px images with 10 classes. The two members of a pair alternate within a round (which goes first
changes every round), round 0 warms up the allocator and oneDNN's kernel caches and is not counted;
the ratio is taken within each round and its median reported, so a noisy shared machine slows both
members of a round alike.
"""
from __future__ import annotations

import statistics
import time

import timm
import torch
import torch.nn.functional as F

from normfree.models.small_resnets import FAMILY, batchnorm_twin_name

ROUNDS = 20
BATCH, SIZE, CHANNELS, CLASSES = 64, 32, 1, 10


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def time_pair(names: tuple[str, str]) -> dict[str, list[float]]:
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, CHANNELS, SIZE, SIZE), torch.randint(0, CLASSES, (BATCH,))
    models = {name: timm.create_model(name, num_classes=CLASSES, in_chans=CHANNELS).train() for name in names}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(ROUNDS + 1):
        for name in names[round_ % 2:] + names[: round_ % 2]:
            elapsed = train_step(models[name], optimizers[name], x, y)
            if round_:
                times[name].append(elapsed)
    return times


def run() -> list[dict]:
    rows = []
    benchmark = f"train step, batch {BATCH}, {SIZE} px, {CHANNELS} channel"
    for size in FAMILY:
        nf = f"nf_resnet_{size}"
        bn = batchnorm_twin_name(nf)
        times = time_pair((nf, bn))
        ratio = statistics.median(t_nf / t_bn for t_nf, t_bn in zip(times[nf], times[bn]))
        setting = f"{nf} vs {bn}, {ROUNDS} rounds"
        rows += [
            dict(benchmark=benchmark, setting=setting, measurement=f"{name} median ms",
                 value=f"{statistics.median(times[name]) * 1e3:.1f}", target="")
            for name in (nf, bn)
        ]
        rows.append(dict(benchmark=benchmark, setting=setting, measurement="NF time / BN time (median of round ratios)",
                         value=f"{ratio:.2f}x", target="<= 1.0x", ok=ratio <= 1.0))
    return rows
