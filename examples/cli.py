"""Command-line helpers shared by the examples' trainers (``examples.toy2d.train``, ``examples.digits.train``).

A trainer's options are the fields of its config dataclass. :func:`add_config_options` turns them into argparse
options, each with a help string, ``choices=`` for the enumerations and a :class:`Range` type for every number,
so that a value out of range is a usage error naming the option (exit status 2), not a traceback.
:func:`parse_explicit` tells the options given on the command line from their defaults (an option that has no
effect with the other options is an error only when it is given), and :func:`usage_error` reports a config's
:class:`ConfigError` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = [
    "ConfigError",
    "HelpFormatter",
    "Range",
    "add_config_options",
    "check_choices",
    "check_ranges",
    "check_unused",
    "flag",
    "make_parser",
    "parse_explicit",
    "usage_error",
]


class ConfigError(ValueError):
    """Invalid options of an example's config.

    Args:
        message: What is wrong, naming the options by their config field names.
        options: The config fields involved (the command line names them as ``--flags``).
    """

    def __init__(self, message: str, options: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.options = tuple(options)


def flag(name: str) -> str:
    """The command-line flag of the config field ``name``: ``"lr_final" -> "--lr-final"``."""
    return "--" + name.replace("_", "-")


def _num(x: float, kind: type) -> str:
    return str(int(x)) if kind is int else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The type and valid range of a numeric option: an argparse ``type=`` and a check of config values.

    As an argparse type it parses the text and raises :class:`argparse.ArgumentTypeError` (argparse then exits
    with a usage error that names the option) for a value of the wrong kind, out of range, or not finite.

    Attributes:
        kind: ``int`` or ``float``.
        lo: Lower bound (``None``: none).
        hi: Upper bound (``None``: none).
        lo_open: Exclude ``lo`` itself.
        hi_open: Exclude ``hi`` itself.
        multiple_of: Integers only: the value must be a multiple of this.
    """

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    multiple_of: int = 1

    def describe(self) -> str:
        """The range in words: ``"an integer >= 1"``, ``"a number in [0, 1)"``, ``"a finite number"``."""
        if self.kind is int:
            noun = "an even integer" if self.multiple_of == 2 else "an integer"
            if self.multiple_of > 2:
                noun = f"a multiple of {self.multiple_of}"
        else:
            noun = "a number" if self.lo is not None or self.hi is not None else "a finite number"
        if self.lo is not None and self.hi is not None:
            return (
                f"{noun} in {'(' if self.lo_open else '['}{_num(self.lo, self.kind)}, "
                f"{_num(self.hi, self.kind)}{')' if self.hi_open else ']'}"
            )
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo, self.kind)}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {_num(self.hi, self.kind)}"
        return noun

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is of the right kind, finite and in range."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return self.kind is not int or value % self.multiple_of == 0

    def __call__(self, text: str) -> int | float:
        """Parse a command-line value (argparse ``type=``).

        Raises:
            argparse.ArgumentTypeError: ``text`` is not a number of this kind, or out of range.
        """
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value


def check_ranges(config: Any, ranges: Mapping[str, Range]) -> None:
    """Check the numeric fields of ``config`` (``None`` values are skipped, tuples are checked entry by entry).

    Raises:
        ConfigError: Naming the first field out of its range.
    """
    for name, rng in ranges.items():
        value = getattr(config, name)
        if value is None:
            continue
        values = value if isinstance(value, tuple | list) else (value,)
        if not all(rng.contains(v) for v in values):
            what = f"every entry of {name}" if isinstance(value, tuple | list) else name
            raise ConfigError(f"{what} must be {rng.describe()}, got {value!r}", (name,))


def check_choices(config: Any, choices: Mapping[str, Sequence[str]]) -> None:
    """Check the enumerated fields of ``config``.

    Raises:
        ConfigError: Naming the first field whose value is not one of its choices.
    """
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}", (name,))


def check_unused(config: Any, given: Iterable[str]) -> None:
    """Refuse options given on the command line that have no effect with the others.

    Args:
        config: A config with a method ``unused(names) -> {name: reason}``.
        given: The options given explicitly (:func:`parse_explicit`).

    Raises:
        ConfigError: Naming the first such option.
    """
    for name, why in config.unused(given).items():
        raise ConfigError(why, (name,))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The help formatter of every example's command line: appends ``(default: ...)`` to each option's help once.

    Not at all for a ``None`` default (whose meaning the help text itself explains), for a flag (``store_true``
    / ``store_false``: off unless given) and for an empty default (``""``, ``[]``: nothing unless given). Help
    strings therefore never repeat their default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        flags = argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._StoreConstAction
        if action.default is None or isinstance(action, flags) or action.default in ("", [], ()):
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str, description: str, usage: str | None = None) -> argparse.ArgumentParser:
    """An example's argument parser: its ``prog`` (``python -m examples...``), description, optional short
    ``usage`` line (for a command line with many options, whose full usage would fill a screen) and the shared
    :class:`HelpFormatter`."""
    return argparse.ArgumentParser(prog=prog, description=description, usage=usage, formatter_class=HelpFormatter)


def add_config_options(
    parser: argparse.ArgumentParser,
    config: type,
    help: Mapping[str, str],
    ranges: Mapping[str, Range],
    choices: Mapping[str, Sequence[str]],
    metavars: Mapping[str, tuple[str, ...]] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Add one option per field of the dataclass ``config``, with its default.

    A ``bool`` field becomes ``--x / --no-x``, a field in ``choices`` gets ``choices=``, a numeric field its
    :class:`Range` (appended to the help text), a tuple field ``nargs`` (``"+"`` for ``tuple[int, ...]``).

    Args:
        parser: The parser.
        config: The config dataclass.
        help: Help text of every field.
        ranges: Range of every numeric field.
        choices: Allowed values of every enumerated field.
        metavars: Optional metavars (for tuple fields, one per value).
        groups: Optional argument groups of ``--help``, in order: ``{title: field names}``; every field must be
            in exactly one group.

    Returns:
        ``{title: argument group}`` (empty without ``groups``), for adding further options to a group.

    Raises:
        KeyError: A field has no help text.
        TypeError: A numeric field has no range.
        ValueError: ``groups`` misses a field, names one twice, or names one that does not exist.
    """
    fields = dataclasses.fields(config)
    made: dict[str, Any] = {}
    group_of: dict[str, Any] = {}
    if groups is not None:
        names = [name for members in groups.values() for name in members]
        missing = sorted({f.name for f in fields} - set(names))
        extra = sorted(set(names) - {f.name for f in fields})
        twice = sorted({name for name in names if names.count(name) > 1})
        if missing or extra or twice:
            raise ValueError(f"groups: fields missing {missing}, unknown {extra}, in two groups {twice}")
        for title, members in groups.items():
            made[title] = parser.add_argument_group(title)
            group_of.update(dict.fromkeys(members, made[title]))
    for f in fields:
        kind = str(f.type)
        kw: dict[str, Any] = {"default": None if f.default is dataclasses.MISSING else f.default, "help": help[f.name]}
        if kind.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in choices:
            kw["choices"] = list(choices[f.name])
        elif f.name in ranges:
            kw["type"] = ranges[f.name]
            kw["help"] += f" [{ranges[f.name].describe()}]"
        elif not kind.startswith("str"):
            raise TypeError(f"option {f.name!r} of type {kind} needs a Range or choices")
        if kind.startswith("tuple["):
            kw["nargs"] = "+" if "..." in kind else kind.count(",") + 1
        if metavars and f.name in metavars:
            kw["metavar"] = metavars[f.name]
        group_of.get(f.name, parser).add_argument(flag(f.name), **kw)
    return made


_UNSET = object()


def parse_explicit(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``argv`` and return only the options given on it, not the defaults of the others.

    Args:
        parser: A parser without required arguments.
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{dest: value}`` of the options on the command line.
    """
    dests = vars(parser.parse_args([]))  # every option, at its default
    # argparse fills in a default only where the namespace lacks the attribute: pre-set a sentinel instead
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {k: v for k, v in vars(namespace).items() if v is not _UNSET}


def usage_error(parser: argparse.ArgumentParser, err: Exception) -> NoReturn:
    """Exit with ``parser``'s usage error (status 2) for ``err``, naming the options of a :class:`ConfigError`."""
    flags = "/".join(flag(name) for name in getattr(err, "options", ()))
    parser.error(f"argument {flags}: {err}" if flags else str(err))
