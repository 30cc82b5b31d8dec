"""Per-sample AGC for scalar gains of container modules, such as the SkipInit gain of an NF block.

A module with children whose own trained parameters are all scalars (one element each) hands each of
them to its forward pass as one copy per example, shaped [examples, 1, ...] to broadcast against a
batch of the rank of the module's first tensor argument, so autograd delivers their per-example
gradients directly; the backward pass returns their clipped sum (book-keeping in the sense of Bu et al.
2023: no second backward pass). The gain must multiply (or otherwise act elementwise on) tensors of that
rank, as SkipInit gains do. A module with children and any larger parameter of its own (a cls_token, a
layer-scale vector) may use it in any way, so `generic` takes it whole instead (`clipper.engines`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .clipped_sum import clipped_sum

if TYPE_CHECKING:
    from .context import EngineContext

__all__ = ["PerExampleCopy", "container_forward"]


class PerExampleCopy(torch.autograd.Function):
    """One copy of `param` per example, [B, 1.., *param.shape] to broadcast against a batch of rank `ndim`;
    backward receives the per-example gradients and returns their clipped sum."""

    @staticmethod
    def forward(ctx, rule, param, batch, ndim):
        ctx.rule, ctx.param = rule, param
        shape = (batch, *(1,) * max(0, ndim - 1 - param.ndim), *param.shape)
        return param.detach().reshape(1, *shape[1:]).expand(shape).clone()

    @staticmethod
    def backward(ctx, grads):
        per_example = grads.reshape(grads.shape[0], *ctx.param.shape)
        return None, clipped_sum(ctx.rule, ctx.param, per_example).to(ctx.param.dtype), None, None


def container_forward(context: EngineContext, module: nn.Module, *args, **kwargs):
    """`module`'s forward (a container with parameters of its own) with per-example copies of those parameters."""
    batch = next((a for a in args if isinstance(a, Tensor)), None)
    if not context.recording.active() or batch is None:
        return type(module).forward(module, *args, **kwargs)
    context.recording.note_call(module, batch.shape[0])
    own = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
    try:
        for name, param in own.items():
            module._parameters[name] = PerExampleCopy.apply(context.rule, param, batch.shape[0], batch.ndim)
        return type(module).forward(module, *args, **kwargs)
    finally:
        module._parameters.update(own)
