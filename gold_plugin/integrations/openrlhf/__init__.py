"""GOLD on OpenRLHF 0.11.x: launcher parser, experience maker, trainers and policy actor.

This is the only part of gold_plugin that imports OpenRLHF. The parser, launch plan and dry run
(``args``, ``launch_plan``, ``dry_run``, ``cli``) import no OpenRLHF/Ray/DeepSpeed, so ``--help`` and ``--dry_run``
work without them; the experience maker, trainers and actor are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GoldExperienceMaker": "experience_maker",
    "GoldPPOTrainer": "trainer",
    "GoldPPOTrainerAsync": "trainer",
    "GoldPolicyModelActor": "actor",
    "GoldActorPPOTrainer": "actor",
    "build_parser": "args",
    "resolve_launch": "launch_plan",
    "LaunchPlan": "launch_plan",
    "main": "cli",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
