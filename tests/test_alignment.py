"""Span alignment between real tokenizers (GPT-2, Qwen, Mistral-v1), every ordered pair (docs/design.md, "Span groups")."""

from __future__ import annotations

import numpy as np
import pytest
from alignment_helpers import (
    CROSS_PAIRS,
    HARD_TEXTS,
    ORDERED_PAIRS,
    check_invariants,
    group_bytes,
    response_ids,
    tokenizers,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gold_plugin.alignment import (
    Alignment,
    align,
    align_batch,
    encode_continuation,
    group_starts,
    ids_to_bytes,
    incomplete_utf8_tail_length,
    text_for_teacher,
    token_byte_lengths,
)
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer


def same_alignment(a: Alignment, b: Alignment) -> bool:
    return (
        a.aligned == b.aligned
        and a.num_groups == b.num_groups
        and np.array_equal(a.student_group, b.student_group)
        and np.array_equal(a.teacher_group, b.teacher_group)
    )


@pytest.mark.parametrize(("student_name", "teacher_name"), ORDERED_PAIRS)
def test_hard_texts_align_with_equal_group_bytes(student_name, teacher_name):
    student, teacher = tokenizers(student_name, teacher_name)
    pairs = [response_ids(student, teacher, text) for text in HARD_TEXTS.values()]
    batch = align_batch(student, [s for s, _ in pairs], teacher, [t for _, t in pairs])
    for (name, text), (s_ids, t_ids), from_batch in zip(HARD_TEXTS.items(), pairs, batch, strict=True):
        alignment = align(student, s_ids, teacher, t_ids)
        check_invariants(student, s_ids, teacher, t_ids, alignment)
        assert same_alignment(alignment, from_batch), name
        # The final EOS pairs with the teacher's end-of-turn as a group of its own.
        assert alignment.student_group[-1] == alignment.teacher_group[-1] == alignment.num_groups - 1
        assert np.sum(alignment.student_group == alignment.num_groups - 1) == 1
        # Every byte of the response is covered (nothing masked when the response is whole).
        assert (alignment.student_group >= 0).all() and (alignment.teacher_group >= 0).all(), name
        assert b"".join(group_bytes(student, s_ids, alignment.student_group, alignment.num_groups)) in (
            text.encode(),
            b" " + text.encode(),  # a SentencePiece student's dummy-prefix space is part of its response
        )


@pytest.mark.parametrize("name", ["gpt2", "qwen", "mistral"])
def test_identical_tokenizers_give_only_one_to_one_groups(name):
    tok = load_packaged_tokenizer(name)
    for text in HARD_TEXTS.values():
        s_ids, t_ids = response_ids(tok, tok, text)
        alignment = align(tok, s_ids, tok, t_ids)
        check_invariants(tok, s_ids, tok, t_ids, alignment)
        assert np.array_equal(alignment.student_group, np.arange(len(s_ids)))
        assert np.array_equal(alignment.teacher_group, np.arange(len(t_ids)))


@pytest.mark.parametrize("name", ["gpt2", "qwen", "mistral"])
@settings(max_examples=20, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_identical_tokenizers_one_to_one_on_random_text(name, text):
    tok = load_packaged_tokenizer(name)
    s_ids, t_ids = response_ids(tok, tok, text)
    alignment = align_batch(tok, [s_ids], tok, [t_ids])[0]
    assert np.array_equal(alignment.student_group, np.arange(len(s_ids)))
    assert np.array_equal(alignment.teacher_group, np.arange(len(t_ids)))


def test_known_merged_groups_between_qwen_and_gpt2():
    # Qwen splits digits one by one, GPT-2 groups them in threes: "123" is one group of 3 Qwen : 1 GPT-2 tokens.
    qwen, gpt2 = tokenizers("qwen", "gpt2")
    s_ids, t_ids = response_ids(qwen, gpt2, "123456")
    assert gpt2.convert_ids_to_tokens(t_ids[:-1]) == ["123", "456"]
    alignment = align(qwen, s_ids, gpt2, t_ids)
    assert alignment.student_group.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert alignment.teacher_group.tolist() == [0, 1, 2]
    student_first, teacher_first = group_starts(alignment)
    assert student_first.tolist() == [0, 3, 6] and teacher_first.tolist() == [0, 1, 2]


@pytest.mark.parametrize(("student_name", "teacher_name"), CROSS_PAIRS)
def test_response_cut_inside_a_multibyte_character(student_name, teacher_name):
    student, teacher = tokenizers(student_name, teacher_name)
    text = "ok 𝔘𝔫𝔦 你好 🙂 done"
    ids = student.encode(text, add_special_tokens=False)
    cut_cases = 0
    for cut in range(1, len(ids)):
        s_ids = ids[:cut]  # a truncated response: no EOS
        full = ids_to_bytes(student, s_ids)
        tail = incomplete_utf8_tail_length(full)
        sent = text_for_teacher(student, s_ids)
        assert sent.encode() == full[: len(full) - tail]
        t_ids = encode_continuation(teacher, sent)
        alignment = align(student, s_ids, teacher, t_ids)
        check_invariants(student, s_ids, teacher, t_ids, alignment)
        assert same_alignment(alignment, align_batch(student, [s_ids], teacher, [t_ids])[0])
        if tail:
            cut_cases += 1
            # The student tokens covering the partial character are masked; everything before is grouped.
            masked = ids_to_bytes(student, [i for i, g in zip(s_ids, alignment.student_group) if g < 0])
            assert masked.endswith(full[len(full) - tail :])
            assert alignment.student_group[-1] == -1
    assert cut_cases > 0, "the text must be cut inside a character at least once"


@pytest.mark.parametrize(("student_name", "teacher_name"), CROSS_PAIRS)
def test_empty_and_eos_only_responses(student_name, teacher_name):
    student, teacher = tokenizers(student_name, teacher_name)
    s_eos, t_eos = student.eos_token_id, teacher.eos_token_id

    empty = align(student, [], teacher, [])
    assert empty.aligned and empty.num_groups == 0 and empty.student_group.size == 0

    eos_only = align(student, [s_eos], teacher, [t_eos])
    assert eos_only.aligned and eos_only.num_groups == 1
    assert eos_only.student_group.tolist() == [0] and eos_only.teacher_group.tolist() == [0]
    assert [x.tolist() for x in group_starts(eos_only)] == [[0], [0]]

    dropped = align(student, [s_eos], teacher, [t_eos], pair_eos=False)
    assert dropped.aligned and dropped.num_groups == 0
    assert dropped.student_group.tolist() == [-1] and dropped.teacher_group.tolist() == [-1]

    # EOS on one side only (the teacher was not given an end-of-turn): nothing to pair, masked.
    one_sided = align(student, [s_eos], teacher, [])
    assert one_sided.aligned and one_sided.num_groups == 0 and one_sided.student_group.tolist() == [-1]

    batch = align_batch(student, [[], [s_eos], [s_eos]], teacher, [[], [t_eos], []])
    assert [a.num_groups for a in batch] == [0, 1, 0]


@pytest.mark.parametrize(("student_name", "teacher_name"), CROSS_PAIRS)
def test_pair_eos_false_masks_both_final_tokens(student_name, teacher_name):
    student, teacher = tokenizers(student_name, teacher_name)
    s_ids, t_ids = response_ids(student, teacher, HARD_TEXTS["code"])
    with_eos = align(student, s_ids, teacher, t_ids)
    without = align(student, s_ids, teacher, t_ids, pair_eos=False)
    assert without.num_groups == with_eos.num_groups - 1
    assert without.student_group[-1] == -1 and without.teacher_group[-1] == -1
    assert np.array_equal(without.student_group[:-1], with_eos.student_group[:-1])
    batch = align_batch(student, [s_ids], teacher, [t_ids], pair_eos=False)[0]
    assert same_alignment(batch, without)


@pytest.mark.parametrize(("student_name", "teacher_name"), CROSS_PAIRS)
def test_mismatched_bytes_are_unalignable_not_raised(student_name, teacher_name):
    student, teacher = tokenizers(student_name, teacher_name)
    s_ids, _ = response_ids(student, teacher, "The cat sat on the mat.")
    _, other_t = response_ids(student, teacher, "The dog sat on the mat.")
    bad = align(student, s_ids, teacher, other_t)
    assert not bad.aligned and bad.num_groups == 0
    assert (bad.student_group == -1).all() and (bad.teacher_group == -1).all()
    assert "first difference at byte" in bad.reason
    # Teacher longer than the student, and ids outside the vocabulary.
    _, longer = response_ids(student, teacher, "The cat sat on the mat. And more.")
    assert not align(student, s_ids, teacher, longer).aligned
    out_of_range = align(student, s_ids, teacher, [10**9])
    assert not out_of_range.aligned and "outside the vocabulary" in out_of_range.reason
    # A batch with one bad sample: the others are unaffected.
    good_s, good_t = response_ids(student, teacher, "Fine.")
    batch = align_batch(student, [good_s, s_ids, s_ids], teacher, [good_t, other_t, [-5]])
    assert [a.aligned for a in batch] == [True, False, False]
    check_invariants(student, good_s, teacher, good_t, batch[0])


def test_teacher_prefix_only_with_allow_teacher_prefix():
    student, teacher = tokenizers("qwen", "mistral")
    s_ids, t_ids = response_ids(
        student, teacher, "A long answer that the teacher could not fully score.", eos=False
    )
    prefix_text = text_for_teacher(student, s_ids[:5])
    t_prefix = encode_continuation(teacher, prefix_text)
    assert not align(student, s_ids, teacher, t_prefix).aligned
    partial = align(student, s_ids, teacher, t_prefix, allow_teacher_prefix=True)
    assert partial.aligned and (partial.student_group[5:] == -1).all()
    assert (
        b"".join(group_bytes(student, s_ids, partial.student_group, partial.num_groups))
        == prefix_text.encode()
    )
    batch = align_batch(student, [s_ids], teacher, [t_prefix], allow_teacher_prefix=True)[0]
    assert same_alignment(batch, partial)


@pytest.mark.parametrize("other", ["gpt2", "qwen"])
def test_sentencepiece_dummy_prefix_space_is_tolerated_on_either_side(other):
    mistral, byte_level = tokenizers("mistral", other)
    text = "Hello there"  # no leading space: SentencePiece's plain encode adds one
    plain = mistral.encode(text, add_special_tokens=False)
    assert ids_to_bytes(mistral, plain) == b" " + text.encode()
    continuation = encode_continuation(mistral, text)
    assert ids_to_bytes(mistral, continuation) == text.encode()
    b_ids = encode_continuation(byte_level, text)
    for m_ids in (plain, continuation):
        as_teacher = align(byte_level, b_ids, mistral, m_ids)
        as_student = align(mistral, m_ids, byte_level, b_ids)
        for alignment, s, s_ids, t, t_ids in (
            (as_teacher, byte_level, b_ids, mistral, m_ids),
            (as_student, mistral, m_ids, byte_level, b_ids),
        ):
            assert alignment.aligned, alignment.reason
            assert alignment.num_groups == 2  # "Hello" and " there"
            assert same_alignment(alignment, align_batch(s, [s_ids], t, [t_ids])[0])
            # The side carrying the dummy-prefix space has it in its first group; otherwise the bytes agree.
            for side in (
                group_bytes(s, s_ids, alignment.student_group, 2),
                group_bytes(t, t_ids, alignment.teacher_group, 2),
            ):
                assert side[0] in (b"Hello", b" Hello") and side[1] == b" there"


def test_group_starts_skip_zero_width_tokens_that_joined_a_group():
    student, teacher = tokenizers("qwen", "mistral")
    text = "Hi there"
    s_ids = encode_continuation(student, text) + [student.eos_token_id]
    t_ids = [teacher.bos_token_id] + encode_continuation(teacher, text) + [teacher.eos_token_id]  # BOS first
    alignment = align(student, s_ids, teacher, t_ids)
    check_invariants(student, s_ids, teacher, t_ids, alignment)
    assert alignment.teacher_group[0] == 0  # the zero-width BOS joins the first group
    student_first, teacher_first = group_starts(alignment)
    assert teacher_first[0] == 1  # ... but the group's first token with bytes is the one compared
    lengths = token_byte_lengths(teacher)[np.asarray(t_ids)]
    for g in range(alignment.num_groups - 1):
        assert lengths[teacher_first[g]] > 0 and alignment.teacher_group[teacher_first[g]] == g
        assert alignment.student_group[student_first[g]] == g
        assert g == 0 or alignment.student_group[student_first[g] - 1] == g - 1
    assert teacher_first[-1] == len(t_ids) - 1 and student_first[-1] == len(s_ids) - 1
    # An EOS-only response with a zero-width BOS before the teacher's end-of-turn: the EOS pair is compared.
    eos_only = align(student, [student.eos_token_id], teacher, [teacher.bos_token_id, teacher.eos_token_id])
    assert eos_only.num_groups == 1 and eos_only.teacher_group.tolist() == [0, 0]
    assert [x.tolist() for x in group_starts(eos_only)] == [[0], [1]]
    batched = align_batch(
        student, [[student.eos_token_id]], teacher, [[teacher.bos_token_id, teacher.eos_token_id]]
    )
    assert [x.tolist() for x in group_starts(batched[0])] == [[0], [1]]


def test_positional_mode_is_ulds_truncate_and_pair_by_index():
    student, teacher = tokenizers("qwen", "mistral")
    s_ids, t_ids = response_ids(student, teacher, HARD_TEXTS["emoji_cjk"])
    positional = align(student, s_ids, teacher, t_ids, mode="positional")
    n = min(len(s_ids), len(t_ids))
    assert positional.num_groups == n
    assert positional.student_group.tolist() == list(range(n)) + [-1] * (len(s_ids) - n)
    assert positional.teacher_group.tolist() == list(range(n)) + [-1] * (len(t_ids) - n)
    assert [x.tolist() for x in group_starts(positional)] == [list(range(n))] * 2
    batch = align_batch(student, [s_ids], teacher, [t_ids], mode="positional")[0]
    assert same_alignment(batch, positional)
    with pytest.raises(ValueError, match="Unknown alignment mode"):
        align(student, s_ids, teacher, t_ids, mode="bytes")


def test_inputs_as_numpy_and_torch():
    torch = pytest.importorskip("torch")
    student, teacher = tokenizers("mistral", "gpt2")
    s_ids, t_ids = response_ids(student, teacher, HARD_TEXTS["code"])
    reference = align(student, s_ids, teacher, t_ids)
    for convert in (np.asarray, torch.tensor):
        assert same_alignment(align(student, convert(s_ids), teacher, convert(t_ids)), reference)
        assert same_alignment(align_batch(student, [convert(s_ids)], teacher, [convert(t_ids)])[0], reference)
    with pytest.raises(ValueError, match="must be 1-D"):
        align(student, [s_ids], teacher, t_ids)  # a padded batch is not one sample


def test_incomplete_utf8_tail_length_matches_the_decoder():
    for char in ["a", "é", "你", "🙂"]:
        data = char.encode()
        for cut in range(1, len(data) + 1):
            prefix = b"x" + data[:cut]
            expected = 0 if cut == len(data) else cut
            assert incomplete_utf8_tail_length(prefix) == expected
    assert incomplete_utf8_tail_length(b"") == 0
    assert incomplete_utf8_tail_length(b"\x80\x80") == 0  # stray continuation bytes are not a cut character
