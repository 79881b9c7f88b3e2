"""What both logit losses read: their options and the teacher temperature.

:class:`LogitLossOptions` holds every option of both losses (the byte projection, the default, reads ``beta``,
the temperatures and ``chunk_size``; the vocabulary-map hybrid reads all of them); :func:`tempered_teacher`
reshapes the teacher's top-k log-probs by ``teacher_temperature`` the same way for both losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gold_plugin.config import AlignmentMode, GoldConfig

MatchedNormalization = Literal["tail", "none"]
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class LogitLossOptions:
    """Options of the logit losses. The training step builds them with :meth:`from_config` from a ``GoldConfig``,
    whose ``validate`` is the one place their values are checked (each error names the ``--gold.`` option to
    change); tests and benchmarks construct them directly, with values in those ranges."""

    beta: float = 0.5
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    chunk_size: int = 1024
    alignment: AlignmentMode = "spans"
    matched_normalization: MatchedNormalization = "tail"
    """``tail`` (a rest bucket on both sides, the default) or ``none`` (TRL's raw matched probabilities): not a
    ``GoldConfig`` option; the TRL parity tests set ``none``."""

    @classmethod
    def from_config(cls, config: GoldConfig, *, student_temperature: float | None = None) -> LogitLossOptions:
        """Options from a (validated) ``GoldConfig``; ``student_temperature`` replaces
        ``config.uld_student_temperature`` when given (the training step's, which undoes the temperature the
        logits were already divided by)."""
        return cls(
            beta=config.beta,
            matched_weight=config.uld_hybrid_matched_weight,
            unmatched_weight=config.uld_hybrid_unmatched_weight,
            student_temperature=(
                config.uld_student_temperature if student_temperature is None else student_temperature
            ),
            teacher_temperature=config.uld_teacher_temperature,
            chunk_size=config.logit_chunk_size,
            alignment=config.alignment,
        )


def tempered_teacher(logprobs: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher top-k log-probs reshaped by ``temperature`` inside the top-k, keeping the top-k's total mass
    (``p_i^(1/T)`` renormalised; the mass outside the top-k is unknown and kept); -inf where not ``valid``."""
    logprobs = torch.where(valid, logprobs, torch.full_like(logprobs, _NEG_INF))
    if temperature == 1.0:
        return logprobs
    scaled = logprobs / temperature
    return scaled - torch.logsumexp(scaled, -1, keepdim=True) + torch.logsumexp(logprobs, -1, keepdim=True)
