"""The ``normfree`` command: ``normfree train ...``, ``normfree compare ...``, ``normfree transfer ...`` and
``normfree spp ...``, a thin layer over `normfree.train`, `normfree.compare`,
`normfree.app.transfer.compare_transfer` and `normfree.app.spp.write_spp`.

The options of train, compare and transfer are the fields of `TrainConfig`, `CompareConfig` and `TransferConfig`,
each with the help its field holds (`normfree.app.options`); this module adds only what is not a setting of the
run or grid (``--config``, ``--resume``, ``--jobs``, ``--devices``, ``--plan``, ``--report``, ``--overwrite``,
``--quiet``) and spp's options. ``normfree compare --transfer ...`` is ``normfree transfer ...`` by its older name.

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

from ..data.registry import data_spec_help
from ..learner.checkpoint import CHECKPOINT
from ..models.propagation import DEFAULT_BATCH
from ..utils.errors import WriteError
from ..utils.outdir import INCOMPLETE
from . import distributed, startup
from .compare import CompareConfig, compare, write_plan
from .config import ConfigError, TrainConfig
from .options import add_options, flag_of
from .signals import exit_status, how_stopped, sigterm_as_interrupt
from .spp import DEFAULT_NOISE_SIZE, SPP_FILES, write_spp
from .train import resume, train
from .transfer import TransferConfig, compare_transfer

__all__ = ["build_parser", "main"]

_SETTINGS = {"train": TrainConfig, "compare": CompareConfig, "transfer": TransferConfig}  # the commands' options


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)", a list's values space-separated, unless the help already says what the default
    is; keeps the line breaks of descriptions and examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        if isinstance(action.default, list):
            values = " ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in action.default)
            return f"{action.help} (default: {values})"
        return super()._get_help_string(action)


def _flag(command: str, option: str) -> str:
    return flag_of(_SETTINGS.get(command), option)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results already in --out instead of stopping (train) or reusing them "
                             "(compare, transfer)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")


class _TransferAlias(argparse.Action):
    """``compare --transfer ...``: the arguments after it are ``normfree transfer``'s (the command's older name)."""

    def __init__(self, option_strings: list[str], dest: str, transfer: argparse.ArgumentParser, **kwargs):
        super().__init__(option_strings, dest, nargs=argparse.REMAINDER, default=argparse.SUPPRESS, **kwargs)
        self.transfer = transfer

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if any(value != parser.get_default(name) for name, value in vars(namespace).items()):
            parser.error("--transfer: give it right after compare, with every option after it, or run normfree "
                         "transfer with the same options")
        vars(namespace).clear()  # compare's defaults: none of them is transfer's
        self.transfer.parse_args(values, namespace)
        namespace.command = "transfer"


def _train_parser(subparsers) -> argparse.ArgumentParser:
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
    add_options(parser, TrainConfig)
    _add_run_options(parser)
    return parser


def _compare_parser(subparsers) -> argparse.ArgumentParser:
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
               "  sbatch --array=1-$(wc -l < grid.txt) ...             #   a SLURM array: "
               "sed -n ${SLURM_ARRAY_TASK_ID}p\n"
               "  normfree compare --out grid --report                 # then the report from their folders",
    )
    add_options(parser, CompareConfig)
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
               "  normfree spp --arch nf_resnet_tiny --weights runs/nf/model.safetensors --data digits "
               "--out spp-trained",
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


def _transfer_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "transfer", formatter_class=_HelpFormatter,
        help="transfer learning, measured: pretrain, then fine-tune on a few images of other classes",
        description="Transfer learning, measured: for each model (a BatchNorm model and its BatchNorm-free\n"
                    "counterparts: the small ResNets' twins, or your BatchNorm arch frozen, folded, converted) and\n"
                    "seed, pretrain on the --source-classes, then train on at most --per-class images of each\n"
                    "--target-classes (fine-tune, linear probe, and from scratch as the reference), every target\n"
                    "run with the same budget and its lr chosen from --lrs on a hold-out of its training images;\n"
                    "report the target accuracy on all validation images of the target classes. Runs already in\n"
                    "--out are reused, so an interrupted grid continues.",
        epilog="examples:\n  normfree transfer                # Fashion-MNIST classes 0-4 -> 5-9\n"
               "  normfree transfer --per-class 10 50 250 --seeds 0 1 2 3 4 --out transfer-5seeds\n"
               "  normfree transfer --arch resnet18 --methods bn bn-frozen folded-agc converted-agc \\\n"
               "      --lrs 1e-4 1e-3 1e-2 --out transfer-resnet18",
    )
    add_options(parser, TransferConfig)
    _add_run_options(parser)
    return parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``normfree`` parser and its command parsers by name."""
    parser = argparse.ArgumentParser(
        prog="normfree", formatter_class=_HelpFormatter,
        description="Normalizer-free networks and Adaptive Gradient Clipping for fastai.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{train,compare,transfer,spp}")
    commands = {"train": _train_parser(subparsers), "compare": _compare_parser(subparsers),
                "transfer": _transfer_parser(subparsers), "spp": _spp_parser(subparsers)}
    commands["compare"].add_argument("--transfer", action=_TransferAlias, transfer=commands["transfer"],
                                     help="normfree transfer by its older name: the options after --transfer are its")
    return parser, commands


def _settings(args: argparse.Namespace) -> dict:
    """The settings of the run or grid: the fields of the command's settings class (spp: every option but
    --quiet)."""
    if args.command not in _SETTINGS:
        return {name: value for name, value in vars(args).items() if name not in ("command", "quiet")}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(_SETTINGS[args.command])}


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
        " (the runs finished in --out are reused)" if command in ("compare", "transfer") else "")


def _check_resume_alone(args: argparse.Namespace) -> None:
    """--resume continues a run with its own settings: any other setting given is refused, naming it."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    given = sorted(_flag("train", k) for k, v in _settings(args).items() if v != defaults[k])
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
    if args.command == "transfer":
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
    args = parser.parse_args(argv)
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
            command.error(f"{_flag(args.command, error.option)}: {error.message}")
    except WriteError as error:  # the run stopped there; what it had written before is whole
        print(f"{command.prog}: error: {error}; {_after_write_error(args.command, error)}", file=sys.stderr)
        return _WRITE_FAILED
    except KeyboardInterrupt as error:  # outside a fit (those are checkpointed and return): starting, saving
        how = how_stopped(error)
        where = getattr(error, "normfree_note", "before training started")
        print(f"\n{command.prog}: stopped by {how} {where}.", file=sys.stderr)
        return exit_status(how)
    return 0  # not reached: command.error exits
