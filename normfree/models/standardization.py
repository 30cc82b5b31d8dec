"""Scaled Weight Standardization (NF-ResNets, arXiv 2101.08692, Sec. 4.1; NFNets, arXiv 2102.06171, Sec. 3,
Eq. 2) on timm's layers. The equation itself is `normfree.models.equations.standardize_weight`.

timm's (Scaled)StdConv2d(Same) standardise their weight with batch norm. Their `Fused*` subclasses here (what
`fast_nf` makes of them) compute the same through `standardize_weight(..., fused=True)`: on a GPU one fused kernel
each way, in autocast's dtype (`standardization_kernel`); on the CPU batch norm, bit for bit timm's. Code standing
in for a layer's forward pass (per-sample AGC's engines, `scaled_output_conv`) takes the layer's weight from
`standardized_weight`, which computes it as that layer's own forward pass does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import (
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
    pad_same,
    register_notrace_module,
)
from torch import Tensor, nn

from .equations import standardize_weight

__all__ = ["FUSED_STD_CONVS", "SCALED_STD_CONVS", "STD_CONVS", "STD_CONV_EPS", "FusedScaledStdConv2d",
           "FusedScaledStdConv2dSame", "FusedStdConv2d", "FusedStdConv2dSame", "called_plainly", "scaled_output_conv",
           "standardized_weight", "weight_scale"]
# eps added to each unit's weight variance by the Scaled WS convs normfree builds (small ResNets, to_normfree):
# timm's NfCfg.std_conv_eps default (timm's ScaledStdConv2d itself defaults to 1e-6)
STD_CONV_EPS = 1e-5


def weight_scale(conv: nn.Conv2d) -> Tensor | None:
    """Per-output-channel factor gain * gamma / sqrt(fan_in) of a timm ScaledStdConv2d(Same); None for
    StdConv2d(Same)."""
    return (conv.gain * conv.scale).view(-1) if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)) else None


def standardized_weight(conv: nn.Conv2d, weight: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """The weight a timm (Scaled)StdConv2d(Same) (or its `Fused*` subclass) convolves with, computed as its own
    forward pass computes it (StdConv2d(Same) has neither gain nor scale). `weight` and `scale` stand in for the
    layer's weight and `weight_scale` where given."""
    return standardize_weight(conv.weight if weight is None else weight, weight_scale(conv) if scale is None else scale,
                              conv.eps, fused=isinstance(conv, _FusedStandardization))


class _FusedStandardization:
    """The forward pass of a timm Scaled WS conv with its weight from `standardize_weight(..., fused=True)`."""

    @torch.jit.unused
    def _fused_weight(self) -> Tensor:
        return standardized_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "same_pad"):  # the Same variants pad SAME dynamically (one `if` each: TorchScript)
            if self.same_pad:
                x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if torch.jit.is_scripting():  # TorchScript: batch norm, as timm's forward
            scale: Tensor | None = None
            if hasattr(self, "gain"):  # weight_scale, which TorchScript cannot call with a module
                scale = (self.gain * self.scale).view(-1)
            weight = standardize_weight(self.weight, scale, self.eps)
        else:
            weight = self._fused_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# Leaves of FX tracing, as timm's Same variants are: the dispatch reads the weight's device.
@register_notrace_module
class FusedScaledStdConv2d(_FusedStandardization, ScaledStdConv2d):
    """timm's ScaledStdConv2d with its weight standardised by one fused kernel each way on a GPU."""


@register_notrace_module
class FusedScaledStdConv2dSame(_FusedStandardization, ScaledStdConv2dSame):
    """timm's ScaledStdConv2dSame with its weight standardised by one fused kernel each way on a GPU."""


@register_notrace_module
class FusedStdConv2d(_FusedStandardization, StdConv2d):
    """timm's StdConv2d with its weight standardised by one fused kernel each way on a GPU."""


@register_notrace_module
class FusedStdConv2dSame(_FusedStandardization, StdConv2dSame):
    """timm's StdConv2dSame with its weight standardised by one fused kernel each way on a GPU."""


# timm's weight-standardised conv -> its `Fused*` subclass (what `fast_nf` makes of it: the same parameters)
FUSED_STD_CONVS: dict[type[nn.Conv2d], type[nn.Conv2d]] = {
    ScaledStdConv2d: FusedScaledStdConv2d, ScaledStdConv2dSame: FusedScaledStdConv2dSame,
    StdConv2d: FusedStdConv2d, StdConv2dSame: FusedStdConv2dSame,
}
# the weight-standardised convs, matched by exact type: timm's and their `Fused*` subclasses
STD_CONVS: tuple[type[nn.Conv2d], ...] = (*FUSED_STD_CONVS, *FUSED_STD_CONVS.values())
# those with a per-unit weight scale (gain * gamma / sqrt(fan-in)) that a scalar can move into
SCALED_STD_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame, FusedScaledStdConv2d, FusedScaledStdConv2dSame)


def scaled_output_conv(conv: ScaledStdConv2d | ScaledStdConv2dSame, x: Tensor, output_scale: float | Tensor) -> Tensor:
    """``conv(x) * output_scale`` for a timm ScaledStdConv2d(Same) and a scalar `output_scale` (a float, or a 0-dim
    tensor, which gets its gradient through the weight and the bias), computed with the scalar in the per-unit weight
    scale and in the bias: no pass over the output. Calls the convolution directly, not `conv`'s forward (or its
    hooks): callers check `called_plainly` first."""
    if getattr(conv, "same_pad", False):  # ScaledStdConv2dSame pads SAME dynamically for this kernel and stride
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    weight = standardized_weight(conv, scale=weight_scale(conv) * output_scale)
    bias = None if conv.bias is None else conv.bias * output_scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def called_plainly(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's forward and nothing else: no hooks, no forward replaced on it (as
    per-sample AGC's engines replace them), so code may stand in for that call (`scaled_output_conv`)."""
    hooks = nn.modules.module
    return not ("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
