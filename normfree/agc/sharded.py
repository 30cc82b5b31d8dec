"""Where the units of a sharded parameter are, and the collectives that complete their norms and AGC's counts.

A sharded parameter is a `torch.distributed.tensor.DTensor`: FSDP2's ``fully_shard`` (each rank holds a block of
dim 0, ``Shard(0)``), tensor parallelism (``Shard(0)``, ``Shard(1)``, ``Replicate()``) or both on a 2-D mesh. AGC's
units are those of the full tensor (`normfree.agc.rule`); a rank's shard holds, per mesh dimension:

- ``Shard(0)`` of a tensor with several units: whole units (rows or filters), its own, nothing to add up;
- ``Shard(d)`` of a single-unit tensor (a bias, a gain), or ``Shard(d > 0)`` of any tensor: part of each unit it
  holds, so the unit's sum of squares is the sum of the ranks' partial sums (`reduce_unit_norms`: one all-reduce
  per mesh dimension for all such parameters, whatever their number);
- ``Replicate()``: the same units as the other ranks of that dimension.

Uneven shards (FSDP2 pads dim 0; a rank may hold no row at all) need nothing more: a missing part adds 0.
``Partial()`` (a gradient not yet reduced) is refused: the norm of a sum is not the sum of the norms.
Nothing here reads a device value: the collectives are queued like any other kernel.

No tensor is a DTensor before `torch.distributed.tensor` is imported, so `is_sharded` looks the module up rather
than importing it (a build of torch without torch.distributed has none).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .rule import gradient_to_weight_ratio, is_single_unit, unit_norms, unit_ratios

__all__ = ["ShardLayout", "is_sharded", "local_parts", "local_unit_norms", "reduce_counts", "reduce_unit_norms",
           "shard_layout", "sharded_parameter_name", "shard_units", "unit_ratio_vector"]


def is_sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor (a parameter of FSDP2's ``fully_shard`` or of tensor parallelism)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def sharded_parameter_name(model: nn.Module) -> str | None:
    """The name of a sharded parameter of `model` (None if it has none): a DTensor, or any parameter of a module
    FSDP2's ``fully_shard`` took, whose parameters are plain tensors between a forward pass without backward (the
    root module's, in validation) and the next backward pass."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for name, module in model.named_modules():
        taken = fsdp is not None and isinstance(module, fsdp.FSDPModule)  # all its parameters, its submodules' too
        for parameter_name, p in module.named_parameters(recurse=taken):
            if taken or is_sharded(p):
                return f"{name}.{parameter_name}" if name else parameter_name
    return None


@dataclass(frozen=True)
class ShardLayout:
    """How this rank's shard of a sharded parameter holds the units of the full tensor."""

    mesh: object  # the DeviceMesh
    split_dims: tuple[int, ...]  # mesh dims across which each unit this rank holds is split (partial sums of squares)
    owner: bool  # this rank counts the units it holds: the first of the ranks that hold the same units
    units: int  # units (or parts of units) in this rank's shard: its rows, or 1 for a single-unit tensor

    @property
    def whole(self) -> bool:
        """Whether every unit in this rank's shard is whole: AGC clips the shard as an unsharded tensor."""
        return not self.split_dims


def _placement_dim(placement, name: str) -> int | None:
    """The tensor dim a mesh dimension's placement shards (None: replicated); ValueError for a partial one."""
    if placement.is_replicate():
        return None
    if placement.is_partial():
        raise ValueError(f"adaptive_clip_grad_: {name} is Partial() on its mesh (a sum not yet reduced): AGC needs "
                         "the reduced gradient; clip after the gradient reduction (the optimizer step)")
    dim = getattr(placement, "dim", None)  # Shard, and FSDP2 + tensor parallelism's _StridedShard
    if dim is None:
        raise ValueError(f"adaptive_clip_grad_: {name} has a placement AGC does not know, {placement!r}: shard it "
                         "with Shard(d) or Replicate()")
    return dim


def shard_layout(param: Tensor, label: str) -> ShardLayout:
    """The `ShardLayout` of a sharded parameter with a gradient; ValueError naming `label` unless the gradient is a
    DTensor laid out as the parameter (same mesh and placements), with no Partial() placement."""
    grad = param.grad
    if not is_sharded(grad) or grad.device_mesh != param.device_mesh or grad.placements != param.placements:
        got = (f"placements {tuple(grad.placements)}" if is_sharded(grad) and grad.device_mesh == param.device_mesh
               else "another mesh" if is_sharded(grad) else f"a plain {type(grad).__name__}")
        raise ValueError(f"adaptive_clip_grad_: {label} is a DTensor with placements {tuple(param.placements)} but "
                         f"its gradient has {got}: redistribute the gradient to the parameter's placements "
                         "(grad.redistribute(param.device_mesh, param.placements))")
    single = is_single_unit(param)
    split, copies = [], []
    for mesh_dim, placement in enumerate(param.placements):
        dim = _placement_dim(placement, label)
        if dim is None:
            copies.append(mesh_dim)
        elif single or dim != 0:
            split.append(mesh_dim)
    mesh = param.device_mesh
    return ShardLayout(mesh=mesh, split_dims=tuple(split),
                       owner=all(mesh.get_local_rank(d) == 0 for d in copies + split), units=shard_units(param))


def shard_units(param: Tensor) -> int:
    """Units (or parts of units) in this rank's shard of the sharded `param`: its rows, or 1 for a single-unit
    tensor (`is_single_unit` of the full tensor: a shard's own shape can look like one unit, or like many)."""
    return 1 if is_single_unit(param) else param.to_local().shape[0]


def local_unit_norms(param: Tensor) -> Tensor:
    """The unit norms of `param`; for a sharded one, of the units, or parts of units, in this rank's shard (no
    collective: a unit is inf or NaN where one of its parts is)."""
    if is_sharded(param):
        return unit_norms(param.to_local().detach(), shard_units(param))
    return unit_norms(param.detach())


def unit_ratio_vector(params: list[Tensor], eps: float) -> Tensor:
    """`unit_ratios` of each of `params` in one float32 vector; for sharded parameters, of the units in this rank's
    shard, their norms completed across ranks (`reduce_unit_norms`): every rank calls it with the same parameters."""
    sharded = [p for p in params if is_sharded(p) and p.grad is not None]
    layouts = [shard_layout(p, f"parameter of shape {tuple(p.shape)}") for p in sharded]
    norms = dict(zip(map(id, sharded), reduce_unit_norms([local_parts(p) for p in sharded], layouts)))
    return torch.cat([gradient_to_weight_ratio(*norms[id(p)], eps).float() if id(p) in norms
                      else torch.zeros(shard_units(p), device=p.device) if is_sharded(p) else unit_ratios(p, eps)
                      for p in params])


def local_parts(param: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's shards of `param` and of its gradient, as plain tensors (views of their storage)."""
    return param.to_local().detach(), param.grad.to_local().detach()


def _all_reduce_over(mesh, mesh_dim: int, parts: list[Tensor]) -> list[Tensor]:
    """`parts` summed over the ranks along `mesh_dim` of `mesh`, as one all-reduce."""
    sizes = [p.numel() for p in parts]
    flat = torch.cat([p.flatten() for p in parts])
    torch.distributed.all_reduce(flat, group=mesh.get_group(mesh_dim))
    return [part.view_as(p) for part, p in zip(flat.split(sizes), parts)]


def _sum_over_meshes(values: list[Tensor], meshes: list, dims: list[tuple[int, ...]]) -> list[Tensor]:
    """Each of `values` summed over the ranks along the mesh dims `dims[i]` of `meshes[i]`: one all-reduce per
    (mesh, mesh dim) for all values that need it, in the same order on every rank."""
    values = list(values)
    for mesh in dict.fromkeys(meshes):
        for mesh_dim in range(mesh.ndim):
            chosen = [i for i, (m, d) in enumerate(zip(meshes, dims)) if m == mesh and mesh_dim in d]
            if chosen:
                for i, total in zip(chosen, _all_reduce_over(mesh, mesh_dim, [values[i] for i in chosen])):
                    values[i] = total
    return values


def reduce_unit_norms(parts: list[tuple[Tensor, Tensor]], layouts: list[ShardLayout]) -> list[tuple[Tensor, Tensor]]:
    """(weight norms, gradient norms) of the units held in each shard pair `parts[i]` (`local_parts`), completed
    across the ranks that hold the other parts of those units (`layouts[i].split_dims`): squares summed, one
    all-reduce per mesh dimension. Float32 (float64 where a shard is float64)."""
    squares = [torch.stack([unit_norms(t, layout.units) for t in pair]).square()
               for pair, layout in zip(parts, layouts)]
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in squares) else torch.float32
    totals = _sum_over_meshes([s.to(dtype) for s in squares], [lay.mesh for lay in layouts],
                              [lay.split_dims for lay in layouts])
    return [tuple(total.sqrt().unbind()) for total in totals]


def reduce_counts(counts: list[Tensor], layouts: list[ShardLayout]) -> list[Tensor]:
    """AGC's per-parameter counts over the whole of each sharded parameter: `counts[i]` (this rank's, for the units
    of its shard) kept on the ranks that own those units (`ShardLayout.owner`) and summed over every mesh
    dimension: one all-reduce per mesh dimension. Every rank gets the same totals."""
    owned = [c if layout.owner else torch.zeros_like(c) for c, layout in zip(counts, layouts)]
    return _sum_over_meshes(owned, [lay.mesh for lay in layouts], [tuple(range(lay.mesh.ndim)) for lay in layouts])
