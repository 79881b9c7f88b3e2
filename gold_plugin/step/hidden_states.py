"""The hidden-state loss's part of the GOLD step, written once for the backends (docs/signals.md, "Hidden states").

From a step's :class:`~gold_plugin.step.AlignedBatch`: the aligned groups' ends, where the student's and the
teacher's states are compared (:func:`hidden_state_targets`); per run: the student's layers, the bridge fitted on
the first batch and frozen, the loss term and its metrics (:class:`HiddenStateSignal`). The backend runs the
student's forward with the signal's layers (:class:`~gold_plugin.step.loss_signal.StudentForward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gold_plugin.config import GoldConfig
from gold_plugin.signals.hidden_states import (
    HiddenStateBridge,
    bridge_statistics,
    hidden_state_loss,
    layers_at_depths,
)
from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step.aligned import AlignedBatch
from gold_plugin.step.loss_signal import AllReduce, LossSignal, StudentForward
from gold_plugin.step.metrics import sum_per_sample_key


@dataclass(frozen=True)
class HiddenStateTargets(PositionBatch):
    """One entry per aligned group of a batch whose two ends both have a state (samples in order, then text order):
    a :class:`~gold_plugin.signals.positions.PositionBatch` whose position is the group's last student token."""

    positions: torch.Tensor
    """int64 ``[G, 2]``: (sample, action index of the student's last response token of the group), whose state is
    compared."""
    sample_index: torch.Tensor
    """int64 ``[G]``: the group's sample (batch row)."""
    teacher_states: torch.Tensor
    """float32 ``[G, L, r]``: the teacher's sketched states after its last token of the group."""

    @classmethod
    def at(
        cls, sample: torch.Tensor, action: torch.Tensor, teacher_states: torch.Tensor
    ) -> HiddenStateTargets:
        """The targets of groups ending at (``sample``, ``action``), int64 ``[G]`` each."""
        return cls(torch.stack([sample, action], dim=1), sample, teacher_states)

    @property
    def sample(self) -> torch.Tensor:
        return self.sample_index

    @property
    def action(self) -> torch.Tensor:
        return self.positions[:, 1]

    @property
    def num_groups(self) -> int:
        return self.num_positions

    def in_action_columns(self, action_mask: torch.Tensor) -> HiddenStateTargets:
        """The same groups with ``action`` the column of ``action_mask`` (``[B, A]``, row = sample) that holds the
        sample's action token ``action`` (the identity where every row's actions start at column 0)."""
        mask = action_mask.to(torch.bool).cpu()
        _, columns = mask.nonzero(as_tuple=True)
        counts = mask.sum(1)
        starts = torch.cumsum(counts, 0) - counts
        index = starts[self.sample.cpu()] + self.action.cpu()
        return HiddenStateTargets.at(self.sample, columns[index].to(self.action.device), self.teacher_states)


def _group_last(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """``[num_groups]``: the flat index of each group's last token in ``groups`` (-1 for a group without tokens)."""
    last = np.full(num_groups, -1, dtype=np.int64)
    tokens = np.flatnonzero(groups >= 0)
    np.maximum.at(last, groups[tokens], tokens)
    return last


def hidden_state_targets(aligned: AlignedBatch) -> HiddenStateTargets:
    """The group ends of a batch and the teacher's states there (the teacher must have returned hidden states).

    A group is kept when it has a token on each side and the teacher's state after its last token is finite;
    samples without a teacher result (or without hidden states) have none. Vectorised over the batch.
    """
    flat = aligned.flat
    counts = flat.teacher_counts
    states = []
    width: tuple[int, ...] | None = None
    for result, count in zip(aligned.results, counts):
        got = None if result is None or result.error is not None else result.hidden_states
        if got is not None and got.shape[0] == count:
            width = got.shape[1:]
            states.append(got)
        else:
            states.append(None)
    if width is None:
        return HiddenStateTargets.at(
            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, 1)
        )
    teacher = np.concatenate(
        [s if s is not None else np.full((c, *width), np.nan, np.float16) for s, c in zip(states, counts)]
    ).astype(np.float32)
    total = flat.total_groups
    last_student = _group_last(flat.student_group, total)
    last_teacher = _group_last(flat.teacher_group, total)
    both = (last_student >= 0) & (last_teacher >= 0)
    finite = np.zeros(total, dtype=bool)
    finite[both] = np.isfinite(teacher[last_teacher[both]]).all(axis=(1, 2))
    keep = np.flatnonzero(finite)
    student_counts = flat.student_counts
    sample_of = np.repeat(np.arange(student_counts.shape[0]), student_counts)
    first_of = np.repeat(np.cumsum(student_counts) - student_counts, student_counts)
    tokens = last_student[keep]
    return HiddenStateTargets.at(
        torch.from_numpy(sample_of[tokens]),
        torch.from_numpy(tokens - first_of[tokens]),
        torch.from_numpy(teacher[last_teacher[keep]]),
    )


class HiddenStateSignal(LossSignal):
    """The hidden-state loss of one run as a :class:`~gold_plugin.step.loss_signal.LossSignal`: the student's layers
    paired with the teacher's, the bridge (fitted on the first batch's group ends, then frozen, or refitted every
    step: :attr:`needs_fit`; :meth:`state_dict` goes into the checkpoint) and the loss term, a mean over the optimiser
    step's aligned groups.

    ``student_num_layers`` is None on a rollout side, which only prepares targets; ``teacher_state_shape`` ``(L, r)``
    is what a batch without any group carries, until a batch with groups shows the teacher's (OpenRLHF concatenates
    micro-batches and needs the same inner sizes)."""

    name = "hidden_state"
    unit = "positions"

    def __init__(
        self,
        gold: GoldConfig,
        student_num_layers: int | None,
        teacher_state_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.gold = gold
        layers = int(gold.teacher.hidden_state_layers or 0)
        self.student_layers = (
            () if student_num_layers is None else layers_at_depths(int(student_num_layers), layers)
        )
        self.bridge: HiddenStateBridge | None = None
        self._state_shape = teacher_state_shape

    @property
    def fitted(self) -> bool:
        return self.bridge is not None

    @property
    def needs_fit(self) -> bool:
        """Whether the bridge is to be fitted on this step's group ends before its update: no bridge yet, or
        ``--gold.hidden_state_bridge refit``."""
        return self.bridge is None or self.gold.hidden_state_bridge == "refit"

    def prepare(
        self,
        aligned: AlignedBatch,
        response_ids: Sequence[Sequence[int] | np.ndarray],
        action_mask: torch.Tensor,
    ) -> tuple[HiddenStateTargets, dict[str, torch.Tensor]]:
        """The group ends (in action columns) and the teacher's states there; ``gold/hidden_state_groups`` per
        sample."""
        targets = hidden_state_targets(aligned).in_action_columns(action_mask)
        if targets.num_groups:
            self._state_shape = tuple(targets.teacher_states.shape[1:])
        elif self._state_shape is not None:
            targets = dataclasses.replace(targets, teacher_states=torch.zeros(0, *self._state_shape))
        groups = torch.bincount(targets.sample.cpu(), minlength=action_mask.shape[0]).float()
        return targets, {"gold/hidden_state_groups": groups}

    def fit(
        self, forwards: Iterable[tuple[StudentForward, PositionBatch]], all_reduce: AllReduce | None = None
    ) -> dict[str, float]:
        """Fit the bridge on the student's and the teacher's states at the step's group ends
        (:meth:`fit_states`)."""
        student, teacher = [], []
        for forward, batch in forwards:
            student.append(forward.states_at(batch, self.student_layers))
            teacher.append(_targets(batch).teacher_states)
        if not student:
            raise RuntimeError("No micro-batch to fit the hidden-state bridge on.")
        return self.fit_states(torch.cat(student), torch.cat(teacher), all_reduce)

    def fit_states(
        self, student_states: torch.Tensor, teacher_states: torch.Tensor, all_reduce: AllReduce | None = None
    ) -> dict[str, float]:
        """Fit the bridge on the student's states ``[G, L, d_s]`` and the teacher's ``[G, L, r]`` at the same group
        ends (:attr:`HiddenStateTargets.teacher_states`); returns
        ``gold/hidden_bridge_fit`` (the share of the teacher's standardised states the fitted map explains) and
        ``gold/hidden_bridge_groups``. ``all_reduce`` sums a dict of tensors over the data-parallel ranks, each of
        which passes its own group ends: the bridge is fitted from the summed statistics, the same on every rank
        (None: these are all the step's group ends)."""
        reduce = all_reduce if all_reduce is not None else (lambda sums: sums)
        device = student_states.device
        teacher = teacher_states.to(device)
        stats = reduce(bridge_statistics(student_states, teacher))
        self.bridge = HiddenStateBridge.from_statistics({k: v.to(device) for k, v in stats.items()}).to(
            device
        )
        residual = self.bridge.project(student_states.detach().float()) - self.bridge.targets(teacher)
        standardised = self.bridge.targets(teacher).double()
        sums = reduce(
            {
                "residual": residual.double().pow(2).sum(),
                "sum": standardised.sum(0),
                "square": standardised.pow(2).sum(),
            }
        )
        count = float(stats["count"])
        total = float(sums["square"]) - float(sums["sum"].pow(2).sum()) / count
        fit = 1.0 - float(sums["residual"]) / max(total, 1e-12)
        return {"gold/hidden_bridge_fit": fit, "gold/hidden_bridge_groups": count}

    def term(
        self, forward: StudentForward, batch: PositionBatch, normaliser: float | torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = _targets(batch)
        return self.term_at_states(
            forward.states_at(targets, self.student_layers), targets, normaliser, batch_size
        )

    def term_at_states(
        self,
        student_states: torch.Tensor,
        targets: HiddenStateTargets,
        batch_groups: float | torch.Tensor,
        batch_size: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``alpha * hidden_state_coef * sum(per-group loss) / batch_groups`` (differentiable in the student's
        states ``[G, L, d_s]`` at the targets) and the micro-batch's ``gold/hidden_state_loss`` as a sum per sample
        of its ``batch_size``. ``batch_groups`` is the optimiser step's group count, so micro-batches add up to one
        step's loss."""
        if self.bridge is None:
            raise RuntimeError(
                "The hidden-state bridge is not fitted: fit it on the step's group ends before the first loss."
            )
        projected = self.bridge.project(student_states.float())
        per_group = hidden_state_loss(
            projected, self.bridge.targets(targets.teacher_states), self.gold.hidden_state_loss
        )
        normaliser = float(batch_groups) if float(batch_groups) > 0 else 1.0
        scale = self.gold.alpha * float(self.gold.hidden_state_coef or 0.0) / normaliser
        total = per_group.detach().sum() / max(int(batch_size), 1)
        return scale * per_group.sum(), {sum_per_sample_key("gold/hidden_state_loss"): total}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.bridge is None else {k: v.cpu() for k, v in self.bridge.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.bridge = HiddenStateBridge.from_state_dict(state).to(device) if state else None

    def shipped(self, batch: PositionBatch) -> PositionBatch:
        """The teacher's states in float16 (lossless: the teacher sends float16)."""
        targets = _targets(batch)
        return dataclasses.replace(targets, teacher_states=targets.teacher_states.to(torch.float16))

    def received(self, batch: PositionBatch) -> PositionBatch:
        targets = _targets(batch)
        return dataclasses.replace(targets, teacher_states=targets.teacher_states.float())


def _targets(batch: PositionBatch) -> HiddenStateTargets:
    if not isinstance(batch, HiddenStateTargets):
        raise TypeError(f"The hidden-state loss got a {type(batch).__name__}, not its targets.")
    return batch
