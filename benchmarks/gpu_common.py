"""What the sections of `benchmarks/gpu.py` share: the sizes, the results table, the timers, models and batches,
and the float64 AGC reference."""
from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CLIPPING, EPS = 0.01, 1e-3
S1, S2, S3, S4 = "1 AGC on real grads", "2 train step", "3 per-sample AGC", "4 normfree train"
S5 = "5 weight standardisation"


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
    standardized: tuple[str, ...]  # section 5: the models whose WS convs' weights are standardised


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
    standardized=("nfnet_f0", "nf_resnet50"),
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
    standardized=("test_nfnet",),
)


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
    import normfree.agc

    excluded = {id(p) for p in normfree.agc.excluded_parameters(model)}
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


def short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
