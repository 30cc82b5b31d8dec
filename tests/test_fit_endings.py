"""However a fit ends, normfree's callbacks leave nothing behind: no patched layers, no Recorder columns, no
autocast; gradients computed afterwards equal plain autograd's (issue: an interrupted per-sample fit left the
model clipping every later backward pass)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from torch import nn

from fastai_helpers import fit_quietly, make_learner, tiny_data, tiny_dls
from normfree import AGC
from normfree.learner import ClipRate


def smallest_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))


class RaiseAt(Callback):
    """Raise `error` at `event` of batch `batch` (0-based)."""

    def __init__(self, event, error, batch=1):
        self.event, self.error, self.batch = event, error, batch
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self):
        if not self.training or self.iter == self.batch:
            raise self.error


ENDINGS = {
    "success": None,
    "Ctrl-C in after_loss": ("after_loss", KeyboardInterrupt()),
    "error in another callback's before_batch": ("before_batch", RuntimeError("boom")),
    "error in after_backward": ("after_backward", ValueError("boom")),
    "error in before_step": ("before_step", RuntimeError("boom")),
    "CancelFitException": ("after_batch", CancelFitException()),
    "error in validation": ("after_pred", RuntimeError("boom")),
}


def assert_nothing_left(learn, model):
    patched = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert patched == []
    assert not any(isinstance(m, ClipRate) for m in learn.metrics)
    assert not torch.is_autocast_enabled("cpu")
    x, y = tiny_data(8)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        m.__dict__.pop("forward", None)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_way_a_fit_ends_leaves_nothing_behind(ending, per_sample, precision):
    model = smallest_model()
    cbs = [] if ENDINGS[ending] is None else [RaiseAt(*ENDINGS[ending])]
    learn = make_learner(model, tiny_dls(bs=8), cbs=cbs).agc(0.02, per_sample=per_sample)
    learn.to_mixed_precision(precision)
    error = type(ENDINGS[ending][1]) if ENDINGS[ending] and ending != "CancelFitException" else None
    with pytest.raises(error) if error else _nothing():
        fit_quietly(learn)
    learn.remove_cbs(cbs)
    assert_nothing_left(learn, model)
    fit_quietly(learn)  # and the learner trains again, with AGC and one set of columns
    assert learn.recorder.metric_names.filter(lambda n: n.startswith("agc_clip")) == ["agc_clip"]
    assert_nothing_left(learn, model)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_refused_loss_leaves_the_model_unpatched_and_the_next_fit_works():
    model = smallest_model()
    doubled = lambda pred, target: 2 * F.cross_entropy(pred, target) + pred.abs().max()  # noqa: E731 - not a mean/sum
    learn = make_learner(model, tiny_dls(bs=8)).agc(0.02, per_sample=True)
    learn.loss_func = doubled
    with pytest.raises(ValueError, match="mean or the sum"):
        fit_quietly(learn)
    assert_nothing_left(learn, model)
    learn.remove_cb(AGC)
    learn.loss_func = F.cross_entropy
    fit_quietly(learn)  # no "grad_scale was not set"


def test_agc_twice_and_a_refused_per_sample_fit_leave_one_set_of_columns():
    model = smallest_model()
    learn = make_learner(model, tiny_dls(bs=8)).agc(0.02)
    fit_quietly(learn)
    learn.agc(0.02, per_sample=True)
    learn.loss_func = lambda pred, target: F.cross_entropy(pred, target) + pred.abs().max()
    with pytest.raises(ValueError):
        fit_quietly(learn)
    learn.loss_func = F.cross_entropy
    learn.agc(0.02)
    assert len([cb for cb in learn.cbs if isinstance(cb, AGC)]) == 1
    fit_quietly(learn)
    names = list(learn.recorder.metric_names)
    assert names.count("agc_clip") == 1 and not any(n.startswith("agc_clip_") for n in names)
    assert_nothing_left(learn, model)


def test_validate_after_a_fit_returns_no_clip_columns():
    learn = make_learner(smallest_model(), tiny_dls(bs=8), metrics=[]).agc(0.02)
    fit_quietly(learn)
    with learn.no_bar():
        record = learn.validate()
    assert len(record) == 1  # the validation loss only
