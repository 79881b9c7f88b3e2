"""Byte-projected logit loss: range masses, projection inputs and the loss (docs/signals.md, "Byte projection")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gold_plugin.alignment import align, encode_continuation, text_for_teacher, token_bytes
from gold_plugin.alignment.sorted_vocab import sorted_vocab, truncate_hex
from gold_plugin.demo.tokenizers import build_tokenizer
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.signals.logit import (
    LogitLossOptions,
    ProjectionVocab,
    aligned_logit_loss,
    projected_logit_loss,
    projection_inputs,
    range_mass,
    student_event_probs,
    teacher_event_probs,
)
from gold_plugin.signals.logit import byte_projection_range_mass as range_mass_module
from gold_plugin.testing.prefix_hashes import PrefixHashes, PrefixLookups
from gold_plugin.testing.reference_projection import reference_projection_inputs


@pytest.fixture(scope="module")
def digit_tokenizers(tmp_path_factory):
    """The demo task's tokenizers: single digits (Qwen-like) and merged digit runs (Llama-3-like)."""
    root = tmp_path_factory.mktemp("tok")
    return build_tokenizer("digits", root / "digits"), build_tokenizer("merged", root / "merged")


def _pair(student, teacher, text: str) -> tuple[list[int], list[int]]:
    s_ids = list(student.encode(text, add_special_tokens=False)) + [student.eos_token_id]
    t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids)) + [teacher.eos_token_id]
    return s_ids, t_ids


def _inputs(student, teacher, s_ids, t_ids, top_ids, top_lp, *, ends=True, max_chain=4):
    alignment = align(student, s_ids, teacher, t_ids)
    inputs = projection_inputs(
        sorted_vocab(student, teacher),
        [alignment],
        [np.asarray(s_ids)],
        [np.asarray(top_ids)],
        [np.asarray(top_lp, dtype=np.float32)],
        torch.ones(1, len(s_ids), dtype=torch.bool),
        student_end_ids=[student.eos_token_id] if ends else (),
        teacher_end_ids=[teacher.eos_token_id] if ends else (),
        max_chain=max_chain,
    )
    return inputs, ProjectionVocab.from_sorted(sorted_vocab(student, teacher))


def _ids(tokenizer, pieces: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(p) for p in pieces]


def _starting_with(tokenizer, prefix: bytes) -> list[int]:
    return [i for i, b in enumerate(token_bytes(tokenizer)) if b.startswith(prefix)]


# --- range masses -------------------------------------------------------------------------------------------

# Rows whose ranges hold more than this share of the vocabulary are summed cumulatively, the others gathered:
# 0 = every row with a multi-token range cumulative, 1e9 = every row gathered, 1.0 = a mix in the range test.
_DENSE_SHARES = [0.0, 1.0, 1e9]


@pytest.mark.parametrize("dense_share", _DENSE_SHARES)
def test_range_mass_equals_a_direct_sum_and_passes_gradcheck(dense_share, monkeypatch):
    monkeypatch.setattr(range_mass_module, "_DENSE_SHARE", dense_share)
    torch.manual_seed(0)
    n, vocab = 5, 23
    logits = torch.randn(n, vocab + 2, dtype=torch.float64, requires_grad=True)  # 2 padded columns
    order = torch.randperm(vocab)
    untied_sorted = (torch.rand(vocab) > 0.5).double()
    rows = torch.randint(0, n, (40,))
    lo = torch.randint(0, vocab, (40,))
    hi = torch.minimum(lo + torch.randint(0, 6, (40,)), torch.tensor(vocab))
    untied = torch.rand(40) > 0.5
    probs = torch.softmax(logits / 1.3, dim=1)
    expected = torch.stack(
        [
            (
                probs[rows[q], order[lo[q] : hi[q]]] * (untied_sorted[lo[q] : hi[q]] if untied[q] else 1.0)
            ).sum()
            for q in range(40)
        ]
    )

    def masses(x: torch.Tensor, chunk: int) -> torch.Tensor:
        return range_mass(x, rows, lo, hi, untied, order, untied_sorted, temperature=1.3, chunk_size=chunk)

    torch.testing.assert_close(masses(logits, 16), expected, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x: masses(x, 16), (logits,))
    # Chunking changes nothing: one row per block vs all rows at once.
    g1 = torch.autograd.grad(masses(logits, 8).pow(2).sum(), logits)[0]
    g2 = torch.autograd.grad(masses(logits, 4096).pow(2).sum(), logits)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-15)


# --- hand-computed projections ------------------------------------------------------------------------------


def test_merged_student_digit_teacher_is_the_sum_over_tokens_starting_with_the_digit(digit_tokenizers):
    teacher, student = digit_tokenizers  # student merges "42"; teacher writes "4", "2"
    s_ids, t_ids = _pair(student, teacher, "12+30=42")
    assert student.convert_ids_to_tokens(s_ids[-2]) == "42"
    t4, t2, t5 = _ids(teacher, ["4", "2", "5"])
    k_ids = np.full((len(t_ids), 3), -1)
    k_lp = np.full((len(t_ids), 3), -np.inf)
    j4 = len(t_ids) - 3  # teacher "4", then "2", then EOS
    k_ids[j4], k_lp[j4] = [t4, t5, t2], np.log([0.7, 0.2, 0.05])
    k_ids[j4 + 1], k_lp[j4 + 1] = [t2, t4, -1], [np.log(0.9), np.log(0.05), -np.inf]
    inputs, pv = _inputs(student, teacher, s_ids, t_ids, k_ids, k_lp)
    assert inputs.num_positions == 2 and inputs.consumed.tolist() == [0, 1]
    logits = torch.randn(1, len(s_ids), len(student), dtype=torch.float64)
    probs, rest = student_event_probs(logits, inputs, LogitLossOptions(), pv)
    q = torch.softmax(logits[0, len(s_ids) - 2], dim=0)  # the distribution that chose "42"
    starts4, starts5, starts2 = (_starting_with(student, d) for d in (b"4", b"5", b"2"))
    torch.testing.assert_close(
        probs[0, :3], torch.stack([q[starts4].sum(), q[starts5].sum(), q[starts2].sum()])
    )
    torch.testing.assert_close(rest[0], 1 - probs[0].sum())
    # After the consumed "4": the student's token continues with "2" (or "4"), among tokens that go beyond "4".
    beyond4 = [i for i in starts4 if len(token_bytes(student)[i]) > 1]
    den = q[beyond4].sum()
    tok42 = [i for i in starts4 if token_bytes(student)[i].startswith(b"42")]
    tok44 = [i for i in starts4 if token_bytes(student)[i].startswith(b"44")]
    torch.testing.assert_close(probs[1, :2], torch.stack([q[tok42].sum(), q[tok44].sum()]) / den)
    torch.testing.assert_close(rest[1], 1 - probs[1].sum())
    assert float(probs.sum(1).max()) <= 1 + 1e-12


def test_split_student_merged_teacher_follows_the_sampled_path(digit_tokenizers):
    student, teacher = digit_tokenizers  # student writes "4", "2"; teacher has "42", "43", "4", "6", "60"
    s_ids, t_ids = _pair(student, teacher, "12+30=42")
    assert teacher.convert_ids_to_tokens(t_ids[-2]) == "42"
    pieces = ["42", "43", "4", "6", "60"]
    assert set(pieces) <= set(teacher.get_vocab())
    k_ids = np.full((len(t_ids), len(pieces)), -1)
    k_lp = np.full((len(t_ids), len(pieces)), -np.inf)
    j = len(t_ids) - 2
    k_ids[j] = _ids(teacher, pieces)
    k_lp[j] = np.log([0.5, 0.2, 0.1, 0.05, 0.1])
    inputs, pv = _inputs(student, teacher, s_ids, t_ids, k_ids, k_lp)
    assert inputs.num_positions == 1
    logits = torch.randn(1, len(s_ids), len(student), dtype=torch.float64)
    probs, rest = student_event_probs(logits, inputs, LogitLossOptions(), pv)
    i = len(s_ids) - 3  # the student position that chose "4"
    q_i, q_next = torch.softmax(logits[0, i], 0), torch.softmax(logits[0, i + 1], 0)
    s4, s6, s2, s3 = _ids(student, ["4", "6", "2", "3"])
    p42, p43 = q_i[s4] * q_next[s2], q_i[s4] * q_next[s3]
    expected = torch.stack([p42, p43, q_i[s4] - p42 - p43, q_i[s6]])
    torch.testing.assert_close(probs[0, :4], expected)
    # "60" is spelled "6", "0" by the student, which did not sample "6": it joins "6" on the teacher's side.
    assert float(probs[0, 4]) == 0.0
    teacher_probs = teacher_event_probs(inputs, LogitLossOptions(), torch.float64)
    torch.testing.assert_close(
        teacher_probs[0, :5], torch.tensor([0.5, 0.2, 0.1, 0.15, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(rest[0], 1 - expected.sum())


# --- same tokenizer: the matched loss ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "merged"])
def test_same_tokenizer_equals_todays_matched_loss(name, digit_tokenizers):
    tokenizer = load_packaged_tokenizer("gpt2") if name == "gpt2" else digit_tokenizers[1]
    text = "The year 2024 had 366 days; 12+30=42." if name == "gpt2" else "12+30=42"
    s_ids, t_ids = _pair(tokenizer, tokenizer, text)
    assert s_ids == t_ids
    vocab = len(tokenizer)
    torch.manual_seed(1)
    k = 16
    teacher_lp = torch.randn(len(t_ids), vocab, dtype=torch.float64).mul(3).log_softmax(-1)
    teacher_lp[:, tokenizer.all_special_ids] = -torch.inf  # no special candidates: the ULD part is empty
    top = teacher_lp.topk(k, dim=-1)
    inputs, pv = _inputs(
        tokenizer, tokenizer, s_ids, t_ids, top.indices.numpy(), top.values.numpy(), ends=False
    )
    assert inputs.num_positions == len(t_ids)  # every position, the final EOS pair included
    logits = torch.randn(1, len(s_ids), vocab, dtype=torch.float64, requires_grad=True)
    for beta in (0.0, 0.5, 1.0):
        new = projected_logit_loss(logits, inputs, pv, options=LogitLossOptions(beta=beta))
        old = aligned_logit_loss(
            logits,
            top.indices,
            top.values,
            torch.arange(vocab),
            positions=inputs.positions,
            options=LogitLossOptions(beta=beta, matched_weight=1.0, unmatched_weight=0.0),
        )
        torch.testing.assert_close(new.loss, old.loss, rtol=0, atol=1e-6)
        g_new = torch.autograd.grad(new.loss.sum(), logits)[0]
        g_old = torch.autograd.grad(old.loss.sum(), logits)[0]
        torch.testing.assert_close(g_new, g_old, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dense_share", _DENSE_SHARES)
def test_loss_gradcheck_and_chunking(digit_tokenizers, dense_share, monkeypatch):
    monkeypatch.setattr(range_mass_module, "_DENSE_SHARE", dense_share)
    student, teacher = digit_tokenizers[0], digit_tokenizers[1]  # digits student, merged teacher: chains
    s_ids, t_ids = _pair(student, teacher, "47+95=241")
    torch.manual_seed(2)
    teacher_lp = torch.randn(len(t_ids), len(teacher), dtype=torch.float64).mul(2).log_softmax(-1)
    top = teacher_lp.topk(12, dim=-1)
    inputs, pv = _inputs(student, teacher, s_ids, t_ids, top.indices.numpy(), top.values.numpy())
    assert inputs.num_positions > 0
    logits = torch.randn(1, len(s_ids), len(student), dtype=torch.float64, requires_grad=True)

    def loss(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        options = LogitLossOptions(beta=0.3, student_temperature=1.5, chunk_size=chunk)
        return projected_logit_loss(x, inputs, pv, options=options).loss

    # fast_mode: the Jacobian against random directions (a full-vocabulary Jacobian takes minutes); the range
    # masses it is built from pass the exhaustive check above.
    assert torch.autograd.gradcheck(loss, (logits,), atol=1e-7, fast_mode=True)
    torch.testing.assert_close(loss(logits, 8), loss(logits, 4096), rtol=0, atol=1e-14)
    g_small = torch.autograd.grad(loss(logits, 8).sum(), logits)[0]
    g_big = torch.autograd.grad(loss(logits, 4096).sum(), logits)[0]
    torch.testing.assert_close(g_small, g_big, rtol=0, atol=1e-14)


# --- real tokenizers --------------------------------------------------------------------------------------------

_TEXTS = [
    "In 2024, the committee approved 1,234,567 dollars for road repairs.",
    " def tokenize(text):\n    return [t for t in text.split()]  # 42",
    "Ünïcödé naïve café — 東京 3.14159",
]


@pytest.mark.parametrize(
    "student_name,teacher_name",
    [("gpt2", "qwen"), ("qwen", "gpt2"), ("mistral", "qwen"), ("qwen", "mistral")],
)
def test_real_tokenizers_ranges_equal_a_vocabulary_scan_and_probabilities_sum_to_at_most_one(
    student_name, teacher_name
):
    student, teacher = load_packaged_tokenizer(student_name), load_packaged_tokenizer(teacher_name)
    vocab = sorted_vocab(student, teacher)
    s_bytes = token_bytes(student)
    rng = np.random.default_rng(0)
    alignments, ids, top_ids, top_lp = [], [], [], []
    for text in _TEXTS:
        s_ids, t_ids = _pair(student, teacher, text)
        alignment = align(student, s_ids, teacher, t_ids)
        assert alignment.aligned, alignment.reason
        # The teacher's top-k: its sampled token, the next teacher pieces' first bytes and random ids.
        k = 8
        cand = rng.integers(0, len(teacher), size=(len(t_ids), k))
        cand[:, 0] = t_ids
        lp = np.log(rng.dirichlet(np.ones(k), size=len(t_ids)) * 0.9)
        alignments.append(alignment)
        ids.append(np.asarray(s_ids))
        top_ids.append(cand)
        top_lp.append(lp)
    width = max(len(x) for x in ids)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for b, x in enumerate(ids):
        mask[b, : len(x)] = True
    inputs = projection_inputs(vocab, alignments, ids, top_ids, top_lp, mask)
    pv = ProjectionVocab.from_sorted(vocab)
    assert inputs.num_positions > 0
    # Every key's range is exactly the set of student tokens whose bytes start with it (a vocabulary scan):
    # keys are teacher tokens of the texts, alone and after the first bytes of a student token.
    t_bytes = token_bytes(teacher)
    keys = set()
    for text in _TEXTS:
        s_ids, t_ids = _pair(student, teacher, text)
        for s, t in zip(s_ids, t_ids):
            keys.update({t_bytes[t], s_bytes[s][:1] + t_bytes[t], s_bytes[s][:2]})
    keys = sorted(k for k in keys if k)
    lo, hi = vocab.prefix_ranges(np.array([k.hex().encode() for k in keys], dtype="S"))
    for key, a, z in zip(keys, lo, hi):
        scan = {i for i, b in enumerate(s_bytes) if b.startswith(key)}
        assert set(vocab.order[a:z].tolist()) == scan, key
    # The reference's hash lookups of prefixes give the same inputs as searchsorted on the keys (its fallback).
    hashed = reference_projection_inputs(vocab, alignments, ids, top_ids, top_lp, mask)
    plain = PrefixLookups(vocab, None, None)
    again = reference_projection_inputs(vocab, alignments, ids, top_ids, top_lp, mask, lookups=plain)
    for name, value in vars(hashed).items():
        assert torch.equal(value, getattr(again, name)), name
    logits = torch.randn(len(ids), width, len(student)) * 3
    probs, rest = student_event_probs(logits, inputs, LogitLossOptions(chunk_size=64), pv)
    assert float(probs.min()) >= 0 and float(rest.min()) >= 0
    assert float((probs.sum(dim=1) + rest).max()) <= 1 + 1e-5
    loss = projected_logit_loss(logits, inputs, pv, options=LogitLossOptions(chunk_size=64)).loss
    assert torch.isfinite(loss).all() and float(loss.min()) >= -1e-6


def test_prefix_lookups_by_hash_equal_searchsorted_and_check_every_hit():
    vocab = sorted_vocab(load_packaged_tokenizer("qwen"), load_packaged_tokenizer("gpt2"))
    rng = np.random.default_rng(0)
    # Student keys followed by teacher keys: many prefixes are tokens on one side or both.
    keys = np.strings.add(
        vocab.student_keys[rng.integers(0, vocab.size, (60, 5))],
        vocab.teacher_keys[rng.integers(0, vocab.teacher_keys.shape[0], (60, 5))],
    )
    num_bytes = np.strings.str_len(keys) // 2
    prefixes = PrefixHashes(keys)
    lookups = PrefixLookups.build(vocab)
    wrong_ids = dataclasses.replace(
        lookups, student_table=(lookups.student_table[0], np.roll(lookups.student_table[1], 1))
    )
    hits = 0
    for length in range(1, int(num_bytes.max()) + 1):
        where = num_bytes >= length
        prefix = truncate_hex(keys[where], length)
        expected = vocab.exact_ids(prefix)
        assert np.array_equal(lookups.exact_ids(prefixes, length, where), expected)
        assert np.array_equal(lookups.teacher_ids(prefixes, length, where), vocab.teacher_ids(prefix))
        # A hash found with other bytes is no hit (every hit is checked against the token's bytes).
        assert (wrong_ids.exact_ids(prefixes, length, where) == -1).all()
        hits += int((expected >= 0).sum())
    assert hits > 100


def test_mismatched_inputs_are_refused(digit_tokenizers):
    student, teacher = digit_tokenizers
    s_ids, t_ids = _pair(student, teacher, "12+30=42")
    alignment = align(student, s_ids, teacher, t_ids)
    k_ids = np.zeros((len(t_ids) + 1, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="teacher top-k"):
        projection_inputs(
            sorted_vocab(student, teacher),
            [alignment],
            [np.asarray(s_ids)],
            [k_ids],
            [np.zeros(k_ids.shape, np.float32)],
            torch.ones(1, len(s_ids), dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="actions"):
        projection_inputs(
            sorted_vocab(student, teacher),
            [alignment],
            [np.asarray(s_ids)],
            [k_ids[:-1]],
            [np.zeros((len(t_ids), 2), np.float32)],
            torch.ones(1, len(s_ids) + 1, dtype=torch.bool),
        )
