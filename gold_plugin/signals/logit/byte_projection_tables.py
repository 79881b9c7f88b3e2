"""Tables of a (student, teacher) tokenizer pair from which the byte projection's inputs are gathered.

Built once per pair from a :class:`~gold_plugin.alignment.sorted_vocab.SortedVocab` (numpy, about a second for a
150k vocabulary), then held as torch tensors on the device where the inputs are built (the actor's). With them,
everything :func:`~gold_plugin.signals.logit.byte_projection_inputs.expand_positions` needs per teacher position
and candidate is a gather, a comparison or a hash probe; no byte string is touched after the build
(docs/signals.md, "Byte projection: where the work runs").

- **The student trie.** Every distinct non-empty prefix of a student token is a node (node 0 is the root, the
  empty prefix). A node has a byte depth, its sorted-vocabulary range ``[lo, hi)`` (the student tokens that start
  with it: the byte-sorted order makes it contiguous), the student id that spells it exactly (-1 = none), the
  number of student tokens among its non-empty prefixes (itself included), its parent node and its last byte.
  Node B is a descendant-or-self of node A exactly when ``range(B)`` lies within ``range(A)`` and B is at least
  as deep (every node's range holds a token, which then starts with both).
- **Hashes.** A byte string ``w`` is hashed as the pair of polynomials ``sum_j (w_j + 1) M^(n-1-j)`` modulo
  two primes below ``2**31`` (no int64 overflow anywhere; ``H(xy) = H(x) M^|y| + H(y)``), packed into one
  62-bit key. Nodes are found by key in an open-addressing table and checked by depth; keys of the student
  nodes are distinct (checked at build, another pair of bases is tried otherwise). Every lookup done at build
  time is checked against the bytes; at run time a string that is no node is mistaken for one only if its 62-bit
  key equals a node's of the same depth within the expected subtree (about ``n_nodes / 2**62`` per lookup).
- **Per student id**: byte length, hash, the node of each of its prefixes (ragged), the canonical teacher id with
  the same bytes (-1 = none).
- **Per teacher id**: text or not (special / empty), canonical id, byte length, hash of each prefix (ragged), the
  deepest student node on its bytes (its depth = the longest prefix of it that starts some student token), and
  its position in the teacher's byte order with the end of the run of tokens that extend it (the proper-prefix
  test between candidates).

Pure numpy and torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.alignment.sorted_vocab import SortedVocab

PRIMES = (2_147_483_647, 2_147_483_629)
"""The two moduli (primes below 2**31)."""
_BASES = ((1_000_003, 998_244_353), (911_382_323, 972_663_749), (1_234_567_891, 1_987_654_321))
_KEY_SHIFT = 2**31


def _byte_matrix(hex_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [n, L] bytes, int64 [n] lengths)`` of an ``S`` array of hex keys (zero-padded)."""
    keys = np.ascontiguousarray(hex_keys)
    n, width = keys.shape[0], keys.dtype.itemsize
    chars = keys.view(np.uint8).reshape(n, width)
    if width % 2:
        chars = np.pad(chars, ((0, 0), (0, 1)), constant_values=ord("0"))
    digits = chars - np.uint8(ord("0"))  # NUL padding wraps around; masked by the lengths
    digits -= np.where(chars >= ord("a"), np.uint8(ord("a") - ord("0") - 10), np.uint8(0))
    matrix = digits[:, 0::2] * np.uint8(16) + digits[:, 1::2]
    return matrix, (np.strings.str_len(keys) // 2).astype(np.int64)


def _powers(bases: tuple[int, int], length: int) -> np.ndarray:
    """``int64 [2, length + 1]``: ``M^n mod p`` for both hashes."""
    out = np.ones((2, length + 1), dtype=np.int64)
    for h, (base, prime) in enumerate(zip(bases, PRIMES)):
        for n in range(1, length + 1):
            out[h, n] = out[h, n - 1] * base % prime
    return out


def _step(hashes: np.ndarray, byte: np.ndarray, bases: tuple[int, int]) -> np.ndarray:
    """Append one byte to ``[2, n]`` hashes."""
    out = np.empty_like(hashes)
    for h, (base, prime) in enumerate(zip(bases, PRIMES)):
        out[h] = (hashes[h] * base + byte.astype(np.int64) + 1) % prime
    return out


def pack_key(h1: np.ndarray | torch.Tensor, h2: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The 62-bit table key of a hash pair."""
    return h1 * _KEY_SHIFT + h2


def home_slot(keys: np.ndarray | torch.Tensor, mask: int) -> np.ndarray | torch.Tensor:
    """A key's first slot: both halves mixed, since the polynomial hashes of strings that differ in their last
    byte are consecutive numbers (which would form long runs under linear probing). No int64 overflow."""
    return ((((keys >> 31) * 40_503) ^ ((keys & (_KEY_SHIFT - 1)) * 51_749)) >> 7) & mask


@dataclass
class _OpenTable:
    """Open addressing with linear probing: ``keys`` (int64) and ``values`` (int64, -1 = empty slot)."""

    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def build(cls, keys: np.ndarray) -> _OpenTable:
        """A table of distinct ``keys``; the value of ``keys[i]`` is ``i``."""
        size = 1 << max(4, int(2 * max(keys.shape[0], 1) - 1).bit_length())
        mask = size - 1
        table_keys = np.zeros(size, dtype=np.int64)
        table_values = np.full(size, -1, dtype=np.int64)
        pending = np.arange(keys.shape[0])
        slot = home_slot(keys, mask)
        while pending.shape[0]:
            wanted = slot[pending]
            free = table_values[wanted] < 0
            claimed, first = np.unique(wanted[free], return_index=True)
            winners = pending[free][first]
            table_keys[claimed] = keys[winners]
            table_values[claimed] = winners
            placed = np.zeros(keys.shape[0], dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            slot[pending] = (slot[pending] + 1) & mask
        return cls(table_keys, table_values)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where absent (numpy, for the build)."""
        mask = self.keys.shape[0] - 1
        out = np.full(keys.shape, -1, dtype=np.int64)
        todo = np.arange(keys.shape[0])
        slot = home_slot(keys, mask)
        while todo.shape[0]:
            at = slot[todo]
            value = self.values[at]
            hit = (value >= 0) & (self.keys[at] == keys[todo])
            out[todo[hit]] = value[hit]
            todo = todo[(value >= 0) & ~hit]
            slot[todo] = (slot[todo] + 1) & mask
        return out


def _student_trie(
    vocab: SortedVocab, bases: tuple[int, int]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """The trie's node arrays, the node of every prefix of every student id (ragged by id) and its offsets;
    ``None`` when two nodes' keys collide."""
    matrix, lengths = _byte_matrix(vocab.sorted_keys)
    size, depth_max = matrix.shape[0], int(lengths.max(initial=0))
    # lcp[r]: bytes shared by sorted tokens r - 1 and r (0 for r = 0).
    lcp = np.zeros(size, dtype=np.int64)
    if size > 1 and depth_max:
        differ = matrix[1:, :depth_max] != matrix[:-1, :depth_max]
        first_diff = np.where(differ.any(axis=1), differ.argmax(axis=1), depth_max)
        lcp[1:] = np.minimum(first_diff, np.minimum(lengths[1:], lengths[:-1]))
    by_id_lengths = np.zeros(size, dtype=np.int64)
    by_id_lengths[vocab.order] = lengths
    offsets = np.concatenate([[0], np.cumsum(by_id_lengths)]).astype(np.int64)
    prefix_node = np.zeros(int(offsets[-1]), dtype=np.int64)

    nodes = {
        "depth": [np.zeros(1, np.int64)],
        "lo": [np.zeros(1, np.int64)],
        "hi": [np.zeros(1, np.int64)],
        "exact": [np.full(1, -1, np.int64)],
        "count": [np.zeros(1, np.int64)],
        "parent": [np.full(1, -1, np.int64)],
        "last_byte": [np.full(1, -1, np.int64)],
        "h1": [np.zeros(1, np.int64)],
        "h2": [np.zeros(1, np.int64)],
    }
    num_nodes = 1
    hashes = np.zeros((2, size), dtype=np.int64)
    node_of = np.zeros(size, dtype=np.int64)  # node of each sorted token's prefix at the previous depth
    all_counts = np.zeros(1, dtype=np.int64)
    rows = np.arange(size)
    for depth in range(1, depth_max + 1):
        alive = lengths >= depth
        at = np.flatnonzero(alive)
        hashes[:, at] = _step(hashes[:, at], matrix[at, depth - 1], bases)
        starts = alive & ((rows == 0) | (lcp < depth))
        run = np.cumsum(starts) - 1  # run index of each alive token
        lo = np.flatnonzero(starts)
        following = np.zeros(size, dtype=bool)
        following[:-1] = alive[1:] & (lcp[1:] >= depth)
        hi = np.flatnonzero(alive & ~following) + 1
        count = lo.shape[0]
        ids = num_nodes + np.arange(count)
        terminal = lengths[lo] == depth
        parent = node_of[lo]
        node_count = all_counts[parent] + terminal
        nodes["depth"].append(np.full(count, depth, np.int64))
        nodes["lo"].append(lo)
        nodes["hi"].append(hi)
        nodes["exact"].append(np.where(terminal, vocab.order[lo], -1))
        nodes["count"].append(node_count)
        nodes["parent"].append(parent)
        nodes["last_byte"].append(matrix[lo, depth - 1].astype(np.int64))
        nodes["h1"].append(hashes[0, lo])
        nodes["h2"].append(hashes[1, lo])
        all_counts = np.concatenate([all_counts, node_count])
        node_of[at] = ids[run[at]]
        prefix_node[offsets[vocab.order[at]] + depth - 1] = node_of[at]
        num_nodes += count
    arrays = {name: np.concatenate(parts) for name, parts in nodes.items()}
    keys = pack_key(arrays["h1"][1:], arrays["h2"][1:])
    if np.unique(keys).shape[0] != keys.shape[0]:
        return None
    return arrays, prefix_node, offsets


@dataclass(frozen=True)
class ProjectionTables:
    """The pair's tables (attributes are torch tensors on one device; see the module docstring)."""

    bases: tuple[int, int]
    powers: torch.Tensor
    """int64 [2, L + 1]: ``M^n mod p``."""
    node_depth: torch.Tensor
    node_lo: torch.Tensor
    node_hi: torch.Tensor
    node_exact: torch.Tensor
    node_count: torch.Tensor
    node_h1: torch.Tensor
    node_h2: torch.Tensor
    table_keys: torch.Tensor
    table_values: torch.Tensor
    """The open-addressing table of node keys (values: node index + 1 offset removed; -1 = empty)."""
    student_rank: torch.Tensor
    student_length: torch.Tensor
    student_h1: torch.Tensor
    student_h2: torch.Tensor
    student_offset: torch.Tensor
    student_prefix_node: torch.Tensor
    """int64 [sum of lengths]: node of the first ``l`` bytes of id s at ``student_offset[s] + l - 1``."""
    student_teacher: torch.Tensor
    """int64 [V]: canonical teacher id with the student token's bytes (-1 = none)."""
    teacher_text: torch.Tensor
    teacher_canonical: torch.Tensor
    teacher_length: torch.Tensor
    teacher_h1: torch.Tensor
    teacher_h2: torch.Tensor
    teacher_offset: torch.Tensor
    teacher_prefix_h1: torch.Tensor
    teacher_prefix_h2: torch.Tensor
    """int64 [sum of lengths]: hash of the first ``m`` bytes of teacher id c at ``teacher_offset[c] + m - 1``."""
    teacher_node: torch.Tensor
    """int64 [V_teacher]: the deepest student node on the teacher token's bytes (0 = root)."""
    teacher_order: torch.Tensor
    teacher_order_end: torch.Tensor
    """int64 [V_teacher]: position of the teacher token's bytes among the distinct regular teacher tokens sorted by
    bytes, and the end of the run of those that start with them (-1 for special / empty ids): token a is a proper
    prefix of token c exactly when ``order[a] < order[c] < order_end[a]``."""

    @property
    def student_size(self) -> int:
        return int(self.student_rank.shape[0])

    @property
    def teacher_size(self) -> int:
        return int(self.teacher_text.shape[0])

    def to(self, device: torch.device | str) -> ProjectionTables:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @property
    def device(self) -> torch.device:
        return self.node_lo.device

    def find_nodes(self, h1: torch.Tensor, h2: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """The node whose bytes hash to ``(h1, h2)`` at byte depth ``depth`` (1-D tensors), -1 where none."""
        keys = pack_key(h1, h2)
        mask = self.table_keys.shape[0] - 1
        slot = home_slot(keys, mask)
        out = torch.full_like(keys, -1)
        todo = torch.arange(keys.shape[0], device=keys.device)
        while todo.numel():
            at = slot[todo]
            value = self.table_values[at]
            occupied = value >= 0
            hit = occupied & (self.table_keys[at] == keys[todo])
            out[todo[hit]] = value[hit]
            todo = todo[occupied & ~hit]
            slot[todo] = (slot[todo] + 1) & mask
        found = out >= 0
        return torch.where(found & (self.node_depth[out.clamp(min=0)] == depth), out, -1)

    def teacher_prefix_hash(
        self, teacher: torch.Tensor, length: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash of the first ``length`` bytes of each teacher id (``0 <= length <= its byte length``)."""
        at = (self.teacher_offset[teacher] + length - 1).clamp(min=0)
        empty = length <= 0
        zero = torch.zeros_like(length)
        return (
            torch.where(empty, zero, self.teacher_prefix_h1[at]),
            torch.where(empty, zero, self.teacher_prefix_h2[at]),
        )

    def concat(
        self,
        left: tuple[torch.Tensor, torch.Tensor],
        right: tuple[torch.Tensor, torch.Tensor],
        right_length: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash of the concatenation of two byte strings."""
        first, second = ((left[h] * self.powers[h][right_length] + right[h]) % PRIMES[h] for h in range(2))
        return first, second

    def strip(
        self,
        whole: tuple[torch.Tensor, torch.Tensor],
        head: tuple[torch.Tensor, torch.Tensor],
        tail_length: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash of ``whole`` without its first bytes ``head`` (``tail_length`` bytes remain)."""
        first, second = (
            torch.remainder(whole[h] - head[h] * self.powers[h][tail_length], PRIMES[h]) for h in range(2)
        )
        return first, second


def build_projection_tables(vocab: SortedVocab) -> ProjectionTables:
    """The tables of ``vocab``'s pair, on the CPU (see the module docstring)."""
    for bases in _BASES:
        tables = _build(vocab, bases)
        if tables is not None:
            return tables
    raise RuntimeError(  # pragma: no cover - not expected for any real pair
        "Byte-string hashes collide under every hash base; cannot build the projection tables."
    )


@dataclass(frozen=True)
class _TeacherWalk:
    """Each teacher token's bytes hashed prefix by prefix, and the deepest student trie node its bytes reach."""

    text: np.ndarray  # [V_t] bool: a token with text (not special, not empty)
    lengths: np.ndarray  # [V_t] its byte length
    offsets: np.ndarray  # [V_t + 1] where its prefixes start in ``prefix``
    prefix: np.ndarray  # [2, sum(lengths)] the (h1, h2) hash of each of its prefixes
    hashes: np.ndarray  # [2, V_t] the hash of its whole bytes
    deepest: np.ndarray  # [V_t] the deepest student node that is a prefix of its bytes (0: the root)


def _walk_teacher(
    vocab: SortedVocab, bases: tuple[int, int], nodes: dict, node_table: _OpenTable
) -> _TeacherWalk:
    matrix, lengths = _byte_matrix(vocab.teacher_keys)
    size = matrix.shape[0]
    text = ~vocab.teacher_special[:size] & (lengths > 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    prefix = np.zeros((2, int(offsets[-1])), dtype=np.int64)
    hashes = np.zeros((2, size), dtype=np.int64)
    deepest = np.zeros(size, dtype=np.int64)
    matching = text.copy()
    for depth in range(1, int(lengths.max(initial=0)) + 1):
        at = np.flatnonzero(lengths >= depth)
        hashes[:, at] = _step(hashes[:, at], matrix[at, depth - 1], bases)
        prefix[:, offsets[at] + depth - 1] = hashes[:, at]
        # The deepest student node: one byte further while the prefix is still a node (checked exactly: the
        # found node's parent is the node one byte up and its last byte is this byte).
        walk = at[matching[at]]
        found = node_table.lookup(pack_key(hashes[0, walk], hashes[1, walk]))
        found = np.where(found >= 0, found + 1, -1)
        safe = np.maximum(found, 0)
        ok = (
            (found >= 0)
            & (nodes["depth"][safe] == depth)
            & (nodes["parent"][safe] == deepest[walk])
            & (nodes["last_byte"][safe] == matrix[walk, depth - 1])
        )
        deepest[walk[ok]] = found[ok]
        matching[walk[~ok]] = False
    return _TeacherWalk(text, lengths, offsets, prefix, hashes, deepest)


def _student_to_teacher(vocab: SortedVocab) -> np.ndarray:
    """Student id -> the canonical teacher id with the same bytes (-1: none, or a zero-width student token)."""
    student_teacher = np.full(vocab.size, -1, dtype=np.int64)
    if vocab.teacher_sorted_keys.shape[0]:
        at = np.minimum(
            np.searchsorted(vocab.teacher_sorted_keys, vocab.student_keys),
            vocab.teacher_sorted_keys.shape[0] - 1,
        )
        same = (vocab.teacher_sorted_keys[at] == vocab.student_keys) & ~vocab.zero_width
        student_teacher = np.where(same, vocab.teacher_sorted_canonical[at], -1)
    return student_teacher


def _build(vocab: SortedVocab, bases: tuple[int, int]) -> ProjectionTables | None:
    trie = _student_trie(vocab, bases)
    if trie is None:
        return None
    nodes, prefix_node, offsets = trie
    node_table = _OpenTable.build(pack_key(nodes["h1"][1:], nodes["h2"][1:]))
    node_values = np.where(node_table.values >= 0, node_table.values + 1, -1)
    teacher = _walk_teacher(vocab, bases, nodes, node_table)
    t_size = teacher.lengths.shape[0]
    # Each teacher text token's range in the sorted teacher keys: itself and its extensions (hex keys: + "g"
    # bounds them).
    sorted_teacher, keys = vocab.teacher_sorted_keys, vocab.teacher_keys[:t_size]
    order = np.where(teacher.text, np.searchsorted(sorted_teacher, keys), -1)
    order_end = np.where(teacher.text, np.searchsorted(sorted_teacher, np.strings.add(keys, b"g")), -1)
    student_length = offsets[1:] - offsets[:-1]
    full_node = np.where(student_length > 0, prefix_node[np.maximum(offsets[1:] - 1, 0)], 0)
    length_max = max(int(teacher.lengths.max(initial=0)), int(student_length.max(initial=0)))

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.int64))

    return ProjectionTables(
        bases=bases,
        powers=tensor(_powers(bases, length_max + 1)),
        node_depth=tensor(nodes["depth"]),
        node_lo=tensor(nodes["lo"]),
        node_hi=tensor(nodes["hi"]),
        node_exact=tensor(nodes["exact"]),
        node_count=tensor(nodes["count"]),
        node_h1=tensor(nodes["h1"]),
        node_h2=tensor(nodes["h2"]),
        table_keys=tensor(node_table.keys),
        table_values=tensor(node_values),
        student_rank=tensor(vocab.rank),
        student_length=tensor(student_length),
        student_h1=tensor(nodes["h1"][full_node]),
        student_h2=tensor(nodes["h2"][full_node]),
        student_offset=tensor(offsets[:-1]),
        student_prefix_node=tensor(prefix_node),
        student_teacher=tensor(_student_to_teacher(vocab)),
        teacher_text=torch.from_numpy(teacher.text.copy()),
        teacher_canonical=tensor(vocab.teacher_canonical[:t_size]),
        teacher_length=tensor(teacher.lengths),
        teacher_h1=tensor(teacher.hashes[0]),
        teacher_h2=tensor(teacher.hashes[1]),
        teacher_offset=tensor(teacher.offsets[:-1]),
        teacher_prefix_h1=tensor(teacher.prefix[0]),
        teacher_prefix_h2=tensor(teacher.prefix[1]),
        teacher_node=tensor(teacher.deepest),
        teacher_order=tensor(order),
        teacher_order_end=tensor(order_end),
    )


_BUILT: dict[int, tuple[SortedVocab, ProjectionTables]] = {}
_MAX_BUILT = 8


def projection_tables(vocab: SortedVocab) -> ProjectionTables:
    """The tables of ``vocab``, on the CPU, built once per pair (``vocab`` is :func:`sorted_vocab`'s cached object
    of the pair; the entry holds it, so its ``id`` cannot be reused while cached). Move them with ``.to``."""
    entry = _BUILT.get(id(vocab))
    if entry is None or entry[0] is not vocab:
        if len(_BUILT) >= _MAX_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        entry = (vocab, build_projection_tables(vocab))
        _BUILT[id(vocab)] = entry
    return entry[1]
