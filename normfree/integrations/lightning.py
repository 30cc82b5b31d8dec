"""AGC for Lightning: `AGCCallback`.

Lightning calls ``on_before_optimizer_step`` once per optimizer step, after the backward passes of all the
accumulated batches and, under ``precision="16-mixed"``, after unscaling the gradients (except for optimizers
that unscale inside their step, ``fused=True``: `AGCCallback` unscales those itself); then its own
``gradient_clip_val`` clipping; then the step, which the fp16 scaler skips on an inf/NaN gradient.
"""
from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import Callback

from .base import TrainerAGC

__all__ = ["AGCCallback"]


class AGCCallback(TrainerAGC, Callback):
    """Adaptive Gradient Clipping for a Lightning `Trainer`: ``Trainer(..., callbacks=[AGCCallback(0.01)])``.

    Clips each optimizer's whole step (accumulated over ``accumulate_grad_batches``, unscaled under 16-mixed), once
    per optimizer step, and not at all on a step the fp16 scaler skips. The arguments and rules are
    `normfree.agc.hook.OptimizerAGC`'s (`clipping`, `eps`, `skip_classifier`, `exclude`); the LightningModule's final
    ``nn.Linear`` (or ``get_classifier()``) is the classifier left alone. `history` holds the units clipped per step
    (of the first optimizer; `clippers` has one per optimizer). Leave ``gradient_clip_val`` unset for AGC alone (it
    warns once otherwise).
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self.clippers = []
        if trainer.gradient_clip_val:
            warnings.warn(f"Lightning clips the gradients ({trainer.gradient_clip_algorithm or 'norm'}, "
                          f"gradient_clip_val={trainer.gradient_clip_val}) after AGC: leave gradient_clip_val unset "
                          f"for AGC alone", stacklevel=2)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.clip_before_step(optimizer, pl_module, getattr(trainer.precision_plugin, "scaler", None))
