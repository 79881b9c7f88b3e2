"""The byte projection's inputs built straight from byte strings: the independent reference of
:mod:`gold_plugin.signals.logit.byte_projection_inputs` (the production path gathers them from pair tables
instead; tests check that both give the same inputs). This was the production implementation of the per-candidate fields
until the tables replaced it; it is kept as written, numpy over hex byte strings, slow (about 1 ms per teacher
position). Where each teacher position sits on the student side is the production step 1, shared.

What the inputs mean (ranges, chain rule, remainder, end event): the docstring of
:mod:`gold_plugin.signals.logit.byte_projection_inputs` and docs/signals.md. Built on the CPU with numpy, vectorised
over all positions and candidates of a batch; Python loops run only over samples, candidate byte lengths and chain
depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.sorted_vocab import SortedVocab, truncate_hex
from gold_plugin.signals.logit.byte_projection_inputs import (
    DEFAULT_MAX_CHAIN,
    ProjectionInputs,
    ProjectionPositions,
    projection_positions,
)
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


def _positions(compact: ProjectionPositions, vocab: SortedVocab) -> _Positions | None:
    """Where each teacher position sits on the student side (the production step 1, shared: the reference is the
    per-candidate assembly below)."""
    if compact.num_positions == 0:
        return None
    path = compact.path_ids.numpy().astype(np.int64)
    chain_ids = path[:, 1:]
    return _Positions(
        row=compact.positions[:, 0].numpy().astype(np.int64),
        col=compact.positions[:, 1].numpy().astype(np.int64),
        student_id=path[:, 0],
        student_len=compact.student_length.numpy().astype(np.int64),
        consumed=compact.consumed.numpy().astype(np.int64),
        chain_ids=chain_ids,
        chain_cols=compact.path_columns.numpy().astype(np.int64),
        chain_lens=np.where(chain_ids >= 0, vocab.student_byte_lengths[np.maximum(chain_ids, 0)], 0),
        top_ids=compact.teacher_topk_ids.numpy().astype(np.int64),
        top_logprobs=compact.teacher_topk_logprobs.numpy(),
    )


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
    """:func:`~gold_plugin.signals.logit.byte_projection_inputs.projection_inputs`, assembled from byte strings."""
    compact = projection_positions(
        vocab,
        alignments,
        student_ids,
        teacher_topk_ids,
        teacher_topk_logprobs,
        action_mask,
        max_chain=max_chain,
    )
    lookups = lookups if lookups is not None else PrefixLookups.build(vocab)
    pos = _positions(compact, vocab)
    return _build(vocab, lookups, pos, action_mask.device, student_end_ids, teacher_end_ids, max_chain)


def _build(
    vocab: SortedVocab,
    lookups: PrefixLookups,
    pos: _Positions | None,
    device: torch.device,
    student_end_ids: Sequence[int],
    teacher_end_ids: Sequence[int],
    max_chain: int,
) -> ProjectionInputs:
    end_ranks = vocab.rank[np.asarray([e for e in student_end_ids if 0 <= e < vocab.size], dtype=np.int64)]
    if pos is not None:
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
