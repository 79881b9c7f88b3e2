"""The one dataclass-to-argparse builder: both ways of declaring a field, each type hint's option, values back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from gold_plugin.cli_options import (
    add_grouped_options,
    add_options,
    declared_options,
    documented_options,
    option,
    option_values,
)


@dataclass(frozen=True)
class Documented:
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    on: bool = True
    weight: float | None = None
    """None = adaptive."""


@dataclass(frozen=True)
class Declared:
    switch: bool = option("x.switch", False, "A switch.", group="first", switch=True)
    value: bool = option("x.value", False, group="second")
    pair: tuple[float, float] = option("x.pair", (0.1, 0.2), group="first")
    count: int | None = option("x.count", None, "How many.", group="second")
    not_an_option: int = 3


def test_documented_fields_take_a_prefix_their_docstrings_and_values_for_bools():
    parser = argparse.ArgumentParser()
    add_options(parser, documented_options(Documented, "d."))
    actions = {a.dest: a for a in parser._actions}
    assert actions["d.mode"].choices == ["a", "b"] and actions["d.mode"].help == "Which mode. (default: a)"
    assert actions["d.on"].help == " (default: True)"  # no docstring: only the default
    args = parser.parse_args(["--d.on", "false", "--d.weight", "adaptive"])
    assert option_values(args, documented_options(Documented, "d.")) == {
        "mode": "a",
        "on": False,
        "weight": None,
    }
    assert vars(parser.parse_args(["--d.weight", "0.5"]))["d.weight"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--d.on", "maybe"])


def test_declared_fields_keep_their_names_groups_and_switches():
    parser = argparse.ArgumentParser()
    groups = add_grouped_options(parser, declared_options(Declared), ("first", "second"))
    assert [a.dest for a in groups["first"]._group_actions] == ["x.switch", "x.pair"]
    assert [a.dest for a in groups["second"]._group_actions] == ["x.value", "x.count"]
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["x.switch"] == "A switch." and helps["x.count"] == "How many. (default: None)"
    args = parser.parse_args(["--x.switch", "--x.value", "yes", "--x.pair", "1", "2", "--x.count", "4"])
    values = option_values(args, declared_options(Declared))
    assert values == {"switch": True, "value": True, "pair": (1.0, 2.0), "count": 4}
    assert option_values(parser.parse_args([]), declared_options(Declared))["pair"] == (0.1, 0.2)
    with pytest.raises(SystemExit):  # a switch takes no value
        parser.parse_args(["--x.switch", "true"])
