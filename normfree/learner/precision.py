"""Mixed precision on whatever device the Learner trains on (fastai's `MixedPrecision` is CUDA-only).

fastai's `MixedPrecision` builds ``torch.autocast("cuda")`` and ``GradScaler("cuda")`` whatever the
device, so on a CPU (or Apple MPS) it silently trains in float32 or fails. `DeviceMixedPrecision` is
the same callback, at the same `order` (so `AGC`, at ``MixedPrecision.order + 1``, still clips the
gradients after they are unscaled), with the device read from the Learner: float16 autocast with a
`torch.amp.GradScaler` for that device, or bfloat16 autocast without one.
"""
from __future__ import annotations

import warnings

import torch
from fastai.callback.core import CancelStepException
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.learner import Learner
from fastcore.basics import patch

from ..utils.errors import ConfigError

__all__ = ["PRECISIONS", "DeviceMixedPrecision", "check_precision", "training_device"]

PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(precision: str) -> None:
    """ConfigError (a ValueError) naming `precision` unless it is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def training_device(learn: Learner) -> torch.device:
    """The device `learn` trains on: its model's parameters', else its DataLoaders', else the CPU."""
    parameter = next(learn.model.parameters(), None)
    if parameter is not None:
        return parameter.device
    return torch.device(getattr(learn.dls, "device", None) or "cpu")


class DeviceMixedPrecision(MixedPrecision):
    """fastai's `MixedPrecision` on the Learner's own device (CPU, CUDA, MPS, ...).

    - ``"fp16"``: float16 autocast and a `torch.amp.GradScaler` for the device; `GradScaler`
      keyword arguments (``init_scale``, ``growth_interval``, ...) are passed on.
    - ``"bf16"``: bfloat16 autocast and no loss scaling (bfloat16 has float32's range).

    Same `order` as fastai's (10): it unscales the gradients, and skips steps that overflowed,
    before `AGC` (order 11) clips them. It is a `MixedPrecision`, so ``learn.to_fp32()`` removes
    it, and is reachable as ``learn.mixed_precision``. An interrupted batch (Ctrl-C inside the
    forward pass, an error in a callback) does not leave autocast switched on. An fp16 step
    synchronises with the device once (the overflow check that skips it), fastai's twice.
    """

    def __init__(self, amp_mode: str | AMPMode = AMPMode.FP16, **kwargs):
        if str(getattr(amp_mode, "value", amp_mode)) not in ("fp16", "bf16"):
            raise ValueError(f"mixed precision must be 'fp16' or 'bf16', got {amp_mode!r}")
        super().__init__(amp_mode, **kwargs)
        self._autocasting = False

    @property
    def name(self) -> str:
        return "mixed_precision"  # fastai's attribute name, whichever class provides it

    def before_fit(self) -> None:
        device = training_device(self.learn)
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16: use fp16 mixed precision instead")
        if dtype == torch.float16 and device.type == "cpu":
            warnings.warn("fp16 mixed precision on a CPU runs on its float16 kernels, which are slow (nf_resnet_tiny "
                          "on digits trained about 35x slower than in fp32 on a 2-core CPU): on a CPU use bf16 "
                          "(--bf16, to_mixed_precision('bf16')) or fp32", RuntimeWarning, stacklevel=2)
        self.kwargs["enabled"] = dtype == torch.float16
        self.autocast = torch.autocast(device.type, dtype=dtype)
        self.learn.scaler = torch.amp.GradScaler(device.type, **self.kwargs)

    def before_batch(self) -> None:
        super().before_batch()
        self._autocasting = True

    def before_step(self) -> None:
        """Unscale the gradients and skip a step that overflowed, as fastai's does, without reading the loss
        scale to the host for its `scales` list: that was a second device synchronisation at every step
        (`GradScaler.get_scale`), for a list nothing reads. The one left decides whether the step is skipped."""
        self.skipped = True
        self.scaler.step(self)  # unscales in place; calls `self.step` (which clears `skipped`) unless inf/NaN
        if self.skipped:
            raise CancelStepException()

    def after_loss(self) -> None:
        super().after_loss()
        self._autocasting = False

    def after_fit(self) -> None:
        if self._autocasting and self.autocast is not None:
            self.autocast.__exit__(None, None, None)
            self._autocasting = False
        super().after_fit()

    def end_interrupted_fit(self) -> None:
        """The fit ended by an exception inside a batch: leave autocast (see `normfree.learner.fit_guard`)."""
        self.after_fit()


@patch
def to_mixed_precision(self: Learner, precision: str = "fp16", **scaler_kwargs) -> Learner:
    """Train in ``"fp16"`` or ``"bf16"`` mixed precision on the Learner's device, or back in ``"fp32"``.

    Replaces any mixed-precision callback already attached (fastai's included). `scaler_kwargs`
    go to fp16's `torch.amp.GradScaler`.
    """
    check_precision(precision)
    self.remove_cb(MixedPrecision)
    if precision == "fp32":
        return self
    return self.add_cb(DeviceMixedPrecision(precision, **scaler_kwargs))
