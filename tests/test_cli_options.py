"""One place for each option: the options of normfree train, compare and transfer are the fields of their settings
dataclasses, and ``--help`` shows the help each field holds; ``normfree transfer`` is a command of its own, and
``compare --transfer`` the same command by its older name."""
import argparse
import dataclasses
import re

import pytest

from normfree.app.cli import build_parser, main
from normfree.app.compare import CompareConfig
from normfree.app.config import TrainConfig
from normfree.app.transfer import TransferConfig

SETTINGS = {"train": TrainConfig, "compare": CompareConfig, "transfer": TransferConfig}
# The options that are not settings of the run or grid: what to do with them (and argparse's --help).
OWN_OPTIONS = {"train": {"help", "config", "resume", "overwrite", "quiet"},
               "compare": {"help", "jobs", "devices", "plan", "report", "overwrite", "quiet", "transfer"},
               "transfer": {"help", "overwrite", "quiet"}}


def help_blocks(text: str) -> dict[str, str]:
    """Each option's entry of a --help text, by each of its flags, whitespace made single spaces."""
    described = text.split("\noptions:\n")[1].split("\nexamples:\n")[0]
    blocks = {}
    for block in ("-" + entry for entry in ("\n" + described).split("\n  -")[1:]):
        flags = re.split(r" {2,}|\n", block, maxsplit=1)[0]  # "--agc LAMBDA", "-h, --help", "--to-normfree [MODE]"
        blocks.update(dict.fromkeys(re.findall(r"(?<![\w-])--?[a-z][\w-]*", flags), " ".join(block.split())))
    return blocks


def printed_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(SETTINGS))
def test_help_shows_each_setting_with_the_help_its_field_holds_and_no_option_without_a_field(command, capsys,
                                                                                              monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapped: argparse breaks lines at hyphens too
    blocks = help_blocks(printed_help(command, capsys))
    dest_of = {flag: action.dest for action in build_parser()[1][command]._actions for flag in action.option_strings}
    assert set(blocks) == set(dest_of)  # every flag the parser takes is described, and only those
    fields = {f.name: f for f in dataclasses.fields(SETTINGS[command])}
    assert {dest_of[flag] for flag in blocks} == set(fields) | OWN_OPTIONS[command]
    for name, field in fields.items():
        spec = field.metadata["option"]
        help = spec.help() if callable(spec.help) else spec.help
        expected = [f"{what}, {help}" for what in spec.values.values()] if spec.values else [help]
        shown = {blocks[flag] for flag in blocks if dest_of[flag] == name}
        for text in expected:
            assert any(" ".join(text.split()) in block for block in shown), (name, text, shown)


def test_a_field_without_an_option_is_refused_when_the_parser_is_built():
    from normfree.app.options import add_options

    @dataclasses.dataclass
    class Settings:
        bs: int = 8

    with pytest.raises(TypeError, match="the setting bs is no command-line option"):
        add_options(argparse.ArgumentParser(), Settings)


def test_transfer_is_its_own_command_and_compare_transfer_its_alias():
    parser, commands = build_parser()
    argv = ["--per-class", "7", "--seeds", "3", "--fp16", "--lrs", "0.1", "--out", "o", "--quiet"]
    new, old = parser.parse_args(["transfer", *argv]), parser.parse_args(["compare", "--transfer", *argv])
    assert vars(new) == vars(old) and new.command == "transfer"
    assert (new.per_class, new.seeds, new.precision, new.lrs, new.quiet) == ([7], [3], "fp16", [0.1], True)
    assert not hasattr(new, "budget")  # nothing of compare's is left in it
    assert TransferConfig(seeds=(3,)).command() == "normfree transfer --seeds 3"


@pytest.mark.bad_input
def test_compare_options_before_transfer_are_refused_naming_where_transfer_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the old code ran this grid: transfer's parser read the whole line
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--seeds", "4", "--transfer", "--out", "o"])
    assert stopped.value.code == 2 and list(tmp_path.iterdir()) == []
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("normfree compare: error: --transfer: give it right after compare, with every option after it, "
                     "or run normfree transfer with the same options")


@pytest.mark.bad_input
def test_an_option_of_transfer_after_compare_transfer_is_checked_by_transfer(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["compare", "--transfer", "--modes", "finetune"])
    assert stopped.value.code == 2
    assert "normfree transfer: error: argument --modes: invalid choice: 'finetune'" in capsys.readouterr().err
