"""Command-line entry of ``launchers/train_gold.py``: pick the backend, validate, dry-run or train.

Importing this module (and running ``--help`` or ``--dry_run``) needs neither OpenRLHF, DeepSpeed, vLLM nor
Ray: the cluster code is imported only when a real run starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gold_plugin.config import GoldConfigError

from .args import build_parser
from .launch_plan import LaunchPlan, resolve_launch


def _selected_backend(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The ``--backend`` value and the arguments without it (``--backend X`` or ``--backend=X``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=["openrlhf", "local"], default="openrlhf")
    known, rest = pre.parse_known_args(list(argv))
    return known.backend, rest


def parse_and_resolve(argv: Sequence[str]) -> tuple[argparse.Namespace, LaunchPlan]:
    """Parse an OpenRLHF-backend command line and resolve it (raises GoldConfigError)."""
    args = build_parser().parse_args(list(argv))
    return args, resolve_launch(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    backend, rest = _selected_backend(argv)
    if backend == "local":
        from gold_plugin.local.cli import main as local_main

        return int(local_main(rest) or 0)

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = resolve_launch(args)
        if args.dry_run:
            from .dry_run import run_dry_run

            run_dry_run(plan, sys.stdout)
            return 0
    except GoldConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    for warning in plan.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    try:  # fail before Ray starts if a local tokenizer cannot be aligned
        from .dry_run import check_tokenizers

        check_tokenizers(plan, sys.stderr)
    except GoldConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    from .train import train

    train(plan)
    return 0
