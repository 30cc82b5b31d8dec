"""Per-sample AGC for any training loop: `per_sample_agc(model, loss_func, ...)`, no fastai.

The step then applies (1/N) sum_i clip(g_i) over the N examples of the batch (of all its micro-batches under
gradient accumulation), with the exclusions and the statistics of the fastai callback's per-sample mode
(`normfree.AGC(per_sample=True)`)::

    with normfree.agc.per_sample_agc(model, F.cross_entropy, clipping=0.01) as agc:
        for x, y in loader:
            loss = agc.loss(model(x), y)  # the loss function's value; its backward pass clips each example
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clipped = agc.stats().fraction

The loss goes through `PerSampleAGC.loss` so that, as in the callback, what multiplies each example's gradient
is read off the backward pass (`loss_scale.LossGradScale`): the loss function's reduction ("mean" or "sum",
checked on the first batch), a division for gradient accumulation, a `torch.amp.GradScaler`'s scale. A
backward pass of a loss computed otherwise raises RuntimeError.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ...models.classifier import unwrap_model
from ..clip import ClipStats
from ..exclusion import Exclusion, SkipClassifier, as_exclusions, clipped_parameters
from ..rule import DEFAULT_CLIPPING, DEFAULT_EPS, check_agc_arguments
from .clipper import PerSampleClipper, engines
from .loss_scale import LossGradScale

__all__ = ["PerSampleAGC", "per_sample_agc"]


class PerSampleAGC:
    """Per-sample AGC installed on a model, until `remove()` (or the end of a ``with`` block); see `per_sample_agc`.

    `parameter_names` are the clipped parameters, in the order of `stats()`'s entries.
    """

    def __init__(self, model: nn.Module, loss_func: Callable[..., Tensor], clipping: float = DEFAULT_CLIPPING,
                 eps: float = DEFAULT_EPS, skip_classifier: SkipClassifier = "weight",
                 exclude: Exclusion | Iterable[Exclusion] | None = ()):
        if not callable(loss_func):
            raise TypeError(f"loss_func must be the loss function, called as loss_func(pred, *targets) (e.g. "
                            f"F.cross_entropy), got {type(loss_func).__name__}")
        clipping, eps = check_agc_arguments(clipping, eps)
        model = unwrap_model(model)
        patched = [name or type(m).__name__ for name, m, _ in engines(model) if "forward" in m.__dict__]
        if patched:
            raise ValueError(f"per-sample AGC: the forward of {patched[0]} is replaced already (per-sample AGC "
                             "installed before and not removed?); call remove() on the first one, or use a fresh model")
        trained = [[p for p in model.parameters()]]
        named = clipped_parameters(model, trained, skip_classifier, as_exclusions(exclude))[0]
        self.parameter_names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self._loss_func = loss_func
        self._clipper = PerSampleClipper(model, {id(p): clipping for p in self._params}, eps)
        self._loss_scale = LossGradScale(self._clipper)
        self._pass_hook = model.register_forward_pre_hook(self._before_forward)
        self._clipper.start()

    def _before_forward(self, model: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self._clipper.check_examples_independent()  # a model can be switched to training mode at any time
            self._clipper.grad_scale = None  # set by this pass's `loss`: a loss computed otherwise cannot clip

    def loss(self, pred: Tensor, *targets: Tensor) -> Tensor:
        """`loss_func(pred, *targets)`, whose backward pass clips each example's gradient (scale it, divide it for
        gradient accumulation, as usual)."""
        if pred.requires_grad:
            self._loss_scale.watch(self._loss_func, pred, targets)
        return self._loss_func(pred, *targets)

    def stats(self) -> ClipStats:
        """What was clipped since the last call, per parameter of `parameter_names`, counting (example, unit) pairs
        (in a distributed run, the examples of all processes): clipped, non-finite (left unchanged), and seen."""
        return self._clipper.collect([self._params])[0]

    def remove(self) -> None:
        """Restore the model: its modules' own forwards, no hooks left."""
        self._clipper.remove()
        self._pass_hook.remove()

    def __enter__(self) -> PerSampleAGC:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def per_sample_agc(model: nn.Module, loss_func: Callable[..., Tensor], clipping: float = DEFAULT_CLIPPING,
                   eps: float = DEFAULT_EPS, skip_classifier: SkipClassifier = "weight",
                   exclude: Exclusion | Iterable[Exclusion] | None = ()) -> PerSampleAGC:
    """Clip each example's gradient before the batch mean, in any training loop (Brock et al. 2021, Sec. 4).

    Compute the loss as ``agc.loss(model(x), y)`` (`loss_func`'s value, a mean or a sum of per-example terms) and
    call ``backward()`` on it, scaled or divided as the loop needs: the step's gradient is then (1/N) sum_i clip(g_i)
    over the N examples that went into it (a sum loss: the sum). `clipping` is lambda; `eps` the weight-norm
    floor; `skip_classifier` and `exclude` leave parameters alone as the fastai callback does (the classifier's
    weight by default; name patterns, modules or predicates ``f(name, param)``), and so do ``requires_grad=False``.
    Excluded parameters get their ordinary gradient. The model must hold its examples independent (no BatchNorm in
    training mode) and its modules must be ones per-sample AGC can clip (`normfree.agc.per_sample`); both are
    checked now, BatchNorm again before every forward pass with gradients. Returns the `PerSampleAGC` handle:
    `stats()`, `remove()`, a context manager.
    """
    return PerSampleAGC(model, loss_func, clipping, eps, skip_classifier, exclude)
