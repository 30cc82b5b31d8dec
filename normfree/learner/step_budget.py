"""A training budget in optimizer steps instead of epochs, for fastai fits.

With one budget in epochs, a batch of 256 makes 32x fewer optimizer steps than a batch of 8; with
one budget in steps, it sees 32x more data. `StepBudget` makes the second reading possible: the fit
stops after exactly ``steps`` optimizer steps, part-way through its last epoch (which is then
validated as usual), and the schedule (fastai's one-cycle) is spread over those steps.
"""
from __future__ import annotations

import math

from fastai.callback.core import Callback, CancelTrainException
from fastai.callback.schedule import ParamScheduler

from .epoch_log import EpochLog

__all__ = ["StepBudget", "epochs_for_steps"]


def epochs_for_steps(steps: int, accum: int, batches_per_epoch: int) -> int:
    """Epochs a fit needs for `steps` optimizer steps of `accum` batches each (the last one partial)."""
    return math.ceil(steps * accum / batches_per_epoch)


class StepBudget(Callback):
    """Stop training after `steps` optimizer steps (`accum` batches each, as GradientAccumulation makes them).

    Give the fit `epochs_for_steps(...)` epochs. Before each training batch it sets the schedule's
    progress to the fraction of the budget spent (instead of the fraction of the epochs), and once
    the budget is spent it ends that epoch's training; validation still runs.
    """

    order = (EpochLog.order + ParamScheduler.order) / 2  # after the epoch's bookkeeping, before the schedule
    run_valid = False

    def __init__(self, steps: int, accum: int = 1):
        self.batches = steps * accum

    def before_fit(self) -> None:
        self.done = 0

    def before_batch(self) -> None:
        if self.done >= self.batches:
            raise CancelTrainException()
        self.learn.pct_train = self.done / self.batches

    def after_batch(self) -> None:
        self.done += 1

    def after_cancel_train(self) -> None:
        # fastai's Recorder drops the training loss from an epoch whose training was cancelled, which shifts
        # every later column of its row; the budget ending an epoch early is not a failure
        if self.done >= self.batches and hasattr(self.learn, "recorder"):
            self.learn.recorder.cancel_train = False
