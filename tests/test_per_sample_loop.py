"""Per-sample AGC in a plain PyTorch loop (`normfree.agc.per_sample_agc`), against the float64 loop over examples."""
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agc_reference import per_example_clipping
from normfree.agc import per_sample_agc

CLIPPING = 0.01


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def linear_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))


def batch(model_name):
    generator = torch.Generator().manual_seed(1)
    shape = (6, 3, 13, 13) if model_name == "conv" else (6, 10)
    return torch.randn(*shape, generator=generator) * 2, torch.randint(0, 5, (6,), generator=generator)


MODELS = {"conv": conv_net, "linear": linear_net}
# (the exclude argument, the names it leaves unclipped with the classifier weight)
EXCLUSIONS = {"classifier weight only": ((), {"5.weight", "4.weight"}),
              "a module and a pattern": (lambda model: [model[0], "*.bias"], None)}


def grads(model):
    return {n: p.grad.double() for n, p in model.named_parameters()}


def assert_close_to(got, reference):
    for n in reference:  # every parameter, not only the large ones
        assert (got[n] - reference[n]).norm() <= 1e-5 * reference[n].norm() + 1e-12, n


def unclipped_names(model, exclusion):
    exclude, names = EXCLUSIONS[exclusion]
    if names is not None:
        return exclude, {n for n in names if n in dict(model.named_parameters())}
    exclude = exclude(model)
    classifier = [n for n, _ in model.named_parameters()][-2]
    return exclude, {classifier, "0.weight"} | {n for n, _ in model.named_parameters() if n.endswith(".bias")}


@pytest.mark.parametrize("exclusion", list(EXCLUSIONS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_one_step_equals_the_loop_over_examples(model_name, exclusion):
    model, (x, y) = MODELS[model_name]().train(), batch(model_name)
    exclude, unclipped = unclipped_names(model, exclusion)
    reference, clipped, units = per_example_clipping(model, x, y, F.cross_entropy, CLIPPING,
                                                     unclipped_names=unclipped)
    with per_sample_agc(model, F.cross_entropy, clipping=CLIPPING, exclude=exclude) as agc:
        agc.loss(model(x), y).backward()
        stats = agc.stats()
    assert_close_to(grads(model), reference)
    assert set(agc.parameter_names) == {n for n, _ in model.named_parameters()} - unclipped
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units) and clipped > 0  # exercised


@pytest.mark.parametrize("model_name", list(MODELS))
def test_accumulated_micro_batches_of_a_scaled_loss_clip_the_unscaled_per_example_gradients(model_name):
    """Two micro-batches, each loss divided by 2 (accumulation) and multiplied by 1024 (a grad scaler's scale): the
    summed gradient, divided by 1024, is the loop's mean over the 6 examples."""
    model, (x, y) = MODELS[model_name]().train(), batch(model_name)
    reference, clipped, units = per_example_clipping(model, x, y, F.cross_entropy, CLIPPING)
    with per_sample_agc(model, F.cross_entropy, clipping=CLIPPING) as agc:
        for half in (slice(0, 3), slice(3, 6)):
            (agc.loss(model(x[half]), y[half]) / 2 * 1024).backward()
        stats = agc.stats()
    assert_close_to({n: g / 1024 for n, g in grads(model).items()}, reference)
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units)


def test_a_summed_loss_gives_the_sum_of_clipped_gradients():
    model, (x, y) = linear_net().train(), batch("linear")
    reference, _, _ = per_example_clipping(model, x, y, F.cross_entropy, CLIPPING)
    with per_sample_agc(model, partial(F.cross_entropy, reduction="sum"), clipping=CLIPPING) as agc:
        agc.loss(model(x), y).backward()
    assert_close_to(grads(model), {n: g * len(x) for n, g in reference.items()})


def _state(model):
    return [(dict(m.__dict__.get("_parameters")), sorted(k for k in m.__dict__ if not k.startswith("_")),
             len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_removal_restores_the_model_exactly(model_name):
    """After remove(), even one that leaves a `with` block on an error, the model holds no patch and no hook, and
    its gradient is the ordinary (unclipped) one."""
    model, (x, y) = MODELS[model_name]().train(), batch(model_name)
    before = _state(model)
    with pytest.raises(KeyError), per_sample_agc(model, F.cross_entropy, clipping=CLIPPING) as agc:
        agc.loss(model(x), y).backward()
        raise KeyError("the loop failed")
    assert _state(model) == before and all("forward" not in m.__dict__ for m in model.modules())
    torch.manual_seed(0)
    plain = MODELS[model_name]().train()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_the_plain_loop_api_loads_no_fastai():
    code = ("import sys, torch, torch.nn.functional as F; from normfree.agc import per_sample_agc; "
            "m = torch.nn.Linear(4, 3); h = per_sample_agc(m, F.cross_entropy, skip_classifier=None); "
            "h.loss(m(torch.randn(2, 4)), torch.tensor([0, 1])).backward(); h.remove(); "
            "assert not any(n.split('.')[0] == 'fastai' for n in sys.modules), 'fastai loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.bad_input
def test_a_backward_pass_of_a_loss_not_computed_by_the_handle_is_refused():
    model, (x, y) = linear_net().train(), batch("linear")
    with per_sample_agc(model, F.cross_entropy, clipping=CLIPPING) as agc:
        agc.loss(model(x), y).backward()  # a first batch through the handle: the next must not reuse its scale
        with pytest.raises(RuntimeError, match=r"agc.loss\(pred, \*targets\)"):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.bad_input
def test_installing_twice_on_one_model_is_refused():
    model = linear_net()
    with per_sample_agc(model, F.cross_entropy):
        with pytest.raises(ValueError, match="replaced already"):
            per_sample_agc(model, F.cross_entropy)


@pytest.mark.bad_input
def test_a_model_switched_to_batchnorm_training_is_refused_at_the_forward_pass():
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)).eval()
    x, y = batch("linear")
    with per_sample_agc(model, F.cross_entropy) as agc:
        agc.loss(model(x), y).backward()  # BatchNorm in eval mode: an affine map, examples independent
        model.train()
        with pytest.raises(ValueError, match="BatchNorm layers in training mode"):
            model(x)


@pytest.mark.bad_input
def test_a_loss_that_is_neither_a_mean_nor_a_sum_is_refused():
    model, (x, y) = linear_net().train(), batch("linear")
    weighted = lambda pred, target: F.cross_entropy(pred, target) * len(pred) ** 0.5  # noqa: E731
    with per_sample_agc(model, weighted) as agc, pytest.raises(ValueError, match="mean or the sum"):
        agc.loss(model(x), y)


@pytest.mark.bad_input
@pytest.mark.parametrize("arguments, error, match", [
    (dict(loss_func="cross_entropy"), TypeError, "loss_func must be the loss function"),
    (dict(clipping=0), ValueError, "clipping"),
    (dict(exclude="stem.*"), ValueError, "matches no parameter"),
], ids=["loss not callable", "clipping 0", "exclude matching nothing"])
def test_bad_arguments_are_refused_by_name(arguments, error, match):
    model = linear_net()
    arguments = {"loss_func": F.cross_entropy, **arguments}
    with pytest.raises(error, match=match):
        per_sample_agc(model, **arguments)
    assert all("forward" not in m.__dict__ for m in model.modules()) and not model._forward_pre_hooks


def test_the_engines_depend_on_their_context_not_on_the_clipper():
    """The per-sample engines (and the graphs, the clipped sum) import neither `clipper` nor `PerSampleClipper`: they
    see the rule, the tally, the recording and the graphs only (docs/ARCHITECTURE.md, per-sample AGC)."""
    import ast
    from pathlib import Path

    import normfree.agc.per_sample as per_sample

    folder = Path(per_sample.__file__).parent
    for name in ("layers", "containers", "generic", "graphs", "clipped_sum", "example_rule", "tally", "recording",
                 "context"):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
            {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert "clipper" not in imported and "PerSampleClipper" not in imported, name
