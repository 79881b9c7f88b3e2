"""Alignment inspector: how well do two tokenizers fit? (``python -m gold_plugin.alignment ...``)

``--text "..."`` prints the groups of one text side by side (token pieces, bytes, 1:1 or merged) and the
vocabulary statistics; ``--dataset FILE.jsonl`` reports over many texts: share of 1:1 groups, mean tokens per
group on each side, share of unalignable samples. Each text is treated as a student response: the student's
ids (plus its EOS) are turned into the teacher's text with :func:`text_for_teacher` and re-tokenised with
:func:`encode_continuation` (plus the teacher's end-of-turn), exactly as GOLD does during training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from gold_plugin.alignment.result import Alignment
from gold_plugin.alignment.spans import align, align_batch
from gold_plugin.alignment.token_bytes import (
    encode_continuation_batch,
    text_for_teacher,
    token_table,
)
from gold_plugin.alignment.types import Tokenizer
from gold_plugin.alignment.vocab_map import VocabMap


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer folder / hub name, or one of the bundled test tokenizers (``gpt2``, ``qwen``, ``mistral``)."""
    from gold_plugin.packaged_tokenizers import PACKAGED_TOKENIZERS, load_packaged_tokenizer

    if name_or_path in PACKAGED_TOKENIZERS and not os.path.exists(name_or_path):
        return load_packaged_tokenizer(name_or_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def response_pair(
    student: Tokenizer, teacher: Tokenizer, texts: Sequence[str], add_eos: bool = True
) -> tuple[list[list[int]], list[list[int]]]:
    """Student ids of each text (as a response: no BOS, EOS appended) and the teacher's ids of the same bytes."""
    student_ids = [list(ids) for ids in student(list(texts), add_special_tokens=False)["input_ids"]]
    if add_eos and student.eos_token_id is not None:
        student_ids = [ids + [student.eos_token_id] for ids in student_ids]
    teacher_texts = [text_for_teacher(student, ids) for ids in student_ids]
    teacher_ids = encode_continuation_batch(teacher, teacher_texts)
    if add_eos and teacher.eos_token_id is not None:
        teacher_ids = [ids + [teacher.eos_token_id] for ids in teacher_ids]
    return student_ids, teacher_ids


def vocab_report(vocab: VocabMap) -> list[str]:
    s = vocab.summary()
    return [
        f"vocabulary: student {s['student_vocab']} ids, teacher {s['teacher_vocab']} ids (non-special ids matched)",
        f"  teacher ids with a student match: {s['teacher_matched_fraction']:.1%} by canonical bytes, "
        f"{s['teacher_exact_string_fraction']:.1%} by exact string (TRL's rule)",
        f"  student ids with a teacher match: {s['student_matched_fraction']:.1%} by canonical bytes, "
        f"{s['student_exact_string_fraction']:.1%} by exact string",
    ]


def group_rows(
    student: Tokenizer,
    student_ids: Sequence[int],
    teacher: Tokenizer,
    teacher_ids: Sequence[int],
    alignment: Alignment,
) -> list[tuple[int | str, str, str, str, str]]:
    """One row per group, then one per masked token run: (group, kind, bytes, student pieces, teacher pieces)."""
    s_pieces = student.convert_ids_to_tokens(list(student_ids))
    t_pieces = teacher.convert_ids_to_tokens(list(teacher_ids))
    s_bytes = token_table(student).token_bytes
    rows = []
    for g in range(alignment.num_groups):
        s_idx = np.flatnonzero(alignment.student_group == g)
        t_idx = np.flatnonzero(alignment.teacher_group == g)
        data = b"".join(s_bytes[student_ids[i]] for i in s_idx)
        kind = "1:1" if len(s_idx) == len(t_idx) == 1 else f"{len(s_idx)}:{len(t_idx)}"
        if not data:
            kind = "eos"
        rows.append((g, kind, _show(data), _pieces(s_pieces, s_idx), _pieces(t_pieces, t_idx)))
    s_masked = np.flatnonzero(alignment.student_group < 0)
    t_masked = np.flatnonzero(alignment.teacher_group < 0)
    if s_masked.size or t_masked.size:
        data = b"".join(s_bytes[student_ids[i]] for i in s_masked)
        rows.append(("-", "masked", _show(data), _pieces(s_pieces, s_masked), _pieces(t_pieces, t_masked)))
    return rows


def _show(data: bytes) -> str:
    """The group's text where it is whole UTF-8 characters, else its bytes."""
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def _pieces(pieces: Sequence[str | None], index: np.ndarray) -> str:
    return " ".join(repr(pieces[i]) for i in index)


def inspect_text(
    student: Tokenizer, teacher: Tokenizer, text: str, pair_eos: bool = True, out: TextIO = sys.stdout
) -> Alignment:
    """Print the groups of ``text`` side by side and the vocabulary statistics; return the alignment."""
    (s_ids,), (t_ids,) = response_pair(student, teacher, [text])
    alignment = align(student, s_ids, teacher, t_ids, pair_eos=pair_eos)
    _print_header(student, teacher, out)
    for line in vocab_report(VocabMap(student, teacher)):
        print(line, file=out)
    print(
        f"text: {len(text.encode('utf-8'))} bytes, student {len(s_ids)} tokens, teacher {len(t_ids)} tokens",
        file=out,
    )
    if not alignment.aligned:
        print(f"UNALIGNABLE: {alignment.reason}", file=out)
        return alignment
    rows = group_rows(student, s_ids, teacher, t_ids, alignment)
    kinds = Counter(row[1] for row in rows if row[1] not in ("eos", "masked"))
    merged = sum(n for k, n in kinds.items() if k != "1:1")
    print(f"groups: {alignment.num_groups} ({kinds.get('1:1', 0)} 1:1, {merged} merged)", file=out)
    widths = [
        max(len(str(row[c])) for row in rows + [("group", "kind", "bytes", "student", "teacher")])
        for c in range(5)
    ]
    widths = [min(w, 40) for w in widths]
    header = ("group", "kind", "bytes", "student", "teacher")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    return alignment


@dataclass
class DatasetStats:
    samples: int
    unalignable: int
    groups: int
    one_to_one: int
    student_tokens_in_groups: int
    teacher_tokens_in_groups: int
    student_masked: int
    teacher_masked: int
    reasons: list[str]

    @property
    def one_to_one_share(self) -> float:
        return self.one_to_one / max(self.groups, 1)

    @property
    def unalignable_share(self) -> float:
        return self.unalignable / max(self.samples, 1)

    def lines(self) -> list[str]:
        return [
            f"samples: {self.samples}, unalignable: {self.unalignable} ({self.unalignable_share:.1%})",
            f"groups: {self.groups}, 1:1 groups: {self.one_to_one_share:.1%}",
            f"mean tokens per group: student {self.student_tokens_in_groups / max(self.groups, 1):.3f}, "
            f"teacher {self.teacher_tokens_in_groups / max(self.groups, 1):.3f}",
            f"masked tokens: student {self.student_masked}, teacher {self.teacher_masked}",
            *(f"  unalignable: {reason}" for reason in self.reasons[:5]),
        ]


def dataset_stats(
    student: Tokenizer, teacher: Tokenizer, texts: Sequence[str], pair_eos: bool = True
) -> DatasetStats:
    """Alignment statistics over ``texts`` (each treated as a student response)."""
    student_ids, teacher_ids = response_pair(student, teacher, texts)
    alignments = align_batch(student, student_ids, teacher, teacher_ids, pair_eos=pair_eos)
    stats = DatasetStats(len(texts), 0, 0, 0, 0, 0, 0, 0, [])
    for a in alignments:
        if not a.aligned:
            stats.unalignable += 1
            stats.reasons.append(str(a.reason))
            continue
        s_sizes = np.bincount(a.student_group[a.student_group >= 0], minlength=a.num_groups)
        t_sizes = np.bincount(a.teacher_group[a.teacher_group >= 0], minlength=a.num_groups)
        stats.groups += a.num_groups
        stats.one_to_one += int(((s_sizes == 1) & (t_sizes == 1)).sum())
        stats.student_tokens_in_groups += int(s_sizes.sum())
        stats.teacher_tokens_in_groups += int(t_sizes.sum())
        stats.student_masked += int((a.student_group < 0).sum())
        stats.teacher_masked += int((a.teacher_group < 0).sum())
    return stats


def read_jsonl_texts(path: str, text_key: str, limit: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_key not in record:
                raise KeyError(
                    f"{path}:{line_number} has no key {text_key!r} (keys: {sorted(record)}); use --text_key"
                )
            texts.append(str(record[text_key]))
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _print_header(student: Tokenizer, teacher: Tokenizer, out: TextIO) -> None:
    s, t = token_table(student), token_table(teacher)
    print(
        f"student: {s.name} ({s.kind}, {len(s)} ids)   teacher: {t.name} ({t.kind}, {len(t)} ids)", file=out
    )


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gold_plugin.alignment",
        description="Inspect how a student and a teacher tokenizer align.",
    )
    parser.add_argument(
        "--student", required=True, help="student tokenizer folder / name (or gpt2, qwen, mistral)"
    )
    parser.add_argument(
        "--teacher", required=True, help="teacher tokenizer folder / name (or gpt2, qwen, mistral)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one response text: print its groups side by side")
    source.add_argument("--dataset", help="a jsonl file: report statistics over its texts")
    parser.add_argument("--text_key", default="text", help="key of the text in each jsonl record")
    parser.add_argument("--limit", type=int, default=None, help="at most this many dataset texts")
    parser.add_argument("--no_eos_pair", action="store_true", help="mask the final EOS / end-of-turn pair")
    args = parser.parse_args(argv)

    student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
    if args.text is not None:
        inspect_text(student, teacher, args.text, pair_eos=not args.no_eos_pair, out=out)
        return 0
    texts = read_jsonl_texts(args.dataset, args.text_key, args.limit)
    _print_header(student, teacher, out)
    for line in vocab_report(VocabMap(student, teacher)):
        print(line, file=out)
    for line in dataset_stats(student, teacher, texts, pair_eos=not args.no_eos_pair).lines():
        print(line, file=out)
    return 0
