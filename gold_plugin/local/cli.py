"""``python launchers/train_gold.py --backend local ...``: GOLD on one machine (CPU or one GPU).

Options keep OpenRLHF 0.11.2's dotted names where OpenRLHF has them (``--actor.model_name_or_path``,
``--data.prompt_dataset``, ``--rollout.n_samples_per_prompt``, ``--actor.adam.lr``, ``--ckpt.path`` ...), the
same ``--gold.*`` options as the OpenRLHF backend, and a few ``--local.*`` options of this backend. The config
classes declare them (:class:`~gold_plugin.local.config.LocalTrainConfig`, :class:`~gold_plugin.config.GoldConfig`);
only ``--demo``, ``--local.run_dir`` and ``--local.num_threads`` are declared here (the distillation advantages'
normalisation is ``--gold.advantage_norm``, shared with the OpenRLHF backend). ``--demo`` runs the
self-contained demo (nothing from a hub; :mod:`gold_plugin.demo`, imported only then): its values become the
parser's defaults, so every option given on the command line is kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gold_plugin.config import GoldConfigError, add_gold_arguments
from gold_plugin.local.config import LOCAL, add_local_arguments, configs_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_gold.py --backend local",
        description="GOLD on-policy cross-tokenizer distillation on one machine (HF generate + AdamW).",
    )
    p.add_argument(
        "--demo", action="store_true", help="Run the self-contained demo (addition, two tokenizers)."
    )
    local = add_local_arguments(p)[LOCAL]
    local.add_argument(
        "--local.run_dir", default="./runs/gold_demo", help="Demo: where models and results go."
    )
    local.add_argument("--local.num_threads", type=int, default=None, help="torch CPU threads.")
    add_gold_arguments(p)
    return p


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a ``--backend local`` command line; with ``--demo``, the demo's values are the defaults."""
    parser = parser or build_parser()
    args = parser.parse_args(list(argv))
    if args.demo:
        from gold_plugin.demo.run import demo_defaults

        parser.set_defaults(**demo_defaults(vars(args)["local.run_dir"]))
        args = parser.parse_args(list(argv))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``--backend local`` (``argv`` without ``--backend local``); returns the exit code.

    A configuration error (:class:`~gold_plugin.config.GoldConfigError`) exits with status 2 and its message;
    anything raised while training propagates with its traceback.
    """
    parser = build_parser()
    args = parse_args(sys.argv[1:] if argv is None else argv, parser)
    try:
        if args.demo:  # sets its threads (1 unless --local.num_threads) for its own run only
            from gold_plugin.demo.run import run_demo

            run_demo(args)
        else:
            from gold_plugin.local.launch import train

            if vars(args)["local.num_threads"]:
                import torch

                torch.set_num_threads(vars(args)["local.num_threads"])
            train(*configs_from_args(args))
    except GoldConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0
