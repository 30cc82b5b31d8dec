"""Scaled Weight Standardization as one fused operation: one Triton kernel forward, one backward.

The equation is `normfree.models.equations.standardize_weight`'s (NFNets, arXiv 2102.06171, Sec. 3, Eq. 2):
W_hat = scale * (W - mean) / sqrt(var + eps) per output unit, biased variance over the fan-in, eps inside the
square root, as batch norm over the rows computes it. timm's layers compute it with batch norm on the weight, the
gain * gamma multiply and, under autocast, a cast of the result: several kernels each way per convolution, on a
tensor as small as the weight, so on a GPU their cost is launches. Here:

- forward, one program per output unit: the row's sum and sum of squares (shifted by the row's first element, so
  that a mean large against the spread loses no precision), then W_hat written in the output dtype (autocast's:
  the convolution gets it cast once, here). Two passes over the row, statistics in float32;
- backward, one program per output unit: sum(g) and sum(g * w_hat) (w_hat recomputed from W and the saved
  statistics), then dL/dW = scale * rstd * (g - mean(g) - w_hat * mean(g * w_hat)) (batch norm's backward pass)
  and dL/dscale = sum(g * w_hat). Two passes over the row.

Each pass loops over the fan-in in blocks of at most `MAX_BLOCK` elements, so any fan-in works (3 * 3 * 1536 of
nfnet_f0's widest convolutions takes 14 blocks). Triton ships with PyTorch's CUDA builds; `runs_on` says where the
kernels are used. They also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is imported), which
is how the tests hold them to a float64 reference without a GPU. On the CPU, batch norm on the weight is one native
kernel each way and measured faster than any composition of torch ops, so the CPU keeps it.
"""
# (no `from __future__ import annotations`: TorchScript, compiling `standardize_weight`, reads the annotations of the
# functions here marked `torch.jit.unused` and cannot resolve them as strings)
import functools
import os
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch on some platforms
    triton = None

__all__ = ["MAX_BLOCK", "StandardizeWeight", "available", "runs_on", "standardize"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK = 1024  # elements of a row loaded per iteration (a power of two)

_failure: list[str] = []  # why the kernels failed to build or launch in this process, if they did


@functools.cache
def available() -> bool:
    """Whether the kernels can be used: Triton imports, ``NORMFREE_GPU_KERNEL`` is not 0 (the switch of normfree's
    GPU kernels), and they have not failed in this process."""
    return triton is not None and os.environ.get("NORMFREE_GPU_KERNEL", "1") != "0" and not _failure


@torch.jit.unused
def runs_on(weight: Tensor) -> bool:
    """Whether `standardize_weight(..., fused=True)` uses the kernels for `weight`: a float32/bf16/fp16 CUDA tensor
    with at least one element, `available()`, and not inside torch.compile (whose compiler fuses batch norm on the
    weight with its neighbours itself)."""
    return (weight.is_cuda and weight.dtype in DTYPES and weight.numel() > 0 and available()
            and not torch.compiler.is_compiling())


if triton is not None:
    @triton.jit
    def _standardize_rows(weight, scale, out, mean_out, rstd_out, fan_in, eps,
                          HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = weight + row.to(tl.int64) * fan_in
        shift = tl.load(start).to(tl.float32)
        sums = tl.zeros([BLOCK], dtype=tl.float32)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(0, fan_in, BLOCK):
            columns = first + tl.arange(0, BLOCK)
            mask = columns < fan_in
            w = tl.where(mask, tl.load(start + columns, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
            sums += w
            squares += w * w
        shifted_mean = tl.sum(sums, axis=0) / fan_in
        variance = tl.maximum(tl.sum(squares, axis=0) / fan_in - shifted_mean * shifted_mean, 0.0)
        mean = shifted_mean + shift
        rstd = 1.0 / tl.sqrt(variance + eps)
        tl.store(mean_out + row, mean)
        tl.store(rstd_out + row, rstd)
        factor = rstd
        if HAS_SCALE:
            factor = rstd * tl.load(scale + row).to(tl.float32)
        out_start = out + row.to(tl.int64) * fan_in
        for first in range(0, fan_in, BLOCK):
            columns = first + tl.arange(0, BLOCK)
            mask = columns < fan_in
            w = tl.load(start + columns, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_start + columns, ((w - mean) * factor).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _standardize_rows_backward(grad, weight, scale, mean_in, rstd_in, grad_weight, grad_scale, fan_in,
                                   HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offset = row.to(tl.int64) * fan_in
        mean = tl.load(mean_in + row)
        rstd = tl.load(rstd_in + row)
        grad_sums = tl.zeros([BLOCK], dtype=tl.float32)
        along_sums = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(0, fan_in, BLOCK):
            columns = first + tl.arange(0, BLOCK)
            mask = columns < fan_in
            g = tl.load(grad + offset + columns, mask=mask, other=0.0).to(tl.float32)
            w_hat = (tl.load(weight + offset + columns, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            grad_sums += g
            along_sums += g * w_hat
        grad_mean = tl.sum(grad_sums, axis=0) / fan_in
        along = tl.sum(along_sums, axis=0)
        along_mean = along / fan_in
        factor = rstd
        if HAS_SCALE:
            tl.store(grad_scale + row, along)
            factor = rstd * tl.load(scale + row).to(tl.float32)
        for first in range(0, fan_in, BLOCK):
            columns = first + tl.arange(0, BLOCK)
            mask = columns < fan_in
            g = tl.load(grad + offset + columns, mask=mask, other=0.0).to(tl.float32)
            w_hat = (tl.load(weight + offset + columns, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dw = factor * (g - grad_mean - w_hat * along_mean)
            tl.store(grad_weight + offset + columns, dw.to(grad_weight.dtype.element_ty), mask=mask)


def _block(fan_in: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(fan_in)))


class StandardizeWeight(torch.autograd.Function):
    """W_hat = scale * (W - mean) / sqrt(var + eps) per output unit (dim 0) of `weight`, in `dtype`, with the
    hand-written backward pass for `weight` and `scale` (the module docstring). `scale` is [out] or None (1).
    Runs where Triton runs: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``); callers use `standardize`."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor | None, eps: float, dtype: torch.dtype) -> Tensor:
        rows = weight.detach().contiguous()
        units, fan_in = weight.shape[0], rows[0].numel()
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        mean = torch.empty(units, dtype=torch.float32, device=weight.device)
        rstd = torch.empty_like(mean)
        scale_rows = None if scale is None else scale.detach().contiguous()
        _standardize_rows[(units,)](rows, scale_rows if scale is not None else rows, out, mean, rstd, fan_in,
                                    float(eps), HAS_SCALE=scale is not None, BLOCK=_block(fan_in))
        ctx.save_for_backward(rows, scale_rows, mean, rstd)
        ctx.scale_dtype = None if scale is None else scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        rows, scale, mean, rstd = ctx.saved_tensors
        units, fan_in = rows.shape[0], rows[0].numel()
        grad_weight = torch.empty_like(rows)
        grad_scale = None if scale is None else torch.empty(units, dtype=torch.float32, device=rows.device)
        _standardize_rows_backward[(units,)](
            grad.contiguous(), rows, scale if scale is not None else rows, mean, rstd, grad_weight,
            grad_scale if grad_scale is not None else mean, fan_in, HAS_SCALE=scale is not None,
            BLOCK=_block(fan_in))
        if grad_scale is not None:
            grad_scale = grad_scale.to(ctx.scale_dtype)
        return (grad_weight if ctx.needs_input_grad[0] else None,
                grad_scale if ctx.needs_input_grad[1] else None, None, None)


@torch.jit.unused
def standardize(weight: Tensor, scale: Tensor | None, eps: float) -> Tensor | None:
    """`StandardizeWeight` of `weight` (`runs_on` it), in autocast's dtype where autocast is on for its device (the
    dtype the convolution would cast it to), else in its own. None, with one warning in the process, where the
    kernel fails to build or launch here (the caller computes it with batch norm then, and from then on)."""
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    try:
        return StandardizeWeight.apply(weight, scale, eps, dtype)
    except Exception as error:  # a Triton or driver that cannot build it: batch norm from now on
        _failure.append(f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}")
        available.cache_clear()
        warnings.warn(f"normfree's fused weight-standardisation kernel failed here ({_failure[-1]}), so weights are "
                      "standardised with batch norm from now on (correct, slower). Set NORMFREE_GPU_KERNEL=0 to "
                      "choose batch norm without trying the kernel.", RuntimeWarning, stacklevel=3)
        return None
