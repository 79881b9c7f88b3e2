"""The PPO-clipped policy loss with OpenRLHF's token-mean reduction over an optimiser step. Pure torch."""

from __future__ import annotations

import torch


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    eps_clip: float,
    num_action_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_t -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) / num_action_tokens`` over the masked tokens.

    ``r_t = exp(logprobs - old_logprobs)`` (the log-ratio clamped to [-20, 20], as OpenRLHF does).
    ``num_action_tokens`` is the action-token count of the whole optimiser step (default: this batch's), so the
    losses of the micro-batches of one step add up to the token mean over the step. All inputs ``[B, A]``.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == action_mask.shape):
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, advantages "
            f"{tuple(advantages.shape)} and action_mask {tuple(action_mask.shape)} must have one shape."
        )
    if eps_clip < 0:
        raise ValueError(f"eps_clip must be >= 0, got {eps_clip}.")
    mask = action_mask.to(logprobs.dtype)
    ratio = (logprobs - old_logprobs).clamp(min=-20.0, max=20.0).exp()
    clipped = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    token_loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if num_action_tokens is None:
        num_action_tokens = mask.sum()
    normaliser = torch.as_tensor(num_action_tokens, dtype=logprobs.dtype, device=logprobs.device).clamp(
        min=1.0
    )
    return (token_loss * mask).sum() / normaliser
