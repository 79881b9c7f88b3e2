"""What the GOLD experience maker ships to the policy actor in OpenRLHF's ``Experience.info``, and its unpacking.

Every loss signal's per-position batch (:class:`~gold_plugin.step.LossSignal`: the logit-loss inputs, the hidden-state
targets) travels as :meth:`~gold_plugin.signals.positions.PositionBatch.pack` lays it out: one entry per field, per
sample, with the **position axis last**, so that OpenRLHF's right-padding of info tensors (``concat_experiences``,
the replay buffer, ``balance_experiences``) pads positions; each signal under its own prefix (:func:`prefix_of`), with
its type tag. The policy actor pops them (:func:`pop_packed`) before OpenRLHF turns ``info`` into logged metrics;
everything else left in ``info`` is a per-sample metric.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from gold_plugin.signals.logit import LogitLossInputs, ProjectionPositions
from gold_plugin.signals.positions import PackedInputs, PositionBatch
from gold_plugin.step import LogitLossSignal, LossSignal

if TYPE_CHECKING:
    from openrlhf.trainer.ppo_utils.experience import Experience


def prefix_of(name: str) -> str:
    """The info-key prefix of the loss signal ``name``'s batch (``<prefix><field>``, ``columns``, ``valid``,
    ``type``)."""
    return f"gold_{name}."


LOGIT_INPUTS_PREFIX = prefix_of(LogitLossSignal.name)
"""Prefix of the info keys carrying the logit-loss inputs."""
OFF_POLICY_KEY = "gold/off_policy"
"""Per-sample 1.0 for an off-policy completion (the dataset's or the teacher's), 0.0 for a student sample; also a
logged metric."""


def pack_signal(signal: LossSignal, batch: PositionBatch, batch_size: int) -> dict[str, torch.Tensor]:
    """A micro-batch's inputs of ``signal`` (:meth:`LossSignal.prepare`) as info tensors under its prefix, in the
    form it ships them (:meth:`LossSignal.shipped`)."""
    return signal.shipped(batch).pack(batch_size, prefix_of(signal.name))


def unpack_signal(
    signal: LossSignal, packed: PackedInputs, device: torch.device | str | None = None
) -> PositionBatch:
    """:func:`pack_signal` inverted, for the batch OpenRLHF hands to the training step."""
    return signal.received(PositionBatch.unpack(packed, prefix_of(signal.name), device))


def pack_logit_inputs(
    inputs: LogitLossInputs | ProjectionPositions, batch_size: int
) -> dict[str, torch.Tensor]:
    """A micro-batch's logit-loss inputs as info tensors under :data:`LOGIT_INPUTS_PREFIX` (what
    :func:`pack_signal` ships for the logit loss)."""
    return inputs.pack(batch_size, LOGIT_INPUTS_PREFIX)


def unpack_logit_inputs(
    packed: PackedInputs, device: torch.device | str | None = None
) -> LogitLossInputs | ProjectionPositions:
    """:func:`pack_logit_inputs` inverted (the bundle its type tag names)."""
    inputs = PositionBatch.unpack(packed, LOGIT_INPUTS_PREFIX, device)
    if not isinstance(inputs, (LogitLossInputs, ProjectionPositions)):
        raise ValueError(f"{LOGIT_INPUTS_PREFIX}: a {type(inputs).__name__}, not logit-loss inputs.")
    return inputs


def pop_packed(experience: Experience, prefix: str = LOGIT_INPUTS_PREFIX) -> PackedInputs | None:
    """Remove what was packed under ``prefix`` from ``experience.info`` (None when nothing was)."""
    keys = [k for k in experience.info if k.startswith(prefix)]
    return {k: experience.info.pop(k) for k in keys} or None


def packed_signal_names(info: dict) -> set[str]:
    """The loss signals whose batches ``info`` carries (by their :func:`prefix_of`)."""
    return {match.group(1) for key in info if (match := _PACKED_KEY.match(key))}


_PACKED_KEY = re.compile(r"^gold_(\w+?)\.")


def position_count(info: dict, name: str) -> int:
    """The positions a (possibly collated) experience carries of loss signal ``name``'s batch (0 without)."""
    valid = info.get(prefix_of(name) + "valid")
    if valid is None:
        return 0
    items = valid if isinstance(valid, (list, tuple)) else [valid]
    return int(sum(int((torch.as_tensor(v) > 0).sum()) for v in items))
