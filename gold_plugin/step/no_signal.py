"""Steps in which no sample got a distillation signal: said on the console with the reasons counted, and a run
that gets none for ``--gold.max_steps_without_signal`` steps in a row stopped with them.

A teacher that rejects every request (chat prompts sent to a base teacher without a chat template), prompts cut
to the teacher's context, or responses no alignment can pair all leave the run training on nothing while its
metrics look ordinary; both backends feed every step's aligned batches here. Pure core: no Ray, no OpenRLHF.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from gold_plugin.step.aligned import AlignedBatch

_REASON_WIDTH = 240


class NoDistillationSignalError(RuntimeError):
    """Several steps in a row gave no sample a distillation signal; the message counts the reasons."""


def _reason(aligned: AlignedBatch, sample: int) -> str:
    alignment = aligned.alignments[sample]
    if bool(aligned.prompt_truncated[sample]):
        return "the teacher's prompt was cut to fit its context (raise --gold.teacher.max_len or shorten prompts)"
    if not alignment.aligned:
        # Numbers (token counts, positions) would split one cause into many lines.
        return re.sub(r"\d+", "N", alignment.reason or "unalignable")[:_REASON_WIDTH]
    if bool(aligned.empty_response[sample]):
        return "the response has no text"
    if float(aligned.masked_tokens[sample]) > 0:
        return "no group the teacher scored: the response does not fit the teacher's context"
    return "no aligned group"


def no_signal_reasons(aligned: AlignedBatch, signal: torch.Tensor) -> Counter[str]:
    """Why each sample of a batch got no distillation signal (one reason per sample whose ``signal`` row, the
    ``[B, A]`` mask of signal-carrying tokens, is empty); samples with a signal are not counted."""
    without = (~signal.to(torch.bool).any(dim=1)).nonzero().flatten().tolist()
    return Counter(_reason(aligned, b) for b in without)


class NoSignalWatch:
    """Counts consecutive steps without any distillation signal.

    Args:
        max_steps: steps in a row without signal after which :meth:`observe` raises; 0 never raises.
    """

    def __init__(self, max_steps: int) -> None:
        self.max_steps = int(max_steps)
        self.steps_without_signal = 0

    def observe(self, step: int, parts: Sequence[tuple[AlignedBatch, torch.Tensor]]) -> str | None:
        """Record one step given as ``(aligned batch, signal mask)`` parts (OpenRLHF's micro-batches, or one).

        Returns None when some sample got a signal, else a one-paragraph message with the reasons counted (the
        backend prints it). Raises :class:`NoDistillationSignalError` with that message when this is the
        ``max_steps``-th such step in a row.
        """
        samples = sum(int(signal.shape[0]) for _, signal in parts)
        with_signal = sum(int(signal.to(torch.bool).any(dim=1).sum()) for _, signal in parts)
        if with_signal > 0 or samples == 0:
            self.steps_without_signal = 0
            return None
        self.steps_without_signal += 1
        reasons: Counter[str] = Counter()
        for aligned, signal in parts:
            reasons.update(no_signal_reasons(aligned, signal))
        counted = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
        message = (
            f"GOLD step {step}: none of the {samples} samples got a distillation signal "
            f"({self.steps_without_signal} step(s) in a row): {counted}."
        )
        if self.max_steps and self.steps_without_signal >= self.max_steps:
            raise NoDistillationSignalError(
                f"{message} Stopping: {self.max_steps} steps in a row trained nothing from the teacher "
                "(--gold.max_steps_without_signal; 0 never stops)."
            )
        return message
