"""The fairness tools of `normfree train` / `normfree compare`: optimizers, step budgets, hold-out splits and
learning-rate sweeps, each checked against an independent reference (torch's optimizer, fastai's schedule
function, the raw data, the runs on disk)."""
import json
import math

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from sklearn.datasets import load_digits
from torch import nn

import normfree
from helpers import LossesSeen, smoothed_loss
from normfree.app.cli import main
from normfree.app.compare import CompareConfig, SweepPoint, _choose_lr
from normfree.data import digits_dataloaders, subset_dataloaders
from normfree.learner.optim import nesterov_sgd

TINY = dict(data="digits", arch="nf_resnet_tiny", size=8, limit=64, bs=16, epochs=1)


def test_nesterov_sgd_matches_torch_and_decays_weights_as_fastai():
    torch.manual_seed(0)
    ours, reference = nn.Linear(6, 3), nn.Linear(6, 3)
    reference.load_state_dict(ours.state_dict())
    lr, wd = 0.1, 0.05
    optimizer = nesterov_sgd(list(ours.parameters()), lr=lr, wd=wd)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9, nesterov=True)
    for _ in range(5):
        x = torch.randn(8, 6)
        for model in (ours, reference):
            model.zero_grad()
            model(x).square().sum().backward()
        optimizer.step()
        with torch.no_grad():  # fastai's decoupled weight decay comes before the step
            for p in reference.parameters():
                p.mul_(1 - lr * wd)
        torch_optimizer.step()
        for a, b in zip(ours.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b)


class StepCounter(Callback):
    def before_fit(self):
        self.steps = 0

    def after_step(self):
        self.steps += 1


@pytest.mark.slow
def test_step_budget_makes_exactly_that_many_steps_over_the_whole_schedule(tmp_path):
    counter, losses = StepCounter(), LossesSeen()
    # 64 images in batches of 16 = 4 batches an epoch; 5 steps of 2 batches = 10 batches = 2.5 epochs
    result = normfree.train(**TINY, accum=2, steps=5, lr=0.01, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / "run", cbs=[counter, losses])
    assert counter.steps == 5
    assert len(result.epochs) == 3  # the last one partial, and validated
    schedule = combined_cos(0.25, 0.01 / 25, 0.01, 0.01 / 25 / 1e5)  # fit_one_cycle's defaults
    expected = [schedule(i / 10) for i in range(10)]
    # fastai combines the two phases in float32: agreement to 1e-3, where a schedule over the 3 whole
    # epochs (12 batches) would be off by 10-60%
    assert result.learner.recorder.lrs == pytest.approx(expected, rel=1e-3)
    last = result.epochs[-1]
    assert len(losses.losses) == 10 and last["train_loss"] == pytest.approx(smoothed_loss(losses.losses), rel=1e-5)
    # the partial epoch's row holds the model's accuracy, recomputed here by a fresh pass over the validation set
    predictions, targets = result.learner.get_preds()
    assert last["accuracy"] == pytest.approx((predictions.argmax(1) == targets).float().mean().item())


def test_subset_keeps_classes_per_class_and_holds_out_training_images_only():
    dls = digits_dataloaders(bs=8, size=8, seed=3)
    raw_train = dls.train_ds.tensors
    raw_valid = dls.valid_ds.tensors
    narrowed = subset_dataloaders(dls, classes=[7, 3, 5], per_class=10, holdout_pct=0.2, seed=1)
    (x_train, y_train), (x_hold, y_hold) = narrowed.train_ds.tensors, narrowed.valid_ds.tensors
    assert narrowed.c == 3 and narrowed.vocab == ["7", "3", "5"]
    assert len(x_train) == 24 and len(x_hold) == 6
    labels = torch.cat([y_train, y_hold])
    assert torch.bincount(labels).tolist() == [10, 10, 10]
    original_label = torch.tensor([7, 3, 5])

    def rows(x):
        return {tuple(image.flatten().tolist()) for image in x}

    train_rows = {tuple(image.flatten().tolist()): int(y) for image, y in zip(*raw_train)}
    for x, y in ((x_train, y_train), (x_hold, y_hold)):
        for image, label in zip(x, y):  # every image is a training image of the class it is labelled as
            assert train_rows[tuple(image.flatten().tolist())] == original_label[label]
    assert not rows(x_hold) & rows(raw_valid[0])  # the validation split is never seen
    assert not rows(x_hold) & rows(x_train)


def test_subset_refuses_what_cannot_work():
    dls = digits_dataloaders(bs=8, size=8)
    with pytest.raises(ValueError, match="classes"):
        subset_dataloaders(dls, classes=[1, 1])
    with pytest.raises(ValueError, match="classes"):
        subset_dataloaders(dls, classes=[3, 10])
    with pytest.raises(ValueError, match="holdout"):
        subset_dataloaders(dls, per_class=1, holdout_pct=0.01)


@pytest.mark.slow
def test_digits_hold_out_is_drawn_from_the_training_split(tmp_path):
    result = normfree.train(**{**TINY, "limit": None}, holdout=True, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / "tune")
    # 1797 digits: 1438 train / 359 valid; the hold-out is 20% of the 1438 training images
    assert len(result.learner.dls.valid_ds) == round(1438 * 0.2) and len(result.learner.dls.train_ds) == 1438 - 288
    assert load_digits().images.shape[0] == 1797


@pytest.mark.slow
def test_skipinit_option_and_new_head(tmp_path):
    result = normfree.train(**TINY, skipinit=True, quiet=True, out=tmp_path / "skip")
    gains = [m.skipinit_gain for m in result.learner.model.modules() if getattr(m, "skipinit_gain", None) is not None]
    assert gains and all(g.requires_grad for g in gains)
    weights = tmp_path / "skip" / "model.safetensors"
    fresh = normfree.train(**TINY, weights=str(weights), skipinit=True, new_head=True, lr=1e-9, quiet=True,
                           save_model=False, save_plots=False, out=tmp_path / "new-head")
    kept = normfree.train(**TINY, weights=str(weights), skipinit=True, lr=1e-9, quiet=True, save_model=False,
                          save_plots=False, out=tmp_path / "kept-head")
    trained_fc = result.learner.model.head.fc.weight
    assert torch.allclose(kept.learner.model.head.fc.weight, trained_fc, atol=1e-6)
    assert not torch.allclose(fresh.learner.model.head.fc.weight, trained_fc, atol=1e-3)


def test_lr_choice_prefers_accuracy_then_loss_then_the_smaller_lr_and_never_nan():
    def point(lr, accuracy, loss):
        return SweepPoint(("nf", 8, 1), lr, accuracy, loss)

    assert _choose_lr([point(1e-3, 0.5, 1.0), point(1e-2, 0.6, 2.0)]) == 1e-2
    assert _choose_lr([point(1e-3, 0.6, 1.0), point(1e-2, 0.6, 0.9)]) == 1e-2
    assert _choose_lr([point(1e-3, 0.6, 1.0), point(1e-2, 0.6, 1.0)]) == 1e-3
    assert _choose_lr([point(1e-3, 0.1, 2.0), point(1e-2, math.nan, math.nan)]) == 1e-3


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    status = main(["compare", "--methods", "bn", "nf-agc", "--batch-sizes", "16", "--no-accum", "--seeds", "0", "1",
                   "--epochs", "1", "--size", "8", "--limit", "96", "--lrs", "1e-6", "0.03", "--opt", "sgd",
                   "--quiet", "--out", str(out)])
    return out, status


@pytest.mark.slow
def test_sweep_chooses_each_lr_on_the_hold_out_and_trains_every_seed_with_it(swept):
    out, status = swept
    assert status == 0
    sweep = {p.parent.name: json.loads(p.read_text()) for p in (out / "sweep").glob("*/result.json")}
    assert sorted(sweep) == sorted(f"{m}-bs16-x1-lr{lr}" for m in ("bn", "nf-agc") for lr in ("1e-06", "0.03"))
    assert all(r["config"]["holdout"] and r["config"]["seed"] == 0 and r["config"]["opt"] == "sgd"
               for r in sweep.values())
    runs = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}
    assert len(runs) == 4 and not any(r["config"]["holdout"] for r in runs.values())
    report = (out / "report.md").read_text()
    for method, label in (("bn", "BatchNorm"), ("nf-agc", "NF + AGC")):
        scored = {lr: (sweep[f"{method}-bs16-x1-lr{key}"]["epochs"][-1]["accuracy"],
                       -sweep[f"{method}-bs16-x1-lr{key}"]["epochs"][-1]["valid_loss"])
                  for lr, key in ((1e-6, "1e-06"), (0.03, "0.03"))}
        best = max(scored, key=lambda lr: scored[lr])
        assert {runs[f"{method}-bs16-x1-seed{s}"]["config"]["lr"] for s in (0, 1)} == {best}
        assert f"| {label} | bs 16 | {best:g} | " in report
        assert f"| {label} | bs 16 | {best:g} | {100 * scored[best][0]:.1f} | {-scored[best][1]:.3f} | yes |" in report
    assert "Learning-rate sweep" in (out / "report.html").read_text()


@pytest.mark.slow
def test_compare_step_budget_gives_every_run_the_same_steps(tmp_path):
    config = CompareConfig(methods=("nf-agc",), batch_sizes=(8, 32), seeds=(0,), epochs=2, size=8,
                                    limit=64, budget="steps", out=str(tmp_path / "out"))
    assert config.step_budget() == 2 * math.ceil(64 / 32)  # what batch 32 makes in 2 epochs of 64 images
    result = normfree.compare(config, quiet=True)
    steps = {json.loads(p.read_text())["config"]["steps"] for p in (tmp_path / "out" / "runs").glob("*/result.json")}
    assert steps == {4} and len(result.runs) == 3
    assert "4 optimizer steps" in (tmp_path / "out" / "report.md").read_text()
