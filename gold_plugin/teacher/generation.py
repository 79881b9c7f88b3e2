"""The teacher's generation contract: prompts in, completion texts out (GKD's teacher-generated off-policy samples,
TRL's ``seq_kd``), and the part both backends share (prompt ids fitted to the context, decoding).

No Ray and no vLLM here; :class:`~gold_plugin.teacher.hf.HFTeacher`, :class:`~gold_plugin.teacher.vllm_backend.
VLLMTeacher` and :class:`~gold_plugin.teacher.ray_group.TeacherGroup` implement ``generate(prompts, params)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gold_plugin.teacher.prepare import RequestEncoder, RequestRejected, fit_to_context

Prompt = str | list[dict[str, Any]]
"""Chat messages (rendered with the teacher's own template and its generation prompt) or text used verbatim."""


@dataclass(frozen=True)
class GenerationParams:
    """How the teacher samples. ``temperature`` 0 is greedy (``top_p`` is then unused)."""

    max_new_tokens: int
    """Most teacher tokens per completion (fewer when the prompt leaves less room in the teacher's context)."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    """Seeds the sampling: the same prompts, parameters and teacher layout give the same completions."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TeacherGeneration:
    """One completion: its text (the new tokens decoded without special tokens), whether the teacher ended it
    (its end-of-turn or EOS token, not part of the text) and how many teacher tokens it holds (without that end
    token). ``error`` (then ``text`` is empty) says why a prompt could not be completed (a chat prompt for a
    tokenizer without template, a template that rejects the messages); the other prompts are unaffected."""

    text: str
    finished: bool
    num_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt's teacher ids, cut from the left (a leading BOS kept) so that they and ``max_new_tokens`` new
    tokens fit the teacher's context."""

    input_ids: np.ndarray
    max_new_tokens: int


def prepare_prompts(
    encoder: RequestEncoder, prompts: Sequence[Prompt], max_new_tokens: int
) -> list[PreparedPrompt | str]:
    """Per prompt its :class:`PreparedPrompt`, or the reason it cannot be completed (by the scoring rule:
    :meth:`RequestEncoder.prompt_ids`, the teacher's own chat template for chat messages)."""
    out: list[PreparedPrompt | str] = []
    for prompt in prompts:
        try:
            ids = encoder.prompt_ids(prompt)
        except RequestRejected as exc:
            out.append(str(exc))
            continue
        except Exception as exc:  # a tokenizer crash on odd text must not kill the batch
            out.append(f"the teacher tokenizer failed on this prompt: {type(exc).__name__}: {exc}")
            continue
        protected = (
            1 if ids.size and encoder.bos_token_id is not None and ids[0] == encoder.bos_token_id else 0
        )
        kept, room, _ = fit_to_context(ids, max_new_tokens, encoder.max_context, protected)
        if room < 1:
            out.append(f"no room for a new token in the teacher's context of {encoder.max_context} tokens")
            continue
        out.append(PreparedPrompt(np.asarray(kept, dtype=np.int64), int(room)))
    return out


def stop_ids(encoder: RequestEncoder) -> list[int]:
    """The ids that end a completion: the teacher's end-of-turn token (the one scoring appends) and its EOS."""
    eos = getattr(encoder.tokenizer, "eos_token_id", None)
    ids = [encoder.end_of_turn_id, eos if isinstance(eos, int) else None]
    return list(dict.fromkeys(i for i in ids if i is not None))


def finish(tokenizer: Any, new_ids: Sequence[int], stops: Sequence[int], limit: int) -> TeacherGeneration:
    """The completion of the generated ``new_ids``: cut at the first stop id (then ``finished``) or at ``limit``
    tokens, decoded without special tokens; a cut completion drops a trailing incomplete character (U+FFFD)."""
    ids = [int(i) for i in new_ids]
    stop_set = set(stops)
    end = next((k for k, token in enumerate(ids) if token in stop_set), None)
    finished = end is not None and end < limit
    ids = ids[:end] if finished else ids[:limit]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not finished:
        text = text.rstrip("\ufffd")
    return TeacherGeneration(text=text, finished=finished, num_tokens=len(ids))


def generate_counting_retries(
    teacher: Any, prompts: Sequence[Prompt], params: GenerationParams
) -> tuple[list[TeacherGeneration], int]:
    """``teacher.generate(prompts, params)`` and the shares re-sent because a teacher replica died (a
    :class:`~gold_plugin.teacher.TeacherGroup` counts them; an in-process teacher has none)."""
    if not prompts:
        return [], 0
    counting = getattr(teacher, "generate_counting_retries", None)
    if counting is not None:
        out, retries = counting(prompts, params)
    else:
        generate = getattr(teacher, "generate", None)
        if generate is None:
            raise TypeError(
                f"{type(teacher).__name__} cannot generate: teacher-generated off-policy completions "
                "(--gold.off_policy_source teacher) need an HFTeacher, a VLLMTeacher or a TeacherGroup."
            )
        out, retries = generate(prompts, params), 0
    out = list(out)
    if len(out) != len(prompts):
        raise RuntimeError(f"The teacher returned {len(out)} completions for {len(prompts)} prompts.")
    return out, int(retries)


__all__ = [
    "GenerationParams",
    "PreparedPrompt",
    "Prompt",
    "TeacherGeneration",
    "finish",
    "generate_counting_retries",
    "prepare_prompts",
    "stop_ids",
]
