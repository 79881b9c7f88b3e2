"""The per-position batch (gold_plugin/signals/positions.py): one ``to``, ``select``, ``pack`` and ``unpack`` for
every bundle, the packed form tagged with the bundle's type."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gold_plugin.signals.logit import LogitLossInputs, ProjectionInputs, ProjectionPositions
from gold_plugin.signals.positions import PositionBatch
from gold_plugin.step.hidden_states import HiddenStateTargets

PREFIX = "x."


def _inputs() -> LogitLossInputs:
    rows = torch.tensor([0, 0, 2, 2, 2])  # sample 1 has no position
    return LogitLossInputs(
        positions=torch.stack([rows, torch.tensor([1, 4, 0, 2, 3])], dim=1),
        teacher_topk_ids=torch.arange(10).reshape(5, 2),
        teacher_topk_logprobs=-torch.rand(5, 2),
        sample_index=rows,
    )


def _equal(a: PositionBatch, b: PositionBatch) -> bool:
    return type(a) is type(b) and all(
        torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
    )


def test_every_bundle_has_its_own_type_tag():
    bundles = (LogitLossInputs, ProjectionPositions, ProjectionInputs, HiddenStateTargets)
    assert len({cls.TYPE_TAG for cls in bundles}) == len(bundles)


def test_pack_then_unpack_per_sample_gives_the_bundle_back():
    inputs = _inputs()
    packed = inputs.pack(3, PREFIX)
    assert packed[PREFIX + "teacher_topk_ids"].shape == (3, 2, 3)  # [B, k, P]: the position axis last
    per_sample = {
        key: list(value.unbind(0)) for key, value in packed.items()
    }  # as OpenRLHF's buffer hands them
    assert _equal(PositionBatch.unpack(per_sample, PREFIX), inputs)
    hidden = HiddenStateTargets.at(torch.tensor([1, 1]), torch.tensor([0, 5]), torch.rand(2, 2, 3))
    assert _equal(PositionBatch.unpack(hidden.pack(2, PREFIX), PREFIX), hidden)


def test_samples_of_two_bundle_types_are_refused():
    packed = _inputs().pack(3, PREFIX)
    packed[PREFIX + "type"][1] = ProjectionPositions.TYPE_TAG
    with pytest.raises(ValueError, match=r"x\.type: the samples carry the unknown or mixed bundle types"):
        PositionBatch.unpack(packed, PREFIX)


def test_select_takes_samples_in_their_new_order_and_keeps_columns():
    inputs = _inputs()
    picked = inputs.select([2, 0])
    assert picked.sample_index.tolist() == [0, 0, 0, 1, 1]
    assert picked.positions.tolist() == [[0, 0], [0, 2], [0, 3], [1, 1], [1, 4]]
    assert picked.teacher_topk_ids.tolist() == inputs.teacher_topk_ids[[2, 3, 4, 0, 1]].tolist()
    assert inputs.select([1]).num_positions == 0 and isinstance(inputs.to("cpu"), LogitLossInputs)
