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


class _Workspace:
    """Reusable ``[block, V]`` buffers: one allocation per call instead of fresh pages for every block."""

    def __init__(
        self, rows: int, vocab: int, vocab_sorted: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.probs = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.sorted = torch.empty(rows, vocab_sorted, dtype=dtype, device=device)
        self.cumulative = torch.zeros(rows, vocab_sorted + 1, dtype=torch.float64, device=device)

    def load_probs(self, logits_2d: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        probs = self.probs[: rows.shape[0]]
        if probs.dtype == logits_2d.dtype:
            torch.index_select(logits_2d, 0, rows, out=probs)
        else:
            probs.copy_(logits_2d.index_select(0, rows))
        if temperature != 1.0:
            probs.div_(temperature)
        probs.sub_(torch.logsumexp(probs, dim=1, keepdim=True)).exp_()
        return probs


def _split_queries(by_row: torch.Tensor, offsets: torch.Tensor, block: slice, num_rows: int) -> torch.Tensor:
    return by_row[offsets[block.start] : offsets[min(block.stop, num_rows)]]


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
        by_row = torch.argsort(local)
        offsets = torch.cat(
            [local.new_zeros(1), torch.bincount(local, minlength=unique_rows.shape[0]).cumsum(0)]
        )
        point = (hi - lo) == 1
        masses = torch.zeros(rows.shape[0], dtype=torch.float64, device=logits_2d.device)
        blocks = _blocks(unique_rows.shape[0], chunk_size)
        workspace = _Workspace(
            blocks[0].stop - blocks[0].start, logits_2d.shape[1], order.shape[0], dtype, logits_2d.device
        )
        weights = untied_sorted.to(dtype)
        for block in blocks:
            queries = _split_queries(by_row, offsets, block, unique_rows.shape[0])
            if queries.numel() == 0:
                continue
            probs = workspace.load_probs(logits_2d, unique_rows[block], temperature)
            q_row = local[queries] - block.start
            # Points (one token's probability) are read directly; ranges from cumulative sums.
            points = point[queries]
            p_queries = queries[points]
            p_weight = torch.where(
                untied[p_queries], weights[lo[p_queries]], torch.ones_like(weights[lo[p_queries]])
            )
            masses[p_queries] = (probs[q_row[points], order[lo[p_queries]]] * p_weight).to(torch.float64)
            for kind in (False, True):
                chosen = ~points & (untied[queries] == kind)
                if not bool(chosen.any()):
                    continue
                sorted_probs = workspace.sorted[: probs.shape[0]]
                torch.index_select(probs, 1, order, out=sorted_probs)
                if kind:
                    sorted_probs.mul_(weights)
                cumulative = workspace.cumulative[: probs.shape[0]]
                torch.cumsum(sorted_probs, dim=1, dtype=torch.float64, out=cumulative[:, 1:])
                selected, r = queries[chosen], q_row[chosen]
                masses[selected] = cumulative[r, hi[selected]] - cumulative[r, lo[selected]]
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
        offsets = torch.cat(
            [local.new_zeros(1), torch.bincount(local, minlength=unique_rows.shape[0]).cumsum(0)]
        )
        point = (hi - lo) == 1
        grad_masses = grad_masses.to(torch.float64)
        blocks = _blocks(unique_rows.shape[0], ctx.chunk_size)
        size = blocks[0].stop - blocks[0].start
        workspace = _Workspace(size, logits_2d.shape[1], vocab_sorted, dtype, logits_2d.device)
        # One extra, always-zero column: padded logit columns (beyond the sorted vocabulary) read it.
        coefficient = torch.zeros(size, vocab_sorted + 1, dtype=torch.float64, device=logits_2d.device)
        column_rank = torch.cat([rank, rank.new_full((logits_2d.shape[1] - vocab_sorted,), vocab_sorted)])
        full = torch.empty(size, logits_2d.shape[1], dtype=torch.float64, device=logits_2d.device)
        weights = untied_sorted.to(torch.float64)
        for block in blocks:
            queries = _split_queries(by_row, offsets, block, unique_rows.shape[0])
            g = grad_masses[queries]
            if queries.numel() == 0 or not bool(g.any()):
                continue
            block_rows = unique_rows[block]
            n = block_rows.shape[0]
            q_row = local[queries] - block.start
            coef = coefficient[:n, :vocab_sorted].zero_()
            # d M_q / d p_x = 1 for x in q (times the weight): points directly, ranges by a difference array.
            points = point[queries]
            p_queries = queries[points]
            p_weight = torch.where(
                untied[p_queries], weights[lo[p_queries]], torch.ones_like(weights[lo[p_queries]])
            )
            coef.index_put_((q_row[points], lo[p_queries]), g[points] * p_weight, accumulate=True)
            for kind in (False, True):
                chosen = ~points & (untied[queries] == kind)
                if not bool(chosen.any()):
                    continue
                diff = workspace.cumulative[:n].zero_()
                diff.index_put_((q_row[chosen], lo[queries[chosen]]), g[chosen], accumulate=True)
                diff.index_put_((q_row[chosen], hi[queries[chosen]]), -g[chosen], accumulate=True)
                running = diff[:, :vocab_sorted].cumsum_(dim=1)
                if kind:
                    running.mul_(weights)
                coef.add_(running)
            row_dot = torch.zeros(n, dtype=torch.float64, device=g.device)
            row_dot.index_add_(0, q_row, g * masses[queries].to(torch.float64))
            probs = workspace.load_probs(logits_2d, block_rows, ctx.temperature)
            grad = full[:n]
            torch.index_select(coefficient[:n], 1, column_rank, out=grad)
            grad.sub_(row_dot[:, None]).mul_(probs)
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad_logits.index_add_(0, block_rows, grad.to(grad_logits.dtype))
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
