"""Distillation advantages: the raw per-token sampled-KL advantages of a batch, and the advantages the policy loss
sees (normalised over the rollout, mixed with the task reward's by ``alpha``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gold_plugin.config import GoldConfig
from gold_plugin.signals.advantages import DistillAdvantages, batch_distill_advantages, mix_advantages
from gold_plugin.signals.estimators import normalise_advantages
from gold_plugin.step.aligned import AlignedBatch


def distill_advantages(
    aligned: AlignedBatch, action_log_probs: torch.Tensor, action_mask: torch.Tensor, gold: GoldConfig
) -> tuple[DistillAdvantages, torch.Tensor]:
    """Raw per-token distillation advantages ``-sum_g' gamma^(g'-g) d_g'`` in the ``[B, A]`` action layout, and
    the ``[B, A]`` bool mask of the tokens that carry a signal (tokens of scored groups)."""
    mask = action_mask.to(torch.bool)
    distill = batch_distill_advantages(
        aligned.flat,
        aligned.teacher_logprobs,
        action_log_probs.float(),
        mask,
        kl_discount=gold.kl_discount,
        length_normalised=gold.kl_length_normalised,
    )
    signal = torch.zeros_like(mask)
    signal[mask] = torch.from_numpy(aligned.flat.student_group >= 0).to(mask.device)
    return distill, signal


def gold_advantages(
    reward_advantages: Sequence[torch.Tensor | None] | None,
    distill: Sequence[torch.Tensor],
    signal_masks: Sequence[torch.Tensor],
    off_policy: Sequence[torch.Tensor],
    gold: GoldConfig,
) -> list[torch.Tensor]:
    """The advantages the policy loss sees, for a whole rollout given as parts (OpenRLHF's micro-batches, or one
    part for the local backend):

    ``A = (1 - alpha) A_reward + alpha kl_coef norm(A_distill)``, and 0 on off-policy samples (no policy gradient
    on text the student did not sample). ``norm`` is ``--gold.advantage_norm`` over the signal-carrying tokens of
    the on-policy samples of all parts together; with ``--gold.signal logit`` the distillation part is 0.
    ``reward_advantages`` is never read when ``alpha == 1`` (may be None).
    """
    parts = len(distill)
    if len(signal_masks) != parts or len(off_policy) != parts:
        raise ValueError("distill, signal_masks and off_policy need one entry per part.")
    on_policy_signal = [
        s.to(torch.bool) & ~o.to(device=s.device, dtype=torch.bool)[:, None]
        for s, o in zip(signal_masks, off_policy)
    ]
    if gold.uses_advantages:
        normed = normalise_advantages(distill, on_policy_signal, gold.advantage_norm)
    else:
        normed = [torch.zeros_like(d, dtype=torch.float32) for d in distill]
    out = []
    for b in range(parts):
        reward = reward_advantages[b] if (reward_advantages is not None and gold.alpha < 1.0) else None
        mixed = mix_advantages(reward, normed[b], gold.alpha, gold.advantage_weight)
        off = off_policy[b].to(torch.bool).to(mixed.device)
        if bool(off.any()):
            mixed = torch.where(off[:, None], torch.zeros((), dtype=mixed.dtype, device=mixed.device), mixed)
        out.append(mixed)
    return out
