"""Independent AGC reference for the tests: the paper's Eq. (3) one unit at a time, in float64.

Written from Brock et al. 2021, Sec. 4 and DeepMind's code, not from normfree: plain Python loops
over the units of PyTorch's [out, in, *kernel] layout, sums of squares in float64.
"""
import copy
import math

import torch


def one_unit(t: torch.Tensor) -> bool:
    """DeepMind's rule (nfnets' and optax's unitwise_norm): a tensor whose squeezed rank is <= 1 is one unit."""
    return t.squeeze().ndim <= 1


def units_of(t: torch.Tensor) -> list[torch.Tensor]:
    """The units of `t`: the whole tensor when `one_unit`, else each index of dim 0."""
    t = t.detach().double()
    return [t] if one_unit(t) else [t[u] for u in range(t.shape[0])]


def norm64(t: torch.Tensor) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in t.flatten().tolist()))


def reference_unit_norms(t: torch.Tensor) -> list[float]:
    return [norm64(u) for u in units_of(t)]


def reference_agc(param: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float) -> tuple[torch.Tensor, int]:
    """(clipped float64 gradient, number of units clipped) for one parameter."""
    out = grad.detach().double().clone()
    clipped = 0
    targets = [out] if one_unit(out) else [out[u] for u in range(out.shape[0])]
    for w_u, g_u in zip(units_of(param), targets):
        max_norm = clipping * max(norm64(w_u), eps)
        g_norm = norm64(g_u)
        if math.isfinite(g_norm) and g_norm > max_norm:
            g_u.mul_(max_norm / max(g_norm, 1e-6))
            clipped += 1
    return out, clipped


def per_example_clipping(model, x, y, loss_func, clipping=0.01, eps=1e-3, unclipped_names=None):
    """The loop over examples behind per-sample AGC, in float64: (mean_i clip(grad of example i's own loss) per
    parameter name, units clipped, units counted), the counts over (example, unit) pairs of the clipped parameters.

    The parameters named in `unclipped_names` are left unclipped; by default, normfree's `excluded_parameters` (the
    classifier weight), tested on its own.
    """
    from normfree.agc import excluded_parameters

    model = copy.deepcopy(model)
    unclipped = {id(p) for p in excluded_parameters(model)} if unclipped_names is None else \
        {id(p) for n, p in model.named_parameters() if n in unclipped_names}
    total = {n: 0.0 for n, _ in model.named_parameters()}
    clipped = units = 0
    for i in range(len(x)):
        model.zero_grad()
        loss_func(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if id(p) in unclipped:
                total[n] = total[n] + p.grad.double()
                continue
            grad, n_clipped = reference_agc(p, p.grad, clipping, eps)
            total[n] = total[n] + grad
            clipped, units = clipped + n_clipped, units + len(units_of(p))
    return {n: t / len(x) for n, t in total.items()}, clipped, units


def per_example_reference(model, x, y, loss_func, clipping=0.01, eps=1e-3):
    """mean_i clip(grad of example i's own loss), float64, excluded parameters unclipped."""
    return per_example_clipping(model, x, y, loss_func, clipping, eps)[0]
