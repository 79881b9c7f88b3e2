"""The logit loss: the tokenizer pair's tables (:class:`LogitVocab`), the inputs of a batch (hook 1,
:func:`build_logit_inputs`), the per-position loss on the student's logits (hook 2, :func:`compute_logit_loss`) and
the one reduction (:func:`logit_loss_term`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gold_plugin.alignment.sorted_vocab import SortedVocab, sorted_vocab
from gold_plugin.config import GoldConfig
from gold_plugin.signals.logit import (
    LogitLoss,
    LogitLossInputs,
    LogitLossOptions,
    ProjectionInputs,
    ProjectionPositions,
    ProjectionVocab,
    aligned_logit_loss,
    logit_loss_inputs,
    projected_logit_loss,
    projection_positions,
)
from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step.aligned import AlignedBatch
from gold_plugin.step.loss_signal import LossSignal, StudentForward
from gold_plugin.step.metrics import logit_metrics

if TYPE_CHECKING:
    from gold_plugin.alignment.types import Tokenizer


@dataclass(frozen=True)
class LogitVocab:
    """What the logit loss needs of the tokenizer pair, built once per run (on both the rollout and the training
    side) and moved once to the device where the loss runs (:meth:`to`)."""

    teacher_to_student: torch.Tensor | None = None
    """int64 ``[teacher vocabulary]``, -1 = unmatched (``--gold.logit_projection vocab``)."""
    sorted: SortedVocab | None = None
    """The byte-sorted student vocabulary (``--gold.logit_projection bytes``): builds the compact inputs."""
    projection: ProjectionVocab | None = None
    """Its tensors and the pair's tables, for the loss (which expands the compact inputs on its device)."""
    student_end_ids: tuple[int, ...] = ()
    """The student's EOS: its probability is the end event of the byte projection."""
    teacher_end_ids: tuple[int, ...] = ()
    """The teacher's special ids (EOS, end-of-turn, ...): one end event."""

    def to(self, device: torch.device | str) -> LogitVocab:
        """The pair's tensors (the vocabulary map, the projection's vocabulary and tables) on ``device``; the
        byte-sorted vocabulary stays on the host, where the rollout side builds the compact inputs."""
        return dataclasses.replace(
            self,
            teacher_to_student=None
            if self.teacher_to_student is None
            else self.teacher_to_student.to(device),
            projection=None if self.projection is None else self.projection.to(device),
        )

    @classmethod
    def build(
        cls, student_tokenizer: Tokenizer, teacher_tokenizer: Tokenizer, gold: GoldConfig
    ) -> LogitVocab:
        if not gold.uses_logit_loss or gold.alignment == "positional":
            return cls()
        if gold.logit_projection == "bytes":
            vocab = sorted_vocab(student_tokenizer, teacher_tokenizer)
            eos = getattr(student_tokenizer, "eos_token_id", None)
            student_end_ids = (int(eos),) if isinstance(eos, int) else ()
            teacher_end_ids = tuple(int(i) for i in getattr(teacher_tokenizer, "all_special_ids", []) or [])
            return cls(
                sorted=vocab,
                projection=ProjectionVocab.from_sorted(
                    vocab, student_end_ids=student_end_ids, teacher_end_ids=teacher_end_ids
                ),
                student_end_ids=student_end_ids,
                teacher_end_ids=teacher_end_ids,
            )
        from gold_plugin.alignment import VocabMap

        return cls(VocabMap(student_tokenizer, teacher_tokenizer).teacher_to_student_tensor())

    def check(self, gold: GoldConfig) -> None:
        if not gold.uses_logit_loss or gold.alignment != "spans":
            return
        if gold.logit_projection == "bytes" and self.projection is None:
            raise ValueError("The byte-projected logit loss needs the byte-sorted student vocabulary.")
        if gold.logit_projection == "vocab" and self.teacher_to_student is None:
            raise ValueError(
                "The logit loss with --gold.alignment spans needs the teacher->student vocabulary map."
            )


def _projects_bytes(gold: GoldConfig) -> bool:
    return gold.alignment == "spans" and gold.logit_projection == "bytes"


def build_logit_inputs(
    aligned: AlignedBatch,
    response_ids: Sequence[Sequence[int] | np.ndarray],
    action_mask: torch.Tensor,
    gold: GoldConfig,
    vocab: LogitVocab | None = None,
) -> LogitLossInputs | ProjectionPositions:
    """The logit-loss inputs of a batch (hook 1 of 2), on the CPU, as they travel to the loss; the byte projection
    needs ``vocab`` (:meth:`LogitVocab.build`) and gives its compact per-position form (the loss expands it on its
    own device, docs/signals.md). Row b of ``action_mask`` holds sample b, whose action tokens in order are
    ``response_ids[b]``.

    ``positions`` are ``(row, action column)`` pairs (column j = the action token that the logits at action
    column j predict), ``sample_index`` the row of each position; every other field is per position
    (first dimension N). Samples without teacher top-k or without alignment contribute nothing.
    """
    counts = action_mask.to(torch.bool).sum(dim=1).cpu().numpy()
    aligned.flat.check_actions(counts)
    for b, ids in enumerate(response_ids):
        if len(ids) != counts[b]:
            raise ValueError(
                f"Sample {b}: {len(ids)} response ids but action_mask marks {counts[b]} actions."
            )
    results = aligned.usable_results
    topk_ids = [r.topk_ids if r is not None else None for r in results]
    topk_logprobs = [r.topk_logprobs if r is not None else None for r in results]
    if _projects_bytes(gold):
        if vocab is None or vocab.sorted is None:
            raise ValueError("--gold.logit_projection bytes: pass the LogitVocab built for it.")
        return projection_positions(
            vocab.sorted, aligned.alignments, response_ids, topk_ids, topk_logprobs, action_mask
        )
    return logit_loss_inputs(aligned.alignments, topk_ids, topk_logprobs, action_mask)


def _shift_columns(positions: torch.Tensor, offset: int) -> torch.Tensor:
    """``(row, column)`` pairs with ``offset`` added to the columns, on the pairs' own device and dtype."""
    return positions + torch.tensor([0, int(offset)], dtype=positions.dtype, device=positions.device)


def compute_logit_loss(
    student_logits: torch.Tensor,
    inputs: LogitLossInputs | ProjectionPositions | ProjectionInputs,
    gold: GoldConfig,
    vocab: LogitVocab,
    *,
    action_offset: int = 0,
    logits_temperature: float = 1.0,
) -> LogitLoss:
    """Per-position logit loss (hook 2 of 2): ``loss [N]`` (differentiable) and ``valid [N]``.

    ``student_logits`` is ``[B, T, V]`` where ``student_logits[b, action_offset + j]`` predicts action token j of
    row b (OpenRLHF's actor logits: offset ``T - 1 - num_actions``; the local backend's action logits: 0).
    ``inputs`` are on the logits' device already (each backend moves them there once: OpenRLHF's actor when it
    unpacks them, the local backend when it builds a step's inputs); the byte projection's compact positions are
    expanded there.

    The student distribution of the loss is the model's own, divided by ``--gold.uld_student_temperature`` only
    (TRL's GOLD): the rollout temperature is a sampling choice. ``logits_temperature`` is the temperature the given
    logits were already divided by (both backends divide by ``--rollout.temperature`` before the policy loss);
    it is undone inside the loss's own scaling, without a copy of the logits.
    """
    if logits_temperature <= 0:
        raise ValueError(f"logits_temperature must be > 0, got {logits_temperature}.")
    student_temperature = gold.uld_student_temperature / float(logits_temperature)
    if isinstance(inputs, (ProjectionPositions, ProjectionInputs)):
        if action_offset:
            inputs = dataclasses.replace(
                inputs,
                positions=_shift_columns(inputs.positions, action_offset),
                path_columns=inputs.path_columns + int(action_offset),
            )
        return projected_logit_loss(
            student_logits,
            inputs,
            vocab.projection,
            options=LogitLossOptions.from_config(gold, student_temperature=student_temperature),
        )
    positions = inputs.positions
    if action_offset:
        positions = _shift_columns(positions, action_offset)
    return aligned_logit_loss(
        student_logits,
        inputs.teacher_topk_ids,
        inputs.teacher_topk_logprobs,
        _on_logits_device(vocab.teacher_to_student, student_logits),
        positions=positions,
        options=LogitLossOptions.from_config(gold, student_temperature=student_temperature),
    )


def _on_logits_device(mapping: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    if mapping is not None and mapping.device != logits.device:
        raise ValueError(
            f"The vocabulary map is on {mapping.device}, the student logits on {logits.device}: move the "
            "LogitVocab once with .to(device) where the loss runs."
        )
    return mapping


def logit_loss_term(
    per_position_loss: torch.Tensor, num_action_tokens: float | torch.Tensor, gold: GoldConfig
) -> torch.Tensor:
    """The term added to the policy loss: ``alpha * logit_coef * sum(loss) / num_action_tokens``.

    ``num_action_tokens`` is the action-token count of the whole optimiser step (OpenRLHF's token-mean
    normaliser): the logit loss is reduced exactly like the token-mean policy loss, so ``--gold.logit_coef``
    means the same in both backends. Positions from micro-batches of one step add up to one step's loss.
    """
    total = per_position_loss.sum()
    return (
        gold.alpha
        * gold.logit_loss_weight
        * total
        / torch.as_tensor(num_action_tokens, dtype=total.dtype, device=total.device).clamp(min=1.0)
    )


class LogitLossSignal(LossSignal):
    """The aligned logit loss (``--gold.signal logit``, ``bytes``, ``both``) as a :class:`LossSignal`: inputs from
    :func:`build_logit_inputs`, the loss from :func:`compute_logit_loss`, reduced by :func:`logit_loss_term` over the
    optimiser step's action tokens."""

    name = "logit"
    unit = "action_tokens"

    def __init__(self, gold: GoldConfig, vocab: LogitVocab) -> None:
        self.gold, self.vocab = gold, vocab
        """The rollout side needs of ``vocab`` what :func:`build_logit_inputs` reads; the training side checks the
        rest (:meth:`LogitVocab.check`) where it moves it to the loss's device."""

    def prepare(
        self,
        aligned: AlignedBatch,
        response_ids: Sequence[Sequence[int] | np.ndarray],
        action_mask: torch.Tensor,
    ) -> tuple[PositionBatch, dict[str, torch.Tensor]]:
        return build_logit_inputs(aligned, response_ids, action_mask, self.gold, self.vocab), {}

    def term(
        self, forward: StudentForward, batch: PositionBatch, normaliser: float | torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if forward.logits is None:
            raise RuntimeError("The student's forward returned no logits: cannot compute the logit loss.")
        if not isinstance(batch, (LogitLossInputs, ProjectionPositions, ProjectionInputs)):
            raise TypeError(f"The logit loss got a {type(batch).__name__}, not its inputs.")
        result = compute_logit_loss(
            forward.logits,
            batch,
            self.gold,
            self.vocab,
            action_offset=forward.logit_offset,
            logits_temperature=forward.logits_temperature,
        )
        return logit_loss_term(result.loss, normaliser, self.gold), logit_metrics(result, batch_size)

    def to(self, device: torch.device | str) -> LogitLossSignal:
        self.vocab.check(self.gold)
        return LogitLossSignal(self.gold, self.vocab.to(device))
