"""Models: normalizer-free building blocks and architectures. Needs torch and timm; fastai only for torchvision archs.

- `equations`: one function per equation of the papers: the NF residual, its beta schedule, SkipInit's gain,
  the activation gammas, Scaled Weight Standardization, an eval-mode BatchNorm's affine map.
- `standardization`: Scaled Weight Standardization on timm's layers, and the eps of the layers normfree builds.
- `classifier`: finding the final classifier and initialising it.
- `small_resnets`: small-image NF ResNets and their BatchNorm twins (registered with timm on import).
- `convert`: `to_normfree`, a BatchNorm model made normalizer-free (the NF recipe, or by folding BatchNorm).
- `fold`: every BatchNorm folded into the convolution or Linear next to it (`to_normfree`'s mode "fold").
- `fusion`: Scaled WS folded into plain convolutions for inference.
- `fast_nf`: timm's NF blocks with their scalars folded into the Scaled WS convolutions (training and inference).
- `weights`: local weight files.  `factory`: `build_model` by timm name or torchvision function.
- `propagation`: signal propagation plots' statistics.
"""
from .classifier import find_classifier, init_classifier_
from .convert import ConversionError, ConvertedResidual, to_normfree
from .factory import body_head_splitter, build_model, normalizer_free_archs
from .fast_nf import fast_nf
from .fusion import fuse_standardization
from .propagation import (
    BlockStats,
    SignalPropagation,
    average_channel_squared_mean,
    average_channel_variance,
    signal_propagation,
)
from .small_resnets import SmallResNet, batchnorm_twin_name, normfree_twin_name
from .weights import load_weights, save_weights

__all__ = ["BlockStats", "ConversionError", "ConvertedResidual", "SignalPropagation", "SmallResNet",
           "average_channel_squared_mean", "average_channel_variance", "batchnorm_twin_name", "body_head_splitter",
           "build_model", "fast_nf", "find_classifier", "fuse_standardization", "init_classifier_", "load_weights",
           "normalizer_free_archs", "normfree_twin_name", "save_weights", "signal_propagation", "to_normfree"]
