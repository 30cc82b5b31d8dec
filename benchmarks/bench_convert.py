"""Train-step time of a converted torchvision ResNet against its BatchNorm original.

Each model is timed as it comes (BatchNorm) and as three conversions of it: `to_normfree(model)` (the
NF-ResNet recipe), `to_normfree(model, mode="fold")` (every BatchNorm folded into its convolution),
and that folded model trained with AGC (`adaptive_clip_grad_` on every parameter but the classifier's,
lambda 0.01, before the optimizer step); the folded model has no normalisation left, so AGC is how it
would be trained. One step is forward, cross-entropy, backward (AGC) and an Adam step on a fixed batch
of 16, then 64, three-channel images with 10 classes: BatchNorm's cost grows with the batch, while that of
weight standardisation (mode nf) and of Adam's update does not, so the ratios move with the batch size and
both are shown. The four alternate within a round (which goes first rotates every round); round 0 warms
up the allocator and oneDNN's kernel caches and is not counted; each ratio is taken against the BatchNorm
step of the same round and the median of the round ratios reported, so a noisy shared machine slows all
members of a round alike. The spread row gives the quartiles of the round
ratios (the middle half of the rounds) and, in brackets, the lowest and highest: a round in which another
process took the CPUs for one step shows there, not in the median.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from normfree import adaptive_clip_grad_, to_normfree
from normfree.agc import excluded_parameters

ROUNDS = 30
BATCHES, CHANNELS, CLASSES = (16, 64), 3, 10
SETTINGS = [("resnet18", 64), ("resnet50", 32)]  # (torchvision model, image size in px)
CLIPPING = 0.01
# (variant, target for its time / the BatchNorm original's time); None: the original itself
TARGETS = {"BatchNorm": None, "converted (nf)": 1.0, "folded": 0.9, "folded + AGC": 1.0}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               clip: Callable[[], object]) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    clip()
    optimizer.step()
    return time.perf_counter() - start


def variants(arch: str) -> dict[str, tuple[torch.nn.Module, Callable[[], object]]]:
    """Each variant's model (in train mode) and what it does between backward and the optimizer step."""
    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)(num_classes=CLASSES)
    folded_agc = to_normfree(original, mode="fold")
    excluded = {id(p) for p in excluded_parameters(folded_agc, skip_classifier="weight_and_bias")}
    clipped = [p for p in folded_agc.parameters() if id(p) not in excluded]

    def no_clip() -> None:
        pass

    models = {
        "BatchNorm": (original, no_clip),
        "converted (nf)": (to_normfree(original), no_clip),
        "folded": (to_normfree(original, mode="fold"), no_clip),
        "folded + AGC": (folded_agc, lambda: adaptive_clip_grad_(clipped, CLIPPING)),
    }
    return {name: (model.train(), clip) for name, (model, clip) in models.items()}


def time_variants(arch: str, size: int, batch: int) -> dict[str, list[float]]:
    models = variants(arch)
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3) for name, (model, _) in models.items()}
    x, y = torch.randn(batch, CHANNELS, size, size), torch.randint(0, CLASSES, (batch,))
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(ROUNDS + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            model, clip = models[name]
            elapsed = train_step(model, optimizers[name], x, y, clip)
            if round_:
                times[name].append(elapsed)
    return times


def run() -> list[dict]:
    rows = []
    for (arch, size), batch in [(setting, batch) for setting in SETTINGS for batch in BATCHES]:
        benchmark = f"train step (Adam), batch {batch}, {size} px, {CHANNELS} channels"
        setting = f"torchvision {arch}, {ROUNDS} rounds"
        times = time_variants(arch, size, batch)
        rows += [
            dict(benchmark=benchmark, setting=setting, measurement=f"{name} median ms",
                 value=f"{statistics.median(times[name]) * 1e3:.1f}", target="")
            for name in TARGETS
        ]
        for name, target in TARGETS.items():
            if target is None:
                continue
            ratios = [t / t_bn for t, t_bn in zip(times[name], times["BatchNorm"])]
            quartiles = statistics.quantiles(ratios, n=4)
            ratio = statistics.median(ratios)
            rows += [
                dict(benchmark=benchmark, setting=setting,
                     measurement=f"{name} time / BatchNorm time (median of round ratios)",
                     value=f"{ratio:.2f}x", target=f"<= {target}x", ok=ratio <= target),
                dict(benchmark=benchmark, setting=setting,
                     measurement=f"{name} / BatchNorm, round ratio quartiles (lowest - highest)",
                     value=f"{quartiles[0]:.2f}x - {quartiles[2]:.2f}x ({min(ratios):.2f}x - {max(ratios):.2f}x)",
                     target=""),
            ]
    return rows
