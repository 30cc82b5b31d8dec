"""Signal propagation plots (SPPs): per residual block, how the signal's mean and variance evolve with depth.

Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in unnormalized
ResNets" (arXiv 2101.08692), Sec. 3: feed random Gaussian inputs (or a real batch) through a network at
initialisation and record, at the output of every residual block, statistics of NCHW activations taken
over N, H, W for each channel and then averaged over the channels:

- the average channel squared mean, `average_channel_squared_mean`;
- the average channel variance, `average_channel_variance`;
- the residual average channel variance: `average_channel_variance` of the residual branch's output,
  i.e. of what the block adds to its shortcut (for NF blocks that includes alpha and any SkipInit gain).

Normalizer-free ResNets show the variance growing by alpha^2 per block and resetting at each
transition block (Sec. 4); a BatchNorm ResNet with its BatchNorm removed shows the mean shift growing.

`signal_propagation` finds the residual blocks itself for timm's NF models (`NormFreeBlock`, normfree's
small family), timm's pre-activation ResNets (`PreActBottleneck`, `PreActBasic`: the small family's
BatchNorm twins), timm's and torchvision's ResNets (`BasicBlock`, `Bottleneck`) and fastai's xresnet
(`fastai.layers.ResBlock`); ``blocks=`` names the blocks of any other model.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from ..utils.panels import panel_row

__all__ = [
    "BlockStats",
    "SignalPropagation",
    "average_channel_squared_mean",
    "average_channel_variance",
    "signal_propagation",
]

DEFAULT_BATCH = 16  # noise images per forward pass
DEFAULT_SIZE = 64  # noise image height and width when the model's timm config gives none
DEFAULT_CHANNELS = 3  # when neither the timm config nor a first Conv2d gives them
_STATS = ("squared_mean", "variance", "residual_variance")
_TITLES = {"squared_mean": "average channel squared mean", "variance": "average channel variance",
           "residual_variance": "residual average channel variance"}


def _per_channel(x: Tensor) -> Tensor:
    """`x` as float64 [channels, everything else]: channel dimension 1 (NCHW, or NC, or NCL)."""
    if x.ndim < 2:
        raise ValueError(f"signal propagation needs activations with a channel dimension (N, C, ...); got shape "
                         f"{tuple(x.shape)}")
    return x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)


def average_channel_squared_mean(x: Tensor) -> float:
    """mean_c( mean_{n,h,w}(x)^2 ): the average channel squared mean of NCHW activations `x`
    (Brock, De & Smith 2021, arXiv 2101.08692, Sec. 3). Computed in float64; dimension 1 is the channel."""
    return _per_channel(x).mean(dim=1).square().mean().item()


def average_channel_variance(x: Tensor) -> float:
    """mean_c( var_{n,h,w}(x) ): the average channel variance of NCHW activations `x`, the population
    variance (divided by N*H*W) of each channel, averaged over channels (Brock, De & Smith 2021,
    arXiv 2101.08692, Sec. 3). Applied to a residual branch's output it is the residual average channel
    variance. Computed in float64; dimension 1 is the channel."""
    return _per_channel(x).var(dim=1, correction=0).mean().item()


@dataclass(frozen=True)
class BlockStats:
    """One residual block's statistics (see the module docstring).

    `index` counts block calls from 0 in the order they ran; `name` is the module's name in the model (with
    " (call k)" for a block that ran more than once);
    `transition` whether the block changes shape through a projection shortcut (a stage's first block;
    None when unknown); `residual_variance` is NaN when the residual branch could not be told apart.
    """

    index: int
    name: str
    transition: bool | None
    squared_mean: float
    variance: float
    residual_variance: float


@dataclass(frozen=True)
class SignalPropagation:
    """The result of `signal_propagation`: one `BlockStats` row per residual block call, in forward order.

    `label` names the model in plots (its class name unless given); `input_shape` is the input's shape
    and `source` "noise" or "batch".
    """

    rows: tuple[BlockStats, ...]
    label: str
    input_shape: tuple[int, ...]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[BlockStats]:
        return iter(self.rows)

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts: index, name, transition, squared_mean, variance, residual_variance."""
        return [asdict(row) for row in self.rows]

    def to_frame(self):
        """The rows as a pandas DataFrame, one row per block, columns as in `records`."""
        import pandas as pd

        return pd.DataFrame(self.records(), columns=[f for f in BlockStats.__dataclass_fields__])

    def plot(self, *others: SignalPropagation, labels: Sequence[str] | None = None,
             ax: Sequence[Any] | None = None, figsize: tuple[float, float] = (13, 3.8), title: str | None = None):
        """Three panels against block index (average channel squared mean, average channel variance,
        residual average channel variance), this result and `others` overlaid, with a legend.

        `labels` replace the results' own labels (one per result). `ax`: three matplotlib Axes to draw
        into (then nothing is created through pyplot); otherwise a new pyplot figure of `figsize`.
        Transition blocks of the first result are marked by dotted vertical lines; `title` goes above the
        panels. Returns the figure.
        """
        results = (self, *others)
        if labels is None:
            labels = [result.label for result in results]
        elif len(labels) != len(results):
            raise ValueError(f"labels: {len(labels)} given for {len(results)} results; give one per result")
        fig, axes = panel_row(ax, 3, figsize, "one per statistic")
        for result, label in zip(results, labels):
            indices = [row.index for row in result.rows]
            for panel, stat in zip(axes, _STATS):
                panel.plot(indices, [getattr(row, stat) for row in result.rows], marker="o", markersize=3,
                           label=label)
        for index in (row.index for row in self.rows if row.transition):
            for panel in axes:
                panel.axvline(index, color="0.6", linestyle=":", linewidth=1)
        for panel, stat in zip(axes, _STATS):
            panel.set(xlabel="residual block", title=_TITLES[stat])
            panel.grid(alpha=0.3)
            panel.xaxis.get_major_locator().set_params(integer=True)
        axes[0].legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig


# --- the residual blocks signal_propagation recognises -----------------------------------------------------------
# Each family says how to get the residual branch's output: either the module whose output it is
# (`branch_end`, for blocks with an activation after the addition), or by subtracting the shortcut from the
# block's output (`shortcut`: the submodule computing a projection shortcut, None for the identity).


_Block = TypeVar("_Block", bound=nn.Module)


@dataclass(frozen=True)
class _Family(Generic[_Block]):
    """Blocks of `types`; each function reads one such block (transition None: the block's output shape tells)."""

    types: tuple[type[_Block], ...]
    transition: Callable[[_Block], bool | None]
    branch_end: Callable[[_Block], nn.Module] | None = None
    shortcut: Callable[[_Block], nn.Module | None] | None = None
    # a module the block applies to its sum (shortcut + branch) before returning it: the branch is read off its input
    after_sum: Callable[[_Block], nn.Module | None] | None = None


def _downsample(block: nn.Module) -> nn.Module | None:
    return getattr(block, "downsample", None)


def _has_downsample(block: nn.Module) -> bool:
    return _downsample(block) is not None


def _families() -> list[_Family]:
    import torchvision.models.resnet as tv
    from timm.models import resnet, resnetv2
    from timm.models.nfnet import NormFreeBlock

    from .convert import ConvertedResidual

    preact = tuple(t for t in (getattr(resnetv2, "PreActBottleneck", None), getattr(resnetv2, "PreActBasic", None))
                   if t is not None)
    return [
        # out = shortcut + alpha * f(x / beta): the branch is output - shortcut
        _Family((NormFreeBlock, *preact), _has_downsample, shortcut=_downsample),
        # BN ResNets: act(branch + shortcut), the branch ends at the last BatchNorm (or SE after it)
        _Family((resnet.BasicBlock,), _has_downsample,
                branch_end=lambda b: b.se if getattr(b, "se", None) is not None else b.bn2),
        _Family((resnet.Bottleneck,), _has_downsample,
                branch_end=lambda b: b.se if getattr(b, "se", None) is not None else b.bn3),
        _Family((tv.BasicBlock,), _has_downsample, branch_end=lambda b: b.bn2),
        _Family((tv.Bottleneck,), _has_downsample, branch_end=lambda b: b.bn3),
        # normfree.to_normfree's blocks: h + alpha * gain * branch(act(h / beta)); the branch is sum - shortcut, the
        # network's last block applying the original's final activation to that sum
        _Family((ConvertedResidual,), lambda b: b.transition, shortcut=lambda b: b.shortcut,
                after_sum=lambda b: b.final_act),
    ] + _fastai_families()


def _fastai_families() -> list[_Family]:
    fastai_layers = sys.modules.get("fastai.layers")  # a fastai ResBlock exists only once fastai is imported
    if fastai_layers is None:
        return []
    # fastai: act(convpath(x) + idpath(x))
    return [_Family((fastai_layers.ResBlock,), lambda b: len(b.idpath) > 0, branch_end=lambda b: b.convpath)]


_SHORTCUT_NAMES = ("downsample", "shortcut", "skip", "idpath")


def _custom_shortcut(block: nn.Module) -> nn.Module | None:
    for name in _SHORTCUT_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
            return module
    return None


_CUSTOM = _Family[nn.Module]((), transition=lambda b: None, shortcut=_custom_shortcut)


def _family_of(module: nn.Module, families: list[_Family]) -> _Family | None:
    return next((f for f in families if isinstance(module, f.types)), None)


def _find_blocks(model: nn.Module, blocks: Any, families: list[_Family]) -> list[tuple[str, nn.Module, _Family]]:
    if blocks is None:
        found: list[tuple[str, nn.Module, _Family]] = []
        inside: list[str] = []  # blocks within blocks are not looked for
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in inside):
                continue
            family = _family_of(module, families)
            if family is not None:
                found.append((name, module, family))
                inside.append(name)
        if not found:
            raise ValueError(f"no residual block found in {type(model).__name__}: signal_propagation recognises "
                             f"timm's NormFreeBlock and ResNet blocks, torchvision's BasicBlock/Bottleneck and "
                             f"fastai's ResBlock; pass blocks= (module names or types) to name this model's blocks")
        return found
    wanted = [blocks] if isinstance(blocks, (str, type)) else list(blocks)
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for item in wanted:
        if isinstance(item, str):
            if item not in modules:
                close = [n for n in modules if n and (item in n or n in item)][:5]
                hint = f"; close names: {', '.join(close)}" if close else ""
                raise ValueError(f"blocks: the model has no module named {item!r}{hint} "
                                 f"(names as in model.named_modules())")
            chosen[item] = modules[item]
        elif isinstance(item, type) and issubclass(item, nn.Module):
            matches = {n: m for n, m in modules.items() if isinstance(m, item)}
            if not matches:
                raise ValueError(f"blocks: the model has no module of type {item.__name__}")
            chosen.update(matches)
        else:
            raise TypeError(f"blocks takes module names (str) or module types, got {item!r}")
    return [(name, module, _family_of(module, families) or _CUSTOM) for name, module in chosen.items()]


# --- the forward pass ----------------------------------------------------------------------------------------------


def _default_input_shape(model: nn.Module) -> tuple[int, int, int, int]:
    config = getattr(model, "pretrained_cfg", None) or {}
    size = config.get("input_size")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        channels = first_conv.in_channels
    else:
        channels = size[0] if size else DEFAULT_CHANNELS
    height, width = (size[1], size[2]) if size else (DEFAULT_SIZE, DEFAULT_SIZE)
    return DEFAULT_BATCH, channels, height, width


class _Recorder:
    """Forward hooks recording the statistics of each call of each block; `remove` takes every hook off again."""

    def __init__(self, blocks: list[tuple[str, nn.Module, _Family]]):
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.calls: list[dict[str, Any]] = []  # one per block call, in the order they started; filled when it ends
        for name, block, family in blocks:
            self._watch(name, block, family)

    def _watch(self, name: str, block: nn.Module, family: _Family) -> None:
        running: list[dict[str, Any]] = []  # this block's calls under way (a block may run inside itself)

        def started(module, args):
            state = {"row": {"name": name}}
            self.calls.append(state["row"])
            running.append(state)
            if family.branch_end is None and args and isinstance(args[0], Tensor):
                state["input"] = args[0].detach().clone()  # the block may change its input in place

        def ended(module, args, output):
            state = running.pop()
            if not isinstance(output, Tensor):
                return
            x = state.get("input")
            if "branch" in state:
                branch_variance = state["branch"]
            elif family.branch_end is None and x is not None:
                shortcut, total = state.get("shortcut", x), state.get("sum", output)
                known = shortcut.shape == total.shape
                branch_variance = average_channel_variance(total - shortcut) if known else math.nan
            else:
                branch_variance = math.nan
            transition = family.transition(block)
            if transition is None and x is not None:
                transition = x.shape != output.shape
            state["row"].update(transition=transition, squared_mean=average_channel_squared_mean(output),
                                variance=average_channel_variance(output), residual_variance=branch_variance)

        self.handles.append(block.register_forward_pre_hook(started))
        self.handles.append(block.register_forward_hook(ended))
        if family.branch_end is not None:
            end = family.branch_end(block)

            def branch_ended(module, args, output):  # before the block adds the shortcut to it, maybe in place
                if running:
                    running[-1]["branch"] = average_channel_variance(output)

            self.handles.append(end.register_forward_hook(branch_ended))
        elif family.shortcut is not None and (shortcut := family.shortcut(block)) is not None:
            def shortcut_ended(module, args, output):
                if running:
                    running[-1]["shortcut"] = output.detach().clone()

            self.handles.append(shortcut.register_forward_hook(shortcut_ended))
        if family.after_sum is not None and (after_sum := family.after_sum(block)) is not None:
            def sum_started(module, args):  # the sum, before the module changes it (maybe in place)
                if running:
                    running[-1]["sum"] = args[0].detach().clone()

            self.handles.append(after_sum.register_forward_pre_hook(sum_started))

    def rows(self) -> Iterator[dict[str, Any]]:
        """The calls that returned a tensor, in the order they started; the calls of a block that ran more than once
        named ``"<name> (call <k>)"``, k from 1."""
        ended = [row for row in self.calls if "variance" in row]
        runs = Counter(row["name"] for row in ended)
        seen: Counter = Counter()
        for row in ended:
            if runs[row["name"]] > 1:
                seen[row["name"]] += 1
                row = row | {"name": f"{row['name']} (call {seen[row['name']]})"}
            yield row

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _check_batch_shape(shape: tuple, argument: str) -> None:
    """ValueError naming `argument` unless `shape` is a batch of 2 or more examples with channels and no empty
    dimension: the statistics are over each channel's values across the batch (NaN for none, and over one example's
    positions only for a batch of one)."""
    if len(shape) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape) \
            or shape[0] < 2:
        raise ValueError(f"{argument}: signal propagation needs a batch of 2 or more examples shaped (N, C, ...) with "
                         f"no empty dimension (its statistics are over each channel's values across the batch), got "
                         f"shape {shape}")


def signal_propagation(
    model: nn.Module,
    x: Tensor | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    blocks: str | type | Iterable[str | type] | None = None,
    label: str | None = None,
    seed: int | None = 0,
    batch_stats: bool = True,
) -> SignalPropagation:
    """Signal propagation statistics of `model`'s residual blocks (Brock, De & Smith 2021, arXiv 2101.08692, Sec. 3).

    One forward pass in eval mode (dropout, drop-path off) with no gradient, of the batch `x` or, by default, of
    N(0, 1) noise of `input_shape` (default: 16 images with the channels of the model's first Conv2d, at the size
    of its timm ``pretrained_cfg["input_size"]``, else 64 x 64), drawn from `seed` (None: the global generator). For
    every residual block, in the order they run: the average channel squared mean and average channel
    variance of its output, and the average channel variance of its residual branch's output (what it adds
    to the shortcut). Each module's training flag is restored afterwards and every hook removed, also when
    the forward raises. `x` or `input_shape` must hold 2 or more examples (ValueError naming it otherwise).

    A block that runs more than once in the forward pass (one module used at two depths) gives one row per
    call, in the order the calls start, named ``"<name> (call 1)"``, ``"<name> (call 2)"``, ...: each call is a
    point on the signal's path through the network, which is what the plot's x axis counts.

    `batch_stats`: BatchNorm layers normalise with the batch's own statistics, as in training and in the
    paper's plots of BatchNorm ResNets, without changing their running averages. With False they use their
    running averages (eval mode, as at inference of a trained model); at initialisation those are 0 and 1,
    so every BatchNorm is then the identity (times its weight) and the model behaves as if it had none.

    Blocks are found automatically in timm NF models (`NormFreeBlock`; normfree's small family), timm's
    pre-activation ResNets (the small family's BatchNorm twins), timm's and torchvision's ResNets
    (`BasicBlock`, `Bottleneck`) and fastai's xresnet (`ResBlock`); a block inside another is not
    looked for. For any other model pass `blocks`: module names (as in ``model.named_modules()``) and/or
    module types. For a block of a type not listed above, the residual branch is taken to be
    ``output - shortcut``, the shortcut being the block's input or, when the block has a
    ``downsample``/``shortcut``/``skip``/``idpath`` submodule, that submodule's output: exactly the
    branch for blocks computing ``shortcut + f(x)`` with nothing after the addition, but not for blocks
    with an activation after it (their residual_variance then includes that activation's effect); NaN when
    the shapes differ. Such blocks are transitions when their output shape differs from their input's.

    `label` names the result in plots (default: the model's class name). ValueError when no block is
    found (pass `blocks`) or none of them ran.
    """
    families = _families()
    found = _find_blocks(model, blocks, families)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    if x is None:
        shape = tuple(input_shape) if input_shape is not None else _default_input_shape(model)
        _check_batch_shape(shape, "input_shape")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        source = "noise"
    else:
        if input_shape is not None and tuple(input_shape) != tuple(x.shape):
            raise ValueError(f"input_shape {tuple(input_shape)} disagrees with x's shape {tuple(x.shape)}; "
                             f"give one of them")
        _check_batch_shape(tuple(x.shape), "x")
        x = x.to(device)
        source = "batch"
    modes = {module: module.training for module in model.modules()}
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batch_stats else []
    tracking = {module: module.track_running_stats for module in batchnorms}
    recorder = _Recorder(found)
    try:
        model.eval()
        for batchnorm in batchnorms:  # batch statistics, running averages left as they are
            batchnorm.train()
            batchnorm.track_running_stats = False
        with torch.no_grad():
            model(x)
    finally:
        recorder.remove()
        for module, training in modes.items():
            module.training = training
        for batchnorm, track in tracking.items():
            batchnorm.track_running_stats = track
    rows = tuple(BlockStats(index=i, **row) for i, row in enumerate(recorder.rows()))
    if not rows:
        raise ValueError(f"none of the {len(found)} residual blocks ran in the forward pass of "
                         f"{type(model).__name__}; pass blocks= naming modules that do")
    return SignalPropagation(rows, label or type(model).__name__, tuple(x.shape), source)
