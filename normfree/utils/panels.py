"""A row of matplotlib panels for the plot methods: new ones, or the Axes the caller gives."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def panel_row(ax: Sequence[Any] | None, count: int, figsize: tuple[float, float], what: str) -> tuple[Any, list]:
    """(figure, `count` Axes): a new pyplot figure of `figsize` when `ax` is None, else `ax` itself, which must hold
    `count` Axes (ValueError naming `ax` and `what` the panels show otherwise). pyplot is imported only when needed."""
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, count, figsize=figsize)
        return fig, list(axes)
    axes = list(ax)
    if len(axes) != count:
        raise ValueError(f"ax: {count} Axes are needed ({what}), got {len(axes)}")
    return axes[0].figure, axes
