"""Host work per training step, counted on the CPU: torch operations of per-sample vs ordinary AGC steps.

On a GPU, a step whose kernels are small is bound by the host: each operation costs several
microseconds of Python and dispatch before its kernel is queued. The count of operations per step
is a proxy for that cost that the CPU measures exactly, with no GPU. Counted with a
`TorchDispatchMode`: every ATen operation that reaches the dispatcher, the backward pass included,
split into views (metadata only: no kernel on a GPU) and the rest (about one kernel each).

Also counted: what the host issues on CUDA, where each layer's per-sample work replays from a CUDA graph
(`cuda_path_counts`): the layers' graphs emulated (`TUNING.layer_graphs = "emulated"`) and the operations
inside their replays left out, bf16 autocast and channels-last as on a GPU, against the ordinary step
without AGC (on CUDA, AGC is one graph launch).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_host_ops.py [--time]``. ``--time`` also times the
steps (the per-sample / ordinary ratio of `bench_per_sample.time_ratio`, same process and round
scheme) at batch 16.
"""
from __future__ import annotations

import argparse
import collections
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_per_sample import ordinary_step, per_sample_step, setup, time_ratio  # noqa: E402
from normfree.agc.per_sample import PerSampleClipper, tuned  # noqa: E402
from normfree.agc.per_sample.graphs import LayerGraphs  # noqa: E402

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
        self._paused = 0

    @contextmanager
    def paused(self):
        """Operations within the block are not counted."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._paused:
            return func(*args, **(kwargs or {}))
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


def cuda_path_counts(arch: str, batch: int, size: int) -> dict[str, OpCount]:
    """Operations per step the host issues on CUDA (bf16 autocast, channels-last): the ordinary step without AGC,
    and the per-sample step with its layers' graph replays left out (emulated on the CPU, not counted)."""
    model, x, y, clipped = setup(arch, batch, size, 3)
    model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    clipper = PerSampleClipper(model, {id(p): 0.01 for p in clipped})
    clipper.stop()

    def step(per_sample: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        if per_sample:
            clipper.grad_scale = torch.tensor(1.0 / len(x))
            clipper.start()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if per_sample:
            clipper.stop()
            clipper.collect([])
        optimizer.step()

    found = {}
    replay = LayerGraphs._emulated_replay
    with tuned(layer_graphs="emulated"):
        for name, per_sample in (("ordinary (no AGC)", False), ("per-sample", True)):
            for _ in range(3):  # eager, captured, replayed: plans, caches and graphs are made
                step(per_sample)
            count = OpCount()

            def unseen_replay(graphs, entry, count=count):
                with count.paused():
                    replay(graphs, entry)

            with mock.patch.object(LayerGraphs, "_emulated_replay", unseen_replay), count:
                step(per_sample)
            found[name] = count
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
    found = cuda_path_counts("nf_resnet50", 2, 64)
    setting = "nf_resnet50, batch 2, 64 px, bf16, channels-last, SGD step; layer graph replays not counted"
    rows += [dict(benchmark="torch ops per step on the CUDA path (host work)", setting=setting,
                  measurement=f"{name}: kernel ops (+ views)", value=f"{count.kernels} (+{count.views})",
                  target="(reference)") for name, count in found.items()]
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
