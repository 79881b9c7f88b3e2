"""Sampled aligned KL -> per-token distillation advantages, and mixing with task-reward advantages.

For group g of an :class:`~gold_plugin.alignment.result.Alignment`, ``lS(g)`` / ``lT(g)`` are the sums of the
student's / teacher's log-probs of the group's tokens (both are log-probabilities of the same bytes after the same
text), ``d_g = lS(g) - lT(g)`` is a one-sample estimate of the reverse KL on that span, and every student token of
group g gets ``A = -sum_{g' >= g} gamma^(g'-g) d_g'`` (``gamma = kl_discount``; 0 = own group only). Everything
is vectorised with ``index_add`` and a blocked discounted reverse cumulative sum: no Python loop per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.flat import FlatAlignment
from gold_plugin.alignment.result import Alignment
from gold_plugin.signals.divergences import LOG_PROB_FLOOR

_SCAN_BLOCK = 128


def discounted_reverse_cumsum(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """``out[..., g] = sum_{g' >= g} gamma^(g'-g) * values[..., g']`` over the last dimension.

    Exact and overflow-free for any ``gamma`` in [0, 1] (only non-negative powers of gamma are formed): the last
    dimension is cut into blocks of 128, each block is one small matrix product, and the carries between blocks
    are one more. Computed in float64, returned in the input's dtype (at least float32).
    """
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"kl_discount (gamma) must be in [0, 1], got {gamma}.")
    out_dtype = torch.promote_types(values.dtype, torch.float32)
    length = values.shape[-1]
    if gamma == 0.0 or length == 0:
        return values.to(out_dtype).clone()
    lead = values.shape[:-1]
    block = min(_SCAN_BLOCK, length)
    num_blocks = -(-length // block)
    x = torch.nn.functional.pad(values.to(torch.float64), (0, num_blocks * block - length))
    x = x.reshape(*lead, num_blocks, block)
    device = values.device

    def upper_powers(size: int, step: int) -> torch.Tensor:
        """[size, size] matrix with gamma^(step*(j-i)) on and above the diagonal, 0 below."""
        idx = torch.arange(size, device=device)
        exponent = (idx[None, :] - idx[:, None]).to(torch.float64)
        powers = torch.pow(
            torch.tensor(gamma, dtype=torch.float64, device=device), exponent.clamp(min=0) * step
        )
        return torch.where(exponent >= 0, powers, torch.zeros((), dtype=torch.float64, device=device))

    local = x @ upper_powers(block, 1).T  # within-block discounted sums
    block_starts = local[..., 0] @ upper_powers(num_blocks, block).T  # full sums at each block's first entry
    next_start = torch.nn.functional.pad(block_starts[..., 1:], (0, 1))
    tail_powers = torch.pow(
        torch.tensor(gamma, dtype=torch.float64, device=device),
        (block - torch.arange(block, device=device)).to(torch.float64),
    )
    full = local + next_start[..., None] * tail_powers
    return full.reshape(*lead, num_blocks * block)[..., :length].to(out_dtype)


def _group_sums(
    groups: torch.Tensor, logprobs: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums of float64 log-probs (clamped to the floor) and whether a group holds a NaN token."""
    valid = groups >= 0
    nan = torch.isnan(logprobs)
    values = torch.where(nan, torch.zeros_like(logprobs), logprobs.clamp(min=LOG_PROB_FLOOR))
    sums = torch.zeros(num_groups, dtype=torch.float64, device=logprobs.device)
    sums.index_add_(0, groups[valid], values[valid])
    nan_count = torch.zeros(num_groups, dtype=torch.int64, device=logprobs.device)
    nan_count.index_add_(0, groups[valid], nan[valid].to(torch.int64))
    return sums, nan_count > 0


def _group_d(
    s_group: torch.Tensor, t_group: torch.Tensor, s_lp: torch.Tensor, t_lp: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """``d_g = lS(g) - lT(g)``; NaN for a group with an unscored (NaN) token on either side."""
    l_student, s_bad = _group_sums(s_group, s_lp, num_groups)
    l_teacher, t_bad = _group_sums(t_group, t_lp, num_groups)
    d = l_student - l_teacher
    return torch.where(s_bad | t_bad, torch.full_like(d, float("nan")), d)


def group_advantages(
    alignment: Alignment,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kl_discount: float = 0.0,
    length_normalised: bool = False,
) -> torch.Tensor:
    """Per-student-token distillation advantages of one sample (float32, 0 where masked).

    The one-sample form of :func:`batch_distill_advantages` (the same computation, so what a user sees for one
    sample is what training uses): ``student_logprobs`` holds the student's log-prob of each student response
    token, ``teacher_logprobs`` the teacher's log-prob of each teacher response token (NaN = unscored; a group
    holding one gets 0 and adds nothing to the discounted sums of earlier groups).
    """
    student_logprobs, teacher_logprobs = torch.as_tensor(student_logprobs), torch.as_tensor(teacher_logprobs)
    for side, values, groups in (
        ("student", student_logprobs, alignment.student_group),
        ("teacher", teacher_logprobs, alignment.teacher_group),
    ):
        if values.dim() != 1 or values.shape[0] != len(groups):
            raise ValueError(
                f"{side}_logprobs must be 1-D with one entry per {side} response token ({len(groups)}), "
                f"got shape {tuple(values.shape)}."
            )
    num_tokens = len(alignment.student_group)
    mask = torch.ones(1, num_tokens, dtype=torch.bool, device=student_logprobs.device)
    out = batch_distill_advantages(
        FlatAlignment.build([alignment]),
        teacher_logprobs,
        student_logprobs[None],
        mask,
        kl_discount,
        length_normalised,
    )
    return out.advantages[0]


@dataclass
class DistillAdvantages:
    """Distillation advantages in OpenRLHF's ``(batch, num_actions)`` layout, with per-sample statistics."""

    advantages: torch.Tensor
    """(batch, num_actions) float32; 0 outside aligned action tokens and for unaligned samples."""
    kl_sum: torch.Tensor
    """(batch,) sum of d_g over the sample's groups: the sampled aligned reverse KL of the response."""
    kl_mean: torch.Tensor
    """(batch,) kl_sum / num_groups (0 for a sample with no group)."""
    aligned_token_fraction: torch.Tensor
    """(batch,) share of the student's response tokens that belong to a group."""
    one_to_one_fraction: torch.Tensor
    """(batch,) share of groups holding exactly one token on each side."""
    num_groups: torch.Tensor
    """(batch,) int64: groups with a signal (groups holding an unscored NaN token are not counted)."""
    aligned: torch.Tensor
    """(batch,) bool: False where the alignment failed (the sample gets no signal)."""


def batch_distill_advantages(
    flat: FlatAlignment,
    teacher_logprobs: torch.Tensor | np.ndarray,
    action_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    kl_discount: float = 0.0,
    length_normalised: bool = False,
) -> DistillAdvantages:
    """Distillation advantages for a batch in OpenRLHF's layout, in one vectorised pass.

    A group's return is ``sum_{g' >= g} gamma^(g'-g) d_g'`` over the sample's scored groups; with
    ``length_normalised`` (MiniLLM's long-term reward) it is divided by ``sum_{g' >= g} gamma^(g'-g)`` over the
    same groups: the (gamma-weighted) mean of the remaining per-group rewards, exactly MiniLLM's mean at
    ``gamma = 1`` (the group's own ``d`` at ``gamma = 0``).

    ``flat`` is the batch's alignments (:class:`~gold_plugin.alignment.flat.FlatAlignment`); row b of
    ``action_log_probs`` / ``action_mask`` (batch, num_actions) holds sample b, whose action tokens in order are
    its student tokens. ``teacher_logprobs`` ``[T]`` holds the teacher's log-prob of every teacher response token
    of the batch, in ``flat.teacher_group``'s order (NaN = unscored, as ``TeacherResult.logprobs`` marks tokens
    beyond the teacher's context). A group with a NaN token on either side is masked (no advantage, not in the
    statistics); a sample whose alignment failed gets zero advantages and ``aligned=False``. Nothing here raises
    for bad data; shape mismatches (a caller bug) raise ``ValueError`` naming the sample.
    """
    if action_log_probs.shape != action_mask.shape or action_log_probs.dim() != 2:
        raise ValueError(
            f"action_log_probs {tuple(action_log_probs.shape)} and action_mask {tuple(action_mask.shape)} must "
            "both be (batch, num_actions)."
        )
    batch = action_mask.shape[0]
    discounted_reverse_cumsum(torch.zeros(0), kl_discount)  # validates kl_discount
    device = action_log_probs.device
    mask = action_mask.to(torch.bool)
    flat.check_actions(mask.sum(dim=1).cpu().numpy())
    t_lp_flat = torch.as_tensor(teacher_logprobs).reshape(-1).to(device=device, dtype=torch.float64)
    if t_lp_flat.shape[0] != flat.teacher_group.shape[0]:
        raise ValueError(
            f"{t_lp_flat.shape[0]} teacher log-probs for {flat.teacher_group.shape[0]} teacher response tokens."
        )
    total_groups = flat.total_groups
    s_group_flat = torch.from_numpy(flat.student_group).to(device)
    t_group_flat = torch.from_numpy(flat.teacher_group).to(device)
    s_lp_flat = action_log_probs[mask].to(torch.float64)
    d = _group_d(s_group_flat, t_group_flat, s_lp_flat, t_lp_flat, total_groups)
    scored = ~torch.isnan(d)
    d = d.nan_to_num(nan=0.0)

    num_groups_t = torch.from_numpy(flat.num_groups).to(device)
    group_sample = torch.repeat_interleave(torch.arange(batch, device=device), num_groups_t)
    if kl_discount > 0.0 and total_groups:
        group_local = torch.arange(total_groups, device=device) - torch.repeat_interleave(
            torch.cumsum(num_groups_t, 0) - num_groups_t, num_groups_t
        )
        padded = torch.zeros(batch, int(num_groups_t.max()), dtype=torch.float64, device=device)
        padded[group_sample, group_local] = d
        returns = discounted_reverse_cumsum(padded, kl_discount).to(torch.float64)[group_sample, group_local]
        if length_normalised:
            padded.zero_()
            padded[group_sample, group_local] = scored.to(torch.float64)
            weights = discounted_reverse_cumsum(padded, kl_discount).to(torch.float64)
            returns = returns / weights[group_sample, group_local].clamp(min=1e-300)
    else:
        returns = d
    s_valid = s_group_flat >= 0
    s_valid[s_valid.clone()] = scored[s_group_flat[s_valid]]
    t_valid = t_group_flat >= 0
    t_valid[t_valid.clone()] = scored[t_group_flat[t_valid]]
    token_adv = torch.zeros(s_group_flat.shape[0], dtype=torch.float64, device=device)
    token_adv[s_valid] = -returns[s_group_flat[s_valid]]
    advantages = torch.zeros(action_mask.shape, dtype=torch.float32, device=device)
    advantages[mask] = token_adv.to(torch.float32)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.float64, device=device).index_add_(0, group_sample, values)

    scored_f = scored.to(torch.float64)
    scored_groups = per_sample(scored_f)
    kl_sum = per_sample(d)
    s_count = torch.bincount(s_group_flat[s_valid], minlength=total_groups)
    t_count = torch.bincount(t_group_flat[t_valid], minlength=total_groups)
    one_to_one = ((s_count == 1) & (t_count == 1)).to(torch.float64) * scored_f
    aligned_tokens = torch.zeros(mask.shape, dtype=torch.float64, device=device)
    aligned_tokens[mask] = s_valid.to(torch.float64)
    counts = torch.from_numpy(flat.student_counts).to(device=device, dtype=torch.float64)

    return DistillAdvantages(
        advantages=advantages,
        kl_sum=kl_sum.to(torch.float32),
        kl_mean=(kl_sum / scored_groups.clamp(min=1)).to(torch.float32),
        aligned_token_fraction=(aligned_tokens.sum(dim=1) / counts.clamp(min=1)).to(torch.float32),
        one_to_one_fraction=(per_sample(one_to_one) / scored_groups.clamp(min=1)).to(torch.float32),
        num_groups=scored_groups.to(torch.int64),
        aligned=torch.from_numpy(flat.aligned).to(device),
    )


def mix_advantages(
    reward_advantages: torch.Tensor | None,
    distill_advantages: torch.Tensor | None,
    alpha: float,
    kl_coef: float = 1.0,
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A = (1 - alpha) * A_reward + alpha * kl_coef * A_distill``, zero outside ``action_mask``.

    ``alpha == 1`` is reward-free: ``reward_advantages`` is never read (it may be None). ``alpha == 0`` never
    reads ``distill_advantages`` (it may be None). Raises ``ValueError`` if a needed input is missing.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if alpha > 0.0 and distill_advantages is None:
        raise ValueError(f"alpha={alpha} > 0 needs distillation advantages, got None.")
    if alpha < 1.0 and reward_advantages is None:
        raise ValueError(
            f"alpha={alpha} < 1 mixes in the task reward, but no reward advantages were given: configure a "
            "reward model or reward function, or set --gold.alpha 1 for reward-free distillation."
        )
    parts = []
    if alpha > 0.0:
        parts.append(
            (alpha * kl_coef)
            * distill_advantages.to(torch.promote_types(distill_advantages.dtype, torch.float32))
        )
    if alpha < 1.0:
        if parts and reward_advantages.shape != parts[0].shape:
            raise ValueError(
                f"reward_advantages {tuple(reward_advantages.shape)} and distill_advantages "
                f"{tuple(parts[0].shape)} must have the same (batch, num_actions) shape."
            )
        parts.append(
            (1.0 - alpha) * reward_advantages.to(torch.promote_types(reward_advantages.dtype, torch.float32))
        )
    mixed = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    if action_mask is not None:
        mixed = torch.where(
            action_mask.to(torch.bool), mixed, torch.zeros((), dtype=mixed.dtype, device=mixed.device)
        )
    return mixed
