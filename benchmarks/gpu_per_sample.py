"""Per-sample AGC on a CUDA GPU (`python benchmarks/gpu_per_sample.py`): step time and peak memory as ratios to the ordinary AGC step, per tuning.

Not run by `benchmarks/run.py` (which measures the CPU): `python benchmarks/gpu_per_sample.py` on a
machine with a GPU. For each setting it times, with CUDA events (median of `ITERS` steps after
warm-up), the ordinary AGC step and the per-sample step under each entry of `VARIANTS`, a set of
`normfree.per_sample.TUNING` overrides (scratch budget, how k x k convolutions materialise g_i), so
that one run compares them. It first checks exactness on the GPU: per-sample AGC against a loop over
examples (float64 AGC per example, written out here), for each k x k method.
"""
from __future__ import annotations

import statistics

import timm
import torch
import torch.nn.functional as F

from normfree import adaptive_clip_grad_, excluded_parameters
from normfree.per_sample import PerSampleClipper, tuned

ITERS = 10
CLIPPING = 0.01
SETTINGS = [  # (arch, batch, size, precision)
    ("nf_resnet26", 64, 128, "fp32"),
    ("nf_resnet26", 64, 128, "bf16"),
    ("nf_resnet50", 64, 224, "bf16"),
    ("nfnet_f0", 32, 192, "bf16"),
]
VARIANTS = {
    "defaults (bmm, 256 MiB, pass cost 100)": dict(),
    "conv": dict(kxk_weight_grads="conv"),
    "128 MiB": dict(cuda_scratch_bytes=128 << 20),
}


def setup(arch, batch, size):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000).cuda().train()
    x, y = torch.randn(batch, 3, size, size, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
    excluded = {id(p) for p in excluded_parameters(model)}
    return model, x, y, [p for p in model.parameters() if id(p) not in excluded]


def step(model, optimizer, x, y, precision, clipped=None, clipper=None):
    optimizer.zero_grad(set_to_none=True)
    if clipper is not None:
        clipper.grad_scale = torch.tensor(1.0 / len(x), device="cuda")
        clipper.start()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    if clipper is not None:
        clipper.stop()
        clipper.collect([])
    else:
        adaptive_clip_grad_(clipped, CLIPPING)
    optimizer.step()


def timed(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20, base / 2**20


def agc64(param, grad):
    """Eq. (3) of Brock et al. 2021 per unit, float64, written out here (not normfree's code)."""
    w, g = param.detach().double(), grad.double()
    units = w.shape[0] if w.ndim >= 2 else 1
    limit = w.reshape(units, -1).norm(dim=1).clamp_min(1e-3) * CLIPPING
    norm = g.reshape(units, -1).norm(dim=1)
    factor = torch.where(norm > limit, limit / norm.clamp_min(1e-6), torch.ones_like(norm))
    return (g.reshape(units, -1) * factor[:, None]).reshape(g.shape)


def check_exact():
    torch.backends.cudnn.allow_tf32 = False
    model, _, _, _ = setup("nf_resnet26", 4, 64)
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 64, 64, device="cuda"), torch.randint(0, 1000, (4,), device="cuda")
    unclipped = {id(p) for p in excluded_parameters(model)}
    reference = {n: 0.0 for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            g = p.grad.double() if id(p) in unclipped else agc64(p, p.grad)
            reference[n] = reference[n] + g / len(x)
    flat = torch.cat([r.flatten() for r in reference.values()])
    for method in ("bmm", "conv"):
        with tuned(kxk_weight_grads=method):
            clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters() if id(p) not in unclipped})
            clipper.grad_scale = torch.tensor(1.0 / len(x), device="cuda")
            model.zero_grad()
            clipper.start()
            F.cross_entropy(model(x), y).backward()
            clipper.stop()
            clipper.remove()
        got = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        print(f"exactness on the GPU, nf_resnet26 fp32 (no TF32), {method}: relative error "
              f"{float((got - flat).norm() / flat.norm()):.2e}", flush=True)
    torch.backends.cudnn.allow_tf32 = True


PROFILE = ("nf_resnet26", 64, 128, "bf16")


def profile_per_sample(model, optimizer, x, y, precision, clipped):
    """The kernels of three per-sample steps with the default knobs, by GPU time."""
    from torch.profiler import ProfilerActivity, profile
    clipper = PerSampleClipper(model, {id(p): CLIPPING for p in clipped})
    step(model, optimizer, x, y, precision, clipper=clipper)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(model, optimizer, x, y, precision, clipper=clipper)
        torch.cuda.synchronize()
    clipper.remove()
    events = prof.key_averages()
    device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 3e3
    print(f"profile: {device_ms:.1f} ms of GPU kernels per step")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))


def main():
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name(), torch.__version__, timm.__version__, flush=True)
    check_exact()
    print("| setting | variant | step ms | x ordinary | peak MiB | x ordinary |\n|---|---|---|---|---|---|")
    for arch, batch, size, precision in SETTINGS:
        model, x, y, clipped = setup(arch, batch, size)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        label = f"{arch} bs{batch} {size}px {precision}"
        ms, peak, _ = timed(lambda: step(model, optimizer, x, y, precision, clipped=clipped))
        print(f"| {label} | ordinary AGC | {ms:.1f} | 1.00x | {peak:.0f} | 1.00x |", flush=True)
        for name, knobs in VARIANTS.items():
            clipper = PerSampleClipper(model, {id(p): CLIPPING for p in clipped})
            with tuned(**knobs):
                ms_v, peak_v, _ = timed(lambda: step(model, optimizer, x, y, precision, clipper=clipper))
            clipper.remove()
            print(f"| {label} | per-sample, {name} | {ms_v:.1f} | {ms_v / ms:.2f}x | {peak_v:.0f} | "
                  f"{peak_v / peak:.2f}x |", flush=True)
        if PROFILE == (arch, batch, size, precision):
            profile_per_sample(model, optimizer, x, y, precision, clipped)
        del model, optimizer, x, y, clipped
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
