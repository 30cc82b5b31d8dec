"""Shared pieces of the fastai-level tests: a tiny model and data, and a reference SGD step with AGC."""
import copy
from functools import partial

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from timm.models.nfnet import NfCfg, NormFreeNet
from torch import nn
from torch.utils.data import TensorDataset

from agc_reference import reference_agc, units_of
from normfree import AGC

LR = 0.5


def tiny_data(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def tiny_dls(bs=32, n=32):
    x, y = tiny_data(n)
    return DataLoaders(DataLoader(TensorDataset(x, y), bs=bs, shuffle=False),
                       DataLoader(TensorDataset(x[:8], y[:8]), bs=8))


def tiny_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))


def make_learner(model, dls, cbs=(), **kwargs):
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.0, wd=0.0), lr=LR,
                   cbs=list(cbs), **kwargs)


def fit_quietly(learn, epochs=1):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs)
    return learn


def update_after_one_epoch(model, dls, cbs) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_quietly(make_learner(model, dls, cbs))
    return {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}


def reference_update(model, clipping, eps=1e-3, unclipped=("5.weight",)) -> dict[str, torch.Tensor]:
    """One SGD step on the whole batch with AGC from the float64 reference; classifier weight unclipped."""
    model = copy.deepcopy(model)
    x, y = tiny_data()
    F.cross_entropy(model(x), y).backward()
    return {
        n: -LR * (p.grad.double() if n in unclipped else reference_agc(p, p.grad, clipping, eps)[0])
        for n, p in model.named_parameters()
    }


def relative_difference(update, reference, names=None) -> float:
    names = names or list(reference)
    diff = torch.cat([(update[n] - reference[n]).flatten() for n in names])
    return float(diff.norm() / torch.cat([reference[n].flatten() for n in names]).norm())


CLIPPED = ["0.weight", "0.bias", "3.weight", "3.bias", "5.bias"]


class GradientsBeforeAGC(Callback):
    """At every optimizer step, each parameter and the gradient AGC is about to clip (copies, by name)."""

    order = AGC.order - 0.5  # after MixedPrecision's unscaling, before AGC

    def __init__(self, keep=None):
        self.keep = keep  # only the last `keep` steps (large models), or all

    def before_fit(self):
        self.steps = []

    def before_step(self):
        if self.keep is not None:
            self.steps = self.steps[len(self.steps) + 1 - self.keep:]
        self.steps.append({n: (p.detach().clone(), p.grad.detach().clone())
                           for n, p in self.learn.model.named_parameters() if p.grad is not None})


def reference_step_rates(steps, names, clipping, eps=1e-3) -> list[float]:
    """Per step, the fraction of the units of parameters `names` that the float64 reference clips."""
    rates = []
    for step in steps:
        clipped = sum(reference_agc(*step[n], clipping, eps)[1] for n in names)
        rates.append(clipped / sum(len(units_of(step[n][0])) for n in names))
    return rates


def tiny_nfnet(**overrides):
    """A few-thousand-parameter timm NormFreeNet; the defaults exercise SE, grouped convs, SAME padding
    (dynamic at stride 2), SkipInit gains, GELU with gamma in the activation."""
    cfg = dict(depths=(1, 1), channels=(16, 32), stem_type="3x3", stem_chs=8, group_size=8, attn_layer="se",
               attn_kwargs=dict(rd_ratio=0.5), skipinit=True, act_layer="gelu", same_padding=True, num_features=48,
               gamma_in_act=True)
    torch.manual_seed(0)
    model = NormFreeNet(NfCfg(**{**cfg, **overrides}), num_classes=5, in_chans=3)
    for module in model.modules():  # SkipInit gains start at 0; give them a value with a real gradient
        if getattr(module, "skipinit_gain", None) is not None:
            nn.init.constant_(module.skipinit_gain, 0.7)
    return model


def image_batch(n=6, size=16, channels=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=generator) * 2, torch.randint(0, 5, (n,), generator=generator)


def dls_for(x, y, bs):
    return DataLoaders(DataLoader(TensorDataset(x, y), bs=bs, shuffle=False),
                       DataLoader(TensorDataset(x[:4], y[:4]), bs=4))
