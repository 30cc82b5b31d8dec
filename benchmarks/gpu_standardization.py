"""Section 5 of `benchmarks/gpu.py`: Scaled Weight Standardization of every WS conv of nfnet_f0 and nf_resnet50,
forward and backward under bf16 autocast, as timm's layers compute it (batch norm on the weight, the gain * gamma
multiply, autocast's cast) against normfree's fused kernels (`standardize_weight(..., fused=True)`, what `fast_nf`'s
convs call); and the largest difference between the two standardised weights in float32."""
from __future__ import annotations

import torch

from gpu_common import S5, Context, autocast, log, make_model, median_ms, ms


def section_standardization(ctx: Context) -> dict:
    return {arch: _standardization(ctx, arch) for arch in ctx.sizes.standardized}


def _standardization(ctx: Context, arch: str) -> dict:
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

    from normfree.models.equations import standardize_weight
    from normfree.models.standardization import weight_scale

    model = make_model(arch, ctx)
    convs = [m for m in model.modules() if isinstance(m, (ScaledStdConv2d, ScaledStdConv2dSame))]
    setting = f"{arch}: its {len(convs)} WS convs' weights, fwd + bwd, bf16 autocast"
    params = [p for conv in convs for p in (conv.weight, conv.gain)]
    grads = [torch.randn_like(conv.weight, dtype=torch.bfloat16) for conv in convs]

    def fused():
        return [standardize_weight(c.weight, weight_scale(c), c.eps, fused=True) for c in convs]

    def timms():  # batch norm on the weight: timm's forward, bit for bit
        return [standardize_weight(c.weight, weight_scale(c), c.eps) for c in convs]

    def step(standardize):
        def run():
            with autocast(ctx, "bf16"):
                weights = [w.to(torch.bfloat16) for w in standardize()]  # autocast's cast, as the conv does
            torch.autograd.backward(weights, grads, inputs=params)
        return run

    log(f"  section 5: {arch}")
    median = {key: median_ms(ctx, step(fn), ctx.sizes.agc_warmup, ctx.sizes.agc_reps)
              for key, fn in (("batch_norm", timms), ("fused", fused))}
    with torch.no_grad():
        error = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fused(), timms(), strict=True))
    data = dict(median_ms=median, max_relative_difference=error, convs=len(convs))
    ctx.results.row(S5, setting, "timm's: batch norm + gain multiply + autocast cast, median",
                    ms(median["batch_norm"]))
    ctx.results.row(S5, setting, "normfree fused kernels, median", ms(median["fused"]))
    ctx.results.row(S5, setting, "fused / timm's", f"{median['fused'] / median['batch_norm']:.2f}x", "< 1",
                    median["fused"] < median["batch_norm"])
    ctx.results.row(S5, setting, "largest |fused - timm's| / max |timm's| (float32)", f"{error:.1e}", "<= 1e-6",
                    error <= 1e-6)
    return data
