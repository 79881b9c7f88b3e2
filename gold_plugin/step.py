"""The GOLD step, written once and called by both backends (OpenRLHF and local).

Rollout -> teacher requests -> teacher results -> alignments -> distillation advantages (normalised, mixed with
the task-reward advantages) and logit-loss inputs -> per-position logit loss -> one reduction -> one set of
metrics. The backends are adapters around these functions: they sample, run the model forwards and the
optimiser, and move tensors between processes; every GOLD decision is made here (docs/signals.md, "The GOLD
step").

Two functions are the hook for the logit loss, so that another kind of logit loss plugs in at exactly these two
places: :func:`build_logit_inputs` (alignments, teacher results, student ids, action mask -> inputs whose
``positions`` are ``(row, action column)`` pairs and whose ``sample_index`` names each position's sample) and
:func:`compute_logit_loss` (student logits ``[B, T, V]``, those inputs, config -> per-position loss).

Imports alignment, signals and the teacher's types and generation contract; never Ray or OpenRLHF.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gold_plugin.alignment import (
    Alignment,
    align_batch,
    encode_continuation_batch,
    text_for_teacher,
    token_byte_lengths,
)
from gold_plugin.alignment.flat import FlatAlignment
from gold_plugin.alignment.sorted_vocab import SortedVocab, sorted_vocab
from gold_plugin.config import GoldConfig
from gold_plugin.signals.advantages import DistillAdvantages, batch_distill_advantages, mix_advantages
from gold_plugin.signals.estimators import normalise_advantages
from gold_plugin.signals.logit import (
    LogitLoss,
    LogitLossInputs,
    LogitLossOptions,
    ProjectionInputs,
    ProjectionPositions,
    ProjectionVocab,
    aligned_logit_loss,
    logit_loss_inputs,
    projected_logit_loss,
    projection_positions,
)
from gold_plugin.teacher.generation import GenerationParams, generate_counting_retries
from gold_plugin.teacher.types import ChatMessages, TeacherRequest, TeacherResult, TeacherScorer

if TYPE_CHECKING:
    from gold_plugin.alignment.types import TokenIds, Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "AlignedBatch",
    "LogitVocab",
    "align_results",
    "build_logit_inputs",
    "chat_messages",
    "choose_off_policy",
    "draw_off_policy",
    "off_policy_responses",
    "OffPolicyDraw",
    "OffPolicyResponses",
    "compute_logit_loss",
    "distill_advantages",
    "gold_advantages",
    "logit_loss_term",
    "logit_metrics",
    "mask_unscored_groups",
    "mean_metrics",
    "per_unit_means",
    "reference_response_ids",
    "reference_text",
    "response_ends_with_eos",
    "sample_metrics",
    "sum_per_sample_key",
    "teacher_prompt",
    "teacher_requests",
]


# ── off-policy samples (GKD's lmbda) ──


def reference_text(value: object) -> str | None:
    """A dataset's reference completion (``--data.output_key``) as text, or None if the row has none.

    A string is the completion; chat messages give the content of the last one (the assistant's answer).
    An empty string, None or anything else counts as missing (the prompt is then trained on-policy).
    """
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        value = value[-1].get("content")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else None


def choose_off_policy(
    references: Sequence[str | None], lmbda: float, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which prompts of a batch use their reference completion instead of a student sample (GKD's lmbda).

    ``round((1 - lmbda) * P)`` of the ``P`` prompts are drawn without replacement, seeded by ``(seed, step)``
    so that both backends and a resumed run draw the same. Returns ``(off_policy, missing_reference)``, both
    ``[P]`` bool: a drawn prompt without a reference completion is trained on-policy (never dropped) and marked
    in ``missing_reference``.
    """
    count = len(references)
    chosen = np.zeros(count, dtype=bool)
    num_off = int(np.floor((1.0 - float(lmbda)) * count + 0.5))
    if num_off > 0:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]))
        chosen[rng.choice(count, size=min(num_off, count), replace=False)] = True
    has_reference = np.array([r is not None for r in references], dtype=bool)
    return chosen & has_reference, chosen & ~has_reference


def reference_response_ids(
    student_tokenizer: Tokenizer,
    texts: Sequence[str],
    max_new_tokens: int | None,
    ends: Sequence[bool] | None = None,
) -> list[list[int]]:
    """The student's response ids for reference completions: the text as a continuation of the prompt (no
    dummy-prefix space, special-token strings as text), cut at ``max_new_tokens``, then the student's EOS when
    there is room (as a sampled response that ended). ``ends[i]`` False (a teacher completion cut at its length
    limit) leaves the EOS out."""
    eos = student_tokenizer.eos_token_id
    if ends is not None and len(ends) != len(texts):
        raise ValueError(f"{len(ends)} end flags for {len(texts)} completions.")
    out = []
    for i, ids in enumerate(encode_continuation_batch(student_tokenizer, list(texts))):
        if max_new_tokens is not None and len(ids) >= max_new_tokens:
            out.append(list(ids[:max_new_tokens]))
        else:
            ended = ends is None or bool(ends[i])
            out.append(list(ids) + ([eos] if eos is not None and ended else []))
    return out


@dataclass(frozen=True)
class OffPolicyDraw:
    """Which prompts of a batch train on a completion the student did not sample, and where it comes from; every
    field is ``[P]`` bool."""

    off_policy: np.ndarray
    """The prompt's samples are an off-policy completion (the dataset's reference or the teacher's)."""
    teacher: np.ndarray
    """... written by the teacher (a subset of ``off_policy``)."""
    missing_reference: np.ndarray
    """Drawn, but without a completion (no reference, or the teacher could not write one): trained on-policy."""

    @property
    def reference(self) -> np.ndarray:
        """Off-policy prompts whose completion is the dataset's reference."""
        return self.off_policy & ~self.teacher


def draw_off_policy(
    references: Sequence[str | None],
    gold: GoldConfig,
    seed: int,
    step: int,
    prompts: Sequence[str] | None = None,
) -> OffPolicyDraw:
    """The off-policy prompts of a batch and their source (``--gold.off_policy_source``), both backends.

    The prompts drawn are :func:`choose_off_policy`'s whatever the source (the same seed draws the same prompts),
    made over the prompts in the sorted order of their texts ``prompts`` when given (the backends list a batch's
    prompts in different orders: OpenRLHF in vLLM's completion order, the local backend in the data's), so both
    backends draw the same prompts of the same batch.
    ``reference``: a drawn prompt without reference is trained on-policy (``missing_reference``); ``teacher``:
    every drawn prompt gets the teacher's completion; ``reference_or_teacher``: the reference where the row has
    one, else the teacher's.
    """
    count = len(references)
    none = np.zeros(count, dtype=bool)
    if not gold.uses_off_policy:
        return OffPolicyDraw(none, none.copy(), none.copy())
    order = (
        np.argsort(np.asarray(prompts, dtype=object), kind="stable")
        if prompts is not None
        else np.arange(count)
    )
    sorted_with, sorted_without = choose_off_policy([references[i] for i in order], gold.lmbda, seed, step)
    with_reference, without = none.copy(), none.copy()
    with_reference[order], without[order] = sorted_with, sorted_without
    if gold.off_policy_source == "reference":
        return OffPolicyDraw(with_reference, none, without)
    if gold.off_policy_source == "teacher":
        drawn = with_reference | without
        return OffPolicyDraw(drawn, drawn.copy(), none)
    return OffPolicyDraw(with_reference | without, without, none)


@dataclass
class OffPolicyResponses:
    """The student's response ids of every off-policy prompt (None for on-policy prompts), the draw after
    teacher failures (a prompt the teacher could not complete is trained on-policy, counted in
    ``missing_reference``), and the teacher call's retries and seconds."""

    response_ids: list[list[int] | None]
    draw: OffPolicyDraw
    teacher_retries: int = 0
    teacher_seconds: float = 0.0


def _sort_key(prompt: str | ChatMessages | None) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def off_policy_responses(
    student_tokenizer: Tokenizer,
    draw: OffPolicyDraw,
    references: Sequence[str | None],
    teacher_prompts: Sequence[str | ChatMessages | None],
    teacher: TeacherScorer,
    *,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int,
    step: int,
) -> OffPolicyResponses:
    """The off-policy completions of a batch as student response ids, one path for both sources (both backends).

    A reference and a teacher-written text go the same way: :func:`reference_response_ids` (re-tokenised by the
    student as a continuation, cut at ``max_new_tokens``, EOS when the text ended; a teacher text cut at its
    length limit gets none). The teacher writes one completion per ``draw.teacher`` prompt from
    ``teacher_prompts[i]`` (:func:`teacher_prompt`'s rule), with the rollout's ``max_new_tokens`` (in teacher
    tokens), ``temperature`` (0 = greedy) and ``top_p``, seeded by ``(seed, step)``, in one call that lists the
    prompts in the sorted order of their texts: a sampled batch depends on its order, and the backends list a
    batch's prompts in different orders, so both get the same completions for the same batch.
    """
    count = len(references)
    if len(teacher_prompts) != count:
        raise ValueError(f"{len(teacher_prompts)} teacher prompts for {count} prompts.")
    texts: list[str | None] = [references[i] if draw.reference[i] else None for i in range(count)]
    ends: list[bool] = [True] * count
    teacher_rows = sorted(np.flatnonzero(draw.teacher).tolist(), key=lambda i: _sort_key(teacher_prompts[i]))
    missing = draw.missing_reference.copy()
    off = draw.off_policy.copy()
    retries, seconds = 0, 0.0
    if teacher_rows:
        if max_new_tokens is None:
            raise ValueError("Teacher-written completions need a length limit (--rollout.max_new_tokens).")
        params = GenerationParams(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            seed=int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 1]).generate_state(1)[0]),
        )
        start = time.perf_counter()
        generations, retries = generate_counting_retries(
            teacher, [teacher_prompts[i] for i in teacher_rows], params
        )
        seconds = time.perf_counter() - start
        for i, generation in zip(teacher_rows, generations):
            if generation.error is not None:
                logger.warning(
                    "The teacher could not complete off-policy prompt %d (trained on-policy): %s",
                    i,
                    generation.error,
                )
                off[i], missing[i] = False, True
                continue
            texts[i], ends[i] = generation.text, generation.finished
    rows = [i for i in range(count) if off[i]]
    ids = reference_response_ids(
        student_tokenizer, [texts[i] for i in rows], max_new_tokens, [ends[i] for i in rows]
    )
    response_ids: list[list[int] | None] = [None] * count
    for i, response in zip(rows, ids):
        response_ids[i] = response
    return OffPolicyResponses(
        response_ids=response_ids,
        draw=OffPolicyDraw(off, draw.teacher & off, missing),
        teacher_retries=retries,
        teacher_seconds=seconds,
    )


# ── teacher requests ──


def chat_messages(value: object) -> ChatMessages | None:
    """A dataset's prompt column as chat messages (a string becomes one user turn); None if it is neither."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m for m in value):
        return [dict(copy.deepcopy(m)) for m in value]
    return None


def teacher_prompt(
    student_prompt: str, messages: ChatMessages | None, gold: GoldConfig, chat_template_applied: bool
) -> tuple[str | ChatMessages, bool]:
    """The teacher's prompt for one sample, and whether it fell back to the student's text (both backends).

    With ``--gold.teacher.chat_template teacher`` and a student prompt rendered from chat messages
    (``--data.apply_chat_template``), the teacher gets the raw ``messages`` to render with its own template;
    without messages for the row it gets the student's prompt text, and that fallback is counted
    (``gold/teacher_prompt_fallback``). Otherwise (``student``, or a prompt used as plain text) both models read
    the same prompt text.
    """
    if gold.teacher.chat_template == "student" or not chat_template_applied:
        return student_prompt, False
    if messages is None:
        return student_prompt, True
    return messages, False


def response_ends_with_eos(student_tokenizer: Tokenizer, response_ids: TokenIds) -> bool:
    """True when the response's last token is a zero-width special token (EOS / end of turn): the teacher then
    scores its own end-of-turn token in its place."""
    ids = np.asarray(response_ids)
    if ids.size == 0:
        return False
    last = int(ids[-1])
    lengths = token_byte_lengths(student_tokenizer)
    special = set(getattr(student_tokenizer, "all_special_ids", None) or [])
    return last in special and 0 <= last < lengths.shape[0] and int(lengths[last]) == 0


def teacher_requests(
    student_tokenizer: Tokenizer,
    response_ids: Sequence[TokenIds],
    teacher_prompts: Sequence[str | ChatMessages],
) -> list[TeacherRequest]:
    """One teacher request per response: the teacher prompt (chat messages or text) and the response text rebuilt
    from the student's canonical token bytes (not ``decode``), without a final EOS, which becomes
    ``ends_with_eos``."""
    if len(response_ids) != len(teacher_prompts):
        raise ValueError(f"{len(response_ids)} responses but {len(teacher_prompts)} teacher prompts.")
    requests = []
    for ids, prompt in zip(response_ids, teacher_prompts):
        ids = np.asarray(ids, dtype=np.int64)
        ends = response_ends_with_eos(student_tokenizer, ids)
        text = text_for_teacher(student_tokenizer, ids[:-1] if ends else ids)
        requests.append(TeacherRequest(prompt=prompt, response=text, ends_with_eos=ends))
    return requests


# ── teacher results -> alignments ──


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
    return AlignedBatch(
        alignments=alignments,  # type: ignore[arg-type]
        flat=FlatAlignment.build(alignments),  # type: ignore[arg-type]
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


# ── distillation advantages ──


def distill_advantages(
    aligned: AlignedBatch, action_log_probs: torch.Tensor, action_mask: torch.Tensor, gold: GoldConfig
) -> tuple[DistillAdvantages, torch.Tensor]:
    """Raw per-token distillation advantages ``-sum_g' gamma^(g'-g) d_g'`` in the ``[B, A]`` action layout, and
    the ``[B, A]`` bool mask of the tokens that carry a signal (tokens of scored groups)."""
    mask = action_mask.to(torch.bool)
    distill = batch_distill_advantages(
        aligned.flat,
        aligned.teacher_logprobs,
        action_log_probs.float(),
        mask,
        kl_discount=gold.kl_discount,
        length_normalised=gold.kl_length_normalised,
    )
    signal = torch.zeros_like(mask)
    signal[mask] = torch.from_numpy(aligned.flat.student_group >= 0).to(mask.device)
    return distill, signal


def gold_advantages(
    reward_advantages: Sequence[torch.Tensor | None] | None,
    distill: Sequence[torch.Tensor],
    signal_masks: Sequence[torch.Tensor],
    off_policy: Sequence[torch.Tensor],
    gold: GoldConfig,
) -> list[torch.Tensor]:
    """The advantages the policy loss sees, for a whole rollout given as parts (OpenRLHF's micro-batches, or one
    part for the local backend):

    ``A = (1 - alpha) A_reward + alpha kl_coef norm(A_distill)``, and 0 on off-policy samples (no policy gradient
    on text the student did not sample). ``norm`` is ``--gold.advantage_norm`` over the signal-carrying tokens of
    the on-policy samples of all parts together; with ``--gold.signal logit`` the distillation part is 0.
    ``reward_advantages`` is never read when ``alpha == 1`` (may be None).
    """
    parts = len(distill)
    if len(signal_masks) != parts or len(off_policy) != parts:
        raise ValueError("distill, signal_masks and off_policy need one entry per part.")
    on_policy_signal = [
        s.to(torch.bool) & ~o.to(device=s.device, dtype=torch.bool)[:, None]
        for s, o in zip(signal_masks, off_policy)
    ]
    if gold.uses_advantages:
        normed = normalise_advantages(distill, on_policy_signal, gold.advantage_norm)
    else:
        normed = [torch.zeros_like(d, dtype=torch.float32) for d in distill]
    out = []
    for b in range(parts):
        reward = reward_advantages[b] if (reward_advantages is not None and gold.alpha < 1.0) else None
        mixed = mix_advantages(reward, normed[b], gold.alpha, gold.advantage_weight)
        off = off_policy[b].to(torch.bool).to(mixed.device)
        if bool(off.any()):
            mixed = torch.where(off[:, None], torch.zeros((), dtype=mixed.dtype, device=mixed.device), mixed)
        out.append(mixed)
    return out


# ── the logit loss: inputs, per-position loss, one reduction ──


@dataclass(frozen=True)
class LogitVocab:
    """What the logit loss needs of the tokenizer pair, built once per run (on both the rollout and the training
    side) and moved once to the device where the loss runs (:meth:`to`)."""

    teacher_to_student: torch.Tensor | None = None
    """int64 ``[teacher vocabulary]``, -1 = unmatched (``--gold.logit_projection vocab``)."""
    sorted: SortedVocab | None = None
    """The byte-sorted student vocabulary (``--gold.logit_projection bytes``): builds the compact inputs."""
    projection: ProjectionVocab | None = None
    """Its tensors and the pair's tables, for the loss (which expands the compact inputs on its device)."""
    student_end_ids: tuple[int, ...] = ()
    """The student's EOS: its probability is the end event of the byte projection."""
    teacher_end_ids: tuple[int, ...] = ()
    """The teacher's special ids (EOS, end-of-turn, ...): one end event."""

    def to(self, device: torch.device | str) -> LogitVocab:
        """The pair's tensors (the vocabulary map, the projection's vocabulary and tables) on ``device``; the
        byte-sorted vocabulary stays on the host, where the rollout side builds the compact inputs."""
        return dataclasses.replace(
            self,
            teacher_to_student=None
            if self.teacher_to_student is None
            else self.teacher_to_student.to(device),
            projection=None if self.projection is None else self.projection.to(device),
        )

    @classmethod
    def build(
        cls, student_tokenizer: Tokenizer, teacher_tokenizer: Tokenizer, gold: GoldConfig
    ) -> LogitVocab:
        if not gold.uses_logit_loss or gold.alignment == "positional":
            return cls()
        if gold.logit_projection == "bytes":
            vocab = sorted_vocab(student_tokenizer, teacher_tokenizer)
            eos = getattr(student_tokenizer, "eos_token_id", None)
            student_end_ids = (int(eos),) if isinstance(eos, int) else ()
            teacher_end_ids = tuple(int(i) for i in getattr(teacher_tokenizer, "all_special_ids", []) or [])
            return cls(
                sorted=vocab,
                projection=ProjectionVocab.from_sorted(
                    vocab, student_end_ids=student_end_ids, teacher_end_ids=teacher_end_ids
                ),
                student_end_ids=student_end_ids,
                teacher_end_ids=teacher_end_ids,
            )
        from gold_plugin.alignment import VocabMap

        return cls(VocabMap(student_tokenizer, teacher_tokenizer).teacher_to_student_tensor())

    def check(self, gold: GoldConfig) -> None:
        if not gold.uses_logit_loss or gold.alignment != "spans":
            return
        if gold.logit_projection == "bytes" and self.projection is None:
            raise ValueError("The byte-projected logit loss needs the byte-sorted student vocabulary.")
        if gold.logit_projection == "vocab" and self.teacher_to_student is None:
            raise ValueError(
                "The logit loss with --gold.alignment spans needs the teacher->student vocabulary map."
            )


def _projects_bytes(gold: GoldConfig) -> bool:
    return gold.alignment == "spans" and gold.logit_projection == "bytes"


def build_logit_inputs(
    aligned: AlignedBatch,
    response_ids: Sequence[Sequence[int] | np.ndarray],
    action_mask: torch.Tensor,
    gold: GoldConfig,
    vocab: LogitVocab | None = None,
) -> LogitLossInputs | ProjectionPositions:
    """The logit-loss inputs of a batch (hook 1 of 2), on the CPU, as they travel to the loss; the byte projection
    needs ``vocab`` (:meth:`LogitVocab.build`) and gives its compact per-position form (the loss expands it on its
    own device, docs/signals.md). Row b of ``action_mask`` holds sample b, whose action tokens in order are
    ``response_ids[b]``.

    ``positions`` are ``(row, action column)`` pairs (column j = the action token that the logits at action
    column j predict), ``sample_index`` the row of each position; every other field is per position
    (first dimension N). Samples without teacher top-k or without alignment contribute nothing.
    """
    counts = action_mask.to(torch.bool).sum(dim=1).cpu().numpy()
    aligned.flat.check_actions(counts)
    for b, ids in enumerate(response_ids):
        if len(ids) != counts[b]:
            raise ValueError(
                f"Sample {b}: {len(ids)} response ids but action_mask marks {counts[b]} actions."
            )
    results = aligned.usable_results
    topk_ids = [r.topk_ids if r is not None else None for r in results]
    topk_logprobs = [r.topk_logprobs if r is not None else None for r in results]
    if _projects_bytes(gold):
        if vocab is None or vocab.sorted is None:
            raise ValueError("--gold.logit_projection bytes: pass the LogitVocab built for it.")
        return projection_positions(
            vocab.sorted, aligned.alignments, response_ids, topk_ids, topk_logprobs, action_mask
        )
    return logit_loss_inputs(aligned.alignments, topk_ids, topk_logprobs, action_mask)


def _shift_columns(positions: torch.Tensor, offset: int) -> torch.Tensor:
    """``(row, column)`` pairs with ``offset`` added to the columns, on the pairs' own device and dtype."""
    return positions + torch.tensor([0, int(offset)], dtype=positions.dtype, device=positions.device)


def compute_logit_loss(
    student_logits: torch.Tensor,
    inputs: LogitLossInputs | ProjectionPositions | ProjectionInputs,
    gold: GoldConfig,
    vocab: LogitVocab,
    *,
    action_offset: int = 0,
    logits_temperature: float = 1.0,
) -> LogitLoss:
    """Per-position logit loss (hook 2 of 2): ``loss [N]`` (differentiable) and ``valid [N]``.

    ``student_logits`` is ``[B, T, V]`` where ``student_logits[b, action_offset + j]`` predicts action token j of
    row b (OpenRLHF's actor logits: offset ``T - 1 - num_actions``; the local backend's action logits: 0).
    ``inputs`` are on the logits' device already (each backend moves them there once: OpenRLHF's actor when it
    unpacks them, the local backend when it builds a step's inputs); the byte projection's compact positions are
    expanded there.

    The student distribution of the loss is the model's own, divided by ``--gold.uld_student_temperature`` only
    (TRL's GOLD): the rollout temperature is a sampling choice. ``logits_temperature`` is the temperature the given
    logits were already divided by (both backends divide by ``--rollout.temperature`` before the policy loss);
    it is undone inside the loss's own scaling, without a copy of the logits.
    """
    if logits_temperature <= 0:
        raise ValueError(f"logits_temperature must be > 0, got {logits_temperature}.")
    student_temperature = gold.uld_student_temperature / float(logits_temperature)
    if isinstance(inputs, (ProjectionPositions, ProjectionInputs)):
        if action_offset:
            inputs = dataclasses.replace(
                inputs,
                positions=_shift_columns(inputs.positions, action_offset),
                path_columns=inputs.path_columns + int(action_offset),
            )
        return projected_logit_loss(
            student_logits,
            inputs,
            vocab.projection,
            options=LogitLossOptions.from_config(gold, student_temperature=student_temperature),
        )
    positions = inputs.positions
    if action_offset:
        positions = _shift_columns(positions, action_offset)
    return aligned_logit_loss(
        student_logits,
        inputs.teacher_topk_ids,
        inputs.teacher_topk_logprobs,
        _on_logits_device(vocab.teacher_to_student, student_logits),
        positions=positions,
        options=LogitLossOptions.from_config(gold, student_temperature=student_temperature),
    )


def _on_logits_device(mapping: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    if mapping is not None and mapping.device != logits.device:
        raise ValueError(
            f"The vocabulary map is on {mapping.device}, the student logits on {logits.device}: move the "
            "LogitVocab once with .to(device) where the loss runs."
        )
    return mapping


def logit_loss_term(
    per_position_loss: torch.Tensor, num_action_tokens: float | torch.Tensor, gold: GoldConfig
) -> torch.Tensor:
    """The term added to the policy loss: ``alpha * logit_coef * sum(loss) / num_action_tokens``.

    ``num_action_tokens`` is the action-token count of the whole optimiser step (OpenRLHF's token-mean
    normaliser): the logit loss is reduced exactly like the token-mean policy loss, so ``--gold.logit_coef``
    means the same in both backends. Positions from micro-batches of one step add up to one step's loss.
    """
    total = per_position_loss.sum()
    return (
        gold.alpha
        * gold.logit_loss_weight
        * total
        / torch.as_tensor(num_action_tokens, dtype=total.dtype, device=total.device).clamp(min=1.0)
    )


# ── metrics (one set of names; per-sample values, logged as means over samples) ──


def sample_metrics(
    aligned: AlignedBatch,
    distill: DistillAdvantages,
    off_policy: torch.Tensor,
    missing_reference: torch.Tensor,
    prompt_fallback: torch.Tensor | None = None,
    off_policy_teacher: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample ``[B]`` float32 metrics of the step; both backends log their mean over the samples.
    ``off_policy_teacher`` marks the off-policy samples the teacher wrote (the rest are the dataset's)."""
    batch = distill.aligned.shape[0]
    off = off_policy.to(torch.float32).reshape(batch)
    by_teacher = (
        torch.zeros(batch)
        if off_policy_teacher is None
        else off_policy_teacher.to(torch.float32).reshape(batch)
    )
    return {
        "gold/sampled_kl": distill.kl_sum.float(),
        "gold/sampled_kl_per_group": distill.kl_mean.float(),
        "gold/aligned_token_share": distill.aligned_token_fraction.float(),
        "gold/one_to_one_group_share": distill.one_to_one_fraction.float(),
        "gold/unaligned": (~distill.aligned).to(torch.float32),
        "gold/teacher_failed": aligned.teacher_failed.to(torch.float32),
        "gold/teacher_masked_tokens": aligned.masked_tokens.to(torch.float32),
        "gold/teacher_prompt_truncated": aligned.prompt_truncated.to(torch.float32),
        "gold/empty_response": aligned.empty_response.to(torch.float32),
        "gold/teacher_prompt_fallback": (
            torch.zeros(batch)
            if prompt_fallback is None
            else prompt_fallback.to(torch.float32).reshape(batch)
        ),
        "gold/on_policy": 1.0 - off,
        "gold/off_policy": off,
        "gold/off_policy_reference": off - by_teacher,
        "gold/off_policy_teacher": by_teacher,
        "gold/missing_reference": missing_reference.to(torch.float32).reshape(batch),
    }


PER_UNIT_MEANS = {
    "gold/logit_loss": "gold/logit_positions",
    "gold/projection_remainder": "gold/logit_positions",
    "gold/hidden_state_loss": "gold/hidden_state_groups",
}
"""The metrics that are means per teacher position or per group, each with the per-sample count it is a mean over.
A micro-batch logs such a metric as its sum per sample (:func:`sum_per_sample_key`), which a sample-weighted mean
over micro-batches and data-parallel ranks (OpenRLHF's reduction) turns into the step's sum per sample whatever the
grouping; :func:`per_unit_means` divides it by the step's count per sample. A mean of per-micro-batch means would
depend on how samples fall into micro-batches and ranks."""


def sum_per_sample_key(name: str) -> str:
    """The key under which a micro-batch logs the metric ``name`` of :data:`PER_UNIT_MEANS` as a sum per sample."""
    return f"{name}/sum_per_sample"


def per_unit_means(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` (a step's sample-weighted means) with each :func:`sum_per_sample_key` entry replaced by its mean
    per position or group (the sum per sample over the count per sample; 0 where the count is 0)."""
    means = dict(metrics)
    for name, count_key in PER_UNIT_MEANS.items():
        total = means.pop(sum_per_sample_key(name), None)
        if total is not None:
            count = float(means.get(count_key, 0.0))
            means[name] = float(total) / count if count > 0 else 0.0
    return means


def logit_metrics(loss: LogitLoss, batch_size: int) -> dict[str, torch.Tensor]:
    """A micro-batch's logit metrics, per sample of its ``batch_size``: ``gold/logit_positions`` (the computed
    positions), and the sums of ``gold/logit_loss`` and, for the byte projection, ``gold/projection_remainder`` (the
    teacher's remainder-bucket probability) under their :func:`sum_per_sample_key`; :func:`per_unit_means` gives
    their means per position over a step."""
    per_sample = 1.0 / max(int(batch_size), 1)
    metrics = {
        "gold/logit_positions": loss.valid.sum().to(torch.float32) * per_sample,
        sum_per_sample_key("gold/logit_loss"): loss.loss.detach().sum() * per_sample,
    }
    if loss.teacher_remainder is not None:
        remainder = torch.where(loss.valid, loss.teacher_remainder.detach(), 0.0)
        metrics[sum_per_sample_key("gold/projection_remainder")] = remainder.sum() * per_sample
    return metrics


def mean_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means over samples, as OpenRLHF logs per-sample info (the local backend's logging)."""
    return {k: float(v.double().mean()) if v.numel() else 0.0 for k, v in metrics.items()}
