"""CPU scaling of a comparison grid: the same 2-run grid with `normfree compare --jobs 1` and `--jobs 2`.

Images/s is every training image of the grid (runs x epochs x training images) over the wall time of the
whole `compare` call, so the workers' start (spawn, importing torch and fastai) counts against --jobs 2.
With --jobs 2 each worker gets half of the cores (torch.set_num_threads), so the gain is what running two
runs side by side buys over one run using all cores.
"""
from __future__ import annotations

import tempfile
import time

import torch

import normfree

GRID = dict(methods=("nf-agc",), batch_sizes=(32,), seeds=(0, 1), epochs=3, size=16, limit=600, lrs=(0.01,))


def _images_per_second(jobs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = normfree.compare(**GRID, out=out, quiet=True, jobs=jobs)
        seconds = time.perf_counter() - start
    train_images = len(normfree.digits_dataloaders(bs=32, size=16, limit=600, device="cpu").train_ds)
    return len(result.runs) * GRID["epochs"] * train_images / seconds


def run() -> list[dict]:
    cores = torch.get_num_threads()
    one, two = _images_per_second(1), _images_per_second(2)
    setting = f"2 runs nf_resnet_tiny, digits 16 px, bs 32, {GRID['epochs']} epochs, {cores} cores"
    return [
        {"benchmark": "compare --jobs (CPU)", "setting": setting, "measurement": "images/s, --jobs 1",
         "value": f"{one:.0f}", "target": "-"},
        {"benchmark": "compare --jobs (CPU)", "setting": setting, "measurement": "images/s, --jobs 2",
         "value": f"{two:.0f}", "target": "-"},
        {"benchmark": "compare --jobs (CPU)", "setting": setting, "measurement": "speed-up of --jobs 2",
         "value": f"{two / one:.2f}x", "target": "> 1 (2 cores)", "ok": two > one},
    ]
