"""Alignment speed: gold_plugin vs TRL 1.16.0's GOLD byte-offset alignment, same token sequences, one core.

Workload: ``--num`` responses of ~``--tokens`` student tokens (Mistral-v1 SentencePiece student, Qwen byte-level
teacher: TRL's cross-tokenizer path only accepts a byte-level teacher), built from Python standard-library
source and prose with CJK, accented text and emoji mixed in; half end with EOS, the rest are cut at the
token budget (sometimes inside a UTF-8 character). Both pipelines start from the student's response ids and
include the teacher's re-tokenisation of the response text:

- gold_plugin: ``text_for_teacher`` -> ``encode_continuation_batch`` (teacher ids) -> ``align`` per sample.
- TRL: ``GOLDTrainer._maybe_add_completion_byte_offsets`` (student offsets from the sampled ids),
  ``build_teacher_inputs_from_texts`` (teacher ids + byte offsets), then ``ULDLoss._align_by_byte_offsets``
  per sample on the completion slices, as ``ULDLoss._compute_distillation_loss`` does.

Run: ``.venv/bin/python benchmarks/bench_alignment.py`` (``--num 200`` for a quick run).
"""

from __future__ import annotations

import argparse
import os

# One core for both sides (the Rust tokenizers and torch would otherwise use every core).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from gold_plugin.alignment import (  # noqa: E402
    align,
    align_batch,
    encode_continuation_batch,
    ids_to_bytes,
    text_for_teacher,
    token_table,
)
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402

SNIPPETS = [
    "你好，世界！今天的天气很好。",
    "東京タワーは高いです。",
    "Ünïcödé façade naïve café — “quotes” …",
    "emoji 🙂🚀👨‍👩‍👧 family",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "\t\tindented\ttabs\n\n\n",
    "1234567890 3.14159265 2**64 = 18446744073709551616",
    "    def f(x):\n        return {'a': [1, 2, 3]}\n",
]


def build_corpus(num: int, chars: int, seed: int) -> list[str]:
    """Deterministic texts of about ``chars`` characters: stdlib source with multilingual snippets mixed in."""
    rng = random.Random(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 20_000)
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in files[:40]]
    texts = []
    for _ in range(num):
        src = rng.choice(sources)
        start = rng.randrange(0, max(1, len(src) - chars))
        parts, size = [], 0
        while size < chars:
            piece = src[start : start + rng.randint(100, 400)]
            start += len(piece)
            parts.append(piece)
            parts.append(rng.choice(SNIPPETS))
            size += len(piece) + len(parts[-1])
        texts.append("".join(parts))
    return texts


def student_responses(tokenizer, texts: list[str], num_tokens: int, seed: int) -> list[list[int]]:
    """Student ids as sampled: at most ``num_tokens`` tokens; half the responses end with EOS."""
    rng = random.Random(seed + 1)
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = list(ids[:num_tokens])
        if rng.random() < 0.5:
            ids = ids[: num_tokens - 1] + [tokenizer.eos_token_id]
        out.append(ids)
    return out


def run_gold(student, teacher, responses: list[list[int]]) -> tuple[float, float, list, list[list[int]]]:
    """Seconds for teacher re-tokenisation and for alignment; the alignments; the teacher ids."""
    t0 = time.perf_counter()
    texts = [text_for_teacher(student, ids) for ids in responses]
    teacher_ids = encode_continuation_batch(teacher, texts)
    finished = [len(ids) > 0 and ids[-1] == student.eos_token_id for ids in responses]
    eot = [teacher.eos_token_id]
    # Arrays, as TRL's teacher stage ends with tensors (build_teacher_inputs_from_texts): both align from arrays.
    teacher_ids = [
        np.asarray(ids + eot if done else ids, dtype=np.int64) for ids, done in zip(teacher_ids, finished)
    ]
    t1 = time.perf_counter()
    alignments = align_batch(student, responses, teacher, teacher_ids)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, alignments, teacher_ids


def run_trl(student, teacher, responses, prompt_len: int = 8) -> tuple[tuple[float, float, float], int]:
    """TRL 1.16.0's own functions on the same ids (prompt: ``prompt_len`` student tokens, masked).

    Seconds for (student byte offsets, teacher re-tokenisation with byte offsets, grouping loop); the number
    of samples whose student byte offsets are wrong.
    """
    import torch
    from trl.experimental.gold.gold_trainer import GOLDTrainer, ULDLoss, build_teacher_inputs_from_texts

    # Student side, built before timing (as for gold_plugin): padded [prompt | response] rows with labels, as
    # GOLDTrainer holds them for on-policy slices.
    prompt = [student.bos_token_id] * prompt_len
    rows = [prompt + list(ids) for ids in responses]
    width = max(map(len, rows))
    pad_id = student.pad_token_id if student.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    for i, r in enumerate(rows):
        labels[i, len(r) :] = -100
    trainer_stub = SimpleNamespace(  # the attributes the method reads, nothing else
        use_uld_loss=True,
        teacher_tokenizer=teacher,
        uld_loss_fn=SimpleNamespace(use_extended_uld=True),
        _tokenizer=student,
    )
    updated = {"input_ids": input_ids, "labels": labels}
    t0 = time.perf_counter()
    GOLDTrainer._maybe_add_completion_byte_offsets(trainer_stub, updated)
    student_offsets = updated["byte_offsets"]
    t_student = time.perf_counter()
    # Teacher side: TRL decodes the completion text and re-tokenises it with byte offsets.
    completion_texts = [student.decode(ids, skip_special_tokens=True) for ids in responses]
    _, teacher_labels, _, teacher_offsets = build_teacher_inputs_from_texts(
        teacher, [""] * len(responses), completion_texts
    )
    t1 = time.perf_counter()
    groups = []
    for i, ids in enumerate(responses):
        s_answer = student_offsets[i, prompt_len : prompt_len + len(ids)].tolist()
        t_mask = teacher_labels[i] != -100
        t_start = int(t_mask.float().argmax())
        t_size = int(t_mask.sum())
        t_answer = teacher_offsets[i, t_start : t_start + t_size].tolist()
        groups.append(ULDLoss._align_by_byte_offsets(s_answer, t_answer))
    t2 = time.perf_counter()
    # Outside the timing: samples whose student byte offsets (TRL counts the characters of each token string)
    # do not add up to the response's real byte length.
    wrong = sum(
        int(student_offsets[i, prompt_len + len(ids) - 1, 1]) != len(ids_to_bytes(student, ids))
        for i, ids in enumerate(responses)
        if len(ids)
    )
    return (t_student - t0, t1 - t_student, t2 - t1), wrong


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000, help="number of responses")
    parser.add_argument("--tokens", type=int, default=1000, help="student tokens per response (cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best is reported")
    parser.add_argument("--skip_trl", action="store_true", help="time gold_plugin only")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass

    student, teacher = load_packaged_tokenizer("mistral"), load_packaged_tokenizer("qwen")
    t0 = time.perf_counter()
    token_table(student), token_table(teacher)
    table_s = time.perf_counter() - t0
    texts = build_corpus(args.num, chars=4 * args.tokens, seed=args.seed)
    responses = student_responses(student, texts, args.tokens, args.seed)
    student_tokens = sum(map(len, responses))
    print(
        f"{args.num} responses, {student_tokens} student tokens (mean {student_tokens / args.num:.0f}); one core"
    )
    print(f"token tables (once per tokenizer): {table_s:.2f} s")

    # The student's ids as the trainer holds them (rows of the rollout tensor); TRL gets the same as a tensor.
    responses = [np.asarray(ids, dtype=np.int64) for ids in responses]
    per_m = 1e6 / student_tokens
    # Warm-up (lazy tables, imports), then --repeat interleaved rounds; the best round of each stage is
    # reported, which filters out other processes on a shared machine.
    run_gold(student, teacher, responses[:4])
    if not args.skip_trl:
        run_trl(student, teacher, responses[:4])
    gold_tok = gold_align = single = float("inf")
    trl = [float("inf")] * 3
    for _ in range(args.repeat):
        tok_s, align_s, alignments, teacher_ids = run_gold(student, teacher, responses)
        gold_tok, gold_align = min(gold_tok, tok_s), min(gold_align, align_s)
        t0 = time.perf_counter()
        per_sample = [align(student, s, teacher, t) for s, t in zip(responses, teacher_ids)]
        single = min(single, time.perf_counter() - t0)
        if not args.skip_trl:
            parts, trl_wrong = run_trl(student, teacher, responses)
            trl = [min(a, b) for a, b in zip(trl, parts)]
    assert all(_same(a, b) for a, b in zip(per_sample, alignments)), "align and align_batch disagree"
    teacher_tokens = sum(a.teacher_group.size for a in alignments)
    aligned = sum(a.aligned for a in alignments)
    groups = sum(a.num_groups for a in alignments)
    print(
        f"Mistral student -> Qwen teacher: {aligned}/{args.num} aligned, {groups} groups, "
        f"{teacher_tokens} teacher tokens (best of {args.repeat} rounds)"
    )
    print(
        f"gold_plugin  align_batch {gold_align:.3f} s = {gold_align * per_m:.3f} s per M student tokens "
        f"(byte offsets, bytes check and groups); align() one sample at a time {single * per_m:.3f} s per M; "
        f"teacher re-tokenisation {gold_tok:.3f} s; total {(gold_tok + gold_align) * per_m:.3f} s per M"
    )
    rev_responses = [_teacher_view(teacher, student, r) for r in responses]
    rev_tokens = sum(map(len, rev_responses))
    rev_align = float("inf")
    for _ in range(args.repeat):
        _, align_s, rev, _ = run_gold(teacher, student, rev_responses)
        rev_align = min(rev_align, align_s)
    print(
        f"gold_plugin  Qwen student -> Mistral teacher: align_batch {rev_align * 1e6 / rev_tokens:.3f} s per M "
        f"student tokens; {sum(a.aligned for a in rev)}/{args.num} aligned"
    )
    if args.skip_trl:
        return
    trl_student, trl_teacher, trl_group = trl
    trl_total = sum(trl)
    print(
        f"TRL 1.16.0   grouping loop {trl_group:.3f} s = {trl_group * per_m:.3f} s per M; student byte offsets "
        f"{trl_student:.3f} s; teacher re-tokenisation with byte offsets {trl_teacher:.3f} s; total "
        f"{trl_total * per_m:.3f} s per M; student byte offsets wrong in {trl_wrong}/{args.num} samples"
    )
    print(
        f"speed-up vs TRL: grouping {trl_group / gold_align:.1f}x (TRL's _align_by_byte_offsets loop vs the whole "
        f"align_batch); grouping + student offsets {(trl_group + trl_student) / gold_align:.1f}x; end to end incl. "
        f"teacher re-tokenisation {trl_total / (gold_tok + gold_align):.1f}x"
    )


def _same(a, b) -> bool:
    return (
        a.aligned == b.aligned
        and a.num_groups == b.num_groups
        and np.array_equal(a.student_group, b.student_group)
        and np.array_equal(a.teacher_group, b.teacher_group)
    )


def _teacher_view(qwen, mistral, mistral_ids: list[int]) -> list[int]:
    """Qwen ids of the same response (for the reverse direction), EOS kept when the response had one."""
    text = text_for_teacher(mistral, mistral_ids)
    ids = encode_continuation_batch(qwen, [text])[0]
    done = len(mistral_ids) > 0 and mistral_ids[-1] == mistral.eos_token_id
    return np.asarray(ids + [qwen.eos_token_id] if done else ids, dtype=np.int64)


if __name__ == "__main__":
    main(sys.argv[1:])
