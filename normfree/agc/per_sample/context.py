"""What the per-sample engines depend on: the rule (thresholds, factors, the tally), the recording, the graphs.

The engines (`layers`, `containers`, `generic`) receive an `EngineContext` when `clipper` installs them, and use
nothing else of per-sample AGC's state.
"""
from __future__ import annotations

from dataclasses import dataclass

from .example_rule import ExampleRule
from .graphs import LayerGraphs
from .recording import Recording

__all__ = ["EngineContext"]


@dataclass(frozen=True)
class EngineContext:
    rule: ExampleRule  # `factors` for per-example unit norms (and which parameters are clipped)
    recording: Recording  # whether a forward records now, the checks on its calls, the modules' names
    graphs: LayerGraphs  # each layer's per-sample work as a CUDA graph (`layers` only)
