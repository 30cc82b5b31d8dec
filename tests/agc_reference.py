"""Independent AGC reference for the tests: the paper's Eq. (3) one unit at a time, in float64.

Written from Brock et al. 2021, Sec. 4 and DeepMind's code, not from normfree: plain Python loops
over the units of PyTorch's [out, in, *kernel] layout, sums of squares in float64.
"""
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
