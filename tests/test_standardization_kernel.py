"""The fused weight-standardisation kernels (normfree.models.standardization_kernel) against the float64 formula,
forward and gradients, and where they are used. Without a GPU they run on CPU tensors in Triton's interpreter
(conftest sets TRITON_INTERPRET=1); the tests marked `cuda` need a GPU."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d

import normfree
from normfree.models import standardization_kernel
from normfree.models.equations import standardize_weight
from normfree.models.standardization import FUSED_STD_CONVS, FusedScaledStdConv2d, standardized_weight
from normfree.models.standardization_kernel import MAX_BLOCK, StandardizeWeight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def interpreted():
    if not standardization_kernel.available():
        pytest.skip("Triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")


def reference(weight, scale, eps):
    """The formula in float64: scale * (W - mean) / sqrt(var + eps) per row, biased variance."""
    rows = weight.double().reshape(weight.shape[0], -1)
    mean = rows.sum(1, keepdim=True) / rows.shape[1]
    variance = (rows - mean).square().sum(1, keepdim=True) / rows.shape[1]
    out = (rows - mean) / (variance + eps).sqrt()
    if scale is not None:
        out = out * scale.double().unsqueeze(1)
    return out.reshape(weight.shape)


def check(shape, with_scale=True, eps=1e-5, dtype=torch.float32, weight_dtype=torch.float32, offset=0.0,
          device="cpu", rtol=2e-5):
    """Forward and both gradients of the kernel against autograd through the float64 formula."""
    weight = (torch.randn(shape, dtype=torch.float64) * 0.1 + offset).to(weight_dtype).to(device).requires_grad_()
    scale = (torch.rand(shape[0], dtype=torch.float64) + 0.5).to(weight_dtype).to(device).requires_grad_() \
        if with_scale else None
    got = StandardizeWeight.apply(weight, scale, eps, dtype)
    assert got.dtype == dtype and got.shape == weight.shape and got.device == weight.device
    inputs = [weight] if scale is None else [weight, scale]
    grad = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    got_grads = torch.autograd.grad(got, inputs, grad)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference(exact[0], exact[1] if with_scale else None, eps)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    atol = rtol * expected.abs().amax().item()
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)
    for got_grad, expected_grad, t in zip(got_grads, expected_grads, inputs, strict=True):
        assert got_grad.dtype == t.dtype
        torch.testing.assert_close(got_grad.double(), expected_grad, rtol=rtol,
                                   atol=rtol * expected_grad.abs().amax().item())


@pytest.mark.parametrize("shape", [(5, 1), (6, 1, 1, 1), (7, 3, 3, 3), (3, 16, 1, 1), (4, 5, 3, 3),
                                   (2, 2 * MAX_BLOCK + 7), (3, 64, 3, 3)],
                         ids=["fan-in 1", "1x1 fan-in 1", "3x3 fan-in 27", "1x1 fan-in 16", "fan-in 45",
                              "several blocks", "3x3 fan-in 576"])
def test_forward_and_gradients_match_the_float64_formula(interpreted, shape):
    check(shape)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2, 10.0])
def test_eps_is_added_to_the_variance(interpreted, eps):
    check((4, 3, 3, 3), eps=eps)


def test_without_scale(interpreted):
    check((6, 4, 3, 3), with_scale=False)


def test_a_mean_large_against_the_spread_keeps_its_precision(interpreted):
    """Statistics shifted by the row's first element: a mean 100x the spread loses no more than a few ulps."""
    check((4, 2 * MAX_BLOCK + 3), offset=10.0, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_is_the_rounded_float32_result(interpreted, dtype):
    """The autocast path: the result cast once, in the kernel; the gradients come back in float32."""
    weight, scale = torch.randn(8, 3, 3, 3, requires_grad=True), torch.rand(8, requires_grad=True)
    got = StandardizeWeight.apply(weight, scale, 1e-5, dtype)
    full = StandardizeWeight.apply(weight, scale, 1e-5, torch.float32)
    assert got.dtype == dtype
    if dtype == torch.float16 or weight.is_cuda:
        assert torch.equal(got, full.to(dtype))
    else:  # Triton's interpreter rounds float32 to bfloat16 toward zero (a GPU rounds to nearest even): one ulp
        torch.testing.assert_close(got, full.to(dtype), rtol=2 ** -7, atol=0)
    check((8, 3, 3, 3), dtype=dtype, rtol=1e-2)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(interpreted, weight_dtype):
    check((6, 2, 3, 3), dtype=weight_dtype, weight_dtype=weight_dtype, rtol=1e-2)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(units=st.integers(1, 9), fan_in=st.integers(1, MAX_BLOCK + 200), with_scale=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-4, 1e-2]))  # eps = 0 with fan-in 1 is 0 / 0, NaN in batch norm too
def test_any_shape(interpreted, units, fan_in, with_scale, eps):
    check((units, fan_in), with_scale=with_scale, eps=eps)


def test_the_cpu_keeps_batch_norm_bit_for_bit():
    """CPU tensors never take the kernels (batch norm is one native kernel each way there, measured faster)."""
    conv = ScaledStdConv2d(4, 6, 3, gamma=1.7, eps=1e-5)
    assert not standardization_kernel.runs_on(conv.weight)
    fused = standardize_weight(conv.weight, (conv.gain * conv.scale).view(-1), conv.eps, fused=True)
    assert torch.equal(fused, standardize_weight(conv.weight, (conv.gain * conv.scale).view(-1), conv.eps))


@pytest.mark.parametrize("base", list(FUSED_STD_CONVS))
def test_fused_convs_are_timms_layers_on_the_cpu(base):
    kwargs = {"gamma": 1.7} if issubclass(base, (ScaledStdConv2d, ScaledStdConv2dSame)) else {}
    timm_conv = base(3, 5, 3, stride=2, eps=1e-5, **kwargs)
    conv = base(3, 5, 3, stride=2, eps=1e-5, **kwargs)
    conv.load_state_dict(timm_conv.state_dict())
    conv.__class__ = FUSED_STD_CONVS[base]
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(conv(x), timm_conv(x))
    scripted = torch.jit.script(conv)
    assert torch.equal(scripted(x), timm_conv(x))


def test_fast_nf_makes_the_convs_fused_and_code_standing_in_for_them_follows(interpreted, monkeypatch):
    """Under the interpreter, routed to the kernel as CUDA tensors are: the fused conv, `standardized_weight` (what
    per-sample AGC's engines and `scaled_output_conv` call) and the kernel agree bit for bit."""
    model = normfree.fast_nf(torch.nn.Sequential(ScaledStdConv2d(3, 4, 3, gamma=1.7, eps=1e-5), torch.nn.ReLU(),
                                                 StdConv2d(4, 2, 1, eps=1e-5)))
    assert [type(m).__name__ for m in model] == ["FusedScaledStdConv2d", "ReLU", "FusedStdConv2d"]
    monkeypatch.setattr(standardization_kernel, "runs_on", lambda weight: True)
    conv = model[0]
    expected = StandardizeWeight.apply(conv.weight, (conv.gain * conv.scale).view(-1), conv.eps, torch.float32)
    assert torch.equal(standardized_weight(conv), expected)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(conv(x), F.conv2d(x, expected, conv.bias, conv.stride, conv.padding))
    torch.testing.assert_close(conv(x), ScaledStdConv2d.forward(conv, x), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert standardized_weight(conv).dtype == torch.bfloat16
    assert type(conv) is FusedScaledStdConv2d


def test_fusion_bakes_a_fused_convs_weight_in_full_precision_under_autocast(interpreted, monkeypatch):
    model = normfree.fast_nf(torch.nn.Sequential(ScaledStdConv2d(3, 4, 3, gamma=1.7, eps=1e-5)))
    monkeypatch.setattr(standardization_kernel, "runs_on", lambda weight: True)
    conv = model[0]
    expected = StandardizeWeight.apply(conv.weight, (conv.gain * conv.scale).view(-1), conv.eps, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = normfree.fuse_standardization(model)[0]
    assert plain.weight.dtype == torch.float32 and torch.equal(plain.weight, expected)


def test_a_kernel_that_fails_warns_once_and_batch_norm_takes_over(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(standardization_kernel, "_failure", [])
    monkeypatch.setattr(StandardizeWeight, "apply", broken)
    monkeypatch.setattr(standardization_kernel, "runs_on", lambda weight: True)
    standardization_kernel.available.cache_clear()
    weight, scale = torch.randn(4, 2, 3, 3), torch.rand(4)
    try:
        with pytest.warns(RuntimeWarning, match="fused weight-standardisation kernel failed here .*no kernel image"):
            got = standardize_weight(weight, scale, 1e-5, fused=True)
        assert torch.equal(got, standardize_weight(weight, scale, 1e-5))
        assert not standardization_kernel.available()
    finally:
        standardization_kernel.available.cache_clear()


@cuda
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (1536, 1536 // 8, 3, 3), (2048, 512, 1, 1), (16, 1)])
def test_on_cuda_against_the_float64_formula(shape):
    check(shape, device="cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_under_autocast_the_conv_gets_the_weight_cast_once(dtype):
    conv = normfree.fast_nf(torch.nn.Sequential(ScaledStdConv2d(8, 16, 3, gamma=1.7, eps=1e-5))).cuda()[0]
    assert type(conv) is FusedScaledStdConv2d
    timm_conv = ScaledStdConv2d(8, 16, 3, gamma=1.7, eps=1e-5).cuda()
    timm_conv.load_state_dict(conv.state_dict())
    x = torch.randn(4, 8, 12, 12, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert standardized_weight(conv).dtype == dtype
        got, expected = conv(x), timm_conv(x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    got.float().square().sum().backward()
    expected.float().square().sum().backward()
    for p, q in zip(conv.parameters(), timm_conv.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2 * q.grad.abs().max().item())
