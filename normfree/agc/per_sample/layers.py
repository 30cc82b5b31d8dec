"""Per-sample AGC for linear and convolution layers: book-keeping inside the layer's own backward.

Plain, timm's weight-standardised, SAME-padded, grouped and depthwise convolutions, Conv1d and
Linear. The gradient of the layer's effective weight for example i and output unit u is
g_iu = sum_p delta_iu[p] * U_i[:, p], with U_i the input patches and delta the back-propagated
signal (book-keeping, Bu et al. 2023). Per chunk of examples, one of two ways, chosen from the
layer's shape by a cost model (`Layer.plan`):

- materialise g_i (a batched matmul of signal and patches, or for k x k kernels one convolution with
  the examples as groups, see `tuning`), take its unit norms, and accumulate the clipped sum
  sum_i c_iu * g_iu directly from it;
- with few output positions P, ghost norms (Li et al. 2022): ||g_iu||^2 = delta_iu^T U_i^T U_i delta_iu
  from the Gram matrix of the patches, no g_i at all; the clipped sum is then one ordinary
  weight-gradient call on the signal scaled by c_iu.

Weight standardisation is row-wise and linear in the gradient, so its per-example norms follow from
sums over g_iu (`Standardization.grad_norms`) and its backward applies to the clipped sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn

from ...models.equations import weight_statistics
from ...models.standardization import STD_CONVS, standardized_weight, weight_scale
from .clipped_sum import compute_dtype, per_example_unit_norms, sum_clipped, weighted_sum
from .tuning import TUNING

if TYPE_CHECKING:
    from .context import EngineContext
    from .example_rule import ExampleRule

__all__ = ["ClippedLayer", "Layer", "LayerSums", "Plan", "Standardization", "WeightGradSums", "layer_forward",
           "layer_sums"]


@dataclass(frozen=True)
class Plan:
    """How one backward pass of a layer, for one input shape, computes its per-example sums."""

    groups: int
    fan_in: int  # per group
    per_group: int  # output units per group
    positions: int  # output positions per example
    ghost: bool  # Gram matrices of the patches instead of g_i
    by_convolution: bool  # g_i by one convolution with the examples as groups (else by batched matmul)
    chunk: int  # examples per chunk

    @property
    def units(self) -> int:
        return self.groups * self.per_group


@dataclass(frozen=True)
class Layer:
    """What the per-sample backward needs to know about a linear or convolution layer."""

    kind: str  # "linear" or "conv"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    is_1d: bool = False  # Conv1d, computed as a Conv2d of height 1
    same_pad: bool = False  # timm pads SAME dynamically in forward
    standardized: bool = False  # timm (Scaled)StdConv2d(Same)
    eps: float = 0.0
    plans: dict = field(default_factory=dict, compare=False, repr=False)  # Plan per input shape, dtype and knobs

    @staticmethod
    def of(module: nn.Module) -> Layer | None:
        if type(module) is nn.Linear:
            return Layer("linear")
        if type(module) is nn.Conv1d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            return Layer("conv", (1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]),
                         (1, module.dilation[0]), module.groups, is_1d=True)
        if type(module) in (nn.Conv2d, Conv2dSame, *STD_CONVS) and module.padding_mode == "zeros" \
                and isinstance(module.padding, tuple):
            same = type(module) is Conv2dSame or bool(getattr(module, "same_pad", False))
            return Layer("conv", module.kernel_size, module.stride, (0, 0) if same else module.padding,
                         module.dilation, module.groups, same_pad=same, standardized=isinstance(module, STD_CONVS),
                         eps=getattr(module, "eps", 0.0))
        return None

    def plan(self, x: Tensor, signal: Tensor, dtype: torch.dtype, clip: bool, along_weight: bool) -> Plan:
        """The plan for this input, cached: it depends only on shapes, dtype, device, `TUNING` and, on a GPU, the
        memory held when it is made (`Tuning.scratch_bytes`).

        Costs, per example and group, in multiply-adds of a matmul (K fan-in, U units, P positions):
        materialising g_i is P * K * U plus about 5 passes over its K * U entries (writing it, its
        norm, the clipped sum, the standardisation sums), each pass weighted by `TUNING.pass_cost`;
        ghost norms are P^2 (K + U), plus the scaled weight-gradient call (P * K * U) that gives the
        clipped sum, plus P * K * U for the sums along the standardised weight. Deterministic where the
        scratch budget is fixed (the CPU's), so runs repeat exactly.
        """
        kxk, pass_cost = TUNING.kxk_method(x.device), TUNING.pass_cost(x.device)
        key = (tuple(x.shape), tuple(signal.shape), dtype, x.device, clip, along_weight, TUNING.scratch_key(x.device),
               kxk, pass_cost)
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        scratch_budget = TUNING.scratch_bytes(x.device)
        if self.kind == "linear":
            groups, fan_in, units = 1, x.shape[-1], signal.shape[-1]
            positions = x[0].numel() // fan_in
        else:
            groups, units = self.groups, signal.shape[1]
            fan_in = x.shape[1] // groups * self.kernel[0] * self.kernel[1]
            positions = signal[0, 0].numel()
        per_group = units // groups
        weight_cost = positions * fan_in * per_group
        materialise_cost = weight_cost + 5 * pass_cost * fan_in * per_group
        ghost_cost = (positions * positions * (fan_in + per_group) + weight_cost if clip else 0) \
            + (weight_cost if along_weight else 0)
        ghost = ghost_cost < materialise_cost
        by_convolution = not ghost and self.kind == "conv" and self.kernel != (1, 1) and kxk == "conv"
        products = groups * (positions * (positions + per_group) if ghost else per_group * fan_in)
        patches = 0 if by_convolution else groups * fan_in * positions
        # a standardised layer's patches (or g_i) are centred over the fan-in (`_chunk_sums`): a copy of them
        centred = (products if by_convolution else patches) if self.standardized and clip else 0
        scratch = products + patches + centred
        chunk = max(1, scratch_budget // (torch.finfo(dtype).bits // 8 * scratch))
        plan = self.plans[key] = Plan(groups, fan_in, per_group, positions, ghost, by_convolution, chunk)
        return plan

    # The layer as y = op(x, W_eff) + b, and the pieces of its backward pass.
    def effective_weight(self, module: nn.Module, weight: Tensor) -> Tensor:
        """The weight the layer applies, computed as the module's own forward pass computes it."""
        if not self.standardized:
            return weight
        return standardized_weight(module, weight)

    def as_2d(self, weight: Tensor) -> Tensor:
        return weight.unsqueeze(2) if self.is_1d else weight

    def as_2d_input(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2) if self.is_1d else x

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.is_1d:  # Conv1d's own kernel: the forward pass must be the module's to the last bit
            return F.conv1d(x, weight, bias, self.stride[1], self.padding[1], self.dilation[1], self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, x: Tensor, weight: Tensor, signal: Tensor) -> Tensor:
        """dL/dx, in x's memory format (channels-last stays so: the ops behind it would otherwise mix layouts)."""
        if self.kind == "linear":
            return signal @ weight
        # the convolution's own backward on x itself (torch.nn.grad.conv2d_input passes an expanded empty tensor,
        # whose layout is lost)
        grad = torch.ops.aten.convolution_backward(
            self.as_2d_input(signal), self.as_2d_input(x), self.as_2d(weight), None, self.stride, self.padding,
            self.dilation, False, (0, 0), self.groups, (True, False, False))[0]
        return grad.squeeze(2) if self.is_1d else grad

    def weight_grad(self, x: Tensor, weight: Tensor, signal: Tensor) -> Tensor:
        """sum over examples and positions of signal x patches: the ordinary weight gradient."""
        if self.kind == "linear":
            return signal.reshape(-1, signal.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad = torch.nn.grad.conv2d_weight(self.as_2d_input(x), self.as_2d(weight).shape, self.as_2d_input(signal),
                                           self.stride, self.padding, self.dilation, self.groups)
        return grad.reshape(weight.shape)

    def patches(self, x: Tensor) -> Tensor:
        """Input patches U, [examples, groups, fan-in, positions]."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)
        x2 = self.as_2d_input(x)
        if self.kernel == (1, 1) and self.padding == (0, 0):  # a 1x1 convolution's patches are its input pixels
            u = x2[:, :, :: self.stride[0], :: self.stride[1]]
        else:
            u = self.im2col(x2)
        return u.reshape(x.shape[0], self.groups, -1, u.shape[2:].numel())

    def im2col(self, x2: Tensor) -> Tensor:
        """`F.unfold(x2, kernel, dilation, padding, stride)`, [examples, channels * kernel, positions], as one
        copy of a strided view (CUDA's unfold launches one kernel per example)."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        if self.padding != (0, 0):
            x2 = F.pad(x2, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        n, channels, height, width = x2.shape
        out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
        s_n, s_c, s_h, s_w = x2.stride()
        view = x2.as_strided((n, channels, kh, kw, out_h, out_w), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
        return view.reshape(n, channels * kh * kw, out_h * out_w)

    def per_example_weight_grads(self, x: Tensor, signal: Tensor) -> Tensor:
        """g_i for each example, [examples, groups, units per group, fan-in]: one convolution with the
        examples as groups (the weight-gradient kernel, fastest on the CPU where there are many positions)."""
        n, units = x.shape[0], signal.shape[1]
        x2, d2 = self.as_2d_input(x), self.as_2d_input(signal)
        x2, d2 = x2.reshape(1, -1, *x2.shape[2:]), d2.reshape(1, -1, *d2.shape[2:])
        in_per_group = x.shape[1] // self.groups
        g = torch.nn.grad.conv2d_weight(x2, (n * units, in_per_group, *self.kernel), d2, self.stride, self.padding,
                                        self.dilation, n * self.groups)
        return g.reshape(n, self.groups, units // self.groups, -1)

    def signals(self, signal: Tensor) -> Tensor:
        """Back-propagated signal delta, [examples, groups, units per group, positions]."""
        if self.kind == "linear":
            return signal.reshape(signal.shape[0], -1, signal.shape[-1]).transpose(1, 2).unsqueeze(1)
        return signal.reshape(signal.shape[0], self.groups, signal.shape[1] // self.groups, -1)

    def per_unit_view(self, factor: Tensor, signal: Tensor) -> Tensor:
        """Per-(example, unit) factors shaped to broadcast against the layer's output signal."""
        if self.kind == "linear":
            return factor.reshape(factor.shape[0], *(1,) * (signal.ndim - 2), factor.shape[1])
        return factor.reshape(*factor.shape, *(1,) * (signal.ndim - 2))

    def per_example_bias_grads(self, signal: Tensor) -> Tensor:
        """d loss_i / d b, [examples, units], in float32 (or float64)."""
        dtype = torch.promote_types(signal.dtype, torch.float32)
        if self.kind == "linear":
            return signal.reshape(signal.shape[0], -1, signal.shape[-1]).sum(1, dtype=dtype)
        return signal.sum(dim=tuple(range(2, signal.ndim)), dtype=dtype)


@dataclass
class WeightGradSums:
    """Per example i and output unit u, sums over the effective-weight gradient g_iu (fan-in entries k), float32."""

    square: Tensor | None = None  # sum_k g_iuk^2, with g_iu centred over k for a standardised layer
    along_weight: Tensor | None = None  # sum_k g_iuk * w_hat_uk (w_hat: standardised, before gain and scale)


@dataclass
class LayerSums:
    """What the per-sample backward pass of a layer computed for its parameters, float32 (None: not asked for)."""

    weight: Tensor | None = None  # sum_i c_iu * g_iu, [units, fan-in] (materialised plans, clipped weight)
    weight_factor: Tensor | None = None  # c_iu, [examples, units] (ghost plans, clipped weight)
    gain: Tensor | None = None  # the gain's clipped sum, in its shape
    bias: Tensor | None = None  # the bias's clipped sum


def layer_sums(rule: ExampleRule, layer: Layer, x: Tensor, signal: Tensor,
               standardization: Standardization | None, weight: Tensor | None, gain: Tensor | None,
               gain_scale: float, bias: Tensor | None) -> LayerSums:
    """The per-example sums of a layer's parameters (None: not needed) and their clipping, one AGC call per chunk.

    The weight's factors are taken per chunk where g_i is materialised (the clipped sum is accumulated
    from g_i), once for the whole batch with ghost norms. The gain's and the bias's per-example
    gradients ([examples, units], d loss_i / d gain_u = gain_scale * sum_k g_iuk w_hat_uk) join the
    weight's call, or wait for it: AGC's rule runs once per chunk for all of the layer's parameters.
    The sums along the standardised weight are taken whenever the gain is needed, clipped or not.
    """
    dtype = compute_dtype(signal)
    acc = torch.promote_types(dtype, torch.float32)  # sums and the clipped sum accumulate in float32 (or float64)
    clip_weight = weight is not None and rule.clips(weight)
    along_weight = standardization is not None and gain is not None
    plan = layer.plan(x, signal, dtype, clip_weight, along_weight) if clip_weight or along_weight else None
    materialised = clip_weight and not plan.ghost
    w = None
    if standardization is not None and plan is not None:
        w = standardization.unit_weight.to(dtype).reshape(plan.groups, plan.per_group, plan.fan_in)
    extras = {name: p for name, p in (("gain", gain), ("bias", bias)) if p is not None}
    waiting: list[list[Tensor]] = [[] for _ in extras]  # per-example gradients of `extras`, per chunk
    parts: dict[str, list[Tensor]] = {"square": [], "along_weight": []}
    clipped: dict[str, Tensor] = {}  # running clipped sums, by parameter
    step = x.shape[0] if plan is None else plan.chunk
    for start in range(0, x.shape[0], step):
        signal_c = signal[start : start + step]
        chunk, g = _chunk_sums(layer, plan, x[start : start + step], signal_c, dtype, acc, clip_weight, w) \
            if plan is not None else ({}, None)
        grads = [(chunk["along_weight"] * gain_scale).reshape(-1, *gain.shape)] if gain is not None else []
        grads += [layer.per_example_bias_grads(signal_c)] if bias is not None else []
        if materialised:
            weight_factor, *factors = rule.factors(
                [weight, *extras.values()],
                [unit_norms(WeightGradSums(**chunk), standardization), *map(_one_unit_norms, grads)])
            _add(clipped, "weight", weighted_sum(weight_factor, g.reshape(g.shape[0], plan.units, plan.fan_in)).to(acc))
            for name, factor, grad in zip(extras, factors, grads):
                _add(clipped, name, sum_clipped(factor, grad, 1))
            continue
        for found, grad in zip(waiting, grads):
            found.append(grad)
        for name, value in chunk.items():
            parts[name].append(value)
    result = LayerSums(weight=clipped.get("weight"))
    if not materialised:
        sums = WeightGradSums(**{k: torch.cat(v) if len(v) > 1 else v[0] if v else None for k, v in parts.items()})
        grads = [torch.cat(found) if len(found) > 1 else found[0] for found in waiting]
        weights, norms = ([weight], [unit_norms(sums, standardization)]) if clip_weight else ([], [])
        factors = rule.factors([*weights, *extras.values()], [*norms, *map(_one_unit_norms, grads)])
        if clip_weight:
            result.weight_factor, *factors = factors
        for name, factor, grad in zip(extras, factors, grads):
            _add(clipped, name, sum_clipped(factor, grad, 1))
    result.gain, result.bias = clipped.get("gain"), clipped.get("bias")
    return result


def _one_unit_norms(grads: Tensor) -> Tensor:
    return per_example_unit_norms(grads, 1)  # gains and biases are one unit each (squeezed rank <= 1)


def _add(totals: dict[str, Tensor], name: str, part: Tensor) -> None:
    totals[name] = totals[name] + part if name in totals else part


def _chunk_sums(layer: Layer, plan: Plan, x_c: Tensor, signal_c: Tensor, dtype: torch.dtype, acc: torch.dtype,
                clip: bool, w: Tensor | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """The `WeightGradSums` fields one chunk of examples needs, and its g_i where the plan materialises it.

    For a standardised layer (`w` given) whose weight is clipped, g_iu is centred over its fan-in, through the
    patches (g_iu - mean_k g_iu = delta_iu^T (U_i - mean_k U_i)) or directly where a convolution gives g_i.
    Weight standardisation's backward pass removes that mean anyway (`Standardization`), and the norms of the
    centred g_iu need no subtraction of mean_k g_iu^2 from sum_k g_iu^2, which cancels catastrophically in
    float32 when the inputs share a large mean (4e-3 relative error against a float64 loop with inputs of mean
    30, before this).
    """
    x_c, signal_c = x_c.to(dtype), signal_c.to(dtype)
    n, groups, per_group, fan_in, units = x_c.shape[0], plan.groups, plan.per_group, plan.fan_in, plan.units
    centre = clip and w is not None
    g = None
    if plan.by_convolution:
        g = layer.per_example_weight_grads(x_c, signal_c)
        if centre:
            g = g - g.mean(-1, keepdim=True)
    else:
        u, d = layer.patches(x_c), layer.signals(signal_c)
        if centre:
            u = u - u.mean(2, keepdim=True)
        if not plan.ghost:
            g = d @ u.transpose(-1, -2)
    chunk = {}
    if plan.ghost:
        if clip:
            chunk["square"] = ((d @ (u.transpose(-1, -2) @ u)) * d).sum(-1, dtype=acc).reshape(n, units)
        if w is not None:
            # w_hat applied to every example's patches: one matmul (a broadcast batched one would copy w_hat per
            # example)
            y = (w @ u.permute(1, 2, 0, 3).reshape(groups, fan_in, -1)).reshape(groups, per_group, n, -1)
            chunk["along_weight"] = (y.permute(2, 0, 1, 3) * d).sum(-1, dtype=acc).reshape(n, units)
    else:
        if clip:
            chunk["square"] = torch.linalg.vector_norm(g, dim=-1, dtype=acc).square().reshape(n, units)
        if w is not None:
            chunk["along_weight"] = (g * w).sum(-1, dtype=acc).reshape(n, units)
    return chunk, g


def unit_norms(sums: WeightGradSums, standardization: Standardization | None) -> Tensor:
    """Per-example unit norms of dL/dW from the sums over g (examples x units)."""
    return standardization.grad_norms(sums) if standardization is not None else sums.square.sqrt()


@dataclass
class Standardization:
    """Per output unit of a weight-standardised layer: w = (W - mean) / sqrt(var + eps) and what the backward
    pass needs of it: the batch-norm statistics of W's rows and the factors of `grad_norms`."""

    rows: Tensor  # W as [1, units, fan-in], float32: the batch-norm input
    unit_weight: Tensor  # w, [units, fan-in], float32
    mean: Tensor  # [units]
    inv_std: Tensor  # 1 / sqrt(var + eps), [units]
    scale: Tensor | None  # gain * gamma / sqrt(fan_in), [units], or None (StdConv2d)
    eps: float
    along_factor: Tensor  # (1 + eps / (var + eps)) / fan-in, [units]
    norm_factor: Tensor  # |scale| / sqrt(var + eps), [units]

    @staticmethod
    def of(module: nn.Module, eps: float) -> Standardization:
        """For a timm (Scaled)StdConv2d(Same) `module`, from its weight and gain as they are now."""
        weight = module.weight.detach()
        mean, inv_std = weight_statistics(weight.float(), eps)
        scale = weight_scale(module)
        scale = None if scale is None else scale.detach().float()
        rows = weight.float().reshape(weight.shape[0], -1)
        unit_weight = (rows - mean.unsqueeze(1)).mul_(inv_std.unsqueeze(1))
        fan_in = rows.shape[1]
        along_factor = inv_std.square().mul_(eps / fan_in).add_(1 / fan_in)
        norm_factor = inv_std if scale is None else scale.abs().mul_(inv_std)
        return Standardization(rows.unsqueeze(0), unit_weight, mean, inv_std, scale, eps, along_factor, norm_factor)

    def grad_norms(self, sums: WeightGradSums) -> Tensor:
        """Per-example unit norms of dL/dW from the sums over the gradient g of the standardised weight.

        dL/dW = scale / sqrt(var + eps) * (g - mean(g) - w * mean(g * w)) (the batch-norm backward
        pass, see `backward`), whose squared norm is ||g - mean(g)||^2 - n mean(g w)^2 (2 - r), with n the
        fan-in and r = ||w||^2 / n = var / (var + eps): 2 - r = 1 + eps / (var + eps). `sums.square` is
        ||g - mean(g)||^2 (centred g, see `_chunk_sums`); w has mean 0, so sum(g w) needs no centring.
        """
        square = sums.square - sums.along_weight.square() * self.along_factor
        return square.clamp_min_(0).sqrt_().mul_(self.norm_factor)

    def backward(self, grad: Tensor) -> Tensor:
        """dL/dW from dL/dW_hat for W_hat = scale * w (row-wise, exact): the batch-norm backward pass."""
        grad_rows, _, _ = torch.ops.aten.native_batch_norm_backward(
            grad.float().reshape(self.rows.shape), self.rows, self.scale, None, None, self.mean, self.inv_std, True,
            self.eps, [True, False, False])
        return grad_rows.reshape(grad.shape)


def _as_autocast_casts(weight: Tensor, device_type: str) -> Tensor:
    """`weight` in the dtype autocast would run the layer in (as autocast casts it: the forward pass stays the
    model's own bit for bit), so that the backward pass reuses the cast, as autograd does, instead of casting again."""
    if torch.is_autocast_enabled(device_type) and weight.is_floating_point() and weight.dtype != torch.float64:
        return weight.to(torch.get_autocast_dtype(device_type))
    return weight


class ClippedLayer(torch.autograd.Function):
    """y = op(x, W_eff) + b whose backward returns the per-sample clipped sums for W, its gain and b."""

    @staticmethod
    def forward(ctx, context, module, layer, x, weight, bias, gain):
        ctx.context, ctx.module, ctx.layer = context, module, layer
        effective = _as_autocast_casts(layer.effective_weight(module, weight), x.device.type)
        ctx.save_for_backward(x, weight, effective, bias, gain)
        return layer.apply(x, effective, bias)

    @staticmethod
    def backward(ctx, signal):
        context, module, layer = ctx.context, ctx.module, ctx.layer
        x, weight, effective, bias, gain = ctx.saved_tensors
        need_x, need_weight, need_bias, need_gain = ctx.needs_input_grad[3:]
        with torch.no_grad():
            dtype = signal.dtype  # under autocast the layer ran in half precision: so does its backward
            grad_x = layer.input_grad(x.to(dtype), effective.to(dtype), signal).to(x.dtype) if need_x else None
            params = (weight if need_weight else None, bias if need_bias else None, gain if need_gain else None)
            if all(p is None for p in params):
                return None, None, None, grad_x, None, None, None
            if any(p is not None and context.rule.clips(p) for p in params):
                context.rule.prepare_backward()  # before any graph: the signal scale of this pass

            def work(x: Tensor, signal: Tensor) -> tuple:
                # `effective` lends only its shape: a graph must not read this pass's tensors (the standardised
                # weight's statistics are taken again inside, from the parameters)
                return _parameter_grads(context.rule, module, layer, x, signal, effective, *params)

            key = tuple(-1 if p is None else p.data_ptr() for p in params)
            grad_weight, grad_bias, grad_gain = context.graphs.run(layer, key, work, x, signal, params)
        return None, None, None, grad_x, grad_weight, grad_bias, grad_gain


def _parameter_grads(rule: ExampleRule, module: nn.Module, layer: Layer, x: Tensor, signal: Tensor,
                     effective: Tensor, weight: Tensor | None, bias: Tensor | None,
                     gain: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The clipped per-example sums of the layer's weight, bias and gain (None: not needed) from its input and output
    signal; `effective` is the weight the layer applied (its shape is read)."""
    dtype = signal.dtype
    standardization = Standardization.of(module, layer.eps) \
        if layer.standardized and (weight is not None or gain is not None) else None
    sums = layer_sums(rule, layer, x, signal, standardization, weight, gain, getattr(module, "scale", 1.0), bias)
    grad_weight = grad_gain = grad_bias = None
    if weight is not None:
        if sums.weight is not None:  # materialised: the clipped sum of dL/dW_eff is there already
            grad_weight = sums.weight.reshape(weight.shape)
        else:
            scaled = signal if sums.weight_factor is None else \
                signal * layer.per_unit_view(sums.weight_factor, signal).to(dtype)
            grad_weight = layer.weight_grad(x.to(dtype), effective, scaled)
        if standardization is not None:
            grad_weight = standardization.backward(grad_weight)
        grad_weight = grad_weight.to(weight.dtype)
    if gain is not None:
        grad_gain = sums.gain.to(gain.dtype)
    if bias is not None:
        grad_bias = sums.bias.to(bias.dtype)
    return grad_weight, grad_bias, grad_gain


def layer_forward(context: EngineContext, layer: Layer, module: nn.Module, x: Tensor) -> Tensor:
    """`module`'s forward through `ClippedLayer` while the recording is on."""
    if not context.recording.active():
        return type(module).forward(module, x)
    context.recording.note_call(module, x.shape[0])
    if layer.same_pad:
        x = pad_same(x, module.kernel_size, module.stride, module.dilation)
    out = ClippedLayer.apply(context, module, layer, x, module.weight, module.bias, getattr(module, "gain", None))
    context.graphs.note_forward(x, out)
    return out
