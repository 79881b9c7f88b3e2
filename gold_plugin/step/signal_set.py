"""The run's loss signals, built once per run on each side (:func:`loss_signals`), and what they ask of the student's
forward (:func:`student_layers`)."""

from __future__ import annotations

from collections.abc import Mapping

from gold_plugin.config import GoldConfig
from gold_plugin.step.hidden_states import HiddenStateSignal
from gold_plugin.step.logit_loss import LogitLossSignal, LogitVocab
from gold_plugin.step.loss_signal import LossSignal


def loss_signals(
    gold: GoldConfig,
    vocab: LogitVocab,
    student_num_layers: int | None,
    teacher_state_shape: tuple[int, ...] | None = None,
) -> dict[str, LossSignal]:
    """The loss signals ``gold`` enables, by name, in the order their terms are added: the logit loss
    (``vocab`` from :meth:`LogitVocab.build`), the hidden-state loss (``student_num_layers``: None on a rollout side,
    which reads no student state; ``teacher_state_shape``: see :class:`HiddenStateSignal`). None without a teacher
    signal (``--gold.alpha 0``)."""
    signals: list[LossSignal] = []
    if gold.alpha > 0 and gold.uses_logit_loss:
        signals.append(LogitLossSignal(gold, vocab))
    if gold.alpha > 0 and gold.uses_hidden_states:
        signals.append(HiddenStateSignal(gold, student_num_layers, teacher_state_shape))
    return {signal.name: signal for signal in signals}


def student_layers(signals: Mapping[str, LossSignal]) -> tuple[int, ...]:
    """The student layers whose states the signals read, each once, in the order the signals ask for them
    (:attr:`~gold_plugin.step.loss_signal.StudentForward.states` holds them in this order)."""
    return tuple(dict.fromkeys(layer for signal in signals.values() for layer in signal.student_layers))
