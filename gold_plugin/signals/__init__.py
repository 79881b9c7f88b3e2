"""Distillation signals (pure torch): aligned advantages, alpha mixing, and the aligned GKD/ULD logit loss.

No Ray, vLLM, DeepSpeed or OpenRLHF imports here. See DESIGN §4 and docs/signals.md.
"""

from gold_plugin.signals.advantages import (
    DistillAdvantages,
    batch_distill_advantages,
    discounted_reverse_cumsum,
    group_advantages,
    group_kl,
    mix_advantages,
)
from gold_plugin.signals.divergences import LOG_PROB_FLOOR, generalized_jsd, uld_distance
from gold_plugin.signals.logit_inputs import LogitLossInputs, logit_loss_inputs, per_sample_mean
from gold_plugin.signals.logit_loss import (
    LogitLoss,
    LogitLossOptions,
    aligned_logit_loss,
    aligned_logit_loss_reference,
)

__all__ = [
    "LOG_PROB_FLOOR",
    "DistillAdvantages",
    "LogitLoss",
    "LogitLossInputs",
    "LogitLossOptions",
    "aligned_logit_loss",
    "aligned_logit_loss_reference",
    "batch_distill_advantages",
    "discounted_reverse_cumsum",
    "generalized_jsd",
    "group_advantages",
    "group_kl",
    "logit_loss_inputs",
    "per_sample_mean",
    "mix_advantages",
    "uld_distance",
]
