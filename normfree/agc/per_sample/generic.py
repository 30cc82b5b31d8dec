"""Per-sample AGC for any other layer with parameters: torch.func (vmap of vjp), in chunks of examples.

Exact but slower than the book-keeping of linear and convolution layers (`layers`): the per-example
gradients of the layer's parameters are materialised chunk by chunk, clipped and summed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .clipped_sum import clipped_sum
from .tuning import TUNING

if TYPE_CHECKING:
    from .clipper import PerSampleClipper

__all__ = ["GenericLayer", "generic_forward"]


class GenericLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, clipper, module, x, *params):
        ctx.clipper, ctx.module = clipper, module
        ctx.save_for_backward(x, *params)
        with clipper.bypassed():
            return module(x)

    @staticmethod
    def backward(ctx, signal):
        clipper, module = ctx.clipper, ctx.module
        x, *params = ctx.saved_tensors
        trained = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        names = list(trained)
        values = {n: p.detach() for n, p in trained.items()}
        frozen = {n: p for n, p in module.named_parameters(recurse=False) if not p.requires_grad}

        differentiable_x = x.is_floating_point() and ctx.needs_input_grad[2]

        def one_example(x_i, signal_i):
            def f(trained, x_one):
                return functional_call(module, {**trained, **frozen}, (x_one.unsqueeze(0),)).squeeze(0)
            if differentiable_x:
                _, pullback = vjp(f, values, x_i)
                return pullback(signal_i)
            _, pullback = vjp(lambda trained: f(trained, x_i), values)
            return pullback(signal_i)[0]

        per_example_bytes = 4 * (x[0].numel() + signal[0].numel() + sum(p.numel() for p in params))
        chunk = max(1, TUNING.scratch_bytes(signal.device) // per_example_bytes)
        grad_x, grads = [], {n: [] for n in names}
        with clipper.bypassed(), torch.enable_grad():
            for start in range(0, x.shape[0], chunk):
                result = vmap(one_example)(x[start : start + chunk].detach(), signal[start : start + chunk])
                g_params, g_x = result if differentiable_x else (result, None)
                grad_x.append(g_x)
                for n in names:
                    grads[n].append(clipped_sum(clipper, trained[n], g_params[n]))
        summed = [torch.stack(grads[n]).sum(0) for n in names]
        return None, None, torch.cat(grad_x) if differentiable_x else None, *summed


def generic_forward(clipper: PerSampleClipper, module: nn.Module, x: Tensor, *args, **kwargs):
    """`module`'s forward through `GenericLayer` while the clipper records."""
    if not clipper.recording() or args or kwargs or not isinstance(x, Tensor):
        if clipper.recording():
            raise TypeError(f"per-sample AGC supports layers called with one tensor; {type(module).__name__} got "
                            f"{1 + len(args)} positional and {len(kwargs)} keyword arguments")
        return type(module).forward(module, x, *args, **kwargs)
    clipper.note_call(module)
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return GenericLayer.apply(clipper, module, x, *params)
