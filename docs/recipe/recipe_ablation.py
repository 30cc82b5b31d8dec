"""What makes the small NF ResNet learn slowly on digits: the ablation behind normfree's recipe.

Each row trains nf_resnet_tiny (or its BatchNorm twin) on scikit-learn's digits at 32 px, batch 64, 5 epochs of
fastai's one-cycle at peak lr 1e-2 with Adam (the defaults of `normfree train --data digits`), changing one or
more of: SkipInit (branches starting switched off), alpha, the classifier's init std, AGC's lambda, the
optimizer and lr. It writes ``ablation.md`` beside this file (final validation accuracy per seed).

    .venv/bin/python docs/recipe/recipe_ablation.py      # 34 runs, about 10 minutes on 2 cores
"""
from __future__ import annotations

import sys
from pathlib import Path

from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

from normfree.data import digits_dataloaders
from normfree.learner.optim import opt_func
from normfree.models import body_head_splitter, init_classifier_
from normfree.models.small_resnets import FAMILY, SmallResNet

OLD = dict(skipinit=True, alpha=0.2, classifier_std=0.01, agc=0.01)  # the defaults before the recipe
NEW = dict(skipinit=False, alpha=0.5, classifier_std=0.1, agc=0.04)  # the recipe
ROWS = [  # (label, model/training settings, seeds)
    ("old defaults: SkipInit 0, alpha 0.2, classifier N(0, 0.01), lambda 0.01", OLD, (0, 1)),
    ("old, without AGC", {**OLD, "agc": None}, (0,)),
    ("old, lambda 0.04", {**OLD, "agc": 0.04}, (0,)),
    ("old, lr 3e-3", {**OLD, "lr": 3e-3}, (0,)),
    ("old, lr 3e-2", {**OLD, "lr": 3e-2}, (0,)),
    ("old, SGD Nesterov lr 0.4", {**OLD, "opt": "sgd", "lr": 0.4}, (0,)),
    ("old, classifier N(0, 0.1)", {**OLD, "classifier_std": 0.1}, (0,)),
    ("branches open at init (no SkipInit)", {**OLD, "skipinit": False}, (0,)),
    ("... and alpha 0.5", {**OLD, "skipinit": False, "alpha": 0.5}, (0,)),
    ("... and alpha 1.0 instead", {**OLD, "skipinit": False, "alpha": 1.0}, (0,)),
    ("... and alpha 0.5, lambda 0.04", {**OLD, "skipinit": False, "alpha": 0.5, "agc": 0.04}, (0, 1)),
    ("recipe: no SkipInit, alpha 0.5, classifier N(0, 0.1), lambda 0.04", NEW, (0, 1, 2)),
    ("recipe with lambda 0.01", {**NEW, "agc": 0.01}, (0, 1, 2)),
    ("recipe with alpha 0.2", {**NEW, "alpha": 0.2}, (0, 1)),
    ("recipe with SkipInit", {**NEW, "skipinit": True}, (0, 1)),
    ("BatchNorm twin, classifier N(0, 0.01)", {"batchnorm": True, "classifier_std": 0.01}, (0, 1)),
    ("BatchNorm twin, classifier N(0, 0.1) (the recipe's head)", {"batchnorm": True, "classifier_std": 0.1}, (0, 1, 2)),
]


def final_accuracy(settings: dict, seed: int) -> float:
    set_seed(seed, reproducible=True)
    dls = digits_dataloaders(bs=64, size=32, seed=seed)
    depths, widths = FAMILY["tiny"]
    if settings.get("batchnorm"):
        model = SmallResNet(depths, widths, normalization="batchnorm")
    else:
        model = SmallResNet(depths, widths, skipinit=settings["skipinit"], alpha=settings["alpha"])
    init_classifier_(model.head.fc, settings["classifier_std"])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    splitter=body_head_splitter, opt_func=opt_func(settings.get("opt", "adam")))
    if settings.get("agc") is not None:
        learn.agc(settings["agc"])
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(5, settings.get("lr", 1e-2))
    return float(learn.recorder.values[-1][2])


def main() -> int:
    lines = ["| setting | final validation accuracy (%) per seed |", "|---|---|"]
    for label, settings, seeds in ROWS:
        accuracies = [final_accuracy(settings, seed) for seed in seeds]
        lines.append(f"| {label} | {' / '.join(f'{100 * a:.1f}' for a in accuracies)} |")
        print(lines[-1], flush=True)
    (Path(__file__).parent / "ablation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
