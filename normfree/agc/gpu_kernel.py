"""AGC fused into a few Triton launches: the GPU kernel behind `adaptive_clip_grad_` on CUDA.

Brock, De, Smith, Simonyan 2021, Sec. 4, Eq. (3), the same rule as `adaptive_clip_factor` and the
CPU kernel (csrc/agc_cpu.c). Each program of one launch takes a tile of units (a few output rows
of one tensor; tensors of any number, found through a table of pointers), reads each unit's weight
and gradient once for the two norms (squares summed in float32), and rewrites the gradient only
where the unit clips, while the tile is still in the cache. Units are grouped by size into at most
`len(TILES)` launches per dtype pair, so small filters (a depthwise 3x3) and wide rows (a Linear
over 3072 features) each get a tile shape that keeps the memory system busy. Clipped and
non-finite unit counts per parameter are added up on the device with atomics: no host
synchronisation, and the whole call can be captured in a CUDA graph once it has run outside one
(the tables of pointers are built, and copied to the device, by `plan` on the first call for a set
of gradients; `adaptive_clip_grad_` keeps them while the gradients stay where they are).

Launching from Python costs more than the kernels on an H200 (0.43 ms of host time per call against
0.23 ms of GPU time for nfnet_f0's 220 gradients), so from its second call with the same arguments a
plan replays its launches from a CUDA graph of its own (`clip_`): one graph launch per call. The graph
holds the same data pointers as the plan's tables, so it is valid exactly as long as they are.

Triton ships with PyTorch's CUDA builds; where it is missing, or the kernel fails to build or launch
(then with one warning; a kernel that runs twice over part of the gradients is harmless: AGC applied
again to clipped units changes nothing), `adaptive_clip_grad_` uses torch ops. ``NORMFREE_GPU_KERNEL=0``
chooses torch ops. The kernel also runs on CPU tensors under
``TRITON_INTERPRET=1`` (set before the first import of this module), which is how the tests hold
it to the float64 reference on machines without a GPU.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch on some platforms
    triton = None

__all__ = ["KernelFailed", "available", "clippable", "supports", "plan", "clip_"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (largest unit size, units per program, elements loaded per unit and iteration), smallest first;
# units larger than the last bound go to the last tile shape.
TILES = ((128, 16, 128), (None, 2, 1024))  # two launches measured 12% faster than four on nfnet_f0 (H200)


class KernelFailed(RuntimeError):
    """The kernel could not be compiled or launched here; `available()` is False from now on."""


_failure: list[str] = []  # why the kernel failed in this process, if it did
_graph_failure: list[str] = []  # why a plan's launches could not be captured in a CUDA graph, if they could not


@functools.cache
def available() -> bool:
    """Whether the Triton kernel can be used: Triton imports, ``NORMFREE_GPU_KERNEL`` is not 0, and it has not
    failed."""
    return triton is not None and os.environ.get("NORMFREE_GPU_KERNEL", "1") != "0" and not _failure


def unit_contiguous(t: Tensor) -> bool:
    """Whether each unit of `t` (one index of dim 0) is one dense block: contiguous or channels-last tensors."""
    if t.is_contiguous():
        return True
    if t.ndim == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def clippable(param: Tensor) -> bool:
    """Whether the kernel can clip `param.grad` on `param`'s device: a dense float32/bf16/fp16 gradient of
    `param`'s shape, each unit of weight and gradient one dense block (contiguous or channels-last)."""
    grad = param.grad
    return (
        available() and param.dtype in DTYPES and grad.dtype in DTYPES and not grad.is_sparse
        and grad.shape == param.shape and unit_contiguous(param) and unit_contiguous(grad)
    )


def supports(param: Tensor) -> bool:
    """Whether `adaptive_clip_grad_` clips `param` with this kernel: a `clippable` parameter on a CUDA device.

    (Under ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors; the tests call it that way.)
    """
    return param.device.type == "cuda" and clippable(param)


# One int64 table per launch: a record per program (TASK fields: tensor index, first unit), then a
# record per tensor (TENSOR fields: weight pointer, gradient pointer, unit size, units, count column).
# Two tensors and a few numbers per launch: Triton's launcher costs tens of microseconds per tensor.
TASK, TENSOR = 2, 5

if triton is not None:
    @triton.jit
    def _clip_units(table, tensors_at, counts, n_slots, clipping, eps, grad_norm_floor,
                    WEIGHT: tl.constexpr, GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    TASK_FIELDS: tl.constexpr, TENSOR_FIELDS: tl.constexpr):
        task = table + tl.program_id(0) * TASK_FIELDS
        record = table + tensors_at + tl.load(task) * TENSOR_FIELDS
        weight = tl.load(record).to(tl.pointer_type(WEIGHT))
        grad = tl.load(record + 1).to(tl.pointer_type(GRAD))
        size = tl.load(record + 2)
        rows = tl.load(task + 1) + tl.arange(0, ROWS)
        in_tensor = rows < tl.load(record + 3)
        start = rows * size
        w_squares = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        g_squares = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for first in range(0, size, BLOCK):
            columns = first + tl.arange(0, BLOCK)
            mask = in_tensor[:, None] & (columns < size)[None, :]
            offsets = start[:, None] + columns[None, :]
            w = tl.load(weight + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
            w_squares += w * w
            g_squares += g * g
        w_norm = tl.sqrt(tl.sum(w_squares, axis=1))
        g_norm = tl.sqrt(tl.sum(g_squares, axis=1))
        max_norm = tl.maximum(w_norm, eps) * clipping
        # float32's largest: false for inf and NaN; a non-finite weight norm gives no threshold (on a GPU,
        # tl.maximum(NaN, eps) would be eps), so such a unit is left alone and counted as a gradient's is
        finite = (g_norm <= 3.4028234663852886e38) & (w_norm <= 3.4028234663852886e38)
        clip = (g_norm > max_norm) & finite & in_tensor
        factor = tl.where(clip, max_norm / tl.maximum(g_norm, grad_norm_floor), 1.0)
        n_clipped = tl.sum(clip.to(tl.int32), axis=0)
        if n_clipped > 0:
            for first in range(0, size, BLOCK):
                columns = first + tl.arange(0, BLOCK)
                mask = clip[:, None] & (columns < size)[None, :]
                offsets = start[:, None] + columns[None, :]
                g = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad + offsets, (g * factor[:, None]).to(GRAD), mask=mask)
        slot = tl.load(record + 4)
        tl.atomic_add(counts + slot, n_clipped)
        tl.atomic_add(counts + n_slots + slot, tl.sum((in_tensor & ~finite).to(tl.int32), axis=0))

    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class _Launch:
    """One launch: its table (on the device, and the pinned host copy a CUDA graph captured while the table was made
    copies it from at every replay), where the tensor records start, and its tile shape."""

    table: Tensor
    host_table: Tensor
    tensors_at: int
    weight_dtype: torch.dtype
    grad_dtype: torch.dtype
    rows: int
    block: int


def _tile(unit_size: int) -> tuple[int, int]:
    for bound, rows, block in TILES:
        if bound is None or unit_size <= bound:
            return rows, block
    raise AssertionError("TILES ends with an unbounded tile")


@dataclass(frozen=True)
class Plan:
    """The launches that clip one list of parameters, and CUDA graphs of them by call arguments."""

    device: torch.device
    launches: list[_Launch]
    # by (n_slots, clipping, eps, floor): None after a first call launched directly, then (graph, its counts), or
    # NO_GRAPH where capturing failed
    graphs: dict[tuple, tuple | None] = field(default_factory=dict)


NO_GRAPH = ()


def plan(params: list[Tensor], units: list[int], slots: list[int]) -> Plan:
    """The launches that clip `params` (all `supports`-ed, on one device; `units[i]` units each), parameter i's
    counts going to column `slots[i]`. They hold data pointers: valid while every weight and gradient keeps
    its storage and layout. Copies its tables to the device from pinned memory, so that it can be called
    inside a CUDA graph's capture too (gradients first allocated in the capture, as after
    `zero_grad(set_to_none=True)` in a captured step)."""
    device = params[0].grad.device
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if units[i] == 0:
            continue
        unit_size = p.numel() // units[i]
        groups.setdefault((p.dtype, p.grad.dtype, _tile(unit_size)), []).append(i)
    launches = []
    for (weight_dtype, grad_dtype, (rows, block)), members in groups.items():
        tasks = [(k, first) for k, i in enumerate(members) for first in range(0, units[i], rows)]
        records = [(params[i].data_ptr(), params[i].grad.data_ptr(), params[i].numel() // units[i], units[i], slots[i])
                   for i in members]
        host_table = torch.tensor([v for record in tasks + records for v in record], dtype=torch.int64)
        if device.type == "cuda":
            host_table = host_table.pin_memory()
        table = host_table.to(device, non_blocking=True)
        launches.append(_Launch(table, host_table, TASK * len(tasks), weight_dtype, grad_dtype, rows, block))
    return Plan(device, launches)


def clip_(plan: Plan, n_slots: int, clipping: float, eps: float, grad_norm_floor: float) -> Tensor:
    """Run the launches of a `plan`: AGC on its parameters, without host synchronisation.

    Returns [2, n_slots] int32 counts on the device: row 0 the units clipped, row 1 the units whose
    gradient norm or weight norm was not finite (left unchanged), in each parameter's column. Replayed from the plan's
    CUDA graph (from the second call with these arguments), they are the graph's own tensor, which the next
    call rewrites: copy them to keep them.
    """
    if plan.device.type != "cuda" or torch.cuda.is_current_stream_capturing():  # no graph inside the caller's
        return _launch(plan, n_slots, clipping, eps, grad_norm_floor)
    key = (n_slots, float(clipping), float(eps), float(grad_norm_floor))
    if key not in plan.graphs:  # first call: launch (and compile the kernel) outside a graph
        plan.graphs[key] = None
        return _launch(plan, n_slots, clipping, eps, grad_norm_floor)
    if plan.graphs[key] is None:
        try:
            plan.graphs[key] = _captured(plan, n_slots, clipping, eps, grad_norm_floor)
        except RuntimeError as error:  # capture refused here (a driver, a debugging mode): launch directly from now on
            plan.graphs[key] = NO_GRAPH
            if not _graph_failure:
                _graph_failure.append(f"{type(error).__name__}: {error}")
                warnings.warn(f"normfree's AGC kernel could not be captured in a CUDA graph here "
                              f"({_graph_failure[0]}); "
                              "it is launched directly (correct, more host time per call).", RuntimeWarning,
                              stacklevel=4)
    if plan.graphs[key] is NO_GRAPH:
        return _launch(plan, n_slots, clipping, eps, grad_norm_floor)
    graph, counts = plan.graphs[key]
    graph.replay()
    return counts


def _captured(plan: Plan, n_slots: int, clipping: float, eps: float,
              grad_norm_floor: float) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """The launches captured in a CUDA graph, and the counts tensor the graph writes (zeroed in it)."""
    graph, stream, current = torch.cuda.CUDAGraph(), torch.cuda.Stream(plan.device), torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        # thread_local: CUDA calls of other threads (pin-memory, loaders) may go on while this thread captures
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            counts = _launch(plan, n_slots, clipping, eps, grad_norm_floor, capturing=True)
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, counts


def _launch(plan: Plan, n_slots: int, clipping: float, eps: float, grad_norm_floor: float,
            capturing: bool = False) -> Tensor:
    """The plan's launches; a failure turns the kernel off (`KernelFailed`), except while `capturing` a graph of
    them, where it only means that this graph cannot be made (a RuntimeError)."""
    counts = torch.zeros(2, n_slots, dtype=torch.int32, device=plan.device)
    for launch in plan.launches:
        try:
            _clip_units[(launch.tensors_at // TASK,)](
                launch.table, launch.tensors_at, counts, n_slots, float(clipping), float(eps), float(grad_norm_floor),
                WEIGHT=_TRITON_DTYPES[launch.weight_dtype], GRAD=_TRITON_DTYPES[launch.grad_dtype],
                ROWS=launch.rows, BLOCK=launch.block, TASK_FIELDS=TASK, TENSOR_FIELDS=TENSOR,
            )
        except Exception as error:  # a Triton or driver that cannot build it: torch ops from now on
            if capturing:
                raise RuntimeError(f"launch refused in CUDA-graph capture: {type(error).__name__}: {error}") from error
            last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            _failure.append(f"{type(error).__name__}: {last_line}")
            available.cache_clear()
            warnings.warn(
                f"normfree's Triton AGC kernel failed here ({_failure[-1]}), so AGC on this GPU uses torch ops "
                "from now on (correct, slower). Set NORMFREE_GPU_KERNEL=0 to choose torch ops without trying the "
                "kernel.",
                RuntimeWarning, stacklevel=4,
            )
            raise KernelFailed(_failure[-1]) from error
    return counts
