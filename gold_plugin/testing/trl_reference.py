"""TRL 1.16's own GOLD/ULD loss, built the way the tests and benchmarks compare against it."""

from __future__ import annotations

import types
from typing import Any


def trl_uld_config(**overrides: Any) -> types.SimpleNamespace:
    """The ULDLoss options for TRL's hybrid loss with positional pairing and no cross-entropy term."""
    options: dict[str, Any] = dict(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=False,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )
    options.update(overrides)
    return types.SimpleNamespace(**options)
