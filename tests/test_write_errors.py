"""A file that cannot be written (a full disk, a read-only folder, a folder where a file should go, a loop of
symbolic links) stops the command with one line naming the path and the errno (or the option given), keeps what
was written before whole (the last finished epoch's checkpoint, for --resume) and leaves no temporary file.

A full disk is played two ways: os.fsync failing with ENOSPC on the temporary file of one output (file systems
that allocate late report a full disk there), and, where this runs as root and may mount, a real tmpfs that fills
up while torch.save writes a checkpoint (torch then says only "unexpected pos", safetensors a SafetensorError)."""
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from safetensors.torch import save_file

from helpers import EXPECTED_FILES, QUICK, read_rows, refusal_line, with_callback
from normfree.app.cli import main
from normfree.learner.checkpoint import EpochCheckpoint, load_checkpoint
from normfree.utils.errors import WriteError
from normfree.utils.outdir import INCOMPLETE, atomic_write

NO_SPACE = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
# the quick grid of one run
ONE_RUN_GRID = ["--methods", "nf-agc", "--batch-sizes", "16", "--no-accum", "--seeds", "0", "--epochs", "1",
                "--size", "8", "--limit", "64", "--lrs", "0.01", "--quiet"]


def disk_full_at(monkeypatch, name, nth=1):
    """The `nth` flush to disk of a temporary file of `name` (each output is written to one, then renamed) fails as
    on a full disk."""
    fsync, seen = os.fsync, []

    def fsync_or_full(descriptor):
        target = Path(os.readlink(f"/proc/self/fd/{descriptor}")).name
        if target.startswith(f".{name}.tmp-"):
            seen.append(target)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_or_full)


def leftovers(folder):
    return [p.name for p in Path(folder).glob(".*.tmp-*")]


def one_line(capsys):
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    return error


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("name, nth, epochs, resumed", [
    ("config.json", 1, 1, False),  # the first file after the marker: no epoch checkpointed yet
    ("metrics.csv", 2, 2, False),
    ("checkpoint.pth", 2, 2, True),  # the second epoch's: the first one's stays
    ("model.safetensors", 1, 1, True),  # after the last epoch: its checkpoint stays until the run is whole
    ("learner.pkl", 1, 1, False),
    ("curves.png", 1, 1, False),
    ("agc_clip_rates.png", 1, 1, False),
    ("result.json", 1, 1, False),
])
def test_a_full_disk_stops_the_run_with_one_line_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys, name,
                                                                             nth, epochs, resumed):
    out = tmp_path / "run"
    disk_full_at(monkeypatch, name, nth)
    assert main(["train", *QUICK, "--epochs", str(epochs), "--out", str(out)]) == 74
    error = one_line(capsys)
    assert error.startswith(f"normfree train: error: cannot write {out / name}: {NO_SPACE}; "), error
    assert INCOMPLETE in {p.name for p in out.iterdir()} and leftovers(out) == []
    monkeypatch.undo()  # the disk has room again
    if name == "config.json":
        assert error.endswith("train the run again with --overwrite") and not (out / "checkpoint.pth").exists()
        return
    assert error.endswith(f"continue the run with normfree train --resume {out}")
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == epochs - (name in ("metrics.csv", "checkpoint.pth"))
    if resumed:  # (the others end the same way)
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
        assert INCOMPLETE not in {p.name for p in out.iterdir()} and (out / "result.json").exists()
        assert [row["epoch"] for row in read_rows(out / "metrics.csv")] == [str(e + 1) for e in range(epochs)]


@pytest.mark.bad_input
def test_a_full_disk_at_the_first_write_leaves_no_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "run"
    disk_full_at(monkeypatch, INCOMPLETE)
    assert main(["train", *QUICK, "--out", str(out)]) == 74
    assert one_line(capsys) == (f"normfree train: error: cannot write {out / INCOMPLETE}: {NO_SPACE}; once it can be "
                                f"written, run the same command again")
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_full_disk_stops_compare_with_one_line_and_the_same_command_finishes_it(tmp_path, monkeypatch, capsys):
    out, name = tmp_path / "grid", "compare.json"
    disk_full_at(monkeypatch, name)
    assert main(["compare", *ONE_RUN_GRID, "--out", str(out)]) == 74
    error = one_line(capsys)
    assert error == (f"normfree compare: error: cannot write {out / name}: {NO_SPACE}; once it can be written, run "
                     f"the same command again (the runs finished in --out are reused)")
    assert leftovers(out) == []
    monkeypatch.undo()
    assert main(["compare", *ONE_RUN_GRID, "--out", str(out)]) == 0
    assert {"compare.json", "report.md", "report.html"} <= {p.name for p in out.iterdir()}


@pytest.mark.bad_input
def test_a_failed_write_is_one_error_with_the_path_and_the_errno_and_the_target_as_it_was(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, "old")
    with pytest.raises(WriteError) as failed:
        atomic_write(tmp_path / "missing" / "b.txt", "new")  # its folder is gone
    assert (failed.value.errno, failed.value.filename) == (errno.ENOENT, str(tmp_path / "missing" / "b.txt"))
    assert isinstance(failed.value, OSError)
    with pytest.raises(WriteError) as failed:
        atomic_write(tmp_path, "new")  # a folder where the file should go
    assert failed.value.errno == errno.EISDIR

    def bug(path):  # a writer's own error, on a disk with room: not a write error, and not hidden
        path.write_text("half")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(target, bug)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# A real full disk: a tmpfs (root only)


def mount_tmpfs(folder, size):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return folder


def resize(folder, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def used_bytes(folder):
    stat = os.statvfs(folder)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = mount_tmpfs(tmp_path / "disk", "64m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


class FillDiskAfterFirstCheckpoint(Callback):
    """After the first epoch's checkpoint, the disk shrinks to what it holds plus 64 KiB: the metrics of the second
    epoch still fit, its checkpoint (1.6 MB) does not."""

    order = EpochCheckpoint.order + 1

    def __init__(self, disk):
        self.disk = disk

    def after_epoch(self):
        if self.epoch == 0:
            resize(self.disk, used_bytes(self.disk) + 64 * 1024)


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_real_full_disk_during_the_checkpoint_keeps_the_last_one_and_resume_finishes_the_run(disk, monkeypatch,
                                                                                                capsys):
    out = disk / "run"
    with_callback(monkeypatch, FillDiskAfterFirstCheckpoint(disk))
    assert main(["train", *QUICK, "--epochs", "2", "--out", str(out)]) == 74
    error = one_line(capsys)  # torch.save said only "[enforce fail at inline_container.cc] unexpected pos"
    assert error.startswith(f"normfree train: error: cannot write {out / 'checkpoint.pth'}: {NO_SPACE}; ")
    assert leftovers(out) == [] and INCOMPLETE in {p.name for p in out.iterdir()}
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    monkeypatch.undo()
    resize(disk, "64m")  # room again
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES and len(read_rows(out / "metrics.csv")) == 2


@pytest.mark.bad_input
@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "bytes"])
def test_a_real_full_disk_is_enospc_whatever_the_writer_says(disk, writer):
    resize(disk, "1m")
    tensors = {"weights": torch.zeros(1_000_000)}  # 4 MB
    content = {"torch.save": lambda path: torch.save(tensors, path),
               "safetensors": lambda path: save_file(tensors, path),
               "bytes": bytes(4_000_000)}[writer]
    with pytest.raises(WriteError) as failed:
        atomic_write(disk / "file", content)
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(disk / "file"))
    assert list(disk.iterdir()) == []
    assert used_bytes(disk) == 0  # the writer's half-written file is closed and gone: its space is free again


# ---------------------------------------------------------------------------------------------
# Folders that cannot be written: ConfigError naming the option


@pytest.mark.bad_input
@pytest.mark.parametrize("command", [["train", *QUICK], ["compare", *ONE_RUN_GRID],
                                     ["spp", "--arch", "nf_resnet_tiny"]], ids=["train", "compare", "spp"])
def test_an_out_through_a_loop_of_symbolic_links_is_refused_naming_out(tmp_path, capsys, command):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for out in (tmp_path / "a", tmp_path / "a" / "run"):
        error = refusal_line([*command, "--out", str(out)], capsys)
        assert error.startswith(f"normfree {command[0]}: error: --out: ") and "loop of symbolic links" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.bad_input
def test_a_resume_through_a_loop_of_symbolic_links_is_refused_naming_resume(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    error = refusal_line(["train", "--resume", str(tmp_path / "a")], capsys)
    assert error.startswith("normfree train: error: --resume: ") and "loop of symbolic links" in error, error


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write into: a read-only tmpfs for root (who ignores permissions), else mode 0o555."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount_tmpfs(folder, "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.bad_input
@pytest.mark.parametrize("plan, reason", [
    (lambda folder, tmp_path: folder / "plan.txt", "Read-only file system"),  # Permission denied when not root
    (lambda folder, tmp_path: tmp_path, "is a folder"),
], ids=["in-a-read-only-folder", "a-folder"])
def test_a_plan_that_cannot_be_written_is_refused_naming_plan(tmp_path, read_only_folder, capsys, plan, reason):
    path = plan(read_only_folder, tmp_path)
    error = refusal_line(["compare", *ONE_RUN_GRID, "--out", str(tmp_path / "grid"), "--plan", str(path)], capsys)
    assert error.startswith("normfree compare: error: --plan: ") and str(path) in error, error
    if os.geteuid() == 0 or reason == "is a folder":
        assert reason in error
    assert not (tmp_path / "grid").exists() and leftovers(tmp_path) == []
