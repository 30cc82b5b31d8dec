"""AGC in other trainers, each adapter in its own module that imports its trainer's package (an optional extra):

- `huggingface`: `AGCCallback`, a `transformers.TrainerCallback` (``pip install 'normfree[hf]'``).
- `lightning`: `AGCCallback`, a `lightning.pytorch.Callback` (``pip install 'normfree[lightning]'``).
- `base`: what both keep (torch only).

accelerate needs no adapter: ``normfree.agc_hook(optimizer, model)`` on the prepared optimizer clips inside the torch
optimizer's step, after accelerate's GradScaler unscaled the gradients, once per sync step. Nothing here is imported by
``import normfree``; these modules import only `normfree.agc` (and what it needs) and their trainer.
"""

__all__ = ["huggingface", "lightning"]  # modules: each imports its trainer, so none is imported here
