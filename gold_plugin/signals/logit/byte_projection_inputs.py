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
exactly that token's probability: the loss is the per-position matched loss (docs/signals.md).
Two steps, split where OpenRLHF's process boundary is (docs/signals.md, "Byte projection: where the work runs"):

1. :func:`projection_positions` (the experience maker, numpy, a few vectorised passes per sample): where each
   aligned teacher position sits on the student side, with the teacher's top-k: :class:`ProjectionPositions`,
   about ``8k + 50`` bytes per position;
2. :func:`expand_positions` (where the loss runs: the actor, on its device, torch): the per-candidate fields of
   :class:`ProjectionInputs`, gathered from the pair's tables
   (:func:`~gold_plugin.signals.logit.byte_projection_tables.projection_tables`), with hash probes only inside
   student tokens and along the chain rule. Python loops run over the steps of a binary search (candidate byte length),
   hash-probe rounds, parent-token depth and chain depth, never over positions or candidates.

:func:`projection_inputs` runs both. :mod:`gold_plugin.testing.reference_projection` builds the same inputs
straight from byte strings (the tests' reference).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.sorted_vocab import SortedVocab
from gold_plugin.signals.logit.byte_projection_tables import ProjectionTables, projection_tables
from gold_plugin.signals.logit.topk import checked_topk
from gold_plugin.signals.positions import PositionBatch

DEFAULT_MAX_CHAIN = 4


@dataclass
class ProjectionInputs(PositionBatch):
    """Everything :func:`~gold_plugin.signals.logit.byte_projection.projected_logit_loss` needs for a batch of P
    teacher positions.

    Every field is per position (first dimension P), so a batch can be split and merged by sample like
    :class:`~gold_plugin.signals.logit.vocab_hybrid_inputs.LogitLossInputs`. Sorted-vocabulary ranks and ranges
    refer to :class:`~gold_plugin.alignment.sorted_vocab.SortedVocab`; ``lo == hi`` is an empty range (no term).
    """

    positions: torch.Tensor
    """[P, 2] int64 (row, action column) of the student position i covering the teacher position."""
    sample_index: torch.Tensor
    """[P] int64: the row of each position, for per-sample reductions."""
    consumed: torch.Tensor
    """[P] int64: bytes of the student's token at i before the teacher position (0 = shared boundary)."""
    teacher_event: torch.Tensor
    """[P, k] int64: event of each teacher slot (candidate slot, ``k`` = end, -1 = remainder)."""
    teacher_topk_logprobs: torch.Tensor
    """[P, k] float32, -inf at padded slots."""
    range_lo: torch.Tensor
    range_hi: torch.Tensor
    """[P, k] int64: the student tokens at i that start with the candidate's key (untied at shared boundaries)."""
    exact_rank: torch.Tensor
    """[P, k] int64: sorted rank of the student token spelling the key, at shared boundaries (-1 = none)."""
    parent: torch.Tensor
    """[P, k] int64: the candidate slot this one's mass is taken from (-1 = none)."""
    chain_lo: torch.Tensor
    chain_hi: torch.Tensor
    """[P, k, D] int64: range at path depth d (the student position i + 1 + d) of the chain-rule terms."""
    chain_subtract: torch.Tensor
    """[P, k] bool: the chain terms are also taken from the parent."""
    path_columns: torch.Tensor
    """[P, D] int64: action columns of the sampled path after i (i + 1, ..., i + D)."""
    path_ranks: torch.Tensor
    """[P, D + 1] int64: sorted ranks of the sampled tokens at i, i + 1, ..., i + D (-1 = none)."""
    end_ranks: torch.Tensor
    """[P, M] int64: sorted ranks of the student's end ids whose mass at i is the end event (-1 = none)."""
    condition_lo: torch.Tensor
    condition_hi: torch.Tensor
    condition_exact_rank: torch.Tensor
    """[P] int64: where ``consumed > 0``, the conditioning mass is range minus the exact token (-1 = none)."""


@dataclass
class ProjectionPositions(PositionBatch):
    """The compact per-position data the experience maker ships; :func:`expand_positions` builds the rest.

    Every field is per position (first dimension P), like :class:`ProjectionInputs`.
    """

    positions: torch.Tensor
    """[P, 2] int64 (row, action column) of the student position i covering the teacher position."""
    sample_index: torch.Tensor
    """[P] int64: the row of each position."""
    consumed: torch.Tensor
    """[P] int32: bytes of the student's token at i before the teacher position (0 = shared boundary)."""
    student_length: torch.Tensor
    """[P] int32: bytes of the student's token at i in the alignment (its table length, less a dummy-prefix
    space the alignment dropped)."""
    path_ids: torch.Tensor
    """[P, D + 1] int32: student ids at i, i + 1, ..., i + D (-1 = past the response or outside every group)."""
    path_columns: torch.Tensor
    """[P, D] int32: action columns of i + 1, ..., i + D."""
    teacher_topk_ids: torch.Tensor
    """[P, k] int32 (-1 = padding)."""
    teacher_topk_logprobs: torch.Tensor
    """[P, k] float32 (-inf = padding)."""


# ── step 1: where each teacher position sits on the student side (experience maker) ──


def _sample_positions(
    b: int,
    alignment: Alignment,
    ids: np.ndarray,
    columns: np.ndarray,
    top_ids: np.ndarray,
    top_lp: np.ndarray,
    max_chain: int,
) -> dict[str, np.ndarray] | None:
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
    follow = i[:, None] + np.arange(1, max_chain + 1)[None, :]
    follow_c = np.minimum(follow, n - 1)
    inside = (follow < n) & (alignment.student_group[follow_c] >= 0)
    return dict(
        row=np.full(j.shape[0], b, dtype=np.int64),
        column=columns[i],
        consumed=consumed,
        student_length=s_len[i],
        path_ids=np.concatenate([ids[i][:, None], np.where(inside, ids[follow_c], -1)], axis=1),
        path_columns=columns[follow_c],
        top_ids=top_ids[j],
        top_logprobs=top_lp[j].astype(np.float32),
    )


def projection_positions(
    vocab: SortedVocab,
    alignments: Sequence[Alignment],
    student_ids: Sequence[np.ndarray | torch.Tensor | Sequence[int]],
    teacher_topk_ids: Sequence[np.ndarray | torch.Tensor | None],
    teacher_topk_logprobs: Sequence[np.ndarray | torch.Tensor | None],
    action_mask: torch.Tensor,
    *,
    max_chain: int = DEFAULT_MAX_CHAIN,
) -> ProjectionPositions:
    """Step 1 for a batch in OpenRLHF's layout (``action_mask[b, j]``: logits column j predicts action j).

    ``student_ids[b]`` are the response (action) ids of row b; ``alignments[b]`` must be a spans alignment of
    them with byte ends. Samples that are not aligned, have no teacher top-k or hold ids beyond the student's
    tokenizer (padded embedding rows: their text is unknown) contribute nothing. Raises ``ValueError`` naming
    the sample where an alignment does not match its ids, actions or teacher rows. Tensors on the CPU.
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
        top_ids, top_lp = checked_topk(b, alignment, top_ids, top_lp)
        if (ids >= vocab.size).any():
            continue
        part = _sample_positions(b, alignment, ids, columns, top_ids, top_lp, max_chain)
        if part is not None:
            parts.append(part)
    k = max((p["top_ids"].shape[1] for p in parts), default=0)

    widths = {
        "path_ids": (max_chain + 1,),
        "path_columns": (max_chain,),
        "top_ids": (k,),
        "top_logprobs": (k,),
    }

    def cat(name: str, fill: float = 0, dtype: type = np.int32) -> torch.Tensor:
        """One field of every part, concatenated (top-k rows padded to the widest ``k``)."""
        values = [p[name] for p in parts] or [np.zeros((0, *widths.get(name, ())), dtype)]
        if name.startswith("top_"):
            values = [np.pad(v, ((0, 0), (0, k - v.shape[1])), constant_values=fill) for v in values]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(values), dtype=dtype))

    rows = cat("row", dtype=np.int64)
    return ProjectionPositions(
        positions=torch.stack([rows, cat("column", dtype=np.int64)], dim=1),
        sample_index=rows,
        consumed=cat("consumed"),
        student_length=cat("student_length"),
        path_ids=cat("path_ids"),
        path_columns=cat("path_columns"),
        teacher_topk_ids=cat("top_ids", -1),
        teacher_topk_logprobs=cat("top_logprobs", -np.inf, np.float32),
    )


# ── step 2: the per-candidate fields, gathered from the pair's tables (where the loss runs) ──


def _deepest_nodes_inside(
    tables: ProjectionTables,
    teacher: torch.Tensor,
    length: torch.Tensor,
    consumed: torch.Tensor,
    u_node: torch.Tensor,
) -> torch.Tensor:
    """The deepest student node on ``u + b(c)`` for 1-D entries (``u`` = node ``u_node`` at depth ``consumed``):
    a search over how many bytes of ``b(c)`` still lead to a node (prefixes of nodes are nodes): one byte first
    (most candidates leave the trie there), then the whole key, then a binary search between."""
    lo_len = torch.zeros_like(length)
    hi_len = length.clone()
    node = u_node.clone()
    u_hash = (tables.node_h1[u_node], tables.node_h2[u_node])
    u_lo, u_hi = tables.node_lo[u_node], tables.node_hi[u_node]
    for probe in itertools.count():
        todo = (lo_len < hi_len).nonzero().reshape(-1)
        if todo.numel() == 0:
            return node
        if probe == 0:
            mid = torch.ones_like(todo)
        elif probe == 1:
            mid = hi_len[todo]
        else:
            mid = (lo_len[todo] + hi_len[todo] + 1) // 2
        key = tables.concat(
            (u_hash[0][todo], u_hash[1][todo]), tables.teacher_prefix_hash(teacher[todo], mid), mid
        )
        found = tables.find_nodes(key[0], key[1], consumed[todo] + mid)
        safe = found.clamp(min=0)
        ok = (found >= 0) & (tables.node_lo[safe] >= u_lo[todo]) & (tables.node_hi[safe] <= u_hi[todo])
        lo_len[todo] = torch.where(ok, mid, lo_len[todo])
        hi_len[todo] = torch.where(ok, hi_len[todo], mid - 1)
        node[todo] = torch.where(ok, found, node[todo])


def _byte_order(
    tables: ProjectionTables, teacher: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Every row's candidates sorted by bytes (one sort): ``(byte position [P, k], sorted slots [P, k], the sorted
    index where each sorted entry's run of equal bytes starts [P, k])``; non-text slots sort last."""
    num, k = teacher.shape
    position = torch.where(text, tables.teacher_order[teacher], tables.teacher_size)
    slots = torch.arange(k, device=teacher.device)
    sorted_key, order = torch.sort(position * k + slots, dim=1)
    sorted_position = sorted_key // k
    new_run = torch.ones_like(sorted_position, dtype=torch.bool)
    new_run[:, 1:] = sorted_position[:, 1:] != sorted_position[:, :-1]
    run_start = torch.cummax(torch.where(new_run, slots, 0), dim=1).values
    return position, order, run_start


def _parent_slots(
    tables: ProjectionTables,
    teacher: torch.Tensor,
    text: torch.Tensor,
    representative: torch.Tensor,
    byte_order: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``[P, k]``: the slot of the longest representative of the same row whose bytes are a proper prefix of the
    candidate's (-1 = none).

    In byte order a prefix comes before its extensions, and the representatives before candidate c that are not
    its prefixes end before c: so the answer is the last representative before c's run whose prefix run reaches
    past c, found by binary lifting over running maxima of the run ends (``log2 k`` gathers per row).
    """
    position, order, run_start = byte_order
    num, k = teacher.shape
    ends = torch.where(representative, tables.teacher_order_end[teacher], -1).gather(1, order)
    # before[c]: the last sorted index before c's run of equal bytes.
    before = torch.empty_like(order).scatter_(1, order, run_start - 1)
    index = torch.arange(k, device=teacher.device)
    maxima = [ends]  # maxima[t][j] = max(ends[max(0, j - 2^t + 1) .. j])
    while (1 << len(maxima)) <= k:
        step, previous = 1 << (len(maxima) - 1), maxima[-1]
        shifted = torch.cat([previous[:, :step], previous[:, :-step]], dim=1)
        maxima.append(torch.maximum(previous, torch.where(index >= step, shifted, previous)))
    current = before
    for level in range(len(maxima) - 1, -1, -1):
        skip = (current >= 0) & (maxima[level].gather(1, current.clamp(min=0)) <= position)
        current = torch.where(skip, current - (1 << level), current)
    found = text & (current >= 0)
    return torch.where(found, order.gather(1, current.clamp(min=0)), -1)


def _chain_ranges(
    tables: ProjectionTables,
    teacher: torch.Tensor,
    length: torch.Tensor,
    offset: torch.Tensor,
    next_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C, D]`` ranges of the chain-rule terms of C candidates: at depth d, the student tokens at i + 1 + d
    that start with what is left of ``b(c)`` after ``offset`` bytes and the sampled tokens i + 1 .. i + d; the
    path goes on while the sampled token ends inside what is left."""
    count, depth = next_ids.shape
    chain_lo = torch.zeros((count, depth), dtype=torch.int64, device=teacher.device)
    chain_hi = torch.zeros_like(chain_lo)
    whole = (tables.teacher_h1[teacher], tables.teacher_h2[teacher])
    live = torch.arange(count, device=teacher.device)
    offset = offset.clone()
    for d in range(depth):
        live = live[next_ids[live, d] >= 0]
        if live.numel() == 0:
            break
        c, o = teacher[live], offset[live]
        rest_length = length[live] - o
        head = tables.teacher_prefix_hash(c, o)
        rest = tables.strip((whole[0][live], whole[1][live]), head, rest_length)
        node = tables.find_nodes(rest[0], rest[1], rest_length)
        safe = node.clamp(min=0)
        chain_lo[live, d] = torch.where(node >= 0, tables.node_lo[safe], 0)
        chain_hi[live, d] = torch.where(node >= 0, tables.node_hi[safe], 0)
        nxt = next_ids[live, d]
        nxt_length = tables.student_length[nxt]
        inside = (nxt_length > 0) & (nxt_length < rest_length)
        piece = tables.strip(
            tables.teacher_prefix_hash(c, torch.minimum(o + nxt_length, length[live])), head, nxt_length
        )
        spelled = (piece[0] == tables.student_h1[nxt]) & (piece[1] == tables.student_h2[nxt])
        keep = inside & spelled
        offset[live] = o + nxt_length
        live = live[keep]
    return chain_lo, chain_hi


@dataclass
class _Candidates:
    """What step 2 reads of compact positions, and the per-candidate gathers from the teacher's tables."""

    ids: torch.Tensor
    """[P, k] int64 teacher ids (-1 = padding)."""
    path: torch.Tensor
    """[P, D + 1] int64 sampled student ids at i, i + 1, ..., i + D (-1 = none)."""
    consumed: torch.Tensor
    """[P] int64: bytes ``l`` of the sampled token at i before the teacher position."""
    student_length: torch.Tensor
    """[P, 1] int64: bytes of the sampled token at i in the alignment."""
    teacher: torch.Tensor
    """[P, k] int64: the teacher id where it is in the tables, else 0."""
    text: torch.Tensor
    """[P, k] bool: a text candidate (in the tables, not special, not empty)."""
    length: torch.Tensor
    """[P, k] int64: the candidate's byte length (0 for non-text)."""
    is_end: torch.Tensor
    """[P, k] bool: one of the teacher's end ids."""

    @property
    def sampled(self) -> torch.Tensor:
        """[P] the sampled student id at i."""
        return self.path[:, 0]

    @property
    def inside(self) -> torch.Tensor:
        """[P] bool: the teacher position is inside the sampled token (not a shared boundary)."""
        return self.consumed > 0

    @property
    def key_length(self) -> torch.Tensor:
        """[P, k] byte length of the key ``u + b(c)``."""
        return self.consumed[:, None] + self.length


def _candidates(
    tables: ProjectionTables, positions: ProjectionPositions, teacher_end_ids: Sequence[int]
) -> _Candidates:
    ids = positions.teacher_topk_ids.to(torch.int64)
    in_table = (ids >= 0) & (ids < tables.teacher_size)
    teacher = torch.where(in_table, ids, 0)
    text = in_table & tables.teacher_text[teacher]
    end_ids = torch.as_tensor(list(teacher_end_ids), dtype=torch.int64, device=ids.device)
    return _Candidates(
        ids=ids,
        path=positions.path_ids.to(torch.int64),
        consumed=positions.consumed.to(torch.int64),
        student_length=positions.student_length.to(torch.int64)[:, None],
        teacher=teacher,
        text=text,
        length=torch.where(text, tables.teacher_length[teacher], 0),
        is_end=(ids >= 0) & torch.isin(ids, end_ids),
    )


@dataclass
class _KeyNodes:
    """Where each key ``u + b(c)`` meets the student trie."""

    u_node: torch.Tensor
    """[P] the node of ``u`` (the consumed bytes of the sampled token; the root at a shared boundary)."""
    deep: torch.Tensor
    """[P, k] the deepest student node on the key."""
    lo: torch.Tensor
    hi: torch.Tensor
    """[P, k] the sorted range of the student tokens that start with the key (``(0, 0)`` = none)."""
    exact: torch.Tensor
    """[P, k] the student id spelling the key exactly (-1 = none)."""


def _key_nodes(tables: ProjectionTables, cand: _Candidates) -> _KeyNodes:
    """The deepest student node on key = u + b(c): from the table at shared boundaries, by binary search inside."""
    inside, ell = cand.inside, cand.consumed
    u_node = torch.where(
        inside, tables.student_prefix_node[(tables.student_offset[cand.sampled] + ell - 1).clamp(min=0)], 0
    )
    deep = tables.teacher_node[cand.teacher]
    rows_in, cols_in = (cand.text & inside[:, None]).nonzero(as_tuple=True)
    if rows_in.numel():
        deep[rows_in, cols_in] = _deepest_nodes_inside(
            tables,
            cand.teacher[rows_in, cols_in],
            cand.length[rows_in, cols_in],
            ell[rows_in],
            u_node[rows_in],
        )
    is_node = cand.text & (tables.node_depth[deep] == cand.key_length)
    return _KeyNodes(
        u_node=u_node,
        deep=deep,
        lo=torch.where(is_node, tables.node_lo[deep], 0),
        hi=torch.where(is_node, tables.node_hi[deep], 0),
        exact=torch.where(is_node, tables.node_exact[deep], -1),
    )


def _sampled_token_terms(
    tables: ProjectionTables, cand: _Candidates, nodes: _KeyNodes
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[P, k]`` bool each: the key extends the sampled token ``s_i``; the candidate takes the chain rule; its
    mass cannot be computed (unresolved)."""
    s_len, sampled, deep = cand.student_length, cand.sampled, nodes.deep
    # The key extends the sampled token s_i (s_i's node is an ancestor of the key's deepest node).
    s_table_len = tables.student_length[sampled][:, None]
    s_node = tables.student_prefix_node[(tables.student_offset[sampled] + s_table_len[:, 0] - 1).clamp(min=0)]
    extends_sample = (
        cand.text
        & (s_len > 0)
        & (s_table_len > 0)
        & (cand.key_length > s_len)
        & (tables.node_depth[deep] >= s_table_len)
        & (tables.node_lo[s_node][:, None] <= tables.node_lo[deep])
        & (tables.node_hi[deep] <= tables.node_hi[s_node][:, None])
    )
    chain = extends_sample & (nodes.exact < 0)
    # A key that is no student token but has a proper prefix beyond u that is one (other than s_i) cannot be
    # computed: counted by the trie's running count of student tokens among a node's prefixes.
    open_ = cand.text & (nodes.exact < 0)
    spelled = tables.node_count[deep] - tables.node_count[nodes.u_node][:, None]
    spelled = spelled - (extends_sample & (s_len == s_table_len)).to(torch.int64)
    unresolved = (chain & (cand.path[:, 1:2] < 0)) | (open_ & (spelled > 0))
    return extends_sample, chain, unresolved


def _events(
    tables: ProjectionTables, cand: _Candidates, unresolved: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(event [P, k], resolved representative [P, k] bool, parent slot [P, k])``: equal bytes merge into the
    first slot; a candidate's parent is the longest resolved representative of its row whose bytes are a proper
    prefix of its own; an unresolved candidate's teacher mass goes to its parent; end ids are event ``k``."""
    k = cand.ids.shape[1]
    text = cand.text
    byte_order = _byte_order(tables, cand.teacher, text)
    _, order, run_start = byte_order
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, run_start))
    resolved_rep = text & ~unresolved & (first == torch.arange(k, device=order.device)[None, :])
    parent = _parent_slots(tables, cand.teacher, text, resolved_rep, byte_order)
    event = torch.full(cand.ids.shape, -1, dtype=torch.int64, device=order.device)
    event = torch.where(text & ~unresolved, first, event)
    event = torch.where(text & unresolved, parent, event)
    event = torch.where(cand.is_end, k, event)
    return event, resolved_rep, parent


def _chain_fields(
    tables: ProjectionTables,
    cand: _Candidates,
    chain: torch.Tensor,
    parent: torch.Tensor,
    extends_sample: torch.Tensor,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chain_lo, chain_hi [P, k, D], chain_subtract [P, k])`` of the candidates that take the chain rule."""
    num, k = chain.shape
    chain_lo = torch.zeros((num, k, depth), dtype=torch.int64, device=chain.device)
    chain_hi = torch.zeros_like(chain_lo)
    cp, cc = chain.nonzero(as_tuple=True)
    if cp.numel():
        chain_lo[cp, cc], chain_hi[cp, cc] = _chain_ranges(
            tables,
            cand.teacher[cp, cc],
            cand.length[cp, cc],
            cand.student_length[cp, 0] - cand.consumed[cp],
            cand.path[cp, 1:],
        )
    # The chain's mass is taken from the parent only where the parent owns the sampled token.
    safe_parent = parent.clamp(min=0)
    sampled_teacher = tables.student_teacher[cand.sampled][:, None]
    canonical = torch.where(cand.text, tables.teacher_canonical[cand.teacher], -2)
    owns_sample = (
        cand.inside[:, None]
        | (sampled_teacher < 0)
        | extends_sample.gather(1, safe_parent)
        | (canonical.gather(1, safe_parent) == sampled_teacher)
    )
    return chain_lo, chain_hi, chain & (parent >= 0) & owns_sample


def _end_fields(
    cand: _Candidates, event: torch.Tensor, end_ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(teacher_event [P, k], end_ranks [P, M])``: the end event only at shared boundaries where the teacher has
    an end candidate and the student an end id; elsewhere the teacher's end slots join the remainder."""
    k = cand.ids.shape[1]
    at_end = ~cand.inside & cand.is_end.any(dim=1) & (end_ranks.shape[0] > 0)
    if end_ranks.shape[0] == 0:
        end_ranks = torch.full((1,), -1, dtype=torch.int64, device=event.device)
    return (
        torch.where((event == k) & ~at_end[:, None], -1, event),
        torch.where(at_end[:, None], end_ranks[None, :], -1),
    )


def _empty_inputs(positions: ProjectionPositions, num_end_ranks: int) -> ProjectionInputs:
    """The inputs of a batch without positions (the widths kept)."""
    device = positions.teacher_topk_ids.device
    k, depth = positions.teacher_topk_ids.shape[1], positions.path_columns.shape[1]
    long = {"dtype": torch.int64, "device": device}
    empty, empty_k = torch.zeros(0, **long), torch.zeros((0, k), **long)
    return ProjectionInputs(
        positions=positions.positions.to(torch.int64),
        sample_index=positions.sample_index.to(torch.int64),
        consumed=empty,
        teacher_event=empty_k,
        teacher_topk_logprobs=positions.teacher_topk_logprobs.to(torch.float32),
        range_lo=empty_k,
        range_hi=empty_k,
        exact_rank=empty_k,
        parent=empty_k,
        chain_lo=torch.zeros((0, k, depth), **long),
        chain_hi=torch.zeros((0, k, depth), **long),
        chain_subtract=torch.zeros((0, k), dtype=torch.bool, device=device),
        path_columns=positions.path_columns.to(torch.int64),
        path_ranks=torch.zeros((0, depth + 1), **long),
        end_ranks=torch.zeros((0, max(1, num_end_ranks)), **long),
        condition_lo=empty,
        condition_hi=empty,
        condition_exact_rank=empty,
    )


def expand_positions(
    tables: ProjectionTables,
    positions: ProjectionPositions,
    *,
    student_end_ids: Sequence[int] = (),
    teacher_end_ids: Sequence[int] = (),
) -> ProjectionInputs:
    """Step 2: the :class:`ProjectionInputs` of ``positions``, on their device (``tables`` on the same device).

    Equal, field by field, to the reference built from byte strings
    (:func:`gold_plugin.testing.reference_projection.reference_projection_inputs`), except that an empty range
    is written ``(0, 0)`` wherever the reference writes its insertion point (both mean no term).

    The steps: the candidates' table gathers (:func:`_candidates`), the deepest student node on each key
    (:func:`_key_nodes`), the candidates that extend the sampled token (:func:`_sampled_token_terms`), the events
    and parents (:func:`_events`), the chain-rule ranges (:func:`_chain_fields`) and the end event
    (:func:`_end_fields`).
    """
    device = positions.teacher_topk_ids.device
    rank = tables.student_rank
    end_ids = [e for e in student_end_ids if 0 <= e < tables.student_size]
    end_ranks = rank[torch.as_tensor(end_ids, dtype=torch.int64, device=device)]
    if positions.teacher_topk_ids.shape[0] == 0:
        return _empty_inputs(positions, end_ranks.shape[0])
    cand = _candidates(tables, positions, teacher_end_ids)
    nodes = _key_nodes(tables, cand)
    extends_sample, chain, unresolved = _sampled_token_terms(tables, cand, nodes)
    event, resolved_rep, parent = _events(tables, cand, unresolved)
    parent = torch.where(resolved_rep, parent, -1)
    chain_lo, chain_hi, chain_subtract = _chain_fields(
        tables, cand, chain & resolved_rep, parent, extends_sample, positions.path_columns.shape[1]
    )
    teacher_event, end_ranks = _end_fields(cand, event, end_ranks)
    inside, u_node, exact = cand.inside, nodes.u_node, nodes.exact
    return ProjectionInputs(
        positions=positions.positions.to(torch.int64),
        sample_index=positions.sample_index.to(torch.int64),
        consumed=cand.consumed,
        teacher_event=teacher_event,
        teacher_topk_logprobs=positions.teacher_topk_logprobs.to(torch.float32),
        range_lo=torch.where(resolved_rep, nodes.lo, 0),
        range_hi=torch.where(resolved_rep, nodes.hi, 0),
        exact_rank=torch.where(resolved_rep & ~inside[:, None] & (exact >= 0), rank[exact.clamp(min=0)], -1),
        parent=parent,
        chain_lo=chain_lo,
        chain_hi=chain_hi,
        chain_subtract=chain_subtract,
        path_columns=positions.path_columns.to(torch.int64),
        path_ranks=torch.where(cand.path >= 0, rank[cand.path.clamp(min=0)], -1),
        end_ranks=end_ranks,
        condition_lo=torch.where(inside, tables.node_lo[u_node], 0),
        condition_hi=torch.where(inside, tables.node_hi[u_node], 0),
        condition_exact_rank=torch.where(
            inside & (tables.node_exact[u_node] >= 0), rank[tables.node_exact[u_node].clamp(min=0)], -1
        ),
    )


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
    """Both steps in one call (:func:`projection_positions`, then :func:`expand_positions`), on
    ``action_mask``'s device."""
    compact = projection_positions(
        vocab,
        alignments,
        student_ids,
        teacher_topk_ids,
        teacher_topk_logprobs,
        action_mask,
        max_chain=max_chain,
    )
    device = action_mask.device
    return expand_positions(
        projection_tables(vocab).to(device),
        compact.to(device),
        student_end_ids=student_end_ids,
        teacher_end_ids=teacher_end_ids,
    )
