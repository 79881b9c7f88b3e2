"""The default logit loss, the byte projection: the student's distribution projected onto the teacher's candidates
by bytes (``--gold.logit_projection bytes``).

The vocabulary-map hybrid (:func:`~gold_plugin.signals.logit.vocab_hybrid.aligned_logit_loss`) compares, at group
starts, the teacher's probability of a token with the student's probability of the token with the same bytes.
Where the tokenizers cut the same text into pieces of different lengths that is the wrong event: the teacher's
"6" (single digits) is the text continuing with "6", which the student (multi-digit tokens) spells "6", "64",
"65", ... This loss compares the two models on the same events at every teacher position: the student's
probability that the text continues with each candidate's bytes (see
:mod:`gold_plugin.signals.logit.byte_projection_inputs` for how it is assembled from sorted-vocabulary range
masses), plus an end event and a remainder bucket on both sides, with the generalised JSD(beta) (exact
endpoints). Differentiable through the student's logits, chunked
(:mod:`gold_plugin.signals.logit.byte_projection_range_mass`). docs/signals.md gives the maths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.sorted_vocab import SortedVocab
from gold_plugin.signals.divergences import generalized_jsd
from gold_plugin.signals.logit.byte_projection_inputs import (
    ProjectionInputs,
    ProjectionPositions,
    expand_positions,
)
from gold_plugin.signals.logit.byte_projection_range_mass import range_mass
from gold_plugin.signals.logit.byte_projection_tables import ProjectionTables, projection_tables
from gold_plugin.signals.logit.options import LogitLossOptions, tempered_teacher
from gold_plugin.signals.logit.result import LogitLoss

_TINY = 1e-30


@dataclass(frozen=True)
class ProjectionVocab:
    """The byte-sorted student vocabulary as tensors, for the training side (built once per run): what the loss
    reads, and the pair's tables from which compact :class:`ProjectionPositions` are expanded."""

    order: torch.Tensor
    """int64 ``[V]``: sorted position -> student id."""
    untied_sorted: torch.Tensor
    """float32 ``[V]`` in sorted order: 1 where the student token is not also a teacher token."""
    tables: ProjectionTables | None = None
    """The pair's tables (:mod:`~gold_plugin.signals.logit.byte_projection_tables`), for :func:`expand_positions`."""
    student_end_ids: tuple[int, ...] = ()
    """The student's EOS: its probability is the end event."""
    teacher_end_ids: tuple[int, ...] = ()
    """The teacher's special ids (EOS, end-of-turn, ...): one end event."""

    @classmethod
    def from_sorted(
        cls,
        vocab: SortedVocab,
        device: torch.device | str | None = None,
        *,
        student_end_ids: Sequence[int] = (),
        teacher_end_ids: Sequence[int] = (),
    ) -> ProjectionVocab:
        out = cls(
            order=torch.as_tensor(np.array(vocab.order)),
            untied_sorted=torch.as_tensor(~vocab.teacher_token[vocab.order], dtype=torch.float32),
            tables=projection_tables(vocab),
            student_end_ids=tuple(int(i) for i in student_end_ids),
            teacher_end_ids=tuple(int(i) for i in teacher_end_ids),
        )
        return out if device is None else out.to(device)

    def to(self, device: torch.device | str) -> ProjectionVocab:
        """This vocabulary on ``device`` (itself when it is there already)."""
        device = torch.device(device)
        if self.order.device == device:
            return self
        return dataclasses.replace(
            self,
            order=self.order.to(device),
            untied_sorted=self.untied_sorted.to(device),
            tables=None if self.tables is None else self.tables.to(device),
        )

    def expand(self, positions: ProjectionPositions) -> ProjectionInputs:
        """The full inputs of compact positions, on this vocabulary's device."""
        if self.tables is None:
            raise ValueError(
                "This ProjectionVocab has no pair tables; build it with ProjectionVocab.from_sorted."
            )
        return expand_positions(
            self.tables,
            positions.to(self.order.device),
            student_end_ids=self.student_end_ids,
            teacher_end_ids=self.teacher_end_ids,
        )


def _flat_rows(
    student_logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B * T, V] logits, flat row index of every (row, column))`` for ``[B, T, V]`` logits."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}.")
    batch, time, vocab = student_logits.shape
    if rows.numel() and (
        int(rows.max()) >= batch
        or int(columns.max()) >= time
        or int(rows.min()) < 0
        or int(columns.min()) < 0
    ):
        raise ValueError(f"positions out of range for logits of shape {tuple(student_logits.shape)}.")
    return student_logits.reshape(batch * time, vocab), rows * time + columns


def _points(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-token ranges ``[rank, rank + 1)``; empty where ``rank`` is -1."""
    present = ranks >= 0
    return torch.where(present, ranks, 0), torch.where(present, ranks + 1, 0)


class _MassQueries:
    """Range queries gathered from dense per-position index tensors, answered by one :func:`range_mass` call."""

    def __init__(self) -> None:
        self.parts: list[
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple]
        ] = []

    def add(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, untied: torch.Tensor | bool) -> int:
        """Queries for every entry with ``lo < hi`` (any shape); returns a handle for :meth:`dense`."""
        shape = lo.shape
        rows, lo, hi = (torch.broadcast_to(x, shape).reshape(-1) for x in (rows, lo, hi))
        untied = torch.broadcast_to(torch.as_tensor(untied, device=lo.device), shape).reshape(-1)
        keep = (lo < hi).nonzero().reshape(-1)
        self.parts.append((keep, rows[keep], lo[keep], hi[keep], untied[keep], shape))
        return len(self.parts) - 1

    def solve(self, logits_2d: torch.Tensor, vocab: ProjectionVocab, options: LogitLossOptions) -> None:
        cat = [torch.cat([p[i] for p in self.parts]) for i in range(1, 5)]
        masses = range_mass(
            logits_2d,
            *cat[:3],
            cat[3].to(torch.bool),
            vocab.order,
            vocab.untied_sorted,
            temperature=options.student_temperature,
            chunk_size=options.chunk_size,
        )
        self.values = masses.split([p[0].shape[0] for p in self.parts])

    def dense(self, handle: int) -> torch.Tensor:
        keep, *_, shape = self.parts[handle]
        values = self.values[handle]
        out = values.new_zeros(math.prod(shape))
        return out.index_put((keep,), values).reshape(shape)


def student_event_probs(
    student_logits: torch.Tensor, inputs: ProjectionInputs, options: LogitLossOptions, vocab: ProjectionVocab
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's projected ``(event probabilities [P, k + 1], remainder [P])``, conditioned as documented."""
    rows, cols = inputs.positions[:, 0], inputs.positions[:, 1]
    logits_2d, row_i = _flat_rows(student_logits, rows, cols)
    _, path_rows = _flat_rows(
        student_logits, rows[:, None].expand_as(inputs.path_columns), inputs.path_columns
    )
    path_rows = torch.cat([row_i[:, None], path_rows], dim=1)  # [P, D + 1]: i, i + 1, ..., i + D
    num, k = inputs.teacher_event.shape
    depth = inputs.chain_lo.shape[2]
    shared = inputs.consumed == 0
    queries = _MassQueries()
    ranges = queries.add(row_i[:, None], inputs.range_lo, inputs.range_hi, shared[:, None])
    exact = queries.add(row_i[:, None], *_points(inputs.exact_rank), False)
    path = queries.add(path_rows, *_points(inputs.path_ranks), False)
    chain = queries.add(path_rows[:, None, 1:], inputs.chain_lo, inputs.chain_hi, False)
    end = queries.add(row_i[:, None], *_points(inputs.end_ranks), False)
    condition = queries.add(row_i, inputs.condition_lo, inputs.condition_hi, False)
    condition_exact = queries.add(row_i, *_points(inputs.condition_exact_rank), False)
    queries.solve(logits_2d, vocab, options)

    range_mass_ = queries.dense(ranges)
    # Chain term at depth d: p(s_i) * p(s_i+1) * ... * p(s_i+d) * p_{i+1+d}(starts with what is left).
    path_prefix = queries.dense(path).cumprod(dim=1)[:, :depth]  # [P, D]
    chained = (queries.dense(chain) * path_prefix[:, None, :]).sum(dim=2)  # [P, k]
    inclusive = range_mass_ + chained * inputs.chain_subtract
    taken = inclusive.new_zeros(num, k + 1).scatter_add_(
        1, torch.where(inputs.parent >= 0, inputs.parent, k), inclusive
    )[:, :k]
    owned = (range_mass_ + queries.dense(exact) + chained - taken).clamp(min=0.0)
    events = torch.cat([owned, queries.dense(end).sum(dim=1, keepdim=True)], dim=1)
    den = queries.dense(condition) - queries.dense(condition_exact)
    den = torch.where(shared, torch.ones_like(den), den.clamp(min=_TINY))
    probs = events / den[:, None]
    return probs, (1.0 - probs.sum(dim=1)).clamp(min=0.0)


def teacher_event_probs(
    inputs: ProjectionInputs, options: LogitLossOptions, dtype: torch.dtype
) -> torch.Tensor:
    """The teacher's ``[P, k + 2]`` probabilities of the events (candidate slots, end) and the remainder (last)."""
    valid = torch.isfinite(inputs.teacher_topk_logprobs)
    logprobs = tempered_teacher(inputs.teacher_topk_logprobs.to(dtype), valid, options.teacher_temperature)
    probs = torch.where(valid, logprobs.exp(), torch.zeros_like(logprobs))
    num, k = inputs.teacher_event.shape
    assigned = inputs.teacher_event >= 0
    events = probs.new_zeros(num, k + 1).scatter_add_(
        1, inputs.teacher_event.clamp(min=0), torch.where(assigned, probs, torch.zeros_like(probs))
    )
    rest = (1.0 - events.sum(dim=1)).clamp(min=0.0)
    return torch.cat([events, rest[:, None]], dim=1)


def projected_logit_loss(
    student_logits: torch.Tensor,
    inputs: ProjectionInputs | ProjectionPositions,
    vocab: ProjectionVocab,
    *,
    options: LogitLossOptions,
) -> LogitLoss:
    """Per-teacher-position loss ``[P]`` of the byte projection (``LogitLoss.matched``; ``unmatched`` is 0), and the
    teacher's remainder-bucket probability of every position (``LogitLoss.teacher_remainder``).

    ``student_logits``: ``[B, T, V]`` (``inputs.positions`` are (row, column) pairs into it).
    ``inputs``: full inputs, or compact positions, expanded here on the logits' device with ``vocab``'s tables.
    ``options``: beta, the temperatures and the chunk size are read (the training step's are
    ``LogitLossOptions.from_config(gold, student_temperature=...)``).
    """
    if not torch.is_floating_point(student_logits):
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}.")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    device = student_logits.device
    vocab = vocab.to(device)
    if isinstance(inputs, ProjectionPositions):
        inputs = vocab.expand(inputs)
    else:
        inputs = inputs.to(device)
    num = inputs.num_positions
    if num == 0:
        zero = student_logits.new_zeros(0, dtype=dtype)
        return LogitLoss(zero, zero, zero, torch.zeros(0, dtype=torch.bool, device=device), 1.0, 0.0, zero)
    probs, rest = student_event_probs(student_logits, inputs, options, vocab)
    teacher = teacher_event_probs(inputs, options, dtype)
    student = torch.cat([probs, rest[:, None]], dim=1)
    support = teacher > 0
    support[:, -1] = True
    loss = generalized_jsd(
        student.clamp(min=_TINY).log(), teacher.clamp(min=_TINY).log(), options.beta, mask=support
    )
    return LogitLoss(
        loss=loss,
        matched=loss.detach(),
        unmatched=torch.zeros_like(loss).detach(),
        valid=torch.ones(num, dtype=torch.bool, device=device),
        matched_weight=1.0,
        unmatched_weight=0.0,
        teacher_remainder=teacher[:, -1].detach(),
    )
