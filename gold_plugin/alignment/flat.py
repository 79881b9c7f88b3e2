"""A batch's alignments as flat arrays, built once per batch and read by every signal of the step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gold_plugin.alignment.result import Alignment


@dataclass(frozen=True)
class FlatAlignment:
    """The token-to-group assignment of a whole batch, sample after sample.

    Group ids are global: sample b's groups are numbered after those of samples ``0..b-1``, so per-group sums
    over the batch are one ``index_add``. A sample that is not aligned has no groups and ``-1`` everywhere.
    """

    student_group: np.ndarray
    """int64 ``[S]``: global group of every student response token (samples in order), -1 = none."""
    teacher_group: np.ndarray
    """int64 ``[T]``: global group of every teacher response token, -1 = none."""
    student_counts: np.ndarray
    """int64 ``[B]``: response tokens of each sample on the student side."""
    teacher_counts: np.ndarray
    """int64 ``[B]``: response tokens of each sample on the teacher side."""
    num_groups: np.ndarray
    """int64 ``[B]``: groups of each sample (0 when not aligned)."""
    aligned: np.ndarray
    """bool ``[B]``: False where the alignment failed."""

    @classmethod
    def build(cls, alignments: Sequence[Alignment]) -> FlatAlignment:
        """Concatenate ``alignments`` (one per sample) with global group ids."""
        aligned = np.array([bool(a.aligned) for a in alignments], dtype=bool)
        num_groups = np.array(
            [int(a.num_groups) if ok else 0 for a, ok in zip(alignments, aligned)], dtype=np.int64
        )
        offsets = np.cumsum(num_groups) - num_groups

        def side(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            counts = np.array([g.shape[0] for g in groups], dtype=np.int64)
            if not groups:
                return np.zeros(0, np.int64), counts
            flat = np.concatenate(groups).astype(np.int64, copy=False)
            shift = np.repeat(offsets, counts)
            usable = np.repeat(aligned, counts) & (flat >= 0)
            return np.where(usable, flat + shift, -1), counts

        student, student_counts = side([np.asarray(a.student_group) for a in alignments])
        teacher, teacher_counts = side([np.asarray(a.teacher_group) for a in alignments])
        return cls(student, teacher, student_counts, teacher_counts, num_groups, aligned)

    @property
    def batch_size(self) -> int:
        return int(self.aligned.shape[0])

    @property
    def total_groups(self) -> int:
        return int(self.num_groups.sum())

    def check_actions(self, action_counts: Sequence[int] | np.ndarray) -> None:
        """Raise ``ValueError`` naming the first sample whose action count is not its student token count."""
        counts = np.asarray(action_counts, dtype=np.int64).reshape(-1)
        if counts.shape[0] != self.batch_size:
            raise ValueError(f"{counts.shape[0]} action rows for a batch of {self.batch_size} alignments.")
        wrong = np.flatnonzero(counts != self.student_counts)
        if wrong.size:
            b = int(wrong[0])
            raise ValueError(
                f"Sample {b}: the alignment has {int(self.student_counts[b])} student tokens but action_mask "
                f"marks {int(counts[b])} actions; align the same response tokens the rollout produced."
            )
