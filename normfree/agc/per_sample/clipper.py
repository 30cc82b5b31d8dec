"""The per-sample clipper: installs the engines on a model's layers, holds lambda per parameter, counts clips.

`PerSampleClipper` replaces the forward of every module that owns trained parameters by the engine
for its kind: `layers` (linear and convolution layers: book-keeping, Bu et al. 2023, and ghost norms,
Li et al. 2022), `containers` (gains of container modules) or `generic` (torch.func). The engines
call back `clip_factors` with per-example unit norms. Also here: the checks that make per-example
gradients meaningful (`check_examples_independent`; `loss_scale.loss_reduction`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..clip import ClipStats, count_per_tensor
from ..rule import DEFAULT_EPS, clip_factor_below, clip_threshold, is_single_unit, num_units, unit_norm_vector
from .containers import container_forward
from .generic import generic_forward
from .graphs import LayerGraphs
from .layers import Layer, layer_forward

__all__ = ["PerSampleClipper", "check_examples_independent"]

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


def _concatenated(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _flat(t: Tensor) -> Tensor:
    """The entries of a 2-d `t` in some order: a view where `t` or its transpose is contiguous."""
    return (t if t.is_contiguous() else t.t()).reshape(-1)


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
        # AGC's thresholds per clipped parameter, [units, 1], and the signal's scale (`grad_scale`), taken once per
        # backward pass (`prepare_backward`) into tensors that stay where they are, so that the layers' CUDA graphs
        # (`graphs.LayerGraphs`) read each pass's values
        self._thresholds: dict[int, Tensor] = {}
        self._threshold_store: dict[tuple, Tensor] = {}
        self._scale: Tensor | None = None
        self._prepared = False
        self.graphs = LayerGraphs(self)
        # (parameter id, factors, norms) of the `clip_factors` calls of the current backward pass, and the counts
        # of earlier passes since `collect` (per clipped parameter, in `_clipped`'s order): counted once per pass
        self._outcomes: list[tuple[int, Tensor, Tensor]] = []
        self._counts: tuple[Tensor, Tensor, list[int]] | None = None  # clipped, non-finite, units
        self._installed: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._called: set[nn.Module] = set()  # installed modules called in the current forward pass
        owners: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            for n, p in own:
                if id(p) in owners:
                    raise ValueError(
                        f"per-sample AGC cannot clip parameters shared by several modules: {owners[id(p)]} is also "
                        f"{name}.{n}; untie them or turn per_sample off"
                    )
                owners[id(p)] = f"{name}.{n}" if name else n
            if own:
                self._install(module, has_children=any(True for c in module.children() for _ in c.parameters()))
                self._names[module] = name or type(module).__name__
        self._clipped = [p for p in model.parameters() if id(p) in clipping]
        self._position = {id(p): i for i, p in enumerate(self._clipped)}
        self._root_hook = model.register_forward_pre_hook(self._new_forward_pass)

    def check_examples_independent(self) -> None:
        """ValueError if one of the model's BatchNorm layers is now in training mode."""
        check_examples_independent(self._batchnorms)

    # -- installation ---------------------------------------------------------------------------
    def _install(self, module: nn.Module, has_children: bool) -> None:
        layer = None if has_children else Layer.of(module)
        if has_children:
            forward = partial(container_forward, self, module)
        elif layer is not None:
            forward = partial(layer_forward, self, layer, module)
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
        self._called.clear()
        self._prepared = False

    def note_call(self, module: nn.Module) -> None:
        """Refuse a layer called twice in one forward pass of the model (weights reused), and remove itself.

        Each call's backward would clip that use's per-example gradient, but an example's gradient
        is the sum over the uses: clipped per use is not clipped per example. (Calling the whole
        model twice before one backward pass is not detected.)
        """
        if module in self._called:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self._names[module]} ({type(module).__name__}) was called twice in one forward "
                "pass, so its weights are reused; per-sample AGC would clip each use separately instead of each "
                "example's summed gradient. Turn per_sample off for this model"
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
        """Once per backward pass, before its first clipping (the engines call it): count the previous passes'
        outcomes, and take this pass's thresholds and signal scale into the tensors `clip_factors` reads."""
        if self._prepared:
            return
        if self.grad_scale is None:
            raise RuntimeError("per-sample AGC: grad_scale was not set before the backward pass")
        self._count_outcomes()
        self._take_thresholds()
        scale = self.grad_scale.detach().float()
        if self._scale is None or self._scale.device != scale.device:
            self._scale = scale.clone()
        else:
            self._scale.copy_(scale)
        self._prepared = True

    @torch.no_grad()
    def _take_thresholds(self) -> None:
        """lambda * max(||W_u||, eps) of every clipped parameter: per device and lambda, one multi-tensor norm of
        the single-unit tensors, one row-wise norm per other tensor, one threshold computation."""
        groups: dict[tuple, list[Tensor]] = {}
        for p in self._clipped:
            groups.setdefault((p.device, self.clipping[id(p)]), []).append(p)
        for key, params in groups.items():
            params = sorted(params, key=lambda p: not is_single_unit(p))  # `_unit_norm_vector` wants singles first
            norms = clip_threshold(unit_norm_vector(params).float(), key[1], self.eps)
            store = self._threshold_store.get(key)
            if store is not None:
                store.copy_(norms)
                continue
            self._threshold_store[key] = norms
            self._thresholds.update(zip(map(id, params),
                                        (t.view(-1, 1) for t in norms.split(list(map(num_units, params))))))

    def clip_factors(self, params: Sequence[Tensor], norms: Sequence[Tensor]) -> list[Tensor | None]:
        """AGC factors of each parameter ([examples, units]) for its per-example unit norms of the backpropagated
        signal ([examples, units]); None for a parameter that is not clipped.

        One evaluation of AGC's rule for all of them (an engine passes all the parameters of a layer), and no
        host synchronisation: the clipped and non-finite units are counted once per backward pass.
        """
        factors: list[Tensor | None] = [None] * len(params)
        clipped = [i for i, p in enumerate(params) if id(p) in self.clipping]
        if not clipped:
            return factors
        self.prepare_backward()
        thresholds, columns = [], []
        for i in clipped:
            threshold, norm = self._thresholds[id(params[i])], norms[i]
            if threshold.shape[0] != norm.shape[1]:  # a layer weight of squeezed rank <= 1 (Linear(1, O)): one unit
                norm = torch.linalg.vector_norm(norm, dim=1, keepdim=True)
            thresholds.append(threshold)
            columns.append(norm.t())
        # units x examples: each parameter's rows are one block, which `_count_outcomes` reads as a flat view
        norm = _concatenated(columns).float() / self._scale
        factor = clip_factor_below(_concatenated(thresholds), norm)
        units = [t.shape[0] for t in thresholds]
        for i, f, n in zip(clipped, factor.split(units), norm.split(units)):
            self._outcomes.append((id(params[i]), f, n))
            factors[i] = f.t().expand(-1, norms[i].shape[1])
        return factors

    def outcomes_of(self, work: Callable[[], T]) -> tuple[T, list[tuple[int, Tensor, Tensor]]]:
        """`work()`, and the outcomes its `clip_factors` calls added, taken out of this pass's list (a layer's CUDA
        graph records them at its capture, and `note_outcomes` adds them again at every replay)."""
        start = len(self._outcomes)
        try:
            result = work()
        finally:  # a capture that fails part-way leaves none of its (never computed) outcomes behind
            added = self._outcomes[start:]
            del self._outcomes[start:]
        return result, added

    def note_outcomes(self, outcomes: list[tuple[int, Tensor, Tensor]]) -> None:
        """Count these (parameter id, factors, norms) with this pass's clipping (a replayed layer's)."""
        self._outcomes.extend(outcomes)

    def _count_outcomes(self) -> None:
        """Add the clipped and non-finite units of the calls so far to the counts, in a few kernels for all
        parameters: the factors and norms of every call concatenated, counted per parameter by one
        multi-tensor reduction each. No host synchronisation."""
        if not self._outcomes:
            return
        calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self._clipped]
        for key, factor, norms in self._outcomes:
            calls[self._position[key]].append((factor, norms))
        self._outcomes = []
        units = [sum(factor.numel() for factor, _ in found) for found in calls]
        factors = torch.cat([_flat(factor) for found in calls for factor, _ in found])
        norms = torch.cat([_flat(norm) for found in calls for _, norm in found])
        clipped = torch.stack(count_per_tensor(factors < 1, units)).long()
        nonfinite = torch.stack(count_per_tensor(norms.isfinite().logical_not_(), units)).long()
        if self._counts is not None:
            clipped, nonfinite = clipped + self._counts[0], nonfinite + self._counts[1]
            units = [a + b for a, b in zip(units, self._counts[2])]
        self._counts = clipped, nonfinite, units

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset.

        In a distributed run they count the examples of all processes: each process clipped only its own.
        """
        self._count_outcomes()
        counts, self._counts = self._counts, None
        if counts is None:
            none = torch.zeros(len(self._clipped), dtype=torch.long)
            counts = none, none, [0] * len(self._clipped)
        elif dist.is_initialized() and dist.get_world_size() > 1:
            counts = _summed_over_processes(*counts)
        clipped, nonfinite = counts[0].unbind(), counts[1].unbind()
        zero = torch.zeros((), dtype=torch.long, device=counts[0].device)
        stats = []
        for params in groups:
            at = [self._position.get(id(p)) for p in params]
            stats.append(ClipStats(
                torch.stack([zero if i is None else clipped[i] for i in at]) if at else zero.new_zeros(0),
                torch.stack([zero if i is None else nonfinite[i] for i in at]) if at else zero.new_zeros(0),
                torch.tensor([0 if i is None else counts[2][i] for i in at], dtype=torch.long),
            ))
        return stats
