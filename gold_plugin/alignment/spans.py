"""Span groups between two tokenisations of the same response text (docs/design.md, "Span groups"), vectorised with numpy.

A shared boundary is a byte position (> 0) where both sides end a token; group g holds the tokens of each
side between shared boundaries g-1 and g. Per token: ``group = searchsorted(shared, end)`` (zero-width tokens
use the right side, so they join the *next* group). Bytes after the last shared boundary are masked. The
student's final zero-width token (EOS) and the teacher's final zero-width token (end-of-turn) form a group of
their own when the whole text is aligned (``pair_eos=True``), otherwise they are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.token_bytes import (
    TokenizerOrTable,
    TokenTable,
    hash_powers,
    incomplete_utf8_tail_length,
    token_table,
)
from gold_plugin.alignment.types import TokenIds

AlignMode = Literal["spans", "positional"]
_CHUNK_TOKENS = 1 << 16


def align(
    student_tokenizer: TokenizerOrTable,
    student_ids: TokenIds,
    teacher_tokenizer: TokenizerOrTable,
    teacher_ids: TokenIds,
    *,
    pair_eos: bool = True,
    mode: AlignMode = "spans",
    allow_teacher_prefix: bool = False,
) -> Alignment:
    """Align the student's response ids with the teacher's ids of the same text.

    ``mode="spans"``: byte-span groups (see module docstring); the bytes of group g are identical on both
    sides. The teacher's bytes must equal the student's, except that (a) they may lack a trailing incomplete
    UTF-8 character of the student's (a response cut inside a character), (b) either side may carry the
    dummy-prefix space its SentencePiece tokenizer adds, and (c) with ``allow_teacher_prefix`` the teacher may
    cover only a prefix of the student's bytes (teacher context too short). Any other mismatch, or an id out
    of a tokenizer's range, gives ``Alignment.unalignable`` with a reason; this function never raises for a
    bad sample. ``mode="positional"``: ULD's baseline, pair token i with token i up to the shorter length.
    """
    s_ids = _as_id_array(student_ids)
    t_ids = _as_id_array(teacher_ids)
    if mode == "positional":
        return _positional(s_ids.size, t_ids.size)
    if mode != "spans":
        raise ValueError(f"Unknown alignment mode {mode!r}; choose 'spans' or 'positional'.")
    return _align_spans(
        token_table(student_tokenizer),
        s_ids,
        token_table(teacher_tokenizer),
        t_ids,
        pair_eos=pair_eos,
        allow_teacher_prefix=allow_teacher_prefix,
    )


def align_batch(
    student_tokenizer: TokenizerOrTable,
    student_ids: Sequence[TokenIds],
    teacher_tokenizer: TokenizerOrTable,
    teacher_ids: Sequence[TokenIds],
    *,
    pair_eos: bool = True,
    mode: AlignMode = "spans",
    allow_teacher_prefix: bool = False,
) -> list[Alignment]:
    """:func:`align` for every sample of a batch (lists of per-sample id sequences, unpadded)."""
    if len(student_ids) != len(teacher_ids):
        raise ValueError(
            f"align_batch got {len(student_ids)} student samples but {len(teacher_ids)} teacher samples."
        )
    if mode == "positional":
        return [_positional(len(s), len(t)) for s, t in zip(student_ids, teacher_ids, strict=True)]
    if mode != "spans":
        raise ValueError(f"Unknown alignment mode {mode!r}; choose 'spans' or 'positional'.")
    s_table, t_table = token_table(student_tokenizer), token_table(teacher_tokenizer)
    s_arrays = [_as_id_array(x) for x in student_ids]
    t_arrays = [_as_id_array(x) for x in teacher_ids]
    # Chunks of about _CHUNK_TOKENS tokens keep the working arrays in cache (faster than one huge pass).
    out: list[Alignment] = []
    start = tokens = 0
    for end, ids in enumerate(s_arrays, 1):
        tokens += ids.size
        if tokens >= _CHUNK_TOKENS or end == len(s_arrays):
            out += _align_spans_batch(
                s_table,
                s_arrays[start:end],
                t_table,
                t_arrays[start:end],
                pair_eos=pair_eos,
                allow_teacher_prefix=allow_teacher_prefix,
            )
            start, tokens = end, 0
    return out


def group_starts(alignment: Alignment) -> tuple[np.ndarray, np.ndarray]:
    """Index of the first token of each group on each side: ``(student_first, teacher_first)``, ``[num_groups]``.

    The first token carrying bytes is chosen (a zero-width token that joined the group, such as a BOS, is
    skipped), so at these positions both models predict the next bytes after the same text. A group of
    zero-width tokens only (the final EOS / end-of-turn pair) gives its last token: the EOS itself.
    Alignments without byte ends (positional mode, hand-built ones) give each group's first token.
    """
    return (
        _first_of_groups(alignment.student_group, alignment.student_ends, alignment.num_groups),
        _first_of_groups(alignment.teacher_group, alignment.teacher_ends, alignment.num_groups),
    )


def _first_of_groups(groups: np.ndarray, ends: np.ndarray | None, num_groups: int) -> np.ndarray:
    first = np.full(num_groups, -1, dtype=np.int64)
    if num_groups == 0:
        return first
    valid = groups >= 0
    if ends is None:
        _fill_edge(first, groups, np.flatnonzero(valid))
        return first
    _fill_edge(first, groups, np.flatnonzero(valid & (np.diff(ends, prepend=0) > 0)))
    if (first < 0).any():
        _fill_edge(first, groups, np.flatnonzero(valid), last=True, only_missing=True)
    return first


def _fill_edge(
    out: np.ndarray,
    groups: np.ndarray,
    candidates: np.ndarray,
    last: bool = False,
    only_missing: bool = False,
) -> None:
    """``out[g]`` = the first (or last) of ``candidates`` in group g (groups are non-decreasing)."""
    if candidates.size == 0:
        return
    g = groups[candidates]
    edge = np.ones(g.size, dtype=bool)
    if last:
        np.not_equal(g[:-1], g[1:], out=edge[:-1])
    else:
        np.not_equal(g[1:], g[:-1], out=edge[1:])
    g, idx = g[edge], candidates[edge]
    if only_missing:
        keep = out[g] < 0
        g, idx = g[keep], idx[keep]
    out[g] = idx


def _positional(num_student: int, num_teacher: int) -> Alignment:
    n = min(num_student, num_teacher)
    student_group = np.full(num_student, -1, dtype=np.int64)
    teacher_group = np.full(num_teacher, -1, dtype=np.int64)
    student_group[:n] = np.arange(n)
    teacher_group[:n] = np.arange(n)
    return Alignment(student_group=student_group, teacher_group=teacher_group, num_groups=n)


def _describe_mismatch(s_bytes: bytes, t_bytes: bytes) -> str:
    n = min(len(s_bytes), len(t_bytes))
    diff = np.flatnonzero(np.frombuffer(s_bytes[:n], np.uint8) != np.frombuffer(t_bytes[:n], np.uint8))
    at = int(diff[0]) if diff.size else n
    return (
        f"student bytes ({len(s_bytes)}) != teacher bytes ({len(t_bytes)}), first difference at byte {at}: "
        f"student {s_bytes[max(0, at - 8) : at + 8]!r} vs teacher {t_bytes[max(0, at - 8) : at + 8]!r}"
    )


def _covers(s_bytes: bytes, t_bytes: bytes, allow_teacher_prefix: bool) -> bool:
    """Whether teacher bytes are acceptable for these student bytes (equal, or an allowed shorter prefix)."""
    if s_bytes == t_bytes:
        return True
    if len(t_bytes) >= len(s_bytes) or not s_bytes.startswith(t_bytes):
        return False
    return allow_teacher_prefix or len(s_bytes) - len(t_bytes) == incomplete_utf8_tail_length(s_bytes)


def _align_spans(
    s_table: TokenTable,
    s_ids: np.ndarray,
    t_table: TokenTable,
    t_ids: np.ndarray,
    *,
    pair_eos: bool,
    allow_teacher_prefix: bool,
) -> Alignment:
    """One sample, exact bytes comparison with the tolerances (also the fallback of the batched path)."""
    n_s, n_t = s_ids.size, t_ids.size
    for side, ids, table in (("student", s_ids, s_table), ("teacher", t_ids, t_table)):
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            bad = int(ids[(ids < 0) | (ids >= len(table))][0])
            return Alignment.unalignable(
                n_s,
                n_t,
                f"{side} token id {bad} is outside the vocabulary of {table.name!r} ({len(table)} ids)",
            )
    s_tb, t_tb = s_table.token_bytes, t_table.token_bytes
    s_bytes = b"".join([s_tb[i] for i in s_ids.tolist()])
    t_bytes = b"".join([t_tb[i] for i in t_ids.tolist()])

    s_shift = t_shift = 0
    if not _covers(s_bytes, t_bytes, allow_teacher_prefix):
        # A SentencePiece dummy-prefix space on one side only (plain encode of a text without a leading space).
        if (
            t_table.adds_prefix_space
            and t_bytes[:1] == b" "
            and _covers(s_bytes, t_bytes[1:], allow_teacher_prefix)
        ):
            t_shift = 1
        elif (
            s_table.adds_prefix_space
            and s_bytes[:1] == b" "
            and _covers(s_bytes[1:], t_bytes, allow_teacher_prefix)
        ):
            s_shift = 1
        else:
            return Alignment.unalignable(n_s, n_t, _describe_mismatch(s_bytes, t_bytes))

    s_ends = np.cumsum(s_table.byte_lengths[s_ids])
    t_ends = np.cumsum(t_table.byte_lengths[t_ids])
    if s_shift:
        s_ends = np.maximum(s_ends - s_shift, 0)
    if t_shift:
        t_ends = np.maximum(t_ends - t_shift, 0)
    s_total = len(s_bytes) - s_shift
    t_total = len(t_bytes) - t_shift

    shared = _shared_boundaries(s_ends, t_ends)
    num_groups = int(shared.size)
    student_group = _assign(s_ends, shared)
    teacher_group = _assign(t_ends, shared)

    complete = s_total == t_total and (
        num_groups == 0 and s_total == 0 or num_groups and shared[-1] == s_total
    )
    if (
        pair_eos
        and complete
        and n_s
        and n_t
        and _is_zero_width_last(s_ends, s_total)
        and _is_zero_width_last(t_ends, t_total)
    ):
        num_groups += 1  # the tail zero-width tokens (final EOS / end-of-turn) already carry this group id
    else:
        student_group[student_group >= num_groups] = -1
        teacher_group[teacher_group >= num_groups] = -1
    return Alignment(
        student_group=student_group,
        teacher_group=teacher_group,
        num_groups=num_groups,
        student_ends=s_ends,
        teacher_ends=t_ends,
    )


def _as_id_array(ids: TokenIds) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        array = ids.astype(np.int64, copy=False)
    elif hasattr(ids, "detach"):  # torch tensor
        array = ids.detach().cpu().numpy().astype(np.int64, copy=False)
    else:
        array = np.asarray(ids, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"Token ids of one sample must be 1-D, got shape {array.shape}; pass unpadded rows.")
    return array


def _align_spans_batch(
    s_table: TokenTable,
    s_arrays: list[np.ndarray],
    t_table: TokenTable,
    t_arrays: list[np.ndarray],
    *,
    pair_eos: bool,
    allow_teacher_prefix: bool,
) -> list[Alignment]:
    """Vectorised over the whole batch: a few numpy passes over the concatenated tokens of each side.

    Samples whose bytes are not exactly equal (cut inside a character, dummy-prefix space, a mismatch) and
    samples with out-of-range ids go through the per-sample path, which applies the tolerances or gives
    ``Alignment.unalignable``.
    """
    num = len(s_arrays)
    if num == 0:
        return []
    s = _Side(s_table, s_arrays)
    t = _Side(t_table, t_arrays)

    # Bytes check. Equal lengths: 64-bit polynomial hashes of both sides (vectorised over tokens, no bytes).
    differs = s.bad | t.bad | (t.total > s.total)
    complete = s.total == t.total
    same = complete & ~differs
    if same.any():
        differs |= same & (s.sample_hashes() != t.sample_hashes())
    # Teacher shorter than the student (rare): exact bytes. Allowed when the student's extra bytes are an
    # incomplete UTF-8 character (a response cut inside it), or any prefix with allow_teacher_prefix.
    for i in np.flatnonzero(~differs & (t.total < s.total)).tolist():
        differs[i] = not _covers(s.sample_bytes(i), t.sample_bytes(i), allow_teacher_prefix)
    fast = ~differs

    # A token ends at a shared boundary when the other side also ends a token with bytes there: two bitmap
    # lookups over global byte positions (linear, no sort or binary search). Samples are laid end to end on
    # the student's byte axis; positions of tokens with bytes increase strictly, so samples never collide.
    if fast.all() and complete.all():
        s_pos, t_pos = s.cum, t.cum  # same totals everywhere: both cumulative axes coincide
        s_keep, t_keep = s.width > 0, t.width > 0
    else:
        base = np.concatenate([[0], np.cumsum(s.total[:-1])])
        s_pos = s.local + np.repeat(base, s.counts)
        t_pos = t.local + np.repeat(base, t.counts)
        s_keep = (s.width > 0) & np.repeat(fast, s.counts)
        t_keep = (t.width > 0) & np.repeat(fast, t.counts)
    size = max(int(s_pos.max(initial=0)), int(t_pos.max(initial=0))) + 1  # non-fast samples may overrun
    bitmap = np.zeros(size, dtype=bool)
    bitmap[t_pos[t_keep]] = True
    s_shared = bitmap[s_pos] & s_keep
    bitmap[:] = False
    bitmap[s_pos[s_keep]] = True
    t_shared = bitmap[t_pos] & t_keep

    # Group of a token = shared boundaries strictly before it on its side: zero-width tokens thereby join the
    # next group, and tokens after the last shared boundary get num_shared (the EOS group, or masked).
    s_group, num_shared = s.exclusive_counts(s_shared)
    t_group, _ = t.exclusive_counts(t_shared)
    eos_pair = np.zeros(num, dtype=bool)
    if pair_eos:
        # Final EOS / end-of-turn pair: the last token is zero-width on both sides of a complete sample.
        eos_pair = s.last_is_zero_width() & t.last_is_zero_width() & complete
    num_groups = num_shared + eos_pair
    s_group[s_group >= np.repeat(num_groups, s.counts)] = -1
    t_group[t_group >= np.repeat(num_groups, t.counts)] = -1

    s_bounds, t_bounds = s.offsets.tolist(), t.offsets.tolist()
    groups_count = num_groups.tolist()
    out = []
    for i, is_fast in enumerate(fast.tolist()):
        if is_fast:
            s_lo, s_hi, t_lo, t_hi = s_bounds[i], s_bounds[i + 1], t_bounds[i], t_bounds[i + 1]
            out.append(
                Alignment(
                    student_group=s_group[s_lo:s_hi],
                    teacher_group=t_group[t_lo:t_hi],
                    num_groups=groups_count[i],
                    student_ends=s.local[s_lo:s_hi],
                    teacher_ends=t.local[t_lo:t_hi],
                )
            )
        else:
            out.append(
                _align_spans(
                    s_table,
                    s_arrays[i],
                    t_table,
                    t_arrays[i],
                    pair_eos=pair_eos,
                    allow_teacher_prefix=allow_teacher_prefix,
                )
            )
    return out


class _Side:
    """One side's tokens of a whole batch, concatenated: widths, cumulative byte ends, per-sample totals."""

    def __init__(self, table: TokenTable, arrays: list[np.ndarray]) -> None:
        self.table = table
        num = len(arrays)
        self.counts = np.fromiter((a.size for a in arrays), dtype=np.int64, count=num)
        self.offsets = np.zeros(num + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        flat = np.concatenate(arrays) if num else np.empty(0, dtype=np.int64)
        self.bad = np.zeros(num, dtype=bool)
        if flat.size and (flat.min() < 0 or flat.max() >= len(table)):
            out_of_range = (flat < 0) | (flat >= len(table))
            self.bad[np.repeat(np.arange(num), self.counts)[out_of_range]] = True
            flat = np.where(out_of_range, 0, flat)
        self.flat = flat
        self.width = table.byte_lengths[flat]
        self.cum = np.cumsum(self.width)
        self.before = np.concatenate([[0], self.cum])[
            self.offsets
        ]  # bytes before each sample, then the total
        self.total = np.diff(self.before)
        self.local = self.cum - np.repeat(
            self.before[:-1], self.counts
        )  # byte end of each token in its sample

    def sample_hashes(self) -> np.ndarray:
        """``uint64 [num_samples]``: polynomial hash of each sample's bytes (see ``TokenTable.poly_hash``)."""
        powers = hash_powers(int(self.local.max(initial=0)) + 1)
        contribution = self.table.poly_hash[self.flat] * powers[self.local - self.width]
        cumulative = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(contribution)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def sample_bytes(self, i: int) -> bytes:
        token_bytes = self.table.token_bytes
        return b"".join([token_bytes[x] for x in self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()])

    def exclusive_counts(self, marked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per token: marked tokens before it in its sample; per sample: marked tokens in it."""
        cumulative = np.concatenate([[0], np.cumsum(marked)])
        at_start = cumulative[self.offsets]
        return cumulative[:-1] - np.repeat(at_start[:-1], self.counts), np.diff(at_start)

    def last_is_zero_width(self) -> np.ndarray:
        out = np.zeros(self.counts.size, dtype=bool)
        nonempty = self.counts > 0
        out[nonempty] = self.width[self.offsets[1:][nonempty] - 1] == 0
        return out


def _is_zero_width_last(ends: np.ndarray, total: int) -> bool:
    previous = ends[-2] if ends.size > 1 else 0
    return bool(ends[-1] == previous and ends[-1] == total)


def _shared_boundaries(s_ends: np.ndarray, t_ends: np.ndarray) -> np.ndarray:
    """Sorted byte positions > 0 where both sides end a token (both inputs are sorted, non-decreasing)."""
    return _intersect_sorted(s_ends[s_ends > 0], t_ends[t_ends > 0])


def _intersect_sorted(s_pos: np.ndarray, t_pos: np.ndarray) -> np.ndarray:
    """Unique values present in both sorted arrays (searchsorted instead of intersect1d's sort)."""
    if s_pos.size == 0 or t_pos.size == 0:
        return np.empty(0, dtype=np.int64)
    at = np.searchsorted(t_pos, s_pos)
    hit = t_pos[np.minimum(at, t_pos.size - 1)] == s_pos
    shared = s_pos[hit]
    if shared.size > 1:  # zero-width tokens repeat an end: keep each position once
        keep = np.empty(shared.size, dtype=bool)
        keep[0] = True
        np.not_equal(shared[1:], shared[:-1], out=keep[1:])
        shared = shared[keep]
    return shared


def _assign(ends: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Group of each token: the first shared boundary >= its end; zero-width tokens take the next group."""
    zero_width = np.diff(ends, prepend=0) == 0
    # One searchsorted on doubled keys: 2e (left side) for tokens with bytes, 2e+1 (right side) for zero-width.
    return np.searchsorted(2 * shared, 2 * ends + zero_width, side="left").astype(np.int64, copy=False)
