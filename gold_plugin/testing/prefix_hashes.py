"""Exact lookups of many prefixes of the same byte keys, by 64-bit polynomial hashes (the byte-string reference of
the byte projection's inputs, :mod:`gold_plugin.testing.reference_projection`, asks for every candidate which token
spells its first 1, 2, 3, ... bytes).

:class:`PrefixHashes` extends every key's hash by one byte per length; :class:`PrefixLookups` looks the hashes up in
sorted tables of a :class:`~gold_plugin.alignment.sorted_vocab.SortedVocab`'s hashes and compares each hit's bytes
with the token's. A table exists only when the vocabulary's own hashes are distinct (otherwise the lookups use
``truncate_hex`` + ``exact_ids``), so the answers are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gold_plugin.alignment.sorted_vocab import SortedVocab, truncate_hex

_HASH_MULTIPLIER = np.uint64(
    1099511628211
)  # the 64-bit FNV prime: odd, so every step is a bijection mod 2^64


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


@dataclass(frozen=True)
class PrefixLookups:
    """Prefix lookups of one vocabulary; a ``None`` table means ``searchsorted`` on the keys."""

    vocab: SortedVocab
    student_table: tuple[np.ndarray, np.ndarray] | None
    """Hashes of the distinct student keys and the lowest student id of each."""
    teacher_table: tuple[np.ndarray, np.ndarray] | None
    """Hashes of the distinct regular teacher keys and their canonical teacher ids."""

    @classmethod
    def build(cls, vocab: SortedVocab) -> PrefixLookups:
        return cls(
            vocab,
            _hash_table(vocab.sorted_keys, vocab.order),
            _hash_table(vocab.teacher_sorted_keys, vocab.teacher_sorted_canonical),
        )

    def exact_ids(self, prefixes: PrefixHashes, length: int, where: np.ndarray) -> np.ndarray:
        """``vocab.exact_ids`` of the first ``length`` bytes of ``prefixes.keys[where]`` (a boolean mask; those keys
        have at least ``length >= 1`` bytes), by hash, every hit checked against the token's bytes."""
        return _prefix_lookup(
            self.student_table, self.vocab.student_keys, self.vocab.exact_ids, prefixes, length, where
        )

    def teacher_ids(self, prefixes: PrefixHashes, length: int, where: np.ndarray) -> np.ndarray:
        """``vocab.teacher_ids`` of the first ``length`` bytes of ``prefixes.keys[where]``, like :meth:`exact_ids`."""
        return _prefix_lookup(
            self.teacher_table, self.vocab.teacher_keys, self.vocab.teacher_ids, prefixes, length, where
        )


def _prefix_lookup(
    table: tuple[np.ndarray, np.ndarray] | None,
    keys_by_id: np.ndarray,
    exact: Callable[[np.ndarray], np.ndarray],
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
