"""Figures of training runs: one run's curves, and the comparison grid's accuracy and validation curves.

Every function returns a matplotlib `Figure` made without pyplot: nothing is shown, no global
figure list grows over many runs, and the caller saves it (``fig.savefig(path)``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

__all__ = ["plot_accuracy_vs_batch_size", "plot_run_curves", "plot_validation_curves"]


def plot_run_curves(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy", title: str | None = None) -> Figure:
    """Losses (train, valid) and the validation `metric` per epoch, from `EpochLog` rows."""
    epochs = [row["epoch"] for row in rows]
    fig = Figure(figsize=(10, 3.8))
    loss_ax, metric_ax = fig.subplots(1, 2)
    for column, label in (("train_loss", "train (smoothed)"), ("valid_loss", "valid")):
        loss_ax.plot(epochs, [row.get(column, math.nan) for row in rows], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    metric_ax.plot(epochs, [row.get(metric, math.nan) for row in rows], marker="o", color="C2")
    metric_ax.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_batch_size(
    points: Sequence[Mapping[str, Any]], methods: Sequence[str], value: str = "final", title: str | None = None
) -> Figure:
    """Accuracy (mean, std error bars) against batch size, one colour per method.

    `points` have ``method``, ``bs`` (the per-pass batch), ``accum`` (batches per step), and
    ``{value}_mean`` / ``{value}_std``. Plain training is drawn solid at its batch size; gradient
    accumulation dashed, at its per-pass batch size (its optimizer step sees ``bs * accum``).
    """
    fig = Figure(figsize=(10, 4.8))
    ax = fig.subplots()
    for colour, method in enumerate(methods):
        for accumulated, style in ((False, "-o"), (True, "--s")):
            mine = sorted((p for p in points if p["method"] == method and (p["accum"] > 1) == accumulated),
                          key=lambda p: p["bs"])
            if not mine:
                continue
            label = f"{method}, accumulated to {mine[0]['bs'] * mine[0]['accum']}" if accumulated else method
            ax.errorbar([p["bs"] for p in mine], [p[f"{value}_mean"] for p in mine],
                        yerr=[0 if math.isnan(p[f"{value}_std"]) else p[f"{value}_std"] for p in mine],
                        fmt=style, color=f"C{colour}", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size per forward/backward pass", ylabel=f"{value} validation accuracy",
           title=title or f"{value} validation accuracy vs batch size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes: no point hidden
    fig.tight_layout()
    return fig


def plot_validation_curves(
    curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], methods: Sequence[str], metric: str = "accuracy"
) -> Figure:
    """Validation `metric` per epoch: one panel per batch setting, one line per method (mean over
    seeds, band = min..max).

    `curves[setting][method]` is a list over seeds of per-epoch values.
    """
    settings = list(curves)
    columns = min(len(settings), 3) or 1
    rows = math.ceil(len(settings) / columns) or 1
    fig = Figure(figsize=(4.2 * columns, 3.3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    for ax, setting in zip(axes.flat, settings):
        for colour, method in enumerate(methods):
            runs = curves[setting].get(method)
            if not runs:
                continue
            length = min(len(run) for run in runs)
            if length == 0:
                continue
            per_epoch = [[run[e] for run in runs] for e in range(length)]
            epochs = list(range(1, length + 1))
            ax.plot(epochs, [sum(v) / len(v) for v in per_epoch], marker=".", color=f"C{colour}", label=method)
            if len(runs) > 1:
                ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                                color=f"C{colour}", alpha=0.15)
        ax.set(title=setting, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"validation {metric}")
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
