"""Group-start positions in OpenRLHF's layout and the matching teacher top-k rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gold_plugin.alignment.result import Alignment
from gold_plugin.signals import (
    LogitLoss,
    LogitLossInputs,
    LogitLossOptions,
    aligned_logit_loss,
    logit_loss_inputs,
)


def _alignment(student: list[int], teacher: list[int]) -> Alignment:
    return Alignment(
        student_group=np.array(student, dtype=np.int64),
        teacher_group=np.array(teacher, dtype=np.int64),
        num_groups=len({g for g in student if g >= 0}),
    )


ALIGN_A = _alignment([0, 1, 1, 2, 3], [0, 1, 2, 2, 2, 3])  # 1:1, 2:1, 1:3, EOS pair
ALIGN_B = _alignment([0, 0, 1, -1, -1], [0, 1, 1, 1, -1])  # 2:1, 1:3, masked tail


def _topk(num_tokens: int, k: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Recognisable rows: row t holds ids base + 10*t + slot."""
    ids = base + 10 * np.arange(num_tokens)[:, None] + np.arange(k)[None, :]
    return ids.astype(np.int64), np.log(np.full((num_tokens, k), 1.0 / (k + 1), dtype=np.float32))


def _loss_at(inputs: LogitLossInputs, logits: torch.Tensor, mapping: torch.Tensor) -> LogitLoss:
    """The vocabulary-map loss at the inputs' positions, as the training step calls it (default options)."""
    return aligned_logit_loss(
        logits,
        inputs.teacher_topk_ids,
        inputs.teacher_topk_logprobs,
        mapping,
        positions=inputs.positions,
        options=LogitLossOptions(),
    )


def test_positions_and_teacher_rows() -> None:
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2:7] = True  # sample A: 5 actions from column 2
    mask[1, 3:8] = True  # sample B: 5 actions from column 3
    mask[2, 0:4] = True  # unaligned sample
    ids_a, lp_a = _topk(6, 2, 1000)
    ids_b, lp_b = _topk(5, 3, 2000)
    out = logit_loss_inputs(
        [ALIGN_A, ALIGN_B, Alignment.unalignable(4, 2, "bytes differ")],
        [ids_a, ids_b, None],
        [lp_a, lp_b, None],
        mask,
    )
    # A: first student tokens [0, 1, 3, 4] -> columns [2, 3, 5, 6]; first teacher tokens [0, 1, 2, 5].
    # B: first student tokens [0, 2] -> columns [3, 5]; first teacher tokens [0, 1].
    assert out.positions.tolist() == [[0, 2], [0, 3], [0, 5], [0, 6], [1, 3], [1, 5]]
    assert out.sample_index.tolist() == [0, 0, 0, 0, 1, 1]
    assert out.teacher_topk_ids[:, 0].tolist() == [1000, 1010, 1020, 1050, 2000, 2010]
    assert out.teacher_topk_ids[:4, 2].tolist() == [-1] * 4  # k = 2 padded to 3
    assert torch.isneginf(out.teacher_topk_logprobs[:4, 2]).all()
    assert out.teacher_topk_ids[4:, 2].tolist() == [2002, 2012]


def test_mismatch_is_reported() -> None:
    mask = torch.ones(1, 4, dtype=torch.bool)
    ids, lp = _topk(6, 2, 0)
    with pytest.raises(ValueError, match="Sample 0"):
        logit_loss_inputs([ALIGN_A], [ids], [lp], mask)
    with pytest.raises(ValueError, match="Sample 0: teacher top-k"):
        logit_loss_inputs([ALIGN_A], [ids[:3]], [lp[:3]], torch.ones(1, 5, dtype=torch.bool))


def test_end_to_end_with_three_d_logits_touches_only_the_positions() -> None:
    vocab, teacher_vocab = 40, 2100
    mapping = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    mapping[1000:1040] = torch.arange(40)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 3:8] = True
    gen = torch.Generator().manual_seed(0)
    ids_a = torch.randint(1000, 1060, (6, 4), generator=gen).numpy()
    ids_b = torch.randint(1000, 1060, (5, 4), generator=gen).numpy()
    lp = np.log(np.full((6, 4), 0.2, dtype=np.float32))
    inputs = logit_loss_inputs([ALIGN_A, ALIGN_B], [ids_a, ids_b], [lp, lp[:5]], mask)
    logits = torch.randn(2, 10, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    out = _loss_at(inputs, logits, mapping)
    assert inputs.sample_index.tolist() == [0, 0, 0, 0, 1, 1]
    per_sample = torch.stack(
        [out.loss[:4].mean(), out.loss[4:].mean()]
    )  # TRL's reduction: per sample, then mean
    (grad,) = torch.autograd.grad(per_sample.mean(), logits)
    touched = grad.abs().sum(-1) > 0
    assert touched.nonzero().tolist() == inputs.positions.tolist()


def test_groups_without_teacher_candidates_give_no_position() -> None:
    # The teacher could not score its last token (beyond its context): top-k row of -1 / -inf. That group has no
    # signal, so it must not count in the per-sample mean (it would dilute the sample's loss).
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1:6] = True
    ids, lp = _topk(6, 3, 0)
    ids[5] = -1
    lp[5] = -np.inf
    inputs = logit_loss_inputs([ALIGN_A], [ids], [lp], mask)
    assert inputs.positions.tolist() == [[0, 1], [0, 2], [0, 4]]
    assert inputs.teacher_topk_ids[:, 0].tolist() == [0, 10, 20]
    mapping = torch.arange(60)
    logits = torch.randn(1, 7, 60, dtype=torch.float64)
    out = _loss_at(inputs, logits, mapping)
    assert inputs.sample_index.tolist() == [0, 0, 0]
    assert out.loss.shape == (3,) and out.valid.all()
