"""CUDA graphs of the per-sample work in each layer's backward pass: one graph launch instead of dozens of ops.

On a GPU the per-sample step is bound by the host: a layer's per-sample work (its per-example norms, AGC's
rule, the clipped sums, weight standardisation's backward) is some forty small kernels, each costing
more host time than GPU time (an H200 ran nf_resnet26's per-sample step in 11 ms of kernels and 64 ms of
host time). `LayerGraphs.run` captures that work per layer and input layout into a CUDA graph on the
layer's second call and replays it from then on (at most `MAX_LAYOUTS` input layouts per layer; others run
without a graph).

A graph replays the same kernels on the same addresses. So:

- the layer's input and output signal are copied into one arena of the clipper's (`_Arena`), the same
  memory for every layer (the layers' backward passes run one after another on one stream), sized for
  the largest layer: the step's memory grows by one layer's activations, not by all of them;
- the parameters (fixed addresses) are read where they are, AGC's thresholds included; a graph is keyed
  on their data pointers;
- the signal's scale is read from a tensor of the rule's that `ExampleRule.prepare_backward` rewrites once per
  pass, before any layer replays;
- the clip tally (`tally`) is added to in place, in a buffer that stays put; the units the work
  saw (Python ints) are noted again at each replay (`ClipTally.units_of`);
- the outputs (the parameters' gradients) are the graph's own tensors, rewritten by its next replay:
  autograd adds them into an existing `.grad`, and copies them into a new one. They sit side by side in
  one buffer, in their parameters' layouts, so that for new ones a replay hands out views of one copy,
  which autograd keeps as they are (`_Captured.handed_out`).

The input gradient of the layer is not in the graph (it is one kernel, and autograd holds it across
other layers' backward passes). `TUNING.layer_graphs` chooses: "cuda" (the default: CUDA tensors), "off",
or "emulated", which runs the same book-keeping on any device by re-running the recorded function on the
arena's tensors and copying its results into the captured outputs, as a replay would (how the CPU
tests check the mechanism). A capture that fails turns graphs off for that layer and layout, with one warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .tuning import TUNING

if TYPE_CHECKING:
    from .tally import ClipTally

__all__ = ["LayerGraphs"]

# A layer's per-sample work: its parameter gradients (or None) from its input and output signal. A graph of it must
# not read other tensors that are new at every pass (it would read the ones it was captured with).
LayerWork = Callable[[Tensor, Tensor], tuple]

_ALIGN = 256  # bytes: the arena's tensors start at CUDA's allocation alignment
_FIRST_CALL, _EAGER = "first call", "eager"  # _EAGER: capture failed, or the layer has MAX_LAYOUTS
# Graphs per layer at most: the full batch, a last partial one and an accumulation split need three; inputs whose
# shapes keep changing (sequences of any length) would otherwise hold one graph, and its outputs, per shape
MAX_LAYOUTS = 4


def _dense(t: Tensor) -> bool:
    """Whether `t`'s elements fill `t.numel()` consecutive slots in some order of its dims (contiguous, channels-last,
    transposed): what the arena can mirror, layout included. Others run without a graph."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _aligned_bytes(t: Tensor) -> int:
    return -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN


class _Arena:
    """One buffer for the static inputs of every layer's graph, sized in the forward pass for the largest layer
    (`reserve`), so that the first capture allocates it once. Should a later capture need more, a new buffer at
    least twice as large is made: a graph keeps the buffer it was captured with (a view holds it)."""

    def __init__(self):
        self.buffer: Tensor | None = None
        self.needed = 0  # bytes: the largest layer's input and output signal, seen in forward passes

    def reserve(self, tensors: list[Tensor]) -> None:
        self.needed = max(self.needed, sum(map(_aligned_bytes, tensors)))

    def static_like(self, tensors: list[Tensor]) -> list[Tensor]:
        """Tensors of the shapes, strides and dtypes of `tensors` (dense ones), side by side in the arena."""
        offsets, size = [], 0
        for t in tensors:
            offsets.append(size)
            size += _aligned_bytes(t)
        device = tensors[0].device
        if self.buffer is None or self.buffer.numel() < size or self.buffer.device != device:
            first = self.buffer is None or self.buffer.device != device
            grown = max(size, self.needed) if first else max(size, 2 * self.buffer.numel())
            self.buffer = torch.empty(grown, dtype=torch.uint8, device=device)
        return [self.buffer[at : at + t.numel() * t.element_size()].view(t.dtype).as_strided(t.shape, t.stride())
                for at, t in zip(offsets, tensors)]


def _packed_layouts(outputs: tuple, like: tuple) -> list[tuple[int, torch.Size, tuple[int, ...]] | None] | None:
    """Where each gradient of `outputs` goes in one buffer, in the layout of its parameter in `like`: (offset,
    shape, strides), None for a missing one; None if they cannot share a buffer (dtypes or devices differ, a
    parameter is not dense, or there is none)."""
    present = [(out, p) for out, p in zip(outputs, like) if out is not None]
    if not present or len({(out.dtype, out.device) for out, _ in present}) > 1 \
            or not all(p is not None and out.shape == p.shape and _dense(p) for out, p in present):
        return None
    layouts, offset = [], 0
    for out, p in zip(outputs, like):
        layouts.append(None if out is None else (offset, p.shape, p.stride()))
        offset += 0 if out is None else p.numel()
    return layouts


@dataclass
class _Captured:
    inputs: list[Tensor]  # in the arena
    outputs: tuple  # the graph's own tensors (or None): views of `packed` where it is not None
    packed: Tensor | None  # the graph's gradients side by side, each in its parameter's layout
    units: list[tuple[int, int]]  # what the work added to the tally's units seen
    graph: torch.cuda.CUDAGraph | None  # None: emulated, `work` re-run at each replay
    work: LayerWork

    def handed_out(self, like: tuple) -> tuple:
        """This replay's gradients for autograd, for the parameters `like`. Where their `.grad` is None, autograd
        would copy a graph's own tensors one by one: packed ones are handed out as views of one copy, in their
        parameters' layouts, which it takes as they are. Where a `.grad` exists, autograd adds into it in place,
        and the graph's tensors serve as they are."""
        if self.packed is None or any(p is not None and p.grad is not None for p in like):
            return self.outputs
        copy = self.packed.clone()
        return tuple(None if out is None else copy.as_strided(out.shape, out.stride(), out.storage_offset())
                     for out in self.outputs)


class LayerGraphs:
    """The layers' per-sample work of one clipper, captured per layer and input layout (`run`); what the work adds to
    the clipper's `tally` is added again at each replay."""

    def __init__(self, tally: ClipTally):
        self.tally = tally
        self._reset()

    def _reset(self) -> None:
        self.arena = _Arena()
        self._entries: dict[tuple, _Captured | str] = {}  # by layer and key: a graph, _FIRST_CALL or _EAGER
        self._layouts: dict[int, int] = {}  # graphs captured, by layer
        self._pool = None  # one CUDA memory pool for all of the clipper's graphs (they replay in capture order)
        self._stream: torch.cuda.Stream | None = None
        self.captured = 0  # graphs captured
        self.failures: list[str] = []  # why captures failed (the first one is also warned about)

    def __getstate__(self) -> dict:
        """A copy (a deep-copied or pickled model with the clipper installed) starts without graphs."""
        return {"tally": self.tally}

    def __setstate__(self, state: dict) -> None:
        self.tally = state["tally"]
        self._reset()

    def note_forward(self, x: Tensor, out: Tensor) -> None:
        """A layer's forward pass gave `out` from `x`: the arena will hold x and a signal like `out`."""
        if TUNING.graph_mode(x.device) != "off":
            self.arena.reserve([x, out])

    def run(self, layer: object, key: tuple, work: LayerWork, x: Tensor, signal: Tensor, like: tuple) -> tuple:
        """`layer`'s `work(x, signal)`, from a graph where `TUNING.layer_graphs` allows; `key` is what else the work
        depends on (joined by the layer, the layout of x and signal, the knobs and the mode); `like` holds the
        parameters whose gradients the work returns, in its order (or None)."""
        mode = TUNING.graph_mode(x.device)
        if mode == "off" or not (_dense(x) and _dense(signal)) \
                or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return work(x, signal)
        key = (id(layer), key, mode, tuple(vars(TUNING).values()),  # its fields (astuple: 8 us a call)
               *((t.shape, t.stride(), t.dtype, t.device) for t in (x, signal)))
        graphs = self._entries
        entry = graphs.get(key)
        if entry is None:  # first call: eager, so that plans are made and cuDNN and cuBLAS have their algorithms
            graphs[key] = _FIRST_CALL
            return work(x, signal)
        if entry is _EAGER:
            return work(x, signal)
        if entry is _FIRST_CALL:
            if self._layouts.get(id(layer), 0) >= MAX_LAYOUTS:
                graphs[key] = _EAGER
                return work(x, signal)
            try:
                entry = graphs[key] = self._capture(mode, work, x, signal, like)
                self.captured += 1
                self._layouts[id(layer)] = self._layouts.get(id(layer), 0) + 1
            except Exception as error:  # noqa: BLE001 - any failure: eager from now on, correct and slower
                graphs[key] = _EAGER
                self._warn(error)
                return work(x, signal)
        for static, t in zip(entry.inputs, (x, signal)):
            static.copy_(t)
        if entry.graph is None:
            self._emulated_replay(entry)
        else:
            entry.graph.replay()
        self.tally.note_units(entry.units)
        return entry.handed_out(like)

    def _capture(self, mode: str, work: LayerWork, x: Tensor, signal: Tensor, like: tuple) -> _Captured:
        inputs = self.arena.static_like([x, signal])
        for static, t in zip(inputs, (x, signal)):
            static.copy_(t)
        if mode == "emulated":  # a capture records and executes nothing: the tally is put back as it was
            with self.tally.restored():
                return self._record(work, inputs, like, None)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(x.device)
        current = torch.cuda.current_stream(x.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            # thread_local: autograd's device thread captures while other threads (loaders) may use CUDA
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                captured = self._record(work, inputs, like, graph)
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        return captured

    def _record(self, work: LayerWork, inputs: list[Tensor], like: tuple, graph: torch.cuda.CUDAGraph | None
                ) -> _Captured:
        """The work on the arena's tensors, its gradients packed into one buffer where they can share one."""
        outputs, units = self.tally.units_of(lambda: work(*inputs))
        layouts = _packed_layouts(outputs, like)
        packed = None
        if layouts is not None:
            first = next(out for out in outputs if out is not None)
            size = sum(shape.numel() for _, shape, _ in filter(None, layouts))
            packed = torch.empty(size, dtype=first.dtype, device=first.device)
            views = tuple(None if at is None else packed.as_strided(at[1], at[2], at[0]) for at in layouts)
            for view, out in zip(views, outputs):
                if view is not None:
                    view.copy_(out)
            outputs = views
        return _Captured(inputs, outputs, packed, units, graph, work)

    def _emulated_replay(self, entry: _Captured) -> None:
        """What a replay does: the captured work on the arena's tensors, its outputs written into the captured
        ones (a graph rewrites its own tensors), its tally added; `run` notes its units."""
        outputs, _ = self.tally.units_of(lambda: entry.work(*entry.inputs))
        for old, new in zip(entry.outputs, outputs):
            if old is not None:
                old.copy_(new)

    def _warn(self, error: Exception) -> None:
        self.failures.append(f"{type(error).__name__}: {error}")
        if len(self.failures) == 1:
            warnings.warn(f"per-sample AGC: a layer's CUDA graph could not be captured ({type(error).__name__}: "
                          f"{error}); that layer runs without one (correct, slower). Set "
                          "normfree.agc.per_sample.TUNING.layer_graphs = 'off' to turn them off.",
                          RuntimeWarning, stacklevel=2)
