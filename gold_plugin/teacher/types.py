"""The teacher's scoring contract: requests in, per-token log-probs out, no Ray inside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from gold_plugin.alignment.types import ChatTokenizer

ChatMessages = list[dict[str, Any]]


class TeacherError(RuntimeError):
    """A teacher failure that cannot be confined to one request (model, device or replica)."""


Slot = TypeVar("Slot")


def filled(slots: Sequence[Slot | None]) -> list[Slot]:
    """``slots`` (one per request, in order) once every one holds its answer; a slot still empty is a backend bug,
    raised as :class:`TeacherError` naming the requests, never passed on as a missing result."""
    empty = [index for index, slot in enumerate(slots) if slot is None]
    if empty:
        raise TeacherError(
            f"The teacher left {len(empty)} of {len(slots)} requests without an answer: {empty[:8]}."
        )
    return cast(list[Slot], list(slots))


@dataclass
class TeacherRequest:
    """One sample to score: the teacher prompt and the student's response text.

    ``prompt`` is either chat messages (rendered with the teacher's own chat template and its
    generation prompt) or text used verbatim. ``response`` is appended unchanged. ``ends_with_eos``
    says the student's response ended with its EOS: the teacher's end-of-turn token is then scored
    as the final, zero-width response token.
    """

    prompt: str | ChatMessages
    response: str
    ends_with_eos: bool = False


@dataclass
class TeacherResult:
    """The teacher's view of one response.

    Guarantees (for ``error is None``):

    - ``token_ids`` (int64 ``[n]``) is the teacher tokenisation of the response text alone, followed
      by the end-of-turn token when the request ``ends_with_eos``; the UTF-8 bytes of these tokens are
      exactly the response's bytes (the end-of-turn token is zero-width).
    - ``token_bytes`` (int64 ``[n]``): byte length of each token (0 for the end-of-turn token).
    - ``logprobs`` (float32 ``[n]``): log p_teacher(token | prompt, earlier response tokens).
      **Masked tokens have NaN**: tokens that did not fit in the teacher's context (the trailing
      ones), and the first token when there is no prompt token at all to condition on.
      ``num_masked`` counts them; :attr:`scored` is the boolean mask of the others.
    - ``topk_ids`` (int64 ``[n, k]``) / ``topk_logprobs`` (float32 ``[n, k]``): the teacher's k
      most likely tokens at each response position, best first, or None when ``topk == 0``. Slots
      with no candidate (k larger than the vocabulary, masked positions) hold id -1 and log-prob -inf.
    - ``num_prompt_truncated``: prompt tokens dropped from the left to make room for the response.
    - ``hidden_states`` (float16 ``[n, L, r]``): the teacher's hidden state after reading each response token, at
      the ``L`` layers the teacher was asked for, reduced to ``r`` dimensions by its sketch; NaN at masked tokens;
      None unless asked for (``--gold.teacher.hidden_state_layers``).

    A request that cannot be scored at all (text that is not valid UTF-8 or that the teacher's
    tokenizer cannot reproduce byte-for-byte, a chat template that rejects the messages) gets zero
    tokens and ``error`` saying why; the rest of the batch is scored normally. An empty response
    gets zero tokens and no error.
    """

    token_ids: np.ndarray
    token_bytes: np.ndarray
    logprobs: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    num_masked: int = 0
    num_prompt_truncated: int = 0
    error: str | None = None
    hidden_states: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def scored(self) -> np.ndarray:
        """Boolean ``[n]``: True where ``logprobs`` holds a real log-prob (not masked)."""
        return ~np.isnan(self.logprobs)

    @classmethod
    def failed(cls, error: str, topk: int) -> TeacherResult:
        """A zero-token result carrying ``error``."""
        return cls(
            token_ids=np.zeros(0, dtype=np.int64),
            token_bytes=np.zeros(0, dtype=np.int64),
            logprobs=np.zeros(0, dtype=np.float32),
            topk_ids=np.zeros((0, topk), dtype=np.int64) if topk > 0 else None,
            topk_logprobs=np.zeros((0, topk), dtype=np.float32) if topk > 0 else None,
            error=error,
        )


@runtime_checkable
class TeacherScorer(Protocol):
    """What both backends call on a teacher: the in-process scorers (:class:`~gold_plugin.teacher.HFTeacher`,
    :class:`~gold_plugin.teacher.VLLMTeacher`) and the Ray :class:`~gold_plugin.teacher.TeacherGroup` implement it
    (``tests/test_teacher_types.py`` checks that their signatures match). No Ray inside the contract.

    A class that subclasses it explicitly inherits :meth:`score_counting_retries` (no retries) and :meth:`close`
    (nothing to release). ``isinstance`` checks that every member is present (on Python 3.11 by reading it, so a
    group's :attr:`tokenizer` then loads).
    """

    topk: int
    """Top-k log-probs returned per response position (0 = sampled tokens only)."""

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The teacher's tokenizer (the one its token ids refer to)."""
        ...

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """One result per request, in order. Failures confined to one request are reported in its
        ``error``; only failures of the model itself raise (:class:`TeacherError`)."""
        ...

    def score_counting_retries(self, requests: Sequence[TeacherRequest]) -> tuple[list[TeacherResult], int]:
        """:meth:`score`, and how many parts of the call were re-sent: shares whose teacher replica died (a
        :class:`TeacherGroup`), requests a served teacher did not answer at first (``ServedTeacher``); an in-process
        scorer has none: 0."""
        return list(self.score(requests)), 0

    def close(self) -> None:
        """Release the model (GPU memory, replicas); the scorer is unusable afterwards."""
