"""Tuning knobs of the per-sample engines: scratch budget and how k x k convolutions materialise g_i.

One object, `TUNING`, read by the engines at every backward pass; a benchmark or a test changes
its fields (or uses `tuned(...)`) to time or check the alternatives. No knob changes the
result beyond floating-point rounding: they only trade memory, kernel count and kernel kind.

- `cpu_scratch_bytes` / `cuda_scratch_bytes`: examples are processed in chunks whose scratch
  tensors (patches, per-example gradients g_i or Gram matrices) take about this many bytes, so
  memory stays bounded whatever the batch size. The CPU's is sized for its caches (16 MiB). A GPU
  wants few large kernels (every chunk repeats a layer's launches, and the step is bound by the
  host), so by default (`cuda_scratch_bytes` None) its budget comes from the device's memory:
  `cuda_scratch_share` of what the allocator holds when the layer's plan is made (a quarter: the
  step's peak memory then grows by about that share at most), and at most half of what is still
  free (`torch.cuda.mem_get_info` plus the allocator's cached blocks), and at least 16 MiB. An
  int fixes it. Other accelerators get 256 MiB.
- `cpu_pass_cost` / `cuda_pass_cost`: what one pass over an entry of a materialised g_i costs
  (writing it, its norm, the clipped sum), in multiply-adds of a matmul, for the cost model that
  chooses between materialising g_i and ghost norms (`layers.Layer.plan`). 4 on the CPU (measured
  on nf_resnet26: 1 made its step 1.4 times slower); 100 on a GPU, whose matmuls are about that much
  faster than its passes over memory, which favours ghost norms for layers with few positions.
- `layer_graphs`: "cuda" (default): on CUDA, each layer's per-sample work is captured in a CUDA graph on its
  second call and replayed from then on (`graphs`); "off": never; "emulated": on any device, the same
  book-keeping with re-run functions in place of graphs (for tests on machines without a GPU).
- `kxk_weight_grads`: how per-example gradients of k x k convolutions (k > 1) are materialised:
  "conv", one weight-gradient convolution with the examples as groups (fastest on the CPU), or
  "bmm", im2col patches (a strided view of the input, copied once) and a batched matmul delta_i @ U_i^T (cuDNN's grouped
  weight-gradient kernel is slow). None: "conv" on the CPU, "bmm" elsewhere.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

__all__ = ["TUNING", "Tuning", "tuned"]

KXK_METHODS = ("conv", "bmm")
GRAPH_MODES = ("cuda", "off", "emulated")
MIN_SCRATCH_BYTES = 16 << 20  # the CPU's budget, and the floor of a GPU's
OTHER_DEVICE_SCRATCH_BYTES = 256 << 20


@dataclass
class Tuning:
    cpu_scratch_bytes: int = MIN_SCRATCH_BYTES
    cuda_scratch_bytes: int | None = None  # None: from the device's memory
    cuda_scratch_share: float = 0.25
    cpu_pass_cost: float = 4.0
    cuda_pass_cost: float = 100.0
    kxk_weight_grads: str | None = None  # "conv", "bmm" or None (by device)
    layer_graphs: str = "cuda"  # "cuda", "off" or "emulated"

    def scratch_key(self, device: torch.device) -> tuple:
        """The knobs `scratch_bytes` reads for `device`: what a plan made with its budget depends on (the
        budget itself is measured on the device when a plan is made, not at every backward pass)."""
        if device.type == "cpu":
            return (self.cpu_scratch_bytes,)
        return self.cuda_scratch_bytes, self.cuda_scratch_share

    def scratch_bytes(self, device: torch.device) -> int:
        if device.type == "cpu":
            return self.cpu_scratch_bytes
        if self.cuda_scratch_bytes is not None:
            return self.cuda_scratch_bytes
        if device.type != "cuda":
            return OTHER_DEVICE_SCRATCH_BYTES
        held = torch.cuda.memory_allocated(device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - held
        return int(max(MIN_SCRATCH_BYTES, min(self.cuda_scratch_share * held, free / 2)))

    def pass_cost(self, device: torch.device) -> float:
        return self.cpu_pass_cost if device.type == "cpu" else self.cuda_pass_cost

    def graph_mode(self, device: torch.device) -> str:
        """"cuda", "emulated" or "off": how `graphs.LayerGraphs` runs layers' per-sample work on `device`."""
        if self.layer_graphs not in GRAPH_MODES:
            raise ValueError(f"per-sample AGC: layer_graphs must be one of {GRAPH_MODES}, not {self.layer_graphs!r}")
        if self.layer_graphs == "cuda":
            return "cuda" if device.type == "cuda" else "off"
        return self.layer_graphs

    def kxk_method(self, device: torch.device) -> str:
        method = self.kxk_weight_grads or ("conv" if device.type == "cpu" else "bmm")
        if method not in KXK_METHODS:
            raise ValueError(f"per-sample AGC: kxk_weight_grads must be one of {KXK_METHODS} or None, not {method!r}")
        return method


TUNING = Tuning()


@contextmanager
def tuned(**changes) -> Iterator[Tuning]:
    """Within the block, `TUNING` has the given fields changed (e.g. `tuned(kxk_weight_grads="bmm")`)."""
    before = {f.name: getattr(TUNING, f.name) for f in fields(TUNING)}
    for name, value in changes.items():
        if name not in before:
            raise TypeError(f"no tuning knob {name!r}; knobs: {', '.join(before)}")
        setattr(TUNING, name, value)
    try:
        yield TUNING
    finally:
        for name, value in before.items():
            setattr(TUNING, name, value)
