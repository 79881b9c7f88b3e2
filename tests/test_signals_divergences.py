"""generalized_jsd (and the reference's uld_distance) against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gold_plugin.signals import generalized_jsd
from gold_plugin.testing.references import uld_distance


def _logs(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_hand_computed_values() -> None:
    teacher, student = [0.5, 0.5], [0.9, 0.1]
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    mixture = [0.5 * 0.5 + 0.5 * 0.9, 0.5 * 0.5 + 0.5 * 0.1]  # M = beta*T + (1-beta)*S = [0.7, 0.3]
    jsd_half = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    )
    s, t = _logs(student), _logs(teacher)
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(forward, abs=1e-12)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(reverse, abs=1e-12)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd_half, abs=1e-12)
    assert mixture == pytest.approx([0.7, 0.3])
    # beta = 0.2: M = 0.2*T + 0.8*S
    m = [0.2 * a + 0.8 * b for a, b in zip(teacher, student)]
    expected = 0.2 * _kl(teacher, m) + 0.8 * _kl(student, m)
    assert generalized_jsd(s, t, 0.2).item() == pytest.approx(expected, abs=1e-12)


def test_endpoints_equal_independent_kl_batched() -> None:
    torch.manual_seed(0)
    s = torch.log_softmax(torch.randn(3, 4, 11, dtype=torch.float64) * 2, dim=-1)
    t = torch.log_softmax(torch.randn(3, 4, 11, dtype=torch.float64) * 2, dim=-1)
    forward = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # KL(T||S)
    reverse = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)  # KL(S||T)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward, atol=1e-12, rtol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse, atol=1e-12, rtol=0)
    assert generalized_jsd(s, t, 0.0).shape == (3, 4)


def test_symmetry_and_identity() -> None:
    torch.manual_seed(1)
    s = torch.log_softmax(torch.randn(5, 9, dtype=torch.float64), dim=-1)
    t = torch.log_softmax(torch.randn(5, 9, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(generalized_jsd(s, t, 0.3), generalized_jsd(t, s, 0.7), atol=1e-12, rtol=0)
    for beta in (0.0, 0.25, 0.5, 1.0):
        # Zero up to rounding of the mixture's logaddexp (exactly zero at the endpoints).
        assert torch.all(generalized_jsd(s, s, beta).abs() <= 1e-15)
        assert torch.all(generalized_jsd(s, t, beta) > 0)
    # JSD(0.5) is bounded by log 2.
    assert torch.all(generalized_jsd(s, t, 0.5) <= math.log(2))


def test_zero_probabilities_and_minus_inf_are_finite() -> None:
    s = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    t = torch.tensor(
        [[float("-inf"), math.log(0.25), math.log(0.75)]], dtype=torch.float64, requires_grad=True
    )
    s.requires_grad_()
    for beta in (0.0, 0.5, 1.0):
        # entry 0: the teacher gives it zero probability (-inf) and the student mass 1 (log 0).
        value = generalized_jsd(s, t, beta)
        assert torch.isfinite(value).all()
        grads = torch.autograd.grad(value.sum(), (s, t))
        assert all(torch.isfinite(g).all() for g in grads)
    # Entries with zero probability on both sides contribute exactly nothing.
    a = torch.tensor([float("-inf"), math.log(0.3), math.log(0.7)], dtype=torch.float64)
    b = torch.tensor([float("-inf"), math.log(0.6), math.log(0.4)], dtype=torch.float64)
    for beta in (0.0, 0.4, 1.0):
        assert generalized_jsd(a, b, beta).item() == pytest.approx(
            generalized_jsd(a[1:], b[1:], beta).item(), abs=1e-15
        )


def test_mask_drops_entries() -> None:
    s = _logs([0.2, 0.3, 0.5])
    t = _logs([0.5, 0.1, 0.4])
    mask = torch.tensor([True, False, True])
    expected = 0.5 * math.log(0.5 / 0.2) + 0.4 * math.log(0.4 / 0.5)
    assert generalized_jsd(s, t, 0.0, mask=mask).item() == pytest.approx(expected, abs=1e-12)


def test_bad_arguments() -> None:
    s = _logs([0.5, 0.5])
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, s, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(s, _logs([0.2, 0.3, 0.5]), 0.5)
    with pytest.raises(ValueError, match="Leading shapes"):
        uld_distance(torch.ones(2, 3), torch.ones(3, 3))


def test_bf16_inputs_computed_in_fp32() -> None:
    s = torch.log_softmax(torch.randn(4, 7), dim=-1)
    t = torch.log_softmax(torch.randn(4, 7), dim=-1)
    value = generalized_jsd(s.bfloat16(), t.bfloat16(), 0.5)
    assert value.dtype == torch.float32
    expected = generalized_jsd(s.bfloat16().float(), t.bfloat16().float(), 0.5)
    torch.testing.assert_close(value, expected, atol=0, rtol=0)


def test_uld_distance_direct_sorted_l1_and_padding() -> None:
    # Hand value with zero padding of the shorter (teacher) side.
    student = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    teacher = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # sorted: [0.6, 0.3, 0.1] vs [0.5, 0.5, 0] -> 0.1 + 0.2 + 0.1
    assert uld_distance(student, teacher).item() == pytest.approx(0.4, abs=1e-12)
    assert uld_distance(teacher, student).item() == pytest.approx(0.4, abs=1e-12)
    # Random batches vs a direct Python sorted-L1.
    torch.manual_seed(2)
    s = torch.softmax(torch.randn(6, 13, dtype=torch.float64), dim=-1)
    t = torch.softmax(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    got = uld_distance(s, t)
    for row in range(6):
        a = sorted(s[row].tolist(), reverse=True)
        b = sorted(t[row].tolist(), reverse=True) + [0.0] * 5
        assert got[row].item() == pytest.approx(sum(abs(x - y) for x, y in zip(a, b)), abs=1e-12)
    # Permutation invariant, zero for the same multiset of probabilities.
    perm = torch.randperm(13)
    assert torch.allclose(uld_distance(s, s[:, perm]), torch.zeros(6, dtype=torch.float64))


def test_uld_distance_gradient() -> None:
    s = torch.softmax(torch.randn(3, 5, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, t), (s,))


def test_signals_import_no_distributed_stack() -> None:
    """The core layer stays pure torch: importing it pulls in none of Ray, vLLM, DeepSpeed, OpenRLHF."""
    import subprocess
    import sys

    code = (
        "import sys, gold_plugin.signals\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'deepspeed', 'openrlhf'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
