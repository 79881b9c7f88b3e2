"""A teacher equal to the student (same model, same tokenizer) gives zero advantages and zero logit loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gold_plugin.alignment import FlatAlignment, VocabMap, align, group_starts
from gold_plugin.local.modeling import tiny_llama
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
from gold_plugin.signals import (
    LogitLossOptions,
    aligned_logit_loss,
    batch_distill_advantages,
    group_advantages,
)


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_packaged_tokenizer("gpt2")
    model = tiny_llama(
        len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ).eval()
    prompt = tokenizer.encode("Question: what is two plus two?\nAnswer:")
    response = tokenizer.encode(" Two plus two is four, of course.") + [tokenizer.eos_token_id]
    return tokenizer, model, prompt, response


def test_identical_teacher_gives_zero_signals(setup) -> None:
    tokenizer, model, prompt, response = setup
    sequence = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(sequence).logits.float()  # [1, T, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    # The logit at position p - 1 predicts the token at p.
    response_logprobs = logprobs[0, start - 1 : -1].gather(1, sequence[0, start:, None]).squeeze(1)

    alignment = align(tokenizer, response, tokenizer, response)
    assert alignment.num_groups == len(response)  # same tokenizer: every group is 1:1 (EOS pairs with EOS)
    advantages = group_advantages(alignment, response_logprobs, response_logprobs.clone(), kl_discount=0.5)
    assert torch.all(advantages == 0)

    # OpenRLHF layout: action_mask[j] marks token j + 1 as an action.
    action_mask = torch.zeros(1, sequence.shape[1] - 1, dtype=torch.bool)
    action_mask[0, start - 1 :] = True
    action_log_probs = torch.zeros(action_mask.shape)
    action_log_probs[action_mask] = response_logprobs
    batch = batch_distill_advantages(
        FlatAlignment.build([alignment]), response_logprobs, action_log_probs, action_mask
    )
    assert torch.all(batch.advantages == 0) and batch.kl_sum.item() == 0.0
    assert batch.one_to_one_fraction.item() == 1.0

    student_first, teacher_first = group_starts(alignment)
    assert np.array_equal(student_first, teacher_first)
    teacher_values, teacher_ids = logprobs[0, start - 1 + teacher_first].topk(32, dim=-1)
    vocab_map = VocabMap(tokenizer, tokenizer)
    x = logits.clone().requires_grad_()
    positions = torch.stack(
        [torch.zeros_like(torch.as_tensor(student_first)), start - 1 + torch.as_tensor(student_first)], 1
    )
    for beta in (0.0, 0.5, 1.0):
        out = aligned_logit_loss(
            x,
            teacher_ids,
            teacher_values,
            vocab_map.teacher_to_student_tensor(),
            positions=positions,
            options=LogitLossOptions(beta=beta),
        )
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        assert out.valid.all()
        assert out.loss.abs().max().item() < 1e-6
        assert grad.abs().max().item() < 1e-5
    # A different teacher (perturbed logits) is not zero: the test can fail.
    other = torch.log_softmax(
        logits[0, start - 1 + teacher_first] + torch.randn(len(teacher_first), logits.shape[-1]), -1
    )
    other_values, other_ids = other.topk(32, dim=-1)
    out = aligned_logit_loss(
        x,
        other_ids,
        other_values,
        vocab_map.teacher_to_student_tensor(),
        positions=positions,
        options=LogitLossOptions(),
    )
    assert out.loss.min().item() > 1e-3
