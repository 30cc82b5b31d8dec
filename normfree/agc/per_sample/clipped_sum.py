"""Clipped sums of per-example gradients, shared by the engines, and the precision they compute in.

Given per-example gradients g_i of one parameter (materialised by the engine that owns the layer),
the clipped sum is sum_i c_iu * g_iu, with c_iu AGC's factor for example i and unit u (Brock et
al. 2021, Eq. 3), from the rule that clips the parameter (`example_rule`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..rule import num_units

if TYPE_CHECKING:
    from .example_rule import ExampleRule

__all__ = ["clipped_sum", "compute_dtype", "per_example_unit_norms", "sum_clipped", "weighted_sum"]


def compute_dtype(signal: Tensor) -> torch.dtype:
    """The dtype of per-example products (g_i, Gram matrices, patches) for a layer whose output signal is `signal`.

    bfloat16 stays bfloat16: under autocast the layer ran in it, and its matmuls use tensor cores
    (norms are still accumulated in float32). float16 is computed in float32: squared norms and Gram
    matrices of loss-scaled signals overflow its range. float64 stays float64, the rest is float32.
    """
    return signal.dtype if signal.dtype in (torch.bfloat16, torch.float64) else torch.float32


def per_example_unit_norms(grads: Tensor, units: int) -> Tensor:
    """Unit norms (examples x units), in float32, of per-example gradients `grads` [B, units, ...]."""
    return torch.linalg.vector_norm(grads.reshape(grads.shape[0], units, -1), dim=-1,
                                    dtype=torch.promote_types(grads.dtype, torch.float32))


def weighted_sum(factor: Tensor, grads: Tensor) -> Tensor:
    """sum_i factor_iu * grads_iu for `grads` [B, units, fan-in] and `factor` [B, units]: [units, fan-in]."""
    # batched over units: [units, 1, B] @ [units, B, fan-in], with no copy of the per-example gradients
    return torch.bmm(factor.t().unsqueeze(1).to(grads.dtype), grads.transpose(0, 1)).squeeze(1)


def sum_clipped(factor: Tensor | None, grads: Tensor, units: int) -> Tensor:
    """sum_i factor_iu * grads_iu for per-example gradients `grads` [B, ...] of `units` units (the plain sum where
    `factor` is None: a parameter that is not clipped), in the shape of one example's gradient."""
    if factor is None:
        return grads.sum(0)
    return weighted_sum(factor, grads.reshape(grads.shape[0], units, -1)).reshape(grads.shape[1:])


def clipped_sum(rule: ExampleRule, param: Tensor, grads: Tensor) -> Tensor:
    """sum_i clip(g_i) for per-example gradients `grads` [B, *param.shape]."""
    units = num_units(param)
    factor, = rule.factors([param], [per_example_unit_norms(grads, units)])
    return sum_clipped(factor, grads, units)
