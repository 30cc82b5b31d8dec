"""normfree.models.equations, each against a reference written independently of it: a float64 formula,
numerical integration and a Monte Carlo estimate for gamma, timm's own layers and models."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from timm.layers import ScaledStdConv2d, StdConv2d
from timm.layers.activations import GELU as TimmGELU
from timm.models.nfnet import NormFreeBlock, _nonlin_gamma
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.resnet import BasicBlock

from normfree.models.convert import ConvertedResidual, to_normfree
from normfree.models.equations import (
    ACTIVATION_GAMMAS,
    activation_gamma,
    nf_residual,
    residual_betas,
    skipinit_gain,
    standardize_weight,
    weight_statistics,
)
from normfree.models.small_resnets import SmallResNet
from normfree.models.standardization import weight_scale

FAST = settings(max_examples=40, deadline=None)

# the elementwise activations of the table, in float64
ACTIVATIONS = {
    "identity": lambda x: x, "celu": F.celu, "elu": F.elu, "gelu": F.gelu, "leaky_relu": F.leaky_relu,
    "log_sigmoid": F.logsigmoid, "relu": F.relu, "relu6": F.relu6, "selu": F.selu, "sigmoid": torch.sigmoid,
    "silu": F.silu, "softsign": F.softsign, "softplus": F.softplus, "tanh": torch.tanh,
}


# --- nf_residual: h + alpha * gain * f(h / beta) ---------------------------------------------------------------

@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), alpha=st.floats(0.01, 2.0),
       gain=st.one_of(st.none(), st.floats(-2.0, 2.0)), seed=st.integers(0, 2 ** 16))
def test_nf_residual_is_the_float64_formula(shape, alpha, gain, seed):
    generator = torch.Generator().manual_seed(seed)
    shortcut, branch = torch.randn(2, *shape, generator=generator, dtype=torch.float64)
    gain_tensor = None if gain is None else torch.tensor(gain, dtype=torch.float64)
    expected = shortcut + alpha * (1.0 if gain is None else gain) * branch
    torch.testing.assert_close(nf_residual(shortcut, branch, alpha, gain_tensor), expected, rtol=1e-14, atol=1e-14)


def test_nf_residual_gradient_reaches_the_skipinit_gain():
    shortcut, branch = torch.randn(2, 3, 5, dtype=torch.float64)
    gain = skipinit_gain(dtype=torch.float64)
    nf_residual(shortcut, branch, 0.2, gain).sum().backward()
    assert gain.grad.item() == pytest.approx(0.2 * branch.sum().item(), rel=1e-12)  # d/dgain = alpha * sum(f)


# --- residual_betas: Var grows by alpha^2 per block, restarts at 1 + alpha^2 after a transition ----------------------

def betas_closed_form(transitions, alpha, input_variance=1.0):
    """beta_i^2 = 1 + alpha^2 * (blocks since the last transition before i, that one included), or
    input_variance + i alpha^2 when no transition precedes block i."""
    betas = []
    for i in range(len(transitions)):
        last = max((j for j in range(i) if transitions[j]), default=None)
        variance = input_variance + i * alpha ** 2 if last is None else 1 + (i - last) * alpha ** 2
        betas.append(math.sqrt(variance))
    return betas


@FAST
@given(transitions=st.lists(st.booleans(), max_size=20), alpha=st.floats(0.01, 1.0),
       input_variance=st.floats(0.1, 10.0))
def test_residual_betas_closed_form(transitions, alpha, input_variance):
    assert residual_betas(transitions, alpha, input_variance) == pytest.approx(
        betas_closed_form(transitions, alpha, input_variance), rel=1e-12)


def test_residual_betas_match_timms_nfnet_schedule():
    """timm's NormFreeNet resets after each stage's first block and keeps 1 / beta in `NormFreeBlock.beta`."""
    model = timm.create_model("test_nfnet")
    blocks = [[b for b in stage if isinstance(b, NormFreeBlock)] for stage in model.stages]
    transitions = [index == 0 for stage in blocks for index in range(len(stage))]
    alpha = blocks[0][0].alpha
    timms = [1 / b.beta for stage in blocks for b in stage]
    assert residual_betas(transitions, alpha) == pytest.approx(timms, rel=1e-12)


def test_models_take_their_betas_from_the_schedule():
    model = SmallResNet(depths=(2, 3), widths=(32, 64))
    blocks = [b for b in model.modules() if isinstance(b, NormFreeBlock)]
    expected = betas_closed_form([True, False, True, False, False], model.stages[0][0].alpha)
    # beta is folded into conv1's scale: gamma / sqrt(fan_in) / beta
    got = [b.conv1.scale ** -1 * activation_gamma("relu") / b.conv1.weight[0].numel() ** 0.5 for b in blocks]
    assert got == pytest.approx(expected, rel=1e-12)

    converted = to_normfree(nn.Sequential(*[torchvision_block(64) for _ in range(3)]), alpha=0.3)
    assert [b.beta for b in converted if isinstance(b, ConvertedResidual)] == pytest.approx(
        betas_closed_form([False] * 3, 0.3), rel=1e-12)


def torchvision_block(channels):
    return BasicBlock(channels, channels)


# --- skipinit_gain ------------------------------------------------------------------------------------------------

def test_skipinit_gain_is_a_zero_learnable_scalar_and_the_models_use_it():
    gain = skipinit_gain(dtype=torch.float64)
    assert isinstance(gain, nn.Parameter) and gain.requires_grad
    assert gain.shape == () and gain.dtype == torch.float64 and gain.item() == 0.0
    small = [b.skipinit_gain for b in SmallResNet(skipinit=True).modules() if isinstance(b, NormFreeBlock)]
    converted = [b.skip_gain for b in to_normfree(nn.Sequential(torchvision_block(8), torchvision_block(8)),
                                                  skipinit=True).modules()
                 if isinstance(b, ConvertedResidual)]
    for gains in (small, converted):
        assert gains and all(isinstance(g, nn.Parameter) and g.shape == () and g.item() == 0.0 for g in gains)


# --- activation gamma: 1 / sqrt(Var(g(x))), x ~ N(0, 1) -----------------------------------------------------------

def gamma_by_integration(fn) -> float:
    """1 / sqrt(E[g^2] - E[g]^2) under N(0, 1), by adaptive quadrature in float64 (split at the kinks 0 and 6)."""
    def moment(power):
        def integrand(x):
            return float(fn(torch.tensor(x, dtype=torch.float64))) ** power * math.exp(-x * x / 2)
        pieces = ((-math.inf, 0.0), (0.0, 6.0), (6.0, math.inf))
        return sum(integrate.quad(integrand, a, b, epsabs=1e-12, epsrel=1e-12)[0] for a, b in pieces) / math.sqrt(
            2 * math.pi)
    return (moment(2) - moment(1) ** 2) ** -0.5


@pytest.mark.parametrize("name", sorted(ACTIVATION_GAMMAS))
def test_tabulated_gammas_are_within_0_1_percent_of_their_definition(name):
    """DeepMind estimated the table's gammas by sampling: they are within 0.09% of the integrals."""
    assert ACTIVATION_GAMMAS[name] == pytest.approx(gamma_by_integration(ACTIVATIONS[name]), rel=1e-3)


def test_gamma_integration_and_monte_carlo_agree_with_the_exact_relu_gamma():
    exact = math.sqrt(2 / (1 - 1 / math.pi))  # Var(relu(x)) = (1 - 1/pi) / 2
    assert gamma_by_integration(F.relu) == pytest.approx(exact, rel=1e-9)
    x = torch.randn(2 ** 22, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("relu", "silu", "gelu"):
        monte_carlo = ACTIVATIONS[name](x).var().rsqrt().item()
        assert monte_carlo == pytest.approx(gamma_by_integration(ACTIVATIONS[name]), rel=1e-3)


def test_activation_gamma_lookup():
    assert activation_gamma(nn.ReLU()) == ACTIVATION_GAMMAS["relu"] == activation_gamma("relu")
    assert activation_gamma(nn.SiLU()) == ACTIVATION_GAMMAS["silu"]
    assert activation_gamma(TimmGELU()) == ACTIVATION_GAMMAS["gelu"]  # timm's classes, by name
    for name, value in ACTIVATION_GAMMAS.items():  # the same numbers as timm's (and DeepMind's) models
        assert value == _nonlin_gamma[name]
    assert activation_gamma(nn.ReLU(), 2.0) == 2.0
    assert activation_gamma(nn.ReLU(), {nn.ReLU: 1.5}) == activation_gamma(nn.ReLU(), {"ReLU": 1.5}) == 1.5
    assert activation_gamma(nn.GELU(approximate="tanh")) == ACTIVATION_GAMMAS["gelu"]
    assert gamma_by_integration(lambda x: F.gelu(x, approximate="tanh")) == pytest.approx(
        gamma_by_integration(F.gelu), rel=1e-4)
    for unknown in (nn.Hardswish(), nn.LeakyReLU(0.2), "swish"):
        with pytest.raises(KeyError, match="no gamma is known"):
            activation_gamma(unknown)


# --- Scaled Weight Standardization ----------------------------------------------------------------------------------

class ConvWeight(TorchFunctionMode):
    """Records the weight a layer passes to conv2d: the standardised weight timm's layers compute."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, torch.conv2d):
            self.weight = args[1]
        return func(*args, **(kwargs or {}))


def timms_weight(conv: nn.Module) -> torch.Tensor:
    with ConvWeight() as mode, torch.no_grad():
        conv(torch.zeros(1, conv.in_channels, *conv.kernel_size, dtype=conv.weight.dtype))
    return mode.weight


def float64_weight(conv: nn.Module) -> torch.Tensor:
    """gain * gamma * (W - mean) / sqrt(N * (var + eps)), per output channel, biased variance."""
    w = conv.weight.detach().double().reshape(conv.out_channels, -1)
    n = w.shape[1]
    standardized = (w - w.mean(1, keepdim=True)) / torch.sqrt(n * (w.var(1, unbiased=False, keepdim=True) + conv.eps))
    if isinstance(conv, ScaledStdConv2d):
        standardized = standardized * conv.gain.detach().double().reshape(-1, 1) * conv.scale * n ** 0.5
    else:
        standardized = standardized * n ** 0.5  # StdConv2d: no gamma, no 1 / sqrt(N)
    return standardized.reshape(conv.weight.shape)


def random_conv(kind, out_chs, in_chs, kernel, eps, gamma, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    kwargs = {"gamma": gamma} if kind is ScaledStdConv2d else {}
    conv = kind(in_chs, out_chs, kernel, eps=eps, **kwargs).to(dtype)
    with torch.no_grad():  # each filter: its own std (0.01 to 3) and a mean of up to a few stds
        std = 10 ** (torch.rand(out_chs, 1, 1, 1, dtype=dtype) * 2.5 - 2)
        conv.weight.copy_((torch.randn_like(conv.weight) + 2 * torch.randn(out_chs, 1, 1, 1, dtype=dtype)) * std)
        if kind is ScaledStdConv2d:
            conv.gain.uniform_(-2, 2)
    return conv


CONVS = dict(kind=st.sampled_from([ScaledStdConv2d, StdConv2d]), out_chs=st.integers(1, 16),
             in_chs=st.integers(2, 8), kernel=st.sampled_from([1, 3, 5]), eps=st.sampled_from([1e-8, 1e-6, 1e-5, 1e-3]),
             gamma=st.floats(0.5, 5.0), seed=st.integers(0, 2 ** 16))


def assert_rows_close(got, expected, conv, units):
    """Per output unit, |got - expected| <= units * ulp * (max |W| / sqrt(var + eps) + max |expected|): the centring
    W - mean is exact to an ulp of the weights, not of their spread, and is then scaled by 1 / sqrt(var + eps), in any
    implementation (a spread far below sqrt(eps) leaves |expected| small and that error as it is)."""
    rows = conv.weight.detach().double().reshape(conv.out_channels, -1)
    centring = rows.abs().amax(1) / (rows.var(1, unbiased=False) + conv.eps).sqrt()
    expected = expected.double().reshape(conv.out_channels, -1)
    bound = units * torch.finfo(got.dtype).eps * (centring + expected.abs().amax(1))
    error = (got.double().reshape(conv.out_channels, -1) - expected).abs().amax(1)
    assert (error <= bound).all(), (error / bound * units).max().item()


@pytest.mark.slow
@FAST
@given(**CONVS)
def test_standardize_weight_matches_timms_layers(kind, out_chs, in_chs, kernel, eps, gamma, seed):
    """Bit for bit timm's layer (code standing in for its forward pass must not move a ReLU's input across 0),
    and within a few float32 ulps of the float64 formula (units of ulp times the row's conditioning)."""
    conv = random_conv(kind, out_chs, in_chs, kernel, eps, gamma, seed)
    ours = standardize_weight(conv.weight, weight_scale(conv), conv.eps)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, timms_weight(conv))
    assert_rows_close(ours, float64_weight(conv), conv, units=64)

    conv = conv.double()
    ours = standardize_weight(conv.weight, weight_scale(conv), conv.eps)
    assert torch.equal(ours, timms_weight(conv))
    assert_rows_close(ours, float64_weight(conv), conv, units=64)


@pytest.mark.slow
@FAST
@given(**CONVS)
def test_standardize_weight_gradients_match_timms_layer(kind, out_chs, in_chs, kernel, eps, gamma, seed):
    conv = random_conv(kind, out_chs, in_chs, kernel, eps, gamma, seed, dtype=torch.float64)
    x = torch.randn(2, in_chs, kernel + 2, kernel + 2, dtype=torch.float64)
    params = list(conv.parameters())
    ours = F.conv2d(x, standardize_weight(conv.weight, weight_scale(conv), conv.eps), conv.bias, padding=conv.padding)
    for got, expected in zip(torch.autograd.grad(ours.square().sum(), params),
                             torch.autograd.grad(conv(x).square().sum(), params), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_weight_statistics():
    conv = random_conv(ScaledStdConv2d, 6, 4, 3, 1e-5, 1.7, seed=0)
    mean, inv_std = weight_statistics(conv.weight, conv.eps)
    rows = conv.weight.detach().double().reshape(6, -1)
    expected = (rows.var(1, unbiased=False) + conv.eps).rsqrt()
    assert inv_std.shape == mean.shape == (6,)
    torch.testing.assert_close(inv_std.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), rows.mean(1), rtol=1e-6, atol=1e-7)
