"""Per-sample AGC for parameters of container modules: gains and scales applied elementwise.

The SkipInit gain of an NF block (and any parameter a module with children owns) is handed to the
module as one copy per example, so autograd delivers its per-example gradients directly; the
backward pass returns their clipped sum (book-keeping in the sense of Bu et al. 2023: no second
backward pass). Such parameters must act elementwise with broadcasting against the batch, as gains
and layer scales do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .clipped_sum import clipped_sum

if TYPE_CHECKING:
    from .clipper import PerSampleClipper

__all__ = ["PerExampleCopy", "container_forward"]


class PerExampleCopy(torch.autograd.Function):
    """One copy of `param` per example, [B, 1.., *param.shape] to broadcast against a batch of rank `ndim`;
    backward receives the per-example gradients and returns their clipped sum."""

    @staticmethod
    def forward(ctx, clipper, param, batch, ndim):
        ctx.clipper, ctx.param = clipper, param
        shape = (batch, *(1,) * max(0, ndim - 1 - param.ndim), *param.shape)
        return param.detach().reshape(1, *shape[1:]).expand(shape).clone()

    @staticmethod
    def backward(ctx, grads):
        per_example = grads.reshape(grads.shape[0], *ctx.param.shape)
        return None, clipped_sum(ctx.clipper, ctx.param, per_example).to(ctx.param.dtype), None, None


def container_forward(clipper: PerSampleClipper, module: nn.Module, *args, **kwargs):
    """`module`'s forward (a container with parameters of its own) with per-example copies of those parameters."""
    batch = next((a for a in args if isinstance(a, Tensor)), None)
    if not clipper.recording() or batch is None:
        return type(module).forward(module, *args, **kwargs)
    clipper.note_call(module)
    own = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
    try:
        for name, param in own.items():
            module._parameters[name] = PerExampleCopy.apply(clipper, param, batch.shape[0], batch.ndim)
        return type(module).forward(module, *args, **kwargs)
    finally:
        module._parameters.update(own)
