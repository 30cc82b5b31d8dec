"""AGC for any PyTorch training loop: `agc_hook` clips inside ``optimizer.step()``, once per step, with the fastai
callback's exclusion rules and statistics; `OptimizerAGC` is the same clipping for trainers that call it from their own
hook before the step (`normfree.integrations`).

Where a step pre-hook runs, and why it is the right place under mixed precision: ``scaler.step(optimizer)``
(`torch.amp.GradScaler`) first unscales the optimizer's gradients (unless ``scaler.unscale_(optimizer)`` did already)
and checks them for inf/NaN, then calls ``optimizer.step()`` only if they are finite. A pre-hook on the torch optimizer
runs inside that call: it sees unscaled gradients, and a step the scaler skips never reaches it. An optimizer that
unscales inside its own step (``fused=True``: ``_step_supports_amp_scaling``) is called even on a step it will skip,
with the gradients still scaled unless ``scaler.unscale_`` was called; GradScaler then sets ``optimizer.grad_scale``
(the factor still in the gradients, or None) and ``optimizer.found_inf`` for that call, and the hook reads both (one
host synchronisation per step, as GradScaler's own step for other optimizers has).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from ..models.classifier import find_classifier, unwrap_model
from .clip import ClipStats, adaptive_clip_grad_
from .exclusion import Exclusion, SkipClassifier, as_exclusions, check_skip_classifier, clipped_parameters
from .history import ClipHistory
from .rule import DEFAULT_CLIPPING, DEFAULT_EPS, check_agc_arguments

__all__ = ["AGCHook", "OptimizerAGC", "agc_hook", "check_clippings", "clipping_per_group",
           "innermost_optimizer", "unscale_for_step", "warn_if_no_classifier"]


def check_clippings(clipping: float | Sequence[float], eps: float) -> tuple[float | list[float], float]:
    """(`clipping`, `eps`) checked (`check_agc_arguments`): `clipping` one number (a Python or numpy scalar, a
    one-element tensor) or a sequence of them, one per optimizer param group, returned as floats."""
    clippings: list[object]  # checked below
    if isinstance(clipping, Iterable) and not isinstance(clipping, (str, bytes, Tensor)):
        per_group, clippings = True, list(clipping)
    else:
        per_group, clippings = False, [clipping]
    if not clippings:
        raise ValueError("clipping must be a number > 0 or one number per param group, got an empty sequence")
    checked = [check_agc_arguments(value, eps) for value in clippings]
    return ([c for c, _ in checked] if per_group else checked[0][0]), checked[0][1]


def clipping_per_group(clipping: float | list[float], n_groups: int) -> list[float]:
    """One lambda per param group from `check_clippings`' `clipping`; ValueError if a list has another length."""
    if isinstance(clipping, (int, float)):
        return [float(clipping)] * n_groups
    if len(clipping) != n_groups:
        raise ValueError(f"clipping has {len(clipping)} values but the optimizer has {n_groups} param groups: "
                         "give one number, or one per param group")
    return [float(c) for c in clipping]


def warn_if_no_classifier(model: nn.Module, skip_classifier: SkipClassifier, stacklevel: int) -> None:
    """Warn when `skip_classifier` asks to leave the classifier alone and `model` has none to find."""
    if skip_classifier is not None and find_classifier(unwrap_model(model)) is None:
        warnings.warn("AGC found no final classifier (no get_classifier(), no nn.Linear), so it clips every "
                      "parameter; name the classifier with exclude=[...] or pass skip_classifier=None",
                      stacklevel=stacklevel + 1)


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's `AcceleratedOptimizer`,
    whose step calls GradScaler on the inner one); TypeError for anything that is not an optimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or accelerate's prepared optimizer), got "
                        f"{type(optimizer).__name__}")
    return optimizer


def unscale_for_step(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale `optimizer`'s gradients with `scaler` unless that was done already this step, and say whether
    ``scaler.step(optimizer)`` will apply the step (False: a gradient is inf or NaN, the scaler skips it).

    For trainers whose hook before the step runs whether or not the scaler then skips it (Lightning's
    ``on_before_optimizer_step``, the Hugging Face Trainer's ``on_pre_optimizer_step``); True at once without a
    scaler or with a disabled one. It reads GradScaler's per-optimizer state (``_per_optimizer_states``: whether
    this step's gradients were unscaled, and the inf/NaN flag of each device), which torch keeps private; reading
    the flag waits for the device, as ``scaler.step`` does right after.
    """
    if scaler is None or not scaler.is_enabled():
        return True
    try:
        state = scaler._per_optimizer_states[id(optimizer)]  # a defaultdict: READY until unscale_ or step
        unscaled = state["stage"] is not OptState.READY
    except (AttributeError, KeyError, TypeError) as error:
        raise RuntimeError(f"normfree cannot read {type(scaler).__name__}'s per-optimizer state in torch "
                           f"{torch.__version__} ({error!r}): clip with normfree.agc_hook(optimizer, model) "
                           f"instead") from error
    if not unscaled:  # the trainer leaves it to the step (fused optimizers unscale inside theirs)
        scaler.unscale_(optimizer)
    return not any(bool(found) for found in state["found_inf_per_device"].values())


class OptimizerAGC:
    """Adaptive Gradient Clipping of the parameters a torch optimizer trains, one `clip()` per optimizer step.

    The rules are the fastai `AGC` callback's: each param group's parameters that require a gradient are clipped,
    less `skip_classifier`'s part of the final classifier ("weight", DeepMind's rule, the default;
    "weight_and_bias", timm's; None) and the `exclude` patterns, modules or predicates (a pattern or module that
    matches nothing is a ValueError now). `clipping` is lambda, one number or one per param group; `eps` floors the
    weight norm. Finding the classifier and resolving names needs `model`; without it, pass ``skip_classifier=None``
    (clip every parameter). The parameters are those of the optimizer's param groups now: make a new one after
    ``add_param_group``.

    `history` is a `ClipHistory`: the units clipped per parameter at each `clip()`, kept on the device.
    """

    def __init__(self, optimizer, model: nn.Module | None = None, clipping: float | Sequence[float] = DEFAULT_CLIPPING,
                 eps: float = DEFAULT_EPS, skip_classifier: SkipClassifier = "weight",
                 exclude: Exclusion | Iterable[Exclusion] | None = ()):
        self.optimizer = innermost_optimizer(optimizer)
        clipping, self.eps = check_clippings(clipping, eps)
        check_skip_classifier(skip_classifier)
        exclude = as_exclusions(exclude)
        param_lists = [group["params"] for group in self.optimizer.param_groups]
        if model is None:
            if skip_classifier is not None or exclude:
                raise ValueError("AGC needs model=... to find the final classifier it leaves alone and the parameters "
                                 "exclude names; pass the model, or skip_classifier=None (and no exclude) to clip "
                                 "every parameter the optimizer trains")
            model = nn.Module()  # names the parameters group<g>.param<i>
        else:
            warn_if_no_classifier(model, skip_classifier, stacklevel=3)
        groups = clipped_parameters(model, param_lists, skip_classifier, exclude)
        self.clippings = clipping_per_group(clipping, len(groups))
        self._groups = groups
        self.history = ClipHistory([[name for name, _ in group] for group in groups])

    def clip(self, grad_scale: float = 1.0) -> list[ClipStats]:
        """Clip the gradients now (they must be the whole step's: accumulated, all-reduced, unscaled) and record the
        step; one `ClipStats` per param group. `grad_scale`: the factor the gradients still carry (a loss scale
        not divided out yet); lambda is multiplied by it, so the step gets the clipped unscaled gradient times it."""
        stats = [adaptive_clip_grad_(group, clipping * grad_scale, self.eps)
                 for group, clipping in zip(self._groups, self.clippings)]
        self.history.record(stats)
        return stats


class AGCHook(OptimizerAGC):
    """`OptimizerAGC` that clips in a step pre-hook of the optimizer (see the module's docstring): once per
    ``optimizer.step()``, after GradScaler unscaled the gradients, never on a step it skips. `remove()` stops it."""

    def __init__(self, optimizer, model: nn.Module | None = None, **kwargs):
        super().__init__(optimizer, model, **kwargs)
        self._handle = self.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler.step for an optimizer that unscales
        if found_inf is None:
            self.clip()
        elif not bool(found_inf):  # the optimizer applies this step: gradients still carry grad_scale (or None)
            grad_scale = getattr(optimizer, "grad_scale", None)
            self.clip(1.0 if grad_scale is None else float(grad_scale))

    def remove(self) -> None:
        """Stop clipping (the history stays)."""
        self._handle.remove()


def agc_hook(optimizer, model: nn.Module | None = None, *, clipping: float | Sequence[float] = DEFAULT_CLIPPING,
             eps: float = DEFAULT_EPS, skip_classifier: SkipClassifier = "weight",
             exclude: Exclusion | Iterable[Exclusion] | None = ()) -> AGCHook:
    """Clip `optimizer`'s gradients with AGC at every ``optimizer.step()``, from now until ``.remove()``.

    Works in any loop, unchanged: under ``torch.amp.GradScaler`` it clips the unscaled gradients and not at all on a
    step the scaler skips (inf/NaN), whether or not ``scaler.unscale_(optimizer)`` was called; with gradient
    accumulation it clips once, the summed gradient, at the step; under DDP the all-reduced one. `optimizer` may be
    accelerate's prepared optimizer (the torch optimizer inside it gets the hook). The arguments and rules are
    `OptimizerAGC`'s (`model` finds the classifier AGC leaves alone); the returned `AGCHook` has the `history` of
    units clipped per step (`ClipHistory`: ``.rate()``, ``.plot()``) and ``.remove()``.
    """
    return AGCHook(optimizer, model, clipping=clipping, eps=eps, skip_classifier=skip_classifier, exclude=exclude)
