"""Vocabulary map between two tokenizers by canonical bytes (docs/design.md, "Vocabulary map").

Student id s and teacher id t match when their canonical bytes are equal and neither is special. This matches
SentencePiece's ``▁Hello`` with byte-level BPE's ``ĠHello`` (both are the bytes ``b" Hello"``), which TRL's
rule (equal token strings) misses. Where one side has several ids with the same bytes (a SentencePiece
``<0x41>`` byte-fallback piece and the piece ``A``), the regular piece with the lowest id is the target:
it is what that tokenizer produces for those bytes. The map is therefore many-to-one, not a bijection.

Built once per pair of vocabularies (dict lookups over canonical bytes, well under a second for 150k ids)
and cached in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from gold_plugin.alignment.token_bytes import TokenTable, derived_cache, token_table
from gold_plugin.alignment.types import Tokenizer

if TYPE_CHECKING:
    import torch

IdArray: TypeAlias = "np.ndarray | torch.Tensor"

_MAPS: dict[tuple[int, int], _Maps] = derived_cache()
_MAX_CACHED_PAIRS = 16


@dataclass(frozen=True)
class _Maps:
    teacher_to_student: np.ndarray
    student_to_teacher: np.ndarray


class VocabMap:
    """Student <-> teacher id map by canonical bytes, and the matched shares of both vocabularies.

    Attributes:
        teacher_to_student: ``int64 [teacher vocab]``, the student id with the same bytes, -1 if none.
        student_to_teacher: ``int64 [student vocab]``, the teacher id with the same bytes, -1 if none.
        matched_fraction: share of the teacher's non-special ids that map to a student id.
        student_matched_fraction: share of the student's non-special ids that map to a teacher id.
    Special tokens never map (on either side). Arrays are shared through the cache: read-only.
    """

    def __init__(self, student_tokenizer: Tokenizer, teacher_tokenizer: Tokenizer) -> None:
        self._student_tokenizer = student_tokenizer
        self._teacher_tokenizer = teacher_tokenizer
        self.student_table: TokenTable = token_table(student_tokenizer)
        self.teacher_table: TokenTable = token_table(teacher_tokenizer)
        maps = _maps_for(self.student_table, self.teacher_table)
        self.teacher_to_student = maps.teacher_to_student
        self.student_to_teacher = maps.student_to_teacher
        self.matched_fraction = _share(self.teacher_to_student, self.teacher_table.special)
        self.student_matched_fraction = _share(self.student_to_teacher, self.student_table.special)
        self._exact: tuple[float, float] | None = None
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def exact_string_matched_fraction(self) -> float:
        """TRL's rule for comparison: share of the teacher's non-special ids whose token *string* the student has."""
        return self._exact_shares()[0]

    @property
    def exact_string_student_matched_fraction(self) -> float:
        """TRL's rule, seen from the student: share of its non-special ids whose string the teacher has."""
        return self._exact_shares()[1]

    def _exact_shares(self) -> tuple[float, float]:
        if self._exact is None:
            student_vocab = self._student_tokenizer.get_vocab()
            teacher_vocab = self._teacher_tokenizer.get_vocab()
            shares = []
            for own, other, table in (
                (teacher_vocab, student_vocab, self.teacher_table),
                (student_vocab, teacher_vocab, self.student_table),
            ):
                regular = [i for piece, i in own.items() if i < len(table) and not table.special[i]]
                hits = sum(
                    1
                    for piece, i in own.items()
                    if i < len(table) and not table.special[i] and piece in other
                )
                shares.append(hits / max(len(regular), 1))
            self._exact = (shares[0], shares[1])
        return self._exact

    def map_teacher_ids(self, teacher_ids: IdArray) -> IdArray:
        """Student ids for ``teacher_ids`` (numpy array or torch tensor, any shape); -1 where unmatched or out of range.

        Ids beyond the tokenizer (a model's padded embedding rows) are unmatched.
        """
        return self._lookup("teacher_to_student", teacher_ids)

    def map_student_ids(self, student_ids: IdArray) -> IdArray:
        """Teacher ids for ``student_ids`` (numpy array or torch tensor, any shape); -1 where unmatched."""
        return self._lookup("student_to_teacher", student_ids)

    def teacher_to_student_tensor(
        self, size: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``teacher_to_student`` as a torch ``long`` tensor, padded with -1 to ``size`` (e.g. the logits width)."""
        import torch

        table = np.array(self.teacher_to_student)  # a writable copy for torch
        if size is not None and size > table.size:
            table = np.concatenate([table, np.full(size - table.size, -1, dtype=np.int64)])
        return torch.from_numpy(table).to(device) if device is not None else torch.from_numpy(table)

    def _lookup(self, name: str, ids: IdArray) -> IdArray:
        table: np.ndarray = getattr(self, name)
        if hasattr(ids, "device") and hasattr(
            ids, "clamp"
        ):  # torch tensor: keep a copy of the table per device
            import torch

            key = (name, str(ids.device))
            mapping = self._tensors.get(key)
            if mapping is None:
                mapping = torch.from_numpy(np.array(table)).to(ids.device)
                self._tensors[key] = mapping
            inside = (ids >= 0) & (ids < mapping.numel())
            return torch.where(inside, mapping[ids.clamp(0, mapping.numel() - 1)], torch.full_like(ids, -1))
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < table.size)
        return np.where(inside, table[np.clip(ids, 0, table.size - 1)], -1)

    def summary(self) -> dict[str, float | int]:
        """Vocabulary statistics for reports: sizes and matched shares by canonical bytes and by exact string."""
        return {
            "student_vocab": len(self.student_table),
            "teacher_vocab": len(self.teacher_table),
            "teacher_matched_fraction": self.matched_fraction,
            "student_matched_fraction": self.student_matched_fraction,
            "teacher_exact_string_fraction": self.exact_string_matched_fraction,
            "student_exact_string_fraction": self.exact_string_student_matched_fraction,
        }


def _share(mapping: np.ndarray, special: np.ndarray) -> float:
    regular = ~special
    return float((mapping[regular] >= 0).sum() / max(int(regular.sum()), 1))


def _bytes_index(table: TokenTable) -> dict[bytes, int]:
    """Canonical bytes -> preferred id (regular pieces before byte-fallback pieces, then the lowest id)."""
    ids = np.flatnonzero(~table.special & (table.byte_lengths > 0))
    preferred = np.concatenate([ids[~table.byte_fallback[ids]], ids[table.byte_fallback[ids]]])
    order = preferred[::-1].tolist()  # dict() keeps the last value for a repeated key: feed the best last
    token_bytes = table.token_bytes
    return dict(zip([token_bytes[i] for i in order], order, strict=True))


def _map_into(source: TokenTable, target_index: dict[bytes, int]) -> np.ndarray:
    get = target_index.get
    out = np.fromiter((get(b, -1) for b in source.token_bytes), dtype=np.int64, count=len(source))
    out[source.special] = -1
    out.setflags(write=False)
    return out


def _maps_for(student: TokenTable, teacher: TokenTable) -> _Maps:
    key = (student.fingerprint, teacher.fingerprint)
    maps = _MAPS.get(key)
    if maps is None:
        maps = _Maps(
            teacher_to_student=_map_into(teacher, _bytes_index(student)),
            student_to_teacher=_map_into(student, _bytes_index(teacher)),
        )
        if len(_MAPS) >= _MAX_CACHED_PAIRS:
            _MAPS.pop(next(iter(_MAPS)))
        _MAPS[key] = maps
    return maps
