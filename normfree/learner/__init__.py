"""The fastai integration: callbacks (AGC, frozen BatchNorm), clip history, mixed precision on any device, and
`nf_learner`.

Importing it adds ``Learner.agc``, ``Learner.agc_find`` and ``Learner.to_mixed_precision`` to fastai's Learner.
"""
from ..agc.history import ClipHistory
from .agc_find import AGCFindResult
from .callback import AGC, ClipRate
from .epoch_log import EpochLog
from .frozen_batchnorm import FreezeBatchNorm
from .nf_learner import nf_learner
from .optim import nesterov_sgd
from .precision import DeviceMixedPrecision
from .step_budget import StepBudget

__all__ = ["AGC", "AGCFindResult", "ClipHistory", "ClipRate", "DeviceMixedPrecision", "EpochLog", "FreezeBatchNorm",
           "StepBudget", "nesterov_sgd", "nf_learner"]
