"""The logit losses: the student's logits against the teacher's top-k log-probs, one value per position.

Two losses share one options type, one result type and one teacher temperature:

- **The byte projection (the default, ``--gold.logit_projection bytes``)**: at every aligned teacher position,
  the student's probability that the text continues with each teacher candidate's bytes, against the teacher's
  (:func:`projected_logit_loss`). Its files all start with ``byte_projection``:

  - ``byte_projection.py``: the loss, :class:`ProjectionVocab` (the byte-sorted student vocabulary as tensors)
    and the two sides' event probabilities;
  - ``byte_projection_inputs.py``: where each teacher position sits on the student side
    (:func:`projection_positions`, compact :class:`ProjectionPositions`, the experience maker's step) and the
    per-candidate fields gathered from the pair's tables (:func:`expand_positions`, :class:`ProjectionInputs`,
    where the loss runs);
  - ``byte_projection_tables.py``: the pair's tables (student trie, hashes), built once per tokenizer pair;
  - ``byte_projection_range_mass.py``: softmax mass over ranges of the byte-sorted vocabulary, with an analytic
    backward pass.

- **The vocabulary-map hybrid (``--gold.logit_projection vocab``, and ``--gold.alignment positional``)**: TRL's
  GOLD/ULD hybrid at group starts (:func:`aligned_logit_loss`): ``vocab_hybrid.py`` (the loss, chunked, with an
  analytic backward pass) and ``vocab_hybrid_inputs.py`` (:func:`logit_loss_inputs`).

- **Shared**: ``options.py`` (:class:`LogitLossOptions`, :func:`tempered_teacher`),
  ``result.py`` (:class:`LogitLoss`), ``topk.py`` (:func:`checked_topk`, the teacher's
  top-k of a sample checked against its alignment).

The maths: docs/signals.md.
"""

from gold_plugin.signals.logit.byte_projection import (
    ProjectionVocab,
    projected_logit_loss,
    student_event_probs,
    teacher_event_probs,
)
from gold_plugin.signals.logit.byte_projection_inputs import (
    DEFAULT_MAX_CHAIN,
    ProjectionInputs,
    ProjectionPositions,
    expand_positions,
    projection_inputs,
    projection_positions,
)
from gold_plugin.signals.logit.byte_projection_range_mass import range_mass
from gold_plugin.signals.logit.byte_projection_tables import (
    ProjectionTables,
    build_projection_tables,
    projection_tables,
)
from gold_plugin.signals.logit.options import (
    LogitLossOptions,
    MatchedNormalization,
    tempered_teacher,
)
from gold_plugin.signals.logit.result import LogitLoss
from gold_plugin.signals.logit.topk import checked_topk
from gold_plugin.signals.logit.vocab_hybrid import aligned_logit_loss, pad_unmatched
from gold_plugin.signals.logit.vocab_hybrid_inputs import LogitLossInputs, logit_loss_inputs

__all__ = [
    "DEFAULT_MAX_CHAIN",
    "LogitLoss",
    "LogitLossInputs",
    "LogitLossOptions",
    "MatchedNormalization",
    "ProjectionInputs",
    "ProjectionPositions",
    "ProjectionTables",
    "ProjectionVocab",
    "aligned_logit_loss",
    "build_projection_tables",
    "checked_topk",
    "expand_positions",
    "logit_loss_inputs",
    "pad_unmatched",
    "projected_logit_loss",
    "projection_inputs",
    "projection_positions",
    "projection_tables",
    "range_mass",
    "student_event_probs",
    "teacher_event_probs",
    "tempered_teacher",
]
