"""The byte projection's inputs built straight from byte strings: the independent reference of
:mod:`gold_plugin.signals.logit.byte_projection_inputs` (the production path gathers them from pair tables
instead; tests check that both give the same inputs). This was the production implementation until the tables
replaced it; it is kept as written, numpy over hex byte strings, slow (about 1 ms per teacher position).

Which student masses make up each teacher candidate:

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
from gold_plugin.signals.logit.byte_projection_inputs import DEFAULT_MAX_CHAIN, ProjectionInputs
from gold_plugin.signals.logit.topk import checked_topk
from gold_plugin.testing.prefix_hashes import PrefixHashes, PrefixLookups


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


def reference_projection_inputs(
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
    lookups: PrefixLookups | None = None,
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
        top_ids, top_lp = checked_topk(b, alignment, top_ids, top_lp)
        if (ids >= vocab.size).any():
            continue  # ids beyond the tokenizer (padded embedding rows): the text is unknown
        part = _sample_positions(b, alignment, ids, columns, top_ids, top_lp, max_chain)
        if part is not None:
            parts.append(part)
    lookups = lookups if lookups is not None else PrefixLookups.build(vocab)
    return _build(vocab, lookups, parts, action_mask.device, student_end_ids, teacher_end_ids, max_chain)


def _build(
    vocab: SortedVocab,
    lookups: PrefixLookups,
    parts: list[_Positions],
    device: torch.device,
    student_end_ids: Sequence[int],
    teacher_end_ids: Sequence[int],
    max_chain: int,
) -> ProjectionInputs:
    end_ranks = vocab.rank[np.asarray([e for e in student_end_ids if 0 <= e < vocab.size], dtype=np.int64)]
    if parts:
        pos = _concat_positions(parts)
        fields = _assemble(vocab, lookups, pos, end_ranks, teacher_end_ids, max_chain)
        fields.update(
            positions=np.stack([pos.row, pos.col], axis=1),
            sample_index=pos.row,
            consumed=pos.consumed,
            teacher_topk_logprobs=pos.top_logprobs,
        )
    else:
        empty, empty_k = np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
        fields = dict(
            positions=np.zeros((0, 2), np.int64),
            sample_index=empty,
            consumed=empty,
            teacher_event=empty_k,
            teacher_topk_logprobs=np.zeros((0, 0), np.float32),
            range_lo=empty_k,
            range_hi=empty_k,
            exact_rank=empty_k,
            parent=empty_k,
            chain_lo=np.zeros((0, 0, max_chain), np.int64),
            chain_hi=np.zeros((0, 0, max_chain), np.int64),
            chain_subtract=np.zeros((0, 0), bool),
            path_columns=np.zeros((0, max_chain), np.int64),
            path_ranks=np.zeros((0, max_chain + 1), np.int64),
            end_ranks=np.zeros((0, max(1, end_ranks.shape[0])), np.int64),
            condition_lo=empty,
            condition_hi=empty,
            condition_exact_rank=empty,
        )
    dtypes = {"teacher_topk_logprobs": torch.float32, "chain_subtract": torch.bool}
    return ProjectionInputs(
        **{
            name: torch.as_tensor(np.array(value), dtype=dtypes.get(name, torch.int64), device=device)
            for name, value in fields.items()
        }
    )


def _assemble(
    vocab: SortedVocab,
    lookups: PrefixLookups,
    pos: _Positions,
    end_ranks: np.ndarray,
    teacher_end_ids: Sequence[int],
    max_chain: int,
) -> dict[str, np.ndarray]:
    """The per-position fields of :class:`ProjectionInputs` (numpy), vectorised over positions and slots."""
    num, k = pos.top_ids.shape
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
    key_prefixes = PrefixHashes(key)
    for length in range(1, int(key_len[open_].max(initial=0))):
        active = open_ & (length > ell[:, None]) & (length < key_len)
        if not active.any():
            continue
        spelled = lookups.exact_ids(key_prefixes, length, active) >= 0
        # The sampled token itself does not count: a spelled prefix as long as s_i with s_i's bytes.
        check = spelled & (np.broadcast_to(s_len, key.shape)[active] == length)
        if check.any():
            at = np.flatnonzero(active)[check]
            sampled = truncate_hex(key.reshape(-1)[at], length) == s_key[at // k]
            spelled[np.flatnonzero(check)[sampled]] = False
        unresolved[active] |= spelled

    # Equal bytes (several teacher ids for one string) merge into the first slot; a candidate's parent is the
    # longest resolved candidate whose bytes are a proper prefix of its own (the keys share u).
    slot = np.arange(k)
    canonical = np.where(text, vocab.teacher_canonical[safe], -1)
    same = (canonical[:, :, None] == canonical[:, None, :]) & text[:, :, None] & text[:, None, :]
    first = np.argmax(same, axis=2)
    resolved_rep = text & ~unresolved & (first == slot[None, :])
    rep_canonical = np.where(resolved_rep, canonical, -2)
    parent = np.full((num, k), -1, dtype=np.int64)
    # (row, canonical id) of every resolved representative, sorted, for the slot of a row's ancestor.
    width = int(canonical.max(initial=0)) + 1
    rep_rows, rep_slots = np.nonzero(resolved_rep)
    rep_index = rep_rows * width + rep_canonical[rep_rows, rep_slots]
    by_index = np.argsort(rep_index, kind="stable")
    rep_index, rep_slots = rep_index[by_index], rep_slots[by_index]
    cand_prefixes = PrefixHashes(cand_key)
    for length in range(1, int(cand_len.max(initial=0))):
        shorter = text & (cand_len > length)
        if not shorter.any() or rep_index.shape[0] == 0:
            continue
        ancestor = lookups.teacher_ids(cand_prefixes, length, shorter)
        where = np.flatnonzero(shorter)[ancestor >= 0]
        wanted = (where // k) * width + ancestor[ancestor >= 0]
        at = np.minimum(np.searchsorted(rep_index, wanted), rep_index.shape[0] - 1)
        found = rep_index[at] == wanted
        parent.reshape(-1)[where[found]] = rep_slots[at[found]]

    event = np.full((num, k), -1, dtype=np.int64)
    event = np.where(text & ~unresolved, first, event)
    event = np.where(text & unresolved, parent, event)
    event = np.where(is_end, k, event)

    rank = vocab.rank
    range_lo = np.where(resolved_rep, lo, 0)
    range_hi = np.where(resolved_rep, hi, 0)
    exact_rank = np.where(resolved_rep & (ell[:, None] == 0) & (exact >= 0), rank[np.maximum(exact, 0)], -1)
    parent = np.where(resolved_rep, parent, -1)

    # Chain rule along the sampled path: the range at depth d is what is left of the key after the sampled
    # tokens i .. i + d; the path goes on while the sampled token ends inside what is left.
    chain &= resolved_rep
    chain_lo = np.zeros((num, k, max_chain), np.int64)
    chain_hi = np.zeros((num, k, max_chain), np.int64)
    cp, cc = np.nonzero(chain)
    if cp.shape[0]:
        consumed = pos.student_len[cp].copy()
        alive = np.ones(cp.shape[0], dtype=bool)
        for d in range(max_chain):
            next_id = pos.chain_ids[cp, d]
            alive &= next_id >= 0
            if not alive.any():
                break
            rest = _drop_hex(key[cp, cc], consumed)
            r_lo, r_hi = vocab.prefix_ranges(rest)
            chain_lo[cp, cc, d] = np.where(alive, r_lo, 0)
            chain_hi[cp, cc, d] = np.where(alive, r_hi, 0)
            next_len = pos.chain_lens[cp, d]
            alive &= (next_len > 0) & (next_len < key_len[cp, cc] - consumed)
            alive &= np.strings.startswith(rest, vocab.student_keys[np.maximum(next_id, 0)])
            consumed = consumed + next_len
    # The chain's mass is taken from the parent only where the parent owns the sampled token.
    safe_parent = np.maximum(parent, 0)
    rows = np.arange(num)[:, None]
    owns_sample = (
        (ell[:, None] > 0)
        | ~vocab.teacher_token[pos.student_id][:, None]
        | extends_sample[rows, safe_parent]
        | (key[rows, safe_parent] == s_key[:, None])
    )
    chain_subtract = chain & (parent >= 0) & owns_sample

    path_ids = np.concatenate([pos.student_id[:, None], pos.chain_ids], axis=1)
    path_ranks = np.where(path_ids >= 0, rank[np.maximum(path_ids, 0)], -1)

    # The end event, at shared boundaries where the teacher has an end id among its candidates.
    at_end = (ell == 0) & is_end.any(axis=1) & (end_ranks.shape[0] > 0)
    if end_ranks.shape[0] == 0:
        end_ranks = np.full(1, -1, dtype=np.int64)
    end = np.where(at_end[:, None], end_ranks[None, :], -1)

    # Conditioning on the consumed bytes u: tokens at i that start with u and go beyond it.
    inside = ell > 0
    c_lo, c_hi = vocab.prefix_ranges(u_key)
    c_exact = vocab.exact_ids(u_key, c_lo)
    return dict(
        teacher_event=np.where((event == k) & ~at_end[:, None], -1, event),
        range_lo=range_lo,
        range_hi=range_hi,
        exact_rank=exact_rank,
        parent=parent,
        chain_lo=chain_lo,
        chain_hi=chain_hi,
        chain_subtract=chain_subtract,
        path_columns=pos.chain_cols,
        path_ranks=path_ranks,
        end_ranks=end,
        condition_lo=np.where(inside, c_lo, 0),
        condition_hi=np.where(inside, c_hi, 0),
        condition_exact_rank=np.where(inside & (c_exact >= 0), rank[np.maximum(c_exact, 0)], -1),
    )


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
