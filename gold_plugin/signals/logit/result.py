"""What both logit losses return: per-position results (:class:`LogitLoss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitLoss:
    """Per-position results; reduce ``loss`` as the training step needs (e.g. mean over valid positions)."""

    loss: torch.Tensor
    """[N] float32 (float64 for float64 logits), differentiable w.r.t. the student logits; 0 where masked."""
    matched: torch.Tensor
    """[N] matched (JSD) part, not weighted, no gradient."""
    unmatched: torch.Tensor
    """[N] unmatched (ULD) part, not weighted, no gradient."""
    valid: torch.Tensor
    """[N] bool: positions that were computed."""
    matched_weight: float
    unmatched_weight: float
    teacher_remainder: torch.Tensor | None = None
    """[N] the teacher's probability of the remainder bucket (byte projection only), no gradient; else ``None``."""
