"""`fast_nf`: timm's NF blocks computed with their scalars in the Scaled WS convolutions' weight scale.

timm's `NormFreeBlock` (nf_resnet*, nf_seresnet*, nf_ecaresnet*, nfnet_*, dm_nfnet_*, nf_regnet*, eca_nfnet_*,
test_nfnet, normfree's small NF ResNets) computes (Brock et al. 2021, arXiv 2102.06171, Sec. 3, Eq. 1)::

    out = act1(x) * beta                       # timm's beta: 1 / the papers' beta_i
    shortcut = x or downsample(out)            # avg-pool, then a ScaledStdConv2d
    out = conv3(act3([attn_gain * attn](conv2(act2(conv1(out))))))   # conv2b(act2b(.)) in NFNets
    out = drop_path([attn_gain * attn_last](out)) * skipinit_gain * alpha + shortcut

Each scalar there is one more pass over an activation-sized tensor. They are all linear, so they may move into the
per-output-unit constant that a ScaledStdConv2d already multiplies its standardised weight by (``gain * scale``,
`normfree.models.standardization.weight_scale`; the weight standardisation runs on the small weight, not on the
activations):

- beta multiplies act1's OUTPUT, which only conv1 and the downsample (an average pool, which is linear, then a
  conv) read, so ``conv(beta * a) = (beta * W) a + b`` moves it into their `scale` for every activation: GELU and
  SiLU (nfnet's) as well as ReLU. (`is_positively_homogeneous` is what moving a scale through an activation needs,
  as in `to_normfree`'s blocks, which divide the activation's input; timm multiplies its output.) The bias is not
  scaled. Done once, by `fast_nf`: the convs' `scale` (a constant, not in the state_dict) takes beta and the
  block's `beta` reads 1.0, as in normfree's small NF ResNets.
- the activation gamma: timm builds its convs with gamma in `scale` already, except in models with
  ``gamma_in_act`` (dm_nfnet_*), whose activations are `GammaAct`, ``act(x) * gamma``. Every GammaAct of a block
  (act1, act2, act2b, act3) and of an nn.Sequential stem feeds exactly one ScaledStdConv2d (two for act1): gamma
  moves into their `scale` and the activation becomes `GammaFoldedAct` (the same activation, no multiply).
  Nothing is folded twice: a ScaledStdConv2d's own gamma stays as it is, only GammaAct's moves.
- alpha * skipinit_gain (`residual_scale`; a learnable gain, so computed at each forward pass): without attention
  after conv3 it goes into conv3's weight scale and bias (`scaled_output_conv`; the gain gets its gradient through
  them; DropPath multiplies each example by a constant, so it commutes). With attention after conv3 (SE in
  nfnet_*, ECA in eca_nfnet_*, nf_seresnet*, nf_ecaresnet*), which is not linear in its input, the factor, with
  attn_gain, goes into the attention's gate instead: ``attn_gain * alpha * gain * (y * gate(y))`` is
  ``y * (gate(y) * attn_gain * alpha * gain)``, a multiply over the [N, C, 1, 1] gate only.
- attn_gain of mid-block attention (nf_regnet*: SE between conv2 and conv3): into the gate likewise.

Where a fold would not be exact, or would skip code that must run, the block computes timm's formula for that
part: a conv that is not a ScaledStdConv2d(Same), an attention other than timm's SEModule / EcaModule, a module
with hooks or a replaced forward (per-sample AGC's engines: `called_plainly`), a per-example SkipInit gain
(per-sample AGC's container engine), TorchScript (conv3 and the attention: `torch.jit.script` scripts the block as it
scripts timm's). The function computed is timm's in every case; only float rounding differs, and the values inside
a block or the stem (an activation's output, which no longer holds gamma or beta) that a hook might read.

Every timm (Scaled)StdConv2d(Same) of the model becomes its `Fused*` subclass (`normfree.models.standardization`):
on a GPU its weight is standardised, scaled and cast to autocast's dtype by one fused kernel each way instead of
batch norm's kernels, the gain multiply and autocast's cast (`normfree.models.standardization_kernel`); on the CPU
it is timm's layer, bit for bit.

Left as activation-sized multiplies: the attention itself (``y * gate``), DropPath in training, and dm_nfnet's
final GammaAct (read by the classifier head, not by a Scaled WS conv).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from timm.layers import (
    AvgPool2dSame,
    EcaModule,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    SEModule,
    register_notrace_module,
)
from timm.models.nfnet import DownsampleAvg, GammaAct, NormFreeBlock
from torch import Tensor, nn

from .equations import nf_residual, residual_scale
from .small_resnets import _NormFreeBottleneck
from .standardization import FUSED_STD_CONVS, SCALED_STD_CONVS, called_plainly, scaled_output_conv

__all__ = ["FastNormFreeBlock", "GammaFoldedAct", "fast_nf"]

# what DownsampleAvg pools with: linear in its input, so a scalar of the input passes through it
_LINEAR_POOLS = (nn.Identity, nn.AvgPool2d, AvgPool2dSame)
# the blocks whose forward is timm's NormFreeBlock.forward (normfree's bottleneck: with beta folded already)
_TIMM_BLOCKS = (NormFreeBlock, _NormFreeBottleneck)


def _takes_scale(conv: nn.Module | None) -> bool:
    return type(conv) in SCALED_STD_CONVS  # a constant per-unit weight scale that a scalar can move into


class GammaFoldedAct(nn.Module):
    """timm's `GammaAct` with its gamma moved into the convolution that reads it: the activation alone."""

    def __init__(self, act: GammaAct) -> None:
        super().__init__()
        self.act_fn, self.inplace = act.act_fn, act.inplace

    def forward(self, x: Tensor) -> Tensor:
        return self.act_fn(x, inplace=self.inplace)


def _se_gate(se: SEModule, x: Tensor) -> Tensor:
    """The [N, C, 1, 1] gate timm's SEModule multiplies `x` by (its forward without the multiply)."""
    pooled = x.mean((2, 3), keepdim=True)
    if se.add_maxpool:
        pooled = 0.5 * pooled + 0.5 * x.amax((2, 3), keepdim=True)
    return se.gate(se.fc2(se.act(se.bn(se.fc1(pooled)))))


def _eca_gate(eca: EcaModule, x: Tensor) -> Tensor:
    """The [N, C, 1, 1] gate timm's EcaModule multiplies `x` by (its forward without the multiply)."""
    y = eca.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
    if eca.conv2 is not None:
        y = eca.conv2(eca.act(y))
    return eca.gate(y).view(x.shape[0], -1, 1, 1)


_GATES: dict[type[nn.Module], Callable[[Any, Tensor], Tensor]] = {SEModule: _se_gate, EcaModule: _eca_gate}


def _gate_known(attn: nn.Module) -> bool:
    return type(attn) in _GATES and called_plainly(attn)


@register_notrace_module  # as NormFreeBlock: FX feature extraction keeps the block whole (its checks are not traceable)
class FastNormFreeBlock(NormFreeBlock):
    """timm's NormFreeBlock with its scalars folded into the weight scales (the module docstring, `fast_nf`): the
    same parameters, state_dict keys and function; conv, activation and residual add are the activation-sized work
    left (and DropPath in training, and a scalar multiply wherever a fold is not exact). Made by `fast_nf`."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(x)
        if self.beta != 1.0:  # not folded (act1's readers are not all Scaled WS convs)
            out = out * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            if torch.jit.is_scripting():
                out = self.attn_gain * self.attn(out)
            else:
                out = self._scaled_attention("attn", out, self.attn_gain)
        out = self.act3(out)
        if not torch.jit.is_scripting():
            return self._folded_residual(out, shortcut)
        # TorchScript (as timm's NormFreeBlock scripts): timm's formula from here, the folds into `scale` still hold
        out = self.conv3(out)
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        return nf_residual(shortcut, self.drop_path(out), self.alpha, self.skipinit_gain)

    @torch.jit.unused
    def _scaled_attention(self, name: str, x: Tensor, factor: float | Tensor) -> Tensor:
        """``factor * attention(x)`` of the attention module `name`: in the gate where it is timm's SE or ECA called
        plainly, else as timm computes it."""
        attn = getattr(self, name)
        if _gate_known(attn):
            return x * (_GATES[type(attn)](attn, x) * factor)
        return factor * attn(x)

    @torch.jit.unused
    def _folded_residual(self, out: Tensor, shortcut: Tensor) -> Tensor:
        """``shortcut + drop_path(attn_gain * attn_last(conv3(out))) * alpha * skipinit_gain`` (no attention: of
        conv3(out)), with alpha * skipinit_gain (and attn_gain) in conv3's weight or in the attention's gate."""
        gain = self.skipinit_gain
        scalar_gain = gain is None or gain.ndim == 0  # not per-sample AGC's per-example copy, which cannot fold
        if self.attn_last is not None:
            out = self.conv3(out)
            if scalar_gain and _gate_known(self.attn_last):
                scale = residual_scale(self.alpha * self.attn_gain, gain)
                return self.drop_path(self._scaled_attention("attn_last", out, scale)) + shortcut
            branch = self._scaled_attention("attn_last", out, self.attn_gain)
        elif scalar_gain and _takes_scale(self.conv3) and called_plainly(self.conv3):
            return self.drop_path(scaled_output_conv(self.conv3, out, residual_scale(self.alpha, gain))) + shortcut
        else:
            branch = self.conv3(out)
        return nf_residual(shortcut, self.drop_path(branch), self.alpha, gain)


def _fold_into_readers(owner: nn.Module, act_name: str, readers: list[nn.Module], factor: float) -> bool:
    """Move `factor` times the gamma of `owner`'s activation `act_name` (if a GammaAct) into the `scale` of every
    conv in `readers` (the layers that read the activation's output, through linear pools only). False, changing
    nothing, where one of them has no such scale."""
    act = getattr(owner, act_name)
    gamma_act = type(act) is GammaAct
    if (factor == 1.0 and not gamma_act) or not all(map(_takes_scale, readers)):
        return False
    for conv in cast(list[ScaledStdConv2d | ScaledStdConv2dSame], readers):  # _takes_scale: each is a Scaled WS conv
        conv.scale *= factor * (act.gamma if gamma_act else 1.0)
    if gamma_act:
        setattr(owner, act_name, GammaFoldedAct(act))
    return True


def _fold_block(block: NormFreeBlock) -> None:
    downsample = block.downsample
    readers = [block.conv1]
    if downsample is not None:
        linear = type(downsample) is DownsampleAvg and type(downsample.pool) in _LINEAR_POOLS
        readers.append(downsample.conv if linear else None)
    if _fold_into_readers(block, "act1", readers, block.beta):
        block.beta = 1.0
    for act_name, conv in (("act2", block.conv2), ("act2b", block.conv2b), ("act3", block.conv3)):
        if conv is not None:
            _fold_into_readers(block, act_name, [conv], 1.0)
    block.__class__ = FastNormFreeBlock


def _fold_sequential_gammas(sequence: nn.Sequential) -> None:
    """Each GammaAct of an nn.Sequential (dm_nfnet's stem) followed by a Scaled WS conv: its gamma into the conv."""
    names = list(sequence._modules)
    for name, following in zip(names, names[1:]):
        if type(sequence._modules[name]) is GammaAct:
            _fold_into_readers(sequence, name, [sequence._modules[following]], 1.0)


def fast_nf(model: nn.Module) -> nn.Module:
    """`model` with every timm NormFreeBlock (and normfree's small NF ResNets' blocks) made a `FastNormFreeBlock`:
    1 / beta, the activations' gamma (`GammaAct`), alpha, the SkipInit gain and attn_gain folded into the Scaled WS
    convolutions' weight scale or the attention gate where that is exact (the module docstring lists each fold), and
    every timm weight-standardised conv made its `Fused*` subclass (one fused kernel each way on a GPU).

    In place: the model itself is changed and returned (as timm's helpers do; `copy.deepcopy` first to keep the
    original). Parameters, buffers and state_dict keys and values are unchanged, so weights load into the model as
    before the transform and its state_dict loads into an untransformed model; outputs and gradients are timm's
    within float rounding. Applying it again changes nothing; a model without NF blocks or Scaled WS convs is returned
    as it is. TypeError if `model` is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fast_nf: model must be a torch nn.Module (a timm NF model), got {type(model).__name__}")
    for module in list(model.modules()):
        if type(module) in _TIMM_BLOCKS:
            _fold_block(cast(NormFreeBlock, module))
        elif type(module) is nn.Sequential:
            _fold_sequential_gammas(module)
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and type(module) in FUSED_STD_CONVS:
            module.__class__ = FUSED_STD_CONVS[type(module)]
    return model
