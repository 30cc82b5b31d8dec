"""AGC on sharded parameters (FSDP2's fully_shard, DTensors sharded on any dim) and under DDP: two CPU processes
(gloo) clip as one process clips the unsharded model, against the float64 reference of tests/agc_reference.py.

One `torch.multiprocessing.spawn` (module fixture `runs`) runs every case on both ranks and saves what each rank
saw; the tests read it. The model has a conv (4 filters: 2 per rank), a Linear with 5 outputs (3 and 2 rows: an
uneven shard), a 1-D gain and biases (one unit each, split across the ranks), a one-element scale (rank 1's shard
is empty) and a [5, 2] matrix (5 units; under Shard(1) each rank's shard is [5, 1], which looks like one unit).
"""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from agc_reference import norm64, reference_agc, units_of
from host_syncs import HostSyncs

WORLD_SIZE = 2
CLIPPING = 0.05
LR = 1.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(64, 5)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(5))
        self.scale = nn.Parameter(torch.tensor([1.5]))  # FSDP2 refuses 0-d parameters; one element is one unit too
        self.mix = nn.Parameter(torch.randn(5, 2))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(self.conv(x).relu().flatten(1)) * self.gain * self.scale + x.flatten(1)[:, :2] @ self.mix.T
        return self.head(h.relu())


def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def backward(model, rank=None):
    """The mean loss over the whole batch, or over `rank`'s half of it, backward."""
    x, y = batch()
    if rank is not None:
        x, y = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
    nn.functional.cross_entropy(model(x), y).backward()


def reference():
    """The unsharded model's float64-clipped gradients and clipped-unit counts, by name."""
    model = Net()
    backward(model)
    clipped = {n: reference_agc(p, p.grad, CLIPPING, 1e-3) for n, p in model.named_parameters()}
    units = {n: len(units_of(p)) for n, p in model.named_parameters()}
    return {n: g for n, (g, _) in clipped.items()}, {n: c for n, (_, c) in clipped.items()}, units


# Under "dtensor": each parameter as a DTensor sharded on this dim (Shard(1) splits every unit of a matrix; the
# conv's dim 1 has one element, so rank 1's shard is empty; Shard(2) splits its 3 kernel rows 2/1), or replicated,
# or left a plain tensor, listed with the DTensors.
SHARD_DIMS = {"conv.weight": 2, "conv.bias": 0, "fc.weight": 1, "fc.bias": "replicated", "gain": 0, "scale": 0,
              "mix": 1, "head.weight": 1, "head.bias": "plain"}


def _clipped_fsdp(mesh, rank):
    from torch.distributed.fsdp import fully_shard

    from normfree import adaptive_clip_grad_

    model = Net()
    fully_shard(model.fc, mesh=mesh)  # a nested unit too, as FSDP2 users shard each block
    fully_shard(model, mesh=mesh)
    backward(model, rank)  # FSDP2 averages the two halves' gradients: the whole batch's
    before = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    local_rows = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    stats = adaptive_clip_grad_(model.named_parameters(), CLIPPING)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    update = {n: (before[n] - p.detach().full_tensor()) / LR for n, p in model.named_parameters()}
    return update, stats, [n for n, _ in model.named_parameters()], local_rows


def _clipped_dtensor(mesh, rank):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from normfree.agc.clip import clip_parameters_
    from normfree.agc.sharded import unit_ratio_vector

    model = Net()
    backward(model)
    params = {}
    for n, p in model.named_parameters():
        if SHARD_DIMS[n] == "plain":
            params[n] = p
            continue
        placements = [Replicate() if SHARD_DIMS[n] == "replicated" else Shard(SHARD_DIMS[n])]
        params[n] = nn.Parameter(distribute_tensor(p.detach(), mesh, placements))
        params[n].grad = distribute_tensor(p.grad, mesh, placements)
    ratios = unit_ratio_vector(list(params.values()), 1e-3)  # what AGC's clip watch suggests lambda from
    with HostSyncs() as syncs:  # the callback's entry: adaptive_clip_grad_ also reads CPU counts for its warning
        stats = clip_parameters_(list(params.values()), CLIPPING, 1e-3)
    sharded = [n for n in params if SHARD_DIMS[n] != "plain"]
    local_rows = {n: tuple(params[n].to_local().shape) for n in sharded}
    return ({n: p.grad.full_tensor() if n in sharded else p.grad for n, p in params.items()}, stats, list(params),
            {**local_rows, "ratios": ratios, "syncs": syncs.sites})


def _clipped_ddp(mesh, rank):
    from torch.nn.parallel import DistributedDataParallel

    from normfree import adaptive_clip_grad_

    model = DistributedDataParallel(Net())
    backward(model, rank)  # DDP averages the gradients: each rank clips the whole batch's, replicated
    stats = adaptive_clip_grad_(model.module.named_parameters(), CLIPPING)
    return {n: p.grad for n, p in model.module.named_parameters()}, stats, [n for n, _ in
                                                                           model.module.named_parameters()], {}


def _refusals(mesh, rank):
    """The message of each sharded parameter adaptive_clip_grad_ must refuse."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from normfree import adaptive_clip_grad_
    from normfree.agc import PerSampleClipper

    weight, grad = torch.randn(4, 3), torch.randn(4, 3)
    cases = {}
    mismatched = nn.Parameter(distribute_tensor(weight, mesh, [Shard(1)]))
    mismatched.grad = distribute_tensor(grad, mesh, [Replicate()])
    cases["gradient placements"] = mismatched
    partial = nn.Parameter(DTensor.from_local(weight, mesh, [Partial()]))
    partial.grad = DTensor.from_local(grad, mesh, [Partial()])
    cases["partial"] = partial
    messages = {}
    for case, param in cases.items():
        try:
            adaptive_clip_grad_([param])
        except ValueError as error:
            messages[case] = str(error)
    model = Net()
    fully_shard(model, mesh=mesh)
    try:
        PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters()})
    except ValueError as error:
        messages["per-sample"] = str(error)
    return messages


CASES = {"fsdp2": _clipped_fsdp, "dtensor": _clipped_dtensor, "ddp": _clipped_ddp}


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        result = {}
        for case, run in CASES.items():
            clipped, stats, names, local_rows = run(mesh, rank)
            result[case] = clipped, (stats.clipped, stats.nonfinite, stats.units), names, local_rows
        result["refusals"] = _refusals(mesh, rank)
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.barrier()  # both leave gloo together
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@functools.cache
def _reference():
    return reference()


@pytest.mark.launch
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_clip_as_the_unsharded_model(runs, case):
    """The clipped gradient (for FSDP2: the SGD update) on two ranks equals the float64 reference's on the whole
    model, and each rank's ClipStats are those of the whole model: every unit counted once."""
    grads, clipped, units = _reference()
    assert 0 < sum(clipped.values()) < sum(units.values())  # some units clip, some do not
    for rank, run in enumerate(runs):
        result, (n_clipped, nonfinite, n_units), names, _ = run[case]
        for name in names:
            torch.testing.assert_close(result[name].double(), grads[name], rtol=1e-5, atol=1e-7, msg=name)
        assert n_clipped.tolist() == [clipped[n] for n in names], rank
        assert n_units.tolist() == [units[n] for n in names]
        assert nonfinite.tolist() == [0] * len(names)


@pytest.mark.launch
@pytest.mark.parametrize("case", ["fsdp2", "dtensor"])
def test_the_shards_are_the_awkward_ones(runs, case):
    """The model does shard unevenly and emptily: otherwise the test above proves less than it says."""
    rows = [run[case][3] for run in runs]
    if case == "fsdp2":
        assert (rows[0]["fc.weight"], rows[1]["fc.weight"]) == ((3, 64), (2, 64))
        assert (rows[0]["scale"], rows[1]["scale"]) == ((1,), (0,))
    else:
        assert (rows[0]["conv.weight"], rows[1]["conv.weight"]) == ((4, 1, 2, 3), (4, 1, 1, 3))
        assert rows[0]["mix"] == (5, 1) and rows[1]["head.weight"] == (3, 2)


@pytest.mark.launch
@pytest.mark.bad_input
@pytest.mark.parametrize("case, words", [("gradient placements", "redistribute the gradient"),
                                         ("partial", "Partial()"),
                                         ("per-sample", "per-sample AGC cannot clip sharded")])
def test_refuses_a_gradient_it_cannot_clip(runs, case, words):
    for run in runs:
        assert words in run["refusals"][case]



@pytest.mark.launch
def test_unit_ratios_of_shards_are_those_of_the_full_units(runs):
    """The ratios AGC's clip watch suggests a lambda from: every unit's (each is held, in part, by both ranks under
    these placements), norms completed across the ranks."""
    model = Net()
    backward(model)
    expected = [norm64(g) / max(norm64(w), 1e-3) for p in model.parameters()
                for w, g in zip(units_of(p), units_of(p.grad))]
    for run in runs:
        assert run["dtensor"][3]["syncs"] == []  # and the clipping read no device value on the host
        torch.testing.assert_close(run["dtensor"][3]["ratios"].double(), torch.tensor(expected, dtype=torch.float64))
