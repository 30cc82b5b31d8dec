"""Which `to_normfree` recipe holds for users' models: BatchNorm against converted + AGC on five families.

For each family (torchvision resnet18 and resnet50, timm resnet26d, fastai xresnet18, torchvision vgg11_bn: a plain
VGG-style CNN), `normfree compare` trains the BatchNorm model and its conversions by `to_normfree` (mode nf) + AGC
under two recipes for the NF residual blocks, each method with its own peak lr chosen on a hold-out of the training
images:

- papers: alpha 0.2, SkipInit (each branch starts switched off): the NF-ResNet papers' settings;
- open: alpha 0.5, no SkipInit (branches at full strength from the start): normfree's small twins' recipe
  (docs/recipe).

Fashion-MNIST at 32 px (vgg11_bn's five poolings need 32), the first 2000 training and 2000 test images, batch 64,
5 epochs of one-cycle Adam, AGC lambda 0.04 (classifier weight excluded), seeds 0 and 1. One compare folder per
family and recipe under --out, so an interrupted study continues where it stopped (runs are reused):

    .venv/bin/python docs/convert/recipe_ablation.py [--jobs 2] [--out docs/convert/ablation]
    .venv/bin/python docs/convert/recipe_ablation.py --tiny --out /tmp/ablation   # the test suite's settings

It writes ``ablation.md`` in --out: per family the final test accuracy (mean +- std over seeds) of each method, its
chosen lr, and the gap of each recipe to BatchNorm.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import normfree
from normfree.app.compare import METHODS

FAMILIES = ("torchvision:resnet18", "torchvision:resnet50", "resnet26d", "fastai:xresnet18", "torchvision:vgg11_bn")
RECIPES = {  # name: (alpha, skipinit, what it is)
    "papers": (0.2, True, "alpha 0.2, SkipInit (the NF-ResNet papers')"),
    "open": (0.5, False, "alpha 0.5, no SkipInit (the small twins' recipe)"),
}
SETTINGS = dict(data="fashion-mnist", size=32, limit=2000, batch_sizes=(64,), accumulate=False, seeds=(0, 1),
                epochs=5, lrs=(1e-3, 3e-3, 1e-2), agc=0.04)
TINY = dict(data="digits", size=16, limit=128, batch_sizes=(32,), accumulate=False, seeds=(0,), epochs=1,
            lrs=(1e-3, 1e-2), agc=0.04)
TINY_FAMILIES = ("torchvision:resnet18",)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values) * 100, (statistics.stdev(values) * 100 if len(values) > 1 else 0.0)


def run_family(arch: str, out: Path, settings: dict, jobs: int) -> dict[str, tuple[float, float, float, list[float]]]:
    """{row label: (mean %, std %, lr, per-seed %)} for BatchNorm and each recipe's converted + AGC on `arch`."""
    rows = {}
    for index, (recipe, (alpha, skipinit, _)) in enumerate(RECIPES.items()):
        methods = ("bn", "converted-agc") if index == 0 else ("converted-agc",)  # BatchNorm trained once
        result = normfree.compare(arch=arch, methods=methods, alpha=alpha, skipinit=skipinit, jobs=jobs, quiet=True,
                                  out=str(out / arch.replace(":", "-") / recipe), **settings)
        for method in methods:
            runs = [run for run in result.runs if run.method == METHODS[method]]
            label = "BatchNorm" if method == "bn" else f"converted + AGC, {recipe}"
            accuracies = [run.final_accuracy for run in runs]
            rows[label] = (*_mean_std(accuracies), runs[0].lr, [a * 100 for a in accuracies])
    return rows


def write_table(results: dict[str, dict], out: Path, settings: dict, minutes: float, command: str) -> str:
    lines = ["# to_normfree's recipe across five families: BatchNorm vs converted + AGC", "",
             f"Command: `{command}` ({minutes:.0f} min of this invocation; runs found in --out are reused).", "",
             f"Settings: {settings['data']} at {settings['size']} px, the first {settings['limit']} training and "
             f"{settings['limit']} test images, batch {settings['batch_sizes'][0]}, {settings['epochs']} epochs of "
             f"one-cycle Adam, AGC lambda {settings['agc']}, seeds {', '.join(map(str, settings['seeds']))}; each "
             f"method's peak lr chosen from {', '.join(f'{lr:g}' for lr in settings['lrs'])} on a 20% hold-out of "
             f"the training images (first seed). Recipes of the converted models (to_normfree, mode nf): "
             + "; ".join(f"**{name}**: {what}" for name, (_, _, what) in RECIPES.items()) + ".", "",
             "| family | method | final test accuracy (%) | per seed | lr | gap to BatchNorm (points) |",
             "|---|---|---|---|---|---|"]
    for arch, rows in results.items():
        bn = rows["BatchNorm"][0]
        for label, (mean, std, lr, per_seed) in rows.items():
            gap = "" if label == "BatchNorm" else f"{mean - bn:+.1f}"
            lines.append(f"| {arch} | {label} | {mean:.1f} ± {std:.1f} | {', '.join(f'{a:.1f}' for a in per_seed)} "
                         f"| {lr:g} | {gap} |")
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "ablation"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes splitting the CPU cores)")
    parser.add_argument("--tiny", action="store_true", help="tiny settings on digits (the test suite's)")
    parser.add_argument("--families", nargs="+", default=None, help="a subset of the families")
    args = parser.parse_args()
    settings, families = (TINY, TINY_FAMILIES) if args.tiny else (SETTINGS, FAMILIES)
    families = args.families or families
    out = Path(args.out)
    start = time.perf_counter()
    results = {}
    for arch in families:
        results[arch] = run_family(arch, out, settings, args.jobs)
        print(f"{arch}: " + "; ".join(f"{label} {mean:.1f}%" for label, (mean, *_) in results[arch].items()),
              flush=True)
    command = "python docs/convert/recipe_ablation.py" + (" --tiny" if args.tiny else "")
    print(write_table(results, out, settings, (time.perf_counter() - start) / 60, command))


if __name__ == "__main__":
    main()
