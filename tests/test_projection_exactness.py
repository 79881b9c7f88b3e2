"""How exact the byte projection is: its claims against the exact byte marginals of a toy student.

The toy student draws every token from one distribution (:mod:`gold_plugin.testing.byte_marginal`), and the
projection sees the same logits at every position, so the sampled path's distributions are the toy's. For every
text candidate c of every position, with the teacher's whole text vocabulary as candidates:

- ``claimed``: the projection's probability that the text continues with ``b(c)`` (c's event plus the events of
  the candidates extending it);
- ``exact``: the toy's probability of the same, every student tokenisation counted (dynamic programming);
- ``on_path`` / ``one_token``: the part of ``exact`` spelled along the sampled path / by one token (enumerated).

The projection is a lower bound (``claimed <= on_path <= exact``); it is exact where the candidate's bytes have
one spelling compatible with the sampled path, and its gap is the mass of the spellings that leave the path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gold_plugin.alignment import align, encode_continuation, text_for_teacher, token_bytes
from gold_plugin.alignment.sorted_vocab import sorted_vocab
from gold_plugin.alignment.token_bytes import TokenTable
from gold_plugin.demo.tokenizers import build_tokenizer
from gold_plugin.signals.logit import (
    LogitLossOptions,
    ProjectionVocab,
    projection_inputs,
    student_event_probs,
)
from gold_plugin.testing.byte_marginal import (
    CandidateMasses,
    ProjectedPosition,
    ToyStudent,
    candidate_masses,
    on_path,
    projected_positions,
)

TOL = 1e-9  # float64 logits: the projection's sums are float64
MAX_CHAIN = 4
TASK_BYTES = set(b"0123456789+=")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The local experiment's tokenizers (``gold_plugin.demo.tokenizers.PAIRS`` combines them)."""
    root = tmp_path_factory.mktemp("tok")
    return {kind: build_tokenizer(kind, root / kind) for kind in ("digits", "student_digits", "merged")}


def _table(pieces: list[str]) -> TokenTable:
    """A hand-made byte-level vocabulary; id 0 is a zero-width special token."""
    data = [b""] + [p.encode() for p in pieces]
    special = np.zeros(len(data), dtype=bool)
    special[0] = True
    return TokenTable(
        name="hand",
        kind="byte_level",
        token_bytes=data,
        byte_lengths=np.array([len(d) for d in data], dtype=np.int64),
        special=special,
        byte_fallback=np.zeros(len(data), dtype=bool),
        adds_prefix_space=False,
        fingerprint=hash(("byte_level", tuple(data))),
    )


def _text_ids(tokenizer) -> np.ndarray:
    """Every teacher id with text: the candidates of every position (the whole vocabulary, so that each
    student token's bytes have a candidate and the projection's remainder holds only what it cannot compute)."""
    table = token_bytes(tokenizer)
    return np.array([i for i, b in enumerate(table) if b], dtype=np.int64)


def _task_logits(student, generator: torch.Generator) -> torch.Tensor:
    """One random logit row, most of its mass on the task's tokens (digits, "+", "=") and some on EOS."""
    table = token_bytes(student)
    task = torch.tensor([bool(b) and set(b) <= TASK_BYTES for b in table], dtype=torch.float64)
    row = torch.randn(len(table), generator=generator, dtype=torch.float64) + 6.0 * task
    row[0 if isinstance(student, TokenTable) else student.eos_token_id] += 3.0
    return row


def _measure(
    student, teacher, samples: list[tuple[list[int], list[int]]], row: torch.Tensor
) -> tuple[list[ProjectedPosition], list[bytes], list[CandidateMasses], ToyStudent]:
    """Projection inputs of ``samples`` (student ids, teacher ids) with every text candidate at every position,
    the same logits ``row`` at every position, and the masses of every position's candidates."""
    candidates = _text_ids(teacher)
    k = candidates.shape[0]
    alignments = [align(student, s, teacher, t) for s, t in samples]
    assert all(a.aligned for a in alignments), [a.reason for a in alignments]
    width = max(len(s) for s, _ in samples)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for b, (s, _) in enumerate(samples):
        mask[b, : len(s)] = True
    vocab = sorted_vocab(student, teacher)
    inputs = projection_inputs(
        vocab,
        alignments,
        [np.asarray(s) for s, _ in samples],
        [np.tile(candidates, (len(t), 1)) for _, t in samples],
        [np.full((len(t), k), -np.log(k), dtype=np.float32) for _, t in samples],
        mask,
        max_chain=MAX_CHAIN,
    )
    logits = row.expand(len(samples), width, row.shape[0]).contiguous()
    probs, _ = student_event_probs(logits, inputs, LogitLossOptions(), ProjectionVocab.from_sorted(vocab))
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    positions = projected_positions(inputs, alignments, [s for s, _ in samples], s_bytes, mask)
    toy = ToyStudent.from_logits(s_bytes, row)
    keys = [t_bytes[int(c)] for c in candidates]
    masses = [
        candidate_masses(toy, pos, keys, probs[p, :k], max_chain=MAX_CHAIN) for p, pos in enumerate(positions)
    ]
    realised = [t_bytes[samples[pos.sample][1][pos.teacher_index]] for pos in positions]
    return positions, realised, masses, toy


def _stack(masses: list[CandidateMasses], name: str) -> np.ndarray:
    return np.stack([getattr(m, name) for m in masses])


def _check_lower_bound(masses: list[CandidateMasses]) -> None:
    """``0 <= projected <= claimed <= on_path <= exact`` at every text candidate: the projection counts nothing that
    leaves the sampled path, and so is a lower bound of the exact byte marginal."""
    projected, claimed = _stack(masses, "projected"), _stack(masses, "claimed")
    path, exact = _stack(masses, "on_path"), _stack(masses, "exact")
    text = ~np.isnan(exact)
    assert text.any() and (~np.isnan(claimed) == text).all()
    assert projected[text].min() >= -TOL
    assert (projected[text] <= claimed[text] + TOL).all()
    assert (claimed[text] <= path[text] + TOL).all(), np.max(claimed[text] - path[text])
    assert (path[text] <= exact[text] + TOL).all()
    assert (claimed[text] <= exact[text] + TOL).all()


def _samples(student, teacher, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    out = []
    for text in texts:
        s_ids = list(student.encode(text, add_special_tokens=False)) + [student.eos_token_id]
        t_ids = encode_continuation(teacher, text_for_teacher(student, s_ids)) + [teacher.eos_token_id]
        out.append((s_ids, t_ids))
    return out


TEXTS = ["12+30=240", "99+47=641", "05+05=010"]


# --- the reference itself -------------------------------------------------------------------------------------


def test_dynamic_programming_equals_the_enumerated_tokenisations(tokenizers):
    student = tokenizers["merged"]
    toy = ToyStudent.from_logits(
        token_bytes(student), _task_logits(student, torch.Generator().manual_seed(0))
    )
    cases = [(b"4", b""), (b"42", b""), (b"123", b""), (b"2+3", b""), (b"2", b"4"), (b"34", b"1")]
    for text, consumed in cases:
        spellings = toy.tokenisations(text, consumed)
        total = sum(toy.probability(t, consumed) for t in spellings)
        assert total == pytest.approx(toy.text_probability(text, consumed), rel=1e-12, abs=0)
        assert len(set(spellings)) == len(spellings) and all(
            (token_bytes(student)[t[0]]).startswith(consumed) for t in spellings
        )
    # "123" after a token boundary (no three-digit token): "12" "3...", "1" "23...", "1" "2" "3...".
    one, two, three, twelve, twenty_three = student.convert_tokens_to_ids(["1", "2", "3", "12", "23"])
    spellings = toy.tokenisations(b"123")
    assert {t[:-1] for t in spellings} == {(twelve,), (one,), (one, two)}
    table = token_bytes(student)
    last = {t[-1] for t in spellings if t[:-1] == (one, two)}  # the last token may run past "3"
    assert last == {i for i, b in enumerate(table) if b.startswith(b"3")} and three in last
    assert (one, twenty_three) in spellings
    # The text continues with exactly one first byte, or ends (a zero-width token).
    ends = float(toy.probs[[i for i, b in enumerate(token_bytes(student)) if not b]].sum())
    assert sum(toy.text_probability(bytes([x])) for x in range(256)) == pytest.approx(1 - ends, abs=1e-12)
    assert sum(toy.text_probability(bytes([x]), b"4") for x in range(256)) == pytest.approx(1.0, abs=1e-12)
    assert on_path((5, 7, 9), (5, 7, 1), MAX_CHAIN) and not on_path((5, 8, 9), (5, 7, 1), MAX_CHAIN)
    assert not on_path((5, 7), (5,), MAX_CHAIN)  # the last token's position is beyond the sampled path


# --- tokenizer pairs of the local experiment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "teacher_kind,student_kind",
    [("digits", "student_digits"), ("digits", "merged")],
    ids=["digits", "merged_student"],
)
def test_single_byte_teacher_candidates_are_exact(tokenizers, teacher_kind, student_kind):
    """Every candidate is one byte: after the consumed bytes one student token spells it, on any path (the merged
    student's "42" is counted by the range of tokens starting with "4"), so the projection is the exact marginal."""
    teacher, student = tokenizers[teacher_kind], tokenizers[student_kind]
    samples = _samples(student, teacher, TEXTS)
    positions, _, masses, _ = _measure(
        student, teacher, samples, _task_logits(student, torch.Generator().manual_seed(1))
    )
    _check_lower_bound(masses)
    projected, claimed, exact = (_stack(masses, n) for n in ("projected", "claimed", "exact"))
    text = ~np.isnan(exact)
    np.testing.assert_allclose(claimed[text], exact[text], rtol=0, atol=TOL)
    np.testing.assert_allclose(projected[text], exact[text], rtol=0, atol=TOL)  # no candidate extends another
    assert exact[text].max() > 0.05
    consumed = [p for p in positions if p.consumed]
    assert bool(consumed) == (student_kind == "merged")  # teacher digits inside the student's merged tokens


def test_same_tokenizer_counts_the_one_token_spellings(tokenizers):
    """Every candidate is a student token, so the projection never chains: it counts the one-token spellings, all
    of the exact marginal for one-byte candidates. A multi-byte candidate also has multi-token spellings ("4", "2"
    for "42"), which the projection leaves to the remainder, even where the sampled path spells it that way."""
    tok = tokenizers["merged"]
    samples = _samples(tok, tok, TEXTS)
    four, two, forty_two = tok.convert_tokens_to_ids(["4", "2", "42"])
    canonical = tok.encode("3+42", add_special_tokens=False)
    assert forty_two in canonical
    split = canonical[: canonical.index(forty_two)] + [four, two, tok.eos_token_id]
    samples.append((split, canonical + [tok.eos_token_id]))  # a sampled path "4", "2" against the token "42"
    positions, _, masses, toy = _measure(
        tok, tok, samples, _task_logits(tok, torch.Generator().manual_seed(2))
    )
    _check_lower_bound(masses)
    claimed, exact, single = (_stack(masses, n) for n in ("claimed", "exact", "one_token"))
    text = ~np.isnan(exact)
    np.testing.assert_allclose(claimed[text], single[text], rtol=0, atol=TOL)
    keys = [b for b in token_bytes(tok) if b]
    one_byte = np.array([len(b) == 1 for b in keys])[None, :] & text
    np.testing.assert_allclose(claimed[one_byte], exact[one_byte], rtol=0, atol=TOL)
    assert (exact - claimed)[text & ~one_byte].max() > 1e-3  # strict: the multi-token spellings
    # The split sample, at the student's "4" (the teacher's "42"): the spelling "4", "2" is on the path but not counted.
    [p] = [
        p for p, pos in enumerate(positions) if pos.sample == len(samples) - 1 and pos.path[:2] == (four, two)
    ]
    c = keys.index(b"42")
    on_path_gap = masses[p].on_path[c] - masses[p].claimed[c]
    assert on_path_gap == pytest.approx(toy.probs[four] * toy.text_probability(b"2"), rel=1e-9)


def test_merged_teacher_counts_every_spelling_on_the_sampled_path(tokenizers):
    """The student writes digits one by one, the teacher's candidates are digit pairs: the chain rule counts the
    pair when the sampled digits spell it, and the gap is exactly the spellings that leave the sampled path."""
    teacher, student = tokenizers["merged"], tokenizers["student_digits"]
    samples = _samples(student, teacher, TEXTS)
    positions, realised, masses, toy = _measure(
        student, teacher, samples, _task_logits(student, torch.Generator().manual_seed(3))
    )
    _check_lower_bound(masses)
    claimed, path, exact = (_stack(masses, n) for n in ("claimed", "on_path", "exact"))
    text = ~np.isnan(exact)
    np.testing.assert_allclose(claimed[text], path[text], rtol=0, atol=TOL)  # gap == the off-path spellings
    assert (exact - claimed)[text].max() > 1e-3  # strict somewhere
    # The teacher's realised next token: its digits are the sampled ones, so the projection is exact for it.
    keys = [b for b in token_bytes(teacher) if b]
    chained = 0
    for p, pos in enumerate(positions):
        key = realised[p]
        if not key:
            continue
        c = keys.index(key)
        assert masses[p].claimed[c] == pytest.approx(masses[p].exact[c], rel=0, abs=TOL)
        chained += len(key) > 1
        # A pair the path cannot start: "4" "2" leaves the path unless the student sampled "4" here.
        c42 = keys.index(b"42")
        if toy.token_bytes[pos.path[0]] != b"4":
            assert masses[p].claimed[c42] == pytest.approx(0.0, abs=TOL)
            assert masses[p].exact[c42] == pytest.approx(toy.text_probability(b"42"), rel=1e-12)
            assert masses[p].exact[c42] > 1e-3
    assert chained >= 3


# --- a hand-made pair with several spellings -----------------------------------------------------------------


def test_hand_made_pair_gap_is_the_spelling_that_leaves_the_path():
    """Student tokens "1", "2", "3", "+", "23"; teacher tokens "1", "2", "3", "+", "12", "123". "123" is spelled
    "1" "23..." or "1" "2" "3...". The student sampled "1", "23", "+", "1", "2", "3"; the teacher wrote "12",
    "3", "+", "123"."""
    student = _table(["1", "2", "3", "+", "23"])
    teacher = _table(["1", "2", "3", "+", "12", "123"])
    s1, s2, s3, plus, s23 = 1, 2, 3, 4, 5
    s_ids = [s1, s23, plus, s1, s2, s3, 0]
    t_ids = [5, 3, 4, 6, 0]
    row = torch.log(torch.tensor([0.05, 0.3, 0.2, 0.15, 0.1, 0.2], dtype=torch.float64))
    positions, realised, masses, toy = _measure(student, teacher, [(s_ids, t_ids)], row)
    _check_lower_bound(masses)
    p = toy.probs
    keys = [b"1", b"2", b"3", b"+", b"12", b"123"]
    c12, c123 = keys.index(b"12"), keys.index(b"123")
    at = {(pos.student_index, pos.consumed): masses[q] for q, pos in enumerate(positions)}
    assert set(at) == {(0, b""), (1, b"2"), (2, b""), (3, b""), (6, b"")}

    # i = 0, path "1", "23": "1" "2" "3..." leaves the path at i + 1; it is the whole gap.
    first = at[(0, b"")]
    assert first.projected[c123] == pytest.approx(p[s1] * p[s23], rel=1e-12)
    assert first.exact[c123] == pytest.approx(p[s1] * p[s23] + p[s1] * p[s2] * p[s3], rel=1e-12)
    off_path = [t for t in toy.tokenisations(b"123") if not on_path(t, positions[0].path, MAX_CHAIN)]
    assert off_path == [(s1, s2, s3)]
    assert first.exact[c123] - first.claimed[c123] == pytest.approx(p[s1] * p[s2] * p[s3], rel=1e-9)
    # "12" is spelled "1" then "2..." (the chain's range at i + 1 holds "2" and "23"): on the path, exact.
    assert first.claimed[c12] == pytest.approx(first.exact[c12], rel=1e-12)
    assert first.exact[c12] == pytest.approx(p[s1] * (p[s2] + p[s23]), rel=1e-12)

    # i = 3, path "1", "2", "3": both spellings of "123" follow it (ranges at i + 1 and i + 2): exact.
    second = at[(3, b"")]
    assert second.claimed[c123] == pytest.approx(second.exact[c123], rel=1e-12)
    assert second.exact[c123] == pytest.approx(p[s1] * (p[s23] + p[s2] * p[s3]), rel=1e-12)

    # Inside the student's "23" (consumed "2"): only "23" goes on, so the teacher's "3" is certain.
    inside = at[(1, b"2")]
    assert inside.claimed[keys.index(b"3")] == pytest.approx(1.0, rel=1e-12) == inside.exact[keys.index(b"3")]
    for masses_at in at.values():  # exact wherever every spelling follows the path
        every = np.isclose(masses_at.on_path, masses_at.exact, rtol=0, atol=TOL)
        np.testing.assert_allclose(masses_at.claimed[every], masses_at.exact[every], rtol=0, atol=TOL)
