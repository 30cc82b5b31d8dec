"""The Triton AGC kernel: tile shapes, layouts, mixed dispatch and the per-call cache, against the float64
reference. Without a GPU it runs on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
the tests marked `cuda` need a GPU. (test_agc_core.py runs every core test on this kernel too.)"""
import os
import warnings

import pytest
import torch
from torch import nn

import normfree
from agc_reference import reference_agc
from normfree.agc import cpu_kernel, gpu_kernel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def on_cpu_tensors(monkeypatch):
    """Route CPU tensors to the Triton kernel (interpreted), as CUDA tensors are routed in production."""
    if not gpu_kernel.available():
        pytest.skip("Triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel runs on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    monkeypatch.setattr(gpu_kernel, "supports", gpu_kernel.clippable)


def parameter(shape, dtype=torch.float32, grad_dtype=None, channels_last=False, spread=(-5.0, 1.0)):
    """A parameter whose units' gradient sizes span `spread` decades, so some clip and some do not."""
    p = nn.Parameter(torch.randn(shape).to(dtype))
    if grad_dtype not in (None, dtype):
        if not hasattr(p, "grad_dtype"):
            pytest.skip("this torch refuses a gradient of another dtype than its parameter")
        p.grad_dtype = None  # allow it (fastai's and torch's fp16 master-weight set-ups have had such pairs)
    per_unit = 10 ** torch.empty(shape[0] if len(shape) >= 2 else 1).uniform_(*spread)
    p.grad = (torch.randn(shape) * per_unit.reshape((-1,) + (1,) * (len(shape) - 1) if shape else ())).to(
        grad_dtype or dtype)
    if channels_last:
        p.data = p.data.contiguous(memory_format=torch.channels_last)
        p.grad = p.grad.contiguous(memory_format=torch.channels_last)
    return p


def check(params, clipping=0.01, eps=1e-3, rtol=1e-5, atol=1e-30):
    expected = [reference_agc(p, p.grad, clipping, eps) if p.grad is not None else (None, 0) for p in params]
    layouts = [p.grad.stride() for p in params if p.grad is not None]
    stats = normfree.adaptive_clip_grad_(params, clipping, eps)
    for p, (grad, _) in zip(params, expected):
        if grad is not None:
            torch.testing.assert_close(p.grad.double(), grad, rtol=rtol, atol=atol)
    assert [p.grad.stride() for p in params if p.grad is not None] == layouts
    assert stats.clipped.tolist() == [n for _, n in expected]
    return stats


@pytest.mark.parametrize("unit_size", [1, 9, 16, 17, 128, 129, 1024, 1025, 2048, 4097])
def test_every_tile_shape_and_units_spanning_several_loads(on_cpu_tensors, unit_size):
    # 37 units: several programs per tensor, the last one partly past the tensor's end
    check([parameter((37, unit_size))])


def test_all_tile_shapes_in_one_call_with_single_unit_tensors(on_cpu_tensors):
    params = [parameter(s) for s in [(), (1,), (300,), (3000,), (40, 3, 3, 3), (8, 1, 3, 3), (6, 700), (2, 5000)]]
    stats = check(params)
    assert stats.units.tolist() == [1, 1, 1, 1, 40, 8, 6, 2]


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_half_precision_and_mixed_weight_gradient_dtypes(on_cpu_tensors, dtype, grad_dtype):
    params = [parameter((24, 5, 3, 3), dtype, grad_dtype), parameter((24,), dtype, grad_dtype)]
    check(params, rtol=1e-2, atol=1e-6)
    assert all(p.grad.dtype == grad_dtype for p in params)


def test_channels_last_weights_and_gradients(on_cpu_tensors):
    params = [parameter((16, 8, 3, 3), channels_last=True), parameter((5, 4, 2, 3), channels_last=True)]
    check(params)
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last) for p in params)


def test_layouts_the_kernel_cannot_take_go_through_torch_ops_in_the_same_call(on_cpu_tensors):
    transposed = nn.Parameter(torch.randn(12, 7))
    transposed.grad = (torch.randn(7, 12) * 10).t()  # rows of the gradient are not dense blocks
    doubles = parameter((9, 4), dtype=torch.float64)
    assert not gpu_kernel.clippable(transposed) and not gpu_kernel.clippable(doubles)
    check([parameter((10, 6)), transposed, doubles, parameter((3,))])


def test_zero_size_and_gradient_free_parameters(on_cpu_tensors):
    empty, unused = parameter((0, 4)), nn.Parameter(torch.randn(3, 3))
    stats = check([parameter((6, 2)), empty, unused])
    assert stats.units.tolist() == [6, 0, 0]


def test_listed_twice_reports_the_same_counts_and_clips_once(on_cpu_tensors):
    p = parameter((20, 6), spread=(1.0, 2.0))  # every unit clips
    expected, n_clipped = reference_agc(p, p.grad, 0.01, 1e-3)
    stats = normfree.adaptive_clip_grad_([p, parameter((2,)), p], 0.01)
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=0)
    assert stats.clipped.tolist()[::2] == [n_clipped, n_clipped] == [20, 20]


def test_new_gradients_each_step_are_clipped_not_stale_ones(on_cpu_tensors):
    """The per-call cache keys on storage: gradients replaced (zero_grad(set_to_none=True)) must be the ones clipped."""
    layer = nn.Linear(30, 10)
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        (layer(torch.randn(4, 30)) * 1e3).sum().backward()
        check(list(layer.parameters()))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_cuda_against_the_reference(dtype):
    params = [parameter(s, dtype) for s in [(64, 32, 3, 3), (64,), (10, 2000), (128, 1, 3, 3)]]
    for p in params:
        p.data, p.grad = p.data.cuda(), p.grad.cuda()
    half = dtype != torch.float32
    check(params, rtol=1e-2 if half else 1e-5, atol=1e-6 if half else 1e-30)


@cuda
def test_on_cuda_no_host_synchronisation_and_graph_capture():
    params = [parameter(s) for s in [(64, 32, 3, 3), (64,), (10, 2000)]]
    for p in params:
        p.data, p.grad = p.data.cuda(), p.grad.cuda()
    saved = [p.grad.clone() for p in params]
    expected = [reference_agc(p, g, 0.01, 1e-3) for p, g in zip(params, saved)]
    normfree.adaptive_clip_grad_(params)  # the first call builds the kernel's tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p, g in zip(params, saved):
            p.grad.copy_(g)
        normfree.adaptive_clip_grad_(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = normfree.adaptive_clip_grad_(params)
    for p, g in zip(params, saved):
        p.grad.copy_(g)
    graph.replay()
    for p, (grad, _) in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-5, atol=1e-30)
    assert stats.clipped.tolist() == [n for _, n in expected]


@cuda
def test_on_cuda_calls_replayed_from_the_plans_graph_clip_each_new_gradient_and_keep_earlier_counts():
    """The first call launches directly, the second captures the launches and replays them, later ones replay:
    each clips the gradients written into the same storage since, and the counts returned earlier stay as they were."""
    params = [parameter(s) for s in [(64, 32, 3, 3), (64,), (10, 2000)]]
    for p in params:
        p.data, p.grad = p.data.cuda(), p.grad.cuda()
    kept = []
    for call in range(4):
        for p in params:  # new values, same storage: the plan (and its graph) stay valid
            p.grad.copy_(torch.randn_like(p.grad) * 10.0 ** (call - 2))
        expected = [reference_agc(p, p.grad, 0.01, 1e-3) for p in params]
        stats = normfree.adaptive_clip_grad_(params)
        for p, (grad, _) in zip(params, expected):
            torch.testing.assert_close(p.grad.double(), grad, rtol=1e-5, atol=1e-30)
        kept.append((stats, [n for _, n in expected]))
    assert [stats.clipped.tolist() for stats, _ in kept] == [counts for _, counts in kept]
    assert len({tuple(counts) for _, counts in kept}) > 1  # the calls' counts differ, so aliasing would show


@cuda
def test_on_cuda_a_whole_step_captured_with_gradients_first_allocated_in_the_capture():
    """zero_grad(set_to_none=True) inside a captured step: the gradients AGC sees in the capture are new tensors of
    the graph's pool, so its tables are made in the capture (from pinned memory) and replayed with the step."""
    model = nn.Linear(300, 40).cuda()
    x = torch.randn(8, 300, device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        (model(x) * 100).square().sum().backward()
        return normfree.adaptive_clip_grad_(list(model.parameters()))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    twin = nn.Linear(300, 40).cuda()
    twin.load_state_dict(model.state_dict())
    (twin(x) * 100).square().sum().backward()
    expected = [reference_agc(p, p.grad, 0.01, 1e-3) for p in twin.parameters()]
    for p, (grad, _) in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad.double(), grad, rtol=1e-4, atol=1e-30)
    assert stats.clipped.tolist() == [n for _, n in expected] and sum(n for _, n in expected) > 0


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.mark.parametrize("capture_fails", [False, True])
def test_a_plans_calls_launch_then_capture_then_replay_or_launch_when_capture_fails(monkeypatch, capture_fails):
    """`clip_`'s sequence on a CUDA plan, with the launches and the capture stood in for: the first call launches
    (and compiles), the second captures and replays, later ones replay; a refused capture warns once and every
    call launches directly. Other arguments (another lambda) start their own sequence."""
    launches, graph = [], _FakeGraph()
    counts = torch.zeros(2, 3, dtype=torch.int32)

    def captured(*args):
        if capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph, counts

    monkeypatch.setattr(gpu_kernel, "_launch", lambda *args: launches.append(args[2]) or counts)
    monkeypatch.setattr(gpu_kernel, "_captured", captured)
    monkeypatch.setattr(gpu_kernel, "_graph_failure", [])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    plan = gpu_kernel.Plan(torch.device("cuda"), [])
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for clipping in (0.01, 0.01, 0.01, 0.01, 0.02):
            assert gpu_kernel.clip_(plan, 3, clipping, 1e-3, 1e-6) is counts
    refused = [w for w in warned if "could not be captured" in str(w.message)]
    if capture_fails:
        assert launches == [0.01] * 4 + [0.02] and graph.replays == 0 and len(refused) == 1
    else:
        assert launches == [0.01, 0.02] and graph.replays == 3 and not refused


def test_a_kernel_that_fails_to_build_warns_once_and_torch_ops_take_over(on_cpu_tensors, monkeypatch):
    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX assembly failed")
            return launch

    monkeypatch.setattr(gpu_kernel, "_clip_units", Unbuildable())
    monkeypatch.setattr(gpu_kernel, "_failure", [])
    gpu_kernel.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
            check([parameter((12, 5)), parameter((7,))])
        assert not gpu_kernel.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the kernel is not tried again: no second warning
            check([parameter((12, 5))])
    finally:
        gpu_kernel.available.cache_clear()
