"""Every example command line: help on every option, defaults shown once, ``choices=`` for every enumeration."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

import meanflow_losses as mfl
from examples import cli
from examples.cli import Range

#: Every example module with a command line, and the function that builds its parser.
PARSERS = {
    "examples.toy2d.train": "_parser",
    "examples.toy2d.study": "_parser",
    "examples.toy2d.pretrained": "_parser",
    "examples.toy2d.hello": "_parser",
    "examples.digits.train": "_parser",
    "examples.digits.pretrained": "_parser",
    "examples.imagenet_dit.train": "_parser",
    "examples.imagenet_dit.sample": "_parser",
    "examples.imagenet_dit.prepare_latents": "_parser",
    "examples.imagenet_dit.dit_smoke": "_parser",
}

#: Options whose value is an enumeration: they must have ``choices=``.
ENUMERATIONS = {
    "method",
    "methods",
    "dataset",
    "lr_schedule",
    "time_dist",
    "equal_draw",
    "reduction",
    "jvp",
    "tangent",
    "coupling",
    "act",
    "arch",
    "recipe",
    "weights",
    "labels",
    "dtype",
}

#: Options that take free text (paths, hub ids, lists, assignments), not a number or an enumeration.
FREE_TEXT = {
    "out",
    "run_dir",
    "init_from",
    "teacher",
    "reflow_from",
    "config",  # a config name or a path to a .toml (the help lists the names)
    "data",
    "overrides",
    "init_from_fm",
    "device",  # a torch device string
    "ckpt",
    "grid",
    "guidance_interval",  # "t_min,t_max" (imagenet sample; the toy trainer's is two numbers)
    "vae",
    "fid_ref",
    "fid_feature",
    "data_path",
    "workdir",
}

REPO = Path(__file__).resolve().parents[2]


def _parser(module: str) -> argparse.ArgumentParser:
    return getattr(importlib.import_module(module), PARSERS[module])()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_example_command_line_is_checked():
    """A new example with a command line must be added to PARSERS (else this file would not check it)."""
    found = set()
    for path in (REPO / "examples").rglob("*.py"):
        text = path.read_text()
        if "ArgumentParser(" in text or "make_parser(" in text:
            if path.name == "cli.py":
                continue
            found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert found == set(PARSERS)


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_every_option_has_help_and_shows_its_default_once(module):
    parser = _parser(module)
    assert parser.formatter_class is cli.HelpFormatter, module
    options = _options(parser)
    assert options, module
    for action in options:
        assert action.help and action.help.strip(), (module, action.option_strings)
        shown = action.default not in (None, "", [], ()) and not isinstance(action, argparse._StoreConstAction)
        if shown:  # the formatter appends this default: a help text that states it too would show it twice
            assert not re.search(r"\(default[ :]", action.help), (module, action.option_strings, action.help)
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_every_enumeration_has_choices(module):
    parser = _parser(module)
    for action in _options(parser):
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # flags
            continue
        if action.dest in ENUMERATIONS:
            assert action.choices, (module, action.option_strings)
        if action.choices:
            continue
        numeric = isinstance(action.type, Range) or action.type in (int, float)
        assert numeric or action.dest in FREE_TEXT, (
            f"{module} {action.option_strings}: a text option without choices; give it choices= or, if its value "
            "is free text (a path, a name or a list), add it to FREE_TEXT"
        )


def test_the_enumeration_check_sees_the_enumerations():
    """The checks above are not vacuous: the parsers hold the enumerations, with the package's own values."""
    with_choices = {
        (module, a.dest): list(a.choices) for module in PARSERS for a in _options(_parser(module)) if a.choices
    }
    assert {dest for _, dest in with_choices} >= ENUMERATIONS
    train = "examples.toy2d.train"
    assert set(with_choices[(train, "jvp")]) == set(mfl.JVP_STRATEGIES)
    assert set(with_choices[(train, "time_dist")]) == set(mfl.times.TIME_DISTRIBUTIONS)
    assert set(with_choices[(train, "recipe")]) == set(mfl.presets.RECIPES)
    assert set(with_choices[("examples.digits.train", "time_dist")]) == set(mfl.times.TIME_DISTRIBUTIONS)


def test_the_toy_trainer_help_is_grouped_by_concern():
    parser = _parser("examples.toy2d.train")
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert len(titles) >= 10 and "network" in titles and "optimisation" in titles
    assert len(parser.format_usage().splitlines()) == 1  # the full usage of ~60 options would fill a screen
    import dataclasses

    from examples.toy2d.train import GROUPS, TrainConfig

    assert sorted(n for names in GROUPS.values() for n in names) == sorted(
        f.name for f in dataclasses.fields(TrainConfig)
    )
