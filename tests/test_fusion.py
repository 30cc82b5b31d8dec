"""fuse_standardization: same outputs as the original, weights as the float64 formula, original untouched."""
import functools
import math
import operator

import pytest
import timm
import torch
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame, get_attn
from timm.models.nfnet import NormFreeBlock, model_cfgs
from torch import nn

from normfree.models.fusion import FusedNormFreeBlock, fuse_standardization

STD_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame)
MODELS = {
    "test_nfnet": ("test_nfnet", {}),
    "nf_resnet26": ("nf_resnet26", {}),
    "nf_resnet26_skipinit_droppath": ("nf_resnet26", dict(skipinit=True, drop_path_rate=0.1)),
    "nf_regnet_b0": ("nf_regnet_b0", {}),  # SE between conv2 and conv3, SiLU
    "nfnet_f0": ("nfnet_f0", {}),  # SE after conv3, extra conv, GELU, 71M params
    "dm_nfnet_f0": ("dm_nfnet_f0", {}),  # dynamic SAME padding, gamma in the activations, SkipInit
    "eca_nfnet_l0": ("eca_nfnet_l0", {}),  # ECA after conv3
    "nf_seresnet26": ("nf_seresnet26", {}),
    "nf_resnet_small": ("nf_resnet_small", dict(in_chans=3)),  # normfree's family: beta inside the conv scale
}
RELU_GAMMA = 1.7139588594436646  # DeepMind's measured ReLU gain (nfnets code); analytically sqrt(2 / (1 - 1/pi))
NF_EPS = 1e-5  # timm NfCfg.std_conv_eps
ALPHA = 0.2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These convolutions are small, so one thread is about as fast as two, and it does not stall, as
    two-thread OpenMP barriers do (10-50x here), when another process takes the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: nn.Module) -> nn.Module:
    """Gains and SkipInit gains away from their init (conv3's and SkipInit's are 0, which would hide the
    residual branches), biases nonzero, so that folding every scalar shows in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@functools.cache
def built(key: str) -> tuple[nn.Module, dict[str, torch.Tensor], nn.Module]:
    """(original in eval mode, a copy of its state taken before fusing, fused model), built once per key."""
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, num_classes=10, **kwargs)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before, fuse_standardization(model)


def reference_weight(conv: nn.Conv2d, gamma: float | None, eps: float) -> torch.Tensor:
    """gain * gamma/sqrt(fan_in) * (W - mean)/sqrt(var + eps), biased variance per output channel, in float64."""
    w = conv.weight.double().flatten(1)
    w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + eps)
    if gamma is not None:
        w = conv.gain.double().flatten(1) * gamma / math.sqrt(w.shape[1]) * w
    return w.reshape(conv.weight.shape)


def assert_weight(fused_conv: nn.Conv2d, expected: torch.Tensor) -> None:
    assert type(fused_conv) is nn.Conv2d
    torch.testing.assert_close(fused_conv.weight.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("key", MODELS)
def test_outputs_match_original(key):
    model, _, fused = built(key)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert not fused.training
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("key", MODELS)
def test_every_std_conv_and_block_replaced(key):
    model, _, fused = built(key)
    assert not [m for m in fused.modules() if isinstance(m, STD_CONVS + (NormFreeBlock,))]
    n_blocks = sum(isinstance(m, NormFreeBlock) for m in model.modules())
    assert n_blocks == sum(isinstance(m, FusedNormFreeBlock) for m in fused.modules()) > 0


@pytest.mark.parametrize("key", MODELS)
def test_original_unchanged(key):
    model, before, _ = built(key)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert any(isinstance(m, (ScaledStdConv2d, ScaledStdConv2dSame)) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, NormFreeBlock)]
    assert blocks and not any(getattr(b.act3, "inplace", False) for b in blocks)  # the copy's act3 runs in place
    assert not any(isinstance(m, FusedNormFreeBlock) for m in model.modules())


@pytest.mark.parametrize("key", ["nf_resnet26", "nf_regnet_b0"])
def test_intermediate_features_match(key):
    """Stage outputs too: the in-place add and act3 of the fused blocks overwrite no tapped feature."""
    model, _, fused = built(key)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model.forward_intermediates(x), fused.forward_intermediates(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected[0].abs().max().item())


def test_original_training_mode_kept():
    model = timm.create_model("test_nfnet", num_classes=10).train()
    fused = fuse_standardization(model)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in fused.modules())


def test_nf_resnet26_blocks_do_no_scalar_multiplication():
    _, _, fused = built("nf_resnet26")
    blocks = [m for m in fused.modules() if isinstance(m, FusedNormFreeBlock)]
    assert len(blocks) == sum(model_cfgs["nf_resnet26"].depths)  # one per block of timm's config
    for block in blocks:
        assert block.attn is None and block.attn_last is None and block.residual_scale is None
        assert not any(hasattr(block, a) for a in ("alpha", "beta", "skipinit_gain"))
        ops = {node.target for node in torch.fx.symbolic_trace(block).graph.nodes if node.op != "call_module"}
        assert not ops & {operator.mul, operator.imul, torch.mul, "mul", "mul_"}, ops


def test_scalars_after_attention_stay_in_one_scalar():
    """SE after conv3 (nf_seresnet26): the gate is not linear, so alpha * attn_gain stays out of conv3."""
    model, _, fused = built("nf_seresnet26")
    block, fused_block = model.stages[1][1], fused.stages[1][1]
    assert fused_block.residual_scale == pytest.approx(ALPHA * 2.0)  # attn_gain = 2
    assert_weight(fused_block.conv3, reference_weight(block.conv3, RELU_GAMMA, NF_EPS))
    torch.testing.assert_close(fused_block.conv3.bias, block.conv3.bias)


def test_weights_match_float64_formula():
    """Stem conv as is; in blocks beta = 1/sqrt(expected variance) in conv1 and the downsample conv, and
    alpha * skipinit_gain in conv3's weight and bias (2101.08692, Sec. 4)."""
    model, _, fused = built("nf_resnet26_skipinit_droppath")
    ref = functools.partial(reference_weight, gamma=RELU_GAMMA, eps=NF_EPS)
    assert_weight(fused.stem.conv, ref(model.stem.conv))
    # Stage 0 ends at variance 1 + 2 alpha^2; stage 1 resets it to 1 after its first block.
    first, second = model.stages[1][0], model.stages[1][1]
    assert_weight(fused.stages[1][0].downsample.conv, ref(first.downsample.conv) / math.sqrt(1 + 2 * ALPHA**2))
    assert_weight(fused.stages[1][0].conv1, ref(first.conv1) / math.sqrt(1 + 2 * ALPHA**2))
    assert_weight(fused.stages[1][1].conv1, ref(second.conv1) / math.sqrt(1 + ALPHA**2))
    assert_weight(fused.stages[1][1].conv2, ref(second.conv2))
    residual = ALPHA * second.skipinit_gain.double()
    assert_weight(fused.stages[1][1].conv3, ref(second.conv3) * residual)
    torch.testing.assert_close(fused.stages[1][1].conv3.bias.double(), second.conv3.bias.double() * residual)


def test_same_padding_kept_dynamic_or_static():
    model, _, fused = built("dm_nfnet_f0")
    originals = dict(model.named_modules())
    n_dynamic = n_same = 0
    for name, conv in fused.named_modules():
        if isinstance(conv, nn.Conv2d) and isinstance(originals[name], ScaledStdConv2dSame):
            original = originals[name]
            dynamic = original.same_pad
            # TF "SAME" padding is static only at stride 1 with an even total padding (timm's is_static_pad)
            static = all(s == 1 and d * (k - 1) % 2 == 0
                         for s, d, k in zip(original.stride, original.dilation, original.kernel_size))
            assert dynamic == (not static), name
            assert type(conv) is (Conv2dSame if dynamic else nn.Conv2d)
            assert conv.padding == original.padding
            n_dynamic, n_same = n_dynamic + dynamic, n_same + 1
    assert n_same == sum(isinstance(m, ScaledStdConv2dSame) for m in model.modules()) and n_dynamic > 0


def test_any_module_tree():
    """Standardised convs outside NormFreeNet, StdConv2d without gain, asymmetric SAME padding, a bare conv."""
    model = nn.Sequential(
        StdConv2d(3, 8, 3),
        nn.ReLU(),
        StdConv2dSame(8, 8, 3, stride=2, bias=True),  # dynamic SAME
        ScaledStdConv2dSame(8, 8, 3, gamma=1.5),  # stride 1: timm makes SAME static
        nn.Sequential(ScaledStdConv2d(8, 4, 1, groups=2)),
    ).eval()
    randomise(model)
    fused = fuse_standardization(model)
    convs = [type(m) for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [nn.Conv2d, Conv2dSame, nn.Conv2d, nn.Conv2d]
    x = torch.randn(2, 3, 33, 30)
    with torch.no_grad():  # outputs reach ~200: the float32 rounding of weights that timm computes alike
        expected = model(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert_weight(fused[0], reference_weight(model[0], gamma=None, eps=1e-6))
    assert_weight(fused[4][0], reference_weight(model[4][0], gamma=1.0, eps=1e-6))

    conv = ScaledStdConv2d(4, 6, 3, gamma=2.0)
    plain = fuse_standardization(conv)
    assert_weight(plain, reference_weight(conv, gamma=2.0, eps=1e-6))
    torch.testing.assert_close(plain.bias, conv.bias)


@pytest.mark.parametrize("attn_last", [False, True], ids=["no_attn_last", "attn_last"])
def test_fused_block_refuses_a_residual_scale_at_odds_with_attn_last(attn_last):
    """The scalar after attn_last, None exactly where there is none (alpha * gain then lies in conv3): without
    attn_last a given scale would be ignored, with it a missing one would fail at the first forward."""
    block = NormFreeBlock(8, 8, reg=not attn_last, attn_layer=get_attn("se") if attn_last else None, act_layer=nn.ReLU)
    assert (block.attn_last is not None) == attn_last
    with pytest.raises(ValueError, match="residual_scale must be None exactly where the block has no attn_last"):
        FusedNormFreeBlock(block, None if attn_last else 0.5)
