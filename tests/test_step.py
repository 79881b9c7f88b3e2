"""The GOLD step both backends call (gold_plugin.step): off-policy draw, requests, alignment, advantages, loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gold_plugin.alignment import FlatAlignment, align, encode_continuation
from gold_plugin.alignment.result import Alignment
from gold_plugin.config import GoldConfig, TeacherConfig
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.signals.logit import LogitLoss, LogitLossInputs
from gold_plugin.step import (
    align_results,
    build_logit_inputs,
    choose_off_policy,
    compute_logit_loss,
    distill_advantages,
    gold_advantages,
    logit_loss_term,
    logit_metrics,
    mask_unscored_groups,
    mean_metrics,
    per_unit_means,
    reference_response_ids,
    reference_text,
    sample_metrics,
    teacher_prompt,
    teacher_requests,
)
from gold_plugin.step.aligned import _without_text
from gold_plugin.teacher.types import TeacherResult


def test_off_policy_draw_is_a_seeded_share_of_the_prompts():
    refs = [f"answer {i}" for i in range(32)]
    off, missing = choose_off_policy(refs, 0.25, seed=7, step=3)
    assert off.sum() == 24 and not missing.any()
    again, _ = choose_off_policy(refs, 0.25, seed=7, step=3)
    other, _ = choose_off_policy(refs, 0.25, seed=7, step=4)
    assert np.array_equal(off, again) and not np.array_equal(off, other)
    assert choose_off_policy(refs, 0.5, 7, 0)[0].sum() == 16
    assert not choose_off_policy(refs, 1.0, 7, 0)[0].any() and choose_off_policy(refs, 0.0, 7, 0)[0].all()
    # Prompts without a reference are trained on-policy and counted, never dropped.
    holes = [None if i % 2 else r for i, r in enumerate(refs)]
    off, missing = choose_off_policy(holes, 0.0, 7, 0)
    assert np.array_equal(off, np.arange(32) % 2 == 0) and np.array_equal(missing, np.arange(32) % 2 == 1)


def test_reference_text_and_ids():
    assert reference_text("42") == "42" and reference_text(7) == "7"
    assert reference_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert reference_text(None) is None and reference_text("") is None and reference_text(True) is None
    tok = load_packaged_tokenizer("qwen")
    [full, cut] = (
        reference_response_ids(tok, ["Hello world", "Hello world"], None),
        reference_response_ids(tok, ["Hello world"], 1),
    )
    plain = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert full[0] == plain + [tok.eos_token_id] and cut[0] == plain[:1]  # cut responses have no EOS


def test_teacher_requests_from_canonical_bytes():
    tok = load_packaged_tokenizer("qwen")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok(" café ☕", add_special_tokens=False)["input_ids"]
    with_end, cut = teacher_requests(tok, [ids + [end], ids], [[{"role": "user", "content": "hi"}], "plain"])
    assert with_end.response == cut.response == " café ☕"
    assert with_end.ends_with_eos and not cut.ends_with_eos and cut.prompt == "plain"
    with pytest.raises(ValueError, match="teacher prompts"):
        teacher_requests(tok, [ids], [])


def _alignment(student, teacher):
    return Alignment(np.array(student), np.array(teacher), num_groups=len({g for g in student if g >= 0}))


def test_unscored_groups_are_masked_and_renumbered():
    alignment = _alignment([0, 1, 1, 2, 3], [0, 1, 2, 2, 2, 3])
    masked = mask_unscored_groups(alignment, np.array([-1.0, -2.0, np.nan, -1.0, -1.0, -0.5]))
    # group 2 (teacher tokens 2..4) holds the NaN: gone; group 3 becomes 2
    assert masked.num_groups == 3
    assert masked.student_group.tolist() == [0, 1, 1, -1, 2]
    assert masked.teacher_group.tolist() == [0, 1, -1, -1, -1, 2]
    assert mask_unscored_groups(alignment, np.zeros(6)) is alignment


def _result(token_ids, logprobs, error=None, topk=2):
    n = len(token_ids)
    ids = np.tile(np.arange(topk), (n, 1)).astype(np.int64)
    return TeacherResult(
        token_ids=np.asarray(token_ids, dtype=np.int64),
        token_bytes=np.ones(n, dtype=np.int64),
        logprobs=np.asarray(logprobs, dtype=np.float32),
        topk_ids=ids,
        topk_logprobs=np.full((n, topk), -1.0, dtype=np.float32),
        error=error,
    )


@pytest.fixture(scope="module")
def batch():
    """Three gpt2 responses scored by a 'teacher' with the same tokenizer: good, unscored tail, teacher error."""
    tok = load_packaged_tokenizer("gpt2")
    texts = [" one two three", " four five", " six"]
    ids = [np.asarray(tok(t)["input_ids"]) for t in texts]
    results = [
        _result(ids[0], [-1.0, -2.0, -0.5]),
        _result(ids[1], [-1.0, np.nan]),
        TeacherResult.failed("prompt rejected by the chat template", topk=2),
    ]
    gold = GoldConfig(signal="both", logit_projection="vocab", teacher=TeacherConfig(topk=2), kl_discount=0.0)
    aligned = align_results(tok, tok, ids, results, gold)
    width = max(len(x) for x in ids)
    mask = torch.zeros(3, width + 1, dtype=torch.bool)
    for b, x in enumerate(ids):
        mask[b, 1 : 1 + len(x)] = True  # right-shifted actions, as in OpenRLHF's layout
    logprobs = torch.full(mask.shape, -1.5) * mask
    return tok, ids, results, gold, aligned, mask, logprobs


def test_align_results_masks_unscored_groups_and_keeps_the_teachers_reason(batch):
    tok, ids, _results, _gold, aligned, _mask, _ = batch
    expected = align(tok, ids[0], tok, ids[0])
    assert aligned.alignments[0].student_group.tolist() == expected.student_group.tolist() == [0, 1, 2]
    assert aligned.alignments[1].student_group.tolist() == [0, -1]  # the unscored token's group is gone
    bad = aligned.alignments[2]
    assert not bad.aligned and bad.reason == "teacher: prompt rejected by the chat template"
    assert aligned.teacher_failed.tolist() == [False, False, True]
    problem = align_results(
        tok, tok, ids[:1], [None], batch[3], problems=["response is not one contiguous span"]
    )
    assert problem.alignments[0].reason == "response is not one contiguous span"


def test_advantages_metrics_and_logit_inputs(batch):
    _tok, ids, results, gold, aligned, mask, logprobs = batch
    distill, signal = distill_advantages(aligned, logprobs, mask, gold)
    assert signal.sum() == 3 + 1 and signal[2].sum() == 0
    # d_g = -1.5 - lT: advantages -d = lT + 1.5
    torch.testing.assert_close(distill.advantages[0, 1:4], torch.tensor([0.5, -0.5, 1.0]))
    # --gold.kl_length_normalised with kl_discount 1 (MiniLLM): the mean of the remaining groups' -d.
    minillm = dataclasses.replace(gold, kl_discount=1.0, kl_length_normalised=True)
    mean_returns, _ = distill_advantages(aligned, logprobs, mask, minillm)
    torch.testing.assert_close(mean_returns.advantages[0, 1:4], torch.tensor([1.0 / 3, 0.25, 1.0]))
    metrics = sample_metrics(
        aligned, distill, torch.tensor([False, True, False]), torch.zeros(3, dtype=torch.bool)
    )
    assert metrics["gold/unaligned"].tolist() == [0.0, 0.0, 1.0]
    assert metrics["gold/teacher_failed"].tolist() == [0.0, 0.0, 1.0]
    assert mean_metrics(metrics)["gold/off_policy"] == pytest.approx(1 / 3)
    inputs = build_logit_inputs(aligned, ids, mask, gold)
    assert inputs.positions.tolist() == [[0, 1], [0, 2], [0, 3], [1, 1]]  # (row, action column)
    assert inputs.sample_index.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="Sample 0"):
        build_logit_inputs(aligned, [ids[0][:1], ids[1], ids[2]], mask, gold)


def test_gold_advantages_normalise_on_policy_tokens_mix_and_zero_off_policy():
    distill = [torch.tensor([[1.0, 3.0, 0.0], [10.0, 20.0, 0.0]]), torch.tensor([[5.0, 0.0, 0.0]])]
    signal = [torch.tensor([[True, True, False], [True, True, False]]), torch.tensor([[True, False, False]])]
    off = [torch.tensor([False, True]), torch.tensor([False])]
    reward = [torch.full((2, 3), 2.0), torch.full((1, 3), -2.0)]
    gold = GoldConfig(alpha=0.5, kl_coef=2.0, advantage_norm="mean", signal="advantage")
    out = gold_advantages(reward, distill, signal, off, gold)
    # mean over on-policy signal tokens {1, 3, 5} = 3; the off-policy row (10, 20) does not count
    torch.testing.assert_close(out[0][0], torch.tensor([0.5 * 2 + 0.5 * 2 * -2.0, 0.5 * 2 + 0.0, 1.0]))
    assert torch.equal(out[0][1], torch.zeros(3))  # off-policy: no policy gradient at all
    torch.testing.assert_close(out[1][0], torch.tensor([-1.0 + 2.0, -1.0, -1.0]))
    on = [torch.zeros(2, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]
    exact = gold_advantages(reward, distill, signal, on, GoldConfig(alpha=0.0))
    assert all(torch.equal(a, r) for a, r in zip(exact, reward))  # alpha 0: the reward advantages, exactly
    logit_only = gold_advantages(
        None, distill, signal, off, GoldConfig(signal="logit", teacher=TeacherConfig(topk=1))
    )
    assert all(torch.equal(a, torch.zeros_like(a)) for a in logit_only)


def test_logit_loss_reduction_is_a_token_mean_over_the_step():
    gold = GoldConfig(alpha=0.5, logit_coef=3.0, signal="logit", teacher=TeacherConfig(topk=1))
    per_position = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    term = logit_loss_term(per_position, 12, gold)
    assert float(term.detach()) == pytest.approx(0.5 * 3.0 * 6.0 / 12)
    halves = logit_loss_term(per_position[:1], 12, gold) + logit_loss_term(per_position[1:], 12, gold)
    assert float(halves.detach()) == pytest.approx(
        float(term.detach())
    )  # micro-batches add up to the step's term
    loss = LogitLoss(per_position, per_position, per_position, torch.tensor([True, True, False]), 0.5, 0.5)
    logged = {k: float(v) for k, v in logit_metrics(loss, batch_size=4).items()}
    assert logged == {"gold/logit_positions": 0.5, "gold/logit_loss/sum_per_sample": pytest.approx(6.0 / 4)}
    assert per_unit_means(logged)["gold/logit_loss"] == pytest.approx(3.0)  # the mean per position
    # The byte projection's teacher remainder: mean over the computed positions, 0 without positions.
    remainder = torch.tensor([0.25, 0.75, 0.9])
    projected = dataclasses.replace(loss, teacher_remainder=remainder)
    means = per_unit_means({k: float(v) for k, v in logit_metrics(projected, 4).items()})
    assert means["gold/projection_remainder"] == pytest.approx(0.5)
    none = LogitLoss(*(torch.zeros(0),) * 3, torch.zeros(0, dtype=torch.bool), 1.0, 0.0, torch.zeros(0))
    means = per_unit_means({k: float(v) for k, v in logit_metrics(none, 4).items()})
    assert means["gold/projection_remainder"] == 0.0 and means["gold/logit_loss"] == 0.0


def test_per_position_means_do_not_depend_on_how_samples_fall_into_micro_batches():
    """Per-position metrics reduced as OpenRLHF reduces a step's micro-batches over ranks (sample-weighted means):
    the mean over all positions, however the samples are grouped. Means of per-micro-batch means are not."""
    g = torch.Generator().manual_seed(0)
    per_position = torch.rand(6, 5, generator=g)  # 6 samples x 5 slots, some positions not computed
    valid = torch.rand(6, 5, generator=g) < torch.tensor([0.9, 0.2, 0.6, 1.0, 0.1, 0.5])[:, None]
    valid[:, 0] = True
    expected = float(per_position[valid].mean())

    def logged(groups: list[list[int]]) -> tuple[float, float]:
        parts = []
        for rows in groups:
            values = (per_position[rows] * valid[rows]).flatten()  # 0 where not computed, as the losses give
            loss = LogitLoss(values, values, torch.zeros_like(values), valid[rows].flatten(), 1.0, 0.0)
            parts.append(({k: float(v) for k, v in logit_metrics(loss, len(rows)).items()}, len(rows)))
        total = sum(n for _, n in parts)
        reduced = {k: sum(p[k] * n for p, n in parts) / total for k in parts[0][0]}
        naive = sum(float(p["gold/logit_loss/sum_per_sample"] / p["gold/logit_positions"]) for p, _ in parts)
        return per_unit_means(reduced)["gold/logit_loss"], naive / len(parts)

    one_rank, naive_one = logged([[0, 1], [2, 3], [4, 5]])
    two_ranks, naive_two = logged([[0, 3, 4], [1, 2, 5]])
    assert one_rank == pytest.approx(expected) and two_ranks == pytest.approx(expected)
    assert abs(naive_one - naive_two) > 1e-3  # the reduction the check guards against differs


def test_the_action_offset_shift_stays_on_the_positions_device():
    """The hooks add OpenRLHF's action offset to positions unpacked on the actor's device (a GPU on a cluster);
    the meta device stands in for it: a shift built on the CPU would raise there."""
    from gold_plugin.step.logit_loss import _shift_columns

    positions = torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)
    shifted = _shift_columns(positions, 3)
    assert shifted.tolist() == [[0, 4], [2, 8]] and shifted.dtype == torch.int32
    on_meta = _shift_columns(positions.to("meta"), 3)
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 2)


def test_the_pair_vocabulary_moves_once_to_the_loss_device():
    """The backends move the pair's tensors once (``LogitVocab.to``); a map left on another device than the logits
    (the meta device stands in for a GPU) is refused with what to do, not copied at every step."""
    from gold_plugin.step import LogitVocab

    vocab = LogitVocab(teacher_to_student=torch.tensor([2, -1, 0]))
    assert (
        vocab.to("meta").teacher_to_student.device.type == "meta"
        and vocab.teacher_to_student.device.type == "cpu"
    )
    inputs = LogitLossInputs(
        positions=torch.zeros(0, 2, dtype=torch.int64),
        teacher_topk_ids=torch.zeros(0, 1, dtype=torch.int64),
        teacher_topk_logprobs=torch.zeros(0, 1),
        sample_index=torch.zeros(0, dtype=torch.int64),
    )
    gold = GoldConfig(logit_projection="vocab", teacher=TeacherConfig(topk=1))
    with pytest.raises(ValueError, match=r"move the LogitVocab once with \.to\(device\)"):
        compute_logit_loss(torch.zeros(1, 2, 3), inputs, gold, vocab.to("meta"))


def test_teacher_prompt_is_one_rule_for_both_backends():
    messages = [{"role": "user", "content": "2+2?"}]
    own = GoldConfig()  # --gold.teacher.chat_template teacher
    student = GoldConfig(teacher=TeacherConfig(chat_template="student"))
    assert teacher_prompt("<s>2+2?", messages, own, chat_template_applied=True) == (messages, False)
    assert teacher_prompt("<s>2+2?", None, own, chat_template_applied=True) == ("<s>2+2?", True)  # counted
    assert teacher_prompt("<s>2+2?", messages, student, chat_template_applied=True) == ("<s>2+2?", False)
    # A prompt the student reads as plain text: the teacher reads the same text, nothing falls back.
    assert teacher_prompt("2+2=", messages, own, chat_template_applied=False) == ("2+2=", False)


def test_flat_alignment_numbers_groups_over_the_batch():
    a = Alignment(np.array([0, 1, -1]), np.array([0, 0, 1]), num_groups=2)
    bad = Alignment.unalignable(2, 1, "bytes differ")
    b = Alignment(np.array([0, 0]), np.array([-1, 0]), num_groups=1)
    flat = FlatAlignment.build([a, bad, b])
    assert flat.student_group.tolist() == [0, 1, -1, -1, -1, 2, 2]
    assert flat.teacher_group.tolist() == [0, 0, 1, -1, -1, 2]
    assert flat.num_groups.tolist() == [2, 0, 1] and flat.total_groups == 3
    assert flat.student_counts.tolist() == [3, 2, 2] and flat.teacher_counts.tolist() == [3, 1, 2]
    assert flat.aligned.tolist() == [True, False, True]
    flat.check_actions([3, 2, 2])
    with pytest.raises(
        ValueError, match="Sample 1: the alignment has 2 student tokens but action_mask marks 3"
    ):
        flat.check_actions([3, 3, 2])


def test_empty_and_special_only_responses_and_cut_teacher_prompts():
    """Sample problems, hand-computed: an empty response (EOS at once) and one of only special tokens keep the
    teacher's verdict on ending right after the prompt (its end-of-turn is scored there) and are counted in
    ``gold/empty_response``; a sample whose teacher prompt was cut to fit the teacher's context gets no
    distillation signal and is counted in ``gold/teacher_prompt_truncated``. No sample is dropped."""
    s, t = load_packaged_tokenizer("qwen"), load_packaged_tokenizer("mistral")
    end, start = s.convert_tokens_to_ids("<|im_end|>"), s.convert_tokens_to_ids("<|im_start|>")
    hello = s("Hello world", add_special_tokens=False)["input_ids"]
    responses = [hello + [end], [end], [start, end], hello + [end]]
    requests = teacher_requests(s, responses, ["hi"] * 4)
    assert [(r.response, r.ends_with_eos) for r in requests] == [
        ("Hello world", True), ("", True), ("", True), ("Hello world", True)
    ]  # fmt: skip
    t_hello = encode_continuation(t, "Hello world")
    eot = t.eos_token_id
    results = [
        _result(t_hello + [eot], [-1.0, -2.0, -3.0]),
        _result([eot], [-3.0]),
        _result([eot], [-3.0]),
        dataclasses.replace(_result(t_hello + [eot], [-1.0, -2.0, -3.0]), num_prompt_truncated=5),
    ]
    gold = GoldConfig(signal="both", logit_projection="vocab", teacher=TeacherConfig(topk=2), kl_discount=0.0)
    aligned = align_results(s, t, responses, results, gold)
    cut = aligned.alignments[3]
    assert not cut.aligned and cut.reason == "teacher: prompt cut by 5 tokens to fit the teacher's context"
    mask = torch.zeros(4, 3, dtype=torch.bool)
    for b, ids in enumerate(responses):
        mask[b, : len(ids)] = True
    logprobs = torch.full(mask.shape, -0.5) * mask
    distill, signal = distill_advantages(aligned, logprobs, mask, gold)
    # empty: d = -0.5 - (-3) = 2.5 on its EOS; special-only: one group of both tokens, d = -1.0 - (-3) = 2.0
    torch.testing.assert_close(distill.advantages[1], torch.tensor([-2.5, 0.0, 0.0]))
    torch.testing.assert_close(distill.advantages[2], torch.tensor([-2.0, -2.0, 0.0]))
    assert torch.equal(distill.advantages[3], torch.zeros(3)) and not signal[3].any()
    assert signal[0].all() and signal[1].tolist() == [True, False, False] and signal[2, :2].all()
    metrics = sample_metrics(
        aligned, distill, torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    )
    assert metrics["gold/empty_response"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert metrics["gold/teacher_prompt_truncated"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert metrics["gold/unaligned"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert metrics["gold/teacher_failed"].tolist() == [0.0] * 4
    inputs = build_logit_inputs(aligned, responses, mask, gold)
    # every group start of the good sample, the end pair of the empty and the special-only ones, nothing for
    # the cut one (a group of zero-width tokens only starts at its last token: the EOS)
    assert inputs.positions.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 1]]
    assert len(aligned.alignments) == 4
    # --gold.pair_eos false drops the end pair: an empty response then has no group and no signal (counted).
    unpaired = align_results(s, t, responses[1:2], results[1:2], dataclasses.replace(gold, pair_eos=False))
    assert unpaired.alignments[0].num_groups == 0 and unpaired.empty_response.tolist() == [True]
    # No token at all is an empty response; an id outside the tokenizer is not (the alignment reports it).
    assert _without_text(s, [[], [end], [start, end], hello, [10**7]]).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
