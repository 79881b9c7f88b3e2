"""The one front door of ``launchers/train_gold.py``: ``--backend`` picks a backend, which gets the other arguments.

:data:`BACKENDS` is the only place that names the backends. Each backend's command line is imported only when
that backend is chosen, so importing this module (and ``--help`` or ``--dry_run``) needs neither Ray, OpenRLHF,
DeepSpeed nor vLLM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def _run_openrlhf(argv: list[str]) -> int:
    from gold_plugin.integrations.openrlhf.cli import main

    # The backend option is shown in the OpenRLHF backend's --help (the default backend's help is the launcher's).
    return main(argv, parents=[backend_parser()])


def _run_local(argv: list[str]) -> int:
    from gold_plugin.local.cli import main

    return main(argv)


@dataclass(frozen=True)
class Backend:
    """A backend of the launcher: its entry point (the arguments without ``--backend``) and a line of help."""

    run: Callable[[list[str]], int]
    help: str


BACKENDS: dict[str, Backend] = {
    "openrlhf": Backend(_run_openrlhf, "Ray + vLLM + DeepSpeed cluster run"),
    "local": Backend(_run_local, "the single-machine backend"),
}
DEFAULT_BACKEND = "openrlhf"


def backend_parser() -> argparse.ArgumentParser:
    """A parser holding only ``--backend`` (no ``--help``): to pick the backend and to show the option in help."""
    parser = argparse.ArgumentParser(add_help=False)
    described = "; ".join(
        f"{name}: {b.help}"
        + (" (default)" if name == DEFAULT_BACKEND else f" (its own options: `--backend {name} --help`)")
        for name, b in BACKENDS.items()
    )
    parser.add_argument_group("Backend").add_argument(
        "--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND, help=described + "."
    )
    return parser


def select_backend(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The chosen backend's name (``--backend X`` or ``--backend=X``, else the default) and the other arguments in
    their order; an unknown name exits with status 2 and argparse's message."""
    known, rest = backend_parser().parse_known_args(list(argv))
    return known.backend, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher with ``argv`` (default: ``sys.argv[1:]``); returns the process exit code."""
    name, rest = select_backend(sys.argv[1:] if argv is None else argv)
    return int(BACKENDS[name].run(rest) or 0)
