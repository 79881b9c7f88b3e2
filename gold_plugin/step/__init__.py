"""The GOLD step, written once and called by both backends (OpenRLHF and local).

Rollout -> teacher requests -> teacher results -> alignments -> distillation advantages (normalised, mixed with
the task-reward advantages) and logit-loss inputs -> per-position logit loss -> one reduction -> one set of
metrics. The backends are adapters around these functions: they sample, call the teacher, run the model forwards
and the optimiser, and move tensors between processes; every GOLD decision is made here (docs/signals.md, "The
GOLD step"). No I/O: the teacher calls are the backends', this package says what to ask and reads the answers.

One module per section, in the step's order:

- :mod:`~gold_plugin.step.off_policy`: GKD's ``lmbda`` draw, the teacher completions it needs, completions as
  student ids;
- :mod:`~gold_plugin.step.requests`: the teacher's prompt and request for each response;
- :mod:`~gold_plugin.step.aligned`: teacher results aligned to the responses (:class:`AlignedBatch`);
- :mod:`~gold_plugin.step.advantages`: sampled-KL advantages, normalised and mixed by ``alpha``;
- :mod:`~gold_plugin.step.logit_loss`: the logit loss's two hooks (:func:`build_logit_inputs`,
  :func:`compute_logit_loss`) and its one reduction;
- :mod:`~gold_plugin.step.hidden_states`: the hidden-state loss's targets, bridge and term;
- :mod:`~gold_plugin.step.loss_signal`: the interface of the signals that add a loss term (the logit loss, the
  hidden-state loss), which both backends loop over; :mod:`~gold_plugin.step.signal_set`: a run's signals;
- :mod:`~gold_plugin.step.metrics`: one set of metric names;
- :mod:`~gold_plugin.step.no_signal`: steps in which no sample got a signal, reported, and a run without any
  stopped.

Imports alignment, signals and the teacher's types and generation contract; never Ray or OpenRLHF.
"""

from gold_plugin.step.advantages import distill_advantages, gold_advantages
from gold_plugin.step.aligned import AlignedBatch, align_results, mask_unscored_groups
from gold_plugin.step.hidden_states import HiddenStateSignal, HiddenStateTargets, hidden_state_targets
from gold_plugin.step.logit_loss import (
    LogitLossSignal,
    LogitVocab,
    build_logit_inputs,
    compute_logit_loss,
    logit_loss_term,
)
from gold_plugin.step.loss_signal import LossSignal, StudentForward
from gold_plugin.step.metrics import (
    PER_UNIT_MEANS,
    logit_metrics,
    mean_metrics,
    off_policy_metrics,
    per_unit_means,
    sample_metrics,
    sum_per_sample_key,
)
from gold_plugin.step.no_signal import NoDistillationSignalError, NoSignalWatch, no_signal_reasons
from gold_plugin.step.off_policy import (
    OffPolicyDraw,
    OffPolicyResponses,
    TeacherCompletionCall,
    choose_off_policy,
    draw_off_policy,
    off_policy_responses,
    reference_response_ids,
    reference_text,
    teacher_completion_call,
)
from gold_plugin.step.requests import chat_messages, response_ends_with_eos, teacher_prompt, teacher_requests
from gold_plugin.step.signal_set import loss_signals, student_layers

__all__ = [
    "PER_UNIT_MEANS",
    "AlignedBatch",
    "HiddenStateSignal",
    "HiddenStateTargets",
    "LogitLossSignal",
    "LogitVocab",
    "LossSignal",
    "NoDistillationSignalError",
    "NoSignalWatch",
    "OffPolicyDraw",
    "OffPolicyResponses",
    "StudentForward",
    "TeacherCompletionCall",
    "align_results",
    "build_logit_inputs",
    "chat_messages",
    "choose_off_policy",
    "compute_logit_loss",
    "distill_advantages",
    "draw_off_policy",
    "gold_advantages",
    "hidden_state_targets",
    "logit_loss_term",
    "logit_metrics",
    "loss_signals",
    "mask_unscored_groups",
    "mean_metrics",
    "no_signal_reasons",
    "off_policy_metrics",
    "off_policy_responses",
    "per_unit_means",
    "reference_response_ids",
    "reference_text",
    "response_ends_with_eos",
    "sample_metrics",
    "student_layers",
    "sum_per_sample_key",
    "teacher_completion_call",
    "teacher_prompt",
    "teacher_requests",
]
