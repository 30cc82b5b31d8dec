"""Inference-time fusion of Scaled Weight Standardization and NF residual scalings into plain convolutions."""
from __future__ import annotations

import copy

import torch
from timm.layers import Conv2dSame
from timm.models.nfnet import NormFreeBlock
from torch import Tensor, nn

from .equations import nf_residual, residual_scale
from .standardization import STD_CONVS, standardized_weight

__all__ = ["FusedNormFreeBlock", "fuse_standardization", "replace_submodule"]


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain convolution computing what `conv` computes, holding its standardised weight and its bias."""
    cls: type[nn.Conv2d]
    padding: str | int | tuple[int, ...]
    if getattr(conv, "same_pad", False):  # timm pads SAME dynamically for this stride/size: keep doing so
        cls, padding = Conv2dSame, 0
    else:  # padding is static (symmetric, or SAME that timm resolved to symmetric at construction)
        cls, padding = nn.Conv2d, conv.padding
    plain = torch.nn.utils.skip_init(  # no random init: every value is overwritten below
        cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.autocast(conv.weight.device.type, enabled=False):  # a fused conv's weight in full precision
        plain.weight.copy_(standardized_weight(conv))
    if conv.bias is not None:
        plain.bias.copy_(conv.bias)
    return plain


class FusedNormFreeBlock(nn.Module):
    """timm's NormFreeBlock for inference, with its residual scalings in the convolution weights.

    beta is in conv1 and in the shortcut's downsample conv; alpha * skipinit_gain is in conv3's weight
    and bias unless attention follows conv3 (`attn_last`), in which case it stays a scalar applied
    after the attention, together with attn_gain, as `residual_scale` (None: in conv3, as `attn_last` is None).
    `attn_gain` scales the output of the mid-block attention (`attn`, RegNet-style blocks) only. act3 runs in place.
    """

    def __init__(self, block: NormFreeBlock, residual_scale: float | None) -> None:
        if (block.attn_last is None) != (residual_scale is None):
            raise ValueError(f"residual_scale must be None exactly where the block has no attn_last (alpha * "
                             f"skipinit_gain then lies in conv3), got {residual_scale!r} with attn_last "
                             f"{type(block.attn_last).__name__}")
        super().__init__()
        self.downsample = block.downsample
        self.act1, self.conv1 = block.act1, block.conv1
        self.act2, self.conv2 = block.act2, block.conv2
        self.act2b, self.conv2b = block.act2b, block.conv2b
        self.attn, self.attn_gain = block.attn, block.attn_gain
        self.act3, self.conv3 = block.act3, block.conv3
        self.attn_last, self.residual_scale = block.attn_last, residual_scale
        self.drop_path = block.drop_path
        # act3 reads a temporary that nothing else holds (the output of conv2, conv2b or attn), so at
        # inference it may overwrite it, as act2 does in timm: one allocation and one write pass fewer.
        if hasattr(self.act3, "inplace"):
            self.act3.inplace = True

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(x)
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:  # an activation follows, so attn_gain cannot move into conv3
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.residual_scale is None:  # no attn_last, nf_residual with alpha * gain in conv3: its fresh output
            return self.drop_path(out).add_(shortcut)  # takes the sum in place
        return nf_residual(shortcut, self.drop_path(self.attn_last(out)), self.residual_scale)


@torch.no_grad()
def _fuse_block(block: NormFreeBlock) -> FusedNormFreeBlock:
    """Fold beta, and `nf_residual`'s alpha * skipinit_gain where nothing nonlinear follows conv3, into the convs.

    (timm's `block.beta` multiplies the block input: it is 1 / the papers' beta_i.)

    `act1(x) * beta` feeds only conv1 and the downsample (average pool, then conv), both linear and
    ahead of any bias, so beta scales their weights. DropPath multiplies each sample by a constant,
    so it commutes with a scalar; attention after conv3 does not, which is why that case keeps the
    scalar (Brock et al. 2021, NFNets, arXiv 2102.06171, Sec. 3; 2101.08692, Sec. 4).
    """
    block.conv1.weight.mul_(block.beta)
    if block.downsample is not None:
        block.downsample.conv.weight.mul_(block.beta)
    branch_scale = float(residual_scale(block.alpha, block.skipinit_gain))
    if block.attn_last is not None:
        return FusedNormFreeBlock(block, branch_scale * block.attn_gain)
    block.conv3.weight.mul_(branch_scale)
    if block.conv3.bias is not None:
        block.conv3.bias.mul_(branch_scale)
    return FusedNormFreeBlock(block, None)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `root.get_submodule(name)` was; returns the (possibly new) root."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)
    return root


@torch.no_grad()
def fuse_standardization(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` whose weight-standardised convolutions are plain convolutions.

    Scaled Weight Standardization (Brock, De, Smith 2021, arXiv 2101.08692, Sec. 4; NFNets, Brock
    et al. 2021, arXiv 2102.06171, Sec. 3) recomputes gain * gamma/sqrt(fan_in) * standardised W at
    every forward; at inference it is a constant, so it is computed once here. Anywhere in the
    module tree, every ScaledStdConv2d / StdConv2d becomes an `nn.Conv2d`, and every
    ScaledStdConv2dSame / StdConv2dSame a `timm.layers.Conv2dSame` (or an `nn.Conv2d` where timm
    made the SAME padding static), keeping the bias. Every timm NormFreeBlock additionally becomes a
    `FusedNormFreeBlock` with its signal-propagation scalings (2101.08692, Sec. 4: beta = 1/sqrt of
    the expected input variance, alpha, and SkipInit's gain) folded where linearity allows.

    Outputs equal the original's in eval mode up to float rounding. `model` is left untouched. The
    copy is for inference: training it would train the baked weights, not gains and raw weights.
    """
    fused = copy.deepcopy(model)
    for name, conv in [(n, m) for n, m in fused.named_modules() if isinstance(m, STD_CONVS)]:
        fused = replace_submodule(fused, name, _plain_conv(conv))
    for name, block in [(n, m) for n, m in fused.named_modules() if isinstance(m, NormFreeBlock)]:
        fused = replace_submodule(fused, name, _fuse_block(block))
    return fused.eval()  # after the replacements: new modules start in training mode
