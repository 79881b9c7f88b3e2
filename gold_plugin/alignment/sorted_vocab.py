"""A student vocabulary sorted by canonical bytes, for byte-prefix queries (docs/alignment.md, "Sorted vocabulary").

Sorted by bytes, the tokens whose bytes start with a given byte string ``w`` form one contiguous range of the
vocabulary, ``[lo, hi)``. So the probability that the student's next token starts with ``w`` is a difference of
two entries of a cumulative sum over the byte-sorted distribution, and a whole batch of such queries is two
``searchsorted`` calls. Byte strings are handled as hexadecimal ``S`` arrays: hex digits sort like the bytes
they encode, a prefix stays a prefix, and the strings contain no NUL byte (numpy pads ``S`` values with NULs).

Exact lookups of the prefixes of a batch of keys, one prefix length at a time (is there a token spelled by the
first l bytes of this key?), go through 64-bit polynomial hashes advanced one byte per length
(:class:`PrefixHashes`) and a sorted hash table of the vocabulary; every hit is checked against the token's bytes,
and a vocabulary whose distinct keys collide falls back to ``searchsorted`` on the keys, so the answers are exact.

Built once per (student, teacher) tokenizer pair and cached; pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gold_plugin.alignment.token_bytes import TokenTable, token_table

_BEYOND_HEX = b"g"  # sorts after every hex digit: key + "g" bounds all extensions of key
_CACHE: dict[tuple[int, int], SortedVocab] = {}
_HEX_CACHE: dict[int, np.ndarray] = {}
_MAX_CACHED = 16
_HASH_MULTIPLIER = np.uint64(
    1099511628211
)  # the 64-bit FNV prime: odd, so every step is a bijection mod 2^64


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


class PrefixHashes:
    """Hashes of the first ``length`` bytes of every key of an ``S`` hex array (any shape), advanced one length at
    a time (``at`` takes non-decreasing lengths). Valid for the keys that have at least ``length`` bytes."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.ascontiguousarray(keys)
        self.width = self.keys.dtype.itemsize
        self.chars = self.keys.view(np.uint8).reshape(*self.keys.shape, self.width) if self.width else None
        self.hashes = np.zeros(self.keys.shape, dtype=np.uint64)
        self.length = 0

    def at(self, length: int) -> np.ndarray:
        if length < self.length:
            raise ValueError(f"prefix lengths must not decrease ({length} after {self.length}).")
        for char in range(2 * self.length, min(2 * length, self.width)):
            self.hashes = self.hashes * _HASH_MULTIPLIER + self.chars[..., char]
        self.length = length
        return self.hashes


def _full_hashes(keys: np.ndarray) -> np.ndarray:
    """The hash of every (whole) key, as :class:`PrefixHashes` gives it at the key's own length."""
    keys = np.ascontiguousarray(keys)
    hashes = np.zeros(keys.shape[0], dtype=np.uint64)
    if keys.dtype.itemsize == 0 or keys.shape[0] == 0:
        return hashes
    # Longest keys first: the keys that still have a character at column c are the first ``count[c]``.
    by_length = np.argsort(-np.strings.str_len(keys), kind="stable")
    chars = keys[by_length].view(np.uint8).reshape(keys.shape[0], keys.dtype.itemsize)
    count = (chars != 0).sum(axis=0)
    sorted_hashes = np.zeros(keys.shape[0], dtype=np.uint64)
    for char in range(chars.shape[1]):
        n = int(count[char])
        sorted_hashes[:n] = sorted_hashes[:n] * _HASH_MULTIPLIER + chars[:n, char]
    hashes[by_length] = sorted_hashes
    return hashes


def _hash_table(sorted_keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sorted hashes, value of each)`` of the distinct non-empty keys of a sorted ``S`` array (the value of a
    key's first occurrence); ``None`` if two distinct keys share a hash."""
    first = np.ones(sorted_keys.shape[0], dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    first &= np.strings.str_len(sorted_keys) > 0
    distinct, values = sorted_keys[first], np.asarray(values)[first]
    hashes = _full_hashes(distinct)
    by_hash = np.argsort(hashes, kind="stable")
    hashes, values = hashes[by_hash], values[by_hash]
    if (hashes[1:] == hashes[:-1]).any():
        return None
    for array in (hashes, values):
        array.setflags(write=False)
    return hashes, values


def _hash_lookup(table: tuple[np.ndarray, np.ndarray], hashes: np.ndarray) -> np.ndarray:
    """The value of each hash in the table, -1 where absent."""
    table_hashes, values = table
    if table_hashes.shape[0] == 0:
        return np.full(hashes.shape, -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(table_hashes, hashes), table_hashes.shape[0] - 1)
    return np.where(table_hashes[at] == hashes, values[at], -1)


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
    student_hash_table: tuple[np.ndarray, np.ndarray] | None = None
    """Hashes of the distinct student keys and the lowest student id of each (``None``: use ``searchsorted``)."""
    teacher_hash_table: tuple[np.ndarray, np.ndarray] | None = None
    """Hashes of ``teacher_sorted_keys`` and their canonical teacher ids (``None``: use ``searchsorted``)."""

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

    def prefix_exact_ids(self, prefixes: PrefixHashes, length: int, where: np.ndarray) -> np.ndarray:
        """``exact_ids`` of the first ``length`` bytes of ``prefixes.keys[where]`` (a boolean mask; those keys have
        at least ``length >= 1`` bytes), by hash, every hit checked against the token's bytes."""
        return _prefix_lookup(
            self.student_hash_table, self.student_keys, self.exact_ids, prefixes, length, where
        )

    def prefix_teacher_ids(self, prefixes: PrefixHashes, length: int, where: np.ndarray) -> np.ndarray:
        """``teacher_ids`` of the first ``length`` bytes of ``prefixes.keys[where]``, like :meth:`prefix_exact_ids`."""
        return _prefix_lookup(
            self.teacher_hash_table, self.teacher_keys, self.teacher_ids, prefixes, length, where
        )


def _prefix_lookup(
    table: tuple[np.ndarray, np.ndarray] | None,
    keys_by_id: np.ndarray,
    exact: Any,
    prefixes: PrefixHashes,
    length: int,
    where: np.ndarray,
) -> np.ndarray:
    flat = np.flatnonzero(where)
    keys = prefixes.keys.reshape(-1)
    if table is None:
        return exact(truncate_hex(keys[flat], length))
    ids = _hash_lookup(table, prefixes.at(length).reshape(-1)[flat])
    hit = np.flatnonzero(ids >= 0)
    if hit.shape[0]:
        same = keys_by_id[ids[hit]] == truncate_hex(keys[flat[hit]], length)
        ids[hit[~same]] = -1
    return ids


def sorted_vocab(student_tokenizer: Any, teacher_tokenizer: Any) -> SortedVocab:
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
        student_hash_table=_hash_table(sorted_keys, order),
        teacher_hash_table=_hash_table(regular_teacher, teacher_sorted_canonical),
    )
