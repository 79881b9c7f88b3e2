"""A student vocabulary sorted by canonical bytes, for byte-prefix queries (docs/alignment.md, "Sorted vocabulary").

Sorted by bytes, the tokens whose bytes start with a given byte string ``w`` form one contiguous range of the
vocabulary, ``[lo, hi)``. So the probability that the student's next token starts with ``w`` is a difference of
two entries of a cumulative sum over the byte-sorted distribution, and a whole batch of such queries is two
``searchsorted`` calls. Byte strings are handled as hexadecimal ``S`` arrays: hex digits sort like the bytes
they encode, a prefix stays a prefix, and the strings contain no NUL byte (numpy pads ``S`` values with NULs).

The byte projection gathers its inputs from tables built from this one
(:mod:`gold_plugin.signals.logit.byte_projection_tables`); these string-keyed queries serve that build and the
tests' reference (:mod:`gold_plugin.testing.reference_projection`).

Built once per (student, teacher) tokenizer pair and cached; pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gold_plugin.alignment.token_bytes import TokenizerOrTable, TokenTable, token_table

_BEYOND_HEX = b"g"  # sorts after every hex digit: key + "g" bounds all extensions of key
_CACHE: dict[tuple[int, int], SortedVocab] = {}
_HEX_CACHE: dict[int, np.ndarray] = {}
_MAX_CACHED = 16


def hex_keys(table: TokenTable) -> np.ndarray:
    """``S`` array [vocab]: every token's canonical bytes in hex (``b""`` for special / zero-width ids); cached."""
    keys = _HEX_CACHE.get(table.fingerprint)
    if keys is None:
        width = 2 * int(table.byte_lengths.max(initial=1))
        keys = np.array([b.hex().encode("ascii") for b in table.token_bytes], dtype=f"S{max(width, 1)}")
        keys.setflags(write=False)
        if len(_HEX_CACHE) >= _MAX_CACHED:
            _HEX_CACHE.pop(next(iter(_HEX_CACHE)))
        _HEX_CACHE[table.fingerprint] = keys
    return keys


def truncate_hex(keys: np.ndarray, num_bytes: np.ndarray) -> np.ndarray:
    """Each hex key cut to its first ``num_bytes`` bytes (vectorised; ``keys`` and ``num_bytes`` broadcast)."""
    keys, num_bytes = np.broadcast_arrays(np.asarray(keys), np.asarray(num_bytes))
    keys = np.ascontiguousarray(keys)
    width = keys.dtype.itemsize
    if keys.size == 0 or width == 0:
        return keys.copy()
    chars = keys.view(np.uint8).reshape(*keys.shape, width).copy()
    chars[np.arange(width) >= 2 * num_bytes[..., None]] = 0
    return chars.reshape(-1).view(keys.dtype).reshape(keys.shape)


@dataclass(eq=False)
class SortedVocab:
    """The student vocabulary sorted by bytes, with which student tokens are also teacher tokens.

    Attributes:
        order: ``int64 [V]``, sorted position -> student id (zero-width ids first).
        rank: ``int64 [V]``, student id -> sorted position.
        sorted_keys: ``S [V]``, the hex keys in sorted order.
        student_keys: ``S [V]``, hex key of every student id.
        teacher_keys: ``S [V_teacher]``, hex key of every teacher id (``b""`` for special ids).
        teacher_token: ``bool [V]`` by student id: its bytes are those of some non-special teacher token.
        zero_width: ``bool [V]`` by student id: special or empty.
    """

    order: np.ndarray
    rank: np.ndarray
    sorted_keys: np.ndarray
    student_keys: np.ndarray
    teacher_keys: np.ndarray
    teacher_token: np.ndarray
    zero_width: np.ndarray
    student_byte_lengths: np.ndarray
    teacher_byte_lengths: np.ndarray
    teacher_special: np.ndarray
    teacher_canonical: np.ndarray
    """``int64 [V_teacher]``: the lowest teacher id with the same bytes (-1 for special / zero-width ids)."""
    teacher_sorted_keys: np.ndarray
    """``S``: the distinct regular teacher keys, sorted."""
    teacher_sorted_canonical: np.ndarray
    """``int64``: the canonical teacher id of each of ``teacher_sorted_keys``."""

    @property
    def size(self) -> int:
        return int(self.order.shape[0])

    def prefix_ranges(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` sorted positions of the student tokens whose bytes start with each key (any shape).

        An empty key gives the whole vocabulary; callers never ask for it.
        """
        keys = np.asarray(keys)
        lo = np.searchsorted(self.sorted_keys, keys, side="left")
        hi = np.searchsorted(self.sorted_keys, np.strings.add(keys, _BEYOND_HEX), side="left")
        return lo.astype(np.int64), hi.astype(np.int64)

    def teacher_ids(self, keys: np.ndarray) -> np.ndarray:
        """Canonical teacher id whose bytes equal each key, -1 if none."""
        keys = np.asarray(keys)
        table = self.teacher_sorted_keys
        if table.shape[0] == 0:
            return np.full(keys.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(table, keys), table.shape[0] - 1)
        return np.where(
            (table[at] == keys) & (np.strings.str_len(keys) > 0), self.teacher_sorted_canonical[at], -1
        )

    def exact_ids(self, keys: np.ndarray, lo: np.ndarray | None = None) -> np.ndarray:
        """Student id whose bytes equal each (non-empty) key, -1 if none (``lo`` from :meth:`prefix_ranges`)."""
        keys = np.asarray(keys)
        if lo is None:
            lo = np.searchsorted(self.sorted_keys, keys, side="left")
        at = np.minimum(lo, self.size - 1)
        found = (lo < self.size) & (self.sorted_keys[at] == keys) & (np.strings.str_len(keys) > 0)
        return np.where(found, self.order[at], -1)


def sorted_vocab(student_tokenizer: TokenizerOrTable, teacher_tokenizer: TokenizerOrTable) -> SortedVocab:
    """The cached :class:`SortedVocab` of a (student, teacher) pair (tokenizers or :class:`TokenTable` s)."""
    student, teacher = token_table(student_tokenizer), token_table(teacher_tokenizer)
    key = (student.fingerprint, teacher.fingerprint)
    vocab = _CACHE.get(key)
    if vocab is None:
        vocab = _build(student, teacher)
        if len(_CACHE) >= _MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = vocab
    return vocab


def _build(student: TokenTable, teacher: TokenTable) -> SortedVocab:
    student_keys = hex_keys(student)
    teacher_keys = hex_keys(teacher)
    order = np.argsort(student_keys, kind="stable").astype(np.int64)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0], dtype=np.int64)
    zero_width = student.special | (student.byte_lengths == 0)
    regular = np.flatnonzero(~teacher.special & (teacher.byte_lengths > 0))
    regular_teacher, first = np.unique(teacher_keys[regular], return_index=True)
    teacher_sorted_canonical = regular[first].astype(np.int64)  # np.unique's first occurrence: the lowest id
    teacher_canonical = np.full(len(teacher), -1, dtype=np.int64)
    if regular.shape[0]:
        teacher_canonical[regular] = teacher_sorted_canonical[
            np.searchsorted(regular_teacher, teacher_keys[regular])
        ]
    teacher_token = np.zeros(len(student), dtype=bool)
    if regular_teacher.shape[0]:
        at = np.minimum(np.searchsorted(regular_teacher, student_keys), regular_teacher.shape[0] - 1)
        teacher_token = (regular_teacher[at] == student_keys) & ~zero_width
    arrays = (
        order,
        rank,
        teacher_token,
        zero_width,
        teacher_canonical,
        teacher_sorted_canonical,
        regular_teacher,
    )
    for array in arrays:
        array.setflags(write=False)
    sorted_keys = student_keys[order]
    sorted_keys.setflags(write=False)
    return SortedVocab(
        order=order,
        rank=rank,
        sorted_keys=sorted_keys,
        student_keys=student_keys,
        teacher_keys=teacher_keys,
        teacher_token=teacher_token,
        zero_width=zero_width,
        student_byte_lengths=student.byte_lengths,
        teacher_byte_lengths=teacher.byte_lengths,
        teacher_special=teacher.special,
        teacher_canonical=teacher_canonical,
        teacher_sorted_keys=regular_teacher,
        teacher_sorted_canonical=teacher_sorted_canonical,
    )
