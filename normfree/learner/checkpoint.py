"""Per-epoch checkpoints of a run, and resuming from them with the same batches, steps and numbers.

`EpochCheckpoint` writes ``checkpoint.pth`` (atomically, `normfree.utils.outdir.atomic_write`) at the end of
every finished epoch: the weights, the optimizer's state (fastai's, moments included), the gradient
scaler of fp16 runs, every random-number generator a run draws from (torch's, CUDA's, Python's, numpy's
and the training DataLoader's shuffling generator, which `normfree.data` pins to the seed), the
Recorder's smoothed training loss, a `GradientAccumulation` part-way through an effective batch (its
count and the gradients summed so far), a `StepBudget`'s steps, the finished epochs' `EpochLog` rows,
which fit of the run (``fine_tune`` makes two) and how many of its epochs are done, and AGC's clip history of
the fit so far (`ClipHistory`), so that the clip rates and ``agc_clip_rates.png`` of a resumed run cover the
whole fit.

What the checkpoint belongs to, so that a resume can refuse a checkpoint that does not fit (`normfree.app.train.resume`
checks all of it before it changes anything in the run folder):

- ``format``: `CHECKPOINT_FORMAT`, the layout of this file; `load_checkpoint` refuses another one
  (`CheckpointFormatError`; files from before the number was written count as format 1);
- the run's settings (``config``, written by `normfree.train` with the ``lr`` used);
- ``data``: `data_fingerprint` of the DataLoaders: per split (train, valid) the number of items and a
  digest of them (an image file's path relative to the folder holding them all, its size in bytes and
  its label; an in-memory data set's tensors, shapes and dtypes included), and the classes (their
  names, else their count). `data_changes` says in words what differs.

`ResumeFit` puts that state back: the weights and optimizer before the fit, the rest at the start of
the first epoch still to train. The epochs already trained are skipped with fastai's own
``fit_one_cycle(..., start_epoch=k)`` (`fastai.learner.SkipToEpoch`), so the one-cycle schedule is at the
same position; a resumed run then draws the same batches and makes the same steps as one never
interrupted, and ends with the same metrics (up to float rounding).
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.learner import Recorder
from fastai.torch_core import get_model
from fastcore.basics import noop
from torch.utils.data import TensorDataset

from ..utils.outdir import atomic_write
from .callback import AGC
from .step_budget import StepBudget

__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "CheckpointFormatError", "EpochCheckpoint", "ResumeFit", "data_changes",
           "data_fingerprint", "load_checkpoint"]

CHECKPOINT = "checkpoint.pth"
# The layout of checkpoint.pth: raise it whenever what EpochCheckpoint writes or ResumeFit reads changes.
# 2: the format number, the data's fingerprint and AGC's clip history added.
CHECKPOINT_FORMAT = 2
_SPLITS = {"train": "training split", "valid": "validation split"}


class CheckpointFormatError(ValueError):
    """A checkpoint written in another `CHECKPOINT_FORMAT` than this normfree's (`found`)."""

    def __init__(self, path: Path, found: int):
        self.found = found
        super().__init__(f"{path} is in checkpoint format {found}; this normfree reads format {CHECKPOINT_FORMAT}")


def _items_digest(dataset, root: str | None) -> str:
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(dataset, TensorDataset):  # normfree's in-memory data: the tensors themselves
        for tensor in dataset.tensors:
            digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    else:  # fastai Datasets of image files: which files, their size, their label
        for path, label in zip(dataset.items, dataset.tls[1]):
            digest.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{label.tolist()}\n".encode())
    return digest.hexdigest()


def data_fingerprint(dls: DataLoaders) -> dict[str, Any]:
    """What identifies the data a run trains and validates on (see the module docstring): ``{"train": [items,
    digest], "valid": [items, digest], "classes": names or count}``."""
    datasets = {"train": dls.train_ds, "valid": dls.valid_ds}
    files = [path for ds in datasets.values() if not isinstance(ds, TensorDataset) for path in ds.items]
    root = os.path.commonpath(files) if files else None
    vocab = getattr(dls, "vocab", None)
    return {**{split: [len(ds), _items_digest(ds, root)] for split, ds in datasets.items()},
            "classes": [str(name) for name in vocab] if vocab is not None else dls.c}


def data_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two `data_fingerprint`s, in words (empty if nothing)."""
    changes = []
    if then["classes"] != now["classes"]:
        if isinstance(then["classes"], list) and isinstance(now["classes"], list):
            added = [name for name in now["classes"] if name not in then["classes"]]
            removed = [name for name in then["classes"] if name not in now["classes"]]
            what = ", ".join(f"{', '.join(map(repr, names))} {verb}"
                             for names, verb in ((added, "added"), (removed, "removed")) if names)
            changes.append(f"the data's classes changed: {what or 'reordered'} ({len(then['classes'])} classes then, "
                           f"{len(now['classes'])} now)")
        else:
            changes.append(f"the data's classes changed: {then['classes']} then, {now['classes']} now")
    for split, name in _SPLITS.items():
        (count_then, digest_then), (count_now, digest_now) = then[split], now[split]
        if count_now != count_then:
            difference = count_now - count_then
            changes.append(f"the data's {name} changed: {abs(difference)} images "
                           f"{'added' if difference > 0 else 'removed'} ({count_then} then, {count_now} now)")
        elif digest_now != digest_then:
            changes.append(f"the data's {name} changed: as many images ({count_now}), but other files, sizes, labels "
                           f"or pixels")
    return changes


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
            "format": CHECKPOINT_FORMAT,
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
        agc = _callback(learn, AGC)
        if agc is not None:
            state["clip_history"] = agc.history.state_dict()
        atomic_write(self.path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state `EpochCheckpoint` wrote; `CheckpointFormatError` if it was written in another `CHECKPOINT_FORMAT`.
    The file holds Python objects (RNG states, fastai's optimizer hyper-parameters), so it is read with
    pickle: read only checkpoints written by your own runs."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    found = state.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise CheckpointFormatError(Path(path), found)
    return state


class ResumeFit(Callback):
    """Continues a run from `state` (`load_checkpoint`): give it to the fits from ``state["fit"]`` on, the first
    one with ``start_epoch=state["epoch"]``. At the start of that fit it loads the weights, the
    optimizer's state (after fastai's ``freeze``/``unfreeze``, which clear the optimizer's state) and AGC's
    clip history (after AGC's own ``before_fit``, which starts a new one); in the
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
        agc = _callback(learn, AGC)
        if agc is not None:
            agc.restore_history(self.state["clip_history"])

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
