"""Shared helpers for the alignment tests: the response pipeline and the invariant checks."""

from __future__ import annotations

import itertools

import numpy as np

from gold_plugin.alignment import (
    Alignment,
    encode_continuation,
    ids_to_bytes,
    text_for_teacher,
    token_bytes,
)
from gold_plugin.packaged_tokenizers import PACKAGED_TOKENIZERS, load_packaged_tokenizer

ORDERED_PAIRS = list(
    itertools.product(PACKAGED_TOKENIZERS, repeat=2)
)  # every pair, both directions, and self
CROSS_PAIRS = [(s, t) for s, t in ORDERED_PAIRS if s != t]

# Texts that break naive aligners.
HARD_TEXTS = {
    "ascii": "Hello world! This is fine.",
    "emoji_cjk": "你好，世界🙂🚀 👨‍👩‍👧 東京タワー",
    "byte_fallback": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 \u0e01\u0e38 ǅ",
    "leading_spaces": "   three leading spaces",
    "trailing_spaces": "trailing spaces   ",
    "repeated_spaces": "a  b   c    d     e",
    "newlines_tabs": "line\n\n\tindented\t\ttabs\r\nwindows\n",
    "digits": "1234567890 3.14159265358979 2**64=18446744073709551616 007",
    "code": "def f(x):\n    return {'a': [x, x**2]}  # comment\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    "accents": "Ünïcödé façade naïve café — “quotes” … ‘single’",
    "rtl": "مرحبا بالعالم שלום",
    "single_space": " ",
    "only_newline": "\n",
}


def tokenizers(student: str, teacher: str):
    return load_packaged_tokenizer(student), load_packaged_tokenizer(teacher)


def response_ids(student, teacher, text: str, eos: bool = True) -> tuple[list[int], list[int]]:
    """The GOLD pipeline: student ids of the text (+EOS), teacher ids of the same bytes (+end-of-turn)."""
    s_ids = list(student.encode(text, add_special_tokens=False))
    if eos:
        s_ids.append(student.eos_token_id)
    t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids))
    if eos:
        t_ids.append(teacher.eos_token_id)
    return s_ids, t_ids


def group_bytes(tokenizer, ids, groups: np.ndarray, num_groups: int) -> list[bytes]:
    table = token_bytes(tokenizer)
    out = [b""] * num_groups
    for token, g in zip(ids, groups.tolist(), strict=True):
        if g >= 0:
            out[g] += table[token]
    return out


def check_invariants(student, s_ids, teacher, t_ids, alignment: Alignment) -> None:
    """The properties of an aligned sample (docs/design.md, "Span groups") (independent of how align computes them)."""
    assert alignment.aligned, alignment.reason
    s_group, t_group, n = alignment.student_group, alignment.teacher_group, alignment.num_groups
    assert s_group.shape == (len(s_ids),) and t_group.shape == (len(t_ids),)
    for groups in (s_group, t_group):
        kept = groups[groups >= 0]
        # Groups in text order, each present on both sides, masked tokens only at the end.
        assert np.all(np.diff(kept) >= 0)
        assert np.array_equal(np.unique(kept), np.arange(n))
        masked = np.flatnonzero(groups < 0)
        assert masked.size == 0 or masked[0] == len(groups) - masked.size
    s_bytes = group_bytes(student, s_ids, s_group, n)
    t_bytes = group_bytes(teacher, t_ids, t_group, n)
    assert s_bytes == t_bytes
    # Groups cover every aligned byte exactly once and in order: their concatenation is a prefix of the
    # student's response bytes, and only a trailing piece (masked tokens) is left over.
    full = ids_to_bytes(student, s_ids)
    covered = b"".join(s_bytes)
    assert full.startswith(covered) or full[1:].startswith(covered)
    masked_bytes = ids_to_bytes(student, [i for i, g in zip(s_ids, s_group.tolist(), strict=True) if g < 0])
    assert covered + masked_bytes in (full, full[1:])
    # Only the final zero-width pair may be a group without bytes.
    empty = [g for g, b in enumerate(s_bytes) if not b]
    assert empty in ([], [n - 1])
