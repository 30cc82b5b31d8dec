"""Which process of a launched run this is, read from the variables torchrun and accelerate set (WORLD_SIZE,
RANK); one process without a launcher. `normfree.app.distributed` runs the launched training."""
from __future__ import annotations

import os

__all__ = ["is_main", "launched", "rank", "world_size"]


def world_size() -> int:
    """How many processes train this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's place in the run, 0 to world_size() - 1 (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return world_size() > 1


def is_main() -> bool:
    """Whether this process speaks and writes for the run: rank 0, or the only process."""
    return rank() == 0
