"""normfree: Normalizer-Free Networks and Adaptive Gradient Clipping for fastai."""
import warnings

from . import startup  # noqa: F401  (first: Ctrl-C while the normfree command starts is one line)

# fastai 2.8 decorates a layer with torch.jit.script at import time, which torch now deprecates: a
# warning on every start of the `normfree` command that no user can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

from .agc import ClipStats, adaptive_clip_factor, adaptive_clip_grad_, unitwise_norm
from .callback import AGC, ClipRate
from .clip_history import ClipHistory
from .compare import METHODS, CompareConfig, CompareResult, compare
from .config import ConfigError, TrainConfig
from .data import (
    FASHION_MNIST_CLASSES,
    csv_dataloaders,
    digits_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
    read_idx,
    subset_dataloaders,
    write_digits_image_folder,
)
from .classifier import find_classifier, init_classifier_
from .convert import ConversionError, ConvertedResidual, to_normfree
from .epoch_log import EpochLog
from .exclusion import excluded_parameters
from .fusion import fuse_standardization
from .per_sample import PerSampleClipper
from .learner import body_head_splitter, build_model, nf_learner, normalizer_free_archs
from .memory import PeakMemory
from .optim import nesterov_sgd
from .precision import DeviceMixedPrecision  # also Learner.to_mixed_precision
from .report import RunRecord, write_report
from .propagation import (
    BlockStats,
    SignalPropagation,
    average_channel_squared_mean,
    average_channel_variance,
    signal_propagation,
)
from .spp import write_spp
from .step_budget import StepBudget
from .small_resnets import SmallResNet, batchnorm_twin_name, normfree_twin_name  # registers nf_/bn_resnet_* in timm
from .train import TrainResult, resume, train
from .transfer import TransferConfig, TransferResult, compare_transfer
from .weights import load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "BlockStats",
    "ClipHistory",
    "ClipRate",
    "ClipStats",
    "CompareConfig",
    "CompareResult",
    "ConfigError",
    "ConversionError",
    "ConvertedResidual",
    "DeviceMixedPrecision",
    "EpochLog",
    "FASHION_MNIST_CLASSES",
    "METHODS",
    "PerSampleClipper",
    "PeakMemory",
    "RunRecord",
    "SignalPropagation",
    "SmallResNet",
    "StepBudget",
    "TrainConfig",
    "TrainResult",
    "TransferConfig",
    "TransferResult",
    "adaptive_clip_factor",
    "adaptive_clip_grad_",
    "average_channel_squared_mean",
    "average_channel_variance",
    "batchnorm_twin_name",
    "body_head_splitter",
    "build_model",
    "compare",
    "compare_transfer",
    "csv_dataloaders",
    "digits_dataloaders",
    "excluded_parameters",
    "fashion_mnist_dataloaders",
    "find_classifier",
    "fuse_standardization",
    "image_folder_dataloaders",
    "init_classifier_",
    "load_weights",
    "medmnist_dataloaders",
    "nesterov_sgd",
    "nf_learner",
    "normfree_twin_name",
    "read_idx",
    "resume",
    "normalizer_free_archs",
    "save_weights",
    "signal_propagation",
    "subset_dataloaders",
    "to_normfree",
    "train",
    "unitwise_norm",
    "write_digits_image_folder",
    "write_report",
    "write_spp",
]
