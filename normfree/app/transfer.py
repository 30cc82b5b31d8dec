"""`normfree.app.transfer.compare_transfer`: transfer learning, measured. A BatchNorm model against its BatchNorm-free
counterparts, pretrained on some classes of a data set, then trained on a few images of the others.

The models (`TRANSFER_METHODS`; labels as in `normfree.app.compare.METHODS` where the model is the same):

| method | model on the target | pretrained as |
|---|---|---|
| ``bn`` | the BatchNorm model, BatchNorm in training mode (fastai's default) | itself |
| ``bn-frozen`` | the BatchNorm model with every BatchNorm frozen (`TrainConfig.freeze_batchnorm`) | ``bn`` |
| ``folded-agc`` | the BatchNorm model, its BatchNorm folded into the convolutions after loading, with AGC | ``bn`` |
| ``nf`` / ``nf-agc`` | the NF twin of a small ResNet, without / with AGC | itself |
| ``converted-agc`` | the BatchNorm arch converted by ``to_normfree`` (mode nf), with AGC | itself, converted at init |

``folded-agc`` folds with ``to_normfree(mode="fold")`` once the pretrained weights are loaded.

`arch` is a small ResNet (either twin; methods ``bn``, ``bn-frozen``, ``nf``, ``nf-agc``; default ``bn nf nf-agc``)
or a BatchNorm arch of one's own (``resnet18``, ``torchvision:resnet18``, ``fastai:xresnet18``: methods ``bn``,
``bn-frozen``, ``folded-agc``, ``converted-agc``, the default). The three methods that keep the BatchNorm model's
weights share its pretraining: one BatchNorm pretraining per seed.

For each pretraining and each seed:

1. **Pretraining** on every training image of `source_classes`: `source_epochs` of one-cycle at peak
   `source_lr`, batch `source_bs`. Its weights are saved.
2. **Target runs** on `target_classes` with at most `per_class` training images per class (drawn with
   the seed), for each value of `per_class`, each batch size, each mode and each method:

| mode | start | what trains |
|---|---|---|
| ``fine-tune`` | pretrained, new classifier | fastai's ``fine_tune``: the body frozen, then all (discriminative lrs) |
| ``linear-probe`` | pretrained, new classifier | the classifier only (the body stays frozen) |
| ``scratch`` | random initialisation | everything: the reference for what pretraining buys |

``fine-tune`` freezes the body for `freeze_epochs`. ``bn-frozen`` has no ``scratch`` runs (it would freeze freshly
initialised statistics); ``folded-agc``'s are the BatchNorm arch folded at initialisation, where fresh statistics fold
to (nearly) the identity: the arch without its BatchNorm, with AGC.

Every target run has the same budget: `epochs` passes over its training images (fine-tune spends the
first `freeze_epochs` of them with the body frozen), optimizer `opt`. Its peak lr is tuned: with several
`lrs`, each (method, mode, per_class, batch size) first trains once per lr with the first seed, validated on a
hold-out (`valid_pct`) of its own drawn training images, and every seed then trains with the lr of the best
hold-out accuracy (`normfree.app.compare.sweep_choice`, compare's rule); one value in `lrs`: that lr, no sweep. A
target run is validated on all validation images of the target classes (Fashion-MNIST: its test split), which no
run trains on or chooses by.

BatchNorm under a frozen body: fastai's ``freeze`` keeps BatchNorm layers trainable (``train_bn``) and
their running statistics adapt to the target data, so ``bn``'s "linear probe" also trains its BatchNorm layers.
That is what fastai users get; ``bn-frozen`` is the alternative, and the report says so.

Every run is a `normfree.train` run folder in ``out/runs/``: ``pretrain-<method>-seed<seed>`` and
``<mode>-<method>-n<per_class>-bs<bs>-seed<seed>``; sweep runs in ``out/sweep/<mode>-<method>-n<per_class>-bs<bs>-
lr<lr>``. Runs already there with the same settings are reused (`normfree.app.compare.finished_run`), so an
interrupted grid continues where it stopped when the same call is made again. The report
(`normfree.app.transfer_report`) goes into ``out``.
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

from ..models.factory import normalizer_free_archs
from ..utils.outdir import atomic_write, locked_folder
from .compare import (
    AGC_METHODS,
    CONVERSIONS,
    METHODS,
    CompareConfig,
    SweepPoint,
    TwinArchs,
    finished_run,
    sweep_cells,
    sweep_choice,
)
from .config import (
    DEFAULT_AGC,
    TRANSFER_FILE,
    ConfigError,
    GridRunOptions,
    TrainConfig,
    check_out_kind,
    command_line,
    environment_settings,
    learning_rates,
    library_versions,
    make_config,
    whole_numbers,
)
from .options import like, option
from .report import GridResult
from .signals import sigterm_as_interrupt
from .train import OUTPUT_FILES, TrainResult, build_dataloaders, train
from .transfer_report import (
    PRETRAIN,
    Table,
    TransferRecord,
    chosen_lr_table,
    summarise_transfer,
    target_markdown,
    write_transfer_report,
)

__all__ = ["MODES", "OWN_ARCH_METHODS", "TRANSFER_METHODS", "TWIN_METHODS", "TransferCell", "TransferConfig",
           "TransferResult", "compare_transfer"]

MODES = {
    "fine-tune": "the pretrained body and a new classifier; fastai fine_tune: body frozen, then everything",
    "linear-probe": "the pretrained body, frozen; only a new classifier trains",
    "scratch": "random initialisation; everything trains",
}
_FROZEN = "bn-frozen"
TRANSFER_METHODS = {  # method: its label in the report
    "bn": METHODS["bn"], _FROZEN: "BatchNorm frozen", "folded-agc": METHODS["folded-agc"], "nf": METHODS["nf"],
    "nf-agc": METHODS["nf-agc"], "converted-agc": METHODS["converted-agc"],
}
TWIN_METHODS = ("bn", "nf", "nf-agc")  # the default with a small ResNet as arch
OWN_ARCH_METHODS = ("bn", _FROZEN, "folded-agc", "converted-agc")  # the default with a BatchNorm arch of one's own
_NF_TWIN_METHODS = ("nf", "nf-agc")  # the methods that train a small ResNet's NF twin
# Methods whose target runs start from another method's pretraining: the BatchNorm model's, whose weights they keep.
_PRETRAINED_AS = {_FROZEN: "bn", "folded-agc": "bn"}
_FROM_PRETRAINED = ("fine-tune", "linear-probe")
# A TrainConfig option that a transfer option feeds, named back as the transfer option in errors.
_OPTION_OF = {
    PRETRAIN: {"bs": "source_bs", "epochs": "source_epochs", "lr": "source_lr", "classes": "source_classes",
               "seed": "seeds", "to_normfree": "methods"},
    "target": {"bs": "batch_sizes", "classes": "target_classes", "seed": "seeds", "lr": "lrs",
               "to_normfree": "methods", "freeze_batchnorm": "methods"},
}


def _modes_of(method: str) -> tuple[str, ...]:
    """The modes `method` has: frozen BatchNorm only from pretrained statistics."""
    return _FROM_PRETRAINED if method == _FROZEN else tuple(MODES)


def _pretraining(method: str) -> str:
    """The method whose pretraining `method`'s target runs start from."""
    return _PRETRAINED_AS.get(method, method)


@dataclass(frozen=True)
class TransferCell:
    """One run: pretraining (`mode` ``pretrain``, `per_class` None, `bs` the source batch size, `lr` None: the
    source lr) or a target run in one of `MODES` at peak `lr` (None until the sweep has chosen it); `holdout`: a
    sweep run, validated on a hold-out of its training images."""

    method: str
    mode: str
    per_class: int | None
    bs: int
    seed: int
    lr: float | None = None
    holdout: bool = False

    @property
    def setting(self) -> tuple[str, str, int | None, int]:
        """What a target run's lr is chosen for: (method, mode, per_class, bs)."""
        return self.method, self.mode, self.per_class, self.bs

    @property
    def key(self) -> str:
        """The run's folder name under ``out/runs`` (a sweep run's: under ``out/sweep``)."""
        if self.mode == PRETRAIN:
            return f"{PRETRAIN}-{self.method}-seed{self.seed}"
        if self.holdout:
            return f"{self.mode}-{self.method}-n{self.per_class}-bs{self.bs}-lr{self.lr:g}"
        return f"{self.mode}-{self.method}-n{self.per_class}-bs{self.bs}-seed{self.seed}"


def _names(values: Any, option: str, known: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or any(v not in known for v in values) or len(set(values)) != len(values):
        raise ConfigError(option, f"must be distinct names from {', '.join(known)}, got {list(values)!r}")
    return values


@dataclass(frozen=True)
class TransferConfig(GridRunOptions, TwinArchs):
    """The transfer grid and its budgets; the fields are `compare_transfer`'s keyword arguments.

    - `data`: an in-memory data set (``fashion-mnist``, ``digits``, a MedMNIST ``.npz``); `arch`:
      either twin of a small ResNet, or a BatchNorm arch (``resnet18``, ``torchvision:resnet18``,
      ``fastai:xresnet18``). `methods`: from `TRANSFER_METHODS` (None: `TWIN_METHODS` with a small ResNet,
      `OWN_ARCH_METHODS` otherwise); `modes`: from `MODES`.
    - `source_classes`, `target_classes`: disjoint label sets (two or more each).
    - `per_class`: target training images per class, one grid column each; `batch_sizes`: target
      batch sizes; `seeds`.
    - `source_epochs`, `source_bs`, `source_lr`: the pretraining. `epochs`: every target run's;
      `freeze_epochs`: the first of fine-tune's `epochs`, with the body frozen. `opt`: both stages.
    - `lrs`: the target runs' peak lrs to choose from, per method, mode, per_class and batch size, on a hold-out
      of `valid_pct` of the first seed's drawn target training images (one value: that lr, no sweep).
    - `agc`: lambda of the AGC methods (``nf-agc`` and ``converted-agc`` in both stages, ``folded-agc`` on the
      target). `size`, `limit`, `valid_pct`, `precision`, `device`: as in `TrainConfig`, for every run.

    The defaults measure Fashion-MNIST classes 0-4 -> 5-9 with 20 and 100 images per class at batch 8
    and 32, three seeds, 16 px, the lr chosen from 1e-3, 3e-3 and 1e-2.
    """

    data: str = like(TrainConfig, "data", default="fashion-mnist")
    arch: str = option("nf_resnet_tiny", "either twin of a small ResNet: nf_resnet_tiny/small/base or "
                                         "bn_resnet_tiny/small/base; or your own BatchNorm arch (resnet18, "
                                         "torchvision:resnet18, fastai:xresnet18)")
    methods: tuple[str, ...] | None = option(
        None, f"models, from {', '.join(TRANSFER_METHODS)} (default: {' '.join(TWIN_METHODS)} with a small ResNet, "
              f"{' '.join(OWN_ARCH_METHODS)} with your own arch)", choices=TRANSFER_METHODS, metavar="METHOD")
    modes: tuple[str, ...] = option(tuple(MODES), f"target modes, from {', '.join(MODES)} (default: all)",
                                    choices=MODES, metavar="MODE")
    source_classes: tuple[int, ...] = option((0, 1, 2, 3, 4), "labels of the pretraining task", metavar="LABEL")
    target_classes: tuple[int, ...] = option((5, 6, 7, 8, 9), "labels of the target task", metavar="LABEL")
    per_class: tuple[int, ...] = option((20, 100), "target training images per class, one value per column",
                                        metavar="N")
    batch_sizes: tuple[int, ...] = like(CompareConfig, "batch_sizes", default=(8, 32), help="target batch sizes")
    seeds: tuple[int, ...] = like(CompareConfig, "seeds", default=(0, 1, 2))
    source_epochs: int = option(3, "pretraining epochs")
    source_bs: int = option(64, "pretraining batch size")
    source_lr: float = option(3e-3, "pretraining peak learning rate")
    epochs: int = like(TrainConfig, "epochs", default=10)
    freeze_epochs: int = option(2, "fine-tune: the first epochs of --epochs, with the body frozen")
    lrs: tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "peak learning rates of the target runs: with several, each "
                                                        "model, mode, --per-class and batch size first trains once per "
                                                        "lr (first seed) on a hold-out (--valid-pct) of its training "
                                                        "images, and every seed then trains with the best; one value: "
                                                        "that lr for every target run", metavar="LR")
    opt: str = like(TrainConfig, "opt")
    agc: float = option(DEFAULT_AGC, "AGC's lambda of nf-agc and converted-agc (in pretraining and on the target) and "
                                     "of folded-agc (on the target)", metavar="LAMBDA")
    size: int | None = like(CompareConfig, "size")
    limit: int | None = like(TrainConfig, "limit")
    valid_pct: float = like(TrainConfig, "valid_pct")
    precision: str = like(TrainConfig, "precision")
    device: str | None = like(TrainConfig, "device")
    out: str = like(CompareConfig, "out", default="transfer-output")

    def __post_init__(self) -> None:
        set_field = self.field_setter()
        if self.methods is not None:
            set_field("methods", _names(self.methods, "methods", tuple(TRANSFER_METHODS)))
        set_field("modes", _names(self.modes, "modes", tuple(MODES)))
        set_field("lrs", learning_rates(self.lrs))  # each value is checked as a TrainConfig lr below
        for setting, minimum in (("source_classes", 0), ("target_classes", 0), ("per_class", 1), ("batch_sizes", 1),
                                ("seeds", 0)):
            set_field(setting, whole_numbers(getattr(self, setting), setting, minimum))
        for setting in ("source_classes", "target_classes"):
            if len(getattr(self, setting)) < 2:
                raise ConfigError(setting, f"needs two or more labels to classify, got {list(getattr(self, setting))}")
        shared = sorted(set(self.source_classes) & set(self.target_classes))
        if shared:
            raise ConfigError("target_classes", f"shares {shared} with the source classes; the target task must be "
                                                f"classes that pretraining never saw")
        if isinstance(self.freeze_epochs, bool) or not isinstance(self.freeze_epochs, int) or self.freeze_epochs < 1:
            raise ConfigError("freeze_epochs", f"must be a whole number >= 1, got {self.freeze_epochs!r}")
        self._check_methods()
        self._check_target_images()
        if "fine-tune" in self.modes and self.epochs <= self.freeze_epochs:
            raise ConfigError("epochs", f"must be larger than the freeze epochs ({self.freeze_epochs}): fine-tune "
                                        f"spends the first of its epochs with the body frozen")

    def _check_methods(self) -> None:
        """That `arch` has the models the methods train, each method one of the modes, and (by TrainConfig itself)
        the options every run of each method and mode shares."""
        methods = self.method_keys()
        if not self.has_twins and self.arch in normalizer_free_archs():
            raise ConfigError("arch", f"{self.arch} is normalizer-free and not one of the small ResNets: the transfer "
                                      f"comparison needs a BatchNorm model, either twin of a small ResNet "
                                      f"(nf_/bn_resnet_tiny/small/base) or a BatchNorm arch such as resnet18")
        twin_methods = [m for m in methods if m in _NF_TWIN_METHODS]
        if twin_methods and not self.has_twins:
            raise ConfigError("methods", f"{' and '.join(twin_methods)} train the NF twin of a small ResNet, which "
                                         f"{self.arch} has not; with a BatchNorm arch of your own use "
                                         f"{', '.join(OWN_ARCH_METHODS)} (converted-agc is its NF model)")
        conversions = [m for m in methods if m in CONVERSIONS]
        if conversions and self.has_twins:
            raise ConfigError("methods", f"{' and '.join(conversions)} convert a BatchNorm arch of your own (resnet18, "
                                         f"torchvision:resnet18, fastai:xresnet18); to_normfree cannot convert the "
                                         f"pre-activation blocks of {self.bn_arch}: with a small ResNet use "
                                         f"{', '.join(m for m in TRANSFER_METHODS if m not in CONVERSIONS)}")
        first = dict(per_class=self.per_class[0], bs=self.batch_sizes[0], seed=self.seeds[0])
        for method in methods:
            modes = [mode for mode in self.modes if mode in _modes_of(method)]
            if not modes:
                raise ConfigError("modes", f"{method} has no {' or '.join(self.modes)} runs: frozen BatchNorm keeps "
                                           f"pretrained statistics, so its modes are {', '.join(_modes_of(method))}; "
                                           f"add one to modes, or drop {method}")
            for mode in modes:  # the shared options, checked by TrainConfig itself (the weights file may come later)
                self.train_config(TransferCell(method, mode, lr=self.lrs[0], **first), check_weights_file=False)
        for lr in self.lrs[1:]:
            self.train_config(TransferCell(methods[0], self.modes[0], lr=lr, **first), check_weights_file=False)
        for method in self.pretrainings():
            self.train_config(self.pretrain_cell(method, self.seeds[0]))

    def _check_target_images(self) -> None:
        """That the fewest target training images (the smallest per_class; less the hold-out with an lr sweep)
        make a batch of each batch size."""
        fewest = min(self.per_class) * len(self.target_classes)
        where = f"the {fewest} target training images at per_class {min(self.per_class)}"
        if self.sweeps:
            held_out = round(fewest * self.valid_pct)
            if not 0 < held_out < fewest:
                raise ConfigError("valid_pct", f"{self.valid_pct} of {where} holds out {held_out}: the lr sweep needs "
                                               f"images to validate on and to train on; change valid_pct or "
                                               f"per_class, or give one lr")
            fewest -= held_out
            where = f"the {fewest} target training images that the lr sweep trains on at per_class " \
                    f"{min(self.per_class)} ({held_out} held out)"
        if max(self.batch_sizes) > fewest:
            raise ConfigError("batch_sizes", f"{max(self.batch_sizes)} is more than {where}: an epoch would have no "
                                             f"full batch")

    @property
    def sweeps(self) -> bool:
        """Whether the target lr is chosen on a hold-out (several `lrs`)."""
        return len(self.lrs) > 1

    def method_keys(self) -> list[str]:
        """The methods run: `methods`, or `TWIN_METHODS` (`OWN_ARCH_METHODS` for a BatchNorm arch of one's own)."""
        if self.methods is not None:
            return list(self.methods)
        return list(TWIN_METHODS if self.has_twins else OWN_ARCH_METHODS)

    def pretrainings(self) -> list[str]:
        """The methods pretrained (each once per seed): those the methods with a mode from pretrained weights start
        from."""
        return list(dict.fromkeys(_pretraining(m) for m in self.method_keys()
                                  if set(_modes_of(m)) & set(self.modes) & set(_FROM_PRETRAINED)))

    def pretrain_cell(self, method: str, seed: int) -> TransferCell:
        """The pretraining that `method`'s target runs with `seed` start from."""
        return TransferCell(_pretraining(method), PRETRAIN, None, self.source_bs, seed)

    def target_cells(self, seed: int) -> list[TransferCell]:
        """The target runs with `seed` by images per class, batch size, mode and model, their lr not chosen yet."""
        return [TransferCell(method, mode, n, bs, seed) for n in self.per_class for bs in self.batch_sizes
                for mode in self.modes for method in self.method_keys() if mode in _modes_of(method)]

    def cells(self) -> list[TransferCell]:
        """Every run, seed by seed (a stopped grid has whole seeds done first): the pretraining of each
        model (when a mode starts from it), with the first seed then the lr sweep (every target setting at every lr,
        with a hold-out), then the target runs (`target_cells`)."""
        cells = []
        for seed in self.seeds:
            cells += [self.pretrain_cell(method, seed) for method in self.pretrainings()]
            if seed == self.seeds[0] and self.sweeps:
                cells += [dataclasses.replace(cell, lr=lr, holdout=True) for cell in self.target_cells(seed)
                          for lr in self.lrs]
            cells += self.target_cells(seed)
        return cells

    def run_folder(self, cell: TransferCell) -> Path:
        return Path(self.out) / ("sweep" if cell.holdout else "runs") / cell.key

    def train_config(self, cell: TransferCell, check_weights_file: bool = True) -> TrainConfig:
        """The `TrainConfig` of one run (a target cell needs its `lr`). A run from pretrained weights needs its
        pretraining run's weights file to exist (ConfigError naming ``weights`` otherwise), unless
        `check_weights_file` is False."""
        method = cell.method
        options: dict[str, Any] = dict(
            data=self.data, arch=self.nf_arch if method in _NF_TWIN_METHODS else self.bn_arch,
            to_normfree=CONVERSIONS.get(method), freeze_batchnorm=method == _FROZEN,
            agc=self.agc if method in AGC_METHODS else None, opt=self.opt, bs=cell.bs, seed=cell.seed,
            holdout=cell.holdout, out=str(self.run_folder(cell)), **self.run_options(),
        )
        if cell.mode == PRETRAIN:
            options.update(classes=self.source_classes, epochs=self.source_epochs, lr=self.source_lr)
        else:
            options.update(classes=self.target_classes, per_class=cell.per_class, epochs=self.epochs, lr=cell.lr)
        if cell.mode in _FROM_PRETRAINED:  # the BatchNorm model's weights are folded after loading (folded-agc)
            weights = self.run_folder(self.pretrain_cell(method, cell.seed)) / OUTPUT_FILES["weights"]
            options.update(weights=str(weights), new_head=True)  # 5 classes -> 5 other classes: still a new task
        if cell.mode == "fine-tune":
            options.update(fine_tune=True, freeze_epochs=self.freeze_epochs, epochs=self.epochs - self.freeze_epochs)
        try:
            config = TrainConfig(**options, check_weights_file=check_weights_file)
            return config.resolved() if check_weights_file else config  # resolving checks the file again
        except ConfigError as error:
            stage = _OPTION_OF[PRETRAIN if cell.mode == PRETRAIN else "target"]
            option = stage.get(error.option, error.option)
            message = f"{method}: {error.message}" if option == "methods" else error.message
            raise ConfigError(option, message) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``normfree transfer`` command line for this grid."""
        return command_line("normfree transfer", self)


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
        for setting in ("source_classes", "target_classes"):
            unknown = [label for label in getattr(config, setting) if label >= dls.c]
            if unknown:
                raise ConfigError(setting, f"{unknown} not among the labels of {config.data} (0..{dls.c - 1})")
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
    return TransferRecord(TRANSFER_METHODS[cell.method], cell.mode, cell.per_class, cell.bs, cell.seed,
                          len(result.epochs), result.final_accuracy, result.best_accuracy, result.seconds_per_epoch,
                          result.lr)


def _classes(labels: tuple[int, ...], names: list[str]) -> str:
    return f"{', '.join(map(str, labels))} ({', '.join(names[label] for label in labels)})"


def _models(config: TransferConfig) -> str:
    """Each method's model on the target, and its pretraining."""
    agc = f"AGC lambda {config.agc}"
    nf_arch = config.nf_arch if config.has_twins else None  # the methods nf and nf-agc need the twins
    models = {
        "bn": f"{config.bn_arch}, BatchNorm in training mode (fastai's default: batch statistics, running "
              f"statistics updated)",
        _FROZEN: f"{config.bn_arch} with every BatchNorm frozen on the target (eval mode: the pretrained running "
                 f"statistics, never updated; weight and bias not trained), as detection libraries fine-tune",
        "folded-agc": f"{config.bn_arch} with its BatchNorm folded into the convolutions after the pretrained "
                      f"weights are loaded (normfree.to_normfree, mode 'fold': the pretrained model's eval-mode "
                      f"function), {agc} on the target",
        "nf": f"{nf_arch}",
        "nf-agc": f"{nf_arch} with {agc} in both stages",
        "converted-agc": f"{config.bn_arch} converted by normfree.to_normfree (mode nf), {agc} in both stages",
    }
    return "; ".join(f"{TRANSFER_METHODS[m]} = {models[m]}" for m in config.method_keys())


def _pretraining_line(config: TransferConfig) -> str:
    shared = [f"{TRANSFER_METHODS[p]}'s serves {', '.join(TRANSFER_METHODS[m] for m in users)}"
              for p in config.pretrainings()
              for users in [[m for m in config.method_keys() if _pretraining(m) == p]] if users != [p]]
    return (f"{config.source_epochs} epochs, fit_one_cycle, {config.opt}, peak lr {config.source_lr}, batch "
            f"{config.source_bs}; one pretrained model per model and seed"
            + (f" ({'; '.join(shared)})" if shared else ""))


def _learning_rate(config: TransferConfig, available: torch.Tensor, per_class_labels: dict[int, str]) -> str:
    """The target runs' lr as the report states it; `available`: the training images of each target class, per seed
    (`_data_classes`), of which the sweep's first seed draws per_class and holds out `valid_pct`."""
    if not config.sweeps:
        return f"peak lr {config.lrs[0]:g} for every target run"
    drawn = {n: int(available[0].clamp(max=n).sum()) for n in config.per_class}
    held_out = ", ".join(f"{round(images * config.valid_pct)} of {images} at {per_class_labels.get(n, n)} per class"
                         for n, images in drawn.items())
    return (f"peak lr chosen per model, mode, images per class and batch size from "
            f"{', '.join(f'{lr:g}' for lr in config.lrs)} by the final accuracy on a hold-out of "
            f"{config.valid_pct:.0%} of the target training images that seed {config.seeds[0]} draws ({held_out}; "
            f"ties: the lower hold-out loss, then the smaller lr); every seed then trains with it. The validation "
            f"images are never used for the choice")


def _settings(config: TransferConfig, names: list[str], available: torch.Tensor, per_class_labels: dict[int, str],
              runs: list[TransferRecord], seconds: float) -> dict[str, object]:
    modes = "; ".join(f"{mode}: {MODES[mode]}" for mode in config.modes)
    if "fine-tune" in config.modes:
        modes += (f". fine-tune is fastai's fine_tune({config.epochs - config.freeze_epochs}, lr, "
                  f"freeze_epochs={config.freeze_epochs}): one-cycle at lr with the body frozen, then one-cycle with "
                  f"everything at discriminative lrs, lr/200 (body) and lr/2 (classifier)")
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
        "models": _models(config),
        "pretraining": _pretraining_line(config),
        "target budget (every mode)": f"{config.epochs} epochs over the target training images, {config.opt}, "
                                      f"batch {' or '.join(map(str, config.batch_sizes))}",
        "learning rate (target)": _learning_rate(config, available, per_class_labels),
        "modes": modes,
        "seeds": f"{', '.join(map(str, config.seeds))}: initialisation, batch order, which target images are drawn "
                 f"and which pretrained model a target run starts from",
        "precision": config.precision,
        **environment_settings(config.device, sum(run.seconds_per_epoch * run.epochs for run in runs), seconds),
    }


def _notes(config: TransferConfig, complete: bool, finished: int, total: int) -> list[str]:
    methods = config.method_keys()
    notes = [
        "Target accuracy is the validation accuracy after the last epoch on all validation images of the target "
        "classes; source accuracy the same on the source classes. Chance is 1 / the number of classes.",
        "BatchNorm under a frozen body: fastai's freeze keeps BatchNorm layers trainable (train_bn=True) and, in "
        "training mode, their running statistics adapt to the target data. So the BatchNorm model's linear probe "
        "(and fine-tune's frozen epochs) also train its BatchNorm weights and re-estimate its statistics, while a "
        "normalizer-free body stays exactly as pretrained. That is what fastai users get"
        + (f"; {TRANSFER_METHODS[_FROZEN]} keeps every BatchNorm as pretrained instead." if _FROZEN in methods
           else "."),
        "In fine-tune and linear-probe runs the classifier starts afresh (new_head); AGC never clips the classifier "
        "weight, so linear probes with and without AGC differ by their pretrained bodies (and AGC on the classifier "
        "bias).",
        "Each run standardises its inputs with the mean and std of its own training images (the target's few "
        "images, not the source's).",
        "fastai drops the last incomplete training batch of each epoch: with fewer images than a multiple of the "
        "batch size, a few (different each epoch) are left out of an epoch.",
    ]
    if "folded-agc" in methods:
        notes.append(f"{TRANSFER_METHODS['folded-agc']} starts its fine-tune and linear-probe runs from the "
                     f"BatchNorm model's pretraining, folded: in eval mode it computes what the pretrained BatchNorm "
                     f"model computes. Its scratch runs fold the BatchNorm arch at initialisation, where fresh "
                     f"statistics fold to (nearly) the identity: the arch without its BatchNorm, with AGC.")
    if not complete:
        notes.append(f"Incomplete: {finished} of {total} runs finished; running the same command again continues "
                     f"the grid.")
    return notes


def _sweep_table(points: list[SweepPoint], chosen: dict[tuple, float],
                 per_class_labels: dict[int, str]) -> Table:
    columns = ["model", "mode", "per class", "bs", "lr", "hold-out accuracy (%)", "hold-out loss", "chosen"]
    return columns, [[TRANSFER_METHODS[method], mode, str(per_class_labels.get(n, n)), str(bs), *sweep_cells(p, chosen)]
                     for p in points for method, mode, n, bs in [p.setting]]


def compare_transfer(config: TransferConfig | None = None, /, *, quiet: bool = False, overwrite: bool = False,
                     **options: Any) -> TransferResult:
    """Pretrain, choose each target setting's lr on a hold-out, then train on the target (see the module docstring),
    and write the report into ``out``; the keyword `options` are `TransferConfig`'s fields. ``compare_transfer()``
    alone runs the default Fashion-MNIST grid.

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
    methods = config.method_keys()
    say = (lambda *args, **kwargs: None) if quiet else print
    say(f"normfree transfer: {len(cells)} runs on {config.data} (classes {list(config.source_classes)} -> "
        f"{list(config.target_classes)}; {', '.join(methods)} x {', '.join(config.modes)} x "
        f"{len(config.per_class)} sizes x {len(config.batch_sizes)} batch sizes x {len(config.seeds)} seeds"
        + (f", lr chosen from {' '.join(f'{lr:g}' for lr in config.lrs)} on a hold-out" if config.sweeps else "")
        + f") -> {out}")
    start = time.perf_counter()
    runs: list[TransferRecord] = []
    sweep_keys: list[tuple] = []
    sweep_results: list[TrainResult] = []
    points: list[SweepPoint] = []
    chosen: dict[tuple, float] = {}
    complete, stopped_by = True, None
    for i, cell in enumerate(cells, 1):
        if cell.mode != PRETRAIN and not cell.holdout:
            if config.sweeps and not chosen:  # cells() puts the whole sweep before the first target run
                points, chosen = sweep_choice(sweep_keys, sweep_results)
            cell = dataclasses.replace(cell, lr=chosen.get(cell.setting, config.lrs[0]))
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
        if cell.holdout:
            sweep_keys.append((*cell.setting, cell.lr))
            sweep_results.append(result)
        else:
            runs.append(_record(cell, result))
        task = ("source" if cell.mode == PRETRAIN
                else f"{per_class_labels.get(cell.per_class, cell.per_class)}/class, bs {cell.bs}")
        what = f"lr {cell.lr:g} hold-out" if cell.holdout else f"seed {cell.seed}"
        say(f"[{i:>{len(str(len(cells)))}}/{len(cells)}] {TRANSFER_METHODS[cell.method]:<22} {cell.mode:<12} "
            f"{task:<16} {what}: final {result.final_accuracy:6.1%}, best {result.best_accuracy:6.1%}, "
            f"{result.seconds_per_epoch:5.2f} s/epoch" + (" (done before)" if reused else ""))
    if sweep_keys and not points:  # stopped before the first target run: the sweep so far
        points, chosen = sweep_choice(sweep_keys, sweep_results)
    seconds = time.perf_counter() - start
    files = {"config": out / TRANSFER_FILE}
    atomic_write(files["config"], json.dumps(
        {"config": config.to_dict(), "command": config.command(),
         "chosen_lrs": [dict(zip(("method", "mode", "per_class", "bs"), setting), lr=lr)
                        for setting, lr in chosen.items()],
         "versions": library_versions()}, indent=2) + "\n")
    target_labels = [TRANSFER_METHODS[m] for m in methods]
    labels = list(dict.fromkeys([*target_labels, *(TRANSFER_METHODS[m] for m in config.pretrainings())]))
    result = TransferResult(config, runs, summarise_transfer(runs, labels, [PRETRAIN, *config.modes]), files,
                            complete, seconds, stopped_by, per_class_labels)
    if not runs:
        return result
    tables = {}
    if config.sweeps:
        tables["Peak learning rate of the target runs, chosen on the hold-out"] = chosen_lr_table(result.rows,
                                                                                                  per_class_labels)
    if points:
        tables[f"Learning-rate sweep (hold-out of the target training images, seed {config.seeds[0]})"] = \
            _sweep_table(points, chosen, per_class_labels)
    files.update(write_transfer_report(
        out, runs, target_labels, config.modes, title=f"normfree transfer: BatchNorm vs normalizer-free, "
                                                      f"pretrained and transferred on {config.data}",
        settings=_settings(config, names, available, per_class_labels, runs, seconds),
        notes=_notes(config, complete, len(runs) + len(sweep_keys), len(cells)), rows=result.rows,
        per_class_labels=per_class_labels, tables=tables))
    say(f"\n{result.table}\n\nreport: {files['html']} (and {files['markdown'].name}); {seconds:.0f} s")
    return result
