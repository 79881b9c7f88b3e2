"""Softmax mass over ranges of a sorted vocabulary, chunked, with an analytic backward pass.

``range_mass(logits, rows, lo, hi, untied, order, untied_sorted)`` returns, for every query q,

    M_q = sum over sorted positions r in [lo_q, hi_q) of softmax(logits[rows_q] / T)[order[r]] * w_q(r)

with ``w_q = 1`` or, for ``untied`` queries, ``w_q(r) = untied_sorted[r]`` (a 0/1 weight per sorted position).
A point mass (one token's probability) is the range ``[rank, rank + 1)``.

Forward: per block of distinct rows, the probabilities are permuted into sorted order and cumulatively summed
(in float64, so that the difference of two entries keeps small masses accurate). Backward: for a row z with
probabilities p, ``dM_q/dz_x = p_x * (1[x in q] - M_q) / T``; the indicator sums of all queries of a row are one
difference array in sorted order, cumulatively summed and permuted back. No ``[rows, V]`` activation is kept
between the passes; at most a few ``[block, V]`` buffers exist at once, with ``block = chunk_size // 8`` rows,
so the extra memory stays within ``[chunk_size, V]`` fp32 values (plus the gradient itself).
"""

from __future__ import annotations

from typing import Any

import torch


def _blocks(num_rows: int, chunk_size: int) -> list[slice]:
    block = max(1, chunk_size // 8)
    return [slice(start, start + block) for start in range(0, num_rows, block)]


def _probs(
    logits_2d: torch.Tensor, rows: torch.Tensor, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    scaled = logits_2d.index_select(0, rows).to(dtype)
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled.log_softmax(dim=1).exp_()


def _cumulative(probs_sorted: torch.Tensor) -> torch.Tensor:
    """``[b, V + 1]`` float64 cumulative sums with a leading zero column."""
    out = torch.zeros(
        probs_sorted.shape[0], probs_sorted.shape[1] + 1, dtype=torch.float64, device=probs_sorted.device
    )
    torch.cumsum(probs_sorted, dim=1, dtype=torch.float64, out=out[:, 1:])
    return out


class _RangeMass(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits_2d: torch.Tensor,
        rows: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        untied: torch.Tensor,
        order: torch.Tensor,
        untied_sorted: torch.Tensor,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = torch.float64 if logits_2d.dtype == torch.float64 else torch.float32
        unique_rows, local = torch.unique(rows, return_inverse=True)
        masses = torch.zeros(rows.shape[0], dtype=torch.float64, device=logits_2d.device)
        by_row = torch.argsort(local)
        counts = torch.bincount(local, minlength=unique_rows.shape[0])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        for block in _blocks(unique_rows.shape[0], chunk_size):
            block_rows = unique_rows[block]
            queries = by_row[offsets[block.start] : offsets[min(block.stop, unique_rows.shape[0])]]
            if queries.numel() == 0:
                continue
            probs = _probs(logits_2d, block_rows, temperature, dtype)
            sorted_probs = probs.index_select(1, order)
            q_row = local[queries] - block.start
            q_untied = untied[queries]
            for kind in (False, True):
                selected = queries[q_untied == kind]
                if selected.numel() == 0:
                    continue
                if kind:
                    sorted_probs.mul_(untied_sorted.to(dtype))
                cumulative = _cumulative(sorted_probs)
                r = q_row[q_untied == kind]
                masses[selected] = cumulative[r, hi[selected]] - cumulative[r, lo[selected]]
                del cumulative
            del probs, sorted_probs
        masses = masses.clamp(min=0.0).to(dtype)
        ctx.save_for_backward(logits_2d, rows, lo, hi, untied, order, untied_sorted, masses)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return masses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_masses: torch.Tensor) -> tuple[Any, ...]:
        logits_2d, rows, lo, hi, untied, order, untied_sorted, masses = ctx.saved_tensors
        dtype = masses.dtype
        vocab_sorted = order.shape[0]
        grad_logits = torch.zeros_like(logits_2d)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(vocab_sorted, device=order.device)
        unique_rows, local = torch.unique(rows, return_inverse=True)
        by_row = torch.argsort(local)
        counts = torch.bincount(local, minlength=unique_rows.shape[0])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        grad_masses = grad_masses.to(torch.float64)
        for block in _blocks(unique_rows.shape[0], ctx.chunk_size):
            queries = by_row[offsets[block.start] : offsets[min(block.stop, unique_rows.shape[0])]]
            g = grad_masses[queries]
            if queries.numel() == 0 or not bool(g.any()):
                continue
            block_rows = unique_rows[block]
            q_row = local[queries] - block.start
            coefficient = torch.zeros(block_rows.shape[0], vocab_sorted, dtype=torch.float64, device=g.device)
            for kind in (False, True):
                chosen = untied[queries] == kind
                if not bool(chosen.any()):
                    continue
                diff = torch.zeros(
                    block_rows.shape[0], vocab_sorted + 1, dtype=torch.float64, device=g.device
                )
                diff.index_put_((q_row[chosen], lo[queries[chosen]]), g[chosen], accumulate=True)
                diff.index_put_((q_row[chosen], hi[queries[chosen]]), -g[chosen], accumulate=True)
                running = diff[:, :vocab_sorted].cumsum_(dim=1)
                if kind:
                    running.mul_(untied_sorted.to(torch.float64))
                coefficient.add_(running)
                del diff, running
            row_dot = torch.zeros(block_rows.shape[0], dtype=torch.float64, device=g.device)
            row_dot.index_add_(0, q_row, g * masses[queries].to(torch.float64))
            probs = _probs(logits_2d, block_rows, ctx.temperature, dtype)
            full = torch.zeros(block_rows.shape[0], logits_2d.shape[1], dtype=torch.float64, device=g.device)
            full[:, :vocab_sorted] = coefficient.index_select(1, rank)
            del coefficient
            full.sub_(row_dot[:, None]).mul_(probs)
            if ctx.temperature != 1.0:
                full.div_(ctx.temperature)
            grad_logits.index_add_(0, block_rows, full.to(grad_logits.dtype))
            del probs, full
        return grad_logits, None, None, None, None, None, None, None, None


def range_mass(
    logits_2d: torch.Tensor,
    rows: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    untied: torch.Tensor,
    order: torch.Tensor,
    untied_sorted: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Masses ``[Q]`` (float32, float64 for float64 logits), differentiable w.r.t. ``logits_2d`` ``[N, V]``.

    ``rows``/``lo``/``hi`` int64 ``[Q]``; ``untied`` bool ``[Q]``; ``order`` int64 ``[V_sorted]`` (sorted position
    -> column, ``V_sorted <= V``: columns beyond it, such as padded embedding rows, are in no range);
    ``untied_sorted`` ``[V_sorted]`` 0/1 weights.
    """
    if logits_2d.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits_2d.shape)}.")
    if order.shape[0] > logits_2d.shape[1]:
        raise ValueError(
            f"The sorted vocabulary has {order.shape[0]} tokens but the logits only {logits_2d.shape[1]} columns."
        )
    if rows.numel() == 0:
        dtype = torch.float64 if logits_2d.dtype == torch.float64 else torch.float32
        return logits_2d.new_zeros(0, dtype=dtype)
    return _RangeMass.apply(logits_2d, rows, lo, hi, untied, order, untied_sorted, temperature, chunk_size)
