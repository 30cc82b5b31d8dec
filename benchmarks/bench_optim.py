"""The optimizer step on nfnet_f0's parameters: fastai's Adam against normfree's `fast_adam` (torch's fused Adam under
fastai's OptimWrapper, normfree's default).

Counted: the ATen operations each step dispatches (bench_host_ops.OpCount; on a GPU each is about one kernel launch,
the cost that bounds a step of small kernels). Timed: the step alone on the same gradients, the two alternating
within a round (round 0 warms up, not counted), the ratio taken within each round and its median reported. Both
decay weights as fastai does (wd 0.01, biases and gains exempt as `Learner` marks them: here every 1-d parameter).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from fastai.optimizer import Adam

sys.path.insert(0, str(Path(__file__).parent))
from bench_host_ops import OpCount  # noqa: E402
from normfree.learner.optim import fast_adam  # noqa: E402

ROUNDS = 6
ARCH = "nfnet_f0"
OP_TARGET, TIME_TARGET = 10.0, 1.0


def optimizers() -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(ARCH)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    built = {"fastai Adam": Adam(params, lr=1e-3), "fast_adam": fast_adam(params, lr=1e-3)}
    for opt in built.values():  # what Learner.create_opt marks (wd_bn_bias=False)
        for p in params:
            if p.ndim <= 1:
                opt.state[p]["do_wd"] = False
    return built


def run() -> list[dict]:
    built = optimizers()
    counts = {}
    for name, opt in built.items():
        opt.step()  # state made
        with OpCount() as count:
            opt.step()
        counts[name] = count
    times: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for round_ in range(ROUNDS + 1):
        for name in names[round_ % 2:] + names[: round_ % 2]:
            start = time.perf_counter()
            built[name].step()
            if round_:
                times[name].append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in built["fast_adam"].all_params().itemgot(0))
    benchmark, setting = "optimizer step (Adam)", f"{ARCH}'s parameters ({n_params / 1e6:.1f}M), {ROUNDS} rounds"
    op_ratio = counts["fastai Adam"].kernels / counts["fast_adam"].kernels
    time_ratio = statistics.median(t / t_ref for t, t_ref in zip(times["fast_adam"], times["fastai Adam"]))
    return [
        *[dict(benchmark=benchmark, setting=setting, measurement=f"{name}: kernel ops (+ views), median ms",
               value=f"{counts[name].kernels} (+{counts[name].views}), {statistics.median(times[name]) * 1e3:.1f}",
               target="") for name in names],
        dict(benchmark=benchmark, setting=setting, measurement="fastai Adam kernel ops / fast_adam kernel ops",
             value=f"{op_ratio:.0f}x", target=f">= {OP_TARGET:.0f}x", ok=op_ratio >= OP_TARGET),
        dict(benchmark=benchmark, setting=setting, measurement="fast_adam time / fastai Adam time (median of rounds)",
             value=f"{time_ratio:.2f}x", target=f"<= {TIME_TARGET}x", ok=time_ratio <= TIME_TARGET),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
