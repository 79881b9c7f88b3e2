"""Distillation signals (pure torch): aligned advantages, alpha mixing, the aligned GKD/ULD logit loss, and the
RL components the backends share (reward estimators, advantage normalisation, the clipped policy loss).

No Ray, vLLM, DeepSpeed or OpenRLHF imports here. The maths: docs/design.md and docs/signals.md.
"""

from gold_plugin.signals.advantages import (
    DistillAdvantages,
    batch_distill_advantages,
    discounted_reverse_cumsum,
    group_advantages,
    mix_advantages,
)
from gold_plugin.signals.divergences import LOG_PROB_FLOOR, generalized_jsd, uld_distance
from gold_plugin.signals.estimators import normalise_advantages, reward_advantages
from gold_plugin.signals.logit_inputs import LogitLossInputs, logit_loss_inputs, per_sample_mean
from gold_plugin.signals.logit_loss import (
    LogitLoss,
    LogitLossOptions,
    aligned_logit_loss,
)
from gold_plugin.signals.policy_loss import clipped_policy_loss

__all__ = [
    "LOG_PROB_FLOOR",
    "DistillAdvantages",
    "LogitLoss",
    "LogitLossInputs",
    "LogitLossOptions",
    "aligned_logit_loss",
    "batch_distill_advantages",
    "clipped_policy_loss",
    "discounted_reverse_cumsum",
    "generalized_jsd",
    "group_advantages",
    "logit_loss_inputs",
    "mix_advantages",
    "normalise_advantages",
    "per_sample_mean",
    "reward_advantages",
    "uld_distance",
]
