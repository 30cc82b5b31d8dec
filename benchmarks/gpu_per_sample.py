"""Section 3 of `benchmarks/gpu.py`: the per-sample AGC step against the ordinary AGC step: time, peak memory,
exactness against a loop over examples; every entry of `PER_SAMPLE_VARIANTS` is timed; host time per phase of both
steps and per launch of a layer's graph; a profiler table of one setting."""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from gpu_common import (
    CLIPPING,
    EPS,
    S3,
    Context,
    PerSampleSetting,
    agc_reference,
    autocast,
    batch,
    captured,
    clipped_parameters,
    cudnn_deterministic,
    host_ms,
    log,
    make_model,
    max_relative_error,
    median_ms,
    ms,
    no_tf32,
    peak_mib,
    peak_reset,
    short_error,
    sync,
    sync_check,
)

# Per-sample engine variants, each timed on every setting of section 3: a name and the tuning knobs to set
# while it runs (`normfree.agc.per_sample.tuned(**knobs)`, see normfree/agc/per_sample/tuning.py).
# (On an H200: k x k convs by "conv" and "bmm" were within noise; the budget from the device's memory and a fixed
# 256 MiB one too. "no layer graphs" is the per-sample step before the layers' CUDA graphs.)
PER_SAMPLE_VARIANTS: list[tuple[str, dict]] = [
    ("default", {}), ("no layer graphs", {"layer_graphs": "off"})]


def global_relative_error(got: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """||got - ref|| / ||ref|| with all tensors as one vector (what tests/test_per_sample.py checks).

    Per tensor, a gradient that is small through cancellation between examples (a zero-initialised
    gain's) carries float32 rounding of the size of its terms, so a per-tensor ratio overstates it.
    """
    diff = torch.cat([(g.detach().double() - r).flatten() for g, r in zip(got, reference)])
    return float(diff.norm() / torch.cat([r.flatten() for r in reference]).norm())


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
            ctx.results.row(S3, f"exactness, {variant}", "ERROR", short_error(error))
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
        ctx.results.row(S3, "exactness controls", "ERROR", short_error(error))
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
            ctx.results.row(S3, setting.label, "ERROR", short_error(error))
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
                        profiles.append(f"== per-sample AGC step ({variant}): {setting.label} ==\n"
                                        f"{profile_table(ctx, run)}")
                finally:
                    clipper.remove()
        except Exception as error:  # noqa: BLE001
            entry.setdefault("errors", {})[variant] = traceback.format_exc()
            ctx.results.row(name, label, "per-sample ERROR", short_error(error))
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
            ctx.results.row(name, label,
                            f"peak memory per-sample / ordinary ({per_peak:.0f} / {ordinary_peak:.0f} MiB)",
                            f"{memory:.2f}x", "<= 1.3", memory <= 1.3)
        else:
            ctx.results.row(name, label, "peak memory per-sample / ordinary", "n/a (CPU)")
    if profiles:
        (ctx.out / "per_sample_profile.txt").write_text("\n\n".join(profiles) + "\n")
        entry["profile"] = str(ctx.out / "per_sample_profile.txt")
