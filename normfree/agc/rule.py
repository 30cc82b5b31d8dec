"""The AGC rule and what it acts on: units, unit-wise norms, and the clip factor of Eq. (3).

Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
Normalization" (arXiv 2102.06171), Section 4. Every function here works on PyTorch's weight
layout, [out, in, *kernel]: a *unit* is one output row or one filter, i.e. one index of dim 0.
(DeepMind's JAX code stores weights HWIO, so its axis numbers must not be copied onto PyTorch
tensors: that is how a popular port came to norm Linear weights over the wrong axis.)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

__all__ = ["DEFAULT_CLIPPING", "DEFAULT_CLIP_FRACTION", "DEFAULT_EPS", "DEFAULT_FIND_STEPS",
           "GRAD_NORM_FLOOR", "adaptive_clip_factor",
           "check_agc_arguments", "check_clip_fraction", "clip_factor_below", "clip_threshold",
           "gradient_to_weight_ratio", "is_single_unit", "num_units", "suggest_clipping", "unit_norm_vector",
           "unit_norms", "unit_ratios", "unit_shape", "unitwise_norm"]

DEFAULT_CLIPPING = 0.01  # the paper's lambda for batch 1024-4096 (Sec. 4.1)
DEFAULT_EPS = 1e-3  # the paper's floor on ||W_u|| (Sec. 4)
DEFAULT_CLIP_FRACTION = 0.1  # the share of gradient-to-weight ratios a suggested lambda clips (`suggest_clipping`)
DEFAULT_FIND_STEPS = 40  # unclipped optimizer steps whose ratios learn.agc_find() records
# the paper's floor on ||G_u|| in Eq. (3)'s division, as DeepMind's code has it
GRAD_NORM_FLOOR = 1e-6

def is_single_unit(x: Tensor) -> bool:
    """Whether `x` is one unit as a whole: its squeezed rank is <= 1 (DeepMind's and optax's rule), as for a
    scalar, a bias, a gain vector, a gain stored as [O, 1, 1, 1] (timm's ScaledStdConv2d) or an [O, 1] matrix."""
    return sum(size != 1 for size in x.shape) <= 1


def num_units(x: Tensor) -> int:
    """How many units `x` has: one if `is_single_unit`, else its dim-0 size."""
    return 1 if is_single_unit(x) else x.shape[0]


def unit_shape(x: Tensor, units: int | None = None) -> tuple[int, ...]:
    """Shape of per-unit values that broadcasts against `x`: `units` (default `num_units(x)`) along dim 0."""
    return ((num_units(x) if units is None else units),) + (1,) * (x.ndim - 1) if x.ndim >= 1 else ()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    # fp16 / bf16 are normed in float32 (their squares overflow); float32 and float64 as they are,
    # without a dtype argument, which is the faster reduction kernel.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def unit_norms(x: Tensor, units: int | None = None) -> Tensor:
    """Flat vector of the unit norms of `x`, one entry per unit: `x` split into `units` (default `num_units(x)`)
    consecutive blocks along dim 0. (A shard of a sharded tensor holds whole units, or parts of them, of its full
    tensor, whose rule `num_units` does not see: `normfree.agc.sharded` passes their number.)"""
    units = num_units(x) if units is None else units
    rows = x.reshape(units, x.numel() // units if units else 0)  # explicit sizes: -1 is ambiguous for empty tensors
    return torch.linalg.vector_norm(rows, dim=1, dtype=_norm_dtype(x.dtype))


def unit_norm_vector(tensors: list[Tensor]) -> Tensor:
    """The unit norms of `tensors`, in order, as one vector.

    The single-unit tensors (`is_single_unit`: gains, biases, scalars) must come first: they are normed
    in one multi-tensor call; the others with one row-wise norm kernel each.
    """
    singles = [t for t in tensors if is_single_unit(t)]
    norms = []
    if singles:
        dtype = reduce(torch.promote_types, [t.dtype for t in singles], torch.float32)
        norms.append(torch.stack(torch._foreach_norm(singles, dtype=dtype)))
    return torch.cat(norms + [unit_norms(t) for t in tensors[len(singles):]])


def unitwise_norm(x: Tensor) -> Tensor:
    """Frobenius norm of each unit of `x`, ||W_u||_F (Sec. 4, "unit-wise ratios").

    - A tensor whose squeezed rank is <= 1 is one unit as a whole, as in DeepMind's code and optax:
      a scalar, a bias, a gain vector, a conv gain stored as ``[O, 1, 1, 1]``, an ``[O, 1]`` matrix.
    - Otherwise, one norm per index of dim 0, taken over all other dims. That is one output
      row of a Linear ``[out, in]``; one filter of a Conv1d/2d/3d ``[out, in/groups, *kernel]``,
      grouped and depthwise convs included (a depthwise filter is its single ``[1, *kernel]``
      slice); one row of an Embedding-like table ``[num_embeddings, dim]``.

    Returns a tensor that broadcasts against `x` (``[out, 1, ..., 1]``, ``[1, ..., 1]`` for a
    single unit, ``[]`` for scalars), in float32 for half-precision inputs.
    """
    return unit_norms(x).reshape(unit_shape(x))


def adaptive_clip_factor(param_norm: Tensor, grad_norm: Tensor, clipping: float, eps: float) -> Tensor:
    """Factor by which AGC scales each unit's gradient: Eq. (3) of Sec. 4.

        G_u <- lambda * max(||W_u||, eps) / ||G_u|| * G_u   if ||G_u|| / max(||W_u||, eps) > lambda
        G_u <- G_u                                          otherwise

    with ||G_u|| floored at GRAD_NORM_FLOOR = 1e-6 in the division (as DeepMind's code). A unit whose gradient norm
    is not finite keeps factor 1: AGC never turns an inf gradient into NaN; the grad scaler or the
    user decides what to do with it. So does a unit whose weight norm is not finite (inf or NaN: no
    threshold; `adaptive_clip_grad_` counts both kinds as non-finite). (The fused CPU kernel, csrc/agc_cpu.c,
    computes the same rule in C, and the GPU kernel, gpu_kernel.py, in Triton, unit by unit; the tests hold all three
    to one float64 reference.) The rule in two halves, `clip_threshold` and `clip_factor_below`,
    serves callers that take the factors of many gradients against the same weights (per-sample AGC).
    """
    return clip_factor_below(clip_threshold(param_norm, clipping, eps), grad_norm)


def gradient_to_weight_ratio(param_norm: Tensor, grad_norm: Tensor, eps: float) -> Tensor:
    """||G_u|| / max(||W_u||, eps): the unit-wise ratio that Eq. (3) of Sec. 4 compares with lambda (a unit clips when
    it exceeds lambda). `normfree.learner.agc_find` chooses lambda from its distribution."""
    return grad_norm / param_norm.clamp_min(eps)


def unit_ratios(param: Tensor, eps: float) -> Tensor:
    """`gradient_to_weight_ratio` of each unit of `param` for its current gradient (0 without one), float32."""
    norms = unit_norms(param.detach())
    grad_norms = unit_norms(param.grad.detach()) if param.grad is not None else torch.zeros_like(norms)
    return gradient_to_weight_ratio(norms, grad_norms, eps).float()


def check_clip_fraction(clip_fraction: float) -> None:
    """ValueError naming `clip_fraction` unless it is in (0, 1)."""
    if not 0 < clip_fraction < 1:
        raise ValueError(f"clip_fraction must be in (0, 1), got {clip_fraction!r}: the share of units lambda clips")


def suggest_clipping(ratios: Tensor, clip_fraction: float = DEFAULT_CLIP_FRACTION) -> float:
    """The smallest recorded ratio lambda such that at most `clip_fraction` of `ratios` exceed it: with the ratios
    sorted, v[k] for k = ceil(N - 1 - clip_fraction * N). Non-finite ratios are left out; ValueError if none is
    left or `clip_fraction` is not in (0, 1)."""
    check_clip_fraction(clip_fraction)
    values = ratios.detach().flatten().double()
    values = values[values.isfinite()]
    if not len(values):
        raise ValueError("no finite gradient-to-weight ratio was recorded: the probe's gradients were all inf/NaN; "
                         "lower the learning rate")
    k = max(0, math.ceil(len(values) - 1 - clip_fraction * len(values)))
    return float(torch.kthvalue(values, k + 1).values)


def clip_threshold(param_norm: Tensor, clipping: float, eps: float) -> Tensor:
    """lambda * max(||W_u||, eps): the largest gradient norm AGC leaves unscaled (Eq. 3)."""
    return param_norm.clamp_min(eps) * clipping


def clip_factor_below(max_norm: Tensor, grad_norm: Tensor) -> Tensor:
    """AGC's factor for gradient norms `grad_norm` against the thresholds `max_norm` of `clip_threshold`."""
    # grad_norm < inf excludes +inf, and grad_norm > max_norm excludes NaN and -inf: with the two,
    # isfinite (four kernels: it is composite) is not needed
    clip = (grad_norm > max_norm) & (grad_norm < math.inf)
    return torch.where(clip, max_norm / grad_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)


@dataclass(frozen=True)
class _Argument:
    """What one of AGC's two numbers must be, for its checks and their messages."""

    name: str
    zero_allowed: bool
    meaning: str
    example: str

    def in_range(self, number: float) -> bool:
        return math.isfinite(number) and (number >= 0 if self.zero_allowed else number > 0)

    def requirement(self) -> str:
        return f"{self.name} must be a finite number {'>=' if self.zero_allowed else '>'} 0 ({self.meaning})"


_CLIPPING = _Argument("clipping", False, "the paper's lambda, e.g. 0.01", "0.01")
_EPS = _Argument("eps", True, "the paper uses 1e-3", "1e-3")


def _agc_number(value: object, argument: _Argument) -> float:
    """`value` as a float if it is one number in `argument`'s range: a Python or numpy scalar, or a one-element
    tensor; else ValueError naming the argument."""
    number = value
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
        number = value.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
               else f"{value!r} ({type(value).__name__})")
        raise ValueError(f"{argument.requirement()}, got {got}: pass one number, e.g. {argument.name}="
                         f"{argument.example}")
    if not argument.in_range(float(number)):
        raise ValueError(f"{argument.requirement()}, got {value!r}")
    return float(number)


def check_agc_arguments(clipping: object, eps: object) -> tuple[float, float]:
    """`clipping` and `eps` as floats (Python and numpy scalars and one-element tensors are numbers); ValueError
    naming the argument when one is not a number or out of range."""
    return _agc_number(clipping, _CLIPPING), _agc_number(eps, _EPS)
