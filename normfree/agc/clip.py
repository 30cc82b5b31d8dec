"""`adaptive_clip_grad_`: AGC (`normfree.agc.rule`) applied in place to a list of parameters, each by the
fastest implementation for its device, dtype and layout: the fused CPU kernel, the Triton kernel, or torch ops."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import cpu_kernel, gpu_kernel
from .rule import (
    DEFAULT_CLIPPING,
    DEFAULT_EPS,
    GRAD_NORM_FLOOR,
    adaptive_clip_factor,
    check_agc_arguments,
    is_single_unit,
    num_units,
    unit_norm_vector,
    unit_shape,
)
from .sharded import is_sharded, local_parts, local_unit_norms, reduce_counts, reduce_unit_norms, shard_layout

__all__ = ["ClipStats", "adaptive_clip_grad_", "clip_parameters_", "clip_with_torch_ops", "count_per_tensor"]


@dataclass(frozen=True)
class ClipStats:
    """What one call of `adaptive_clip_grad_` did, one entry per parameter passed, in order.

    `clipped` and `nonfinite` stay on the gradients' device: reading them (`.item()`, `int()`)
    is the only host synchronisation, and it is left to the caller. `units` is known without the
    device and lives on the CPU; parameters without a gradient have 0 units.

    For a sharded parameter (a DTensor: FSDP2, tensor parallelism) the entries describe the full tensor, the same on
    every rank: `units` of the full tensor, each unit clipped or non-finite counted once, whichever ranks hold it.
    """

    clipped: Tensor  # units whose gradient was scaled down
    nonfinite: Tensor  # units whose gradient norm or weight norm was inf or NaN, left unchanged
    units: Tensor  # units per parameter (CPU)

    @property
    def fraction(self) -> float:
        """Fraction of all units that were clipped (synchronises with the device)."""
        total = int(self.units.sum())
        return int(self.clipped.sum()) / total if total else 0.0


# what `adaptive_clip_grad_` takes: a tensor, tensors, (name, tensor) pairs, one optimizer param group, or param groups
ClippedParameters = (Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]
                     | Mapping[str, Any] | Iterable[Mapping[str, Any]])


def count_per_tensor(mask: Tensor, units: list[int]) -> tuple[Tensor, ...]:
    """True entries of `mask` in each consecutive run of `units` entries, as 0-d device tensors.

    The 1-norm of a 0/1 vector is its count: one multi-tensor call, and no index tensor to copy
    from the host (a pageable host-to-device copy would synchronise a CUDA stream).
    """
    return torch._foreach_norm(list(mask.float().split(units)), ord=1)


def clip_with_torch_ops(params: list[Tensor], clipping: float, eps: float) -> tuple[list[Tensor], list[Tensor]]:
    """AGC with torch ops, on any device and dtype, without host synchronisation.

    One multi-tensor norm for the single-unit tensors, one row-wise norm kernel per other tensor,
    the factors of all units from one computation, one `_foreach_mul_`. Returns the clipped and
    the non-finite unit counts (weight or gradient norm inf or NaN) of each parameter, in order, as 0-d int64
    device tensors.
    """
    order = sorted(range(len(params)), key=lambda i: not is_single_unit(params[i]))  # single-unit tensors first
    grads = cast(list[Tensor], [params[i].grad for i in order])  # the caller passes parameters with gradients
    clipped, nonfinite = _scale_units_(grads, [num_units(g) for g in grads],
                                       unit_norm_vector([params[i] for i in order]), unit_norm_vector(grads),
                                       clipping, eps)
    position = {i: k for k, i in enumerate(order)}
    return [clipped[position[i]] for i in range(len(params))], [nonfinite[position[i]] for i in range(len(params))]


def _scale_units_(grads: list[Tensor], units: list[int], param_norm: Tensor, grad_norm: Tensor, clipping: float,
                  eps: float) -> tuple[list[Tensor], list[Tensor]]:
    """Eq. (3) applied to `grads` (`units[i]` consecutive units along dim 0 each) from the unit norms of their
    weights and of themselves, all gradients' units in one vector each: one `_foreach_mul_`. Returns the clipped
    and the non-finite unit counts of each gradient, as 0-d int64 device tensors."""
    factor = adaptive_clip_factor(param_norm, grad_norm, clipping, eps)
    torch._foreach_mul_(grads, [f.view(unit_shape(g, n)) for f, g, n in zip(factor.split(units), grads, units)])
    clipped = torch.stack(count_per_tensor(factor < 1, units)).long().unbind()
    nonfinite = torch.stack(count_per_tensor(~(grad_norm.isfinite() & param_norm.isfinite()), units)).long().unbind()
    return list(clipped), list(nonfinite)


def _validate(params: list[Tensor]) -> tuple[list[int], torch.device]:
    """Check `params` (ValueError naming a bad parameter). Returns, per parameter listed, the position of its
    first listing (-1 without a gradient), and the gradients' device."""
    first_listing: dict[int, int] = {}
    first = []
    for i, p in enumerate(params):
        k = first_listing.setdefault(id(p), i)
        first.append(k if p.grad is not None else -1)
    positions = [i for i, k in enumerate(first) if k == i]
    grads = {i: cast(Tensor, params[i].grad) for i in positions}  # a first listing has a gradient
    for i in positions:
        if grads[i].is_sparse:
            raise ValueError(
                f"adaptive_clip_grad_ needs dense gradients; parameter {i} of shape {tuple(params[i].shape)} has a "
                "sparse one (e.g. nn.Embedding(sparse=True)): use sparse=False or exclude it"
            )
        if not (params[i].is_floating_point() and grads[i].is_floating_point()):
            raise ValueError(
                f"adaptive_clip_grad_ clips floating-point parameters; parameter {i} of shape {tuple(params[i].shape)} "
                f"is {params[i].dtype} with a {grads[i].dtype} gradient: leave it out of the list"
            )
    devices = {grads[i].device for i in positions}
    if len(devices) > 1:
        raise ValueError(f"adaptive_clip_grad_ takes parameters on one device, got {sorted(map(str, devices))}: "
                         "call it once per device")
    return first, devices.pop() if devices else torch.device("cpu")


@dataclass(frozen=True)
class _Dispatch:
    """Which implementation clips which parameter of one list: everything `adaptive_clip_grad_` decides
    from the parameters' devices, dtypes and layouts, kept while their storage stays the same."""

    device: torch.device
    units: Tensor  # per parameter listed (CPU), 0 without a gradient
    first: list[int]  # per parameter listed, the position of its first listing (-1 without a gradient)
    cpu_groups: list[list[int]]  # positions clipped by the fused CPU kernel, one list per dtype
    gpu: list[int]  # positions clipped by the Triton kernel
    gpu_plan: gpu_kernel.Plan | None
    torch_ops: list[int]  # positions clipped with torch ops
    all_gpu: bool  # every parameter with a gradient goes to the Triton kernel
    repeats: list[tuple[int, int]]  # (position, position of its first listing) of parameters listed again

    def run(self, params: list[Tensor], clipping: float, eps: float) -> ClipStats:
        """Clip `params` in place; their statistics."""
        plan = cast(gpu_kernel.Plan, self.gpu_plan)  # used only where there is one: `gpu` is not empty
        if self.all_gpu:  # the kernel writes each parameter's counts into its own column: no gathering
            counts = gpu_kernel.clip_(plan, len(params), clipping, eps, GRAD_NORM_FLOOR).long()
            for i, first in self.repeats:  # listed again: the counts of its first listing
                counts[:, i] = counts[:, first]
            return ClipStats(clipped=counts[0], nonfinite=counts[1], units=self.units)
        found: dict[int, tuple[Tensor, Tensor]] = {}
        if self.gpu:
            counts = gpu_kernel.clip_(plan, len(self.gpu), clipping, eps, GRAD_NORM_FLOOR).long()
            found.update(zip(self.gpu, zip(counts[0].unbind(), counts[1].unbind())))
        for group in self.cpu_groups:
            clipped, nonfinite = cpu_kernel.clip_([params[i] for i in group], [num_units(params[i]) for i in group],
                                                  clipping, eps, GRAD_NORM_FLOOR)
            found.update(zip(group, zip(clipped.unbind(), nonfinite.unbind())))
        if self.torch_ops:
            found.update(zip(self.torch_ops, zip(*clip_with_torch_ops([params[i] for i in self.torch_ops], clipping,
                                                                        eps))))
        return self._statistics(found)

    def _statistics(self, found: dict[int, tuple[Tensor, Tensor]]) -> ClipStats:
        return _statistics(found, self.first, self.units, self.device)


def _statistics(found: dict[int, tuple[Tensor, Tensor]], first: list[int], units: Tensor,
                device: torch.device) -> ClipStats:
    """One `ClipStats` entry per parameter listed, from the (clipped, non-finite) counts `found` per position
    clipped: a parameter listed again gets its first listing's counts (`first`: `_validate`'s), one without a
    gradient zeros."""
    zero = torch.zeros((), dtype=torch.long, device=device)

    def per_parameter(field: int) -> Tensor:
        if not first:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.stack([found[k][field] if k != -1 else zero for k in first])

    return ClipStats(clipped=per_parameter(0), nonfinite=per_parameter(1), units=units)


def _units_per_parameter(params: list[Tensor], first: list[int]) -> Tensor:
    """`ClipStats.units`: the units of each parameter listed (of the full tensor, for a sharded one), 0 without a
    gradient."""
    return torch.tensor([num_units(p) if k != -1 else 0 for p, k in zip(params, first)], dtype=torch.long)


def _dispatch(params: list[Tensor]) -> _Dispatch:
    """Check `params` and decide which implementation clips each."""
    first, device = _validate(params)
    positions = [i for i, k in enumerate(first) if k == i]
    cpu = [i for i in positions if cpu_kernel.supports(params[i])] if cpu_kernel.load() is not None else []
    gpu = [i for i in positions if i not in set(cpu) and gpu_kernel.supports(params[i])]
    taken = set(cpu) | set(gpu)
    dtypes = list(dict.fromkeys(params[i].dtype for i in cpu))
    units = [num_units(params[i]) for i in gpu]
    all_gpu = bool(gpu) and len(gpu) == len(positions)
    return _Dispatch(
        device=device,
        units=_units_per_parameter(params, first),
        first=first,
        cpu_groups=[[i for i in cpu if params[i].dtype == dtype] for dtype in dtypes],
        gpu=gpu,
        gpu_plan=gpu_kernel.plan([params[i] for i in gpu], units, gpu if all_gpu else list(range(len(gpu))))
        if gpu else None,
        torch_ops=[i for i in positions if i not in taken],
        all_gpu=all_gpu,
        repeats=[(i, k) for i, k in enumerate(first) if k not in (-1, i)],
    )


_DISPATCH_CACHE_SIZE = 8
_dispatches: OrderedDict[tuple, _Dispatch] = OrderedDict()


def _layout(t: Tensor | None) -> tuple | None:
    """Everything about where and how `t` is stored that a dispatch depends on: the kernels read memory through
    data pointers and take a layout (contiguous, channels-last) from the strides; the storage offset is in the
    pointer."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _cached_dispatch(params: list[Tensor], owners: list[Tensor] | None = None) -> _Dispatch:
    # Training calls AGC with the same parameters every step: the checks and the Triton kernel's tables
    # (which hold data pointers) are reused while every parameter and gradient keeps its storage and layout
    # (and while the implementations' entry points are the same: tests swap them). Freed tensors' ids and
    # storage get reused, and a gradient can be replaced by a view of the same storage (a transpose).
    # `owners[i]`, where given, is the parameter that `params[i]` is a new view of at each call (a sharded
    # parameter's shard): its identity stands for the view's.
    try:
        key = (cpu_kernel.load, gpu_kernel.supports, gpu_kernel.available(),
               tuple((id(o), _layout(p), _layout(p.grad)) for o, p in zip(owners or params, params)))
    except RuntimeError:  # a sparse gradient has no data pointer: checked (and refused) below
        return _dispatch(params)
    dispatch = _dispatches.get(key)
    if dispatch is None:
        dispatch = _dispatches[key] = _dispatch(params)
        while len(_dispatches) > _DISPATCH_CACHE_SIZE:
            _dispatches.popitem(last=False)
    return dispatch


_ACCEPTED = ("a tensor, or an iterable of tensors (model.parameters()), of (name, tensor) pairs "
             "(model.named_parameters()) or of optimizer param groups (optimizer.param_groups)")


def _refused(what: str) -> TypeError:
    return TypeError(f"adaptive_clip_grad_'s parameters must be {_ACCEPTED}; got {what}")


def _group_tensors(group: Mapping, where: str) -> list[Tensor]:
    """The tensors of a param group (a mapping with "params", as in optimizer.param_groups)."""
    if "params" not in group:
        raise _refused(f"{where}a mapping without 'params' (keys: {', '.join(map(repr, list(group)[:5]))})")
    tensors = group["params"]
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    bad = next((t for t in tensors if not isinstance(t, Tensor)), None)
    if bad is not None:
        raise _refused(f"{where}a param group whose 'params' holds a {type(bad).__name__}")
    return tensors


def _parameter_list(parameters) -> tuple[list[Tensor], list[str | None]]:
    """The tensors of `adaptive_clip_grad_`'s `parameters`, in order, and their names (None where not given)."""
    if isinstance(parameters, Tensor):
        return [parameters], [None]
    if isinstance(parameters, Mapping):  # one param group
        tensors = _group_tensors(parameters, "")
        return tensors, [None] * len(tensors)
    if isinstance(parameters, (str, bytes, nn.Module)) or not isinstance(parameters, Iterable):
        hint = ": pass module.parameters()" if isinstance(parameters, nn.Module) else ""
        raise _refused(f"{type(parameters).__name__}{hint}")
    tensors = []
    names: list[str | None] = []
    for i, item in enumerate(parameters):
        if isinstance(item, Tensor):
            tensors.append(item)
            names.append(None)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor):
            tensors.append(item[1])
            names.append(item[0])
        elif isinstance(item, Mapping):
            group = _group_tensors(item, f"item {i} is ")
            tensors.extend(group)
            names.extend([None] * len(group))
        else:
            kind = "a nested list or tuple (pass one flat iterable, e.g. itertools.chain(...))" if isinstance(
                item, (list, tuple)) else f"a {type(item).__name__}"
            raise _refused(f"item {i} is {kind}")
    return tensors, names


_warned_nonfinite_weights: set[str] = set()


def _warn_nonfinite_weights(params: list[Tensor], names: list[str | None], nonfinite: Tensor) -> None:
    """Warn once per parameter whose weight has a unit with an inf or NaN norm (AGC left its gradient as it was).

    Only where the counts are host memory already: on a GPU reading them would synchronise every step."""
    found = []
    for i, count in enumerate(nonfinite.tolist()):
        if count:
            label = names[i] or f"parameter {i} of shape {tuple(params[i].shape)}"
            bad_units = int((~local_unit_norms(params[i]).isfinite()).sum())
            if bad_units and label not in _warned_nonfinite_weights:
                _warned_nonfinite_weights.add(label)
                found.append(f"{label} ({bad_units} of {num_units(params[i])} units)")
    if found:
        warnings.warn(f"adaptive_clip_grad_: weights with an inf or NaN unit norm: {'; '.join(found)}. AGC has no "
                      f"threshold for those units and leaves their gradients unchanged (counted in ClipStats."
                      f"nonfinite); the model has diverged: lower the learning rate or restart from a checkpoint",
                      RuntimeWarning, stacklevel=4)  # past torch.no_grad's wrapper: the caller


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: ClippedParameters,
    clipping: float = DEFAULT_CLIPPING, eps: float = DEFAULT_EPS,
) -> ClipStats:
    """Clip the gradients of `parameters` in place with AGC (Sec. 4, Eq. 3).

    Each unit's gradient G_u is scaled to norm ``clipping * max(||W_u||, eps)`` where it is
    larger; other units are left exactly as they are. Parameters whose ``.grad`` is None are
    skipped; a parameter listed twice is clipped once. `clipping` is the paper's lambda (0.01 for
    batch 1024-4096; smaller for larger batches and for Adam-like optimizers); `eps` floors the
    weight norm so that zero-initialised parameters (skip gains) can still move. Both are numbers
    (Python or numpy scalars, or one-element tensors).

    `parameters`: a tensor, or an iterable of tensors (``model.parameters()``), of ``(name, tensor)``
    pairs (``model.named_parameters()``: the names appear in warnings) or of optimizer param groups
    (``optimizer.param_groups``, all clipped with this one `clipping`); TypeError for anything else.

    A unit whose gradient norm or weight norm is inf or NaN is left unchanged and counted in
    `ClipStats.nonfinite` (AGC never turns an inf gradient into NaN, and a NaN weight gives no
    threshold). A weight with such a unit also gets a RuntimeWarning naming it, once per parameter, for CPU
    tensors; on a GPU that check would synchronise every call, so read `nonfinite` there (fastai's `AGC`
    callback reads it, and warns, at the end of each epoch).

    Three implementations, one rule:

    - CUDA (float32, bfloat16, float16; contiguous or channels-last): the fused Triton kernel
      (`normfree.agc.gpu_kernel`): a few launches for all parameters, each unit's weight and gradient
      read once, gradients rewritten only where a unit clips, counts kept on the device.
    - CPU (contiguous float32 / float64): the fused C kernel (`normfree.agc.cpu_kernel`), one pass
      with squares summed in float64.
    - Everything else (other layouts, float64 on a GPU, no Triton or no C compiler): torch ops
      (`clip_with_torch_ops`), norms accumulated in float32 (float64 for float64 tensors).

    Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) are clipped as their full tensors
    would be, every rank calling with the same parameters after the gradients are reduced: a rank's whole units
    by the implementations above, units split across ranks (biases and gains under FSDP2, rows under ``Shard(1)``)
    with torch ops after one all-reduce of their sums of squares per mesh dimension (`normfree.agc.sharded`);
    `ClipStats` are then the full model's on every rank. Under DDP the parameters are plain, replicated tensors
    with all-reduced gradients: each rank clips the same gradients the same way.

    None of them synchronises with the device. Where norms are summed in float32, a unit whose
    norm overflows (elements beyond ~1e19) counts as non-finite and is left alone. The checks and
    the kernel's tables are kept between calls while the parameters and gradients keep their
    storage and layout; to capture the call in a CUDA graph, run it once before capturing.
    """
    clipping, eps = check_agc_arguments(clipping, eps)
    params, names = _parameter_list(parameters)
    stats = clip_parameters_(params, clipping, eps)
    if stats.nonfinite.device.type == "cpu" and stats.nonfinite.any():  # host memory already: nothing to wait for
        _warn_nonfinite_weights(params, names, stats.nonfinite)
    return stats


@torch.no_grad()
def clip_parameters_(params: list[Tensor], clipping: float, eps: float) -> ClipStats:
    """`adaptive_clip_grad_` for a caller that checked `clipping` and `eps` once (floats, `check_agc_arguments`),
    passes a list of tensors, and reports non-finite units itself (fastai's `AGC` callback, at the end of each
    epoch): no per-call checks and no warning, so nothing in the call reads a count."""
    if any(map(is_sharded, params)):
        return _clip_sharded_(params, clipping, eps)
    return _run(params, clipping, eps)


def _run(params: list[Tensor], clipping: float, eps: float, owners: list[Tensor] | None = None) -> ClipStats:
    """Clip `params` (plain tensors) by the implementations `_cached_dispatch` chooses."""
    try:
        return _cached_dispatch(params, owners).run(params, clipping, eps)
    except gpu_kernel.KernelFailed:  # warned once; the kernel is off from now on
        return _cached_dispatch(params, owners).run(params, clipping, eps)


def _with_grad(weight: Tensor, grad: Tensor) -> Tensor:
    weight.grad = grad  # `weight` is a view made for this call (`local_parts`): the parameter's shard is untouched
    return weight


def _clip_sharded_(params: list[Tensor], clipping: float, eps: float) -> ClipStats:
    """`clip_parameters_` where some parameters are sharded (DTensors, `normfree.agc.sharded`): every rank calls it
    with the same parameters, and gets the same `ClipStats`, those of the full tensors.

    A shard that holds whole units (FSDP2's Shard(0) of a weight) is clipped as an unsharded tensor, by the kernels;
    units split across ranks (biases and gains under FSDP2, rows under Shard(1)) with torch ops, their norms
    completed by one all-reduce per mesh dimension. One more all-reduce per mesh dimension adds up the counts."""
    first, device = _validate(params)
    positions = [i for i, k in enumerate(first) if k == i]
    layouts = {i: shard_layout(params[i], f"parameter {i} of shape {tuple(params[i].shape)}")
               for i in positions if is_sharded(params[i])}
    parts = {i: local_parts(params[i]) for i in layouts}
    whole = [i for i in positions if i not in layouts or layouts[i].whole]
    split = [i for i in layouts if not layouts[i].whole]
    found: dict[int, tuple[Tensor, Tensor]] = {}
    if whole:
        stats = _run([_with_grad(*parts[i]) if i in parts else params[i] for i in whole], clipping, eps,
                     owners=[params[i] for i in whole])
        found.update(zip(whole, zip(stats.clipped.unbind(), stats.nonfinite.unbind())))
    if split:
        norms = reduce_unit_norms([parts[i] for i in split], [layouts[i] for i in split])
        counts = _scale_units_([parts[i][1] for i in split], [layouts[i].units for i in split],
                               torch.cat([w for w, _ in norms]), torch.cat([g for _, g in norms]), clipping, eps)
        found.update(zip(split, zip(*counts)))
    totals = reduce_counts([torch.stack(found[i]) for i in layouts], list(layouts.values()))
    for i, total in zip(layouts, totals):
        clipped, nonfinite = total.unbind()
        found[i] = (clipped, nonfinite)
    return _statistics(found, first, _units_per_parameter(params, first), device)
