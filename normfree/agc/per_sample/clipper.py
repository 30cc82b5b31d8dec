"""The per-sample clipper: installs the engines on a model's layers, holds lambda per parameter, counts clips.

`PerSampleClipper` replaces the forward of every module that owns trained parameters by the engine
for its kind (`engines`): `layers` (linear and convolution layers: book-keeping, Bu et al. 2023, and ghost
norms, Li et al. 2022), `containers` (scalar gains of container modules) or `generic` (torch.func, for
everything else: Embedding, LayerNorm, layer scales, nn.MultiheadAttention, a module that uses its own
parameters in forward, such as timm's VisionTransformer with its cls_token and pos_embed, taken whole). The
engines call back `clip_factors` with per-example unit norms. Also here: the checks that make per-example
gradients meaningful (`check_examples_independent`; `loss_scale.loss_reduction`), and
`check_supported_modules`, which refuses, before anything is trained, the modules no engine can take:
recurrent layers (nn.RNN, nn.GRU, nn.LSTM) and randomness (dropout) inside a module the generic engine takes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip import ClipStats
from ..rule import DEFAULT_EPS, clip_factor_below, clip_threshold, num_units, unit_norms
from ..sharded import sharded_parameter_name
from .containers import container_forward
from .generic import generic_forward, random_modules
from .graphs import LayerGraphs
from .layers import Layer, layer_forward

__all__ = ["PerSampleClipper", "check_examples_independent", "check_supported_modules", "engines"]

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
T = TypeVar("T")


def check_examples_independent(batchnorms: nn.Module | list[tuple[str, nn.Module]]) -> None:
    """ValueError if a BatchNorm layer is in training mode: it couples the examples of a batch.

    Takes a model, or the (name, module) BatchNorm layers of one, listed once (`PerSampleClipper`
    checks before every training batch, since a model can be switched to training mode at any time).
    """
    if isinstance(batchnorms, nn.Module):
        batchnorms = [(n, m) for n, m in batchnorms.named_modules() if isinstance(m, _BATCHNORMS)]
    names = [name for name, module in batchnorms if module.training]
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ValueError(
        f"per-sample AGC needs examples that do not interact, but the model has BatchNorm layers in training mode "
        f"({shown}): BatchNorm couples the examples of a batch, so per-example gradients do not exist. Use a "
        "normalizer-free model (normfree.nf_learner with e.g. 'nf_resnet26' or 'nf_resnet_small'), or turn "
        "per_sample off"
    )


def _engine_of(module: nn.Module) -> str | None:
    """Which engine takes `module`'s own trained parameters: "layers", "containers", "generic", or None (it has none).

    A module whose children have parameters keeps its own fast only when they are scalar gains, which act
    elementwise on a batch (`containers`); any other parameter of its own may be used in any way (a cls_token
    concatenated, a vector reshaped), so the generic engine takes the module whole.
    """
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if not any(True for child in module.children() for _ in child.parameters()):
        return "layers" if Layer.of(module) is not None else "generic"
    return "containers" if all(p.numel() == 1 for p in own) else "generic"


def _below(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def engines(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, engine) of each module of `model` that per-sample AGC installs an engine on, top down
    (`_engine_of`); the modules below one that the generic engine takes whole are part of it."""
    found, whole = [], []
    for name, module in model.named_modules():
        engine = None if any(_below(name, w) for w in whole) else _engine_of(module)
        if engine is not None:
            found.append((name, module, engine))
            if engine == "generic":
                whole.append(name)
    return found


def _qualified(*names: str) -> str:
    return ".".join(n for n in names if n) or "the model"


def check_supported_modules(model: nn.Module) -> None:
    """ValueError naming the first module of `model` that per-sample AGC cannot clip, why, and what to do.

    - Recurrent layers (nn.RNN, nn.GRU, nn.LSTM): only the generic engine could take them, and torch.func
      cannot take their per-example gradients (its vmap fails on nn.RNN and nn.GRU and runs nn.LSTM one
      example at a time on the CPU).
    - A module that draws random numbers (dropout, drop-path with a rate above 0) inside one that the
      generic engine takes: its backward pass runs the forward pass again, with new masks.
    - Sharded parameters (DTensors: FSDP2's fully_shard, tensor parallelism): the engines take whole weights.
    """
    sharded = sharded_parameter_name(model)
    if sharded is not None:
        raise ValueError(f"per-sample AGC cannot clip sharded parameters ({sharded} is sharded: FSDP2's fully_shard "
                         "or tensor parallelism): train with DistributedDataParallel, or turn per_sample off (ordinary "
                         "AGC clips sharded models)")
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            raise ValueError(
                f"per-sample AGC cannot clip {_qualified(name)} ({type(module).__name__}): torch.func cannot take "
                "per-example gradients of PyTorch's recurrent layers (nn.RNN, nn.GRU, nn.LSTM). Turn per_sample off "
                "(ordinary AGC clips the batch's gradient)"
            )
    for name, module, engine in engines(model):
        random = random_modules(module) if engine == "generic" else []
        if random:
            inner, drawer = random[0]
            raise ValueError(
                f"per-sample AGC takes {_qualified(name)} ({type(module).__name__}) through torch.func, which runs "
                f"its forward pass again per example in the backward pass, but {_qualified(name, inner)} "
                f"({type(drawer).__name__}) draws random masks there, so they would differ from the forward pass's. "
                "Set its rate to 0, or turn per_sample off"
            )


def _concatenated(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _summed_over_processes(clipped: Tensor, nonfinite: Tensor, units: list[int]) -> tuple[Tensor, Tensor, list[int]]:
    """Clip counts of all processes of a distributed run, summed on the device (no host synchronisation). Every
    process clipped the same number of examples (data-parallel shards are equal), so the units scale by the count."""
    for counts in (clipped, nonfinite):  # fresh tensors of this collect: reduced in place
        dist.all_reduce(counts)
    return clipped, nonfinite, [u * dist.get_world_size() for u in units]


class PerSampleClipper:
    """Installs per-sample AGC on the layers of `model`; `clipping` maps parameters to lambda.

    Parameters missing from `clipping` (the excluded classifier weight, parameters the optimizer
    does not train) get their ordinary summed gradient. While gradients
    are enabled (between `start()` and `stop()`), the model's layers compute clipped per-example sums in their backward pass; the
    per-example gradient of a layer output is the signal reaching it divided by `grad_scale`,
    which the caller sets (before the backward pass) to d(loss as backpropagated) / d(one example's
    loss term): e.g. loss-scale / batch-size for a mean loss under a grad scaler.
    """

    def __init__(self, model: nn.Module, clipping: dict[int, float], eps: float = DEFAULT_EPS):
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
        self.check_examples_independent()
        self.clipping, self.eps = clipping, eps
        self.grad_scale: Tensor | None = None
        self._active = False
        self._bypass = 0
        # the signal's scale (`grad_scale`), taken once per backward pass (`prepare_backward`) into a tensor that
        # stays where it is, so that the layers' CUDA graphs (`graphs.LayerGraphs`) read each pass's value
        self._scale: Tensor | None = None
        self._prepared = False
        self.graphs = LayerGraphs(self)
        self._installed: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._called: set[nn.Module] = set()  # installed modules called in the current forward pass
        self._examples: int | None = None  # the examples of the current forward pass: dim 0 of the model's input
        check_supported_modules(model)
        owners: dict[int, str] = {}
        for name, module in model.named_modules():
            for n, p in [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]:
                if id(p) in owners:
                    raise ValueError(
                        f"per-sample AGC cannot clip parameters shared by several modules: {owners[id(p)]} is also "
                        f"{name}.{n}; untie them or turn per_sample off"
                    )
                owners[id(p)] = f"{name}.{n}" if name else n
        for name, module, engine in engines(model):
            self._install(module, engine)
            self._names[module] = name or type(module).__name__
        self._clipped = [p for p in model.parameters() if id(p) in clipping]
        self._position = {id(p): i for i, p in enumerate(self._clipped)}
        # Since `collect`, per clipped parameter (in `_clipped`'s order): its units' clipped and non-finite
        # (example, unit) pairs, rows of [2, all units] on the device (parameter i's columns start at
        # `_tally_offsets[i]`), made at the first clipping and added to in place; and the (example, unit) pairs seen
        self._tally_offsets = [0]
        for p in self._clipped:
            self._tally_offsets.append(self._tally_offsets[-1] + num_units(p))
        self._tally_buffer: Tensor | None = None
        self._tally_ends: Tensor | None = None  # `_tally_offsets` on the tally's device
        self._units = [0] * len(self._clipped)
        self._root_hook = model.register_forward_pre_hook(self._new_forward_pass)

    def check_examples_independent(self) -> None:
        """ValueError if one of the model's BatchNorm layers is now in training mode."""
        check_examples_independent(self._batchnorms)

    # -- installation ---------------------------------------------------------------------------
    def _install(self, module: nn.Module, engine: str) -> None:
        if engine == "layers":
            forward = partial(layer_forward, self, Layer.of(module), module)
        elif engine == "containers":
            forward = partial(container_forward, self, module)
        else:
            forward = partial(generic_forward, self, module)
        module.forward = forward  # instance attribute: shadows the class's forward
        self._installed.append(module)

    def remove(self) -> None:
        """Restore every layer's own forward."""
        for module in self._installed:
            module.__dict__.pop("forward", None)
        self._installed = []
        self._root_hook.remove()

    def _new_forward_pass(self, model: nn.Module, args: tuple) -> None:
        if self._bypass:  # the generic engine running the model's forward again, per example, in its backward pass
            return
        self._called.clear()
        self._prepared = False
        self._examples = next((a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0), None)

    def note_call(self, module: nn.Module, examples: int) -> None:
        """Refuse, and remove itself, where a layer is called twice in one forward pass of the model (weights reused),
        or on a tensor whose dim 0 (`examples`) is not the model input's (examples merged with positions, or
        sequence-first).

        Each call's backward would clip that use's per-example gradient, but an example's gradient
        is the sum over the uses: clipped per use is not clipped per example. (Calling the whole
        model twice before one backward pass is not detected.) The engines take dim 0 of a layer's input for the
        examples: any other rows would be clipped one by one, as if they were examples.
        """
        if module in self._called:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self._names[module]} ({type(module).__name__}) was called twice in one forward "
                "pass, so its weights are reused; per-sample AGC would clip each use separately instead of each "
                "example's summed gradient. Turn per_sample off for this model"
            )
        if self._examples is not None and examples != self._examples:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self._names[module]} ({type(module).__name__}) was called on {examples} rows "
                f"(dim 0 of its input), but the model's input holds {self._examples} examples; per-sample AGC clips "
                "each row of a layer's input as one example, so every layer must hold the examples along dim 0 (not "
                "sequence-first, not merged with positions). Turn per_sample off for this model"
            )
        self._called.add(module)

    def start(self) -> None:
        """From now on, forward passes with gradients enabled clip per example in their backward pass."""
        self._active = True

    def stop(self) -> None:
        self._active = False

    def recording(self) -> bool:
        return self._active and not self._bypass and torch.is_grad_enabled()

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    # -- clipping -------------------------------------------------------------------------------
    def prepare_backward(self) -> None:
        """Once per backward pass, before its first clipping (the engines call it): take this pass's signal scale
        (`grad_scale`) into the tensor `clip_factors` reads, which stays where it is for the layers' CUDA graphs."""
        if self._prepared:
            return
        if self.grad_scale is None:
            raise RuntimeError("per-sample AGC: grad_scale was not set before the backward pass")
        scale = self.grad_scale.detach().float()
        if self._scale is None or self._scale.device != scale.device:
            self._scale = scale.clone()
        else:
            self._scale.copy_(scale)
        self._prepared = True

    def clip_factors(self, params: Sequence[Tensor], norms: Sequence[Tensor]) -> list[Tensor | None]:
        """AGC factors of each parameter ([examples, units]) for its per-example unit norms of the backpropagated
        signal ([examples, units]); None for a parameter that is not clipped.

        One evaluation of AGC's rule for all of them (an engine passes all the parameters of a layer), against
        thresholds taken from the parameters as they are now, and the clipped and non-finite units tallied on
        the device: no host synchronisation, and nothing left to do once per pass (in a layer's CUDA graph, all
        of it replays).
        """
        factors: list[Tensor | None] = [None] * len(params)
        clipped = [i for i, p in enumerate(params) if id(p) in self.clipping]
        if not clipped:
            return factors
        self.prepare_backward()
        columns = []
        for i in clipped:
            norm = norms[i]
            if num_units(params[i]) != norm.shape[1]:  # a layer weight of squeezed rank <= 1 (Linear(1, O)): one unit
                norm = torch.linalg.vector_norm(norm, dim=1, keepdim=True)
            columns.append(norm.t())
        # units x examples: each parameter's rows are one block
        norm = _concatenated(columns).float() / self._scale
        factor = clip_factor_below(self._thresholds([params[i] for i in clipped]), norm)
        units = [c.shape[0] for c in columns]
        self._tally([params[i] for i in clipped], factor, norm, units)
        for i, f in zip(clipped, factor.split(units)):
            factors[i] = f.t().expand(-1, norms[i].shape[1])
        return factors

    @torch.no_grad()  # the generic engine clips with gradients enabled
    def _thresholds(self, params: list[Tensor]) -> Tensor:
        """lambda * max(||W_u||, eps) of the units of `params`, as one column (float32)."""
        lambdas = {self.clipping[id(p)] for p in params}
        if len(lambdas) == 1:
            norms = _concatenated([unit_norms(p).float() for p in params])
            return clip_threshold(norms, lambdas.pop(), self.eps).unsqueeze(1)
        return _concatenated([clip_threshold(unit_norms(p).float(), self.clipping[id(p)], self.eps)
                              for p in params]).unsqueeze(1)

    def _tally(self, params: list[Tensor], factor: Tensor, norm: Tensor, units: list[int]) -> None:
        """Add the clipped and the non-finite (example, unit) pairs of one `clip_factors` call to the running
        per-unit tally, in place (a layer's CUDA graph adds its pass's at every replay), and its (example, unit)
        pairs to those seen (Python ints: a replayed graph notes them again, see `units_of`)."""
        if self._tally_buffer is None or self._tally_buffer.device != factor.device:
            if factor.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("per-sample AGC: run one backward pass before capturing one in a CUDA graph (the "
                                   "first makes the clip tally, which a graph would otherwise re-create at each replay)")
            total = self._tally_offsets[-1]
            self._tally_buffer = torch.zeros(2, total, dtype=torch.long, device=factor.device) \
                if self._tally_buffer is None else self._tally_buffer.to(factor.device)
            self._tally_ends = torch.tensor(self._tally_offsets, device=factor.device)
        # norms are >= 0: not below inf is inf or NaN (isfinite is four kernels)
        marks = torch.stack([factor < 1, (norm < math.inf).logical_not_()]).sum(-1)  # [2, units]
        positions = [self._position[id(p)] for p in params]
        torch._foreach_add_([self._tally_buffer[:, self._tally_offsets[i] : self._tally_offsets[i + 1]]
                             for i in positions], list(marks.split(units, dim=1)))
        for i, u in zip(positions, units):
            self._units[i] += u * factor.shape[1]

    def units_of(self, work: Callable[[], T]) -> tuple[T, list[tuple[int, int]]]:
        """`work()`, and the (parameter position, units) its `clip_factors` calls added to the units seen, taken
        back out (a layer's CUDA graph records them at its capture, and `note_units` adds them at every replay)."""
        before = list(self._units)
        try:
            result = work()
        finally:  # a capture that fails part-way leaves none of its units behind
            after, self._units = self._units, before
        return result, [(i, b - a) for i, (a, b) in enumerate(zip(before, after)) if b != a]

    @contextmanager
    def tally_restored(self) -> Iterator[None]:
        """Within the block, `clip_factors` calls leave the clip tally as it was (an emulated CUDA graph capture:
        a capture records kernels and executes none)."""
        saved = None if self._tally_buffer is None else self._tally_buffer.clone()
        try:
            yield
        finally:
            if saved is not None:
                self._tally_buffer.copy_(saved)

    def note_units(self, added: list[tuple[int, int]]) -> None:
        """Count these (parameter position, units) as seen (a replayed layer's)."""
        for i, n in added:
            self._units[i] += n

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset.

        In a distributed run they count the examples of all processes: each process clipped only its own.
        """
        n = len(self._clipped)
        units, self._units = self._units, [0] * n
        if self._tally_buffer is None:
            clipped = nonfinite = torch.zeros(n, dtype=torch.long)
        else:
            # per parameter, the sum of its units' tallies: differences of the running sum at its offsets
            running = F.pad(self._tally_buffer.cumsum(1), (1, 0))
            clipped, nonfinite = running.index_select(1, self._tally_ends).diff(dim=1)
            self._tally_buffer.zero_()  # in place: the layers' CUDA graphs add to it
            if dist.is_initialized() and dist.get_world_size() > 1:
                clipped, nonfinite, units = _summed_over_processes(clipped, nonfinite, units)
        clipped, nonfinite = clipped.unbind(), nonfinite.unbind()
        zero = torch.zeros((), dtype=torch.long, device=clipped[0].device if clipped else "cpu")
        stats = []
        for params in groups:
            at = [self._position.get(id(p)) for p in params]
            stats.append(ClipStats(
                torch.stack([zero if i is None else clipped[i] for i in at]) if at else zero.new_zeros(0),
                torch.stack([zero if i is None else nonfinite[i] for i in at]) if at else zero.new_zeros(0),
                torch.tensor([0 if i is None else units[i] for i in at], dtype=torch.long),
            ))
        return stats
