"""Counting host synchronisations on the CPU (`HostSyncs`): what would stall a GPU, for tests/test_host_sync.py and
tests/test_agc_sharded.py (torch only: the processes those spawn import it)."""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operations that read a device value on the host, or whose output size depends on values
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class HostSyncs(TorchDispatchMode):
    """Where host synchronisations happen while active: one entry per call, its last frames as file:function."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def note(self) -> None:
        frames = [f for f in traceback.extract_stack() if f.name not in ("note", "noted", "__torch_dispatch__")]
        self.sites.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames[-6:][::-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in SYNCING_OPS or boolean_index:
            self.note()
        return func(*args, **(kwargs or {}))
