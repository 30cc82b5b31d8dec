"""Per-sample AGC for any other module with parameters: torch.func (vmap of vjp), in chunks of examples.

Exact but slower than the book-keeping of linear and convolution layers (`layers`): the backward pass runs
the module's forward pass again per example and materialises the per-example gradients of its parameters
chunk by chunk, clips and sums them. A parameter used several times in the forward pass is clipped once per
example, on the sum over its uses.

What goes through here (`clipper` chooses, before anything is trained):

- a module with parameters whose children have none, other than a linear or convolution layer: nn.Embedding,
  nn.LayerNorm, timm's LayerScale (``x * self.gamma``), any module that uses its own parameters in forward;
- a module with children and parameters of its own other than scalar gains (which `containers` takes),
  taken whole, with everything below it: nn.MultiheadAttention (its ``in_proj_weight``), a block that
  multiplies by a layer-scale vector of its own, timm's VisionTransformer for its ``cls_token`` and
  ``pos_embed`` (the whole model, then: exact, at about the cost of torch.func over the whole model).

Every tensor the module is called with, and every tensor it returns, holds the examples along dim 0;
other arguments are passed as they are. nn.MultiheadAttention holds them along its batch dimension (dim 1
unless ``batch_first``; its key_padding_mask along dim 0) and shares a 2-D attn_mask between all examples.
A call that breaks this raises TypeError naming the module.

Refused (`random_modules`, checked by `clipper.check_supported_modules`): randomness inside such a module,
e.g. dropout or drop-path with a rate above 0, since the backward pass would draw a new mask when it runs
the forward pass again. Recurrent layers are refused by `clipper` too (see there).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .clipped_sum import clipped_sum
from .tuning import TUNING

if TYPE_CHECKING:
    from .context import EngineContext
    from .recording import Recording

__all__ = ["GenericLayer", "generic_forward", "random_modules"]


def _draws_random_numbers(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, DropPath):
        return module.drop_prob > 0
    if isinstance(module, nn.MultiheadAttention):  # its dropout is a number, applied in its forward
        return module.dropout > 0
    return False


def random_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs in `module`, itself included, that draw random masks in training (dropout,
    drop-path with a rate above 0): the generic engine cannot take such a module."""
    return [(name, m) for name, m in module.named_modules() if _draws_random_numbers(m)]


@dataclass(frozen=True)
class Call:
    """One call of a module, its tensors taken out: where each goes back (`slots`: a position in `args` or a
    name in `kwargs`), which of its dims holds the examples (`dims`; None: one tensor shared by all), and how
    many examples there are."""

    args: tuple
    kwargs: dict
    slots: tuple[int | str, ...]
    dims: tuple[int | None, ...]
    examples: int

    @staticmethod
    def of(recording: Recording, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Call, list[Tensor]]:
        if isinstance(module, nn.MultiheadAttention):  # by name: its batch dimension depends on the argument
            kwargs = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
            args, kwargs = (), {n: v for n, v in kwargs.items() if n != "self"}
        elif any(isinstance(v, Tensor) for v in kwargs.values()):
            raise TypeError(f"per-sample AGC passes tensors to {recording.describe(module)} by position only (dim 0 "
                            f"holding the examples); it got tensors by keyword: {sorted(kwargs)}")
        slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)] + \
                [n for n, v in kwargs.items() if isinstance(v, Tensor)]
        tensors = [args[s] if isinstance(s, int) else kwargs[s] for s in slots]
        dims = [_attention_dim(recording, module, s, t) if isinstance(module, nn.MultiheadAttention) else 0
                for s, t in zip(slots, tensors)]
        sizes = {t.shape[d] if t.dim() > d else None for t, d in zip(tensors, dims) if d is not None}
        if len(sizes) != 1 or None in sizes:
            raise TypeError(f"per-sample AGC needs {recording.describe(module)} called with tensors that all hold the "
                            "examples along dim 0 (nn.MultiheadAttention: along its batch dimension); got shapes "
                            f"{[tuple(t.shape) for t in tensors]}")
        return Call(tuple(args), dict(kwargs), tuple(slots), tuple(dims), sizes.pop()), tensors

    def arguments(self, tensors: list[Tensor]) -> tuple[tuple, dict]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, tensor in zip(self.slots, tensors):
            if isinstance(slot, int):
                args[slot] = tensor
            else:
                kwargs[slot] = tensor
        return tuple(args), kwargs

    def output_dims(self, module: nn.Module, count: int) -> list[int]:
        if isinstance(module, nn.MultiheadAttention):  # (attn_output, attn_weights): weights are batch first
            return [0 if module.batch_first else 1, 0][:count]
        return [0] * count


def _attention_dim(recording: Recording, module: nn.MultiheadAttention, name: str, tensor: Tensor) -> int | None:
    """Which dim of nn.MultiheadAttention's argument `name` holds the examples."""
    if name in ("query", "key", "value"):
        if tensor.dim() != 3:
            raise TypeError(f"per-sample AGC needs {recording.describe(module)} called on a batch (3-D {name}), "
                            f"got {name} of shape {tuple(tensor.shape)}")
        return 0 if module.batch_first else 1
    if name == "attn_mask" and tensor.dim() == 2:
        return None
    if name == "key_padding_mask":
        return 0
    raise TypeError(f"per-sample AGC: {recording.describe(module)}'s {name} of shape {tuple(tensor.shape)} mixes "
                    "examples and heads; give a 2-D attn_mask (shared by all examples) and a key_padding_mask")


def _outputs(recording: Recording, module: nn.Module, output) -> tuple[Tensor, ...]:
    """The tensors `module` returned: the one tensor, or those of a tuple (None entries, such as
    nn.MultiheadAttention's weights with need_weights=False, left out)."""
    if isinstance(output, Tensor):
        return (output,)
    if isinstance(output, tuple) and all(o is None or isinstance(o, Tensor) for o in output):
        return tuple(o for o in output if o is not None)
    raise TypeError(f"per-sample AGC needs {recording.describe(module)} to return a tensor or a tuple of tensors, "
                    f"got {type(output).__name__}")


def _rebuilt(returned, outputs):
    """What the module returned (`returned`), its tensors replaced by `outputs`, in order."""
    if isinstance(returned, Tensor):
        return next(outputs)
    return tuple(None if o is None else next(outputs) for o in returned)


def _class_forward(module: nn.Module, args: tuple, kwargs: dict):
    """`module`'s own forward, its hooks not run again (they ran once, around the installed forward)."""
    return type(module).forward(module, *args, **kwargs)


class GenericLayer(torch.autograd.Function):
    """The module's call, whose backward returns the clipped per-example sums of its trained parameters (all of
    them, its descendants' included) and the gradients of its tensor arguments."""

    @staticmethod
    def forward(ctx, context, module, call, returned, n_tensors, *tensors_and_params):
        tensors = list(tensors_and_params[:n_tensors])
        ctx.context, ctx.module, ctx.call = context, module, call
        ctx.save_for_backward(*tensors_and_params)
        with context.recording.bypassed():
            output = _class_forward(module, *call.arguments(tensors))
        returned.append(output)
        outputs = _outputs(context.recording, module, output)
        ctx.output_dims = call.output_dims(module, len(outputs))
        for output, dim in zip(outputs, ctx.output_dims):
            if output.dim() <= dim or output.shape[dim] != call.examples:
                raise TypeError(f"per-sample AGC needs {context.recording.describe(module)} to return tensors that "
                                f"hold the batch's {call.examples} examples along dim {dim}; it returned one of shape "
                                f"{tuple(output.shape)}")
        ctx.differentiable = [o.is_floating_point() for o in outputs]
        ctx.mark_non_differentiable(*(o for o, d in zip(outputs, ctx.differentiable) if not d))
        return outputs

    @staticmethod
    def backward(ctx, *signals):
        context, module, call = ctx.context, ctx.module, ctx.call
        saved = ctx.saved_tensors
        tensors = list(saved[: len(call.slots)])
        trained = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
        values = {n: p.detach() for n, p in trained.items()}
        wanted = [i for i, t in enumerate(tensors) if t.is_floating_point() and ctx.needs_input_grad[5 + i]]
        out_dims = [d for d, keep in zip(ctx.output_dims, ctx.differentiable) if keep]
        signals = [s for s, keep in zip(signals, ctx.differentiable) if keep]

        def one_example(examples: list[Tensor], signals_i: list[Tensor]):
            def f(trained_values, differentiable):
                inputs = list(examples)
                for i, t in zip(wanted, differentiable):
                    inputs[i] = t
                inputs = [t if d is None else t.unsqueeze(d) for t, d in zip(inputs, call.dims)]
                args, kwargs = call.arguments(inputs)
                output = functional_call(module, trained_values, args, kwargs)
                outputs = _outputs(context.recording, module, output)
                return tuple(o.squeeze(d) for o, d, keep in zip(outputs, ctx.output_dims, ctx.differentiable) if keep)
            _, pullback = vjp(f, values, [examples[i] for i in wanted])
            return pullback(tuple(signals_i))

        batch = call.examples
        per_example_bytes = 4 * (sum(t.numel() // batch for t, d in zip(tensors, call.dims) if d is not None)
                                 + sum(s.numel() // batch for s in signals) + sum(p.numel() for p in values.values()))
        chunk = max(1, TUNING.scratch_bytes(signals[0].device) // per_example_bytes)
        input_grads: list[list[Tensor]] = [[] for _ in wanted]
        sums: dict[str, list[Tensor]] = {n: [] for n in trained}
        with context.recording.bypassed(), torch.enable_grad():
            for start in range(0, batch, chunk):
                n = min(chunk, batch - start)
                examples = [t.detach() if d is None else t.detach().narrow(d, start, n)
                            for t, d in zip(tensors, call.dims)]
                try:
                    g_params, g_inputs = vmap(one_example, in_dims=(list(call.dims), out_dims))(
                        examples, [s.narrow(d, start, n) for s, d in zip(signals, out_dims)])
                except RuntimeError as error:
                    if "random operation" not in str(error):
                        raise
                    raise ValueError(f"per-sample AGC cannot clip {context.recording.describe(module)}: it draws "
                                     "random numbers in its forward pass (dropout?), which torch.func runs again per "
                                     "example in the backward pass with new ones; set its rate to 0 or turn "
                                     "per_sample off") from None
                for grads, g in zip(input_grads, g_inputs):
                    grads.append(g)
                for name, param in trained.items():
                    sums[name].append(clipped_sum(context.rule, param, g_params[name]))
        grad_tensors: list[Tensor | None] = [None] * len(tensors)
        for i, grads in zip(wanted, input_grads):
            whole = torch.cat(grads)  # [examples, *one example's slice]
            grad_tensors[i] = whole.sum(0) if call.dims[i] is None else whole.movedim(0, call.dims[i])
        summed = [torch.stack(sums[n]).sum(0) for n in trained]
        return None, None, None, None, None, *grad_tensors, *summed


def generic_forward(context: EngineContext, module: nn.Module, *args, **kwargs):
    """`module`'s forward through `GenericLayer` while the recording is on."""
    if not context.recording.active():
        return type(module).forward(module, *args, **kwargs)
    call, tensors = Call.of(context.recording, module, args, kwargs)
    context.recording.note_call(module, call.examples)
    params = [p for p in module.parameters() if p.requires_grad]
    returned: list = []  # the module's own output, filled in by the call: where its tensors go back
    outputs = GenericLayer.apply(context, module, call, returned, len(tensors), *tensors, *params)
    return _rebuilt(returned[0], iter(outputs if isinstance(outputs, tuple) else (outputs,)))
