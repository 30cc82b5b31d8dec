"""Signal propagation of the recipe ablation's five families at initialisation: why a recipe falls short where it does.

For each family of docs/convert/recipe_ablation.py, the BatchNorm model (batch statistics, as in training) and its
conversions by `to_normfree` (mode nf) under each recipe run once on the same N(0, 1) noise, 16 images of 1 x 32 x 32
(the ablation's Fashion-MNIST input), and `normfree.signal_propagation` records per residual block the average
channel squared mean, the average channel variance and the residual branch's variance (Brock, De & Smith 2021,
arXiv 2101.08692, Sec. 3). vgg11_bn has no residual block: its statistics are taken after each ReLU, and its residual
panel is left empty. Writes ``spp.png`` (one row of panels per family) and ``spp.csv`` into --out:

    .venv/bin/python docs/convert/recipe_spp.py [--out docs/convert/ablation]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from recipe_ablation import FAMILIES, RECIPES, TINY_FAMILIES  # the sibling script: one list of families and recipes
from torch import nn

from normfree import signal_propagation, to_normfree
from normfree.models.factory import build_model

INPUT_SHAPE = (16, 1, 32, 32)
NO_RESIDUAL_BLOCKS = {"torchvision:vgg11_bn": nn.ReLU}  # family: the modules whose outputs are recorded instead
COLUMNS = ("family", "model", "block", "name", "transition", "squared_mean", "variance", "residual_variance")


def family_models(arch: str) -> dict[str, nn.Module]:
    """{label: model} for `arch`: BatchNorm, then one conversion per recipe, all from one initialisation (seed 0)."""
    torch.manual_seed(0)
    bn = build_model(arch, 10, INPUT_SHAPE[1])
    models = {"BatchNorm": bn}
    for recipe, (alpha, skipinit, _) in RECIPES.items():
        models[f"converted, {recipe}"] = to_normfree(bn, alpha=alpha, skipinit=skipinit)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "ablation"))
    parser.add_argument("--tiny", action="store_true", help="one family (the test suite's)")
    args = parser.parse_args()
    families = TINY_FAMILIES if args.tiny else FAMILIES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.4 * len(families)))
    axes = fig.subplots(len(families), 3, squeeze=False)
    rows = []
    for arch, panels in zip(families, axes):
        blocks = NO_RESIDUAL_BLOCKS.get(arch)
        results = [signal_propagation(model, input_shape=INPUT_SHAPE, blocks=blocks, label=label)
                   for label, model in family_models(arch).items()]
        results[0].plot(*results[1:], ax=panels)
        for panel in panels:
            panel.set_title(f"{arch}: {panel.get_title()}", fontsize=9)
        if blocks is not None:
            panels[0].set_xlabel(f"{blocks.__name__} (no residual blocks)")
            panels[1].set_xlabel(f"{blocks.__name__} (no residual blocks)")
            panels[2].set_visible(False)
        for result in results:
            rows += [[arch, result.label, row.index, row.name, row.transition, row.squared_mean, row.variance,
                      "" if blocks is not None else row.residual_variance] for row in result]
        last = "; ".join(f"{r.label} {r.rows[-1].variance:.3g}" for r in results)
        print(f"{arch}: variance after the last block: {last}", flush=True)
    fig.suptitle(f"signal propagation at initialisation, N(0, 1) noise {'x'.join(map(str, INPUT_SHAPE))}")
    fig.tight_layout()
    fig.savefig(out / "spp.png", dpi=90)
    with open(out / "spp.csv", "w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows([COLUMNS, *rows])
    print(f"wrote {out / 'spp.png'} and {out / 'spp.csv'}")


if __name__ == "__main__":
    main()
