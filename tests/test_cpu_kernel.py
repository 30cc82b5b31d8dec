"""The fused CPU kernel's build, cache, fallback and dispatch (its results are checked against the
float64 reference by every test in test_agc_core.py, which runs on both implementations)."""
import threading
import warnings

import pytest
import torch
from torch import nn

import normfree
from agc_reference import reference_agc
from normfree.agc import clip as agc_module
from normfree.agc import cpu_kernel


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no kernel loaded yet; the process's own kernel is restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernel.load.cache_clear()
    yield tmp_path / "normfree"
    cpu_kernel.load.cache_clear()


def layer_with_gradients(shape=(64, 32)):
    p = nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape) * torch.logspace(-5, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    return p


def assert_matches_reference(params, grads_before, stats, clipping=0.01, eps=1e-3):
    for p, grad, clipped in zip(params, grads_before, stats.clipped.tolist()):
        expected, n_clipped = reference_agc(p, grad, clipping, eps)
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-2 if p.dtype == torch.float16 else 1e-5,
                                   atol=1e-7)
        assert clipped == n_clipped


def test_built_once_into_the_cache_and_reused(fresh_cache):
    assert cpu_kernel.load() is not None
    (built,) = fresh_cache.glob("agc_cpu-*.so")
    stamp = built.stat().st_mtime_ns
    cpu_kernel.load.cache_clear()
    assert cpu_kernel.load() is not None
    assert list(fresh_cache.glob("*")) == [built] and built.stat().st_mtime_ns == stamp


def test_builds_running_at_once_leave_one_valid_library(fresh_cache):
    compiler, flags = cpu_kernel._compiler(), cpu_kernel._FLAG_SETS[0]
    results, errors = [], []

    def build():
        try:
            results.append(cpu_kernel._build(compiler, flags))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert [path.name for path in fresh_cache.iterdir()] == [results[0].name]  # no partial files left
    p = layer_with_gradients()
    before = p.grad.clone()
    assert_matches_reference([p], [before], normfree.adaptive_clip_grad_(p))


def test_without_a_compiler_agc_warns_once_and_uses_torch_ops(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    params = [layer_with_gradients(), layer_with_gradients((8,))]
    before = [p.grad.clone() for p in params]
    with pytest.warns(RuntimeWarning, match=r"could not build its fused CPU AGC kernel.*/nonexistent/cc.*set CC"):
        stats = normfree.adaptive_clip_grad_(params)
    assert_matches_reference(params, before, stats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normfree.adaptive_clip_grad_(params)
    assert not fresh_cache.exists() or not list(fresh_cache.glob("*.so"))


def test_switched_off_by_environment_without_a_warning(fresh_cache, monkeypatch):
    monkeypatch.setenv("NORMFREE_CPU_KERNEL", "0")
    p = layer_with_gradients()
    before = p.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = normfree.adaptive_clip_grad_(p)
    assert cpu_kernel.load() is None and not fresh_cache.exists()
    assert_matches_reference([p], [before], stats)


def test_kernel_takes_contiguous_float_cpu_tensors_and_torch_ops_the_rest(monkeypatch):
    taken_by_torch_ops = []
    torch_ops = agc_module.clip_with_torch_ops

    def spy(params, clipping, eps):
        taken_by_torch_ops.extend(params)
        return torch_ops(params, clipping, eps)

    monkeypatch.setattr(agc_module, "clip_with_torch_ops", spy)
    plain = layer_with_gradients()
    double = nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    double.grad = torch.randn(16, 8, dtype=torch.float64)
    half = nn.Parameter(torch.randn(16, 8).half())
    half.grad = (torch.randn(16, 8) * torch.logspace(-3, 1, 16).view(-1, 1)).half()
    channels_last = nn.Parameter(torch.randn(16, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    channels_last.grad = torch.randn(16, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    transposed = nn.Parameter(torch.randn(8, 16).t())  # a non-contiguous parameter
    transposed.grad = torch.randn(16, 8)
    no_grad = nn.Parameter(torch.randn(4, 4))
    gain = layer_with_gradients((7,))
    params = [plain, half, double, no_grad, channels_last, transposed, gain]
    before = [p.grad.clone() if p.grad is not None else None for p in params]
    stats = normfree.adaptive_clip_grad_(params)
    assert [id(p) for p in taken_by_torch_ops] == [id(half), id(channels_last), id(transposed)]
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    assert_matches_reference([params[i] for i in with_grad], [before[i] for i in with_grad],
                             type(stats)(stats.clipped[with_grad], stats.nonfinite[with_grad], stats.units[with_grad]))
    assert stats.units.tolist() == [64, 16, 16, 0, 16, 16, 1] and stats.clipped[3] == 0
    assert stats.clipped.dtype == stats.nonfinite.dtype == torch.long


def test_result_does_not_depend_on_the_thread_count():
    """Large enough (> 65536 elements) for the kernel to use its threads."""
    p = layer_with_gradients((512, 300))
    before = p.grad.clone()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p.grad = before.clone()
            results.append((p.grad, normfree.adaptive_clip_grad_(p).clipped.item()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] > 0
    expected, n_clipped = reference_agc(p, before, 0.01, 1e-3)
    torch.testing.assert_close(results[0][0].double(), expected, rtol=1e-5, atol=0)
