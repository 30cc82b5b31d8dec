"""Adaptive Gradient Clipping, the core (Brock et al. 2021, Sec. 4). Needs torch only: no fastai, no matplotlib.

- `rule`: what a unit is, unit-wise norms, the clip factor of Eq. (3), the defaults and the norm floor.
- `clip`: `adaptive_clip_grad_`, the rule applied in place to a list of parameters, by
  - `cpu_kernel` (the fused C kernel in ``csrc/``), `gpu_kernel` (the fused Triton kernel), or torch ops.
- `sharded`: where a DTensor's units are (FSDP2, tensor parallelism), and the all-reduces that complete them.
- `exclusion`: which parameters AGC leaves alone (the final classifier, user patterns).
- `history`: `ClipHistory`, the units clipped per parameter at each step.
- `hook`: `agc_hook`, AGC inside any torch optimizer's step (GradScaler and accumulation included), and
  `OptimizerAGC`, the same clipping for the trainer adapters (`normfree.integrations`).
- `per_sample`: AGC on each example's gradient inside the backward pass, one module per engine; `per_sample_agc`
  installs it for any training loop.
"""
from .clip import ClipStats, adaptive_clip_grad_, clip_with_torch_ops
from .exclusion import excluded_parameters
from .history import ClipHistory
from .hook import AGCHook, OptimizerAGC, agc_hook
from .per_sample import PerSampleClipper, per_sample_agc
from .rule import DEFAULT_CLIPPING, DEFAULT_EPS, GRAD_NORM_FLOOR, adaptive_clip_factor, num_units, unitwise_norm

__all__ = ["AGCHook", "ClipHistory", "ClipStats", "DEFAULT_CLIPPING", "DEFAULT_EPS", "GRAD_NORM_FLOOR", "OptimizerAGC",
           "PerSampleClipper", "adaptive_clip_factor", "adaptive_clip_grad_", "agc_hook", "clip_with_torch_ops",
           "excluded_parameters", "num_units", "per_sample_agc", "unitwise_norm"]
