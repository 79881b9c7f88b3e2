"""The byte projection's pair tables and the inputs gathered from them (docs/signals.md, "Byte projection: where
the work runs"): equal, field by field, to the reference built from byte strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gold_plugin.alignment import align, encode_continuation, text_for_teacher, token_bytes
from gold_plugin.alignment.sorted_vocab import sorted_vocab
from gold_plugin.demo.tokenizers import build_tokenizer
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.signals.logit import (
    build_projection_tables,
    expand_positions,
    projection_positions,
    projection_tables,
)
from gold_plugin.signals.logit import byte_projection_tables as tables_module
from gold_plugin.testing.reference_projection import reference_projection_inputs

_TEXTS = [
    "In 2024, 1,234,567 people paid $89.99 each; 3.14159 * 2 = 6.28318 and 9876543210 / 3 = 3292181070.",
    "def add(a, b):\n    return a + b  # 12345 + 67890 = 80235\n\nprint(add(2, 40))\n",
    "東京タワーは333メートルです。 Hello world!!! The year 1999 was... fine, wasn't it?",
    "Answer: 42. Then x**2 == 144 ==> x = 12; ======== done ========",
]


def _normalised(inputs) -> dict[str, torch.Tensor]:
    """The fields, with every empty range written (0, 0) (the reference writes its insertion point)."""
    fields = {name: value.clone() for name, value in vars(inputs).items()}
    for lo, hi in (("range_lo", "range_hi"), ("chain_lo", "chain_hi"), ("condition_lo", "condition_hi")):
        empty = fields[lo] >= fields[hi]
        fields[lo][empty] = 0
        fields[hi][empty] = 0
    return fields


def _batch(student, teacher, texts, k, seed):
    """Aligned responses with a plausible teacher top-k: the true token, teacher tokens next to it in byte order
    (prefixes and extensions of it), tokens spelled by the next bytes of the text, random ids, end ids, padding
    and repeated ids."""
    rng = np.random.default_rng(seed)
    t_bytes = token_bytes(teacher)
    by_bytes = np.array(sorted(range(len(t_bytes)), key=lambda i: t_bytes[i]))
    place = np.empty_like(by_bytes)
    place[by_bytes] = np.arange(by_bytes.shape[0])
    ends = list(teacher.all_special_ids)
    alignments, ids, top_ids, top_lp = [], [], [], []
    for text in texts:
        s_ids = list(student.encode(text, add_special_tokens=False)) + [student.eos_token_id]
        t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids)) + [teacher.eos_token_id]
        alignment = align(student, s_ids, teacher, t_ids)
        assert alignment.aligned, alignment.reason
        n = len(t_ids)
        near = by_bytes[
            np.clip(place[t_ids][:, None] + rng.integers(-12, 13, (n, k // 2)), 0, len(t_bytes) - 1)
        ]
        cand = np.concatenate(
            [np.asarray(t_ids)[:, None], near, rng.integers(0, len(teacher), (n, k - 1 - k // 2))], axis=1
        )
        cand[:, -1] = rng.choice(ends, size=n)
        cand[rng.random(cand.shape) < 0.02] = -1
        repeat = rng.random(n) < 0.1
        cand[repeat, 2] = cand[repeat, 1]
        lp = np.log(rng.dirichlet(np.ones(k), size=n) * 0.9).astype(np.float32)
        alignments.append(alignment)
        ids.append(np.asarray(s_ids))
        top_ids.append(cand)
        top_lp.append(lp)
    mask = torch.zeros(len(ids), max(len(x) for x in ids), dtype=torch.bool)
    for b, x in enumerate(ids):
        mask[b, : len(x)] = True
    return alignments, ids, top_ids, top_lp, mask


def _assert_equal_to_reference(student, teacher, texts, k=24, seed=0):
    vocab = sorted_vocab(student, teacher)
    alignments, ids, top_ids, top_lp, mask = _batch(student, teacher, texts, k, seed)
    ends = dict(student_end_ids=[student.eos_token_id], teacher_end_ids=list(teacher.all_special_ids))
    reference = reference_projection_inputs(vocab, alignments, ids, top_ids, top_lp, mask, **ends)
    compact = projection_positions(vocab, alignments, ids, top_ids, top_lp, mask)
    inputs = expand_positions(projection_tables(vocab), compact, **ends)
    expected, got = _normalised(reference), _normalised(inputs)
    assert reference.num_positions > 0
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name
    return reference


@pytest.mark.parametrize(
    "student_name,teacher_name",
    [("gpt2", "qwen"), ("qwen", "gpt2"), ("mistral", "qwen"), ("qwen", "mistral")],
)
def test_inputs_gathered_from_tables_equal_the_byte_string_reference(student_name, teacher_name):
    student, teacher = load_packaged_tokenizer(student_name), load_packaged_tokenizer(teacher_name)
    reference = _assert_equal_to_reference(student, teacher, _TEXTS)
    # Every kind of term occurs, so the comparison covers them.
    assert int((reference.consumed > 0).sum()) > 0
    assert bool((reference.parent >= 0).any()) and bool((reference.exact_rank >= 0).any())
    assert bool((reference.condition_exact_rank >= 0).any()) and bool((reference.teacher_event == 24).any())
    if teacher_name != "qwen":  # a teacher that merges what the student splits: chain-rule terms
        assert bool((reference.chain_hi > reference.chain_lo).any())


def test_digit_tokenizers_both_ways_equal_the_reference(tmp_path):
    digits, merged = build_tokenizer("digits", tmp_path / "d"), build_tokenizer("merged", tmp_path / "m")
    texts = ["12+30=42", "999+1=1000", "7+8=15", "450+550=1000"]
    inside = _assert_equal_to_reference(merged, digits, texts, k=8, seed=1)
    assert bool((inside.consumed > 0).any())  # single teacher digits inside the student's merged tokens
    chained = _assert_equal_to_reference(digits, merged, texts, k=8, seed=2)
    assert bool((chained.chain_hi > chained.chain_lo).any()) and bool(chained.chain_subtract.any())


def test_tables_equal_a_scan_of_the_vocabulary():
    student, teacher = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("qwen")
    vocab = sorted_vocab(student, teacher)
    tables = projection_tables(vocab)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    rng = np.random.default_rng(0)
    # A node's range is exactly the student tokens that start with its bytes, its exact id the token spelling
    # it, its count the student tokens among its non-empty prefixes.
    for node in rng.integers(1, tables.node_depth.shape[0], 60).tolist():
        lo, hi = int(tables.node_lo[node]), int(tables.node_hi[node])
        depth = int(tables.node_depth[node])
        text = s_bytes[int(vocab.order[lo])][:depth]
        assert set(vocab.order[lo:hi].tolist()) == {i for i, b in enumerate(s_bytes) if b.startswith(text)}
        exact = int(tables.node_exact[node])
        assert (exact >= 0) == (text in set(s_bytes)) and (exact < 0 or s_bytes[exact] == text)
        student_set = {b for b in s_bytes if b}
        assert int(tables.node_count[node]) == sum(text[:n] in student_set for n in range(1, depth + 1))
    # A teacher token's deepest node is its longest prefix that starts a student token; in the teacher's byte order
    # token a is a proper prefix of token t exactly when order[a] < order[t] < order_end[a].
    teacher_set = {b: i for i, b in sorted(enumerate(t_bytes), reverse=True) if b}
    order, order_end = tables.teacher_order, tables.teacher_order_end
    for t in rng.integers(0, len(teacher), 200).tolist():
        b = t_bytes[t]
        if not b or t in teacher.all_special_ids:
            continue
        starts = [n for n in range(len(b) + 1) if any(s.startswith(b[:n]) for s in s_bytes if s)]
        assert int(tables.node_depth[tables.teacher_node[t]]) == max(starts)
        others = {teacher_set[b[:n]] for n in range(1, len(b)) if b[:n] in teacher_set}
        others |= set(rng.integers(0, len(teacher), 20).tolist())
        for a in others:
            if not t_bytes[a] or a in teacher.all_special_ids:
                continue
            proper_prefix = len(t_bytes[a]) < len(b) and b.startswith(t_bytes[a])
            assert bool(order[a] < order[t] < order_end[a]) == proper_prefix, (a, t)


def test_colliding_hash_bases_are_replaced(monkeypatch):
    """Bases under which two student prefixes share a key are skipped (base 1: every anagram collides)."""
    student, teacher = load_packaged_tokenizer("gpt2"), load_packaged_tokenizer("mistral")
    vocab = sorted_vocab(student, teacher)
    good = build_projection_tables(vocab)
    monkeypatch.setattr(tables_module, "_BASES", ((1, 1), good.bases))
    assert tables_module._build(vocab, (1, 1)) is None
    again = build_projection_tables(vocab)
    assert again.bases == good.bases
    assert torch.equal(again.node_lo, good.node_lo) and torch.equal(again.teacher_node, good.teacher_node)
