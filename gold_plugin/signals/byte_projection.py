"""Byte-projected logit loss: the student's distribution projected onto the teacher's candidates by bytes.

Today's GOLD hybrid (:func:`~gold_plugin.signals.aligned_logit_loss`) compares, at group starts, the teacher's
probability of a token with the student's probability of the token with the same bytes. Where the tokenizers
cut the same text into pieces of different lengths that is the wrong event: the teacher's "6" (single digits)
is the text continuing with "6", which the student (multi-digit tokens) spells "6", "64", "65", ... This loss
compares the two models on the same events at every teacher position: the student's probability that the text
continues with each candidate's bytes (see :mod:`gold_plugin.signals.byte_projection_inputs` for how it is
assembled from sorted-vocabulary range masses), plus an end event and a remainder bucket on both sides, with the
generalised JSD(beta) (exact endpoints). Differentiable through the student's logits, chunked
(:mod:`gold_plugin.signals.range_mass`). docs/signals.md gives the maths.
"""

from __future__ import annotations

from typing import Any

import torch

from gold_plugin.signals.byte_projection_inputs import ProjectionInputs
from gold_plugin.signals.divergences import generalized_jsd
from gold_plugin.signals.logit_loss import LogitLoss, LogitLossOptions, _resolve_options, _tempered_teacher
from gold_plugin.signals.range_mass import range_mass

_TINY = 1e-30


def _flat_rows(student_logits: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if student_logits.dim() == 3:
        batch, time, vocab = student_logits.shape
        if positions.numel() and (
            int(positions[:, 0].max()) >= batch
            or int(positions[:, 1].max()) >= time
            or int(positions.min()) < 0
        ):
            raise ValueError(f"positions out of range for logits of shape {tuple(student_logits.shape)}.")
        return student_logits.reshape(batch * time, vocab), positions[:, 0] * time + positions[:, 1]
    if student_logits.dim() == 2:
        return student_logits, positions[:, 1] if positions.dim() == 2 else positions
    raise ValueError(f"student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}.")


def _products(masses: torch.Tensor, factors: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    with_one = torch.cat([masses, masses.new_ones(1)])
    index = torch.where(factors >= 0, factors, masses.shape[0])
    return with_one[index].prod(dim=1) * sign.to(masses.dtype)


def student_event_probs(
    student_logits: torch.Tensor, inputs: ProjectionInputs, options: LogitLossOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's projected ``(event probabilities [P, E], remainder [P])``, conditioned as documented."""
    logits_2d, rows = _flat_rows(student_logits, inputs.query_positions)
    masses = range_mass(
        logits_2d,
        rows,
        inputs.query_lo,
        inputs.query_hi,
        inputs.query_untied,
        inputs.order,
        inputs.untied_sorted,
        temperature=options.student_temperature,
        chunk_size=options.chunk_size,
    )
    num, num_events = inputs.num_positions, inputs.num_events
    events = masses.new_zeros(num * num_events).index_add(
        0, inputs.term_event, _products(masses, inputs.term_factors, inputs.term_sign)
    )
    events = events.view(num, num_events).clamp(min=0.0)
    has_den = torch.zeros(num, dtype=torch.bool, device=masses.device)
    has_den[inputs.denominator_position] = True
    den = masses.new_zeros(num).index_add(
        0,
        inputs.denominator_position,
        _products(masses, inputs.denominator_factors, inputs.denominator_sign),
    )
    den = torch.where(has_den, den.clamp(min=_TINY), torch.ones_like(den))
    probs = events / den[:, None]
    return probs, (1.0 - probs.sum(dim=1)).clamp(min=0.0)


def teacher_event_probs(
    inputs: ProjectionInputs, options: LogitLossOptions, dtype: torch.dtype
) -> torch.Tensor:
    """The teacher's ``[P, E + 1]`` probabilities of the events and (last column) the remainder."""
    ids_valid = torch.isfinite(inputs.teacher_topk_logprobs)
    logprobs = _tempered_teacher(
        inputs.teacher_topk_logprobs.to(dtype), ids_valid, options.teacher_temperature
    )
    probs = torch.where(ids_valid, logprobs.exp(), torch.zeros_like(logprobs))
    num, num_events = inputs.num_positions, inputs.num_events
    assigned = inputs.teacher_event >= 0
    events = probs.new_zeros(num, num_events).scatter_add_(
        1, inputs.teacher_event.clamp(min=0), torch.where(assigned, probs, torch.zeros_like(probs))
    )
    rest = (1.0 - events.sum(dim=1)).clamp(min=0.0)
    return torch.cat([events, rest[:, None]], dim=1)


def projected_logit_loss(
    student_logits: torch.Tensor,
    inputs: ProjectionInputs,
    *,
    config: Any | None = None,
    **options: Any,
) -> LogitLoss:
    """Per-teacher-position loss ``[P]`` of the byte projection (``LogitLoss.matched``; ``unmatched`` is 0).

    ``student_logits``: ``[B, T, V]`` (positions are (row, action column) pairs) or ``[N, V]``. ``config``: a
    ``GoldConfig`` or :class:`~gold_plugin.signals.LogitLossOptions` (beta, temperatures, chunk size are used).
    """
    resolved = _resolve_options(config, options)
    if not torch.is_floating_point(student_logits):
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}.")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    num = inputs.num_positions
    if num == 0:
        zero = student_logits.new_zeros(0, dtype=dtype)
        return LogitLoss(zero, zero, zero, torch.zeros(0, dtype=torch.bool), 1.0, 0.0)
    probs, rest = student_event_probs(student_logits, inputs, resolved)
    teacher = teacher_event_probs(inputs, resolved, dtype)
    student = torch.cat([probs, rest[:, None]], dim=1)
    support = teacher > 0
    support[:, -1] = True
    loss = generalized_jsd(
        student.clamp(min=_TINY).log(), teacher.clamp(min=_TINY).log(), resolved.beta, mask=support
    )
    valid = torch.ones(num, dtype=torch.bool, device=loss.device)
    return LogitLoss(
        loss=loss,
        matched=loss.detach(),
        unmatched=torch.zeros_like(loss).detach(),
        valid=valid,
        matched_weight=1.0,
        unmatched_weight=0.0,
    )
