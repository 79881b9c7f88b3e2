"""The demo's synthetic task: multi-digit addition with a checkable answer, and its two tokenizers.

The teacher's tokenizer splits every digit into its own token (as Qwen does); the student's merges
frequent digit runs into multi-digit tokens (as Llama-3 does). Both are byte-level BPE trained here with
the ``tokenizers`` library in milliseconds, so nothing comes from a hub, and both map every token to
canonical bytes (GPT-2 bytes-to-unicode), which is what :mod:`gold_plugin.alignment` needs.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

TEACHER_EOS = "<|endoftext|>"
TEACHER_PAD = "<|pad|>"
STUDENT_EOS = "</s>"
STUDENT_PAD = "<pad>"
STUDENT_BOS = "<s>"


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


def _corpus(task: AdditionTask) -> list[str]:
    return [task.prompt(a, b) + task.answer(a, b) for a, b in task.all_pairs()]


def build_tokenizer(kind: str, out_dir: str | Path, task: AdditionTask | None = None, num_merges: int = 60):
    """Train and save a byte-level BPE tokenizer; returns it as a ``PreTrainedTokenizerFast``.

    ``kind="digits"``: one token per digit (no merges can cross digits), EOS ``<|endoftext|>``.
    ``kind="student_digits"``: the same pieces under other ids (``<s>`` first), EOS ``</s>``: the demo's student.
    ``kind="merged"``: digit runs are words, so BPE learns ``num_merges`` multi-digit tokens, EOS ``</s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    task = task or AdditionTask()
    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    specials_first: list[str] = []
    if kind in ("digits", "student_digits"):
        eos, pad = (TEACHER_EOS, TEACHER_PAD) if kind == "digits" else (STUDENT_EOS, STUDENT_PAD)
        if kind == "student_digits":
            specials_first = [STUDENT_BOS]  # shifts every id: no token has the same id in both vocabularies
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        extra_merges = 0
    elif kind == "merged":
        eos, pad = STUDENT_EOS, STUDENT_PAD
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
        extra_merges = num_merges
    else:
        raise ValueError(f"Unknown tokenizer kind {kind!r}: use 'digits', 'student_digits' or 'merged'.")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 2 + len(specials_first) + extra_merges,
        special_tokens=[*specials_first, eos, pad],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(task), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad)
    fast.padding_side = "left"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
