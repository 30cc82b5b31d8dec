"""Per-sample Adaptive Gradient Clipping: AGC on each example's gradient, before the batch mean.

The gradient applied is (1/N) * sum_i clip(g_i), where g_i is example i's gradient of its own loss
term and clip is AGC (Brock et al. 2021, Sec. 4, Eq. 3) applied per unit with the current weights.
AGC's threshold for a unit depends only on that unit's weight, so every parameter can be clipped
inside the backward pass of the layer that owns it, in the same single backward pass: no second
pass and no per-example gradients of the whole model.

How each layer does it (book-keeping, Bu et al. 2023; ghost norms, Li et al. 2022):

- Linear and convolution layers (plain, timm's weight-standardised ones, SAME-padded, grouped,
  depthwise, Conv1d) get a backward of their own. The gradient of the layer's effective weight for
  example i and output unit u is g_iu = sum_p delta_iu[p] * U_i[:, p], with U_i the input patches
  and delta the back-propagated signal. Its norm comes either from materialising g_i in chunks of
  examples or, where the layer has few output positions, from the Gram matrix of the patches
  (||g_iu||^2 = delta_iu^T U_i^T U_i delta_iu), whichever costs less (`_weight_grad_sums`). The
  clipped sum sum_i c_iu * g_iu is then one ordinary weight-gradient call on the signal scaled by
  c_iu. Weight standardisation is row-wise and linear in the gradient, so its per-example norms
  follow from the same sums (`_Standardization.grad_norms`).
- Parameters of container modules (the SkipInit gain of an NF block) are handed to the block as a
  copy per example, so autograd delivers their per-example gradients directly (`_PerExampleCopy`).
  They must act elementwise with broadcasting against the batch, as gains and layer scales do.
- Any other layer with parameters goes through torch.func (vmap of vjp) in chunks of examples:
  exact, slower.

BatchNorm in training mode couples the examples of a batch: per-example gradients do not exist,
and `PerSampleClipper` refuses such models. Dropout and drop-path are per-example and fine.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .agc import ClipStats, num_units, adaptive_clip_factor, unitwise_norm
from .standardization import STD_CONVS, standardize_weight, weight_scale

__all__ = ["PerSampleClipper", "check_examples_independent", "loss_reduction"]

# Examples are processed in chunks whose scratch tensors (patches, per-example gradients or Gram
# matrices) take about this many bytes, so memory stays bounded whatever the batch size.
_CHUNK_BYTES = 16 << 20
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def check_examples_independent(batchnorms: nn.Module | list[tuple[str, nn.Module]]) -> None:
    """ValueError if a BatchNorm layer is in training mode: it couples the examples of a batch.

    Takes a model, or the (name, module) BatchNorm layers of one, listed once (`PerSampleClipper`
    checks before every training batch, since a model can be switched to training mode at any time).
    """
    if isinstance(batchnorms, nn.Module):
        batchnorms = [(n, m) for n, m in batchnorms.named_modules() if isinstance(m, _BATCHNORMS)]
    names = [name for name, module in batchnorms if module.training]
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ValueError(
        f"per-sample AGC needs examples that do not interact, but the model has BatchNorm layers in training mode "
        f"({shown}): BatchNorm couples the examples of a batch, so per-example gradients do not exist. Use a "
        "normalizer-free model (normfree.nf_learner with e.g. 'nf_resnet26' or 'nf_resnet_small'), or turn "
        "per_sample off"
    )


def loss_reduction(loss_func, pred: Tensor, *targets: Tensor) -> str:
    """How `loss_func` reduces per-example terms: "mean" or "sum"; ValueError if it is neither.

    Checked directly: the loss of the batch must equal the mean (or the sum) of the losses of its
    examples one at a time. A weighted mean, a median or any custom reduction fails the check.
    """
    with torch.no_grad():
        batch = float(loss_func(pred, *targets))
        each = [float(loss_func(pred[i : i + 1], *(t[i : i + 1] for t in targets))) for i in range(len(pred))]
    tolerance = 1e-4 * max(1.0, abs(batch))
    if abs(batch - sum(each) / len(each)) <= tolerance:
        return "mean"
    if abs(batch - sum(each)) <= tolerance:
        return "sum"
    name = getattr(loss_func, "__name__", type(loss_func).__name__)
    raise ValueError(
        f"per-sample AGC needs a loss that is the mean or the sum of one term per example; {name} on this batch "
        f"is {batch:.6g}, but the mean of its per-example values is {sum(each) / len(each):.6g} and their sum "
        f"{sum(each):.6g} (a custom or weighted reduction?). Use a standard loss such as CrossEntropyLossFlat, "
        "or turn per_sample off"
    )


@dataclass
class _Counts:
    clipped: Tensor
    nonfinite: Tensor
    units: int = 0


class PerSampleClipper:
    """Installs per-sample AGC on the layers of `model`; `clipping` maps parameters to lambda.

    Parameters missing from `clipping` (the excluded classifier weight, parameters the optimizer
    does not train) get their ordinary summed gradient. While gradients
    are enabled (between `start()` and `stop()`), the model's layers compute clipped per-example sums in their backward pass; the
    per-example gradient of a layer output is the signal reaching it divided by `grad_scale`,
    which the caller sets (before the backward pass) to d(loss as backpropagated) / d(one example's
    loss term): e.g. loss-scale / batch-size for a mean loss under a grad scaler.
    """

    def __init__(self, model: nn.Module, clipping: dict[int, float], eps: float = 1e-3):
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
        self.check_examples_independent()
        self.clipping, self.eps = clipping, eps
        self.grad_scale: Tensor | None = None
        self._active = False
        self._bypass = 0
        self._counts: dict[int, _Counts] = {}
        self._installed: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._called: set[nn.Module] = set()  # installed modules called in the current forward pass
        owners: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            for n, p in own:
                if id(p) in owners:
                    raise ValueError(
                        f"per-sample AGC cannot clip parameters shared by several modules: {owners[id(p)]} is also "
                        f"{name}.{n}; untie them or turn per_sample off"
                    )
                owners[id(p)] = f"{name}.{n}" if name else n
            if own:
                self._install(module, has_children=any(True for c in module.children() for _ in c.parameters()))
                self._names[module] = name or type(module).__name__
        self._root_hook = model.register_forward_pre_hook(self._new_forward_pass)

    def check_examples_independent(self) -> None:
        """ValueError if one of the model's BatchNorm layers is now in training mode."""
        check_examples_independent(self._batchnorms)

    # -- installation ---------------------------------------------------------------------------
    def _install(self, module: nn.Module, has_children: bool) -> None:
        layer = _Layer.of(module)
        if has_children:
            forward = _container_forward
        elif layer is not None:
            forward = _layer_forward
            module._normfree_layer = layer
        else:
            forward = _generic_forward
        module.forward = forward.__get__(module)  # instance attribute: shadows the class's forward
        module._normfree_clipper = self
        self._installed.append(module)

    def remove(self) -> None:
        """Restore every layer's own forward."""
        for module in self._installed:
            for attribute in ("forward", "_normfree_clipper", "_normfree_layer"):
                module.__dict__.pop(attribute, None)
        self._installed = []
        self._root_hook.remove()

    def _new_forward_pass(self, model: nn.Module, args: tuple) -> None:
        self._called.clear()

    def note_call(self, module: nn.Module) -> None:
        """Refuse a layer called twice in one forward pass of the model (weights reused), and remove itself.

        Each call's backward would clip that use's per-example gradient, but an example's gradient
        is the sum over the uses: clipped per use is not clipped per example. (Calling the whole
        model twice before one backward pass is not detected.)
        """
        if module in self._called:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self._names[module]} ({type(module).__name__}) was called twice in one forward "
                "pass, so its weights are reused; per-sample AGC would clip each use separately instead of each "
                "example's summed gradient. Turn per_sample off for this model"
            )
        self._called.add(module)

    def start(self) -> None:
        """From now on, forward passes with gradients enabled clip per example in their backward pass."""
        self._active = True

    def stop(self) -> None:
        self._active = False

    def recording(self) -> bool:
        return self._active and not self._bypass and torch.is_grad_enabled()

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    # -- clipping -------------------------------------------------------------------------------
    def clip_factors(self, param: Tensor, norms: Tensor) -> Tensor | None:
        """AGC factors (examples x units) for per-example unit norms of the backpropagated signal; None: not clipped."""
        clipping = self.clipping.get(id(param))
        if clipping is None:
            return None
        if self.grad_scale is None:
            raise RuntimeError("per-sample AGC: grad_scale was not set before the backward pass")
        norms = norms.float() / self.grad_scale
        factor = adaptive_clip_factor(unitwise_norm(param.detach()).reshape(1, -1).float(), norms, clipping, self.eps)
        counts = self._counts.get(id(param))
        if counts is None:
            zero = torch.zeros((), device=norms.device)
            counts = self._counts[id(param)] = _Counts(zero, zero.clone())
        counts.clipped = counts.clipped + (factor < 1).sum()
        counts.nonfinite = counts.nonfinite + (~norms.isfinite()).sum()
        counts.units += factor.numel()
        return factor

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset."""
        stats = []
        for params in groups:
            counts = [self._counts.get(id(p)) for p in params]
            device = next((c.clipped.device for c in counts if c is not None), torch.device("cpu"))
            zero = torch.zeros((), device=device)
            stats.append(ClipStats(
                torch.stack([c.clipped if c else zero for c in counts]) if counts else zero.new_zeros(0),
                torch.stack([c.nonfinite if c else zero for c in counts]) if counts else zero.new_zeros(0),
                torch.tensor([c.units if c else 0 for c in counts], dtype=torch.long),
            ))
        self._counts = {}
        return stats


def _per_example_unit_norms(grads: Tensor, param: Tensor) -> Tensor:
    """Unit norms (examples x units) of per-example gradients `grads` [B, *param.shape]."""
    return torch.linalg.vector_norm(grads.reshape(grads.shape[0], num_units(param), -1).float(), dim=-1)


def _clipped_sum(clipper: PerSampleClipper, param: Tensor, grads: Tensor) -> Tensor:
    """sum_i clip(g_i) for per-example gradients `grads` [B, *param.shape]."""
    factor = clipper.clip_factors(param, _per_example_unit_norms(grads, param))
    if factor is None:
        return grads.sum(0)
    scaled = grads.reshape(grads.shape[0], factor.shape[1], -1) * factor.unsqueeze(-1).to(grads.dtype)
    return scaled.sum(0).reshape(param.shape)


# ---------------------------------------------------------------------------------------------
# Linear and convolution layers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
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

    @staticmethod
    def of(module: nn.Module) -> _Layer | None:
        if type(module) is nn.Linear:
            return _Layer("linear")
        if type(module) is nn.Conv1d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            return _Layer("conv", (1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]),
                          (1, module.dilation[0]), module.groups, is_1d=True)
        if type(module) in (nn.Conv2d, Conv2dSame, *STD_CONVS) and module.padding_mode == "zeros" \
                and isinstance(module.padding, tuple):
            same = type(module) is Conv2dSame or bool(getattr(module, "same_pad", False))
            return _Layer("conv", module.kernel_size, module.stride, (0, 0) if same else module.padding,
                          module.dilation, module.groups, same_pad=same, standardized=isinstance(module, STD_CONVS),
                          eps=getattr(module, "eps", 0.0))
        return None

    # The layer as y = op(x, W_eff) + b, and the pieces of its backward pass.
    def effective_weight(self, module: nn.Module, weight: Tensor) -> Tensor:
        if self.standardized:
            return standardize_weight(weight, weight_scale(module), self.eps)
        return weight

    def as_2d(self, weight: Tensor) -> Tensor:
        return weight.unsqueeze(2) if self.is_1d else weight

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        out = F.conv2d(x.unsqueeze(2) if self.is_1d else x, self.as_2d(weight), bias, self.stride, self.padding,
                       self.dilation, self.groups)
        return out.squeeze(2) if self.is_1d else out

    def input_grad(self, x: Tensor, weight: Tensor, signal: Tensor) -> Tensor:
        if self.kind == "linear":
            return signal @ weight
        x2 = x.unsqueeze(2) if self.is_1d else x
        grad = torch.nn.grad.conv2d_input(x2.shape, self.as_2d(weight), self._signal_2d(signal), self.stride,
                                          self.padding, self.dilation, self.groups)
        return grad.squeeze(2) if self.is_1d else grad

    def weight_grad(self, x: Tensor, weight: Tensor, signal: Tensor) -> Tensor:
        """sum over examples and positions of signal x patches: the ordinary weight gradient."""
        if self.kind == "linear":
            return signal.reshape(-1, signal.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        x2 = x.unsqueeze(2) if self.is_1d else x
        grad = torch.nn.grad.conv2d_weight(x2, self.as_2d(weight).shape, self._signal_2d(signal), self.stride,
                                           self.padding, self.dilation, self.groups)
        return grad.reshape(weight.shape)

    def _signal_2d(self, signal: Tensor) -> Tensor:
        return signal.unsqueeze(2) if self.is_1d else signal

    def patches(self, x: Tensor) -> Tensor:
        """Input patches U, [examples, groups, fan-in, positions]."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)
        x2 = x.unsqueeze(2) if self.is_1d else x
        if self.kernel == (1, 1) and self.padding == (0, 0):  # a 1x1 convolution's patches are its input pixels
            u = x2[:, :, :: self.stride[0], :: self.stride[1]]
        else:
            u = F.unfold(x2, self.kernel, self.dilation, self.padding, self.stride)
        return u.reshape(x.shape[0], self.groups, -1, u.shape[2:].numel())

    def per_example_weight_grads(self, x: Tensor, signal: Tensor) -> Tensor:
        """g_i for each example, [examples, groups, units per group, fan-in]: one convolution with the
        examples as groups (the weight-gradient kernel, fastest where there are many positions)."""
        n, units = x.shape[0], signal.shape[1]
        x2, d2 = (x.unsqueeze(2), signal.unsqueeze(2)) if self.is_1d else (x, signal)
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


@dataclass
class _WeightGradSums:
    """Per example i and output unit u, sums over the effective-weight gradient g_iu (fan-in entries k)."""

    square: Tensor | None = None  # sum_k g_iuk^2
    total: Tensor | None = None  # sum_k g_iuk
    along_weight: Tensor | None = None  # sum_k g_iuk * w_hat_uk (w_hat: standardised, before gain and scale)


def _weight_grad_sums(layer: _Layer, x: Tensor, signal: Tensor, unit_weight: Tensor | None,
                      square: bool) -> _WeightGradSums:
    """The per-example sums over each unit's effective-weight gradient that the clipping needs, in float32.

    Per chunk of examples, one of three ways, chosen from the layer's shape (deterministically, so
    runs repeat exactly): with few output positions P, from the Gram matrix of the patches ("ghost
    norms", no g_i at all); otherwise g_i is materialised, by a batched matmul of signal and patches
    for 1x1 convolutions and linear layers, by one convolution with the examples as groups for
    larger kernels.
    """
    batch = x.shape[0]
    sample = layer.patches(x[:1])
    groups, fan_in, positions = sample.shape[1:]
    units = signal.shape[1] if layer.kind == "conv" else signal.shape[-1]
    per_group = units // groups
    materialise_cost = positions * fan_in * per_group + 4 * fan_in * per_group
    ghost_cost = positions * positions * (fan_in + per_group) + (positions * fan_in * per_group if unit_weight is not None else 0)
    ghost = ghost_cost < materialise_cost
    by_convolution = not ghost and layer.kind == "conv" and layer.kernel != (1, 1)
    scratch = groups * (positions * (positions + per_group) if ghost else per_group * fan_in) \
        + (0 if by_convolution else groups * fan_in * positions)
    chunk = max(1, _CHUNK_BYTES // (4 * scratch))
    w = None if unit_weight is None else unit_weight.float().reshape(groups, per_group, fan_in)
    parts: dict[str, list[Tensor]] = {"square": [], "total": [], "along_weight": []}
    for start in range(0, batch, chunk):
        x_c, signal_c = x[start : start + chunk].float(), signal[start : start + chunk].float()
        n = x_c.shape[0]
        if by_convolution:
            g = layer.per_example_weight_grads(x_c, signal_c)
        else:
            u, d = layer.patches(x_c), layer.signals(signal_c)
            if not ghost:
                g = d @ u.transpose(-1, -2)
        if ghost:
            if square:
                parts["square"].append(((d @ (u.transpose(-1, -2) @ u)) * d).sum(-1).reshape(n, units))
            if w is not None:
                parts["total"].append((d * u.sum(2, keepdim=True)).sum(-1).reshape(n, units))
                # w_hat applied to every example's patches: one matmul (a broadcast batched one would copy w_hat per example)
                y = (w @ u.permute(1, 2, 0, 3).reshape(groups, fan_in, -1)).reshape(groups, per_group, n, positions)
                parts["along_weight"].append((y.permute(2, 0, 1, 3) * d).sum(-1).reshape(n, units))
        else:
            if square:
                parts["square"].append(g.square().sum(-1).reshape(n, units))
            if w is not None:
                parts["total"].append(g.sum(-1).reshape(n, units))
                parts["along_weight"].append((g * w).sum(-1).reshape(n, units))
    return _WeightGradSums(**{k: torch.cat(v) if v else None for k, v in parts.items()})


@dataclass
class _Standardization:
    """Per output unit of a weight-standardised layer: w = (W - mean) / sqrt(var + eps), its scale
    (gain * gamma / sqrt(fan_in), or 1) and 1 / sqrt(var + eps)."""

    unit_weight: Tensor  # [units, fan-in], float32
    scale: Tensor  # [units]
    inv_std: Tensor  # [units]
    eps: float

    @staticmethod
    def of(module: nn.Module, weight: Tensor, eps: float) -> _Standardization:
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        unit_weight, inv_std = standardize_weight(rows, None, eps, with_inv_std=True)
        scale = weight_scale(module)
        return _Standardization(unit_weight, torch.ones_like(inv_std) if scale is None else scale.detach().float(), inv_std,
                                eps)

    def grad_norms(self, sums: _WeightGradSums) -> Tensor:
        """Per-example unit norms of dL/dW from the sums over the gradient g of the standardised weight.

        dL/dW = scale / sqrt(var + eps) * (g - mean(g) - w * mean(g * w)) (the batch-norm backward
        pass, see `backward`), whose squared norm is ||g||^2 - n mean(g)^2 - n mean(g w)^2 (2 - r),
        with n the fan-in and r = ||w||^2 / n = var / (var + eps).
        """
        n = self.unit_weight.shape[1]
        ratio = 1 - self.eps * self.inv_std.square()  # var / (var + eps)
        square = sums.square - sums.total.square() / n - sums.along_weight.square() * (2 - ratio) / n
        return square.clamp_min(0).sqrt() * (self.scale.abs() * self.inv_std)

    def backward(self, grad: Tensor) -> Tensor:
        """dL/dW from dL/dW_hat for W_hat = scale * w (row-wise, exact)."""
        g = grad.float().reshape(self.unit_weight.shape)
        w = self.unit_weight
        projected = g - g.mean(1, keepdim=True) - w * (g * w).mean(1, keepdim=True)
        return (projected * (self.scale * self.inv_std).unsqueeze(1)).reshape(grad.shape)


class _ClippedLayer(torch.autograd.Function):
    """y = op(x, W_eff) + b whose backward returns the per-sample clipped sums for W, its gain and b."""

    @staticmethod
    def forward(ctx, clipper, module, layer, x, weight, bias, gain):
        ctx.clipper, ctx.module, ctx.layer = clipper, module, layer
        effective = layer.effective_weight(module, weight)
        ctx.save_for_backward(x, weight, effective, bias, gain)
        return layer.apply(x, effective, bias)

    @staticmethod
    def backward(ctx, signal):
        clipper, module, layer = ctx.clipper, ctx.module, ctx.layer
        x, weight, effective, bias, gain = ctx.saved_tensors
        need_x, need_weight, need_bias, need_gain = ctx.needs_input_grad[3:]
        with torch.no_grad():
            dtype = signal.dtype  # under autocast the layer ran in half precision: so does its backward
            grad_x = layer.input_grad(x.to(dtype), effective.to(dtype), signal).to(x.dtype) if need_x else None
            clip_weight = need_weight and id(weight) in clipper.clipping
            standardization = _Standardization.of(module, weight, layer.eps) if layer.standardized and (
                need_weight or need_gain) else None
            unit_weight = standardization.unit_weight if standardization is not None and (clip_weight or need_gain) \
                else None
            sums = _weight_grad_sums(layer, x, signal, unit_weight, square=clip_weight) \
                if clip_weight or unit_weight is not None else _WeightGradSums()

            grad_weight = grad_gain = grad_bias = None
            if need_weight:
                factor = None
                if clip_weight:
                    norms = standardization.grad_norms(sums) if standardization is not None else sums.square.sqrt()
                    factor = clipper.clip_factors(weight, norms)
                scaled = signal if factor is None else signal * layer.per_unit_view(factor, signal).to(dtype)
                grad_weight = layer.weight_grad(x.to(dtype), effective, scaled)
                if standardization is not None:
                    grad_weight = standardization.backward(grad_weight)
                grad_weight = grad_weight.to(weight.dtype)
            if need_gain:
                per_example = sums.along_weight * module.scale  # d loss / d gain_u, per example
                grad_gain = _clipped_sum(clipper, gain, per_example.reshape(-1, *gain.shape)).to(gain.dtype)
            if need_bias:
                per_example = signal.reshape(signal.shape[0], -1, signal.shape[-1]).sum(1) if layer.kind == "linear" \
                    else signal.reshape(*signal.shape[:2], -1).sum(-1)
                grad_bias = _clipped_sum(clipper, bias, per_example.float()).to(bias.dtype)
        return None, None, None, grad_x, grad_weight, grad_bias, grad_gain


def _layer_forward(self: nn.Module, x: Tensor) -> Tensor:
    clipper: PerSampleClipper = self._normfree_clipper
    if not clipper.recording():
        return type(self).forward(self, x)
    clipper.note_call(self)
    layer: _Layer = self._normfree_layer
    if layer.same_pad:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
    return _ClippedLayer.apply(clipper, self, layer, x, self.weight, self.bias, getattr(self, "gain", None))


# ---------------------------------------------------------------------------------------------
# Parameters of container modules: gains and scales applied elementwise
# ---------------------------------------------------------------------------------------------
class _PerExampleCopy(torch.autograd.Function):
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
        return None, _clipped_sum(ctx.clipper, ctx.param, per_example).to(ctx.param.dtype), None, None


def _container_forward(self: nn.Module, *args, **kwargs):
    clipper: PerSampleClipper = self._normfree_clipper
    batch = next((a for a in args if isinstance(a, Tensor)), None)
    if not clipper.recording() or batch is None:
        return type(self).forward(self, *args, **kwargs)
    clipper.note_call(self)
    own = {n: p for n, p in self._parameters.items() if p is not None and p.requires_grad}
    try:
        for name, param in own.items():
            self._parameters[name] = _PerExampleCopy.apply(clipper, param, batch.shape[0], batch.ndim)
        return type(self).forward(self, *args, **kwargs)
    finally:
        self._parameters.update(own)


# ---------------------------------------------------------------------------------------------
# Any other layer: torch.func, chunked
# ---------------------------------------------------------------------------------------------
class _GenericLayer(torch.autograd.Function):
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
        chunk = max(1, _CHUNK_BYTES // per_example_bytes)
        grad_x, grads = [], {n: [] for n in names}
        with clipper.bypassed(), torch.enable_grad():
            for start in range(0, x.shape[0], chunk):
                result = vmap(one_example)(x[start : start + chunk].detach(), signal[start : start + chunk])
                g_params, g_x = result if differentiable_x else (result, None)
                grad_x.append(g_x)
                for n in names:
                    grads[n].append(_clipped_sum(clipper, trained[n], g_params[n]))
        summed = [torch.stack(grads[n]).sum(0) for n in names]
        return None, None, torch.cat(grad_x) if differentiable_x else None, *summed


def _generic_forward(self: nn.Module, x: Tensor, *args, **kwargs):
    clipper: PerSampleClipper = self._normfree_clipper
    if not clipper.recording() or args or kwargs or not isinstance(x, Tensor):
        if clipper.recording():
            raise TypeError(f"per-sample AGC supports layers called with one tensor; {type(self).__name__} got "
                            f"{1 + len(args)} positional and {len(kwargs)} keyword arguments")
        return type(self).forward(self, x, *args, **kwargs)
    clipper.note_call(self)
    params = [p for p in self.parameters(recurse=False) if p.requires_grad]
    return _GenericLayer.apply(clipper, self, x, *params)

