"""Teacher requests: the teacher's prompt for a sample (its own chat template or the student's text) and the response
text rebuilt from the student's token bytes."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gold_plugin.alignment import text_for_teacher, token_byte_lengths
from gold_plugin.config import GoldConfig
from gold_plugin.teacher.types import ChatMessages, TeacherRequest

if TYPE_CHECKING:
    from gold_plugin.alignment.types import TokenIds, Tokenizer


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
