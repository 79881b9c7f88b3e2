"""The distillation signals that add a term to the student's loss, behind one interface (docs/signals.md, "Loss
signals"): what a signal prepares on the rollout side from a batch's alignments (a per-position batch), what it reads
of the student's training forward (:class:`StudentForward`), its term and metrics, and its fitted state for the
checkpoint. Both backends build the run's signals once (:func:`~gold_plugin.step.signal_set.loss_signals`) and loop
over them. The sampled-KL advantages are the one signal that changes the advantages instead of the loss
(:mod:`gold_plugin.step.advantages`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step.aligned import AlignedBatch

Unit = Literal["action_tokens", "positions"]
"""What a signal's term is a mean over in an optimiser step: the step's action tokens (as the token-mean policy loss,
so its coefficient means the same as the policy loss's scale), or its own positions (e.g. aligned groups)."""

AllReduce = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""Sums a dict of tensors over the data-parallel ranks."""


@dataclass(frozen=True)
class StudentForward:
    """One micro-batch's training forward as the loss signals read it (row b = sample b of the micro-batch)."""

    logits: torch.Tensor | None
    """``[B, T, V]``: ``logits[b, logit_offset + j]`` predicts action token j of row b."""
    logit_offset: int = 0
    logits_temperature: float = 1.0
    """What the given logits were already divided by (the backends divide by ``--rollout.temperature``)."""
    states: torch.Tensor | None = None
    """``[B, T, L, d]``: the student's states at :attr:`layers`."""
    layers: tuple[int, ...] = ()
    """The layers of :attr:`states` (the run's :func:`~gold_plugin.step.signal_set.student_layers`)."""
    state_offset: int = 0
    """``states[b, state_offset + j]`` is the state after action token j of row b."""

    def states_at(self, batch: PositionBatch, layers: Sequence[int]) -> torch.Tensor:
        """``[N, len(layers), d]``: the states of ``layers`` after each position's ``(row, action column)``."""
        missing = [layer for layer in layers if layer not in self.layers]
        if self.states is None or missing:
            raise RuntimeError(
                f"The student's forward returned no hidden states of layers {missing or list(layers)}: cannot "
                "compute the loss."
            )
        rows, columns = batch.positions[:, 0], batch.positions[:, 1]
        states = self.states[rows, self.state_offset + columns]
        index = [self.layers.index(layer) for layer in layers]
        return states if index == list(range(len(self.layers))) else states[:, index]


class LossSignal(ABC):
    """A distillation signal that adds a term to the student's loss. Subclasses set :attr:`name` and :attr:`unit`."""

    name: ClassVar[str]
    """Names the signal in the checkpoint and in what the rollout side ships (``gold_<name>.`` in OpenRLHF)."""
    unit: ClassVar[Unit]
    student_layers: tuple[int, ...] = ()
    """The student layers (``output_hidden_states`` numbering) whose states :meth:`term` reads; empty: logits only."""

    @abstractmethod
    def prepare(
        self,
        aligned: AlignedBatch,
        response_ids: Sequence[Sequence[int] | np.ndarray],
        action_mask: torch.Tensor,
    ) -> tuple[PositionBatch, dict[str, torch.Tensor]]:
        """Rollout side, on the CPU: the batch's per-position inputs in ``(row, action column)`` positions (row b of
        ``action_mask`` holds sample b, whose action tokens are ``response_ids[b]``), and per-sample ``[B]`` metrics."""

    @abstractmethod
    def term(
        self, forward: StudentForward, batch: PositionBatch, normaliser: float | torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's differentiable term, ``alpha * coef * sum(per-position loss) / normaliser`` (the
        optimiser step's count of :attr:`unit`, so that micro-batches add up to one step's loss), and its metrics
        as sums per sample of its ``batch_size`` (:func:`~gold_plugin.step.metrics.per_unit_means`)."""

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` is to run on this step's batches before the update."""
        return False

    def fit(
        self, forwards: Iterable[tuple[StudentForward, PositionBatch]], all_reduce: AllReduce | None = None
    ) -> dict[str, float]:
        """Fit the signal's state on the step's micro-batches (no-grad forwards and their batches; ``all_reduce``
        sums over the data-parallel ranks, None: these are all of the step's); its metrics."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted state for the checkpoint (CPU tensors; empty: nothing fitted or nothing to fit)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Restore :meth:`state_dict`'s state (a signal without state has nothing to restore)."""
        if state:
            raise ValueError(f"The {self.name} signal has no state to restore, got {sorted(state)}.")

    def to(self, device: torch.device | str) -> LossSignal:
        """The signal with its tables on ``device``, where the loss runs (this signal when it has none)."""
        return self

    def shipped(self, batch: PositionBatch) -> PositionBatch:
        """The batch as it travels from the rollout side to the training side (e.g. in a smaller dtype)."""
        return batch

    def received(self, batch: PositionBatch) -> PositionBatch:
        """:meth:`shipped` inverted."""
        return batch
