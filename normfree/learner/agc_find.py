"""``learn.agc_find()``: AGC's lambda chosen from a short run, as fastai's ``lr_find`` chooses the learning rate.

A unit's gradient clips when ||G_u|| / max(||W_u||, eps) exceeds lambda (Brock et al. 2021, Sec. 4, Eq. 3;
`normfree.agc.rule.gradient_to_weight_ratio`). The finder trains `num_it` optimizer steps at the run's peak learning
rate without clipping, records that ratio for every unit AGC would clip (the same parameters and exclusions as the
attached `AGC` callback, or AGC's defaults) at every step, and suggests the lambda at which `clip_fraction` of those
(unit, step) pairs would clip (`suggest_clipping`). The batch size enters through the gradients' noise (smaller
batches, larger ratios, a larger lambda), the optimizer and the lr through the trajectory the ratios are taken on.

The ratios are read where AGC clips: after mixed precision's grad scaler has unscaled the gradients (a step it skips
is not recorded) and after gradient accumulation has summed the effective batch. With per-sample AGC attached
(``learn.agc(per_sample=True)``) they are each example's: ||g_{i,u}|| / max(||W_u||, eps) for every example i of the
effective batch (of each of its micro-batches) and unit u, taken by the per-sample engines in the backward pass (from
the unscaled per-example gradient) while they clip with lambda infinite, that is not at all. Per-example gradients
carry the noise the batch mean averages out, so their ratios, and the suggestion, are larger than the batch's.

Afterwards the model (parameters, buffers, gradients, and its forwards: the per-sample engines are removed), the
optimizer (state and hyper-parameters), the Recorder's history and the random number generators are as they were,
also when the probe is interrupted: a fit after the finder is the fit without it. Other callbacks attached to the
Learner run during the probe, as with ``lr_find``; validation does not.
"""
from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastcore.basics import patch
from torch import Tensor

from ..agc.per_sample import tuned
from ..agc.rule import (
    DEFAULT_CLIP_FRACTION,
    DEFAULT_FIND_STEPS,
    check_clip_fraction,
    gradient_to_weight_ratio,
    num_units,
    suggest_clipping,
    unit_norms,
    unit_ratios,
)
from ..agc.sharded import sharded_parameter_name
from ..models.classifier import unwrap_model
from ..utils.panels import panel_row
from .callback import AGC

__all__ = ["AGCFindResult", "AGCFinder"]

_RECORDER_LISTS = ("lrs", "iters", "losses", "values")  # what a fit resets in fastai's Recorder


def _recorded_pairs(per_sample: bool) -> str:
    return "(example, unit, step)" if per_sample else "(unit, step)"


@dataclass(frozen=True)
class AGCFindResult:
    """What `Learner.agc_find` measured: `suggestion` (lambda), and per clipped parameter (`names`, its optimizer param
    group in `groups`) the ratios ||G_u|| / max(||W_u||, eps) of its units at each step (`ratios`: [steps, units],
    float32), taken at learning rate `lr` over `steps` optimizer steps. With `per_sample`, each example's ratios
    ||g_{i,u}|| / max(||W_u||, eps): `ratios` [steps, examples, units], the examples of each step's effective batch
    in order (micro-batch after micro-batch)."""

    suggestion: float
    clip_fraction: float
    lr: float | slice
    steps: int
    names: tuple[str, ...]
    groups: tuple[int, ...]
    ratios: tuple[Tensor, ...]
    per_sample: bool = False

    @property
    def pairs(self) -> str:
        """What one recorded ratio belongs to, for messages and plots."""
        return _recorded_pairs(self.per_sample)

    def all_ratios(self) -> Tensor:
        """Every recorded ratio (one per `pairs`), as one flat vector."""
        return torch.cat([r.flatten() for r in self.ratios])

    def fraction_clipped(self, clipping: float) -> float:
        """The share of the recorded finite ratios (`pairs`) above `clipping`: how often AGC with that lambda would
        have clipped on the probe."""
        values = self.all_ratios()
        values = values[values.isfinite()]
        return float((values > clipping).double().mean())

    def layer_groups(self) -> dict[str, Tensor]:
        """The ratios pooled by layer group: a parameter's name up to its first numeric part (``stages.0``), or its
        first part (``stem``, ``head``)."""
        pooled: dict[str, list[Tensor]] = {}
        for name, ratios in zip(self.names, self.ratios):
            parts = name.split(".")
            digit = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
            key = ".".join(parts[: digit + 1]) if digit is not None else parts[0]
            pooled.setdefault(key, []).append(ratios.flatten())
        return {key: torch.cat(values) for key, values in pooled.items()}

    def plot(self, ax: Sequence | None = None, figsize: tuple[float, float] = (11, 3.8)):
        """Two panels: the share of units clipped against lambda (log scale) with the suggestion marked, and the
        ratios' distribution per layer group. `ax`: two matplotlib Axes to draw into. Returns the figure."""
        fig, axes = panel_row(ax, 2, figsize, "clip share, ratios per layer group")
        values = self.all_ratios()
        values = values[values.isfinite() & (values > 0)].double()
        low, high = float(values.min()), float(values.max())
        lambdas = torch.logspace(math.log10(low / 2), math.log10(high * 2), 200, dtype=torch.float64)
        shares = [(values > lam).double().mean().item() for lam in lambdas]
        axes[0].semilogx(lambdas.tolist(), shares)
        axes[0].axvline(self.suggestion, color="C3", linestyle="--",
                        label=f"suggestion {self.suggestion:.3g} ({self.fraction_clipped(self.suggestion):.0%} clip)")
        axes[0].set(xlabel="lambda", ylabel=f"share of {self.pairs} clipped",
                    title=f"AGC find{' (per sample)' if self.per_sample else ''}: {self.steps} steps at lr {self.lr}")
        axes[0].legend()
        axes[0].grid(alpha=0.3)
        groups = self.layer_groups()
        data = [g[g.isfinite() & (g > 0)].numpy() for g in groups.values()]
        axes[1].boxplot(data, showfliers=False)
        axes[1].set_xticks(range(1, len(groups) + 1), list(groups), rotation=45, ha="right", fontsize=8)
        axes[1].set_yscale("log")
        axes[1].axhline(self.suggestion, color="C3", linestyle="--")
        gradient = "g_iu" if self.per_sample else "G_u"
        axes[1].set(ylabel=f"||{gradient}|| / max(||W_u||, eps)", title="ratios per layer group")
        fig.tight_layout()
        return fig


class _PerSampleProbe(AGC):
    """The attached per-sample AGC's twin for the probe: the same parameters and per-example engines, lambda infinite
    (every factor 1: nothing clips), and its rule's per-example unit norms handed to `observer` (`ExampleRule`)."""

    def __init__(self, agc: AGC, observer: Callable[[list[Tensor], list[Tensor]], None]):
        super().__init__(eps=agc.eps, skip_classifier=agc.skip_classifier, exclude=agc.exclude, per_sample=True)
        self.clipping = math.inf  # set past __init__'s check, which refuses it to users: every threshold is inf
        self._observer = observer

    def _start_history(self) -> None:
        super()._start_history()
        self._clipper.rule.observer = self._observer


class AGCFinder(Callback):
    """Records AGC's unit-wise ratios at every optimizer step (where `AGC` would clip, which it does not) and stops
    the fit after `num_it` steps; skips validation. With a per-sample `agc`, each example's ratios, which the
    engines of its twin `probe` (a callback of the fit too) hand over in the backward pass. Used by
    `Learner.agc_find`."""

    order = AGC.order

    def __init__(self, agc: AGC, num_it: int):
        self.agc, self.num_it = agc, num_it
        self.probe = _PerSampleProbe(agc, self._observe) if agc.per_sample else None
        self._examples: dict[int, list[Tensor]] = {}  # per parameter (by id), its per-example ratios since the step

    def before_fit(self) -> None:
        groups = self.agc.clipped_parameters(unwrap_model(self.learn.model), self.learn.opt.param_lists)
        self.params = [(name, g, p) for g, group in enumerate(groups) for name, p in group]
        if not self.params:
            raise ValueError("agc_find: AGC clips no parameter of this model (all frozen or excluded); unfreeze some "
                             "layers or narrow exclude=")
        self.records: list[list[Tensor]] = [[] for _ in self.params]

    @torch.no_grad()
    def _observe(self, params: list[Tensor], norms: list[Tensor]) -> None:
        for p, norm in zip(params, norms):
            ratios = gradient_to_weight_ratio(unit_norms(p.detach()).float(), norm, self.agc.eps)
            self._examples.setdefault(id(p), []).append(ratios)

    def _per_example_ratios(self) -> list[Tensor] | None:
        """This step's [examples, units] per parameter (zeros for a parameter no gradient reached); None if none."""
        seen, self._examples = self._examples, {}
        if not seen:
            return None
        examples = sum(len(r) for r in next(iter(seen.values())))
        return [torch.cat(seen[id(p)]) if id(p) in seen else torch.zeros(examples, num_units(p), device=p.device)
                for _, _, p in self.params]

    @torch.no_grad()
    def before_step(self) -> None:
        step = [unit_ratios(p, self.agc.eps) for _, _, p in self.params] if self.probe is None \
            else self._per_example_ratios()
        # a step of another number of examples (a last, smaller batch) would not stack with the others: not recorded
        if step is None or (self.records[0] and step[0].shape != self.records[0][0].shape):
            return
        for record, ratios in zip(self.records, step):
            record.append(ratios)

    def after_cancel_step(self) -> None:  # the grad scaler skipped the step: its examples are not recorded
        self._examples = {}

    def after_step(self) -> None:
        if len(self.records[0]) >= self.num_it:
            raise CancelFitException()

    def before_validate(self) -> None:
        raise CancelValidException()


@contextmanager
def _state_restored(learn: Learner) -> Iterator[None]:
    """Put back, after the block however it ends, everything a fit changes: the model's parameters, buffers and
    gradients, the optimizer (or its absence), the Recorder's lists and the random number generators (the DataLoaders'
    own too)."""
    model = learn.model
    weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    opt = learn.opt
    opt_state = None if opt is None else copy.deepcopy(opt.state_dict())
    recorder = getattr(learn, "recorder", None)
    recorded = {name: list(getattr(recorder, name)) for name in _RECORDER_LISTS if hasattr(recorder, name)}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, random.getstate(),
           np.random.get_state())
    # fastai's DataLoaders shuffle with a generator of their own, advanced at every epoch
    loaders = [(dl, dl.rng.getstate()) for dl in getattr(learn.dls, "loaders", []) if hasattr(dl, "rng")]
    try:
        yield
    finally:
        model.load_state_dict(weights)
        for p, grad in grads:
            p.grad = grad
        learn.opt = opt
        if opt is not None:
            opt.load_state_dict(opt_state)
        for name, values in recorded.items():
            setattr(recorder, name, values)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        random.setstate(rng[2])
        np.random.set_state(rng[3])
        for dl, state in loaders:
            dl.rng.setstate(state)


def _micro_batches_per_step(learn: Learner) -> int:
    accumulation = next((cb for cb in learn.cbs if isinstance(cb, GradientAccumulation)), None)
    bs = getattr(learn.dls.train, "bs", None) or 1
    return max(1, math.ceil(accumulation.n_acc / bs)) if accumulation is not None else 1


@patch
def agc_find(self: Learner, lr: float | slice | None = None, num_it: int = DEFAULT_FIND_STEPS,
             clip_fraction: float = DEFAULT_CLIP_FRACTION, show_plot: bool = True) -> AGCFindResult:
    """Suggest AGC's lambda for this Learner (see `normfree.learner.agc_find`): `num_it` optimizer steps at `lr`
    (default: ``learn.lr``; give the peak lr of the schedule you will train with, a slice for discriminative lrs)
    with no clipping, recording ||G_u|| / max(||W_u||, eps) of every unit the attached AGC callback (or AGC's
    defaults) would clip; the suggestion clips `clip_fraction` of them (`suggest_clipping`). With per-sample AGC
    attached, each example's ratios ||g_{i,u}|| / max(||W_u||, eps) instead. Model (its forwards too), optimizer,
    Recorder and random state are restored afterwards. With `show_plot`, plots `AGCFindResult.plot`. Then train
    with ``learn.agc(result.suggestion)``."""
    if not isinstance(num_it, int) or isinstance(num_it, bool) or num_it < 1:
        raise ValueError(f"num_it must be a whole number of optimizer steps >= 1, got {num_it!r}")
    check_clip_fraction(clip_fraction)
    attached = [cb for cb in self.cbs if isinstance(cb, AGC)]
    agc = attached[0] if attached else AGC()
    if sharded_parameter_name(self.model) is not None:
        raise ValueError("agc_find does not run on a sharded model (FSDP2's fully_shard, DTensor parameters of tensor "
                         "parallelism): each rank would choose lambda from its own shard; run it on the unsharded "
                         "model in one process and pass its suggestion to every rank")
    lr = self.lr if lr is None else lr
    finder = AGCFinder(agc, num_it)
    n_epoch = math.ceil(num_it * _micro_batches_per_step(self) / max(1, len(self.dls.train))) + 1
    # added outside fit, not as its cbs (which fit drops before an exception reaches `fit_guard`): the per-sample
    # probe removes its engines however the fit ends. tuned: a layer's CUDA graph would replay its per-sample work
    # without handing the norms over
    probing = [finder] if finder.probe is None else [finder, finder.probe]
    with _state_restored(self), self.removed_cbs(attached), self.added_cbs(probing), self.no_logging(), \
            self.no_mbar(), tuned(layer_graphs="off"):
        self.fit(n_epoch, lr)
    steps = len(finder.records[0])
    if steps < num_it:
        warnings.warn(f"agc_find recorded {steps} of num_it={num_it} steps (the data ran out, the grad scaler "
                      f"skipped steps, or per sample, steps had fewer examples); the suggestion rests on those",
                      stacklevel=2)
    ratios = tuple(torch.stack(record).cpu() if record else torch.empty(0) for record in finder.records)
    nonfinite = sum(int((~r.isfinite()).sum()) for r in ratios)
    if nonfinite:
        warnings.warn(f"agc_find: {nonfinite} {_recorded_pairs(agc.per_sample)} ratios were inf/NaN and are left "
                      f"out; the probe's lr {lr} may be too high", stacklevel=2)
    result = AGCFindResult(
        suggestion=suggest_clipping(torch.cat([r.flatten() for r in ratios]), clip_fraction),
        clip_fraction=clip_fraction, lr=lr, steps=steps, names=tuple(name for name, _, _ in finder.params),
        groups=tuple(g for _, g, _ in finder.params), ratios=ratios, per_sample=agc.per_sample)
    if show_plot:
        result.plot()
    return result
