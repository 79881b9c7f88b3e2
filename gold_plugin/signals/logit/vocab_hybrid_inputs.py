"""Inputs of the vocabulary-map hybrid (:mod:`gold_plugin.signals.logit.vocab_hybrid`): where it is evaluated in
OpenRLHF's layout, and with which teacher rows.

At the first student token and the first teacher token of each group both models predict the next bytes after
the same text (``gold_plugin.alignment.group_starts``). In OpenRLHF's layout ``action_mask[b, j]`` marks
sequence token ``j + 1`` as an action, and the actor's logits at time ``j`` predict exactly that token; so the
student side of group g is logits ``[b, j]`` with ``j`` the action column of the group's first student token, and
the teacher side is row ``teacher_first[g]`` of the teacher's per-position top-k (``TeacherResult.topk_*``: row t
is the distribution that predicted teacher response token t).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment import group_starts
from gold_plugin.alignment.result import Alignment
from gold_plugin.signals.logit.topk import checked_topk
from gold_plugin.signals.positions import PositionBatch


@dataclass
class LogitLossInputs(PositionBatch):
    """Inputs of :func:`~gold_plugin.signals.logit.vocab_hybrid.aligned_logit_loss` for a batch (N aligned
    positions in all)."""

    positions: torch.Tensor
    """[N, 2] int64 (row, time) into the actor's logits [B, T, V] (time = the action column)."""
    teacher_topk_ids: torch.Tensor
    """[N, k] int64, -1 = padded slot."""
    teacher_topk_logprobs: torch.Tensor
    """[N, k] float32, -inf at padded slots."""
    sample_index: torch.Tensor
    """[N] int64: the row of each position, for per-sample reductions."""


def logit_loss_inputs(
    alignments: Sequence[Alignment],
    teacher_topk_ids: Sequence[np.ndarray | torch.Tensor | None],
    teacher_topk_logprobs: Sequence[np.ndarray | torch.Tensor | None],
    action_mask: torch.Tensor,
) -> LogitLossInputs:
    """Group-start positions of every aligned sample and the matching teacher top-k rows.

    Samples whose alignment failed, or without teacher top-k, contribute no position, nor do groups whose teacher
    row has no candidate (all ids -1: a token beyond the teacher's context). Different k per sample are
    padded to the largest with id -1. Vectorised within each sample (numpy); one Python iteration per sample.
    Raises ``ValueError`` naming the sample if an alignment does not match the action count or the teacher rows.
    """
    mask = action_mask.to(torch.bool).cpu().numpy()
    if len(alignments) != mask.shape[0] or len(teacher_topk_ids) != mask.shape[0]:
        raise ValueError(
            f"{len(alignments)} alignments / {len(teacher_topk_ids)} top-k for {mask.shape[0]} rows."
        )
    rows, cols, ids, logprobs = [], [], [], []
    for b, (alignment, top_ids, top_lp) in enumerate(
        zip(alignments, teacher_topk_ids, teacher_topk_logprobs)
    ):
        columns = np.flatnonzero(mask[b])
        if len(alignment.student_group) != columns.shape[0]:
            raise ValueError(
                f"Sample {b}: the alignment has {len(alignment.student_group)} student tokens but action_mask marks "
                f"{columns.shape[0]} actions."
            )
        if not alignment.aligned or alignment.num_groups == 0 or top_ids is None or top_lp is None:
            continue
        top_ids, top_lp = checked_topk(b, alignment, top_ids, top_lp)
        student_first, teacher_first = group_starts(alignment)
        # A teacher row without any candidate (a token it could not score) has no signal: no position.
        has_candidate = (top_ids[teacher_first] >= 0).any(axis=1)
        student_first, teacher_first = student_first[has_candidate], teacher_first[has_candidate]
        rows.append(np.full(student_first.shape[0], b, dtype=np.int64))
        cols.append(columns[student_first])
        ids.append(top_ids[teacher_first])
        logprobs.append(top_lp[teacher_first])
    k = max((x.shape[1] for x in ids), default=0)
    padded_ids = [np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=-1) for x in ids]
    padded_lp = [np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=-np.inf) for x in logprobs]
    device = action_mask.device
    row_index = torch.as_tensor(np.concatenate(rows) if rows else np.zeros(0, np.int64), device=device)
    col_index = torch.as_tensor(np.concatenate(cols) if cols else np.zeros(0, np.int64), device=device)
    return LogitLossInputs(
        positions=torch.stack([row_index, col_index], dim=1),
        teacher_topk_ids=torch.as_tensor(
            np.concatenate(padded_ids) if padded_ids else np.zeros((0, k), np.int64), device=device
        ),
        teacher_topk_logprobs=torch.as_tensor(
            np.concatenate(padded_lp) if padded_lp else np.zeros((0, k), np.float32), device=device
        ),
        sample_index=row_index,
    )
