"""Advantages from scalar task rewards, and the normalisation of advantages over a rollout's tokens.

``reward_advantages`` implements the critic-free estimators OpenRLHF 0.11.2 names (``--algo.advantage.estimator``)
for one scalar reward per sample, laid out prompt-major (``n`` samples per prompt, consecutive).
``normalise_advantages`` is ``--gold.advantage_norm``: ``none``, ``mean`` (centred) or ``whiten`` (centred and
divided by the standard deviation, OpenRLHF's formula for reinforce-type advantages), with the statistics taken
over the marked tokens of all the given tensors together. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

AdvantageNorm = Literal["none", "mean", "whiten"]
RewardEstimator = Literal["group_norm", "dr_grpo", "reinforce_baseline", "rloo", "reinforce"]
REWARD_ESTIMATORS: tuple[str, ...] = ("group_norm", "dr_grpo", "reinforce_baseline", "rloo", "reinforce")


def reward_advantages(rewards: torch.Tensor, n: int, estimator: str) -> torch.Tensor:
    """Per-sample advantages ``[N]`` from scalar rewards ``[N]`` laid out prompt-major, ``n`` samples per prompt.

    ``group_norm`` (GRPO): ``(r - group mean) / (group std + 1e-9)`` (unbiased std; 0 for a group of one);
    ``dr_grpo`` / ``reinforce_baseline``: ``r - group mean``; ``rloo``: ``r - mean of the other samples``;
    ``reinforce``: ``r``. Raises ``ValueError`` for an unknown estimator, a reward count that is not a multiple
    of ``n``, or ``rloo`` with ``n < 2``.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per sample), got shape {tuple(rewards.shape)}.")
    if n < 1 or rewards.shape[0] % n:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be grouped into prompts of {n} samples.")
    grouped = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).reshape(-1, n)
    if estimator == "reinforce":
        out = grouped
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        out = grouped - grouped.mean(dim=1, keepdim=True)
    elif estimator == "group_norm":
        std = grouped.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(grouped)
        out = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-9)
    elif estimator == "rloo":
        if n < 2:
            raise ValueError("rloo needs --rollout.n_samples_per_prompt >= 2.")
        out = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1)
    else:
        raise ValueError(
            f"--algo.advantage.estimator {estimator!r} is not supported here: use one of {list(REWARD_ESTIMATORS)}."
        )
    return out.reshape(-1)


def normalise_advantages(
    advantages: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], mode: str
) -> list[torch.Tensor]:
    """Normalise advantages over the marked tokens of all tensors together; 0 outside the masks (float32).

    ``none`` keeps the values; ``mean`` subtracts their mean; ``whiten`` subtracts the mean and multiplies by
    ``rsqrt(max(var, 1e-8))`` (population variance), OpenRLHF's whitening. The statistics are computed in
    float64 over every marked entry of every tensor (a rollout split into micro-batches is normalised as one).
    No marked entry: all zeros.
    """
    if mode not in ("none", "mean", "whiten"):
        raise ValueError(f"advantage normalisation must be 'none', 'mean' or 'whiten', got {mode!r}.")
    if len(advantages) != len(masks):
        raise ValueError(f"{len(advantages)} advantage tensors but {len(masks)} masks.")
    bool_masks = []
    for values, mask in zip(advantages, masks):
        if values.shape != mask.shape:
            raise ValueError(
                f"advantages {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape."
            )
        bool_masks.append(mask.to(torch.bool))
    mean = torch.zeros((), dtype=torch.float64)
    rstd = torch.ones((), dtype=torch.float64)
    if mode != "none":
        marked = [v[m].to(torch.float64).cpu() for v, m in zip(advantages, bool_masks)]
        flat = torch.cat(marked) if marked else torch.zeros(0, dtype=torch.float64)
        if flat.numel():
            mean = flat.mean()
            if mode == "whiten":
                rstd = (flat - mean).pow(2).mean().clamp(min=1e-8).rsqrt()
    out = []
    for values, mask in zip(advantages, bool_masks):
        centred = (values.to(torch.float64) - mean.to(values.device)) * rstd.to(values.device)
        out.append(
            torch.where(mask, centred, torch.zeros((), dtype=torch.float64, device=values.device)).float()
        )
    return out
