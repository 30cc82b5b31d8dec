#!/usr/bin/env python
"""normfree on one CUDA GPU in under 5 minutes: one script, one table (``python benchmarks/gpu.py``).

Sections, each in its own try/except (an error is recorded in the results and the next section runs):

1. AGC on nfnet_f0's real gradients (fp32): one copy of all gradients (the memory floor), timm's
   `adaptive_clip_grad`, normfree's torch-ops path, `normfree.adaptive_clip_grad_` and the latter
   replayed from a CUDA graph; its error against a float64 reference written here from the paper's
   rule; whether it synchronises with the host.
2. nfnet_f0 training step (bs 64, 192 px, bf16 autocast, channels-last, SGD-Nesterov): no AGC,
   normfree's AGC, timm's, and normfree's fastai callback driven by a stand-in learner.
3. Per-sample AGC step against the ordinary AGC step: time, peak memory, exactness against a loop
   over examples; every entry of `PER_SAMPLE_VARIANTS` is timed; host time per phase of both steps and
   per launch of a layer's graph; a profiler table of one setting.
4. ``normfree train`` on the bundled digits in fp32, fp16 and bf16, as subprocesses; in this process, the
   learner it builds and a plain fastai one in fp32 and fp16 (host time per batch, kernels per batch).

Times are CUDA-event medians after warm-up; ratios are taken within this run. Full results go to
``--out`` (``gpu_bench.json``, rewritten after every section, and ``gpu_bench.md``); the Markdown table
is printed last. Without CUDA it prints one skip line and exits 0; ``--cpu-smoke`` runs every section
at tiny sizes on the CPU instead (to test the code paths, not to measure).
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
SKIP_LINE = "benchmarks/gpu.py: skipped, no CUDA device"

# Per-sample engine variants, each timed on every setting of section 3: a name and the tuning knobs to set
# while it runs (`normfree.agc.per_sample.tuned(**knobs)`, see normfree/agc/per_sample/tuning.py).
# (On an H200: k x k convs by "conv" and "bmm" were within noise; the budget from the device's memory and a fixed
# 256 MiB one too. "no layer graphs" is the per-sample step before the layers' CUDA graphs.)
PER_SAMPLE_VARIANTS: list[tuple[str, dict]] = [
    ("default", {}), ("no layer graphs", {"layer_graphs": "off"})]

CLIPPING, EPS = 0.01, 1e-3
BUDGET_S = 330  # a section that would start later than this is skipped
S1, S2, S3, S4 = "1 AGC on real grads", "2 train step", "3 per-sample AGC", "4 normfree train"


@dataclass(frozen=True)
class PerSampleSetting:
    arch: str
    batch: int
    size: int
    precision: str  # "fp32" or "bf16" (bf16 autocast, channels-last model and input)
    profile: bool = False  # save a profiler table of one ordinary and one per-sample step

    @property
    def label(self) -> str:
        return f"{self.arch} bs {self.batch} {self.size} px {self.precision}"


@dataclass(frozen=True)
class Sizes:
    nfnet: str
    agc_batch: int
    agc_size: int
    agc_warmup: int
    agc_reps: int
    step_batch: int
    step_size: int
    step_warmup: int
    step_rounds: int  # the variants take turns, `step_per_round` steps each, order rotated every round
    step_per_round: int
    per_sample: tuple[PerSampleSetting, ...]
    check_arch: str  # per-sample exactness: fp32, first `check_examples` examples, `check_size` px
    check_examples: int
    check_size: int
    ps_warmup: int
    ps_reps: int
    train_args: tuple[str, ...]
    train_timeout_s: int


FULL = Sizes(
    nfnet="nfnet_f0", agc_batch=8, agc_size=192, agc_warmup=5, agc_reps=50,
    step_batch=64, step_size=192, step_warmup=10, step_rounds=4, step_per_round=10,
    per_sample=(
        PerSampleSetting("nf_resnet26", 64, 128, "fp32"),
        PerSampleSetting("nf_resnet26", 64, 128, "bf16"),
        PerSampleSetting("nf_resnet50", 64, 224, "bf16", profile=True),
        PerSampleSetting("nfnet_f0", 32, 192, "bf16"),
    ),
    check_arch="nf_resnet26", check_examples=4, check_size=128, ps_warmup=4, ps_reps=12,
    train_args=("--data", "digits", "--size", "32", "--epochs", "2"), train_timeout_s=120,
)
QUICK = Sizes(
    nfnet="test_nfnet", agc_batch=2, agc_size=32, agc_warmup=1, agc_reps=3,
    step_batch=2, step_size=32, step_warmup=1, step_rounds=2, step_per_round=2,
    per_sample=(
        PerSampleSetting("nf_resnet26", 2, 32, "fp32"),
        PerSampleSetting("test_nfnet", 2, 32, "bf16", profile=True),
    ),
    check_arch="nf_resnet26", check_examples=2, check_size=32, ps_warmup=1, ps_reps=2,
    train_args=("--data", "digits", "--size", "32", "--epochs", "2", "--limit", "64"), train_timeout_s=120,
)


# -- infrastructure --------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Results:
    """Rows of the table plus free-form data per section; saved as JSON and Markdown after every section."""

    def __init__(self, out: Path, meta: dict, judge: bool = True):
        self.out, self.meta, self.judge = out, meta, judge  # judge=False (CPU smoke test): no met column
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}

    def row(self, section: str, setting: str, measurement: str, value: str, target: str = "",
            met: bool | None = None) -> None:
        self.rows.append(dict(section=section, setting=setting, measurement=measurement, value=value,
                              target=target, met=met if self.judge else None))

    def table(self) -> str:
        lines = ["| section | setting | measurement | value | target | met |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
            value = str(r["value"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['section']} | {r['setting']} | {r['measurement']} | {value} | {r['target']} | {met} |")
        return "\n".join(lines)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        content = dict(meta=self.meta, sections=self.sections, rows=self.rows)
        (self.out / "gpu_bench.json").write_text(json.dumps(content, indent=2, default=_jsonable) + "\n")
        (self.out / "gpu_bench.md").write_text(self.table() + "\n")


def _jsonable(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    out: Path
    results: Results
    per_sample: str = ""  # section 3's settings: those whose label contains it

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def times_ms(ctx: Context, fn, reps: int, before=None) -> list[float]:
    """Milliseconds of `reps` calls of `fn`; `before` (e.g. restoring gradients) runs untimed before each.

    CUDA: events recorded around each call in stream order, read after one synchronisation at the end.
    CPU (smoke test only): wall time.
    """
    if not ctx.cuda:
        out = []
        for _ in range(reps):
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
        return out
    events = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def median_ms(ctx: Context, fn, warmup: int, reps: int, before=None) -> float:
    times_ms(ctx, fn, warmup, before)
    return statistics.median(times_ms(ctx, fn, reps, before))


@contextmanager
def sync_debug_error(ctx: Context):
    """Make any host synchronisation inside the block raise (CUDA only)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_check(ctx: Context, fn) -> str:
    """'none' if `fn` runs without host synchronisation, else the error's first line."""
    if not ctx.cuda:
        return "n/a (CPU)"
    sync(ctx)
    try:
        with sync_debug_error(ctx):
            fn()
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        sync(ctx)
        return f"SYNC: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    sync(ctx)
    return "none"


def peak_reset(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(ctx: Context) -> float | None:
    if not ctx.cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def autocast(ctx: Context, precision: str):
    # No cast cache: each weight is cast once per forward anyway, and a cache cannot be captured in a CUDA graph.
    if precision == "bf16":
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def host_ms(fn, warmup: int, reps: int) -> float:
    """Median host time to issue one call of `fn` (no synchronisation: on a GPU that is faster than the host this
    is the whole step; near the event time means the step is bound by the host)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(out)


def captured(ctx: Context, run, warmup: int = 3):
    """`run` captured in one CUDA graph after warm-up on a side stream (torch's whole-network recipe); the
    graph's replay, whose time is the step's kernels without launch gaps or host work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


@contextmanager
def cudnn_deterministic():
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@contextmanager
def no_tf32():
    """True float32 convolutions and matmuls (exactness checks)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


def pct(value: float) -> str:
    return f"{value * 100:+.2f}%"


def make_model(arch: str, ctx: Context, channels_last: bool = False) -> torch.nn.Module:
    """A timm model with 1000 classes on the device, residual branches open (SkipInit gains at 1, as
    partway through training), so that every tensor has a gradient."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000)
    for module in model.modules():
        if getattr(module, "skipinit_gain", None) is not None:
            module.skipinit_gain.data.fill_(1.0)
    model = model.to(ctx.device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def batch(ctx: Context, n: int, size: int, channels_last: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=generator).to(ctx.device)
    y = torch.randint(0, 1000, (n,), generator=generator).to(ctx.device)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def clipped_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter but the classifier's weight (DeepMind's rule, normfree's default)."""
    from normfree.agc import excluded_parameters

    excluded = {id(p) for p in excluded_parameters(model)}
    return [p for p in model.parameters() if id(p) not in excluded]


def agc_reference(weights: list[torch.Tensor], grads: list[torch.Tensor], clipping: float = CLIPPING,
                  eps: float = EPS) -> tuple[list[torch.Tensor], int, int]:
    """AGC in float64 from the paper's rule (Brock et al. 2021, Eq. 3), written here independently of normfree.

    A unit is one index of dim 0, except that a tensor of squeezed rank <= 1 (a bias, a gain stored as
    [O, 1, 1, 1]) is one unit as a whole (DeepMind's and optax's rule). Returns the clipped gradients
    and (units clipped, units).
    """
    out, clipped, units = [], 0, 0
    for w, g in zip(weights, grads):
        rows = 1 if sum(size != 1 for size in w.shape) <= 1 else w.shape[0]
        w64, g64 = w.detach().double().reshape(rows, -1), g.detach().double().reshape(rows, -1)
        w_norm = w64.norm(dim=1, keepdim=True).clamp_min(eps)
        g_norm = g64.norm(dim=1, keepdim=True)
        clip = g_norm / w_norm > clipping
        factor = torch.where(clip, clipping * w_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        out.append((g64 * factor).reshape(g.shape))
        clipped, units = clipped + int(clip.sum()), units + rows
    return out, clipped, units


def max_relative_error(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Max over tensors of max|got - ref| / max|ref|."""
    worst = 0.0
    for g, r in zip(got, reference):
        scale = float(r.abs().max()) if r.numel() else 0.0
        error = float((g.detach().double() - r).abs().max()) if r.numel() else 0.0
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


# -- 1. AGC on nfnet_f0's real gradients --------------------------------------------------------------
def global_relative_error(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """||got - ref|| / ||ref|| with all tensors as one vector (what tests/test_per_sample.py checks).

    Per tensor, a gradient that is small through cancellation between examples (a zero-initialised
    gain's) carries float32 rounding of the size of its terms, so a per-tensor ratio overstates it.
    """
    diff = torch.cat([(g.detach().double() - r).flatten() for g, r in zip(got, reference)])
    return float(diff.norm() / torch.cat([r.flatten() for r in reference]).norm())


def section_agc(ctx: Context) -> dict:
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    import normfree

    name, s = S1, ctx.sizes
    model = make_model(s.nfnet, ctx)
    x, y = batch(ctx, s.agc_batch, s.agc_size)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    del x, y
    params = [p for p in clipped_parameters(model) if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    copies = [torch.empty_like(g) for g in grads]
    megabytes = sum(g.numel() * g.element_size() for g in grads) / 1e6
    setting = f"{s.nfnet} fp32 grads of bs {s.agc_batch} {s.agc_size} px: {len(params)} tensors, {megabytes:.0f} MB"
    from normfree.agc.clip import clip_with_torch_ops as torch_ops


    def restore():
        torch._foreach_copy_(grads, saved)

    no_grad = torch.no_grad()
    methods = {
        "copy": lambda: torch._foreach_copy_(copies, grads),
        "timm": no_grad(lambda: timm_agc(params, CLIPPING, EPS)),
        "torch_ops": no_grad(lambda: torch_ops(params, CLIPPING, EPS)),
        "normfree": lambda: normfree.adaptive_clip_grad_(params, CLIPPING, EPS),
    }
    data: dict = dict(tensors=len(params), megabytes=megabytes, torch_ops_function="clip_with_torch_ops")
    graph_error = None
    if ctx.cuda:
        try:
            restore()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    methods["normfree"]()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                methods["normfree"]()
            methods["graph"] = graph.replay
        except Exception as error:  # noqa: BLE001
            graph_error = f"{type(error).__name__}: {error}"
            data["graph_error"] = traceback.format_exc()
    timings, failed = {}, {}
    for key, fn in methods.items():
        log(f"  section 1: timing {key}")
        try:
            timings[key] = median_ms(ctx, fn, s.agc_warmup, s.agc_reps, before=restore)
        except Exception as error:  # noqa: BLE001 - the other methods still run
            failed[key] = _short(error)
            data.setdefault("errors", {})[key] = traceback.format_exc()
    data["median_ms"] = timings
    if "copy" in timings:
        data["copy_gb_per_s_read_plus_write"] = 2 * megabytes / 1e3 / (timings["copy"] / 1e3)

    labels = {"copy": "(a) one copy of all gradients (memory floor)", "timm": "(b) timm adaptive_clip_grad",
              "torch_ops": "(c) normfree clip_with_torch_ops", "normfree": "(d) normfree adaptive_clip_grad_",
              "graph": "(e) (d) captured in a CUDA graph, replayed"}
    for key, label in labels.items():
        if key in timings:
            ctx.results.row(name, setting, label + ", median", ms(timings[key]))
        else:
            ctx.results.row(name, setting, label, failed.get(key) or graph_error or "n/a (CPU)")
    if {"normfree", "copy"} <= timings.keys():
        data["d_over_a"] = d_over_a = timings["normfree"] / timings["copy"]
        ctx.results.row(name, setting, "(d) / (a)", f"{d_over_a:.2f}x", "<= 3", d_over_a <= 3)
    if {"normfree", "timm"} <= timings.keys():
        data["b_over_d"] = b_over_d = timings["timm"] / timings["normfree"]
        ctx.results.row(name, setting, "(b) / (d)", f"{b_over_d:.1f}x", ">= 40", b_over_d >= 40)
    replayed = _plan_graph_state(params)
    data["plan_graph"] = replayed
    ctx.results.row(name, setting, "(d)'s launches replayed from the plan's own CUDA graph", replayed)
    if {"graph", "copy"} <= timings.keys():
        ctx.results.row(name, setting, "(e) / (a)", f"{timings['graph'] / timings['copy']:.2f}x")

    reference, clipped, units = agc_reference(params, saved)
    data["units_clipped"], data["units"] = clipped, units
    for key, label in (("normfree", "(d)"), ("torch_ops", "(c)"), ("graph", "(e)")):
        if key not in timings:
            continue
        restore()
        methods[key]()
        sync(ctx)
        error = max_relative_error(grads, reference)
        data[f"max_rel_error_{key}"] = error
        ctx.results.row(name, setting, f"{label} max rel. error vs float64 reference ({clipped}/{units} units clip)",
                        f"{error:.1e}", "<= 1e-5", error <= 1e-5)
    restore()
    found = sync_check(ctx, methods["normfree"])
    data["host_sync_normfree"] = found
    ctx.results.row(name, setting, "(d) host synchronisation (sync debug mode 'error')", found, "none",
                    None if found.startswith("n/a") else found == "none")
    return data


# -- 2. nfnet_f0 training step -------------------------------------------------------------------------
def _plan_graph_state(params: list[torch.Tensor]) -> str:
    """How `adaptive_clip_grad_` ran the Triton kernel for `params` last: from the plan's CUDA graph or not."""
    from normfree.agc import clip, gpu_kernel

    plans = [d.gpu_plan for d in clip._dispatches.values() if d.gpu_plan is not None and d.first and
             len(d.first) == len(params)]
    if not plans:
        return "n/a (no Triton plan)"
    states = [state for plan in plans for state in plan.graphs.values()]
    if any(isinstance(state, tuple) and state for state in states):
        return "yes"
    return f"no ({gpu_kernel._graph_failure[0][:200] if gpu_kernel._graph_failure else 'states: ' + repr(states)[:100]})"


def stand_in_learner(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    """What `normfree.AGC`'s before_train / before_step read from a fastai Learner."""
    return SimpleNamespace(model=model, opt=SimpleNamespace(param_lists=[list(g["params"]) for g in optimizer.param_groups]))


def section_train_step(ctx: Context) -> dict:
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    import normfree

    name, s = S2, ctx.sizes
    setting = f"{s.nfnet} bs {s.step_batch} {s.step_size} px bf16 channels-last SGD-Nesterov"
    model = make_model(s.nfnet, ctx, channels_last=True)
    x, y = batch(ctx, s.step_batch, s.step_size, channels_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    params = clipped_parameters(model)
    data: dict = {}
    try:  # the callback's own per-step work (ClipHistory.record, ...) is part of what is timed
        callback = normfree.AGC(CLIPPING, EPS)
        callback.learn = stand_in_learner(model, optimizer)
        callback.before_train()
    except Exception as error:  # noqa: BLE001 - time the others
        callback = None
        data.setdefault("errors", {})["callback"] = traceback.format_exc()
        ctx.results.row(name, setting, "callback: ERROR", _short(error))
    last_loss = []
    # Whole steps vary by several ms from round to round (clocks, the host), more than AGC's share: the
    # share is also measured inside each step, with events around the clipping call alone.
    clip_events: dict[str, list] = {}

    def step(clip, key):
        def run():
            optimizer.zero_grad(set_to_none=False)
            with autocast(ctx, "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if ctx.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                clip()
                end.record()
                clip_events.setdefault(key, []).append((start, end))
            else:
                clip()
            optimizer.step()
            last_loss[:] = [loss.detach()]
        return run

    variants = {
        "none": step(lambda: None, "none"),
        "normfree": step(lambda: normfree.adaptive_clip_grad_(params, CLIPPING, EPS), "normfree"),
        "timm": step(lambda: timm_agc(params, CLIPPING, EPS), "timm"),
    }
    if callback is not None:
        variants["callback"] = step(callback.before_step, "callback")
    for key, run in list(variants.items()):
        log(f"  section 2: warm-up {key}")
        try:
            times_ms(ctx, run, s.step_warmup)
        except Exception as error:  # noqa: BLE001 - time the others
            data.setdefault("errors", {})[key] = traceback.format_exc()
            ctx.results.row(name, setting, f"{key}: ERROR", _short(error))
            del variants[key]
    samples: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    for round_ in range(s.step_rounds):
        for key in order[round_ % len(order):] + order[: round_ % len(order)]:
            samples[key] += times_ms(ctx, variants[key], s.step_per_round)
    log("  section 2: timed")
    clip_events = {key: pairs[-len(samples[key]):] for key, pairs in clip_events.items()}  # the timed steps
    sync(ctx)
    in_step = {key: statistics.median(start.elapsed_time(end) for start, end in pairs) for key, pairs in clip_events.items()}
    data["in_step_clip_ms"] = in_step
    median = {key: statistics.median(v) for key, v in samples.items()}
    data.update(median_ms=median, samples_ms=samples, steps_recorded_by_callback=len(callback.history) if callback else None,
                final_loss=float(last_loss[0]) if last_loss else None)
    labels = {"none": "step without AGC", "normfree": "step + normfree adaptive_clip_grad_",
              "timm": "step + timm adaptive_clip_grad", "callback": "step + normfree.AGC callback (before_step)"}
    for key, label in labels.items():
        if key in median:
            ctx.results.row(name, setting, label + ", median", ms(median[key]))
    if {"none", "normfree"} <= median.keys():
        data["agc_share_whole_steps"] = share = (median["normfree"] - median["none"]) / median["none"]
        ctx.results.row(name, setting, "normfree AGC's share from whole steps: (agc - none) / none", pct(share))
    for key, label in (("normfree", "normfree AGC"), ("timm", "timm AGC"), ("callback", "normfree.AGC callback")):
        if key in in_step and "none" in median:
            share = (in_step[key] - in_step.get("none", 0.0)) / median["none"]
            data[f"in_step_share_{key}"] = share
            target = {"normfree": ("<= 2%", share <= 0.02)}.get(key, ("", None))
            ctx.results.row(name, setting, f"{label}: time inside the step (events around the call), median / step "
                            f"without AGC", f"{ms(in_step[key])} = {pct(share)}", *target)
    if {"normfree", "callback"} <= in_step.keys() and "none" in median:
        data["in_step_callback_extra_share"] = extra = (in_step["callback"] - in_step["normfree"]) / median["none"]
        ctx.results.row(name, setting, "callback's own work inside the step: (callback - normfree) / step without AGC",
                        pct(extra), "<= 0.5%", extra <= 0.005)
    if {"none", "timm"} <= median.keys():
        data["timm_share"] = share = (median["timm"] - median["none"]) / median["none"]
        ctx.results.row(name, setting, "timm AGC's share: (timm - none) / none", pct(share))
    for key in [k for k in ("none", "callback") if k in variants]:
        found = sync_check(ctx, variants[key])
        data[f"host_sync_{key}"] = found
        ctx.results.row(name, setting, f"host synchronisation in one step ({labels[key]})", found, "none",
                        None if found.startswith("n/a") else found == "none")
    return data


# -- 3. per-sample AGC ------------------------------------------------------------------------------------
class Phases:
    """Host time per phase of a step, accumulated over calls: `with phases("forward"): ...`."""

    def __init__(self):
        self.ms: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms.setdefault(name, []).append((time.perf_counter() - start) * 1e3)

    def medians(self) -> str:
        return " / ".join(f"{name} {statistics.median(times):.1f}" for name, times in self.ms.items())


def _untimed(name: str):
    return nullcontext()


def ordinary_step(model, optimizer, x, y, params, precision, ctx):
    import normfree

    def run(phase=_untimed):
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with phase("forward"), autocast(ctx, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with phase("backward"):
            loss.backward()
        with phase("clip"):
            normfree.adaptive_clip_grad_(params, CLIPPING, EPS)
        with phase("step"):
            optimizer.step()
    return run


def per_sample_step(model, optimizer, x, y, clipper, precision, ctx):
    scale = torch.tensor(1.0 / len(x), device=ctx.device)

    def run(phase=_untimed):
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        clipper.grad_scale = scale
        clipper.start()
        with phase("forward"), autocast(ctx, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with phase("backward"):
            loss.backward()
        clipper.stop()
        with phase("clip"):
            clipper.collect([])
        with phase("step"):
            optimizer.step()
    return run


def phase_host_ms(run, reps: int) -> str:
    """Median host time of each phase of `run` (no synchronisation), as "zero_grad a / forward b / ..." in ms."""
    phases = Phases()
    run()
    for _ in range(reps):
        run(phases)
    return phases.medians()


def layer_replay_host_us(clipper) -> str:
    """Host time to launch each of the clipper's layer graphs (no synchronisation): median and sum over graphs, in us.
    The replays rewrite the graphs' outputs and add to the clip tally, as a step's do."""
    entries = [e for e in clipper.graphs._entries.values() if getattr(e, "graph", None) is not None]
    if not entries:
        return "n/a (no graphs)"
    per_graph = []
    for entry in entries:
        entry.graph.replay()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            entry.graph.replay()
            times.append((time.perf_counter() - start) * 1e6)
        per_graph.append(statistics.median(times))
    torch.cuda.synchronize()
    return f"{len(per_graph)} graphs: median {statistics.median(per_graph):.0f} us, sum {sum(per_graph) / 1e3:.2f} ms"


def profile_table(ctx: Context, run) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        run()
        sync(ctx)
    averages = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if ctx.cuda else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=key, row_limit=25)
        except Exception:  # noqa: BLE001 - the other spelling of the key
            continue
    return averages.table(row_limit=25)


def _loop_over_examples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        clipped: set[str]) -> list[torch.Tensor]:
    """mean_i of each example's own gradient, AGC'd in float64 (`agc_reference`) for the parameters named in
    `clipped`; the gradients in the model's dtype."""
    params = list(model.named_parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for _, p in params]
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, (name, p) in enumerate(params):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            total[k] += agc_reference([p], [grad])[0][0] if name in clipped else grad.double()
    return [t / len(x) for t in total]


def _batch_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The ordinary mean gradient of the batch, no clipping (what batched backpropagation itself gets)."""
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _engine_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clipped: set[int],
                  settings: dict) -> list[torch.Tensor]:
    """The per-sample engine's clipped mean gradient, after three passes (the layers' CUDA graphs are captured
    on the second pass and replayed on the third)."""
    from normfree.agc.per_sample import PerSampleClipper, tuned

    params = list(model.parameters())
    with tuned(**settings):
        clipper = PerSampleClipper(model, {id(p): CLIPPING for p in params if id(p) in clipped}, EPS)
        try:
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                clipper.grad_scale = torch.tensor(1.0 / len(x), device=x.device)
                clipper.start()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                clipper.stop()
                clipper.collect([])
        finally:
            clipper.remove()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _worst_tensors(got: list[torch.Tensor], reference: list[torch.Tensor], names: list[str],
                   k: int = 5) -> list[tuple[float, str]]:
    """The `k` tensors with the largest max error / max, largest first."""
    per_tensor = [(max_relative_error([g.to(r.device)], [r]), name) for g, r, name in zip(got, reference, names)]
    return sorted(per_tensor, reverse=True)[:k]


@dataclass
class Exactness:
    """The per-sample check's model, batch and float64 reference (the loop over examples)."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    clipped: set[int]
    clipped_names: set[str]
    names: list[str]
    reference: list[torch.Tensor]
    float32_loop: list[torch.Tensor]

    @staticmethod
    def make(ctx: Context) -> Exactness:
        import copy

        s = ctx.sizes
        model = make_model(s.check_arch, ctx)
        x, y = batch(ctx, s.check_examples, s.check_size)
        clipped = {id(p) for p in clipped_parameters(model)}
        names = [name for name, _ in model.named_parameters()]
        clipped_names = {name for name, p in model.named_parameters() if id(p) in clipped}
        with no_tf32():
            reference = _loop_over_examples(copy.deepcopy(model).double(), x.double(), y, clipped_names)
            float32_loop = _loop_over_examples(model, x, y, clipped_names)
        return Exactness(model, x, y, clipped, clipped_names, names, reference, float32_loop)

    def row(self, ctx: Context, what: str, got: list[torch.Tensor], data: dict, judge: bool = True,
            reference: list[torch.Tensor] | None = None) -> None:
        """One row: `got`'s global relative error against the reference, and its worst tensors."""
        reference = self.reference if reference is None else reference
        error = global_relative_error([g.to(r.device) for g, r in zip(got, reference)], reference)
        worst = _worst_tensors(got, reference, self.names)
        (per_tensor, name), k = worst[0], self.names.index(worst[0][1])
        float32_loop = max_relative_error([self.float32_loop[k]], [self.reference[k]])
        data.setdefault("exactness", {})[what] = dict(relative_error=error, worst_tensors=worst)
        s = ctx.sizes
        ctx.results.row(S3, f"{s.check_arch} fp32 no TF32, first {s.check_examples} examples, {what}",
                        "||error|| / ||reference|| against the loop over examples in float64 (worst tensor "
                        f"{name}: max error / max {per_tensor:.0e}; the float32 loop's there {float32_loop:.0e})",
                        f"{error:.1e}", "<= 1e-5" if judge else "", (error <= 1e-5) if judge else None)


def exactness_rows(ctx: Context, data: dict) -> None:
    """Per-sample gradients against the loop over examples in float64: the engine's variants, then the controls
    that locate a disagreement: cuDNN's algorithms (deterministic ones; cuDNN off), the CPU's plans, the
    engine on this host's CPU, the float64 loop on the CPU, and plain batched backpropagation in float32
    against float64 (no clipping: float32 arithmetic of the ordinary backward pass)."""
    import copy

    check = Exactness.make(ctx)
    cpu_plans = {"cuda_pass_cost": 4.0, "kxk_weight_grads": "conv"}
    variants = [(v, k, nullcontext) for v, k in PER_SAMPLE_VARIANTS] + [
        ("default, cuDNN deterministic", {}, cudnn_deterministic),
        ("default, cuDNN off", {}, lambda: torch.backends.cudnn.flags(enabled=False)),
        ("the CPU's plans (pass cost 4, k x k by convolution)", cpu_plans, nullcontext)]
    for variant, settings, context in variants:
        try:
            with no_tf32(), context():
                check.row(ctx, variant, _engine_grads(check.model, check.x, check.y, check.clipped, settings), data)
        except Exception as error:  # noqa: BLE001
            data.setdefault("errors", {})[f"exactness {variant}"] = traceback.format_exc()
            ctx.results.row(S3, f"exactness, {variant}", "ERROR", _short(error))
    log("  section 3: exactness of the variants done")
    try:
        cpu = torch.device("cpu")
        model = copy.deepcopy(check.model).to(cpu)
        clipped = {id(q) for p, q in zip(check.model.parameters(), model.parameters()) if id(p) in check.clipped}
        x, y = check.x.to(cpu), check.y.to(cpu)
        check.row(ctx, "control: the engine on this host's CPU", _engine_grads(model, x, y, clipped, {}), data)
        cpu_reference = _loop_over_examples(model.double(), x.double(), y, check.clipped_names)
        check.row(ctx, "control: the GPU's float64 loop against the CPU's", check.reference, data, judge=False,
                  reference=cpu_reference)
        with no_tf32():
            batch64 = _batch_grads(copy.deepcopy(check.model).double(), check.x.double(), check.y)
            check.row(ctx, "control: ordinary float32 batch backward against float64 (no AGC)",
                      _batch_grads(check.model, check.x, check.y), data, judge=False, reference=batch64)
    except Exception as error:  # noqa: BLE001
        data.setdefault("errors", {})["exactness controls"] = traceback.format_exc()
        ctx.results.row(S3, "exactness controls", "ERROR", _short(error))
    log("  section 3: exactness controls done")


def section_per_sample(ctx: Context) -> dict:
    from normfree.agc.per_sample import PerSampleClipper

    data: dict = dict(variants={v: settings for v, settings in PER_SAMPLE_VARIANTS}, settings={})
    exactness_rows(ctx, data)
    for setting in ctx.sizes.per_sample:
        if ctx.per_sample not in setting.label:
            continue
        entry = data["settings"][setting.label] = {}
        try:
            _per_sample_setting(ctx, setting, entry, PerSampleClipper)
        except Exception as error:  # noqa: BLE001
            entry["error"] = traceback.format_exc()
            ctx.results.row(S3, setting.label, "ERROR", _short(error))
        finally:
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
        log(f"  section 3: {setting.label} done")
    return data


def graph_ms(ctx: Context, run, entry: dict, key: str) -> float | None:
    """Median replay time of `run` captured in a CUDA graph; None on the CPU or when capture fails (recorded)."""
    if not ctx.cuda:
        return None
    try:
        graph = captured(ctx, run)
        try:
            return median_ms(ctx, graph.replay, 2, ctx.sizes.ps_reps)
        finally:
            del graph
    except Exception:  # noqa: BLE001 - recorded; the step's other rows stand
        entry.setdefault("graph_errors", {})[key] = traceback.format_exc()
        log(f"  CUDA graph capture of {key} failed: {traceback.format_exc().strip().splitlines()[-1][:200]}")
        torch.cuda.synchronize()
        return None


def _per_sample_setting(ctx: Context, setting: PerSampleSetting, entry: dict, PerSampleClipper) -> None:
    from normfree.agc.per_sample import tuned

    name, s = S3, ctx.sizes
    channels_last = setting.precision == "bf16"
    model = make_model(setting.arch, ctx, channels_last=channels_last)
    x, y = batch(ctx, setting.batch, setting.size, channels_last=channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = clipped_parameters(model)
    ordinary = ordinary_step(model, optimizer, x, y, params, setting.precision, ctx)
    ordinary_ms = median_ms(ctx, ordinary, s.ps_warmup, s.ps_reps)
    peak_reset(ctx)
    ordinary()
    ordinary_peak = peak_mib(ctx)
    entry.update(ordinary_ms=ordinary_ms, ordinary_peak_mib=ordinary_peak)
    ctx.results.row(name, setting.label, "ordinary AGC step, median", ms(ordinary_ms))
    entry["ordinary_host_ms"] = host_ms(ordinary, 1, s.ps_reps)
    sync(ctx)
    ctx.results.row(name, setting.label, "ordinary AGC step, host time to issue it", ms(entry["ordinary_host_ms"]))
    entry["ordinary_phases"] = phase_host_ms(ordinary, s.ps_reps)
    sync(ctx)
    ctx.results.row(name, setting.label, "ordinary AGC step, host ms by phase", entry["ordinary_phases"])
    ordinary_graph_ms = graph_ms(ctx, ordinary, entry, "ordinary")
    if ordinary_graph_ms is not None:
        ctx.results.row(name, setting.label, "ordinary AGC step, CUDA graph replay", ms(ordinary_graph_ms))
    profiles = [f"== ordinary AGC step: {setting.label} ==\n{profile_table(ctx, ordinary)}"] if setting.profile else []
    for variant, settings in PER_SAMPLE_VARIANTS:
        label = setting.label + ("" if len(PER_SAMPLE_VARIANTS) == 1 and variant == "default" else f", {variant}")
        try:
            with tuned(**settings):
                clipper = PerSampleClipper(model, {id(p): CLIPPING for p in params}, EPS)
                try:
                    run = per_sample_step(model, optimizer, x, y, clipper, setting.precision, ctx)
                    per_ms = median_ms(ctx, run, s.ps_warmup, s.ps_reps)
                    peak_reset(ctx)
                    run()
                    per_peak = peak_mib(ctx)
                    host_sync = sync_check(ctx, run)
                    per_host_ms = host_ms(run, 1, s.ps_reps)
                    sync(ctx)
                    per_phases = phase_host_ms(run, s.ps_reps)
                    sync(ctx)
                    replays = layer_replay_host_us(clipper) if ctx.cuda else "n/a (CPU)"
                    graphs = clipper.graphs
                    graphs_row = f"{graphs.captured} captured, {len(graphs.failures)} failed" + (
                        f" ({graphs.failures[0][:150]})" if graphs.failures else "")
                    per_graph_ms = graph_ms(ctx, run, entry, variant)
                    if setting.profile:
                        profiles.append(f"== per-sample AGC step ({variant}): {setting.label} ==\n{profile_table(ctx, run)}")
                finally:
                    clipper.remove()
        except Exception as error:  # noqa: BLE001
            entry.setdefault("errors", {})[variant] = traceback.format_exc()
            ctx.results.row(name, label, "per-sample ERROR", _short(error))
            continue
        ratio = per_ms / ordinary_ms
        entry[variant] = dict(per_sample_ms=per_ms, per_sample_peak_mib=per_peak, time_ratio=ratio,
                              host_sync=host_sync)
        ctx.results.row(name, label, "per-sample step, median", ms(per_ms))
        ctx.results.row(name, label, "layers' CUDA graphs", graphs_row)
        entry[variant]["per_sample_host_ms"] = per_host_ms
        ctx.results.row(name, label, "per-sample step, host time to issue it", ms(per_host_ms))
        entry[variant].update(phases=per_phases, layer_replays=replays)
        ctx.results.row(name, label, "per-sample step, host ms by phase", per_phases)
        ctx.results.row(name, label, "layers' graph launches, host time each", replays)
        if per_graph_ms is not None:
            entry[variant]["per_sample_graph_ms"] = per_graph_ms
            ctx.results.row(name, label, "per-sample step, CUDA graph replay", ms(per_graph_ms))
            if ordinary_graph_ms is not None:
                ctx.results.row(name, label, "per-sample / ordinary, both replayed from CUDA graphs",
                                f"{per_graph_ms / ordinary_graph_ms:.2f}x")
        ctx.results.row(name, label, "host synchronisation in one per-sample step", host_sync, "none",
                        None if host_sync.startswith("n/a") else host_sync == "none")
        ctx.results.row(name, label, "per-sample / ordinary step time", f"{ratio:.2f}x", "<= 1.5", ratio <= 1.5)
        if per_peak is not None and ordinary_peak:
            memory = per_peak / ordinary_peak
            entry[variant]["memory_ratio"] = memory
            ctx.results.row(name, label, f"peak memory per-sample / ordinary ({per_peak:.0f} / {ordinary_peak:.0f} MiB)",
                            f"{memory:.2f}x", "<= 1.3", memory <= 1.3)
        else:
            ctx.results.row(name, label, "peak memory per-sample / ordinary", "n/a (CPU)")
    if profiles:
        (ctx.out / "per_sample_profile.txt").write_text("\n\n".join(profiles) + "\n")
        entry["profile"] = str(ctx.out / "per_sample_profile.txt")


def _in_process_learner(kind: str, precision: str, limit: int | None, device: torch.device):
    """The learner `normfree train` builds (AGC and its callbacks) or a plain fastai one, on digits at 32 px."""
    import dataclasses

    import timm
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat

    from normfree.app.config import TrainConfig
    from normfree.app.train import _build_learner
    from normfree.data import digits_dataloaders

    if kind == "normfree":
        config = dataclasses.replace(TrainConfig(), data="digits", size=32, bs=64, precision=precision, limit=limit,
                                     device=device.type)
        return _build_learner(config)
    dls = digits_dataloaders(bs=64, size=32, limit=limit, device=device)
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
            ctx.results.row(name, f"in process, {label}", "ERROR", _short(error))
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


# -- 4. normfree train -----------------------------------------------------------------------------------------
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


# -- driver -----------------------------------------------------------------------------------------------------
SECTIONS = [(S1, section_agc), (S2, section_train_step), (S3, section_per_sample), (S4, section_cli)]


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # noqa: BLE001
        return f"unavailable ({type(error).__name__})"


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def metadata(device: torch.device, args: argparse.Namespace) -> dict:
    cuda = device.type == "cuda"
    return dict(
        device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
        torch=torch.__version__, triton=_version("triton"), timm=_version("timm"), fastai=_version("fastai"),
        python=platform.python_version(), commit=_git_commit(), quick=args.quick, cpu_smoke=args.cpu_smoke,
        cudnn_benchmark=torch.backends.cudnn.benchmark, started=time.strftime("%Y-%m-%d %H:%M:%S"),
        per_sample_variants=PER_SAMPLE_VARIANTS,
        # what decides whether float32 matmuls and convolutions run in TF32 (the exactness rows depend on it)
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        tf32_environment={k: v for k, v in os.environ.items() if "TF32" in k},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bench-output"), help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="every section at tiny sizes (a smoke test)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the quick sizes on the CPU (tests the code paths)")
    parser.add_argument("--sections", default="1,2,3,4", help="comma-separated section numbers to run")
    parser.add_argument("--per-sample", default="", metavar="TEXT",
                        help="section 3: only the settings whose label contains TEXT (e.g. 'nf_resnet26')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(SKIP_LINE, flush=True)
        return 0
    sys.path.insert(0, str(ROOT))  # normfree from this checkout, installed or not
    if args.cpu_smoke:
        args.quick = True
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out = args.out.resolve()  # the CLI runs of section 4 have another working directory
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, metadata(device, args), judge=not args.cpu_smoke)
    ctx = Context(device, QUICK if args.quick else FULL, args.out, results, args.per_sample)
    log(f"device {results.meta['device']}; torch {torch.__version__}, triton {results.meta['triton']}, "
        f"timm {results.meta['timm']}; commit {results.meta['commit']}; out {args.out}; float32 matmul precision "
        f"{results.meta['float32_matmul_precision']}, TF32 environment {results.meta['tf32_environment'] or 'none'}")
    wanted = {x.strip() for x in args.sections.split(",")}
    start = time.perf_counter()
    for key, function in SECTIONS:
        if key.split()[0] not in wanted:
            continue
        if time.perf_counter() - start > BUDGET_S:
            results.sections[key] = dict(skipped=f"time budget of {BUDGET_S} s spent")
            results.row(key, "", "SKIPPED", f"time budget of {BUDGET_S} s spent")
            results.save()
            continue
        log(f"section {key} ...")
        began = time.perf_counter()
        try:
            data = function(ctx)
            error = None
        except Exception as caught:  # noqa: BLE001 - record and go on
            data, error = {}, traceback.format_exc()
            results.row(key, "", "ERROR", _short(caught))
            log(f"section {key} FAILED: {_short(caught)}")
        wall = time.perf_counter() - began
        results.sections[key] = dict(wall_s=wall, error=error, data=data)
        results.row(key, "", "section wall time", f"{wall:.1f} s")
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a broken context shows in the next section's error
                pass
        results.save()
        log(f"section {key} done in {wall:.1f} s")
    results.meta["total_s"] = time.perf_counter() - start
    results.save()
    log(f"all done in {results.meta['total_s']:.1f} s; results in {args.out / 'gpu_bench.json'}")
    print()
    print(f"normfree GPU benchmark: {results.meta['device']}, torch {results.meta['torch']}, "
          f"triton {results.meta['triton']}, timm {results.meta['timm']}, commit {results.meta['commit'][:12]}")
    print()
    print(results.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
