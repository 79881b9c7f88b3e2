"""Reward estimators and advantage normalisation (gold_plugin.signals.estimators): hand-computed values."""

from __future__ import annotations

import pytest
import torch

from gold_plugin.signals.estimators import normalise_advantages, reward_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])  # two prompts x three samples


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("reinforce", [1.0, 0.0, 0.5, 2.0, 2.0, -1.0]),
        ("reinforce_baseline", [0.5, -0.5, 0.0, 1.0, 1.0, -2.0]),
        ("dr_grpo", [0.5, -0.5, 0.0, 1.0, 1.0, -2.0]),
        # rloo: r - mean of the other two
        ("rloo", [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 2.0 - 0.5, 2.0 - 0.5, -1.0 - 2.0]),
        # group_norm: (r - mean) / (unbiased std + 1e-9); stds 0.5 and sqrt(3)
        ("group_norm", [1.0, -1.0, 0.0, 1.0 / 3**0.5, 1.0 / 3**0.5, -2.0 / 3**0.5]),
    ],
)
def test_reward_estimators_by_hand(estimator, expected):
    torch.testing.assert_close(
        reward_advantages(REWARDS, 3, estimator), torch.tensor(expected), atol=1e-6, rtol=1e-6
    )


def test_group_norm_of_one_sample_and_of_equal_rewards_is_zero():
    torch.testing.assert_close(reward_advantages(torch.tensor([3.0, -1.0]), 1, "group_norm"), torch.zeros(2))
    torch.testing.assert_close(reward_advantages(torch.ones(4), 2, "group_norm"), torch.zeros(4))


def test_reward_estimator_errors_name_the_problem():
    with pytest.raises(ValueError, match="gae"):
        reward_advantages(REWARDS, 3, "gae")
    with pytest.raises(ValueError, match="cannot be grouped"):
        reward_advantages(REWARDS, 4, "group_norm")
    with pytest.raises(ValueError, match="rloo needs"):
        reward_advantages(REWARDS, 1, "rloo")


def _parts():
    a = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    b = torch.tensor([[-4.0, 5.0]])
    mask_a = torch.tensor([[True, True, False], [True, False, False]])
    mask_b = torch.tensor([[True, True]])
    return [a, b], [mask_a, mask_b]


def test_normalisation_modes_over_all_parts_together():
    values, masks = _parts()
    marked = torch.tensor([1.0, 2.0, 3.0, -4.0, 5.0], dtype=torch.float64)
    mean, std = marked.mean(), marked.std(unbiased=False)
    raw = normalise_advantages(values, masks, "none")
    assert torch.equal(raw[0], torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))  # 9 is outside the mask
    assert torch.equal(raw[1], values[1])
    centred = normalise_advantages(values, masks, "mean")
    torch.testing.assert_close(centred[1], (values[1] - mean).float())
    whitened = normalise_advantages(values, masks, "whiten")
    torch.testing.assert_close(whitened[0][0, :2], ((values[0][0, :2] - mean) / std).float())
    assert whitened[0][0, 2] == 0 and whitened[0][1, 1:].eq(0).all()
    flat = torch.cat([w[m] for w, m in zip(whitened, masks)]).double()
    assert abs(float(flat.mean())) < 1e-6 and abs(float(flat.std(unbiased=False)) - 1) < 1e-6
    # One tensor holding both parts gives the same values (a rollout split into micro-batches is one rollout).
    joined = normalise_advantages(
        [torch.cat([values[0].flatten(), values[1].flatten()])],
        [torch.cat([masks[0].flatten(), masks[1].flatten()])],
        "whiten",
    )[0]
    torch.testing.assert_close(joined, torch.cat([whitened[0].flatten(), whitened[1].flatten()]))


def test_normalisation_is_openrlhfs_whitening():
    values, masks = _parts()
    flat, mask = values[0].flatten(), masks[0].flatten().float()
    mean = (flat * mask).sum() / mask.sum()
    rstd = (((flat - mean).pow(2) * mask).sum() / mask.sum()).clamp(min=1e-8).rsqrt()
    expected = (flat - mean) * rstd * mask  # OpenRLHF's formula, zero outside the mask
    torch.testing.assert_close(normalise_advantages([values[0]], [masks[0]], "whiten")[0].flatten(), expected)


def test_normalisation_edge_cases_and_errors():
    zeros = normalise_advantages([torch.ones(2, 2)], [torch.zeros(2, 2, dtype=torch.bool)], "whiten")
    assert torch.equal(zeros[0], torch.zeros(2, 2))
    constant = normalise_advantages([torch.full((1, 3), 4.0)], [torch.ones(1, 3, dtype=torch.bool)], "whiten")
    assert torch.equal(constant[0], torch.zeros(1, 3))  # no spread: centred to 0, never inf/NaN
    with pytest.raises(ValueError, match="'none', 'mean' or 'whiten'"):
        normalise_advantages([torch.ones(1)], [torch.ones(1, dtype=torch.bool)], "std")
    with pytest.raises(ValueError, match="differ in shape"):
        normalise_advantages([torch.ones(2)], [torch.ones(3, dtype=torch.bool)], "mean")
