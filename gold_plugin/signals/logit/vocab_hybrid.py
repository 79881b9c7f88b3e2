"""The vocabulary-map hybrid logit loss (TRL's GOLD/ULD hybrid, ``aligned_logit_loss``): generalised JSD on
the shared vocabulary + ULD on the rest, at group starts only. Not the default: the byte projection
(:mod:`gold_plugin.signals.logit.byte_projection`) is; this one runs with ``--gold.logit_projection vocab``
(and with ``--gold.alignment positional``).

At each aligned position the student's full next-token distribution (its logits) is compared with the
teacher's top-k log-probs through the vocabulary map ``teacher_to_student`` (int64 over teacher ids, -1 =
unmatched):

- **matched part**: the teacher's top-k ids that map to student ids (several teacher ids mapping to one student
  id are merged by adding their probabilities) plus one *rest* bucket holding everything else: the teacher's
  ``1 - sum`` of its matched top-k probabilities and the student's probability of every other student id. The
  generalised JSD(beta) is taken between these two proper distributions (``matched_normalization="tail"``,
  default): it is >= 0, zero iff the student gives the teacher's probability to every matched top-k token,
  and equals the full-vocabulary JSD when both vocabularies are identical and k covers the vocabulary.
  ``matched_normalization="none"`` reproduces TRL's hybrid loss instead: the JSD formula applied to the raw,
  unnormalised probabilities of the matched ids only (not a divergence: it can be negative).
- **unmatched part (ULD)**: the teacher's top-k probabilities of ids that do not map, sorted descending, vs the
  student's probabilities of ids that are not images of the map, sorted descending, zero-padded, L1. The
  student side covers the student's whole unmatched vocabulary exactly: its top-k sorted values plus the mass
  of all lower-ranked ids (which meet the teacher's zero padding), so no sort over the vocabulary is needed.
- ``alignment="positional"``: the original ULD baseline: the teacher's whole top-k sorted vs the student's whole
  sorted distribution, L1; no vocabulary map.

``loss = w_m * matched + w_u * unmatched`` with fixed weights or, when both are None, adaptive weights
``w_m = (#teacher ids that map) / teacher vocabulary size`` and ``w_u = 1 - w_m`` (TRL's rule).

Temperatures: the student's logits are divided by ``student_temperature`` before the softmax; the teacher's
top-k log-probs are reshaped by ``teacher_temperature`` inside the top-k (``p_i^(1/T)`` renormalised to the same
total top-k mass; the mass outside the top-k is unknown and kept), exact when the top-k covers the vocabulary.

Memory: positions are processed in chunks of ``chunk_size``; one reusable ``[chunk, V]`` fp32 buffer (plus an
eighth of one in the backward pass) exists at a time. The gradient with respect to the logits is computed
analytically in the backward pass from per-position statistics saved in the forward pass (log-normaliser, masses,
top-k indices, small coefficient tensors), so no ``[positions, V]`` activations are kept between forward and
backward. Masked positions (no valid teacher slot) are never computed and get exactly zero loss and zero
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gold_plugin.signals.divergences import LOG_PROB_FLOOR, generalized_jsd
from gold_plugin.signals.logit.options import LogitLossOptions, tempered_teacher
from gold_plugin.signals.logit.result import LogitLoss

_NEG_INF = float("-inf")
_LOG2 = 0.6931471805599453


@dataclass
class _Teacher:
    """Teacher-side tensors for the computed rows (no gradient), on the student's device, compute dtype."""

    # [R, k] unique student ids of the matched slots, compacted to the front (0 = filler where masked)
    matched_ids: torch.Tensor
    matched_mask: torch.Tensor  # [R, k] bool
    matched_logprobs: torch.Tensor  # [R, k] log-probs of the matched student ids (merged duplicates)
    rest_logprob: torch.Tensor  # [R] log(1 - sum of matched probs)
    unmatched_sorted: torch.Tensor  # [R, k] probs of unmatched valid slots, sorted descending, 0-padded

    def rows(self, index: slice) -> _Teacher:
        """The same tensors for the rows ``index`` (a chunk)."""
        return _Teacher(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2; -inf at x >= 0."""
    x = x.clamp(max=0.0)
    return torch.where(x > -_LOG2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _prepare_teacher(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    teacher_to_student: torch.Tensor | None,
    options: LogitLossOptions,
    student_vocab: int,
    dtype: torch.dtype,
) -> _Teacher:
    valid = topk_ids >= 0
    logprobs = tempered_teacher(topk_logprobs.to(dtype), valid, options.teacher_temperature)
    rows, k = topk_ids.shape
    if options.alignment == "positional" or teacher_to_student is None:
        unmatched = torch.where(valid, logprobs.exp(), torch.zeros((), dtype=dtype, device=logprobs.device))
        empty_ids = torch.zeros(rows, 0, dtype=torch.int64, device=topk_ids.device)
        return _Teacher(
            matched_ids=empty_ids,
            matched_mask=empty_ids.bool(),
            matched_logprobs=empty_ids.to(dtype),
            rest_logprob=torch.zeros(rows, dtype=dtype, device=topk_ids.device),
            unmatched_sorted=unmatched.sort(dim=-1, descending=True).values,
        )
    student_ids = torch.where(valid, teacher_to_student[topk_ids.clamp(min=0)], -1)
    matched_slot = student_ids >= 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    unmatched = torch.where(valid & ~matched_slot, logprobs.exp(), zero)

    # Merge duplicate student ids within a row (several teacher ids with the same bytes) and compact the
    # unique ids to the front: sort by student id, mark the first slot of each run, add probabilities per run.
    key = torch.where(matched_slot, student_ids, student_vocab)
    sorted_key, order = key.sort(dim=-1)
    sorted_logprobs = logprobs.gather(1, order)
    is_sentinel = sorted_key == student_vocab
    first = torch.ones_like(matched_slot)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    first &= ~is_sentinel
    run = (torch.cumsum(first.to(torch.int64), dim=1) - 1).clamp(min=0)
    run_size = torch.zeros(rows, k, dtype=torch.int64, device=topk_ids.device).scatter_add_(
        1, run, (~is_sentinel).to(torch.int64)
    )
    merged_prob = torch.zeros(rows, k, dtype=dtype, device=topk_ids.device).scatter_add_(
        1, run, torch.where(is_sentinel, zero, sorted_logprobs.exp())
    )
    # Scatter-add (not scatter): non-first slots add exact zeros, so no two writes ever conflict.
    first_logprob = torch.zeros(rows, k, dtype=dtype, device=topk_ids.device).scatter_add_(
        1, run, torch.where(first, sorted_logprobs, zero)
    )
    num_unique = first.sum(dim=1, keepdim=True)
    matched_mask = torch.arange(k, device=topk_ids.device)[None, :] < num_unique
    # A single slot keeps its log-prob exactly; merged runs use the log of the summed probabilities.
    matched_logprobs = torch.where(run_size == 1, first_logprob, merged_prob.log())
    matched_logprobs = torch.where(
        matched_mask, matched_logprobs, torch.full_like(matched_logprobs, LOG_PROB_FLOOR)
    )
    matched_ids = torch.zeros(rows, k, dtype=torch.int64, device=topk_ids.device).scatter_add_(
        1, run, torch.where(first, sorted_key, 0)
    )
    matched_ids = torch.where(matched_mask, matched_ids, 0)
    masked_for_lse = torch.where(matched_mask, matched_logprobs, torch.full_like(matched_logprobs, _NEG_INF))
    rest_logprob = _log1mexp(torch.logsumexp(masked_for_lse, dim=-1))
    return _Teacher(
        matched_ids=matched_ids,
        matched_mask=matched_mask,
        matched_logprobs=matched_logprobs,
        rest_logprob=rest_logprob,
        unmatched_sorted=unmatched.sort(dim=-1, descending=True).values,
    )


def _small_loss(
    teacher: _Teacher,
    student_matched: torch.Tensor,
    student_rest: torch.Tensor,
    student_top_unmatched: torch.Tensor,
    student_unmatched_mass_log: torch.Tensor,
    options: LogitLossOptions,
    weights: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss per position from per-position statistics only (small tensors; autograd gives their gradients)."""
    if options.alignment == "positional":
        matched = torch.zeros_like(student_rest)
    elif options.matched_normalization == "tail":
        ones = torch.ones_like(teacher.matched_mask[:, :1])
        matched = generalized_jsd(
            torch.cat([student_matched, student_rest[:, None]], dim=1),
            torch.cat([teacher.matched_logprobs, teacher.rest_logprob[:, None]], dim=1),
            options.beta,
            mask=torch.cat([teacher.matched_mask, ones], dim=1),
        )
    else:
        matched = generalized_jsd(
            student_matched, teacher.matched_logprobs, options.beta, mask=teacher.matched_mask
        )
    student_top = student_top_unmatched.exp()
    teacher_sorted = teacher.unmatched_sorted
    width = max(student_top.shape[1], teacher_sorted.shape[1])
    l1 = (
        (
            torch.nn.functional.pad(student_top, (0, width - student_top.shape[1]))
            - torch.nn.functional.pad(teacher_sorted, (0, width - teacher_sorted.shape[1]))
        )
        .abs()
        .sum(dim=1)
    )
    # Student ids ranked below its top-k meet the teacher's zero padding: they add their total mass.
    lower_ranked_mass = (student_unmatched_mass_log.exp() - student_top.sum(dim=1)).clamp(min=0.0)
    unmatched = l1 + lower_ranked_mass
    loss = weights[0] * matched + weights[1] * unmatched
    return loss, matched, unmatched


@dataclass
class _Saved:
    """Per-row statistics the backward pass needs (all small)."""

    rows: torch.Tensor  # [R] row index into the 2-D logits
    out_index: torch.Tensor  # [R] index into the [N] outputs
    lse: torch.Tensor  # [R] log-normaliser of logits / temperature
    coef_base: torch.Tensor  # [R] coefficient of p on every column
    coef_unmatched: torch.Tensor  # [R] extra coefficient of p on unmatched columns
    coef_rest: torch.Tensor  # [R] rest coefficient, to be removed again on the row's matched ids
    matched_ids: torch.Tensor  # [R, km]
    matched_mask: torch.Tensor  # [R, km] bool
    grad_matched: torch.Tensor  # [R, km] dL/d(log p) at matched ids
    top_ids: torch.Tensor  # [R, ku]
    grad_top: torch.Tensor  # [R, ku] dL/d(log p) at the student's unmatched top ids


def _safe_ratio_coef(grad: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """grad / mass for a mass given in log space; 0 where the mass is below the floor (its gradient is 0)."""
    usable = log_mass > LOG_PROB_FLOOR
    return torch.where(usable, grad * torch.exp(-log_mass.clamp(min=LOG_PROB_FLOOR)), torch.zeros_like(grad))


class _Workspace:
    """One reusable ``[chunk, V]`` buffer (compute dtype) for the chunk's logits / exponentials / probabilities.

    Reusing it across chunks keeps the peak at one chunk-sized buffer and avoids re-faulting fresh pages for
    every chunk on CPU (on CUDA the caching allocator would reuse the block anyway).
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffer = torch.empty(rows, vocab, dtype=dtype, device=device)

    def load(self, logits_2d: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """The rows' logits divided by the temperature, in the compute dtype."""
        out = self.buffer[: rows.shape[0]]
        if logits_2d.dtype == out.dtype:
            torch.index_select(logits_2d, 0, rows, out=out)
        else:  # bf16 / fp16: convert a few rows at a time so the low-precision copy stays small
            for block in _row_blocks(rows.shape[0]):
                out[block].copy_(logits_2d.index_select(0, rows[block]))
        if temperature != 1.0:
            out.div_(temperature)
        return out


def _row_blocks(num_rows: int, parts: int = 8) -> list[slice]:
    """About ``parts`` consecutive row slices covering ``num_rows``: bounds row-wise temporaries to 1/parts."""
    step = max(1, -(-num_rows // parts))
    return [slice(first, first + step) for first in range(0, num_rows, step)]


def _gather_scaled(
    logits_2d: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``logits_2d[rows[i], ids[i, j]] / temperature`` (a small gather from the original logits)."""
    values = logits_2d[rows[:, None], ids].to(dtype)
    return values / temperature if temperature != 1.0 else values


@dataclass
class _StudentStats:
    """The student's per-row statistics of one chunk, in log space: what the small loss reads (:meth:`leaves`)
    and what the backward pass re-uses."""

    lse: torch.Tensor  # [R] log-normaliser of logits / temperature
    matched: torch.Tensor  # [R, km] log p at the teacher's matched ids
    rest: torch.Tensor  # [R] log of the rest mass (every id but the row's matched ids)
    top_unmatched: torch.Tensor  # [R, ku] log p of the student's top unmatched ids (-inf where p = 0)
    top_ids: torch.Tensor  # [R, ku] int64
    unmatched_mass: (
        torch.Tensor
    )  # [R] log of the unmatched vocabulary's mass (ids that are no image of the map)

    def leaves(self) -> list[torch.Tensor]:
        """The four inputs of :func:`_small_loss`, in its order."""
        return [self.matched, self.rest, self.top_unmatched, self.unmatched_mass]


def _rest_sum(
    exps: torch.Tensor, teacher: _Teacher, student_matched: torch.Tensor, sum_all: torch.Tensor
) -> torch.Tensor:
    """Sum of ``exps`` over every id but the row's matched ids, zeroing those in place (``sum_all`` if none)."""
    if not teacher.matched_ids.shape[1]:
        return sum_all
    # Filler slots rewrite the row's first compacted entry, so each position gets one consistent value.
    fill_ids = torch.where(teacher.matched_mask, teacher.matched_ids, teacher.matched_ids[:, :1])
    fill_values = torch.where(
        teacher.matched_mask[:, :1].expand_as(fill_ids),
        torch.zeros_like(student_matched),
        exps.gather(1, fill_ids),
    )
    exps.scatter_(1, fill_ids, fill_values)
    return exps.sum(dim=1)


def _unmatched_sum(
    exps: torch.Tensor, image_mask: torch.Tensor | None, sum_all: torch.Tensor
) -> torch.Tensor:
    """Sum of ``exps`` over the unmatched vocabulary, zeroing the map's images in place (``sum_all`` if no map)."""
    if image_mask is None:
        return sum_all
    exps.masked_fill_(image_mask[None, :], 0.0)
    return exps.sum(dim=1)


def _top_unmatched(
    exps: torch.Tensor,
    logits_2d: torch.Tensor,
    rows: torch.Tensor,
    lse: torch.Tensor,
    k_unmatched: int,
    temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [R, k_unmatched], log-probs)`` of the largest remaining ``exps`` (the unmatched ids once the
    images are zeroed)."""
    if not k_unmatched:
        return (
            torch.zeros(exps.shape[0], 0, dtype=torch.int64, device=exps.device),
            torch.zeros(exps.shape[0], 0, dtype=dtype, device=exps.device),
        )
    top_exps, top_ids = exps.topk(k_unmatched, dim=1)
    # Exact log-probs from the original logits; zeroed (masked) or underflowed entries have p = 0.
    top_values = torch.where(
        top_exps > 0,
        _gather_scaled(logits_2d, rows, top_ids, temperature, dtype) - lse[:, None],
        torch.full_like(top_exps, _NEG_INF),
    )
    return top_ids, top_values


def _rest_log(
    matched_mask: torch.Tensor,
    student_matched: torch.Tensor,
    sum_rest: torch.Tensor,
    log_sum_all: torch.Tensor,
) -> torch.Tensor:
    """log(rest mass): from the matched mass where the rest holds most of the probability (exactly the teacher's
    formula, so identical distributions cancel exactly), else by the direct sum (accurate for a small rest)."""
    matched_lse = torch.logsumexp(
        torch.where(matched_mask, student_matched, torch.full_like(student_matched, _NEG_INF)),
        dim=1,
    )
    return torch.where(matched_lse < -_LOG2, _log1mexp(matched_lse), sum_rest.log() - log_sum_all)


def _student_stats(
    workspace: _Workspace,
    logits_2d: torch.Tensor,
    rows: torch.Tensor,
    teacher: _Teacher,
    image_mask: torch.Tensor | None,
    k_unmatched: int,
    temperature: float,
    dtype: torch.dtype,
) -> _StudentStats:
    """The statistics of one chunk of rows. One pass of exp(x - max) serves three sums: all ids, the rest (all but
    this row's matched ids) and the unmatched vocabulary (no image of the map); entries are zeroed in place
    between the sums."""
    scaled = workspace.load(logits_2d, rows, temperature)
    row_max = scaled.amax(dim=1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    matched_scaled = scaled.gather(1, teacher.matched_ids)
    exps = scaled.sub_(row_max[:, None]).exp_()
    sum_all = exps.sum(dim=1)
    lse = sum_all.log() + row_max
    student_matched = matched_scaled - lse[:, None]
    sum_rest = _rest_sum(exps, teacher, student_matched, sum_all)
    sum_unmatched = _unmatched_sum(exps, image_mask, sum_all)
    top_ids, top_values = _top_unmatched(exps, logits_2d, rows, lse, k_unmatched, temperature, dtype)
    del scaled, exps
    log_sum_all = sum_all.log()
    return _StudentStats(
        lse=lse,
        matched=student_matched,
        rest=_rest_log(teacher.matched_mask, student_matched, sum_rest, log_sum_all),
        top_unmatched=top_values,
        top_ids=top_ids,
        unmatched_mass=sum_unmatched.log() - log_sum_all,
    )


def _chunk_loss(
    teacher: _Teacher,
    stats: _StudentStats,
    options: LogitLossOptions,
    weights: tuple[float, float],
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """``(loss, matched, unmatched)`` of one chunk from its statistics, and, if ``needs_grad``, the loss's
    gradients with respect to the statistics (:meth:`_StudentStats.leaves`; zeros where unused)."""
    grads = None
    with torch.enable_grad():
        leaves = [s.detach().requires_grad_(needs_grad) for s in stats.leaves()]
        loss, matched, unmatched = _small_loss(teacher, *leaves, options, weights)
        if needs_grad:
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return loss, matched, unmatched, grads


def _saved_chunk(
    rows: torch.Tensor,
    out_index: torch.Tensor,
    teacher: _Teacher,
    stats: _StudentStats,
    grads: list[torch.Tensor],
) -> _Saved:
    """What the backward pass needs of one chunk: the gradients with respect to the statistics turned into
    coefficients of the probabilities."""
    g_matched, g_rest, g_top, g_unmatched = grads
    coef_rest = _safe_ratio_coef(g_rest, stats.rest)
    coef_unmatched = _safe_ratio_coef(g_unmatched, stats.unmatched_mass)
    total = g_matched.sum(dim=1) + g_top.sum(dim=1) + g_rest + g_unmatched
    return _Saved(
        rows=rows,
        out_index=out_index,
        lse=stats.lse,
        coef_base=coef_rest - total,
        coef_unmatched=coef_unmatched,
        coef_rest=coef_rest,
        matched_ids=teacher.matched_ids,
        matched_mask=teacher.matched_mask,
        grad_matched=g_matched,
        top_ids=stats.top_ids,
        grad_top=g_top,
    )


class _AlignedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits_2d: torch.Tensor,
        rows: torch.Tensor,
        out_index: torch.Tensor,
        num_outputs: int,
        teacher: _Teacher,
        image_mask: torch.Tensor | None,
        options: LogitLossOptions,
        weights: tuple[float, float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunk by chunk: the student's statistics (:func:`_student_stats`), the small loss and its gradients
        (:func:`_chunk_loss`), and what the backward pass needs (:func:`_saved_chunk`)."""
        dtype = torch.float64 if logits_2d.dtype == torch.float64 else torch.float32
        device = logits_2d.device
        vocab = logits_2d.shape[1]
        loss = torch.zeros(num_outputs, dtype=dtype, device=device)
        matched_out = torch.zeros_like(loss)
        unmatched_out = torch.zeros_like(loss)
        saved_chunks: list[_Saved] = []
        needs_grad = ctx.needs_input_grad[0]
        k_unmatched = min(teacher.unmatched_sorted.shape[1], vocab)
        workspace = (
            _Workspace(min(options.chunk_size, rows.shape[0]), vocab, dtype, device) if rows.numel() else None
        )
        for start in range(0, rows.shape[0], options.chunk_size):
            chunk = slice(start, start + options.chunk_size)
            chunk_rows, t_chunk, out_chunk = rows[chunk], teacher.rows(chunk), out_index[chunk]
            stats = _student_stats(
                workspace,
                logits_2d,
                chunk_rows,
                t_chunk,
                image_mask,
                k_unmatched,
                options.student_temperature,
                dtype,
            )
            chunk_loss, chunk_matched, chunk_unmatched, grads = _chunk_loss(
                t_chunk, stats, options, weights, needs_grad
            )
            loss[out_chunk] = chunk_loss.detach()
            matched_out[out_chunk] = chunk_matched.detach()
            unmatched_out[out_chunk] = chunk_unmatched.detach()
            if needs_grad:
                saved_chunks.append(_saved_chunk(chunk_rows, out_chunk, t_chunk, stats, grads))
        ctx.mark_non_differentiable(matched_out, unmatched_out)
        if needs_grad:
            ctx.save_for_backward(logits_2d)
            ctx.saved_chunks = saved_chunks
            ctx.image_mask = image_mask
            ctx.temperature = options.student_temperature
            ctx.dtype = dtype
            ctx.chunk_rows = min(options.chunk_size, rows.shape[0])
        return loss, matched_out, unmatched_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (logits_2d,) = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits_2d)
        dtype = ctx.dtype
        unmatched_columns = None if ctx.image_mask is None else (~ctx.image_mask).to(dtype)
        workspace = None
        for saved in ctx.saved_chunks:
            upstream = grad_loss[saved.out_index].to(dtype) / ctx.temperature
            if not bool(upstream.any()):
                continue
            if workspace is None:
                workspace = _Workspace(ctx.chunk_rows, logits_2d.shape[1], dtype, logits_2d.device)
            probs = workspace.load(logits_2d, saved.rows, ctx.temperature)
            probs.sub_(saved.lse[:, None]).exp_()
            p_matched = probs.gather(1, saved.matched_ids)
            base = saved.coef_base * upstream
            extra = saved.coef_unmatched * upstream
            if unmatched_columns is None:
                probs.mul_((base + extra)[:, None])
            else:
                # Coefficient base + extra on unmatched columns, base on the others; built for a few rows at a
                # time so that the temporary stays at an eighth of the chunk.
                for block in _row_blocks(probs.shape[0]):
                    probs[block].mul_(
                        torch.addcmul(base[block, None], extra[block, None], unmatched_columns[None, :])
                    )
            # Direct terms at the gathered ids, and the rest coefficient removed again on this row's matched ids.
            rest_removed = torch.where(saved.matched_mask, saved.coef_rest[:, None] * p_matched, 0.0)
            matched_terms = (saved.grad_matched - rest_removed) * upstream[:, None]
            probs.scatter_add_(1, saved.matched_ids, matched_terms)
            probs.scatter_add_(1, saved.top_ids, saved.grad_top * upstream[:, None])
            if grad_logits.dtype == probs.dtype:
                grad_logits.index_add_(0, saved.rows, probs)
            else:
                for block in _row_blocks(probs.shape[0]):
                    grad_logits.index_add_(0, saved.rows[block], probs[block].to(grad_logits.dtype))
            del probs
        return grad_logits, None, None, None, None, None, None, None


def _rows_and_logits(
    student_logits: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B * T, V] logits, flat row of every (row, column) pair)``: a view, no gathered copy."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}.")
    if positions.dim() != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must be [N, 2] (row, column) pairs, got shape {tuple(positions.shape)}.")
    batch, time, vocab = student_logits.shape
    positions = positions.to(device=student_logits.device, dtype=torch.int64)
    if positions.numel() and (
        int(positions[:, 0].max()) >= batch or int(positions[:, 1].max()) >= time or int(positions.min()) < 0
    ):
        raise ValueError(f"positions out of range for logits of shape {tuple(student_logits.shape)}.")
    return student_logits.reshape(batch * time, vocab), positions[:, 0] * time + positions[:, 1]


def _validated_teacher_inputs(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, num_positions: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = topk_ids.to(device=device, dtype=torch.int64)
    logprobs = topk_logprobs.to(device)
    if ids.dim() != 2 or ids.shape != logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} must both be "
            "[N, k] (one row per aligned position, -1 = padded slot)."
        )
    if ids.shape[0] != num_positions:
        raise ValueError(f"{ids.shape[0]} teacher rows for {num_positions} student positions.")
    if torch.isnan(logprobs[ids >= 0]).any():
        raise ValueError("teacher_topk_logprobs contain NaN at non-padded slots.")
    return ids, logprobs


def _map_and_weights(
    teacher_to_student: torch.Tensor | None,
    options: LogitLossOptions,
    vocab: int,
    device: torch.device,
    max_teacher_id: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[float, float]]:
    if options.alignment == "positional":
        return None, None, (0.0, 1.0)
    if teacher_to_student is None:
        raise ValueError("alignment='spans' needs teacher_to_student (VocabMap.teacher_to_student).")
    mapping = teacher_to_student.to(device=device, dtype=torch.int64).reshape(-1)
    if mapping.numel() and int(mapping.max()) >= vocab:
        raise ValueError(
            f"teacher_to_student maps to student id {int(mapping.max())}, but the student logits have {vocab} columns."
        )
    image_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    image_mask[mapping[mapping >= 0]] = True
    if options.matched_weight is None:
        matched_share = float((mapping >= 0).sum()) / max(1, mapping.shape[0])
        weights = (matched_share, 1.0 - matched_share)
    else:
        weights = (float(options.matched_weight), float(options.unmatched_weight))
    return pad_unmatched(mapping, max_teacher_id), image_mask, weights


def pad_unmatched(mapping: torch.Tensor, max_teacher_id: int) -> torch.Tensor:
    """``mapping`` extended with -1 (unmatched) up to ``max_teacher_id``: a teacher model's logits are often
    wider than its tokenizer (padded embedding rows), so its top-k may name ids the map does not cover."""
    if max_teacher_id < mapping.shape[0]:
        return mapping
    pad = torch.full((max_teacher_id + 1 - mapping.shape[0],), -1, dtype=mapping.dtype, device=mapping.device)
    return torch.cat([mapping, pad])


def aligned_logit_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_to_student: torch.Tensor | None,
    *,
    positions: torch.Tensor,
    options: LogitLossOptions,
) -> LogitLoss:
    """Aligned GKD/ULD logit loss at N aligned positions (see the module docstring for the maths).

    - ``student_logits``: the full ``[B, T, V]`` logits; ``positions``: ``[N, 2]`` (row, column) pairs into them
      (no gathered copy is made). bf16/fp16 are computed in fp32; the gradient has the logits' dtype.
    - ``teacher_topk_ids`` / ``teacher_topk_logprobs``: ``[N, k]``, -1 = padded slot; a row whose slots are all
      padded gets exactly zero loss and gradient (and costs no compute).
    - ``teacher_to_student``: int64 over teacher ids, -1 = unmatched (``VocabMap.teacher_to_student``); None only
      with ``options.alignment == "positional"``.
    - ``options``: the training step's are ``LogitLossOptions.from_config(gold, student_temperature=...)``.
    """
    if not torch.is_floating_point(student_logits):
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}.")
    device = student_logits.device
    logits_2d, rows_all = _rows_and_logits(student_logits, positions)
    num_positions = rows_all.shape[0]
    ids, logprobs = _validated_teacher_inputs(teacher_topk_ids, teacher_topk_logprobs, num_positions, device)
    valid = (ids >= 0).any(dim=1)
    max_teacher_id = int(ids.max()) if ids.numel() else -1
    mapping, image_mask, weights = _map_and_weights(
        teacher_to_student, options, logits_2d.shape[1], device, max_teacher_id
    )
    out_index = valid.nonzero().reshape(-1)
    dtype = torch.float64 if logits_2d.dtype == torch.float64 else torch.float32
    teacher = _prepare_teacher(
        ids[out_index], logprobs[out_index], mapping, options, logits_2d.shape[1], dtype
    )
    loss, matched, unmatched = _AlignedLogitLoss.apply(
        logits_2d, rows_all[out_index], out_index, num_positions, teacher, image_mask, options, weights
    )
    return LogitLoss(
        loss=loss,
        matched=matched,
        unmatched=unmatched,
        valid=valid,
        matched_weight=weights[0],
        unmatched_weight=weights[1],
    )
