"""The small-image NF ResNets and their BatchNorm twins (normfree.models.small_resnets)."""
import pickle
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.layers import ScaledStdConv2d
from timm.models.nfnet import NormFreeBlock, _nonlin_gamma
from torch import nn

from normfree.models.small_resnets import (
    ALPHA,
    CLASSIFIER_INIT_STD,
    FAMILY,
    SmallResNet,
    batchnorm_twin_name,
    normfree_twin_name,
)

NF_NAMES = [f"nf_resnet_{size}" for size in FAMILY]
BN_NAMES = [f"bn_resnet_{size}" for size in FAMILY]
NAMES = NF_NAMES + BN_NAMES
RELU_GAMMA = _nonlin_gamma["relu"]
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def create(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **{"num_classes": 10, "in_chans": 1, **kwargs})


def conv_and_linear_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def multiply_adds(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and linear multiply-adds per image, counted from the shapes a real forward pass produces."""
    counts = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            counts.append(output[0].numel() * per_output)
        else:
            counts.append(inputs[0][0].numel() * module.out_features)

    hooks = [m.register_forward_hook(count) for m in conv_and_linear_layers(model)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return sum(counts)


def test_registered_names_and_twins():
    assert sorted(timm.list_models(module="small_resnets")) == sorted(NAMES)
    for nf, bn in zip(NF_NAMES, BN_NAMES):
        assert batchnorm_twin_name(nf) == bn and normfree_twin_name(bn) == nf
        assert batchnorm_twin_name(bn) == bn and normfree_twin_name(nf) == nf
    with pytest.raises(ValueError, match="not one of the small ResNets"):
        batchnorm_twin_name("nf_resnet50")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_cfg(name):
    for in_chans in (1, 3):
        model = create(name, in_chans=in_chans).eval()
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg and cfg["architecture"] == name
        assert cfg["input_size"] == (in_chans, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == in_chans
        assert model.get_submodule(cfg["first_conv"]).in_channels == in_chans
        assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
        assert resolve_data_config({}, model=model)["input_size"] == (in_chans, 32, 32)
        for size in (28, 32, 64):
            with torch.no_grad():
                features = model.forward_features(torch.randn(2, in_chans, size, size))
                assert features.shape == (2, model.num_features, -(-size // 4), -(-size // 4))
                assert model.forward_head(features).shape == (2, 10)
                assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["nf_resnet_tiny", "bn_resnet_tiny"])
def test_features_only(name):
    model = create(name, features_only=True)
    with torch.no_grad():
        maps = model(torch.randn(2, 1, 28, 28))
    assert [m.shape[1:] for m in maps] == [(32, 28, 28), (64, 28, 28), (128, 14, 14), (256, 7, 7)]


def test_configurable_depth_width_and_dropout():
    model = SmallResNet(depths=(1, 2), widths=(32, 64), normalization="batchnorm", num_classes=3, in_chans=3,
                        drop_rate=0.5)
    assert len(model.stages) == 2 and [len(stage) for stage in model.stages] == [1, 2]
    assert model.num_features == 64 and model.head.drop.p == 0.5
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 3)
    with pytest.raises(ValueError, match="normalization"):
        SmallResNet(normalization="groupnorm")
    with pytest.raises(ValueError, match="one entry per stage"):
        SmallResNet(depths=(1, 1), widths=(32, 64, 128))


@pytest.mark.parametrize("name", NF_NAMES)
def test_nf_members_have_no_normalization_layers(name):
    model = create(name)
    assert not [type(m).__name__ for m in model.modules() if isinstance(m, NORM_LAYERS)]
    assert all(isinstance(m, ScaledStdConv2d) for m in conv_and_linear_layers(model)[:-1])
    assert any(isinstance(m, nn.BatchNorm2d) for m in create(batchnorm_twin_name(name)).modules())


@pytest.mark.parametrize("size", FAMILY)
def test_twins_share_convs_and_multiply_adds(size):
    nf, bn = create(f"nf_resnet_{size}"), create(f"bn_resnet_{size}")

    def signature(model):
        return [
            (tuple(m.weight.shape), getattr(m, "stride", None), getattr(m, "padding", None),
             getattr(m, "dilation", None), getattr(m, "groups", None))
            for m in conv_and_linear_layers(model)
        ]

    def shortcut_pools(model):
        return [(m.kernel_size, m.stride, m.ceil_mode, m.count_include_pad)
                for m in model.modules() if isinstance(m, nn.AvgPool2d)]

    assert signature(nf) == signature(bn)
    assert shortcut_pools(nf) == shortcut_pools(bn) and len(shortcut_pools(nf)) == len(FAMILY[size][0]) - 1
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in conv_and_linear_layers(bn))
    assert not any("gain" in name for name, _ in bn.named_parameters())
    x = torch.randn(1, 1, 32, 32)
    nf_macs, bn_macs = multiply_adds(nf, x), multiply_adds(bn, x)
    assert abs(nf_macs - bn_macs) <= 0.05 * bn_macs
    assert 10e6 < nf_macs < 100e6  # CPU scale: tens of millions per 32 px image


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_classifier_init_and_reset(name):
    model = create(name)
    fc = model.get_classifier()
    assert fc is model.head.fc and fc is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert fc.weight.std().item() == pytest.approx(CLASSIFIER_INIT_STD, rel=0.1) and not fc.bias.any()
    model.reset_classifier(5)
    fc = model.get_classifier()
    assert model.num_classes == 5 and fc.out_features == 5
    assert fc.weight.std().item() == pytest.approx(CLASSIFIER_INIT_STD, rel=0.15) and not fc.bias.any()
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)


def effective_beta(block: NormFreeBlock) -> float:
    """beta, wherever the block keeps it: in `block.beta` (timm) or folded into conv1's weight scale."""
    fan_in = block.conv1.weight[0].numel()
    return block.beta * block.conv1.scale * fan_in ** 0.5 / RELU_GAMMA


@pytest.mark.slow
@pytest.mark.parametrize("skipinit", [True, False])
def test_nf_blocks_compute_what_timms_normfreeblock_computes(skipinit):
    """Same outputs and gradients (input and every parameter) as a plain timm NormFreeBlock holding beta.

    In float64, so that float32 rounding (beta applied to the weights instead of the activations) cannot
    hide a difference.
    """
    model = SmallResNet(depths=(2, 2), widths=(32, 64), skipinit=skipinit).double()
    blocks = [b for b in model.modules() if isinstance(b, NormFreeBlock)]
    betas = [1.0, (1 + ALPHA ** 2) ** -0.5, (1 + 2 * ALPHA ** 2) ** -0.5, (1 + ALPHA ** 2) ** -0.5]
    x = model.stem(torch.randn(4, 1, 16, 16, dtype=torch.float64)).detach()
    for block, beta in zip(blocks, betas):
        if skipinit:
            block.skipinit_gain.data.fill_(0.7)
        conv = block.conv2
        reference = NormFreeBlock(
            block.conv1.in_channels, block.conv3.out_channels, stride=conv.stride[0],
            alpha=ALPHA, beta=beta, bottle_ratio=0.25, ch_div=8, reg=False, skipinit=skipinit, act_layer=nn.ReLU,
            conv_layer=partial(ScaledStdConv2d, gamma=RELU_GAMMA, eps=conv.eps),
        )
        reference.double().load_state_dict(block.state_dict())
        x.requires_grad_()
        results = []
        for module in (block, reference):
            out = module(x)
            results.append((out, torch.autograd.grad(out.square().sum(), [x, *module.parameters()])))
        (ours, our_grads), (timms, timm_grads) = results
        torch.testing.assert_close(ours, timms)
        for ours_grad, timms_grad in zip(our_grads, timm_grads, strict=True):
            torch.testing.assert_close(ours_grad, timms_grad)
        x = ours.detach()


@pytest.mark.slow
@pytest.mark.parametrize("name", NF_NAMES)
def test_signal_propagation_at_init(name):
    """2101.08692, Sec. 4: with beta_i = 1/sqrt(Var h_i), each block adds alpha^2 (in units of the variance
    its stage's transition resets to), and the transition's shortcut, fed h_i/beta_i, restarts at 1 + alpha^2.

    Measured as the average channel variance of each block's output on N(0, 1) images, with the skip gains
    opened (1 instead of SkipInit's 0, where SkipInit is on). timm's NFNet-style transition shortcut average-pools
    before its 1x1 conv, which divides the variance of spatially uncorrelated features by up to 4 (the paper's
    NF-ResNets used a strided conv); so the level is checked in the first stage, whose transition does not
    pool, and the growth relative to the reset level in every stage.
    """
    model = create(name)
    blocks = [[b for b in stage if isinstance(b, NormFreeBlock)] for stage in model.stages]
    variances = {}
    for stage in blocks:
        for block in stage:
            if block.skipinit_gain is not None:
                block.skipinit_gain.data.fill_(1.0)
            block.register_forward_hook(lambda b, i, out: variances.__setitem__(b, out.var((0, 2, 3)).mean().item()))
    with torch.no_grad():
        model(torch.randn(32, 1, 32, 32))

    previous_depth = 0
    for stage_idx, stage in enumerate(blocks):
        for k, block in enumerate(stage):
            expected_input_var = 1 + (k if k else previous_depth) * ALPHA ** 2
            assert effective_beta(block) == pytest.approx(expected_input_var ** -0.5)
        reset_level = variances[stage[0]] / (1 + ALPHA ** 2)
        for k, block in enumerate(stage):
            if stage_idx == 0:
                assert variances[block] == pytest.approx(1 + (k + 1) * ALPHA ** 2, rel=0.1)
            if k:
                growth = (variances[block] - variances[stage[k - 1]]) / reset_level
                assert growth == pytest.approx(ALPHA ** 2, rel=0.5)
        if stage_idx:  # the accumulated variance does not carry over the transition
            assert variances[stage[0]] < variances[blocks[stage_idx - 1][-1]]
        previous_depth = len(stage)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trains_on_a_fixed_batch(name):
    model = create(name).train()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_pickles(name):
    model = create(name).eval()
    x = torch.randn(2, 1, 32, 32)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert restored.pretrained_cfg == model.pretrained_cfg
