"""The command-line options of normfree's settings dataclasses, stated once: on their fields.

Every field of `TrainConfig`, `CompareConfig` and `TransferConfig` is made by `option` (or `like`, which takes
another class's field): its default, and in its metadata an `Option` with the help and whatever the field's type
and default do not already say. From these, `add_options` builds a command's argparse options, `option_words`
writes a value back as the words that give it (the commands normfree records) and `flag_of` names a field as the
command line spells it (in error messages).

How a field's type and default make its option: ``int``, ``float``, ``str`` (or None as well) read one value;
``tuple[X, ...]`` one or more; ``bool`` with default False is the switch ``--name``, with default True the
switch ``--no-name``, and ``bool | None`` both (``--name`` / ``--no-name``, None when neither is given). A tuple
default is shown space-separated in the help.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "add_options", "flag_of", "like", "option", "option_words"]


@dataclass(frozen=True)
class Option:
    """How a settings field is a command-line option (see the module docstring for what its type says).

    - `help`: the help, or a function that returns it when the parser is built (text listed from a registry
      that can grow);
    - `flag`: the flag where it is not ``--name-with-dashes``; for a switch, the flag that sets the value other
      than the default (``--no-accum``);
    - `metavar`, `choices`: argparse's;
    - `type`: what reads the value where the annotation does not say (``--agc``: a number or ``auto``);
    - `const`: the value of the flag given alone, which makes the value optional (``--to-normfree`` = ``nf``);
    - `off`: the help of ``--no-name``, which sets the field to None (``--no-agc``);
    - `values`: one flag ``--VALUE`` per value instead of ``--name VALUE``, each with what it is; the help of each
      flag is then ``WHAT, HELP`` (``--fp16``, ``--bf16``);
    - `group`: fields of the same group exclude each other (``--pretrained`` or ``--weights``).
    """

    help: str | Callable[[], str]
    flag: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    type: Callable[[str], Any] | None = None
    const: Any = None
    off: str | None = None
    values: Mapping[str, str] | None = None
    group: str | None = None


def option(default: Any, help: str | Callable[[], str], **how: Any) -> Any:
    """A dataclass field with `default` that is a command-line option with `help`; `how`: the other `Option`
    fields (``flag=``, ``metavar=``, ``choices=`` ...)."""
    if "choices" in how:
        how["choices"] = tuple(how["choices"])
    return dataclasses.field(default=default, metadata={"option": Option(help, **how)})


def like(cls: type, name: str, **changes: Any) -> Any:
    """A field made as `cls`'s field `name` (its default and its option), with `changes` to either: ``default=``,
    ``help=`` and the other `Option` fields."""
    source = _field(cls, name)
    default = changes.pop("default", source.default)
    return dataclasses.field(default=default, metadata={"option": dataclasses.replace(_option(source), **changes)})


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _option(field: dataclasses.Field) -> Option:
    if "option" not in field.metadata:
        raise TypeError(f"the setting {field.name} is no command-line option: make the field with "
                        f"normfree.app.options.option(default, help)")
    return field.metadata["option"]


def _dashes(field: dataclasses.Field, prefix: str = "") -> str:
    """``--name-with-dashes``, or with a `prefix`: ``--no-name-with-dashes``."""
    return f"--{prefix}{field.name.replace('_', '-')}"


def _switch_flag(field: dataclasses.Field, value: bool) -> str:
    """The flag of a bool field that sets `value`."""
    return (_option(field).flag if value != field.default else None) or _dashes(field, "" if value else "no-")


def flag_of(cls: type | None, name: str) -> str:
    """How the command line spells setting `name` of `cls` (``--bs``, ``--agc/--no-agc``, ``--fp16/--bf16``,
    ``--no-accum``); ``--name-with-dashes`` for a name that is not a field of `cls` (a command's own option, such
    as ``--resume``) or with no `cls` (a command without a settings class)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls is not None else None
    if field is None:
        return "--" + name.replace("_", "-")
    spec = _option(field)
    if spec.values:
        return "/".join(f"--{value}" for value in spec.values)
    if field.default is None and _annotation(cls, field) == (bool, True):  # both switches
        return f"{_switch_flag(field, True)}/{_switch_flag(field, False)}"
    if isinstance(field.default, bool):
        return _switch_flag(field, not field.default)
    flag = spec.flag or _dashes(field)
    return f"{flag}/{_dashes(field, 'no-')}" if spec.off else flag


def option_words(field: dataclasses.Field, value: Any) -> list[Any]:
    """The command-line words that set `field` to `value` (unquoted): ``["--bs", 32]``, ``["--seeds", 0, 1]``,
    ``["--no-agc"]`` (None), ``["--bf16"]``, ``["--no-accum"]`` (False)."""
    spec = _option(field)
    if spec.values:
        return [f"--{value}"]
    if value is None:
        return [_dashes(field, "no-")]
    if isinstance(value, bool):
        return [_switch_flag(field, value)]
    flag = spec.flag or _dashes(field)
    return [flag, *value] if isinstance(value, (tuple, list)) else [flag, value]


def _annotation(cls: type, field: dataclasses.Field) -> tuple[Any, bool]:
    """The field's type without None, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [t for t in typing.get_args(hint) if t is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        # a Union of a runtime tuple of members has no `X | Y` spelling
        return (members[0] if len(members) == 1 else typing.Union[tuple(members)]), optional  # noqa: UP007
    return hint, False


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add an option to `parser` for every field of the settings dataclass `cls`, in field order; TypeError for a
    field made without `option`, or whose type needs a ``type=`` it lacks."""
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        spec = _option(field)
        if spec.group is not None and spec.group not in groups:
            groups[spec.group] = parser.add_mutually_exclusive_group()
        _add(groups[spec.group] if spec.group is not None else parser, parser, cls, field, spec)


def _add(container: Any, parser: argparse.ArgumentParser, cls: type, field: dataclasses.Field, spec: Option) -> None:
    help = spec.help() if callable(spec.help) else spec.help
    base, optional = _annotation(cls, field)
    if spec.values:
        flags = parser.add_mutually_exclusive_group()
        for value, what in spec.values.items():
            flags.add_argument(f"--{value}", dest=field.name, action="store_const", const=value,
                               default=argparse.SUPPRESS, help=f"{what}, {help}")
        parser.set_defaults(**{field.name: field.default})
        return
    if base is bool:
        if optional:
            container.add_argument(_dashes(field), action=argparse.BooleanOptionalAction, default=field.default,
                                   help=help)
        else:
            container.add_argument(_switch_flag(field, not field.default), dest=field.name,
                                   action="store_false" if field.default else "store_true", help=help)
        return
    arguments: dict[str, Any] = {"dest": field.name, "help": help,
                                 "default": list(field.default) if isinstance(field.default, tuple) else field.default}
    element = base
    if typing.get_origin(base) is tuple:
        arguments["nargs"], element = "+", typing.get_args(base)[0]
    if spec.type is not None:
        arguments["type"] = spec.type
    elif element in (int, float):
        arguments["type"] = element
    elif element is not str:
        raise TypeError(f"{cls.__name__}.{field.name}: give option(..., type=...) to read a {element} from the "
                        f"command line")
    if spec.const is not None:
        arguments.update(nargs="?", const=spec.const)
    arguments.update({key: getattr(spec, key) for key in ("metavar", "choices") if getattr(spec, key) is not None})
    if spec.off is None:
        container.add_argument(spec.flag or _dashes(field), **arguments)
        return
    either = parser.add_mutually_exclusive_group() if container is parser else container
    either.add_argument(spec.flag or _dashes(field), **arguments)
    either.add_argument(_dashes(field, "no-"), dest=field.name, action="store_const", const=None,
                        default=argparse.SUPPRESS, help=spec.off)
