"""Off-policy samples (GKD's ``lmbda``): which prompts of a batch train on a completion the student did not sample,
where it comes from (the dataset's reference or the teacher's, ``--gold.off_policy_source``), and how either text
becomes student response ids. The teacher call itself is the backend's (:func:`teacher_completion_call` says what
to ask; :func:`off_policy_responses` takes the answers)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gold_plugin.alignment import encode_continuation_batch
from gold_plugin.config import GoldConfig
from gold_plugin.teacher.generation import GenerationParams, TeacherGeneration
from gold_plugin.teacher.types import ChatMessages

if TYPE_CHECKING:
    from gold_plugin.alignment.types import Tokenizer

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TeacherCompletionCall:
    """The teacher completions a draw needs, as one call: the ``draw.teacher`` rows, their prompts in the call's
    order, and how to sample (None when no row needs one). The backend makes the call
    (:func:`~gold_plugin.teacher.generation.generate_counting_retries`) with the rest of its teacher I/O."""

    rows: tuple[int, ...]
    prompts: list[str | ChatMessages]
    params: GenerationParams | None


def _sort_key(prompt: str | ChatMessages | None) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def teacher_completion_call(
    draw: OffPolicyDraw,
    teacher_prompts: Sequence[str | ChatMessages | None],
    *,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int,
    step: int,
) -> TeacherCompletionCall:
    """One completion per ``draw.teacher`` prompt from ``teacher_prompts[i]`` (:func:`~gold_plugin.step.requests.
    teacher_prompt`'s rule), with the rollout's ``max_new_tokens`` (in teacher tokens), ``temperature`` (0 = greedy)
    and ``top_p``, seeded by ``(seed, step)``. The call lists the prompts in the sorted order of their texts: a
    sampled batch depends on its order, and the backends list a batch's prompts in different orders, so both get
    the same completions for the same batch."""
    if len(teacher_prompts) != len(draw.off_policy):
        raise ValueError(f"{len(teacher_prompts)} teacher prompts for {len(draw.off_policy)} prompts.")
    rows = tuple(sorted(np.flatnonzero(draw.teacher).tolist(), key=lambda i: _sort_key(teacher_prompts[i])))
    if not rows:
        return TeacherCompletionCall((), [], None)
    if max_new_tokens is None:
        raise ValueError("Teacher-written completions need a length limit (--rollout.max_new_tokens).")
    params = GenerationParams(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), 1]).generate_state(1)[0]),
    )
    prompts: list[str | ChatMessages] = []
    for i in rows:
        prompt = teacher_prompts[i]
        if prompt is None:
            raise ValueError(f"Prompt {i}, drawn for a teacher completion, has no teacher prompt.")
        prompts.append(prompt)
    return TeacherCompletionCall(rows, prompts, params)


@dataclass
class OffPolicyResponses:
    """The student's response ids of every off-policy prompt (None for on-policy prompts), and the draw after
    teacher failures (a prompt the teacher could not complete is trained on-policy, counted in
    ``missing_reference``)."""

    response_ids: list[list[int] | None]
    draw: OffPolicyDraw


def off_policy_responses(
    student_tokenizer: Tokenizer,
    draw: OffPolicyDraw,
    references: Sequence[str | None],
    call: TeacherCompletionCall,
    generations: Sequence[TeacherGeneration],
    *,
    max_new_tokens: int | None,
) -> OffPolicyResponses:
    """The off-policy completions of a batch as student response ids, one path for both sources (both backends).

    ``generations`` answer ``call`` (:func:`teacher_completion_call`), one per row in its order. A reference and a
    teacher-written text go the same way: :func:`reference_response_ids` (re-tokenised by the student as a
    continuation, cut at ``max_new_tokens``, EOS when the text ended; a teacher text cut at its length limit gets
    none). A row whose generation carries an error is trained on-policy and counted in ``missing_reference``.
    """
    count = len(references)
    if len(generations) != len(call.rows):
        raise ValueError(f"{len(generations)} teacher completions for {len(call.rows)} prompts.")
    texts: list[str | None] = [references[i] if draw.reference[i] else None for i in range(count)]
    ends: list[bool] = [True] * count
    missing = draw.missing_reference.copy()
    off = draw.off_policy.copy()
    for i, generation in zip(call.rows, generations):
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
    return OffPolicyResponses(response_ids=response_ids, draw=OffPolicyDraw(off, draw.teacher & off, missing))
