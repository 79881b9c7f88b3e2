"""Softmax mass over ranges of a sorted vocabulary, chunked, with an analytic backward pass.

``range_mass(logits, rows, lo, hi, untied, order, untied_sorted)`` returns, for every query q,

    M_q = sum over sorted positions r in [lo_q, hi_q) of softmax(logits[rows_q] / T)[order[r]] * w_q(r)

with ``w_q = 1`` or, for ``untied`` queries, ``w_q(r) = untied_sorted[r]`` (a 0/1 weight per sorted position).
A point mass (one token's probability) is the range ``[rank, rank + 1)``.

Forward: per block of distinct rows, the probabilities are permuted into sorted order and cumulatively summed
(in float64, so that the difference of two entries keeps small masses accurate). Backward: for a row z with
probabilities p, ``dM_q/dz_x = p_x * (1[x in q] - M_q) / T``; the indicator sums of all queries of a row are one
difference array in sorted order, cumulatively summed and permuted back. No ``[rows, V]`` activation is kept
between the passes; at most a few ``[block, V]`` buffers exist at once, with ``block = min(chunk_size // 8, 32)``
rows,
so the extra memory stays within ``[chunk_size, V]`` fp32 values (plus the gradient itself).
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_BLOCK_ROWS = 32  # measured: larger blocks are slower on CPU (the [block, V] buffers leave the caches)


def _blocks(num_rows: int, chunk_size: int) -> list[slice]:
    block = max(1, min(chunk_size // 8, _MAX_BLOCK_ROWS))
    return [slice(start, start + block) for start in range(0, num_rows, block)]


class _SortedRows:
    """Softmax rows read straight into byte-sorted order (the softmax does not care about the order), with their
    log-normaliser over *all* columns, the padded ones beyond the sorted vocabulary included. One reusable
    ``[block, V]`` buffer: one allocation per call instead of fresh pages for every block."""

    def __init__(self, logits_2d: torch.Tensor, order: torch.Tensor, rows: int, dtype: torch.dtype) -> None:
        self.logits_2d = logits_2d
        self.order = order
        self.padded = torch.arange(order.shape[0], logits_2d.shape[1], device=order.device)
        self.rows = torch.empty(rows, logits_2d.shape[1], dtype=logits_2d.dtype, device=logits_2d.device)
        self.buffer = torch.empty(rows, order.shape[0], dtype=dtype, device=logits_2d.device)

    def load(self, rows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities [n, V_sorted] in sorted order, probabilities of the padded columns [n, V - V_sorted])``."""
        n = rows.shape[0]
        raw = self.rows[:n]
        torch.index_select(self.logits_2d, 0, rows, out=raw)
        probs = self.buffer[:n]
        if probs.dtype == raw.dtype:
            torch.index_select(raw, 1, self.order, out=probs)
        else:
            probs.copy_(raw.index_select(1, self.order))
        extra = raw[:, self.order.shape[0] :].to(probs.dtype)
        if temperature != 1.0:
            probs.div_(temperature)
            extra = extra / temperature
        lse = torch.logaddexp(torch.logsumexp(probs, dim=1), torch.logsumexp(extra, dim=1))
        probs.sub_(lse[:, None]).exp_()
        return probs, (extra - lse[:, None]).exp()


def _split_queries(by_row: torch.Tensor, offsets: torch.Tensor, block: slice, num_rows: int) -> torch.Tensor:
    return by_row[offsets[block.start] : offsets[min(block.stop, num_rows)]]


def _query_layout(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    unique_rows, local = torch.unique(rows, return_inverse=True)
    by_row = torch.argsort(local)
    offsets = torch.cat([local.new_zeros(1), torch.bincount(local, minlength=unique_rows.shape[0]).cumsum(0)])
    return unique_rows, local, by_row, offsets


def _point_weights(untied: torch.Tensor, lo: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.where(untied, weights[lo], torch.ones_like(weights[lo]))


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
        unique_rows, local, by_row, offsets = _query_layout(rows)
        point = (hi - lo) == 1
        masses = torch.zeros(rows.shape[0], dtype=torch.float64, device=logits_2d.device)
        blocks = _blocks(unique_rows.shape[0], chunk_size)
        size = blocks[0].stop - blocks[0].start
        reader = _SortedRows(logits_2d, order, size, dtype)
        cumulative = torch.zeros(size, order.shape[0] + 1, dtype=torch.float64, device=logits_2d.device)
        weights = untied_sorted.to(dtype)
        for block in blocks:
            queries = _split_queries(by_row, offsets, block, unique_rows.shape[0])
            if queries.numel() == 0:
                continue
            probs, _ = reader.load(unique_rows[block], temperature)
            q_row = local[queries] - block.start
            # Points (one token's probability) are read directly; ranges from cumulative sums (float64, so that
            # the difference of two entries keeps small masses accurate).
            points = point[queries]
            p_queries = queries[points]
            p_weight = _point_weights(untied[p_queries], lo[p_queries], weights)
            masses[p_queries] = (probs[q_row[points], lo[p_queries]] * p_weight).to(torch.float64)
            for kind in (False, True):
                chosen = ~points & (untied[queries] == kind)
                if not bool(chosen.any()):
                    continue
                if kind:
                    probs.mul_(weights)  # the last use of this block's probabilities
                part = cumulative[: probs.shape[0]]
                torch.cumsum(probs, dim=1, dtype=torch.float64, out=part[:, 1:])
                selected, r = queries[chosen], q_row[chosen]
                masses[selected] = part[r, hi[selected]] - part[r, lo[selected]]
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
        device = logits_2d.device
        grad_logits = torch.zeros_like(logits_2d)
        unique_rows, local, by_row, offsets = _query_layout(rows)
        point = (hi - lo) == 1
        grad_masses = grad_masses.to(dtype)
        blocks = _blocks(unique_rows.shape[0], ctx.chunk_size)
        size = blocks[0].stop - blocks[0].start
        reader = _SortedRows(logits_2d, order, size, dtype)
        # Sorted-order coefficients with one extra column that the difference arrays' -g at hi = V lands in.
        coefficient = torch.empty(size, vocab_sorted + 1, dtype=dtype, device=device)
        untied_part = torch.empty(size, vocab_sorted + 1, dtype=dtype, device=device)
        weights = untied_sorted.to(dtype)
        for block in blocks:
            queries = _split_queries(by_row, offsets, block, unique_rows.shape[0])
            g = grad_masses[queries]
            if queries.numel() == 0 or not bool(g.any()):
                continue
            block_rows = unique_rows[block]
            n = block_rows.shape[0]
            q_row = local[queries] - block.start
            # d M_q / d p_x = 1 for x in q (times the weight): ranges by difference arrays and a cumulative sum,
            # points added directly.
            points = point[queries]
            coef = coefficient[:n].zero_()
            for kind, buffer in ((False, coef), (True, untied_part[:n])):
                chosen = ~points & (untied[queries] == kind)
                if not bool(chosen.any()):
                    continue
                if kind:
                    buffer.zero_()
                buffer.index_put_((q_row[chosen], lo[queries[chosen]]), g[chosen], accumulate=True)
                buffer.index_put_((q_row[chosen], hi[queries[chosen]]), -g[chosen], accumulate=True)
                buffer.cumsum_(dim=1)
                if kind:
                    buffer[:, :vocab_sorted].mul_(weights)
                    coef.add_(buffer)
            p_queries = queries[points]
            p_weight = _point_weights(untied[p_queries], lo[p_queries], weights)
            coef.index_put_((q_row[points], lo[p_queries]), g[points] * p_weight, accumulate=True)
            row_dot = torch.zeros(n, dtype=dtype, device=device)
            row_dot.index_add_(0, q_row, g * masses[queries])
            # dM/dz_x = p_x (coefficient_x - sum_q g_q M_q) / T, computed in sorted order and written back.
            probs, extra = reader.load(block_rows, ctx.temperature)
            grad = probs.mul_(coef[:, :vocab_sorted].sub_(row_dot[:, None]))
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            unsorted = reader.rows[:n]  # reused: the raw logits of this block are no longer needed
            unsorted.index_copy_(1, order, grad.to(unsorted.dtype))
            if extra.shape[1]:
                unsorted[:, vocab_sorted:] = (extra * (-row_dot[:, None]) / ctx.temperature).to(
                    unsorted.dtype
                )
            grad_logits.index_copy_(0, block_rows, unsorted)
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
