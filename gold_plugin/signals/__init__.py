"""Distillation signals (pure torch): aligned advantages, alpha mixing, the logit losses (package
:mod:`gold_plugin.signals.logit`: the byte projection, the default, and the vocabulary-map GKD/ULD hybrid), and the
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
from gold_plugin.signals.divergences import LOG_PROB_FLOOR, generalized_jsd
from gold_plugin.signals.estimators import normalise_advantages, reward_advantages
from gold_plugin.signals.logit import (
    LogitLoss,
    LogitLossInputs,
    LogitLossOptions,
    ProjectionInputs,
    ProjectionPositions,
    ProjectionVocab,
    aligned_logit_loss,
    expand_positions,
    logit_loss_inputs,
    projected_logit_loss,
    projection_positions,
)
from gold_plugin.signals.policy_loss import clipped_policy_loss

__all__ = [
    "LOG_PROB_FLOOR",
    "DistillAdvantages",
    "LogitLoss",
    "LogitLossInputs",
    "LogitLossOptions",
    "ProjectionInputs",
    "ProjectionPositions",
    "ProjectionVocab",
    "aligned_logit_loss",
    "batch_distill_advantages",
    "clipped_policy_loss",
    "discounted_reverse_cumsum",
    "expand_positions",
    "generalized_jsd",
    "group_advantages",
    "logit_loss_inputs",
    "mix_advantages",
    "normalise_advantages",
    "projected_logit_loss",
    "projection_positions",
    "reward_advantages",
]
