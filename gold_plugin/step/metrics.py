"""The step's metrics: one set of names for both backends; per-sample values logged as means over samples, and the
means per position or group that stay right over micro-batches and data-parallel ranks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gold_plugin.signals.advantages import DistillAdvantages
from gold_plugin.signals.logit import LogitLoss
from gold_plugin.step.aligned import AlignedBatch


def sample_metrics(
    aligned: AlignedBatch,
    distill: DistillAdvantages,
    off_policy: torch.Tensor,
    missing_reference: torch.Tensor,
    prompt_fallback: torch.Tensor | None = None,
    off_policy_teacher: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample ``[B]`` float32 metrics of the step; both backends log their mean over the samples.
    ``off_policy_teacher`` marks the off-policy samples the teacher wrote (the rest are the dataset's)."""
    batch = distill.aligned.shape[0]
    return {
        "gold/sampled_kl": distill.kl_sum.float(),
        "gold/sampled_kl_per_group": distill.kl_mean.float(),
        "gold/aligned_token_share": distill.aligned_token_fraction.float(),
        "gold/one_to_one_group_share": distill.one_to_one_fraction.float(),
        "gold/unaligned": (~distill.aligned).to(torch.float32),
        "gold/teacher_failed": aligned.teacher_failed.to(torch.float32),
        "gold/teacher_masked_tokens": aligned.masked_tokens.to(torch.float32),
        "gold/teacher_prompt_truncated": aligned.prompt_truncated.to(torch.float32),
        "gold/empty_response": aligned.empty_response.to(torch.float32),
        "gold/teacher_prompt_fallback": (
            torch.zeros(batch)
            if prompt_fallback is None
            else prompt_fallback.to(torch.float32).reshape(batch)
        ),
        **off_policy_metrics(off_policy, missing_reference, off_policy_teacher),
    }


def off_policy_metrics(
    off_policy: torch.Tensor, missing_reference: torch.Tensor, off_policy_teacher: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The per-sample ``[B]`` float32 metrics of where the samples come from: part of :func:`sample_metrics`, and
    all a step without teacher (``--gold.alpha 0``) logs of the GOLD step."""
    batch = off_policy.numel()
    off = off_policy.to(torch.float32).reshape(batch)
    by_teacher = (
        torch.zeros(batch)
        if off_policy_teacher is None
        else off_policy_teacher.to(torch.float32).reshape(batch)
    )
    return {
        "gold/on_policy": 1.0 - off,
        "gold/off_policy": off,
        "gold/off_policy_reference": off - by_teacher,
        "gold/off_policy_teacher": by_teacher,
        "gold/missing_reference": missing_reference.to(torch.float32).reshape(batch),
    }


PER_UNIT_MEANS = {
    "gold/logit_loss": "gold/logit_positions",
    "gold/projection_remainder": "gold/logit_positions",
    "gold/hidden_state_loss": "gold/hidden_state_groups",
}
"""The metrics that are means per teacher position or per group, each with the per-sample count it is a mean over.
A micro-batch logs such a metric as its sum per sample (:func:`sum_per_sample_key`), which a sample-weighted mean
over micro-batches and data-parallel ranks (OpenRLHF's reduction) turns into the step's sum per sample whatever the
grouping; :func:`per_unit_means` divides it by the step's count per sample. A mean of per-micro-batch means would
depend on how samples fall into micro-batches and ranks."""


def sum_per_sample_key(name: str) -> str:
    """The key under which a micro-batch logs the metric ``name`` of :data:`PER_UNIT_MEANS` as a sum per sample."""
    return f"{name}/sum_per_sample"


def per_unit_means(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` (a step's sample-weighted means) with each :func:`sum_per_sample_key` entry replaced by its mean
    per position or group (the sum per sample over the count per sample; 0 where the count is 0)."""
    means = dict(metrics)
    for name, count_key in PER_UNIT_MEANS.items():
        total = means.pop(sum_per_sample_key(name), None)
        if total is not None:
            count = float(means.get(count_key, 0.0))
            means[name] = float(total) / count if count > 0 else 0.0
    return means


def logit_metrics(loss: LogitLoss, batch_size: int) -> dict[str, torch.Tensor]:
    """A micro-batch's logit metrics, per sample of its ``batch_size``: ``gold/logit_positions`` (the computed
    positions), and the sums of ``gold/logit_loss`` and, for the byte projection, ``gold/projection_remainder`` (the
    teacher's remainder-bucket probability) under their :func:`sum_per_sample_key`; :func:`per_unit_means` gives
    their means per position over a step."""
    per_sample = 1.0 / max(int(batch_size), 1)
    metrics = {
        "gold/logit_positions": loss.valid.sum().to(torch.float32) * per_sample,
        sum_per_sample_key("gold/logit_loss"): loss.loss.detach().sum() * per_sample,
    }
    if loss.teacher_remainder is not None:
        remainder = torch.where(loss.valid, loss.teacher_remainder.detach(), 0.0)
        metrics[sum_per_sample_key("gold/projection_remainder")] = remainder.sum() * per_sample
    return metrics


def mean_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means over samples, as OpenRLHF logs per-sample info (the local backend's logging)."""
    return {k: float(v.double().mean()) if v.numel() else 0.0 for k, v in metrics.items()}
