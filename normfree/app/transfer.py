"""`normfree.compare_transfer`: transfer learning, measured. The BatchNorm twin against the normalizer-free twin
(without and with AGC) pretrained on some classes of a data set, then trained on a few images of the others.

For each model (`normfree.app.compare.METHODS`' ``bn``, ``nf``, ``nf-agc``) and each seed:

1. **Pretraining** on every training image of `source_classes`: `source_epochs` of one-cycle at peak
   `source_lr`, batch `source_bs`. Its weights are saved.
2. **Target runs** on `target_classes` with at most `per_class` training images per class (drawn with
   the seed), for each value of `per_class`, each batch size and each mode:

| mode | start | what trains |
|---|---|---|
| ``fine-tune`` | pretrained, new classifier | fastai's ``fine_tune``: body frozen for `freeze_epochs`, then all |
| ``linear-probe`` | pretrained, new classifier | the classifier only (the body stays frozen) |
| ``scratch`` | random initialisation | everything: the reference for what pretraining buys |

Every target run has the same budget: `epochs` passes over its training images (fine-tune spends the
first `freeze_epochs` of them with the body frozen), peak lr `lr`, optimizer `opt`. It is validated
on all validation images of the target classes (Fashion-MNIST: its test split), which no run trains
on. A model clips the same way in pretraining and on the target: not at all, or AGC at lambda `agc`.

BatchNorm under a frozen body: fastai's ``freeze`` keeps BatchNorm layers trainable (``train_bn``) and
their running statistics adapt to the target data, so the BatchNorm twin's "linear probe" also trains
its BatchNorm layers. That is what fastai users get; the report says so.

Every run is a `normfree.train` run folder in ``out/runs/``: ``pretrain-<method>-seed<seed>`` and
``<mode>-<method>-n<per_class>-bs<bs>-seed<seed>``. Runs already there with the same settings are
reused (`normfree.app.compare.finished_run`), so an interrupted grid continues where it stopped when the
same call is made again. The report (`normfree.app.transfer_report`) goes into ``out``.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.small_resnets import batchnorm_twin_name, normfree_twin_name
from ..utils.outdir import atomic_write, locked_folder
from .compare import METHODS, finished_run
from .config import (
    DEFAULT_AGC,
    TRANSFER_FILE,
    ConfigError,
    GridRunOptions,
    TrainConfig,
    check_out_kind,
    command_line,
    environment_settings,
    library_versions,
    make_config,
    whole_numbers,
)
from .report import GridResult
from .signals import sigterm_as_interrupt
from .train import OUTPUT_FILES, TrainResult, build_dataloaders, train
from .transfer_report import (
    PRETRAIN,
    TransferRecord,
    summarise_transfer,
    target_markdown,
    write_transfer_report,
)

__all__ = ["MODES", "TRANSFER_METHODS", "TransferCell", "TransferConfig", "TransferResult", "compare_transfer"]

MODES = {
    "fine-tune": "the pretrained body and a new classifier; fastai fine_tune: body frozen, then everything",
    "linear-probe": "the pretrained body, frozen; only a new classifier trains",
    "scratch": "random initialisation; everything trains",
}
TRANSFER_METHODS = ("bn", "nf", "nf-agc")
_FROM_PRETRAINED = ("fine-tune", "linear-probe")
# A TrainConfig option that a transfer option feeds, named back as the transfer option in errors.
_OPTION_OF = {
    PRETRAIN: {"bs": "source_bs", "epochs": "source_epochs", "lr": "source_lr", "classes": "source_classes",
               "seed": "seeds"},
    "target": {"bs": "batch_sizes", "classes": "target_classes", "seed": "seeds"},
}


@dataclass(frozen=True)
class TransferCell:
    """One run: pretraining (`mode` ``pretrain``, `per_class` None, `bs` the source batch size) or a
    target run in one of `MODES`."""

    method: str
    mode: str
    per_class: int | None
    bs: int
    seed: int

    @property
    def key(self) -> str:
        """The run's folder name under ``out/runs``."""
        if self.mode == PRETRAIN:
            return f"{PRETRAIN}-{self.method}-seed{self.seed}"
        return f"{self.mode}-{self.method}-n{self.per_class}-bs{self.bs}-seed{self.seed}"


def _names(values: Any, option: str, known: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or any(v not in known for v in values) or len(set(values)) != len(values):
        raise ConfigError(option, f"must be distinct names from {', '.join(known)}, got {list(values)!r}")
    return values


@dataclass(frozen=True)
class TransferConfig(GridRunOptions):
    """The transfer grid and its budgets; the fields are `compare_transfer`'s keyword arguments.

    - `data`: an in-memory data set (``fashion-mnist``, ``digits``, a MedMNIST ``.npz``); `arch`:
      either twin of a small ResNet. `methods`: from `TRANSFER_METHODS`; `modes`: from `MODES`.
    - `source_classes`, `target_classes`: disjoint label sets (two or more each).
    - `per_class`: target training images per class, one grid column each; `batch_sizes`: target
      batch sizes; `seeds`.
    - `source_epochs`, `source_bs`, `source_lr`: the pretraining. `epochs`, `lr`: every target run's;
      `freeze_epochs`: the first of fine-tune's `epochs`, with the body frozen. `opt`: both stages.
    - `agc`: lambda of ``nf-agc`` in both stages. `size`, `limit`, `valid_pct`, `precision`, `device`:
      as in `TrainConfig`, for every run.

    The defaults measure Fashion-MNIST classes 0-4 -> 5-9 with 20 and 100 images per class at batch 8
    and 32, three seeds, 16 px.
    """

    data: str = "fashion-mnist"
    arch: str = "nf_resnet_tiny"
    methods: tuple[str, ...] = TRANSFER_METHODS
    modes: tuple[str, ...] = tuple(MODES)
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    per_class: tuple[int, ...] = (20, 100)
    batch_sizes: tuple[int, ...] = (8, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    source_epochs: int = 3
    source_bs: int = 64
    source_lr: float = 3e-3
    epochs: int = 10
    freeze_epochs: int = 2
    lr: float = 3e-3
    opt: str = "adam"
    agc: float = DEFAULT_AGC
    size: int | None = 16
    limit: int | None = TrainConfig.limit
    valid_pct: float = TrainConfig.valid_pct
    precision: str = TrainConfig.precision
    device: str | None = TrainConfig.device
    out: str = "transfer-output"

    def __post_init__(self) -> None:
        set_field = self.field_setter()
        set_field("methods", _names(self.methods, "methods", TRANSFER_METHODS))
        set_field("modes", _names(self.modes, "modes", tuple(MODES)))
        for option, minimum in (("source_classes", 0), ("target_classes", 0), ("per_class", 1), ("batch_sizes", 1),
                                ("seeds", 0)):
            set_field(option, whole_numbers(getattr(self, option), option, minimum))
        for option in ("source_classes", "target_classes"):
            if len(getattr(self, option)) < 2:
                raise ConfigError(option, f"needs two or more labels to classify, got {list(getattr(self, option))}")
        shared = sorted(set(self.source_classes) & set(self.target_classes))
        if shared:
            raise ConfigError("target_classes", f"shares {shared} with the source classes; the target task must be "
                                                f"classes that pretraining never saw")
        if isinstance(self.freeze_epochs, bool) or not isinstance(self.freeze_epochs, int) or self.freeze_epochs < 1:
            raise ConfigError("freeze_epochs", f"must be a whole number >= 1, got {self.freeze_epochs!r}")
        try:
            batchnorm_twin_name(self.arch)
        except ValueError as error:
            raise ConfigError("arch", f"{error}; the transfer comparison trains a twin pair") from None
        for method in self.methods:  # the shared options, checked by TrainConfig itself
            self.train_config(self.pretrain_cell(method, self.seeds[0]))
            self.train_config(TransferCell(method, "scratch", self.per_class[0], self.batch_sizes[0], self.seeds[0]))
        fewest = min(self.per_class) * len(self.target_classes)
        if max(self.batch_sizes) > fewest:
            raise ConfigError("batch_sizes", f"{max(self.batch_sizes)} is more than the {fewest} target training "
                                             f"images at per_class {min(self.per_class)}: an epoch would have no "
                                             f"full batch")
        if "fine-tune" in self.modes and self.epochs <= self.freeze_epochs:
            raise ConfigError("epochs", f"must be larger than the freeze epochs ({self.freeze_epochs}): fine-tune "
                                        f"spends the first of its epochs with the body frozen")

    @property
    def nf_arch(self) -> str:
        return normfree_twin_name(self.arch)

    @property
    def bn_arch(self) -> str:
        return batchnorm_twin_name(self.arch)

    def pretrain_cell(self, method: str, seed: int) -> TransferCell:
        return TransferCell(method, PRETRAIN, None, self.source_bs, seed)

    def cells(self) -> list[TransferCell]:
        """Every run, seed by seed (a stopped grid has whole seeds done first): the pretraining of each
        model (when a mode starts from it), then the target runs by images per class, batch size, mode
        and model."""
        pretraining = any(mode in _FROM_PRETRAINED for mode in self.modes)
        cells = []
        for seed in self.seeds:
            cells += [self.pretrain_cell(method, seed) for method in self.methods] if pretraining else []
            cells += [TransferCell(method, mode, n, bs, seed) for n in self.per_class for bs in self.batch_sizes
                      for mode in self.modes for method in self.methods]
        return cells

    def run_folder(self, cell: TransferCell) -> Path:
        return Path(self.out) / "runs" / cell.key

    def train_config(self, cell: TransferCell) -> TrainConfig:
        """The `TrainConfig` of one run. A run from pretrained weights needs its pretraining run's
        weights file to exist (ConfigError naming ``weights`` otherwise)."""
        options: dict[str, Any] = dict(
            data=self.data, arch=self.bn_arch if cell.method == "bn" else self.nf_arch,
            agc=self.agc if cell.method == "nf-agc" else None, opt=self.opt, bs=cell.bs, seed=cell.seed,
            out=str(self.run_folder(cell)), **self.run_options(),
        )
        if cell.mode == PRETRAIN:
            options.update(classes=self.source_classes, epochs=self.source_epochs, lr=self.source_lr)
        else:
            options.update(classes=self.target_classes, per_class=cell.per_class, epochs=self.epochs, lr=self.lr)
        if cell.mode in _FROM_PRETRAINED:
            weights = self.run_folder(self.pretrain_cell(cell.method, cell.seed)) / OUTPUT_FILES["weights"]
            options.update(weights=str(weights), new_head=True)  # 5 classes -> 5 other classes: still a new task
        if cell.mode == "fine-tune":
            options.update(fine_tune=True, freeze_epochs=self.freeze_epochs, epochs=self.epochs - self.freeze_epochs)
        try:
            return TrainConfig(**options).resolved()
        except ConfigError as error:
            stage = _OPTION_OF[PRETRAIN if cell.mode == PRETRAIN else "target"]
            raise ConfigError(stage.get(error.option, error.option), error.message) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``normfree compare --transfer`` command line for this grid."""
        return command_line("normfree compare --transfer", self)


@dataclass
class TransferResult(GridResult):
    """The grid's finished runs (`TransferRecord`), their summary rows (`TransferRow`) and the report's files."""

    config: TransferConfig
    per_class_labels: dict[int, str] = field(default_factory=dict)  # see `_per_class_labels`

    @property
    def table(self) -> str:
        """Final target accuracy (%), mean ± std over seeds, per model and mode, in Markdown."""
        return target_markdown(self.rows, self.per_class_labels)


def _data_classes(config: TransferConfig) -> tuple[list[str], torch.Tensor]:
    """The data's class names (or labels), after checking that every source and target label is one
    of them: a wrong label stops the grid before anything trains; and the training images of each target
    class with each seed, [seeds, target classes] (the seed can draw the validation split, as digits')."""
    available = []
    for seed in config.seeds:
        dls = build_dataloaders(TrainConfig(data=config.data, size=config.size, limit=config.limit,
                                            valid_pct=config.valid_pct, seed=seed))
        if getattr(dls, "multi_label", False):
            raise ConfigError("data", f"{config.data} is multi-label; transfer needs one class per image")
        for option in ("source_classes", "target_classes"):
            unknown = [label for label in getattr(config, option) if label >= dls.c]
            if unknown:
                raise ConfigError(option, f"{unknown} not among the labels of {config.data} (0..{dls.c - 1})")
        available.append(torch.bincount(dls.train_ds.tensors[1], minlength=dls.c)[list(config.target_classes)])
    return [str(name) for name in getattr(dls, "vocab", None) or range(dls.c)], torch.stack(available)


def _per_class_labels(config: TransferConfig, available: torch.Tensor, names: list[str]) -> dict[int, str]:
    """How the report writes each `per_class` value that is more than a target class has (`available`, from
    `_data_classes`): the images per class its runs really train on, e.g. ``58-71 (asked 1000)``, said in a
    warning too. A class with fewer images than `per_class` trains on all of them."""
    labels = {}
    for n in config.per_class:
        used = available.clamp(max=n)
        if int(used.min()) == n:
            continue
        fewest, most = int(used.min()), int(used.max())
        labels[n] = f"{fewest if fewest == most else f'{fewest}-{most}'} (asked {n})"
        short = [f"{names[label]} ({int(available[:, i].min())})" for i, label in enumerate(config.target_classes)
                 if available[:, i].min() < n]
        warnings.warn(f"per_class {n} is more than the training images of target class(es) {', '.join(short)}: "
                      f"those train on all of theirs, so the runs at per_class {n} have {labels[n]} images per "
                      f"class, and the report says so", stacklevel=4)
    return labels


def _reusable_run(cell: TransferCell, cell_config: TrainConfig, overwrite: bool) -> TrainResult | None:
    result = finished_run(cell_config, overwrite)
    if result is not None and cell.mode == PRETRAIN and not (Path(cell_config.out) / OUTPUT_FILES["weights"]).is_file():
        return None  # the target runs start from these weights
    return result


def _record(cell: TransferCell, result: TrainResult) -> TransferRecord:
    return TransferRecord(METHODS[cell.method], cell.mode, cell.per_class, cell.bs, cell.seed, len(result.epochs),
                          result.final_accuracy, result.best_accuracy, result.seconds_per_epoch)


def _classes(labels: tuple[int, ...], names: list[str]) -> str:
    return f"{', '.join(map(str, labels))} ({', '.join(names[label] for label in labels)})"


def _settings(config: TransferConfig, names: list[str], per_class_labels: dict[int, str], runs: list[TransferRecord],
              seconds: float) -> dict[str, object]:
    modes = "; ".join(f"{mode}: {MODES[mode]}" for mode in config.modes)
    if "fine-tune" in config.modes:
        modes += (f". fine-tune is fastai's fine_tune({config.epochs - config.freeze_epochs}, {config.lr}, "
                  f"freeze_epochs={config.freeze_epochs}): one-cycle at lr with the body frozen, then one-cycle with "
                  f"everything at lr/200 (body) and lr/2 (classifier)")
    return {
        "command": config.command(),
        "data": f"{config.data}, {f'{config.size} px' if config.size else 'native size'}"
                + (f", the first {config.limit} images of each split" if config.limit else ""),
        "source task (pretraining)": f"classes {_classes(config.source_classes, names)}: all their training "
                                     f"images; validated on all validation images of these classes",
        "target task": f"classes {_classes(config.target_classes, names)}: at most "
                       f"{' or '.join(per_class_labels.get(n, str(n)) for n in config.per_class)} training images "
                       f"per class, drawn with the run's seed; validated on all validation images of these classes "
                       f"(for Fashion-MNIST, its test split), which no run trains on",
        "models": f"{METHODS['bn']} = {config.bn_arch}; {METHODS['nf']} = {config.nf_arch}; {METHODS['nf-agc']} = "
                  f"{config.nf_arch} with AGC lambda {config.agc}; each clips the same way in both stages",
        "pretraining": f"{config.source_epochs} epochs, fit_one_cycle, {config.opt}, peak lr {config.source_lr}, "
                       f"batch {config.source_bs}; one pretrained model per model and seed",
        "target budget (every mode)": f"{config.epochs} epochs over the target training images, {config.opt}, "
                                      f"peak lr {config.lr}, batch {' or '.join(map(str, config.batch_sizes))}",
        "modes": modes,
        "seeds": f"{', '.join(map(str, config.seeds))}: initialisation, batch order, which target images are drawn "
                 f"and which pretrained model a target run starts from",
        "precision": config.precision,
        **environment_settings(config.device, sum(run.seconds_per_epoch * run.epochs for run in runs), seconds),
    }


def _notes(complete: bool, finished: int, total: int) -> list[str]:
    notes = [
        "Target accuracy is the validation accuracy after the last epoch on all validation images of the target "
        "classes; source accuracy the same on the source classes. Chance is 1 / the number of classes.",
        "BatchNorm under a frozen body: fastai's freeze keeps BatchNorm layers trainable (train_bn=True) and, in "
        "training mode, their running statistics adapt to the target data. So the BatchNorm twin's linear probe "
        "(and fine-tune's frozen epochs) also train its BatchNorm weights and re-estimate its statistics, while the "
        "normalizer-free twin's body stays exactly as pretrained. That is what fastai users get.",
        "In fine-tune and linear-probe runs the classifier starts afresh (new_head); AGC never clips the classifier "
        "weight, so NF and NF + AGC linear probes differ by their pretrained bodies (and AGC on the classifier bias).",
        "Each run standardises its inputs with the mean and std of its own training images (the target's few "
        "images, not the source's).",
        "fastai drops the last incomplete training batch of each epoch: with fewer images than a multiple of the "
        "batch size, a few (different each epoch) are left out of an epoch.",
    ]
    if not complete:
        notes.append(f"Incomplete: {finished} of {total} runs finished; running the same command again continues "
                     f"the grid.")
    return notes


def compare_transfer(config: TransferConfig | None = None, /, *, quiet: bool = False, overwrite: bool = False,
                     **options: Any) -> TransferResult:
    """Pretrain, then train on the target (see the module docstring), and write the report into ``out``;
    the keyword `options` are `TransferConfig`'s fields. ``compare_transfer()`` alone runs the default
    Fashion-MNIST grid.

    Bad settings raise `ConfigError` naming the option before anything is trained or written. Runs
    already in ``out`` with the same settings are reused (pass `overwrite` to retrain). Ctrl-C stops
    after saving the interrupted run's checkpoint; the report then covers the runs finished so far,
    and the same call again continues the grid. `quiet` silences the per-run lines and the table.
    """
    config = make_config(TransferConfig, config, options)
    # SIGTERM stops it as Ctrl-C does; one grid per folder, and never in another command's folder
    with sigterm_as_interrupt(), locked_folder(config.out) as out:
        check_out_kind(out, TRANSFER_FILE)
        return _compare_transfer(config, quiet, overwrite)


def _compare_transfer(config: TransferConfig, quiet: bool, overwrite: bool) -> TransferResult:
    names, available = _data_classes(config)
    per_class_labels = _per_class_labels(config, available, names)
    out = Path(config.out)
    cells = config.cells()
    say = (lambda *args, **kwargs: None) if quiet else print
    say(f"normfree compare --transfer: {len(cells)} runs on {config.data} (classes {list(config.source_classes)} -> "
        f"{list(config.target_classes)}; {', '.join(config.methods)} x {', '.join(config.modes)} x "
        f"{len(config.per_class)} sizes x {len(config.batch_sizes)} batch sizes x {len(config.seeds)} seeds) -> {out}")
    start = time.perf_counter()
    runs: list[TransferRecord] = []
    complete, stopped_by = True, None
    for i, cell in enumerate(cells, 1):
        cell_config = config.train_config(cell)
        result = _reusable_run(cell, cell_config, overwrite)
        reused = result is not None
        if result is None:
            result = train(cell_config, quiet=True, overwrite=True, save_model=cell.mode == PRETRAIN, save_plots=False)
            result.learner = None  # free the model and data before the next run
        if result.interrupted:
            complete, stopped_by = False, result.stopped_by
            say(f"Stopped at run {i} of {len(cells)}; run the same command again to continue the grid.")
            break
        runs.append(_record(cell, result))
        task = ("source" if cell.mode == PRETRAIN
                else f"{per_class_labels.get(cell.per_class, cell.per_class)}/class, bs {cell.bs}")
        say(f"[{i:>{len(str(len(cells)))}}/{len(cells)}] {METHODS[cell.method]:<14} {cell.mode:<12} {task:<16} "
            f"seed {cell.seed}: final {result.final_accuracy:6.1%}, best {result.best_accuracy:6.1%}, "
            f"{result.seconds_per_epoch:5.2f} s/epoch" + (" (done before)" if reused else ""))
    seconds = time.perf_counter() - start
    files = {"config": out / TRANSFER_FILE}
    atomic_write(files["config"], json.dumps(
        {"config": config.to_dict(), "command": config.command(), "versions": library_versions()}, indent=2) + "\n")
    labels = [METHODS[m] for m in config.methods]
    result = TransferResult(config, runs, summarise_transfer(runs, labels, [PRETRAIN, *config.modes]), files,
                            complete, seconds, stopped_by, per_class_labels)
    if not runs:
        return result
    files.update(write_transfer_report(
        out, runs, labels, config.modes, title=f"normfree compare --transfer: BatchNorm vs normalizer-free, "
                                               f"pretrained and transferred on {config.data}",
        settings=_settings(config, names, per_class_labels, runs, seconds),
        notes=_notes(complete, len(runs), len(cells)), rows=result.rows, per_class_labels=per_class_labels))
    say(f"\n{result.table}\n\nreport: {files['html']} (and {files['markdown'].name}); {seconds:.0f} s")
    return result
