"""`normfree.compare`: BatchNorm vs normalizer-free (without AGC, with AGC, with per-sample AGC) on one data set.

The grid: each method x each batch size x {plain, gradient accumulation up to the largest batch
size} x each seed, every run with the same budget and the same data. The methods train the twins
of `normfree.models.small_resnets`:

| method | model | clipping |
|---|---|---|
| ``bn`` | the BatchNorm twin (``bn_resnet_*``) | none |
| ``nf`` | the normalizer-free twin (``nf_resnet_*``) | none |
| ``nf-agc`` | the normalizer-free twin | AGC, lambda `agc` |
| ``nf-agc-skipinit`` | the normalizer-free twin, residual branches starting switched off (SkipInit) | AGC |
| ``nf-agc-per-sample`` | the normalizer-free twin | per-sample AGC, lambda `agc` |
| ``converted`` | the BatchNorm model converted by `normfree.to_normfree` | none |
| ``converted-agc`` | the BatchNorm model converted by `normfree.to_normfree` | AGC, lambda `agc` |
| ``folded`` | the BatchNorm model, every BatchNorm folded into its convolution (``to_normfree(mode="fold")``) | none |
| ``folded-agc`` | the BatchNorm model with every BatchNorm folded into its convolution | AGC, lambda `agc` |

With a small ResNet as `arch`, ``bn`` trains its BatchNorm twin and ``converted*`` convert that twin
(which `to_normfree` refuses: its pre-activation blocks are not ones it knows). With any other
BatchNorm arch (``resnet18``, ...), ``bn`` trains the arch itself and ``converted*`` its conversion,
so a user compares their own model with its normalizer-free version; the ``nf*`` methods need the
twin pair, and the default methods are then ``bn converted converted-agc``. ``folded*`` (by `methods`) keep the
function of the BatchNorm model's starting weights; from scratch, BatchNorm's fresh statistics fold to (nearly) the
identity, so they train the BatchNorm model with its BatchNorm layers left out.

Fairness is built in:
- the budget is the same for every run: `epochs` (one-cycle schedule), or with ``budget="steps"``
  the same number of optimizer steps, so the batch-size axis can be read both ways;
- with several `lrs`, each method and batch setting first trains once per learning rate (first seed)
  on a hold-out of the training images, never on the validation split; the lr with the best hold-out
  accuracy is then trained with every seed and validated as usual. The report shows the sweep.

Each run is a `normfree.train` run in ``out/runs/<method>-bs<bs>-x<accum>-seed<seed>/`` (sweep runs
in ``out/sweep/<method>-bs<bs>-x<accum>-lr<lr>/``); a run whose results are already there (same
settings) is not trained again, so an interrupted grid continues where it stopped when the same
command is run again. The report (`normfree.app.report`) goes into ``out``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agc.rule import DEFAULT_CLIP_FRACTION, DEFAULT_FIND_STEPS
from ..models.convert import DEFAULT_ALPHA, DEFAULT_SKIPINIT
from ..models.factory import normalizer_free_archs
from ..models.small_resnets import batchnorm_twin_name, normfree_twin_name
from ..utils.errors import WriteError
from ..utils.outdir import INCOMPLETE, atomic_write, locked_folder
from .config import (
    AGC_AUTO,
    COMPARE_FILE,
    ConfigError,
    GridRunOptions,
    TrainConfig,
    check_device,
    check_out_kind,
    command_line,
    environment_settings,
    learning_rates,
    library_versions,
    make_config,
    whole_numbers,
)
from .grid_jobs import Finished, already_trained, in_parallel, one_by_one, train_command
from .options import like, option
from .report import GridResult, RunRecord, batch_setting, markdown_table, reading, summarise, write_report
from .signals import how_stopped, interrupt, sigterm_as_interrupt
from .train import OUTPUT_FILES, TrainResult, build_dataloaders, train

__all__ = ["AGC_METHODS", "BUDGETS", "CONVERSIONS", "METHODS", "CompareConfig", "CompareResult", "GridCell",
           "SweepPoint", "TwinArchs", "compare", "finished_run", "sweep_cells", "sweep_choice", "write_plan"]

METHODS = {
    "bn": "BatchNorm",
    "nf": "NF without AGC",
    "nf-agc": "NF + AGC",
    "nf-agc-skipinit": "NF + AGC, SkipInit",
    "nf-agc-per-sample": "NF + per-sample AGC",
    "converted": "converted to NF",
    "converted-agc": "converted to NF + AGC",
    "folded": "BatchNorm folded",
    "folded-agc": "BatchNorm folded + AGC",
}
# the methods that convert the BatchNorm model: to_normfree's mode for each, and the models' description in reports
CONVERSIONS = {"converted": "nf", "converted-agc": "nf", "folded": "fold", "folded-agc": "fold"}
_CONVERTED_MODELS = {"nf": "converted by normfree.to_normfree (mode nf)",
                     "fold": "with its BatchNorm folded into the convolutions (normfree.to_normfree, mode 'fold')"}
AGC_METHODS = ("nf-agc", "nf-agc-skipinit", "nf-agc-per-sample", "converted-agc", "folded-agc")
DEFAULT_METHODS = ("bn", "nf-agc")  # the question in normfree's name; --methods adds the others
CONVERTED_METHODS = ("bn", "converted", "converted-agc")  # the default for an arch without an NF twin
BUDGETS = ("epochs", "steps")
_PER_SAMPLE = "nf-agc-per-sample"
# A TrainConfig option that a compare option feeds, named back as the compare option in errors.
_OPTION_OF = {"bs": "batch_sizes", "seed": "seeds", "lr": "lrs"}


@dataclass(frozen=True)
class GridCell:
    """One run of the grid."""

    method: str
    bs: int
    accum: int
    seed: int

    @property
    def key(self) -> str:
        """The run's folder name under ``out/runs``."""
        return f"{self.method}-bs{self.bs}-x{self.accum}-seed{self.seed}"


def _sweep_key(method: str, bs: int, accum: int, lr: float) -> str:
    """A sweep run's folder name under ``out/sweep``."""
    return f"{method}-bs{bs}-x{accum}-lr{lr:g}"


class TwinArchs:
    """For the grid settings with an `arch` field (`CompareConfig`, `TransferConfig`): a small ResNet, whose twins
    are the BatchNorm and the NF model, or a BatchNorm arch of the user's (``resnet18``), the BatchNorm model itself
    (its NF model is then its conversion by `normfree.to_normfree`)."""

    arch: str

    @property
    def has_twins(self) -> bool:
        """Whether `arch` is one of the small ResNets, with an NF and a BatchNorm twin."""
        try:
            batchnorm_twin_name(self.arch)
        except ValueError:
            return False
        return True

    @property
    def nf_arch(self) -> str:
        return normfree_twin_name(self.arch)

    @property
    def bn_arch(self) -> str:
        """The BatchNorm model: the small ResNet's twin, or `arch` itself."""
        return batchnorm_twin_name(self.arch) if self.has_twins else self.arch


@dataclass(frozen=True)
class CompareConfig(GridRunOptions, TwinArchs):
    """The grid and its shared budget; the fields are `compare`'s keyword arguments.

    The defaults are the quick grid `make demo` runs on digits (minutes on 2 CPU cores).
    - `arch`: either twin of a small ResNet (``nf_resnet_tiny``, ``bn_resnet_small``, ...).
    - `methods`: keys of `METHODS`; None = `DEFAULT_METHODS` (BatchNorm against NF + AGC).
    - `batch_sizes`; `accumulate`: also train each smaller batch size with gradient accumulation
      up to the largest (every batch size must divide it).
    - `seeds`; `epochs`; `lrs`: the peak learning rates of the one-cycle schedule to choose from (one
      value: that lr for every run, no sweep); `opt`: ``adam`` or ``sgd`` (Nesterov); `agc`: lambda of
      the AGC methods, or ``"auto"``: each of their runs chooses it with ``learn.agc_find()`` (the report lists them).
    - `alpha`, `skipinit`: the NF residual blocks of the methods that have them (the NF twin's, and ``converted*``'s,
      to_normfree's mode nf; ``nf-agc-skipinit`` always starts with SkipInit); None: their defaults.
    - `fast_nf`: as in `TrainConfig` (every run but per-sample AGC's: the NF blocks' scalars folded).
    - `budget`: ``epochs`` (every run trains `epochs` epochs) or ``steps`` (every run makes the same
      number of optimizer steps: `steps`, by default as many as the largest batch makes in `epochs`
      epochs).
    - `size`, `limit`, `valid_pct` (also the hold-out fraction of a sweep), `precision`, `device`: as
      in `TrainConfig`.
    """

    data: str = like(TrainConfig, "data")
    arch: str = option("nf_resnet_tiny", "either twin of a small ResNet: nf_resnet_tiny/small/base or "
                                         "bn_resnet_tiny/small/base; or your own BatchNorm timm arch (e.g. resnet18), "
                                         "compared with its conversion (methods bn, converted, converted-agc; folded "
                                         "and folded-agc by --methods)")
    methods: tuple[str, ...] | None = option(
        None, f"methods to train, from {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)}; "
              f"{' '.join(CONVERTED_METHODS)} for an arch other than the small ResNets)", choices=METHODS,
        metavar="METHOD")
    batch_sizes: tuple[int, ...] = option((16, 128), "batch sizes of one forward/backward pass", metavar="BS")
    accumulate: bool = option(True, "skip the gradient-accumulation runs (default: each smaller batch size also "
                                    "accumulates up to the largest)", flag="--no-accum")
    seeds: tuple[int, ...] = option((0, 1), "seeds", metavar="SEED")
    epochs: int = like(TrainConfig, "epochs", default=5)
    lrs: tuple[float, ...] = option((3e-3, 1e-2, 3e-2), "peak learning rates of the one-cycle schedule: with several, "
                                                        "each method and batch setting is trained once per lr (first "
                                                        "seed) on a hold-out of the training images and every seed "
                                                        "then trains with the best; one value: that lr for every run",
                                    metavar="LR")
    opt: str = like(TrainConfig, "opt")
    budget: str = option("epochs", "the same number of epochs for every run, or the same number of optimizer steps",
                         choices=BUDGETS)
    steps: int | None = option(None, "with --budget steps: N optimizer steps per run (default: as many as the largest "
                                     "batch makes in --epochs epochs)", metavar="N")
    agc: float | str = like(TrainConfig, "agc", off=None,
                            help=f"lambda of the AGC methods, or {AGC_AUTO}: chosen by learn.agc_find() in each run")
    alpha: float | None = option(None, "alpha of the NF residual blocks (methods nf*, converted*) (default: each "
                                       "model's own)")
    skipinit: bool | None = option(None, "start the NF residual blocks' branches switched off (SkipInit) or, with "
                                         "--no-skipinit, at full strength (methods nf*, converted*) (default: each "
                                         "model's own)")
    fast_nf: bool = like(TrainConfig, "fast_nf")
    size: int | None = like(TrainConfig, "size", default=16, help="image size in pixels")
    limit: int | None = like(TrainConfig, "limit")
    valid_pct: float = like(TrainConfig, "valid_pct")
    precision: str = like(TrainConfig, "precision")
    device: str | None = like(TrainConfig, "device")
    out: str = option("compare-output", "folder for the runs and the report", metavar="DIR")

    def __post_init__(self) -> None:
        set_field = self.field_setter()
        set_field("batch_sizes", whole_numbers(self.batch_sizes, "batch_sizes", 1))
        set_field("seeds", whole_numbers(self.seeds, "seeds", 0))
        if self.methods is not None:
            methods = tuple(self.methods) if isinstance(self.methods, (list, tuple)) else (self.methods,)
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods or len(set(methods)) != len(methods):
                raise ConfigError("methods", f"must be distinct names from {', '.join(METHODS)}, got {list(methods)!r}")
            set_field("methods", methods)
        set_field("lrs", learning_rates(self.lrs))  # each value is checked as a TrainConfig lr below
        if self.budget not in BUDGETS:
            raise ConfigError("budget", f"must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.steps is not None and self.budget != "steps":
            raise ConfigError("steps", "is the budget of --budget steps; add it, or leave steps out")
        if not isinstance(self.accumulate, bool):
            raise ConfigError("accumulate", f"must be True or False, got {self.accumulate!r}")
        if self.accumulate and any(max(self.batch_sizes) % bs for bs in self.batch_sizes):
            raise ConfigError("batch_sizes", f"with accumulation every batch size must divide the largest "
                                             f"({max(self.batch_sizes)}), got {list(self.batch_sizes)}; change "
                                             f"them or turn accumulation off (--no-accum)")
        twin_methods = [m for m in self.method_keys() if m.startswith("nf")]
        if twin_methods and not self.has_twins:
            raise ConfigError("arch", f"{self.arch!r} is not one of the small ResNets (nf_resnet_tiny/small/base or "
                                      f"bn_resnet_tiny/small/base), whose NF twin the methods "
                                      f"{', '.join(twin_methods)} train; with your own BatchNorm arch use the "
                                      f"methods bn, converted and converted-agc (the default for such an arch)")
        if self.skipinit is False and "nf-agc-skipinit" in self.method_keys():
            raise ConfigError("skipinit", "False contradicts the method nf-agc-skipinit (SkipInit on); drop one")
        if (self.alpha, self.skipinit) != (None, None) and not any(map(_has_nf_blocks, self.method_keys())):
            raise ConfigError("alpha" if self.alpha is not None else "skipinit",
                              f"set the NF residual blocks of the methods nf*, converted and converted-agc, and none "
                              f"of {', '.join(self.method_keys())} has them; leave it out")
        first_of_each_method = {cell.method: cell for cell in reversed(self.cells())}
        for cell in first_of_each_method.values():  # the shared options, checked by TrainConfig itself
            for lr in self.lrs:
                self.train_config(cell, lr, steps=self.steps)

    @property
    def sweeps(self) -> bool:
        """Whether the lr is chosen per method and batch setting (several `lrs`)."""
        return len(self.lrs) > 1

    def method_keys(self) -> list[str]:
        """The methods run: `methods`, or `DEFAULT_METHODS` (`CONVERTED_METHODS` for an arch without twins)."""
        if self.methods is not None:
            return list(self.methods)
        return list(DEFAULT_METHODS if self.has_twins else CONVERTED_METHODS)

    def settings(self) -> list[tuple[int, int]]:
        """The (bs, accum) batch settings: plain batch sizes, then accumulated ones."""
        largest = max(self.batch_sizes)
        settings = [(bs, 1) for bs in sorted(self.batch_sizes)]
        if self.accumulate:
            settings += [(bs, largest // bs) for bs in sorted(self.batch_sizes) if bs < largest]
        return settings

    def cells(self) -> list[GridCell]:
        """Every run, seed by seed (a stopped grid has whole seeds done first), plain batch sizes
        before accumulated ones, methods side by side."""
        methods = self.method_keys()
        return [GridCell(m, bs, accum, seed) for seed in self.seeds for bs, accum in self.settings() for m in methods]

    def train_config(self, cell: GridCell, lr: float, steps: int | None, holdout: bool = False) -> TrainConfig:
        """The `TrainConfig` of one run of the grid at peak `lr`, with a budget of `steps` optimizer steps
        (None: `epochs`); `holdout`: a sweep run, validated on a hold-out of the training images."""
        folder = Path(self.out) / ("sweep" if holdout else "runs")
        try:
            mode = CONVERSIONS.get(cell.method)
            return TrainConfig(
                data=self.data, arch=self.bn_arch if cell.method == "bn" or mode else self.nf_arch,
                skipinit=True if cell.method == "nf-agc-skipinit" else self.skipinit if _has_nf_blocks(cell.method)
                else None, alpha=self.alpha if _has_nf_blocks(cell.method) else None, to_normfree=mode,
                agc=self.agc if cell.method in AGC_METHODS else None,
                per_sample=cell.method == _PER_SAMPLE,
                bs=cell.bs, accum=cell.accum, opt=self.opt, epochs=self.epochs, steps=steps, lr=lr,
                seed=cell.seed, holdout=holdout, fast_nf=self.fast_nf, **self.run_options(),
                out=str(folder / (_sweep_key(cell.method, cell.bs, cell.accum, lr) if holdout else cell.key)),
            ).resolved()
        except ConfigError as error:
            if error.option == "to_normfree":
                raise self._conversion_refused(error.message) from None
            raise ConfigError(_OPTION_OF.get(error.option, error.option), error.message) from None

    def _conversion_refused(self, reason: str) -> ConfigError:
        """The error for the converted methods when to_normfree refuses their model (`reason`): it names the methods
        with a small ResNet (whose BatchNorm twin is never converted: its methods are the nf ones), else the arch."""
        if self.bn_arch in normalizer_free_archs():  # not TrainConfig's advice, which is about --to-normfree
            reason = f"{self.bn_arch} is normalizer-free already: there is nothing to convert"
        return ConfigError("methods" if self.has_twins else "arch", (
            f"{reason}; the small ResNets (nf_/bn_resnet_tiny/small/base) go with the methods bn, nf, nf-agc, "
            f"nf-agc-skipinit and nf-agc-per-sample, a BatchNorm arch that to_normfree converts (torchvision and timm "
            f"ResNets such as resnet18) with bn, converted and converted-agc"))

    def step_budget(self) -> int | None:
        """Optimizer steps of every run with ``budget="steps"`` (None with an epoch budget): `steps`, or
        as many as the largest batch makes in `epochs` epochs over the training images."""
        if self.budget != "steps":
            return None
        if self.steps is not None:
            return self.steps
        largest = max(self.batch_sizes)
        images = len(build_dataloaders(self.train_config(GridCell("bn", largest, 1, self.seeds[0]), self.lrs[0],
                                                         None)).train_ds)
        return self.epochs * math.ceil(images / largest)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``normfree compare`` command line for this grid."""
        return command_line("normfree compare", self)


@dataclass
class CompareResult(GridResult):
    """The grid's runs (finished ones, `RunRecord`), the summary rows of the report (`SummaryRow`), and its files."""

    config: CompareConfig

    @property
    def table(self) -> str:
        """The summary table in Markdown."""
        return markdown_table(self.rows)


def _record(cell: GridCell, result: TrainResult) -> RunRecord:
    return RunRecord(
        METHODS[cell.method], cell.bs, cell.accum, cell.seed, result.lr, result.final_accuracy, result.best_accuracy,
        result.seconds_per_epoch, result.images_per_second, result.peak_memory_mib,
        tuple(row[result.metric] for row in result.epochs), tuple(row["valid_loss"] for row in result.epochs),
        result.agc,
    )


def finished_run(cell_config: TrainConfig, overwrite: bool) -> TrainResult | None:
    """The saved result of the run `cell_config` describes if it finished with the same settings; None if it
    must be trained; ConfigError if its folder holds a run with other settings. A run that was stopped or
    killed (its folder still holds the INCOMPLETE marker, or result.json says interrupted) is never finished."""
    path = Path(cell_config.out) / OUTPUT_FILES["result"]
    if overwrite or not path.exists() or (path.parent / INCOMPLETE).exists():
        return None
    try:
        saved = TrainResult.load(path)
    except (ValueError, KeyError, TypeError):
        return None  # unreadable (e.g. a crash mid-write): train it again
    if saved.interrupted:
        return None
    # `out` is where the run is, not how it was trained: a moved or re-cloned folder still counts
    differ = [f"{f.name}: {getattr(saved.config, f.name)!r} there, {getattr(cell_config, f.name)!r} now"
              for f in dataclasses.fields(TrainConfig)
              if f.name != "out" and getattr(saved.config, f.name) != getattr(cell_config, f.name)]
    if differ:
        raise ConfigError("out", f"{path.parent} holds a run with other settings ({'; '.join(differ)}); give the "
                                 f"same settings to continue that grid, choose another out folder, or pass "
                                 f"overwrite=True (--overwrite) to retrain everything")
    return saved


def _settings(config: CompareConfig, methods: list[str], runs: list[RunRecord], memory_kind: str | None,
              seconds: float, steps: int | None) -> dict[str, object]:
    memory = {
        "process resident": "peak resident memory of the process during the run (Linux VmHWM, reset before each "
                            "run): it includes what Python, torch and the data already held",
        "cuda allocated": "torch.cuda.max_memory_allocated during the run",
    }.get(memory_kind or "", "not measurable here")
    accumulation = f"up to batch {max(config.batch_sizes)}" if config.accumulate else "off"
    budget = (f"{config.epochs} epochs" if steps is None else
              f"{steps} optimizer steps (the last epoch partial)")
    optimizer = {"adam": "Adam (fastai's defaults)", "sgd": "SGD, Nesterov momentum 0.9"}[config.opt]
    learning_rate = (f"peak lr {config.lrs[0]:g}" if not config.sweeps else
                     f"peak lr chosen per method and batch setting from {', '.join(f'{lr:g}' for lr in config.lrs)} "
                     f"by hold-out accuracy (seed {config.seeds[0]}, {config.valid_pct:.0%} of the training images "
                     f"held out; the validation split is not used for the choice)")
    return {
        "command": config.command(),
        "data": config.data,
        "models": _models(config, methods),
        "methods": ", ".join(METHODS[m] for m in methods),
        "batch sizes": ", ".join(map(str, config.batch_sizes)) + f"; gradient accumulation {accumulation}",
        "seeds": ", ".join(map(str, config.seeds)),
        "budget (same for every run)": f"{budget}, fastai fit_one_cycle, {optimizer}, fastai's weight decay",
        "learning rate": learning_rate,
        "AGC lambda": _agc_setting(config, runs),
        **({"NF residual blocks": _block_settings(config)} if any(map(_has_nf_blocks, methods)) else {}),
        "image size": f"{config.size} px" if config.size else "native",
        "precision": config.precision,
        "peak memory": memory,
        **environment_settings(config.device, sum(run.seconds_per_epoch * len(run.curve) for run in runs), seconds),
    }


def _has_nf_blocks(method: str) -> bool:
    """Whether `method`'s model has NF residual blocks (alpha, SkipInit): the NF twin's, or to_normfree's mode nf."""
    return method.startswith("nf") or CONVERSIONS.get(method) == "nf"


def _agc_setting(config: CompareConfig, runs: list[RunRecord]) -> str | float:
    """The lambda of the AGC methods; with auto, the one agc_find chose for each run."""
    if config.agc != AGC_AUTO:
        return config.agc
    chosen: dict[str, list[str]] = {}
    for run in runs:
        if run.agc is not None:
            chosen.setdefault(f"{run.method}, {run.setting}", []).append(f"{run.agc:.3g}")
    return (f"{AGC_AUTO}: chosen in each run by learn.agc_find() at its peak lr (the ratio above which "
            f"{DEFAULT_CLIP_FRACTION:.0%} of the units' gradient-to-weight ratios lie over {DEFAULT_FIND_STEPS} "
            f"unclipped steps); per seed: " + "; ".join(f"{key} {', '.join(values)}" for key, values in chosen.items()))


def _block_settings(config: CompareConfig) -> str:
    """The NF residual blocks' settings of the grid, as the report states them."""
    alpha = (f"alpha {config.alpha:g}" if config.alpha is not None else
             f"alpha: each model's default (to_normfree's {DEFAULT_ALPHA:g})")
    skipinit = {None: f"SkipInit: each model's default (to_normfree's {'on' if DEFAULT_SKIPINIT else 'off'})",
                True: "SkipInit on", False: "SkipInit off"}[config.skipinit]
    return f"{alpha}; {skipinit}"


def _models(config: CompareConfig, methods: list[str]) -> str:
    models = [f"{config.bn_arch} (BatchNorm)"]
    if any(m.startswith("nf") for m in methods):
        models.append(f"{config.nf_arch} (normalizer-free)")
    for mode in dict.fromkeys(CONVERSIONS[m] for m in methods if m in CONVERSIONS):
        models.append(f"{config.bn_arch} {_CONVERTED_MODELS[mode]}")
    return " and ".join(models) + ", trained from scratch"


@dataclass(frozen=True)
class SweepPoint:
    """One sweep run: the setting its lr is chosen for (compare's (method, bs, accum), transfer's (method,
    mode, per_class, bs)) at one learning rate, scored on the hold-out."""

    setting: tuple
    lr: float
    accuracy: float
    valid_loss: float


def _choose_lr(points: list[SweepPoint]) -> float:
    """The lr with the best final hold-out accuracy; ties go to the lower hold-out loss, then the smaller lr.
    A diverged run (NaN) is never chosen over a finite one."""
    def score(point: SweepPoint) -> tuple[float, float, float]:
        accuracy = -math.inf if math.isnan(point.accuracy) else point.accuracy
        loss = math.inf if math.isnan(point.valid_loss) else point.valid_loss
        return (-accuracy, loss, point.lr)
    return min(points, key=score).lr


def _sweep_table(points: list[SweepPoint], chosen: dict[tuple, float]) -> tuple[list[str], list[list[str]]]:
    columns = ["method", "batch", "lr", "hold-out accuracy (%)", "hold-out loss", "chosen"]
    rows = [[METHODS[p.setting[0]], batch_setting(*p.setting[1:]), *sweep_cells(p, chosen)] for p in points]
    return columns, rows


def sweep_cells(point: SweepPoint, chosen: dict[tuple, float]) -> list[str]:
    """A sweep table's last cells for `point`: its lr, hold-out accuracy (%) and loss, and whether it was chosen."""
    return [f"{point.lr:g}", f"{100 * point.accuracy:.1f}", f"{point.valid_loss:.3f}",
            "yes" if chosen.get(point.setting) == point.lr else ""]


class _Progress:
    """The one line per run that compare prints (quiet: nothing)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet

    def __call__(self, what: str, result: TrainResult, reused: bool) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {what}: final {result.final_accuracy:6.1%}, "
                  f"best {result.best_accuracy:6.1%}, {result.seconds_per_epoch:5.2f} s/epoch"
                  + (" (done before)" if reused else ""))


def _run(cell_config: TrainConfig, overwrite: bool) -> tuple[TrainResult, bool]:
    """The run's result, trained now or found in its folder (then the flag is True)."""
    result = finished_run(cell_config, overwrite)
    if result is not None:
        return result, True
    result = train(cell_config, quiet=True, overwrite=True, save_model=False, save_plots=False)
    result.learner = None  # free the model and data before the next run
    return result, False


_Trainer = Callable[[list[TrainConfig]], Finished[TrainResult]]


def compare(config: CompareConfig | None = None, /, *, quiet: bool = False, overwrite: bool = False,
            jobs: int = 1, devices: Sequence[str] | None = None, report: bool = False,
            **options: Any) -> CompareResult:
    """Train the grid (see the module docstring) and write its report into ``out``; the keyword
    `options` are `CompareConfig`'s fields. ``compare()`` alone runs the quick digits grid.

    Runs already in ``out`` with the same settings are reused (pass `overwrite` to retrain). Ctrl-C
    stops after saving the interrupted run's checkpoint; the report then covers the runs finished so
    far, and running the same call again continues the grid. `quiet` silences the per-run lines
    and the final table.

    `jobs`: train up to that many runs at once, in worker processes that split the CPU cores (the same
    numbers as one at a time, up to float rounding); `devices` (``["cuda:0", "cuda:1"]``): one worker
    per device, each run on its worker's device (`jobs` defaults to their count; ConfigError naming ``devices``
    for one this machine lacks, `normfree.app.config.check_device`). `report`: train
    nothing, build the report from runs trained elsewhere (`write_plan`'s commands); ConfigError naming
    ``report`` listing the runs that are missing or unfinished.
    """
    config = make_config(CompareConfig, config, options)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("jobs", f"must be a whole number >= 1, got {jobs!r}")
    if devices:
        if config.device is not None:
            raise ConfigError("devices", f"gives each worker its device; drop device={config.device!r} (--device)")
        for device in devices:
            check_device(device, "devices")
        devices = list(devices) * (max(jobs, len(devices)) // len(devices) if jobs > 1 else 1)
        jobs = len(devices)
    if report:
        trainer: _Trainer = lambda configs: already_trained(configs, finished_run)  # noqa: E731
    elif jobs > 1 or devices:
        trainer = lambda configs: in_parallel(configs, _run, overwrite, jobs, devices)  # noqa: E731
    else:
        trainer = lambda configs: one_by_one(configs, _run, overwrite)  # noqa: E731
    # SIGTERM stops it as Ctrl-C does; one grid per folder, and never in another command's folder
    with sigterm_as_interrupt(), locked_folder(config.out) as out:
        check_out_kind(out, COMPARE_FILE)
        return _compare(config, quiet, trainer)


def _train_stage(trainer: _Trainer, configs: list[TrainConfig], labels: list[str], progress: _Progress,
                 done: dict[int, TrainResult]) -> list[TrainResult]:
    """Train `configs` with `trainer`, filling `done` (by index) as runs finish; a stopped run stops the stage."""
    with closing(trainer(configs)) as results:
        for index, result, reused in results:
            if result.interrupted:
                raise interrupt(result.stopped_by)
            done[index] = result
            progress(labels[index], result, reused)
    return [done[index] for index in range(len(configs))]


def _sweep_configs(config: CompareConfig,
                   steps: int | None) -> tuple[list[tuple[str, int, int, float]], list[TrainConfig]]:
    keys = [(m, bs, accum, lr) for bs, accum in config.settings() for m in config.method_keys() for lr in config.lrs]
    return keys, [config.train_config(GridCell(m, bs, accum, config.seeds[0]), lr, steps, holdout=True)
                  for m, bs, accum, lr in keys]


def sweep_choice(keys: Sequence[tuple], results: Sequence[TrainResult]) -> tuple[list[SweepPoint], dict[tuple, float]]:
    """The sweep's points and the lr chosen for each setting: `keys` are (setting..., lr) tuples (compare's
    (method, bs, accum, lr)), `results` their hold-out runs, in the same order; each setting gets the lr of its
    runs with the best final hold-out accuracy (ties: the lower hold-out loss, then the smaller lr; a diverged run
    is never chosen over a finite one)."""
    points = [SweepPoint(key[:-1], key[-1], r.final_accuracy, r.final_valid_loss) for key, r in zip(keys, results)]
    settings = dict.fromkeys(p.setting for p in points)
    return points, {s: _choose_lr([p for p in points if p.setting == s]) for s in settings}


def write_plan(config: CompareConfig | None = None, /, *, path: str | Path, quiet: bool = False,
               **options: Any) -> list[str]:
    """Write into `path` one ``normfree train`` command per run of the grid that is not finished yet, one a line
    (for a SLURM job array, a shell loop, ...); ``compare(..., report=True)`` then builds the report from
    the run folders they fill. With several `lrs` the runs' lr comes from the sweep: until the sweep's runs
    are all finished, the plan holds them only (write the plan again after them). Returns the commands;
    ConfigError naming ``plan`` when `path` is a folder or cannot be written."""
    config = make_config(CompareConfig, config, options)
    if Path(path).is_dir():
        raise ConfigError("plan", f"{path} is a folder; give the path of a file, e.g. {Path(path) / 'plan.txt'}")
    steps = config.step_budget()
    keys, sweep = _sweep_configs(config, steps) if config.sweeps else ([], [])
    sweep_results = [result for c in sweep if (result := finished_run(c, False)) is not None]
    stage, chosen = "", {}
    if len(sweep_results) < len(sweep):
        stage, configs = "the lr sweep (write the plan again once it is done, for the grid's runs)", sweep
    else:
        chosen = sweep_choice(keys, sweep_results)[1] if sweep else {}
        stage, configs = "the grid", [config.train_config(cell, chosen.get((cell.method, cell.bs, cell.accum),
                                                                           config.lrs[0]), steps)
                                      for cell in config.cells()]
    commands = [train_command(c) for c in configs if finished_run(c, False) is None]
    try:
        atomic_write(path, "".join(f"{command}\n" for command in commands))
    except WriteError as error:  # a folder, a read-only or missing folder: the option given, not a failed run
        raise ConfigError("plan", f"{error}; give the path of a file in a folder you can write to") from None
    if not quiet:
        print(f"normfree compare --plan: {len(commands)} of {len(configs)} runs of {stage} still to train -> {path}"
              + ("" if commands else f"; all finished: {config.command()} --report builds the report"))
    return commands


def _compare(config: CompareConfig, quiet: bool, trainer: _Trainer) -> CompareResult:
    out = Path(config.out)
    methods = config.method_keys()
    cells = config.cells()
    steps = config.step_budget()
    groups = [(m, bs, accum) for bs, accum in config.settings() for m in methods]
    sweep_runs = len(groups) * len(config.lrs) if config.sweeps else 0
    say = (lambda *args, **kwargs: None) if quiet else print
    say(f"normfree compare: {len(cells)} runs ({', '.join(methods)} x {len(config.batch_sizes)} batch sizes"
        f"{' + accumulation' if config.accumulate else ''} x {len(config.seeds)} seeds) on {config.data}, "
        + (f"{config.epochs} epochs" if steps is None else f"{steps} steps") + " each"
        + (f", after a sweep of {sweep_runs} runs over lr {' '.join(f'{lr:g}' for lr in config.lrs)}"
           if config.sweeps else "") + f" -> {out}")
    progress = _Progress(len(cells) + sweep_runs, quiet)
    start = time.perf_counter()
    points: list[SweepPoint] = []
    chosen: dict[tuple[str, int, int], float] = {}
    complete, stopped_by = True, None
    done: dict[int, TrainResult] = {}
    try:
        if config.sweeps:
            keys, sweep = _sweep_configs(config, steps)
            labels = [f"sweep {METHODS[m]:<19} {batch_setting(bs, accum):<16} lr {lr:<8g}" for m, bs, accum, lr in keys]
            points, chosen = sweep_choice(keys, _train_stage(trainer, sweep, labels, progress, {}))
        configs = [config.train_config(cell, chosen.get((cell.method, cell.bs, cell.accum), config.lrs[0]), steps)
                   for cell in cells]
        labels = [f"{METHODS[cell.method]:<19} {batch_setting(cell.bs, cell.accum):<16} seed {cell.seed}"
                  for cell in cells]
        _train_stage(trainer, configs, labels, progress, done)
    except KeyboardInterrupt as error:  # train() saved the interrupted run; Ctrl-C outside a run lands here too
        complete, stopped_by = False, how_stopped(error)
        say(f"Stopped after {progress.done} of {progress.total} runs; run the same command again to continue.")
    runs = [_record(cells[index], done[index]) for index in sorted(done)]  # grid order, however they finished
    memory_kind = next((result.memory_kind for result in done.values() if result.memory_kind), None)
    seconds = time.perf_counter() - start
    notes = []
    if not complete:
        notes.append(f"Incomplete: {len(runs)} of {len(cells)} runs finished; running the same command again "
                     f"continues the grid.")
    files = {"config": out / COMPARE_FILE}
    atomic_write(files["config"], json.dumps(
        {"config": config.to_dict(), "command": config.command(), "steps": steps,
         "chosen_lrs": [{"method": m, "bs": bs, "accum": accum, "lr": lr} for (m, bs, accum), lr in chosen.items()],
         "versions": library_versions()}, indent=2) + "\n")
    labels = [METHODS[m] for m in methods]
    result = CompareResult(config, runs, summarise(runs, labels), files, complete, seconds, stopped_by)
    if not runs:
        return result
    title = f"normfree compare: BatchNorm vs normalizer-free on {config.data}"
    tables = {}
    if points:
        tables[f"Learning-rate sweep (hold-out of the training images, seed {config.seeds[0]})"] = \
            _sweep_table(points, chosen)
    files.update(write_report(out, runs, labels, title=title,
                              settings=_settings(config, methods, runs, memory_kind, seconds, steps), notes=notes,
                              tables=tables, rows=result.rows))
    say(f"\n{result.table}\n\n{reading(result.rows, labels)}\n\nreport: {files['html']} (and "
        f"{files['markdown'].name}); {seconds:.0f} s")
    return result
