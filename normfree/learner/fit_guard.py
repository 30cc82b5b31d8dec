"""normfree's callbacks undo what they change for a fit, however the fit ends.

fastai calls ``after_fit`` (and ``after_cancel_fit``) only when a fit ends normally or by
`CancelFitException`. Ctrl-C, a notebook's stop button or an exception raised by any callback skip
both, and a callback that patched the model, added Recorder columns or entered autocast for the fit
would leave that behind: later training, even plain PyTorch outside fastai, would then run with it.
So importing normfree wraps `Learner.fit` once: when a fit ends by an exception, every callback
that defines ``end_interrupted_fit()`` is asked to undo its changes, and the exception goes on.
The wrapper also tells callbacks whether they run inside a fit or inside ``validate`` /
``get_preds``, which fastai reports with the same ``before_fit`` event (`in_fit`).
"""
from __future__ import annotations

import functools

from fastai.learner import Learner

__all__ = ["in_fit"]

_FIT_DEPTH = "normfree_fit_depth"  # Learner attribute: how many `fit` calls are running on it (lr_find nests none)


def in_fit(learn: Learner) -> bool:
    """Whether `learn` is inside `Learner.fit` (and its callers fit_one_cycle, fine_tune, lr_find), not just
    validating or predicting."""
    return learn.__dict__.get(_FIT_DEPTH, 0) > 0


def _guarded(fit):
    @functools.wraps(fit)
    def guarded_fit(self: Learner, *args, **kwargs):
        self.__dict__[_FIT_DEPTH] = self.__dict__.get(_FIT_DEPTH, 0) + 1
        try:
            return fit(self, *args, **kwargs)
        except BaseException:
            for callback in list(self.cbs):
                end = getattr(callback, "end_interrupted_fit", None)
                if callable(end):
                    end()
            raise
        finally:
            self.__dict__[_FIT_DEPTH] -= 1

    guarded_fit.normfree_guarded = True
    return guarded_fit


if not getattr(Learner.fit, "normfree_guarded", False):  # once, also if this module is reloaded
    Learner.fit = _guarded(Learner.fit)
