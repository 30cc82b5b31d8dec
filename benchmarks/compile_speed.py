"""What `nf_learner(compile=True)` / `normfree train --compile` buys on this machine: the train step of the small NF
ResNet and its BatchNorm twin, eager and compiled by torch.compile (inductor), at batch 64, 32 px and batch 2, 16 px.

Not part of `make bench` (compiling takes minutes on a 2-core CPU): ``python benchmarks/compile_speed.py [size]``.
Steps as in bench_twins (fused Adam, one-channel images, rounds alternating, round 0 and the compiling first steps not
counted); prints each model's median step time, eager and compiled, and the compile time.
"""
from __future__ import annotations

import statistics
import sys
import time

import timm
import torch

from bench_twins import CLASSES, train_step
from normfree.models.compiled import compile_model
from normfree.models.small_resnets import batchnorm_twin_name

ROUNDS = 15


def main(size: str = "tiny") -> None:
    names = (f"nf_resnet_{size}", batchnorm_twin_name(f"nf_resnet_{size}"))
    for batch, px in ((64, 32), (2, 16)):
        torch.manual_seed(0)
        x, y = torch.randn(batch, 1, px, px), torch.randint(0, CLASSES, (batch,))
        runs = {}
        for name in names:
            for compiled in (False, True):
                model = timm.create_model(name, num_classes=CLASSES, in_chans=1).train()
                if compiled:
                    compile_model(model)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
                start = time.perf_counter()
                for _ in range(2):  # compiles train mode, then reuses it
                    train_step(model, opt, x, y)
                runs[name, compiled] = (model, opt, time.perf_counter() - start)
        times: dict = {key: [] for key in runs}
        keys = list(runs)
        for round_ in range(ROUNDS + 1):
            for key in keys[round_ % len(keys):] + keys[: round_ % len(keys)]:
                model, opt, _ = runs[key]
                elapsed = train_step(model, opt, x, y)
                if round_:
                    times[key].append(elapsed)
        for (name, compiled), values in times.items():
            print(f"batch {batch}, {px} px, {name}, {'compiled' if compiled else 'eager'}: "
                  f"{statistics.median(values) * 1e3:.1f} ms a step (first two steps {runs[name, compiled][2]:.0f} s)")
        for name in names:
            ratio = statistics.median(c / e for c, e in zip(times[name, True], times[name, False]))
            print(f"batch {batch}, {px} px, {name}: compiled / eager step time {ratio:.2f}x")
        ratio = statistics.median(n / b for n, b in zip(times[names[0], True], times[names[1], True]))
        print(f"batch {batch}, {px} px: NF / BN step time, both compiled {ratio:.2f}x")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(*sys.argv[1:])
