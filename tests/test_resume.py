"""`normfree train --resume DIR` / `normfree.resume`: a run stopped by Ctrl-C, SIGTERM or a kill continues from its
last finished epoch and ends with the metrics of the same run never stopped; only unfinished runs are accepted."""
import signal

import pytest
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

import normfree
from normfree.app.cli import main
from normfree.utils.outdir import INCOMPLETE

QUIET = dict(quiet=True, save_model=False, save_plots=False)


def metrics(result):
    return [{k: str(v) for k, v in row.items()} for row in result.epochs]


@pytest.mark.parametrize("options, at", [
    (dict(epochs=3), (1, 2)),
    # fp16's gradient scaler; 4 batches an epoch, 3 per step: the checkpoint holds a part-way accumulation
    (dict(epochs=3, accum=3, precision="fp16"), (2, 1)),
    (dict(epochs=3, steps=5, accum=2, per_sample=True), (1, 0)),
], ids=["plain", "fp16-accum", "steps-per-sample"])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, options, at):
    settings = {**QUICK_OPTIONS, **options}
    whole = normfree.train(**settings, out=tmp_path / "whole", **QUIET)
    stopped = normfree.train(**settings, out=tmp_path / "run", cbs=[InterruptAt(*at)], **QUIET)
    assert stopped.interrupted and len(stopped.epochs) == at[0]
    assert (tmp_path / "run" / "checkpoint.pth").exists()
    resumed = normfree.resume(tmp_path / "run", **QUIET)
    assert not resumed.interrupted
    assert_same_metrics(metrics(resumed), metrics(whole))
    assert_same_metrics(read_rows(tmp_path / "run" / "metrics.csv"), metrics(whole))  # the CSV continued
    assert {p.name for p in (tmp_path / "run").iterdir()} == {p.name for p in (tmp_path / "whole").iterdir()}


def test_fine_tune_resumes_in_its_frozen_fit(tmp_path):
    base = normfree.train(**QUICK_OPTIONS, out=tmp_path / "base", quiet=True, save_plots=False)
    settings = {**QUICK_OPTIONS, "epochs": 1, "fine_tune": True, "freeze_epochs": 2,
                "weights": base.files["weights"]}
    whole = normfree.train(**settings, out=tmp_path / "whole", **QUIET)
    normfree.train(**settings, out=tmp_path / "run", cbs=[InterruptAt(1, 1)], **QUIET)
    assert_same_metrics(metrics(normfree.resume(tmp_path / "run", **QUIET)), metrics(whole))


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
    assert normfree.TrainResult.load(out).interrupted is False
    assert_same_metrics(read_rows(out / "metrics.csv"), read_rows(tmp_path / "whole" / "metrics.csv"))
    error = stopped_with_status_2(["train", "--resume", str(out)], capsys)  # finished now
    assert f"--resume: {out} holds a finished run" in error


def test_resume_after_a_kill(tmp_path):
    out = tmp_path / "run"
    kill_mid_run(out)  # SIGKILL: nothing saved at the stop, only the last epoch's checkpoint
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    whole = normfree.train(**{**QUICK_OPTIONS, "epochs": 3}, out=tmp_path / "whole", **QUIET)
    assert_same_metrics(read_rows(out / "metrics.csv"), metrics(whole))


def test_resume_accepts_only_unfinished_runs_with_a_checkpoint(tmp_path, capsys):
    error = stopped_with_status_2(["train", "--resume", str(tmp_path / "missing")], capsys)
    assert "--resume:" in error and "is not a folder" in error and error.count("\n") <= 14  # usage + one line
    error = stopped_with_status_2(["train", "--resume", str(tmp_path)], capsys)
    assert f"--resume: {tmp_path} is not a normfree run folder" in error
    out = tmp_path / "run"
    normfree.train(**QUICK_OPTIONS, out=out, cbs=[InterruptAt(0, 1)], **QUIET)  # stopped in its first epoch
    error = stopped_with_status_2(["train", "--resume", str(out)], capsys)
    assert "before its first epoch finished" in error and "--overwrite" in error
    error = stopped_with_status_2(["train", "--resume", str(out), "--bs", "8", "--overwrite"], capsys)
    assert "--resume: continues the run with the settings it was started with; drop --bs, --overwrite" in error
