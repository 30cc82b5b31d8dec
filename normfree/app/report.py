"""The comparison report: per-run records summarised over seeds, as a Markdown page and a self-contained HTML page.

Accuracies are summarised as mean ± sample standard deviation over seeds (n - 1 in the
denominator; no ± with a single seed). Time per epoch and images/s are means over seeds; peak
memory is the largest over seeds.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..utils.outdir import atomic_write
from .plots import plot_accuracy_vs_batch_size, plot_validation_curves

__all__ = ["REPORT_FILES", "GridResult", "RunRecord", "SummaryRow", "batch_setting", "markdown_table", "reading",
           "summarise", "write_report"]

REPORT_FILES = {
    "markdown": "report.md",
    "html": "report.html",
    "runs": "runs.csv",
    "summary": "summary.csv",
    "accuracy_plot": "accuracy_vs_batch_size.png",
    "curves_plot": "validation_curves.png",
}
_COLUMNS = ["method", "batch", "lr", "final accuracy (%)", "best accuracy (%)", "seeds", "s/epoch", "images/s",
            "peak memory (MiB)"]


@dataclass
class GridResult:
    """What a comparison grid returns (`normfree.compare`, `normfree.app.transfer.compare_transfer`): its finished
    `runs`, their summary `rows` (the report's table), the report's `files`, whether the grid is `complete` and its
    wall time in `seconds`; `stopped_by` (Ctrl-C or SIGTERM) when it is not complete."""

    config: Any
    runs: list[Any]
    rows: list[Any]
    files: dict[str, Path]
    complete: bool
    seconds: float
    stopped_by: str | None = None


def batch_setting(bs: int, accum: int) -> str:
    """``bs 32`` for plain training, ``bs 8 x 32 = 256`` for 32 accumulated batches of 8."""
    return f"bs {bs}" if accum == 1 else f"bs {bs} x {accum} = {bs * accum}"


@dataclass(frozen=True)
class RunRecord:
    """One finished training run of the grid: its method label, batch setting, seed and results.

    `curve` is the validation accuracy after each epoch, `loss_curve` the validation loss.
    """

    method: str
    bs: int
    accum: int
    seed: int
    lr: float
    final_accuracy: float
    best_accuracy: float
    seconds_per_epoch: float
    images_per_second: float
    peak_memory_mib: float | None
    curve: tuple[float, ...] = field(default=())
    loss_curve: tuple[float, ...] = field(default=())
    agc: float | None = None  # the AGC lambda it trained with (None: no AGC)

    @property
    def setting(self) -> str:
        """The batch setting, e.g. ``bs 32`` or ``bs 8 x 32 = 256`` (accumulated)."""
        return batch_setting(self.bs, self.accum)


@dataclass(frozen=True)
class SummaryRow:
    """One table row: a method at one batch setting, over its seeds."""

    method: str
    bs: int
    accum: int
    lr: float
    seeds: int
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    seconds_per_epoch: float
    images_per_second: float
    peak_memory_mib: float | None

    @property
    def setting(self) -> str:
        """The batch setting, e.g. ``bs 32`` or ``bs 8 x 32 = 256`` (accumulated)."""
        return batch_setting(self.bs, self.accum)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def over_seeds(group: Sequence[Any]) -> tuple[int, float, float, float, float, float]:
    """The summary columns every report shares, over the seeds of one group of runs (each with `final_accuracy`,
    `best_accuracy` and `seconds_per_epoch`): seeds, final mean and std, best mean and std, mean s/epoch."""
    final_mean, final_std = mean_std([run.final_accuracy for run in group])
    best_mean, best_std = mean_std([run.best_accuracy for run in group])
    return (len(group), final_mean, final_std, best_mean, best_std,
            statistics.fmean(run.seconds_per_epoch for run in group))


def summarise(runs: Sequence[RunRecord], methods: Sequence[str] | None = None) -> list[SummaryRow]:
    """One row per (method, bs, accum), over seeds (which share one lr); rows by method (in `methods`
    order), then plain settings by batch size, then accumulated ones."""
    groups: dict[tuple[str, int, int], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.method, run.bs, run.accum), []).append(run)
    order = list(methods) if methods is not None else list(dict.fromkeys(run.method for run in runs))
    rows = []
    for (method, bs, accum), group in sorted(
        groups.items(), key=lambda item: (order.index(item[0][0]), item[0][2] > 1, item[0][1])
    ):
        memories = [run.peak_memory_mib for run in group if run.peak_memory_mib is not None]
        rows.append(SummaryRow(
            method, bs, accum, group[0].lr, *over_seeds(group),
            statistics.fmean(run.images_per_second for run in group),
            max(memories) if memories else None,
        ))
    return rows


def reading(rows: Sequence[SummaryRow], methods: Sequence[str]) -> str:
    """One paragraph that reads the table: each method against the first (the baseline), setting by setting,
    in points of final accuracy, with the seed spread that decides whether a gap means anything."""
    baseline, others = methods[0], [m for m in methods[1:] if any(row.method == m for row in rows)]
    by_key = {(row.method, row.bs, row.accum): row for row in rows}
    sentences = []
    for method in others:
        gaps = []
        for row in rows:
            if row.method != method or (baseline, row.bs, row.accum) not in by_key:
                continue
            base = by_key[(baseline, row.bs, row.accum)]
            gap = 100 * (row.final_mean - base.final_mean)
            spread = 100 * max((s for s in (row.final_std, base.final_std) if not math.isnan(s)), default=math.nan)
            gaps.append((row.setting, gap, spread))
        if not gaps:
            continue
        parts = [f"{setting}: {gap:+.1f}" + ("" if math.isnan(spread) else f" (seed spread up to {spread:.1f})")
                 for setting, gap, spread in gaps]
        within = sum(abs(gap) <= 2 for _, gap, _ in gaps)
        sentences.append(f"{method} against {baseline}, in points of final accuracy: {'; '.join(parts)}. "
                         f"Within 2 points at {within} of {len(gaps)} batch settings, ahead at "
                         f"{sum(gap > 2 for _, gap, _ in gaps)}, behind at {sum(gap < -2 for _, gap, _ in gaps)}.")
    return " ".join(sentences)


def percent(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}" if math.isnan(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _cells(row: SummaryRow) -> list[str]:
    return [
        row.method, row.setting, f"{row.lr:g}",
        percent(row.final_mean, row.final_std), percent(row.best_mean, row.best_std),
        str(row.seeds), f"{row.seconds_per_epoch:.2f}", f"{row.images_per_second:.0f}",
        "n/a" if row.peak_memory_mib is None else f"{row.peak_memory_mib:.0f}",
    ]


def markdown_grid(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[SummaryRow]) -> str:
    """The summary as a Markdown table (also readable as plain text)."""
    return markdown_grid(_COLUMNS, [_cells(row) for row in rows])


def html_grid(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    header = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _validation_curves(runs: Sequence[RunRecord]) -> dict[str, dict[str, list[tuple[float, ...]]]]:
    ordered = sorted(runs, key=lambda run: (run.accum > 1, run.bs))
    curves: dict[str, dict[str, list[tuple[float, ...]]]] = {}
    for run in ordered:
        curves.setdefault(run.setting, {}).setdefault(run.method, []).append(run.curve)
    return curves


def write_csv(path: Path, records: Sequence[object]) -> None:
    dicts = [dataclasses.asdict(record) for record in records]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, list(dicts[0]) if dicts else [])
    writer.writeheader()
    writer.writerows(dicts)
    atomic_write(path, text.getvalue())


Tables = Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]]]]  # heading -> (columns, rows of cells)


def html_document(title: str, settings: Mapping[str, object], body: str, images: Mapping[str, bytes]) -> str:
    """A self-contained HTML report: title, settings, `body` (HTML), then the PNG `images` embedded as base64."""
    esc = html.escape
    setting_items = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in settings.items())
    figures = "".join(
        f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(alt)}</figcaption></figure>"
        for alt, png in images.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) {{ text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<h2>Settings</h2><ul>{setting_items}</ul>
{body}
<h2>Plots</h2>
{figures}
</body></html>
"""


def markdown_document(title: str, settings: Mapping[str, object], body: Sequence[str],
                      images: Mapping[str, str]) -> str:
    """The Markdown twin of `html_document`: `body` is a list of lines; `images` map alt text to PNG file names."""
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- **{k}**: {v}" for k, v in settings.items()]
    lines += ["", *body, "", "## Plots", ""]
    lines += [f"![{alt}]({name})\n" for alt, name in images.items()]
    return "\n".join(lines)


def html_sections(tables: Tables) -> str:
    """Each table under its heading, as HTML."""
    return "".join(f"<h2>{html.escape(heading)}</h2>{html_grid(*table)}" for heading, table in tables.items())


def markdown_sections(tables: Tables) -> list[str]:
    """Each table under its heading, as Markdown lines."""
    lines: list[str] = []
    for heading, table in tables.items():
        lines += ["", f"## {heading}", "", markdown_grid(*table)]
    return lines


def write_report(
    out: str | Path,
    runs: Sequence[RunRecord],
    methods: Sequence[str],
    title: str = "normfree comparison",
    settings: Mapping[str, object] | None = None,
    notes: Sequence[str] = (),
    tables: Tables | None = None,
    rows: Sequence[SummaryRow] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html (plots embedded as base64 PNG), runs.csv, summary.csv and the two
    plots into `out`; returns their paths by `REPORT_FILES` key. `tables` are further sections
    after the results (heading -> (columns, rows of cell strings)), e.g. a learning-rate sweep.
    `rows`: ``summarise(runs, methods)`` where the caller has it already (computed here otherwise)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    rows = summarise(runs, methods) if rows is None else rows
    notes = [
        *notes,
        "Accuracy: validation accuracy after the last epoch (final) and the best epoch (best), "
        "mean ± sample standard deviation over seeds.",
        "s/epoch: wall time of an epoch with its validation; images/s: training examples per second of "
        "training time; peak memory: see the memory note in the settings.",
    ]
    paths = {key: out / name for key, name in REPORT_FILES.items()}
    figures = {
        "final validation accuracy vs batch size (mean ± std over seeds)": (
            plot_accuracy_vs_batch_size([dataclasses.asdict(row) for row in rows], methods), "accuracy_plot"),
        "validation accuracy per epoch (mean over seeds, band: min to max)": (
            plot_validation_curves(_validation_curves(runs), methods), "curves_plot"),
    }
    pngs = {}
    for alt, (fig, key) in figures.items():
        pngs[alt] = png_bytes(fig)
        atomic_write(paths[key], pngs[alt])
    paragraph, tables = reading(rows, methods), tables or {}
    markdown = ["## Results", "", markdown_table(rows), "", paragraph, "", *(f"- {note}" for note in notes),
                *markdown_sections(tables)]
    atomic_write(paths["markdown"], markdown_document(
        title, settings, markdown, {alt: REPORT_FILES[key] for alt, (_, key) in figures.items()}))
    body = (f"<h2>Results</h2>{html_grid(_COLUMNS, [_cells(row) for row in rows])}<p>{html.escape(paragraph)}</p>"
            f"<ul>{''.join(f'<li>{html.escape(note)}</li>' for note in notes)}</ul>{html_sections(tables)}")
    atomic_write(paths["html"], html_document(title, settings, body, pngs))
    write_csv(paths["runs"], runs)
    write_csv(paths["summary"], rows)
    return paths
