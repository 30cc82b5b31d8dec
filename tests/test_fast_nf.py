"""fast_nf: timm's NF blocks with their scalars folded into the Scaled WS convolutions compute timm's function.

Every check is against an untouched deep copy of the timm model (timm's own NormFreeBlock.forward), never against
fast_nf's code: each NF family at a few thousand parameters (timm's own configs, with depths, widths and groups
made small through the NfCfg overrides timm.create_model takes), with every gain drawn away from its initial value
(timm starts conv3's gain and the SkipInit gain at 0, which would hide a wrong fold).
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from timm.models.nfnet import NormFreeBlock
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

import normfree
from normfree import ConfigError, TrainConfig, fast_nf, fuse_standardization, nf_learner, signal_propagation
from normfree.app.compare import CompareConfig
from normfree.models.fast_nf import FastNormFreeBlock

_SMALL = dict(depths=(1, 2), channels=(16, 32), ch_div=8)
# name -> (timm.create_model overrides, input size): every structural feature of the family kept
FAMILIES = {
    "nf_resnet26": (dict(_SMALL, stem_chs=8), 32),  # ReLU, 7x7 stem + max pool, bottlenecks
    "nf_ecaresnet26": (dict(_SMALL, stem_chs=8), 32),  # ReLU, ECA after conv3
    "dm_nfnet_f0": (dict(_SMALL, stem_chs=16, group_size=8, num_features=32), 32),  # GELU in GammaAct, SAME, SE,
    "nfnet_l0": (dict(_SMALL, stem_chs=16, group_size=8, num_features=32), 32),  # SiLU, SE after conv3, extra conv
    "eca_nfnet_l0": (dict(_SMALL, stem_chs=16, group_size=8, num_features=32), 32),  # SiLU, ECA after conv3
    "nf_regnet_b0": (dict(_SMALL, group_size=8, num_features=32), 32),  # SiLU, SE between conv2 and conv3
    "nf_resnet_tiny": (dict(in_chans=3), 16),  # normfree's own: 1 / beta folded already
}
BATCH = 3  # not a channel count of any layer: an activation is a 4-dim tensor of BATCH rows (`activation_muls`)


def family(name, dtype=torch.float64, **overrides):
    """(timm model, an untouched deep copy, an input batch), the model's gains drawn at random."""
    kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **{**kwargs, **overrides}).to(dtype)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("gain"):  # conv gains [out, 1, 1, 1], SkipInit's scalar
                parameter.uniform_(0.5, 1.5)
    x = torch.randn(BATCH, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return model, copy.deepcopy(model), x


def outputs_and_grads(model, x):
    out = model(x)
    model.zero_grad()
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, expected, rtol):
    """Elementwise within rtol, with an absolute floor of rtol times the tensor's largest value (entries that cancel
    to ~0 carry the rounding of the larger terms they are sums of)."""
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def assert_same_function(model, reference, x, rtol):
    out, grads = outputs_and_grads(fast_nf(model), x)
    ref_out, ref_grads = outputs_and_grads(reference, x)
    assert_same(out, ref_out, rtol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_same(grads[name], ref_grads[name], rtol)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_outputs_and_gradients_equal_timms_in_float64(name, mode):
    model, reference, x = family(name)
    model.train(mode == "train"), reference.train(mode == "train")
    assert_same_function(model, reference, x, rtol=1e-10)
    assert any(isinstance(m, FastNormFreeBlock) for m in model.modules())
    assert not any(type(m) is NormFreeBlock for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_float32_is_timms_within_rounding(name):
    model, reference, x = family(name, torch.float32)
    assert_same_function(model, reference, x, rtol=1e-5)


@pytest.mark.parametrize("name", ["nf_resnet26", "dm_nfnet_f0", "nf_regnet_b0"])
def test_drop_path_draws_the_same_examples(name):
    """DropPath (each example's branch kept or dropped) commutes with the folded scalars: with the same random
    state, training-mode outputs and gradients are timm's."""
    model, reference, x = family(name, drop_path_rate=0.5)
    fast_nf(model)
    torch.manual_seed(3)
    out, grads = outputs_and_grads(model, x)
    torch.manual_seed(3)
    ref_out, ref_grads = outputs_and_grads(reference, x)
    assert_same(out, ref_out, 1e-10)
    for name in ref_grads:
        assert_same(grads[name], ref_grads[name], 1e-10)


@pytest.mark.parametrize("name", ["dm_nfnet_f0", "nf_regnet_b0"])
def test_state_dict_is_unchanged_and_timms_weights_load(name):
    model, reference, x = family(name)
    fast_nf(model)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    other, _, _ = family(name)
    with torch.no_grad():  # other weights than the model's: loading them must change what it computes
        for parameter in other.parameters():
            parameter.mul_(1.1).add_(0.01)
    model.load_state_dict(other.state_dict())  # timm's weights into the transformed model
    reference.load_state_dict(other.state_dict())
    model.eval(), reference.eval()
    assert_same(model(x).detach(), reference(x).detach(), 1e-10)
    untouched, _, _ = family(name)
    untouched.load_state_dict(model.state_dict())  # and the transformed model's into timm's
    assert_same(untouched.eval()(x).detach(), reference(x).detach(), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dm_nfnet_f0", "nf_resnet26"])
def test_a_short_fit_gives_timms_losses(name):
    losses = {}
    for folded in (True, False):
        model, _, x = family(name, torch.float32)
        model = fast_nf(model) if folded else model
        y = torch.arange(BATCH) % 5
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[folded] = []
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[folded].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert losses[False][-1] < losses[False][0]  # it trained


@pytest.mark.slow
def test_applying_it_twice_changes_nothing():
    model, reference, x = family("dm_nfnet_f0")
    once = fast_nf(model).eval()(x).detach()
    assert fast_nf(model) is model
    assert torch.equal(model(x).detach(), once)
    assert_same(once, reference.eval()(x).detach(), 1e-10)


def test_a_model_without_nf_blocks_is_returned_unchanged():
    model = timm.create_model("resnet10t", num_classes=3)
    state = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    assert fast_nf(model) is model
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["nf_resnet26", None, {"weight": torch.zeros(1)}])
def test_a_non_module_is_a_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match=r"fast_nf: model must be a torch nn.Module"):
        fast_nf(value)


class _ActivationMuls(TorchDispatchMode):
    """Counts the multiplies and divisions whose result is an activation: BATCH rows of a spatial feature map."""

    OPS = {torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor, torch.ops.aten.mul.Scalar, torch.ops.aten.mul_.Scalar,
           torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS and out.ndim == 4 and out.shape[0] == BATCH and out.shape[-1] > 1:
            self.count += 1
        return out


def activation_muls(model, x):
    counter = _ActivationMuls()
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.count


# what stays an activation-sized multiply in the folded forward, by family (eval mode): the attention itself
# (x * gate, one per block: SE / ECA are the function) and dm_nfnet's final GammaAct, read by the pooled head
FOLDED_MULS = {"nf_resnet26": 0, "nf_ecaresnet26": 3, "dm_nfnet_f0": 3 + 1, "nfnet_l0": 3, "eca_nfnet_l0": 3,
               "nf_regnet_b0": 3, "nf_resnet_tiny": 0}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_folded_forward_leaves_no_scalar_multiply_of_an_activation(name):
    model, reference, x = family(name)
    assert activation_muls(fast_nf(model), x) == FOLDED_MULS[name]
    assert activation_muls(reference, x) > FOLDED_MULS[name] or name == "nf_resnet_tiny"


def test_fusion_and_signal_propagation_read_the_folded_model_as_timms():
    model, reference, x = family("dm_nfnet_f0")
    fast_nf(model)
    assert_same(fuse_standardization(model)(x), reference.eval()(x).detach(), 1e-10)
    got, expected = signal_propagation(model, x), signal_propagation(reference, x)
    assert len(got) == len(expected) == 3
    for row, expected_row in zip(got.records(), expected.records()):
        assert (row["name"], row["transition"]) == (expected_row["name"], expected_row["transition"])
        for statistic in ("squared_mean", "variance", "residual_variance"):
            assert row[statistic] == pytest.approx(expected_row[statistic], rel=1e-9)


def _image_dls():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=generator), torch.arange(16) % 4
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=8), DataLoader(TensorDataset(x, y), bs=8))
    dls.c = 4
    return dls


def _folded(model: nn.Module) -> bool:
    return any(isinstance(m, FastNormFreeBlock) for m in model.modules())


def test_nf_learner_folds_by_default_and_not_when_asked():
    assert _folded(nf_learner(_image_dls(), "test_nfnet").model)
    assert not _folded(nf_learner(_image_dls(), "test_nfnet", fast=False).model)


@pytest.mark.bad_input
def test_nf_learner_fast_must_be_a_bool():
    with pytest.raises(TypeError, match="fast must be True"):
        nf_learner(_image_dls(), "test_nfnet", fast="yes")


@pytest.mark.parametrize("settings, folded", [({}, True), ({"fast_nf": False}, False),
                                              ({"per_sample": True}, False)])
def test_train_folds_unless_no_fast_nf_or_per_sample(tmp_path, settings, folded):
    from normfree.app.train import _build_learner
    config = TrainConfig(data="digits", arch="nf_resnet_tiny", limit=20, bs=4, out=str(tmp_path), **settings)
    assert _folded(_build_learner(config).model) is folded


@pytest.mark.bad_input
def test_train_config_fast_nf_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="fast_nf: must be True or False"):
        TrainConfig(fast_nf="no", out=str(tmp_path))


def test_it_is_public():
    assert "fast_nf" in normfree.__all__ and normfree.fast_nf is fast_nf


def test_no_fast_nf_on_the_command_line_reaches_every_run():
    from normfree.app.cli import build_parser
    parser, _ = build_parser()
    assert parser.parse_args(["train"]).fast_nf is True
    assert parser.parse_args(["train", "--no-fast-nf"]).fast_nf is False
    config = CompareConfig(fast_nf=False, methods=("nf-agc", "nf-agc-per-sample"), lrs=(0.01,))
    assert "--no-fast-nf" in config.command()
    assert parser.parse_args(config.command().split()[1:]).fast_nf is False
    assert {config.train_config(cell, 0.01, None).fast_nf for cell in config.cells()} == {False}
    assert {CompareConfig(lrs=(0.01,)).train_config(cell, 0.01, None).fast_nf
            for cell in config.cells()} == {True}


@pytest.mark.parametrize("name", ["nf_resnet26", "nf_ecaresnet26", "nf_regnet_b0"])
def test_torchscript_scripts_it_as_it_scripts_timms(name):
    model, reference, x = family(name)
    scripted = torch.jit.script(fast_nf(model).eval())
    assert_same(scripted(x), reference.eval()(x).detach(), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf_resnet26", "dm_nfnet_f0"])
def test_per_sample_agc_clips_a_folded_model_as_timms(name):
    """Per-sample AGC's engines stand in for the layers (and hand the SkipInit gain one copy per example); the folded
    blocks then compute timm's formula where a fold would skip them, and the clipped gradient is timm's."""
    from normfree.agc import PerSampleClipper, excluded_parameters

    def clipped_gradient(model, x, y):
        unclipped = {id(p) for p in excluded_parameters(model)}
        clipper = PerSampleClipper(model, {id(p): 0.01 for p in model.parameters() if id(p) not in unclipped})
        clipper.grad_scale = torch.tensor(1.0 / len(x))
        clipper.start()
        F.cross_entropy(model(x), y).backward()
        clipper.stop()
        clipped = int(clipper.collect([list(model.parameters())])[0].clipped.sum())
        clipper.remove()
        return {n: p.grad for n, p in model.named_parameters()}, clipped

    model, reference, x = family(name, torch.float32)
    y = torch.arange(BATCH) % 5
    got, clipped = clipped_gradient(fast_nf(model), x, y)
    expected, expected_clipped = clipped_gradient(reference, x, y)
    assert clipped == expected_clipped > 0
    for n in expected:
        assert_same(got[n], expected[n], 1e-4)
