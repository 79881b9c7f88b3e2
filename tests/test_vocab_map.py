"""VocabMap by canonical bytes between real tokenizers (docs/design.md, "Vocabulary map")."""

from __future__ import annotations

import numpy as np
import pytest
from alignment_helpers import CROSS_PAIRS, ORDERED_PAIRS

from gold_plugin.alignment import VocabMap, token_bytes
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer


def ids(tok, *pieces):
    return [tok.convert_tokens_to_ids(p) for p in pieces]


@pytest.mark.parametrize("byte_level", ["gpt2", "qwen"])
def test_sentencepiece_and_byte_level_hello_map_both_ways(byte_level):
    mistral, other = load_packaged_tokenizer("mistral"), load_packaged_tokenizer(byte_level)
    (m_hello,) = ids(mistral, "▁Hello")
    (b_hello,) = ids(other, "ĠHello")
    (m_newline,) = ids(mistral, "<0x0A>")
    (b_newline,) = ids(other, "Ċ")
    forward = VocabMap(mistral, other)  # mistral student, byte-level teacher
    backward = VocabMap(other, mistral)
    assert forward.teacher_to_student[b_hello] == m_hello and forward.student_to_teacher[m_hello] == b_hello
    assert backward.teacher_to_student[m_hello] == b_hello and backward.student_to_teacher[b_hello] == m_hello
    assert backward.teacher_to_student[m_newline] == b_newline
    # TRL's rule (equal strings) misses them: "▁Hello" and "ĠHello" are different strings.
    assert "▁Hello" not in other.get_vocab() and "ĠHello" not in mistral.get_vocab()


@pytest.mark.parametrize(("student_name", "teacher_name"), ORDERED_PAIRS)
def test_mapped_ids_have_equal_bytes_and_specials_never_map(student_name, teacher_name):
    student, teacher = load_packaged_tokenizer(student_name), load_packaged_tokenizer(teacher_name)
    vocab = VocabMap(student, teacher)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    for mapping, src_tok, src_bytes, dst_tok, dst_bytes in (
        (vocab.teacher_to_student, teacher, t_bytes, student, s_bytes),
        (vocab.student_to_teacher, student, s_bytes, teacher, t_bytes),
    ):
        assert mapping.dtype == np.int64 and mapping.shape == (len(src_bytes),)
        mapped = np.flatnonzero(mapping >= 0)
        assert all(src_bytes[i] == dst_bytes[j] for i, j in zip(mapped.tolist(), mapping[mapped].tolist()))
        assert (mapping[src_tok.all_special_ids] == -1).all()
        assert not set(mapping[mapped].tolist()) & set(dst_tok.all_special_ids)
        # Every non-special token whose bytes the other vocabulary has is mapped (nothing missed).
        dst_set = {b for i, b in enumerate(dst_bytes) if b and i not in set(dst_tok.all_special_ids)}
        unmapped = np.flatnonzero(mapping < 0)
        assert not any(src_bytes[i] in dst_set for i in unmapped.tolist())
    regular = len(t_bytes) - sum(1 for b in t_bytes if not b)
    assert vocab.matched_fraction == pytest.approx((vocab.teacher_to_student >= 0).sum() / regular)


@pytest.mark.parametrize("name", ["gpt2", "qwen", "mistral"])
def test_same_tokenizer_maps_every_regular_token_to_itself(name):
    tok = load_packaged_tokenizer(name)
    vocab = VocabMap(tok, tok)
    assert vocab.matched_fraction == 1.0 and vocab.student_matched_fraction == 1.0
    regular = np.flatnonzero(vocab.teacher_to_student >= 0)
    identity = vocab.teacher_to_student[regular] == regular
    if name == "mistral":
        # A byte-fallback piece <0x41> has the bytes of the piece "A": it maps to the regular piece.
        fallback = np.array([p.startswith("<0x") for p in tok.convert_ids_to_tokens(regular.tolist())])
        assert identity[~fallback].all()
        (byte_a, letter_a) = ids(tok, "<0x41>", "A")
        assert vocab.teacher_to_student[byte_a] == letter_a and vocab.teacher_to_student[letter_a] == letter_a
    else:
        assert identity.all()


def test_byte_fallback_duplicates_prefer_the_regular_piece():
    gpt2, mistral = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("mistral")
    vocab = VocabMap(mistral, gpt2)  # gpt2 teacher -> mistral student
    (g_a,) = ids(gpt2, "A")
    (m_a, m_byte_a) = ids(mistral, "A", "<0x41>")
    assert vocab.teacher_to_student[g_a] == m_a
    assert vocab.student_to_teacher[m_byte_a] == g_a


def test_matched_shares_canonical_bytes_vs_exact_string():
    gpt2, mistral = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("mistral")
    vocab = VocabMap(gpt2, mistral)  # mistral teacher: shares are of Mistral's vocabulary
    # docs/results.md, "Vocabulary map shares": exact strings match about a quarter of Mistral's vocabulary, canonical bytes about two thirds.
    assert 0.20 < vocab.exact_string_matched_fraction < 0.30
    assert 0.60 < vocab.matched_fraction < 0.72
    for s, t in CROSS_PAIRS:
        pair = VocabMap(load_packaged_tokenizer(s), load_packaged_tokenizer(t))
        assert pair.matched_fraction >= pair.exact_string_matched_fraction
        assert pair.student_matched_fraction >= pair.exact_string_student_matched_fraction
        reverse = VocabMap(load_packaged_tokenizer(t), load_packaged_tokenizer(s))
        assert reverse.matched_fraction == pytest.approx(pair.student_matched_fraction)


def test_cached_per_pair_and_lookup_helpers():
    torch = pytest.importorskip("torch")
    qwen, mistral = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("mistral")
    first, second = VocabMap(mistral, qwen), VocabMap(mistral, qwen)
    assert first.teacher_to_student is second.teacher_to_student  # built once per pair
    assert not first.teacher_to_student.flags.writeable
    (q_hello,) = ids(qwen, "ĠHello")
    (m_hello,) = ids(mistral, "▁Hello")
    padded_id = len(qwen) + 10  # a model's padded embedding row: no token, unmatched
    as_tensor = first.map_teacher_ids(torch.tensor([[q_hello, padded_id, -1, qwen.eos_token_id]]))
    assert as_tensor.tolist() == [[m_hello, -1, -1, -1]]
    assert first.map_teacher_ids(np.array([q_hello])).tolist() == [m_hello]
    assert first.map_student_ids(np.array([m_hello, 10**6])).tolist() == [q_hello, -1]
    table = first.teacher_to_student_tensor(size=len(qwen) + 64)
    assert table.shape == (len(qwen) + 64,) and table.dtype == torch.long
    assert table[q_hello] == m_hello and (table[len(qwen) :] == -1).all()
    summary = first.summary()
    assert summary["teacher_vocab"] == len(qwen) and summary["student_vocab"] == len(mistral)


def test_clearing_the_token_bytes_cache_also_forgets_vocabulary_maps():
    from gold_plugin.alignment import clear_token_bytes_cache, token_table
    from gold_plugin.alignment.vocab_map import _MAPS

    student, teacher = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("mistral")
    first = VocabMap(student, teacher)
    assert _MAPS and VocabMap(student, teacher).teacher_to_student is first.teacher_to_student  # cached
    clear_token_bytes_cache()
    assert not _MAPS
    rebuilt = VocabMap(student, teacher)
    assert rebuilt.teacher_to_student is not first.teacher_to_student
    np.testing.assert_array_equal(rebuilt.teacher_to_student, first.teacher_to_student)
    assert token_table(student) is rebuilt.student_table
