"""No host synchronisation inside training steps: what would stall a GPU, counted on the CPU.

On a GPU, a device value read on the host (`.item()`, `bool(t)`, `float(t)`, `int(t)`, `.tolist()`,
`.cpu()`, `.numpy()`, and ops whose output shape depends on values: `nonzero`, boolean indexing,
`masked_select`, `unique`) makes the host wait for every queued kernel, so a host-bound step can no
longer run ahead of the device. The same calls happen on the CPU, where they cost nothing: these tests
count them in the per-batch part of fastai's loop (before_batch .. after_step, forward and backward
included) of training batches, with the AGC callback (statistics and history), per-sample AGC and
mixed precision. The first batch of a fit may check things once (per-sample AGC checks the loss's
reduction); end-of-epoch work (clip rates, warnings) is outside batches.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD

from fastai_helpers import dls_for, image_batch, tiny_nfnet
from host_syncs import HostSyncs
from normfree import AGC
from normfree.agc import cpu_kernel

# the overflow check of torch's GradScaler.step, which decides on the host whether to skip the step
OVERFLOW_CHECK = "grad_scaler.py:_maybe_opt_step"


class _Start(Callback):
    order = -10_000  # before every other callback's before_batch

    def __init__(self, batches: list[list[str]]):
        self.batches = batches

    def before_batch(self) -> None:
        if self.training:
            self.counting = HostSyncs()
            self.counting.__enter__()


class _Stop(Callback):
    order = 10_000  # after every other callback's after_step

    def __init__(self, start: _Start):
        self.start = start

    def after_step(self) -> None:
        if self.training:
            self.start.counting.__exit__(None, None, None)
            self.start.batches.append(self.start.counting.sites)


def _noting(original):
    """`original` (a torch.Tensor method), noting each call in the active `HostSyncs` mode."""
    def noted(self, *args, **kwargs):
        mode = torch.utils._python_dispatch._get_current_dispatch_mode()
        if isinstance(mode, HostSyncs):
            mode.note()
        return original(self, *args, **kwargs)
    return noted


def syncs_per_training_batch(learn: Learner, monkeypatch) -> list[list[str]]:
    """Fit `learn` for an epoch and return, for each training batch, the sites of the host synchronisations
    from its before_batch to its after_step (fastai's Recorder copies the loss to the CPU in after_batch)."""
    batches: list[list[str]] = []
    for method in ("tolist", "numpy", "cpu"):  # no dispatch on CPU tensors: count the Python calls
        monkeypatch.setattr(torch.Tensor, method, _noting(getattr(torch.Tensor, method)))
    with learn.no_bar(), learn.no_logging():
        start = _Start(batches)
        learn.fit(1, cbs=[start, _Stop(start)])
    return batches


def learner(cbs, precision: str = "fp32") -> Learner:
    x, y = image_batch(n=24)
    learn = Learner(dls_for(x, y, 6), tiny_nfnet(), loss_func=CrossEntropyLossFlat(),
                    opt_func=partial(SGD, mom=0.9, wd=1e-4), lr=0.1, cbs=cbs)
    return learn.to_mixed_precision(precision)


CASES = {
    "AGC, fused CPU kernel": (lambda: [AGC(0.01)], "fp32"),
    "AGC, torch ops (as on a GPU without Triton)": (lambda: [AGC(0.01)], "fp32"),
    "per-sample AGC": (lambda: [AGC(0.01, per_sample=True)], "fp32"),
    "fp16 with AGC": (lambda: [AGC(0.01)], "fp16"),
    "fp16 with per-sample AGC": (lambda: [AGC(0.01, per_sample=True)], "fp16"),
    "bf16 with AGC": (lambda: [AGC(0.01)], "bf16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_do_not_synchronise_with_the_device(case, monkeypatch):
    if "torch ops" in case:
        monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    make_cbs, precision = CASES[case]
    batches = syncs_per_training_batch(learner(make_cbs(), precision), monkeypatch)
    assert len(batches) == 4
    allowed = 1 if precision == "fp16" else 0  # fastai skips an overflowing fp16 step on the host
    for sites in batches[1:]:
        assert len(sites) == allowed and all(OVERFLOW_CHECK in site for site in sites), "\n".join(sites)


@pytest.mark.slow
def test_the_guard_sees_an_item_call_in_a_step(monkeypatch):
    """The counting is not vacuous: one `.item()` added to AGC's per-step work is found in every batch."""
    record = AGC.before_step

    def before_step_reading_a_count(self):
        record(self)
        self.history._steps[-1][0].clipped.sum().item()

    monkeypatch.setattr(AGC, "before_step", before_step_reading_a_count)
    batches = syncs_per_training_batch(learner([AGC(0.01)]), monkeypatch)
    assert all(len(sites) == 1 and "before_step_reading_a_count" in sites[0] for sites in batches)
