"""What is left in --out whatever way a run ends: SIGTERM, SIGKILL, Ctrl-C while starting, a second run, a file
in the way, a divergence; and the settings refused before anything is built (config files, batch counts)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import normfree
from helpers import (
    QUICK,
    QUICK_OPTIONS,
    ROOT,
    TRAIN,
    InterruptAt,
    SendAt,
    kill_mid_run,
    read_rows,
    stopped_with_status_2,
    with_callback,
)
from normfree.app.cli import main
from normfree.app.compare import CompareConfig, finished_run
from normfree.app.config import TrainConfig
from normfree.app.signals import Terminated
from normfree.utils.outdir import INCOMPLETE, atomic_write, locked_folder


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"

    def broken(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic_write(tmp_path / "b.png", lambda path: path.write_bytes(path.suffix.encode()))  # the suffix is kept
    assert (tmp_path / "b.png").read_bytes() == b".png"


@pytest.mark.slow
@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, reason="SIGTERM is handled here already")
def test_sigterm_checkpoints_like_ctrl_c_with_status_143(tmp_path, monkeypatch, capsys):
    with_callback(monkeypatch, SendAt(signal.SIGTERM))
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "3", "--out", str(out)]) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handed back
    message = capsys.readouterr().err
    assert "Interrupted (SIGTERM) after 1 finished epoch(s)" in message and "model.safetensors" in message
    assert {"config.json", "metrics.csv", "model.safetensors", "result.json", INCOMPLETE} <= {
        p.name for p in out.iterdir()}
    result = json.loads((out / "result.json").read_text())
    assert (result["interrupted"], result["stopped_by"], len(result["epochs"])) == (True, "SIGTERM", 1)
    assert "stopped by SIGTERM" in (out / INCOMPLETE).read_text()
    assert finished_run(TrainConfig.load(out), overwrite=False) is None  # compare trains it again


@pytest.mark.slow
def test_a_run_killed_without_warning_is_marked_incomplete_and_never_reused(tmp_path, capsys):
    out = tmp_path / "run"
    kill_mid_run(out)
    assert INCOMPLETE in {p.name for p in out.iterdir()} and "has not finished" in (out / INCOMPLETE).read_text()
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("1,")  # the header and the finished epoch, whole
    assert not list(out.glob(".*"))  # no temporary file left: none was being written

    error = stopped_with_status_2(["train", *QUICK, "--out", str(out)], capsys)
    assert f"--out: {out} holds an incomplete run" in error and "--overwrite" in error
    assert main(["train", *QUICK, "--out", str(out), "--overwrite"]) == 0
    assert INCOMPLETE not in {p.name for p in out.iterdir()}
    config = TrainConfig.load(out)
    finished = finished_run(config, overwrite=False)  # the run just trained, as its folder holds it
    assert finished.config == config and not finished.interrupted
    rows = read_rows(out / "metrics.csv")
    assert [row["accuracy"] for row in finished.epochs] == [float(row["accuracy"]) for row in rows]
    (out / INCOMPLETE).write_text("killed")  # a finished result.json, but the marker says otherwise
    assert finished_run(config, overwrite=False) is None


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with locked_folder(out):
        error = stopped_with_status_2(["train", *QUICK, "--out", str(out)], capsys)
        assert f"--out: another normfree run is writing into {out}" in error
        error = stopped_with_status_2(["compare", "--methods", "bn", "--batch-sizes", "8", "--seeds", "0",
                                       "--epochs", "1", "--size", "8", "--limit", "48", "--lrs", "0.01",
                                       "--out", str(out)], capsys)
        assert f"--out: another normfree run is writing into {out}" in error
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_two_processes_into_one_folder_one_is_refused(tmp_path):
    """The real race of the issue: both started together; exactly one trains, the other names the folder."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "normfree", "train", *QUICK, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = sorted((run.wait(180), run.stderr.read()) for run in runs)
    assert [status for status, _ in done] == [0, 2]
    refused = done[1][1]
    assert (f"another normfree run is writing into {out}" in refused or f"{out} already holds a run" in refused)
    assert json.loads((out / "result.json").read_text())["config"]["out"] == str(out)


@pytest.mark.parametrize("stop, status, name", [(KeyboardInterrupt, 130, "Ctrl-C"), (Terminated, 143, "SIGTERM")])
def test_stopped_while_starting_one_line_and_no_folder(tmp_path, monkeypatch, capsys, stop, status, name):
    def interrupted(config, resumed=None):
        raise stop()

    monkeypatch.setattr(TRAIN, "_build_learner", interrupted)
    assert main(["train", *QUICK, "--out", str(tmp_path / "new" / "run")]) == status
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"normfree train: stopped by {name} while starting") and "\n" not in error
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "normfree", "train", "--out", str(tmp_path / "run")],
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # torch, fastai and timm take seconds to import
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130
    assert error.strip() == "normfree: stopped by Ctrl-C while starting, before anything was read or written."
    assert list(tmp_path.iterdir()) == []


def test_out_is_checked_before_the_data_and_model_are_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TRAIN, "_build_learner", lambda config: pytest.fail("built before --out was checked"))
    (tmp_path / "file").write_text("")
    error = stopped_with_status_2(["train", *QUICK, "--out", str(tmp_path / "file" / "sub")], capsys)
    assert f"--out: {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file" in error
    error = stopped_with_status_2(["train", *QUICK, "--out", str(tmp_path / "file")], capsys)
    assert f"--out: {tmp_path / 'file'} is a file; out must be a folder" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_refused_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TRAIN, "_build_learner", lambda config: pytest.fail("built before --out was checked"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        error = stopped_with_status_2(["train", *QUICK, "--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert f"--out: cannot create the folder {locked / 'run'}" in error


def test_compare_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    error = stopped_with_status_2(["compare", "--epochs", "1", "--size", "8", "--limit", "48", "--lrs", "0.01",
                                   "--out", str(tmp_path / "file")], capsys)
    assert f"error: --out: {tmp_path / 'file'} is a file" in error


def write_config(path, **changes):
    content = {"config": {**TrainConfig(**QUICK_OPTIONS).to_dict(), **changes}}
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("changes, expected", [
    ({"foo": 1}, "unknown key 'foo'; known keys: data, arch"),
    ({"batch_size": 32}, "unknown key 'batch_size' (did you mean 'bs'?)"),
    ({"epoch": 3}, "unknown key 'epoch' (did you mean 'epochs'?)"),
    ({"agc": True}, "key 'agc': is AGC's lambda, a number such as 0.04, not True"),
    ({"epochs": 1e21}, "key 'epochs': must be a whole number >= 1, got 1e+21"),
])
def test_config_file_errors_name_the_file_and_its_key(tmp_path, capsys, changes, expected):
    config = write_config(tmp_path / "config.json", **changes)
    error = stopped_with_status_2(["train", "--config", config, "--out", str(tmp_path / "run")], capsys)
    assert f"error: --config: {config}: {expected}" in error
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_compare_config_given_to_train_is_recognised(tmp_path, capsys):
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"config": CompareConfig(lrs=[0.01]).to_dict(),
                                "command": "normfree compare --lrs 0.01"}))
    error = stopped_with_status_2(["train", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert f"--config: {path} is a normfree compare config, not a run's config.json; repeat that grid with: " \
           f"normfree compare --lrs 0.01" in error


@pytest.mark.slow
def test_a_diverging_run_stops_says_so_and_exits_1(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "3", "--lr", "1e30", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "normfree train: training diverged" in error and "lower lr (--lr)" in error
    result = json.loads((out / "result.json").read_text())
    assert result["diverged"] is True and len(result["epochs"]) == 1  # stopped after the first non-finite epoch
    assert INCOMPLETE not in {p.name for p in out.iterdir()}  # finished (badly), not killed


@pytest.mark.slow
def test_a_batch_larger_than_the_data_is_said(tmp_path, capsys):
    result = normfree.train(**{**QUICK_OPTIONS, "bs": 100000}, quiet=True, save_model=False, save_plots=False,
                            out=tmp_path / "run")
    assert "warning: bs 100000 (--bs) is more than the 64 training images: every epoch is one batch of 64" in \
        capsys.readouterr().err
    assert len(result.epochs) == 1


@pytest.mark.slow
@pytest.mark.bad_input
def test_printed_and_recorded_commands_are_quoted_for_the_shell(tmp_path, capsys):
    out = tmp_path / "my runs" / "run 1"
    normfree.train(**{**QUICK_OPTIONS, "epochs": 2}, out=out, cbs=[InterruptAt(1, 0)], quiet=True, save_plots=False)
    resume = shlex.join(["normfree", "train", "--resume", str(out)])
    assert f"Continue it from its last finished epoch with: {resume}" in capsys.readouterr().err
    assert resume in (out / INCOMPLETE).read_text()
    repeat = json.loads((out / "config.json").read_text())["repeat"]
    assert shlex.split(repeat) == ["normfree", "train", "--config", str(out / "config.json"), "--out", "NEW_FOLDER"]
    error = stopped_with_status_2(["train", *QUICK, "--out", str(out)], capsys)
    assert f"continue it with: {resume};" in error
    grid = shlex.split(CompareConfig(lrs=(0.01,), out=str(tmp_path / "my grid")).command())
    assert grid[grid.index("--out") + 1] == str(tmp_path / "my grid")


GRID = ["compare", "--methods", "bn", "--batch-sizes", "8", "--seeds", "0", "--epochs", "1", "--size", "8", "--limit",
        "48", "--lrs", "0.01"]


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("argv, holds", [
    (["train", *QUICK], "normfree compare (compare.json), not of normfree train"),
    (GRID, "normfree train (config.json), not of normfree compare"),
], ids=["train-into-a-compare-folder", "compare-into-a-run-folder"])
def test_train_and_compare_refuse_each_others_out_folder(tmp_path, capsys, argv, holds):
    out = tmp_path / "out"
    if argv[0] == "compare":
        normfree.train(**QUICK_OPTIONS, out=out, quiet=True, save_model=False, save_plots=False)
    else:  # a finished grid's folder
        (out / "runs").mkdir(parents=True)
        (out / "compare.json").write_text(json.dumps({"config": CompareConfig(lrs=[0.01]).to_dict()}))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    error = stopped_with_status_2([*argv, "--out", str(out), "--overwrite"], capsys)
    assert f"--out: {out} holds the outputs of {holds}" in error and "choose another out folder" in error
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
