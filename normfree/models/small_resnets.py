"""Small-image normalizer-free ResNets, each with a BatchNorm twin that differs only in normalisation.

For CPU-scale experiments on 28-64 px images (digits upscaled to 32 px, Fashion-MNIST at 28 px): a
stride-1 3x3 stem and three stages at strides 1, 2, 2, so a 32 px input reaches the head at 8 px.

The NF member is built from timm's own pieces (`timm.models.nfnet.NormFreeBlock`, `DownsampleAvg`,
`timm.layers.ScaledStdConv2d`), so tools that recognise them (e.g. `normfree.models.fusion`) keep working.
Its blocks subclass NormFreeBlock only to compute the same function with fewer full-size tensor passes
(beta folded into the convolutions' constant scale, like timm's gamma; see `_NormFreeBottleneck`).
It follows Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap
in unnormalized ResNets" (arXiv 2101.08692):

- Sec. 4: residual blocks h_{i+1} = h_i + alpha * f_i(h_i / beta_i), beta_i the expected standard
  deviation of h_i; the expected variance grows by alpha^2 per block and resets to 1 + alpha^2 at each
  transition block, whose shortcut is a convolution of the normalised input. The paper's alpha is 0.2
  for deep ImageNet ResNets; this family defaults to `ALPHA` = 0.5 (see "The recipe" below).
  The transition shortcut average-pools before its 1x1 conv (NFNets, timm), which the variance formula
  ignores: on spatially uncorrelated features (white-noise input) it divides the variance by up to 4.
- Sec. 4: Scaled Weight Standardisation with the ReLU gain gamma = sqrt(2 / (1 - 1/pi)) folded into
  every convolution that follows a ReLU (as timm does); the stem conv sees the raw image, so it gets
  gamma = 1.
- SkipInit (De & Smith 2020, arXiv 2002.10444), a zero-initialised scalar gain at the end of each
  residual branch, is an option (``skipinit=True``), off by default: the branches start at full strength.

The recipe (README, "A recipe that trains", and docs/recipe/ablation.md; digits, batch 64, 5 epochs of
one-cycle Adam at 1e-2, final validation accuracy): the papers' recipe as it is (SkipInit gains at 0,
alpha 0.2, classifier N(0, 0.01), AGC lambda 0.01) reached 80.5-82.2% where the BatchNorm twin reached
about 97%. With the branches open at initialisation, 90.0%; with alpha 0.5 as well, 95.8%; with the
classifier drawn from N(0, 0.1) and lambda 0.04 as well, 96.9-97.2%. These are small networks on small,
smooth images: the residual branches hold the only 3x3 convolutions of a depth-(1, 1, 1) network, so
switching them off or scaling them by 0.2 leaves mostly 1x1 shortcuts to learn with, and the features
reaching the head have about 1/20 of the unit variance the signal-propagation design assumes (the
1-channel standardised stem removes each patch's mean, and the transitions' average pooling divides the
variance), so a classifier drawn at the papers' scale starts out nearly silent. Both twins share the
classifier init.

The BatchNorm twin uses timm's pre-activation bottleneck (`timm.models.resnetv2.PreActBottleneck`,
ResNet v2, He et al. 2016) with the same convolutions (shapes, strides, padding), the same avg-pool
shortcut and the same head; a BatchNorm + ReLU replaces each bare ReLU, and it has no alpha, beta or
skip gain. Every conv output reaches a BatchNorm before anything else reads it, so its convs have no
bias. Both members count the same conv and linear multiply-adds.

Registered with timm (after `import normfree.models.small_resnets`); parameters at 10 classes and 1 channel,
multiply-adds (conv + linear, identical in both members) per 32 px image:

==================  =========  ==============  =========  =========  =======
names               depths     widths          NF params  BN params  MACs
==================  =========  ==============  =========  =========  =======
nf/bn_resnet_tiny   (1, 1, 1)  (64, 128, 256)  128,810    127,914    21.5 M
nf/bn_resnet_small  (2, 2, 2)  (64, 128, 256)  221,546    220,650    34.9 M
nf/bn_resnet_base   (3, 4, 6)  (64, 128, 256)  543,274    542,378    66.1 M
==================  =========  ==============  =========  =========  =======

Widths are the stage outputs; the bottlenecks are a quarter as wide (16, 32, 64) and the stem has
half the first width (32). The three sizes share widths so that a comparison across them isolates depth,
which is where signal propagation matters.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import BatchNormAct2d, ClassifierHead, ScaledStdConv2d, create_conv2d, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.nfnet import NormFreeBlock
from timm.models.resnetv2 import DownsampleAvg as PreActDownsampleAvg
from timm.models.resnetv2 import PreActBottleneck
from torch import nn

from .classifier import init_classifier_
from .equations import activation_gamma, nf_residual, residual_betas, skipinit_gain
from .standardization import STD_CONV_EPS

__all__ = [
    "ALPHA",
    "CLASSIFIER_INIT_STD",
    "FAMILY",
    "Normalization",
    "SmallResNet",
    "batchnorm_twin_name",
    "is_small_normfree",
    "bn_resnet_base",
    "bn_resnet_small",
    "bn_resnet_tiny",
    "nf_resnet_base",
    "nf_resnet_small",
    "nf_resnet_tiny",
    "normfree_twin_name",
]

Normalization = Literal["nf", "batchnorm"]

# size -> (depths, widths); each size is registered as nf_resnet_<size> and bn_resnet_<size>
FAMILY: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((1, 1, 1), (64, 128, 256)),
    "small": ((2, 2, 2), (64, 128, 256)),
    "base": ((3, 4, 6), (64, 128, 256)),
}
_PREFIX: dict[Normalization, str] = {"nf": "nf_resnet_", "batchnorm": "bn_resnet_"}

_RELU_GAMMA = activation_gamma(nn.ReLU())
ALPHA = 0.5  # residual branch scale of this family (the paper's 0.2 is for deep ImageNet ResNets)
CLASSIFIER_INIT_STD = 0.1  # of both twins' classifier weight (NFNets use 0.01 on unit-variance features)
_CH_DIV = 8
_DEFAULT_SIZE = 32


def _cfg(in_chans: int = 1, num_classes: int = 10, **kwargs: Any) -> dict[str, Any]:
    """timm pretrained_cfg (no weights): maps [0, 1] pixels to [-1, 1] in timm's data pipeline."""
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (in_chans, _DEFAULT_SIZE, _DEFAULT_SIZE),
        "pool_size": (_DEFAULT_SIZE // 4, _DEFAULT_SIZE // 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2101.08692",
        **kwargs,
    }


class _NormFreeBottleneck(NormFreeBlock):
    """timm's NormFreeBlock (bottleneck, no attention), computing the same function with fewer full-size passes.

    - `beta` is the papers' beta_i (from `residual_betas`), the divisor of the block input h_i. act1's output
      is read only by conv1 and the shortcut conv, ahead of their bias, so 1 / beta is folded into their
      constant weight scale, where timm already keeps gamma, and the attribute `beta` (timm's multiplier,
      1 / beta_i) reads 1.0. Values and gradients are unchanged, and so is `NormFreeBlock.forward` on this block.
    - the output is `nf_residual`: alpha and the SkipInit gain (`skipinit_gain`) are one out-of-place
      multiplication; timm's in-place `mul_` makes autograd keep a copy of the branch output for the gain's
      gradient.
    - without SkipInit the branch starts at full strength: conv3's gain starts at 1, where timm's
      NormFreeBlock zeroes it whenever SkipInit is off.
    """

    def __init__(
        self, in_chs: int, out_chs: int, stride: int, alpha: float, beta: float, bottle_ratio: float,
        skipinit: bool, conv_layer: Callable[..., nn.Conv2d],
    ) -> None:
        super().__init__(
            in_chs, out_chs, stride=stride, alpha=alpha, beta=1.0, bottle_ratio=bottle_ratio, ch_div=_CH_DIV,
            reg=False, skipinit=skipinit, act_layer=nn.ReLU, conv_layer=conv_layer,
        )
        if skipinit:
            self.skipinit_gain = skipinit_gain()
        else:
            nn.init.ones_(self.conv3.gain)
        self.conv1.scale /= beta
        if self.downsample is not None:
            self.downsample.conv.scale /= beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x)
        shortcut = x if self.downsample is None else self.downsample(out)
        return nf_residual(shortcut, self.conv3(self.act3(self.conv2(self.act2(self.conv1(out))))), self.alpha,
                           self.skipinit_gain)


class SmallResNet(nn.Module):
    """Pre-activation bottleneck ResNet for small images, normalizer-free (`"nf"`) or BatchNorm.

    stem (3x3 conv, stride 1) -> stages (first block of each a transition with an avg-pool + 1x1 conv
    shortcut; stride 1 for the first stage, 2 after) -> ReLU (NF) or BatchNorm + ReLU (twin) -> global
    average pool -> dropout -> `head.fc`.

    Args:
        depths: blocks per stage.
        widths: output channels per stage (multiples of 8 / bottle_ratio keep the bottlenecks exact).
        normalization: "nf" (Scaled WS, alpha/beta, SkipInit; no normalisation layer anywhere) or
            "batchnorm" (the twin).
        num_classes: classifier outputs; 0 for no classifier (features after pooling).
        in_chans: image channels.
        drop_rate: dropout before the classifier.
        alpha: NF residual branch scale (2101.08692, Sec. 4); the twin ignores it.
        skipinit: NF zero-initialised scalar gain on each residual branch (SkipInit), so that every branch
            starts switched off; without it (the default) the branches start at full strength. The twin
            ignores it.
        stem_chs: stem output channels, default half the first width.
        bottle_ratio: bottleneck width / block output width (ResNet's 1/4).
    """

    def __init__(
        self,
        depths: tuple[int, ...] = FAMILY["tiny"][0],
        widths: tuple[int, ...] = FAMILY["tiny"][1],
        normalization: Normalization = "nf",
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        alpha: float = ALPHA,
        skipinit: bool = False,
        stem_chs: int | None = None,
        bottle_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        if normalization not in _PREFIX:
            raise ValueError(f"normalization must be one of {tuple(_PREFIX)}, got {normalization!r}")
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"depths and widths need one entry per stage, got {depths} and {widths}")
        self.normalization = normalization
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.pretrained_cfg = self.default_cfg = _cfg(in_chans, num_classes)

        stem_chs = stem_chs or widths[0] // 2
        self.stem = nn.Sequential()
        if normalization == "nf":
            # the stem convolves the image, not a ReLU output: no gamma
            self.stem.add_module("conv", ScaledStdConv2d(in_chans, stem_chs, 3, gamma=1.0, eps=STD_CONV_EPS))
            conv_layer = partial(ScaledStdConv2d, gamma=_RELU_GAMMA, eps=STD_CONV_EPS)
        else:
            self.stem.add_module("conv", create_conv2d(in_chans, stem_chs, 3))
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="stem.conv")]

        stage_strides = (1,) + (2,) * (len(depths) - 1)
        # NormFreeBlock adds a projection shortcut exactly when shape changes (a stage's first block if it strides
        # or widens); the twin mirrors that
        transitions = [block_idx == 0 and (stride != 1 or in_chs != out_chs)
                       for depth, stride, in_chs, out_chs in zip(depths, stage_strides, (stem_chs, *widths), widths)
                       for block_idx in range(depth)]
        # the stem output has unit variance for inputs standardised to unit variance (2101.08692, Sec. 4)
        betas, transitions = iter(residual_betas(transitions, alpha)), iter(transitions)
        prev_chs, net_stride = stem_chs, 1
        stages = []
        for stage_idx, (depth, out_chs, stage_stride) in enumerate(zip(depths, widths, stage_strides)):
            net_stride *= stage_stride
            blocks = []
            for block_idx in range(depth):
                stride = stage_stride if block_idx == 0 else 1
                transition, beta = next(transitions), next(betas)
                if normalization == "nf":
                    blocks.append(_NormFreeBottleneck(
                        prev_chs, out_chs, stride, alpha, beta, bottle_ratio, skipinit, conv_layer,
                    ))
                else:
                    blocks.append(PreActBottleneck(
                        prev_chs, out_chs, stride=stride, bottle_ratio=bottle_ratio, conv_layer=create_conv2d,
                        norm_layer=BatchNormAct2d, proj_layer=PreActDownsampleAvg if transition else None,
                    ))
                prev_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_chs
        # pre-activation blocks leave the residual stream un-activated; the head needs it activated
        self.final_act = nn.ReLU() if normalization == "nf" else BatchNormAct2d(prev_chs)
        self.head = ClassifierHead(prev_chs, num_classes, pool_type="avg", drop_rate=drop_rate)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init for both members; in the NF member weight standardisation overrides its scale
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init_classifier_(self.head.fc, self.classifier_init_std)

    classifier_init_std = CLASSIFIER_INIT_STD  # read by normfree.build_model, which re-initialises classifiers

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final classifier, `head.fc` (an `nn.Linear`, or `nn.Identity` when num_classes is 0)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one (N(0, 0.1) weight, zero bias)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        init_classifier_(self.head.fc, self.classifier_init_std)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activated feature map before pooling: [N, num_features, H / 4, W / 4]."""
        return self.final_act(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classify a `forward_features` map (only pool and dropout with pre_logits)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, in_chans, H, W]."""
        return self.forward_head(self.forward_features(x))


def _twin_name(name: str, normalization: Normalization) -> str:
    for size in FAMILY:
        if name in (_PREFIX["nf"] + size, _PREFIX["batchnorm"] + size):
            return _PREFIX[normalization] + size
    names = [prefix + size for prefix in _PREFIX.values() for size in FAMILY]
    raise ValueError(f"{name!r} is not one of the small ResNets: {', '.join(names)}")


def is_small_normfree(name: str) -> bool:
    """Whether `name` is one of this family's normalizer-free members (which take ``skipinit``)."""
    return name in {_PREFIX["nf"] + size for size in FAMILY}


def batchnorm_twin_name(name: str) -> str:
    """The BatchNorm twin's registered name: "nf_resnet_tiny" -> "bn_resnet_tiny" (BN names map to themselves)."""
    return _twin_name(name, "batchnorm")


def normfree_twin_name(name: str) -> str:
    """The normalizer-free twin's registered name: "bn_resnet_tiny" -> "nf_resnet_tiny" (NF names map to themselves)."""
    return _twin_name(name, "nf")


default_cfgs = generate_default_cfgs(
    {prefix + size: _cfg() for prefix in _PREFIX.values() for size in FAMILY}
)


def _create(size: str, normalization: Normalization, pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    depths, widths = FAMILY[size]
    in_chans = kwargs.get("in_chans", 1)
    # the registered cfg describes 1-channel input; keep mean/std/input_size in step with in_chans
    overlay = {**_cfg(in_chans), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    return build_model_with_cfg(
        SmallResNet, _PREFIX[normalization] + size, pretrained, pretrained_cfg_overlay=overlay,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(depths) + 1))),
        depths=depths, widths=widths, normalization=normalization, **kwargs,
    )


@register_model
def nf_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Normalizer-free small-image ResNet, depths (1, 1, 1), widths (64, 128, 256)."""
    return _create("tiny", "nf", pretrained, **kwargs)


@register_model
def bn_resnet_tiny(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """BatchNorm twin of nf_resnet_tiny."""
    return _create("tiny", "batchnorm", pretrained, **kwargs)


@register_model
def nf_resnet_small(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Normalizer-free small-image ResNet, depths (2, 2, 2), widths (64, 128, 256)."""
    return _create("small", "nf", pretrained, **kwargs)


@register_model
def bn_resnet_small(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """BatchNorm twin of nf_resnet_small."""
    return _create("small", "batchnorm", pretrained, **kwargs)


@register_model
def nf_resnet_base(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """Normalizer-free small-image ResNet, depths (3, 4, 6), widths (64, 128, 256)."""
    return _create("base", "nf", pretrained, **kwargs)


@register_model
def bn_resnet_base(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """BatchNorm twin of nf_resnet_base."""
    return _create("base", "batchnorm", pretrained, **kwargs)
