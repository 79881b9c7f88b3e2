"""Softmax mass over ranges of a sorted vocabulary, chunked, with an analytic backward pass.

``range_mass(logits, rows, lo, hi, untied, order, untied_sorted)`` returns, for every query q,

    M_q = sum over sorted positions r in [lo_q, hi_q) of softmax(logits[rows_q] / T)[order[r]] * w_q(r)

with ``w_q = 1`` or, for ``untied`` queries, ``w_q(r) = untied_sorted[r]`` (a 0/1 weight per sorted position).
A point mass (one token's probability) is the range ``[rank, rank + 1)``.

Most ranges are short (a point, the few tokens that start with a long key), so the work follows what the
queries read: the softmax of a row stays in vocabulary order (one log-normaliser per row, kept for the
backward pass), and every sorted position of a query's range is gathered directly (``order[r]``) and summed in
float64. Only a *dense* row, whose multi-token ranges hold more positions in all than ``_DENSE_SHARE`` of the
sorted vocabulary, is permuted into sorted order and cumulatively summed (float64, so that the difference of two
entries keeps small masses accurate); its points are still gathered. Whether a row is dense depends on its own
queries only, never on the chunking.

Backward: for a row z with probabilities p, ``dM_q/dz_x = p_x * (1[x in q] w_q(x) - M_q) / T``. The indicator
sums of a row's queries are scattered into vocabulary order (sparse rows, points) or, for a dense row's ranges,
one difference array in sorted order, cumulatively summed and scattered back. No ``[rows, V]`` activation is
kept between the passes; at most a few ``[block, V]`` buffers exist at once, with
``block = min(chunk_size // 8, 32)`` rows, and a sparse block gathers fewer than ``_DENSE_SHARE * V`` positions
per row, so the extra memory stays within ``[chunk_size, V]`` fp32 values (plus the gradient itself).
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_BLOCK_ROWS = 32  # measured: larger blocks are slower on CPU (the [block, V] buffers leave the caches)
_DENSE_SHARE = 0.25
"""A row whose multi-token ranges (lengths summed) exceed this share of the sorted vocabulary is summed
cumulatively rather than gathered. Measured on CPU (64 rows, V = 151,936, forward + backward): gathering ranges that
hold 0.1 / 0.25 / 0.5 / 1 V per row takes 0.6x / 0.95x / 2.5x / 4.7x the time of the cumulative sums."""


def _blocks(start: int, stop: int, chunk_size: int) -> list[slice]:
    block = max(1, min(chunk_size // 8, _MAX_BLOCK_ROWS))
    return [slice(first, min(first + block, stop)) for first in range(start, stop, block)]


class _Layout:
    """The distinct rows of the queries (sparse rows first, then dense ones), each query's row among them, the
    queries grouped by row, and the blocks of rows (each all sparse or all dense)."""

    def __init__(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, vocab_sorted: int, chunk: int):
        unique_rows, local = torch.unique(rows, return_inverse=True)
        num = unique_rows.shape[0]
        length = hi - lo
        spread = torch.zeros(num, dtype=length.dtype, device=rows.device)
        spread.index_add_(0, local, torch.where(length > 1, length, 0))
        dense = spread > _DENSE_SHARE * vocab_sorted
        rank = torch.argsort(dense.to(torch.int8), stable=True)
        position = torch.empty_like(rank)
        position[rank] = torch.arange(num, device=rows.device)
        self.unique_rows = unique_rows[rank]
        self.local = position[local]
        self.by_row = torch.argsort(self.local, stable=True)
        counts = torch.bincount(self.local, minlength=num)
        self.offsets = [0, *counts.cumsum(0).tolist()]
        num_sparse = num - int(dense.sum())
        self.blocks = [(block, False) for block in _blocks(0, num_sparse, chunk)] + [
            (block, True) for block in _blocks(num_sparse, num, chunk)
        ]
        self.size = max(block.stop - block.start for block, _ in self.blocks)

    def queries(self, block: slice) -> torch.Tensor:
        return self.by_row[self.offsets[block.start] : self.offsets[block.stop]]


class _Rows:
    """Logits rows divided by the temperature, in the compute dtype, in one reusable ``[block, V]`` buffer (one
    allocation per call instead of fresh pages for every block)."""

    def __init__(self, logits_2d: torch.Tensor, rows: int, dtype: torch.dtype) -> None:
        self.logits_2d = logits_2d
        self.buffer = torch.empty(rows, logits_2d.shape[1], dtype=dtype, device=logits_2d.device)

    def load(self, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = self.buffer[: rows.shape[0]]
        if scaled.dtype == self.logits_2d.dtype:
            torch.index_select(self.logits_2d, 0, rows, out=scaled)
        else:
            scaled.copy_(self.logits_2d.index_select(0, rows))
        if temperature != 1.0:
            scaled.div_(temperature)
        return scaled


def _elements(
    q_row: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    untied: torch.Tensor,
    order: torch.Tensor,
    weights: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sorted position of every query's range: ``(query, flat index into the [n, width] block, weight)``."""
    length = (hi - lo).clamp(min=0)
    query = torch.repeat_interleave(torch.arange(length.shape[0], device=lo.device), length)
    first = lo - (torch.cumsum(length, 0) - length)
    ranks = torch.arange(query.shape[0], device=lo.device).add_(first[query])
    flat = order[ranks].add_(q_row[query] * width)
    weight = torch.where(untied[query], weights[ranks], torch.ones((), dtype=weights.dtype, device=lo.device))
    return query, flat, weight


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
        device = logits_2d.device
        vocab_sorted, width = order.shape[0], logits_2d.shape[1]
        layout = _Layout(rows, lo, hi, vocab_sorted, chunk_size)
        masses = torch.zeros(rows.shape[0], dtype=torch.float64, device=device)
        lse = torch.empty(layout.unique_rows.shape[0], dtype=dtype, device=device)
        reader = _Rows(logits_2d, layout.size, dtype)
        sorted_probs = cumulative = None
        weights = untied_sorted.to(dtype)
        for block, dense in layout.blocks:
            queries = layout.queries(block)
            scaled = reader.load(layout.unique_rows[block], temperature)
            n = scaled.shape[0]
            block_lse = torch.logsumexp(scaled, dim=1)
            lse[block] = block_lse
            q_row = layout.local[queries] - block.start
            # Points and (in sparse rows) ranges: every position gathered, the sums in float64.
            direct = (hi[queries] - lo[queries] <= 1) if dense else torch.ones_like(queries, dtype=torch.bool)
            d_queries, d_row = queries[direct], q_row[direct]
            query, flat, weight = _elements(
                d_row, lo[d_queries], hi[d_queries], untied[d_queries], order, weights, width
            )
            probs = scaled.reshape(-1)[flat].sub_(block_lse[d_row][query]).exp_().mul_(weight)
            sums = torch.zeros(d_queries.shape[0], dtype=torch.float64, device=device)
            masses[d_queries] = sums.index_add_(0, query, probs.to(torch.float64))
            if not dense:
                continue
            # A dense row's ranges: differences of cumulative sums in sorted order (float64).
            if sorted_probs is None:
                sorted_probs = torch.empty(layout.size, vocab_sorted, dtype=dtype, device=device)
                cumulative = torch.zeros(layout.size, vocab_sorted + 1, dtype=torch.float64, device=device)
            probs = sorted_probs[:n]
            torch.index_select(scaled, 1, order, out=probs)
            probs.sub_(block_lse[:, None]).exp_()
            for kind in (False, True):
                chosen = ~direct & (untied[queries] == kind)
                if not bool(chosen.any()):
                    continue
                if kind:
                    probs.mul_(weights)  # the last use of this block's probabilities
                part = cumulative[:n]
                torch.cumsum(probs, dim=1, dtype=torch.float64, out=part[:, 1:])
                selected, r = queries[chosen], q_row[chosen]
                masses[selected] = part[r, hi[selected]] - part[r, lo[selected]]
        masses = masses.clamp(min=0.0).to(dtype)
        ctx.save_for_backward(logits_2d, lo, hi, untied, order, untied_sorted, masses, lse)
        ctx.layout = layout
        ctx.temperature = temperature
        return masses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_masses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits_2d, lo, hi, untied, order, untied_sorted, masses, lse = ctx.saved_tensors
        layout, temperature = ctx.layout, ctx.temperature
        dtype = masses.dtype
        vocab_sorted, width = order.shape[0], logits_2d.shape[1]
        device = logits_2d.device
        grad_logits = torch.zeros_like(logits_2d)
        grad_masses = grad_masses.to(dtype)
        reader = _Rows(logits_2d, layout.size, dtype)
        # d M_q / d p_x = w_q(x) for x in q, in vocabulary order.
        coefficient = torch.empty(layout.size, width, dtype=dtype, device=device)
        sorted_part = untied_part = None
        weights = untied_sorted.to(dtype)
        for block, dense in layout.blocks:
            queries = layout.queries(block)
            g = grad_masses[queries]
            if not bool(g.any()):
                continue
            block_rows = layout.unique_rows[block]
            n = block_rows.shape[0]
            q_row = layout.local[queries] - block.start
            coef = coefficient[:n].zero_()
            direct = (hi[queries] - lo[queries] <= 1) if dense else torch.ones_like(queries, dtype=torch.bool)
            d_queries = queries[direct]
            query, flat, weight = _elements(
                q_row[direct], lo[d_queries], hi[d_queries], untied[d_queries], order, weights, width
            )
            coef.reshape(-1).index_add_(0, flat, g[direct][query].mul_(weight))
            if dense:
                # A dense row's ranges: difference arrays and a cumulative sum in sorted order (with one extra
                # column that the -g at hi = V lands in), added back in vocabulary order.
                if sorted_part is None:
                    sorted_part = torch.empty(layout.size, vocab_sorted + 1, dtype=dtype, device=device)
                    untied_part = torch.empty_like(sorted_part)
                part = sorted_part[:n].zero_()
                for kind, buffer in ((False, part), (True, untied_part[:n])):
                    chosen = ~direct & (untied[queries] == kind)
                    if not bool(chosen.any()):
                        continue
                    if kind:
                        buffer.zero_()
                    buffer.index_put_((q_row[chosen], lo[queries[chosen]]), g[chosen], accumulate=True)
                    buffer.index_put_((q_row[chosen], hi[queries[chosen]]), -g[chosen], accumulate=True)
                    buffer.cumsum_(dim=1)
                    if kind:
                        buffer[:, :vocab_sorted].mul_(weights)
                        part.add_(buffer)
                coef.index_add_(1, order, part[:, :vocab_sorted])
            row_dot = torch.zeros(n, dtype=dtype, device=device)
            row_dot.index_add_(0, q_row, g * masses[queries])
            # dM/dz_x = p_x (coefficient_x - sum_q g_q M_q) / T.
            probs = reader.load(block_rows, temperature).sub_(lse[block][:, None]).exp_()
            grad = probs.mul_(coef.sub_(row_dot[:, None]))
            if temperature != 1.0:
                grad.div_(temperature)
            grad_logits.index_copy_(0, block_rows, grad.to(grad_logits.dtype))
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
