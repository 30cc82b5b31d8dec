"""Host work per training step, counted on the CPU: torch operations of per-sample vs ordinary AGC steps.

On a GPU, a step whose kernels are small is bound by the host: each operation costs several
microseconds of Python and dispatch before its kernel is queued. The count of operations per step
is a proxy for that cost that the CPU measures exactly, with no GPU. Counted with a
`TorchDispatchMode`: every ATen operation that reaches the dispatcher, the backward pass included,
split into views (metadata only: no kernel on a GPU) and the rest (about one kernel each).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_host_ops.py [--time]``. ``--time`` also times the
steps (the per-sample / ordinary ratio of `bench_per_sample.time_ratio`, same process and round
scheme) at batch 16.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_per_sample import ordinary_step, per_sample_step, setup, time_ratio  # noqa: E402

from normfree.agc.per_sample import PerSampleClipper  # noqa: E402

# Operations that launch no kernel on a GPU: views that autograd does not call views, dtype arithmetic,
# allocation, CPU scalars.
_NO_KERNEL = {"_unsafe_view", "promote_types", "result_type", "new_empty", "empty", "lift_fresh", "scalar_tensor",
              "_local_scalar_dense"}


class OpCount(TorchDispatchMode):
    """Counts the ATen operations dispatched while active: `kernels` and `views`, and `by_name`."""

    def __init__(self):
        super().__init__()
        self.by_name: collections.Counter[str] = collections.Counter()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.by_name[name] += 1
        if func.is_view or name in _NO_KERNEL:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_step(step, *args) -> OpCount:
    step(*args)  # warm: plans and caches are built on the first step
    with OpCount() as count:
        step(*args)
    return count


def counts(arch: str, batch: int, size: int) -> dict[str, OpCount]:
    model, x, y, clipped = setup(arch, batch, size, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    found = {"ordinary": count_step(ordinary_step, model, optimizer, x, y, clipped)}
    clipper = PerSampleClipper(model, {id(p): 0.01 for p in clipped})
    found["per-sample"] = count_step(per_sample_step, model, optimizer, x, y, clipper)
    clipper.remove()
    return found


def run() -> list[dict]:
    """`make bench`'s rows: kernel operations per step on nf_resnet26, batch 8, 64 px."""
    found = counts("nf_resnet26", 8, 64)
    setting = "nf_resnet26, batch 8, 64 px, SGD step"
    rows = [dict(benchmark="torch ops per training step (host work; ~1 GPU launch each)", setting=setting,
                 measurement=f"{name} AGC: kernel ops (+ views)", value=f"{count.kernels} (+{count.views})",
                 target="(reference)") for name, count in found.items()]
    ratio = found["per-sample"].kernels / found["ordinary"].kernels
    rows.append(dict(benchmark="torch ops per training step (host work; ~1 GPU launch each)", setting=setting,
                     measurement="per-sample / ordinary kernel ops", value=f"{ratio:.2f}x", target="(reference)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="nf_resnet26")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--time", action="store_true", help="also time the steps at batch 16")
    parser.add_argument("--top", type=int, default=0, help="list the most frequent operations of each step")
    args = parser.parse_args(argv)
    found = counts(args.arch, 8, args.size)
    for name, count in found.items():
        print(f"{args.arch} batch 8 {args.size} px, {name} step: {count.kernels} kernel ops + {count.views} views")
        if args.top:
            print("   ", ", ".join(f"{op} {n}" for op, n in count.by_name.most_common(args.top)))
    kernels = found["per-sample"].kernels / found["ordinary"].kernels
    print(f"per-sample / ordinary kernel ops: {kernels:.2f}x")
    if args.time:
        ratio, ordinary, best = time_ratio(args.arch, 16, args.size, 3)
        print(f"{args.arch} batch 16 {args.size} px, {torch.get_num_threads()} threads: per-sample / ordinary step "
              f"time {ratio:.2f}x (median; best {best:.2f}x; ordinary step {ordinary * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
