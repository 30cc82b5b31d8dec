"""The fastai callback for Adaptive Gradient Clipping (Brock et al. 2021, Sec. 4)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner, Metric
from fastcore.basics import patch
from torch import Tensor, nn

from ..agc.clip import clip_parameters_
from ..agc.exclusion import (
    Exclusion,
    SkipClassifier,
    as_exclusions,
    check_skip_classifier,
    clipped_parameters,
    excluded_parameters,
)
from ..agc.history import ClipHistory
from ..agc.hook import check_clippings, clipping_per_group, warn_if_no_classifier
from ..agc.per_sample import LossGradScale, PerSampleClipper, check_examples_independent, check_supported_modules
from ..agc.rule import DEFAULT_CLIP_FRACTION, DEFAULT_CLIPPING, DEFAULT_EPS, suggest_clipping
from ..agc.sharded import local_unit_norms, unit_ratio_vector
from ..models.classifier import unwrap_model
from ..models.compiled import is_compiled
from .fit_guard import in_fit

__all__ = ["AGC", "CLIP_WATCH_STEPS", "MOST_CLIPPED", "ClipRate"]

CLIP_WATCH_STEPS = 50  # consecutive optimizer steps over which AGC judges its lambda (its warnings)
MOST_CLIPPED = 0.5  # a step clips "most units" above this share


class AGC(Callback):
    """Adaptive Gradient Clipping for a fastai `Learner` (Brock et al. 2021, Sec. 4).

    Clips in `before_step`, after `MixedPrecision` (order 10) has unscaled the gradients and
    skipped overflowing steps, after `GradientAccumulation` (order 6) has let the whole effective
    batch accumulate, and after distributed training's backward pass has all-reduced the
    gradients. Only parameters the optimizer trains (its param groups, frozen ones left out) are
    clipped.

    - `clipping`: lambda; one number, or one per optimizer param group (like fastai's `slice` of
      learning rates). 0.01 is the paper's value at batch 1024-4096; use more for small batches,
      less for Adam-like optimizers.
    - `eps`: the weight-norm floor that lets zero-initialised parameters move.
    - `skip_classifier`: which of the final classifier's parameters to leave alone: "weight"
      (DeepMind's rule, the default), "weight_and_bias" (timm's), or None (clip it too).
    - `exclude`: more parameters to leave alone: name patterns ("stem.*", or a module name such as
      "head"), modules, or predicates ``f(name, param) -> bool``.
    - `per_sample`: clip each example's gradient before the batch mean (see `normfree.agc.per_sample`):
      the step uses (1/N) sum_i clip(g_i) over the N examples of the effective batch (all
      micro-batches of a `GradientAccumulation`, all processes of a distributed run). Needs a model
      whose examples do not interact (no BatchNorm in training mode), no recurrent layers, and a loss
      that is the mean or the sum of per-example terms; dropout and drop-path are fine except inside
      the modules it computes with torch.func (see `normfree.agc.per_sample` for the module kinds).
      Excluded parameters get their ordinary mean gradient. Clip rates then count (example, unit) pairs.

    Every `CLIP_WATCH_STEPS` steps it looks at the last ones and warns, once per fit each: when most units clipped
    at every one of them (lambda far too small: every update shrunk) or none clipped at any (lambda too large: AGC
    does nothing), with the measured share and the lambda that would clip `DEFAULT_CLIP_FRACTION` of the units at
    the step (`normfree.agc.rule.suggest_clipping`; ``learn.agc_find()`` measures it over a probe).

    On a sharded model (FSDP2's ``fully_shard``) every rank clips its shards as the unsharded model would be clipped
    and records the full model's counts (`normfree.agc.clip.ClipStats`), so history, clip rates and warnings are
    the same on every rank; the suggested lambda of a warning comes from the units in that rank's shards.

    After a fit, `history` holds the units clipped per parameter at every step (see
    `ClipHistory`); the Recorder shows the epoch's clip rate as `agc_clip` (and `agc_clip_<g>`
    per param group when there are several); `plot()` draws the per-layer clip rate over training.
    """

    order = MixedPrecision.order + 1
    run_valid = False

    def __init__(
        self,
        clipping: float | Sequence[float] = DEFAULT_CLIPPING,
        eps: float = DEFAULT_EPS,
        skip_classifier: SkipClassifier = "weight",
        exclude: Exclusion | Iterable[Exclusion] | None = (),
        per_sample: bool = False,
    ):
        self.clipping, self.eps = check_clippings(clipping, eps)
        check_skip_classifier(skip_classifier)
        self.skip_classifier, self.exclude = skip_classifier, as_exclusions(exclude)
        self.per_sample = bool(per_sample)
        self.history: ClipHistory | None = None
        self.epoch_start = 0
        self._clipper: PerSampleClipper | None = None
        self._loss_scale: LossGradScale | None = None
        self._history_started = False

    @property
    def name(self) -> str:
        return "adaptive_clip"  # not fastai's default "agc": `learn.agc` is the Learner method that attaches it

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError now, rather than at the first step, if the exclusions name nothing in `model` or, with
        `per_sample`, if it has BatchNorm layers (which couple the examples) or modules per-sample AGC cannot clip
        (`check_supported_modules`: recurrent layers, ...)."""
        excluded_parameters(model, self.skip_classifier, self.exclude)
        if self.per_sample:
            if is_compiled(unwrap_model(model)):
                raise ValueError("per-sample AGC replaces the forward of the model's layers, which a compiled forward "
                                 "(torch.compile; nf_learner(compile=...)) does not call: compile the model without "
                                 "per_sample, or train per_sample uncompiled")
            check_examples_independent(unwrap_model(model))
            check_supported_modules(unwrap_model(model))

    def clipped_parameters(self, model: nn.Module,
                           param_lists: Sequence[Sequence[Tensor]]) -> list[list[tuple[str, Tensor]]]:
        """Per optimizer param group, the (name, parameter) pairs AGC clips (`normfree.agc.exclusion`)."""
        return clipped_parameters(model, param_lists, self.skip_classifier, self.exclude)

    def before_fit(self) -> None:
        # fastai also calls before_fit for get_preds/predict/validate, which train nothing (and must not
        # get clip-rate columns)
        if not in_fit(self.learn) or self.learn.opt is None:
            self.run = False
            return
        n_groups = len(self.learn.opt.param_lists)
        per_group = [ClipRate(self, g) for g in range(n_groups)] if n_groups > 1 else []
        self.learn.metrics = self.learn.metrics + [ClipRate(self), *per_group]
        self._history_started = False
        self._warned: set[str] = set()

    def _start_history(self) -> None:
        """Resolve what to clip and start a new history: at the first training epoch of a fit, so that a
        `learn.validate()` after training keeps the statistics of the fit."""
        model = unwrap_model(self.learn.model)
        warn_if_no_classifier(model, self.skip_classifier, stacklevel=3)
        groups = self.clipped_parameters(model, self.learn.opt.param_lists)
        self._params = [[p for _, p in group] for group in groups]
        self._clippings = clipping_per_group(self.clipping, len(groups))
        self.history = ClipHistory([[name for name, _ in group] for group in groups])
        self._history_started = True
        if self.per_sample:
            clipping = {id(p): c for params, c in zip(self._params, self._clippings) for p in params}
            self._clipper = PerSampleClipper(model, clipping, self.eps)
            self._loss_scale = LossGradScale(self._clipper)

    @property
    def _fit_history(self) -> ClipHistory:
        """`history` during a fit (it is started at the fit's first training epoch)."""
        assert self.history is not None, "AGC's clip history is read before its fit started"
        return self.history

    def restore_history(self, state: dict) -> None:
        """Continue the fit's clip history from `state` (`ClipHistory.state_dict`) rather than from nothing: for a
        resumed run (`normfree.learner.checkpoint.ResumeFit`), in ``before_fit`` after this callback's own."""
        self._start_history()
        self._fit_history.load_state_dict(state)

    # per-sample AGC: the backward pass clips each example; these hooks frame each batch for it
    def before_batch(self) -> None:
        if self._clipper is not None:
            self._clipper.check_examples_independent()
            self._clipper.start()

    def after_loss(self) -> None:
        if self._loss_scale is not None and self.learn.pred.requires_grad:  # set with `_clipper`
            self._loss_scale.watch(self.learn.loss_func, self.learn.pred, self.learn.yb)

    def after_batch(self) -> None:
        if self._clipper is not None:
            self._clipper.stop()

    def before_train(self) -> None:
        if not self._history_started:
            self._start_history()
        self.epoch_start = len(self._fit_history)

    def before_step(self) -> None:
        if self._clipper is not None:  # the backward pass clipped each example already
            self._fit_history.record(self._clipper.collect(self._params))
        else:
            self._watch_clip_share()
            # arguments checked in __init__; non-finite units are reported in after_train
            self._fit_history.record([clip_parameters_(params, clipping, self.eps)
                                       for params, clipping in zip(self._params, self._clippings)])

    def _watch_clip_share(self) -> None:
        """The warnings of the class docstring, judged every CLIP_WATCH_STEPS steps (one host synchronisation each)
        on the steps before this one, the suggestion taken from this step's gradients before they are clipped."""
        steps = len(self._fit_history)
        if steps < CLIP_WATCH_STEPS or steps % CLIP_WATCH_STEPS or len(self._warned) == 2:
            return
        window = slice(steps - CLIP_WATCH_STEPS, steps)
        clipped, units = self._fit_history.clipped(window).sum(1), self._fit_history.units(window).sum(1)
        shares = clipped / units.clamp_min(1)
        if bool((shares > MOST_CLIPPED).all()):
            kind, problem = "too small", (f"clipped {float(shares.min()):.0%}-{float(shares.max()):.0%} of the units "
                                          f"at each of the last {CLIP_WATCH_STEPS} steps: lambda is far too small "
                                          f"and shrinks every update")
        elif int(clipped.sum()) == 0:
            kind, problem = "too large", (f"clipped no unit in the last {CLIP_WATCH_STEPS} steps: lambda is too large "
                                          f"and AGC does nothing")
        else:
            return
        if kind in self._warned:
            return
        self._warned.add(kind)
        ratios = unit_ratio_vector([p for params in self._params for p in params], self.eps)
        lambdas = ", ".join(f"{c:g}" for c in sorted(set(self._clippings)))
        warnings.warn(f"AGC (lambda {lambdas}) {problem}; lambda {suggest_clipping(ratios):.3g} would clip "
                      f"{DEFAULT_CLIP_FRACTION:.0%} of this step's units (learn.agc_find() measures it over a probe "
                      f"run; --agc auto on the command line)", stacklevel=2)

    def after_train(self) -> None:
        per_parameter = self._fit_history.nonfinite(slice(self.epoch_start, None)).sum(0).tolist()
        if sum(per_parameter):
            params = [p for group in self._params for p in group]
            seen = [(name, p) for name, p, n in zip(self._fit_history.parameter_names, params, per_parameter) if n]
            diverged = [name for name, p in seen if not bool(local_unit_norms(p).isfinite().all())]
            weights = (f"; the weights of {', '.join(diverged[:5])} are inf/NaN now: the model has diverged, restart "
                       f"from a checkpoint" if diverged else "")
            warnings.warn(
                f"AGC saw {sum(per_parameter)} units with inf/NaN gradients or weights this epoch (in "
                f"{', '.join(name for name, _ in seen[:5])}{', ...' if len(seen) > 5 else ''}) and left them "
                f"unchanged{weights}; use mixed precision's grad scaler (learn.to_fp16()) or a lower learning rate",
                stacklevel=2,
            )

    def _end_fit(self) -> None:
        """Undo what the fit changed: the per-sample patches and the clip-rate columns."""
        if self._clipper is not None:
            self._clipper.remove()
            self._clipper = self._loss_scale = None
        self.learn.metrics = [m for m in self.learn.metrics if not (isinstance(m, ClipRate) and m.agc is self)]

    def after_cancel_fit(self) -> None:
        self._end_fit()

    def after_fit(self) -> None:
        self._end_fit()

    def end_interrupted_fit(self) -> None:
        """The fit ended by an exception (Ctrl-C, an error in any callback): see `normfree.learner.fit_guard`."""
        self._end_fit()
        self.run = True  # fastai resets it only in after_fit

    def epoch_clip_rate(self, group: int | None = None) -> float:
        """The fraction of units clipped in the training steps of the current (or, after a fit, the last) epoch,
        over all clipped parameters or those of one optimizer param `group`; NaN before the first fit."""
        if self.history is None:
            return math.nan
        return self.history.rate(slice(self.epoch_start, None), group)

    def plot(self, **kwargs):
        """Per-layer clip rate over the last fit (see `ClipHistory.plot`); returns the figure."""
        if self.history is None or not len(self.history):
            raise RuntimeError("AGC has no statistics yet: call learn.fit(...) first")
        return self.history.plot(**kwargs)


class ClipRate(Metric):
    """Recorder column: the fraction of units the `AGC` callback `agc` clipped in this epoch's training steps
    (`AGC.epoch_clip_rate`). `group=None` is over all clipped parameters; an int is one optimizer param group."""

    def __init__(self, agc: AGC, group: int | None = None):
        self.agc, self.group = agc, group

    def reset(self) -> None:  # the value comes from the AGC callback's history, not from batches
        pass

    def accumulate(self, learn: Learner) -> None:
        pass

    @property
    def value(self) -> float:
        return self.agc.epoch_clip_rate(self.group)

    @property
    def name(self) -> str:
        return "agc_clip" if self.group is None else f"agc_clip_{self.group}"


@patch
def agc(self: Learner, *args, **kwargs) -> Learner:
    """Attach Adaptive Gradient Clipping (replacing any AGC already attached), like `to_fp16()`: takes `AGC`'s
    arguments (`clipping`, `eps`, `skip_classifier`, `exclude`, `per_sample`).

    The callback is then `learn.adaptive_clip`. Exclusions are checked against the model now, and so,
    with `per_sample=True`, are its modules: no BatchNorm layers (which couple the examples), none that
    per-sample AGC cannot clip (recurrent layers, ...).
    """
    callback = AGC(*args, **kwargs)
    callback.check_model(self.model)
    self.remove_cb(AGC)
    return self.add_cb(callback)
