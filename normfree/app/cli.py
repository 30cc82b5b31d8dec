"""The ``normfree`` command: ``normfree train ...``, ``normfree compare ...``, ``normfree compare --transfer
...`` and ``normfree spp ...``, a thin layer over `normfree.train`, `normfree.compare`,
`normfree.compare_transfer` and `normfree.write_spp`.

``compare --transfer`` has its own parser (its own options and defaults: Fashion-MNIST, batch sizes 8
and 32, ...); `main` hands it the arguments whenever ``--transfer`` follows ``compare``.

Exit status: 0 done; 2 bad input, reported as ``normfree train: error: --OPTION: what is wrong and
what would work`` with no traceback, before anything is trained or written; 1 a run that diverged
(its training loss stopped being finite: lower --lr); 130 Ctrl-C and 143 SIGTERM (what ``timeout``
and job schedulers send), each after saving the checkpoint of the run it stopped; 74 (sysexits' EX_IOERR) a file
that could not be written (a full disk, a read-only folder), reported as ``normfree train: error: cannot write
PATH: [Errno 28] No space left on device; ...`` with how to go on: the run stops there, its folder stays marked
incomplete, and the checkpoint of its last finished epoch, if any, is kept for ``--resume``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from ..data.registry import data_spec_help, limited_kinds, size_help
from ..learner.checkpoint import CHECKPOINT
from ..learner.optim import OPTIMIZERS
from ..models.convert import CONVERSION_MODES
from ..models.propagation import DEFAULT_BATCH
from ..models.weights import WEIGHT_FILES
from ..utils.errors import WriteError
from ..utils.outdir import INCOMPLETE
from . import distributed, startup
from .compare import BUDGETS, CONVERTED_METHODS, DEFAULT_METHODS, METHODS, CompareConfig, compare, write_plan
from .config import AGC_AUTO, ConfigError, TrainConfig
from .signals import exit_status, how_stopped, sigterm_as_interrupt
from .spp import DEFAULT_NOISE_SIZE, SPP_FILES, write_spp
from .train import resume, train
from .transfer import MODES, OWN_ARCH_METHODS, TRANSFER_METHODS, TWIN_METHODS, TransferConfig, compare_transfer

__all__ = ["build_parser", "main"]

_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_COMPARE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CompareConfig)}
_TRANSFER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TransferConfig)}
_TRANSFER = "compare --transfer"  # the command name `main` and `_run` dispatch on
# Command-line spelling of the settings whose flag is not simply --name-with-dashes.
_FLAGS = {"precision": "--fp16/--bf16", "accumulate": "--no-accum", "agc": "--agc/--no-agc",
          "skipinit": "--skipinit/--no-skipinit", "fast_nf": "--no-fast-nf"}
# not settings of the run or grid itself
_RUN_OPTIONS = ("command", "config", "quiet", "overwrite", "resume", "jobs", "devices", "plan", "report")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" unless the help already says what the default is; keeps the line
    breaks of descriptions and examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def _agc_lambda(text: str) -> float | str:
    """--agc's value: a number, or auto (argparse names the option in its error)."""
    if text == AGC_AUTO:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number such as 0.04, or {AGC_AUTO}, not {text!r}") from None


def _add_precision(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fp16", dest="precision", action="store_const", const="fp16", default=argparse.SUPPRESS,
                       help="float16 mixed precision with a gradient scaler, on any device (default: float32)")
    group.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default=argparse.SUPPRESS,
                       help="bfloat16 mixed precision, on any device (default: float32)")
    parser.set_defaults(precision="fp32")


def _add_data_and_model(parser: argparse.ArgumentParser, defaults: dict, arch_help: str) -> None:
    parser.add_argument("--data", default=defaults["data"], help=data_spec_help())
    parser.add_argument("--arch", default=defaults["arch"], help=arch_help)
    parser.add_argument("--epochs", type=int, default=defaults["epochs"], help="training epochs")
    own_size = f" (default: the data's own: {size_help()})"
    parser.add_argument("--size", type=int, default=defaults["size"], metavar="PX",
                        help="image size in pixels" + (own_size if defaults["size"] is None else ""))
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help=f"use only the first N images of each split, for quick runs ({limited_kinds()}; "
                             f"default: all)")
    parser.add_argument("--valid-pct", type=float, default=defaults["valid_pct"],
                        help="fraction held out for validation where the data has no validation split "
                             "(digits, folders, CSVs), and by --holdout")


def _add_optimizer(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--opt", choices=list(OPTIMIZERS), default=defaults["opt"],
                        help="optimizer: fastai's Adam, or SGD with Nesterov momentum 0.9 (the NFNet papers'); both "
                             "with fastai's decoupled weight decay")


def _add_fast_nf(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--no-fast-nf", dest="fast_nf", action="store_false", default=defaults["fast_nf"],
                        help="run timm's NF blocks as timm writes them (default: their scalars folded into the "
                             "weight-standardised convolutions, normfree.fast_nf: the same function, fewer passes; not "
                             "with --per-sample)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_precision(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results already in --out instead of stopping (train) or reusing them "
                             "(compare)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")


def _train_parser(subparsers) -> argparse.ArgumentParser:
    d = _TRAIN_DEFAULTS
    parser = subparsers.add_parser(
        "train", formatter_class=_HelpFormatter, help="train one model; every output goes into --out",
        description="Train one model on one data set and write its metrics (CSV), curves and AGC clip-rate\n"
                    "plots (PNG), weights, exported learner and resolved config (JSON) into --out.",
        epilog="examples:\n  normfree train --data digits --arch nf_resnet_tiny --agc 0.04 --epochs 5 --out runs/nf\n"
               "  normfree train --data fashion-mnist --arch bn_resnet_small --no-agc --bs 32 --accum 8 --out runs/bn\n"
               "  normfree train --config runs/nf/config.json --seed 1 --out runs/nf-seed1   # repeat, one change\n"
               "  normfree train --resume runs/nf   # continue a run stopped by Ctrl-C, SIGTERM or a kill",
    )
    parser.add_argument("--config", metavar="JSON", default=None,
                        help="start from a run's config.json (repeat it); options given here override it "
                             "(default: none)")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the unfinished run in DIR (stopped by Ctrl-C, SIGTERM or a kill) from its last "
                             "finished epoch, with its own settings; it ends with the metrics of an uninterrupted run "
                             "(default: none)")
    _add_data_and_model(parser, d, "any timm model: an NF family (nfnet_f0, nf_resnet26, test_nfnet, ...), the "
                                   "small nf_resnet_tiny/small/base, their BatchNorm twins bn_resnet_*, or e.g. "
                                   "resnet18; or torchvision:NAME, fastai:NAME (torchvision:resnet50, "
                                   "fastai:xresnet18)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true", help="start from timm's hub weights (needs the network)")
    start.add_argument("--weights", metavar="PATH", default=None,
                       help=f"start from a local weights file: {WEIGHT_FILES} (default: none, random initialisation)")
    clipping = parser.add_mutually_exclusive_group()
    clipping.add_argument("--agc", type=_agc_lambda, default=d["agc"], metavar="LAMBDA",
                          help=f"Adaptive Gradient Clipping's lambda (the paper's 0.01 is for batches >= 1024), or "
                               f"{AGC_AUTO}: chosen by learn.agc_find() at the run's peak lr before training")
    clipping.add_argument("--no-agc", dest="agc", action="store_const", const=None, default=argparse.SUPPRESS,
                          help="train without AGC (default: with AGC)")
    parser.add_argument("--per-sample", action="store_true",
                        help="clip each example's gradient (per-sample AGC; normalizer-free models only)")
    parser.add_argument("--skipinit", action=argparse.BooleanOptionalAction, default=d["skipinit"],
                        help="NF residual blocks (small NF ResNets, --to-normfree nf): start each residual branch "
                             "switched off (SkipInit's zero gain) or, with --no-skipinit, at full strength (default: "
                             "the model's own or to_normfree's)")
    parser.add_argument("--alpha", type=float, default=d["alpha"],
                        help="NF residual blocks (small NF ResNets, --to-normfree nf): alpha of h + alpha * f(h / "
                             "beta) (default: the model's own or to_normfree's)")
    parser.add_argument("--to-normfree", nargs="?", const="nf", choices=list(CONVERSION_MODES),
                        default=d["to_normfree"], metavar="MODE",
                        help="make a BatchNorm --arch (e.g. resnet18) normalizer-free with normfree.to_normfree; MODE "
                             + "; ".join(f"{name}: {what}" for name, what in CONVERSION_MODES.items())
                             + " (default: no conversion; --to-normfree alone: nf)")
    parser.add_argument("--new-head", action="store_true",
                        help="with --weights/--pretrained: a freshly initialised classifier even when the class count "
                             "matches (a new task)")
    parser.add_argument("--bs", type=int, default=d["bs"], help="batch size of one forward/backward pass")
    parser.add_argument("--accum", type=int, default=d["accum"], metavar="K",
                        help="accumulate K batches per optimizer step (fastai GradientAccumulation): "
                             "an effective batch of bs*K")
    _add_optimizer(parser, d)
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="a budget of N optimizer steps instead of --epochs (the last epoch is partial; "
                             "default: none, train --epochs)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate of the one-cycle schedule")
    rate.add_argument("--lr-find", action="store_true", help="use fastai's lr_find() valley suggestion instead of --lr")
    parser.add_argument("--fine-tune", action="store_true",
                        help="fastai's transfer-learning schedule: --freeze-epochs with the body frozen, then --epochs "
                             "with everything (use with --pretrained/--weights, which otherwise train only the head)")
    parser.add_argument("--freeze-epochs", type=int, default=d["freeze_epochs"], help="frozen epochs of --fine-tune")
    parser.add_argument("--freeze-batchnorm", action="store_true",
                        help="keep every BatchNorm layer as it starts (e.g. from --weights): eval mode, running "
                             "statistics never updated, weight and bias not trained (the detection libraries' "
                             "FrozenBatchNorm)")
    _add_fast_nf(parser, d)
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="random seed: initialisation, batch order and the validation split; same seed, "
                             "same metrics")
    parser.add_argument("--holdout", action="store_true",
                        help="validate on --valid-pct of the training images instead of the validation split, which "
                             "is then never seen (for tuning; in-memory data)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, metavar="LABEL",
                        help="keep only these class labels, renumbered 0..k-1 (in-memory data; default: all)")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="at most N training images of each class, drawn with --seed (in-memory data; "
                             "default: all)")
    parser.add_argument("--path-col", default=d["path_col"], help="CSV data: column of image paths")
    parser.add_argument("--label-col", default=d["label_col"], help="CSV data: column of labels")
    parser.add_argument("--out", default=d["out"], metavar="DIR", help="folder for every output file")
    _add_run_options(parser)
    return parser


def _compare_parser(subparsers) -> argparse.ArgumentParser:
    d = _COMPARE_DEFAULTS
    parser = subparsers.add_parser(
        "compare", formatter_class=_HelpFormatter,
        help="BatchNorm vs normalizer-free (no AGC, AGC, per-sample AGC) over batch sizes and seeds, with a report",
        description="Train a grid (methods x batch sizes x {plain, accumulated to the largest batch} x seeds)\n"
                    "with the same budget and write a report (Markdown and self-contained HTML) into --out.\n"
                    "Runs already in --out are reused, so an interrupted grid continues.\n"
                    "With no options: a quick grid on digits.",
        epilog="examples:\n  normfree compare                       # the quick digits grid (make demo)\n"
               "  normfree compare --data fashion-mnist --size 28 --epochs 10 --seeds 0 1 2 --out fmnist\n"
               "  normfree compare --jobs 2 --out grid                 # two runs at once, the cores split\n"
               "  normfree compare --devices cuda:0 cuda:1 --out grid  # one run per GPU\n"
               "  normfree compare --out grid --plan grid.txt          # one normfree train command a line, e.g. for\n"
               "  sbatch --array=1-$(wc -l < grid.txt) ...             #   a SLURM array: sed -n ${SLURM_ARRAY_TASK_ID}p\n"
               "  normfree compare --out grid --report                 # then the report from their folders",
    )
    _add_data_and_model(parser, d, "either twin of a small ResNet: nf_resnet_tiny/small/base or "
                                   "bn_resnet_tiny/small/base; or your own BatchNorm timm arch (e.g. resnet18), "
                                   "compared with its conversion (methods bn, converted, converted-agc; folded and "
                                   "folded-agc by --methods)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                        help=f"methods to train, from {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)}; "
                             f"{' '.join(CONVERTED_METHODS)} for an arch other than the small ResNets)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(d["batch_sizes"]), metavar="BS",
                        help="batch sizes of one forward/backward pass (default: "
                             f"{' '.join(map(str, d['batch_sizes']))})")
    parser.add_argument("--no-accum", dest="accumulate", action="store_false",
                        help="skip the gradient-accumulation runs (default: each smaller batch size also accumulates "
                             "up to the largest)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d["seeds"]), metavar="SEED",
                        help=f"seeds (default: {' '.join(map(str, d['seeds']))})")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(d["lrs"]), metavar="LR",
                        help="peak learning rates of the one-cycle schedule: with several, each method and batch "
                             "setting is trained once per lr (first seed) on a hold-out of the training images and "
                             "every seed then trains with the best; one value: that lr for every run (default: "
                             f"{' '.join(f'{lr:g}' for lr in d['lrs'])})")
    _add_optimizer(parser, d)
    parser.add_argument("--budget", choices=list(BUDGETS), default=d["budget"],
                        help="the same number of epochs for every run, or the same number of optimizer steps")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="with --budget steps: N optimizer steps per run (default: as many as the largest batch "
                             "makes in --epochs epochs)")
    parser.add_argument("--agc", type=_agc_lambda, default=d["agc"], metavar="LAMBDA",
                        help=f"lambda of the AGC methods, or {AGC_AUTO}: chosen by learn.agc_find() in each run")
    parser.add_argument("--alpha", type=float, default=d["alpha"],
                        help="alpha of the NF residual blocks (methods nf*, converted*) (default: each model's own)")
    parser.add_argument("--skipinit", action=argparse.BooleanOptionalAction, default=d["skipinit"],
                        help="start the NF residual blocks' branches switched off (SkipInit) or, with --no-skipinit, "
                             "at full strength (methods nf*, converted*) (default: each model's own)")
    _add_fast_nf(parser, d)
    parser.add_argument("--out", default=d["out"], metavar="DIR", help="folder for the runs and the report")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="train up to N runs at once, in processes that split the CPU cores (the same results "
                             "as one at a time)")
    parser.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                        help="one worker per device (cuda:0 cuda:1 ...), each run on its worker's device; --jobs "
                             "defaults to their count (default: none)")
    elsewhere = parser.add_mutually_exclusive_group()
    elsewhere.add_argument("--plan", metavar="FILE", default=None,
                           help="train nothing: write one normfree train command per run still to train into FILE, "
                                "one a line, for a job array or shell loop (with several --lrs: the sweep first, "
                                "then the grid once the sweep is done) (default: none)")
    elsewhere.add_argument("--report", action="store_true",
                           help="train nothing: build the report from the run folders in --out (after --plan's "
                                "commands); refused, listing them, while runs are missing or unfinished")
    _add_run_options(parser)
    return parser


def _spp_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "spp", formatter_class=_HelpFormatter,
        help="signal propagation plots: mean and variance at every residual block, several models overlaid",
        description="Signal propagation plots (Brock, De & Smith 2021, arXiv 2101.08692): run each model once on\n"
                    "N(0, 1) noise (or one training batch of --data) and record, at every residual block, the\n"
                    "average channel squared mean, the average channel variance and the residual branch's\n"
                    f"average channel variance. Writes {SPP_FILES['png']} and {SPP_FILES['csv']} into --out.",
        epilog="examples:\n  normfree spp --arch nf_resnet_small bn_resnet_small resnet18 --size 64 --out spp\n"
               "  normfree spp --arch nf_resnet_tiny --weights runs/nf/model.safetensors --data digits --out spp-trained",
    )
    parser.add_argument("--arch", nargs="+", required=True, metavar="ARCH",
                        help="timm names: normfree's nf_/bn_resnet_tiny/small/base, NF models (nf_resnet26, "
                             "nfnet_f0, ...), BatchNorm ResNets (resnet18, ...) (default: none, required)")
    parser.add_argument("--weights", nargs="+", default=None, metavar="FILE",
                        help="trained weights, one file per --arch in the same order ('none' for an arch left at "
                             "its initialisation) (default: none, every model at initialisation)")
    parser.add_argument("--data", default=None,
                        help=f"use one training batch of this data instead of noise: {data_spec_help()} "
                             "(default: none, N(0, 1) noise)")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help=f"image size in pixels (default: {DEFAULT_NOISE_SIZE} for noise, the data's own "
                             "with --data)")
    parser.add_argument("--bs", type=int, default=DEFAULT_BATCH, help="images in the batch")
    parser.add_argument("--channels", type=int, default=3,
                        help="channels of the noise images (with --data: the data's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the models' initialisation and the noise")
    parser.add_argument("--running-stats", action="store_true",
                        help="BatchNorm layers normalise with their running averages, as at inference of a trained "
                             "model (default: with the batch's own statistics, as in training; at initialisation "
                             "the running averages make every BatchNorm an identity)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--out", default="spp", metavar="DIR", help="folder for spp.png and spp.csv")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    return parser


def _whole_list(parser: argparse.ArgumentParser, flag: str, default: tuple[int, ...], metavar: str, what: str) -> None:
    parser.add_argument(flag, type=int, nargs="+", default=list(default), metavar=metavar,
                        help=f"{what} (default: {' '.join(map(str, default))})")


def _transfer_parser() -> argparse.ArgumentParser:
    d = _TRANSFER_DEFAULTS
    parser = argparse.ArgumentParser(
        prog="normfree compare --transfer", formatter_class=_HelpFormatter,
        description="Transfer learning, measured: for each model (a BatchNorm model and its BatchNorm-free\n"
                    "counterparts: the small ResNets' twins, or your BatchNorm arch frozen, folded, converted) and\n"
                    "seed, pretrain on the --source-classes, then train on at most --per-class images of each\n"
                    "--target-classes (fine-tune, linear probe, and from scratch as the reference), every target\n"
                    "run with the same budget and its lr chosen from --lrs on a hold-out of its training images;\n"
                    "report the target accuracy on all validation images of the target classes. Runs already in\n"
                    "--out are reused, so an interrupted grid continues.",
        epilog="examples:\n  normfree compare --transfer                # Fashion-MNIST classes 0-4 -> 5-9\n"
               "  normfree compare --transfer --per-class 10 50 250 --seeds 0 1 2 3 4 --out transfer-5seeds\n"
               "  normfree compare --transfer --arch resnet18 --methods bn bn-frozen folded-agc converted-agc \\\n"
               "      --lrs 1e-4 1e-3 1e-2 --out transfer-resnet18",
    )
    parser.add_argument("--transfer", dest="command", action="store_const", const=_TRANSFER, required=True,
                        default=argparse.SUPPRESS,
                        help="this comparison (instead of compare's batch-size grid)")
    _add_data_and_model(parser, d, "either twin of a small ResNet: nf_resnet_tiny/small/base or "
                                   "bn_resnet_tiny/small/base; or your own BatchNorm arch (resnet18, "
                                   "torchvision:resnet18, fastai:xresnet18)")
    parser.add_argument("--methods", nargs="+", choices=list(TRANSFER_METHODS), default=None,
                        metavar="METHOD", help=f"models, from {', '.join(TRANSFER_METHODS)} (default: "
                                               f"{' '.join(TWIN_METHODS)} with a small ResNet, "
                                               f"{' '.join(OWN_ARCH_METHODS)} with your own arch)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(d["modes"]), metavar="MODE",
                        help=f"target modes, from {', '.join(MODES)} (default: all)")
    _whole_list(parser, "--source-classes", d["source_classes"], "LABEL", "labels of the pretraining task")
    _whole_list(parser, "--target-classes", d["target_classes"], "LABEL", "labels of the target task")
    _whole_list(parser, "--per-class", d["per_class"], "N", "target training images per class, one value per column")
    _whole_list(parser, "--batch-sizes", d["batch_sizes"], "BS", "target batch sizes")
    _whole_list(parser, "--seeds", d["seeds"], "SEED", "seeds")
    parser.add_argument("--source-epochs", type=int, default=d["source_epochs"], help="pretraining epochs")
    parser.add_argument("--source-bs", type=int, default=d["source_bs"], help="pretraining batch size")
    parser.add_argument("--source-lr", type=float, default=d["source_lr"], help="pretraining peak learning rate")
    parser.add_argument("--freeze-epochs", type=int, default=d["freeze_epochs"],
                        help="fine-tune: the first epochs of --epochs, with the body frozen")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(d["lrs"]), metavar="LR",
                        help="peak learning rates of the target runs: with several, each model, mode, --per-class and "
                             "batch size first trains once per lr (first seed) on a hold-out (--valid-pct) of its "
                             "training images, and every seed then trains with the best; one value: that lr for every "
                             f"target run (default: {' '.join(f'{lr:g}' for lr in d['lrs'])})")
    _add_optimizer(parser, d)
    parser.add_argument("--agc", type=float, default=d["agc"], metavar="LAMBDA",
                        help="AGC's lambda of nf-agc and converted-agc (in pretraining and on the target) and of "
                             "folded-agc (on the target)")
    parser.add_argument("--out", default=d["out"], metavar="DIR", help="folder for the runs and the report")
    _add_run_options(parser)
    return parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``normfree`` parser and its command parsers by name (``compare --transfer`` included)."""
    parser = argparse.ArgumentParser(
        prog="normfree", formatter_class=_HelpFormatter,
        description="Normalizer-free networks and Adaptive Gradient Clipping for fastai.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{train,compare,spp}")
    compare_parser = _compare_parser(subparsers)
    compare_parser.add_argument("--transfer", action="store_true", default=argparse.SUPPRESS,
                                help="transfer learning, measured: pretrain, then fine-tune on a few images of other "
                                     "classes; its options: normfree compare --transfer --help")
    return parser, {"train": _train_parser(subparsers), "compare": compare_parser, "spp": _spp_parser(subparsers),
                    _TRANSFER: _transfer_parser()}


def _settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _RUN_OPTIONS}


_DIVERGED = 1  # the exit status of a run whose training loss stopped being finite
_WRITE_FAILED = 74  # a file that could not be written: EX_IOERR of sysexits.h


def _after_write_error(command: str, error: WriteError) -> str:
    """How to go on once the file `error` names can be written again (space freed, the folder writable)."""
    folder = Path(error.filename).parent  # a run writes every file directly into its folder
    if command == "train" and (folder / CHECKPOINT).exists():
        return (f"the checkpoint of the last finished epoch is kept; once it can be written, continue the run with "
                f"{distributed.launcher_prefix()}normfree train --resume {folder}")
    if command == "train" and (folder / INCOMPLETE).exists():
        return "no epoch was checkpointed; once it can be written, train the run again with --overwrite"
    return "once it can be written, run the same command again" + (
        " (the runs finished in --out are reused)" if command.startswith("compare") else "")


def _check_resume_alone(args: argparse.Namespace) -> None:
    """--resume continues a run with its own settings: any other setting given is refused, naming it."""
    given = sorted(_flag(k) for k, v in _settings(args).items() if v != _TRAIN_DEFAULTS[k])
    given += ["--config"] * bool(args.config) + ["--overwrite"] * args.overwrite
    if given:
        raise ConfigError("resume", f"continues the run with the settings it was started with; drop {', '.join(given)} "
                                    f"(to change settings, start a new run with --config DIR/config.json)")


def _run(args: argparse.Namespace) -> int:
    if args.command == "spp":
        write_spp(quiet=args.quiet, **_settings(args))
        return 0
    if args.command == "train":
        if args.resume is not None:
            _check_resume_alone(args)
            result = resume(args.resume, quiet=args.quiet)
        else:
            result = train(quiet=args.quiet, overwrite=args.overwrite, **_settings(args))
        if result.diverged and args.quiet:  # train() said it already unless quiet
            print(f"normfree train: {result.divergence()}", file=sys.stderr)
        return exit_status(result.stopped_by) if result.interrupted else _DIVERGED if result.diverged else 0
    if args.command == _TRANSFER:
        result = compare_transfer(quiet=args.quiet, overwrite=args.overwrite, **_settings(args))
    elif args.plan is not None:
        write_plan(path=args.plan, quiet=args.quiet, **_settings(args))
        return 0
    else:
        result = compare(quiet=args.quiet, overwrite=args.overwrite, jobs=args.jobs, devices=args.devices,
                         report=args.report, **_settings(args))
    return 0 if result.complete else exit_status(result.stopped_by)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``normfree`` with `argv` (default: the process's arguments); returns the exit status.

    Argument errors exit through argparse (SystemExit 2) with the option named. SIGTERM is handled as
    Ctrl-C for the whole command.
    """
    startup.command_started()
    with sigterm_as_interrupt(), distributed.rank0_speaks():  # one voice for a launched run's processes
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser, commands = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    transfer = argv[:1] == ["compare"] and "--transfer" in argv
    args = commands[_TRANSFER].parse_args(argv[1:]) if transfer else parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = commands[args.command]
    if distributed.launched() and args.command != "train":
        command.error(f"runs in one process, not in each of the {distributed.world_size()} a launcher started; only "
                      f"normfree train trains data-parallel under torchrun or accelerate launch ({args.command} "
                      f"--help; compare spreads its runs with --jobs, --devices or --plan)")
    try:
        if getattr(args, "config", None):
            command.set_defaults(**TrainConfig.load(args.config).to_dict())  # the command line still wins
            args = parser.parse_args(argv)
        return _run(args)
    except ConfigError as error:
        with distributed.speaking_for(error):  # a process of a launched run that alone saw this error
            command.error(f"{_flag(error.option)}: {error.message}")
    except WriteError as error:  # the run stopped there; what it had written before is whole
        print(f"{command.prog}: error: {error}; {_after_write_error(args.command, error)}", file=sys.stderr)
        return _WRITE_FAILED
    except KeyboardInterrupt as error:  # outside a fit (those are checkpointed and return): starting, saving
        how = how_stopped(error)
        where = getattr(error, "normfree_note", "before training started")
        print(f"\n{command.prog}: stopped by {how} {where}.", file=sys.stderr)
        return exit_status(how)
    return 0  # not reached: command.error exits
