"""Per-position divergences between two distributions on the same support (pure torch).

:func:`generalized_jsd` takes any leading batch shape; the last dimension is the distribution.
"""

from __future__ import annotations

import math

import torch

LOG_PROB_FLOOR = -80.0
"""Log-probabilities are clamped to at least this value (e^-80 ~ 1.8e-35, a normal fp32 number).

A token that one side gives zero probability and the other side gives mass then costs about 80 nats per unit
of mass instead of infinity, and -inf inputs give finite values and finite (zero) gradients. Above the floor
every formula is exact.
"""


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    return beta


def _kl_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q) for clamped (finite) log-probabilities."""
    return p_log.exp() * (p_log - q_log)


def generalized_jsd(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD / TRL convention), summed over the last dimension.

    ``beta = 0`` is exactly the forward KL(T||S), ``beta = 1`` exactly the reverse KL(S||T) (no mixture
    is formed at the endpoints); otherwise ``beta*KL(T||M) + (1-beta)*KL(S||M)`` with ``M = beta*T + (1-beta)*S``.
    The inputs are log-probabilities on the same support (they need not sum to one: sub-distributions give
    the same formula applied term by term). ``mask`` (broadcastable, True = keep) drops entries exactly.
    Computed in at least fp32; the result has the inputs' leading shape.
    """
    beta = _check_beta(beta)
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape (same support)."
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype), torch.float32
    )
    s_log = student_logprobs.to(dtype).clamp(min=LOG_PROB_FLOOR)
    t_log = teacher_logprobs.to(dtype).clamp(min=LOG_PROB_FLOOR)
    if beta == 0.0:
        terms = _kl_terms(t_log, s_log)
    elif beta == 1.0:
        terms = _kl_terms(s_log, t_log)
    else:
        m_log = torch.logaddexp(t_log + math.log(beta), s_log + math.log1p(-beta))
        terms = beta * _kl_terms(t_log, m_log) + (1.0 - beta) * _kl_terms(s_log, m_log)
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros((), dtype=dtype, device=terms.device))
    return terms.sum(dim=-1)
