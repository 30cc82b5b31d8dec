"""`normfree.train`: one training run from a `TrainConfig`, every output written into its ``out`` folder.

What lands in ``out`` (and nowhere else; in a run started by torchrun or accelerate launch, written by rank 0
alone, see `normfree.app.distributed`):

| file | what |
|---|---|
| ``config.json`` | the resolved settings (absolute paths, the size used, the lr and lambda found), library versions |
| ``metrics.csv`` | one row per epoch (`EpochLog`), rewritten whole as each epoch ends |
| ``curves.png`` | loss and validation accuracy per epoch |
| ``agc_clip_rates.png`` | AGC's per-layer clip rate over the last fit (runs with AGC) |
| ``lr_find.png`` | fastai's learning-rate finder plot (runs with ``lr_find``) |
| ``agc_find.png`` | ``learn.agc_find()``'s plot (runs with ``agc="auto"``) |
| ``model.safetensors`` | the weights (`normfree.save_weights`; ``weights=`` reads them back) |
| ``learner.pkl`` | the exported Learner (`learn.export`; fastai's ``load_learner`` reads it) |
| ``result.json`` | the per-epoch metrics and the run's summary (`TrainResult`) |
| ``checkpoint.pth`` | while unfinished: the run's state after its last finished epoch (`normfree.learner.checkpoint`) |

Ctrl-C (or SIGTERM, what ``timeout`` and job schedulers send) during training stops it cleanly: the
weights at that point, the finished epochs' metrics and the config are saved, a message says where,
and the result has ``interrupted=True``. Every file is written atomically (`normfree.utils.outdir`); the
folder is locked for the whole run and holds an ``INCOMPLETE`` marker until the run has finished, so
a run killed without warning is never taken for a finished one. A run whose training loss stops
being finite stops there (``diverged=True``).

`resume` (``normfree train --resume DIR``) continues such an unfinished run from ``checkpoint.pth``,
written at the end of every epoch and removed when the run finishes: from its last finished epoch, with
the same batches, optimizer, schedule, generators and AGC clip history, so it ends as the run would have
without the stop (``agc_clip_rates.png`` included). It continues the run in DIR, wherever the folder was
copied or moved to (config.json's ``out`` and its repeat command are rewritten to DIR), and it needs
no ``weights`` file: the checkpoint holds the weights. Before it changes anything in DIR it checks that
the checkpoint belongs to the run DIR describes, and refuses (`ConfigError` naming ``resume``: what
differs, and the command that starts a new run instead) a checkpoint

- in another checkpoint format than this normfree's (`normfree.learner.checkpoint.CHECKPOINT_FORMAT`:
  another normfree version wrote it),
- written under other settings than config.json's (the keys that differ, ``lr_used`` included; ``out``
  aside): config.json was edited after the stop, or the checkpoint is another run's,
- written on other data than the data builds now (`normfree.learner.checkpoint.data_fingerprint`: the
  training and validation splits' images, labels and classes): images or classes added to or removed
  from an image folder would otherwise change the validation split, or the model's size, midway.

A run is finished when its folder holds no ``INCOMPLETE`` marker and its ``result.json`` does not say
``"interrupted": true``; every other run folder with a ``checkpoint.pth`` can be resumed. Every command
that normfree prints or records (the repeat line, ``--resume`` hints) is quoted for the shell
(`normfree.app.config.command_line`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Recorder
from fastai.losses import BCEWithLogitsLossFlat
from fastai.metrics import accuracy, accuracy_multi
from fastai.torch_core import set_seed
from torch import nn

from ..data.loaders import subset_dataloaders
from ..learner.callback import AGC
from ..learner.checkpoint import (
    CHECKPOINT,
    CheckpointFormatError,
    EpochCheckpoint,
    ResumeFit,
    data_changes,
    data_fingerprint,
    load_checkpoint,
)
from ..learner.epoch_log import EpochLog
from ..learner.frozen_batchnorm import FreezeBatchNorm
from ..learner.nf_learner import nf_learner
from ..learner.optim import opt_func
from ..learner.step_budget import StepBudget, epochs_for_steps
from ..models.classifier import classifier_init_std, find_classifier, init_classifier_
from ..models.convert import ConversionError
from ..models.weights import EXPORT_SUFFIX, SAVE_SUFFIX, save_weights
from ..utils.memory import PeakMemory
from ..utils.outdir import INCOMPLETE, atomic_write, remove_temporary_files, resolved_folder
from . import distributed
from .config import (
    AGC_AUTO,
    CONFIG_FILE,
    ConfigError,
    TrainConfig,
    check_out_kind,
    command_line,
    library_versions,
    make_config,
    training_device,
)
from .plots import plot_run_curves
from .signals import how_stopped, sigterm_as_interrupt

__all__ = ["OUTPUT_FILES", "TrainResult", "build_dataloaders", "resume", "train"]

OUTPUT_FILES = {
    "config": CONFIG_FILE,
    "metrics": "metrics.csv",
    "curves": "curves.png",
    "clip_rates": "agc_clip_rates.png",
    "lr_find": "lr_find.png",
    "agc_find": "agc_find.png",
    "weights": f"model{SAVE_SUFFIX}",
    "learner": f"learner{EXPORT_SUFFIX}",
    "result": "result.json",
    "checkpoint": CHECKPOINT,
}


@dataclass
class TrainResult:
    """What a run produced. `epochs` are the `EpochLog` rows; the summaries are computed from them.

    `metric` is the validation metric's column (``accuracy``, or ``accuracy_multi`` for multi-label
    data). `interrupted`: stopped by `stopped_by` (``Ctrl-C`` or ``SIGTERM``) before the end;
    `diverged`: stopped early because the training loss was no longer finite (see `divergence`).
    `peak_memory_mib` is `PeakMemory`'s measurement of the training (`memory_kind` says which).
    `agc` is the AGC lambda the run trained with (None without AGC; with ``agc="auto"``, the one agc_find chose).
    `learner` is the trained Learner (not saved in ``result.json``).
    """

    config: TrainConfig
    epochs: list[dict[str, float]]
    metric: str
    lr: float
    interrupted: bool = False
    stopped_by: str | None = None
    diverged: bool = False
    peak_memory_mib: float | None = None
    memory_kind: str | None = None
    agc: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    learner: Learner | None = field(default=None, repr=False, compare=False)

    def _column(self, name: str) -> list[float]:
        return [row[name] for row in self.epochs if name in row]

    @property
    def final_accuracy(self) -> float:
        """The validation metric after the last finished epoch (NaN if none finished)."""
        values = self._column(self.metric)
        return values[-1] if values else math.nan

    @property
    def best_accuracy(self) -> float:
        """The best validation metric over the finished epochs (NaN if none finished)."""
        values = self._column(self.metric)
        return max(values) if values else math.nan

    @property
    def final_valid_loss(self) -> float:
        values = self._column("valid_loss")
        return values[-1] if values else math.nan

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of an epoch, validation included."""
        values = self._column("seconds")
        return sum(values) / len(values) if values else math.nan

    @property
    def images_per_second(self) -> float:
        """Training examples per second of training time, over all epochs."""
        seconds = sum(self._column("train_seconds"))
        images = sum(r * s for r, s in zip(self._column("images_per_s"), self._column("train_seconds")))
        return images / seconds if seconds > 0 else math.nan

    def divergence(self) -> str:
        """What a diverged run says: where the loss stopped being finite, and the fix."""
        return (f"training diverged: the training loss was {self.epochs[-1]['train_loss']} after epoch "
                f"{len(self.epochs)}, so the run stopped; at lr {self.lr:g} the steps are too large: lower lr (--lr), "
                f"e.g. to {self.lr / 10:g}, or let --lr-find choose it")

    def summary(self) -> dict[str, Any]:
        return {
            "final_accuracy": self.final_accuracy,
            "best_accuracy": self.best_accuracy,
            "final_valid_loss": self.final_valid_loss,
            "seconds_per_epoch": self.seconds_per_epoch,
            "images_per_second": self.images_per_second,
            "peak_memory_mib": self.peak_memory_mib,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "metric": self.metric,
            "lr": self.lr,
            "interrupted": self.interrupted,
            "stopped_by": self.stopped_by,
            "diverged": self.diverged,
            "peak_memory_mib": self.peak_memory_mib,
            "memory_kind": self.memory_kind,
            "agc": self.agc,
            "files": self.files,
            "summary": self.summary(),  # for readers of the file; recomputed from `epochs` on load
            "epochs": self.epochs,
        }

    @classmethod
    def load(cls, path: str | Path) -> TrainResult:
        """A run's result from its ``result.json`` (or the ``out`` folder holding it)."""
        path = Path(path)
        path = path / OUTPUT_FILES["result"] if path.is_dir() else path
        content = json.loads(path.read_text())
        content.pop("summary", None)
        content["config"] = TrainConfig.from_dict(content["config"])
        return cls(**content)


def _train_command(*arguments: object) -> str:
    """The ``normfree train`` command with `arguments`, started as this process was (under a launcher: by it)."""
    return command_line(f"{distributed.launcher_prefix()}normfree train", arguments=arguments)


def _resume_command(out: Path) -> str:
    return _train_command("--resume", out)


def _new_run_command(out: Path) -> str:
    """How to train the settings of `out`'s config.json as a new run, instead of continuing the one there."""
    config = out / OUTPUT_FILES["config"]
    return (f"{_train_command('--config', config, '--out', 'NEW_FOLDER')} (or "
            f"{_train_command('--config', config, '--out', out, '--overwrite')}, which discards what {out} holds)")


def _unfinished(out: Path) -> str | None:
    """Why `out` holds a run that has not finished, None if it holds none: its INCOMPLETE marker, or a result.json
    that says it was interrupted (a folder whose marker was removed by hand)."""
    if (out / INCOMPLETE).exists():
        return f"{INCOMPLETE}: it was stopped or killed before it finished"
    try:
        result = json.loads((out / OUTPUT_FILES["result"]).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(result, dict) and result.get("interrupted"):
        return (f"{OUTPUT_FILES['result']} says it was stopped by {result.get('stopped_by')} after "
                f"{len(result.get('epochs', []))} finished epoch(s), though its {INCOMPLETE} marker is gone")
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    check_out_kind(out, CONFIG_FILE)
    if overwrite:
        return
    unfinished = _unfinished(out)
    if unfinished is not None:
        resumable = ((f"continue it with: {_resume_command(out)}") if (out / CHECKPOINT).exists() else
                     f"it has no {CHECKPOINT} (no epoch finished), so there is nothing to resume")
        raise ConfigError("out", f"{out} holds an incomplete run ({unfinished}); {resumable}; pass overwrite=True "
                                 f"(--overwrite) to replace it, or choose another out folder")
    if (out / OUTPUT_FILES["config"]).exists():
        raise ConfigError("out", f"{out} already holds a run ({CONFIG_FILE}); choose another out folder or "
                                 f"pass overwrite=True (--overwrite) to replace it")


def _prepare_out(out: Path) -> None:
    remove_temporary_files(out)
    for name in OUTPUT_FILES.values():  # only this module's own files: a previous run's would mislead
        (out / name).unlink(missing_ok=True)
    atomic_write(out / INCOMPLETE, f"This run has not finished: normfree train started it at {time.ctime()} "
                                   f"(process {os.getpid()}). If no normfree run is writing here any more, it was "
                                   f"killed before it finished. {_resume_command(out)} continues it from its last "
                                   f"finished epoch; normfree compare trains it again; normfree train refuses this "
                                   f"folder unless --overwrite is given.\n")


class _StopOnDivergence(Callback):
    """Ends the training (this fit and any later one of the run) after an epoch whose training loss is not
    finite: every later step would be NaN too."""

    order = Recorder.order + 10  # after EpochLog has written the epoch's row

    def __init__(self):
        self.diverged = False

    def before_fit(self) -> None:
        if self.diverged:  # fine_tune's second fit
            raise CancelFitException

    def before_epoch(self) -> None:
        self.skipped = False

    def after_cancel_epoch(self) -> None:  # fastai's SkipToEpoch: trained before the run was resumed
        self.skipped = True

    def after_epoch(self) -> None:
        if not self.skipped and not math.isfinite(float(self.learn.smooth_loss)):
            self.diverged = True
            raise CancelFitException


def build_dataloaders(config: TrainConfig) -> DataLoaders:
    """The DataLoaders a run with `config` trains and validates on (ConfigError naming the option for bad data)."""
    try:
        dls = config.data_spec.dataloaders(
            config.bs, config.size, config.seed, config.limit, config.valid_pct, config.path_col, config.label_col,
            training_device(config.device),
        )
    except ConfigError:  # a shared check (normfree.data.loaders) that names its option already
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError("data", str(error)) from None
    return _subset(dls, config)


def _subset(dls: DataLoaders, config: TrainConfig) -> DataLoaders:
    if config.classes is None and config.per_class is None and not config.holdout:
        return dls
    try:
        return subset_dataloaders(dls, config.classes, config.per_class, config.valid_pct if config.holdout else None,
                                  config.seed)
    except ValueError as error:
        option = str(error).partition(":")[0]
        raise ConfigError(option if option in ("classes", "per_class", "holdout") else "data", str(error)) from None


def _check_batches(dls: DataLoaders, config: TrainConfig) -> None:
    """A batch size larger than the data is refused where the training loader drops its incomplete last batch
    (image files, and every loader under a launcher: no training step at all), else said (every epoch is one
    batch); an accumulation longer than an epoch is refused (no optimizer step would be made)."""
    images, batches = len(dls.train_ds), distributed.batches_per_epoch(dls.train)
    processes = distributed.world_size()
    if batches == 0:
        batch = (f"bs {config.bs} in each of {processes} processes (a batch of {config.bs * processes})"
                 if distributed.launched() else f"bs {config.bs}")
        raise ConfigError("bs", f"{batch} is more than the {images} training images, and an epoch drops its incomplete "
                                f"last batch: no training step; give bs <= {images // processes}")
    if config.bs > images:
        print(f"normfree train: warning: bs {config.bs} (--bs) is more than the {images} training images: every "
              f"epoch is one batch of {images}", file=sys.stderr)
    if config.accum > batches:
        raise ConfigError("accum", f"{config.accum} batches per optimizer step is more than the {batches} batches of "
                                   f"an epoch ({images} training images, bs {config.bs}): training would make no "
                                   f"optimizer step; give accum <= {batches} or a smaller bs")


def _check_same_data(resumed: dict[str, Any], dls: DataLoaders, out: Path) -> None:
    """ConfigError naming ``resume`` when the data is not the data the checkpoint's epochs were trained on."""
    changes = data_changes(resumed["data"], data_fingerprint(dls))
    if changes:
        raise ConfigError("resume", f"{'; '.join(changes)}, since the run in {out} started: its remaining epochs would "
                                    f"train and validate on other data than its first ones; to train on the data as it "
                                    f"is now, start a new run: {_new_run_command(out)}")


def _build_learner(config: TrainConfig, resumed: dict[str, Any] | None = None) -> Learner:
    """The run's Learner; for a `resumed` run, on the data its checkpoint was written on, and without reading the
    starting weights (`weights`, `pretrained`): the checkpoint holds the weights."""
    dls = build_dataloaders(config)
    if resumed is not None:
        _check_same_data(resumed, dls, Path(config.out))
    _check_batches(dls, config)
    multi_label = getattr(dls, "multi_label", False)
    starting = resumed is None
    try:
        learn = nf_learner(
            dls, config.arch, pretrained=config.pretrained and starting, weights=config.weights if starting else None,
            agc=None,
            metrics=distributed.gathered_metric(accuracy_multi if multi_label else accuracy),
            loss_func=BCEWithLogitsLossFlat() if multi_label else None, opt_func=opt_func(config.opt, config.fast_opt),
            model_kwargs=None if config.to_normfree else config.block_options() or None,
            convert=config.conversion() if config.to_normfree else None,
            # per-sample AGC's engines stand in for the layers, where the folded blocks compute timm's formula
            # instead: the model would round differently with the clipper than without it
            fast=config.fast_nf and not config.per_sample, compile=config.compile,
        )
    except ConversionError as error:
        raise ConfigError("to_normfree", f"{config.arch}: {error}") from None
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        option = "weights" if config.weights else "pretrained" if config.pretrained else "arch"
        raise ConfigError(option, str(error)) from None
    if config.bs == 1:
        _check_single_image_batchnorm(learn, config)
    if not starting and (config.pretrained or config.weights):
        learn.freeze()  # as nf_learner freezes the body under starting weights
    if config.new_head:
        init_classifier_(find_classifier(learn.model), classifier_init_std(learn.model))
    if config.per_sample:
        try:  # agc auto: the model checked now, per-sample AGC attached by _train once agc_find has chosen
            if config.agc == AGC_AUTO:
                AGC(per_sample=True).check_model(learn.model)
            else:
                learn.agc(config.agc, per_sample=True)
        except ValueError as error:  # e.g. BatchNorm layers, which couple the examples of a batch
            raise ConfigError("per_sample", f"{config.arch}: {error}") from None
    elif config.agc is not None and config.agc != AGC_AUTO:  # auto: attached by _train once agc_find has chosen
        learn.agc(config.agc)
    if config.freeze_batchnorm:
        learn.add_cb(FreezeBatchNorm())
    if config.accum > 1:
        learn.add_cb(GradientAccumulation(config.accum * config.bs))  # fastai counts examples, not batches
    learn.to_mixed_precision(config.precision)
    return learn


def _check_single_image_batchnorm(learn: Learner, config: TrainConfig) -> None:
    """At bs 1 a BatchNorm whose input has one value per channel (a 1x1 feature map: a stride-32 ResNet at 32 px or
    less) cannot normalise in training, and torch would stop the first step with a traceback: refuse it up front,
    found by one eval-mode forward of one validation image (not a training batch: drawing one would move the
    training loader's shuffling)."""
    seen: dict[str, tuple[int, ...]] = {}
    batchnorms = [(name, m) for name, m in learn.model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        return
    def record(name: str):  # a pre-hook returning a value would replace the input: return nothing
        return lambda _, args: seen.__setitem__(name, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in batchnorms]
    training = learn.model.training
    try:
        with torch.no_grad():
            learn.model.eval()(learn.dls.valid.one_batch()[0][:1])
    finally:
        learn.model.train(training)
        for hook in hooks:
            hook.remove()
    single = [(name, shape) for name, shape in seen.items() if math.prod(shape) // shape[1] == 1]
    if single:
        name, shape = single[0]
        raise ConfigError("bs", f"1 cannot train {config.arch}: its BatchNorm {name} sees one value per channel at "
                                f"batch 1 (input {list(shape)}{f', {config.size} px images' if config.size else ''}) "
                                f"and cannot normalise; give bs >= 2, larger images (--size), or remove BatchNorm "
                                f"(--to-normfree)")


def _write_config(out: Path, config: TrainConfig, lr: float | None = None, agc: float | None = None) -> None:
    content = {
        "config": config.to_dict(),
        "lr_used": lr if lr is not None else config.lr,
        # agc auto: null until agc_find has chosen
        "agc_used": agc if agc is not None or config.agc == AGC_AUTO else config.agc,
        "repeat": _train_command("--config", out / OUTPUT_FILES["config"], "--out", "NEW_FOLDER"),
        "versions": library_versions(),
    }
    if distributed.launched():  # --bs is per process: the number of processes is part of the run's settings
        content["processes"] = distributed.world_size()
    atomic_write(out / OUTPUT_FILES["config"], json.dumps(content, indent=2) + "\n")


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=110))
    plt.close(fig)  # pyplot-made figures (fastai's lr_find) stay open until closed; harmless for others


def _describe(learn: Learner, config: TrainConfig) -> str:
    params = sum(p.numel() for p in learn.model.parameters())
    clipping = f"converted to normalizer-free (to_normfree, mode {config.to_normfree}), " if config.to_normfree else ""
    clipping += "no AGC" if config.agc is None else f"AGC lambda={config.agc}"
    clipping += " per sample" if config.per_sample else ""
    clipping += ", BatchNorm frozen" if config.freeze_batchnorm else ""
    processes = distributed.world_size()
    batch = f"bs {config.bs}" + (f" x {processes} processes" if processes > 1 else "")
    batch += f" x {config.accum} accumulated" if config.accum > 1 else ""
    batch += f" = {config.bs * processes * config.accum} per step" if processes * config.accum > 1 else ""
    valid = "held-out train" if config.holdout else "valid"
    data = f"{len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} {valid}, {config.size or 'native'} px"
    budget = f"{config.steps} steps" if config.steps is not None else f"{config.epochs} epochs"
    return (f"normfree train: {config.arch} ({params / 1e6:.2f}M params) on {config.data} ({data}), {clipping}, "
            f"{batch}, {config.opt} lr {config.lr:g}, {config.precision}, {budget}, seed {config.seed}, "
            f"{torch.get_num_threads()} CPU threads -> {config.out}")


def _fit(learn: Learner, config: TrainConfig, lr: float, cbs: list[Callback], start: tuple[int, int] = (0, 0)) -> None:
    """The run's fits; `start` (fit, epoch): where a resumed run continues (its earlier fits and epochs skipped)."""
    fit, epoch = start
    if config.fine_tune:  # fastai's fine_tune, one fit at a time so that a resumed run can start in either
        if fit == 0:
            learn.freeze()
            learn.fit_one_cycle(config.freeze_epochs, slice(lr), pct_start=0.99, cbs=cbs, start_epoch=epoch)
            epoch = 0
        learn.unfreeze()
        learn.fit_one_cycle(config.epochs, slice(lr / 2 / 100, lr / 2), pct_start=0.3, div=5.0, cbs=cbs,
                            start_epoch=epoch)
    elif config.steps is not None:
        epochs = epochs_for_steps(config.steps, config.accum, distributed.batches_per_epoch(learn.dls.train))
        learn.fit_one_cycle(epochs, lr, cbs=[*cbs, StepBudget(config.steps, config.accum)], start_epoch=epoch)
    else:
        learn.fit_one_cycle(config.epochs, lr, cbs=cbs, start_epoch=epoch)


def _stop_interrupted_fit(learn: Learner) -> None:
    """Let the callbacks end the fit Ctrl-C broke off (progress bars, autocast, AGC's metrics)."""
    try:
        learn("after_fit")
    except Exception as error:  # best effort: the checkpoint matters more than a tidy Learner
        print(f"(cleaning up after the interruption failed: {error})", file=sys.stderr)
    learn._end_cleanup()


def train(
    config: TrainConfig | None = None,
    /,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    save_model: bool = True,
    save_plots: bool = True,
    cbs: Sequence[Callback] = (),
    **options: Any,
) -> TrainResult:
    """Train one model as `normfree train` does; the keyword `options` are `TrainConfig`'s fields.

    ``train(data="digits", arch="nf_resnet_tiny", agc=0.04, bs=64, epochs=8, out="runs/nf")``, or
    ``train(TrainConfig.load("runs/nf"), out="runs/nf-again")`` to repeat a run (options override).
    Same config and seed, same metrics. Bad settings raise `ConfigError` (a ValueError naming the
    option) before anything is trained or written.

    - `quiet`: no progress bars, table or messages. `overwrite`: replace a run already in ``out``.
    - `save_model` / `save_plots`: write the weights and exported Learner / the PNG plots
      (`normfree.compare` turns both off for its many runs). An interrupted run saves its weights anyway.
    - `cbs`: extra fastai callbacks for the fits.
    """
    config = make_config(TrainConfig, config, options).resolved()
    distributed.check_launch(config)
    out = Path(config.out)
    # SIGTERM stops it as Ctrl-C does; one run per folder, locked by rank 0 alone under a launcher
    with sigterm_as_interrupt(), distributed.process_group(), \
            distributed.rank0_folder(out, lambda: _check_out(out, overwrite)):
        return _build_and_train(config, out, quiet, save_model, save_plots, cbs)


def _resumable(out: Path) -> None:
    """ConfigError naming --resume unless `out` holds an unfinished run (`_unfinished`) with a checkpoint."""
    if not out.is_dir():
        raise ConfigError("resume", f"{out} is not a folder; give the --out folder of the run to continue")
    if not (out / OUTPUT_FILES["config"]).exists():
        raise ConfigError("resume", f"{out} is not a normfree run folder (no {OUTPUT_FILES['config']}); give the "
                                    f"--out folder of the run to continue")
    if _unfinished(out) is None and (out / OUTPUT_FILES["result"]).exists():
        raise ConfigError("resume", f"{out} holds a finished run (no {INCOMPLETE} marker, and "
                                    f"{OUTPUT_FILES['result']} does not say it was interrupted): there is nothing to "
                                    f"resume; train a new run with another --out")
    if not (out / CHECKPOINT).exists():
        raise ConfigError("resume", f"{out} holds no {CHECKPOINT}, which a run stopped before its first epoch finished "
                                    f"does not write: there is nothing to resume; train it again with --overwrite")


def _read_checkpoint(out: Path) -> dict[str, Any]:
    path = out / CHECKPOINT
    try:
        return load_checkpoint(path)
    except CheckpointFormatError as error:
        raise ConfigError("resume", f"{error}: another normfree version wrote it, and this one cannot check that it "
                                    f"belongs to the run's settings and data; finish the run with the normfree that "
                                    f"started it "
                                    f"(its version is in {OUTPUT_FILES['config']}), or start it again: "
                                    f"{_new_run_command(out)}") from None
    except Exception as error:  # noqa: BLE001 - a damaged file, whatever the unpickler raises
        raise ConfigError("resume", f"{path} cannot be read ({error}); start the run again: "
                                    f"{_new_run_command(out)}") from None


def _json_text(values: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{key} {json.dumps(values[key]) if key in values else 'missing'}" for key in keys)


def _resumed_config(out: Path, state: dict[str, Any]) -> TrainConfig:
    """The settings the checkpoint was written under, with `out` this folder (a copied or moved run goes on where
    it is); ConfigError naming ``resume`` when the folder's config.json says otherwise."""
    path = out / OUTPUT_FILES["config"]
    try:
        recorded = json.loads(path.read_text())
        folder = {**recorded["config"], "lr_used": recorded["lr_used"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError("resume", f"{path} cannot be read ({type(error).__name__}: {error}); the run cannot be "
                                    f"checked against its checkpoint, so it is not resumed") from None
    trained = json.loads(json.dumps({**state["config"], "lr_used": state["lr"]}))  # as JSON holds it: lists, not tuples
    changed = [key for key in dict.fromkeys([*trained, *folder])
               if key != "out" and (key not in trained or key not in folder or trained[key] != folder[key])]
    if changed:
        raise ConfigError("resume", f"{path} says {_json_text(folder, changed)} but {out / CHECKPOINT} was written by "
                                    f"a run with {_json_text(trained, changed)} (config.json was edited after the "
                                    f"stop, or the checkpoint is another run's): it cannot continue the run "
                                    f"config.json describes; to train config.json's settings, start a new run: "
                                    f"{_new_run_command(out)}")
    # a checkpoint from before fast_opt holds fastai's optimizer state: the run goes on with fastai's optimizer
    return TrainConfig(**{"fast_opt": False, **state["config"], "out": str(out)}, check_weights_file=False)


def resume(out: str | Path, /, *, quiet: bool = False, save_model: bool = True, save_plots: bool = True,
           cbs: Sequence[Callback] = ()) -> TrainResult:
    """Continue the unfinished run in `out` (``normfree train --resume``) from its last finished epoch, with
    the settings it was started with, and finish it as `train` would have (same metrics, up to float
    rounding). ConfigError naming ``resume`` for a folder that is not an unfinished run with a checkpoint,
    and for a checkpoint that does not belong to the settings in its config.json or to the data as it is
    now (see the module docstring), before anything in `out` is changed. The other arguments are `train`'s."""
    out = resolved_folder(out, "resume")  # every file of the run is written here, whatever the working folder
    _resumable(out)
    # refused while another process still trains it; every process of a launched run reads the checkpoint
    with sigterm_as_interrupt(), distributed.process_group(), distributed.rank0_folder(out, lambda: _resumable(out)):
        state = _read_checkpoint(out)
        config = _resumed_config(out, state)
        distributed.check_launch(config, resuming=True)
        distributed.check_processes(state.get("processes", 1), out)
        return _build_and_train(config, out, quiet, save_model, save_plots, cbs, state)


def _build_and_train(config: TrainConfig, out: Path, quiet: bool, save_model: bool, save_plots: bool,
                     cbs: Sequence[Callback], resumed: dict[str, Any] | None = None) -> TrainResult:
    set_seed(config.seed, reproducible=True)
    quiet = quiet or not distributed.is_main()  # rank 0 speaks for a launched run
    try:
        learn = distributed.agree(lambda: _build_learner(config, resumed))
    except KeyboardInterrupt as error:  # the note says where, in the command line's message (cli.py)
        error.normfree_note = ("while starting (building the data and model), " +  # type: ignore[attr-defined]
                               (f"before anything was written to {out}" if resumed is None else f"{out} is as it was"))
        raise
    try:
        return _train(learn, config, out, quiet, save_model, save_plots, cbs, resumed)
    except KeyboardInterrupt as error:  # after the fit, while saving: the folder stays marked incomplete
        error.normfree_note = (  # type: ignore[attr-defined]
            f"while saving the results; {out} is marked incomplete ({INCOMPLETE})")
        raise


def _start_writing(out: Path, config: TrainConfig, resumed: dict[str, Any] | None) -> None:
    if resumed is None:
        _prepare_out(out)
        _write_config(out, config)
        return
    # lr_find.png stays; metrics.csv goes on from the checkpoint's rows
    remove_temporary_files(out)
    for name in ("weights", "learner", "result", "curves", "clip_rates"):  # the stop's, rewritten at the end
        (out / OUTPUT_FILES[name]).unlink(missing_ok=True)
    # the same settings, in this folder (which may have been copied)
    _write_config(out, config, resumed["lr"], resumed.get("agc"))
    atomic_write(out / INCOMPLETE, f"This run has not finished: normfree train --resume continued it at "
                                   f"{time.ctime()} (process {os.getpid()}) after epoch {len(resumed['rows'])}.\n")


def _find_agc(learn: Learner, lr: float, per_sample: bool, out: Path, save_plots: bool,
              say: Callable[..., None]) -> float:
    """agc auto: lambda from ``learn.agc_find()`` at the run's peak lr, its plot saved as agc_find.png; `per_sample`:
    from each example's ratios."""
    if per_sample:
        learn.agc(per_sample=True)  # tells agc_find to measure each example's ratios; its lambda is not used
    found = learn.agc_find(lr=lr, show_plot=False)
    if save_plots and distributed.is_main():
        _save_figure(found.plot(), out / OUTPUT_FILES["agc_find"])
    say(f"agc_find suggests lambda={found.suggestion:.3g} (it clips {found.fraction_clipped(found.suggestion):.0%} "
        f"of the {found.pairs} gradient-to-weight ratios of {found.steps} unclipped steps at lr {lr:.2e})")
    return found.suggestion


def _train(learn: Learner, config: TrainConfig, out: Path, quiet: bool, save_model: bool, save_plots: bool,
           cbs: Sequence[Callback], resumed: dict[str, Any] | None = None) -> TrainResult:
    writes = distributed.is_main()  # a launched run's other processes write nothing
    if writes:
        _start_writing(out, config, resumed)
    learn.path, learn.model_dir = out, "."  # lr_find's temporary weights go into out, and are removed
    say = (lambda *args, **kwargs: None) if quiet else print
    say(_describe(learn, config))

    log = EpochLog(out / OUTPUT_FILES["metrics"] if writes else None, resumed["rows"] if resumed else None)
    divergence = _StopOnDivergence()
    lr, finding_lr, stopped_by = config.lr, config.lr_find and resumed is None, None
    agc = None if isinstance(config.agc, str) else config.agc  # the one string TrainConfig takes is AGC_AUTO
    if resumed is not None:
        lr = resumed["lr"]
        cbs = [ResumeFit(resumed), *cbs]
        say(f"resuming after {len(resumed['rows'])} finished epoch(s), from {out / CHECKPOINT}")
    with ExitStack() as stack:
        if quiet:
            stack.enter_context(learn.no_bar())
            stack.enter_context(learn.no_logging())
        peak = stack.enter_context(PeakMemory(learn.dls.device))
        try:
            if finding_lr:
                lr = float(learn.lr_find(show_plot=False).valley)
                finding_lr = False
                _write_config(out, config, lr)
                if save_plots:
                    _save_figure(learn.recorder.plot_lr_find(), out / OUTPUT_FILES["lr_find"])
                say(f"lr_find suggests lr={lr:.2e}")
            if config.agc == AGC_AUTO:
                agc = resumed["agc"] if resumed is not None else _find_agc(learn, lr, config.per_sample, out,
                                                                           save_plots, say)
                learn.agc(agc, per_sample=config.per_sample)
                if resumed is None and writes:
                    _write_config(out, config, lr, agc)
            checkpoint = [EpochCheckpoint(out / CHECKPOINT, log.rows,
                                          {"lr": lr, "agc": agc, "config": config.to_dict(),
                                           "processes": distributed.world_size(),
                                           # a resumed run's data was checked equal to its checkpoint's
                                           "data": data_fingerprint(learn.dls) if resumed is None else resumed["data"]},
                                          fit=0 if resumed is None else resumed["fit"])] if writes else []
            with distributed.data_parallel(learn):
                if resumed is None:
                    _fit(learn, config, lr, [log, divergence, *checkpoint, *cbs])
                else:
                    _fit(learn, config, lr, [log, divergence, *checkpoint, *cbs], (resumed["fit"], resumed["epoch"]))
        except KeyboardInterrupt as error:
            stopped_by = how_stopped(error)
            _stop_interrupted_fit(learn)
    interrupted = stopped_by is not None
    metric = learn.metrics[0].name
    result = TrainResult(config, log.rows, metric, lr, interrupted, stopped_by, divergence.diverged, peak.mib,
                         peak.kind, agc=agc, learner=learn)
    if not writes:
        return result

    if interrupted and finding_lr:
        print(f"\nInterrupted ({stopped_by}) during lr_find, before any training: no weights saved; the config is in "
              f"{out / OUTPUT_FILES['config']}.", file=sys.stderr)
    elif save_model or interrupted:
        atomic_write(out / OUTPUT_FILES["weights"],
                     lambda temporary: save_weights(learn.model, temporary, arch=config.arch,
                                                    conversion=config.conversion() if config.to_normfree else None))
        if not interrupted:
            atomic_write(out / OUTPUT_FILES["learner"], learn.export)
    if save_plots and log.rows:
        _save_figure(plot_run_curves(log.rows, metric, title=f"{config.arch} on {config.data}"),
                     out / OUTPUT_FILES["curves"])
        agc_callback = getattr(learn, "adaptive_clip", None)
        if agc_callback is not None and agc_callback.history is not None and len(agc_callback.history):
            _save_figure(agc_callback.plot(), out / OUTPUT_FILES["clip_rates"])
    result.files = {key: str(out / name) for key, name in OUTPUT_FILES.items()
                    if (out / name).exists() and not (name == CHECKPOINT and not interrupted)}
    result.files["result"] = str(out / OUTPUT_FILES["result"])
    atomic_write(out / OUTPUT_FILES["result"], json.dumps(result.to_dict(), indent=2) + "\n")

    if interrupted:
        atomic_write(out / INCOMPLETE, f"This run was stopped by {stopped_by} at {time.ctime()}, after "
                                       f"{len(log.rows)} finished epoch(s); {OUTPUT_FILES['result']} says so "
                                       f"(\"interrupted\": true). {_resume_command(out)} continues it from its last "
                                       f"finished epoch; "
                                       f"normfree compare trains it again; normfree train refuses this folder unless "
                                       f"--overwrite is given.\n")
    else:
        (out / CHECKPOINT).unlink(missing_ok=True)  # a finished run is not resumed
        (out / INCOMPLETE).unlink()  # the last step: the run is whole
    if interrupted and not finding_lr:
        print(f"\nInterrupted ({stopped_by}) after {len(log.rows)} finished epoch(s) of {config.epochs}. Checkpoint "
              f"in {out}: {OUTPUT_FILES['weights']} (the weights now), {OUTPUT_FILES['metrics']} (finished epochs), "
              f"{OUTPUT_FILES['config']}; {INCOMPLETE} marks the run as unfinished. "
              + (f"Continue it from its last finished epoch with: {_resume_command(out)}"
                 if (out / CHECKPOINT).exists() else
                 "No epoch finished, so there is nothing to resume; train on from these weights with: "
                 + _train_command("--config", out / OUTPUT_FILES["config"], "--weights", out / OUTPUT_FILES["weights"],
                                  "--fine-tune", "--out", "NEW_FOLDER")), file=sys.stderr)
    elif result.diverged:
        say(f"normfree train: {result.divergence()}", file=sys.stderr)
    elif not interrupted:
        say(f"validation {metric}: {result.final_accuracy:.4f} after {len(log.rows)} epochs "
            f"(best {result.best_accuracy:.4f}); {result.seconds_per_epoch:.1f} s/epoch, "
            f"{result.images_per_second:.0f} images/s; outputs in {out}")
    return result
