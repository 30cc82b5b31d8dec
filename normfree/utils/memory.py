"""Peak memory of one piece of work (a training run), measured cleanly even when runs share a process.

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`: the tensors' peak.
- CPU on Linux: writing "5" to ``/proc/self/clear_refs`` resets the process's resident-set
  high-water mark (``VmHWM`` in ``/proc/self/status``) to the current resident size, so the mark
  read afterwards is the peak resident memory of the process *during* the work. Before the reset,
  garbage is collected and glibc's ``malloc_trim`` hands freed heap pages back to the system, so
  that memory an earlier run freed but the allocator kept does not count for this one. The peak
  includes what the process holds anyway (Python, torch, the data): compare runs by their differences.
- Anywhere else no clean per-run peak exists, and the measurement is None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path
from types import TracebackType

import torch

__all__ = ["PeakMemory"]

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_HIGH_WATER = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def _resident_high_water_kib() -> int | None:
    try:
        found = _HIGH_WATER.search(_STATUS.read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


def _reset_resident_high_water() -> bool:
    _release_freed_memory()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as peak: ...`` then ``peak.mib`` (None if unmeasurable).

    `kind` says what was measured: ``"cuda allocated"``, ``"process resident"`` or None.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mib: float | None = None
        self.kind: str | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda allocated"
        elif _reset_resident_high_water() and _resident_high_water_kib() is not None:
            self.kind = "process resident"
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.read()

    def read(self) -> float | None:
        """The peak so far (MiB) since entering; also stored in `mib`."""
        if self.kind == "cuda allocated":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "process resident":
            kib = _resident_high_water_kib()
            self.mib = None if kib is None else kib / 1024
        return self.mib
