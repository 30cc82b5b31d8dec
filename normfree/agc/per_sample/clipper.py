"""The per-sample clipper: installs the engines on a model's layers, holds lambda per parameter, counts clips.

`PerSampleClipper` replaces the forward of every module that owns trained parameters by the engine
for its kind: `layers` (linear and convolution layers: book-keeping, Bu et al. 2023, and ghost norms,
Li et al. 2022), `containers` (gains of container modules) or `generic` (torch.func). The engines
call back `clip_factors` with per-example unit norms. Also here: the checks that make per-example
gradients meaningful (`check_examples_independent`; `loss_scale.loss_reduction`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..clip import ClipStats
from ..rule import DEFAULT_EPS, adaptive_clip_factor, num_units, unitwise_norm
from .containers import container_forward
from .generic import generic_forward
from .layers import Layer, layer_forward

__all__ = ["PerSampleClipper", "check_examples_independent"]

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


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


@dataclass
class _Counts:
    clipped: Tensor
    nonfinite: Tensor
    units: int = 0


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
        self._counts: dict[int, _Counts] = {}
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
    def clip_factors(self, param: Tensor, norms: Tensor) -> Tensor | None:
        """AGC factors (examples x units) for per-example unit norms of the backpropagated signal; None: not clipped."""
        clipping = self.clipping.get(id(param))
        if clipping is None:
            return None
        if self.grad_scale is None:
            raise RuntimeError("per-sample AGC: grad_scale was not set before the backward pass")
        norms = norms.float() / self.grad_scale
        rows = norms.shape[1]
        if num_units(param) != rows:  # a layer weight of squeezed rank <= 1 (Linear(1, O)): one unit, DeepMind's rule
            norms = torch.linalg.vector_norm(norms, dim=1, keepdim=True)
        factor = adaptive_clip_factor(unitwise_norm(param.detach()).reshape(1, -1).float(), norms, clipping, self.eps)
        clipped, nonfinite = (factor < 1).sum(), norms.isfinite().logical_not_().sum()  # on the device: no sync
        counts = self._counts.get(id(param))
        if counts is None:
            self._counts[id(param)] = _Counts(clipped, nonfinite, factor.numel())
        else:
            counts.clipped, counts.nonfinite = counts.clipped + clipped, counts.nonfinite + nonfinite
            counts.units += factor.numel()
        return factor.expand(-1, rows)

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset."""
        stats = []
        for params in groups:
            counts = [self._counts.get(id(p)) for p in params]
            device = next((c.clipped.device for c in counts if c is not None), torch.device("cpu"))
            zero = torch.zeros((), device=device)
            stats.append(ClipStats(
                torch.stack([c.clipped if c else zero for c in counts]) if counts else zero.new_zeros(0),
                torch.stack([c.nonfinite if c else zero for c in counts]) if counts else zero.new_zeros(0),
                torch.tensor([c.units if c else 0 for c in counts], dtype=torch.long),
            ))
        self._counts = {}
        return stats
