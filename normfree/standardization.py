"""Scaled Weight Standardization (Brock, De, Smith 2021, arXiv 2101.08692, Sec. 4), as timm computes it."""
from __future__ import annotations

import torch
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import Tensor, nn

__all__ = ["STD_CONVS", "standardize_weight", "standardized_weight", "weight_scale"]

STD_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)


def weight_scale(conv: nn.Conv2d) -> Tensor | None:
    """Per-output-channel factor gain * gamma / sqrt(fan_in) of a timm ScaledStdConv2d(Same); None for StdConv2d(Same)."""
    return (conv.gain * conv.scale).view(-1) if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)) else None


def standardize_weight(weight: Tensor, scale: Tensor | None, eps: float, with_stats: bool = False):
    """W_hat = scale * (W - mean) / sqrt(var + eps), per output channel, with the biased variance.

    Batch norm on the weight, exactly as timm's layers do, so values match the layer bit for bit.
    `scale` is `weight_scale(conv)` (None: no scaling). With `with_stats`, returns
    (W_hat, mean, 1 / sqrt(var + eps)) from the same pass.
    """
    standardized, mean, inv_std = torch.native_batch_norm(
        weight.reshape(1, weight.shape[0], -1), scale, None, None, None, True, 0.0, eps,
    )
    standardized = standardized.reshape_as(weight)
    return (standardized, mean, inv_std) if with_stats else standardized


def standardized_weight(conv: nn.Conv2d) -> Tensor:
    """The weight a timm (Scaled)StdConv2d(Same) convolves with (StdConv2d(Same) has neither gain nor scale)."""
    return standardize_weight(conv.weight, weight_scale(conv), conv.eps)
