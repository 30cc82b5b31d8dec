"""Per-sample AGC: train-step time and peak memory, as ratios to the ordinary AGC step of the same run.

A step is forward, cross-entropy, backward, AGC and an SGD step. "Ordinary" clips the batch-mean
gradient with `adaptive_clip_grad_`; "per-sample" installs `PerSampleClipper` (what
`AGC(per_sample=True)` does). Times: the two alternate within a round (which goes first changes every
round); round 0 is warm-up; the median of the per-round ratios is reported. Peak memory: each step
runs once in a fresh process, and the high-water mark of its resident memory during the step, over
what the process held before it, is compared. Reference row: per-example gradients with torch.func
(vmap of grad over the batch) and the same clipping, as a user would write it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from normfree import adaptive_clip_grad_
from normfree.agc import excluded_parameters
from normfree.agc.per_sample import PerSampleClipper

ROUNDS = 6
SETTINGS = [  # (arch, batch, size, channels)
    ("nf_resnet26", 16, 64, 3),
    ("nf_resnet_tiny", 64, 32, 1),
    ("nf_resnet_small", 64, 32, 1),
    ("nf_resnet_base", 64, 32, 1),
]
CLIPPING = 0.01


def setup(arch: str, batch: int, size: int, channels: int):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, in_chans=channels).train()
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))
    excluded = {id(p) for p in excluded_parameters(model)}
    clipped = [p for p in model.parameters() if id(p) not in excluded]
    return model, x, y, clipped


def ordinary_step(model, optimizer, x, y, clipped) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    adaptive_clip_grad_(clipped, CLIPPING)
    optimizer.step()


def per_sample_step(model, optimizer, x, y, clipper: PerSampleClipper) -> None:
    optimizer.zero_grad(set_to_none=True)
    clipper.grad_scale = torch.tensor(1.0 / len(x))
    clipper.start()
    F.cross_entropy(model(x), y).backward()
    clipper.stop()
    clipper.collect([])
    optimizer.step()


def vmap_step(model, optimizer, x, y, clipped) -> None:
    """Per-example gradients of every parameter at once with torch.func, clipped, averaged."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    for (name, p) in model.named_parameters():
        g = per_example[name]
        if any(p is c for c in clipped):
            stacked = [g[i].clone() for i in range(len(x))]
            for gi in stacked:
                p.grad = gi
                adaptive_clip_grad_([p], CLIPPING)
            g = torch.stack(stacked)
        p.grad = g.mean(0)
    optimizer.step()


def _timed(step, *args) -> float:
    start = time.perf_counter()
    step(*args)
    return time.perf_counter() - start


def time_ratio(arch: str, batch: int, size: int, channels: int) -> tuple[float, float, float]:
    model, x, y, clipped = setup(arch, batch, size, channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    clipper = PerSampleClipper(model, {id(p): CLIPPING for p in clipped})
    ratios, ordinary_times = [], []
    for round_ in range(ROUNDS + 1):
        runs = [("ordinary", lambda: _timed(ordinary_step, model, optimizer, x, y, clipped)),
                ("per-sample", lambda: _timed(per_sample_step, model, optimizer, x, y, clipper))]
        times = dict(run() for run in [lambda r=r: (r[0], r[1]()) for r in (runs if round_ % 2 else runs[::-1])])
        if round_:
            ratios.append(times["per-sample"] / times["ordinary"])
            ordinary_times.append(times["ordinary"])
    clipper.remove()
    return statistics.median(ratios), statistics.median(ordinary_times), min(ratios)


def vmap_ratio(arch: str, batch: int, size: int, channels: int) -> float:
    model, x, y, clipped = setup(arch, batch, size, channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ratios = []
    for round_ in range(3):
        ordinary = _timed(ordinary_step, model, optimizer, x, y, clipped)
        reference = _timed(vmap_step, model, optimizer, x, y, clipped)
        if round_:
            ratios.append(reference / ordinary)
    return statistics.median(ratios)


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_peak_mib(arch: str, batch: int, size: int, channels: int, mode: str) -> float:
    """Run in a fresh process: resident high-water mark during one step, over the resident size before it."""
    model, x, y, clipped = setup(arch, batch, size, channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    clipper = PerSampleClipper(model, {id(p): CLIPPING for p in clipped}) if mode == "per-sample" else None
    before = _resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    if clipper is None:
        ordinary_step(model, optimizer, x, y, clipped)
    else:
        per_sample_step(model, optimizer, x, y, clipper)
    return (_resident_kib("VmHWM") - before) / 1024


def peak_in_fresh_process(setting: tuple, mode: str) -> float:
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
            f"torch.set_num_threads(2); from bench_per_sample import step_peak_mib; "
            f"print(json.dumps(step_peak_mib(*{list(setting)!r}, {mode!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> list[dict]:
    rows = []
    for setting in SETTINGS:
        arch, batch, size, channels = setting
        label = f"{arch}, batch {batch}, {size} px"
        ratio, ordinary, best = time_ratio(*setting)
        rows.append(dict(benchmark="per-sample AGC step time / ordinary AGC step", setting=label,
                         measurement=f"median of {ROUNDS} rounds "
                                     f"(best {best:.2f}x; ordinary step {ordinary * 1e3:.0f} ms)",
                         value=f"{ratio:.2f}x", target="<= 2.0x", ok=ratio <= 2.0))
        ordinary_mib, per_sample_mib = (peak_in_fresh_process(setting, mode) for mode in ("ordinary", "per-sample"))
        memory = per_sample_mib / ordinary_mib
        rows.append(dict(benchmark="per-sample AGC step peak memory / ordinary", setting=label,
                         measurement=f"step's resident peak {per_sample_mib:.0f} MiB vs {ordinary_mib:.0f} MiB",
                         value=f"{memory:.2f}x", target="<= 1.5x", ok=memory <= 1.5))
    reference = vmap_ratio(*SETTINGS[0])
    rows.append(dict(benchmark="reference: torch.func vmap per-example grads + AGC / ordinary step",
                     setting=f"{SETTINGS[0][0]}, batch {SETTINGS[0][1]}, {SETTINGS[0][2]} px",
                     measurement="median of 2 rounds", value=f"{reference:.1f}x", target="(reference)"))
    return rows
