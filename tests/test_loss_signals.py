"""The loss signals behind one interface (gold_plugin.step.loss_signal): which a run enables, what they read of the
student's forward, and the hidden-state loss through the interface giving what its maths gives on gathered states."""

from __future__ import annotations

import pytest
import torch

from gold_plugin.config import GoldConfig, TeacherConfig
from gold_plugin.step import (
    HiddenStateSignal,
    HiddenStateTargets,
    LogitLossSignal,
    LogitVocab,
    StudentForward,
    loss_signals,
    student_layers,
)


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"signal": "advantage"}, []),
        ({"signal": "logit"}, ["logit"]),
        ({"signal": "both"}, ["logit"]),
        ({"signal": "hidden", "teacher": TeacherConfig(hidden_state_layers=2)}, ["hidden_state"]),
        (
            {"signal": "logit", "hidden_state_coef": 0.1, "teacher": TeacherConfig(hidden_state_layers=2)},
            ["logit", "hidden_state"],
        ),
        ({"signal": "logit", "alpha": 0.0}, []),  # no teacher, no signal
    ],
)
def test_a_run_enables_the_signals_its_options_turn_on(options, names):
    gold = GoldConfig(**options)
    signals = loss_signals(gold, LogitVocab(), student_num_layers=6)
    assert list(signals) == names
    hidden = signals.get("hidden_state")
    assert student_layers(signals) == (hidden.student_layers if hidden is not None else ())
    assert all(s.unit == ("action_tokens" if s.name == "logit" else "positions") for s in signals.values())
    if hidden is not None:  # a rollout side reads no student state
        assert loss_signals(gold, LogitVocab(), None)["hidden_state"].student_layers == ()


def test_the_forward_gives_each_signal_its_layers_at_its_positions():
    states = torch.arange(2 * 5 * 3 * 1, dtype=torch.float32).reshape(
        2, 5, 3, 1
    )  # [B, T, L, d], layers 2, 4, 6
    forward = StudentForward(logits=None, states=states, layers=(2, 4, 6), state_offset=1)
    batch = HiddenStateTargets.at(torch.tensor([1, 0]), torch.tensor([3, 0]), torch.zeros(2, 2, 1))
    assert torch.equal(forward.states_at(batch, (2, 4, 6)), states[[1, 0], [4, 1]])
    assert torch.equal(forward.states_at(batch, (6, 2)), states[[1, 0], [4, 1]][:, [2, 0]])
    with pytest.raises(RuntimeError, match=r"no hidden states of layers \[5\]"):
        forward.states_at(batch, (5,))


def test_the_hidden_state_loss_through_the_interface_is_its_maths_on_the_gathered_states():
    gold = GoldConfig(
        signal="hidden", alpha=0.5, hidden_state_coef=2.0, teacher=TeacherConfig(hidden_state_layers=1)
    )
    through, direct = HiddenStateSignal(gold, 4), HiddenStateSignal(gold, 4)
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 6, 1, 5, generator=g)  # [B, T, L, d]; the state after action j is token j + 2
    rows, actions = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 2, 1, 0, 1, 3])
    targets = HiddenStateTargets.at(rows, actions, torch.randn(6, 1, 3, generator=g))
    forward = StudentForward(logits=None, states=states, layers=through.student_layers, state_offset=2)
    gathered = states[rows, actions + 2]
    halves = [targets.select([0]), targets.select([1, 2])]
    pairs = [
        (StudentForward(None, states=states[[0]], layers=(4,), state_offset=2), halves[0]),
        (StudentForward(None, states=states[[1, 2]], layers=(4,), state_offset=2), halves[1]),
    ]
    assert through.fit(pairs) == direct.fit_states(gathered, targets.teacher_states)
    torch.testing.assert_close(through.bridge.student_map, direct.bridge.student_map, atol=0, rtol=0)
    term, metrics = through.term(forward, targets, 12.0, 3)
    expected, expected_metrics = direct.term_at_states(gathered, targets, 12.0, 3)
    torch.testing.assert_close(term, expected, atol=0, rtol=0)
    assert metrics == expected_metrics
    shipped = through.shipped(targets)
    assert shipped.teacher_states.dtype == torch.float16
    assert through.received(shipped).teacher_states.dtype == torch.float32


def test_a_signal_without_state_refuses_a_state_and_the_logit_loss_needs_logits():
    signal = LogitLossSignal(GoldConfig(signal="logit"), LogitVocab())
    assert signal.state_dict() == {} and not signal.needs_fit and signal.fit([]) == {}
    signal.load_state_dict({})
    with pytest.raises(ValueError, match="no state to restore"):
        signal.load_state_dict({"student_map": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="no logits"):
        signal.term(StudentForward(logits=None), HiddenStateTargets.at(*[torch.zeros(0, dtype=torch.long)] * 2,
                    torch.zeros(0, 1, 1)), 1.0, 1)  # fmt: skip
