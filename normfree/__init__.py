"""normfree: Normalizer-Free Networks and Adaptive Gradient Clipping for fastai."""
from .agc import ClipStats, adaptive_clip_factor, adaptive_clip_grad_, unitwise_norm
from .callback import AGC, ClipRate
from .clip_history import ClipHistory
from .data import (
    FASHION_MNIST_CLASSES,
    csv_dataloaders,
    digits_dataloaders,
    fashion_mnist_dataloaders,
    image_folder_dataloaders,
    medmnist_dataloaders,
    read_idx,
    write_digits_image_folder,
)
from .classifier import find_classifier, init_classifier_
from .exclusion import excluded_parameters
from .fusion import fuse_standardization
from .learner import body_head_splitter, build_model, nf_learner, normalizer_free_archs
from .small_resnets import SmallResNet, batchnorm_twin_name, normfree_twin_name  # registers nf_/bn_resnet_* in timm
from .weights import load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "ClipHistory",
    "ClipRate",
    "ClipStats",
    "FASHION_MNIST_CLASSES",
    "SmallResNet",
    "adaptive_clip_factor",
    "adaptive_clip_grad_",
    "batchnorm_twin_name",
    "body_head_splitter",
    "build_model",
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
    "nf_learner",
    "normfree_twin_name",
    "read_idx",
    "normalizer_free_archs",
    "save_weights",
    "unitwise_norm",
    "write_digits_image_folder",
]
