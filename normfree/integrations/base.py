"""What a trainer adapter keeps: AGC's settings, checked when the callback is made, and one `OptimizerAGC` per
optimizer, made at that optimizer's first step (trainers build optimizers after their callbacks)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..agc.clip import ClipStats
from ..agc.exclusion import Exclusion, SkipClassifier, check_skip_classifier
from ..agc.history import ClipHistory
from ..agc.hook import OptimizerAGC, as_exclusions, check_clippings, innermost_optimizer, unscale_for_step
from ..agc.rule import DEFAULT_CLIPPING, DEFAULT_EPS

__all__ = ["TrainerAGC"]


class TrainerAGC:
    """AGC's settings (`OptimizerAGC`'s arguments, checked now) and the clipping of each optimizer's step."""

    def __init__(self, clipping: float | Sequence[float] = DEFAULT_CLIPPING, eps: float = DEFAULT_EPS,
                 skip_classifier: SkipClassifier = "weight", exclude: Exclusion | Iterable[Exclusion] | None = ()):
        self.clipping, self.eps = check_clippings(clipping, eps)
        check_skip_classifier(skip_classifier)
        self.skip_classifier, self.exclude = skip_classifier, as_exclusions(exclude)
        self.clippers: list[OptimizerAGC] = []  # one per optimizer, in the order of their first steps

    @property
    def history(self) -> ClipHistory | None:
        """The units clipped per step (`ClipHistory`) of the (first) optimizer since training began; None before."""
        return self.clippers[0].history if self.clippers else None

    def clip_before_step(self, optimizer, model: nn.Module,
                         scaler: torch.amp.GradScaler | None) -> list[ClipStats] | None:
        """Clip `optimizer`'s gradients for the step about to be taken, unscaled first with `scaler` if it has not
        done so (`unscale_for_step`); nothing on a step the scaler will skip, or one without gradients (a backward
        pass the trainer skipped). The statistics of the step, or None where nothing was clipped."""
        optimizer = innermost_optimizer(optimizer)
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            return None  # unscaling would leave the scaler expecting a step that the trainer does not take
        if not unscale_for_step(scaler, optimizer):
            return None
        clipper = next((c for c in self.clippers if c.optimizer is optimizer), None)
        if clipper is None:
            clipper = OptimizerAGC(optimizer, model, clipping=self.clipping, eps=self.eps,
                                   skip_classifier=self.skip_classifier, exclude=self.exclude)
            self.clippers.append(clipper)
        return clipper.clip()
