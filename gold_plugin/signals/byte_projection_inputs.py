"""Inputs of the byte-projected logit loss: which student masses make up each teacher candidate.

At every aligned teacher position j, the teacher predicts its next token after the text ``prefix``; its top-k
candidates c are byte strings ``b(c)``. The student position i whose token covers the first byte of teacher
token j has consumed ``u`` (the first ``l`` bytes of its sampled token ``s_i``) of the same text after the
same prefix. The student's probability of each candidate, conditioned on its token at i starting with ``u``
(exactly renormalised; ``l = 0`` at a shared boundary), is assembled from softmax masses over ranges of the
byte-sorted student vocabulary (:mod:`gold_plugin.alignment.sorted_vocab`), as signed products:

- **range**: the student tokens at i whose bytes start with ``K = u + b(c)``. At a shared boundary
  (``l = 0``) a student token whose bytes are exactly some teacher token's belongs to that teacher token only
  (added as a point mass to the candidate with those bytes, else left to the remainder); other student tokens
  (a merged "64" against single-digit teacher tokens) belong to the longest candidate they start with.
  Ranges nest like the candidates' keys, so a candidate owns its range minus its children's ranges: the events
  are disjoint.
- **chain rule**: where the sampled ``s_i`` ends inside ``K`` (the student splits finer than the teacher here)
  and no student token spells ``K`` itself: ``p_i(s_i) * p_{i+1}(starts with the rest)``, continued along the
  sampled path while the sampled token ends inside what is left (up to ``max_chain`` tokens).
- **remainder**: everything else (other teacher tokens, spellings that leave the sampled path); it is a
  bucket of its own on both sides. A candidate that only a non-sampled student token could start
  (``K`` is not a student token, but a proper prefix of it other than ``s_i`` is) cannot be computed: its teacher
  probability joins the longest candidate it extends (whose student range already holds that spelling), or
  the remainder.
- **end**: the teacher's end ids (EOS / end-of-turn) against the student's end ids, at shared boundaries.

With the same tokenizer on both sides every boundary is shared, every candidate is a student token and owns
exactly that token's probability: the loss is today's per-position matched loss (docs/signals.md).
Built on the CPU with numpy, vectorised over all positions and candidates of a batch; Python loops run only
over samples, candidate byte lengths and chain depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.sorted_vocab import SortedVocab, truncate_hex

DEFAULT_MAX_CHAIN = 4


@dataclass
class ProjectionInputs:
    """Everything :func:`~gold_plugin.signals.projected_logit_loss` needs for a batch (P teacher positions)."""

    positions: torch.Tensor
    """[P, 2] int64 (row, action column) of the covering student position of every teacher position."""
    sample_index: torch.Tensor
    """[P] int64: the row of each position, for per-sample reductions."""
    consumed: torch.Tensor
    """[P] int64: bytes of the student's token consumed before the teacher position (0 = shared boundary)."""
    teacher_event: torch.Tensor
    """[P, k] int64: event of each teacher slot (candidate index, ``k`` = end, -1 = remainder)."""
    teacher_topk_logprobs: torch.Tensor
    """[P, k] float32, -inf at padded slots."""
    query_positions: torch.Tensor
    """[Q, 2] int64 (row, column) of each range query."""
    query_lo: torch.Tensor
    query_hi: torch.Tensor
    query_untied: torch.Tensor
    """[Q] bool: weight the range by ``SortedVocab.teacher_token == False``."""
    term_factors: torch.Tensor
    """[T, F] int64 indices into the queries (-1 = factor 1); a term is the product of its factors."""
    term_sign: torch.Tensor
    term_event: torch.Tensor
    """[T] int64 flat index ``p * num_events + event``."""
    denominator_factors: torch.Tensor
    denominator_sign: torch.Tensor
    denominator_position: torch.Tensor
    """Terms of the conditioning mass of positions with ``consumed > 0`` (1 elsewhere)."""
    order: torch.Tensor
    untied_sorted: torch.Tensor
    num_events: int

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])


class _Queries:
    """Collects range queries and the signed products of them that make up each event."""

    def __init__(self, num_factors: int) -> None:
        self.num_factors = num_factors
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.untied: list[np.ndarray] = []
        self.count = 0
        self.terms: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"event": [], "den": []}

    def add(
        self, rows: np.ndarray, cols: np.ndarray, lo: np.ndarray, hi: np.ndarray, untied: np.ndarray
    ) -> np.ndarray:
        n = rows.shape[0]
        self.rows.append(rows)
        self.cols.append(cols)
        self.lo.append(lo)
        self.hi.append(hi)
        self.untied.append(np.broadcast_to(untied, (n,)).astype(bool))
        index = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return index

    def term(
        self, kind: str, factors: list[np.ndarray], sign: float | np.ndarray, target: np.ndarray
    ) -> None:
        n = target.shape[0]
        if n == 0:
            return
        matrix = np.full((n, self.num_factors), -1, dtype=np.int64)
        for f, column in enumerate(factors):
            matrix[:, f] = column
        self.terms[kind].append((matrix, np.broadcast_to(np.asarray(sign, dtype=np.float64), (n,)), target))

    def stacked(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = self.terms[kind]
        if not parts:
            return np.zeros((0, self.num_factors), np.int64), np.zeros(0), np.zeros(0, np.int64)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return (
            cat(self.rows, np.int64),
            cat(self.cols, np.int64),
            cat(self.lo, np.int64),
            cat(self.hi, np.int64),
            cat(self.untied, bool),
        )


@dataclass
class _Positions:
    """Per teacher position: where it sits on the student side (numpy, P entries)."""

    row: np.ndarray
    col: np.ndarray
    student_id: np.ndarray
    student_len: np.ndarray
    consumed: np.ndarray
    chain_ids: np.ndarray  # [P, D] student ids along the sampled path after i (-1 = none)
    chain_cols: np.ndarray  # [P, D]
    chain_lens: np.ndarray  # [P, D]
    top_ids: np.ndarray  # [P, k]
    top_logprobs: np.ndarray  # [P, k]


def _sample_positions(
    b: int,
    alignment: Alignment,
    ids: np.ndarray,
    columns: np.ndarray,
    top_ids: np.ndarray,
    top_lp: np.ndarray,
    max_chain: int,
) -> _Positions | None:
    s_ends, t_ends = alignment.student_ends, alignment.teacher_ends
    n, m = ids.shape[0], t_ends.shape[0]
    if n == 0 or m == 0:
        return None
    s_len = np.diff(s_ends, prepend=0)
    t_len = np.diff(t_ends, prepend=0)
    shift = int(s_ends[-1] - t_ends[-1])  # a SentencePiece dummy-prefix space on one side only
    j = np.flatnonzero((alignment.teacher_group >= 0) & (top_ids >= 0).any(axis=1))
    start = t_ends[j] - t_len[j] + shift
    zero_width = t_len[j] == 0
    i = np.searchsorted(s_ends, start, side="right")
    # A zero-width teacher token (the final end-of-turn) is predicted after the whole text: it faces the
    # student's final zero-width token (its EOS) when that one is aligned too.
    final_pair = zero_width & (start == s_ends[-1]) & (s_len[-1] == 0)
    i = np.where(zero_width, n - 1, i)
    keep = np.where(zero_width, final_pair, (start >= 0) & (i < n))
    keep &= alignment.student_group[np.minimum(i, n - 1)] >= 0
    j, i, start, zero_width = j[keep], i[keep], start[keep], zero_width[keep]
    if j.shape[0] == 0:
        return None
    consumed = np.where(zero_width, 0, start - (s_ends[i] - s_len[i]))
    depth = np.arange(1, max_chain + 1)
    follow = i[:, None] + depth[None, :]
    inside = follow < n
    follow_c = np.minimum(follow, n - 1)
    inside &= alignment.student_group[follow_c] >= 0
    return _Positions(
        row=np.full(j.shape[0], b, dtype=np.int64),
        col=columns[i],
        student_id=ids[i],
        student_len=s_len[i],
        consumed=consumed.astype(np.int64),
        chain_ids=np.where(inside, ids[follow_c], -1),
        chain_cols=columns[follow_c],
        chain_lens=np.where(inside, s_len[follow_c], 0),
        top_ids=top_ids[j],
        top_logprobs=top_lp[j],
    )


def _concat_positions(parts: list[_Positions]) -> _Positions:
    k = max(p.top_ids.shape[1] for p in parts)

    def pad(x: np.ndarray, value: float) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=value)

    fields = {}
    for name in _Positions.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if name == "top_ids":
            values = [pad(v, -1) for v in values]
        elif name == "top_logprobs":
            values = [pad(v.astype(np.float32), -np.inf) for v in values]
        fields[name] = np.concatenate(values)
    return _Positions(**fields)


def projection_inputs(
    vocab: SortedVocab,
    alignments: Sequence[Alignment],
    student_ids: Sequence[np.ndarray | torch.Tensor | Sequence[int]],
    teacher_topk_ids: Sequence[np.ndarray | torch.Tensor | None],
    teacher_topk_logprobs: Sequence[np.ndarray | torch.Tensor | None],
    action_mask: torch.Tensor,
    *,
    student_end_ids: Sequence[int] = (),
    teacher_end_ids: Sequence[int] = (),
    max_chain: int = DEFAULT_MAX_CHAIN,
) -> ProjectionInputs:
    """Projection inputs of a batch in OpenRLHF's layout (``action_mask[b, j]``: logits column j predicts action j).

    ``student_ids[b]`` are the response (action) ids of row b; ``alignments[b]`` must be a spans alignment of
    them with byte ends. Samples that are not aligned or have no teacher top-k contribute nothing.
    Raises ``ValueError`` naming the sample where an alignment does not match its ids, actions or teacher rows.
    """
    mask = action_mask.to(torch.bool).cpu().numpy()
    if not (len(alignments) == len(student_ids) == len(teacher_topk_ids) == mask.shape[0]):
        raise ValueError(
            f"{len(alignments)} alignments / {len(student_ids)} id rows / {len(teacher_topk_ids)} top-k for "
            f"{mask.shape[0]} rows."
        )
    parts = []
    for b, (alignment, ids, top_ids, top_lp) in enumerate(
        zip(alignments, student_ids, teacher_topk_ids, teacher_topk_logprobs)
    ):
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        columns = np.flatnonzero(mask[b])
        if not (len(alignment.student_group) == ids.shape[0] == columns.shape[0]):
            raise ValueError(
                f"Sample {b}: {len(alignment.student_group)} aligned student tokens, {ids.shape[0]} ids and "
                f"{columns.shape[0]} actions must be equal."
            )
        if not alignment.aligned or alignment.num_groups == 0 or top_ids is None or top_lp is None:
            continue
        if alignment.student_ends is None or alignment.teacher_ends is None:
            raise ValueError(f"Sample {b}: the byte projection needs a spans alignment (byte ends).")
        top_ids = np.asarray(top_ids, dtype=np.int64)
        top_lp = np.asarray(top_lp, dtype=np.float32)
        if (
            top_ids.ndim != 2
            or top_ids.shape != top_lp.shape
            or top_ids.shape[0] != len(alignment.teacher_group)
        ):
            raise ValueError(
                f"Sample {b}: teacher top-k of shape {top_ids.shape} / {top_lp.shape} for "
                f"{len(alignment.teacher_group)} teacher tokens; expected [n_teacher_tokens, k]."
            )
        if (ids >= vocab.size).any():
            continue  # ids beyond the tokenizer (padded embedding rows): the text is unknown
        part = _sample_positions(b, alignment, ids, columns, top_ids, top_lp, max_chain)
        if part is not None:
            parts.append(part)
    return _build(vocab, parts, action_mask.device, student_end_ids, teacher_end_ids, max_chain)


def _build(
    vocab: SortedVocab,
    parts: list[_Positions],
    device: torch.device,
    student_end_ids: Sequence[int],
    teacher_end_ids: Sequence[int],
    max_chain: int,
) -> ProjectionInputs:
    queries = _Queries(max_chain + 1)
    if parts:
        pos = _concat_positions(parts)
        teacher_event = _assemble(vocab, pos, queries, student_end_ids, teacher_end_ids, max_chain)
    else:
        pos = None
        teacher_event = np.zeros((0, 0), np.int64)
    k = teacher_event.shape[1]
    rows, cols, lo, hi, untied = queries.arrays()
    factors, sign, event = queries.stacked("event")
    d_factors, d_sign, d_pos = queries.stacked("den")

    def t(x: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.array(x), dtype=dtype, device=device)

    empty = np.zeros(0, np.int64)
    return ProjectionInputs(
        positions=t(np.stack([pos.row, pos.col], axis=1) if pos else np.zeros((0, 2), np.int64)),
        sample_index=t(pos.row if pos else empty),
        consumed=t(pos.consumed if pos else empty),
        teacher_event=t(teacher_event),
        teacher_topk_logprobs=t(pos.top_logprobs if pos else np.zeros((0, 0)), torch.float32),
        query_positions=t(np.stack([rows, cols], axis=1)),
        query_lo=t(lo),
        query_hi=t(hi),
        query_untied=t(untied, torch.bool),
        term_factors=t(factors),
        term_sign=t(sign, torch.float64),
        term_event=t(event),
        denominator_factors=t(d_factors),
        denominator_sign=t(d_sign, torch.float64),
        denominator_position=t(d_pos),
        order=t(vocab.order),
        untied_sorted=t(~vocab.teacher_token[vocab.order], torch.float32),
        num_events=k + 1,
    )


def _assemble(
    vocab: SortedVocab,
    pos: _Positions,
    queries: _Queries,
    student_end_ids: Sequence[int],
    teacher_end_ids: Sequence[int],
    max_chain: int,
) -> np.ndarray:
    """Adds every query and term of the batch to ``queries``; returns the teacher slots' events ``[P, k]``."""
    num, k = pos.top_ids.shape
    position = np.arange(num, dtype=np.int64)
    ids = pos.top_ids
    in_table = (ids >= 0) & (ids < vocab.teacher_keys.shape[0])
    safe = np.where(in_table, ids, 0)
    cand_len = np.where(in_table, vocab.teacher_byte_lengths[safe], 0)
    text = in_table & (cand_len > 0) & ~vocab.teacher_special[safe]
    cand_key = np.where(text, vocab.teacher_keys[safe], b"")
    is_end = (ids >= 0) & np.isin(ids, np.asarray(list(teacher_end_ids), dtype=np.int64))
    ell = pos.consumed
    s_key = vocab.student_keys[pos.student_id]
    u_key = truncate_hex(s_key, ell)
    key = np.strings.add(u_key[:, None], cand_key)
    key_len = ell[:, None] + cand_len
    lo, hi = vocab.prefix_ranges(key)
    exact = np.where(text, vocab.exact_ids(key, lo), -1)
    s_len = pos.student_len[:, None]
    extends_sample = text & (s_len > 0) & (key_len > s_len) & np.strings.startswith(key, s_key[:, None])
    chain = extends_sample & (exact < 0)

    unresolved = chain & (pos.chain_ids[:, :1] < 0)  # the path ends before the candidate does
    open_ = text & (exact < 0)
    for length in range(1, int(key_len[open_].max(initial=0))):
        active = open_ & (length > ell[:, None]) & (length < key_len)
        if not active.any():
            continue
        prefix = truncate_hex(key[active], length)
        spelled = vocab.exact_ids(prefix) >= 0
        sampled = (length == np.broadcast_to(s_len, key.shape)[active]) & (
            prefix == np.broadcast_to(s_key[:, None], key.shape)[active]
        )
        unresolved[active] |= spelled & ~sampled

    # Equal bytes (several teacher ids for one string) merge into the first slot; a candidate's parent is the
    # longest resolved candidate whose bytes are a proper prefix of its own (the keys share u).
    slot = np.arange(k)
    canonical = np.where(text, vocab.teacher_canonical[safe], -1)
    same = (canonical[:, :, None] == canonical[:, None, :]) & text[:, :, None] & text[:, None, :]
    first = np.argmax(same, axis=2)
    resolved_rep = text & ~unresolved & (first == slot[None, :])
    rep_canonical = np.where(resolved_rep, canonical, -2)
    parent = np.full((num, k), -1, dtype=np.int64)
    for length in range(1, int(cand_len.max(initial=0))):
        shorter = text & (cand_len > length)
        if not shorter.any():
            continue
        ancestor = np.full((num, k), -1, dtype=np.int64)
        ancestor[shorter] = vocab.teacher_ids(truncate_hex(cand_key[shorter], length))
        match = (ancestor[:, :, None] == rep_canonical[:, None, :]) & (ancestor[:, :, None] >= 0)
        found = match.any(axis=2)
        parent = np.where(found, np.argmax(match, axis=2), parent)

    event = np.full((num, k), -1, dtype=np.int64)
    event = np.where(text & ~unresolved, first, event)
    event = np.where(text & unresolved, parent, event)
    event = np.where(is_end, k, event)
    num_events = k + 1

    def flat(p: np.ndarray, e: np.ndarray) -> np.ndarray:
        return p * num_events + e

    rank = vocab.rank
    p_idx, c_idx = np.nonzero(resolved_rep)
    par = parent[p_idx, c_idx]
    has_parent = par >= 0
    # Ranges (owned minus children's), and the exact token at a shared boundary.
    nonempty = lo[p_idx, c_idx] < hi[p_idx, c_idx]
    rp, rc = p_idx[nonempty], c_idx[nonempty]
    rq = queries.add(pos.row[rp], pos.col[rp], lo[rp, rc], hi[rp, rc], ell[rp] == 0)
    queries.term("event", [rq], 1.0, flat(rp, rc))
    with_parent = has_parent[nonempty]
    queries.term("event", [rq[with_parent]], -1.0, flat(rp[with_parent], parent[rp, rc][with_parent]))
    at_boundary = (ell[p_idx] == 0) & (exact[p_idx, c_idx] >= 0)
    ep, ec = p_idx[at_boundary], c_idx[at_boundary]
    e_rank = rank[exact[ep, ec]]
    eq = queries.add(pos.row[ep], pos.col[ep], e_rank, e_rank + 1, False)
    queries.term("event", [eq], 1.0, flat(ep, ec))

    # Chain rule along the sampled path.
    on_chain = chain[p_idx, c_idx]
    cp, cc = p_idx[on_chain], c_idx[on_chain]
    if cp.shape[0]:
        cpar = parent[cp, cc]
        s_rank = rank[pos.student_id[cp]]
        s_owner = ell[cp] > 0
        s_owner |= ~vocab.teacher_token[pos.student_id[cp]]
        safe_par = np.maximum(cpar, 0)
        s_owner |= extends_sample[cp, safe_par] | (key[cp, safe_par] == s_key[cp])
        subtract = (cpar >= 0) & s_owner
        factors = [queries.add(pos.row[cp], pos.col[cp], s_rank, s_rank + 1, False)]
        consumed = pos.student_len[cp].copy()
        alive = np.ones(cp.shape[0], dtype=bool)
        for d in range(max_chain):
            next_id = pos.chain_ids[cp, d]
            alive &= next_id >= 0
            if not alive.any():
                break
            rest = _drop_hex(key[cp, cc], consumed)
            r_lo, r_hi = vocab.prefix_ranges(rest)
            idx = np.flatnonzero(alive & (r_lo < r_hi))
            rq = queries.add(pos.row[cp[idx]], pos.chain_cols[cp[idx], d], r_lo[idx], r_hi[idx], False)
            chain_factors = [f[idx] for f in factors] + [rq]
            queries.term("event", chain_factors, 1.0, flat(cp[idx], cc[idx]))
            sub = subtract[idx]
            queries.term("event", [f[sub] for f in chain_factors], -1.0, flat(cp[idx][sub], cpar[idx][sub]))
            # Continue where the sampled next token ends inside what is left of the candidate.
            next_key = vocab.student_keys[np.maximum(next_id, 0)]
            next_len = pos.chain_lens[cp, d]
            rest_len = key_len[cp, cc] - consumed
            alive &= (next_len > 0) & (next_len < rest_len) & np.strings.startswith(rest, next_key)
            next_rank = rank[np.maximum(next_id, 0)]
            factors.append(queries.add(pos.row[cp], pos.chain_cols[cp, d], next_rank, next_rank + 1, False))
            consumed = consumed + next_len

    # The end event, at shared boundaries where the teacher has an end id among its candidates.
    end_ids = np.asarray([e for e in student_end_ids if 0 <= e < vocab.size], dtype=np.int64)
    end_pos = np.flatnonzero((ell == 0) & is_end.any(axis=1))
    if end_ids.shape[0] and end_pos.shape[0]:
        ep = np.repeat(end_pos, end_ids.shape[0])
        er = np.tile(rank[end_ids], end_pos.shape[0])
        eq = queries.add(pos.row[ep], pos.col[ep], er, er + 1, False)
        queries.term("event", [eq], 1.0, flat(ep, np.full_like(ep, k)))

    # Conditioning on the consumed bytes u: tokens at i that start with u and go beyond it.
    inside = np.flatnonzero(ell > 0)
    if inside.shape[0]:
        u_lo, u_hi = vocab.prefix_ranges(u_key[inside])
        uq = queries.add(pos.row[inside], pos.col[inside], u_lo, u_hi, False)
        queries.term("den", [uq], 1.0, position[inside])
        u_exact = vocab.exact_ids(u_key[inside], u_lo)
        has = u_exact >= 0
        x_rank = rank[u_exact[has]]
        xq = queries.add(pos.row[inside][has], pos.col[inside][has], x_rank, x_rank + 1, False)
        queries.term("den", [xq], -1.0, position[inside][has])
    return event


def _drop_hex(keys: np.ndarray, num_bytes: np.ndarray) -> np.ndarray:
    """Each hex key without its first ``num_bytes`` bytes."""
    keys = np.ascontiguousarray(keys)
    width = keys.dtype.itemsize
    if keys.size == 0:
        return keys.copy()
    chars = keys.view(np.uint8).reshape(keys.shape[0], width)
    shift = 2 * num_bytes
    gather = np.arange(width)[None, :] + shift[:, None]
    out = np.where(gather < width, chars[np.arange(keys.shape[0])[:, None], np.minimum(gather, width - 1)], 0)
    return np.ascontiguousarray(out.astype(np.uint8)).reshape(-1).view(keys.dtype)
