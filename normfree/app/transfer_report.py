"""The transfer-learning report: pretraining and target runs summarised over seeds, as a Markdown page and a
self-contained HTML page, with the plot of target accuracy against training images per class.

The conventions are `normfree.app.report`'s, whose table helpers it uses: accuracy is mean ± sample
standard deviation over seeds (n - 1 in the denominator; no ± with a single seed), time per epoch
the mean over seeds, and the HTML page carries its plot as base64 PNG.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..utils.outdir import atomic_write
from .report import (
    REPORT_FILES,
    html_document,
    html_sections,
    markdown_document,
    markdown_grid,
    markdown_sections,
    over_seeds,
    percent,
    png_bytes,
    write_csv,
)

__all__ = ["PRETRAIN", "TRANSFER_REPORT_FILES", "Table", "TransferRecord", "TransferRow", "chosen_lr_table",
           "plot_accuracy_vs_images_per_class", "source_table", "summarise_transfer", "target_markdown", "target_table",
           "write_transfer_report"]

TRANSFER_REPORT_FILES = {  # the pages and tables are named as in the batch-size comparison
    **{key: REPORT_FILES[key] for key in ("markdown", "html", "runs", "summary")},
    "accuracy_plot": "accuracy_vs_images_per_class.png",
}
PRETRAIN = "pretrain"  # the `mode` of a pretraining run on the source classes

Table = tuple[Sequence[str], Sequence[Sequence[str]]]  # (columns, rows of cell strings)


@dataclass(frozen=True)
class TransferRecord:
    """One finished run: a pretraining run on the source classes (`mode` ``pretrain``, `per_class`
    None: all their training images) or a target run (`mode` ``fine-tune``, ``linear-probe`` or
    ``scratch``, at most `per_class` training images per target class). `method` is the model's label
    (e.g. ``NF + AGC``); `epochs` the finished epochs; the accuracies are on the validation images of
    the run's own classes; `lr` its peak learning rate (None in records of older versions)."""

    method: str
    mode: str
    per_class: int | None
    bs: int
    seed: int
    epochs: int
    final_accuracy: float
    best_accuracy: float
    seconds_per_epoch: float
    lr: float | None = None


@dataclass(frozen=True)
class TransferRow:
    """One model in one mode at one (images per class, batch size), over its seeds (which share one lr)."""

    method: str
    mode: str
    per_class: int | None
    bs: int
    seeds: int
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    seconds_per_epoch: float
    lr: float | None = None


def summarise_transfer(records: Sequence[TransferRecord], methods: Sequence[str],
                       modes: Sequence[str]) -> list[TransferRow]:
    """One row per (method, mode, per_class, bs), over seeds; rows in `methods` then `modes` order
    (``pretrain`` first where listed), then by images per class and batch size."""
    groups: dict[tuple[str, str, int | None, int], list[TransferRecord]] = {}
    for record in records:
        groups.setdefault((record.method, record.mode, record.per_class, record.bs), []).append(record)

    def position(key: tuple[str, str, int | None, int]) -> tuple[int, int, int, int]:
        method, mode, per_class, bs = key
        return methods.index(method), modes.index(mode), per_class or 0, bs

    rows = []
    for key in sorted(groups, key=position):
        rows.append(TransferRow(*key, *over_seeds(groups[key]), groups[key][0].lr))
    return rows


def _column_label(per_class: int, bs: int, per_class_labels: Mapping[int, str]) -> str:
    return f"{per_class_labels.get(per_class, per_class)} per class, bs {bs}"


def _final_accuracy(row: TransferRow) -> str:
    return percent(row.final_mean, row.final_std)


def target_table(rows: Sequence[TransferRow], per_class_labels: Mapping[int, str] = {},
                 cell: Callable[[TransferRow], str] = _final_accuracy) -> Table:
    """Final target accuracy (%), mean ± std over seeds (or what `cell` writes of a row): one row per model and
    mode, one column per (images per class, batch size). `per_class_labels`: how to write a `per_class` value where
    it is not the number of images each class had (fewer were available), e.g. ``{1000: "58-71 (asked 1000)"}``."""
    target = [row for row in rows if row.mode != PRETRAIN]
    settings = sorted({(row.per_class, row.bs) for row in target})
    cells: dict[tuple[str, str], dict[tuple[int, int], str]] = {}
    for row in target:
        cells.setdefault((row.method, row.mode), {})[(row.per_class, row.bs)] = cell(row)
    columns = ["model", "mode", *(_column_label(*setting, per_class_labels) for setting in settings)]
    return columns, [[method, mode, *(values.get(setting, "") for setting in settings)]
                     for (method, mode), values in cells.items()]


def target_markdown(rows: Sequence[TransferRow], per_class_labels: Mapping[int, str] = {}) -> str:
    """`target_table` in Markdown (also readable as plain text)."""
    return markdown_grid(*target_table(rows, per_class_labels))


def chosen_lr_table(rows: Sequence[TransferRow], per_class_labels: Mapping[int, str] = {}) -> Table:
    """The peak lr each model, mode and (images per class, batch size) of `target_table` trained with."""
    return target_table(rows, per_class_labels, lambda row: "" if row.lr is None else f"{row.lr:g}")


def source_table(rows: Sequence[TransferRow]) -> Table:
    """Accuracy (%) of the pretrained models on the source classes, mean ± std over seeds: one row per pretraining
    (several methods may start from one)."""
    columns = ["model", "final accuracy (%)", "best accuracy (%)", "seeds", "bs", "s/epoch"]
    return columns, [[row.method, percent(row.final_mean, row.final_std), percent(row.best_mean, row.best_std),
                      str(row.seeds), str(row.bs), f"{row.seconds_per_epoch:.2f}"]
                     for row in rows if row.mode == PRETRAIN]


def plot_accuracy_vs_images_per_class(rows: Sequence[TransferRow], methods: Sequence[str],
                                      modes: Sequence[str], per_class_labels: Mapping[int, str] = {}) -> Figure:
    """Final target accuracy (mean, std error bars) against training images per class: one panel per
    mode (columns) and batch size (rows), one line per model; ticks written as `target_table`'s columns."""
    target = [row for row in rows if row.mode != PRETRAIN]
    batch_sizes = sorted({row.bs for row in target})
    per_class = sorted({row.per_class for row in target})
    fig = Figure(figsize=(4.2 * len(modes), 3.3 * len(batch_sizes)))
    axes = fig.subplots(len(batch_sizes), len(modes), squeeze=False, sharey=True)
    for row_axes, bs in zip(axes, batch_sizes):
        for ax, mode in zip(row_axes, modes):
            for colour, method in enumerate(methods):
                mine = sorted((r for r in target if (r.method, r.mode, r.bs) == (method, mode, bs)),
                              key=lambda r: r.per_class)
                ax.errorbar([r.per_class for r in mine], [r.final_mean for r in mine],
                            yerr=[0 if math.isnan(r.final_std) else r.final_std for r in mine],
                            fmt="-o", color=f"C{colour}", capsize=3, label=method)
            ax.set_xscale("log")
            ax.set_xticks(per_class, [str(per_class_labels.get(n, n)) for n in per_class])
            ax.minorticks_off()
            ax.set(title=f"{mode}, bs {bs}", xlabel="training images per class")
            ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("final target accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_transfer_report(
    out: str | Path,
    records: Sequence[TransferRecord],
    methods: Sequence[str],
    modes: Sequence[str],
    title: str,
    settings: Mapping[str, object],
    notes: Sequence[str] = (),
    rows: Sequence[TransferRow] | None = None,
    per_class_labels: Mapping[int, str] = {},
    tables: Mapping[str, Table] = {},
) -> dict[str, Path]:
    """Write report.md, report.html (plot embedded), runs.csv, summary.csv and the plot into `out`;
    returns their paths by `TRANSFER_REPORT_FILES` key. `methods` are the target runs' models (the plot's lines),
    `modes` the target modes, in table order. `rows`: ``summarise_transfer(records, methods, [PRETRAIN, *modes])``
    where the caller has it already (with the labels of pretrainings no target method has among `methods`);
    `per_class_labels`: as in `target_table`; `tables`: more tables by title, after the others (the lrs chosen,
    the lr sweep)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise_transfer(records, methods, [PRETRAIN, *modes]) if rows is None else rows
    all_tables = {"Target accuracy (%): final validation accuracy on the target classes, mean ± std over seeds":
                  target_table(rows, per_class_labels)}
    if any(row.mode == PRETRAIN for row in rows):
        all_tables["Source accuracy (%) of the pretrained models, on the source classes"] = source_table(rows)
    all_tables.update(tables)
    notes = [*notes, "mean ± sample standard deviation over seeds; s/epoch: wall time of an epoch with its "
                     "validation, mean over seeds."]
    paths = {key: out / name for key, name in TRANSFER_REPORT_FILES.items()}
    alt = "final target accuracy vs training images per class (mean ± std over seeds)"
    png = png_bytes(plot_accuracy_vs_images_per_class(rows, methods, modes, per_class_labels))
    atomic_write(paths["accuracy_plot"], png)
    markdown = [*markdown_sections(all_tables), "", "## Notes", "", *(f"- {note}" for note in notes)]
    atomic_write(paths["markdown"], markdown_document(title, settings, markdown,
                                                   {alt: TRANSFER_REPORT_FILES["accuracy_plot"]}))
    body = f"{html_sections(all_tables)}<h2>Notes</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>"
    atomic_write(paths["html"], html_document(title, settings, body, {alt: png}))
    write_csv(paths["runs"], records)
    write_csv(paths["summary"], rows)
    return paths
