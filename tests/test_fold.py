"""to_normfree(model, "fold"): every BatchNorm folded into the layer next to it, the eval-mode function kept.

The reference is the original model itself, BatchNorm and all, in eval mode and float64 (torch's BatchNorm, not the
fold's formula); its BatchNorm statistics and affine parameters are randomised first so that no fold is trivial.
"""
import copy

import pytest
import timm
import torch
import torchvision
from fastai.vision.learner import create_vision_model
from fastai.vision.models.xresnet import xresnet18
from torch import nn

from normfree import adaptive_clip_grad_, to_normfree
from normfree.models.convert import ConversionError

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def randomised(model):
    """`model` in float64 with every BatchNorm's running statistics and affine parameters drawn at random."""
    generator = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 1.5 + 0.5)
                if bn.weight is not None:
                    bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
                    bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
    return model.double()


def vgg_like():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10))


ARCHS = {
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "torchvision_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    "torchvision_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "timm_resnet26d": (lambda: timm.create_model("resnet26d", num_classes=10), 32),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 64),
    "fastai_xresnet18": (lambda: xresnet18(n_out=10), 32),
    "fastai_vision_model_head": (lambda: create_vision_model(torchvision.models.resnet18, 10, pretrained=False), 32),
    "vgg_like_cnn": (vgg_like, 16),
}


def relative_error(expected, actual):
    return float((expected - actual).abs().max() / expected.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_folded_model_computes_what_the_batchnorm_model_computed_in_eval(arch):
    make, size = ARCHS[arch]
    torch.manual_seed(0)
    model = randomised(make()).train()  # training mode: the fold still uses the running statistics
    original = copy.deepcopy(model)
    folded = to_normfree(model, "fold")
    assert not [name for name, m in folded.named_modules() if isinstance(m, NORMS)]
    assert type(folded) is type(model)  # the user's class, not an fx GraphModule
    for a, b in zip(model.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)  # the model given is not changed
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = model.eval()(x), folded.eval()(x)
    assert relative_error(expected, actual) <= 1e-5
    assert all(p.requires_grad for p in folded.parameters())


def test_timm_batchnorm_act_keeps_its_activation():
    model = timm.create_model("efficientnet_b0", num_classes=10)
    folded = to_normfree(model, "fold")
    assert type(model.bn1).__name__ == "BatchNormAct2d" and isinstance(model.bn1.act, nn.SiLU)
    assert isinstance(folded.bn1, nn.SiLU)  # the stem's activation, applied by its BatchNormAct2d
    assert folded.conv_stem.bias is not None and folded.conv_stem.bias.requires_grad  # a bias created for the shift


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)), (8, 6, 6)),
    (lambda: nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.BatchNorm2d(12)), (8, 6, 6)),
    (lambda: nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), (4, 9)),
    (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 4, 4, 4)),
    (lambda: nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4)), (6, 5, 5)),
    (lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7)), (5,)),
    (lambda: nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1, groups=2)), (8, 5, 5)),
    (lambda: nn.Sequential(nn.BatchNorm2d(4), nn.Dropout2d(0.5), nn.Conv2d(4, 6, 2, stride=2)), (4, 6, 6)),
    (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Dropout(0.3), nn.Linear(12, 3)), (3, 2, 2)),
], ids=["depthwise", "grouped", "conv1d", "conv3d", "transposed_grouped", "linear_bn1d", "bn_before_grouped_1x1",
        "bn_dropout_unpadded_conv", "bn1d_dropout_linear"])
def test_each_kind_of_pair_folds_exactly(make, shape):
    model = randomised(make()).eval()
    folded = to_normfree(model, "fold")
    assert not [name for name, m in folded.named_modules() if isinstance(m, NORMS)]
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(model(x), folded.eval()(x)) <= 1e-12


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace (a Python branch on a tensor's value)."""

    def __init__(self, outside_bn: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4) if outside_bn else nn.Identity()

    def forward(self, x):
        x = self.body(x)
        return self.bn(x) if x.sum() > 0 else self.bn(-x)


def test_an_untraceable_model_folds_its_sequential_neighbours():
    model = randomised(DataDependent(outside_bn=False)).eval()
    folded = to_normfree(model, "fold")
    assert isinstance(folded.body[1], nn.Identity)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(model(x), folded.eval()(x)) <= 1e-12


@pytest.mark.bad_input
@pytest.mark.parametrize("make, message", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)),
     r"^2 \(BatchNorm2d\) cannot be folded: it reads 1 \(ReLU\) and 3 \(Conv2d\) reads it; it cannot fold into 3 "
     r"after it: its padding \(1, 1\) adds zeros .*convert with mode='nf' instead"),
    (lambda: torchvision.models.densenet121(num_classes=10),
     r"^features.denseblock1.denselayer1.norm1 \(BatchNorm2d\) cannot be folded: it reads call_function cat"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
     r"^1 \(BatchNorm2d\) has no running statistics \(track_running_stats=False\)"),
    (lambda: DataDependent(outside_bn=True),
     r"^bn \(BatchNorm2d\) cannot be folded: .*\(torch.fx could not trace the model's forward: TraceError"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), r"^1 is a GroupNorm: mode 'fold' folds BatchNorm "
                                                                     r"only .*use mode='nf'"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
     r"^the model \(Sequential\) has no BatchNorm: nothing to fold"),
], ids=["before_padded_conv", "densenet_concatenation", "no_running_stats", "untraceable_outside_sequential",
        "groupnorm", "no_batchnorm"])
def test_what_cannot_be_folded_is_refused_naming_the_batchnorm(make, message):
    with pytest.raises(ConversionError, match=message):
        to_normfree(make(), "fold")


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="folded"), r"^mode must be one of 'nf', 'fold' \(nf: .*; fold: .*\), got 'folded'$"),
    (dict(mode=True), r"^mode must be one of 'nf', 'fold' .*got True$"),
    (dict(mode="fold", alpha=0.5), r"^alpha is an option of mode 'nf' .*leave alpha out$"),
    (dict(mode="fold", activation_gamma=1.7), r"^activation_gamma is an option of mode 'nf'"),
], ids=["unknown_mode", "bool_mode", "alpha_with_fold", "gamma_with_fold"])
def test_bad_modes_are_refused_naming_mode(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        to_normfree(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), **kwargs)


@pytest.mark.slow
def test_folded_model_trains_with_agc():
    torch.manual_seed(0)
    model = to_normfree(torchvision.models.resnet18(num_classes=4), "fold").train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    stats = adaptive_clip_grad_(model.parameters(), 0.01)
    optimizer.step()
    assert stats is not None
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if name.endswith("conv1.bias"))


@pytest.mark.bad_input
@pytest.mark.parametrize("option", [dict(alpha=0.5), dict(skipinit=False)], ids=["default_alpha", "default_skipinit"])
def test_nf_options_equal_to_their_defaults_are_still_refused_with_fold(option):
    # given explicitly, even at mode nf's default value: fold has no NF blocks to apply them to
    with pytest.raises(ConversionError, match="is an option of mode 'nf'"):
        to_normfree(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), mode="fold", **option)
