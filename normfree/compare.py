"""`normfree.compare`: BatchNorm vs normalizer-free (without AGC, with AGC, with per-sample AGC) on one data set.

The grid: each method x each batch size x {plain, gradient accumulation up to the largest batch
size} x each seed, every run with the same budget (epochs, one-cycle schedule, peak lr, Adam) and
the same data. The methods train the twins of `normfree.small_resnets`:

| method | model | clipping |
|---|---|---|
| ``bn`` | the BatchNorm twin (``bn_resnet_*``) | none |
| ``nf`` | the normalizer-free twin (``nf_resnet_*``) | none |
| ``nf-agc`` | the normalizer-free twin | AGC, lambda `agc` |
| ``nf-agc-per-sample`` | the normalizer-free twin | per-sample AGC, lambda `agc` |

Each run is a `normfree.train` run in ``out/runs/<method>-bs<bs>-x<accum>-seed<seed>/``; a run
whose results are already there (same settings) is not trained again, so an interrupted grid
continues where it stopped when the same command is run again. The report (`normfree.report`)
goes into ``out``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig, library_versions, make_config
from .report import RunRecord, SummaryRow, batch_setting, markdown_table, summarise, write_report
from .small_resnets import batchnorm_twin_name, normfree_twin_name
from .train import TrainResult, train

__all__ = ["METHODS", "CompareConfig", "CompareResult", "GridCell", "compare"]

METHODS = {
    "bn": "BatchNorm",
    "nf": "NF without AGC",
    "nf-agc": "NF + AGC",
    "nf-agc-per-sample": "NF + per-sample AGC",
}
_PER_SAMPLE = "nf-agc-per-sample"
# A TrainConfig option that a compare option feeds, named back as the compare option in errors.
_OPTION_OF = {"bs": "batch_sizes", "seed": "seeds"}


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


def _whole_numbers(values: Any, option: str, minimum: int) -> tuple[int, ...]:
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ConfigError(option, f"must be one or more whole numbers >= {minimum}, got {list(values)!r}")
    if len(set(values)) != len(values):
        raise ConfigError(option, f"has repeated values: {list(values)!r}")
    return values


@dataclass(frozen=True)
class CompareConfig:
    """The grid and its shared budget; the fields are `compare`'s keyword arguments.

    The defaults are the quick grid `make demo` runs on digits (minutes on 2 CPU cores).
    - `arch`: either twin of a small ResNet (``nf_resnet_tiny``, ``bn_resnet_small``, ...).
    - `methods`: keys of `METHODS`; None = all of them (per-sample AGC only where available).
    - `batch_sizes`; `accumulate`: also train each smaller batch size with gradient accumulation
      up to the largest (every batch size must divide it).
    - `seeds`; `epochs`, `lr` (peak of the one-cycle schedule); `agc`: lambda of both AGC methods.
    - `size`, `limit`, `valid_pct`, `precision`, `device`: as in `TrainConfig`.
    """

    data: str = "digits"
    arch: str = "nf_resnet_tiny"
    methods: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (8, 32, 256)
    accumulate: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 4
    lr: float = 1e-2
    agc: float = 0.01
    size: int | None = 16
    limit: int | None = None
    valid_pct: float = 0.2
    precision: str = "fp32"
    device: str | None = None
    out: str = "compare-output"

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)  # frozen: normalise lists (JSON, argparse) to tuples
        set_field("batch_sizes", _whole_numbers(self.batch_sizes, "batch_sizes", 1))
        set_field("seeds", _whole_numbers(self.seeds, "seeds", 0))
        if self.methods is not None:
            methods = tuple(self.methods) if isinstance(self.methods, (list, tuple)) else (self.methods,)
            unknown = [m for m in methods if m not in METHODS]
            if unknown or not methods or len(set(methods)) != len(methods):
                raise ConfigError("methods", f"must be distinct names from {', '.join(METHODS)}, got {list(methods)!r}")
            set_field("methods", methods)
        if not isinstance(self.accumulate, bool):
            raise ConfigError("accumulate", f"must be True or False, got {self.accumulate!r}")
        if self.accumulate and any(max(self.batch_sizes) % bs for bs in self.batch_sizes):
            raise ConfigError("batch_sizes", f"with accumulation every batch size must divide the largest "
                                             f"({max(self.batch_sizes)}), got {list(self.batch_sizes)}; change "
                                             f"them or turn accumulation off (--no-accum)")
        try:
            batchnorm_twin_name(self.arch)
        except ValueError as error:
            raise ConfigError("arch", f"{error}; compare trains a twin pair") from None
        first_of_each_method = {cell.method: cell for cell in reversed(self.cells())}
        for cell in first_of_each_method.values():  # the shared options, checked by TrainConfig itself
            self.train_config(cell)

    @property
    def nf_arch(self) -> str:
        return normfree_twin_name(self.arch)

    @property
    def bn_arch(self) -> str:
        return batchnorm_twin_name(self.arch)

    def method_keys(self) -> list[str]:
        """The methods run: `methods`, or all of them."""
        return list(self.methods) if self.methods is not None else list(METHODS)

    def cells(self) -> list[GridCell]:
        """Every run, seed by seed (a stopped grid has whole seeds done first), plain batch sizes
        before accumulated ones, methods side by side."""
        largest = max(self.batch_sizes)
        settings = [(bs, 1) for bs in sorted(self.batch_sizes)]
        if self.accumulate:
            settings += [(bs, largest // bs) for bs in sorted(self.batch_sizes) if bs < largest]
        methods = self.method_keys()
        return [GridCell(m, bs, accum, seed) for seed in self.seeds for bs, accum in settings for m in methods]

    def train_config(self, cell: GridCell) -> TrainConfig:
        """The `TrainConfig` of one run of the grid."""
        try:
            return TrainConfig(
                data=self.data, arch=self.bn_arch if cell.method == "bn" else self.nf_arch,
                agc=self.agc if cell.method.startswith("nf-agc") else None, per_sample=cell.method == _PER_SAMPLE,
                bs=cell.bs, accum=cell.accum, epochs=self.epochs, lr=self.lr, precision=self.precision,
                seed=cell.seed, size=self.size, limit=self.limit, valid_pct=self.valid_pct, device=self.device,
                out=str(Path(self.out) / "runs" / cell.key),
            ).resolved()
        except ConfigError as error:
            raise ConfigError(_OPTION_OF.get(error.option, error.option), error.message) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The ``normfree compare`` command line for this grid."""
        parts = ["normfree compare"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name == "accumulate":
                parts.append("--no-accum")
            elif f.name == "precision":
                parts.append(f"--{value}")
            elif isinstance(value, tuple):
                parts.append(f"{flag} {' '.join(map(str, value))}")
            else:
                parts.append(f"{flag} {value}")
        return " ".join(parts)


@dataclass
class CompareResult:
    """The grid's runs (finished ones), the summary rows of the report, and its files."""

    config: CompareConfig
    runs: list[RunRecord]
    rows: list[SummaryRow]
    files: dict[str, Path]
    complete: bool
    seconds: float

    @property
    def table(self) -> str:
        """The summary table in Markdown."""
        return markdown_table(self.rows)


def _record(cell: GridCell, result: TrainResult) -> RunRecord:
    return RunRecord(
        METHODS[cell.method], cell.bs, cell.accum, cell.seed, result.final_accuracy, result.best_accuracy,
        result.seconds_per_epoch, result.images_per_second, result.peak_memory_mib,
        tuple(row[result.metric] for row in result.epochs), tuple(row["valid_loss"] for row in result.epochs),
    )


def finished_run(cell_config: TrainConfig, overwrite: bool) -> TrainResult | None:
    """The saved result of this run if it finished with the same settings; None if it must be trained."""
    path = Path(cell_config.out) / "result.json"
    if overwrite or not path.exists():
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
              seconds: float) -> dict[str, object]:
    versions = library_versions()
    memory = {
        "process resident": "peak resident memory of the process during the run (Linux VmHWM, reset before each "
                            "run): it includes what Python, torch and the data already held",
        "cuda allocated": "torch.cuda.max_memory_allocated during the run",
    }.get(memory_kind or "", "not measurable here")
    accumulation = f"up to batch {max(config.batch_sizes)}" if config.accumulate else "off"
    return {
        "command": config.command(),
        "data": config.data,
        "models": f"{config.bn_arch} (BatchNorm) and {config.nf_arch} (normalizer-free), trained from scratch",
        "methods": ", ".join(METHODS[m] for m in methods),
        "batch sizes": ", ".join(map(str, config.batch_sizes)) + f"; gradient accumulation {accumulation}",
        "seeds": ", ".join(map(str, config.seeds)),
        "budget (same for every run)": f"{config.epochs} epochs, fastai fit_one_cycle, Adam (fastai defaults), "
                                       f"peak lr {config.lr}",
        "AGC lambda": config.agc,
        "image size": f"{config.size} px" if config.size else "native",
        "precision": config.precision,
        "device": f"{config.device or ('cuda' if torch.cuda.is_available() else 'cpu')}, "
                  f"{versions['torch_threads']} CPU threads",
        "peak memory": memory,
        "versions": f"torch {versions['torch']}, fastai {versions['fastai']}, timm {versions['timm']}, "
                    f"normfree {versions['normfree']}, Python {versions['python']}",
        "training time of the runs": f"{sum(run.seconds_per_epoch * len(run.curve) for run in runs):.0f} s; "
                                     f"wall time of this invocation: {seconds:.0f} s (runs found in the folder are "
                                     f"reused)",
    }


def compare(config: CompareConfig | None = None, /, *, quiet: bool = False, overwrite: bool = False,
            **options: Any) -> CompareResult:
    """Train the grid (see the module docstring) and write its report into ``out``; the keyword
    `options` are `CompareConfig`'s fields. ``compare()`` alone runs the quick digits grid.

    Runs already in ``out`` with the same settings are reused (pass `overwrite` to retrain). Ctrl-C
    stops after saving the interrupted run's checkpoint; the report then covers the runs finished so
    far, and running the same call again continues the grid. `quiet` silences the per-run lines
    and the final table.
    """
    config = make_config(CompareConfig, config, options)
    out = Path(config.out)
    methods = config.method_keys()
    cells = config.cells()
    say = (lambda *args, **kwargs: None) if quiet else print
    say(f"normfree compare: {len(cells)} runs ({', '.join(methods)} x {len(config.batch_sizes)} batch sizes"
        f"{' + accumulation' if config.accumulate else ''} x {len(config.seeds)} seeds) on {config.data}, "
        f"{config.epochs} epochs each -> {out}")
    cell_configs = [config.train_config(cell) for cell in cells]
    start = time.perf_counter()
    runs: list[RunRecord] = []
    memory_kind = None
    complete = True
    for i, (cell, cell_config) in enumerate(zip(cells, cell_configs), 1):
        result = finished_run(cell_config, overwrite)
        reused = result is not None
        if result is None:
            result = train(cell_config, quiet=True, overwrite=True, save_model=False, save_plots=False)
            result.learner = None  # free the model and data before the next run
        if result.interrupted:
            complete = False
            say(f"Stopped at run {i} of {len(cells)}; run the same command again to continue the grid.")
            break
        memory_kind = memory_kind or result.memory_kind
        runs.append(_record(cell, result))
        say(f"[{i:>{len(str(len(cells)))}}/{len(cells)}] {METHODS[cell.method]:<19} "
            f"{batch_setting(cell.bs, cell.accum):<16} seed {cell.seed}: final {result.final_accuracy:6.1%}, "
            f"best {result.best_accuracy:6.1%}, {result.seconds_per_epoch:5.2f} s/epoch"
            + (" (done before)" if reused else ""))
    seconds = time.perf_counter() - start
    notes = []
    if config.methods is None and _PER_SAMPLE not in methods:
        notes.append("NF + per-sample AGC was left out: this normfree version has no per-sample AGC yet.")
    if not complete:
        notes.append(f"Incomplete: {len(runs)} of {len(cells)} runs finished; running the same command again "
                     f"continues the grid.")
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "compare.json"}
    files["config"].write_text(json.dumps(
        {"config": config.to_dict(), "command": config.command(), "versions": library_versions()}, indent=2) + "\n")
    labels = [METHODS[m] for m in methods]
    result = CompareResult(config, runs, summarise(runs, labels), files, complete, seconds)
    if not runs:
        return result
    title = f"normfree compare: BatchNorm vs normalizer-free on {config.data}"
    files.update(write_report(out, runs, labels, title=title,
                              settings=_settings(config, methods, runs, memory_kind, seconds), notes=notes))
    say(f"\n{result.table}\n\nreport: {files['html']} (and {files['markdown'].name}); {seconds:.0f} s")
    return result
