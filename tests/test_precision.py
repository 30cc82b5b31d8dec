"""Mixed precision on the CPU with `DeviceMixedPrecision` / `learn.to_mixed_precision`."""
import copy
import warnings

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision

from fastai_helpers import CLIPPED, make_learner, relative_difference, tiny_dls, tiny_model, update_after_one_epoch
from normfree import AGC
from normfree.learner import DeviceMixedPrecision


class Probe(Callback):
    """Records, inside the fit, the prediction's dtype before mixed precision casts it back and the grad scaler."""

    order = MixedPrecision.order - 5

    def after_pred(self):
        self.pred_dtype = self.learn.pred.dtype
        self.grad_scaler = self.learn.scaler
        self.scaler_enabled = self.learn.scaler.is_enabled()


def fit_with(precision):
    probe = Probe()
    learn = make_learner(tiny_model(), tiny_dls(), [probe]).to_mixed_precision(precision)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    return learn, probe


def test_fp16_update_with_agc_matches_fp32():
    model = tiny_model()
    fp32 = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [AGC(0.01)])
    fp16 = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [DeviceMixedPrecision("fp16"), AGC(0.01)])
    assert relative_difference(fp16, fp32, CLIPPED) < 2e-2


def test_fp16_autocasts_on_the_cpu_with_a_cpu_grad_scaler():
    learn, probe = fit_with("fp16")
    assert probe.pred_dtype == torch.float16
    assert isinstance(probe.grad_scaler, torch.amp.GradScaler) and probe.scaler_enabled
    assert probe.grad_scaler._device == "cpu"
    assert not torch.is_autocast_enabled("cpu")


def test_fp16_on_a_cpu_warns_that_it_is_slow_and_names_bf16_and_bf16_does_not_warn():
    with pytest.warns(RuntimeWarning, match=r"fp16 mixed precision on a CPU.*use bf16"):
        fit_with("fp16")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fp16 mixed precision on a CPU")
        fit_with("bf16")


def test_bf16_autocasts_without_loss_scaling():
    learn, probe = fit_with("bf16")
    assert probe.pred_dtype == torch.bfloat16
    assert not probe.scaler_enabled
    assert not torch.is_autocast_enabled("cpu")


def test_it_is_fastai_mixed_precision_at_the_same_order_so_agc_clips_after_the_unscale():
    learn = make_learner(tiny_model(), tiny_dls()).to_mixed_precision("fp16").agc(0.01)
    callback = learn.mixed_precision
    assert isinstance(callback, MixedPrecision) and callback.order == 10
    assert learn.adaptive_clip.order == 11
    learn.to_mixed_precision("bf16")
    assert [type(cb) for cb in learn.cbs if isinstance(cb, MixedPrecision)] == [DeviceMixedPrecision]
    learn.to_fp32()
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        learn.to_mixed_precision("fp8")


class InterruptInForward(Callback):
    order = MixedPrecision.order - 5

    def after_pred(self):
        raise KeyboardInterrupt


def test_an_interrupt_inside_the_forward_pass_does_not_leave_autocast_on():
    learn = make_learner(tiny_model(), tiny_dls(), [InterruptInForward()]).to_mixed_precision("bf16")
    with pytest.raises(KeyboardInterrupt), learn.no_bar(), learn.no_logging():
        learn.fit(1)
    try:
        assert not torch.is_autocast_enabled("cpu")  # fastai skips after_fit here; normfree's fit guard does not
    finally:
        torch.set_autocast_enabled("cpu", False)
