"""Scaled Weight Standardization (NF-ResNets, arXiv 2101.08692, Sec. 4.1; NFNets, arXiv 2102.06171, Sec. 3,
Eq. 2) on timm's layers. The equation itself is `normfree.models.equations.standardize_weight`."""
from __future__ import annotations

import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame, pad_same
from torch import Tensor, nn

from .equations import standardize_weight

__all__ = ["STD_CONVS", "STD_CONV_EPS", "called_plainly", "scaled_output_conv", "standardized_weight", "weight_scale"]

STD_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
# eps added to each unit's weight variance by the Scaled WS convs normfree builds (small ResNets, to_normfree):
# timm's NfCfg.std_conv_eps default (timm's ScaledStdConv2d itself defaults to 1e-6)
STD_CONV_EPS = 1e-5


def weight_scale(conv: nn.Conv2d) -> Tensor | None:
    """Per-output-channel factor gain * gamma / sqrt(fan_in) of a timm ScaledStdConv2d(Same); None for
    StdConv2d(Same)."""
    return (conv.gain * conv.scale).view(-1) if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)) else None


def standardized_weight(conv: nn.Conv2d) -> Tensor:
    """The weight a timm (Scaled)StdConv2d(Same) convolves with (StdConv2d(Same) has neither gain nor scale)."""
    return standardize_weight(conv.weight, weight_scale(conv), conv.eps)


def scaled_output_conv(conv: ScaledStdConv2d | ScaledStdConv2dSame, x: Tensor, output_scale: float | Tensor) -> Tensor:
    """``conv(x) * output_scale`` for a timm ScaledStdConv2d(Same) and a scalar `output_scale` (a float, or a 0-dim
    tensor, which gets its gradient through the weight and the bias), computed with the scalar in the per-unit weight
    scale and in the bias: no pass over the output. Calls the convolution directly, not `conv`'s forward (or its
    hooks): callers check `called_plainly` first."""
    if getattr(conv, "same_pad", False):  # ScaledStdConv2dSame pads SAME dynamically for this kernel and stride
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    weight = standardize_weight(conv.weight, weight_scale(conv) * output_scale, conv.eps)
    bias = None if conv.bias is None else conv.bias * output_scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def called_plainly(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's forward and nothing else: no hooks, no forward replaced on it (as
    per-sample AGC's engines replace them), so code may stand in for that call (`scaled_output_conv`)."""
    hooks = nn.modules.module
    return not ("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
