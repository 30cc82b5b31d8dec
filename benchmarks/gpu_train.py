"""Section 4 of `benchmarks/gpu.py`: ``normfree train`` on the bundled digits in fp32, fp16 and bf16, as subprocesses;
in this process, the learner it builds and a plain fastai one in fp32 and fp16 (host time per batch, kernels per
batch)."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from gpu_common import ROOT, S4, Context, log, short_error, sync


def _in_process_learner(kind: str, precision: str, limit: int | None, device: torch.device):
    """The learner `normfree train` builds (AGC and its callbacks) or a plain fastai one, on digits at 32 px."""
    import dataclasses

    import timm
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    import normfree.data
    from normfree.app.config import TrainConfig
    from normfree.app.train import _build_learner

    if kind == "normfree":
        config = dataclasses.replace(TrainConfig(), data="digits", size=32, bs=64, precision=precision, limit=limit,
                                     device=device.type)
        return _build_learner(config)
    dls = normfree.data.digits_dataloaders(bs=64, size=32, limit=limit, device=device)
    learn = Learner(dls, timm.create_model("nf_resnet_tiny", num_classes=10, in_chans=1), CrossEntropyLossFlat())
    return learn.to_fp16() if precision == "fp16" else learn


def fp16_breakdown(ctx: Context, data: dict) -> None:
    """In this process, normfree's learner (what `normfree train` builds) and a plain fastai one, fp32 and fp16:
    s/epoch and host time per training batch, then CUDA kernels per training batch of normfree's (profiled last:
    a profiler slows the launches that follow it)."""
    from fastai.callback.core import Callback

    class BatchTimes(Callback):
        order = -50

        def before_fit(self):
            self.times = []

        def before_batch(self):
            self.start = time.perf_counter()

        def after_batch(self):
            if self.training:
                self.times.append((time.perf_counter() - self.start) * 1e3)

    name, args = S4, ctx.sizes.train_args
    limit = int(args[args.index("--limit") + 1]) if "--limit" in args else None
    found = data["in_process"] = {}
    learners = {}
    for kind, precision in (("normfree", "fp32"), ("normfree", "fp16"), ("fastai", "fp32"), ("fastai", "fp16")):
        label = f"{kind} {precision}"
        try:
            learn = learners[label] = _in_process_learner(kind, precision, limit, ctx.device)
            timer = BatchTimes()
            epochs, batch_ms = [], []
            with learn.no_bar(), learn.no_logging():
                learn.fit(1, 1e-3, cbs=[timer])  # warm-up
                for _ in range(3):
                    sync(ctx)
                    start = time.perf_counter()
                    learn.fit(1, 1e-3, cbs=[timer])
                    sync(ctx)
                    epochs.append(time.perf_counter() - start)
                    batch_ms += timer.times
            found[label] = dict(epoch_s=statistics.median(epochs), batch_ms=statistics.median(batch_ms))
            ctx.results.row(name, f"in process, {label}", "s/epoch (median of 3); host ms per training batch",
                            f"{found[label]['epoch_s']:.3f} s; {found[label]['batch_ms']:.2f} ms")
        except Exception as error:  # noqa: BLE001
            data.setdefault("errors", {})[label] = traceback.format_exc()
            ctx.results.row(name, f"in process, {label}", "ERROR", short_error(error))
        log(f"  section 4: in process, {label} done")
    for kind in ("normfree", "fastai"):
        pair = [found.get(f"{kind} {p}", {}).get("epoch_s") for p in ("fp32", "fp16")]
        if all(pair):
            ctx.results.row(name, f"in process, {kind}", "fp16 s/epoch / fp32 s/epoch", f"{pair[1] / pair[0]:.2f}x")
    if not ctx.cuda:
        return
    for precision in ("fp32", "fp16"):
        label = f"normfree {precision}"
        if label in found:
            found[label]["kernels_per_batch"] = _kernels_per_batch(learners[label])
            ctx.results.row(name, f"in process, {label}", "CUDA kernels per training batch (profiler)",
                            f"{found[label]['kernels_per_batch']:.0f}")


def _kernels_per_batch(learn) -> float:
    """CUDA kernels launched per training batch over one epoch (validation's included, shared out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernels / len(learn.dls.train)


def section_cli(ctx: Context) -> dict:
    name, s = S4, ctx.sizes
    setting = "digits " + " ".join(s.train_args[2:])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    data: dict = {}
    per_epoch: dict[str, float] = {}
    for precision, flags in (("fp32", []), ("bf16", ["--bf16"]), ("fp16", ["--fp16"])):  # fp16 last: was slow
        out = ctx.out / f"train-{precision}"
        command = [sys.executable, "-m", "normfree", "train", *s.train_args, "--quiet", "--out", str(out),
                   "--overwrite", *flags]
        entry = data[precision] = dict(command=" ".join(command))
        log(f"  section 4: {precision}")
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=s.train_timeout_s)
            entry.update(returncode=done.returncode, stderr_tail=done.stderr[-2000:])
        except subprocess.TimeoutExpired:
            entry.update(returncode=None, timeout=True)
        entry["wall_s"] = time.perf_counter() - start
        rows = _read_metrics(out / "metrics.csv")
        entry["epochs"] = rows
        if (out / "result.json").exists():
            result = json.loads((out / "result.json").read_text())
            entry.update(summary=result.get("summary"), memory_kind=result.get("memory_kind"),
                         device="cuda" if result.get("memory_kind") == "cuda allocated" else "cpu")
        device = entry.get("device", "?")
        if rows:
            row = rows[min(1, len(rows) - 1)]  # the second epoch: the first includes warm-up
            per_epoch[precision] = row["seconds"]
            which = "epoch 2" if len(rows) > 1 else "epoch 1 only"
            status = "" if entry.get("returncode") == 0 else (" (TIMED OUT)" if entry.get("timeout") else
                                                               f" (exit {entry.get('returncode')})")
            ctx.results.row(name, setting, f"{precision}: s/epoch ({which}; device {device}){status}",
                            f"{row['seconds']:.2f} s ({row.get('images_per_s', math.nan):.0f} img/s)")
        else:
            what = "timed out" if entry.get("timeout") else f"exit {entry.get('returncode')}"
            tail = (entry.get("stderr_tail") or "").strip().splitlines()[-1:] or [""]
            ctx.results.row(name, setting, f"{precision}: s/epoch", f"no epoch finished ({what}) {tail[0][:150]}")
        ctx.results.save()
    if "fp16" in per_epoch and "fp32" in per_epoch:
        ratio = per_epoch["fp16"] / per_epoch["fp32"]
        data["fp16_over_fp32"] = ratio
        ctx.results.row(name, setting, "fp16 s/epoch / fp32 s/epoch", f"{ratio:.2f}x", "<= 1", ratio <= 1)
    if "bf16" in per_epoch and "fp32" in per_epoch:
        ctx.results.row(name, setting, "bf16 s/epoch / fp32 s/epoch", f"{per_epoch['bf16'] / per_epoch['fp32']:.2f}x")
    fp16_breakdown(ctx, data)
    return data


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
