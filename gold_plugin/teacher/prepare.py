"""Turn teacher requests into token-id sequences: prompt rendering, response tokenisation, context fit.

Shared by every backend, so that the hf and vllm teachers score exactly the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from gold_plugin.teacher.types import ChatMessages, TeacherRequest, TeacherResult

if TYPE_CHECKING:
    from gold_plugin.alignment.types import ChatTokenizer

# Text put before a response and stripped again, for responses that the alignment's continuation
# encoder cannot reproduce (special-token strings inside the text). Each is tried in turn; a candidate is used only if its tokens stay separate
# from the response's and the remaining tokens reproduce the response bytes exactly.
_SEPARATOR_PREFIXES = ("\n", "a", "0", ".", "\n\n")
_EOT_SENTINEL = "GOLDx7q"


class RequestRejected(ValueError):
    """A request that cannot be scored; the message goes into ``TeacherResult.error``."""


@dataclass
class PreparedSequence:
    """One request as token ids that fit the teacher's context.

    ``input_ids = prompt_ids[-kept:] + response_ids[:num_fed]``. Response token j (for
    ``first_scored <= j < num_fed``) sits at input position ``prompt_len + j`` and is predicted by the
    logits at ``prompt_len + j - 1``; all other response tokens are masked.
    """

    input_ids: np.ndarray
    prompt_len: int
    response_ids: np.ndarray
    response_bytes: np.ndarray
    first_scored: int
    num_fed: int
    num_prompt_truncated: int

    @property
    def num_scored(self) -> int:
        return max(0, self.num_fed - self.first_scored)

    @property
    def num_masked(self) -> int:
        return int(self.response_ids.shape[0]) - self.num_scored

    @property
    def scored_slice(self) -> slice:
        """Response-token indices that get a log-prob."""
        return slice(self.first_scored, self.first_scored + self.num_scored)


def fit_to_context(
    prompt_ids: np.ndarray, num_response: int, max_context: int, num_protected: int
) -> tuple[np.ndarray, int, int]:
    """Make ``prompt + response`` fit ``max_context`` tokens.

    Drops prompt tokens from the left (keeping the first ``num_protected``, e.g. a BOS) but keeps at
    least one prompt token when there is one, then cuts the response. Returns the kept prompt ids,
    the number of response tokens that fit, and the number of prompt tokens dropped.
    """
    num_prompt = int(prompt_ids.shape[0])
    if num_prompt + num_response <= max_context:
        return prompt_ids, num_response, 0
    min_prompt = min(num_prompt, max(num_protected, 1))
    kept = max(min(num_prompt, max_context - num_response), min_prompt)
    if kept < num_prompt:
        tail = kept - min(num_protected, kept)
        head = prompt_ids[: min(num_protected, kept)]
        prompt_ids = np.concatenate([head, prompt_ids[num_prompt - tail :]]) if tail else head
    num_fed = max(0, min(num_response, max_context - kept))
    return prompt_ids, num_fed, num_prompt - kept


def _prompt_key(prompt: object) -> str | None:
    """A key equal for equal prompts (text, or chat messages), or None for one that cannot be keyed."""
    if isinstance(prompt, str):
        return "text:" + prompt
    try:
        return "chat:" + json.dumps(prompt, sort_keys=True)
    except (TypeError, ValueError):
        return None


class RequestEncoder:
    """Renders prompts and tokenises responses for one teacher tokenizer.

    Args:
        tokenizer: the teacher's Hugging Face tokenizer.
        max_context: most tokens one scored sequence may hold (prompt + response).
        end_of_turn_token: token scored after a response that ended with the student's EOS; default:
            the special token that the chat template puts right after an assistant message, else the
            tokenizer's EOS.
    """

    def __init__(
        self, tokenizer: ChatTokenizer, max_context: int, end_of_turn_token: str | None = None
    ) -> None:
        from gold_plugin.alignment import token_byte_lengths, token_bytes

        if max_context < 2:
            raise ValueError(f"The teacher context must hold at least 2 tokens, got {max_context}.")
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.token_bytes: list[bytes] = token_bytes(tokenizer)
        self.byte_lengths = np.asarray(token_byte_lengths(tokenizer), dtype=np.int64)
        self.text_prefix_ids = self._default_prefix_ids()
        bos_id = getattr(tokenizer, "bos_token_id", None)
        self.bos_token_id: int | None = bos_id if isinstance(bos_id, int) else None
        self.end_of_turn_id = self._end_of_turn_id(end_of_turn_token)

    # -- prompt -----------------------------------------------------------------------------------
    def _encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)[
                "input_ids"
            ]
        )

    def _default_prefix_ids(self) -> list[int]:
        """Special tokens the tokenizer puts before a text by default (a BOS for Llama/Mistral)."""
        plain = self._encode("a")
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def _end_of_turn_id(self, token: str | None) -> int | None:
        from gold_plugin.alignment.token_bytes import token_table

        tok = self.tokenizer
        if token is not None:
            token_id = tok.convert_tokens_to_ids(token)
            if token_id is None or token_id == tok.unk_token_id and token != tok.unk_token:
                raise ValueError(f"end_of_turn_token {token!r} is not a token of the teacher tokenizer.")
            return int(token_id)
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(
                    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _EOT_SENTINEL}],
                    tokenize=False,
                )
                after = text[text.index(_EOT_SENTINEL) + len(_EOT_SENTINEL) :]
                # Added tokens flagged special count too: transformers 5 leaves Gemma's <end_of_turn> and
                # Llama-3's <|eot_id|> out of ``all_special_ids``.
                special = token_table(tok).special
                for token_id in self._encode(after):
                    if 0 <= token_id < special.shape[0] and special[token_id]:
                        return int(token_id)
            except Exception:  # a template that rejects this conversation: fall back to EOS
                pass
        eos = getattr(tok, "eos_token_id", None)
        return int(eos) if isinstance(eos, int) else None

    def prompt_ids(self, prompt: str | ChatMessages) -> np.ndarray:
        """Token ids of the prompt: chat messages through the teacher's template (with its
        generation prompt), or text verbatim preceded by the tokenizer's default BOS."""
        if isinstance(prompt, str):
            prefix = self.text_prefix_ids
            if prefix and prompt.startswith(self.tokenizer.decode(prefix)):
                prefix = []
            ids = prefix + self._encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestRejected(
                    "the prompt is chat messages but the teacher tokenizer has no chat template; "
                    "send text prompts (--gold.teacher.chat_template=student) or give it a template"
                )
            try:
                text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            except Exception as exc:
                raise RequestRejected(f"the teacher's chat template rejected the messages: {exc}") from exc
            ids = self._encode(text)
        else:
            raise RequestRejected(
                f"prompt must be text or a list of chat-message dicts, got {type(prompt).__name__}"
            )
        return np.asarray(ids, dtype=np.int64)

    # -- response ---------------------------------------------------------------------------------
    def _bytes_of(self, ids: Sequence[int]) -> bytes | None:
        table = self.token_bytes
        if any(i < 0 or i >= len(table) for i in ids):
            return None
        return b"".join([table[i] for i in ids])

    def response_ids(self, text: str) -> np.ndarray:
        """Teacher token ids whose bytes are exactly ``text``'s UTF-8 bytes.

        First :func:`gold_plugin.alignment.encode_continuation` (no special tokens, no SentencePiece
        dummy-prefix space); if its bytes differ (the text holds special-token strings, which are
        plain text here), the text is tokenised with special-token strings split, behind a separator
        prefix that is then stripped. Raises :class:`RequestRejected` when no tokenisation
        reproduces the bytes.
        """
        from gold_plugin.alignment import encode_continuation

        if text == "":
            return np.zeros(0, dtype=np.int64)
        try:
            target = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestRejected(f"the response is not valid Unicode text ({exc.reason})") from exc
        try:
            ids = encode_continuation(self.tokenizer, text)
        except Exception:  # fall through to the generic tokenisations below
            ids = []
        if self._bytes_of(ids) == target:
            return np.asarray(ids, dtype=np.int64)
        ids = self._encode(text, split_special_tokens=True)
        if self._bytes_of(ids) == target:
            return np.asarray(ids, dtype=np.int64)
        for separator in _SEPARATOR_PREFIXES:
            sep_ids = self._encode(separator, split_special_tokens=True)
            both = self._encode(separator + text, split_special_tokens=True)
            if both[: len(sep_ids)] == sep_ids and self._bytes_of(both[len(sep_ids) :]) == target:
                return np.asarray(both[len(sep_ids) :], dtype=np.int64)
        spelled = self._spelled_in_bytes(text)
        if spelled is not None and self._bytes_of(spelled) == target:
            return np.asarray(spelled, dtype=np.int64)
        raise RequestRejected(
            "the teacher tokenizer does not reproduce the response bytes "
            "(it normalises the text or has no token for some characters)"
        )

    def _spelled_in_bytes(self, text: str) -> list[int] | None:
        """``text`` with each character the tokenizer cannot reproduce (a literal ``▁`` for SentencePiece, which
        reads it as a space) spelled by its byte-fallback pieces, the rest encoded as usual; None when the
        tokenizer has no byte pieces for them. Runs only for the rare texts the usual encodings change."""
        from gold_plugin.alignment import encode_continuation
        from gold_plugin.alignment.token_bytes import token_table

        table = token_table(self.tokenizer)
        byte_piece = {table.token_bytes[i][0]: int(i) for i in np.flatnonzero(table.byte_fallback)}
        if not byte_piece:
            return None
        unreproduced = {
            c
            for c in set(text)
            if self._bytes_of(encode_continuation(self.tokenizer, c)) != c.encode("utf-8")
        }
        ids: list[int] = []
        start = 0
        for end, char in enumerate(text):
            if char not in unreproduced:
                continue
            if end > start:
                ids += encode_continuation(self.tokenizer, text[start:end])
            spelled = [byte_piece.get(b) for b in char.encode("utf-8")]
            if None in spelled:
                return None
            ids += cast("list[int]", spelled)
            start = end + 1
        if start < len(text):
            ids += encode_continuation(self.tokenizer, text[start:])
        return ids

    # -- whole request ----------------------------------------------------------------------------
    def prepare(
        self, request: TeacherRequest, rendered: dict[str, np.ndarray] | None = None
    ) -> PreparedSequence:
        """Token ids of one request, fitted to the context; raises :class:`RequestRejected`. ``rendered``: the
        prompt ids already computed in this batch, by :func:`_prompt_key` (read and filled)."""
        if not isinstance(request.response, str):
            raise RequestRejected(f"response must be text, got {type(request.response).__name__}")
        key = None if rendered is None else _prompt_key(request.prompt)
        prompt = None if key is None or rendered is None else rendered.get(key)
        if prompt is None:
            prompt = self.prompt_ids(request.prompt)
            if key is not None and rendered is not None:
                rendered[key] = prompt
        response = self.response_ids(request.response)
        lengths = self.byte_lengths[response] if response.size else np.zeros(0, dtype=np.int64)
        if request.ends_with_eos:
            if self.end_of_turn_id is None:
                raise RequestRejected(
                    "the response ends with EOS but the teacher tokenizer has no end-of-turn/EOS token"
                )
            response = np.append(response, np.int64(self.end_of_turn_id))
            lengths = np.append(lengths, np.int64(0))
        protected = (
            1 if prompt.size and self.bos_token_id is not None and prompt[0] == self.bos_token_id else 0
        )
        kept, num_fed, dropped = fit_to_context(prompt, int(response.shape[0]), self.max_context, protected)
        return PreparedSequence(
            input_ids=np.concatenate([kept, response[:num_fed]]).astype(np.int64, copy=False),
            prompt_len=int(kept.shape[0]),
            response_ids=response,
            response_bytes=lengths,
            first_scored=1 if kept.shape[0] == 0 else 0,
            num_fed=num_fed,
            num_prompt_truncated=dropped,
        )

    def prepare_all(self, requests: Sequence[TeacherRequest]) -> list[PreparedSequence | str]:
        """Prepared sequence per request, or the error message for a request that cannot be scored. Each distinct
        prompt is rendered and tokenised once (a prompt's samples share it)."""
        out: list[PreparedSequence | str] = []
        rendered: dict[str, np.ndarray] = {}
        for request in requests:
            try:
                out.append(self.prepare(request, rendered))
            except RequestRejected as exc:
                out.append(str(exc))
            except Exception as exc:  # a tokenizer crash on odd text must not kill the batch
                out.append(f"the teacher tokenizer failed on this request: {type(exc).__name__}: {exc}")
        return out

    def partition(
        self, requests: Sequence[TeacherRequest], topk: int
    ) -> tuple[list[TeacherResult | None], list[int], list[PreparedSequence]]:
        """Prepare every request and settle the ones that need no forward pass.

        Returns the result slots (filled for rejected requests and for responses with nothing to score,
        ``None`` elsewhere), the indices still to score, and their prepared sequences in the same order.
        """
        results: list[TeacherResult | None] = [None] * len(requests)
        todo: list[int] = []
        sequences: list[PreparedSequence] = []
        for index, item in enumerate(self.prepare_all(requests)):
            if isinstance(item, str):
                results[index] = TeacherResult.failed(item, topk)
            elif item.num_scored == 0:
                results[index] = build_result(item, topk, np.zeros(0, dtype=np.float32))
            else:
                todo.append(index)
                sequences.append(item)
        return results, todo, sequences


def build_result(
    prepared: PreparedSequence,
    topk: int,
    logprobs: np.ndarray,
    topk_ids: np.ndarray | None = None,
    topk_logprobs: np.ndarray | None = None,
    hidden_states: np.ndarray | None = None,
) -> TeacherResult:
    """A :class:`TeacherResult` from the scores of the scored response tokens (``prepared.scored_slice``);
    masked tokens get NaN (log-probs, hidden states), and -1 / -inf top-k slots."""
    n = int(prepared.response_ids.shape[0])
    full = np.full(n, np.nan, dtype=np.float32)
    full[prepared.scored_slice] = logprobs
    ids_out = lps_out = None
    if topk > 0:
        ids_out = np.full((n, topk), -1, dtype=np.int64)
        lps_out = np.full((n, topk), -np.inf, dtype=np.float32)
        if topk_ids is not None and topk_logprobs is not None:
            ids_out[prepared.scored_slice] = topk_ids
            lps_out[prepared.scored_slice] = topk_logprobs
    states = None
    if hidden_states is not None:
        states = np.full((n, *hidden_states.shape[1:]), np.nan, dtype=np.float16)
        states[prepared.scored_slice] = hidden_states
    return TeacherResult(
        token_ids=prepared.response_ids.astype(np.int64, copy=False),
        token_bytes=prepared.response_bytes.astype(np.int64, copy=False),
        logprobs=full,
        topk_ids=ids_out,
        topk_logprobs=lps_out,
        num_masked=prepared.num_masked,
        num_prompt_truncated=prepared.num_prompt_truncated,
        hidden_states=states,
    )
