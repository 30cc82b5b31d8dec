"""AGC speed on the gradients of timm's nfnet_f0 (71.5M parameters, 221 tensors).

normfree.adaptive_clip_grad_ (on the CPU: the fused kernel of normfree/csrc) against
timm.utils.agc.adaptive_clip_grad (a per-parameter loop) and against one copy of all gradients
(the memory-traffic floor of an unfused implementation), all measured in the same run; normfree's
torch-ops path, what runs where no C compiler is found, is timed alongside. Two settings:

- isolated: the same saved gradients restored before every call, methods interleaved in rounds;
- training loop: forward, backward, then one method, SGD step; the method changes every step, so the
  allocator and caches are in the state a real run leaves them in.

Ratios are taken within a round, then the median over rounds is reported, so a noisy shared
machine shifts every method alike.
"""
from __future__ import annotations

import statistics
import time

import timm
import torch
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad

import normfree
from normfree.agc.clip import clip_with_torch_ops

ISOLATED_ROUNDS = 15
LOOP_ROUNDS = 5
CLIPPING, EPS = 0.01, 1e-3


def nfnet_f0() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("nfnet_f0")
    for module in model.modules():  # open the residual branches (zero at init, SkipInit) so every tensor has a gradient
        if getattr(module, "skipinit_gain", None) is not None:
            module.skipinit_gain.data.fill_(1.0)
    return model


def backward(model: torch.nn.Module) -> None:
    model.zero_grad(set_to_none=False)
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def methods(params: list[torch.Tensor], copies: list[torch.Tensor]) -> dict:
    grads = [p.grad for p in params]
    return {
        "copy": lambda: torch._foreach_copy_(copies, grads),
        "timm": lambda: timm_adaptive_clip_grad(params, CLIPPING, EPS),
        "normfree": lambda: normfree.adaptive_clip_grad_(params, CLIPPING, EPS),
        "normfree torch ops": torch.no_grad()(lambda: clip_with_torch_ops(params, CLIPPING, EPS)),
    }


def isolated(model: torch.nn.Module) -> dict[str, list[float]]:
    params = list(model.parameters())
    backward(model)
    saved = [p.grad.clone() for p in params]
    run = methods(params, [torch.empty_like(g) for g in saved])
    times: dict[str, list[float]] = {name: [] for name in run}
    for round_ in range(ISOLATED_ROUNDS + 1):
        for name in list(run)[round_ % len(run):] + list(run)[: round_ % len(run)]:
            torch._foreach_copy_([p.grad for p in params], saved)
            elapsed = timed(run[name])
            if round_:  # round 0 warms up the allocator and caches
                times[name].append(elapsed)
    return times


def training_loop(model: torch.nn.Module) -> dict[str, list[float]]:
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-4)
    backward(model)
    run = methods(params, [torch.empty_like(p) for p in params])
    times: dict[str, list[float]] = {name: [] for name in run}
    for round_ in range(LOOP_ROUNDS + 1):
        for name in run:
            backward(model)
            elapsed = timed(run[name])
            optimizer.step()
            if round_:
                times[name].append(elapsed)
    return times


def rows_for(setting: str, times: dict[str, list[float]]) -> list[dict]:
    ours, theirs = times["normfree"], times["timm"]
    floor = times["copy"]
    speedup = statistics.median(t / o for t, o in zip(theirs, ours))
    over_copy = statistics.median(o / c for o, c in zip(ours, floor))
    fallback_speedup = statistics.median(t / o for t, o in zip(theirs, times["normfree torch ops"]))
    ms = ", ".join(f"{name} {statistics.median(t) * 1e3:.1f}" for name, t in times.items())
    return [
        dict(benchmark="AGC step, nfnet_f0", setting=setting, measurement=f"median ms: {ms}", value="", target=""),
        dict(benchmark="AGC step, nfnet_f0", setting=setting, measurement="timm time / normfree time",
             value=f"{speedup:.2f}x", target=">= 3x", ok=speedup >= 3),
        dict(benchmark="AGC step, nfnet_f0", setting=setting, measurement="normfree time / one copy of all gradients",
             value=f"{over_copy:.2f}x", target="<= 2x", ok=over_copy <= 2),
        dict(benchmark="AGC step, nfnet_f0", setting=setting,
             measurement="timm time / normfree torch-ops time (no C compiler)",
             value=f"{fallback_speedup:.2f}x", target="(reference)"),
    ]


def run() -> list[dict]:
    model = nfnet_f0()
    backward(model)
    params = list(model.parameters())
    stats = normfree.adaptive_clip_grad_(params, CLIPPING, EPS)
    n = sum(p.numel() for p in params) / 1e6
    context = f"{n:.1f}M params, {len(params)} tensors, {stats.fraction:.1%} units clipped"
    return rows_for(f"isolated ({context})", isolated(model)) + rows_for("inside a training loop", training_loop(model))
