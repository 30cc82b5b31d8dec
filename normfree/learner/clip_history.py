"""Per-step AGC statistics of one fit, and the plot used to tune lambda."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..agc.clip import ClipStats

__all__ = ["ClipHistory"]


class ClipHistory:
    """Units clipped per parameter at each optimizer step, by optimizer param group.

    `names[g]` are the names of the clipped parameters of param group `g`, in the order their
    `ClipStats` are recorded. Steps are kept as device tensors and stacked only when read, so
    recording costs no host synchronisation.
    """

    def __init__(self, names: list[list[str]]):
        self.names = names
        self._group_of = torch.tensor([g for g, group in enumerate(names) for _ in group], dtype=torch.long)
        self._steps: list[list[ClipStats]] = []

    def record(self, stats: list[ClipStats]) -> None:
        """Add one step: one `ClipStats` per param group, in group order."""
        self._steps.append(stats)

    def __len__(self) -> int:
        return len(self._steps)

    def state_dict(self) -> dict[str, Any]:
        """The steps so far, for a checkpoint: `names` and the [steps, parameters] counts, on the CPU."""
        return {"names": self.names, "clipped": self.clipped(), "nonfinite": self.nonfinite(), "units": self.units()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the steps of `state` (`state_dict`) before the steps recorded after it; ValueError if they were
        recorded for other parameters."""
        if state["names"] != self.names:
            raise ValueError(f"the clip history was recorded for other parameters ({len(state['names'])} param groups "
                             f"of {[len(group) for group in state['names']]} parameters, not "
                             f"{[len(group) for group in self.names]})")
        sizes = [len(group) for group in self.names]
        restored = [[ClipStats(*fields) for fields in zip(clipped.split(sizes), nonfinite.split(sizes),
                                                          units.split(sizes))]
                    for clipped, nonfinite, units in zip(state["clipped"], state["nonfinite"], state["units"])]
        self._steps[:0] = restored

    @property
    def parameter_names(self) -> list[str]:
        return [name for group in self.names for name in group]

    def _stacked(self, field: str, steps: slice) -> Tensor:
        selected = self._steps[steps]
        if not selected:
            return torch.zeros(0, len(self.parameter_names), dtype=torch.long)
        return torch.stack([torch.cat([getattr(s, field).cpu() for s in step]) for step in selected])

    def clipped(self, steps: slice = slice(None)) -> Tensor:
        """[steps, parameters] units clipped."""
        return self._stacked("clipped", steps)

    def nonfinite(self, steps: slice = slice(None)) -> Tensor:
        """[steps, parameters] units whose gradient or weight was inf or NaN (left unchanged)."""
        return self._stacked("nonfinite", steps)

    def units(self, steps: slice = slice(None)) -> Tensor:
        """[steps, parameters] units that had a gradient."""
        return self._stacked("units", steps)

    def rate(self, steps: slice = slice(None), group: int | None = None) -> float:
        """Fraction of units clipped over `steps`, overall or for one param group; NaN if no step."""
        clipped, units = self.clipped(steps), self.units(steps)
        if group is not None:
            columns = self._group_of == group
            clipped, units = clipped[:, columns], units[:, columns]
        total = int(units.sum())
        return int(clipped.sum()) / total if total else math.nan

    def _step_rates(self, columns: slice | Tensor | list[int]) -> Tensor:
        clipped, units = self.clipped()[:, columns], self.units()[:, columns]
        return clipped.sum(1) / units.sum(1).clamp_min(1)

    def step_rates(self, group: int | None = None) -> Tensor:
        """[steps] fraction of units clipped at each step, overall or for one param group."""
        return self._step_rates(slice(None) if group is None else self._group_of == group)

    def layer_rates(self) -> OrderedDict[str, Tensor]:
        """Per layer (a module: its weight and bias together), [steps] fraction of units clipped."""
        columns: OrderedDict[str, list[int]] = OrderedDict()
        for i, name in enumerate(self.parameter_names):
            columns.setdefault(name.rpartition(".")[0] or name, []).append(i)
        return OrderedDict((layer, self._step_rates(idx)) for layer, idx in columns.items())

    def plot(self, max_layers: int = 60, figsize: tuple[float, float] | None = None):
        """Clip rate per step (overall and per param group) above a layer x step heat map.

        Layers are in model order, so the stem is at the top and the head at the bottom; at most
        `max_layers` rows are drawn (evenly spaced) to keep labels readable. Returns the figure: a
        `matplotlib.figure.Figure` made without pyplot (as `normfree.app.plots` makes its figures), so no
        figure is left open in pyplot's list; Jupyter shows it as a cell's last value, and ``fig.savefig``
        writes it.
        """
        from matplotlib.figure import Figure  # here: recording statistics needs no matplotlib

        layers = self.layer_rates()
        names = list(layers)
        if len(names) > max_layers:
            keep = sorted({round(i * (len(names) - 1) / (max_layers - 1)) for i in range(max_layers)})
            names = [names[i] for i in keep]
        heat = torch.stack([layers[n] for n in names]).numpy() if len(self) else torch.zeros(len(names), 0).numpy()
        height = 2.5 + 0.16 * len(names)
        fig = Figure(figsize=figsize or (9, height))
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, max(2.5, 0.16 * len(names))]})
        steps = range(len(self))
        top.plot(steps, self.step_rates().numpy(), label="all", color="black", linewidth=1.2)
        if len(self.names) > 1:
            for g in range(len(self.names)):
                top.plot(steps, self.step_rates(g).numpy(), label=f"group {g}", linewidth=0.9)
        top.set_ylabel("units clipped")
        top.set_ylim(-0.02, 1.02)
        top.legend(loc="upper right", fontsize=8)
        top.set_title("AGC: fraction of units clipped per step")
        image = bottom.imshow(heat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        bottom.set_yticks(range(len(names)))
        bottom.set_yticklabels(names, fontsize=6)
        bottom.set_xlabel("optimizer step")
        fig.colorbar(image, ax=bottom, label="fraction clipped", fraction=0.03, pad=0.01)
        fig.tight_layout()
        return fig
