"""Per-sample AGC and the loss: what the backward pass multiplies each example's own loss gradient by.

`PerSampleClipper` recovers example i's gradient from the signal reaching a layer by dividing out that
factor: 1/N for a mean over N examples (1 for a sum), times whatever scaled the loss after the loss
function computed it (gradient accumulation's 1/k, a grad scaler's 2^s). Those are read off the model
output's gradient itself, as its ratio to the loss function's own gradient, so no training loop has to
report them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .clipper import PerSampleClipper

__all__ = ["LossGradScale", "loss_reduction"]


def loss_reduction(loss_func, pred: Tensor, *targets: Tensor) -> str:
    """How `loss_func` reduces per-example terms: "mean" or "sum"; ValueError if it is neither.

    Checked directly: the loss of the batch must equal the mean (or the sum) of the losses of its
    examples one at a time. A weighted mean, a median or any custom reduction fails the check.
    """
    with torch.no_grad():
        batch = float(loss_func(pred, *targets))
        each = [float(loss_func(pred[i : i + 1], *(t[i : i + 1] for t in targets))) for i in range(len(pred))]
    tolerance = 1e-4 * max(1.0, abs(batch))
    if abs(batch - sum(each) / len(each)) <= tolerance:
        return "mean"
    if abs(batch - sum(each)) <= tolerance:
        return "sum"
    name = getattr(loss_func, "__name__", type(loss_func).__name__)
    raise ValueError(
        f"per-sample AGC needs a loss that is the mean or the sum of one term per example; {name} on this batch "
        f"is {batch:.6g}, but the mean of its per-example values is {sum(each) / len(each):.6g} and their sum "
        f"{sum(each):.6g} (a custom or weighted reduction?). Use a standard loss such as CrossEntropyLossFlat, "
        "or turn per_sample off"
    )


class LossGradScale:
    """Sets `clipper.grad_scale` during each backward pass from the gradient reaching the model output."""

    def __init__(self, clipper: PerSampleClipper):
        self.clipper = clipper
        self.reduction: str | None = None  # found on the first batch: "mean" or "sum"
        self.checked_proportional = False

    def watch(self, loss_func, pred: Tensor, targets: tuple[Tensor, ...]) -> None:
        """Before the backward pass of `loss_func(pred, *targets)`: hook `pred` to set the clipper's grad scale."""
        if self.reduction is None:
            self.reduction = loss_reduction(loss_func, pred.detach(), *targets)
        with torch.enable_grad():
            detached = pred.detach().requires_grad_()
            own, = torch.autograd.grad(loss_func(detached, *targets), detached)
        own = own.float()
        per_example = len(pred) if self.reduction == "mean" else 1

        def set_grad_scale(signal: Tensor) -> None:
            # signal = k * own: k is what GradientAccumulation and the grad scaler multiplied the loss by
            k = (signal.float() * own).sum() / own.square().sum().clamp_min(torch.finfo(torch.float32).tiny)
            if not self.checked_proportional:
                self._check_proportional(signal.float(), k * own, loss_func)
            self.clipper.grad_scale = torch.where(k > 0, k / per_example, torch.ones_like(k))

        pred.register_hook(set_grad_scale)

    def _check_proportional(self, signal: Tensor, expected: Tensor, loss_func) -> None:
        if float((signal - expected).norm()) > 1e-3 * float(signal.norm()) + 1e-30:
            raise ValueError(
                "per-sample AGC: the gradient reaching the model output is not a multiple of the loss function's "
                f"own gradient, so per-example gradients cannot be recovered; does a callback change the loss after "
                f"{type(loss_func).__name__} computed it? Turn per_sample off for such a set-up"
            )
        self.checked_proportional = True
