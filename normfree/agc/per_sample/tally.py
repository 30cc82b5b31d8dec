"""The clip tally of per-sample AGC: per clipped parameter, the (example, unit) pairs clipped, non-finite and seen.

Counted on the device, in place, without host synchronisation: a layer's CUDA graph (`graphs`) adds its pass's
counts at every replay, in a buffer that stays where it is. The pairs seen are Python ints, which a replay cannot
add, so the graphs take what a captured call added (`units_of`) and note it again at each replay (`note_units`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..clip import ClipStats
from ..rule import num_units

__all__ = ["ClipTally"]

T = TypeVar("T")


def _summed_over_processes(clipped: Tensor, nonfinite: Tensor, units: list[int]) -> tuple[Tensor, Tensor, list[int]]:
    """Clip counts of all processes of a distributed run, summed on the device (no host synchronisation). Every
    process clipped the same number of examples (data-parallel shards are equal), so the units scale by the count."""
    for counts in (clipped, nonfinite):  # fresh tensors of this collect: reduced in place
        dist.all_reduce(counts)
    return clipped, nonfinite, [u * dist.get_world_size() for u in units]


class ClipTally:
    """The clipped, non-finite and seen (example, unit) pairs of each of `params`, since the last `collect`."""

    def __init__(self, params: Sequence[Tensor]):
        self._position = {id(p): i for i, p in enumerate(params)}
        # per parameter: its units' clipped and non-finite pairs, rows of [2, all units] on the device (parameter i's
        # columns start at `_offsets[i]`), made at the first `add` and added to in place
        self._offsets = [0]
        for p in params:
            self._offsets.append(self._offsets[-1] + num_units(p))
        self._buffer: Tensor | None = None
        self._ends: Tensor | None = None  # `_offsets` on the buffer's device
        self._units = [0] * len(params)

    def add(self, params: list[Tensor], factor: Tensor, norm: Tensor, units: list[int]) -> None:
        """Add the clipped (`factor` below 1) and the non-finite (`norm` inf or NaN) pairs of one evaluation of the
        rule, [units of `params`, examples], to the running per-unit tally, in place, and its pairs to those seen."""
        if self._buffer is None or self._buffer.device != factor.device:
            if factor.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("per-sample AGC: run one backward pass before capturing one in a CUDA graph "
                                   "(the first makes the clip tally, which a graph would otherwise re-create at each "
                                   "replay)")
            self._buffer = torch.zeros(2, self._offsets[-1], dtype=torch.long, device=factor.device) \
                if self._buffer is None else self._buffer.to(factor.device)
            self._ends = torch.tensor(self._offsets, device=factor.device)
        # norms are >= 0: not below inf is inf or NaN (isfinite is four kernels)
        marks = torch.stack([factor < 1, (norm < math.inf).logical_not_()]).sum(-1)  # [2, units]
        positions = [self._position[id(p)] for p in params]
        torch._foreach_add_([self._buffer[:, self._offsets[i] : self._offsets[i + 1]] for i in positions],
                            list(marks.split(units, dim=1)))
        for i, u in zip(positions, units):
            self._units[i] += u * factor.shape[1]

    def units_of(self, work: Callable[[], T]) -> tuple[T, list[tuple[int, int]]]:
        """`work()`, and the (parameter position, units) it added to the pairs seen, taken back out (a layer's CUDA
        graph records them at its capture, and `note_units` adds them at every replay)."""
        before = list(self._units)
        try:
            result = work()
        finally:  # a capture that fails part-way leaves none of its units behind
            after, self._units = self._units, before
        return result, [(i, b - a) for i, (a, b) in enumerate(zip(before, after)) if b != a]

    def note_units(self, added: list[tuple[int, int]]) -> None:
        """Count these (parameter position, units) as seen (a replayed layer's)."""
        for i, n in added:
            self._units[i] += n

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Within the block, `add` leaves the counts as they were (an emulated CUDA graph capture: a capture records
        kernels and executes none)."""
        saved = None if self._buffer is None else self._buffer.clone()
        try:
            yield
        finally:
            if saved is not None:
                self._buffer.copy_(saved)

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset.

        In a distributed run they count the examples of all processes: each process clipped only its own.
        """
        n = len(self._units)
        units, self._units = self._units, [0] * n
        if self._buffer is None:
            clipped = nonfinite = torch.zeros(n, dtype=torch.long)
        else:
            # per parameter, the sum of its units' tallies: differences of the running sum at its offsets
            running = F.pad(self._buffer.cumsum(1), (1, 0))
            clipped, nonfinite = running.index_select(1, self._ends).diff(dim=1)
            self._buffer.zero_()  # in place: the layers' CUDA graphs add to it
            if dist.is_initialized() and dist.get_world_size() > 1:
                clipped, nonfinite, units = _summed_over_processes(clipped, nonfinite, units)
        clipped, nonfinite = clipped.unbind(), nonfinite.unbind()
        zero = torch.zeros((), dtype=torch.long, device=clipped[0].device if clipped else "cpu")
        stats = []
        for params in groups:
            at = [self._position.get(id(p)) for p in params]
            stats.append(ClipStats(
                torch.stack([zero if i is None else clipped[i] for i in at]) if at else zero.new_zeros(0),
                torch.stack([zero if i is None else nonfinite[i] for i in at]) if at else zero.new_zeros(0),
                torch.tensor([0 if i is None else units[i] for i in at], dtype=torch.long),
            ))
        return stats
