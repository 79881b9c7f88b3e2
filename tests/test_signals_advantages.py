"""Distillation advantages on hand-built alignments, the batched OpenRLHF layout, and alpha mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gold_plugin.alignment import Alignment, FlatAlignment
from gold_plugin.signals import (
    batch_distill_advantages,
    discounted_reverse_cumsum,
    group_advantages,
    mix_advantages,
)
from gold_plugin.testing.references import group_advantages_reference, group_kl_reference

# The public one-sample function (the production batch code) and the loop-by-loop reference give the same values.
PER_SAMPLE = pytest.mark.parametrize(
    "per_sample", [group_advantages, group_advantages_reference], ids=["public", "reference"]
)


def _alignment(student: list[int], teacher: list[int]) -> Alignment:
    groups = {g for g in student if g >= 0}
    return Alignment(
        student_group=np.array(student, dtype=np.int64),
        teacher_group=np.array(teacher, dtype=np.int64),
        num_groups=len(groups),
    )


# Sample A: group 0 is 1:1, group 1 is 2:1 (two student tokens, one teacher token), group 2 is 1:3, group 3 is
# the final EOS / end-of-turn pair.
ALIGN_A = _alignment([0, 1, 1, 2, 3], [0, 1, 2, 2, 2, 3])
STUDENT_A = torch.tensor([-0.5, -1.0, -0.25, -2.0, -0.1])
TEACHER_A = torch.tensor([-0.7, -1.5, -0.5, -0.25, -0.75, -0.3])
# d = lS - lT per group, by hand.
D_A = [-0.5 + 0.7, (-1.0 - 0.25) + 1.5, -2.0 + (0.5 + 0.25 + 0.75), -0.1 + 0.3]  # [0.2, 0.25, -0.5, 0.2]

# Sample B: group 0 is 2:1, group 1 is 1:3, then a masked (incomplete) tail of two student / one teacher token.
ALIGN_B = _alignment([0, 0, 1, -1, -1], [0, 1, 1, 1, -1])
STUDENT_B = torch.tensor([-0.3, -0.2, -1.0, -5.0, -6.0])
TEACHER_B = torch.tensor([-0.4, -0.1, -0.2, -0.3, -9.0])
D_B = [(-0.3 - 0.2) + 0.4, -1.0 + (0.1 + 0.2 + 0.3)]  # [-0.1, -0.4]


def test_group_kl_hand_values() -> None:
    assert group_kl_reference(ALIGN_A, STUDENT_A, TEACHER_A).tolist() == pytest.approx(D_A, abs=1e-6)
    assert group_kl_reference(ALIGN_B, STUDENT_B, TEACHER_B).tolist() == pytest.approx(D_B, abs=1e-6)


@PER_SAMPLE
def test_advantages_without_discount(per_sample) -> None:
    adv = per_sample(ALIGN_A, STUDENT_A, TEACHER_A)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([-0.2, -0.25, -0.25, 0.5, -0.2], abs=1e-6)
    adv_b = per_sample(ALIGN_B, STUDENT_B, TEACHER_B)
    assert adv_b.tolist() == pytest.approx([0.1, 0.1, 0.4, 0.0, 0.0], abs=1e-6)
    assert adv_b[3] == 0 and adv_b[4] == 0  # masked tail: exactly zero


@PER_SAMPLE
def test_advantages_with_discount(per_sample) -> None:
    # gamma = 0.5: R3 = 0.2, R2 = -0.5 + 0.5*0.2 = -0.4, R1 = 0.25 + 0.5*(-0.4) = 0.05, R0 = 0.2 + 0.5*0.05.
    adv = per_sample(ALIGN_A, STUDENT_A, TEACHER_A, kl_discount=0.5)
    assert adv.tolist() == pytest.approx([-0.225, -0.05, -0.05, 0.4, -0.2], abs=1e-6)
    # gamma = 1: undiscounted sum of the remaining groups.
    adv_b = per_sample(ALIGN_B, STUDENT_B, TEACHER_B, kl_discount=1.0)
    assert adv_b.tolist() == pytest.approx([0.5, 0.5, 0.4, 0.0, 0.0], abs=1e-6)


def test_length_normalised_returns_are_minillms_mean_of_the_remaining_rewards() -> None:
    # gamma = 1 (MiniLLM): R_g = mean of d over groups g.. end. d_A = [0.2, 0.25, -0.5, 0.2].
    r = [0.15 / 4, -0.05 / 3, -0.3 / 2, 0.2]
    adv = group_advantages(ALIGN_A, STUDENT_A, TEACHER_A, kl_discount=1.0, length_normalised=True)
    assert adv.tolist() == pytest.approx([-r[0], -r[1], -r[1], -r[2], -r[3]], abs=1e-6)
    # gamma = 0.5: the gamma-weighted mean, R_g = sum gamma^k d_{g+k} / sum gamma^k.
    r = [0.225 / 1.875, 0.05 / 1.75, -0.4 / 1.5, 0.2]
    adv = group_advantages(ALIGN_A, STUDENT_A, TEACHER_A, kl_discount=0.5, length_normalised=True)
    assert adv.tolist() == pytest.approx([-r[0], -r[1], -r[1], -r[2], -r[3]], abs=1e-6)
    # An unscored group (NaN teacher log-prob in group 2) is out of both the sum and the count.
    teacher = TEACHER_A.clone()
    teacher[3] = float("nan")
    adv = group_advantages(ALIGN_A, STUDENT_A, teacher, kl_discount=1.0, length_normalised=True)
    r = [(0.2 + 0.25 + 0.2) / 3, (0.25 + 0.2) / 2, 0.2]
    assert adv.tolist() == pytest.approx([-r[0], -r[1], -r[1], 0.0, -r[2]], abs=1e-6)
    # The batched form gives the same per sample, and the sum form differs from it.
    summed = group_advantages(ALIGN_B, STUDENT_B, TEACHER_B, kl_discount=1.0)
    mean = group_advantages(ALIGN_B, STUDENT_B, TEACHER_B, kl_discount=1.0, length_normalised=True)
    assert mean.tolist() == pytest.approx([0.25, 0.25, 0.4, 0.0, 0.0], abs=1e-6)
    assert not torch.allclose(mean, summed)


def test_length_normalised_without_a_discount_is_refused() -> None:
    from gold_plugin.config import GoldConfig, GoldConfigError

    with pytest.raises(GoldConfigError, match="--gold.kl_discount 1"):
        GoldConfig(kl_length_normalised=True)
    assert GoldConfig(kl_length_normalised=True, kl_discount=1.0).kl_length_normalised


@PER_SAMPLE
def test_minus_inf_teacher_logprob_is_clamped_not_inf(per_sample) -> None:
    teacher = TEACHER_A.clone()
    teacher[0] = float("-inf")
    adv = per_sample(ALIGN_A, STUDENT_A, teacher)
    assert torch.isfinite(adv).all()
    assert adv[0].item() == pytest.approx(-(-0.5 + 80.0), abs=1e-4)


@PER_SAMPLE
def test_unscored_teacher_token_masks_its_group(per_sample) -> None:
    # NaN is the teacher contract's mark for a token it could not score (beyond its context).
    teacher = TEACHER_A.clone()
    teacher[3] = float("nan")  # inside group 2 (the 1:3 group)
    d = group_kl_reference(ALIGN_A, STUDENT_A, teacher)
    assert torch.isnan(d[2]) and not torch.isnan(d[[0, 1, 3]]).any()
    adv = per_sample(ALIGN_A, STUDENT_A, teacher)
    assert adv.tolist() == pytest.approx([-0.2, -0.25, -0.25, 0.0, -0.2], abs=1e-6)
    # gamma = 0.5, the masked group adds nothing: R2 = 0 + 0.5*0.2, R1 = 0.25 + 0.5*0.1, R0 = 0.2 + 0.5*0.3.
    adv = per_sample(ALIGN_A, STUDENT_A, teacher, kl_discount=0.5)
    assert adv.tolist() == pytest.approx([-0.35, -0.3, -0.3, 0.0, -0.2], abs=1e-6)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="student_logprobs"):
        group_advantages(ALIGN_A, STUDENT_A[:3], TEACHER_A)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        group_advantages(ALIGN_A, STUDENT_A, TEACHER_A[:2])
    with pytest.raises(ValueError, match="kl_discount"):
        group_advantages(ALIGN_A, STUDENT_A, TEACHER_A, kl_discount=1.5)


@pytest.mark.parametrize("gamma", [0.0, 1e-6, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("length", [1, 5, 128, 129, 1000])
def test_discounted_reverse_cumsum_matches_loop(gamma: float, length: int) -> None:
    torch.manual_seed(length)
    values = torch.randn(2, length, dtype=torch.float64)
    got = discounted_reverse_cumsum(values, gamma)
    expected = torch.zeros_like(values)
    running = torch.zeros(2, dtype=torch.float64)
    for g in range(length - 1, -1, -1):
        running = values[:, g] + gamma * running
        expected[:, g] = running
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    assert torch.isfinite(got).all()


def _layout(samples: list[tuple[int, torch.Tensor]], num_actions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF layout: each row has `offset` non-action positions, then the sample's actions, then padding."""
    log_probs = torch.full((len(samples), num_actions), -3.0)
    mask = torch.zeros(len(samples), num_actions, dtype=torch.bool)
    for row, (offset, values) in enumerate(samples):
        log_probs[row, offset : offset + len(values)] = values
        mask[row, offset : offset + len(values)] = True
    return log_probs, mask


def test_batch_layout_matches_per_sample_and_stats() -> None:
    unaligned = Alignment.unalignable(4, 3, "bytes differ")
    log_probs, mask = _layout(
        [(2, STUDENT_A), (3, STUDENT_B), (0, torch.full((4,), -1.0)), (1, STUDENT_A)], num_actions=10
    )
    teacher = [TEACHER_A, TEACHER_B, torch.zeros(3), torch.full_like(TEACHER_A, float("nan"))]
    for gamma in (0.0, 0.5):
        flat = FlatAlignment.build([ALIGN_A, ALIGN_B, unaligned, ALIGN_A])
        out = batch_distill_advantages(flat, torch.cat(teacher), log_probs, mask, gamma)
        assert out.advantages.shape == (4, 10)
        torch.testing.assert_close(
            out.advantages[0, 2:7], group_advantages_reference(ALIGN_A, STUDENT_A, TEACHER_A, gamma)
        )
        torch.testing.assert_close(
            out.advantages[1, 3:8], group_advantages_reference(ALIGN_B, STUDENT_B, TEACHER_B, gamma)
        )
        assert torch.all(out.advantages[~mask] == 0)
        assert torch.all(out.advantages[2:] == 0)  # unalignable sample; every teacher token unscored
    assert out.aligned.tolist() == [True, True, False, True]
    assert out.kl_sum[:2].tolist() == pytest.approx([sum(D_A), sum(D_B)], abs=1e-6)
    assert out.kl_mean[:2].tolist() == pytest.approx([sum(D_A) / 4, sum(D_B) / 2], abs=1e-6)
    assert out.one_to_one_fraction[:2].tolist() == pytest.approx([0.5, 0.0])
    assert out.aligned_token_fraction.tolist() == pytest.approx([1.0, 0.6, 0.0, 0.0])
    assert out.num_groups.tolist() == [4, 2, 0, 0]


def test_batch_masks_groups_with_unscored_tokens() -> None:
    teacher = TEACHER_A.clone()
    teacher[5] = float("nan")  # the end-of-turn token did not fit in the teacher's context
    log_probs, mask = _layout([(1, STUDENT_A)], num_actions=7)
    out = batch_distill_advantages(FlatAlignment.build([ALIGN_A]), teacher, log_probs, mask, kl_discount=0.5)
    torch.testing.assert_close(
        out.advantages[0, 1:6], group_advantages_reference(ALIGN_A, STUDENT_A, teacher, 0.5)
    )
    assert out.advantages[0, 5] == 0
    assert out.num_groups.tolist() == [3]
    assert out.kl_sum.item() == pytest.approx(sum(D_A[:3]), abs=1e-6)
    assert out.aligned_token_fraction.item() == pytest.approx(0.8)
    assert out.one_to_one_fraction.item() == pytest.approx(1 / 3)


def test_batch_rejects_mismatched_shapes() -> None:
    log_probs, mask = _layout([(0, STUDENT_A)], num_actions=6)
    one, two = FlatAlignment.build([ALIGN_A]), FlatAlignment.build([ALIGN_A, ALIGN_A])
    with pytest.raises(ValueError, match="Sample 0: the alignment has 5 student tokens"):
        batch_distill_advantages(one, TEACHER_A, log_probs, torch.ones_like(mask))
    with pytest.raises(ValueError, match="2 teacher log-probs for 6 teacher response tokens"):
        batch_distill_advantages(one, TEACHER_A[:2], log_probs, mask)
    with pytest.raises(ValueError, match="batch of 2"):
        batch_distill_advantages(two, torch.cat([TEACHER_A, TEACHER_A]), log_probs, mask)


class _Untouchable:
    """Fails on any use: proves that alpha = 1 never reads the reward advantages."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"reward advantages were read ({name})")


def test_mix_advantages() -> None:
    torch.manual_seed(3)
    reward = torch.randn(2, 6)
    distill = torch.randn(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mixed = mix_advantages(reward, distill, alpha=0.25, kl_coef=2.0, action_mask=mask)
    expected = torch.where(mask, 0.75 * reward + 0.25 * 2.0 * distill, torch.zeros(()))
    torch.testing.assert_close(mixed, expected)
    only_distill = mix_advantages(_Untouchable(), distill, alpha=1.0, kl_coef=0.5, action_mask=mask)  # type: ignore[arg-type]
    torch.testing.assert_close(only_distill, torch.where(mask, 0.5 * distill, torch.zeros(())))
    assert torch.equal(mix_advantages(None, distill, alpha=1.0), distill)
    torch.testing.assert_close(mix_advantages(reward, None, alpha=0.0), reward)
    with pytest.raises(ValueError, match="reward"):
        mix_advantages(None, distill, alpha=0.5)
    with pytest.raises(ValueError, match="distillation advantages"):
        mix_advantages(reward, None, alpha=0.5)
    with pytest.raises(ValueError, match="same"):
        mix_advantages(reward, distill[:, :3], alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        mix_advantages(reward, distill, alpha=-0.1)
    assert not math.isnan(float(mixed.sum()))
