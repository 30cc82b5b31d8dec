"""`make demo`: train a small normalizer-free network with AGC on the bundled digits, on the CPU.

    python -m normfree.demo [--epochs 4] [--clipping 0.04] [--out demo-output]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from .data import digits_dataloaders


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--clipping", type=float, default=0.04, help="AGC lambda (0.01 is the paper's for batch >= 1024)")
    parser.add_argument("--bs", type=int, default=64, help="batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where the clip-rate plot is written")
    args = parser.parse_args(argv)
    set_seed(args.seed, reproducible=True)
    dls = digits_dataloaders(bs=args.bs, size=32, seed=args.seed)
    # timm's test_nfnet: a 0.19M-parameter NFNet (scaled weight standardisation, SkipInit, no BatchNorm)
    model = timm.create_model("test_nfnet", num_classes=10, in_chans=1)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy).agc(args.clipping)
    print(f"normfree demo: test_nfnet ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on digits "
          f"(1437 train / 360 valid, 32 px), AGC lambda={args.clipping}, {torch.get_num_threads()} CPU threads")
    learn.fit_one_cycle(args.epochs, args.lr)
    final_accuracy = float(learn.recorder.values[-1][2])
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "agc_clip_rates.png"
    learn.adaptive_clip.plot().savefig(plot_path, dpi=110)
    print(f"\nvalidation accuracy after {args.epochs} epochs: {final_accuracy:.1%}")
    print(f"units clipped by AGC over the last epoch: {learn.adaptive_clip.history.rate(slice(learn.adaptive_clip.epoch_start, None)):.1%}"
          f"; per-layer clip rates: {plot_path}")
    return final_accuracy


if __name__ == "__main__":
    main()
