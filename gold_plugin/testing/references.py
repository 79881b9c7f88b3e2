"""Straightforward reference implementations of the signals, for tests and benchmarks only.

Each computes the same quantity as a production function in :mod:`gold_plugin.signals`, written the obvious way
(Python loops over groups, full-vocabulary tensors) so that the vectorised, chunked production code can be
checked against it. Nothing in the production packages imports this module.

- :func:`group_kl_reference`: ``d_g = lS(g) - lT(g)`` per group of one sample;
- :func:`group_advantages_reference`: that sample's per-token advantages ``-sum_{g'>=g} gamma^(g'-g) d_g'``
  (production: :func:`gold_plugin.signals.batch_distill_advantages`, and its one-sample form
  :func:`gold_plugin.signals.group_advantages`);
- :func:`aligned_logit_loss_reference`: the aligned GKD/ULD logit loss over the full vocabulary with plain
  autograd (production: :func:`gold_plugin.signals.aligned_logit_loss`), and :func:`uld_distance`, the ULD
  distance it uses (sorted L1 between two whole distributions; production sorts only the top-k and adds the
  mass of the rest).

The maths: docs/design.md ("Signals").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment
from gold_plugin.signals.divergences import LOG_PROB_FLOOR, generalized_jsd
from gold_plugin.signals.logit.options import LogitLossOptions
from gold_plugin.signals.logit.vocab_hybrid import pad_unmatched


def group_kl_reference(alignment: Alignment, student_logprobs: Any, teacher_logprobs: Any) -> torch.Tensor:
    """``d_g = lS(g) - lT(g)`` for every group of one sample (float64 ``[num_groups]``), one group at a time.

    Log-probs are clamped to ``LOG_PROB_FLOOR``; a group holding an unscored (NaN) token on either side gets NaN.
    """
    student_group = np.asarray(alignment.student_group, dtype=np.int64)
    teacher_group = np.asarray(alignment.teacher_group, dtype=np.int64)
    student = torch.as_tensor(student_logprobs).to(torch.float64).reshape(student_group.shape)
    teacher = torch.as_tensor(teacher_logprobs).to(torch.float64).reshape(teacher_group.shape)
    num_groups = int(alignment.num_groups)
    for side, groups in (("student", student_group), ("teacher", teacher_group)):
        if groups.size and int(groups.max()) >= num_groups:
            raise ValueError(f"{side}_group has ids >= num_groups ({num_groups}).")
    d = torch.zeros(num_groups, dtype=torch.float64)
    for g in range(num_groups):
        s_values = student[torch.from_numpy(student_group == g)]
        t_values = teacher[torch.from_numpy(teacher_group == g)]
        if torch.isnan(s_values).any() or torch.isnan(t_values).any():
            d[g] = float("nan")
        else:
            d[g] = s_values.clamp(min=LOG_PROB_FLOOR).sum() - t_values.clamp(min=LOG_PROB_FLOOR).sum()
    return d


def group_advantages_reference(
    alignment: Alignment, student_logprobs: Any, teacher_logprobs: Any, kl_discount: float = 0.0
) -> torch.Tensor:
    """Per-student-token advantages of one sample (float32): ``-sum_{g' >= g} gamma^(g'-g) d_g'`` for a token of
    group g, summed term by term; 0 for masked tokens and for tokens of a group with an unscored token (such a
    group also adds nothing to earlier groups' sums)."""
    d = group_kl_reference(alignment, student_logprobs, teacher_logprobs)
    num_groups = d.shape[0]
    returns = [
        sum(
            kl_discount ** (later - g) * float(d[later].nan_to_num(nan=0.0)) for later in range(g, num_groups)
        )
        for g in range(num_groups)
    ]
    advantages = torch.zeros(len(alignment.student_group), dtype=torch.float64)
    for i, g in enumerate(np.asarray(alignment.student_group).tolist()):
        if g >= 0 and not torch.isnan(d[g]):
            advantages[i] = -returns[g]
    return advantages.to(torch.float32)


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation distance: L1 between the two probability vectors sorted descending.

    The last dimensions may differ: the shorter side is zero-padded. Leading dimensions must match.
    Differentiable in both arguments; computed in at least fp32.
    """
    if student_probs.shape[:-1] != teacher_probs.shape[:-1]:
        raise ValueError(
            f"Leading shapes differ: student {tuple(student_probs.shape)} vs teacher {tuple(teacher_probs.shape)}."
        )
    dtype = torch.promote_types(torch.promote_types(student_probs.dtype, teacher_probs.dtype), torch.float32)
    s_sorted = student_probs.to(dtype).sort(dim=-1, descending=True).values
    t_sorted = teacher_probs.to(dtype).sort(dim=-1, descending=True).values
    width = max(s_sorted.shape[-1], t_sorted.shape[-1])
    s_sorted = torch.nn.functional.pad(s_sorted, (0, width - s_sorted.shape[-1]))
    t_sorted = torch.nn.functional.pad(t_sorted, (0, width - t_sorted.shape[-1]))
    return (s_sorted - t_sorted).abs().sum(dim=-1)


def aligned_logit_loss_reference(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_to_student: torch.Tensor | None,
    *,
    options: LogitLossOptions,
) -> torch.Tensor:
    """Straightforward full-vocabulary transcription of :func:`gold_plugin.signals.aligned_logit_loss`.

    Plain autograd, no chunking: it materialises several ``[N, V]`` tensors, projects the teacher's top-k onto
    the student vocabulary with a scatter and sorts the whole student vocabulary for ULD. ``options`` are read as
    the production loss reads them. ``student_logits`` is ``[N, V]`` (row n at position n); returns the
    per-position loss ``[N]``, 0 where every teacher slot is padded.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    n, vocab = student_logits.shape
    ids = teacher_topk_ids.to(device=student_logits.device, dtype=torch.int64)
    slot_valid = ids >= 0
    t_log = teacher_topk_logprobs.to(device=student_logits.device, dtype=dtype)
    t_log = torch.where(slot_valid, t_log, torch.full_like(t_log, float("-inf")))
    if options.teacher_temperature != 1.0:
        tau = options.teacher_temperature
        top_mass_log = torch.logsumexp(t_log, -1, keepdim=True)
        t_log = torch.log_softmax(t_log / tau, dim=-1) + top_mass_log
    t_prob = t_log.exp()
    s_log = torch.log_softmax(student_logits.to(dtype) / options.student_temperature, dim=-1)
    s_prob = s_log.exp()
    row_valid = slot_valid.any(dim=1)
    if options.alignment == "positional":
        loss = uld_distance(s_prob, torch.where(slot_valid, t_prob, torch.zeros_like(t_prob)))
        return torch.where(row_valid, loss, torch.zeros_like(loss))
    if teacher_to_student is None:
        raise ValueError("alignment='spans' needs teacher_to_student.")
    mapping = teacher_to_student.to(device=student_logits.device, dtype=torch.int64)
    lookup = pad_unmatched(mapping, int(ids.max()) if ids.numel() else -1)
    student_id = torch.where(slot_valid, lookup[ids.clamp(min=0)], -1)
    matched_slot = student_id >= 0
    # Teacher probabilities projected onto the student vocabulary; duplicates add up.
    t_on_student = torch.zeros(n, vocab, dtype=dtype, device=student_logits.device).scatter_add_(
        1, student_id.clamp(min=0), torch.where(matched_slot, t_prob, torch.zeros_like(t_prob))
    )
    # Count matched slots per student id (scatter_ would let an unmatched slot, clamped to id 0, overwrite a match).
    support = (
        torch.zeros(n, vocab, dtype=torch.int64, device=student_logits.device).scatter_add_(
            1, student_id.clamp(min=0), matched_slot.to(torch.int64)
        )
        > 0
    )
    if options.matched_normalization == "tail":
        t_rest = (1.0 - t_on_student.sum(dim=1)).clamp(min=0.0)
        s_rest = torch.where(support, torch.zeros_like(s_prob), s_prob).sum(dim=1)
        matched = generalized_jsd(
            torch.cat([s_log, s_rest.log()[:, None]], dim=1),
            torch.cat([t_on_student.log(), t_rest.log()[:, None]], dim=1),
            options.beta,
            mask=torch.cat([support, torch.ones_like(support[:, :1])], dim=1),
        )
    else:
        matched = generalized_jsd(s_log, t_on_student.log(), options.beta, mask=support)
    image = torch.zeros(vocab, dtype=torch.bool, device=student_logits.device)
    image[mapping[mapping >= 0]] = True
    student_unmatched = torch.where(image[None, :], torch.zeros_like(s_prob), s_prob)
    teacher_unmatched = torch.where(slot_valid & ~matched_slot, t_prob, torch.zeros_like(t_prob))
    unmatched = uld_distance(student_unmatched, teacher_unmatched)
    if options.matched_weight is None:
        w_m = float((mapping >= 0).sum()) / mapping.shape[0]
        w_u = 1.0 - w_m
    else:
        w_m, w_u = options.matched_weight, options.unmatched_weight
    loss = w_m * matched + w_u * unmatched
    return torch.where(row_valid, loss, torch.zeros_like(loss))
