"""Measured example: resnet18 with BatchNorm vs resnet18 converted by `normfree.to_normfree` (+ AGC) on Fashion-MNIST.

The same budget for every run (epochs, batch size, peak lr, data), 3 seeds, one CPU core:

    OMP_NUM_THREADS=1 python docs/convert/convert_fashion_mnist.py [--data fashion-mnist:DIR] [--out DIR]

It runs `normfree compare` with the methods bn, converted and converted-agc on timm's ``resnet18``
(the torchvision ResNet-18 architecture: BasicBlock, depths 2-2-2-2) and writes the report into
``--out`` and the summary into docs/convert/results.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import normfree
from normfree.app.compare import METHODS
from normfree.models.convert import DEFAULT_ALPHA, DEFAULT_SKIPINIT

HERE = Path(__file__).resolve().parent
SETTINGS = dict(arch="resnet18", methods=("bn", "converted", "converted-agc"), batch_sizes=(64,), accumulate=False,
                seeds=(0, 1, 2), epochs=4, lrs=(3e-3,), agc=0.04, size=28, limit=2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist:/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="convert-fashion-mnist")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = normfree.compare(data=args.data, out=args.out, device="cpu", **SETTINGS)
    minutes = (time.perf_counter() - start) / 60
    by_method: dict[str, list[float]] = {}
    for run in result.runs:
        by_method.setdefault(run.method, []).append(run.final_accuracy)
    lines = ["# resnet18: BatchNorm vs converted to normalizer-free (normfree.to_normfree), Fashion-MNIST", "",
             f"Command: `OMP_NUM_THREADS=1 python docs/convert/convert_fashion_mnist.py` ({minutes:.1f} min on one "
             f"CPU core, torch {torch.__version__}).", "",
             f"Settings (the same for every run): timm resnet18 from scratch (the torchvision ResNet-18 "
             f"architecture), the first {SETTINGS['limit']} training and {SETTINGS['limit']} test images of "
             f"Fashion-MNIST at {SETTINGS['size']} px, batch {SETTINGS['batch_sizes'][0]}, {SETTINGS['epochs']} "
             f"epochs of one-cycle Adam at peak lr {SETTINGS['lrs'][0]:g}, "
             f"seeds {', '.join(map(str, SETTINGS['seeds']))}; "
             f"converted = to_normfree defaults (alpha {DEFAULT_ALPHA}, "
             f"{'SkipInit gains at 0' if DEFAULT_SKIPINIT else 'no SkipInit'}, Scaled WS with ReLU's gamma); "
             f"AGC lambda {SETTINGS['agc']} (classifier excluded).", "",
             "| method | final test accuracy (%) per seed | mean +- std (%) |", "|---|---|---|"]
    means = {}
    for method, values in by_method.items():
        tensor = torch.tensor(values) * 100
        means[method] = float(tensor.mean())
        lines.append(f"| {method} | {', '.join(f'{v:.1f}' for v in tensor.tolist())} | {tensor.mean():.1f} +- "
                     f"{tensor.std():.1f} |")
    bn = means.get(METHODS["bn"])
    if bn is not None:
        lines += ["", "Gap to BatchNorm (mean over seeds): " + "; ".join(
            f"{m}: {v - bn:+.1f} points" for m, v in means.items() if m != METHODS["bn"]) + "."]
    lines += ["", "Summary table from normfree compare:", "", result.table, ""]
    (HERE / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
