"""Frozen BatchNorm for fine-tuning: the practice of the detection libraries (detectron2's FrozenBatchNorm2d,
torchvision's detection models), where a BatchNorm model pretrained on large batches is fine-tuned on small ones."""
from __future__ import annotations

from fastai.callback.core import Callback, TrainEvalCallback
from torch import nn

__all__ = ["FreezeBatchNorm", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of `model` (1d, 2d, 3d, SyncBatchNorm and timm's BatchNormAct2d)."""
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


class FreezeBatchNorm(Callback):
    """Keeps every BatchNorm layer of the model exactly as it was when the fit started: in eval mode (normalising
    with its running statistics, which are then never updated) and with its weight and bias not trained.

    fastai undoes both at every turn: `TrainEvalCallback` (order -10) puts the whole model in training mode at the
    start of every training epoch, and ``freeze()`` / ``unfreeze()`` (which ``fine_tune`` calls between its two fits)
    set ``requires_grad`` on every parameter, BatchNorm's included (``train_bn``). So this callback, ordered right
    after `TrainEvalCallback`, freezes the layers again at the start of every fit and every training epoch. A
    parameter without ``requires_grad`` gets no gradient, so neither the optimizer (weight decay included) nor AGC
    touches it.
    """

    order = TrainEvalCallback.order + 1

    def before_fit(self) -> None:
        self._freeze()

    def before_train(self) -> None:
        self._freeze()

    def _freeze(self) -> None:
        for layer in batchnorm_layers(self.learn.model):
            layer.eval()
            for parameter in layer.parameters(recurse=False):
                parameter.requires_grad_(False)
                parameter.grad = None  # a gradient left from before (lr_find) would still reach the optimizer
