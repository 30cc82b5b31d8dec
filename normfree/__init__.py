"""normfree: Normalizer-Free Networks and Adaptive Gradient Clipping for fastai.

The layers, bottom up (docs/ARCHITECTURE.md): `utils`, `models` and `agc` (torch and timm only), `data` and
`learner` (fastai), `app` (the runs, reports and the command line). `import normfree` loads the first three only;
the fastai-level names below load on first use, so that a script using AGC alone never imports fastai or pyplot.
Where fastai is imported already, the fastai integration (``Learner.agc``, ``Learner.to_mixed_precision``) is
installed at once.
"""
import importlib
import sys
import warnings

from .app import startup  # noqa: F401  (first: Ctrl-C while the normfree command starts is one line)

# fastai 2.8 decorates a layer with torch.jit.script at import time, which torch now deprecates: a
# warning on every start of the `normfree` command that no user can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

from .agc import (
    ClipStats,
    PerSampleClipper,
    adaptive_clip_factor,
    adaptive_clip_grad_,
    agc_hook,
    excluded_parameters,
    unitwise_norm,
)
from .models import (  # importing the models registers normfree's small ResNets (nf_/bn_resnet_*) with timm
    BlockStats,
    ConversionError,
    ConvertedResidual,
    SignalPropagation,
    SmallResNet,
    average_channel_squared_mean,
    average_channel_variance,
    batchnorm_twin_name,
    body_head_splitter,
    build_model,
    fast_nf,
    find_classifier,
    fuse_standardization,
    init_classifier_,
    load_weights,
    normalizer_free_archs,
    normfree_twin_name,
    save_weights,
    signal_propagation,
    to_normfree,
)
from .utils.errors import ConfigError
from .utils.memory import PeakMemory

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it (each needs fastai)
    **dict.fromkeys(["AGC", "ClipRate", "ClipHistory", "DeviceMixedPrecision", "EpochLog", "StepBudget",
                     "nesterov_sgd", "nf_learner"], "normfree.learner"),
    **dict.fromkeys(["FASHION_MNIST_CLASSES", "csv_dataloaders", "digits_dataloaders", "fashion_mnist_dataloaders",
                     "image_folder_dataloaders", "medmnist_dataloaders", "read_idx", "subset_dataloaders",
                     "write_digits_image_folder"], "normfree.data"),
    **dict.fromkeys(["TrainConfig"], "normfree.app.config"),
    **dict.fromkeys(["TrainResult", "resume", "train"], "normfree.app.train"),
    **dict.fromkeys(["METHODS", "CompareConfig", "CompareResult", "compare"], "normfree.app.compare"),
    **dict.fromkeys(["TransferConfig", "TransferResult", "compare_transfer"], "normfree.app.transfer"),
    **dict.fromkeys(["RunRecord", "write_report"], "normfree.app.report"),
    **dict.fromkeys(["write_spp"], "normfree.app.spp"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'normfree' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    importlib.import_module("normfree.learner")  # fastai is loaded now: its Learner gets normfree's methods
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "fastai.learner" in sys.modules:
    importlib.import_module("normfree.learner")

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
    "agc_hook",
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
    "fast_nf",
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
