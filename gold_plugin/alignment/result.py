"""The result of aligning one sample's student and teacher tokenisations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """Token-to-group assignment for one sample.

    ``student_group[i]`` / ``teacher_group[j]`` give the group of each student / teacher token, ``-1`` where
    the token is masked (incomplete trailing bytes, a dropped EOS, or an unalignable sample). Group ids
    run ``0..num_groups-1`` in text order and every group holds at least one token on each side; the
    bytes of group g are identical on both sides (the final EOS / end-of-turn group is zero bytes on both),
    except that group 0 of one side may also hold the SentencePiece dummy-prefix space that its tokenizer added
    (see :func:`~gold_plugin.alignment.align`). ``aligned`` is False for a sample that broke the bytes
    invariant: then every entry is -1, ``num_groups`` is 0 and ``reason`` says why.
    """

    student_group: np.ndarray
    teacher_group: np.ndarray
    num_groups: int
    aligned: bool = True
    reason: str | None = None
    # Cumulative byte end of every token (spans mode; None for positional / unalignable samples). Token i
    # covers bytes [ends[i-1], ends[i]) of the response text; zero-width tokens have ends[i] == ends[i-1].
    student_ends: np.ndarray | None = None
    teacher_ends: np.ndarray | None = None

    @property
    def num_student_aligned(self) -> int:
        """Number of student tokens that belong to a group."""
        return int((self.student_group >= 0).sum())

    @classmethod
    def unalignable(cls, num_student: int, num_teacher: int, reason: str) -> Alignment:
        return cls(
            student_group=np.full(num_student, -1, dtype=np.int64),
            teacher_group=np.full(num_teacher, -1, dtype=np.int64),
            num_groups=0,
            aligned=False,
            reason=reason,
        )
