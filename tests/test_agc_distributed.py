"""AGC under data-parallel training sees the all-reduced gradient.

fastai's DistributedTrainer wraps the model in DistributedDataParallel and gives each process its
shard of the data; this test does the same with torch's DDP on two CPU processes (gloo), each
running a fastai Learner on half of the batch, and compares with the single-process reference step;
and so with the model sharded by FSDP2's fully_shard instead (its parameters DTensors).
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from agc_reference import per_example_reference
from fastai_helpers import LR, fit_quietly, make_learner, reference_update, relative_difference, tiny_data, tiny_model
from normfree import AGC

WORLD_SIZE = 2


def full(t: torch.Tensor) -> torch.Tensor:
    """`t`, gathered whole if it is a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def train_one_shard(rank: int, init_file: str, result_file: str, per_sample: bool, wrap: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        model = tiny_model()
        if wrap == "fsdp2":
            fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
        else:
            model = DistributedDataParallel(model)
        before = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
        x, y = tiny_data()
        shard = slice(rank * 16, (rank + 1) * 16)
        dls = DataLoaders(DataLoader(TensorDataset(x[shard], y[shard]), bs=16),
                          DataLoader(TensorDataset(x[:8], y[:8]), bs=8))
        agc = AGC(0.01, per_sample=per_sample)
        fit_quietly(make_learner(model, dls, [agc]))
        update = {n.removeprefix("module."): (full(p.detach()) - before[n]).double()
                  for n, p in model.named_parameters()}
        refusal = None
        if wrap == "fsdp2":
            try:
                make_learner(model, dls, [AGC(0.01)]).agc_find(show_plot=False)
            except ValueError as error:
                refusal = str(error)
        if rank == 0:
            torch.save({"update": update, "clipped": agc.history.parameter_names, "agc_find": refusal}, result_file)
        dist.barrier()  # both leave gloo together: a rank that tears down while the other still works can abort it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("per_sample, wrap", [(False, "ddp"), (True, "ddp"), (False, "fsdp2")],
                         ids=["batch", "per-sample", "batch-fsdp2"])
def test_agc_clips_the_all_reduced_gradient(tmp_path, per_sample, wrap):
    """Batch AGC clips the all-reduced mean; per-sample AGC's clipped sums are all-reduced: both equal one
    process on the whole batch. Under FSDP2 each rank holds part of each parameter, and the step is the same."""
    result_file = tmp_path / "rank0.pt"
    mp.spawn(train_one_shard, args=(str(tmp_path / "init"), str(result_file), per_sample, wrap), nprocs=WORLD_SIZE,
             join=True)
    result = torch.load(result_file)
    if per_sample:
        reference = {n: -LR * g for n, g in per_example_reference(tiny_model(), *tiny_data(), F.cross_entropy).items()}
    else:
        reference = reference_update(tiny_model(), clipping=0.01)
    assert relative_difference(result["update"], reference) < 1e-5
    assert "5.weight" not in result["clipped"] and "5.bias" in result["clipped"]  # classifier found through DDP
    if wrap == "fsdp2":  # each rank would choose its own lambda from its own shard
        assert "agc_find does not run on a sharded model" in result["agc_find"]
