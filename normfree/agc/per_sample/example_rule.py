"""AGC's rule for per-example gradients: lambda per parameter, the thresholds, and the factors of each example's units.

The engines hand `ExampleRule.factors` the per-example unit norms of the signal that reaches a layer; the rule
divides out what the loss multiplied each example's gradient by (`grad_scale`, see `loss_scale`), evaluates Eq. (3)
of Brock et al. 2021 against thresholds taken from the parameters as they are now, and adds what it clipped to the
`ClipTally`. Nothing is left for the host once per pass, so a layer's CUDA graph (`graphs`) replays all of it: the
signal's scale is read from a tensor that stays where it is, rewritten once per backward pass (`prepare_backward`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..rule import DEFAULT_EPS, clip_factor_below, clip_threshold, num_units, unit_norms
from .tally import ClipTally

__all__ = ["ExampleRule"]


def _concatenated(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


class ExampleRule:
    """AGC on per-example gradients: `clipping` maps the clipped parameters (by id) to lambda; `tally` counts.

    `grad_scale` is set by the caller before each backward pass: d(loss as backpropagated) / d(one example's
    loss term), e.g. loss-scale / batch-size for a mean loss under a grad scaler.

    `observer`, where set, is called at every evaluation with the clipped parameters and their per-example unit
    gradient norms ([examples, units] each: each example's own gradient, as the rule compares them with lambda);
    ``learn.agc_find()`` records them. A layer's CUDA graph does not call it when it replays: turn graphs off.
    """

    def __init__(self, clipping: dict[int, float], tally: ClipTally, eps: float = DEFAULT_EPS):
        self.clipping, self.eps, self.tally = clipping, eps, tally
        self.grad_scale: Tensor | None = None
        self.observer: Callable[[list[Tensor], list[Tensor]], None] | None = None
        # `grad_scale`, taken once per backward pass (`prepare_backward`) into a tensor that stays where it is, so
        # that the layers' CUDA graphs read each pass's value
        self._scale: Tensor | None = None
        self._prepared = False

    def clips(self, param: Tensor) -> bool:
        return id(param) in self.clipping

    def new_forward_pass(self) -> None:
        """The model runs a new forward pass: its backward pass takes `grad_scale` anew."""
        self._prepared = False

    def prepare_backward(self) -> None:
        """Once per backward pass, before its first clipping (the engines call it): take this pass's signal scale
        (`grad_scale`) into the tensor `factors` reads, which stays where it is for the layers' CUDA graphs."""
        if self._prepared:
            return
        if self.grad_scale is None:
            raise RuntimeError("per-sample AGC: grad_scale was not set before the backward pass (with per_sample_agc, "
                               "compute the loss as agc.loss(pred, *targets) so that its backward pass can clip)")
        scale = self.grad_scale.detach().float()
        if self._scale is None or self._scale.device != scale.device:
            self._scale = scale.clone()
        else:
            self._scale.copy_(scale)
        self._prepared = True

    def factors(self, params: Sequence[Tensor], norms: Sequence[Tensor]) -> list[Tensor | None]:
        """AGC factors of each parameter ([examples, units]) for its per-example unit norms of the backpropagated
        signal ([examples, units]); None for a parameter that is not clipped.

        One evaluation of AGC's rule for all of them (an engine passes all the parameters of a layer), against
        thresholds taken from the parameters as they are now, and the clipped and non-finite units tallied on
        the device: no host synchronisation, and nothing left to do once per pass (in a layer's CUDA graph, all
        of it replays).
        """
        factors: list[Tensor | None] = [None] * len(params)
        clipped = [i for i, p in enumerate(params) if self.clips(p)]
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
        factor = clip_factor_below(self.thresholds([params[i] for i in clipped]), norm)
        units = [c.shape[0] for c in columns]
        if self.observer is not None:
            self.observer([params[i] for i in clipped], [n.t() for n in norm.split(units)])
        self.tally.add([params[i] for i in clipped], factor, norm, units)
        for i, f in zip(clipped, factor.split(units)):
            factors[i] = f.t().expand(-1, norms[i].shape[1])
        return factors

    @torch.no_grad()  # the generic engine clips with gradients enabled
    def thresholds(self, params: list[Tensor]) -> Tensor:
        """lambda * max(||W_u||, eps) of the units of `params`, as one column (float32)."""
        lambdas = {self.clipping[id(p)] for p in params}
        if len(lambdas) == 1:
            norms = _concatenated([unit_norms(p).float() for p in params])
            return clip_threshold(norms, lambdas.pop(), self.eps).unsqueeze(1)
        return _concatenated([clip_threshold(unit_norms(p).float(), self.clipping[id(p)], self.eps)
                              for p in params]).unsqueeze(1)
