"""How a grid's runs are trained: one after the other, several at once, elsewhere (a plan), or not at all (a report).

`normfree.compare` hands each stage of its grid (the lr sweep, then the runs) to one of these; every one
yields ``(index, result, reused)`` per run, in the order the runs finish:

- `one_by_one`: in this process, as before.
- `in_parallel`: up to `jobs` runs at once in a `concurrent.futures.ProcessPoolExecutor` of 'spawn'
  processes. With `devices` (``cuda:0 cuda:1 ...``), each worker process is pinned to one of them
  (``torch.cuda.set_device``, so a run's ``device=None`` trains there and its config, reused across
  invocations, does not name the device); on the CPU the cores are split between the workers
  (``torch.set_num_threads``), so N runs do not oversubscribe them. Every run seeds itself
  (`normfree.train`), so a run's numbers do not depend on which worker trains it or when. Ctrl-C reaches
  the workers from the terminal; SIGTERM to this process is passed on to them; each saves its run's
  checkpoint as `normfree.train` does.
- `already_trained`: trains nothing; every run must already be finished in its folder (``normfree compare
  --report`` after the commands of ``--plan`` ran elsewhere), else a `ConfigError` naming ``report`` lists
  the missing and unfinished ones.

`train_command` is the ``normfree train`` command line of one run, for ``--plan``.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import torch

from ..utils.outdir import INCOMPLETE
from .config import CONFIG_FILE, ConfigError, TrainConfig, command_line
from .signals import Terminated

__all__ = ["already_trained", "in_parallel", "one_by_one", "train_command"]

Result = TypeVar("Result")  # what a run gives (compare's TrainResult): the trainers pass it through untouched
# (index in configs, result, reused: found finished in its folder rather than trained now), as each run finishes
Finished = Generator[tuple[int, Result, bool], None, None]


def one_by_one(configs: Sequence[TrainConfig], run: Callable[[TrainConfig, bool], tuple[Result, bool]],
               overwrite: bool) -> Finished[Result]:
    for index, config in enumerate(configs):
        result, reused = run(config, overwrite)
        yield index, result, reused


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _start_worker(devices, threads: int) -> None:
    """A worker's first act: take its device from the queue, pin it, and use its share of the CPU cores."""
    device = devices.get()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(threads)


def in_parallel(configs: Sequence[TrainConfig], run: Callable[[TrainConfig, bool], tuple[Result, bool]],
                overwrite: bool, jobs: int, devices: Sequence[str] | None = None) -> Finished[Result]:
    """The runs of `configs`, up to `jobs` at once (one per device of `devices` when given)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for device in (list(devices) if devices else [None] * jobs):
        queue.put(device)
    threads = max(1, _cores() // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(queue, threads))
    futures = {pool.submit(run, config, overwrite): index for index, config in enumerate(configs)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result, reused = future.result()
                yield futures[future], result, reused
    except BaseException as error:
        for future in pending:
            future.cancel()
        if isinstance(error, Terminated):  # sent to this process only: the workers stop their runs the same way
            for process in list(getattr(pool, "_processes", {}).values()):
                if process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the running runs save their checkpoints


def already_trained(configs: Sequence[TrainConfig],
                    finished: Callable[[TrainConfig, bool], Result | None]) -> Finished[Result]:
    """Every run of `configs` as found finished in its folder (`finished`: its result, None if not finished);
    ConfigError naming ``report`` listing those that are not (missing, or marked unfinished)."""
    results = {index: result for index, config in enumerate(configs)
               if (result := finished(config, False)) is not None}
    absent = [config.out for index, config in enumerate(configs) if index not in results]
    if absent:
        def state(out: str) -> str:
            return "unfinished" if (Path(out) / INCOMPLETE).exists() or (Path(out) / CONFIG_FILE).exists() \
                else "missing"
        listed = "; ".join(f"{out} ({state(out)})" for out in absent[:20])
        more = f"; and {len(absent) - 20} more" if len(absent) > 20 else ""
        raise ConfigError("report", f"{len(absent)} of {len(configs)} runs are not finished: {listed}{more}. Run "
                                    f"their commands (normfree compare --plan FILE writes them) and try again")
    for index, result in results.items():
        yield index, result, True


def train_command(config: TrainConfig) -> str:
    """The ``normfree train`` command that trains the run `config` describes into its ``out`` folder (replacing
    what a stopped attempt left there, so the command can simply be run again): one option per setting that
    differs from `TrainConfig`'s default, values quoted for the shell (`command_line`)."""
    return command_line("normfree train", config, arguments=["--overwrite", "--quiet"])
