"""Per-sample AGC against an explicit loop over examples (float64 AGC reference per example).

The reference runs the model on one example at a time, takes that example's gradient of its own
loss term, clips it with the float64 reference of Eq. (3), and averages: nothing from normfree's
per-sample code is used.
"""
import copy
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, MSELossFlat
from fastai.optimizer import SGD
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.nfnet import NfCfg, NormFreeNet
from torch import nn

from agc_reference import per_example_clipping, per_example_reference, reference_agc, units_of
from fastai_helpers import dls_for, image_batch, tiny_nfnet
from normfree import AGC
from normfree.agc import excluded_parameters
from normfree.agc.per_sample import TUNING, PerSampleClipper, tuned
from normfree.agc.per_sample.layers import Layer

LR = 0.5
CLIPPING = 0.01


def eca_regnet():
    return tiny_nfnet(group_size=None, attn_layer="eca", attn_kwargs={}, act_layer="silu", extra_conv=True, reg=True,
                      skipinit=False, same_padding=False, gamma_in_act=False, num_features=0)


def nf_resnet():
    """timm's nf_resnet26 layout (NfCfg of `_nfres_cfg`) at a few thousand parameters."""
    return tiny_nfnet(stem_type="7x7_pool", stem_chs=8, group_size=None, attn_layer=None, attn_kwargs=None,
                      bottle_ratio=0.25, act_layer="relu", same_padding=False, gamma_in_act=False, skipinit=False,
                      num_features=0)


class TokenModel(nn.Module):
    """Embedding -> Conv1d -> LayerNorm -> Linear over positions: plain layers, two of them without a fast rule."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.conv = nn.Embedding(20, 6), nn.Conv1d(6, 8, 3, padding=1, groups=2)
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, tokens):
        h = self.conv(self.embed(tokens).transpose(1, 2)).relu().transpose(1, 2)
        return self.fc(self.norm(h)).mean(1)


def clipped_mean_gradient(model, x, y, loss_func, clipping=CLIPPING):
    """The gradient left by one backward pass with a PerSampleClipper installed (mean loss)."""
    unclipped = {id(p) for p in excluded_parameters(model)}
    clipper = PerSampleClipper(model, {id(p): clipping for p in model.parameters() if id(p) not in unclipped})
    clipper.grad_scale = torch.tensor(1.0 / len(x))
    model.zero_grad()
    clipper.start()
    loss_func(model(x), y).backward()
    clipper.stop()
    stats = clipper.collect([list(model.parameters())])[0]
    clipper.remove()
    return {n: p.grad.double() for n, p in model.named_parameters()}, stats


def relative_error(got, reference):
    diff = torch.cat([(got[n] - reference[n]).flatten() for n in reference])
    return float(diff.norm() / torch.cat([r.flatten() for r in reference.values()]).norm())


def assert_clips_as_the_loop(model, x, y):
    """One backward pass with a PerSampleClipper leaves the float64 loop over examples' clipped mean gradient,
    in every parameter, and clips as many (example, unit) pairs, some of them."""
    reference, clipped, units = per_example_clipping(model, x, y, F.cross_entropy)
    got, stats = clipped_mean_gradient(model, x, y, F.cross_entropy)
    assert relative_error(got, reference) < 1e-5
    for n in reference:  # every parameter, not only the large ones
        assert (got[n] - reference[n]).norm() <= 1e-3 * reference[n].norm() + 1e-12, n
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units) and clipped > 0  # exercised


MODELS = {
    "nfnet (SE, grouped, SAME, SkipInit, GELU)": (tiny_nfnet, image_batch),
    "nf_regnet (ECA Conv1d, extra conv, SiLU)": (eca_regnet, image_batch),
    "test_nfnet": (lambda: timm.create_model("test_nfnet", num_classes=5), partial(image_batch, n=3, size=32)),
    "nf_resnet (7x7 stem + pool, bottlenecks, ReLU)": (nf_resnet, partial(image_batch, size=32)),
    "nf_resnet_tiny (normfree)": (lambda: timm.create_model("nf_resnet_tiny", num_classes=5, in_chans=3),
                                  partial(image_batch, n=3)),
    "plain conv + linear": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(inplace=True), nn.Flatten(),
                                                  nn.Linear(196, 7), nn.Tanh(), nn.Linear(7, 5)), image_batch),
    "embedding, conv1d, layernorm": (TokenModel, lambda: (torch.randint(0, 20, (6, 9)), torch.randint(0, 5, (6,)))),
    # weights of squeezed rank 1, [6, 1, 1, 1] and [7, 1]: each one unit as a whole (DeepMind's rule)
    "single-unit layer weights": (lambda: nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), nn.Conv2d(6, 1, 3),
                                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 7),
                                                        nn.Tanh(), nn.Linear(7, 5)),
                                  partial(image_batch, channels=1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_a_loop_over_examples(name):
    make_model, make_batch = MODELS[name]
    model, (x, y) = make_model().train(), make_batch()
    assert_clips_as_the_loop(model, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_forward_pass_is_the_models_own_bit_for_bit(name, precision):
    """The clipper's layers compute what the model's own do, to the last bit: a last-bit difference moves a ReLU
    input near 0 across it and changes that position's gradient (on an H200 one weight of nf_resnet26 was 2e-2 off
    the loop over examples from one such position, when standardised weights were computed another way)."""
    make_model, make_batch = MODELS[name]
    model, (x, _) = make_model().train(), make_batch()
    context = partial(torch.autocast, "cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.enable_grad
    with context():
        expected = model(x)
    clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters()})
    clipper.start()
    with context():
        got = model(x)
    clipper.stop()
    clipper.remove()
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_clipping_each_example_differs_from_clipping_the_mean():
    model, (x, y) = tiny_nfnet(), image_batch()
    got, _ = clipped_mean_gradient(model, x, y, F.cross_entropy)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mean_then_clip = {n: reference_agc(p, p.grad, CLIPPING, 1e-3)[0] if n != "head.fc.weight" else p.grad.double()
                      for n, p in model.named_parameters()}
    assert relative_error(got, mean_then_clip) > 0.05


@pytest.mark.slow
def test_huge_clipping_gives_the_ordinary_gradient():
    model, (x, y) = tiny_nfnet(), image_batch()
    got, stats = clipped_mean_gradient(model, x, y, F.cross_entropy, clipping=1e9)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert relative_error(got, {n: p.grad.double() for n, p in model.named_parameters()}) < 1e-5
    assert stats.fraction == 0


def test_layers_are_restored_after_removal():
    model, (x, _) = tiny_nfnet(), image_batch()
    expected = model(x)
    clipper = PerSampleClipper(model, {})
    clipper.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(x), expected)


# --- through fastai ------------------------------------------------------------------------------
def fastai_update(model, x, y, loss_func, bs, cbs=(), **agc_kwargs):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    agc = AGC(CLIPPING, per_sample=True, **agc_kwargs)
    learn = Learner(dls_for(x, y, bs), model, loss_func=loss_func, opt_func=partial(SGD, mom=0.0, wd=0.0), lr=LR,
                    cbs=[agc, *cbs])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    return {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}, agc


def reference_step(model, x, y, loss_func):
    return {n: -LR * g for n, g in per_example_reference(model, x, y, loss_func).items()}


LOSSES = {
    "cross-entropy": (CrossEntropyLossFlat(), lambda y: y),
    "label smoothing": (LabelSmoothingCrossEntropyFlat(eps=0.1), lambda y: y),
    "multi-label BCE": (BCEWithLogitsLossFlat(), lambda y: F.one_hot(y, 5).float()),
    "MSE": (MSELossFlat(), lambda y: F.one_hot(y, 5).float()),
    "sum reduction": (CrossEntropyLossFlat(reduction="sum"), lambda y: y),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_fastai_losses(name):
    loss_func, targets = LOSSES[name]
    x, labels = image_batch(n=8)
    y = targets(labels)
    update, agc = fastai_update(tiny_nfnet(), x, y, loss_func, bs=8)
    per_example = (lambda p, t: loss_func(p, t)) if name != "sum reduction" else F.cross_entropy
    reference = reference_step(tiny_nfnet(), x, y, per_example)
    if name == "sum reduction":  # the step is the clipped *sum*: N times the clipped mean
        reference = {n: r * len(x) for n, r in reference.items()}
    assert relative_error(update, reference) < 1e-5
    assert "head.fc.weight" not in agc.history.parameter_names


@pytest.mark.slow
def test_gradient_accumulation_does_not_depend_on_the_split():
    x, y = image_batch(n=16)
    whole, _ = fastai_update(tiny_nfnet(), x, y, CrossEntropyLossFlat(), bs=16)
    split, agc = fastai_update(tiny_nfnet(), x, y, CrossEntropyLossFlat(), bs=4, cbs=[GradientAccumulation(16)])
    assert relative_error(split, whole) < 1e-5
    units = sum(len(units_of(p)) for n, p in tiny_nfnet().named_parameters() if n != "head.fc.weight")
    assert len(agc.history) == 1 and int(agc.history.units().sum()) == 16 * units  # one step, counted over 16 examples


@pytest.mark.slow
def test_fp16_clips_unscaled_per_example_gradients():
    """Under fp16 autocast with a 2**16 loss scale, the update matches fp32 per-sample AGC within fp16
    precision; clipping the scaled per-example gradients would shrink every clipped unit 65536-fold."""
    x, y = image_batch(n=8)
    fp32, _ = fastai_update(tiny_nfnet(), x, y, CrossEntropyLossFlat(), bs=8)
    model = tiny_nfnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learn = Learner(dls_for(x, y, 8), model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.0, wd=0.0),
                    lr=LR, cbs=[AGC(CLIPPING, per_sample=True)]).to_mixed_precision("fp16", init_scale=2.0**16)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    fp16 = {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}
    assert relative_error(fp16, fp32) < 2e-2


def test_batchnorm_is_refused_with_advice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))
    x, y = image_batch()
    learn = Learner(dls_for(x, y, 6), model, loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match="BatchNorm couples the examples.*normalizer-free"):
        learn.agc(per_sample=True)
    learn.add_cb(AGC(per_sample=True))
    with pytest.raises(ValueError, match="BatchNorm couples"), learn.no_bar(), learn.no_logging():
        learn.fit(1)
    assert not any("forward" in vars(m) for m in model.modules())  # nothing left installed


def test_a_loss_that_is_not_a_sum_over_examples_is_refused_by_name():
    def max_loss(pred, target):
        return F.cross_entropy(pred, target, reduction="none").max()

    x, y = image_batch()
    with pytest.raises(ValueError, match="mean or the sum.*max_loss"):
        fastai_update(tiny_nfnet(), x, y, max_loss, bs=6)


@pytest.mark.slow
def test_dropout_and_drop_path_run():
    torch.manual_seed(0)
    model = NormFreeNet(NfCfg(depths=(1, 1), channels=(16, 32), stem_chs=8, attn_layer=None), num_classes=5,
                        drop_rate=0.3, drop_path_rate=0.2)
    fresh = copy.deepcopy(model).train()
    x, y = image_batch(n=8)
    update, agc = fastai_update(model, x, y, CrossEntropyLossFlat(), bs=8)
    assert len(agc.history) == 1 and agc.history.rate() > 0 and all(torch.isfinite(u).all() for u in update.values())
    # The same seed draws the same dropout and drop-path masks. With nothing clipped, the per-example gradients
    # add up to autograd's gradient of the batch ...
    torch.manual_seed(1)
    got, _ = clipped_mean_gradient(fresh, x, y, F.cross_entropy, clipping=1e9)
    torch.manual_seed(1)
    fresh.zero_grad()
    F.cross_entropy(fresh(x), y).backward()
    assert relative_error(got, {n: p.grad.double() for n, p in fresh.named_parameters()}) < 1e-5
    # ... and an example's clipped gradient is the float64 reference's, under the same masks
    torch.manual_seed(2)
    reference, clipped, units = per_example_clipping(fresh, x[:1], y[:1], F.cross_entropy)
    torch.manual_seed(2)
    got, stats = clipped_mean_gradient(fresh, x[:1], y[:1], F.cross_entropy)
    assert relative_error(got, reference) < 1e-5
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units) and clipped > 0


def test_parameters_tied_between_modules_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match="shared by several modules: 0.weight is also 2.weight"):
        PerSampleClipper(model, {})


class ReusesALayer(nn.Module):
    """`inner` is applied twice: an example's gradient for it is the sum over both uses."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_a_layer_called_twice_in_one_forward_is_refused_and_removed():
    model = ReusesALayer()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    learn = Learner(dls_for(x, y, 4), model, loss_func=CrossEntropyLossFlat(), cbs=[AGC(per_sample=True)])
    for _ in range(2):  # a second fit installs afresh and refuses again, rather than training unclipped
        with pytest.raises(ValueError, match=r"inner \(Linear\) was called twice in one forward pass"), \
                learn.no_bar(), learn.no_logging():
            learn.fit(1)
        assert not any("forward" in vars(m) for m in model.modules()) and not model._forward_pre_hooks
    learn.remove_cb(AGC)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)  # the model itself is fine without per-sample AGC


def test_a_callback_that_reshapes_the_loss_per_example_is_refused():
    """The backward signal must be a uniform multiple of the loss's own gradient to recover g_i."""
    from fastai.callback.core import Callback

    class PenaliseConfidence(Callback):
        order = AGC.order + 1

        def after_loss(self):
            self.learn.loss_grad = self.learn.loss_grad + self.learn.pred.square().mean()

    x, y = image_batch()
    with pytest.raises(ValueError, match="not a multiple of the loss function's own gradient"):
        fastai_update(tiny_nfnet(), x, y, CrossEntropyLossFlat(), bs=6, cbs=[PenaliseConfidence()])


# --- module kinds: each one supported exactly, or refused before anything is trained -----------------
class OwnVectorUsedTwice(nn.Module):
    """A block with a layer-scale vector of its own, reshaped for channels and used twice around a child."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        gamma = self.gamma.reshape(1, -1, 1, 1)
        return x + self.conv(x * gamma).tanh() * gamma


class SquaredWeight(nn.Module):
    """A leaf module that uses its own parameter twice: x W W^T."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

    def forward(self, x):
        return x @ self.weight @ self.weight.t()


class PatchTokens(nn.Module):
    """A ViT's stem: a Linear patch embedding inside, a cls_token concatenated and a pos_embed added, both its own."""

    def __init__(self, dim=8, patches=16):
        super().__init__()
        self.proj = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.5)

    def forward(self, x):
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed


class Mixed(nn.Module):
    """Conv and Linear layers (book-keeping) between the kinds torch.func takes: a block with its own layer-scale
    vector, a stem with cls_token and pos_embed, LayerNorm, nn.MultiheadAttention (sequence first, with a
    key_padding_mask), timm's LayerScale and a module that uses its parameter twice."""

    def __init__(self):
        super().__init__()
        from timm.layers import LayerScale
        torch.manual_seed(0)
        self.stem, self.block = nn.Conv2d(3, 4, 3, stride=4, padding=1), OwnVectorUsedTwice()
        self.tokens, self.norm = PatchTokens(), nn.LayerNorm(8)
        self.attn, self.scale = nn.MultiheadAttention(8, 2), LayerScale(8, init_values=0.7)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), SquaredWeight())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.tokens(self.block(F.gelu(self.stem(x))))
        h = self.norm(t).transpose(0, 1)
        padding = torch.zeros(t.shape[:2], dtype=torch.bool)
        padding[:, -3:] = True  # every example ignores its last three positions
        t = t + self.scale(self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0].transpose(0, 1))
        return self.head((t + self.mlp(t))[:, 0])


def tiny_vit(**overrides):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 12,
                                                        "num_heads": 2, "num_classes": 5, **overrides})


def token_batch(n=6, length=5, dim=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, length, dim, generator=generator), torch.randint(0, 5, (n,), generator=generator)


class OnTokens(nn.Module):
    """`inner` on [examples, positions, dim] tokens (the first output of a tuple), then mean over positions."""

    def __init__(self, inner, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = inner, nn.Linear(dim, 5)

    def forward(self, x):
        h = self.inner(x)
        return self.head((h[0] if isinstance(h, tuple) else h).mean(1))


class SelfAttention(nn.Module):
    def __init__(self, dim=8, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, **kwargs)

    def forward(self, x):
        out, weights = self.attn(x, x, x)  # need_weights: the weights are an output too, with a gradient
        return out + weights.mean(1, keepdim=True).transpose(1, 2).expand_as(out)


MODULE_KINDS = {
    "timm ViT (cls_token, pos_embed, LayerNorm, attention)": (tiny_vit, partial(image_batch, n=4)),
    "own layer-scale vector reshaped and used twice": (
        lambda: OnTokens(nn.Sequential(OwnVectorUsedTwice(8), nn.Flatten(2)), dim=16),  # [examples, 8, 16]
        partial(image_batch, n=4, size=4, channels=8)),
    "nn.MultiheadAttention (batch first, its weights used)": (
        lambda: OnTokens(SelfAttention(batch_first=True)), token_batch),
    "nn.TransformerEncoderLayer (dropout 0)": (
        lambda: OnTokens(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)), token_batch),
    "mixed with conv and linear layers": (Mixed, partial(image_batch, n=4)),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("name", list(MODULE_KINDS))
def test_module_kinds_torch_func_takes_equal_a_loop_over_examples(name):
    make_model, make_batch = MODULE_KINDS[name]
    model, (x, y) = make_model().train(), make_batch()
    assert_clips_as_the_loop(model, x, y)


def test_a_vit_through_fastai_takes_the_loops_step():
    x, y = image_batch(n=4)
    update, agc = fastai_update(tiny_vit(), x, y, CrossEntropyLossFlat(), bs=4)
    assert relative_error(update, reference_step(tiny_vit(), x, y, F.cross_entropy)) < 1e-5
    assert {"cls_token", "pos_embed", "head.bias"} <= set(agc.history.parameter_names)


REFUSED = {
    "nn.LSTM": (lambda: OnTokens(nn.LSTM(8, 8, batch_first=True)), r"inner \(LSTM\): torch.func cannot"),
    "nn.GRU": (lambda: OnTokens(nn.GRU(8, 8, batch_first=True)), r"inner \(GRU\): torch.func cannot"),
    "nn.RNN": (lambda: OnTokens(nn.RNN(8, 8, batch_first=True)), r"inner \(RNN\): torch.func cannot"),
    "dropout in nn.MultiheadAttention": (lambda: OnTokens(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
                                         r"inner.self_attn \(MultiheadAttention\) draws random masks"),
    "drop-path in a timm ViT": (partial(tiny_vit, depth=2, drop_path_rate=0.2),  # block 0's rate is 0
                                r"takes the model \(VisionTransformer\).*blocks.1.drop_path1 \(DropPath\) draws"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("name", list(REFUSED))
def test_modules_per_sample_agc_cannot_clip_are_refused_by_name_before_the_first_batch(name):
    make_model, match = REFUSED[name]
    model = make_model()
    x, y = image_batch(n=4) if "ViT" in name else token_batch(n=4)
    learn = Learner(dls_for(x, y, 4), model, loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=match + ".*[Tt]urn per_sample off"):
        learn.agc(per_sample=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learn.add_cb(AGC(per_sample=True))  # not through learn.agc: the fit refuses, before its first batch
    with pytest.raises(ValueError, match=match), learn.no_bar(), learn.no_logging():
        learn.fit(1)
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any("forward" in vars(m) for m in model.modules())


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return F.dropout(x, 0.5, self.training) * self.gamma


@pytest.mark.bad_input
def test_dropout_called_inside_a_module_torch_func_takes_is_refused_by_name():
    model, (x, y) = OnTokens(FunctionalDropout()), token_batch()
    with pytest.raises(ValueError, match=r"cannot clip inner \(FunctionalDropout\): it draws random numbers"):
        clipped_mean_gradient(model, x, y, F.cross_entropy)


class SequenceFirst(nn.Module):
    """A Linear on [positions, examples, dim]: its rows are not the examples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(x.transpose(0, 1)).mean(0)


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["Linear", "nn.MultiheadAttention with a 3-D attn_mask"])
def test_layers_called_on_rows_that_are_not_the_examples_are_refused(name):
    x, y = token_batch()
    if name == "Linear":
        model, error, match = SequenceFirst(), ValueError, r"fc \(Linear\) was called on 5 rows .* 6 examples"
    else:
        attention = SelfAttention(batch_first=True)
        model = OnTokens(attention)
        attention.forward = lambda x: attention.attn(x, x, x, attn_mask=torch.zeros(12, 5, 5))[0]
        error, match = TypeError, r"attn \(MultiheadAttention\)'s attn_mask of shape \(12, 5, 5\) mixes examples"
    with pytest.raises(error, match=match):
        clipped_mean_gradient(model, x, y, F.cross_entropy)


# --- engine paths and tuning knobs ---------------------------------------------------------------
class StdConvNet(nn.Module):
    """timm ScaledStdConv2d layers with a gain (weight standardisation): 3x3, strided 1x1 and a grouped 3x3."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d
        torch.manual_seed(0)
        self.a = ScaledStdConv2d(3, 8, 3, padding=1, gain_init=1.0)
        self.b = ScaledStdConv2d(8, 8, 1, stride=2, gain_init=0.8)
        self.c = ScaledStdConv2d(8, 8, 3, padding=1, groups=2, gain_init=1.2)
        self.fc = nn.Linear(8, 5)
        for conv in (self.a, self.b, self.c):  # give each gain a spread of values with real gradients
            nn.init.uniform_(conv.gain, 0.5, 1.5)

    def forward(self, x):
        h = F.gelu(self.c(F.gelu(self.b(F.gelu(self.a(x))))))
        return self.fc(h.mean((2, 3)))


def test_a_layers_parameters_clip_at_their_own_lambdas():
    """Lambda per param group (`AGC(clipping=[...])`) can split a layer: its weight, gain and bias clip at different
    lambdas in one call, each against the loop over examples, with the counts at each parameter's own lambda."""
    model, (x, y) = StdConvNet().train(), image_batch()
    lambdas = {n: CLIPPING * {"weight": 2.0, "gain": 0.5, "bias": 0.25}[n.split(".")[1]]
               for n, _ in model.named_parameters() if n != "fc.weight"}
    reference_model = copy.deepcopy(model)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in reference_model.named_parameters()}
    clipped = dict.fromkeys(lambdas, 0)
    for i in range(len(x)):
        reference_model.zero_grad()
        F.cross_entropy(reference_model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in reference_model.named_parameters():
            if n not in lambdas:  # the classifier weight: not clipped
                expected[n] += p.grad.double() / len(x)
                continue
            grad, units = reference_agc(p, p.grad, lambdas[n], 1e-3)
            expected[n] += grad / len(x)
            clipped[n] += units
    params = dict(model.named_parameters())
    clipper = PerSampleClipper(model, {id(params[n]): lam for n, lam in lambdas.items()})
    clipper.grad_scale = torch.tensor(1.0 / len(x))
    clipper.start()
    F.cross_entropy(model(x), y).backward()
    clipper.stop()
    names = list(lambdas)
    stats = clipper.collect([[params[n] for n in names]])[0]
    assert stats.clipped.tolist() == [clipped[n] for n in names] and sum(clipped.values()) > 0
    assert relative_error({n: p.grad.double() for n, p in params.items()}, expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["conv", "bmm"])
@pytest.mark.parametrize("name", ["nf_resnet (7x7 stem + pool, bottlenecks, ReLU)",
                                  "nfnet (SE, grouped, SAME, SkipInit, GELU)",
                                  "embedding, conv1d, layernorm", "standardised convs with gains"])
def test_kxk_methods_equal_a_loop_over_examples(name, method):
    make_model, make_batch = MODELS.get(name, (StdConvNet, image_batch))
    model, (x, y) = make_model().train(), make_batch()
    with tuned(kxk_weight_grads=method):
        assert_clips_as_the_loop(model, x, y)


def test_the_direct_clipped_sum_with_weight_standardisation_equals_the_loop():
    """Materialised g_i of standardised convs with gains: the clipped sum is taken from g_i, then
    standardisation's backward; the gains' per-example gradients come from the same sums."""
    model, (x, y) = StdConvNet().train(), image_batch(n=5)
    reference, clipped, units = per_example_clipping(model, x, y, F.cross_entropy)
    got, stats = clipped_mean_gradient(model, x, y, F.cross_entropy)
    for n in ("a.weight", "a.gain", "b.weight", "b.gain", "c.weight", "c.gain"):
        assert (got[n] - reference[n]).norm() <= 1e-5 * reference[n].norm() + 1e-12, n
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units) and 0 < clipped < units


class OffsetInputStdConvs(nn.Module):
    """Standardised 1x1 and 3x3 convolutions on inputs that share a large mean (as post-activation inputs do):
    each per-example weight gradient is then mostly its mean over the fan-in, which standardisation removes."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d
        torch.manual_seed(0)
        self.a = ScaledStdConv2d(6, 8, 1, gain_init=1.0)
        self.b = ScaledStdConv2d(8, 8, 3, padding=1, gain_init=1.0)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.b(self.a(x) + 5.0).mean((2, 3)))


@pytest.mark.parametrize("knobs", [dict(cpu_pass_cost=0.0, kxk_weight_grads="conv"),
                                   dict(cpu_pass_cost=0.0, kxk_weight_grads="bmm"), dict(cpu_pass_cost=1e9)],
                         ids=["materialised by convolution", "materialised by matmul", "ghost norms"])
def test_standardised_layers_on_inputs_with_a_large_mean_keep_float32_accuracy(knobs):
    """Every tensor within 1e-5 of the loop over examples run in float64, as float32 backprop itself is here
    (ordinary gradients: <= 5e-6). The norms of dL/dW must not come from subtracting the fan-in mean's square
    from sum g^2: that cancellation cost 1e-4 here in float32 (2e-2 on a GPU, with inputs of mean 30, 4e-3)."""
    model = OffsetInputStdConvs().train()
    torch.manual_seed(1)
    x, y = 5.0 + torch.randn(4, 6, 8, 8), torch.randint(0, 5, (4,))
    reference, clipped, units = per_example_clipping(copy.deepcopy(model).double(), x.double(), y, F.cross_entropy,
                                                     clipping=0.002)
    with tuned(**knobs):
        got, stats = clipped_mean_gradient(model, x, y, F.cross_entropy, clipping=0.002)
    for n in reference:
        assert (got[n] - reference[n]).norm() <= 1e-5 * reference[n].norm(), n
    assert (int(stats.clipped.sum()), int(stats.units.sum())) == (clipped, units) and clipped > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nfnet (SE, grouped, SAME, SkipInit, GELU)", "single-unit layer weights",
                                  "standardised convs with gains", "embedding, conv1d, layernorm"])
def test_clip_counts_per_parameter_equal_the_loop_over_two_backward_passes(name):
    """The units clipped and the units counted, per parameter and per group, summed over two backward passes
    (the two halves of the batch, as under gradient accumulation) before one `collect`, are the loop's."""
    make_model, make_batch = MODELS.get(name, (StdConvNet, image_batch))
    model, (x, y) = make_model().train(), make_batch()
    unclipped = {id(p) for p in excluded_parameters(model)}
    params = list(model.parameters())
    reference = copy.deepcopy(model)
    expected = [0] * len(params)
    for i in range(len(x)):
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for k, (p, r) in enumerate(zip(params, reference.parameters())):
            expected[k] += 0 if id(p) in unclipped else reference_agc(r, r.grad, CLIPPING, 1e-3)[1]
    clipper = PerSampleClipper(model, {id(p): CLIPPING for p in params if id(p) not in unclipped})
    clipper.start()
    for half in (slice(0, 3), slice(3, None)):
        clipper.grad_scale = torch.tensor(1.0 / len(x[half]))
        F.cross_entropy(model(x[half]), y[half]).backward()
    stats = clipper.collect([params[:2], params[2:]])
    clipper.remove()
    assert torch.cat([s.clipped for s in stats]).tolist() == expected
    assert sum(expected) > 0
    assert torch.cat([s.units for s in stats]).tolist() == [
        0 if id(p) in unclipped else len(x) * (1 if p.squeeze().ndim <= 1 else p.shape[0]) for p in params]
    assert int(torch.cat([s.nonfinite for s in stats]).sum()) == 0


def test_an_example_with_a_non_finite_gradient_is_counted_and_left_unclipped():
    make_model, make_batch = MODELS["plain conv + linear"]
    model, (x, y) = make_model().train(), make_batch()
    x[2, 0, 0, 0] = float("inf")
    got, stats = clipped_mean_gradient(model, x, y, F.cross_entropy)
    params = dict(model.named_parameters())
    expected = [0 if n == "5.weight" else (1 if p.squeeze().ndim <= 1 else p.shape[0]) for n, p in params.items()]
    assert stats.nonfinite.tolist() == expected  # every unit of example 2, in every clipped parameter
    assert not torch.isfinite(got["0.weight"]).all()  # left unchanged (factor 1), as ordinary AGC does


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(budget=st.integers(1, 64 << 10), method=st.sampled_from(["conv", "bmm"]))
def test_chunks_of_any_size_give_the_result_of_one_chunk(budget, method):
    """A tiny scratch budget (many chunks, down to one example each) changes nothing but rounding."""
    model, (x, y) = tiny_nfnet(), image_batch(n=7)
    with tuned(cpu_scratch_bytes=1 << 40, kxk_weight_grads=method):
        whole, whole_stats = clipped_mean_gradient(model, x, y, F.cross_entropy)
    with tuned(cpu_scratch_bytes=budget, kxk_weight_grads=method):
        chunked, stats = clipped_mean_gradient(model, x, y, F.cross_entropy)
    assert relative_error(chunked, whole) < 1e-6
    assert torch.equal(stats.units, whole_stats.units) and torch.equal(stats.clipped, whole_stats.clipped)
    assert int(stats.units.sum()) == len(x) * sum(len(units_of(p)) for n, p in model.named_parameters()
                                                  if n != "head.fc.weight")


def test_tuning_knobs_are_checked_and_restored():
    from normfree.agc.per_sample import TUNING
    before = (TUNING.cpu_scratch_bytes, TUNING.cuda_scratch_bytes, TUNING.kxk_weight_grads)
    with pytest.raises(TypeError, match="no tuning knob 'chunk'"), tuned(chunk=3):
        pass
    with tuned(kxk_weight_grads="im2col"), pytest.raises(ValueError, match="kxk_weight_grads must be one of"):
        clipped_mean_gradient(tiny_nfnet(), *image_batch(), F.cross_entropy)
    assert (TUNING.cpu_scratch_bytes, TUNING.cuda_scratch_bytes, TUNING.kxk_weight_grads) == before
    assert TUNING.kxk_method(torch.device("cpu")) == "conv" and TUNING.kxk_method(torch.device("cuda")) == "bmm"


def test_the_gpu_scratch_budget_comes_from_the_devices_memory(monkeypatch):
    """On CUDA: a quarter of what the allocator holds, at most half of what is free (driver plus the allocator's
    cached blocks), at least 16 MiB; the CPU keeps its cache-sized budget; a number set by hand wins."""
    from normfree.agc.per_sample import TUNING
    cuda = torch.device("cuda", 0)
    memory = {"held": 8 << 30, "reserved": 9 << 30, "free": 40 << 30}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["held"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 80 << 30))
    assert TUNING.scratch_bytes(cuda) == 2 << 30
    memory.update(held=60 << 30, reserved=60 << 30, free=4 << 30)
    assert TUNING.scratch_bytes(cuda) == 2 << 30  # half of the 4 GiB free
    memory.update(held=1 << 20, reserved=1 << 20)
    assert TUNING.scratch_bytes(cuda) == 16 << 20
    assert TUNING.scratch_bytes(torch.device("cpu")) == 16 << 20
    with tuned(cuda_scratch_bytes=123 << 20):
        assert TUNING.scratch_bytes(cuda) == 123 << 20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nfnet (SE, grouped, SAME, SkipInit, GELU)", "standardised convs with gains"])
def test_bfloat16_autocast_on_the_cpu_is_close_to_the_loop(name):
    """Under bf16 autocast the per-example products run in bf16 (norms in float32): within bf16 precision
    of the float64 loop over examples of the float32 model."""
    make_model, make_batch = MODELS.get(name, (StdConvNet, image_batch))
    model, (x, y) = make_model().train(), make_batch()
    reference, clipped, units = per_example_clipping(model, x, y, F.cross_entropy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, stats = clipped_mean_gradient(model, x, y, lambda p, t: F.cross_entropy(p.float(), t))
    assert relative_error(got, reference) < 2e-2
    assert int(stats.units.sum()) == units and stats.fraction == pytest.approx(clipped / units, abs=0.02) and clipped


@settings(max_examples=25, deadline=None)
@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)))
def test_patches_are_torchs_unfold(kernel, stride, padding, dilation):
    from normfree.agc.per_sample.layers import Layer
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups=2)
    x = torch.randn(3, 4, 9, 8)
    expected = F.unfold(x, kernel, dilation, padding, stride)
    assert torch.equal(Layer.of(conv).patches(x), expected.reshape(3, 2, -1, expected.shape[-1]))


# --- per-layer CUDA graphs: their book-keeping, emulated on the CPU --------------------------------------------
def graphed_steps(make_model, make_batch, mode, steps=5, device="cpu", set_to_none=True):
    """SGD steps with per-sample AGC and `layer_graphs=mode`: per step the gradients and clip counts, and the loop's
    reference for the last step. New inputs and loss scales every step; steps 3 and 4 accumulate two half-batch
    passes (a gradient taken from a graph's own output tensor instead of a copy would be overwritten there).
    `set_to_none`: how the gradients are zeroed between steps (None, as torch's default, or zeros in place, as
    fastai's)."""
    torch.manual_seed(0)
    model = make_model().train().to(device)
    x0, y0 = (t.to(device) for t in make_batch())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    unclipped = {id(p) for p in excluded_parameters(model)}
    grads, counts = [], []
    with tuned(layer_graphs=mode):
        clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters() if id(p) not in unclipped})
        for step in range(steps):
            order = torch.randperm(len(x0), generator=torch.Generator().manual_seed(step)).to(device)
            x, y = x0[order], y0[order]
            if x.is_floating_point():
                x = x * (1 + 0.2 * step)
            scale = (1.0, 8.0, 0.5, 3.0, 2.0)[step]
            # accumulated passes from step 3 on: the half-batch layout is captured in step 3, replayed in step 4
            parts = [slice(0, len(x) // 2), slice(len(x) // 2, len(x))] if step >= 3 else [slice(0, len(x))]
            if step == steps - 1:  # the loss is scaled, the clipping is not: the clipped mean, scaled
                reference = {n: g * scale for n, g in per_example_reference(model, x, y, F.cross_entropy).items()}
            optimizer.zero_grad(set_to_none=set_to_none)
            clipper.start()
            for part in parts:
                clipper.grad_scale = torch.tensor(scale / len(x), device=device)
                (F.cross_entropy(model(x[part]), y[part], reduction="sum") * scale / len(x)).backward()
            clipper.stop()
            stats = clipper.collect([list(model.parameters())])[0]
            grads.append({n: p.grad.double().clone() for n, p in model.named_parameters()})
            counts.append((stats.clipped.tolist(), stats.units.tolist()))
            optimizer.step()
        clipper.remove()
    return grads, counts, reference


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nfnet (SE, grouped, SAME, SkipInit, GELU)", "standardised convs with gains",
                                  "embedding, conv1d, layernorm", "plain conv + linear"])
def test_layer_graphs_replay_the_steps_without_graphs(name):
    """TUNING.layer_graphs="emulated" runs the graphs' book-keeping on the CPU (the recorded work re-run on the arena's
    tensors, its results copied into the recorded outputs, as a replay rewrites a graph's own tensors): over steps with
    new inputs, weights, loss scales and an accumulated pass, every step's gradients and clip counts are those of the
    steps without graphs, and the last step's gradient is the loop over examples."""
    make_model, make_batch = MODELS.get(name, (StdConvNet, image_batch))
    eager, eager_counts, reference = graphed_steps(make_model, make_batch, "off")
    graphed, graphed_counts, _ = graphed_steps(make_model, make_batch, "emulated")
    assert graphed_counts == eager_counts
    for step, (got, expected) in enumerate(zip(graphed, eager)):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12, msg=f"step {step}, {n}")
    assert relative_error(graphed[-1], reference) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["nfnet (SE, grouped, SAME, SkipInit, GELU)", "standardised convs with gains",
                                  "embedding, conv1d, layernorm"])
def test_layer_graphs_on_cuda_replay_the_steps_without_graphs(name, monkeypatch):
    """Real CUDA graphs: what the emulation cannot see (a graph reads the addresses it was captured with, never
    Python's current objects) shows here as a difference from the steps without graphs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    make_model, make_batch = MODELS.get(name, (StdConvNet, image_batch))
    eager, eager_counts, reference = graphed_steps(make_model, make_batch, "off", device="cuda")
    graphed, graphed_counts, _ = graphed_steps(make_model, make_batch, "cuda", device="cuda")
    assert graphed_counts == eager_counts
    for step, (got, expected) in enumerate(zip(graphed, eager)):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-9, msg=f"step {step}, {n}")
    assert relative_error(graphed[-1], reference) < 1e-5


@pytest.mark.slow
def test_layer_graphs_replay_the_steps_without_graphs_into_gradients_zeroed_in_place():
    """fastai zeroes `.grad` in place: replayed gradients are then added into it (not handed out as copies)."""
    eager, eager_counts, reference = graphed_steps(StdConvNet, image_batch, "off", set_to_none=False)
    graphed, graphed_counts, _ = graphed_steps(StdConvNet, image_batch, "emulated", set_to_none=False)
    assert graphed_counts == eager_counts
    for step, (got, expected) in enumerate(zip(graphed, eager)):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12, msg=f"step {step}, {n}")
    assert relative_error(graphed[-1], reference) < 1e-5


def _memory_order(t: torch.Tensor) -> list[int]:
    """The strides of `t`'s dims of size > 1 (those of size 1 may have any)."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_replayed_layer_hands_out_new_gradients_as_views_of_one_copy_in_the_parameters_layouts(channels_last):
    """Where `.grad` is None, a replayed layer's gradients (weight, gain, bias) are views of one copy, each in its
    parameter's layout, which autograd keeps as they are (it would copy each of a graph's own tensors), and they
    are the gradients of the steps without graphs."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = image_batch()
    grads = {}
    for mode in ("off", "emulated"):
        model = StdConvNet().train().to(memory_format=layout)
        clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters() if p is not model.fc.weight})
        with tuned(layer_graphs=mode):
            for _ in range(3):  # eager, captured and replayed, replayed
                model.zero_grad(set_to_none=True)
                clipper.grad_scale = torch.tensor(1.0 / len(x))
                clipper.start()
                F.cross_entropy(model(x.to(memory_format=layout)), y).backward()
                clipper.stop()
        clipper.remove()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        for conv in (model.a, model.b, model.c):
            trio = (conv.weight, conv.gain, conv.bias)
            assert all(_memory_order(p.grad) == _memory_order(p) for p in trio)
            shared = len({p.grad.untyped_storage().data_ptr() for p in trio}) == 1
            assert shared == (mode == "emulated")
    for n, expected in grads["off"].items():
        torch.testing.assert_close(grads["emulated"][n], expected, rtol=1e-6, atol=1e-12, msg=n)


@pytest.mark.slow
def test_a_layer_graph_that_cannot_be_captured_warns_once_and_the_layer_runs_without(monkeypatch):
    from normfree.agc.per_sample.graphs import LayerGraphs

    real_capture = LayerGraphs._capture

    def refuse(self, mode, work, x, signal, like):  # fails after the work has called clip_factors, as a capture can
        def failing(*args):
            work(*args)
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_capture(self, mode, failing, x, signal, like)

    monkeypatch.setattr(LayerGraphs, "_capture", refuse)
    eager, eager_counts, _ = graphed_steps(StdConvNet, image_batch, "off", steps=3)
    with pytest.warns(RuntimeWarning, match="could not be captured .RuntimeError: operation not permitted") as warned:
        graphed, graphed_counts, _ = graphed_steps(StdConvNet, image_batch, "emulated", steps=3)
    assert len([w for w in warned if "could not be captured" in str(w.message)]) == 1
    assert graphed_counts == eager_counts
    for got, expected in zip(graphed, eager):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12)


def test_a_model_with_layer_graphs_copies_without_them():
    """A deep copy (an EMA of the model, a reference loop) of a model whose clipper holds graphs: the copy's clipper
    starts without graphs (CUDA graphs and streams cannot be copied), and the copy predicts as the original."""
    torch.manual_seed(0)
    model, (x, y) = StdConvNet().train(), image_batch()
    with tuned(layer_graphs="emulated"):
        clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters()})
        clipper.start()
        for _ in range(3):
            clipper.grad_scale = torch.tensor(1.0 / len(x))
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        assert clipper.graphs.captured > 0
        twin = copy.deepcopy(model)
    twin_clipper = twin.a.forward.args[0]
    assert twin_clipper is not clipper and twin_clipper.graphs.captured == 0
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["emulated", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_inputs_of_ever_new_shapes_capture_at_most_max_layouts_graphs_per_layer(mode, monkeypatch):
    """Sequences of changing lengths: each length seen twice, and no layer holds more than MAX_LAYOUTS graphs; the
    gradients are those without graphs ("cuda": real graphs, on a GPU)."""
    from normfree.agc.per_sample.graphs import MAX_LAYOUTS

    device = "cuda" if mode == "cuda" else "cpu"
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    def steps(mode):
        torch.manual_seed(0)
        model = TokenModel().train().to(device)
        grads = []
        with tuned(layer_graphs=mode):
            clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters()})
            clipper.start()
            for length in [5, 6, 7, 8, 9, 10] * 2:
                x = torch.randint(0, 20, (4, length), generator=torch.Generator().manual_seed(length)).to(device)
                model.zero_grad()
                clipper.grad_scale = torch.tensor(0.25, device=device)
                F.cross_entropy(model(x), x[:, 0] % 5).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
        return grads, clipper.graphs

    eager, _ = steps("off")
    graphed, graphs = steps(mode)
    layers = sum(1 for m in TokenModel().modules() if Layer.of(m) is not None)
    assert graphs.captured == MAX_LAYOUTS * layers and not graphs.failures
    for got, expected in zip(graphed, eager):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_layer_graphs_knob_is_checked():
    with tuned(layer_graphs="sometimes"), pytest.raises(ValueError, match="layer_graphs must be one of"):
        TUNING.graph_mode(torch.device("cpu"))


def test_the_arena_is_made_once_for_the_largest_layer():
    """The layers' static inputs share one buffer, sized in the forward pass for the largest layer's input and output
    signal: the captures of later (smaller, then larger) layers make no second buffer."""
    torch.manual_seed(0)
    model, (x, y) = StdConvNet().train(), image_batch()
    with tuned(layer_graphs="emulated"):
        clipper = PerSampleClipper(model, {id(p): CLIPPING for p in model.parameters()})
        clipper.start()
        buffers = set()
        for _ in range(3):
            clipper.grad_scale = torch.tensor(1.0 / len(x))
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clipper.graphs.arena.buffer is not None:
                buffers.add(id(clipper.graphs.arena.buffer))
        sizes = []
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].nbytes + o.nbytes))
                 for m in (model.a, model.b, model.c, model.fc)]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
    assert len(buffers) == 1 and max(sizes) <= clipper.graphs.arena.buffer.numel() < max(sizes) + 2 * 256
