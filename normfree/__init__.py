"""normfree: Normalizer-Free Networks and Adaptive Gradient Clipping for fastai."""
from .agc import ClipStats, adaptive_clip_factor, adaptive_clip_grad_, unitwise_norm
from .callback import AGC, ClipRate
from .clip_history import ClipHistory
from .data import digits_dataloaders
from .exclusion import excluded_parameters, find_classifier

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "ClipHistory",
    "ClipRate",
    "ClipStats",
    "adaptive_clip_factor",
    "adaptive_clip_grad_",
    "digits_dataloaders",
    "excluded_parameters",
    "find_classifier",
    "unitwise_norm",
]
