"""learn.agc_find(): the rule against a brute-force reference, the ratios against a float64 reference, and the Learner
left exactly as it was (bit for bit, also after Ctrl-C), under mixed precision, accumulation and frozen groups."""
import copy
import json
import random
import re
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import normfree
from agc_reference import norm64, units_of
from fastai_helpers import CLIPPED, LR, make_learner, tiny_data, tiny_dls, tiny_model
from normfree.agc.rule import suggest_clipping
from normfree.learner.agc_find import AGCFindResult
from normfree.learner.callback import CLIP_WATCH_STEPS

EPS = 1e-3


def find(learn, **kwargs):
    with learn.no_bar():
        return learn.agc_find(show_plot=False, **kwargs)


# --- the rule --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 10, width=32), min_size=1, max_size=60), st.floats(0.01, 0.99))
def test_suggestion_is_the_smallest_ratio_that_clips_at_most_the_fraction(values, fraction):
    ratios = np.array(values, dtype=np.float32).astype(np.float64)
    # brute force: of the recorded values, the smallest one above which at most `fraction` of them lie
    expected = min(v for v in ratios if (ratios > v).sum() <= fraction * len(ratios))
    assert suggest_clipping(torch.tensor(values, dtype=torch.float32), fraction) == expected


def test_suggestion_on_a_hand_made_distribution_and_its_clip_share():
    ratios = torch.arange(1, 101, dtype=torch.float32).div(100)[torch.randperm(100)]
    assert suggest_clipping(ratios, 0.1) == pytest.approx(0.90)  # 0.91 ... 1.00 clip: 10 of 100
    assert suggest_clipping(torch.cat([ratios, torch.tensor([float("inf"), float("nan")])]), 0.1) == pytest.approx(0.90)
    result = AGCFindResult(suggestion=0.9, clip_fraction=0.1, lr=0.1, steps=2, names=("a", "b"), groups=(0, 0),
                           ratios=(ratios[:50].view(2, 25), ratios[50:].view(2, 25)))
    assert result.fraction_clipped(0.9) == pytest.approx(0.10)
    assert result.fraction_clipped(0.495) == pytest.approx(0.51)


# --- what it records --------------------------------------------------------------------------------------------------


def reference_ratios(model, steps):
    """Per clipped parameter, [steps, units] of ||G_u|| / max(||W_u||, eps) in float64, training with plain SGD at LR
    on the whole tiny batch without clipping (what the probe does)."""
    model = copy.deepcopy(model)
    x, y = tiny_data()
    rows = {name: [] for name in CLIPPED}
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if name in CLIPPED:
                rows[name].append([norm64(g) / max(norm64(w), EPS) for w, g in zip(units_of(p), units_of(p.grad))])
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in rows.items()}


def test_ratios_are_agcs_unit_ratios_at_each_unclipped_step():
    model = tiny_model()
    expected = reference_ratios(model, steps=3)
    learn = make_learner(model, tiny_dls())
    result = find(learn, num_it=3)
    assert list(result.names) == CLIPPED  # the classifier weight is AGC's default exclusion
    assert result.steps == 3 and result.lr == LR
    for name, ratios in zip(result.names, result.ratios):
        assert ratios.shape == expected[name].shape
        assert torch.allclose(ratios.double(), expected[name], rtol=1e-5), name
    assert result.suggestion == suggest_clipping(result.all_ratios(), result.clip_fraction)


def test_accumulated_steps_record_the_effective_batchs_gradient():
    expected = reference_ratios(tiny_model(), steps=2)
    learn = make_learner(tiny_model(), tiny_dls(bs=8), cbs=[GradientAccumulation(n_acc=32)])
    result = find(learn, num_it=2)
    assert result.steps == 2
    for name, ratios in zip(result.names, result.ratios):
        assert torch.allclose(ratios.double(), expected[name], rtol=1e-4), name


@pytest.mark.filterwarnings("ignore:fp16 mixed precision on a CPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_ratios_are_taken_from_unscaled_gradients(precision):
    expected = reference_ratios(tiny_model(), steps=1)
    learn = make_learner(tiny_model(), tiny_dls()).to_mixed_precision(precision)
    result = find(learn, num_it=1)
    for name, ratios in zip(result.names, result.ratios):  # a scaled gradient would be 2^16 times larger
        assert torch.allclose(ratios.double(), expected[name], rtol=0.05, atol=1e-3), name


def test_frozen_groups_are_not_recorded_and_discriminative_lrs_are_taken():
    learn = make_learner(tiny_model(), tiny_dls(),
                         splitter=lambda m: [list(m[0].parameters()), list(m[3:].parameters())])
    learn.create_opt()
    learn.freeze()
    result = find(learn, num_it=1)
    assert list(result.names) == ["3.weight", "3.bias", "5.bias"] and set(result.groups) == {1}
    learn.unfreeze()
    result = find(learn, num_it=1, lr=slice(0.01, 0.1))
    assert list(result.names) == CLIPPED and list(result.groups) == [0, 0, 1, 1, 1]


def test_attached_agcs_exclusions_are_used_and_it_stays_attached():
    learn = make_learner(tiny_model(), tiny_dls()).agc(0.05, exclude=["0.*"])
    callback = learn.adaptive_clip
    result = find(learn, num_it=1)
    assert list(result.names) == ["3.weight", "3.bias", "5.bias"]
    assert learn.adaptive_clip is callback and callback in learn.cbs
    assert callback.history is None  # the probe clipped nothing and recorded nothing in AGC's history


# --- per-sample AGC: each example's ratios ----------------------------------------------------------------------------


def reference_example_ratios(model):
    """Per clipped parameter, [examples, units] of ||g_iu|| / max(||W_u||, eps) in float64 at the first step: each
    example's gradient of its own loss term, from a forward and backward pass of that example alone."""
    model = copy.deepcopy(model).double()
    x, y = tiny_data()
    rows = {name: [] for name in CLIPPED}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            if name in CLIPPED:
                rows[name].append([norm64(g) / max(norm64(w), EPS) for w, g in zip(units_of(p), units_of(p.grad))])
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in rows.items()}


def quantile_by_hand(values, fraction):
    """The smallest recorded value above which at most `fraction` of `values` lie (brute force)."""
    values = np.asarray(values, dtype=np.float64)
    above = (values[None, :] > values[:, None]).sum(1)
    return float(values[above <= fraction * len(values)].min())


@pytest.mark.parametrize("accumulate", [False, True])
def test_per_sample_ratios_are_each_examples_own_and_the_suggestion_their_quantile(accumulate):
    model = tiny_model()
    expected = reference_example_ratios(model)
    dls, cbs = (tiny_dls(bs=8), [GradientAccumulation(n_acc=32)]) if accumulate else (tiny_dls(), [])
    learn = make_learner(model, dls, cbs=cbs).agc(0.05, per_sample=True)
    result = find(learn, num_it=2)
    assert result.per_sample and list(result.names) == CLIPPED and result.steps == 2
    for name, ratios in zip(result.names, result.ratios):
        assert ratios.shape == (2, *expected[name].shape), name  # [steps, examples, units]
        assert torch.allclose(ratios[0].double(), expected[name], rtol=1e-4, atol=1e-7), name
    assert result.suggestion == pytest.approx(quantile_by_hand(result.all_ratios().numpy(), 0.1), rel=1e-6)
    batch = find(make_learner(tiny_model(), tiny_dls()), num_it=2)
    assert result.suggestion > batch.suggestion  # each example's gradient is noisier than their mean


@pytest.mark.filterwarnings("ignore:fp16 mixed precision on a CPU")
def test_per_sample_ratios_under_mixed_precision_are_the_unscaled_gradients():
    expected = reference_example_ratios(tiny_model())
    learn = make_learner(tiny_model(), tiny_dls()).to_mixed_precision("fp16").agc(0.05, per_sample=True)
    result = find(learn, num_it=1)
    for name, ratios in zip(result.names, result.ratios):  # a scaled gradient would be 2^16 times larger
        assert torch.allclose(ratios[0].double(), expected[name], rtol=0.05, atol=1e-3), name


def per_sample_learner():
    torch.manual_seed(3)
    random.seed(3)  # fastai's DataLoader draws its shuffling generator's seed from Python's
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 3))
    x, y = tiny_data(n=48)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=8, shuffle=True),
                      DataLoader(TensorDataset(x[:8], y[:8]), bs=8))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.01), lr=1e-2)
    return learn.agc(0.05, per_sample=True)


def forwards_of(model):
    """What per-sample AGC patches: instance forwards, and the hooks of every module."""
    return [(name, "forward" in m.__dict__, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


def test_per_sample_probe_restores_model_forwards_optimizer_and_the_next_fit_bit_for_bit():
    learn = per_sample_learner()
    fit(learn)
    x = tiny_data(n=8, seed=5)[0]
    learn.model.eval()
    outputs, forwards, before = learn.model(x), forwards_of(learn.model), snapshot(learn)
    callback = learn.adaptive_clip
    find(learn, num_it=5, lr=0.1)
    assert_same(before, snapshot(learn))
    learn.model.eval()
    assert forwards_of(learn.model) == forwards and torch.equal(learn.model(x), outputs)
    assert learn.adaptive_clip is callback and callback.per_sample and callback.clipping == 0.05
    assert_next_fit_is_the_fit_without_the_finder(learn, per_sample_learner)  # clipping per sample at 0.05


def test_ctrl_c_during_the_per_sample_probe_removes_its_engines():
    learn = per_sample_learner()
    forwards = forwards_of(learn.model)
    learn.add_cb(InterruptAtStep())
    with pytest.raises(KeyboardInterrupt):
        find(learn, num_it=10)
    assert forwards_of(learn.model) == forwards


# --- nothing changed --------------------------------------------------------------------------------------------------


def bn_learner():
    torch.manual_seed(3)
    random.seed(3)  # fastai's DataLoader draws its shuffling generator's seed from Python's
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                          nn.Linear(64, 3))
    x, y = tiny_data(n=48)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=8, shuffle=True),
                      DataLoader(TensorDataset(x[:8], y[:8]), bs=8))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(Adam, wd=0.01), lr=1e-2)


def fit(learn, epochs=1):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs)


def snapshot(learn):
    return ({k: v.clone() for k, v in learn.model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()],
            copy.deepcopy(learn.opt.state_dict()), list(learn.recorder.losses), list(learn.recorder.values))


def assert_same(before, after):
    weights, grads, opt, losses, values = before
    weights2, grads2, opt2, losses2, values2 = after
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, grads2))
    assert opt["hypers"] == opt2["hypers"]
    for state, state2 in zip(opt["state"], opt2["state"]):
        assert state.keys() == state2.keys()
        assert all(torch.equal(state[k], state2[k]) if torch.is_tensor(state[k]) else state[k] == state2[k]
                   for k in state)
    assert losses == losses2 and values == values2


def assert_next_fit_is_the_fit_without_the_finder(learn, make_learner):
    """After one fit and the finder, `learn`'s next fit ends where a fresh learner (`make_learner()`) ends after two
    fits: same shuffling, dropout and optimizer state."""
    fit(learn)
    reference = make_learner()
    fit(reference)
    fit(reference)
    assert all(torch.equal(a, b) for a, b in zip(learn.model.state_dict().values(),
                                                 reference.model.state_dict().values()))


@pytest.mark.slow
def test_model_optimizer_recorder_and_random_state_are_restored_bit_for_bit():
    learn = bn_learner()
    fit(learn)
    before = snapshot(learn)
    find(learn, num_it=5, lr=0.1)
    assert_same(before, snapshot(learn))
    assert_next_fit_is_the_fit_without_the_finder(learn, bn_learner)


def test_a_learner_without_optimizer_gets_none_back():
    learn = bn_learner()
    find(learn, num_it=2)
    assert learn.opt is None


class InterruptAtStep(Callback):
    order = 50

    def after_step(self):
        if self.train_iter == 2:
            raise KeyboardInterrupt


def test_ctrl_c_during_the_probe_restores_everything():
    learn = bn_learner()
    fit(learn)
    learn.agc(0.05)
    before = snapshot(learn)
    learn.add_cb(InterruptAtStep())
    with pytest.raises(KeyboardInterrupt):
        find(learn, num_it=10)
    assert_same(before, snapshot(learn))
    assert learn.adaptive_clip in learn.cbs


def test_plot_marks_the_suggestion():
    result = find(make_learner(tiny_model(), tiny_dls()), num_it=3)
    fig = result.plot()
    share, groups = fig.axes
    assert any(line.get_xdata()[0] == result.suggestion for line in share.get_lines()[1:])
    assert [t.get_text() for t in groups.get_xticklabels()] == ["0", "3", "5"]


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.bad_input
def test_plot_into_the_wrong_number_of_axes_is_refused_naming_ax():
    import matplotlib.pyplot as plt

    result = AGCFindResult(suggestion=0.9, clip_fraction=0.1, lr=0.1, steps=1, names=("a",), groups=(0,),
                           ratios=(torch.rand(1, 4),))
    fig, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="ax: 2 Axes are needed"):
        result.plot(ax=axes)
    plt.close(fig)


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs, named", [(dict(num_it=0), "num_it"), (dict(num_it=2.5), "num_it"),
                                           (dict(clip_fraction=0), "clip_fraction"),
                                           (dict(clip_fraction=1.0), "clip_fraction")])
def test_bad_arguments_are_refused_naming_them(kwargs, named):
    learn = make_learner(tiny_model(), tiny_dls())
    with pytest.raises(ValueError, match=named):
        find(learn, **kwargs)
    assert learn.opt is None


@pytest.mark.bad_input
def test_nothing_to_clip_is_refused_naming_the_fix():
    learn = make_learner(tiny_model(), tiny_dls()).agc(0.05, exclude=["0", "3", "5"])
    with pytest.raises(ValueError, match="exclude"):
        find(learn, num_it=1)


# --- the warning during training --------------------------------------------------------------------------------------


def watched_fit(clipping, epochs=7):
    """56 SGD steps (bs 4 of 32 examples, 7 epochs) with AGC at `clipping` (None: agc_find's suggestion): the
    warnings raised."""
    learn = make_learner(tiny_model(), tiny_dls(bs=4))
    learn.agc(find(learn, num_it=8).suggestion if clipping is None else clipping)
    with pytest.warns() as caught:
        warnings.warn("marker", stacklevel=1)  # pytest.warns needs one
        fit(learn, epochs)
    return [str(w.message) for w in caught if "AGC (lambda" in str(w.message)], learn


@pytest.mark.slow
@pytest.mark.parametrize("clipping, says", [(1e-6, "far too small"), (1e6, "too large and AGC does nothing")])
def test_a_lambda_far_off_is_reported_once_with_the_share_and_a_suggestion(clipping, says):
    messages, learn = watched_fit(clipping)
    assert len(messages) == 1 and says in messages[0]
    rates = learn.adaptive_clip.history.step_rates()[:CLIP_WATCH_STEPS]
    assert bool((rates > 0.5).all()) if clipping < 1 else float(rates.max()) == 0
    suggestion = float(re.search(r"; lambda ([0-9.e+-]+) would clip 10%", messages[0]).group(1))
    assert 1e-4 < suggestion < 1e2  # a ratio of this model's gradients, not the lambda it was given


@pytest.mark.slow
def test_the_suggested_lambda_clips_some_units_and_is_not_reported():
    messages, learn = watched_fit(None)
    rates = learn.adaptive_clip.history.step_rates()
    assert 0 < float(rates.mean()) < 0.5 and messages == []


# --- agc="auto" in normfree train and compare -------------------------------------------------------------------------


@pytest.mark.slow
def test_train_with_agc_auto_records_the_lambda_it_trained_with(tmp_path):
    from helpers import QUICK_OPTIONS, read_rows, without_timing

    auto = normfree.train(**QUICK_OPTIONS, agc="auto", out=tmp_path / "auto", quiet=True)
    recorded = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert recorded["config"]["agc"] == "auto" and recorded["agc_used"] == auto.agc > 0
    assert auto.learner.adaptive_clip.clipping == auto.agc
    assert (tmp_path / "auto" / "agc_find.png").stat().st_size > 0
    assert json.loads((tmp_path / "auto" / "result.json").read_text())["agc"] == auto.agc
    # the probe leaves no trace: training with the chosen lambda given as a number is the same run
    fixed = normfree.train(**QUICK_OPTIONS, agc=auto.agc, out=tmp_path / "fixed", quiet=True, save_plots=False)
    assert without_timing(read_rows(tmp_path / "auto" / "metrics.csv")) == \
        without_timing(read_rows(tmp_path / "fixed" / "metrics.csv"))
    assert fixed.agc == auto.agc


@pytest.mark.slow
def test_cli_takes_agc_auto_and_names_the_option_for_anything_else(tmp_path, capsys):
    from helpers import QUICK, stopped_with_status_2
    from normfree.app.cli import main

    assert main(["train", *QUICK, "--agc", "auto", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["agc_used"] > 0
    message = stopped_with_status_2(["train", *QUICK, "--agc", "often", "--out", str(tmp_path / "bad")], capsys)
    assert "--agc" in message and "auto" in message


@pytest.mark.slow
def test_cli_train_agc_auto_per_sample_finds_lambda_from_each_examples_ratios(tmp_path, capsys):
    from helpers import QUICK
    from normfree.app.cli import main

    assert main(["train", *QUICK, "--limit", "32", "--agc", "auto", "--per-sample", "--out",
                 str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["config"]["agc"] == "auto" and recorded["config"]["per_sample"] and recorded["agc_used"] > 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["agc"] == recorded["agc_used"]


def test_compare_with_agc_auto_gives_the_per_sample_method_auto_per_sample():
    from normfree.app.compare import CompareConfig

    config = CompareConfig(agc="auto", methods=("nf-agc", "nf-agc-per-sample"), lrs=(0.01,))
    runs = {cell.method: config.train_config(cell, 0.01, None) for cell in config.cells()}
    assert (runs["nf-agc-per-sample"].agc, runs["nf-agc-per-sample"].per_sample) == ("auto", True)
    assert (runs["nf-agc"].agc, runs["nf-agc"].per_sample) == ("auto", False)


@pytest.mark.slow
def test_compare_with_agc_auto_reports_each_runs_lambda(tmp_path):
    result = normfree.compare(data="digits", limit=64, size=8, epochs=1, batch_sizes=(16,), accumulate=False,
                              seeds=(0,), lrs=(0.01,), agc="auto", out=str(tmp_path), quiet=True)
    chosen = [run.agc for run in result.runs if run.method == "NF + AGC"]
    assert len(chosen) == 1 and chosen[0] > 0
    assert [run.agc for run in result.runs if run.method == "BatchNorm"] == [None]
    report = (tmp_path / "report.md").read_text()
    assert "AGC lambda**: auto" in report and f"{chosen[0]:.3g}" in report
