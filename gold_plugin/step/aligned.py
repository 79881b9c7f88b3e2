"""Teacher results -> alignments: every response paired with the teacher's tokens of the same text, once per batch
(:class:`AlignedBatch`), with the reason of every sample that gets no signal."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gold_plugin.alignment import Alignment, align_batch, token_byte_lengths
from gold_plugin.alignment.flat import FlatAlignment
from gold_plugin.config import GoldConfig
from gold_plugin.teacher.types import TeacherResult

if TYPE_CHECKING:
    from gold_plugin.alignment.types import TokenIds, Tokenizer


def mask_unscored_groups(alignment: Alignment, teacher_logprobs: np.ndarray) -> Alignment:
    """Drop the groups that hold a teacher token without a log-prob (NaN: it did not fit the teacher's context)
    and renumber the rest ``0..n-1``, so that every later step sees only scored groups (the alignment contract,
    every group on both sides, still holds). The only place where unscored teacher tokens are handled."""
    unscored = np.isnan(np.asarray(teacher_logprobs, dtype=np.float64))
    if not unscored.any() or not alignment.aligned:
        return alignment
    t_group = np.asarray(alignment.teacher_group)
    bad = np.unique(t_group[unscored & (t_group >= 0)])
    keep = np.setdiff1d(np.arange(alignment.num_groups), bad)
    renumber = np.full(alignment.num_groups + 1, -1, dtype=np.int64)  # the last slot maps -1 to -1
    renumber[keep] = np.arange(keep.size)
    s_group = renumber[np.asarray(alignment.student_group)]
    t_group = renumber[t_group]
    t_group[unscored] = -1
    return dataclasses.replace(
        alignment, student_group=s_group, teacher_group=t_group, num_groups=int(keep.size)
    )


@dataclass
class AlignedBatch:
    """A batch's teacher results aligned to the student's responses, built once per batch by
    :func:`align_results`; the distillation advantages, the signal mask and the logit-loss inputs all read it."""

    alignments: list[Alignment]
    """One per sample: unscored groups already removed (:func:`mask_unscored_groups`); unalignable samples carry
    the reason. The logit-loss inputs read their byte ends."""
    flat: FlatAlignment
    """The same alignments as flat arrays with global group ids (the advantages and the signal mask read these)."""
    teacher_logprobs: torch.Tensor
    """float32 ``[T]``: the teacher's log-prob of every teacher response token, in ``flat.teacher_group``'s order
    (NaN only at tokens outside every group)."""
    results: list[TeacherResult | None]
    teacher_failed: torch.Tensor
    """``[B]`` bool: no teacher result, or the teacher reported an error for the sample."""
    masked_tokens: torch.Tensor
    """``[B]`` float: teacher tokens that did not fit the teacher's context."""
    prompt_truncated: torch.Tensor
    """``[B]`` bool: the teacher's prompt was cut to fit its context (the sample gets no signal)."""
    empty_response: torch.Tensor
    """``[B]`` bool: the response has no text (only EOS / zero-width special tokens, or no token at all)."""

    @property
    def usable_results(self) -> list[TeacherResult | None]:
        """The teacher result of every sample, None where it failed."""
        return [r if r is not None and r.error is None else None for r in self.results]


def align_results(
    student_tokenizer: Tokenizer,
    teacher_tokenizer: Tokenizer,
    response_ids: Sequence[Sequence[int] | np.ndarray],
    results: Sequence[TeacherResult | None],
    gold: GoldConfig,
    problems: Sequence[str | None] | None = None,
) -> AlignedBatch:
    """Align every response with the teacher's tokens of the same text; never raises for one bad sample.

    A missing result (``None``; ``problems[b]`` says why) or a teacher error becomes an unalignable sample that
    carries the reason (``teacher: <error>``) and gets no signal; so does a sample whose teacher prompt was cut
    to fit the teacher's context (the teacher scored the response after another prompt than the student's).
    Groups holding an unscored teacher token are removed. The other samples are aligned in one
    :func:`~gold_plugin.alignment.align_batch` call. A response without text (EOS at once, or only zero-width
    special tokens) is aligned like any other, its end paired with the teacher's end-of-turn, and marked in
    ``empty_response``.
    """
    if len(results) != len(response_ids):
        raise ValueError(f"{len(results)} teacher results for {len(response_ids)} responses.")
    count = len(response_ids)
    alignments: list[Alignment | None] = [None] * count
    logprobs: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * count
    failed = torch.zeros(count, dtype=torch.bool)
    cut = torch.zeros(count, dtype=torch.bool)
    masked = torch.zeros(count)
    todo = []
    for b, (ids, result) in enumerate(zip(response_ids, results)):
        if result is None or result.error is not None:
            if result is None:
                reason = (problems[b] if problems is not None else None) or "no teacher result"
            else:
                reason = f"teacher: {result.error}"
            alignments[b] = Alignment.unalignable(len(ids), 0, reason)
            failed[b] = True
            continue
        masked[b] = float(result.num_masked)
        if result.num_prompt_truncated > 0:
            reason = (
                f"teacher: prompt cut by {result.num_prompt_truncated} tokens to fit the teacher's context"
            )
            alignments[b] = Alignment.unalignable(len(ids), 0, reason)
            cut[b] = True
            continue
        todo.append(b)
    aligned = align_batch(
        student_tokenizer,
        [response_ids[b] for b in todo],
        teacher_tokenizer,
        [results[b].token_ids for b in todo],
        pair_eos=gold.pair_eos,
        mode=gold.alignment,
    )
    for b, alignment in zip(todo, aligned):
        values = np.array(results[b].logprobs, dtype=np.float32)  # a copy: results may be read-only arrays
        alignments[b] = mask_unscored_groups(alignment, values)
        logprobs[b] = values
    complete = [a for a in alignments if a is not None]
    if len(complete) != count:
        raise RuntimeError(
            f"{count - len(complete)} of {count} samples were neither aligned nor marked unalignable."
        )
    return AlignedBatch(
        alignments=complete,
        flat=FlatAlignment.build(complete),
        teacher_logprobs=torch.from_numpy(np.concatenate(logprobs) if logprobs else np.zeros(0, np.float32)),
        results=list(results),
        teacher_failed=failed,
        masked_tokens=masked,
        prompt_truncated=cut,
        empty_response=_without_text(student_tokenizer, response_ids),
    )


def _without_text(student_tokenizer: Tokenizer, response_ids: Sequence[TokenIds]) -> torch.Tensor:
    """``[B]`` bool: responses whose tokens carry no byte (no token, or only zero-width special tokens); an id
    outside the tokenizer counts as text (the alignment reports it)."""
    lengths = token_byte_lengths(student_tokenizer)
    counts = [len(ids) for ids in response_ids]
    if not counts:
        return torch.zeros(0, dtype=torch.bool)
    flat = np.concatenate([np.asarray(ids, dtype=np.int64).reshape(-1) for ids in response_ids])
    inside = (flat >= 0) & (flat < lengths.shape[0])
    width = np.where(inside, lengths[np.where(inside, flat, 0)], 1)
    sample = np.repeat(np.arange(len(counts)), counts)
    return torch.from_numpy(np.bincount(sample, weights=width, minlength=len(counts)) == 0)
