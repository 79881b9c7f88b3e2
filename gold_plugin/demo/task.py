"""The demo's synthetic task: multi-digit addition with a checkable answer, its reward and its dataset files.

Its tokenizers: :mod:`gold_plugin.demo.tokenizers`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AdditionTask:
    """``a+b=`` -> ``a+b`` for operands with ``num_digits`` digits, split once into train and held-out pairs.

    The split depends only on ``split_seed``, so every run (and every model) sees the same held-out set.
    """

    num_digits: int = 2
    heldout_size: int = 500
    split_seed: int = 1234

    def all_pairs(self) -> list[tuple[int, int]]:
        top = 10**self.num_digits
        return [(a, b) for a in range(top) for b in range(top)]

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train pairs, held-out pairs), disjoint."""
        pairs = self.all_pairs()
        random.Random(self.split_seed).shuffle(pairs)
        if self.heldout_size >= len(pairs):
            raise ValueError(
                f"heldout_size={self.heldout_size} leaves no training pairs out of {len(pairs)}."
            )
        return pairs[self.heldout_size :], pairs[: self.heldout_size]

    def prompt(self, a: int, b: int) -> str:
        """Operands zero-padded to ``num_digits`` (fixed digit positions make the task learnable fast)."""
        return f"{a:0{self.num_digits}d}+{b:0{self.num_digits}d}="

    def answer(self, a: int, b: int) -> str:
        """The sum zero-padded to ``num_digits + 1`` digits, least significant digit first.

        Writing the sum in reverse lets every digit depend only on digits already seen (operands and the
        carry), which small transformers learn in hundreds of steps instead of thousands (Lee et al., 2023,
        "Teaching Arithmetic to Small Transformers").
        """
        return f"{a + b:0{self.num_digits + 1}d}"[::-1]

    def records(self, pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
        """Dataset rows in OpenRLHF's prompt-dataset shape: ``input`` (prompt text), ``label`` (the answer the
        reward checks) and ``output`` (the reference completion, ``--data.output_key output``: the same answer,
        which ``--gold.lmbda < 1`` trains on off-policy)."""
        return [
            {"input": self.prompt(a, b), "label": self.answer(a, b), "output": self.answer(a, b)}
            for a, b in pairs
        ]


_ANSWER = re.compile(r"^\s*(-?\d+)")


def is_correct(response: str, label: str) -> bool:
    """True when the response starts with exactly the expected number (anything after it is ignored)."""
    match = _ANSWER.match(response)
    return match is not None and match.group(1) == label.strip()


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> dict:
    """OpenRLHF's custom reward convention: 1.0 for a correct answer, else 0.0.

    ``queries`` are prompt + response texts; the response is what follows the prompt.
    """
    import torch

    rewards = []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt) :] if query.startswith(prompt) else query.rsplit("=", 1)[-1]
        rewards.append(1.0 if is_correct(response, label) else 0.0)
    scores = torch.tensor(rewards, dtype=torch.float32)
    return {"rewards": scores, "scores": scores, "extra_logs": {}}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
