"""What both logit losses read: their options, how a call's options are resolved, and the teacher temperature.

:class:`LogitLossOptions` holds every option of both losses (the byte projection, the default, reads ``beta``,
the temperatures and ``chunk_size``; the vocabulary-map hybrid reads all of them). :func:`resolve_options` turns
a call's ``config`` and keyword overrides into validated options; :func:`tempered_teacher` reshapes the
teacher's top-k log-probs by ``teacher_temperature`` the same way for both losses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

MatchedNormalization = Literal["tail", "none"]
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class LogitLossOptions:
    """Options of the logit losses; :meth:`from_config` reads them from a ``GoldConfig``."""

    beta: float = 0.5
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    chunk_size: int = 1024
    alignment: Literal["spans", "positional"] = "spans"
    matched_normalization: MatchedNormalization = "tail"

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> LogitLossOptions:
        """Options from a ``GoldConfig`` (or any object with its field names), then ``overrides``."""
        options = cls(
            beta=config.beta,
            matched_weight=config.uld_hybrid_matched_weight,
            unmatched_weight=config.uld_hybrid_unmatched_weight,
            student_temperature=config.uld_student_temperature,
            teacher_temperature=config.uld_teacher_temperature,
            chunk_size=config.logit_chunk_size,
            alignment=config.alignment,
        )
        return replace(options, **overrides)

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}.")
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError("Set both hybrid weights (matched and unmatched) or neither (adaptive).")
        if self.matched_weight is not None and (self.matched_weight < 0 or self.unmatched_weight < 0):
            raise ValueError("Hybrid weights must be >= 0.")
        if self.student_temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("Temperatures must be > 0.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")
        if self.alignment not in ("spans", "positional"):
            raise ValueError(f"alignment must be 'spans' or 'positional', got {self.alignment!r}.")
        if self.matched_normalization not in ("tail", "none"):
            raise ValueError(
                f"matched_normalization must be 'tail' or 'none', got {self.matched_normalization!r}."
            )


def resolve_options(config: Any | None, options: dict[str, Any]) -> LogitLossOptions:
    """Validated options of one call: ``config`` (a ``GoldConfig``, a :class:`LogitLossOptions` or None for the
    defaults), then the keyword ``options`` over it."""
    if isinstance(config, LogitLossOptions):
        resolved = replace(config, **options)
    elif config is not None:
        resolved = LogitLossOptions.from_config(config, **options)
    else:
        resolved = LogitLossOptions(**options)
    resolved.validate()
    return resolved


def tempered_teacher(logprobs: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher top-k log-probs reshaped by ``temperature`` inside the top-k, keeping the top-k's total mass
    (``p_i^(1/T)`` renormalised; the mass outside the top-k is unknown and kept); -inf where not ``valid``."""
    logprobs = torch.where(valid, logprobs, torch.full_like(logprobs, _NEG_INF))
    if temperature == 1.0:
        return logprobs
    scaled = logprobs / temperature
    return scaled - torch.logsumexp(scaled, -1, keepdim=True) + torch.logsumexp(logprobs, -1, keepdim=True)
