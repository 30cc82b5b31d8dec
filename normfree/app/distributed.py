"""`normfree train` data-parallel under a launcher: ``torchrun --nproc_per_node N -m normfree train ...`` or
``accelerate launch --multi_gpu --num_processes N -m normfree train ...``.

A launcher starts N copies of the command and tells each its place in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``); a process without them trains alone, exactly as it always has. The N
processes of a launched run:

- join one process group (`process_group`): gloo on the CPU; on a machine with GPUs gloo for CPU tensors and
  NCCL for CUDA ones, each process on the GPU ``LOCAL_RANK``;
- train through fastai's `DistributedTrainer` (accelerate wraps the model in DistributedDataParallel),
  attached by `data_parallel` around the fits. fastai's own ``distrib_ctx`` is not used as is: its
  `DistributedDL` broadcasts the batch order through CUDA tensors (it fails on the CPU), and gives each
  process a contiguous slice of the *epoch*, so the processes' batches of one step are not the batch
  one process would see. `ShardedDL` gives process r the r-th slice of ``bs`` of every batch of
  ``bs * N``: a step of N processes with ``--bs B`` sees exactly the examples of a step of one
  process with ``--bs N*B``, the gradients are averaged across them (DDP's all-reduce, during the
  backward pass), and AGC clips the averaged gradient once (per-sample AGC clips each process's
  examples before the all-reduce). The last partial batch of a training epoch is dropped so that every
  process steps on an equal share. Validation pads its last batch and the predictions are gathered
  across processes with the padding removed, so the accuracy and the validation loss are over the
  whole validation set, each example once;
- agree before training (`agree`): rank 0 alone locks and checks ``--out``, every process builds
  its data and model, and all go on only if all succeeded; otherwise the first process that failed
  says why and the others stop without a word;
- leave the output folder to rank 0: only it writes config, metrics, checkpoint, weights and plots
  (`normfree.train`); on ``--resume`` every process reads the checkpoint;
- speak through rank 0 (`rank0_speaks`): the others print only an error of their own;
- stop together: Ctrl-C and SIGTERM reach every process (the launcher repeats them, so each process
  ignores the repeats once stopping, letting rank 0 write its checkpoint whole). During the fits a process
  does not stop where the signal lands, since another one may then wait for it in a collective (the batch
  order's broadcast, DDP's all-reduce) while it waits in another (the final barrier), until the launcher
  kills both: the signal is held back (`normfree.app.signals.stops_when_asked`) and after every batch the
  processes agree whether any of them has received one (`AgreedStop`), so all stop after the same batch.
  A process that fails makes the others' next collective fail, which stops them as an interruption
  (`PeerStopped`): rank 0 saves the run's state and says how to resume it.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner
from fastai.metrics import AccumMetric
from fastai.torch_core import apply
from torch.nn.parallel import DistributedDataParallel

from ..utils.errors import ConfigError
from ..utils.outdir import locked_folder
from ..utils.processes import is_main, launched, rank, world_size
from .config import AGC_AUTO, TrainConfig, command_line
from .signals import interrupt, stops_when_asked

__all__ = ["AgreedStop", "PeerStopped", "ShardedDL", "agree", "batches_per_epoch", "check_launch", "check_processes",
           "data_parallel", "gathered_metric", "is_main", "launched", "launcher_prefix", "process_group", "rank",
           "rank0_folder", "rank0_speaks", "shard_indices", "speaking_for", "world_size"]

T = TypeVar("T")


class PeerStopped(KeyboardInterrupt):
    """Another process of the run is gone (it failed, or was stopped): this one stops as if interrupted, so that
    rank 0 saves what the run has (`normfree.app.signals.how_stopped` names it by `stopped_by`)."""

    stopped_by = "another process's exit"


def _is_lost_peer(error: BaseException) -> bool:
    """A collective that failed because a process of the run is gone: gloo says so in a plain RuntimeError."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("Connection closed by peer" in str(error)
                                             or "Connection reset by peer" in str(error)))


@contextmanager
def process_group() -> Iterator[None]:
    """The block in the launcher's process group (nothing without a launcher). At its end, the processes wait
    for each other (rank 0 may still be writing) and leave the group together: gloo can abort (SIGABRT) a
    process whose peers left before it."""
    if not launched() or dist.is_initialized():  # a group of its own is the caller's to end
        yield
        return
    if torch.cuda.is_available():
        # each process its own GPU; fastai's default device is then this one. Gloo still carries the CPU tensors
        # (the batch order, `agree`'s flags) and a --device cpu run
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
        try:
            dist.barrier()
        except RuntimeError as error:
            if not _is_lost_peer(error):  # a process that stopped after another's exit: nobody left to wait for
                raise
    finally:
        dist.destroy_process_group()


def _all_gather(value: int) -> list[int]:
    flags = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    try:
        dist.all_gather(flags, torch.tensor([value], dtype=torch.long))
    except RuntimeError as error:
        if _is_lost_peer(error):
            raise PeerStopped() from error
        raise
    return [int(f) for f in flags]


_OWN_ERROR = "normfree_own_error"  # attribute `agree` sets on the error a process reports for the run


def agree(action: Callable[[], T]) -> T:
    """`action()` in every process of a launched run, which goes on only if it succeeded in all: otherwise the
    lowest-ranked process whose action failed raises its error (to be reported, `speaking_for`) and the
    others raise `PeerStopped` (no message: that process gives it). Without a launcher: just `action()`."""
    if not launched():
        return action()
    try:
        result, error = action(), None
    except Exception as failure:  # noqa: BLE001 - whatever it is, the other processes must hear of it
        result, error = None, failure
    failed = _all_gather(int(error is not None))
    first = failed.index(1) if 1 in failed else None
    if first is None:
        return result
    if first == rank():
        setattr(error, _OWN_ERROR, True)
        raise error
    raise PeerStopped()


@contextmanager
def rank0_folder(folder: str | Path, check: Callable[[], None]) -> Iterator[None]:
    """`locked_folder(folder)` and `check()` in it, held for the block: in rank 0 only, the other processes of
    a launched run neither create nor lock anything, and all go on only once rank 0 has (`agree`)."""
    with ExitStack() as stack:
        def lock_and_check() -> None:
            if is_main():
                stack.enter_context(locked_folder(folder))
                check()

        agree(lock_and_check)
        yield


@contextmanager
def rank0_speaks() -> Iterator[None]:
    """In processes other than rank 0, the block's messages, warnings and errors go nowhere: every process runs
    the same command on the same inputs, so rank 0 says it once. An exception that escapes the block is still
    printed by Python (its traceback, after the block), and `speaking_for` lets an error of the process's own
    through."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as nowhere, redirect_stdout(nowhere), redirect_stderr(nowhere):
        yield


@contextmanager
def speaking_for(error: BaseException) -> Iterator[None]:
    """Within the block, this process's real stderr, if `error` is one it reports for the run (`agree`)."""
    if is_main() or not getattr(error, _OWN_ERROR, False):
        yield
        return
    with redirect_stderr(sys.__stderr__):
        print(f"(process {rank()} of {world_size()})", file=sys.stderr)
        yield


def check_launch(config: TrainConfig, resuming: bool = False) -> None:
    """ConfigError for the settings a launched run cannot honour (nothing without a launcher)."""
    if not launched():
        return
    if config.lr_find and not resuming:
        raise ConfigError("lr_find", f"is not available with {world_size()} processes (fastai's finder would run "
                                     f"in each one); find the lr in one process (normfree train --lr-find ...: "
                                     f"config.json says lr_used), then launch with --lr")
    if config.agc == AGC_AUTO and not resuming:
        raise ConfigError("agc", f"auto is not available with {world_size()} processes (agc_find would run on each "
                                 f"process's own shard and choose its own lambda, and the replicas would drift apart); "
                                 f"find it in one process (normfree train --agc auto ...: config.json says agc_used), "
                                 f"then launch with --agc LAMBDA")
    if config.device is not None and torch.device(config.device).index is not None:
        raise ConfigError("device", f"{config.device} would put all {world_size()} processes on one device; leave "
                                    f"--device out (each process takes the GPU of its LOCAL_RANK) or give --device "
                                    f"cuda or cpu")


def launcher_prefix() -> str:
    """What to put before ``normfree train ...`` to start it as this process was started: ``torchrun
    --nproc_per_node N -m `` under a launcher (torchrun comes with torch), nothing in one process."""
    if not launched():
        return ""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    nodes = world_size() // per_node
    return f"torchrun {f'--nnodes {nodes} ' if nodes > 1 else ''}--nproc_per_node {per_node} -m "


def check_processes(trained_by: int, out: Path) -> None:
    """ConfigError naming ``resume`` unless this run has as many processes as the one that trained `out` so far:
    --bs is per process, so another number would change the batch (and the batch order) midway."""
    if trained_by == world_size():
        return
    start = "normfree train" if trained_by == 1 else f"torchrun --nproc_per_node {trained_by} -m normfree train"
    again = command_line(start, arguments=["--resume", out])
    raise ConfigError("resume", f"{out} was trained {_in_processes(trained_by)}, and would go on "
                                f"{_in_processes(world_size())}: --bs is per process, so the batch of a step would "
                                f"change; resume it as it was trained: {again}")


def _in_processes(count: int) -> str:
    return "in one process" if count == 1 else f"in {count} processes"


def _batches(items: int, batch: int, drop_last: bool) -> int:
    return items // batch if drop_last else math.ceil(items / batch)


def batches_per_epoch(dl: DataLoader) -> int:
    """Forward/backward passes per process in an epoch of the training loader `dl`: ``len(dl)`` in one process;
    under a launcher the processes share every batch of ``bs * world_size()`` and drop a last partial one
    (`ShardedDL`)."""
    return _batches(dl.n, dl.bs * world_size(), drop_last=True) if launched() else len(dl)


def shard_indices(idxs: list[int], bs: int, process: int, processes: int, drop_last: bool) -> list[int]:
    """Process `process`'s part of an epoch's item order `idxs`: the process-th slice of `bs` of every batch of
    ``bs * processes`` (one process's batch for a step of all). The last partial batch is dropped (`drop_last`) or
    filled up by repeating the epoch's first items, so that each process gets the same number of whole batches."""
    batch = bs * processes
    if drop_last:
        idxs = idxs[:len(idxs) // batch * batch]
    elif idxs:
        missing = -len(idxs) % batch
        idxs = idxs + (idxs * (missing // len(idxs) + 1))[:missing]
    return [i for start in range(0, len(idxs), batch) for i in idxs[start + process * bs:start + (process + 1) * bs]]


class ShardedDL(DistributedDL):
    """fastai's `DistributedDL` with `shard_indices`' split: each process a slice of every batch, not of the
    epoch (see the module docstring), the batch order broadcast from rank 0 through a CPU tensor (gloo), and
    gathered predictions cut back to the real items of the last, padded batch."""

    def __init__(self, dl: DataLoader, drop_last: bool, device: torch.device | None = None):
        super().__init__(dl, device=device)
        self.drop_last = drop_last

    @property
    def rng(self):  # the shuffling generator the checkpoint saves and restores (`learn.dls.train.rng`)
        return self.dl.rng

    def _broadcast(self, t: list[int], src: int) -> list[int]:
        order = torch.tensor(t, dtype=torch.long)
        dist.broadcast(order, src)
        return order.tolist()

    def __len__(self) -> int:
        return _batches(self.dl.n, self.bs * self.world_size, self.drop_last)

    def get_idxs(self) -> list[int]:
        idxs = self._broadcast(list(self.dl.get_idxs()), 0)  # rank 0's order: the same in every process
        self.n = len(idxs)
        return shard_indices(idxs, self.bs, self.rank, self.world_size, self.drop_last)

    def to_detach(self, b, cpu: bool = True, gather: bool = True):
        b = self._to_detach(b, cpu, gather)
        if not gather or not (hasattr(self, "i") and hasattr(self, "n")):
            return b
        batch = self.bs * self.world_size
        # `i` counts this process's items up to the current batch (fastai's after_batch), whole batches of bs
        real = min(batch, self.n - (self.i // self.bs - 1) * batch)
        return apply(lambda t: t[:real] if t.ndim > 0 else t, b)


class _ShardedTrainer(DistributedTrainer):
    """fastai's `DistributedTrainer` with `ShardedDL`s: the training loader drops its last partial batch."""

    def _wrap_dl(self, dl: DataLoader) -> DataLoader:
        if isinstance(dl, DistributedDL):
            return dl
        return ShardedDL(dl, drop_last=dl is self.learn.dls.train, device=self.learn.model.device)

    def after_fit(self) -> None:
        if isinstance(self.learn.model, DistributedDataParallel):  # not twice: see end_interrupted_fit
            super().after_fit()

    def end_interrupted_fit(self) -> None:
        """A fit ended by an exception (`normfree.learner.fit_guard`): unwrap the model and the loaders all the same."""
        self.after_fit()


_STOPS = (None, "Ctrl-C", "SIGTERM")  # what `AgreedStop` exchanges: an index into this, the highest wins


class AgreedStop(Callback):
    """After every batch (training and validation), asks all processes whether one has received Ctrl-C or SIGTERM
    (`received`: `stops_when_asked`'s function) and, if one has, stops all of them there, as the highest of
    ``None < Ctrl-C < SIGTERM`` received: the processes leave the fit between the same two collectives."""

    order = 100  # after the batch's own work (the Recorder's gathered metrics, the optimizer step)

    def __init__(self, received: Callable[[], str | None]):
        self.received = received

    def after_batch(self) -> None:
        how = _STOPS[max(_all_gather(_STOPS.index(self.received())))]
        if how is not None:
            raise interrupt(how)


def _ignore_stop_signals() -> None:
    """The launcher repeats a stop to every process: it forwards Ctrl-C and SIGTERM, and sends SIGTERM to the
    others when one fails. A process already stopping ignores the repeats, so rank 0 saves the run whole."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def data_parallel(learn: Learner) -> Iterator[None]:
    """The block's fits of `learn` data-parallel over the launched processes (see the module docstring); a
    process that is gone stops the others with `PeerStopped`, Ctrl-C and SIGTERM stop all after the same batch
    (`AgreedStop`). Without a launcher: nothing changes."""
    if not launched():
        yield
        return
    cpu = learn.dls.device is None or learn.dls.device.type == "cpu"
    # SyncBatchNorm (batch statistics over all processes) runs on GPUs only
    trainer = _ShardedTrainer(sync_bn=not cpu, cpu=cpu)
    learn.add_cb(trainer)

    def valid_loss(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss over the gathered predictions, cut back to the real items: fastai would average the processes'
        batch losses, the padding of the last batch included (a function, as AccumMetric wants one)."""
        return learn.loss_func(preds, targets)

    # in the Recorder's __dict__: fastai's Callback.__setattr__ would warn that `loss` shadows Learner.loss
    recorder = vars(learn.recorder)
    averaged, recorder["loss"] = recorder["loss"], AccumMetric(valid_loss, flatten=False)
    try:
        with stops_when_asked() as received, learn.added_cbs(AgreedStop(received)):
            yield
    except BaseException as error:
        _ignore_stop_signals()
        if _is_lost_peer(error):
            raise PeerStopped() from error
        raise
    finally:
        learn.remove_cb(trainer)
        recorder["loss"] = averaged


def gathered_metric(metric: Callable) -> Callable | AccumMetric:
    """`metric` computed once over the predictions of all processes (fastai gathers and unpads them) under a
    launcher, rather than averaged over per-process batch values; `metric` itself in one process."""
    return AccumMetric(metric, flatten=False) if launched() else metric
