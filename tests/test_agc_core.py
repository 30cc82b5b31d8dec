"""The functional AGC core against the float64 reference, plus invariants (hypothesis)."""
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import normfree
from agc_reference import norm64, reference_agc, reference_unit_norms, units_of
from normfree.agc import clip as agc_clip
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
    for p, (grad, _) in zip(params, expected):
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


@pytest.mark.parametrize("layer", ["scalar", "bias_vector", "linear", "conv1d", "conv3d", "depthwise_conv2d",
                                   "embedding"])
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


@pytest.mark.slow
@invariant_settings
@given(clipping_cases())
def test_unit_norms_are_bounded_after_clipping(case):
    weight, grad, clipping, eps = case
    clipped = clip_once(weight, grad, clipping, eps)
    for w_u, g_u in zip(units_of(weight), units_of(clipped)):
        assert norm64(g_u) <= clipping * max(norm64(w_u), eps) * (1 + 1e-6)


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- layouts the per-call cache must tell apart ------------------------------------------------

def _view(buffer: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A view of `shape` into `buffer` (twice the size needed, and then some) in one memory layout; all but
    "offset" start at the buffer's first element, so they share its data pointer."""
    numel = math.prod(shape)
    if layout == "contiguous":
        return buffer[:numel].view(shape)
    if layout == "offset":
        return buffer[3:3 + numel].view(shape)
    if layout == "transposed":  # rows strided, elements of a row numel / rows apart
        return buffer[:numel].view(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "channels_last":
        return buffer[:numel].view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    if layout == "every_other_channel":  # a slice: rows twice as far apart as their size
        return buffer[:2 * numel].view(shape[0], 2 * shape[1], *shape[2:])[:, :shape[1]]
    raise AssertionError(layout)


LAYOUTS = {2: ["contiguous", "offset", "transposed", "every_other_channel"],
           4: ["contiguous", "offset", "transposed", "channels_last", "every_other_channel"]}


@st.composite
def layout_sequences(draw):
    shape = draw(st.sampled_from([(5, 3), (4, 4), (6, 2, 3, 3), (3, 4, 2, 1)]))
    step = st.tuples(st.sampled_from(LAYOUTS[len(shape)]), st.sampled_from(LAYOUTS[len(shape)]), st.integers(0, 999))
    return shape, draw(st.lists(step, min_size=2, max_size=4))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(layout_sequences())
@example(((5, 3), [("contiguous", "contiguous", 0), ("contiguous", "transposed", 1)]))  # the case
@example(((6, 2, 3, 3), [("contiguous", "contiguous", 0), ("channels_last", "every_other_channel", 1)]))
def test_a_parameter_whose_layout_changes_between_calls_is_clipped_by_its_new_layout(case):
    """The per-call cache must not keep the plan of an earlier layout: ``p.grad = b; clip; p.grad = b.t(); clip``
    has the same parameter, data pointer, shape and dtype, but other strides (the units are not b's rows)."""
    shape, steps = case
    weights, grads = torch.empty(2 * math.prod(shape) + 3), torch.empty(2 * math.prod(shape) + 3)
    p = nn.Parameter(torch.empty(shape))
    for weight_layout, grad_layout, seed in steps:
        generator = torch.Generator().manual_seed(seed)
        p.data = _view(weights, shape, weight_layout)
        p.data.copy_(torch.randn(shape, generator=generator))
        p.grad = _view(grads, shape, grad_layout)
        per_unit = 10 ** (torch.rand(shape[0], generator=generator) * 4 - 3)
        p.grad.copy_(torch.randn(shape, generator=generator) * per_unit.view(-1, *[1] * (len(shape) - 1)))
        expected, n_clipped = reference_agc(p, p.grad, 0.01, 1e-3)
        stats = normfree.adaptive_clip_grad_(p, 0.01, 1e-3)
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-30)
        assert stats.clipped.tolist() == [n_clipped]


# ---- non-finite weights ------------------------------------------------------------------------

@pytest.mark.bad_input
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_weight_row_leaves_its_gradient_unchanged_counted_and_warned_once(bad, monkeypatch):
    monkeypatch.setattr(agc_clip, "_warned_nonfinite_weights", set())
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight[1, 2] = bad
    layer.weight.grad = torch.randn(4, 3) * 100
    layer.bias.grad = torch.randn(4)
    grad = layer.weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"weights with an inf or NaN unit norm: weight \(1 of 4 units\).*leaves "
                                            r"their gradients unchanged"):
        stats = normfree.adaptive_clip_grad_(layer.named_parameters(), clipping=0.01)
    assert torch.equal(layer.weight.grad[1], grad[1])
    rows = [0, 2, 3]
    expected, n_clipped = reference_agc(layer.weight[rows], grad[rows], 0.01, 1e-3)
    torch.testing.assert_close(layer.weight.grad[rows].double(), expected, rtol=1e-5, atol=0)
    assert stats.nonfinite.tolist() == [1, 0] and stats.clipped.tolist()[0] == n_clipped == 3
    with warnings.catch_warnings():  # once per parameter
        warnings.simplefilter("error")
        again = normfree.adaptive_clip_grad_(layer.named_parameters(), clipping=0.01)
    assert again.nonfinite.tolist() == [1, 0]


def test_a_non_finite_gradient_alone_gives_no_weight_warning(monkeypatch):
    monkeypatch.setattr(agc_clip, "_warned_nonfinite_weights", set())
    p = nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    p.grad[2, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert normfree.adaptive_clip_grad_(p).nonfinite.tolist() == [1]


# ---- what clipping, eps and parameters may be --------------------------------------------------

@pytest.mark.parametrize("clipping", [np.float32(0.05), np.float64(0.05), torch.tensor(0.05), torch.tensor([0.05]),
                                      torch.tensor(0.05, dtype=torch.float64)],
                         ids=["numpy_float32", "numpy_float64", "tensor_0d", "tensor_1_element", "tensor_float64"])
def test_numpy_scalars_and_one_element_tensors_are_numbers(clipping):
    module = LAYERS["conv2d"]()
    give_gradients(module)
    check_against_reference(module, float(clipping), eps=1e-3)  # the reference, with clipping as a float ...
    give_gradients(module)
    params = list(module.parameters())
    expected = [reference_agc(p, p.grad, float(clipping), np.float32(1e-3).item()) for p in params]
    stats = normfree.adaptive_clip_grad_(params, clipping, np.float32(1e-3))  # ... and as given
    for p, (grad, _) in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-5, atol=1e-30)
    assert stats.clipped.tolist() == [n for _, n in expected]


def test_named_parameters_param_groups_and_generators_are_parameters():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Linear(4, 5))
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}],
                                lr=0.1)
    conv, linear = list(model[0].parameters()), list(model[1].parameters())
    for given_as, covered in [(model.named_parameters, conv + linear), (lambda: optimizer.param_groups, conv + linear),
                              (lambda: optimizer.param_groups[1], linear), (model.parameters, conv + linear),
                              (lambda: model[1].weight, linear[:1])]:
        give_gradients(model)
        expected = [reference_agc(p, p.grad, 0.01, 1e-3) for p in covered]
        stats = normfree.adaptive_clip_grad_(given_as(), 0.01, 1e-3)
        for p, (grad, _) in zip(covered, expected):
            torch.testing.assert_close(p.grad.double(), grad, rtol=1e-5, atol=1e-30)
        assert stats.clipped.tolist() == [n for _, n in expected]


class TestRefusals:
    """Bad arguments are refused before any implementation is chosen: run once, not once per implementation."""

    @pytest.fixture(autouse=True)
    def agc_path(self):  # overrides the module's three-way fixture
        return "any"

    @pytest.mark.bad_input
    @pytest.mark.parametrize("clipping, shown", [
        ("0.01", r"got '0.01' \(str\): pass one number, e.g. clipping=0.01"),
        (torch.tensor([0.01, 0.02]), r"got a torch.float32 tensor of shape \(2,\): pass one number"),
        (torch.tensor(True), r"got a torch.bool tensor of shape \(\)"),
        (np.float32(-0.01), rf"got {re.escape(repr(np.float32(-0.01)))}$"),
        (torch.tensor(math.nan), r"got tensor\(nan\)$"),
        (None, r"got None \(NoneType\)"),
    ], ids=["string", "two_element_tensor", "bool_tensor", "negative_numpy", "nan_tensor", "none"])
    def test_clipping_that_is_not_one_number_in_range_is_refused_as_given(self, clipping, shown):
        layer = nn.Linear(2, 2)
        with pytest.raises(ValueError, match=rf"^clipping must be a finite number > 0 \(the paper's lambda, e.g. "
                                             rf"0.01\), {shown}"):
            normfree.adaptive_clip_grad_(layer.parameters(), clipping)

    @pytest.mark.bad_input
    @pytest.mark.parametrize("parameters, shown", [
        (lambda m: [list(m.parameters())], r"item 0 is a nested list or tuple \(pass one flat iterable"),
        (lambda m: m, r"got Linear: pass module.parameters\(\)"),
        (lambda m: m.state_dict(), r"got a mapping without 'params' \(keys: 'weight', 'bias'\)"),
        (lambda m: [m.weight, "bias"], r"item 1 is a str"),
        (lambda m: 0.5, r"got float"),
        (lambda m: [{"params": [m.weight, 3]}], r"item 0 is a param group whose 'params' holds a int"),
        (lambda m: "weight", r"got str"),
    ], ids=["nested_list", "module", "state_dict", "string_item", "number", "bad_param_group", "string"])
    def test_parameters_in_other_forms_are_refused_naming_what_is_accepted(self, parameters, shown):
        layer = nn.Linear(2, 2)
        layer(torch.randn(1, 2)).sum().backward()
        with pytest.raises(TypeError, match=r"^adaptive_clip_grad_'s parameters must be a tensor, or an iterable of "
                                            rf"tensors .*named_parameters.*param_groups.*{shown}"):
            normfree.adaptive_clip_grad_(parameters(layer))
