"""`fold_batchnorms`: every BatchNorm of a model folded into the convolution or Linear next to it (frozen BatchNorm).

An eval-mode BatchNorm is a fixed per-channel affine map (`normfree.models.equations.batchnorm_scale_shift`), so
it folds exactly into a linear layer next to it (the frozen-BatchNorm practice of detection
libraries, detectron2's FrozenBatchNorm2d):

- after a layer (conv -> BatchNorm, any conv: 1d/2d/3d, grouped, depthwise, transposed; Linear -> BatchNorm1d):
  W'_c = W_c * scale_c, b'_c = scale_c * b_c + shift_c for each output channel c;
- before a layer (BatchNorm1d -> Linear, BatchNorm -> a convolution without padding), with only Dropout between:
  W' = W * scale along the input channels, b' = b + W shift. Not before a padded convolution: its padding zeros
  would need BatchNorm's shift too, so the fold would be exact only away from the border.

Which layer feeds which is read from the model's forward with torch.fx (timm's not-traced modules and functions
are respected); a model fx cannot trace falls back to neighbours in plain nn.Sequential containers. The BatchNorm
module is replaced by nn.Identity (timm's BatchNormAct2d by its activation and dropout, which it applied after
normalising); the layer keeps its class, its weight and bias become the folded ones (a bias is created where it
had none). What cannot be folded is refused with `ConversionError` naming the BatchNorm and the fix.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import Tensor, nn

from ..utils.errors import ConversionError
from .equations import batchnorm_scale_shift
from .fusion import replace_submodule
from .standardization import STD_CONVS

__all__ = ["fold_batchnorms"]

_BATCHNORMS = nn.modules.batchnorm._BatchNorm
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# elementwise at inference (the identity) and in training a mask on each value: a BatchNorm may fold across them
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_BN_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_FIX = ("convert with mode='nf' instead (it drops BatchNorm and retrains with Scaled WS), or replace this BatchNorm "
        "yourself (nn.Identity(), or move it next to a convolution or Linear) before folding")


@dataclass(frozen=True)
class _Pair:
    """A BatchNorm (path `bn`) that folds into the layer at path `layer`, which it follows (`after`) or feeds."""

    bn: str
    layer: str
    after: bool


def _bn_dims(bn: nn.Module) -> int | None:
    """The spatial dims + 1 of the input `bn` normalises (BatchNorm1d: 1, 2d: 2, 3d: 3); None: any (SyncBatchNorm)."""
    return next((dims for kind, dims in _BN_DIMS.items() if isinstance(bn, kind)), None)


def _layer_dims(layer: nn.Module) -> int:
    """The dims `_bn_dims` must match for a BatchNorm next to `layer`: a conv's spatial dims, a Linear's 1."""
    return 1 if isinstance(layer, nn.Linear) else layer.weight.dim() - 2


def _matches(bn: nn.Module, layer: nn.Module, channels: int) -> bool:
    dims = _bn_dims(bn)
    return bn.num_features == channels and (dims is None or dims == _layer_dims(layer))


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _folds_after(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether `bn` reading `layer`'s output folds into it: a conv or Linear whose weight it uses as it is."""
    return isinstance(layer, _LAYERS) and not isinstance(layer, STD_CONVS) and _matches(bn, layer, _out_channels(layer))


def _padding_of(layer: nn.Module) -> str | None:
    """Why `bn` cannot fold into conv `layer` after it (its zero padding), or None."""
    padding = layer.padding
    if padding == "valid" or (not isinstance(padding, str) and not any(padding)):
        return None
    return f"padding {padding!r}"


def _folds_before(bn: nn.Module, layer: nn.Module) -> bool:
    """Whether `bn` feeding `layer` folds into it: a Linear, or a plain convolution without padding, of the
    channels `bn` normalises, with a BatchNorm that applies nothing after normalising (no BatchNormAct2d act)."""
    if not isinstance(layer, nn.Linear) and not (type(layer) in _PLAIN_CONVS and _padding_of(layer) is None):
        return False
    return _matches(bn, layer, _in_channels(layer)) and _replacement(bn) is None


def _replacement(bn: nn.Module) -> nn.Module | None:
    """What timm's BatchNormAct2d applies after normalising (its dropout and activation), None for a BatchNorm."""
    parts = [part for part in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if isinstance(part, nn.Module) and not isinstance(part, nn.Identity)]
    return nn.Sequential(*parts) if len(parts) > 1 else (parts[0] if parts else None)


def _grouped(vector: Tensor, groups: int, rows: int) -> Tensor:
    """`vector` (one value per channel of the side of a grouped weight that is split into columns) laid out as a
    [rows, columns] matrix: row r, in group r // (rows / groups), holds that group's slice of `vector`."""
    columns = vector.numel() // groups
    return vector.view(groups, 1, columns).expand(groups, rows // groups, columns).reshape(rows, columns)


def _set(layer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    """Give `layer` the folded weight and bias as new parameters (trainable as its weight was)."""
    trainable = layer.weight.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=trainable)
    layer.bias = nn.Parameter(bias, requires_grad=trainable if layer.bias is None else layer.bias.requires_grad)


def _bias(layer: nn.Module) -> Tensor:
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(_out_channels(layer))


@torch.no_grad()
def _fold_after(layer: nn.Module, bn: nn.Module) -> None:
    scale, shift = (t.to(layer.weight.dtype) for t in batchnorm_scale_shift(bn))
    weight = layer.weight
    # a transposed conv's weight is [in, out / groups, ...]: output channels in columns
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        factor = _grouped(scale, layer.groups, weight.shape[0]).view(*weight.shape[:2], *[1] * (weight.dim() - 2))
    else:  # weight [out, ...]
        factor = scale.view(-1, *[1] * (weight.dim() - 1))
    _set(layer, weight * factor, _bias(layer) * scale + shift)


@torch.no_grad()
def _fold_before(bn: nn.Module, layer: nn.Module) -> None:
    scale, shift = (t.to(layer.weight.dtype) for t in batchnorm_scale_shift(bn))
    weight = layer.weight  # [out, in / groups, ...]: input channels in columns
    spatial = [1] * (weight.dim() - 2)
    scale, shift = (_grouped(t, getattr(layer, "groups", 1), weight.shape[0]).view(*weight.shape[:2], *spatial)
                    for t in (scale, shift))
    _set(layer, weight * scale, _bias(layer) + (weight * shift).flatten(1).sum(1))


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer that keeps every BatchNorm (timm's BatchNormAct2d too) and timm's not-traced modules as
    single calls, so each BatchNorm appears as one node with its input and its users."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (_BATCHNORMS, *self._leaves)) or super().is_leaf_module(module, qualified_name)


def _graph_pairs(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[list[_Pair], dict[str, str]]:
    """The foldable (BatchNorm, layer) pairs of `model`'s traced forward, and for each BatchNorm that is not in one,
    why (what it reads and what reads it)."""
    graph = _Tracer().trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")

    def called(node: object) -> nn.Module | None:  # the module a node calls once, else None
        if isinstance(node, torch.fx.Node) and node.op == "call_module" and calls[node.target] == 1:
            return modules[node.target]
        return None

    def describe(node: object) -> str:
        if not isinstance(node, torch.fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"{node.target} ({type(modules[node.target]).__name__})"
        if node.op == "placeholder":
            return "the model's input"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"

    pairs, reasons = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BATCHNORMS):
            continue
        bn = modules[node.target]
        if calls[node.target] > 1:
            reasons[node.target] = "it runs at several places of the forward"
            continue
        source = node.args[0] if node.args else None
        if called(source) is not None and len(source.users) == 1 and _folds_after(called(source), bn):
            pairs.append(_Pair(node.target, source.target, after=True))
            continue
        reader = node  # what reads the BatchNorm's output, through Dropout layers
        while len(reader.users) == 1 and isinstance(called(next(iter(reader.users))), _DROPOUTS):
            reader = next(iter(reader.users))
        user = next(iter(reader.users)) if len(reader.users) == 1 else None
        if called(user) is not None and user.args[:1] == (reader,) and _folds_before(bn, called(user)):
            pairs.append(_Pair(node.target, user.target, after=False))
            continue
        users = ", ".join(describe(u) for u in reader.users) or "nothing"
        padded = called(user) is not None and type(called(user)) in _PLAIN_CONVS and _padding_of(called(user))
        why = (f"; it cannot fold into {user.target} after it: its {padded} adds zeros that BatchNorm's shift does not "
               f"reach, so the fold would be wrong at the border" if padded else "")
        reasons[node.target] = f"it reads {describe(source)} and {users} reads it{why}"
    return pairs, reasons


def _sequential_pairs(model: nn.Module) -> Iterator[_Pair]:
    """The foldable (BatchNorm, layer) neighbours inside nn.Sequential containers that run their children in order
    (their own forward is nn.Sequential's): the fallback for a model torch.fx cannot trace."""
    for path, container in model.named_modules():
        if not isinstance(container, nn.Sequential) or type(container).forward is not nn.Sequential.forward:
            continue
        children = [(f"{path}.{name}" if path else name, child) for name, child in container.named_children()]
        for index, (name, child) in enumerate(children):
            if not isinstance(child, _BATCHNORMS):
                continue
            if index and _folds_after(children[index - 1][1], child):
                yield _Pair(name, children[index - 1][0], after=True)
                continue
            following = next(((n, c) for n, c in children[index + 1:] if not isinstance(c, _DROPOUTS)), None)
            if following is not None and _folds_before(child, following[1]):
                yield _Pair(name, following[0], after=False)


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of `model` into the convolution or Linear next to it, in place; returns `model`.

    The eval-mode function is kept: the fold uses the running statistics (a BatchNorm in training mode normalises
    with each batch's statistics instead; that function is not kept). ConversionError naming the BatchNorm and the
    fix for one that cannot be folded: one without running statistics (track_running_stats=False), one before a
    padded convolution or not next to a single convolution / Linear (reading a sum or a concatenation, or after an
    activation), one that runs at several places. Nothing is changed when one is refused.
    """
    modules = dict(model.named_modules())
    for path, bn in modules.items():
        if isinstance(bn, _BATCHNORMS) and bn.running_mean is None:
            raise ConversionError(f"{path} ({type(bn).__name__}) has no running statistics (track_running_stats="
                                  f"False): it normalises with each batch's statistics, so there is no fixed affine "
                                  f"map to fold; {_FIX}")
    try:
        pairs, reasons = _graph_pairs(model, modules)
        traced = ""
    except Exception as error:  # noqa: BLE001 - any tracing failure: fall back to nn.Sequential neighbours
        pairs, reasons = list(_sequential_pairs(model)), {}
        traced = (f" (torch.fx could not trace the model's forward: {type(error).__name__}: {error}; only BatchNorms "
                  f"next to a layer inside an nn.Sequential were folded)")
    folded = {pair.bn for pair in pairs}
    for path, bn in modules.items():
        if isinstance(bn, _BATCHNORMS) and path not in folded:
            why = reasons.get(path, "it is not next to one convolution or Linear whose output only it reads")
            raise ConversionError(f"{path} ({type(bn).__name__}) cannot be folded: {why}{traced}. A BatchNorm folds "
                                  f"into the convolution or Linear before it, or into a Linear or unpadded convolution "
                                  f"after it; {_FIX}")
    for pair in pairs:
        bn, layer = modules[pair.bn], modules[pair.layer]
        _fold_after(layer, bn) if pair.after else _fold_before(bn, layer)
        model = replace_submodule(model, pair.bn, _replacement(bn) or nn.Identity())
    return model
