"""Canonical token bytes of real tokenizers, the dummy-prefix rule, and refusal of unsupported tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from alignment_helpers import HARD_TEXTS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gold_plugin.alignment import (
    UnsupportedTokenizerError,
    adds_prefix_space,
    align,
    encode_continuation,
    encode_continuation_batch,
    ids_to_bytes,
    text_for_teacher,
    token_byte_lengths,
    token_bytes,
    tokenizer_kind,
)
from gold_plugin.packaged_tokenizers import PACKAGED_TOKENIZERS, load_packaged_tokenizer


@pytest.mark.parametrize(
    ("name", "piece", "expected"),
    [
        ("gpt2", "ĠHello", b" Hello"),
        ("gpt2", "Ċ", b"\n"),
        ("gpt2", "ä½", b"\xe4\xbd"),  # the first two bytes of 你
        ("qwen", "ĠHello", b" Hello"),
        ("qwen", "ä½łå¥½", "你好".encode()),
        ("mistral", "▁Hello", b" Hello"),
        ("mistral", "▁▁", b"  "),
        ("mistral", "<0x0A>", b"\n"),
        ("mistral", "<0xF0>", b"\xf0"),
        ("mistral", "你", "你".encode()),
    ],
)
def test_known_token_bytes(name, piece, expected):
    tok = load_packaged_tokenizer(name)
    assert token_bytes(tok)[tok.convert_tokens_to_ids(piece)] == expected


@pytest.mark.parametrize("name", PACKAGED_TOKENIZERS)
def test_special_tokens_are_zero_width_and_tables_are_cached(name):
    tok = load_packaged_tokenizer(name)
    table = token_bytes(tok)
    lengths = token_byte_lengths(tok)
    assert len(table) == len(tok) == lengths.size
    assert lengths.dtype == np.int64
    assert np.array_equal(lengths, [len(b) for b in table])
    specials = set(tok.all_special_ids)
    assert tok.eos_token_id in specials
    for i in specials:
        assert table[i] == b"" and lengths[i] == 0
    # Only special tokens are zero-width.
    assert set(np.flatnonzero(lengths == 0).tolist()) <= specials | {
        i for i, t in tok.added_tokens_decoder.items() if t.special
    }
    assert token_bytes(tok) is table and token_byte_lengths(tok) is lengths


def test_qwen_end_of_turn_and_mistral_bos_are_zero_width():
    qwen, mistral = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("mistral")
    for piece in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|extra_0|>"):
        assert token_bytes(qwen)[qwen.convert_tokens_to_ids(piece)] == b""
    for piece in ("<s>", "</s>", "<unk>"):
        assert token_bytes(mistral)[mistral.convert_tokens_to_ids(piece)] == b""


@pytest.mark.parametrize("name", PACKAGED_TOKENIZERS)
def test_bytes_of_encoded_text_and_the_dummy_prefix_rule(name):
    tok = load_packaged_tokenizer(name)
    assert adds_prefix_space(tok) == (name == "mistral")
    texts = list(HARD_TEXTS.values())
    batch = encode_continuation_batch(tok, texts)
    for text, continuation in zip(texts, batch, strict=True):
        data = text.encode()
        plain = tok.encode(text, add_special_tokens=False)
        expected_plain = b" " + data if adds_prefix_space(tok) and text and not text.startswith(" ") else data
        assert ids_to_bytes(tok, plain) == expected_plain
        # encode_continuation never adds the dummy prefix, so the teacher's bytes equal the text's.
        assert ids_to_bytes(tok, continuation) == data
        assert encode_continuation(tok, text) == continuation
        # The response text is built from canonical bytes, so a SentencePiece leading space survives.
        assert text_for_teacher(tok, plain) == expected_plain.decode()


@pytest.mark.parametrize("name", PACKAGED_TOKENIZERS)
def test_special_token_strings_in_a_response_are_text(name):
    tok = load_packaged_tokenizer(name)
    text = "say <|im_end|> or </s> <s> <|endoftext|> now"
    ids = encode_continuation(tok, text)
    assert ids_to_bytes(tok, ids) == text.encode()
    assert not set(ids) & set(tok.all_special_ids)


def test_decode_drops_the_sentencepiece_space_but_canonical_bytes_keep_it():
    mistral = load_packaged_tokenizer("mistral")
    ids = [mistral.convert_tokens_to_ids("▁Hello")]
    assert mistral.decode(ids) == "Hello"
    assert text_for_teacher(mistral, ids) == " Hello"
    assert ids_to_bytes(mistral, np.asarray(ids)) == b" Hello"


@pytest.mark.parametrize("name", PACKAGED_TOKENIZERS)
def test_ids_outside_the_vocabulary_never_crash_and_make_the_sample_unalignable(name):
    tok = load_packaged_tokenizer(name)
    teacher = load_packaged_tokenizer("gpt2" if name == "qwen" else "qwen")
    good = encode_continuation(tok, "Hi there")
    # A padded embedding row (vLLM samples the model's logits width, which exceeds the tokenizer) and -1.
    for bad_id in (len(tok) + 5, -1):
        s_ids = good[:1] + [bad_id] + good[1:]
        with pytest.raises(ValueError, match=f"{bad_id}.*outside"):
            ids_to_bytes(tok, s_ids)
        text = text_for_teacher(tok, s_ids)  # one bad sample must not crash the rollout
        assert text == "Hi there"
        alignment = align(tok, s_ids, teacher, encode_continuation(teacher, text))
        assert not alignment.aligned and "outside the vocabulary" in alignment.reason


def test_invalid_utf8_inside_a_response_makes_the_sample_unalignable():
    mistral, qwen = load_packaged_tokenizer("mistral"), load_packaged_tokenizer("qwen")
    # A lead byte followed by ASCII: not a cut at the end, so it cannot be sent to the teacher faithfully.
    s_ids = [mistral.convert_tokens_to_ids("<0xF0>"), mistral.convert_tokens_to_ids("▁ok")]
    text = text_for_teacher(mistral, s_ids)
    assert "\ufffd" in text
    alignment = align(mistral, s_ids, qwen, encode_continuation(qwen, text))
    assert not alignment.aligned and "first difference" in alignment.reason


def _wrap(backend: Tokenizer, name: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.name_or_path = name
    return tok


def test_wordpiece_is_refused_with_a_clear_error():
    vocab = {"[UNK]": 0, "[CLS]": 1, "hello": 2, "world": 3, "##s": 4}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tok = _wrap(backend, "tiny-bert-wordpiece")
    with pytest.raises(UnsupportedTokenizerError, match="tiny-bert-wordpiece.*WordPiece"):
        token_bytes(tok)
    assert issubclass(UnsupportedTokenizerError, ValueError)
    qwen = load_packaged_tokenizer("qwen")
    with pytest.raises(UnsupportedTokenizerError, match="tiny-bert-wordpiece"):
        align(qwen, [1], tok, [2])


def test_whitespace_split_bpe_is_refused():
    backend = Tokenizer(models.BPE({"[UNK]": 0, "a": 1, "b": 2}, [], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedTokenizerError, match="whitespace-bpe"):
        tokenizer_kind(_wrap(backend, "whitespace-bpe"))


def test_normalising_tokenizer_sample_is_unalignable():
    # A byte-level BPE with an NFKC normaliser: the ligature "ﬁ" becomes "fi", so its bytes differ from the text.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    normalising = _wrap(backend, "nfkc-byte-level")
    qwen = load_packaged_tokenizer("qwen")
    text = "a ﬁne day"
    s_ids = encode_continuation(qwen, text)
    t_ids = encode_continuation(normalising, text)
    assert ids_to_bytes(normalising, t_ids) == b"a fine day"
    alignment = align(qwen, s_ids, normalising, t_ids)
    assert not alignment.aligned and "first difference at byte 2" in alignment.reason
    # Without the ligature the same tokenizer aligns.
    fine = align(
        qwen,
        encode_continuation(qwen, "a fine day"),
        normalising,
        encode_continuation(normalising, "a fine day"),
    )
    assert fine.aligned
