"""The AGC fastai callback: ordering under mixed precision and accumulation, exclusions, statistics."""
import copy
import math
import warnings

import numpy as np
import pytest
import timm
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.learner import vision_learner
from torch import nn

from fastai_helpers import (
    CLIPPED,
    GradientsBeforeAGC,
    fit_quietly,
    make_learner,
    reference_step_rates,
    reference_update,
    relative_difference,
    tiny_dls,
    tiny_model,
    update_after_one_epoch,
)
from normfree import AGC
from normfree.agc import excluded_parameters
from normfree.learner import ClipRate, DeviceMixedPrecision
from normfree.models import find_classifier

# ---- ordering -------------------------------------------------------------------------------

class ClipBeforeUnscale(AGC):
    """The forum callback's bug: default-ish order, so it clips gradients still multiplied by the loss scale."""

    order = MixedPrecision.order - 1


class ClipEachMicroBatch(AGC):
    """Other libraries' bug: clips every micro-batch instead of the accumulated gradient."""

    order = GradientAccumulation.order - 1


def test_fp32_step_matches_reference():
    model = tiny_model()
    reference = reference_update(model, clipping=0.01)
    update = update_after_one_epoch(model, tiny_dls(), [AGC(0.01)])
    assert relative_difference(update, reference) < 1e-5


def fp16_vs_fp32(agc_class) -> float:
    model = tiny_model()
    fp32 = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [AGC(0.01)])
    fp16 = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [DeviceMixedPrecision("fp16"), agc_class(0.01)])
    return relative_difference(fp16, fp32, CLIPPED)


def test_fp16_update_matches_fp32():
    assert fp16_vs_fp32(AGC) < 2e-2


def test_fp16_check_catches_clipping_before_unscale():
    assert fp16_vs_fp32(ClipBeforeUnscale) > 0.5


def test_gradient_accumulation_clips_the_accumulated_gradient_once():
    model = tiny_model()
    reference = reference_update(model, clipping=0.01)
    whole = update_after_one_epoch(copy.deepcopy(model), tiny_dls(bs=32), [AGC(0.01)])
    agc = AGC(0.01)
    accumulated = update_after_one_epoch(copy.deepcopy(model), tiny_dls(bs=8), [GradientAccumulation(32), agc])
    assert relative_difference(whole, reference) < 1e-5
    assert relative_difference(accumulated, reference) < 1e-5
    assert len(agc.history) == 1


def test_accumulation_check_catches_clipping_each_micro_batch():
    model = tiny_model()
    reference = reference_update(model, clipping=0.01)
    per_micro_batch = update_after_one_epoch(model, tiny_dls(bs=8),
                                             [GradientAccumulation(32), ClipEachMicroBatch(0.01)])
    assert relative_difference(per_micro_batch, reference) > 1e-2


# ---- which parameters are clipped ------------------------------------------------------------

def test_classifier_of_a_timm_nf_model():
    model = timm.create_model("test_nfnet", num_classes=3)
    assert find_classifier(model) is model.head.fc
    assert excluded_parameters(model) == [model.head.fc.weight]
    assert excluded_parameters(model, "weight_and_bias") == [model.head.fc.weight, model.head.fc.bias]
    assert excluded_parameters(model, None) == []


def test_classifier_of_a_fastai_vision_learner():
    learn = vision_learner(tiny_dls(), "test_nfnet", pretrained=False, n_in=1, n_out=3,
                           loss_func=CrossEntropyLossFlat())
    head_linears = [m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]
    assert find_classifier(learn.model) is head_linears[-1]
    assert find_classifier(learn.model).out_features == 3


def test_classifier_of_a_plain_sequential():
    model = tiny_model()
    assert find_classifier(model) is model[5]
    assert find_classifier(nn.DataParallel(model)) is model[5]


def test_clipped_parameter_names_leave_out_only_the_classifier_weight():
    learn = make_learner(tiny_model(), tiny_dls())
    learn.create_opt()
    names = [n for group in AGC().clipped_parameters(learn.model, learn.opt.param_lists) for n, _ in group]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "5.bias"]


def test_skip_classifier_options_change_the_update():
    model = tiny_model()
    timm_rule = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [AGC(0.01, skip_classifier="weight_and_bias")])
    clip_all = update_after_one_epoch(copy.deepcopy(model), tiny_dls(), [AGC(0.01, skip_classifier=None)])
    ref_timm = reference_update(model, 0.01, unclipped=("5.weight", "5.bias"))
    ref_all = reference_update(model, 0.01, unclipped=())
    assert relative_difference(timm_rule, ref_timm) < 1e-5
    assert relative_difference(clip_all, ref_all) < 1e-5
    assert relative_difference(clip_all, reference_update(model, 0.01)) > 1e-3


@pytest.mark.parametrize(
    "exclude, expected",
    [
        ("0", ["0.weight", "0.bias"]),
        ("*.bias", ["0.bias", "3.bias", "5.bias"]),
        (["3.weight", "0.bias"], ["3.weight", "0.bias"]),
        (lambda name, p: p.ndim == 1, ["0.bias", "3.bias", "5.bias"]),
    ],
)
def test_exclusions(exclude, expected):
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    found = excluded_parameters(model, None, [exclude] if callable(exclude) or isinstance(exclude, str) else exclude)
    assert sorted(names[id(p)] for p in found) == sorted(expected)


def test_exclude_a_module():
    model = tiny_model()
    assert excluded_parameters(model, None, [model[3]]) == [model[3].weight, model[3].bias]


def test_exclusion_matching_nothing_lists_real_names():
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no parameter.*0\.weight"):
        excluded_parameters(tiny_model(), "weight", ["nope.*"])
    learn = make_learner(tiny_model(), tiny_dls())
    with pytest.raises(ValueError, match="matches no parameter"):
        learn.agc(exclude="conv1")
    with pytest.raises(ValueError, match="no parameters in the model"):
        excluded_parameters(tiny_model(), "weight", [nn.Linear(2, 2)])


def test_model_without_a_classifier_warns():
    model = nn.Sequential(nn.Conv2d(1, 3, 6), nn.Flatten())
    with pytest.warns(UserWarning, match="no final classifier"):
        fit_quietly(make_learner(model, tiny_dls(), [AGC()]))


def two_group_learner(cbs):
    def splitter(m):
        return [list(m[0].parameters()), list(m[3].parameters()) + list(m[5].parameters())]
    return make_learner(tiny_model(), tiny_dls(), cbs, splitter=splitter)


def test_clipping_per_param_group_and_recorder_columns():
    learn = fit_quietly(two_group_learner([AGC(clipping=[1e-6, 1e6])]), epochs=2)
    names = list(learn.recorder.metric_names)
    assert names[-4:] == ["agc_clip", "agc_clip_0", "agc_clip_1", "time"]
    units = {"group0": 4 + 1, "group1": 8 + 1 + 1}  # conv filters + conv bias; linear rows + two biases
    for epoch in learn.recorder.values:
        overall, group0, group1 = epoch[-3:]
        assert (group0, group1) == (1.0, 0.0)
        assert overall == pytest.approx(units["group0"] / (units["group0"] + units["group1"]))
    assert not any(isinstance(m, ClipRate) for m in learn.metrics)
    # the columns read the callback's public epoch_clip_rate, which holds the last epoch's after the fit
    agc = learn.adaptive_clip
    rates = [agc.epoch_clip_rate(), agc.epoch_clip_rate(0), agc.epoch_clip_rate(1)]
    assert rates == list(learn.recorder.values[-1][-3:])
    assert math.isnan(AGC().epoch_clip_rate())  # before any fit
    assert ClipRate.__module__ == AGC.__module__  # the column lives with the callback it reads


def test_clipping_list_must_match_param_groups():
    with pytest.raises(ValueError, match="3 values but the optimizer has 2 param groups"):
        fit_quietly(two_group_learner([AGC(clipping=[0.1, 0.1, 0.1])]))


def test_frozen_parameters_are_not_clipped():
    agc = AGC(1e-6)
    learn = two_group_learner([agc])
    learn.freeze()
    conv_before = learn.model[0].weight.detach().clone()
    fit_quietly(learn)
    assert agc.history.names[0] == [] and agc.history.names[1] == ["3.weight", "3.bias", "5.bias"]
    assert torch.equal(learn.model[0].weight, conv_before)
    assert agc.history.rate() == 1.0


def test_non_finite_gradients_warn_and_stay():
    class PoisonGradient(Callback):
        def after_backward(self):
            self.learn.model[3].weight.grad[0, 0] = float("inf")

    agc = AGC(0.01)
    with pytest.warns(UserWarning, match="1 units with inf/NaN gradients"):
        fit_quietly(make_learner(tiny_model(), tiny_dls(), [PoisonGradient(), agc]))
    assert agc.history.nonfinite().sum() == 1


@pytest.mark.bad_input
def test_a_non_finite_weight_is_named_in_the_epoch_warning():
    class PoisonWeight(Callback):
        def after_backward(self):
            if self.iter == 0:
                with torch.no_grad():
                    self.learn.model[3].weight[0, 0] = float("nan")

    agc = AGC(0.01)
    with pytest.warns(UserWarning, match=r"units with inf/NaN gradients or weights this epoch \(in .*3.weight.*the "
                                         r"weights of .*3.weight.* are inf/NaN now: the model has diverged"):
        fit_quietly(make_learner(tiny_model(), tiny_dls(), [PoisonWeight(), agc]))
    assert agc.history.nonfinite().sum() >= 1


# ---- API -------------------------------------------------------------------------------------

@pytest.mark.parametrize("clipping", [np.float32(0.05), torch.tensor(0.05)], ids=["numpy_float32", "tensor_0d"])
def test_learner_agc_takes_numpy_scalars_and_0d_tensors(clipping):
    model = tiny_model()
    learn = make_learner(model, tiny_dls()).agc(clipping, skip_classifier=None)
    assert learn.adaptive_clip.clipping == float(clipping) and type(learn.adaptive_clip.clipping) is float
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_quietly(learn)
    update = {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}
    assert relative_difference(update, reference_update(tiny_model(), clipping=float(clipping), unclipped=())) < 1e-5


def test_clipping_per_group_takes_numpy_arrays():
    assert AGC(clipping=np.array([0.1, 0.2], dtype=np.float32)).clipping == [np.float32(0.1).item(),
                                                                            np.float32(0.2).item()]


@pytest.mark.bad_input
@pytest.mark.parametrize("clipping, shown", [("0.01", r"got '0.01' \(str\): pass one number, e.g. clipping=0.01"),
                                             (torch.tensor([0.01, 0.02]),
                                              r"got a torch.float32 tensor of shape \(2,\)")],
                         ids=["string", "two_element_tensor"])
def test_learner_agc_refuses_what_is_not_a_number_showing_it_whole(clipping, shown):
    learn = make_learner(tiny_model(), tiny_dls())
    with pytest.raises(ValueError, match=rf"^clipping must be a finite number > 0 .*{shown}"):
        learn.agc(clipping)


@pytest.mark.parametrize(
    "kwargs, argument",
    [(dict(clipping=0), "clipping"), (dict(clipping=[0.1, float("nan")]), "clipping"), (dict(eps=-1.0), "eps"),
     (dict(skip_classifier="bias"), "skip_classifier"), (dict(clipping=[]), "clipping")],
)
def test_callback_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be"):
        AGC(**kwargs)


def test_learner_agc_convenience():
    model = tiny_model()
    learn = make_learner(model, tiny_dls())
    assert learn.agc(0.02) is learn
    learn.agc(0.05, skip_classifier=None)
    agcs = [cb for cb in learn.cbs if isinstance(cb, AGC)]
    assert len(agcs) == 1 and learn.adaptive_clip is agcs[0] and agcs[0].clipping == 0.05
    # the attached AGC, alone, makes the reference step: lambda 0.05, the classifier weight clipped too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_quietly(learn)
    update = {n: (p.detach() - before[n]).double() for n, p in model.named_parameters()}
    assert relative_difference(update, reference_update(tiny_model(), clipping=0.05, unclipped=())) < 1e-5


@pytest.mark.slow
def test_plot_per_layer_clip_rates(tmp_path):
    gradients = GradientsBeforeAGC()
    learn = make_learner(tiny_model(), tiny_dls(bs=8), [gradients]).agc(0.01)
    with pytest.raises(RuntimeError, match="call learn.fit"):
        learn.adaptive_clip.plot()
    fit_quietly(learn, epochs=2)
    history = learn.adaptive_clip.history
    assert len(history) == 8 and list(history.layer_rates()) == ["0", "3", "5"]
    rates = history.step_rates()
    assert history.parameter_names == CLIPPED
    expected = reference_step_rates(gradients.steps, CLIPPED, 0.01)  # the float64 rule on the same gradients
    assert rates.shape == (8,) and rates.tolist() == pytest.approx(expected, abs=1e-6)
    assert any(0 < r < 1 for r in expected)  # some units clipped, some not: the counts matter
    figure = learn.adaptive_clip.plot()
    assert len(figure.axes) == 3  # rates, heat map, colour bar
    figure.savefig(tmp_path / "clip.png")
    assert (tmp_path / "clip.png").stat().st_size > 10_000


@pytest.mark.slow
def test_callback_runs_with_no_warning_on_a_timm_model():
    from normfree.data import digits_dataloaders

    model = timm.create_model("test_nfnet", num_classes=10, in_chans=1)
    learn = Learner(digits_dataloaders(bs=128, size=16), model, loss_func=CrossEntropyLossFlat()).agc()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit_quietly(learn)
    assert "head.fc.weight" not in learn.adaptive_clip.history.parameter_names
    assert "head.fc.bias" in learn.adaptive_clip.history.parameter_names


def test_validate_and_get_preds_keep_the_fit_statistics():
    learn = fit_quietly(make_learner(tiny_model(), tiny_dls(bs=8)).agc(0.01))
    steps = len(learn.adaptive_clip.history)
    with learn.no_bar():
        learn.validate()
        learn.get_preds()
    assert len(learn.adaptive_clip.history) == steps == 4
    assert not any(isinstance(m, ClipRate) for m in learn.metrics)
