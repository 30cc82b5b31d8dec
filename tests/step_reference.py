"""What one SGD step (lr 1, no momentum, no weight decay) must do to a model under AGC, from the float64 reference rule
(`agc_reference.reference_agc`): each parameter moves by minus its clipped gradient, the excluded ones by minus their
raw gradient. Shared by the tests of `agc_hook` and of the trainer adapters; the gradients come from the test's own
replay or snapshot, never from the code under test."""
import torch
from torch import nn

from agc_reference import reference_agc

CLIPPING = 0.2  # clips some units of `tiny_model` on `batches` and leaves others (the tests check both happen)


def tiny_model(seed: int = 0) -> nn.Module:
    """Two Linear layers: "0" the hidden one, "2" the classifier (AGC leaves "2.weight" alone by default)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(size, 4, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def replayed_grads(model: nn.Module, micro_batches) -> dict[str, torch.Tensor]:
    """The gradient of the mean of the micro-batches' losses at `model`'s current weights, on a copy of it."""
    import copy

    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    for x, y in micro_batches:
        (loss_of(twin, x, y) / len(micro_batches)).backward()
    return grads_of(twin)


def expected_update(before: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], unclipped: set[str],
                    clipping: float | dict[str, float] = CLIPPING, eps: float = 1e-3):
    """(minus the clipped gradient per parameter, in float64; units clipped in all) for weights `before`."""
    update, clipped = {}, 0
    for name, grad in grads.items():
        if name in unclipped:
            update[name] = -grad.double()
            continue
        lam = clipping[name] if isinstance(clipping, dict) else clipping
        g, n = reference_agc(before[name], grad, lam, eps)
        update[name], clipped = -g, clipped + n
    return update, clipped


def assert_update(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], update: dict[str, torch.Tensor]):
    for name, expected in update.items():
        torch.testing.assert_close((after[name].double() - before[name].double()), expected, rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
