"""Hypothesis property tests: random Unicode responses, every cross-tokenizer pair, whole and truncated."""

from __future__ import annotations

import numpy as np
import pytest
from alignment_helpers import CROSS_PAIRS, check_invariants, response_ids, tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gold_plugin.alignment import (
    align,
    align_batch,
    encode_continuation,
    group_starts,
    ids_to_bytes,
    text_for_teacher,
)

FRAGMENTS = ["  ", "\n", "\t", " 123", "你好", "🙂", "👨‍👩‍👧", "𝔘", "é", "ﬁ", "\r\n", "    def ", "é", "ꙮ"]

# Any Unicode scalar value (no surrogates), with whitespace and hard fragments mixed in.
unicode_text = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
        st.sampled_from(FRAGMENTS),
    ),
    max_size=8,
).map("".join)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("student_name", "teacher_name"), CROSS_PAIRS)
@SETTINGS
@given(text=unicode_text, cut=st.floats(0.0, 1.0), keep_eos=st.booleans())
def test_random_responses_align(student_name, teacher_name, text, cut, keep_eos):
    student, teacher = tokenizers(student_name, teacher_name)
    s_ids, t_ids = response_ids(student, teacher, text, eos=keep_eos)
    alignment = align(student, s_ids, teacher, t_ids)
    check_invariants(student, s_ids, teacher, t_ids, alignment)
    assert (alignment.student_group >= 0).all() and (alignment.teacher_group >= 0).all()

    # The same response truncated at a random token (possibly inside a character): still aligned, tail masked.
    truncated = s_ids[: int(cut * len(s_ids))]
    sent = text_for_teacher(student, truncated)
    t_truncated = encode_continuation(teacher, sent)
    cut_alignment = align(student, truncated, teacher, t_truncated)
    check_invariants(student, truncated, teacher, t_truncated, cut_alignment)
    masked = ids_to_bytes(student, [i for i, g in zip(truncated, cut_alignment.student_group) if g < 0])
    assert len(masked) < 4 + max(map(len, [ids_to_bytes(student, [i]) for i in truncated] or [b""]))

    # The batched path gives exactly the per-sample results.
    batch = align_batch(student, [s_ids, truncated], teacher, [t_ids, t_truncated])
    for single, batched in zip((alignment, cut_alignment), batch, strict=True):
        assert batched.num_groups == single.num_groups
        assert np.array_equal(batched.student_group, single.student_group)
        assert np.array_equal(batched.teacher_group, single.teacher_group)
        assert np.array_equal(batched.student_ends, single.student_ends)

    # group_starts: one first token per group on each side, inside that group, in increasing order.
    for first, groups in zip(
        group_starts(alignment), (alignment.student_group, alignment.teacher_group), strict=True
    ):
        assert first.shape == (alignment.num_groups,)
        assert np.array_equal(groups[first], np.arange(alignment.num_groups))
        assert np.all(np.diff(first) > 0)


@pytest.mark.parametrize(("student_name", "teacher_name"), [("qwen", "mistral"), ("mistral", "gpt2")])
@settings(max_examples=20, deadline=None)
@given(texts=st.lists(unicode_text, min_size=1, max_size=6), corrupt=st.integers(0, 5))
def test_one_bad_sample_never_affects_the_batch(student_name, teacher_name, texts, corrupt):
    student, teacher = tokenizers(student_name, teacher_name)
    pairs = [response_ids(student, teacher, text) for text in texts]
    s_batch = [s for s, _ in pairs]
    t_batch = [list(t) for _, t in pairs]
    bad = corrupt % len(texts)
    # Replace the bad sample's teacher ids by the ids of a different text.
    t_batch[bad] = encode_continuation(teacher, text_for_teacher(student, s_batch[bad]) + "!") + [
        teacher.eos_token_id
    ]
    results = align_batch(student, s_batch, teacher, t_batch)
    assert not results[bad].aligned and results[bad].reason
    for i, (result, (s_ids, t_ids)) in enumerate(zip(results, pairs, strict=True)):
        if i != bad:
            check_invariants(student, s_ids, teacher, t_ids, result)
