"""torch's fused optimizers under fastai (`fast_adam`, `fast_nesterov_sgd`) against fastai's own implementations.

A short fit drives each pair with fastai's one-cycle schedule (lr and momentum), discriminative lrs over two layer
groups, freeze / unfreeze and decoupled weight decay with fastai's exemptions (biases and BatchNorm parameters); the
weights after it must agree within float32 rounding. fastai's Adam and nesterov_sgd are the independent reference:
fastai computes them one parameter at a time, from Python."""
import copy
from functools import cache, partial
from unittest import mock

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastcore.foundation import L
from torch import nn
from torch.utils.data import TensorDataset

from normfree.learner import optim
from normfree.learner.optim import fast_adam, fast_nesterov_sgd, nesterov_sgd

PAIRS = {"adam": (partial(Adam, wd=0.1), partial(fast_adam, wd=0.1)),
         "sgd": (partial(nesterov_sgd, wd=0.1), partial(fast_nesterov_sgd, wd=0.1))}


def _dls() -> DataLoaders:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 2, 6, 6, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    return DataLoaders(DataLoader(TensorDataset(x, y), bs=16, shuffle=False), DataLoader(TensorDataset(x, y), bs=48))


def _model() -> nn.Module:
    torch.manual_seed(3)  # no conv bias before the BatchNorm: its gradient is 0 up to rounding, which Adam amplifies
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _two_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(model[:2].parameters()), list(model[4].parameters())]


def _fit(opt_func, wd_bn_bias: bool) -> dict[str, torch.Tensor]:
    learn = Learner(_dls(), _model(), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, splitter=_two_groups,
                    wd_bn_bias=wd_bn_bias)
    with learn.no_bar(), learn.no_logging():
        learn.freeze()  # the body trains its BatchNorm only (fastai's train_bn), the head everything
        learn.fit_one_cycle(1, 3e-2)
        learn.unfreeze()
        learn.fit_one_cycle(1, slice(3e-3, 3e-2))
    return learn.model.state_dict()


@cache
def _fastai_fit(name: str, wd_bn_bias: bool) -> dict[str, torch.Tensor]:
    return _fit(PAIRS[name][0], wd_bn_bias)


@pytest.mark.parametrize("name, wd_bn_bias, fused", [("adam", False, True), ("adam", True, True),
                                                    ("adam", False, False), ("sgd", False, True), ("sgd", True, False)],
                         ids=["adam-fused", "adam-fused-bias-wd", "adam-foreach", "sgd-fused", "sgd-foreach-bias-wd"])
def test_fast_optimizer_fits_as_fastais(name, wd_bn_bias, fused):
    expected = _fastai_fit(name, wd_bn_bias)
    devices = optim._get_fused_kernels_supported_devices() if fused else []
    with mock.patch.object(optim, "_get_fused_kernels_supported_devices", return_value=devices):
        got = _fit(PAIRS[name][1], wd_bn_bias)
    initial = _model().state_dict()
    for key, value in expected.items():
        assert not torch.equal(value, initial[key]) or key.endswith("num_batches_tracked"), key  # it trained
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_fused_where_the_device_has_a_kernel(fused):
    params = list(_model().parameters())
    devices = ["cpu"] if fused else ["cuda"]
    with mock.patch.object(optim, "_get_fused_kernels_supported_devices", return_value=devices):
        group = fast_adam(params, lr=1e-3).opt.param_groups[0]
    assert (group["fused"], group["foreach"]) == ((True, None) if fused else (None, True))


def test_hypers_are_fastais():
    """fastai's schedulers and Learner set lr, mom, sqr_mom, eps and wd by their fastai names, per layer group."""
    model = _model()
    opt = fast_adam(_two_groups(model), lr=1e-3)
    opt.set_hypers(lr=slice(1e-4, 1e-2), mom=0.85, sqr_mom=0.98, wd=0.2)
    assert [(h["lr"], h["mom"], h["sqr_mom"], h["eps"], h["wd"]) for h in opt.hypers] == [
        (1e-4, 0.85, 0.98, 1e-5, 0.2), (1e-2, 0.85, 0.98, 1e-5, 0.2)]
    assert all(group["weight_decay"] == 0 for group in opt.opt.param_groups)  # no L2 on top of the decoupled decay
    assert len(L(opt.param_lists)) == 2


def test_state_dict_round_trip_continues_the_same():
    """What agc_find and the epoch checkpoint rely on: a loaded state continues exactly as the original would."""
    model = _model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = fast_adam(list(model.parameters()), lr=1e-2)
    opt.step()
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    opt.step()
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, after[key]), key
