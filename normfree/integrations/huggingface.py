"""AGC for the Hugging Face `transformers.Trainer`: `AGCCallback`.

The Trainer's step, at the end of each gradient-accumulation window: its own global-norm clipping
(`TrainingArguments.max_grad_norm`, 1.0 by default, which also unscales fp16 gradients through accelerate), the
gradient norm it logs, ``on_pre_optimizer_step``, ``optimizer.step()`` (accelerate's GradScaler skips a step with an
inf/NaN gradient there), ``on_optimizer_step``. AGC clips in ``on_pre_optimizer_step``: the last point before the
update. ``on_optimizer_step`` runs after the update, so clipping there changes nothing the model learns.
"""
from __future__ import annotations

import warnings

from transformers import TrainerCallback

from .base import TrainerAGC

__all__ = ["AGCCallback"]


class AGCCallback(TrainerAGC, TrainerCallback):
    """Adaptive Gradient Clipping for the Hugging Face Trainer: ``Trainer(..., callbacks=[AGCCallback(0.01)])``.

    Clips the whole step's gradient (accumulated over ``gradient_accumulation_steps``, unscaled under fp16), once
    per optimizer step, and not at all on a step the fp16 scaler skips. The arguments and rules are
    `normfree.agc.hook.OptimizerAGC`'s (`clipping`, `eps`, `skip_classifier`, `exclude`); the model's final
    ``nn.Linear`` (or ``get_classifier()``) is the classifier left alone. `history` holds the units clipped per
    step. Set ``max_grad_norm=0`` in `TrainingArguments` for AGC alone: otherwise the Trainer clips the global norm
    first (it warns once). DeepSpeed, which steps and clips inside its own engine, is not supported.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        self.clippers = []
        if args.max_grad_norm:
            warnings.warn(f"the Trainer clips the gradients' global norm to {args.max_grad_norm} before AGC "
                          f"(TrainingArguments.max_grad_norm, 1.0 by default): pass max_grad_norm=0 for AGC alone",
                          stacklevel=2)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate's prepared optimizer keeps the GradScaler of fp16 training as .scaler
        self.clip_before_step(optimizer, model, getattr(optimizer, "scaler", None))
