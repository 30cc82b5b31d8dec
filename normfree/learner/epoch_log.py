"""One row per training epoch: the Recorder's losses and metrics plus exact timings, written to a CSV as it goes.

fastai's `CSVLogger` writes the Recorder's row with the epoch time as "mm:ss"; comparisons of
speed need seconds and throughput, and a run stopped with Ctrl-C needs its finished epochs on
disk, whole rows only. `EpochLog` keeps both, across the several fits of one run (``fine_tune`` makes two).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.torch_core import find_bs

from ..utils.outdir import atomic_write
from ..utils.processes import world_size

__all__ = ["EpochLog"]


class EpochLog(Callback):
    """Per-epoch rows: ``epoch`` (1 = the first), ``train_loss`` (fastai's smoothed loss),
    ``valid_loss``, each metric, then ``seconds`` (the epoch, validation included),
    ``train_seconds`` and ``images_per_s`` (training examples per second, those of every process of a launched
    run, `normfree.utils.processes`).

    Pass it to the fits of a run (``learn.fit_one_cycle(n, cbs=log)``); `rows` accumulates over
    them and, when `path` is given, that CSV is rewritten (atomically) with every row as soon as an
    epoch ends.
    lr_find and prediction passes are ignored, and so are the epochs fastai skips when a run is resumed
    (``start_epoch``, see `normfree.learner.checkpoint`): `rows` then starts with the rows of the epochs before.
    """

    order = Recorder.order + 5  # after the Recorder has computed the epoch's values

    def __init__(self, path: str | Path | None = None, rows: list[dict[str, Any]] | None = None):
        self.path = None if path is None else Path(path)
        self.rows: list[dict[str, Any]] = list(rows or [])

    def before_fit(self) -> None:
        self.run = not (hasattr(self.learn, "lr_finder") or hasattr(self.learn, "gather_preds"))

    def before_epoch(self) -> None:
        self._skipped = False

    def after_cancel_epoch(self) -> None:  # fastai's SkipToEpoch: trained before the run was resumed
        self._skipped = True

    def before_train(self) -> None:
        self._images, self._start = 0, time.perf_counter()

    def after_batch(self) -> None:
        if self.training:  # every process of a launched run trains on a batch as large as this one's
            self._images += find_bs(self.learn.yb) * world_size()

    def after_train(self) -> None:
        self._train_seconds = time.perf_counter() - self._start

    def after_epoch(self) -> None:
        if self._skipped:
            return
        names = [name for name in self.recorder.metric_names[1:] if name != "time"]
        row: dict[str, Any] = {"epoch": len(self.rows) + 1}
        row.update((name, float(value)) for name, value in zip(names, self.learn.final_record))
        row["seconds"] = time.perf_counter() - self._start
        row["train_seconds"] = self._train_seconds
        row["images_per_s"] = self._images / self._train_seconds if self._train_seconds > 0 else float("nan")
        self.rows.append(row)
        if self.path is not None:
            self._write()

    def _write(self) -> None:
        """The whole CSV again, replaced at once: a run killed mid-write never leaves half a row."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, list(self.rows[0]), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, text.getvalue())
