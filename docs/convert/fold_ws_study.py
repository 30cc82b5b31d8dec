"""Does Scaled Weight Standardisation on top of a folded BatchNorm model help it fine-tune? The measurement behind
`to_normfree(mode="fold")` keeping plain convolutions.

A BatchNorm resnet18 (timm) is pretrained on Fashion-MNIST classes 0-4, then fine-tuned on a few images of classes
5-9 (fastai's fine_tune: one epoch with the body frozen, then everything at discriminative lrs) as:

- **BatchNorm**: the pretrained model as it is, BatchNorm in train mode (fastai's default);
- **folded + AGC**: `to_normfree(mode="fold")` (the pretrained function kept exactly), AGC lambda 0.04;
- **folded + WS + AGC**: the folded model with every convolution made a Scaled WS convolution (timm's
  ScaledStdConv2d) whose gains are set so that its standardised weight is the folded weight minus its per-channel
  mean, and whose bias absorbs that mean times the convolution's mean input on a calibration batch of target
  training images (so the pretrained function is kept approximately; the relative change of the features the
  classifier reads, ||change|| / ||features||, is reported); AGC lambda 0.04.

Each method's peak lr is chosen from LRS on a 20% hold-out of the target training images (seed 0); then seeds 0-2
train with it and are validated on every test image of classes 5-9. Run folders and results go to --out; finished
runs are skipped when the script is run again.

    .venv/bin/python docs/convert/fold_ws_study.py [--out docs/convert/fold-ws]
    .venv/bin/python docs/convert/fold_ws_study.py --tiny --out /tmp/fold-ws     # the test suite's settings
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from timm.layers import ScaledStdConv2d
from torch import nn

import normfree
from normfree.app.config import TrainConfig
from normfree.app.train import OUTPUT_FILES, build_dataloaders
from normfree.models.classifier import find_classifier, init_classifier_
from normfree.models.fusion import replace_submodule

SETTINGS = dict(data="fashion-mnist", arch="resnet18", size=32, limit=10000, source_classes=(0, 1, 2, 3, 4),
                target_classes=(5, 6, 7, 8, 9), source_epochs=4, source_lr=3e-3, targets=((20, 4),),
                epochs=8, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), agc=0.04)
TINY = dict(data="digits", arch="resnet18", size=16, limit=None, source_classes=(0, 1, 2, 3, 4),
            target_classes=(5, 6, 7, 8, 9), source_epochs=1, source_lr=3e-3, targets=((10, 8),), epochs=2,
            lrs=(1e-3, 3e-3), seeds=(0,), agc=0.04)
METHODS = {"bn": "BatchNorm", "folded-agc": "folded + AGC", "folded-ws-agc": "folded + WS + AGC"}


def calibrated_standardisation(model: nn.Module, images: torch.Tensor) -> float:
    """Every nn.Conv2d of folded `model` replaced (in place) by a ScaledStdConv2d computing approximately the same:
    gain_c = sqrt(var_c + eps) / scale so that the standardised weight is W_c - mean(W_c), and
    b'_c = b_c + mean(W_c) * E[conv(x, ones)_c] over `images` (the dropped mean's average contribution).
    Returns the relative change of the features the classifier reads on `images` (||change|| / ||features||, over
    the batch): the classifier is new, so the body's output is what pretraining left."""
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    convs = {name: m for name, m in model.named_modules() if type(m) is nn.Conv2d}
    hooks = [conv.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args[0]))
             for name, conv in convs.items()]
    classifier = find_classifier(model)
    features = []
    hooks.append(classifier.register_forward_pre_hook(lambda _, args: features.append(args[0])))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    before = features.pop()
    feature_hook = classifier.register_forward_pre_hook(lambda _, args: features.append(args[0]))
    for name, conv in convs.items():
        weight = conv.weight.detach()
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        ones = F.conv2d(inputs[name], torch.ones_like(weight), None, conv.stride, conv.padding, conv.dilation,
                        conv.groups)
        ws = ScaledStdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, bias=True, gamma=1.0, eps=1e-5)
        with torch.no_grad():
            ws.weight.copy_(weight)
            std = (weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + ws.eps).sqrt()
            ws.gain.copy_(std / ws.scale)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
            ws.bias.copy_(bias + mean.flatten() * ones.mean(dim=(0, 2, 3)))
        replace_submodule(model, name, ws)
    with torch.no_grad():
        model(images)
    feature_hook.remove()
    return float((features.pop() - before).norm() / before.norm())


def pretrain(settings: dict, out: Path) -> Path:
    folder = out / "pretrain"
    weights = folder / OUTPUT_FILES["weights"]
    if not (folder / OUTPUT_FILES["result"]).exists():
        normfree.train(data=settings["data"], arch=settings["arch"], size=settings["size"], limit=settings["limit"],
                       classes=settings["source_classes"], epochs=settings["source_epochs"],
                       lr=settings["source_lr"], agc=None, bs=64, quiet=True, overwrite=True, out=folder)
    return weights


def target_run(settings: dict, weights: Path, method: str, per_class: int, bs: int, lr: float, seed: int,
               holdout: bool) -> dict:
    """Fine-tune one model; returns its final accuracy (and the calibration's feature change for WS)."""
    config = TrainConfig(data=settings["data"], arch=settings["arch"], size=settings["size"], limit=settings["limit"],
                         classes=settings["target_classes"], per_class=per_class, holdout=holdout, bs=bs, seed=seed)
    dls = build_dataloaders(config)
    set_seed(seed, reproducible=True)
    learn = normfree.nf_learner(dls, settings["arch"], weights=weights, convert="fold" if method != "bn" else None,
                                agc=None if method == "bn" else settings["agc"], metrics=accuracy)
    init_classifier_(find_classifier(learn.model))  # five new classes: a new classifier
    record: dict = {}
    if method == "folded-ws-agc":
        record["feature_change"] = calibrated_standardisation(learn.model, dls.one_batch()[0])
        learn.model.train()
        learn.opt = None  # the parameters changed: fastai builds the optimizer again
        learn.freeze()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(settings["epochs"] - 1, lr, freeze_epochs=1)
    record["accuracy"] = float(learn.recorder.values[-1][2])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "fold-ws"))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    settings, out = (TINY if args.tiny else SETTINGS), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    start = time.perf_counter()
    weights = pretrain(settings, out)
    source = json.loads((out / "pretrain" / OUTPUT_FILES["result"]).read_text())["epochs"][-1]["accuracy"]

    def cached(key: str, *run) -> dict:
        if key not in results:
            results[key] = target_run(settings, weights, *run)
            results_file.write_text(json.dumps(results, indent=1))
            print(key, results[key], flush=True)
        return results[key]

    rows = []
    for per_class, bs in settings["targets"]:
        for method, label in METHODS.items():
            sweep = {lr: cached(f"sweep {method} n{per_class} bs{bs} lr{lr:g}", method, per_class, bs, lr,
                                settings["seeds"][0], True)["accuracy"] for lr in settings["lrs"]}
            best = max(sweep, key=sweep.get)
            runs = [cached(f"{method} n{per_class} bs{bs} seed{seed}", method, per_class, bs, best, seed, False)
                    for seed in settings["seeds"]]
            accuracies = [run["accuracy"] * 100 for run in runs]
            change = max((run.get("feature_change", 0.0) for run in runs), default=0.0)
            rows.append(f"| {per_class} per class, bs {bs} | {label} | {statistics.mean(accuracies):.1f} ± "
                        f"{statistics.stdev(accuracies) if len(accuracies) > 1 else 0:.1f} | "
                        f"{', '.join(f'{a:.1f}' for a in accuracies)} | {best:g} | "
                        + (f"{change:.2g}" if method == "folded-ws-agc" else "") + " |")
    text = "\n".join([
        "# Scaled WS on top of a folded model: does it help fine-tuning?", "",
        f"Command: `python docs/convert/fold_ws_study.py{' --tiny' if args.tiny else ''}` "
        f"({(time.perf_counter() - start) / 60:.0f} min of this invocation; finished runs are reused).", "",
        f"Source: {settings['arch']} with BatchNorm pretrained on {settings['data']} classes "
        f"{', '.join(map(str, settings['source_classes']))} ({settings['size']} px, "
        + (f"first {settings['limit']} images of each split, " if settings["limit"] else "")
        + f"{settings['source_epochs']} epochs, batch 64, Adam lr {settings['source_lr']:g}): source "
        f"accuracy {source * 100:.1f}%. Target: classes {', '.join(map(str, settings['target_classes']))}, "
        f"fastai fine_tune (1 frozen epoch + {settings['epochs'] - 1}), lr from "
        f"{', '.join(f'{lr:g}' for lr in settings['lrs'])} chosen on a 20% hold-out of the target training images "
        f"(seed {settings['seeds'][0]}); AGC lambda {settings['agc']}; accuracy on every test image of the target "
        f"classes.", "",
        "| target | method | final accuracy (%) | per seed | lr "
        "| WS calibration: relative feature change (norm of the change / norm of the features) |",
        "|---|---|---|---|---|---|", *rows, ""])
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
