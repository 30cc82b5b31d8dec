"""CPU scaling of one run: `normfree train` in one process against the same run in two processes under torchrun.

Each process has one thread (one core of this 2-core machine), and the two processes take half of the batch each
(--bs 32 against 64), so both runs make the same steps on the same examples; the gain is what a second process
(a second core) buys one run, against an ideal of 2x. Images/s is what the run measures itself (result.json:
training examples of all processes over training time), so the processes' start (importing torch, joining
the process group) is not counted; the gradient all-reduce and the validation gather are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--data", "digits", "--arch", "nf_resnet_tiny", "--size", "32", "--limit", "1024", "--epochs", "3",
       "--device", "cpu", "--quiet"]
BATCH = 64  # of a step: one process's --bs, or the sum of both processes' --bs


def _images_per_second(processes: int) -> float:
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        subprocess.run([sys.executable, *launcher, "-m", "normfree", "train", *RUN, "--bs", str(BATCH // processes),
                        "--out", str(out)], check=True, env=env, timeout=300, stdout=subprocess.DEVNULL)
        return json.loads((out / "result.json").read_text())["summary"]["images_per_second"]


def run() -> list[dict]:
    one, two = _images_per_second(1), _images_per_second(2)
    setting = f"nf_resnet_tiny, digits 32 px, 1024 images, {BATCH} a step, 3 epochs, 1 thread a process"
    return [
        {"benchmark": "train under torchrun (CPU)", "setting": setting, "measurement": "images/s, 1 process, --bs 64",
         "value": f"{one:.0f}", "target": "-"},
        {"benchmark": "train under torchrun (CPU)", "setting": setting,
         "measurement": "images/s, 2 processes, --bs 32 each", "value": f"{two:.0f}", "target": "-"},
        {"benchmark": "train under torchrun (CPU)", "setting": setting, "measurement": "speed-up of 2 processes",
         "value": f"{two / one:.2f}x", "target": "> 1 (2 cores)", "ok": two > one},
    ]
