"""The optimizers `normfree train` offers: fastai's Adam, and SGD with Nesterov momentum (the NFNet papers').

Both are fastai `Optimizer`s, so fastai's one-cycle schedule drives their learning rate and momentum,
and both decay weights as fastai does (decoupled: ``p <- p * (1 - lr * wd)`` before the step).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from fastai.optimizer import Adam, Optimizer, average_grad, weight_decay
from torch import Tensor

__all__ = ["OPTIMIZERS", "nesterov_sgd", "nesterov_step"]


def nesterov_step(p: Tensor, lr: float, mom: float, grad_avg: Tensor, **kwargs) -> None:
    """Nesterov momentum (Sutskever et al. 2013, as `torch.optim.SGD(nesterov=True)`):
    ``v <- mom * v + g`` (fastai's `average_grad`), then ``p <- p - lr * (g + mom * v)``."""
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def nesterov_sgd(params: Tensor | Iterable, lr: float, mom: float = 0.9, wd: float = 0.0) -> Optimizer:
    """SGD with Nesterov momentum 0.9 (Brock et al. 2021, NFNets, Sec. 4 / Appendix) and fastai's decoupled
    weight decay, as a fastai `Optimizer` (``Learner(..., opt_func=nesterov_sgd)``)."""
    return Optimizer(params, [weight_decay, average_grad, nesterov_step], lr=lr, mom=mom, wd=wd)


# name (TrainConfig.opt, --opt) -> fastai opt_func
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {"adam": Adam, "sgd": nesterov_sgd}
