"""The OpenRLHF backend's command line (``launchers/train_gold.py [--backend openrlhf]``, through
:mod:`gold_plugin.cli`): validate, dry-run or train.

Importing this module (and running ``--help`` or ``--dry_run``) needs neither OpenRLHF, DeepSpeed, vLLM nor
Ray: the cluster code is imported only when a real run starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gold_plugin.config import GoldConfigError

from .args import build_parser
from .launch_plan import resolve_launch


def main(argv: Sequence[str] | None = None, parents: Sequence[argparse.ArgumentParser] = ()) -> int:
    """Run the OpenRLHF backend with ``argv`` (default: ``sys.argv[1:]``); returns the process exit code.

    ``parents``' options are added to the parser (the front door's ``--backend``, so that ``--help`` shows it).
    A configuration error exits with status 2 and its message.
    """
    parser = build_parser(parents)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
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
