"""What the GOLD experience maker ships to the policy actor in OpenRLHF's ``Experience.info``, and its unpacking.

The per-position bundles (the logit-loss inputs, the hidden-state targets) travel as
:meth:`~gold_plugin.signals.positions.PositionBatch.pack` lays them out: one entry per field, per sample, with the
**position axis last**, so that OpenRLHF's right-padding of info tensors (``concat_experiences``, the replay buffer,
``balance_experiences``) pads positions; each bundle under its own prefix, with its type tag. The policy actor pops
them (:func:`pop_packed`) before OpenRLHF turns ``info`` into logged metrics; everything else left in ``info`` is a
per-sample metric.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from gold_plugin.signals.logit import LogitLossInputs, ProjectionPositions
from gold_plugin.signals.positions import PackedInputs, PositionBatch
from gold_plugin.step.hidden_states import HiddenStateTargets

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_utils.experience import Experience

LOGIT_INPUTS_PREFIX = "gold_logit_inputs."
"""Prefix of the info keys carrying the logit-loss inputs (``<prefix><field>``, ``columns``, ``valid``, ``type``)."""
HIDDEN_TARGETS_PREFIX = "gold_hidden_targets."
"""Prefix of the info keys carrying the hidden-state targets (:func:`pack_hidden_targets`)."""
OFF_POLICY_KEY = "gold/off_policy"
"""Per-sample 1.0 for an off-policy completion (the dataset's or the teacher's), 0.0 for a student sample; also a
logged metric."""


def pack_logit_inputs(
    inputs: LogitLossInputs | ProjectionPositions, batch_size: int
) -> dict[str, torch.Tensor]:
    """A micro-batch's logit-loss inputs as info tensors under :data:`LOGIT_INPUTS_PREFIX`."""
    return inputs.pack(batch_size, LOGIT_INPUTS_PREFIX)


def unpack_logit_inputs(
    packed: PackedInputs, device: torch.device | str | None = None
) -> LogitLossInputs | ProjectionPositions:
    """:func:`pack_logit_inputs` inverted, for the batch OpenRLHF hands to the training step (the bundle its type
    tag names)."""
    inputs = PositionBatch.unpack(packed, LOGIT_INPUTS_PREFIX, device)
    if not isinstance(inputs, (LogitLossInputs, ProjectionPositions)):
        raise ValueError(f"{LOGIT_INPUTS_PREFIX}: a {type(inputs).__name__}, not logit-loss inputs.")
    return inputs


def pack_hidden_targets(targets: HiddenStateTargets, batch_size: int) -> dict[str, torch.Tensor]:
    """A micro-batch's hidden-state targets (``action`` = action columns) as info tensors under
    :data:`HIDDEN_TARGETS_PREFIX`, the teacher's states in float16 (lossless: the teacher sends float16)."""
    half = dataclasses.replace(targets, teacher_states=targets.teacher_states.to(torch.float16))
    return half.pack(batch_size, HIDDEN_TARGETS_PREFIX)


def unpack_hidden_targets(
    packed: PackedInputs, device: torch.device | str | None = None
) -> HiddenStateTargets:
    """:func:`pack_hidden_targets` inverted (states back in float32)."""
    targets = PositionBatch.unpack(packed, HIDDEN_TARGETS_PREFIX, device)
    if not isinstance(targets, HiddenStateTargets):
        raise ValueError(f"{HIDDEN_TARGETS_PREFIX}: a {type(targets).__name__}, not hidden-state targets.")
    return dataclasses.replace(targets, teacher_states=targets.teacher_states.float())


def pop_packed(experience: Experience, prefix: str = LOGIT_INPUTS_PREFIX) -> PackedInputs | None:
    """Remove what was packed under ``prefix`` from ``experience.info`` (None when nothing was)."""
    keys = [k for k in experience.info if k.startswith(prefix)]
    return {k: experience.info.pop(k) for k in keys} or None


def hidden_group_count(info: dict) -> int:
    """The aligned groups a (possibly collated) experience carries hidden-state targets for (0 without)."""
    valid = info.get(HIDDEN_TARGETS_PREFIX + "valid")
    if valid is None:
        return 0
    items = valid if isinstance(valid, (list, tuple)) else [valid]
    return int(sum(int((torch.as_tensor(v) > 0).sum()) for v in items))
