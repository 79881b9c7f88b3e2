"""The byte projection through the GOLD step's two logit-loss hooks and OpenRLHF's per-sample transport."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gold_plugin.alignment import align, encode_continuation, text_for_teacher, token_bytes
from gold_plugin.config import GoldConfig, GoldConfigError, TeacherConfig
from gold_plugin.demo.tokenizers import build_tokenizer
from gold_plugin.signals.logit import LogitLossOptions, ProjectionPositions, projected_logit_loss
from gold_plugin.step import (
    LogitVocab,
    align_results,
    build_logit_inputs,
    compute_logit_loss,
    logit_metrics,
    per_unit_means,
)
from gold_plugin.teacher.types import TeacherResult
from gold_plugin.testing.byte_marginal import projected_positions


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Three responses of a merged-digit student scored by a single-digit teacher (random top-k)."""
    root = tmp_path_factory.mktemp("tok")
    teacher, student = build_tokenizer("digits", root / "d"), build_tokenizer("merged", root / "m")
    rng = np.random.default_rng(0)
    texts = ["241", "17", "9990"]
    responses, alignments, results = [], [], []
    for text in texts:
        s_ids = list(student.encode(text, add_special_tokens=False)) + [student.eos_token_id]
        t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids)) + [teacher.eos_token_id]
        top = rng.integers(0, len(teacher), size=(len(t_ids), 6))
        top[:, 0] = t_ids
        lp = np.log(rng.dirichlet(np.ones(6), size=len(t_ids)) * 0.9).astype(np.float32)
        responses.append(s_ids)
        alignments.append(align(student, s_ids, teacher, t_ids))
        results.append(
            TeacherResult(
                token_ids=np.asarray(t_ids),
                token_bytes=np.zeros(len(t_ids), dtype=np.int64),
                logprobs=lp[:, 0],
                topk_ids=top,
                topk_logprobs=lp,
            )
        )
    width = max(len(r) for r in responses)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for b, r in enumerate(responses):
        mask[b, : len(r)] = True
    gold = GoldConfig(signal="logit", logit_projection="bytes", teacher=TeacherConfig(topk=6))
    aligned = align_results(student, teacher, responses, results, gold)
    for alignment, direct in zip(aligned.alignments, alignments):  # align_results is the per-sample alignment
        assert np.array_equal(alignment.student_group, direct.student_group)
    return student, teacher, responses, aligned, results, mask, gold


def test_the_hooks_build_projection_inputs_and_shift_every_column(batch):
    student, teacher, responses, aligned, results, mask, gold = batch
    vocab = LogitVocab.build(student, teacher, gold)
    vocab.check(gold)
    assert vocab.student_end_ids == (student.eos_token_id,) and teacher.eos_token_id in vocab.teacher_end_ids
    inputs = build_logit_inputs(aligned, responses, mask, gold, vocab)
    assert (
        isinstance(inputs, ProjectionPositions) and inputs.num_positions > 0
    )  # compact: expanded at the loss
    assert int((inputs.consumed > 0).sum()) > 0  # teacher digits inside the student's merged tokens
    torch.manual_seed(0)
    logits = torch.randn(mask.shape[0], mask.shape[1], len(student), dtype=torch.float64)
    options = LogitLossOptions.from_config(gold)
    direct = projected_logit_loss(logits, inputs, vocab.projection, options=options).loss
    # OpenRLHF's layout: logits[:, offset + j] predicts action j; the path columns move with the positions.
    offset = 3
    padded = torch.cat([torch.randn(mask.shape[0], offset, len(student), dtype=torch.float64), logits], dim=1)
    shifted = compute_logit_loss(padded, inputs, gold, vocab, action_offset=offset).loss
    torch.testing.assert_close(shifted, direct, rtol=0, atol=1e-12)
    # Logits divided by the rollout temperature (both backends' policy logits): the loss undoes it and sees the
    # model's own distribution, scaled by --gold.uld_student_temperature only.
    tempered = compute_logit_loss(logits / 0.7, inputs, gold, vocab, logits_temperature=0.7).loss
    torch.testing.assert_close(tempered, direct, rtol=0, atol=1e-10)
    hot = dataclasses.replace(gold, uld_student_temperature=2.0)
    halved = projected_logit_loss(logits / 2.0, inputs, vocab.projection, options=options).loss
    torch.testing.assert_close(
        compute_logit_loss(logits, inputs, hot, vocab).loss, halved, rtol=0, atol=1e-10
    )
    with pytest.raises(ValueError, match="LogitVocab"):
        build_logit_inputs(aligned, responses, mask, gold)


def test_projection_remainder_metric_is_the_teachers_top_k_mass_outside_the_events(batch):
    """``gold/projection_remainder``, recomputed from the teacher's top-k rows: every single-digit teacher candidate
    with text is an event for a merged-digit student, an end id at a shared boundary is the end event, and
    everything else (an end id inside a student token, the mass beyond the top-k) is remainder. The teacher's end
    ids are its special ids (EOS and pad)."""
    student, teacher, responses, aligned, results, mask, gold = batch
    vocab = LogitVocab.build(student, teacher, gold)
    inputs = build_logit_inputs(aligned, responses, mask, gold, vocab)
    torch.manual_seed(2)
    logits = torch.randn(mask.shape[0], mask.shape[1], len(student))
    metrics = logit_metrics(compute_logit_loss(logits, inputs, gold, vocab), mask.shape[0])
    metrics = per_unit_means({k: float(v) for k, v in metrics.items()})  # the mean per position
    t_bytes = token_bytes(teacher)
    positions = projected_positions(inputs, aligned.alignments, responses, token_bytes(student), mask)
    expected = []
    for pos in positions:
        ids = results[pos.sample].topk_ids[pos.teacher_index]
        probs = np.exp(results[pos.sample].topk_logprobs[pos.teacher_index].astype(np.float64))
        ends = np.isin(ids, vocab.teacher_end_ids) & (not pos.consumed)
        events = np.array([bool(t_bytes[i]) for i in ids]) | ends
        expected.append(1.0 - probs[events].sum())
    assert any(pos.consumed for pos in positions) and min(expected) < max(expected)
    value = float(metrics["gold/projection_remainder"])
    assert 0.0 <= value <= 1.0 and value == pytest.approx(np.mean(expected), abs=1e-6)


def test_projection_inputs_survive_openrlhfs_per_sample_transport(batch):
    sys.path.append(
        str(Path(__file__).parent / "stubs")
    )  # vllm / flash_attn import stand-ins when not installed
    from gold_plugin.integrations.openrlhf.transport import pack_logit_inputs, unpack_logit_inputs

    student, teacher, responses, aligned, results, mask, gold = batch
    vocab = LogitVocab.build(student, teacher, gold)
    inputs = build_logit_inputs(aligned, responses, mask, gold, vocab)
    packed = pack_logit_inputs(inputs, mask.shape[0])
    # OpenRLHF splits a batch into samples and batches them again (here: reversed order, as a list per key).
    order = [2, 1, 0]
    per_sample = {key: [value[b] for b in order] for key, value in packed.items()}
    back = unpack_logit_inputs(per_sample)
    assert isinstance(back, ProjectionPositions)  # the type tag names the bundle
    torch.manual_seed(1)
    logits = torch.randn(mask.shape[0], mask.shape[1], len(student), dtype=torch.float64)
    options = LogitLossOptions.from_config(gold)
    before = projected_logit_loss(logits, inputs, vocab.projection, options=options).loss
    after = projected_logit_loss(logits[order], back, vocab.projection, options=options).loss
    for new_row, old_row in enumerate(order):
        torch.testing.assert_close(
            after[back.sample_index == new_row], before[inputs.sample_index == old_row], rtol=0, atol=1e-12
        )


def test_unknown_projection_is_refused():
    with pytest.raises(GoldConfigError, match="logit_projection"):
        GoldConfig(logit_projection="tokens")


def test_a_micro_batch_takes_its_samples_from_the_steps_inputs(batch):
    """The local backend builds a step's inputs once; ``select`` gives what building them for the
    micro-batch alone gives (rows renumbered in the micro-batch's order, columns unchanged)."""
    student, teacher, responses, aligned, results, mask, gold = batch
    vocab = LogitVocab.build(student, teacher, gold)
    whole = build_logit_inputs(aligned, responses, mask, gold, vocab)
    micro = [2, 0]
    sub_aligned = align_results(
        student, teacher, [responses[b] for b in micro], [results[b] for b in micro], gold
    )
    alone = build_logit_inputs(sub_aligned, [responses[b] for b in micro], mask[micro], gold, vocab)
    picked = whole.select(micro)
    assert picked.sample_index.tolist() == alone.sample_index.tolist() and alone.num_positions > 0
    for f in dataclasses.fields(alone):
        assert torch.equal(getattr(picked, f.name), getattr(alone, f.name)), f.name
    assert whole.select([]).num_positions == 0
