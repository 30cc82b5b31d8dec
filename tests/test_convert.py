"""to_normfree: BatchNorm models made normalizer-free (Brock, De & Smith 2021, arXiv 2101.08692, Sec. 3-4)."""
import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.vision.models.xresnet import xresnet18
from timm.layers import ScaledStdConv2d
from timm.models.nfnet import _nonlin_gamma
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import normfree
from agc_reference import reference_agc
from fastai_helpers import GradientsBeforeAGC
from normfree import nf_learner, to_normfree
from normfree.models import ConvertedResidual
from normfree.models.convert import ConversionError
from normfree.models.standardization import standardized_weight

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
RELU = _nonlin_gamma["relu"]
ALPHA = 0.2  # the papers' alpha, given explicitly where a test computes with it


def assert_normalizer_free(model):
    assert not [name for name, m in model.named_modules() if isinstance(m, NORMS)]
    assert not [name for name, m in model.named_modules() if type(m) is nn.Conv2d]


def gamma_of(conv):
    return conv.scale * conv.weight[0].numel() ** 0.5


def tiny_resnet(block=BasicBlock, layers=(1, 1, 1, 1), **kwargs):
    return ResNet(block, list(layers), num_classes=10, **kwargs)


def test_torchvision_resnet18_keeps_weights_and_gets_the_nf_recipe():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    converted = to_normfree(model)
    assert_normalizer_free(converted)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert isinstance(converted.conv1, ScaledStdConv2d)
    assert torch.equal(converted.conv1.weight, model.conv1.weight)  # the standardised weight's source
    assert torch.equal(converted.layer3[1].branch.conv2.weight, model.layer3[1].conv2.weight)
    assert gamma_of(converted.conv1) == pytest.approx(1.0)  # reads the image
    assert gamma_of(converted.layer1[0].branch.conv1) == pytest.approx(RELU)
    # the shortcut reads relu(h / beta) = relu(h) / beta: 1 / beta is folded into its constant scale
    assert gamma_of(converted.layer2[0].shortcut[0]) * converted.layer2[0].beta == pytest.approx(RELU)
    assert torch.equal(converted.layer1[0].branch.conv1.bias, torch.zeros(64))  # BatchNorm's shift, dropped
    blocks = [converted.layer1[0], converted.layer1[1], converted.layer2[0], converted.layer2[1], converted.layer4[1]]
    assert all(isinstance(b, ConvertedResidual) for b in blocks)
    assert [b.transition for b in blocks] == [False, False, True, False, False]
    # beta = sqrt(expected Var(h)): 1 after the stem, + alpha^2 per block, 1 + alpha^2 after a transition
    assert [b.beta ** 2 for b in blocks] == pytest.approx([1.0, 1.25, 1.5, 1.25, 1.25])  # alpha 0.5 by default
    assert all(b.alpha == 0.5 and b.skip_gain is None for b in blocks)  # no SkipInit by default
    converted_blocks = [b for b in converted.modules() if isinstance(b, ConvertedResidual)]
    assert len(converted_blocks) == sum(isinstance(m, BasicBlock) for m in model.modules())
    assert [b.final_act is not None for b in converted_blocks] == \
        [False] * (len(converted_blocks) - 1) + [True]  # only the last block activates its output, for the head
    assert converted(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    papers = to_normfree(model, alpha=0.2, skipinit=True)  # the papers' settings
    assert [b.beta ** 2 for b in (papers.layer1[0], papers.layer1[1], papers.layer2[0])] == \
        pytest.approx([1.0, 1.04, 1.08])
    assert float(papers.layer1[0].skip_gain.detach()) == 0.0


def test_torchvision_bottleneck_resnet_small_widths():
    model = tiny_resnet(Bottleneck, width_per_group=16)
    converted = to_normfree(model, alpha=0.5)
    assert_normalizer_free(converted)
    first = converted.layer1[0]
    assert first.transition and first.beta == 1.0  # 64 -> 256 channels: a projection shortcut
    assert converted.layer2[0].beta ** 2 == pytest.approx(1.25)
    assert list(dict(first.branch.named_children())) == ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3",
                                                          "bn3"]
    assert torch.equal(first.branch.conv3.weight, model.layer1[0].conv3.weight)
    assert converted(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_timm_resnet_and_fastai_xresnet():
    for model in (timm.create_model("resnet18", num_classes=10), xresnet18(n_out=10)):
        converted = to_normfree(model)
        assert_normalizer_free(converted)
        blocks = [m for m in converted.modules() if isinstance(m, ConvertedResidual)]
        assert [b.transition for b in blocks] == [False, False] + [True, False] * 3
        assert converted(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert to_normfree(timm.create_model("resnet18", num_classes=10)).get_classifier().out_features == 10


def test_plain_cnn_is_converted_layer_by_layer():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
                          nn.Conv2d(16, 16, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    converted = to_normfree(model)
    assert_normalizer_free(converted)
    assert [type(m).__name__ for m in converted] == ["ScaledStdConv2d", "Identity", "ReLU", "MaxPool2d",
                                                      "ScaledStdConv2d", "Identity", "SiLU", "ScaledStdConv2d", "GELU",
                                                      "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert [gamma_of(converted[i]) for i in (0, 4, 7)] == pytest.approx([1.0, RELU, _nonlin_gamma["silu"]])
    assert torch.equal(converted[0].weight, model[0].weight) and torch.equal(converted[0].bias, model[0].bias)
    assert torch.equal(converted[11].weight, model[11].weight)
    x = torch.randn(4, 1, 8, 8)
    expected = F.conv2d(x, standardized_weight(converted[0]), model[0].bias, padding=1)
    assert torch.allclose(converted[:2](x), expected, atol=1e-6)
    # activation_gamma overrides, by one value or by class
    assert gamma_of(to_normfree(model, activation_gamma=2.0)[4]) == pytest.approx(2.0)
    assert gamma_of(to_normfree(model, activation_gamma={nn.SiLU: 1.5})[7]) == pytest.approx(1.5)


def test_nf_residual_equation_by_hand():
    torch.manual_seed(0)
    model = tiny_resnet(layers=(2, 1, 1, 1))
    for skipinit in (False, True):
        block = to_normfree(model, alpha=ALPHA, skipinit=skipinit).layer1[1]
        if skipinit:
            with torch.no_grad():
                block.skip_gain.fill_(0.5)
        beta = math.sqrt(1 + ALPHA ** 2)
        assert block.beta == pytest.approx(beta)
        h = torch.randn(3, 64, 6, 6)
        assert block.beta_folded  # relu(h / beta) = relu(h) / beta: conv1's standardised weight holds the 1 / beta
        x = torch.relu(h)
        inner = torch.relu(F.conv2d(x, standardized_weight(block.branch.conv1), block.branch.conv1.bias, padding=1))
        branch = F.conv2d(inner, standardized_weight(block.branch.conv2), block.branch.conv2.bias, padding=1)
        gain = 0.5 if skipinit else 1.0
        assert torch.allclose(block(h), h + ALPHA * gain * branch, atol=1e-5)


@pytest.mark.slow
def test_variance_at_init_follows_the_nf_prediction_where_deleting_batchnorm_explodes():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    converted = to_normfree(model, alpha=ALPHA, skipinit=False)
    converted.layer4[-1].final_act = None  # the residual stream itself, before the head's activation
    deleted = copy.deepcopy(model)
    for module in list(deleted.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    outputs = {}
    for key, net in (("converted", converted), ("deleted", deleted)):
        net.layer4.register_forward_hook(lambda module, args, out, key=key: outputs.__setitem__(key, out))
        with torch.no_grad():
            net(torch.randn(8, 3, 64, 64))
    # NF prediction for layer4's output: a transition (1 + alpha^2), then two blocks (+ alpha^2 each)
    predicted = 1 + 3 * ALPHA ** 2
    variance = {k: float(v.var(dim=(0, 2, 3)).mean()) for k, v in outputs.items()}  # average channel variance
    second_moment = {k: float(v.pow(2).mean()) for k, v in outputs.items()}
    assert predicted / 2 < variance["converted"] < 2 * predicted, variance
    assert variance["deleted"] > 20 * predicted, variance
    assert second_moment["deleted"] > 100 * second_moment["converted"], second_moment  # mean shift as well


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return x + self.bn(self.conv(x))


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Residual()),
     r"^2 \(Residual\) holds a Conv2d \(2\.conv\) and its forward is not known .*rewrite it"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), r"^1 is a GroupNorm: .*replace it by nn.Identity\(\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), r"^1 is a LayerNorm"),
    (nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4)),
     r"^2 \(BatchNorm1d\) does not follow a convolution \(it follows 1 \(Linear\)\).*build the model with "
     r"normfree.build_model"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3)),
     r"^2 reads the output of 1 \(Hardswish\): no gamma is known .*activation_gamma=\{Hardswish: value\}"),
    (nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), r"^0 \(Conv1d\): .*2-D convolutions"),
])
def test_what_cannot_be_converted_is_refused_with_path_and_fix(model, message):
    with pytest.raises(ConversionError, match=message):
        to_normfree(model)
    assert isinstance(ConversionError("x"), ValueError)


def test_refusals_of_whole_models():
    with pytest.raises(ValueError, match=r"^the model \(NormFreeNet\) is already normalizer-free: it has no BatchNorm"):
        to_normfree(timm.create_model("test_nfnet"))
    with pytest.raises(ValueError, match="alpha must be"):
        to_normfree(nn.Sequential(), alpha=0)
    hardswish = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3))
    assert gamma_of(to_normfree(hardswish, activation_gamma={"Hardswish": 1.9})[2]) == pytest.approx(1.9)


def image_dls(n=64, size=16, classes=4, bs=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    x += y.view(-1, 1, 1, 1) * 0.5  # learnable
    ds = TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=True), DataLoader(ds, bs=bs))
    dls.c = classes
    return dls


@pytest.mark.slow
def test_converted_model_trains_with_agc_and_per_sample_agc():
    torch.manual_seed(0)
    dls = image_dls()
    learn = nf_learner(dls, lambda weights: tiny_resnet(), convert=True, agc=None)
    assert_normalizer_free(learn.model)
    learn.agc(0.04)
    x, y = dls.one_batch()
    before = float(learn.loss_func(learn.model.eval()(x), y))
    gradients = GradientsBeforeAGC(keep=1)
    with learn.no_bar(), learn.no_logging():
        learn.fit(4, 3e-3, cbs=gradients)
    after = float(learn.loss_func(learn.model.eval()(x), y))
    assert after < before
    # the last step's units clipped per parameter are the float64 rule's on the same gradients (checked for the
    # parameters of up to 40k values: the reference loops in Python, and resnet18's widest convs have 2.4M)
    history, (step,) = learn.adaptive_clip.history, gradients.steps
    checked = [i for i, n in enumerate(history.parameter_names) if step[n][0].numel() <= 40_000]
    expected = [reference_agc(*step[history.parameter_names[i]], 0.04, 1e-3)[1] for i in checked]
    assert history.clipped()[-1, checked].tolist() == expected and sum(expected) > 0
    per_sample = nf_learner(dls, lambda weights: tiny_resnet(), convert={"skipinit": True}, agc=None)
    per_sample.agc(0.04, per_sample=True)
    with per_sample.no_bar(), per_sample.no_logging():
        per_sample.fit(1, 1e-3)
    gains = [b.skip_gain for b in per_sample.model.modules() if isinstance(b, ConvertedResidual)]
    assert gains and any(float(g.detach()) != 0 for g in gains)  # the container gains were trained per example


def test_nf_learner_refuses_to_convert_normalizer_free_archs():
    with pytest.raises(ValueError, match="already normalizer-free; drop convert"):
        nf_learner(image_dls(), "nf_resnet_tiny", convert=True)
    assert "to_normfree" in normfree.__all__ and "ConvertedResidual" in normfree.models.__all__


# ---- models to_normfree cannot convert whole, and what it says ------------------------------------------------------

def conv_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("make, message", [
    (lambda: torch.jit.script(conv_bn()), r"^the model is a TorchScript module .*pass the eager nn.Module"),
    (lambda: torch.jit.trace(conv_bn().eval(), torch.randn(1, 3, 5, 5)), r"^the model is a TorchScript module"),
    (lambda: nn.Sequential(torch.jit.script(conv_bn()), nn.Flatten()), r"^0 is a TorchScript module"),
    (lambda: torch.compile(conv_bn()), r"^the model is a torch.compile wrapper: pass the eager nn.Module "
                                       r"\(model._orig_mod\)"),
], ids=["scripted", "traced", "scripted_part", "compiled"])
def test_scripted_and_compiled_models_are_refused(make, message):
    with pytest.raises(ConversionError, match=message):
        to_normfree(make())


@pytest.mark.bad_input
@pytest.mark.parametrize("gamma, message", [
    (0, r"^activation_gamma must be a number in \[0.01, 100\] .*got 0$"),
    (-1.0, r"got -1.0$"),
    (math.nan, r"got nan$"),
    (1e30, r"got 1e\+30$"),
    ({"relu": 1.7}, r"^activation_gamma key 'relu' matches no module of the model, so it would be ignored: .*the "
                    r"model's activations: ReLU, SiLU$"),
    ({nn.Hardswish: 1.9}, r"^activation_gamma key 'Hardswish' matches no module"),
    ({nn.SiLU: 0.0}, r"^activation_gamma\['SiLU'\] must be a number in \[0.01, 100\]"),
    ({"ReLU": math.inf}, r"^activation_gamma\['ReLU'\] must be a number .*got inf$"),
    ({nn.ReLU(): 1.7}, r"^activation_gamma's keys must be activation classes \(nn.ReLU\) or class names"),
], ids=["zero", "negative", "nan", "huge", "table_name_key", "absent_class_key", "zero_in_mapping", "inf_in_mapping",
        "instance_key"])
def test_bad_activation_gammas_are_refused_naming_activation_gamma(gamma, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.SiLU(),
                          nn.Conv2d(4, 4, 1))
    with pytest.raises(ConversionError, match=message):
        to_normfree(model, activation_gamma=gamma)


def test_activation_gamma_takes_numpy_numbers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert gamma_of(to_normfree(model, activation_gamma=np.float32(1.5))[3]) == pytest.approx(1.5)
    assert gamma_of(to_normfree(model, activation_gamma={"ReLU": np.float64(1.6)})[3]) == pytest.approx(1.6)


@pytest.mark.bad_input
@pytest.mark.parametrize("make, message", [
    (lambda: timm.create_model("bn_resnet_tiny"),
     r"^bn_resnet_tiny is the BatchNorm twin of normfree's nf_resnet_tiny: "
     r".*build nf_resnet_tiny \(--arch nf_resnet_tiny"),
    (lambda: timm.create_model("nf_resnet_tiny"), r"^the model \(SmallResNet\) is already normalizer-free: it has no "
                                                  r"BatchNorm .*stem.conv is a ScaledStdConv2d\); nothing to convert"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), r"has no BatchNorm and no convolution: nothing to convert"),
], ids=["batchnorm_twin", "normalizer_free", "no_batchnorm_no_conv"])
def test_models_with_nothing_to_convert_say_what_to_use_instead(make, message):
    with pytest.raises(ConversionError, match=message):
        to_normfree(make())


def test_train_config_points_the_batchnorm_twin_to_its_nf_twin():
    from normfree.app.config import TrainConfig
    from normfree.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"to_normfree: bn_resnet_tiny cannot be converted: .*--arch nf_resnet_tiny"):
        TrainConfig(data="digits", arch="bn_resnet_tiny", to_normfree=True)


@pytest.mark.bad_input
@pytest.mark.parametrize("make, shared", [
    (lambda c: nn.Sequential(c, nn.BatchNorm2d(4), nn.ReLU(), c, nn.BatchNorm2d(4)), "0 and 3 are one Conv2d"),
    (lambda c: nn.Sequential(c, c, nn.BatchNorm2d(4)), "0 and 1 are one Conv2d"),  # was left a plain Conv2d at 1
    (lambda c: nn.Sequential(nn.Sequential(c, nn.BatchNorm2d(4)), nn.ReLU(), nn.Sequential(c)),
     r"0.0 and 2.0 are one Conv2d"),
], ids=["conv_bn_twice", "conv_twice", "conv_in_two_stacks"])
def test_a_conv_used_in_two_places_is_refused_naming_both(make, shared):
    with pytest.raises(ConversionError, match=rf"^{shared} module used twice \(shared or reused\): .*give each "
                                              rf"place its own module"):
        to_normfree(make(nn.Conv2d(4, 4, 3, padding=1)))


def test_an_activation_module_used_in_two_places_sets_the_gamma_at_both():
    """One nn.SiLU listed twice: the conv after its second place reads SiLU's output (named_children() lists a module
    once, which left that conv with gamma 1)."""
    act = nn.SiLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act, nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), act,
                          nn.Conv2d(4, 4, 1))
    converted = to_normfree(model)
    assert [gamma_of(converted[i]) for i in (0, 3, 6)] == pytest.approx([1.0] + [_nonlin_gamma["silu"]] * 2)
    assert_normalizer_free(converted)
