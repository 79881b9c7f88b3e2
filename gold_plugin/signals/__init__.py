"""Distillation signals (pure torch): aligned advantages, alpha mixing, and the aligned GKD/ULD logit loss.

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
from gold_plugin.signals.logit_inputs import LogitLossInputs, logit_loss_inputs, per_sample_mean
from gold_plugin.signals.logit_loss import (
    LogitLoss,
    LogitLossOptions,
    aligned_logit_loss,
)

__all__ = [
    "LOG_PROB_FLOOR",
    "DistillAdvantages",
    "LogitLoss",
    "LogitLossInputs",
    "LogitLossOptions",
    "aligned_logit_loss",
    "batch_distill_advantages",
    "discounted_reverse_cumsum",
    "generalized_jsd",
    "group_advantages",
    "logit_loss_inputs",
    "per_sample_mean",
    "mix_advantages",
    "uld_distance",
]
