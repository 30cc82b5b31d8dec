"""`normfree train --resume DIR` / `normfree.app.train.resume`: a run stopped by Ctrl-C, SIGTERM or a kill continues
from its last finished epoch and ends with the metrics of the same run never stopped; only unfinished runs are
accepted."""
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback

import normfree
from helpers import (
    QUICK,
    QUICK_OPTIONS,
    InterruptAt,
    SendAt,
    assert_same_metrics,
    kill_mid_run,
    read_rows,
    stopped_with_status_2,
    with_callback,
)
from normfree.app.cli import build_parser, main
from normfree.app.train import TrainResult, resume
from normfree.data.loaders import write_digits_image_folder
from normfree.learner.checkpoint import EpochCheckpoint
from normfree.learner.optim import TorchOptimizer
from normfree.utils.outdir import INCOMPLETE

QUIET = dict(quiet=True, save_model=False, save_plots=False)


def metrics(result):
    return [{k: str(v) for k, v in row.items()} for row in result.epochs]


@pytest.mark.slow
@pytest.mark.parametrize("options, at", [
    (dict(epochs=3), (1, 2)),
    # fp16's gradient scaler; 4 batches an epoch, 3 per step: the checkpoint holds a part-way accumulation
    (dict(epochs=3, accum=3, precision="fp16"), (2, 1)),
    (dict(epochs=3, steps=5, accum=2, per_sample=True), (1, 0)),
    # the lambda agc_find chose at the start, not one found again on the half-trained model
    (dict(epochs=3, agc="auto"), (1, 2)),
], ids=["plain", "fp16-accum", "steps-per-sample", "agc-auto"])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, options, at):
    settings = {**QUICK_OPTIONS, **options}
    whole = normfree.train(**settings, out=tmp_path / "whole", **QUIET)
    stopped = normfree.train(**settings, out=tmp_path / "run", cbs=[InterruptAt(*at)], **QUIET)
    assert stopped.interrupted and len(stopped.epochs) == at[0]
    assert (tmp_path / "run" / "checkpoint.pth").exists()
    resumed = resume(tmp_path / "run", **QUIET)
    assert not resumed.interrupted
    assert_same_metrics(metrics(resumed), metrics(whole))
    assert_same_metrics(read_rows(tmp_path / "run" / "metrics.csv"), metrics(whole))  # the CSV continued
    assert {p.name for p in (tmp_path / "run").iterdir()} == {p.name for p in (tmp_path / "whole").iterdir()}


@pytest.mark.slow
@pytest.mark.bad_input
def test_fine_tune_resumes_in_its_frozen_fit_without_its_starting_weights_file(tmp_path):
    base = normfree.train(**QUICK_OPTIONS, out=tmp_path / "base", quiet=True, save_plots=False)
    settings = {**QUICK_OPTIONS, "epochs": 1, "fine_tune": True, "freeze_epochs": 2,
                "weights": base.files["weights"]}
    whole = normfree.train(**settings, out=tmp_path / "whole", **QUIET)
    normfree.train(**settings, out=tmp_path / "run", cbs=[InterruptAt(1, 1)], **QUIET)
    shutil.move(base.files["weights"], tmp_path / "moved.safetensors")  # the checkpoint holds the weights
    assert_same_metrics(metrics(resume(tmp_path / "run", **QUIET)), metrics(whole))


@pytest.mark.slow
@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, reason="SIGTERM is handled here already")
def test_cli_resume_after_sigterm(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patched:
        with_callback(patched, SendAt(signal.SIGTERM))
        assert main(["train", *QUICK, "--epochs", "3", "--out", str(out)]) == 143
    assert f"normfree train --resume {out}" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert not (out / INCOMPLETE).exists() and not (out / "checkpoint.pth").exists()
    assert TrainResult.load(out).interrupted is False
    assert_same_metrics(read_rows(out / "metrics.csv"), read_rows(tmp_path / "whole" / "metrics.csv"))
    error = stopped_with_status_2(["train", "--resume", str(out)], capsys)  # finished now
    assert f"--resume: {out} holds a finished run" in error


@pytest.mark.slow
def test_resume_after_a_kill(tmp_path):
    out = tmp_path / "run"
    kill_mid_run(out)  # SIGKILL: nothing saved at the stop, only the last epoch's checkpoint
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    whole = normfree.train(**{**QUICK_OPTIONS, "epochs": 3}, out=tmp_path / "whole", **QUIET)
    assert_same_metrics(read_rows(out / "metrics.csv"), metrics(whole))


@pytest.mark.slow
def test_resume_accepts_only_unfinished_runs_with_a_checkpoint(tmp_path, capsys):
    error = stopped_with_status_2(["train", "--resume", str(tmp_path / "missing")], capsys)
    usage_lines = build_parser()[1]["train"].format_usage().count("\n")
    assert "--resume:" in error and "is not a folder" in error and error.count("\n") <= usage_lines + 1  # one line
    error = stopped_with_status_2(["train", "--resume", str(tmp_path)], capsys)
    assert f"--resume: {tmp_path} is not a normfree run folder" in error
    out = tmp_path / "run"
    normfree.train(**QUICK_OPTIONS, out=out, cbs=[InterruptAt(0, 1)], **QUIET)  # stopped in its first epoch
    error = stopped_with_status_2(["train", "--resume", str(out)], capsys)
    assert "before its first epoch finished" in error and "--overwrite" in error
    error = stopped_with_status_2(["train", "--resume", str(out), "--bs", "8", "--overwrite"], capsys)
    assert "--resume: continues the run with the settings it was started with; drop --bs, --overwrite" in error


# ---------------------------------------------------------------------------------------------
# A resume checks that the checkpoint belongs to the folder's run before it changes anything there


def stopped_run(out, **options):
    """A 2-epoch run stopped (Ctrl-C) in its second epoch: its checkpoint holds the first."""
    settings = {**QUICK_OPTIONS, "epochs": 2, **options}
    result = normfree.train(**settings, out=out, cbs=[InterruptAt(1, 0)], quiet=True, save_plots=False)
    assert result.interrupted and (out / "checkpoint.pth").exists()
    return result


def folder_contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def image_folder(path, per_class=4):
    return write_digits_image_folder(path, size=8, per_class=per_class)


def another_runs_checkpoint(out, tmp_path):
    stopped_run(tmp_path / "other", arch="bn_resnet_tiny", agc=None)
    shutil.copy(tmp_path / "other" / "checkpoint.pth", out / "checkpoint.pth")


def edited_config(out, tmp_path):
    path = out / "config.json"
    content = json.loads(path.read_text())
    content["config"]["epochs"] = 5
    path.write_text(json.dumps(content))


def older_checkpoint(out, tmp_path):
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    for key in ("format", "data", "clip_history"):  # what format 1 did not have
        state.pop(key, None)
    torch.save(state, out / "checkpoint.pth")


def images_added(out, tmp_path):
    for i, image in enumerate(sorted((tmp_path / "images" / "3").iterdir())[:3]):
        shutil.copy(image, tmp_path / "images" / "3" / f"extra{i}.png")


def class_added(out, tmp_path):
    shutil.copytree(tmp_path / "images" / "3", tmp_path / "images" / "ten")


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("change, expected", [
    (another_runs_checkpoint, 'says arch "nf_resnet_tiny", agc 0.04 but {checkpoint} was written by a run with arch '
                              '"bn_resnet_tiny", agc null'),
    (edited_config, "says epochs 5 but {checkpoint} was written by a run with epochs 2"),
    (older_checkpoint, "{checkpoint} is in checkpoint format 1; this normfree reads format 2"),
    (images_added, "images added"),
    (class_added, "the data's classes changed: 'ten' added (10 classes then, 11 now)"),
], ids=["another-runs-checkpoint", "edited-config", "older-checkpoint", "images-added", "class-added"])
def test_resume_refuses_a_checkpoint_that_is_not_the_folders_run_and_changes_nothing(tmp_path, capsys, change,
                                                                                         expected):
    data = str(image_folder(tmp_path / "images")) if "added" in change.__name__ else QUICK_OPTIONS["data"]
    out = tmp_path / "run"
    stopped_run(out, data=data, **({"limit": None} if data != "digits" else {}))
    change(out, tmp_path)
    before = folder_contents(out)
    error = stopped_with_status_2(["train", "--resume", str(out)], capsys)
    assert "--resume: " in error and expected.format(checkpoint=out / "checkpoint.pth") in error
    assert f"normfree train --config {out / 'config.json'} --out NEW_FOLDER" in error  # how to start a new run
    assert folder_contents(out) == before  # nothing deleted or rewritten


@pytest.mark.slow
def test_resumed_clip_history_is_the_whole_runs(tmp_path):
    """agc_clip_rates.png after a resume plots every step of the fit, as the uninterrupted run's does."""
    whole = normfree.train(**{**QUICK_OPTIONS, "epochs": 2}, out=tmp_path / "whole", **QUIET)
    stopped_run(tmp_path / "run")
    resumed = resume(tmp_path / "run", quiet=True, save_model=False)
    expected, history = whole.learner.adaptive_clip.history, resumed.learner.adaptive_clip.history
    assert len(history) == len(expected) == 8  # 4 batches an epoch
    for counts in ("clipped", "units", "nonfinite"):
        assert torch.equal(getattr(history, counts)().float(), getattr(expected, counts)().float()), counts
    assert (tmp_path / "run" / "agc_clip_rates.png").exists()


class InterruptAfterTheLastEpoch(Callback):
    """Ctrl-C once the last epoch's checkpoint is written, before the run has finished."""

    order = EpochCheckpoint.order + 1

    def after_epoch(self):
        if self.epoch == self.n_epoch - 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resuming_after_the_last_epoch_still_plots_the_clip_rates(tmp_path):
    out = tmp_path / "run"
    normfree.train(**QUICK_OPTIONS, out=out, cbs=[InterruptAfterTheLastEpoch()], quiet=True, save_plots=False)
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1  # its only epoch
    resumed = resume(out, quiet=True, save_model=False)
    assert len(resumed.learner.adaptive_clip.history) == 4 and (out / "agc_clip_rates.png").exists()


@pytest.mark.slow
def test_resume_of_a_relative_folder(tmp_path, monkeypatch):
    """The documented `normfree train --resume runs/nf` (docs/command-line.md), from the folder holding runs/."""
    monkeypatch.chdir(tmp_path)
    stopped_run(Path("runs/nf"))
    assert main(["train", "--resume", "runs/nf", "--quiet"]) == 0
    out = tmp_path / "runs" / "nf"
    assert {"learner.pkl", "result.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert INCOMPLETE not in {p.name for p in out.iterdir()} and not (out / "runs").exists()


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_copied_run_folder_resumes_where_it_is(tmp_path):
    stopped_run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = folder_contents(tmp_path / "a")
    assert main(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    assert folder_contents(tmp_path / "a") == before  # nothing written into the original
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["config"]["out"] == str(tmp_path / "b")
    assert config["repeat"] == f"normfree train --config {tmp_path / 'b' / 'config.json'} --out NEW_FOLDER"
    assert TrainResult.load(tmp_path / "b").config.out == str(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_run_whose_marker_was_removed_is_still_an_unfinished_one(tmp_path, capsys):
    out = tmp_path / "run"
    stopped_run(out)
    (out / INCOMPLETE).unlink()  # result.json still says interrupted
    error = stopped_with_status_2(["train", *QUICK, "--out", str(out)], capsys)
    assert f"{out} holds an incomplete run (result.json says it was stopped by Ctrl-C after 1 finished epoch(s)" in \
        error and f"continue it with: normfree train --resume {out}" in error
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert TrainResult.load(out).interrupted is False and not (out / "checkpoint.pth").exists()


class OptimizerSeen(Callback):
    def before_fit(self):
        self.optimizer = self.learn.opt


@pytest.mark.slow
def test_a_checkpoint_from_before_fast_opt_resumes_with_fastais_optimizer(tmp_path):
    """Runs written before `fast_opt` existed trained with fastai's optimizer, whose state their checkpoint holds:
    without the field in config.json and the checkpoint, the run goes on with fastai's optimizer, as it started."""
    settings = {**QUICK_OPTIONS, "epochs": 3, "fast_opt": False}
    whole = normfree.train(**settings, out=tmp_path / "whole", **QUIET)
    normfree.train(**settings, out=tmp_path / "run", cbs=[InterruptAt(1, 2)], **QUIET)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    del state["config"]["fast_opt"]
    torch.save(state, tmp_path / "run" / "checkpoint.pth")
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    del recorded["config"]["fast_opt"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
    seen = OptimizerSeen()
    resumed = resume(tmp_path / "run", cbs=[seen], **QUIET)
    assert not resumed.interrupted and not isinstance(seen.optimizer, TorchOptimizer)
    assert_same_metrics(metrics(resumed), metrics(whole))
