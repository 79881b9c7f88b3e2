"""The clipped policy loss (gold_plugin.signals.policy_loss) against OpenRLHF 0.11.2's PolicyLoss and by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from gold_plugin.signals.policy_loss import clipped_policy_loss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(3, 5, generator=g) * 2).requires_grad_(True)
    old = logprobs.detach() + torch.randn(3, 5, generator=g) * 0.4  # ratios on both sides of the clip
    advantages = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return logprobs, old, advantages, mask


def test_hand_computed_clipping():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # ratio 1.5 (A>0: clipped to 1.2), ratio 0.5 (A<0: clipped to 0.8 -> -min(-1, -1.6) = 1.6), ratio 1 -> -3
    expected = (-1.2 + 1.6 - 3.0) / 4.0
    got = clipped_policy_loss(logprobs, old, advantages, mask, eps_clip=0.2, num_action_tokens=4)
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_equals_openrlhf_policy_loss_value_and_gradient():
    sys.path.append(str(Path(__file__).parent / "stubs"))
    loss_module = pytest.importorskip("openrlhf.models.loss")
    logprobs, old, advantages, mask = _batch()
    ours = clipped_policy_loss(logprobs, old, advantages, mask, eps_clip=0.2, num_action_tokens=17.0)
    (grad_ours,) = torch.autograd.grad(ours, logprobs)
    theirs, *_ = loss_module.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)(
        logprobs, old, advantages, action_mask=mask, batch_num_tokens=torch.tensor(17.0)
    )
    (grad_theirs,) = torch.autograd.grad(theirs, logprobs)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert grad_ours[~mask].eq(0).all() and grad_ours.abs().sum() > 0


def test_micro_batches_add_up_to_the_batch_token_mean():
    logprobs, old, advantages, mask = _batch(1)
    tokens = mask.sum()
    whole = clipped_policy_loss(logprobs, old, advantages, mask, 0.2)
    parts = sum(
        clipped_policy_loss(logprobs[rows], old[rows], advantages[rows], mask[rows], 0.2, tokens)
        for rows in ([0], [1, 2])
    )
    torch.testing.assert_close(whole, parts)
    zero = clipped_policy_loss(logprobs, old, torch.zeros_like(advantages), mask, 0.2)
    assert float(zero.detach()) == 0.0  # zero advantages (off-policy samples): no loss, no gradient


def test_bad_inputs_raise():
    logprobs, old, advantages, mask = _batch()
    with pytest.raises(ValueError, match="must have one shape"):
        clipped_policy_loss(logprobs, old[:, :3], advantages, mask, 0.2)
    with pytest.raises(ValueError, match="eps_clip"):
        clipped_policy_loss(logprobs, old, advantages, mask, -0.1)
