"""Command-line options built from a config dataclass's fields: the one builder behind ``--gold.*`` and the local
backend's options.

A field becomes a :class:`FieldOption` in one of two ways: declared with :func:`option` (its own option name, help
text and help group: :class:`~gold_plugin.local.config.LocalTrainConfig`), or read by :func:`documented_options`
(every field under a prefix, its attribute docstring as help: :class:`~gold_plugin.config.GoldConfig`).
:func:`add_options` turns either into argparse options, and :func:`option_values` reads the field values back from
a parsed command line. Only the standard library is imported.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints


def option(name: str, default: Any, help: str = "", *, group: str, switch: bool = False) -> Any:
    """A dataclass field that is the command-line option ``--<name>``, shown in help group ``group``.

    ``switch=True``: an option without a value that sets the field (default False) to True; otherwise a bool
    field takes a value (``--name false``).
    """
    return dataclasses.field(
        default=default, metadata={"option": name, "help": help, "group": group, "switch": switch}
    )


@dataclass(frozen=True)
class FieldOption:
    """One config field as the option ``--<dest>``."""

    field: str
    """The dataclass field's name."""
    dest: str
    """The option's name without ``--``, also its argparse ``dest`` (``gold.alpha``, ``actor.adam.lr``)."""
    hint: Any
    """The field's type hint: it decides the option's type, choices and number of values."""
    default: Any
    help: str
    group: str | None = None
    switch: bool = False
    """A value-less option setting the bool field to True (else a bool takes true/false)."""


def declared_options(cls: type) -> list[FieldOption]:
    """The fields of ``cls`` declared with :func:`option`, in declaration order."""
    hints = get_type_hints(cls)
    return [
        FieldOption(
            f.name,
            f.metadata["option"],
            hints[f.name],
            f.default,
            f.metadata["help"],
            f.metadata["group"],
            f.metadata["switch"],
        )
        for f in dataclasses.fields(cls)
        if "option" in f.metadata
    ]


def documented_options(cls: type, prefix: str) -> list[FieldOption]:
    """Every field of ``cls`` that is not itself a dataclass, as ``--<prefix><name>`` with the attribute docstring
    (the string literal after the field) as help, in declaration order. Defaults are the fields' declared ones
    (an unset ``None`` stays None: ``__post_init__`` resolves it from the other options)."""
    hints = get_type_hints(cls)
    docs = _attribute_docs(cls)
    return [
        FieldOption(f.name, prefix + f.name, hints[f.name], _declared_default(f), docs.get(f.name, ""))
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(hints[f.name])
    ]


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_options(container: argparse._ActionsContainer, options: Iterable[FieldOption]) -> None:
    """Register each option in ``container`` (a parser or a help group); help ends with the default, except for
    switches."""
    for opt in options:
        container.add_argument(f"--{opt.dest}", **_argparse_kwargs(opt))


def add_grouped_options(
    parser: argparse.ArgumentParser, options: Sequence[FieldOption], groups: Sequence[str]
) -> dict[str, argparse._ArgumentGroup]:
    """Register each option in its help group, the groups in ``groups``' order; returns the groups by title."""
    made = {title: parser.add_argument_group(title) for title in groups}
    for opt in options:
        add_options(made[opt.group], [opt])
    return made


def option_values(
    args: argparse.Namespace | dict[str, Any], options: Iterable[FieldOption]
) -> dict[str, Any]:
    """Field name -> value of each option in a parsed command line (a namespace or its ``vars``); several values
    (``nargs``) come back as the field's tuple."""
    parsed = vars(args) if isinstance(args, argparse.Namespace) else args
    values = {}
    for opt in options:
        value = parsed[opt.dest]
        values[opt.field] = tuple(value) if get_origin(opt.hint) is tuple else value
    return values


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else is an argparse error."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_optional_float(text: str) -> float | None:
    """None for ``none``, ``adaptive`` or an empty value, else the float."""
    return None if text.lower() in ("none", "adaptive", "") else float(text)


def _argparse_kwargs(opt: FieldOption) -> dict[str, Any]:
    """argparse keywords of one option: its type (an ``X | None`` hint parses as ``X``), choices (a ``Literal``),
    values (a ``tuple`` takes one per item), default and help."""
    shown = "" if opt.switch else f" (default: {opt.default})"
    kwargs: dict[str, Any] = {"dest": opt.dest, "default": opt.default, "help": opt.help + shown}
    hint = opt.hint
    if opt.switch:
        kwargs["action"] = "store_true"
    elif get_origin(hint) is Literal:
        kwargs.update(type=str, choices=list(get_args(hint)))
    elif hint is bool:
        kwargs.update(type=parse_bool, metavar="BOOL")
    elif get_origin(hint) is tuple:
        (item, *rest) = get_args(hint)
        kwargs.update(type=item, nargs=1 + len(rest))
    else:
        inner = [a for a in get_args(hint) if a is not type(None)]  # X | None -> X
        kind = inner[0] if inner else hint
        kwargs["type"] = parse_optional_float if kind is float and inner else kind
    return kwargs


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right after the field in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    definition = tree.body[0]
    if not isinstance(definition, ast.ClassDef):
        raise TypeError(f"{cls.__name__}'s source is not a class definition.")
    body = definition.body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs
