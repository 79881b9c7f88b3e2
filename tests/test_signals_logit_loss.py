"""The aligned logit loss: hand values, reference equality, gradients, chunking, numerics, masks."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from gold_plugin.config import GoldConfig
from gold_plugin.signals import LogitLoss, LogitLossOptions, aligned_logit_loss
from gold_plugin.testing.references import aligned_logit_loss_reference


def _loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mapping: torch.Tensor | None,
    options: LogitLossOptions = LogitLossOptions(),
) -> LogitLoss:
    """The loss at every row of ``[N, V]`` logits: one sample ``[1, N, V]`` (a view), positions (0, 0) .. (0, N-1)."""
    n = logits.shape[0]
    positions = torch.stack([torch.zeros(n, dtype=torch.int64), torch.arange(n)], dim=1)
    return aligned_logit_loss(logits[None], ids, logprobs, mapping, positions=positions, options=options)


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed case. Student vocabulary of 4 with probabilities [0.4, 0.3, 0.2, 0.1]; teacher vocabulary of 4 with
# teacher 0 -> student 1, teacher 1 -> student 0, teachers 2 and 3 unmatched (adaptive weights 2/4 and 2/4).
# Teacher top-3: id 0 (0.5), id 2 (0.3), id 1 (0.1).
# ----------------------------------------------------------------------------------------------------------------
STUDENT_PROBS = [0.4, 0.3, 0.2, 0.1]
MAP = torch.tensor([1, 0, -1, -1])
TOP_IDS = torch.tensor([[0, 2, 1]])
TOP_LOGPROBS = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.1)]], dtype=torch.float64)


def _student_logits() -> torch.Tensor:
    return (
        torch.tensor([STUDENT_PROBS], dtype=torch.float64).log() + 1.7
    )  # a shift does not change the softmax


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# Matched support: student ids 1 and 0 plus the rest bucket.
T_MATCHED = [0.5, 0.1, 1 - 0.6]
S_MATCHED = [0.3, 0.4, 1 - 0.7]
# ULD: student unmatched ids {2, 3} -> [0.2, 0.1] vs teacher unmatched slots [0.3] (zero-padded).
ULD_HAND = abs(0.2 - 0.3) + abs(0.1 - 0.0)


@pytest.mark.parametrize(
    ("beta", "matched_hand"),
    [
        (0.0, _kl(T_MATCHED, S_MATCHED)),
        (1.0, _kl(S_MATCHED, T_MATCHED)),
        (
            0.5,
            0.5 * _kl(T_MATCHED, [(a + b) / 2 for a, b in zip(T_MATCHED, S_MATCHED)])
            + 0.5 * _kl(S_MATCHED, [(a + b) / 2 for a, b in zip(T_MATCHED, S_MATCHED)]),
        ),
    ],
)
def test_hand_computed_hybrid(beta: float, matched_hand: float) -> None:
    out = _loss(_student_logits(), TOP_IDS, TOP_LOGPROBS, MAP, LogitLossOptions(beta=beta))
    assert out.matched.item() == pytest.approx(matched_hand, abs=1e-12)
    assert out.unmatched.item() == pytest.approx(ULD_HAND, abs=1e-12)
    assert (out.matched_weight, out.unmatched_weight) == (0.5, 0.5)
    assert out.loss.item() == pytest.approx(0.5 * matched_hand + 0.5 * ULD_HAND, abs=1e-12)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_hand_value_does_not_depend_on_the_order_of_top_k_slots(order: tuple[int, ...]) -> None:
    # An unmatched slot (teacher id 2) must never hide the matched student id 0 (teacher id 1), whatever comes first.
    index = list(order)
    expected = 0.5 * _kl(T_MATCHED, S_MATCHED) + 0.5 * ULD_HAND
    options = LogitLossOptions(beta=0.0)
    ours = _loss(_student_logits(), TOP_IDS[:, index], TOP_LOGPROBS[:, index], MAP, options).loss
    reference = aligned_logit_loss_reference(
        _student_logits(), TOP_IDS[:, index], TOP_LOGPROBS[:, index], MAP, options=options
    )
    for name, loss in (("aligned_logit_loss", ours), ("aligned_logit_loss_reference", reference)):
        assert loss.item() == pytest.approx(expected, abs=1e-12), name


def test_hand_computed_trl_normalisation_and_fixed_weights() -> None:
    out = _loss(
        _student_logits(),
        TOP_IDS,
        TOP_LOGPROBS,
        MAP,
        LogitLossOptions(beta=0.0, matched_normalization="none", matched_weight=2.0, unmatched_weight=3.0),
    )
    raw = 0.5 * math.log(0.5 / 0.3) + 0.1 * math.log(0.1 / 0.4)  # no rest bucket, no renormalisation
    assert out.matched.item() == pytest.approx(raw, abs=1e-12)
    assert out.loss.item() == pytest.approx(2.0 * raw + 3.0 * ULD_HAND, abs=1e-12)


def test_hand_computed_positional_uld() -> None:
    out = _loss(_student_logits(), TOP_IDS, TOP_LOGPROBS, None, LogitLossOptions(alignment="positional"))
    # sorted teacher top-3 [0.5, 0.3, 0.1, 0] vs sorted student [0.4, 0.3, 0.2, 0.1]
    assert out.loss.item() == pytest.approx(0.1 + 0.0 + 0.1 + 0.1, abs=1e-12)
    assert out.matched.item() == 0.0


def test_duplicate_teacher_ids_merge_onto_one_student_id() -> None:
    # Teacher ids 0 and 3 both map to student 1: their probabilities (0.5 + 0.05) are compared with p_s(1) = 0.3.
    mapping = torch.tensor([1, 0, -1, 1])
    ids = torch.tensor([[0, 2, 1, 3]])
    logprobs = torch.tensor([[0.5, 0.3, 0.1, 0.05]], dtype=torch.float64).log()
    out = _loss(_student_logits(), ids, logprobs, mapping, LogitLossOptions(beta=0.0))
    expected = _kl([0.55, 0.1, 0.35], [0.3, 0.4, 0.3])
    assert out.matched.item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Random cases against the full-vocabulary reference.
# ----------------------------------------------------------------------------------------------------------------


def _random_case(
    n: int = 9,
    vocab: int = 37,
    teacher_vocab: int = 45,
    k: int = 7,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mapping = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    perm = torch.randperm(vocab, generator=gen)
    mapping[: vocab * 2 // 3] = perm[: vocab * 2 // 3]
    mapping[teacher_vocab - 1] = perm[0]  # many-to-one, as canonical bytes allow
    teacher_logits = torch.randn(n, teacher_vocab, generator=gen, dtype=torch.float64) * 2
    values, ids = torch.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    ids[1, k // 2 :] = -1  # padded slots
    values[1, k // 2 :] = float("nan")  # garbage in padded slots is ignored
    student = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return student, ids, values, mapping


OPTION_SETS = [
    {},
    {"beta": 0.0},
    {"beta": 1.0},
    {"beta": 0.3, "student_temperature": 1.7, "teacher_temperature": 0.6},
    {"matched_normalization": "none", "beta": 0.5},
    {"matched_weight": 0.2, "unmatched_weight": 1.5},
    {"alignment": "positional"},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_chunked_equals_reference_forward_and_gradient(options: dict) -> None:
    logits, ids, values, mapping = _random_case()
    weights = torch.linspace(0.5, 2.0, logits.shape[0], dtype=torch.float64)
    ref_logits = logits.clone().requires_grad_()
    ref = aligned_logit_loss_reference(
        ref_logits, ids, values.nan_to_num(), mapping, options=LogitLossOptions(**options)
    )
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_logits)
    for chunk in (1, 4, 1024):
        ours_logits = logits.clone().requires_grad_()
        out = _loss(ours_logits, ids, values, mapping, LogitLossOptions(chunk_size=chunk, **options))
        (grad,) = torch.autograd.grad((out.loss * weights).sum(), ours_logits)
        torch.testing.assert_close(out.loss, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    assert out.valid.all()


def test_chunked_equals_unchunked_fp32() -> None:
    logits, ids, values, mapping = _random_case(n=33, vocab=301, teacher_vocab=280, k=16, dtype=torch.float32)
    results = []
    for chunk in (5, 33):
        x = logits.clone().requires_grad_()
        out = _loss(x, ids, values.float(), mapping, LogitLossOptions(chunk_size=chunk))
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        results.append((out.loss, grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options", [{}, {"beta": 0.0}, {"beta": 1.0, "student_temperature": 0.7}, {"alignment": "positional"}]
)
def test_gradcheck_float64(options: dict) -> None:
    logits, ids, values, mapping = _random_case(n=4, vocab=11, teacher_vocab=13, k=5, seed=1)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: _loss(x, ids, values, mapping, LogitLossOptions(chunk_size=3, **options)).loss, (logits,)
    )


def test_three_d_logits_with_positions_equal_gathered_form() -> None:
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(2, 6, 37, generator=gen, dtype=torch.float64)
    positions = torch.tensor([[0, 1], [0, 4], [1, 0], [1, 5], [1, 2]])
    _, ids, values, mapping = _random_case(n=5)
    x = full.clone().requires_grad_()
    out = aligned_logit_loss(
        x, ids, values, mapping, positions=positions, options=LogitLossOptions(chunk_size=2)
    )
    (grad,) = torch.autograd.grad(out.loss.sum(), x)
    y = full.clone().requires_grad_()
    gathered = y[positions[:, 0], positions[:, 1]]
    ref = _loss(gathered, ids, values, mapping)
    (ref_grad,) = torch.autograd.grad(ref.loss.sum(), y)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    untouched = torch.ones(2, 6, dtype=torch.bool)
    untouched[positions[:, 0], positions[:, 1]] = False
    assert torch.all(grad[untouched] == 0)


def test_masked_positions_cost_nothing_and_get_exact_zeros() -> None:
    logits, ids, values, mapping = _random_case()
    ids[[0, 5, 7]] = -1  # no teacher slot at all: masked
    values[0, 0] = float("nan")  # garbage in padded slots is ignored
    poisoned = logits.clone()
    poisoned[[0, 5]] = float("nan")  # never read
    x = poisoned.requires_grad_()
    out = _loss(x, ids, values, mapping, LogitLossOptions(chunk_size=3))
    (grad,) = torch.autograd.grad(out.loss.sum(), x)
    assert out.valid.tolist() == [False, True, True, True, True, False, True, False, True]
    for row in (0, 5, 7):
        assert out.loss[row].item() == 0.0
        assert torch.all(grad[row] == 0)
    assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all()
    ref = _loss(logits, ids, values, mapping)
    keep = out.valid
    torch.testing.assert_close(out.loss[keep], ref.loss[keep], atol=1e-12, rtol=0)


def test_padded_slots_equal_narrower_top_k() -> None:
    logits, ids, values, mapping = _random_case(k=6)
    narrow = _loss(logits[:1], ids[:1, :3], values[:1, :3], mapping)
    padded_ids = ids[:1].clone()
    padded_ids[:, 3:] = -1
    padded_values = values[:1].clone()
    padded_values[:, 3:] = float("inf")
    padded = _loss(logits[:1], padded_ids, padded_values, mapping)
    assert padded.loss.item() == pytest.approx(narrow.loss.item(), abs=1e-12)


def test_minus_inf_logits_give_finite_loss_and_gradient() -> None:
    logits, ids, values, mapping = _random_case(dtype=torch.float32)
    logits = logits.clone()
    slot = int((mapping[ids[0]] >= 0).nonzero()[0])
    student_image = mapping[ids[0, slot]]
    logits[0, student_image] = float("-inf")  # the teacher's top token maps to a student id of probability 0
    logits[:, -3:] = float("-inf")  # padded vocabulary columns
    for options in ({"beta": 0.0}, {"beta": 0.5}, {"beta": 1.0}, {"alignment": "positional"}):
        x = logits.clone().requires_grad_()
        out = _loss(x, ids, values.float(), mapping, LogitLossOptions(**options))
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        assert torch.isfinite(out.loss).all(), options
        assert torch.isfinite(grad).all(), options
        assert torch.all(grad[:, -3:] == 0)
    # Forward KL pays about 80 nats per unit of teacher mass on a zero-probability student token.
    forward = _loss(
        logits,
        ids,
        values.float(),
        mapping,
        LogitLossOptions(beta=0.0, matched_weight=1.0, unmatched_weight=0.0),
    )
    assert forward.loss[0].item() > 80.0 * values[0, slot].exp().item() * 0.9


def test_bf16_logits_computed_in_fp32() -> None:
    logits, ids, values, mapping = _random_case(n=12, vocab=200, teacher_vocab=190, k=10, dtype=torch.float32)
    low = logits.bfloat16().requires_grad_()
    out = _loss(low, ids, values.float(), mapping, LogitLossOptions(chunk_size=5))
    (grad,) = torch.autograd.grad(out.loss.sum(), low)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    upcast = low.detach().float().requires_grad_()
    ref = _loss(upcast, ids, values.float(), mapping, LogitLossOptions(chunk_size=5))
    (ref_grad,) = torch.autograd.grad(ref.loss.sum(), upcast)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad.float(), ref_grad.bfloat16().float(), atol=0, rtol=0)


def test_options_from_gold_config() -> None:
    logits, ids, values, mapping = _random_case()
    config = GoldConfig(
        beta=0.2,
        uld_hybrid_matched_weight=0.7,
        uld_hybrid_unmatched_weight=0.4,
        uld_student_temperature=1.3,
        uld_teacher_temperature=0.9,
        logit_chunk_size=2,
    )
    options = LogitLossOptions.from_config(config)
    explicit = LogitLossOptions(
        beta=0.2,
        matched_weight=0.7,
        unmatched_weight=0.4,
        student_temperature=1.3,
        teacher_temperature=0.9,
        chunk_size=2,
    )
    assert options == explicit
    from_config = _loss(logits, ids, values, mapping, options)
    torch.testing.assert_close(
        from_config.loss, _loss(logits, ids, values, mapping, explicit).loss, atol=0, rtol=0
    )
    # The training step's student temperature (the logits' own temperature undone) replaces the config's.
    hotter = LogitLossOptions.from_config(config, student_temperature=2.0)
    assert hotter == dataclasses.replace(explicit, student_temperature=2.0)
    overridden = _loss(logits, ids, values, mapping, hotter)
    assert not torch.allclose(overridden.loss, from_config.loss)


def test_teacher_ids_beyond_the_map_are_unmatched_not_an_error() -> None:
    # A teacher model's logits are often wider than its tokenizer (padded embedding rows), so its top-k can name
    # an id that teacher_to_student does not cover. Like VocabMap.map_teacher_ids, such an id is unmatched (ULD).
    logits, ids, values, mapping = _random_case()
    beyond = ids.clone()
    beyond[0, -1] = mapping.shape[0] + 3
    padded_map = torch.cat([mapping, torch.full((10,), -1, dtype=torch.int64)])
    out = _loss(logits, beyond, values, mapping)
    weights = LogitLossOptions(matched_weight=out.matched_weight, unmatched_weight=out.unmatched_weight)
    expected = _loss(logits, beyond, values, padded_map, weights)
    torch.testing.assert_close(out.loss, expected.loss, atol=0, rtol=0)
    # Adaptive weights stay the matched share of the teacher's vocabulary.
    assert out.matched_weight == pytest.approx(float((mapping >= 0).sum()) / mapping.shape[0])


def test_clear_errors() -> None:
    logits, ids, values, mapping = _random_case()
    with pytest.raises(ValueError, match="teacher_to_student"):
        _loss(logits, ids, values, None)
    with pytest.raises(ValueError, match="student logits have 37 columns"):
        _loss(logits, ids, values, mapping + 100)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        _loss(logits, ids, values[:, :2], mapping)
    with pytest.raises(ValueError, match="NaN"):
        bad = values.clone()
        bad[0, 0] = float("nan")
        _loss(logits, ids, bad, mapping)
    options = LogitLossOptions()
    rows = torch.stack([torch.zeros(9, dtype=torch.int64), torch.arange(9)], dim=1)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        aligned_logit_loss(logits, ids, values, mapping, positions=rows, options=options)
    with pytest.raises(ValueError, match=r"positions must be \[N, 2\]"):
        aligned_logit_loss(logits[None], ids, values, mapping, positions=torch.arange(9), options=options)
    with pytest.raises(ValueError, match="positions out of range"):
        aligned_logit_loss(logits[None], ids, values, mapping, positions=rows + 1, options=options)
    with pytest.raises(ValueError, match="8 teacher rows for 9"):
        aligned_logit_loss(logits[None], ids[:8], values[:8], mapping, positions=rows, options=options)
    # Out-of-range option values (beta, one hybrid weight without the other, ...) are refused where options come
    # from: GoldConfig.validate, each error naming the --gold option (tests/test_config.py).


def test_identical_distributions_give_zero_loss() -> None:
    torch.manual_seed(5)
    vocab = 64
    logits = torch.randn(6, vocab) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    values, ids = logprobs.topk(16, dim=-1)
    identity = torch.arange(vocab)
    x = logits.clone().requires_grad_()
    for beta in (0.0, 0.5, 1.0):
        out = _loss(x, ids, values, identity, LogitLossOptions(beta=beta))
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        assert out.loss.abs().max().item() < 1e-6
        assert grad.abs().max().item() < 1e-5
