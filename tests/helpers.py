"""Helpers shared by several test modules (no test_*.py imports from another): quick training settings, run-folder
and signal helpers for the CLI tests, metrics CSVs, and writers of tiny dataset files."""
import csv
import gzip
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision

from normfree.app.cli import main

# One short epoch on 64 + 64 tiny digits.
QUICK = ["--data", "digits", "--arch", "nf_resnet_tiny", "--size", "8", "--limit", "64", "--bs", "16",
         "--epochs", "1", "--quiet"]
QUICK_OPTIONS = dict(data="digits", arch="nf_resnet_tiny", size=8, limit=64, bs=16, epochs=1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = importlib.import_module("normfree.app.train")  # the module (normfree.train is the function)
TIMING = {"seconds", "train_seconds", "images_per_s"}
# what a finished `normfree train` run leaves in --out
EXPECTED_FILES = {"config.json", "metrics.csv", "curves.png", "agc_clip_rates.png", "model.safetensors",
                  "learner.pkl", "result.json"}


# ---------------------------------------------------------------------------------------------
# Runs, signals and exit statuses


def stopped_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    return error


def refusal_line(argv, capsys):
    """The error line of `argv`, which must stop with status 2 (after argparse's usage lines)."""
    return stopped_with_status_2(argv, capsys).strip().splitlines()[-1]


class SendAt(Callback):
    """Sends `signum` to this process in the second epoch's first training batch."""

    def __init__(self, signum):
        self.signum = signum

    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 0:
            os.kill(os.getpid(), self.signum)


def with_callback(monkeypatch, callback):
    fit = TRAIN._fit
    monkeypatch.setattr(TRAIN, "_fit", lambda learn, config, lr, cbs: fit(learn, config, lr, [*cbs, callback]))


class InterruptAt(Callback):
    """Ctrl-C arriving in epoch `epoch` (0-based) at training batch `batch`, inside the forward pass."""

    order = MixedPrecision.order - 5

    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def after_pred(self):
        if self.training and (self.epoch, self.iter) == self.at:
            raise KeyboardInterrupt



SLOW_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fastai.callback.core import Callback
    import importlib
    from normfree.app.cli import main
    train_module = importlib.import_module("normfree.app.train")

    class Slow(Callback):  # the second epoch never ends; says when it is there
        def after_batch(self):
            if self.training and self.epoch == 1:
                Path(sys.argv[1]).with_suffix(".ready").touch()
                time.sleep(0.5)

    fit = train_module._fit
    train_module._fit = lambda learn, config, lr, cbs: fit(learn, config, lr, [*cbs, Slow()])
    sys.exit(main(["train", *sys.argv[2:], "--out", sys.argv[1]]))
""")


def kill_mid_run(out: Path) -> None:
    """Start `SLOW_RUN` (3 epochs) into `out`, SIGKILL it once its first epoch has ended: no handler runs."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(out), *QUICK, "--epochs", "3"], cwd=out.parent,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not out.with_suffix(".ready").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    assert process.wait(30) == -signal.SIGKILL


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]



# ---------------------------------------------------------------------------------------------
# Writers for tiny inputs


def write_idx(path, array, magic=None):
    """`array` as a gzipped IDX file (ubyte), with its correct magic number unless `magic` is given."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))
    return path


def write_fashion(folder, n_train=40, n_valid=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_valid)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def write_npz(path, shape=(12, 12), channels=None, label_width=1, n=(30, 10, 8), seed=0, **overrides):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        image_shape = (count, *shape, channels) if channels else (count, *shape)
        arrays[f"{split}_images"] = rng.integers(0, 256, image_shape, dtype=np.uint8)
        if label_width == 1:
            arrays[f"{split}_labels"] = (np.arange(count) % 3)[:, None].astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, label_width), dtype=np.uint8)
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# Recomputed metrics


class LossesSeen(Callback):
    """The loss of every training batch of the fit, as floats: what fastai's smoothed `train_loss` is made of."""

    def before_fit(self):
        self.losses = []

    def after_batch(self):
        if self.training:
            self.losses.append(float(self.learn.loss.mean()))


def smoothed_loss(losses, beta=0.98):
    """fastai's AvgSmoothLoss over `losses`: the exponential moving average, debiased."""
    value = 0.0
    for loss in losses:
        value = beta * value + (1 - beta) * loss
    return value / (1 - beta ** len(losses))


def validation_accuracy(learn):
    """The accuracy of `learn`'s model, recomputed by a fresh pass over its validation set."""
    with learn.no_bar():
        predictions, targets = learn.get_preds()
    return (predictions.argmax(1) == targets).float().mean().item()


def assert_same_metrics(resumed_rows, uninterrupted_rows, rel=1e-6):
    resumed_rows, uninterrupted_rows = without_timing(resumed_rows), without_timing(uninterrupted_rows)
    assert len(resumed_rows) == len(uninterrupted_rows)
    for resumed, whole in zip(resumed_rows, uninterrupted_rows):
        assert resumed.keys() == whole.keys()
        for key in resumed:
            if key.startswith("agc_clip") and resumed[key] in ("nan", ""):  # no clipping in a frozen epoch
                assert whole[key] == resumed[key]
            else:
                assert float(resumed[key]) == pytest.approx(float(whole[key]), rel=rel, abs=1e-9), key
