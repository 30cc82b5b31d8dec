"""The settings of one training run (`TrainConfig`): checked up front, written to JSON, read back to repeat a run.

Every check raises `ConfigError`, which names the offending setting (the command line turns
``per_sample`` into ``--per-sample``) and says what would be accepted, before anything is trained.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import platform
import shlex
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from fastai.torch_core import default_device

from ..agc.rule import check_agc_arguments
from ..data.loaders import check_bs, check_limit, check_valid_pct
from ..data.registry import DataSpec, data_spec_help, limited_kinds, parse_data_spec, size_help
from ..learner.frozen_batchnorm import batchnorm_layers
from ..learner.optim import OPTIMIZERS
from ..learner.precision import check_precision
from ..models.convert import CONVERSION_MODES, ConversionError, to_normfree
from ..models.factory import build_model, is_known_arch, normalizer_free_archs, unknown_arch_error
from ..models.small_resnets import is_small_normfree
from ..models.weights import WEIGHT_FILES
from ..utils.errors import ConfigError
from ..utils.outdir import resolved_folder
from .options import option, option_words

__all__ = ["AGC_AUTO", "COMPARE_FILE", "CONFIG_FILE", "DEFAULT_AGC", "TRANSFER_FILE", "ConfigError", "GridRunOptions",
           "TrainConfig", "agc_lambda", "check_device", "check_out_kind", "command_line", "environment_settings",
           "learning_rates", "library_versions", "make_config", "whole_numbers"]

CONFIG_FILE = "config.json"  # a run's settings, in its out folder (`normfree.app.train.OUTPUT_FILES`)
COMPARE_FILE = "compare.json"  # a grid's settings, in the out folder of normfree compare
TRANSFER_FILE = "transfer.json"  # ... and of normfree transfer
# What each command's settings file in an out folder says the folder holds.
_FOLDER_KINDS = {CONFIG_FILE: "normfree train", COMPARE_FILE: "normfree compare",
                 TRANSFER_FILE: "normfree transfer"}
_MIN_SIZE = 8
# Upper bounds that no real run reaches and that stop a typo before it allocates terabytes
# (size 100000: an 8 TB batch) or schedules for ever (epochs 10**21 overflowed fastai's schedule).
_MAX_SIZE = 2048
_MAX_EPOCHS = 100_000
_MAX_STEPS = 10**9
# Keys that older normfree versions or other tools write, and the TrainConfig field meaning the same.
_RENAMED_KEYS = {"batch_size": "bs", "clipping": "agc", "clip": "agc", "lr_max": "lr", "n_epochs": "epochs",
                 "model": "arch", "dataset": "data"}
# AGC's lambda for the batches of 8-256 these tools train with. The paper's 0.01 is for batches of 1024-4096
# ("lambda should be smaller for larger batches"); at batch 16-64 on digits it clipped 40-60% of
# nf_resnet_tiny's units at every step (README, "A recipe that trains").
DEFAULT_AGC = 0.04
AGC_AUTO = "auto"  # agc: lambda chosen by learn.agc_find() before training


def agc_lambda(text: str) -> float | str:
    """An ``--agc`` value as typed: a number, or auto; argparse names the option in the error for anything else."""
    if text == AGC_AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number such as 0.04, or {AGC_AUTO}, not {text!r}") from None


def make_config(cls: type, config: Any | None, options: dict[str, Any]) -> Any:
    """`config` (a dataclass of type `cls`, or `cls()` if None) with `options` replacing its fields;
    ConfigError naming an unknown option and listing the known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting; known: {', '.join(known)}")
    return dataclasses.replace(config, **options) if config is not None else cls(**options)


def command_line(prefix: str, config: Any | None = None, arguments: Sequence[object] = ()) -> str:
    """A command line as normfree prints or records it, ready to paste into a shell: `prefix` (the command as
    typed, e.g. ``normfree train``, not quoted), then, for a settings dataclass `config`, the options of the
    fields that differ from their defaults, as its command reads them (`normfree.app.options.option_words`:
    ``--name value``, ``--name v1 v2`` for tuples, ``--bf16``, ``--no-agc``, ``--no-accum``), then `arguments`
    (e.g. ``["--resume", folder]``). Every value and argument is quoted for the shell (`shlex.quote`), so a path
    with spaces stays one argument."""
    words = [word for f in (dataclasses.fields(config) if config is not None else ())
             if getattr(config, f.name) != f.default for word in option_words(f, getattr(config, f.name))]
    return " ".join([prefix, *(shlex.quote(str(word)) for word in [*words, *arguments])])


def check_out_kind(out: Path, settings_file: str) -> None:
    """ConfigError naming ``out`` when the folder `out` holds the outputs of another normfree command than the one
    whose settings file is `settings_file` (`CONFIG_FILE`, `COMPARE_FILE`, `TRANSFER_FILE`): writing there
    would mix two commands' files, and --overwrite would not separate them."""
    command = _FOLDER_KINDS[settings_file]
    for name, other in _FOLDER_KINDS.items():
        if name != settings_file and (out / name).exists():
            raise ConfigError("out", f"{out} holds the outputs of {other} ({name}), not of {command}: writing there "
                                     f"would mix the two; choose another out folder for {command}")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide a run's numbers, plus the CPU thread count."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("normfree", "torch", "fastai", "timm", "numpy", "scikit-learn", "fastcore"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["torch_threads"] = str(torch.get_num_threads())
    return versions


def environment_settings(device: str | None, trained_seconds: float, wall_seconds: float) -> dict[str, str]:
    """The report settings that say where and how long a grid trained: the device and CPU threads, the library
    versions, and the runs' training time against this invocation's wall time."""
    versions = library_versions()
    return {
        "device": f"{training_device(device)}, {versions['torch_threads']} CPU threads",
        "versions": f"torch {versions['torch']}, fastai {versions['fastai']}, timm {versions['timm']}, "
                    f"normfree {versions['normfree']}, Python {versions['python']}",
        "training time of the runs": f"{trained_seconds:.0f} s; wall time of this invocation: {wall_seconds:.0f} s "
                                     f"(runs found in the folder are reused)",
    }


def _whole(value: Any, option: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(option, f"must be a whole number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(option, f"must be at most {maximum}, got {value}")


def whole_numbers(values: Any, option: str, minimum: int) -> tuple[int, ...]:
    """`values` (one number or a list) as a tuple of distinct whole numbers >= `minimum`; ConfigError naming
    `option` otherwise."""
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ConfigError(option, f"must be one or more whole numbers >= {minimum}, got {list(values)!r}")
    if len(set(values)) != len(values):
        raise ConfigError(option, f"has repeated values: {list(values)!r}")
    return values


def learning_rates(values: Any, option: str = "lrs") -> tuple[Any, ...]:
    """`values` (one lr or a list) as a tuple of distinct values, the learning rates a grid sweeps; ConfigError naming
    `option` for none or a repeated one. Each value is then checked as a `TrainConfig` lr."""
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or len(set(values)) != len(values):
        raise ConfigError(option, f"must be one or more distinct learning rates, got {list(values)!r}")
    return values


def _flag(value: Any, option: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(option, f"must be True or False, got {value!r}")


def _positive(value: Any, option: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(option, f"must be a finite number > 0 ({what}), got {value!r}")



def check_device(device: Any, option: str = "device") -> torch.device:
    """`device` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) as a `torch.device` this machine has; ConfigError
    naming `option` otherwise. The one check of every device option: train's and spp's ``--device``, compare's
    ``--devices``."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(option, f"{device!r} is not a device; use cpu, cuda or cuda:N") from None
    if checked.type == "cpu":
        return checked
    backend = getattr(torch, checked.type, None)  # torch.cuda, torch.mps, torch.xpu: each counts its devices
    device_count = getattr(backend, "device_count", None)
    count = device_count() if device_count is not None else 0
    if count == 0:
        raise ConfigError(option, f"{device!r}: this machine has no {checked.type} device; use cpu")
    if checked.index is not None and checked.index >= count:
        raise ConfigError(option, f"{device!r}: this machine has {count} {checked.type} device(s), "
                                  f"{checked.type}:0 to {checked.type}:{count - 1}; use one of them or cpu")
    return checked


def training_device(device: str | None) -> torch.device:
    """The device a run with this `device` setting trains on: the one named, else fastai's default
    (the current CUDA GPU when there is one, else Apple's MPS, else the CPU)."""
    return torch.device(device) if device is not None else default_device()


class GridRunOptions:
    """For the settings dataclasses of the comparison grids (`CompareConfig`, `TransferConfig`), whose fields
    include `size`, `limit`, `valid_pct`, `precision`, `device` (every run of the grid takes them alike)
    and `out`."""

    out: str | Path  # a field of each subclass (a plain class's annotation makes no dataclass field)

    def run_options(self) -> dict[str, Any]:
        """The `TrainConfig` keyword arguments that every run of the grid shares."""
        return {option: getattr(self, option) for option in ("size", "limit", "valid_pct", "precision", "device")}

    def field_setter(self) -> Any:
        """`object.__setattr__` bound to this frozen dataclass (to normalise lists from JSON and argparse to
        tuples), after normalising `out` to a string (a Path is welcome too; the config is written as JSON)."""
        set_field = object.__setattr__.__get__(self)
        set_field("out", str(self.out))
        return set_field


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a `normfree.train` run; the fields are `train`'s keyword arguments.

    - `data`: ``digits``, ``fashion-mnist[:DIR]``, a MedMNIST ``.npz``, a ``.csv`` of image paths and
      labels (columns `path_col`, `label_col`) or an image folder (see `normfree.data.registry`).
    - `arch`: a timm name: any NF family, the small ``nf_resnet_tiny/small/base``, their BatchNorm twins
      ``bn_resnet_*``, or a BatchNorm baseline such as ``resnet18``; or torchvision's or fastai's model by name,
      ``torchvision:resnet18``, ``fastai:xresnet18``.
    - `pretrained` (timm's hub) or `weights` (a local file, see `normfree.models.load_weights`): start from
      trained weights; the body then starts frozen, as in fastai.
    - `skipinit`, `alpha`: the NF residual blocks h + alpha * gain * f(h / beta) of normfree's small NF ResNets
      and of `to_normfree`'s mode ``"nf"``: `skipinit` True starts every residual branch switched off (SkipInit's
      zero gain), False at full strength; `alpha` > 0; None keeps the model's or to_normfree's default.
    - `to_normfree`: convert a BatchNorm `arch` (e.g. ``resnet18``) to a normalizer-free model with
      `normfree.to_normfree` after building it (and loading `weights`): its mode, ``"nf"`` (BatchNorm dropped,
      the NF-ResNet recipe) or ``"fold"`` (BatchNorm folded into the convolutions: the
      weights' function kept); None for no conversion (True and False, as older config.json files hold, mean
      ``"nf"`` and None). Refused for archs that are already normalizer-free, and for archs the mode cannot
      convert. Checked up front on the meta device (no memory, no weights).
    - `new_head`: with `weights`/`pretrained`, start from a freshly initialised classifier even when
      the class count matches (a new task).
    - `agc`: AGC's lambda, ``"auto"`` (chosen by ``learn.agc_find()`` at the run's peak lr before training, and
      recorded as ``agc_used`` in config.json), or None for no clipping; `per_sample`: clip each example's gradient.
    - `bs`: the batch size of one forward/backward pass; `accum`: accumulate that many batches per
      optimizer step (fastai's `GradientAccumulation`), so one step sees ``bs * accum`` examples.
    - `opt`: ``adam`` (fastai's Adam) or ``sgd`` (Nesterov momentum 0.9, the NFNet papers'), both with
      fastai's decoupled weight decay (see `normfree.learner.optim`); `fast_opt` below picks the implementation.
    - `epochs`, `lr`: the one-cycle schedule; `lr_find` replaces `lr` by fastai's ``lr_find()`` valley
      suggestion. `steps`: a budget of this many optimizer steps instead of `epochs` (the last epoch
      is then partial; see `normfree.learner.step_budget`).
    - `precision`: ``fp32``, ``fp16`` or ``bf16`` (mixed precision on any device).
    - `fine_tune`: fastai's transfer-learning schedule: `freeze_epochs` with the body frozen, then
      `epochs` with everything trained at discriminative learning rates.
    - `freeze_batchnorm`: keep every BatchNorm layer as the model starts (from `weights`, typically): in eval mode,
      its running statistics never updated, its weight and bias not trained (the detection libraries'
      FrozenBatchNorm; `normfree.learner.FreezeBatchNorm`). Refused for a model without BatchNorm (after
      `to_normfree`, if given).
    - `fast_nf`: compute timm's NF blocks with their scalars folded into the weight-standardised convolutions
      (`normfree.fast_nf`: the same function and weights, fewer passes over the activations); False: timm's own
      forward. Not applied with `per_sample`, whose layers stand in for the model's own.
    - `fast_opt`: `opt` computed by torch's fused kernel under fastai's schedules (`normfree.learner.optim.fast_adam`,
      `fast_nesterov_sgd`: the same update, one kernel for all parameters); False: fastai's own optimizer.
    - `compile`: compile the model's forward with torch.compile (`normfree.models.compiled.compile_model`; minutes
      at the first batch on a CPU; a warning and eager training where it cannot compile). Not with `per_sample`.
    - `seed`: initialisation, batch order and, where the data has no validation split of its own,
      which `valid_pct` of the images are held out. `size`: image size in px (None: the data's
      default). `limit`: first n images of each split (in-memory data sets only).
    - `holdout`: validate on `valid_pct` of the training images instead of the validation split
      (which is then never seen; for choosing hyperparameters). `classes`: keep only these labels
      (renumbered 0..k-1); `per_class`: at most n training images of each class. In-memory data only
      (see `normfree.data.subset_dataloaders`).
    - `device`: ``cpu``, ``cuda``, ``cuda:1``, ...; None picks CUDA when there is one.
    - `out`: the folder every output file is written to.

    `check_weights_file=False` (not a setting: not in `to_dict`) accepts a `weights` file that is gone, for a run
    whose weights come from elsewhere (`normfree.app.train.resume` takes them from the run's checkpoint).
    """

    data: str = option("digits", data_spec_help)
    arch: str = option("nf_resnet_tiny", "any timm model: an NF family (nfnet_f0, nf_resnet26, test_nfnet, ...), the "
                                         "small nf_resnet_tiny/small/base, their BatchNorm twins bn_resnet_*, or e.g. "
                                         "resnet18; or torchvision:NAME, fastai:NAME (torchvision:resnet50, "
                                         "fastai:xresnet18)")
    pretrained: bool = option(False, "start from timm's hub weights (needs the network)", group="start")
    weights: str | None = option(None, f"start from a local weights file: {WEIGHT_FILES} (default: none, random "
                                       f"initialisation)", metavar="PATH", group="start")
    new_head: bool = option(False, "with --weights/--pretrained: a freshly initialised classifier even when the class "
                                   "count matches (a new task)")
    skipinit: bool | None = option(None, "NF residual blocks (small NF ResNets, --to-normfree nf): start each residual "
                                         "branch switched off (SkipInit's zero gain) or, with --no-skipinit, at full "
                                         "strength (default: the model's own or to_normfree's)")
    alpha: float | None = option(None, "NF residual blocks (small NF ResNets, --to-normfree nf): alpha of h + alpha * "
                                       "f(h / beta) (default: the model's own or to_normfree's)")
    to_normfree: str | None = option(
        None, "make a BatchNorm --arch (e.g. resnet18) normalizer-free with normfree.to_normfree; MODE "
              + "; ".join(f"{name}: {what}" for name, what in CONVERSION_MODES.items())
              + " (default: no conversion; --to-normfree alone: nf)", const="nf", choices=CONVERSION_MODES,
        metavar="MODE")
    agc: float | str | None = option(DEFAULT_AGC, f"Adaptive Gradient Clipping's lambda (the paper's 0.01 is for "
                                                  f"batches >= 1024), or {AGC_AUTO}: chosen by learn.agc_find() at the "
                                                  f"run's peak lr before training", type=agc_lambda, metavar="LAMBDA",
                                     off="train without AGC (default: with AGC)")
    per_sample: bool = option(False, "clip each example's gradient (per-sample AGC; normalizer-free models only)")
    bs: int = option(64, "batch size of one forward/backward pass")
    accum: int = option(1, "accumulate K batches per optimizer step (fastai GradientAccumulation): an effective batch "
                           "of bs*K", metavar="K")
    opt: str = option("adam", "optimizer: fastai's Adam, or SGD with Nesterov momentum 0.9 (the NFNet papers'); both "
                              "with fastai's decoupled weight decay", choices=OPTIMIZERS)
    epochs: int = option(8, "training epochs")
    steps: int | None = option(None, "a budget of N optimizer steps instead of --epochs (the last epoch is partial; "
                                     "default: none, train --epochs)", metavar="N")
    lr: float = option(1e-2, "peak learning rate of the one-cycle schedule", group="rate")
    lr_find: bool = option(False, "use fastai's lr_find() valley suggestion instead of --lr", group="rate")
    precision: str = option("fp32", "on any device (default: float32)", values={
        "fp16": "float16 mixed precision with a gradient scaler", "bf16": "bfloat16 mixed precision"})
    fine_tune: bool = option(False, "fastai's transfer-learning schedule: --freeze-epochs with the body frozen, then "
                                    "--epochs with everything (use with --pretrained/--weights, which otherwise train "
                                    "only the head)")
    freeze_epochs: int = option(1, "frozen epochs of --fine-tune")
    freeze_batchnorm: bool = option(False, "keep every BatchNorm layer as it starts (e.g. from --weights): eval mode, "
                                           "running statistics never updated, weight and bias not trained (the "
                                           "detection libraries' FrozenBatchNorm)")
    fast_nf: bool = option(True, "run timm's NF blocks as timm writes them (default: their scalars folded into the "
                                 "weight-standardised convolutions, normfree.fast_nf: the same function, fewer passes; "
                                 "not with --per-sample)")
    fast_opt: bool = option(True, "run --opt with fastai's own optimizer (default: the same update by torch's fused "
                                  "kernel, one for all parameters, under fastai's schedules: "
                                  "normfree.learner.optim.fast_adam / fast_nesterov_sgd)")
    compile: bool = option(False, "compile the model's forward with torch.compile (minutes at the first batch on a "
                                  "CPU; where it cannot compile, a warning and eager training; not with --per-sample)")
    seed: int = option(0, "random seed: initialisation, batch order and the validation split; same seed, same metrics")
    size: int | None = option(None, lambda: f"image size in pixels (default: the data's own: {size_help()})",
                              metavar="PX")
    limit: int | None = option(None, lambda: f"use only the first N images of each split, for quick runs "
                                             f"({limited_kinds()}; default: all)", metavar="N")
    valid_pct: float = option(0.2, "fraction held out for validation where the data has no validation split (digits, "
                                   "folders, CSVs), and by --holdout")
    holdout: bool = option(False, "validate on --valid-pct of the training images instead of the validation split, "
                                  "which is then never seen (for tuning; in-memory data)")
    classes: tuple[int, ...] | None = option(None, "keep only these class labels, renumbered 0..k-1 (in-memory data; "
                                                   "default: all)", metavar="LABEL")
    per_class: int | None = option(None, "at most N training images of each class, drawn with --seed (in-memory data; "
                                         "default: all)", metavar="N")
    path_col: str = option("path", "CSV data: column of image paths")
    label_col: str = option("label", "CSV data: column of labels")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda when there is a GPU)")
    out: str = option("normfree-run", "folder for every output file", metavar="DIR")
    check_weights_file: InitVar[bool] = True

    def __post_init__(self, check_weights_file: bool) -> None:
        self._check_data()
        self._check_model(check_weights_file)
        self._check_training()

    def _check_data(self) -> None:
        spec = self.data_spec
        if self.size is not None:
            _whole(self.size, "size", _MIN_SIZE, _MAX_SIZE)
        if self.classes is not None:
            classes = whole_numbers(self.classes, "classes", 0)
            if len(classes) < 2:
                raise ConfigError("classes", f"must be two or more distinct labels, got {list(classes)}")
            object.__setattr__(self, "classes", classes)  # JSON and argparse give lists
        if self.per_class is not None:
            _whole(self.per_class, "per_class", 1)
        _flag(self.holdout, "holdout")
        for setting in ("limit", "classes", "per_class", "holdout"):
            spec.check_in_memory(setting, getattr(self, setting))
        check_limit(self.limit)
        check_valid_pct(self.valid_pct)
        for setting in ("path_col", "label_col"):
            if not isinstance(getattr(self, setting), str) or not getattr(self, setting):
                raise ConfigError(setting, f"must be a CSV column name, got {getattr(self, setting)!r}")

    def _check_model(self, check_weights_file: bool) -> None:
        if not is_known_arch(self.arch):
            raise ConfigError("arch", str(unknown_arch_error(str(self.arch))))
        _flag(self.pretrained, "pretrained")
        if self.weights is not None:
            if self.pretrained:
                raise ConfigError("weights", "give either pretrained (timm's hub) or weights (a local file), not both")
            if check_weights_file and not Path(self.weights).expanduser().is_file():
                raise ConfigError("weights", f"{self.weights}: no such file; expected a {WEIGHT_FILES} file")
        self._check_conversion_mode()
        _flag(self.freeze_batchnorm, "freeze_batchnorm")
        _flag(self.fast_nf, "fast_nf")
        _flag(self.fast_opt, "fast_opt")
        _flag(self.compile, "compile")
        if self.compile and self.per_sample:
            raise ConfigError("compile", "per-sample AGC replaces the forward of the model's layers, which a compiled "
                                         "forward does not call: drop compile, or per_sample")
        self._check_architecture()
        _flag(self.new_head, "new_head")
        if self.new_head and not (self.weights or self.pretrained):
            raise ConfigError("new_head", "a new classifier only makes sense on trained weights: give weights or "
                                          "pretrained, or drop new_head")
        if self.skipinit is not None:
            _flag(self.skipinit, "skipinit")
        if self.alpha is not None:
            _positive(self.alpha, "alpha", "the residual branches' scale, e.g. 0.2 (the papers') or 0.5")
        for setting in ("skipinit", "alpha"):
            if getattr(self, setting) is not None and not (is_small_normfree(self.arch) or self.to_normfree == "nf"):
                raise ConfigError(setting, f"is an option of NF residual blocks: normfree's small NF ResNets "
                                          f"(nf_resnet_tiny/small/base) and to_normfree's mode nf (--to-normfree nf), "
                                          f"not {self.arch}" + (f" with to_normfree {self.to_normfree}"
                                                                 if self.to_normfree else "") + "; leave it out")
        if self.agc is not None and not (isinstance(self.agc, str) and self.agc == AGC_AUTO):
            if isinstance(self.agc, bool):
                raise ConfigError("agc", f"is AGC's lambda, a number such as {DEFAULT_AGC}, not {self.agc!r}; for no "
                                         f"AGC give None (--no-agc)")
            try:  # a numpy scalar or a one-element tensor is stored as the float it holds: config.json is JSON
                object.__setattr__(self, "agc", check_agc_arguments(self.agc, 1e-3)[0])
            except ValueError:
                raise ConfigError("agc", f"AGC's lambda must be a finite number > 0 (0.01 is the paper's) or "
                                         f"{AGC_AUTO!r}, got {self.agc!r}; for no AGC give None (--no-agc)") from None
        _flag(self.per_sample, "per_sample")
        if self.per_sample and self.agc is None:
            raise ConfigError("per_sample", "per-sample clipping needs AGC: give agc a lambda, or drop per_sample")

    def _check_conversion_mode(self) -> None:
        """`to_normfree` as a mode or None; True and False (the flag it was before modes) are "nf" and None."""
        mode = {True: "nf", False: None}[self.to_normfree] if isinstance(self.to_normfree, bool) else self.to_normfree
        if mode is not None and (not isinstance(mode, str) or mode not in CONVERSION_MODES):
            modes = "; ".join(f"{name}: {what}" for name, what in CONVERSION_MODES.items())
            raise ConfigError("to_normfree", f"must be one of {', '.join(CONVERSION_MODES)} ({modes}), or None for no "
                                             f"conversion; got {self.to_normfree!r}")
        object.__setattr__(self, "to_normfree", mode)

    def _check_architecture(self) -> None:
        """That `to_normfree` can convert the arch, and that the model trained has the BatchNorm layers that
        `freeze_batchnorm` freezes."""
        if self.to_normfree is None and not self.freeze_batchnorm:
            return
        if self.to_normfree is not None and self.arch in normalizer_free_archs():
            raise ConfigError("to_normfree", f"{self.arch} is already normalizer-free; drop to_normfree "
                                             f"(--to-normfree), or give a BatchNorm arch such as resnet18")
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            model = build_model(self.arch, 10)
        if self.to_normfree is not None:
            try:
                model = to_normfree(model, **self.conversion())
            except ConversionError as error:
                raise ConfigError("to_normfree", f"{self.arch} cannot be converted: {error}") from None
        if self.freeze_batchnorm and not batchnorm_layers(model):
            converted = f" converted by to_normfree (mode {self.to_normfree})" if self.to_normfree else ""
            raise ConfigError("freeze_batchnorm", f"{self.arch}{converted} has no BatchNorm layer to freeze; drop "
                                                  f"freeze_batchnorm (--freeze-batchnorm), or give a BatchNorm arch")

    def block_options(self) -> dict[str, Any]:
        """`skipinit` and `alpha` where given: the small NF ResNets' model arguments, or to_normfree's (mode nf)."""
        given = (("skipinit", self.skipinit), ("alpha", self.alpha))
        return {name: value for name, value in given if value is not None}

    def conversion(self) -> dict[str, Any]:
        """`to_normfree`'s arguments for this run's conversion: the mode, and `block_options` with mode nf."""
        return {"mode": self.to_normfree, **(self.block_options() if self.to_normfree == "nf" else {})}

    def _check_training(self) -> None:
        check_bs(self.bs)
        _whole(self.accum, "accum", 1)
        _whole(self.epochs, "epochs", 1, _MAX_EPOCHS)
        if self.opt not in OPTIMIZERS:
            raise ConfigError("opt", f"must be one of {', '.join(OPTIMIZERS)}, got {self.opt!r}")
        if self.steps is not None:
            _whole(self.steps, "steps", 1, _MAX_STEPS)
            if self.fine_tune:
                raise ConfigError("steps", "a budget in steps works with one fit, not fine_tune's two; give epochs")
        _whole(self.freeze_epochs, "freeze_epochs", 0, _MAX_EPOCHS)
        _whole(self.seed, "seed", 0)
        _positive(self.lr, "lr", "the peak learning rate, e.g. 1e-2")
        _flag(self.lr_find, "lr_find")
        _flag(self.fine_tune, "fine_tune")
        if self.fine_tune and not (self.weights or self.pretrained):
            raise ConfigError("fine_tune", "fastai's fine_tune first trains the head on a frozen body, which only "
                                           "makes sense on trained weights: give weights or pretrained, or drop "
                                           "fine_tune to train everything from the start")
        check_precision(self.precision)
        if self.device is not None:
            check_device(self.device)
        if not isinstance(self.out, (str, Path)) or not str(self.out):
            raise ConfigError("out", f"must be a folder path, got {self.out!r}")

    @property
    def data_spec(self) -> DataSpec:
        """The parsed `data` (ConfigError if it names nothing readable)."""
        try:
            return parse_data_spec(self.data)
        except ValueError as error:
            raise ConfigError("data", str(error)) from None

    def resolved(self) -> TrainConfig:
        """This config with paths made absolute and the data's default size filled in: repeatable from anywhere."""
        spec = self.data_spec
        if spec.path is not None:
            spec = dataclasses.replace(spec, path=spec.path.resolve())
        return dataclasses.replace(
            self,
            data=str(spec),
            weights=None if self.weights is None else str(Path(self.weights).expanduser().resolve()),
            size=self.size if self.size is not None else spec.default_size(),
            out=str(resolved_folder(self.out)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from `to_dict()` output (or a config.json's ``"config"``); ConfigError on unknown keys."""
        return make_config(cls, None, values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The config of a finished run, from its ``config.json`` (or the run folder holding it)."""
        path = Path(path)
        path = path / CONFIG_FILE if path.is_dir() else path
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError("config", f"{path}: not a readable normfree config.json ({error})") from None
        command = content.get("command") if isinstance(content, dict) else None
        if isinstance(command, str) and command.startswith(("normfree compare", "normfree transfer")):
            # transfer.json files written before normfree transfer had its name say "normfree compare --transfer"
            kind = "transfer" if "transfer" in command.split()[1:3] or "--transfer" in command else "compare"
            raise ConfigError("config", f"{path} is a normfree {kind} config, not a run's config.json; repeat that "
                                        f"grid with: {command}")
        if not isinstance(content, dict) or not isinstance(content.get("config"), dict):
            raise ConfigError("config", f"{path}: expected a JSON object with a \"config\" object")
        settings = content["config"]
        known = [f.name for f in dataclasses.fields(cls)]
        for key in settings:
            if key not in known:
                close = _RENAMED_KEYS.get(key) or next(iter(difflib.get_close_matches(key, known, 1)), None)
                hint = f" (did you mean '{close}'?)" if close else ""
                raise ConfigError("config", f"{path}: unknown key '{key}'{hint}; known keys: {', '.join(known)}")
        try:
            return cls.from_dict(settings)
        except ConfigError as error:  # the file's key, not a flag the user never typed
            raise ConfigError("config", f"{path}: key '{error.option}': {error.message}") from None
