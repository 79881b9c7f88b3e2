"""Exact byte marginals of a toy student: what the byte projection counts, and what it leaves out (tests only).

At a teacher position the byte projection (:mod:`gold_plugin.signals.logit.byte_projection`) claims the
student's probability that the text continues with each teacher candidate's bytes, assembled from the student's
distributions at the sampled path's positions (ranges of the byte-sorted vocabulary, and a chain rule along the
sampled tokens). A tokenisation of the candidate's bytes that leaves the sampled path needs a distribution the
projection does not have, so its claims are lower bounds. To measure the bound, this module takes a toy student
whose every next-token distribution is one fixed ``q`` (independent of position and context): then the
distribution after any prefix is known, and the exact probability that the text continues with bytes ``w`` is a
sum over every student tokenisation of ``w`` (the last token may run past ``w``'s end):

- :meth:`ToyStudent.text_probability`: that sum by dynamic programming over byte offsets of ``w``;
- :meth:`ToyStudent.tokenisations`: the tokenisations themselves, enumerated (their probabilities add up to the
  same number), to split the exact value into the spellings on the sampled path and those off it;
- :func:`projected_positions`: which student position, consumed bytes and sampled path each row of
  :class:`~gold_plugin.signals.logit.byte_projection_inputs.ProjectionInputs` has (recovered from the alignment);
- :func:`subtree_mass`: the projection's claim for "the text continues with ``b(c)``": candidate c's event
  probability plus those of the candidates whose bytes extend ``b(c)`` (the events are disjoint and nest).

Zero-width (special) tokens end the text in the toy, so they never continue it. Nothing in the production
packages imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gold_plugin.alignment.result import Alignment


class ToyStudent:
    """A student that draws every token from ``probs`` (``[V]``) whatever came before; tokens are ``token_bytes``."""

    def __init__(self, token_bytes: Sequence[bytes], probs: Any) -> None:
        self.token_bytes = list(token_bytes)
        self.probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        if self.probs.shape[0] != len(self.token_bytes):
            raise ValueError(f"{self.probs.shape[0]} probabilities for {len(self.token_bytes)} tokens.")
        self._starts: dict[bytes, float] = {}  # mass of the tokens whose bytes start with the key
        self._exact: dict[bytes, float] = {}  # mass of the tokens whose bytes are the key
        self._by_first: dict[int, list[int]] = {}  # non-empty tokens by their first byte
        for token, data in enumerate(self.token_bytes):
            if not data:
                continue
            p = float(self.probs[token])
            self._exact[data] = self._exact.get(data, 0.0) + p
            for end in range(1, len(data) + 1):
                self._starts[data[:end]] = self._starts.get(data[:end], 0.0) + p
            self._by_first.setdefault(data[0], []).append(token)
        self._memo: dict[bytes, float] = {b"": 1.0}

    @classmethod
    def from_logits(cls, token_bytes: Sequence[bytes], logits: Any, temperature: float = 1.0) -> ToyStudent:
        row = torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
        return cls(token_bytes, torch.softmax(row / temperature, dim=0).numpy())

    def _from_boundary(self, text: bytes) -> float:
        """P(the text after a token boundary starts with ``text``): every first token and what it leaves."""
        if text in self._memo:
            return self._memo[text]
        # Offsets from the end, so every suffix is known before it is needed.
        for start in range(len(text) - 1, -1, -1):
            rest = text[start:]
            if rest in self._memo:
                continue
            total = self._starts.get(rest, 0.0)
            for cut in range(1, len(rest)):
                total += self._exact.get(rest[:cut], 0.0) * self._memo[rest[cut:]]
            self._memo[rest] = total
        return self._memo[text]

    def condition_mass(self, consumed: bytes) -> float:
        """P(the first token starts with ``consumed`` and goes beyond it); 1 for ``consumed == b""``."""
        if not consumed:
            return 1.0
        return self._starts.get(consumed, 0.0) - self._exact.get(consumed, 0.0)

    def text_probability(self, text: bytes, consumed: bytes = b"") -> float:
        """P(the text continues with ``text``), given that the first token starts with ``consumed`` and goes on.

        Dynamic programming over the byte offsets of ``text`` (every tokenisation counted once).
        """
        if not text:
            return 1.0
        den = self.condition_mass(consumed)
        if den <= 0:
            raise ValueError(f"No probability left after conditioning on {consumed!r}.")
        if not consumed:
            return self._from_boundary(text)
        # The first token holds ``consumed`` and at least one more byte: it covers all of ``text``, or a proper
        # prefix of it that the rest continues after a token boundary.
        total = self._starts.get(consumed + text, 0.0)
        for cut in range(1, len(text)):
            total += self._exact.get(consumed + text[:cut], 0.0) * self._from_boundary(text[cut:])
        return total / den

    def tokenisations(self, text: bytes, consumed: bytes = b"") -> list[tuple[int, ...]]:
        """Every token sequence that spells ``text`` after ``consumed``: all tokens but the last end inside it, the
        last one covers its end (and may run past it). The first token starts with ``consumed``, longer."""
        if not text:
            raise ValueError("tokenisations of empty text are not defined.")
        out: list[tuple[int, ...]] = []
        head = consumed + text[:1]
        for token in self._by_first.get(head[0], []):
            data = self.token_bytes[token]
            if len(data) <= len(consumed) or not data.startswith(consumed):
                continue
            piece = data[len(consumed) :]
            if piece.startswith(text):
                out.append((token,))
            elif text.startswith(piece):
                out.extend((token, *rest) for rest in self._after(text[len(piece) :]))
        return out

    def _after(self, text: bytes) -> Iterator[tuple[int, ...]]:
        for token in self._by_first.get(text[0], []):
            data = self.token_bytes[token]
            if data.startswith(text):
                yield (token,)
            elif text.startswith(data):
                for rest in self._after(text[len(data) :]):
                    yield (token, *rest)

    def probability(self, tokens: Sequence[int], consumed: bytes = b"") -> float:
        """P(the next tokens are ``tokens``), the first one conditioned like :meth:`text_probability`."""
        return float(np.prod(self.probs[list(tokens)])) / self.condition_mass(consumed)


def on_path(tokens: Sequence[int], path: Sequence[int], max_chain: int) -> bool:
    """Whether a tokenisation follows the sampled path: every token but the last is the sampled one at its position
    (``path[0]`` is the sampled token at i), and the last one is drawn at a position of the path (its distribution
    is the model's there), within ``max_chain`` tokens after i."""
    inner = len(tokens) - 1
    return inner <= max_chain and inner < len(path) and tuple(tokens[:inner]) == tuple(path[:inner])


@dataclass(frozen=True)
class ProjectedPosition:
    """One row of the projection inputs, in the sample's terms."""

    sample: int
    student_index: int
    """i: the student token covering the teacher position (its logits column is the row's position)."""
    teacher_index: int
    """j: the teacher token predicted there (its top-k are the row's candidates)."""
    consumed: bytes
    """u: the bytes of the student's token at i before the teacher position."""
    path: tuple[int, ...]
    """The sampled (aligned) student ids from i on: ``s_i, s_i+1, ...``."""


def projected_positions(
    inputs: Any,
    alignments: Sequence[Alignment],
    student_ids: Sequence[Sequence[int]],
    student_bytes: Sequence[bytes],
    action_mask: torch.Tensor,
) -> list[ProjectedPosition]:
    """The :class:`ProjectedPosition` of every row of ``inputs`` (a ``ProjectionInputs``), from the alignments."""
    mask = action_mask.to(torch.bool).cpu().numpy()
    out = []
    for p in range(inputs.num_positions):
        b = int(inputs.sample_index[p])
        alignment, ids = alignments[b], [int(x) for x in student_ids[b]]
        columns = np.flatnonzero(mask[b])
        i = int(np.searchsorted(columns, int(inputs.positions[p, 1])))
        s_ends, t_ends = np.asarray(alignment.student_ends), np.asarray(alignment.teacher_ends)
        s_start = s_ends - np.diff(s_ends, prepend=0)
        t_len = np.diff(t_ends, prepend=0)
        t_start = t_ends - t_len
        ell = int(inputs.consumed[p])
        start = int(s_start[i]) + ell - int(s_ends[-1] - t_ends[-1])
        if s_ends[i] == s_start[i]:  # the final zero-width pair
            j = len(t_ends) - 1
        else:
            [j] = np.flatnonzero((t_start == start) & (t_len > 0)).tolist()
        aligned = np.asarray(alignment.student_group)[i:] >= 0
        length = int(aligned.argmin()) if not aligned.all() else aligned.shape[0]
        out.append(ProjectedPosition(b, i, int(j), student_bytes[ids[i]][:ell], tuple(ids[i : i + length])))
    return out


def subtree_mass(owned: Any, keys: Sequence[bytes | None]) -> np.ndarray:
    """``S[c]``: the sum of ``owned[c']`` over the candidates c' whose bytes start with candidate c's (c included).

    ``owned``: one position's event probabilities of the k candidate slots; ``keys``: each slot's bytes, ``None``
    for a slot without text (NaN in the result).
    """
    owned = np.asarray(owned, dtype=np.float64)
    out = np.full(len(keys), np.nan)
    for c, key in enumerate(keys):
        if key:
            out[c] = sum(float(owned[d]) for d, other in enumerate(keys) if other and other.startswith(key))
    return out


@dataclass(frozen=True)
class CandidateMasses:
    """One position's masses per candidate slot (NaN where the slot has no text)."""

    projected: np.ndarray
    """The event probability the projection gives the slot (``student_event_probs``)."""
    claimed: np.ndarray
    """:func:`subtree_mass` of the projected events: the projection's P(the text continues with ``b(c)``)."""
    exact: np.ndarray
    """The toy student's exact P(the text continues with ``b(c)``), every tokenisation counted."""
    on_path: np.ndarray
    """The part of ``exact`` spelled along the sampled path (:func:`on_path`; NaN unless enumerated)."""
    one_token: np.ndarray
    """The part of ``exact`` spelled by one token (NaN unless enumerated)."""


def candidate_masses(
    toy: ToyStudent,
    position: ProjectedPosition,
    keys: Sequence[bytes | None],
    projected: Any,
    *,
    max_chain: int,
    enumerate_spellings: bool = True,
) -> CandidateMasses:
    """Projected, claimed and exact masses of one position's candidates (``keys``: each slot's bytes or ``None``)."""
    projected = np.asarray(projected, dtype=np.float64)[: len(keys)]
    text = np.array([bool(k) for k in keys])
    exact = np.full(len(keys), np.nan)
    path_mass = np.full(len(keys), np.nan)
    single = np.full(len(keys), np.nan)
    for c, key in enumerate(keys):
        if not key:
            continue
        exact[c] = toy.text_probability(key, position.consumed)
        if enumerate_spellings:
            spellings = toy.tokenisations(key, position.consumed)
            mass = [toy.probability(t, position.consumed) for t in spellings]
            path_mass[c] = sum(m for t, m in zip(spellings, mass) if on_path(t, position.path, max_chain))
            single[c] = sum(m for t, m in zip(spellings, mass) if len(t) == 1)
    return CandidateMasses(
        projected=np.where(text, projected, np.nan),
        claimed=subtree_mass(projected, keys),
        exact=exact,
        on_path=path_mass,
        one_token=single,
    )
