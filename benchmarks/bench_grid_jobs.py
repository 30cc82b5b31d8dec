"""CPU scaling of a comparison grid: the same 2-run grid with `normfree compare --jobs 1` and `--jobs 2`.

Images/s is every training image of the grid (runs x epochs x training images) over the wall time of the
whole `compare` call, so the workers' start (spawn, importing torch and fastai) counts against --jobs 2.
With --jobs 2 each worker gets half of the cores (torch.set_num_threads). --jobs 1 is measured twice: with
every core for its one run at a time, and with one thread, as each --jobs 2 worker has. The second baseline
gives the gain of running two runs side by side (ideal: 2x on 2 cores); the first adds what torch's threads
cost a model this small, which on a busy machine is most of the time (its threads wait for one another).
"""
from __future__ import annotations

import tempfile
import time

import torch

import normfree
from normfree.data import digits_dataloaders

# enough training per run (~10 s on one core) that starting the --jobs 2 workers (~5 s) does not decide the result
GRID = dict(methods=("nf-agc",), batch_sizes=(32,), seeds=(0, 1), epochs=3, size=32, limit=600, lrs=(0.01,))


def _images_per_second(jobs: int, threads: int) -> float:
    all_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # --jobs 1 trains in this process; --jobs 2 workers set their own
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = normfree.compare(**GRID, out=out, quiet=True, jobs=jobs)
            seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(all_threads)
    data = digits_dataloaders(bs=32, size=GRID["size"], limit=GRID["limit"], device="cpu")
    train_images = len(data.train_ds)
    return len(result.runs) * GRID["epochs"] * train_images / seconds


def run() -> list[dict]:
    cores = torch.get_num_threads()
    all_cores, one_thread, two = _images_per_second(1, cores), _images_per_second(1, 1), _images_per_second(2, 1)
    setting = f"2 runs nf_resnet_tiny, digits {GRID['size']} px, bs 32, {GRID['epochs']} epochs, {cores} cores"

    def row(measurement: str, value: str, target: str = "-", **ok) -> dict:
        return {"benchmark": "compare --jobs (CPU)", "setting": setting, "measurement": measurement, "value": value,
                "target": target, **ok}

    return [
        row(f"images/s, --jobs 1 ({cores} threads)", f"{all_cores:.0f}"),
        row("images/s, --jobs 1 (1 thread)", f"{one_thread:.0f}"),
        row("images/s, --jobs 2 (1 thread each)", f"{two:.0f}"),
        row("speed-up of --jobs 2 over --jobs 1 with 1 thread", f"{two / one_thread:.2f}x", "> 1 (2 cores)",
            ok=two > one_thread),
        row(f"speed-up of --jobs 2 over --jobs 1 with {cores} threads", f"{two / all_cores:.2f}x", "> 1",
            ok=two > all_cores),
    ]
