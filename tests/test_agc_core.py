"""The functional AGC core against the float64 reference, plus invariants (hypothesis)."""
import math
import os

import pytest
import torch
from agc_reference import norm64, reference_agc, reference_unit_norms, units_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normfree
from normfree.agc import cpu_kernel, gpu_kernel

LAYERS = {
    "scalar": lambda: nn.ParameterList([nn.Parameter(torch.randn(()))]),
    "bias_vector": lambda: nn.ParameterList([nn.Parameter(torch.randn(7))]),
    "linear": lambda: nn.Linear(6, 5),
    "conv1d": lambda: nn.Conv1d(3, 4, 5),
    "conv2d": lambda: nn.Conv2d(3, 6, 3),
    "conv3d": lambda: nn.Conv3d(2, 3, (2, 3, 3)),
    "depthwise_conv2d": lambda: nn.Conv2d(4, 4, 3, groups=4),
    "grouped_conv2d": lambda: nn.Conv2d(6, 8, 3, groups=2),
    "embedding": lambda: nn.Embedding(9, 4),
}


@pytest.fixture(autouse=True, params=["fused CPU kernel", "Triton GPU kernel", "torch ops"])
def agc_path(request, monkeypatch):
    """Every test here runs on the three implementations: the fused C kernel, the Triton kernel (on the
    CPU tensors of these tests, in Triton's interpreter) and torch ops."""
    if request.param == "fused CPU kernel":
        assert cpu_kernel.load() is not None, "the fused CPU AGC kernel did not build here"
        return request.param
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    if request.param == "Triton GPU kernel":
        if not gpu_kernel.available():
            pytest.skip("Triton is not installed")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernel runs on these CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
        monkeypatch.setattr(gpu_kernel, "supports", gpu_kernel.clippable)
    return request.param


def give_gradients(module: nn.Module, scale: float = 1.0) -> None:
    """Gradients whose per-unit size spans six decades, so one lambda clips some units and not others."""
    for p in module.parameters():
        per_unit = 10 ** torch.empty(p.shape[0] if p.ndim >= 2 else 1).uniform_(-5, 1)
        unit_shape = (-1,) + (1,) * (p.ndim - 1) if p.ndim >= 1 else ()
        p.grad = (torch.randn_like(p, dtype=torch.float32) * per_unit.reshape(unit_shape) * scale).to(p.dtype)


def check_against_reference(module: nn.Module, clipping: float, eps: float, rtol: float = 1e-5, atol: float = 1e-30):
    params = list(module.parameters())
    expected = [reference_agc(p, p.grad, clipping, eps) for p in params]
    stats = normfree.adaptive_clip_grad_(params, clipping, eps)
    for p, (grad, n_clipped) in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), grad, rtol=rtol, atol=atol)
    assert stats.clipped.tolist() == [n for _, n in expected]
    assert stats.units.tolist() == [len(units_of(p)) for p in params]
    assert stats.nonfinite.tolist() == [0] * len(params)
    return expected


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("clipping", [1e-3, 0.01, 0.16])
def test_matches_float64_reference(layer, clipping):
    module = LAYERS[layer]()
    give_gradients(module)
    check_against_reference(module, clipping, eps=1e-3)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "grouped_conv2d", "embedding"])
def test_reference_case_mixes_clipped_and_untouched_units(layer):
    """Guards the reference test above: at lambda=0.01 some units are clipped and some are not."""
    module = LAYERS[layer]()
    give_gradients(module)
    (_, n_clipped) = reference_agc(module.weight, module.weight.grad, 0.01, 1e-3)
    assert 0 < n_clipped < module.weight.shape[0]


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1e6, 1e15], ids=["tiny", "small", "large", "huge"])
def test_tiny_and_huge_gradients(scale):
    module = nn.Conv2d(3, 5, 3)
    give_gradients(module, scale)
    check_against_reference(module, 0.01, 1e-3, rtol=2e-5)


def test_zero_initialised_parameters_still_get_a_gradient():
    """The eps floor: a zero weight (a skip gain) gets gradient norm lambda * eps, not zero."""
    gain = nn.Parameter(torch.zeros(()))
    weight = nn.Parameter(torch.zeros(4, 3))
    gain.grad, weight.grad = torch.tensor(5.0), torch.randn(4, 3)
    normfree.adaptive_clip_grad_([gain, weight], clipping=0.01, eps=1e-3)
    assert gain.grad.item() == pytest.approx(0.01 * 1e-3, rel=1e-6)
    for row in weight.grad:
        assert norm64(row) == pytest.approx(0.01 * 1e-3, rel=1e-6)


@pytest.mark.parametrize("layer", ["scalar", "bias_vector", "linear", "conv1d", "conv3d", "depthwise_conv2d", "embedding"])
def test_unitwise_norm_is_per_output_unit(layer):
    for p in LAYERS[layer]().parameters():
        norms = normfree.unitwise_norm(p.detach())
        expected = torch.tensor(reference_unit_norms(p), dtype=torch.float64)
        assert norms.ndim == p.ndim and norms.numel() == len(expected)
        torch.testing.assert_close(norms.double().flatten(), expected, rtol=1e-6, atol=0)


def test_linear_rows_not_columns():
    """PyTorch Linear weights are [out, in]: a unit is a row (one output), normed over the fan-in."""
    weight = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert normfree.unitwise_norm(weight).flatten().tolist() == [5.0, 1.0]


def test_parameters_without_gradient_are_skipped():
    layer = nn.Linear(4, 3)
    layer.weight.grad = torch.randn(3, 4) * 10
    stats = normfree.adaptive_clip_grad_(layer.parameters())
    assert layer.bias.grad is None
    assert stats.units.tolist() == [3, 0] and stats.clipped.tolist()[1] == 0


def test_single_tensor_and_fraction():
    p = nn.Parameter(torch.ones(4, 2))
    p.grad = torch.tensor([[10.0, 0], [0.0, 0], [0.0, 0], [10.0, 10]])
    stats = normfree.adaptive_clip_grad_(p, clipping=0.1)
    assert stats.clipped.tolist() == [2] and stats.fraction == 0.5


def test_a_parameter_listed_twice_is_clipped_once():
    layer = nn.Linear(6, 5)
    give_gradients(layer)
    expected, n_clipped = reference_agc(layer.weight, layer.weight.grad, 0.01, 1e-3)
    stats = normfree.adaptive_clip_grad_([layer.weight, layer.bias, layer.weight], 0.01, 1e-3)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-30)
    assert stats.clipped.tolist()[::2] == [n_clipped, n_clipped] and n_clipped > 0


def test_no_gradients_at_all():
    stats = normfree.adaptive_clip_grad_(nn.Linear(2, 2).parameters())
    assert stats.units.tolist() == [0, 0] and stats.fraction == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_any_number_of_clipped_units_per_tensor(dtype, channels_last):
    """0, 1, 4, 5, 15 or 16 of 16 filters clip: rewriting only the clipped rows (few) or the whole
    tensor (many) must give the reference result either way, whatever the gradient's memory layout."""
    convs = nn.ModuleList(nn.Conv2d(3, 16, 3) for _ in range(6)).to(dtype)
    if channels_last:
        convs = convs.to(memory_format=torch.channels_last)
    for conv, n_clipped in zip(convs, [0, 1, 4, 5, 15, 16]):
        size = torch.full((16, 1, 1, 1), 1e-5)
        size[torch.randperm(16)[:n_clipped]] = 10.0
        conv.weight.grad = (torch.randn_like(conv.weight, dtype=torch.float32) * size).to(dtype)
        conv.bias.grad = torch.zeros_like(conv.bias)
        if channels_last:
            conv.weight.grad = conv.weight.grad.contiguous(memory_format=torch.channels_last)
    half = dtype == torch.float16  # clipped elements may land among fp16's subnormals (spacing 6e-8)
    expected = check_against_reference(convs, 0.01, 1e-3, rtol=1e-2 if half else 1e-5, atol=1e-7 if half else 1e-30)
    assert [n for _, n in expected[::2]] == [0, 1, 4, 5, 15, 16]
    assert all(conv.weight.grad.is_contiguous(memory_format=torch.channels_last) == channels_last for conv in convs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    module = nn.Conv2d(3, 6, 3).to(dtype)
    give_gradients(module)
    params = list(module.parameters())
    expected = [reference_agc(p, p.grad, 0.01, 1e-3)[0] for p in params]
    normfree.adaptive_clip_grad_(params)
    for p, grad in zip(params, expected):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-2, atol=1e-6)


def test_non_finite_gradients_are_left_alone_and_counted():
    weight = nn.Parameter(torch.randn(4, 3))
    grad = torch.randn(4, 3) * 100
    grad[0, 1] = math.inf
    grad[1, 2] = math.nan
    weight.grad = grad.clone()
    stats = normfree.adaptive_clip_grad_(weight, clipping=0.01)
    assert torch.equal(weight.grad[0], grad[0])  # no inf * 0 = NaN
    assert torch.equal(weight.grad[1].isnan(), grad[1].isnan())
    assert torch.equal(weight.grad[1][:2], grad[1][:2])
    expected, n_clipped = reference_agc(weight[2:], grad[2:], 0.01, 1e-3)
    torch.testing.assert_close(weight.grad[2:].double(), expected, rtol=1e-5, atol=0)
    assert stats.nonfinite.tolist() == [2] and stats.clipped.tolist() == [n_clipped] == [2]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(clipping=0.0), "clipping"),
        (dict(clipping=-0.01), "clipping"),
        (dict(clipping=math.nan), "clipping"),
        (dict(clipping=math.inf), "clipping"),
        (dict(eps=-1e-3), "eps"),
        (dict(eps=math.nan), "eps"),
        (dict(clipping=True), "clipping"),
        (dict(eps=False), "eps"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, argument):
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number >"):
        normfree.adaptive_clip_grad_(layer.parameters(), **kwargs)


def test_sparse_gradients_are_refused():
    table = nn.Embedding(5, 3, sparse=True)
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        normfree.adaptive_clip_grad_(table.parameters())


# ---- invariants -------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def clipping_cases(draw):
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 10 ** draw(st.floats(-4, 2))
    if draw(st.booleans()):
        weight.zero_()
    grad = torch.randn(shape, generator=generator) * 10 ** draw(st.floats(-6, 4))
    clipping = draw(st.floats(1e-4, 10.0))
    eps = draw(st.sampled_from([0.0, 1e-3, 0.1]))
    return weight, grad, clipping, eps


def clip_once(weight, grad, clipping, eps):
    p = nn.Parameter(weight.clone())
    p.grad = grad.clone()
    normfree.adaptive_clip_grad_(p, clipping, eps)
    return p.grad


# the agc_path fixture chooses the implementation once per test, for all its examples
invariant_settings = settings(max_examples=150, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@invariant_settings
@given(clipping_cases())
def test_unit_norms_are_bounded_after_clipping(case):
    weight, grad, clipping, eps = case
    clipped = clip_once(weight, grad, clipping, eps)
    for w_u, g_u in zip(units_of(weight), units_of(clipped)):
        assert norm64(g_u) <= clipping * max(norm64(w_u), eps) * (1 + 1e-6)


@invariant_settings
@given(clipping_cases())
def test_directions_are_unchanged_and_small_units_untouched(case):
    weight, grad, clipping, eps = case
    clipped = clip_once(weight, grad, clipping, eps)
    for w_u, before, after in zip(units_of(weight), units_of(grad), units_of(clipped)):
        max_norm = clipping * max(norm64(w_u), eps)
        if norm64(before) <= max_norm * (1 - 1e-6):
            assert torch.equal(after, before)
        else:
            scale = norm64(after) / norm64(before)
            # Eq. (3)'s factor, with DeepMind's 1e-6 floor on the gradient norm
            assert scale == pytest.approx(min(1.0, max_norm / max(norm64(before), 1e-6)), rel=1e-5)
            torch.testing.assert_close(after, before * scale, rtol=1e-5, atol=1e-30)


@invariant_settings
@given(clipping_cases())
def test_clipping_twice_changes_nothing(case):
    """Holds for every unit whose threshold is >= 1e-6; below it see the next test."""
    weight, grad, clipping, eps = case
    once = clip_once(weight, grad, clipping, eps)
    twice = clip_once(weight, once, clipping, eps)
    for w_u, once_u, twice_u in zip(units_of(weight), units_of(once), units_of(twice)):
        if clipping * max(norm64(w_u), eps) >= 1e-6:
            torch.testing.assert_close(twice_u, once_u, rtol=1e-6, atol=1e-30)


def test_paper_floor_on_the_gradient_norm_below_1e_6():
    """Eq. (3) as DeepMind wrote it divides by max(||G_u||, 1e-6): a threshold below 1e-6 over-clips."""
    p = nn.Parameter(torch.zeros(()))
    p.grad = torch.tensor(5e-7)
    normfree.adaptive_clip_grad_(p, clipping=1e-4, eps=1e-3)  # threshold 1e-7 < ||G|| = 5e-7 < 1e-6
    assert p.grad.item() == pytest.approx(5e-7 * 1e-7 / 1e-6, rel=1e-6)


def test_a_gain_stored_as_o111_is_one_unit_as_in_deepmind_and_optax():
    """Weight ones(2,1,1,1), gradient [1, 0], lambda 0.5: ||W|| = sqrt(2), so the one unit's gradient norm 1 is
    cut to 0.5 * sqrt(2) = 0.7071 (optax gives [0.707, 0]; clipping each element alone would give [0.5, 0])."""
    gain = nn.Parameter(torch.ones(2, 1, 1, 1))
    gain.grad = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    stats = normfree.adaptive_clip_grad_(gain, clipping=0.5)
    torch.testing.assert_close(gain.grad.flatten(), torch.tensor([math.sqrt(0.5), 0.0]))
    assert stats.units.tolist() == [1] and stats.clipped.tolist() == [1]
    assert normfree.unitwise_norm(gain).shape == (1, 1, 1, 1)
    matrix = torch.ones(5, 1)  # an [O, 1] matrix is one unit too; [1, O] is one row anyway
    torch.testing.assert_close(normfree.unitwise_norm(matrix), torch.full((1, 1), math.sqrt(5.0)))


def test_zero_size_parameters_have_no_units_and_are_left_alone():
    empty_rows, empty_units = nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.zeros(3, 0))
    empty_rows.grad, empty_units.grad = torch.zeros(0, 3), torch.zeros(3, 0)
    stats = normfree.adaptive_clip_grad_([empty_rows, empty_units])
    assert stats.units.tolist() == [0, 3] and stats.clipped.tolist() == [0, 0]


def test_integer_tensors_are_refused_naming_the_parameter():
    counts = torch.zeros(4, 3, dtype=torch.long)
    counts.grad = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(4, 3\) is torch.int64"):
        normfree.adaptive_clip_grad_([nn.Parameter(torch.randn(2)), counts])


def test_a_new_tensor_in_the_storage_of_a_freed_one_is_clipped_by_its_own_shape():
    """Shapes are part of the per-list cache key: a freed (4, 3) parameter's id and storage can be reused by a
    (4, 1)-shaped one, which is one unit, not four."""
    for shape in [(4, 3), (12, 1), (4, 3), (3, 4), (12,)]:
        p = nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape) * 100
        expected, n_clipped = reference_agc(p, p.grad, 0.01, 1e-3)
        stats = normfree.adaptive_clip_grad_(p)
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-30)
        assert stats.units.tolist() == [len(units_of(p))] and stats.clipped.tolist() == [n_clipped]
        del p
