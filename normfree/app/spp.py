"""``normfree spp``: signal propagation plots of several architectures, written as spp.png and spp.csv.

Each architecture is built as `build_model` builds it for training (a timm name; optionally with a
trained weights file), and `signal_propagation` runs it on N(0, 1) noise or on one training batch of a
data set. The outputs, written atomically into the output folder:

- ``spp.csv``: one row per model and residual block: model, block, name, transition, squared_mean,
  variance, residual_variance, arch, weights, input;
- ``spp.png``: the three statistics against block index, the models overlaid.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from ..data.registry import parse_data_spec
from ..models.factory import build_model, unknown_arch_error
from ..models.propagation import DEFAULT_BATCH, DEFAULT_SIZE, SignalPropagation, signal_propagation
from ..utils.outdir import atomic_write, locked_folder
from .config import ConfigError, check_device

__all__ = ["SPP_COLUMNS", "SPP_FILES", "write_spp"]

SPP_FILES = {"csv": "spp.csv", "png": "spp.png"}
SPP_COLUMNS = ("model", "block", "name", "transition", "squared_mean", "variance", "residual_variance", "arch",
               "weights", "input")
DEFAULT_NOISE_SIZE = DEFAULT_SIZE  # the noise images' size: `signal_propagation`'s own default
_NO_WEIGHTS = "none"  # in --weights: this arch keeps its random initialisation


def _check(archs: Sequence[str], weights: Sequence[str] | None, size: int | None, bs: int, channels: int,
           device: str) -> None:
    if not archs:
        raise ConfigError("arch", "give at least one architecture")
    known = set(timm.list_models())
    for arch in archs:
        if arch not in known:
            raise ConfigError("arch", str(unknown_arch_error(arch)))
    if weights is not None and len(weights) != len(archs):
        raise ConfigError("weights", f"{len(weights)} file(s) for {len(archs)} arch(s); give one file per arch, in "
                                     f"the same order ({_NO_WEIGHTS!r} for an arch without one)")
    for path in weights or ():
        if path != _NO_WEIGHTS and not Path(path).is_file():
            raise ConfigError("weights", f"{path}: no such file")
    # bs: signal_propagation's statistics are over the batch, which needs two examples
    for option, value, least in (("size", size, 1), ("bs", bs, 2), ("channels", channels, 1)):
        if value is not None and value < least:
            raise ConfigError(option, f"must be at least {least}, got {value}")
    check_device(device)


def _batch(data: str, bs: int, size: int | None, seed: int) -> torch.Tensor:
    try:
        dls = parse_data_spec(data).dataloaders(bs, size, seed, device="cpu")
        images = dls.one_batch()[0]
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError("data", str(error)) from None
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ConfigError("data", f"{data}: batches are not images shaped [batch, channels, height, width]")
    return images.as_subclass(torch.Tensor)  # a plain tensor, not fastai's TensorImage


def _label(arch: str, weights: str | None, labels: list[str]) -> str:
    label = arch if weights is None else f"{arch} ({Path(weights).name})"
    return label if label not in labels else f"{label} #{labels.count(label) + 1}"


def _csv(results: list[SignalPropagation], archs: Sequence[str], weights: list[str | None], source: str) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SPP_COLUMNS)
    for result, arch, path in zip(results, archs, weights):
        for row in result.rows:
            writer.writerow([result.label, row.index, row.name, row.transition, repr(row.squared_mean),
                             repr(row.variance), repr(row.residual_variance), arch, path or "", source])
    return text.getvalue()


def _table(results: list[SignalPropagation]) -> str:
    width = max(len("model"), *(len(r.label) for r in results))
    lines = [f"{'model':<{width}}  blocks  {'squared mean':>12}  {'variance':>10}  {'residual var':>12}"
             "   (last block)"]
    for result in results:
        last = result.rows[-1]
        values = "  ".join(f"{v:>{w}.4g}" if math.isfinite(v) else f"{v!s:>{w}}" for v, w in
                           ((last.squared_mean, 12), (last.variance, 10), (last.residual_variance, 12)))
        lines.append(f"{result.label:<{width}}  {len(result):>6}  {values}")
    return "\n".join(lines)


def write_spp(
    arch: Sequence[str],
    out: str | Path = "spp",
    size: int | None = None,
    weights: Sequence[str] | None = None,
    data: str | None = None,
    bs: int = DEFAULT_BATCH,
    seed: int = 0,
    channels: int = 3,
    device: str = "cpu",
    running_stats: bool = False,
    quiet: bool = False,
) -> list[SignalPropagation]:
    """Signal propagation of each architecture in `arch`, written to `out`/spp.csv and `out`/spp.png.

    - `arch`: timm names (normfree's small family, NF models, BatchNorm ResNets, ...), built by `build_model`
      with `seed` as the initialisation seed of each.
    - `weights`: one file per arch (``"none"`` for an arch left at its initialisation), see `load_weights`.
    - `data`: a data spec (as ``normfree train --data``); its first training batch of `bs` images at `size`
      (default: the data's own) replaces the noise, and its channels replace `channels`.
    - otherwise `bs` images of N(0, 1) noise, `channels` x `size` x `size` (default size 64), drawn from `seed`.
    - `running_stats`: BatchNorm layers use their running averages (inference of a trained model) instead of
      the batch's statistics (see `signal_propagation`'s `batch_stats`).

    ConfigError naming the option for bad input, raised before anything is written. Returns the results.
    """
    arch = list(arch)
    _check(arch, weights, size, bs, channels, device)
    paths: list[str | None] = [None if w in (None, _NO_WEIGHTS) else w for w in (weights or [None] * len(arch))]
    with locked_folder(out) as folder:
        if data is not None:
            x = _batch(data, bs, size, seed)
            shape, source = tuple(x.shape), f"batch of {data}"
        else:
            x = None
            shape = (bs, channels, size or DEFAULT_NOISE_SIZE, size or DEFAULT_NOISE_SIZE)
            source = "N(0, 1) noise"
        results: list[SignalPropagation] = []
        for name, path in zip(arch, paths):
            torch.manual_seed(seed)
            try:
                model = build_model(name, 10, shape[1], weights=path).to(device)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError("weights" if path else "arch", str(error)) from None
            label = _label(name, path, [r.label for r in results])
            try:
                result = signal_propagation(model, x if x is None else x.to(device), input_shape=None if x is not None
                                            else shape, label=label, seed=seed,
                                            batch_stats=not running_stats)
            except ValueError as error:
                raise ConfigError("arch", f"{name}: {error}") from None
            results.append(result)
        atomic_write(folder / SPP_FILES["csv"], _csv(results, arch, paths, source))
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 3.8))
        when = "" if any(paths) else " at initialisation"
        results[0].plot(*results[1:], ax=fig.subplots(1, 3),
                        title=f"signal propagation{when}, {source} ({'x'.join(map(str, shape))})")
        atomic_write(folder / SPP_FILES["png"], lambda p: fig.savefig(p, dpi=110))
    if not quiet:
        print(_table(results))
        print(f"wrote {folder / SPP_FILES['csv']} and {folder / SPP_FILES['png']}")
    return results
