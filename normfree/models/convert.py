"""`to_normfree`: a BatchNorm model made normalizer-free, in one of two modes.

- ``mode="fold"`` (`normfree.models.fold`): every BatchNorm folded into the convolution or Linear next to it with
  its running statistics and affine parameters, so the model computes in eval mode what it computed before (the
  function a pretrained model was trained to), with no normalisation layer left; train it with AGC.
- ``mode="nf"`` (the default): the NF-ResNet recipe below; BatchNorm dropped, so the weights are a starting point.

Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets" (arXiv 2101.08692), Sec. 3-4, with the equations of `normfree.models.equations`:

- `activation_gamma` (Sec. 4.2): the gamma of the activation a convolution reads, folded into its Scaled
  Weight Standardisation (timm's ScaledStdConv2d, `standardize_weight`).
- `residual_betas` (Sec. 4): beta_i, the expected std of the stream entering block i, from the blocks
  since the variance last restarted and which of them are transitions.
- `nf_residual` (Sec. 4) with `skipinit_gain` (De & Smith 2020): h + alpha * gain * f(h / beta).

Residual blocks of post-activation ResNets (torchvision's and timm's BasicBlock / Bottleneck, fastai's
xresnet ResBlock: ``act(f(h) + shortcut(h))``) become pre-activation NF blocks, as NF-ResNets and
NFNets are (timm's NormFreeBlock): the activation after the addition moves to the start of the
block, ``x = act(h / beta)``, the branch and a projection shortcut read x, an identity shortcut reads
h, and the last block of the network applies the activation to its output so that the head sees
activated features as before.
"""
from __future__ import annotations

import copy
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast, runtime_checkable

import torch
import torchvision.models.resnet as tv_resnet
from timm.layers import ScaledStdConv2d
from timm.models import resnet as timm_resnet
from torch import Tensor, nn

from ..utils.errors import ConversionError
from .equations import (
    ACTIVATION_GAMMAS,
    activation_gamma,
    is_positively_homogeneous,
    nf_residual,
    residual_betas,
    residual_scale,
    skipinit_gain,
)
from .fold import fold_batchnorms
from .small_resnets import SmallResNet, normfree_twin_name
from .standardization import STD_CONV_EPS, STD_CONVS, FusedScaledStdConv2d, called_plainly, scaled_output_conv

if TYPE_CHECKING:
    from fastai.layers import ResBlock

__all__ = ["CONVERSION_MODES", "ConversionError", "ConvertedResidual", "to_normfree"]

# to_normfree's modes: what each does to a BatchNorm model, in a few words (for help texts and errors)
CONVERSION_MODES = {
    "nf": "BatchNorm dropped, Scaled WS convolutions, NF residual blocks (alpha 0.5, no SkipInit): a new function",
    "fold": "BatchNorm folded into the convolution next to it: the pretrained function kept, no normalisation left",
}
# The residual blocks' defaults: branches open from the start (no SkipInit) and alpha 0.5, not the papers' SkipInit
# and alpha 0.2, which left converted models 3 points behind BatchNorm (docs/convert/ablation/ablation.md, five
# families, lr tuned per method), as they starved normfree's small twins (docs/recipe).
DEFAULT_ALPHA = 0.5
DEFAULT_SKIPINIT = False

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
                nn.RMSNorm)
_NORMS = _BATCHNORMS + _OTHER_NORMS
# models whose forward calls their children in registration order: walked like an nn.Sequential
_SEQUENTIAL_MODELS = (nn.Sequential, tv_resnet.ResNet, timm_resnet.ResNet)
_HOW = ("to_normfree converts nn.Sequential stacks of Conv2d / BatchNorm2d / activation layers and the residual "
        "blocks of torchvision and timm ResNets (BasicBlock, Bottleneck) and fastai's xresnet (ResBlock)")


class ConvertedResidual(nn.Module):
    """A residual block of a converted model: ``h + alpha * skip_gain * branch(act(h / beta))``.

    `pre_act` is the activation the original block applied after its addition, moved to the start
    (pre-activation, as in NF-ResNets); `shortcut` is the converted projection (None: identity on h),
    which reads ``act(h / beta)``; `final_act` is set on the network's last block only, so the head
    reads activated features as in the original. `skip_gain` is SkipInit's scalar (`skipinit_gain`), 0 at
    conversion with ``skipinit=True`` (None without SkipInit, the default). `beta` is the papers' beta
    (`residual_betas`), the divisor of h.
    `transition` says whether the shortcut restarts the variance.

    Computed with the block's scalars folded into the convolutions' constant scales where that is exact, as
    NF-ResNets do (the same function, parameters and state_dict keys; only float rounding differs):

    - `beta_folded`: where `pre_act` is positively homogeneous (ReLU, LeakyReLU: `is_positively_homogeneous`),
      ``act(h / beta) = act(h) / beta``, and the first layer the branch and a projection shortcut apply (after
      pooling, which commutes with a positive scale) is a ScaledStdConv2d, 1 / beta is in those convolutions'
      `scale` (timm's constant gamma / sqrt(fan-in)) instead of a division of h. SiLU, GELU ... keep the division.
    - alpha * skip_gain (`residual_scale`): where the branch ends with a ScaledStdConv2d (then only nn.Identity),
      it goes into that convolution's weight scale and bias at each forward pass (the gain gets its gradient
      through them), instead of a multiplication of the branch output. Not when the gain is one copy per example
      (per-sample AGC), nor where a hook or a replaced forward (per-sample AGC's engines) sits on the branch or on
      that convolution, nor under TorchScript: the fold calls the convolution directly, so those keep the plain
      formula.
    """

    beta_folded = False  # models pickled before the fold divide h by beta

    def __init__(self, pre_act: nn.Module, branch: nn.Module, shortcut: nn.Module | None, alpha: float,
                 beta: float, skipinit: bool, transition: bool):
        super().__init__()
        self.pre_act, self.branch, self.shortcut = pre_act, branch, shortcut
        self.alpha, self.beta, self.transition = alpha, beta, transition
        self.skip_gain = skipinit_gain() if skipinit else None
        self.final_act: nn.Module | None = None
        readers = [_first_layer(part) for part in (branch, shortcut) if part is not None]
        scaled_readers = [r for r in readers if type(r) is ScaledStdConv2d]
        self.beta_folded = is_positively_homogeneous(pre_act) and len(scaled_readers) == len(readers)
        if self.beta_folded:
            for conv in scaled_readers:
                conv.scale /= beta

    def forward(self, h: Tensor) -> Tensor:
        x = self.pre_act(h if self.beta_folded else h / self.beta)
        shortcut = h if self.shortcut is None else self.shortcut(x)
        branch = None if torch.jit.is_scripting() else self._scaled_branch(x)
        if branch is None:
            out = nf_residual(shortcut, self.branch(x), self.alpha, self.skip_gain)
        else:  # nf_residual with its alpha * gain already in the branch's last convolution
            out = shortcut + branch
        return out if self.final_act is None else self.final_act(out)

    @torch.jit.unused
    def _scaled_branch(self, x: Tensor) -> Tensor | None:
        """``residual_scale(alpha, skip_gain) * branch(x)`` with the scalar folded into the branch's last
        convolution, or None where it cannot be (see the class docstring)."""
        if self.skip_gain is not None and self.skip_gain.ndim:
            return None
        layers = _plain_layers(self.branch)
        while layers and type(layers[-1]) is nn.Identity:
            layers.pop()
        if not layers or type(layers[-1]) not in (ScaledStdConv2d, FusedScaledStdConv2d) \
                or not called_plainly(layers[-1]):
            return None
        for layer in layers[:-1]:
            x = layer(x)
        last = cast(ScaledStdConv2d, layers[-1])  # checked above: a (fused) ScaledStdConv2d
        return scaled_output_conv(last, x, residual_scale(self.alpha, self.skip_gain))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}, transition={self.transition}"


# layers that commute with multiplication by a positive scalar, so a scale of their input may move past them
_POSITIVE_SCALE_COMMUTING = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _runs_children_in_order(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """Whether `module` is an nn.Sequential (fastai's ConvLayer is one) whose forward is nn.Sequential's."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _first_layer(module: nn.Module) -> nn.Module | None:
    """The first layer of `module` (through nested nn.Sequential) that does not commute with a positive scale, or
    None."""
    if not _runs_children_in_order(module):
        return None if isinstance(module, _POSITIVE_SCALE_COMMUTING) else module
    return next((found for found in map(_first_layer, module) if found is not None), None)


def _plain_layers(module: nn.Module) -> list[nn.Module] | None:
    """The layers a nest of nn.Sequential (fastai's ConvLayer is one) applies, in order, or None if calling them one
    by one would skip something: a container with a hook or a replaced forward."""
    if not _runs_children_in_order(module):
        return [module]
    if not called_plainly(module):
        return None
    layers = []
    for child in module:
        inner = _plain_layers(child)
        if inner is None:
            return None
        layers += inner
    return layers


@dataclass
class _Walk:
    """The state of a walk in execution order: the last activation (whose output the next conv reads; None:
    the input image or a linear output), the previous leaf, the transition flags of the residual blocks since
    the stream's variance last restarted (`stack`: their betas are `residual_betas` of it) and the last
    residual block (open until something other than a block reads its output)."""

    alpha: float
    skipinit: bool
    gammas: float | Mapping | None
    last_act: nn.Module | None = None
    last_act_path: str = "the input"
    prev: nn.Module | None = None
    prev_path: str = ""
    stack: list[bool] = field(default_factory=list)
    open_block: ConvertedResidual | None = None
    open_act: nn.Module | None = None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@runtime_checkable
class _InPlaceOption(Protocol):
    """An activation that can overwrite its input (torch's `inplace` flag); isinstance checks for the attribute."""

    inplace: bool


def _no_inplace(act: nn.Module) -> nn.Module:
    act = copy.deepcopy(act)
    if isinstance(act, _InPlaceOption):
        act.inplace = False
    return act


def _is_activation_kind(kind: type) -> bool:
    """Whether modules of class `kind` are activations: torch's and timm's activation classes."""
    return kind is not nn.Identity and (kind.__module__ == "torch.nn.modules.activation"
                                        or kind.__module__.startswith("timm.layers.activations"))


def _is_activation(module: nn.Module, gammas) -> bool:
    kind = type(module)
    if isinstance(gammas, Mapping) and (kind in gammas or kind.__name__ in gammas):
        return True
    return not any(True for _ in module.children()) and _is_activation_kind(kind)


def _holds(module: nn.Module, kinds: tuple[type, ...]) -> str | None:
    """The relative path of the first submodule of `module` of one of `kinds` (itself: ''), or None."""
    return next((name for name, m in module.named_modules() if isinstance(m, kinds)), None)


def _pair(setting: tuple[int, ...]) -> tuple[int, int]:
    """An nn.Conv2d's kernel_size, stride, padding or dilation: (height, width), as its constructor stores them."""
    height, width = setting
    return height, width


def _scaled_conv(conv: nn.Conv2d, gamma: float, bias: bool) -> ScaledStdConv2d:
    """`conv` as a timm ScaledStdConv2d with `gamma`, keeping its weight (and bias; a zero bias if it had none and
    `bias`, in place of the dropped BatchNorm's shift)."""
    weight = conv.weight
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)  # or 'same' / 'valid'
    new = ScaledStdConv2d(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), stride=_pair(conv.stride),
                          padding=padding, dilation=_pair(conv.dilation), groups=conv.groups,
                          bias=bias or conv.bias is not None, gamma=gamma, eps=STD_CONV_EPS,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if new.bias is not None:
            new.bias.copy_(conv.bias) if conv.bias is not None else new.bias.zero_()
    new.weight.requires_grad_(weight.requires_grad)
    new.train(conv.training)
    return new


def _convert_conv(conv: nn.Conv2d, path: str, walk: _Walk, feeds_batchnorm: bool) -> nn.Module:
    if isinstance(conv, STD_CONVS):
        return conv  # already weight-standardised
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        raise ConversionError(f"{path} ({type(conv).__name__}{'' if type(conv) is not nn.Conv2d else ', padding_mode '}"
                         f"{'' if type(conv) is not nn.Conv2d else repr(conv.padding_mode)}): to_normfree replaces "
                         f"plain nn.Conv2d layers with zero padding only; replace this layer by an nn.Conv2d (or a "
                         f"timm ScaledStdConv2d) before converting")
    if walk.last_act is None:
        gamma = 1.0  # reads the image or a linear output, not an activation
    else:
        try:
            gamma = activation_gamma(walk.last_act, walk.gammas)
        except KeyError as error:
            raise ConversionError(f"{path} reads the output of {walk.last_act_path} ({type(walk.last_act).__name__}): "
                             f"{error.args[0]}") from None
    return _scaled_conv(conv, gamma, bias=feeds_batchnorm)


def _next_is_batchnorm(children: list[tuple[str, nn.Module]], index: int) -> bool:
    return index + 1 < len(children) and isinstance(children[index + 1][1], _BATCHNORMS)


def _close_block(walk: _Walk) -> None:
    """Something other than a residual block reads the stream: the last block applies its activation."""
    if walk.open_block is not None:
        walk.open_block.final_act = walk.open_act
        walk.open_block = walk.open_act = None


def _convert_batchnorm(bn: nn.Module, path: str, walk: _Walk) -> nn.Module:
    if not isinstance(walk.prev, nn.Conv2d):
        follows = (f"it follows {walk.prev_path} ({type(walk.prev).__name__})" if walk.prev is not None
                   else "nothing precedes it")
        raise ConversionError(f"{path} ({type(bn).__name__}) does not follow a convolution ({follows}): "
                              f"to_normfree drops a BatchNorm only where the convolution before it takes over with "
                              f"Scaled Weight Standardisation. Remove or replace this layer yourself (e.g. a fastai "
                              f"vision_learner head's BatchNorm1d: build the model with normfree.build_model or "
                              f"nf_learner, whose head has none)")
    if bn.num_features != walk.prev.out_channels:
        raise ConversionError(f"{path} ({type(bn).__name__}) normalises {bn.num_features} channels but "
                              f"{walk.prev_path} outputs {walk.prev.out_channels}: it does not normalise that "
                              f"convolution's output")
    walk.prev, walk.prev_path = bn, path
    act = getattr(bn, "act", None)  # timm's BatchNormAct2d holds its activation: keep it
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        walk.last_act, walk.last_act_path = act, f"{path}.act"
        return act
    return nn.Identity()


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of `module` in order, one listed under two names at both (named_children() lists it once):
    an activation module reused in a stack runs, and sets the next conv's gamma, at each place."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _convert_children(module: nn.Module, path: str, walk: _Walk, in_branch: bool) -> None:
    children = _children(module)
    for index, (name, child) in enumerate(children):
        child_path = f"{path}.{name}" if path else name
        new = _convert(child, child_path, walk, in_branch, _next_is_batchnorm(children, index))
        if new is not child:
            setattr(module, name, new)


def _convert(module: nn.Module, path: str, walk: _Walk, in_branch: bool, feeds_batchnorm: bool = False) -> nn.Module:
    """`module` converted (replaced or changed in place), visited in execution order."""
    block = _block_reader(module)
    if block is not None:
        if in_branch:
            raise ConversionError(f"{path}: a residual block inside another block's branch; {_HOW}")
        return _convert_block(module, path, walk, *block(module, path))
    if isinstance(module, _SEQUENTIAL_MODELS):  # containers: their children decide
        _convert_children(module, path, walk, in_branch)
        return module
    if not in_branch:
        _close_block(walk)
    if isinstance(module, _BATCHNORMS):
        return _convert_batchnorm(module, path, walk)
    if isinstance(module, _OTHER_NORMS):
        raise ConversionError(f"{path} is a {type(module).__name__}: to_normfree removes BatchNorm only, so the model "
                         f"would keep a normalisation layer. If dropping it is what you want, replace it by "
                         f"nn.Identity() before converting")
    if isinstance(module, nn.Conv2d):
        new = _convert_conv(module, path, walk, feeds_batchnorm)
        walk.last_act, walk.last_act_path = None, path
        walk.prev, walk.prev_path = module, path  # the original: a following BatchNorm checks its channels
        if not in_branch:
            walk.stack = []  # a weight-standardised conv of an activation has unit variance: a new stack
        return new
    if isinstance(module, (nn.modules.conv._ConvNd)):
        raise ConversionError(f"{path} ({type(module).__name__}): "
                              "to_normfree converts 2-D convolutions (nn.Conv2d) only")
    if _is_activation(module, walk.gammas):
        walk.last_act, walk.last_act_path = module, path
        walk.prev, walk.prev_path = module, path
        return module
    if any(True for _ in module.children()):
        inside = _holds(module, _NORMS + (nn.modules.conv._ConvNd,))
        if inside is not None:
            what = type(module.get_submodule(inside)).__name__
            where = path or "the model"
            raise ConversionError(f"{where} ({type(module).__name__}) holds a {what} ({_join(path, inside)}) and "
                                  f"its forward is not known to normfree (a residual connection?), so it cannot be "
                                  f"converted safely. {_HOW}: rewrite it as one of those, or convert its parts "
                                  f"yourself (e.g. to_normfree(model.features) for an nn.Sequential inside it)")
    # pooling, dropout, flatten, linear layers, heads without convolutions: kept as they are
    if any(True for _ in module.parameters(recurse=False)) or isinstance(module, nn.Linear):
        walk.last_act, walk.last_act_path = None, path
    walk.prev, walk.prev_path = module, path
    return module


def _extra(module: nn.Module, path: str, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The optional parts of a timm block (attention, anti-aliasing, drop-block), refusing ones with layers."""
    parts = []
    for name in names:
        part = getattr(module, name, None)
        if part is None or isinstance(part, nn.Identity):
            continue
        if any(True for _ in part.parameters()) or _holds(part, _NORMS + (nn.modules.conv._ConvNd,)) is not None:
            raise ConversionError(f"{path}.{name} ({type(part).__name__}): to_normfree does not convert attention or "
                             f"other layered parts of a residual branch; build the model without it")
        parts.append((name, part))
    return parts


# how a residual block is taken apart: the branch's parts (name, module) in order, the shortcut (None: identity),
# the activation after the addition, and the shortcut's attribute name
_BlockParts = tuple[list[tuple[str, nn.Module]], nn.Module | None, nn.Module, str]


def _torchvision_block(block: tv_resnet.BasicBlock | tv_resnet.Bottleneck, path: str) -> _BlockParts:
    parts = [("conv1", block.conv1), ("bn1", block.bn1), ("relu1", block.relu), ("conv2", block.conv2),
             ("bn2", block.bn2)]
    if isinstance(block, tv_resnet.Bottleneck):
        parts += [("relu2", block.relu), ("conv3", block.conv3), ("bn3", block.bn3)]
    return parts, block.downsample, block.relu, "downsample"


def _timm_block(block: timm_resnet.BasicBlock | timm_resnet.Bottleneck, path: str) -> _BlockParts:
    if isinstance(block, timm_resnet.Bottleneck):
        parts = [("conv1", block.conv1), ("bn1", block.bn1), ("act1", block.act1), ("conv2", block.conv2),
                 ("bn2", block.bn2), *_extra(block, path, ("drop_block",)), ("act2", block.act2),
                 *_extra(block, path, ("aa",)), ("conv3", block.conv3), ("bn3", block.bn3)]
        act = block.act3
    else:
        parts = [("conv1", block.conv1), ("bn1", block.bn1), *_extra(block, path, ("drop_block",)),
                 ("act1", block.act1), *_extra(block, path, ("aa",)), ("conv2", block.conv2), ("bn2", block.bn2)]
        act = block.act2
    parts += _extra(block, path, ("se", "drop_path"))
    return parts, block.downsample, act, "downsample"


def _fastai_block(block: ResBlock, path: str) -> _BlockParts:
    parts = _children(block.convpath)
    return parts, block.idpath if len(block.idpath) else None, block.act, "idpath"


# each reader takes the blocks of its own classes: `_block_reader` picks it by the block's exact type
_BlockReader = Callable[[Any, str], _BlockParts]
_BLOCKS: dict[type[nn.Module], _BlockReader] = {
    tv_resnet.BasicBlock: _torchvision_block,
    tv_resnet.Bottleneck: _torchvision_block,
    timm_resnet.BasicBlock: _timm_block,
    timm_resnet.Bottleneck: _timm_block,
}


def _block_reader(module: nn.Module) -> _BlockReader | None:
    """How to take `module` apart if it is a residual block `to_normfree` knows, else None."""
    fastai_layers = sys.modules.get("fastai.layers")  # a fastai ResBlock exists only once fastai is imported
    if fastai_layers is not None and type(module) is fastai_layers.ResBlock:
        return _fastai_block
    return _BLOCKS.get(type(module))


def _convert_block(block: nn.Module, path: str, walk: _Walk, parts: list[tuple[str, nn.Module]],
                   shortcut: nn.Module | None, act: nn.Module, shortcut_name: str) -> ConvertedResidual:
    """A post-activation residual block ``act(branch(h) + shortcut(h))`` as a pre-activation NF block."""
    act_path = f"{path}.{next(n for n, m in block.named_children() if m is act)}"
    transition = shortcut is not None and _holds(shortcut, (nn.modules.conv._ConvNd,)) is not None
    walk.stack.append(transition)
    beta = residual_betas(walk.stack, walk.alpha)[-1]
    pre_act = _no_inplace(act)
    branch = nn.Sequential()
    for name, part in parts:
        branch.add_module(name, part if not isinstance(part, nn.ReLU) else _no_inplace(part))

    # the branch: each part in order, one walk (so a BatchNorm finds the conv before it)
    branch_walk = _Walk(walk.alpha, walk.skipinit, walk.gammas, last_act=pre_act, last_act_path=act_path)
    children = _children(branch)
    for index, (name, part) in enumerate(children):
        new = _convert(part, f"{path}.{name}", branch_walk, True, _next_is_batchnorm(children, index))
        if new is not part:
            setattr(branch, name, new)
    new_shortcut = None
    if shortcut is not None:  # reads act(h / beta), as the branch does
        shortcut_walk = _Walk(walk.alpha, walk.skipinit, walk.gammas, last_act=pre_act, last_act_path=act_path)
        new_shortcut = _convert(shortcut, f"{path}.{shortcut_name}", shortcut_walk, in_branch=True)
    if new_shortcut is not None and not transition:
        raise ConversionError(f"{path}.{shortcut_name}: a shortcut without a convolution (pooling only) is not "
                              f"supported; {_HOW}")
    converted = ConvertedResidual(pre_act, branch, new_shortcut, walk.alpha, beta, walk.skipinit, transition)
    converted.to(next((p.device for p in block.parameters()), torch.device("cpu")))
    walk.open_block, walk.open_act = converted, _no_inplace(act)
    walk.last_act, walk.last_act_path, walk.prev, walk.prev_path = None, path, converted, path
    return converted


# what an activation_gamma override may be: 1 / std of the activation's output for N(0, 1) inputs. The known gammas
# span 1.0 (identity) to 4.8 (sigmoid); beyond these bounds a typo, not an activation, is far likelier (0 silences
# every conv, a huge one overflows).
GAMMA_RANGE = (0.01, 100.0)


def _check_gamma(value, where: str) -> float:
    low, high = GAMMA_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
        raise ConversionError(f"activation_gamma{where} must be a number in [{low:g}, {high:g}] (1 / std of the "
                              f"activation's output for N(0, 1) inputs; ReLU's is {ACTIVATION_GAMMAS['relu']:.4f}), "
                              f"got {value!r}")
    return float(value)


def _checked_gammas(gammas, model: nn.Module) -> float | dict | None:
    """`to_normfree`'s `activation_gamma`, checked: one number, or a mapping whose every key is an activation class or
    class name found in `model` (a key that matches nothing would be silently ignored) and every value a gamma."""
    if gammas is None:
        return None
    if not isinstance(gammas, Mapping):
        if isinstance(gammas, bool) or not isinstance(gammas, numbers.Real):
            raise ConversionError(f"activation_gamma must be a number or a mapping from activation classes (or class "
                                  f"names) to numbers, e.g. {{nn.Hardswish: 1.9}}, got {gammas!r}")
        return _check_gamma(gammas, "")
    kinds = {type(m) for m in model.modules()}
    activations = sorted({kind.__name__ for kind in kinds if _is_activation_kind(kind)})
    checked = {}
    for key, value in gammas.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise ConversionError(f"activation_gamma's keys must be activation classes (nn.ReLU) or class names "
                                  f"('ReLU'), got {key!r}")
        if not any(key is kind or key == kind.__name__ for kind in kinds):
            name = key if isinstance(key, str) else key.__name__
            raise ConversionError(f"activation_gamma key {name!r} matches no module of the model, so it would be "
                                  f"ignored: keys are activation classes or their class names (case matters); the "
                                  f"model's activations: {', '.join(activations) or 'none'}")
        checked[key] = _check_gamma(value, f"[{key if isinstance(key, str) else key.__name__!r}]")
    return checked


def _refuse_unconvertible(model: nn.Module, mode: str) -> None:
    """ConversionError for a model `to_normfree` cannot convert as a whole, before walking it: scripted or compiled
    models (their forward is not their modules'), models already normalizer-free (for "fold": models without
    BatchNorm, or with another normalisation layer), the BatchNorm twins of normfree's small NF ResNets ("nf"), and
    convolutions or normalisation layers used in two places (one module, two names)."""
    scripted = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise ConversionError(f"{scripted or 'the model'} is a TorchScript module (torch.jit.script or trace): its "
                              f"forward is compiled code that to_normfree cannot rewrite; pass the eager nn.Module it "
                              f"was made from (and script the converted model)")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise ConversionError("the model is a torch.compile wrapper: pass the eager nn.Module (model._orig_mod) and "
                              "compile the converted model")
    if mode == "fold":
        _refuse_unfoldable(model)
    elif isinstance(model, SmallResNet) and model.normalization == "batchnorm":
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        twin = normfree_twin_name(arch) if arch else "nf_resnet_tiny/small/base (the same size)"
        raise ConversionError(f"{arch or 'this model'} is the BatchNorm twin of normfree's {twin}: to_normfree does "
                              f"not convert its pre-activation blocks; build {twin} (--arch {twin.split(' ')[0]}, or "
                              f"normfree.build_model) for the normalizer-free version")
    if mode == "nf" and _holds(model, _NORMS) is None:
        standardized = _holds(model, STD_CONVS)
        if standardized is not None:
            raise ConversionError(f"the model ({type(model).__name__}) is already normalizer-free: it has no BatchNorm "
                                  f"and its convolutions are weight-standardised ({standardized or 'the model'} is a "
                                  f"{type(model.get_submodule(standardized)).__name__}); nothing to convert, train it "
                                  f"as it is")
        if _holds(model, (nn.modules.conv._ConvNd,)) is None:
            raise ConversionError(f"the model ({type(model).__name__}) has no BatchNorm and no convolution: nothing to "
                                  f"convert")
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    for m in model.modules():
        if len(paths[id(m)]) > 1 and _holds(m, _NORMS + (nn.modules.conv._ConvNd,)) is not None:
            raise ConversionError(f"{' and '.join(paths[id(m)])} are one {type(m).__name__} module used twice (shared "
                                  f"or reused): to_normfree converts each place a layer runs on its own, so it cannot "
                                  f"convert a shared one; give each place its own module (copy.deepcopy) first")


def _refuse_unfoldable(model: nn.Module) -> None:
    """ConversionError for a model "fold" cannot make normalizer-free: no BatchNorm, or another normalisation."""
    other = _holds(model, _OTHER_NORMS)
    if other is not None:
        raise ConversionError(f"{other or 'the model'} is a {type(model.get_submodule(other)).__name__}: mode 'fold' "
                              f"folds BatchNorm only (its statistics are fixed; this layer's are each input's), so the "
                              f"model would keep a normalisation layer; use mode='nf', or replace it by nn.Identity() "
                              f"first if dropping it is what you want")
    if _holds(model, _BATCHNORMS) is None:
        raise ConversionError(f"the model ({type(model).__name__}) has no BatchNorm: nothing to fold; "
                              "train it as it is")


def _check_mode(mode: object, alpha: object, skipinit: object, activation_gamma: object) -> None:
    if not isinstance(mode, str) or mode not in CONVERSION_MODES:
        raise ConversionError(f"mode must be one of {', '.join(map(repr, CONVERSION_MODES))} ("
                              f"{'; '.join(f'{m}: {what}' for m, what in CONVERSION_MODES.items())}), got {mode!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ConversionError(f"alpha must be a finite number > 0 (default {DEFAULT_ALPHA}; the papers' 0.2), "
                              f"got {alpha!r}")
    if skipinit is not None and not isinstance(skipinit, bool):
        raise ConversionError(f"skipinit must be True or False, got {skipinit!r}")
    if mode == "fold":
        given = [name for name, value in (("alpha", alpha), ("skipinit", skipinit),
                                          ("activation_gamma", activation_gamma)) if value is not None]
        if given:
            raise ConversionError(f"{given[0]} is an option of mode 'nf' (the NF-ResNet recipe); mode 'fold' keeps the "
                                  f"model's blocks and weights as they are: leave {given[0]} out")


def to_normfree(model: nn.Module, mode: str = "nf", *, alpha: float | None = None, skipinit: bool | None = None,
                activation_gamma: float | Mapping | None = None) -> nn.Module:
    """A copy of BatchNorm model `model` made normalizer-free; `model` itself is not changed. `mode`:

    ``"fold"``: every BatchNorm folded into the layer next to it (`normfree.models.fold.fold_batchnorms`), the
    frozen-BatchNorm practice of detection libraries. The copy keeps its classes and every other module; each
    BatchNorm becomes nn.Identity (timm's BatchNormAct2d: its activation and dropout) and the convolution or Linear
    before it gets W'_c = W_c * g_c / sqrt(var_c + eps), b'_c = beta_c + (b_c - mean_c) * g_c / sqrt(var_c + eps)
    (a bias created where it had none; parameters trainable as before). So the copy's eval-mode outputs equal the
    original's eval-mode outputs up to float rounding (the running statistics are used, whatever mode `model` is
    in), and it has no normalisation layer left: train it with AGC. The convolutions stay plain: Scaled WS on top
    would remove each filter's mean, which the pretrained function needs, and fine-tuned worse
    (docs/convert/fold-ws/results.md). Covered: any conv -> BatchNorm pair (ResNets,
    inverted residuals, depthwise convs, squeeze-excitation: torchvision, timm EfficientNet / MobileNet, fastai
    xresnet), Linear -> BatchNorm1d, and a BatchNorm feeding a Linear or an unpadded convolution (fastai's head:
    BatchNorm1d, Dropout, Linear; with Dropout between, training drops the scaled input, not BatchNorm's shift).
    Refused (ConversionError naming the BatchNorm and the fix): a BatchNorm before a padded convolution (DenseNet,
    pre-activation blocks: the padding zeros would need its shift), one reading a sum or a concatenation, one
    without running statistics, another normalisation layer (GroupNorm, LayerNorm, ...), a model without BatchNorm.
    `alpha`, `skipinit` and `activation_gamma` are options of "nf" only (refused with "fold").

    ``"nf"`` (the default): the NF-ResNet recipe (Brock, De & Smith 2021, arXiv 2101.08692, Sec. 3-4):

    - Every BatchNorm is removed: its running statistics and affine parameters are dropped (not folded
      into the convolution), so a trained model's function changes; its weights are a starting point.
      A convolution that fed a BatchNorm gets a bias (zero) in place of BatchNorm's shift.
    - Every nn.Conv2d becomes timm's ScaledStdConv2d, keeping its weight (the standardised weight's
      source; gains start at 1), with the gamma of the activation whose output it reads (ReLU, SiLU,
      GELU, ... from `normfree.models.equations.ACTIVATION_GAMMAS`; 1 for a conv reading the image).
      `activation_gamma` overrides: one value for all, or ``{nn.Hardswish: 1.9}`` by activation class
      (or class name, ``"Hardswish"``); each gamma a number in `GAMMA_RANGE` ([0.01, 100]), each key matching a
      module of the model (a key that matches none, e.g. the table name "relu", is refused, not ignored).
    - Residual blocks of torchvision ResNets (BasicBlock, Bottleneck), timm ResNets and fastai's xresnet
      (ResBlock) become `ConvertedResidual` blocks, h + alpha * gain * f(act(h / beta)), beta the expected
      std of h from `residual_betas` (variance alpha^2 more per block, 1 + alpha^2 after a transition: a
      block with a projection shortcut). `alpha`: None is `DEFAULT_ALPHA` (0.5; the papers' is 0.2).
      `skipinit`: True adds the SkipInit gain, a learnable scalar starting at 0; None is `DEFAULT_SKIPINIT`
      (False): no gain, the branches start at full strength (see `DEFAULT_SKIPINIT` for the measurement behind both).
    - nn.Sequential stacks of Conv2d, BatchNorm2d, activations, pooling and Linear layers (plain CNNs)
      are converted layer by layer.

    ValueError (`ConversionError`) naming the module path and the fix for what cannot be converted: an unknown
    module holding a BatchNorm or a convolution (its forward, maybe a residual connection, is unknown), GroupNorm /
    LayerNorm / InstanceNorm, a BatchNorm not directly after a convolution, an activation without a known
    gamma, a convolution or BatchNorm module used in two places, a TorchScript or torch.compile'd model (pass the
    eager module), a model with nothing to convert (already normalizer-free; no BatchNorm and no convolution), the
    BatchNorm twin of one of normfree's small NF ResNets (build the NF twin). An activation module used in two
    places is fine: each place sets the gamma of the conv after it. No partial conversion is ever returned.
    """
    _check_mode(mode, alpha, skipinit, activation_gamma)
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_normfree converts an nn.Module, got {type(model).__name__}")
    _refuse_unconvertible(model, mode)
    if mode == "fold":
        return fold_batchnorms(copy.deepcopy(model))
    gammas = _checked_gammas(activation_gamma, model)
    converted = copy.deepcopy(model)
    walk = _Walk(float(DEFAULT_ALPHA if alpha is None else alpha), DEFAULT_SKIPINIT if skipinit is None else skipinit,
                 gammas)
    converted = _convert(converted, "", walk, in_branch=False)
    _close_block(walk)
    left = [name or type(converted).__name__ for name, m in converted.named_modules() if isinstance(m, _NORMS)]
    if left:  # cannot happen by construction; never hand back a partial conversion
        raise ConversionError(f"to_normfree left normalisation layers in the model: {', '.join(left)}")
    return converted
