"""The normalizer-free equations, one function each, with the paper, section and equation it implements.

Papers:

- NF-ResNets: Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in
  unnormalized ResNets", arXiv 2101.08692 (ICLR 2021).
- NFNets: Brock, De, Smith & Simonyan 2021, "High-performance large-scale image recognition without
  normalization", arXiv 2102.06171 (ICML 2021), which restates the NF-ResNet recipe in its Sec. 3 with
  numbered equations: Eq. (1) the residual block, Eq. (2) Scaled Weight Standardization.
- SkipInit: De & Smith 2020, "Batch normalization biases residual blocks towards the identity function
  in deep networks", arXiv 2002.10444.

Functions (each the only place this project writes its equation):

- `nf_residual`: h_{i+1} = h_i + alpha * gain * f_i(h_i / beta_i), given the shortcut and the branch output;
  `residual_scale`: its factor alpha * gain (what a fold moves into the branch's last convolution).
- `residual_betas`: the beta_i of a stack of blocks: Var(h_i) grows by alpha^2 per block and restarts at
  1 + alpha^2 after a transition block; beta_i = sqrt(Var(h_i)).
- `skipinit_gain`: the SkipInit scalar, a learnable gain on the residual branch initialised to 0.
- `activation_gamma` (and its table `ACTIVATION_GAMMAS`): gamma = 1 / sqrt(Var(g(x))), x ~ N(0, 1);
  `is_positively_homogeneous`: whether g(x / beta) = g(x) / beta, so that 1 / beta may move past g.
- `standardize_weight`: Scaled Weight Standardization, W_hat = gain * gamma * (W - mean) / (std * sqrt(N));
  `weight_statistics`: its mean and 1 / std per output unit.
- `batchnorm_scale_shift`: an eval-mode BatchNorm as y = scale * x + shift per channel, scale = g / sqrt(var + eps),
  shift = beta - mean * scale (what `normfree.models.fold` folds into the layer next to a BatchNorm).

Conventions: the papers' beta_i divides (h_i / beta_i); timm's `NormFreeBlock(beta=...)` multiplies, so
timm's beta is 1 / beta_i.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import standardization_kernel

__all__ = [
    "ACTIVATION_GAMMAS",
    "activation_gamma",
    "batchnorm_scale_shift",
    "is_positively_homogeneous",
    "nf_residual",
    "residual_betas",
    "residual_scale",
    "skipinit_gain",
    "standardize_weight",
    "weight_statistics",
]

# gamma = 1 / sqrt(Var(g(x))), x ~ N(0, 1), for the elementwise activations of DeepMind's NFNet code
# (deepmind-research/nfnets/base.py, `nonlinearities`; timm copies them into timm.models.nfnet).
# They are DeepMind's sampled estimates, within 0.1% of the exact values (tests/test_equations.py
# integrates each definition): ReLU's exact gamma is sqrt(2 / (1 - 1/pi)) = 1.71286, this table's
# 1.71396. Kept as they are so that models built here compute what timm's and DeepMind's compute.
# Left out: DeepMind's glu and log_softmax, which are not elementwise (their gamma depends on the shape).
ACTIVATION_GAMMAS: Mapping[str, float] = MappingProxyType({
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,  # erf or tanh approximation (their exact gammas differ by 1e-5)
    "leaky_relu": 1.70590341091156,  # negative slope 0.01 (torch's and jax's default)
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "softsign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
})
# torch activation classes -> their key in ACTIVATION_GAMMAS
_GAMMA_KEYS: dict[type, str] = {
    nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.ELU: "elu", nn.CELU: "celu", nn.SELU: "selu",
    nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softsign: "softsign", nn.Softplus: "softplus",
    nn.LeakyReLU: "leaky_relu", nn.LogSigmoid: "log_sigmoid", nn.Identity: "identity",
}
# activations g with g(c x) = c g(x) for every c > 0 (positively homogeneous): g(h / beta) = g(h) / beta, so a block's
# 1 / beta can move from g's input into the scale of the linear layers that read g's output (as NF-ResNets fold it
# into the convolutions' constant scale). Matched by exact type: a subclass may compute something else.
_POSITIVELY_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)


def is_positively_homogeneous(activation: nn.Module) -> bool:
    """Whether `activation` satisfies g(c x) = c g(x) for every c > 0 (ReLU, LeakyReLU, PReLU, Identity), so that
    the NF block's g(h / beta) equals g(h) / beta (2101.08692, Sec. 4). SiLU, GELU, ELU, ReLU6 ... do not."""
    return type(activation) in _POSITIVELY_HOMOGENEOUS


def residual_scale(alpha: float, gain: Tensor | None = None) -> float | Tensor:
    """The factor of the residual branch in `nf_residual`, alpha * gain (alpha where there is no SkipInit gain).

    A scalar, so where the branch ends with a linear layer it can be folded into that layer's weight and bias
    (`normfree.models.fusion`, `normfree.models.convert.ConvertedResidual`) instead of multiplying the branch output.
    """
    if gain is None:
        return alpha
    return gain * alpha


def nf_residual(shortcut: Tensor, branch: Tensor, alpha: float, gain: Tensor | None = None) -> Tensor:
    """The normalizer-free residual block's output, h_{i+1} = h_i + alpha * gain * f_i(h_i / beta_i).

    NF-ResNets (2101.08692), Sec. 4; NFNets (2102.06171), Sec. 3, Eq. (1). `shortcut` is h_i (or, in a
    transition block, its projection of the normalised input), `branch` is f_i(h_i / beta_i), already
    computed by the caller; `alpha` is the branch scale (the papers' 0.2); `gain` is the SkipInit scalar
    (`skipinit_gain`; None: no gain, i.e. 1).
    """
    if gain is None:
        return torch.add(shortcut, branch, alpha=alpha)
    return shortcut + branch * (gain * alpha)  # residual_scale, written out: TorchScript types it as a Tensor


def residual_betas(transitions: Iterable[bool], alpha: float, input_variance: float = 1.0) -> list[float]:
    """beta_i for each block i of a stack of residual blocks: the expected std of the stream h_i it reads.

    NF-ResNets (2101.08692), Sec. 4; NFNets (2102.06171), Sec. 3, the text of Eq. (1):
    beta_i = sqrt(Var(h_i)), with
    Var(h_{i+1}) = Var(h_i) + alpha^2, except after a transition block (one whose shortcut convolves the
    normalised input h_i / beta_i), after which Var(h_{i+1}) = 1 + alpha^2.

    `transitions[i]` says whether block i is a transition (block i's own flag affects only the blocks after
    it); `input_variance` is Var(h_0), 1 for a stack fed by a weight-standardised convolution.
    """
    betas, variance = [], input_variance
    for transition in transitions:
        betas.append(math.sqrt(variance))
        variance = (1.0 if transition else variance) + alpha ** 2
    return betas


def skipinit_gain(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
    """SkipInit's learnable scalar gain at the end of a residual branch, initialised to 0 (De & Smith 2020,
    arXiv 2002.10444), so that each block starts as the identity; the `gain` of `nf_residual`.

    NFNets use it on every block (2102.06171, Sec. 3; timm's `NormFreeBlock(skipinit=True)` keeps it as
    `skipinit_gain`).
    """
    return nn.Parameter(torch.zeros((), device=device, dtype=dtype))


def activation_gamma(activation: nn.Module | str, overrides: float | Mapping | None = None) -> float:
    """gamma = 1 / sqrt(Var(g(x))) for x ~ N(0, 1): the gain that gives the output of activation g unit
    variance again (NF-ResNets, 2101.08692, Sec. 4.2; ReLU's is sqrt(2 / (1 - 1/pi))).

    Read from `ACTIVATION_GAMMAS` (DeepMind's values: ReLU 1.7140, GELU 1.7015, SiLU 1.7881).
    `activation` is a module (torch's activations, or timm's, by class name) or a table key ("relu").
    `overrides`: one gamma for every activation, or a mapping from activation classes (or class names)
    to gammas. KeyError (with the fix) for an activation with no known gamma.
    """
    if isinstance(overrides, (int, float)) and not isinstance(overrides, bool):
        return float(overrides)
    if isinstance(activation, str):
        if activation not in ACTIVATION_GAMMAS:
            raise KeyError(f"no gamma is known for {activation!r}; known: {', '.join(ACTIVATION_GAMMAS)}")
        return ACTIVATION_GAMMAS[activation]
    kind = type(activation)
    for key in (kind, kind.__name__):
        if isinstance(overrides, Mapping) and key in overrides:
            return float(overrides[key])
    name = _GAMMA_KEYS.get(kind)  # GELU's gamma serves its tanh approximation too (jax.nn.gelu's default)
    if kind is nn.LeakyReLU and activation.negative_slope != nn.LeakyReLU().negative_slope:
        name = None  # the table's gamma is for the default slope
    if name is None and kind.__name__.lower() in ACTIVATION_GAMMAS:  # timm's own activation classes (GELU, Tanh, ...)
        name = kind.__name__.lower()
    if name is None:
        raise KeyError(f"no gamma is known for {activation!r}: pass activation_gamma={{{kind.__name__}: value}} with "
                       f"1 / std of its output for N(0, 1) inputs (2101.08692, Sec. 4.2)")
    return ACTIVATION_GAMMAS[name]


def standardize_weight(weight: Tensor, scale: Tensor | None, eps: float, fused: bool = False) -> Tensor:
    """Scaled Weight Standardization: W_hat = scale * (W - mean) / sqrt(var + eps), per output unit.

    NF-ResNets (2101.08692), Sec. 4.1; NFNets (2102.06171), Sec. 3, Eq. (2):
    W_hat_ij = (W_ij - mu_i) / (sqrt(N) * sigma_i), mean and biased variance over the fan-in N of output
    unit i, times the activation's gamma and a learnable per-unit gain. As timm's ScaledStdConv2d computes
    it: `scale` = gain * gamma / sqrt(N), one value per output unit (`normfree.models.standardization.
    weight_scale`; None: no scaling, timm's StdConv2d), and eps is added to the variance. `weight` is
    [out, *fan-in dims]; the statistics are `weight_statistics`.

    Computed as timm's layers compute it, a batch norm over the rows in training mode, so that code standing
    in for such a layer's forward pass (per-sample AGC, fusion) gives its outputs bit for bit: a last-bit
    difference can flip a ReLU whose input is near 0, and then that position's gradient. `fused`: where
    `standardization_kernel.runs_on(weight)` (a float CUDA weight, Triton), one fused kernel each way instead
    (`standardization_kernel`), whose result is in autocast's dtype where autocast is on (cast once, in the kernel)
    and equals batch norm's within float32 rounding, not bit for bit: code standing in for a layer passes `fused`
    as the layer's own forward pass computes it (`normfree.models.standardization.standardized_weight`).
    """
    if fused and not torch.jit.is_scripting() and standardization_kernel.runs_on(weight):
        standardized = standardization_kernel.standardize(weight, scale, eps)
        if standardized is not None:
            return standardized
    rows = weight.reshape(1, weight.shape[0], -1)
    return F.batch_norm(rows, None, None, weight=scale, training=True, momentum=0.0, eps=eps).reshape_as(weight)


def weight_statistics(weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eq. (2)'s statistics of `standardize_weight`: per output unit, the mean of W over its fan-in and
    1 / sqrt(var + eps) (biased variance), each of shape [out] (what batch norm's backward kernel takes: the
    per-sample engines use them)."""
    variance, mean = torch.var_mean(weight.reshape(weight.shape[0], -1), dim=1, correction=0)  # one reduction
    return mean, torch.rsqrt(variance + eps)


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as the per-channel affine map it is, y_c = scale_c * x_c + shift_c, with
    scale_c = g_c / sqrt(var_c + eps) and shift_c = beta_c - mean_c * scale_c (Ioffe & Szegedy 2015, arXiv
    1502.03167, Algorithm 2: inference uses the running statistics). Folded into the layer before it, weight W and
    bias b (zero if none), this gives W'_c = W_c * scale_c and b'_c = beta_c + (b_c - mean_c) * scale_c, the fold
    of frozen BatchNorm in detection libraries (detectron2's FrozenBatchNorm2d). A BatchNorm without affine
    parameters has g = 1, beta = 0. `bn` must track running statistics (the caller checks)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    return scale, shift if bn.bias is None else shift + bn.bias
