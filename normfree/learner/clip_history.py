"""The Recorder column of AGC's clip rate (`ClipRate`), read from the callback's `ClipHistory` (`normfree.agc.history`)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fastai.learner import Learner, Metric

from ..agc.history import ClipHistory

if TYPE_CHECKING:
    from .callback import AGC

__all__ = ["ClipHistory", "ClipRate"]  # ClipHistory: its place before it moved to normfree.agc


class ClipRate(Metric):
    """Recorder column: fraction of units AGC clipped in this epoch's training steps.

    `group=None` is over all clipped parameters; an int is one optimizer param group.
    """

    def __init__(self, agc: AGC, group: int | None = None):
        self.agc, self.group = agc, group

    def reset(self) -> None:  # the value comes from the AGC callback's history, not from batches
        pass

    def accumulate(self, learn: Learner) -> None:
        pass

    @property
    def value(self) -> float:
        if self.agc.history is None:
            return math.nan
        return self.agc.history.rate(slice(self.agc.epoch_start, None), self.group)

    @property
    def name(self) -> str:
        return "agc_clip" if self.group is None else f"agc_clip_{self.group}"
