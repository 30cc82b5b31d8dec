"""The optimizers `normfree train` offers: Adam, and SGD with Nesterov momentum (the NFNet papers'), each in two
implementations that compute the same update:

- fastai's `Optimizer`s (`fastai.optimizer.Adam`, `nesterov_sgd`): a few kernels per parameter, issued from Python;
- torch's (`fast_adam`, `fast_nesterov_sgd`, the default of `nf_learner` and the command line): `torch.optim.Adam` /
  `SGD` with ``fused=True`` (one kernel for all parameters; torch has it for CPU, CUDA, MPS and more) or, on a device
  without a fused kernel, ``foreach=True``, wrapped in fastai's `OptimWrapper` so that fastai drives it as it drives
  its own: one-cycle lr and momentum, discriminative lrs (one torch param group per fastai layer group),
  freeze/unfreeze, ``fit(wd=...)``. On nf_resnet26's parameters (CPU, one thread) a step is 33 ms against fastai's
  Adam's 161 ms, with 4 dispatched operations instead of 801 (benchmarks/bench_optim.py).

All decay weights as fastai does (decoupled: ``p <- p * (1 - lr * wd)`` before the step), skipping the parameters
fastai marks ``do_wd=False`` (biases and normalisation layers', unless ``Learner(wd_bn_bias=True)``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from fastai.optimizer import Adam, Optimizer, OptimWrapper, average_grad, pytorch_hp_map, weight_decay
from fastcore.foundation import L
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

__all__ = ["OPTIMIZERS", "TorchOptimizer", "fast_adam", "fast_nesterov_sgd", "nesterov_sgd", "nesterov_step",
           "opt_func"]

# fastai's decoupled weight decay, as a torch param group's key (torch's own `weight_decay`, L2, stays 0)
_WD = "decoupled_wd"


def nesterov_step(p: Tensor, lr: float, mom: float, grad_avg: Tensor, **kwargs) -> None:
    """Nesterov momentum (Sutskever et al. 2013, as `torch.optim.SGD(nesterov=True)`):
    ``v <- mom * v + g`` (fastai's `average_grad`), then ``p <- p - lr * (g + mom * v)``."""
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def nesterov_sgd(params: Tensor | Iterable, lr: float, mom: float = 0.9, wd: float = 0.0) -> Optimizer:
    """SGD with Nesterov momentum 0.9 (Brock et al. 2021, NFNets, Sec. 4 / Appendix) and fastai's decoupled
    weight decay, as a fastai `Optimizer` (``Learner(..., opt_func=nesterov_sgd)``)."""
    return Optimizer(params, [weight_decay, average_grad, nesterov_step], lr=lr, mom=mom, wd=wd)


class TorchOptimizer(OptimWrapper):
    """A torch optimizer, fused (or foreach) over all parameters, under fastai's hyper-parameter schedules.

    `params`: what fastai's `Learner` passes an opt_func, the splitter's layer groups (each one torch param group) or
    one iterable of parameters. `torch_class`: ``torch.optim.Adam`` or ``torch.optim.SGD``, built with `hypers` and
    no weight decay of its own; `wd` is fastai's decoupled weight decay (the ``wd`` hyper-parameter), applied by
    `step` as fastai's `weight_decay` applies it: ``p <- p * (1 - lr * wd)`` for each parameter that has a gradient
    and is not marked ``do_wd=False`` in this wrapper's fastai state (`Learner.create_opt` marks biases and
    normalisation layers' parameters), then the torch step."""

    def __init__(self, params: Tensor | Iterable, torch_class: type[torch.optim.Optimizer], wd: float,
                 **hypers) -> None:
        params = L(params)
        groups = params if isinstance(params[0], (L, list)) else [params]
        groups = [{"params": list(group), _WD: wd} for group in groups]
        devices = _get_fused_kernels_supported_devices()
        fused = all(p.device.type in devices and p.is_floating_point() for g in groups for p in g["params"])
        built = torch_class(groups, fused=fused or None, foreach=None if fused else True, **hypers)
        # torch's own `weight_decay` (L2, in the gradient) keeps its name: fastai's `wd` is the decoupled one
        super().__init__(opt=built, hp_map={**pytorch_hp_map, "weight_decay": "weight_decay", _WD: "wd"})

    def step(self, closure: Callable | None = None) -> None:
        for group in self.opt.param_groups:
            if group[_WD]:
                decayed = [p for p in group["params"] if p.grad is not None and self.state[p].get("do_wd", True)]
                if decayed:
                    with torch.no_grad():
                        torch._foreach_mul_(decayed, 1 - group["lr"] * group[_WD])
        self.opt.step(closure)


def fast_adam(params: Tensor | Iterable, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
              wd: float = 0.01) -> TorchOptimizer:
    """fastai's `Adam` (same defaults, decoupled weight decay) computed by ``torch.optim.Adam``'s fused kernel."""
    return TorchOptimizer(params, torch.optim.Adam, wd, lr=lr, betas=(mom, sqr_mom), eps=eps)


def fast_nesterov_sgd(params: Tensor | Iterable, lr: float, mom: float = 0.9, wd: float = 0.0) -> TorchOptimizer:
    """`nesterov_sgd` computed by ``torch.optim.SGD(nesterov=True)``'s fused kernel: the same first step (the
    momentum buffer starts as the gradient) and update, ``p <- p - lr * (g + mom * v)``."""
    return TorchOptimizer(params, torch.optim.SGD, wd, lr=lr, momentum=mom, nesterov=True)


# name (TrainConfig.opt, --opt) -> (fastai's implementation, torch's fused one)
OPTIMIZERS: dict[str, tuple[Callable[..., Optimizer], Callable[..., TorchOptimizer]]] = {
    "adam": (Adam, fast_adam), "sgd": (nesterov_sgd, fast_nesterov_sgd)}


def opt_func(name: str, fast: bool = True) -> Callable[..., Optimizer | TorchOptimizer]:
    """The opt_func of optimizer `name` (a key of OPTIMIZERS): torch's fused implementation, or fastai's (`fast`
    False; what runs before normfree 0.2 trained with, so their checkpoints hold its state)."""
    return OPTIMIZERS[name][fast]
