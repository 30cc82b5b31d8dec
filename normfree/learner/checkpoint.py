"""Per-epoch checkpoints of a run, and resuming from them with the same batches, steps and numbers.

`EpochCheckpoint` writes ``checkpoint.pth`` (atomically, `normfree.utils.outdir.atomic_write`) at the end of
every finished epoch: the weights, the optimizer's state (fastai's, moments included), the gradient
scaler of fp16 runs, every random-number generator a run draws from (torch's, CUDA's, Python's, numpy's
and the training DataLoader's shuffling generator, which `normfree.data` pins to the seed), the
Recorder's smoothed training loss, a `GradientAccumulation` part-way through an effective batch (its
count and the gradients summed so far), a `StepBudget`'s steps, the finished epochs' `EpochLog` rows,
which fit of the run (``fine_tune`` makes two) and how many of its epochs are done.

`ResumeFit` puts that state back: the weights and optimizer before the fit, the rest at the start of
the first epoch still to train. The epochs already trained are skipped with fastai's own
``fit_one_cycle(..., start_epoch=k)`` (`fastai.learner.SkipToEpoch`), so the one-cycle schedule is at the
same position; a resumed run then draws the same batches and makes the same steps as one never
interrupted, and ends with the same metrics (up to float rounding).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Recorder
from fastai.torch_core import get_model
from fastcore.basics import noop

from ..utils.outdir import atomic_write
from .step_budget import StepBudget

__all__ = ["CHECKPOINT", "EpochCheckpoint", "ResumeFit", "load_checkpoint"]

CHECKPOINT = "checkpoint.pth"


def _rng_state(learn) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "shuffle": learn.dls.train.rng.getstate(),
    }


def _set_rng_state(learn, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    learn.dls.train.rng.setstate(state["shuffle"])


def _callback(learn, kind: type) -> Callback | None:
    return next((cb for cb in learn.cbs if isinstance(cb, kind)), None)


class EpochCheckpoint(Callback):
    """Writes the run's state to `path` at the end of every finished epoch (see the module docstring).
    `rows` gives the `EpochLog` rows so far; `extra` (e.g. the lr used) is saved alongside. `fit` is the
    index of the run's next fit (a resumed run starts at the checkpoint's)."""

    order = Recorder.order + 30  # after EpochLog's row and the divergence check

    def __init__(self, path: str | Path, rows: list, extra: dict[str, Any] | None = None, fit: int = 0):
        self.path, self.rows, self.extra, self.fit_index = Path(path), rows, dict(extra or {}), fit - 1

    def before_fit(self) -> None:
        self.fit_index += 1

    def before_epoch(self) -> None:
        self.skipped = False

    def after_cancel_epoch(self) -> None:  # fastai's SkipToEpoch: an epoch trained before the run was resumed
        self.skipped = True

    def after_epoch(self) -> None:
        if self.skipped:
            return
        learn = self.learn
        smooth = learn.recorder.smooth_loss
        state = {
            "fit": self.fit_index, "epoch": self.epoch + 1, "rows": list(self.rows), **self.extra,
            "model": get_model(learn.model).state_dict(),
            "opt": learn.opt.state_dict(),
            "scaler": learn.scaler.state_dict() if getattr(learn, "scaler", None) is not None else None,
            "rng": _rng_state(learn),
            "smooth_loss": (smooth.count, smooth.val),
            "train_iter": learn.train_iter,
        }
        accumulation = _callback(learn, GradientAccumulation)
        if accumulation is not None:
            state["accumulated"] = accumulation.count
            if accumulation.count:  # part of an effective batch summed, not stepped yet
                state["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in learn.model.parameters()]
        budget = _callback(learn, StepBudget)
        if budget is not None:
            state["budget_done"] = budget.done
        atomic_write(self.path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state `EpochCheckpoint` wrote. The file holds Python objects (RNG states, fastai's optimizer
    hyper-parameters), so it is read with pickle: read only checkpoints written by your own runs."""
    return torch.load(path, map_location="cpu", weights_only=False)


class ResumeFit(Callback):
    """Continues a run from `state` (`load_checkpoint`): give it to the fits from ``state["fit"]`` on, the first
    one with ``start_epoch=state["epoch"]``. At the start of that fit it loads the weights and the
    optimizer's state (after fastai's ``freeze``/``unfreeze``, which clear the optimizer's state); in the
    first epoch to train it restores the generators, the gradient scaler, the smoothed loss, a part-way
    gradient accumulation and a step budget (their own ``before_fit`` has reset them by then). Epochs
    skipped by fastai print nothing."""

    order = 65  # before fastai's SkipToEpoch (70) cancels a skipped epoch; after the Recorder (50) in after_epoch

    def __init__(self, state: dict[str, Any]):
        self.state, self.loaded, self.restored, self._logger = state, False, False, None

    def before_fit(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        learn = self.learn
        get_model(learn.model).load_state_dict(self.state["model"])
        learn.opt.load_state_dict(self.state["opt"])
        for p, _, state, _ in learn.opt.all_params():
            learn.opt.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def before_epoch(self) -> None:
        self._logger = None
        if self.restored:
            return
        if self.epoch < self.state["epoch"]:  # SkipToEpoch cancels it: keep the Recorder's table quiet
            self._logger, self.learn.logger = self.learn.logger, noop
            return
        self._restore()

    def after_epoch(self) -> None:
        if self._logger is not None:
            self.learn.logger = self._logger

    def _restore(self) -> None:
        learn, state = self.learn, self.state
        self.restored = True
        _set_rng_state(learn, state["rng"])
        if state["scaler"] is not None and getattr(learn, "scaler", None) is not None:
            learn.scaler.load_state_dict(state["scaler"])
        smooth = learn.recorder.smooth_loss
        smooth.count, smooth.val = state["smooth_loss"]
        learn.train_iter = state["train_iter"]
        accumulation = _callback(learn, GradientAccumulation)
        if accumulation is not None and "accumulated" in state:
            accumulation.count = state["accumulated"]
            for p, grad in zip(learn.model.parameters(), state.get("grads", ())):
                p.grad = None if grad is None else grad.to(p.device)
        budget = _callback(learn, StepBudget)
        if budget is not None and "budget_done" in state:
            budget.done = state["budget_done"]
