"""to_normfree's mode nf computes its blocks with 1 / beta and alpha * skip_gain folded into the convolutions
(`ConvertedResidual`): the same function and gradients as the unfolded block formula
h + alpha * gain * f(act(h / beta)), held here to an independent re-implementation of that formula.

Both run in float64, so that a difference is the fold's and not float32 rounding: in float32, a ReLU input within
rounding of 0 flips in one computation and not the other, and on a batch of 2 tiny images that alone moves a gradient
of resnet50 by a few percent (the unfolded model shows the same, against the same reference)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from fastai.vision.models.xresnet import xresnet18
from timm.layers import ScaledStdConv2d
from timm.models.nfnet import _nonlin_gamma
from torch import nn

import normfree.models.convert as convert_module
from normfree import to_normfree
from normfree.models import ConvertedResidual

EPS = 1e-5  # the eps of the Scaled WS convolutions to_normfree builds (timm's NfCfg default)
GAMMAS = {nn.ReLU: _nonlin_gamma["relu"], nn.SiLU: _nonlin_gamma["silu"]}  # timm's copy of DeepMind's table


def reference_conv(conv, x, gamma):
    """A ScaledStdConv2d by the paper's formula, float64: gain * gamma / sqrt(N) * (W - mean) / sqrt(var + eps)."""
    rows = conv.weight.reshape(conv.out_channels, -1)
    mean = rows.mean(dim=1, keepdim=True)
    var = ((rows - mean) ** 2).mean(dim=1, keepdim=True)
    weight = conv.gain.reshape(-1, 1) * gamma / rows.shape[1] ** 0.5 * (rows - mean) / torch.sqrt(var + EPS)
    return F.conv2d(x, weight.reshape_as(conv.weight), conv.bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def reference_block(block, h):
    """The unfolded NF block: h + alpha * gain * branch(act(h / beta)), the final activation on the last block."""
    x = block.pre_act(h / block.beta)
    shortcut = h if block.shortcut is None else block.shortcut(x)
    gain = 1.0 if block.skip_gain is None else block.skip_gain
    out = shortcut + block.alpha * gain * block.branch(x)
    return out if block.final_act is None else block.final_act(out)


def as_reference(converted, act):
    """A float64 copy of `converted` whose convolutions and blocks compute the paper's formulas above, every conv with
    the gamma of what it reads: 1 for the image (the stem's first conv), the activation's otherwise."""
    reference = copy.deepcopy(converted).double()
    convs = [m for m in reference.modules() if isinstance(m, ScaledStdConv2d)]
    for index, conv in enumerate(convs):
        gamma = 1.0 if index == 0 else GAMMAS[act]
        conv.forward = lambda x, conv=conv, gamma=gamma: reference_conv(conv, x, gamma)
    for block in reference.modules():
        if isinstance(block, ConvertedResidual):
            block.forward = lambda h, block=block: reference_block(block, h)
    return reference


def randomise(model, generator):
    """Nonzero skip gains, conv gains and biases, so that every folded scalar shows in outputs and gradients."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("skip_gain"):
                param.uniform_(0.3, 1.0, generator=generator)
            elif name.endswith(".gain") or name.endswith(".bias"):
                param.add_(torch.rand(param.shape, generator=generator) * 0.2 - 0.1)


MODELS = {
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=10), nn.ReLU),
    "torchvision resnet50": (lambda: torchvision.models.resnet50(num_classes=10), nn.ReLU),
    "timm resnet26d": (lambda: timm.create_model("resnet26d", num_classes=10), nn.ReLU),
    "fastai xresnet18": (lambda: xresnet18(n_out=10), nn.ReLU),
    "timm resnet18, SiLU": (lambda: timm.create_model("resnet18", num_classes=10, act_layer=nn.SiLU), nn.SiLU),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_folded_blocks_compute_the_unfolded_formula_and_its_gradients(name, monkeypatch):
    make, act = MODELS[name]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    converted = to_normfree(make(), skipinit=True)
    randomise(converted, generator)
    blocks = [m for m in converted.modules() if isinstance(m, ConvertedResidual)]
    # 1 / beta moves past ReLU, not past SiLU (SiLU(h / beta) != SiLU(h) / beta)
    assert [b.beta_folded for b in blocks] == [act is nn.ReLU] * len(blocks)
    reference = as_reference(converted, act)
    converted.double()  # the folded constants are Python floats: they keep their meaning in float64
    folds = []
    fold = convert_module.scaled_output_conv
    monkeypatch.setattr(convert_module, "scaled_output_conv", lambda *a: folds.append(1) or fold(*a))

    x = torch.randn(2, 3, 32, 32, generator=generator)
    weights = torch.randn(2, 10, generator=generator)
    out = converted(x.double())
    (out * weights.double()).sum().backward()
    assert len(folds) == len(blocks)  # every block computed alpha * gain inside its last conv
    expected = reference(x.double())
    (expected * weights.double()).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    grads = dict(reference.named_parameters())
    for param_name, param in converted.named_parameters():
        torch.testing.assert_close(param.grad, grads[param_name].grad, rtol=1e-8, atol=1e-12,
                                   msg=lambda message, name=param_name: f"{name}: {message}")
    assert any(n.endswith("skip_gain") for n in grads)


def test_scripted_model_computes_what_the_folded_eager_model_does():
    torch.manual_seed(0)
    converted = to_normfree(torchvision.models.resnet18(num_classes=10), skipinit=True)
    randomise(converted, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.script(converted)(x), converted(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_state_dict_of_a_converted_model_loads_and_gives_the_same_function():
    """The fold lives in constant scales (not in the state dict): the keys are the unfolded model's and a saved
    state dict gives the same outputs in a freshly converted model."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    converted = to_normfree(model, skipinit=True)
    randomise(converted, torch.Generator().manual_seed(0))
    fresh = to_normfree(model, skipinit=True)
    fresh.load_state_dict(converted.state_dict())
    assert "layer2.0.skip_gain" in converted.state_dict() and "layer2.0.branch.conv2.gain" in converted.state_dict()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), converted(x), rtol=0, atol=0)


@pytest.mark.parametrize("intercept", ["forward hook", "replaced forward", "per-example gains"])
def test_fold_steps_aside_where_something_intercepts_the_branch(intercept, monkeypatch):
    """A hook or a replaced forward on the branch's last conv (per-sample AGC's layer engine replaces it) still runs,
    and per-example copies of the skip gain (its container engine) multiply the branch: the block keeps the plain
    formula there, with the same result."""
    torch.manual_seed(0)
    converted = to_normfree(torchvision.models.resnet18(num_classes=10), skipinit=True)
    randomise(converted, torch.Generator().manual_seed(0))
    block = converted.layer1[1]
    conv = block.branch.conv2
    h = torch.randn(2, 64, 8, 8)
    expected = block(h)
    calls, folds = [], []
    if intercept == "forward hook":
        conv.register_forward_hook(lambda *args: calls.append(1))
    elif intercept == "replaced forward":
        conv.forward = lambda x: calls.append(1) or type(conv).forward(conv, x)
    else:  # what per-sample AGC's container engine hands the block's forward: one copy per example
        block._parameters["skip_gain"] = block.skip_gain.detach().expand(2, 1, 1, 1).clone()
        calls.append(1)
    fold = convert_module.scaled_output_conv
    monkeypatch.setattr(convert_module, "scaled_output_conv", lambda *a: folds.append(1) or fold(*a))
    torch.testing.assert_close(block(h), expected, rtol=1e-5, atol=1e-6)
    assert calls == [1] and folds == []
