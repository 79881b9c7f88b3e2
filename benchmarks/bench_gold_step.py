"""Host-side cost of the GOLD step's default signal (the byte-projected logit loss) per teacher position.

For real tokenizer pairs in both directions (``gpt2:qwen`` = GPT-2 student, Qwen teacher; ``qwen:gpt2``,
``mistral:qwen``, ``qwen:mistral``), on responses of ``--tokens``+ student tokens of generated text mixing
arithmetic (long numbers, equations), Python code, CJK text and English prose, with a plausible teacher top-k at
every teacher position (the true next token; tokens that are prefixes or extensions of its bytes; tokens that
start with the next bytes of the text; frequent-looking and random ids; Dirichlet log-probs summing to < 1),
it times, as medians of ``--repeats`` runs on one core, in microseconds per teacher position:

1. the teacher's re-tokenisation of the response texts (baseline A: every cross-tokenizer method pays it);
2. the alignment (``gold_plugin.alignment.align_batch``);
3. the vocabulary-map inputs (``gold_plugin.signals.logit.vocab_hybrid_inputs.logit_loss_inputs``; baseline B);
4. the byte-projection inputs: ``reference_projection_inputs`` (the plain reference, "before"),
   ``projection_positions`` (experience maker) and ``expand_positions`` (actor), with the projection tables' build
   time once per pair;
5. the bytes OpenRLHF's per-sample transport ships per teacher position (``pack_logit_inputs``, the whole batch
   packed at once): ``ProjectionPositions`` (after), ``ProjectionInputs`` (before), the vocabulary-map inputs;
6. the loss forward + backward at the real student vocabulary size (``projected_logit_loss`` vs the chunked
   vocabulary-map ``aligned_logit_loss``, on the first ``--loss-positions`` teacher positions), time and peak
   memory (measured as in ``benchmarks/bench_logit_loss.py``; run after every host-side stage, since its CPU
   memory probe changes glibc's allocator settings for the rest of the process).

The target's subject is the experience maker's work (alignment + ``projection_positions``: one process serves the
whole cluster); ``expand_positions`` runs where the loss runs (each actor, on its device) and is printed beside
it. Then the experience maker's work per step (one core), the expansion's (one core in all) and the MiB shipped
per step are extrapolated to the step sizes
of ``examples/*.sh`` (rollout batch x samples per prompt x max new tokens, every response at full length).

Run (CPU):        .venv/bin/python benchmarks/bench_gold_step.py
Quick run:        .venv/bin/python benchmarks/bench_gold_step.py --responses 2 --tokens 256 --repeats 1 --pairs gpt2:qwen
Loss on a GPU:    .venv/bin/python benchmarks/bench_gold_step.py --device cuda  (expand_positions and the loss run there)
Host stages only: add ``--skip-loss``.
"""

from __future__ import annotations

import os

# One core for every host-side stage (the Rust tokenizers and torch would otherwise use every core).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

from bench_logit_loss import Memory  # noqa: E402

import gold_plugin.signals.logit.byte_projection_inputs as bpi  # noqa: E402
from gold_plugin.alignment import (  # noqa: E402
    VocabMap,
    align_batch,
    encode_continuation,
    encode_continuation_batch,
    text_for_teacher,
    token_table,
)
from gold_plugin.alignment.sorted_vocab import hex_keys, sorted_vocab, truncate_hex  # noqa: E402
from gold_plugin.packaged_tokenizers import load_packaged_tokenizer  # noqa: E402
from gold_plugin.signals import aligned_logit_loss  # noqa: E402
from gold_plugin.signals.logit import (  # noqa: E402
    LogitLossOptions,
    ProjectionVocab,
    logit_loss_inputs,
    projected_logit_loss,
)
from gold_plugin.signals.logit.byte_projection_tables import projection_tables  # noqa: E402
from gold_plugin.testing.reference_projection import reference_projection_inputs  # noqa: E402

PAIRS = ("gpt2:qwen", "qwen:gpt2", "mistral:qwen", "qwen:mistral")
TARGET_HOST_X = 5.0
TARGET_BYTES = 1024
TARGET_LOSS_TIME, TARGET_LOSS_MEMORY = 1.5, 1.2
TARGET_COUNTDOWN_S = 5.0
COUNTDOWN_EXAMPLE = "gold_countdown_qwen3_4b_to_llama3_1b"  # examples/<name>.sh: the target's step size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="student:teacher test tokenizers")
    parser.add_argument("--responses", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="student tokens per response (at least)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median)")
    parser.add_argument(
        "--loss-positions", type=int, default=1024, help="teacher positions in the loss stage"
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of both losses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument(
        "--device", default="cpu", help="where expand_positions and the loss run (cpu or cuda)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the loss on the CPU)")
    args = parser.parse_args(argv)
    for pair in args.pairs:
        names = pair.split(":")
        if len(names) != 2 or not set(names) <= {"gpt2", "qwen", "mistral"}:
            parser.error(f"--pairs: {pair!r} is not student:teacher of gpt2, qwen, mistral")
    return args


# ── text ──

PROSE = (
    "the model reads each line of the proof and checks that every step follows from what came before it "
    "while a careful reader would notice how small errors compound over long derivations so we write the "
    "intermediate values down explicitly and verify them again before moving on to the next part of the "
    "problem which asks for a general formula rather than a single number"
)
WORDS = PROSE.split()
CJK_PARTS = (
    "東京都の人口は約{n}万人です。",
    "北京大学创建于{n}年。",
    "今日はいい天気ですね、",
    "我们需要计算这个方程的解：",
    "価格は{n}円（税込）でした。",
    "数学の問題を解いてください。",
    "这个函数返回一个列表，",
    "第{n}章では機械学習の基礎を説明します。",
    "请把结果四舍五入到小数点后两位。",
    "서울의 인구는 약 {n}만 명입니다.",
)
NAMES = ("total", "values", "result", "count", "items", "score", "buffer", "matrix", "offset", "weights")


def _number(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randrange(10 ** (lo - 1), 10**hi)


def _arithmetic(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = _number(rng, 3, 9), _number(rng, 2, 7)
        return f"{a} * {b} = {a * b}, and {a} + {b} = {a + b}."
    if kind == 1:
        nums = [rng.randrange(1, 100) for _ in range(4)]
        target = rng.randrange(10, 1000)
        a, b, c, d = nums
        return (
            f"Using the numbers {nums}, create an equation that equals {target}. Try ({a} + {b}) * {c} - {d} = "
            f"{(a + b) * c - d}; then {a} * {b} - {c} + {d} = {a * b - c + d}. <answer>({a} - {b}) * {c} + {d}"
            "</answer>"
        )
    if kind == 2:
        x, y = rng.uniform(0, 1e4), rng.uniform(0, 1e3)
        return f"{x:.5f} + {y:.4f} = {x + y:.5f} and {x:.3f} / {y:.3f} = {x / max(y, 1e-3):.6f}."
    a, b = _number(rng, 12, 20), _number(rng, 12, 20)
    return f"Long sum: {a} + {b} = {a + b}. Check: {a + b} - {b} = {a}."


def _hint(rng: random.Random) -> str:
    return rng.choice(("one", "two", "three", "0x1F", "i+1", "n-1"))


def _code(rng: random.Random) -> str:
    name, arg = rng.choice(NAMES), rng.choice(NAMES)
    m, k, n = rng.randrange(2, 13), rng.randrange(1, 100), rng.randrange(0, 1000)
    return (
        f"def {name}_{rng.randrange(100)}({arg}: list[int]) -> int:\n"
        f"    total = {n}\n"
        f"    for i, x in enumerate({arg}):\n"
        f"        if x % {m} == 0:\n"
        f"            total += x * {k}  # step {_hint(rng)}\n"
        f"        elif i > {rng.randrange(50)}:\n"
        f'            print(f"{{i}}: {{x!r}} -> {{total:,}}")\n'
        f"    return {{'{name}': total, 'n': len({arg})}}['{name}']\n"
    )


def _cjk(rng: random.Random) -> str:
    return "".join(
        rng.choice(CJK_PARTS).format(n=rng.randrange(1, 10000)) for _ in range(rng.randrange(2, 6))
    )


def _prose(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randrange(12, 30))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice((".", ".", "?", "!", ";"))


SEGMENTS = (_arithmetic, _code, _cjk, _prose)


def response_text(student: Any, rng: random.Random, min_tokens: int) -> str:
    """Text of at least ``min_tokens`` student tokens (a little more), segments of each kind in random order."""
    parts: list[str] = []
    estimate = 0
    while True:
        while estimate < min_tokens:
            segment = rng.choice(SEGMENTS)(rng) + rng.choice(("\n\n", " ", "\n"))
            parts.append(segment)
            estimate += len(student.encode(segment, add_special_tokens=False))
        text = "".join(parts).rstrip()
        estimate = len(student.encode(text, add_special_tokens=False))
        if estimate >= min_tokens:
            return text


# ── teacher top-k ──


@dataclass
class TeacherIndex:
    """A teacher vocabulary's regular tokens sorted by bytes (hex keys), for candidate pools."""

    keys: np.ndarray  # S hex key of every teacher id (b"" for special ids)
    regular: np.ndarray  # regular ids (bytes, not special), ascending
    order: np.ndarray  # regular ids sorted by key
    sorted_keys: np.ndarray
    rank: np.ndarray  # teacher id -> position in ``order`` (-1: special / zero-width)
    max_len: int
    eos: int

    @classmethod
    def build(cls, teacher: Any) -> TeacherIndex:
        table = token_table(teacher)
        keys = hex_keys(table)
        regular = np.flatnonzero(~table.special & (table.byte_lengths > 0))
        order = regular[np.argsort(keys[regular], kind="stable")]
        rank = np.full(len(table), -1, dtype=np.int64)
        rank[order] = np.arange(order.shape[0])
        return cls(
            keys, regular, order, keys[order], rank, int(table.byte_lengths.max()), int(teacher.eos_token_id)
        )

    def exact(self, queries: np.ndarray) -> np.ndarray:
        """Teacher id spelled by each hex key, -1 if none."""
        at = np.minimum(np.searchsorted(self.sorted_keys, queries), self.order.shape[0] - 1)
        found = (self.sorted_keys[at] == queries) & (np.strings.str_len(queries) > 0)
        return np.where(found, self.order[at], -1)


def first_unique(pool: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` distinct non-negative ids of every row of ``pool``, in column order (-1 pads)."""
    by_id = np.argsort(pool, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(pool, by_id, axis=1)
    dup_sorted = np.zeros(pool.shape, dtype=bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, by_id, dup_sorted, axis=1)
    bad = dup | (pool < 0)
    pick = np.argsort(bad, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(pool, pick, axis=1)
    out[np.take_along_axis(bad, pick, axis=1)] = -1
    return out


def teacher_topk(
    index: TeacherIndex, t_ids: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Plausible top-k ``[m, k]`` ids and float32 log-probs for a teacher response (row j predicted token j)."""
    m = t_ids.shape[0]
    text_row = index.rank[t_ids] >= 0
    key = index.keys[t_ids]
    empty = np.zeros(2, dtype=key.dtype)
    # The next bytes of the text at every position: this token and the two after it.
    text = np.strings.add(
        np.strings.add(key, np.concatenate([key[1:], empty[:1]])), np.concatenate([key[2:], empty])
    )
    text_len = np.strings.str_len(text) // 2
    columns = [t_ids[:, None]]
    # Tokens spelled by the first l bytes of the text: prefixes of the true token and tokens across its end.
    for length in range(1, min(index.max_len, 12) + 1):
        spelled = index.exact(truncate_hex(text, np.minimum(length, text_len)))
        columns.append(np.where(length <= text_len, spelled, -1)[:, None])
    # Neighbours of the true token in byte order (its extensions follow it; near-prefixes precede it).
    offsets = np.array([-4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8])
    near = index.order[np.clip(index.rank[t_ids][:, None] + offsets, 0, index.order.shape[0] - 1)]
    columns.append(np.where(text_row[:, None], near, -1))
    # Tokens that start with the next 1, 2, 3 bytes of the text.
    for length in (1, 2, 3):
        lo = np.searchsorted(index.sorted_keys, truncate_hex(text, length))
        starts = index.order[np.clip(lo[:, None] + np.arange(4), 0, index.order.shape[0] - 1)]
        columns.append(np.where((text_len >= length)[:, None], starts, -1))
    # The end token near the end of the response.
    columns.append(np.where(np.arange(m) >= m - 4, index.eos, -1)[:, None])
    # Frequent-looking ids (low BPE ranks) and random ones.
    frequent = np.minimum(rng.exponential(3000.0, size=(m, k)).astype(np.int64), index.regular.shape[0] - 1)
    columns.append(index.regular[frequent])
    columns.append(index.regular[rng.integers(0, index.regular.shape[0], size=(m, 16))])
    ids = first_unique(np.concatenate(columns, axis=1), k)
    probs = rng.dirichlet(1.0 / (np.arange(k) + 1.0) ** 0.7, size=m)
    probs = -np.sort(-probs, axis=1) * rng.uniform(0.85, 0.99, size=(m, 1))
    logprobs = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
    logprobs[ids < 0] = -np.inf
    return ids, logprobs


# ── one pair ──


@dataclass
class Batch:
    student: Any
    teacher: Any
    texts: list[str]
    s_ids: list[np.ndarray]
    t_ids: list[np.ndarray]
    top_ids: list[np.ndarray]
    top_lp: list[np.ndarray]
    action_mask: torch.Tensor
    student_end_ids: tuple[int, ...]
    teacher_end_ids: tuple[int, ...]


def make_batch(student_name: str, teacher_name: str, args: argparse.Namespace) -> Batch:
    student, teacher = load_packaged_tokenizer(student_name), load_packaged_tokenizer(teacher_name)
    index = TeacherIndex.build(teacher)
    rng = np.random.default_rng(args.seed)
    texts, s_ids, t_ids, top_ids, top_lp = [], [], [], [], []
    for r in range(args.responses):
        text = response_text(student, random.Random(args.seed * 1_000_003 + r), args.tokens)
        s = student.encode(text, add_special_tokens=False) + [student.eos_token_id]
        teacher_text = text_for_teacher(student, s)
        t = np.asarray(encode_continuation(teacher, teacher_text) + [teacher.eos_token_id], dtype=np.int64)
        ids, lps = teacher_topk(index, t, args.topk, rng)
        texts.append(teacher_text)
        s_ids.append(np.asarray(s, dtype=np.int64))
        t_ids.append(t)
        top_ids.append(ids)
        top_lp.append(lps)
    width = max(map(len, s_ids))
    mask = torch.zeros(len(s_ids), width, dtype=torch.bool)
    for b, ids in enumerate(s_ids):
        mask[b, : len(ids)] = True
    return Batch(
        student,
        teacher,
        texts,
        s_ids,
        t_ids,
        top_ids,
        top_lp,
        mask,
        (int(student.eos_token_id),),
        tuple(int(i) for i in teacher.all_special_ids),
    )


@dataclass
class Stage:
    seconds: float | None = None
    bytes: int | None = None
    note: str = ""


@dataclass
class PairResult:
    name: str
    student_tokens: int = 0
    teacher_tokens: int = 0
    positions: int = 0
    inside_share: float | None = None
    tables: dict[str, float | None] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    loss: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    countdown_s: float | None = None


def timed(fn: Callable[[], Any], repeats: int, sync: torch.device | None = None) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if sync is not None and sync.type == "cuda":
            torch.cuda.synchronize(sync)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def transport_bytes(
    pack: Callable[..., dict[str, torch.Tensor]] | None, inputs: Any, batch: int
) -> int | None:
    if pack is None:
        return None
    return sum(t.numel() * t.element_size() for t in pack(inputs, batch).values())


def to_device(value: Any, device: torch.device) -> Any:
    """A dataclass of tensors (or a tensor) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value):
        return type(value)(
            **{f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value)}
        )
    return value


def compare_inputs(new: Any, before: Any) -> str:
    """Which fields of two ProjectionInputs differ (shape or values; empty ranges ``lo >= hi`` count as equal)."""

    def values(inputs: Any, name: str) -> torch.Tensor | None:
        value = getattr(inputs, name, None)
        if value is None or not name.endswith(("_lo", "_hi")):
            return value
        lo, hi = (getattr(inputs, name[:-3] + end, None) for end in ("_lo", "_hi"))
        if lo is None or hi is None or lo.shape != hi.shape:
            return value
        return torch.where(lo < hi, value, torch.zeros_like(value))

    differ = []
    for f in dataclasses.fields(before):
        a, b = values(new, f.name), values(before, f.name)
        if a is None:
            differ.append(f"{f.name} (missing)")
        elif a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            differ.append(f.name)
    return "identical (up to empty ranges)" if not differ else "differ in " + ", ".join(differ)


def run_pair(pair: str, args: argparse.Namespace, pack: Callable[..., Any] | None) -> tuple[PairResult, Any]:
    student_name, teacher_name = pair.split(":")
    result = PairResult(f"{student_name} -> {teacher_name}")
    device = torch.device(args.device)
    batch = make_batch(student_name, teacher_name, args)
    student, teacher, rows = batch.student, batch.teacher, len(batch.s_ids)
    result.student_tokens = sum(map(len, batch.s_ids))
    result.teacher_tokens = sum(map(len, batch.t_ids))

    # Tables, once per pair (first call in this process).
    start = time.perf_counter()
    vocab = sorted_vocab(student, teacher)
    result.tables["sorted vocabulary"] = time.perf_counter() - start
    start = time.perf_counter()
    tables = projection_tables(vocab)
    result.tables["projection tables"] = time.perf_counter() - start
    if device.type == "cuda":
        tables = tables.to(device)

    ends = dict(student_end_ids=batch.student_end_ids, teacher_end_ids=batch.teacher_end_ids)

    def retokenise() -> list[list[int]]:
        return encode_continuation_batch(teacher, batch.texts)

    def alignment() -> list[Any]:
        return align_batch(student, batch.s_ids, teacher, batch.t_ids)

    # Warm-up on the first response (lazy tables of the tokenizers), then the timed stages.
    align_batch(student, batch.s_ids[:1], teacher, batch.t_ids[:1])
    encode_continuation_batch(teacher, batch.texts[:1])
    seconds, retok = timed(retokenise, args.repeats)
    if [list(t[:-1]) for t in batch.t_ids] != retok:
        result.checks.append("re-tokenisation differs from the batch's teacher ids")
    result.stages["re-tokenisation (baseline A)"] = Stage(seconds)
    seconds, alignments = timed(alignment, args.repeats)
    result.stages["alignment"] = Stage(seconds)
    unaligned = sum(not a.aligned for a in alignments)
    if unaligned:
        result.checks.append(f"{unaligned}/{rows} samples unaligned: " + str({a.reason for a in alignments}))

    def vocab_map() -> Any:
        return logit_loss_inputs(alignments, batch.top_ids, batch.top_lp, batch.action_mask)

    seconds, vm_inputs = timed(vocab_map, args.repeats)
    result.stages["vocab-map inputs (baseline B)"] = Stage(seconds, transport_bytes(pack, vm_inputs, rows))

    args_common = (vocab, alignments, batch.s_ids, batch.top_ids, batch.top_lp, batch.action_mask)
    reference_projection_inputs(
        vocab,
        alignments[:1],
        batch.s_ids[:1],
        batch.top_ids[:1],
        batch.top_lp[:1],
        batch.action_mask[:1],
        **ends,
    )
    seconds, before = timed(lambda: reference_projection_inputs(*args_common, **ends), args.repeats)
    result.stages["before: reference_projection_inputs"] = Stage(seconds, transport_bytes(pack, before, rows))
    first = (vocab, alignments[:1], batch.s_ids[:1], batch.top_ids[:1], batch.top_lp[:1])
    bpi.expand_positions(
        tables, to_device(bpi.projection_positions(*first, batch.action_mask[:1]), device), **ends
    )
    seconds, positions = timed(lambda: bpi.projection_positions(*args_common), args.repeats)
    result.stages["projection_positions (experience maker)"] = Stage(
        seconds, transport_bytes(pack, positions, rows)
    )
    positions = to_device(positions, device)
    seconds, after = timed(lambda: bpi.expand_positions(tables, positions, **ends), args.repeats, device)
    result.stages[f"expand_positions (actor, {device.type})"] = Stage(seconds)
    result.checks.append(f"expand_positions vs reference_projection_inputs: {compare_inputs(after, before)}")
    result.positions = int(after.num_positions)
    consumed = getattr(after, "consumed", None)
    if consumed is not None and consumed.numel():
        result.inside_share = float((consumed > 0).float().mean())
    loss_case = None
    if not args.skip_loss:
        loss_case = (batch, vocab, after, vm_inputs)
    return result, loss_case


# ── loss ──


def slice_positions(inputs: Any, count: int) -> Any:
    """The first ``count`` positions of per-position inputs (every field's first dimension)."""
    return type(inputs)(**{f.name: getattr(inputs, f.name)[:count] for f in dataclasses.fields(inputs)})


def run_loss(case: Any, args: argparse.Namespace, memory: Memory) -> dict[str, Any]:
    """Forward + backward of both losses on the first ``--loss-positions`` teacher positions of the batch."""
    batch, vocab, proj_inputs, vm_inputs = case
    device = torch.device(args.device)
    count = min(args.loss_positions, proj_inputs.num_positions)
    proj = to_device(slice_positions(proj_inputs, count), device)
    last_row, last_col = (int(x) for x in proj.positions[-1].tolist())
    rows_vm, cols_vm = vm_inputs.positions[:, 0], vm_inputs.positions[:, 1]
    keep = (rows_vm < last_row) | ((rows_vm == last_row) & (cols_vm <= last_col))
    vm_positions = vm_inputs.positions[keep].to(device)
    vm_ids, vm_lp = (
        vm_inputs.teacher_topk_ids[keep].to(device),
        vm_inputs.teacher_topk_logprobs[keep].to(device),
    )
    size = len(batch.student)
    mapping = VocabMap(batch.student, batch.teacher).teacher_to_student_tensor(device=device)
    projection_vocab = ProjectionVocab.from_sorted(vocab, device)
    torch.manual_seed(args.seed)
    leaf = (torch.randn(last_row + 1, batch.action_mask.shape[1], size, device=device) * 2).requires_grad_()
    out: dict[str, Any] = {
        "positions": count,
        "vm_positions": int(keep.sum()),
        "vocab": size,
        "rows": last_row + 1,
        "width": int(batch.action_mask.shape[1]),
    }

    def projected() -> torch.Tensor:
        options = LogitLossOptions(chunk_size=args.chunk_size)
        return projected_logit_loss(leaf, proj, projection_vocab, options=options).loss.sum()

    def chunked() -> torch.Tensor:
        return aligned_logit_loss(
            leaf,
            vm_ids,
            vm_lp,
            mapping,
            positions=vm_positions,
            options=LogitLossOptions(chunk_size=args.chunk_size),
        ).loss.sum()

    for name, fn in (("projected", projected), ("vocab-map", chunked)):
        runs = []
        for attempt in range(args.repeats + (device.type == "cuda")):
            leaf.grad = None
            memory.start()
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            peak = memory.peak_bytes()
            del loss
            if device.type != "cuda" or attempt > 0:  # on a GPU the first run is a warm-up
                runs.append((elapsed, peak))
        out[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
        leaf.grad = None
    return out


# ── examples ──


def example_steps() -> list[tuple[str, int, int, int, str]]:
    """(script, rollout batch, samples per prompt, max new tokens, its --gold.signal) of every ``examples/*.sh``."""
    out = []
    for script in sorted((ROOT / "examples").glob("*.sh")):
        text = script.read_text()
        values = {}
        for var in ("ROLLOUT_BATCH", "N_SAMPLES", "MAX_NEW_TOKENS"):
            match = re.search(rf"^{var}=\$\{{{var}:-(\d+)\}}", text, flags=re.MULTILINE)
            if match:
                values[var] = int(match.group(1))
        signal = re.search(r"--gold\.signal (\w+)", text)
        if len(values) == 3:
            out.append(
                (
                    script.stem,
                    values["ROLLOUT_BATCH"],
                    values["N_SAMPLES"],
                    values["MAX_NEW_TOKENS"],
                    signal.group(1) if signal else "logit (default)",
                )
            )
    return out


# ── report ──


def fmt(value: float | None, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(
    result: PairResult, args: argparse.Namespace, examples: list[tuple[str, int, int, int, str]]
) -> None:
    per_pos = 1e6 / max(result.positions, 1)
    print(f"\n=== student {result.name}: {args.responses} responses, top-k {args.topk}, one core")
    print(
        f"student tokens {result.student_tokens:,}; teacher tokens {result.teacher_tokens:,}; teacher positions "
        f"{result.positions:,} ({result.positions / max(result.student_tokens, 1):.3f} per student token); "
        f"inside a student token (consumed > 0): {fmt(result.inside_share and 100 * result.inside_share, '.1f')}%"
    )
    tables = "; ".join(f"{k} {fmt(v, '.2f')} s" for k, v in result.tables.items())
    if "projection tables" not in result.tables:
        tables += "; projection tables unavailable"
    print(f"tables, once per pair (first call in this process, not per position): {tables}")
    retok = result.stages["re-tokenisation (baseline A)"].seconds
    print(f"  {'stage':48s} {'us/teacher pos':>15s} {'x re-tok':>9s} {'bytes/teacher pos':>18s}")
    us = {}
    for name, stage in result.stages.items():
        if stage.seconds is None:
            print(f"  {name:48s} {stage.note:>15s}")
            continue
        us[name] = stage.seconds * per_pos
        shipped = None if stage.bytes is None else stage.bytes / max(result.positions, 1)
        print(
            f"  {name:48s} {us[name]:15.3f} {stage.seconds / retok:9.2f} {fmt(shipped, '18,.0f', ''):>18s}"
            + (f"  {stage.note}" if stage.note else "")
        )
    retok_us = us["re-tokenisation (baseline A)"]
    positions_name = "projection_positions (experience maker)"
    expand_names = [n for n in us if n.startswith("expand_positions")]
    before_names = [n for n in us if n.startswith("before:")]
    # The experience maker is one process serving the whole cluster: its work is the target's subject. The
    # expansion runs where the loss runs (each actor, on its own device), in parallel over the actors.
    host_after = us["alignment"] + us[positions_name] if positions_name in us else None
    expand_us = us[expand_names[0]] if expand_names else None
    host_before = us["alignment"] + us[before_names[0]] if before_names else None
    line = "the experience maker's work per teacher position (one process for the whole cluster):"
    for label, value in (
        ("after (alignment + projection_positions)", host_after),
        ("before (alignment + the whole inputs)", host_before),
    ):
        if value is None:
            line += f"\n    {label}: n/a"
        else:
            line += (
                f"\n    {label}: {value:.3f} us = {value / retok_us:.2f}x re-tokenisation "
                f"(target <= {TARGET_HOST_X:g}x: {verdict(value / retok_us <= TARGET_HOST_X)})"
            )
    if expand_us is not None:
        line += (
            f"\n    + where the loss runs: {expand_names[0]} {expand_us:.3f} us "
            f"(all host-side work on one CPU core: {(host_after + expand_us) / retok_us:.2f}x re-tokenisation)"
        )
    print(line)
    shipped = {
        k: result.stages[n].bytes / max(result.positions, 1)
        for k, n in (
            ("after", "projection_positions (experience maker)"),
            ("before", "before: reference_projection_inputs"),
            ("vocab-map", "vocab-map inputs (baseline B)"),
        )
        if n in result.stages and result.stages[n].bytes is not None
    }
    print(
        "transport per teacher position: "
        + "; ".join(f"{k} {v:,.0f} B" for k, v in shipped.items())
        + f" (target after <= {TARGET_BYTES} B at k = 64: "
        + (verdict(shipped["after"] <= TARGET_BYTES) if "after" in shipped else "n/a")
        + ")"
    )
    if result.loss:
        loss = result.loss
        (pt, pm), (vt, vm) = loss["projected"], loss["vocab-map"]
        print(
            f"loss fwd+bwd ({loss['positions']} teacher positions / {loss['vm_positions']} vocab-map positions, "
            f"logits [{loss['rows']}, {loss['width']}, {loss['vocab']:,}], chunk {args.chunk_size}, {args.device}): "
            f"projected {pt * 1e3:.1f} ms, peak {pm / 2**20:.1f} MiB; vocab-map {vt * 1e3:.1f} ms, peak "
            f"{vm / 2**20:.1f} MiB\n    time ratio {pt / vt:.2f} (target <= {TARGET_LOSS_TIME}: "
            f"{verdict(pt / vt <= TARGET_LOSS_TIME)}), peak memory ratio {pm / max(vm, 1):.2f} (target <= "
            f"{TARGET_LOSS_MEMORY}: {verdict(pm / max(vm, 1) <= TARGET_LOSS_MEMORY)})"
        )
    for check in result.checks:
        print(f"check: {check}")
    rate = result.positions / max(result.student_tokens, 1)
    print(
        "per step of examples/*.sh (every response at max new tokens; the experience maker's work on one core, and "
        f"the expansion's on one core in all; {rate:.3f} teacher positions per student token):"
    )
    print(
        f"  {'script (--gold.signal)':56s} {'prompts x samples x tokens':>27s} {'teacher pos':>12s} "
        f"{'maker s before':>14s} {'maker s after':>13s} {'expand s':>9s} {'MiB before':>10s} {'MiB after':>9s} "
        f"{'MiB vocab-map':>13s}"
    )
    for name, prompts, samples, new_tokens, signal in examples:
        positions = prompts * samples * new_tokens * rate
        seconds = {
            k: None if v is None else v * positions / 1e6
            for k, v in (("before", host_before), ("after", host_after), ("expand", expand_us))
        }
        mib = {k: v * positions / 2**20 for k, v in shipped.items()}
        target = ""
        if name == COUNTDOWN_EXAMPLE and seconds["after"] is not None:
            target = f"  target after <= {TARGET_COUNTDOWN_S:g} s: {verdict(seconds['after'] <= TARGET_COUNTDOWN_S)}"
            result.countdown_s = seconds["after"]
        print(
            f"  {f'{name} ({signal})':56s} {f'{prompts} x {samples} x {new_tokens:,}':>27s} {positions:12,.0f} "
            f"{fmt(seconds['before'], '14.2f'):>14s} {fmt(seconds['after'], '13.2f'):>13s} "
            f"{fmt(seconds['expand'], '9.2f'):>9s} "
            f"{fmt(mib.get('before'), '10,.0f'):>10s} {fmt(mib.get('after'), '9,.0f'):>9s} "
            f"{fmt(mib.get('vocab-map'), '13,.0f'):>13s}{target}"
        )
    result.summary = dict(
        host_after=host_after, host_before=host_before, retok=retok_us, shipped=shipped, expand=expand_us
    )


def summary(results: list[PairResult]) -> None:
    """One line per pair: the targets side by side."""
    print(
        f"\n=== summary (targets: the experience maker's work <= {TARGET_HOST_X:g}x re-tokenisation, transport <= "
        f"{TARGET_BYTES} B per"
    )
    print(
        f"    teacher position at k = 64, loss time <= {TARGET_LOSS_TIME}x and peak memory <= {TARGET_LOSS_MEMORY}x "
        f"the chunked vocab-map loss, <= {TARGET_COUNTDOWN_S:g} s of the experience maker's work per step at "
        f"{COUNTDOWN_EXAMPLE}; 'expand us' runs where the loss runs)"
    )
    print(
        f"  {'pair':16s} {'maker after x':>13s} {'maker before x':>14s} {'expand us':>9s} {'B after':>8s} "
        f"{'B before':>9s} {'loss time x':>11s} {'loss mem x':>10s} {'countdown s':>11s}"
    )
    for r in results:
        s = r.summary
        retok = s.get("retok") or float("nan")
        ratio = {k: None if s.get(k) is None else s[k] / retok for k in ("host_after", "host_before")}
        loss_t = loss_m = None
        if r.loss:
            (pt, pm), (vt, vm) = r.loss["projected"], r.loss["vocab-map"]
            loss_t, loss_m = pt / vt, pm / max(vm, 1)
        shipped = s.get("shipped", {})
        print(
            f"  {r.name:16s} {fmt(ratio['host_after'], '13.2f'):>13s} {fmt(ratio['host_before'], '14.2f'):>14s} "
            f"{fmt(s.get('expand'), '9.1f'):>9s} "
            f"{fmt(shipped.get('after'), '8,.0f'):>8s} {fmt(shipped.get('before'), '9,.0f'):>9s} "
            f"{fmt(loss_t, '11.2f'):>11s} {fmt(loss_m, '10.2f'):>10s} {fmt(r.countdown_s, '11.2f'):>11s}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run with --device cpu.")
    # OpenRLHF's transport; its import needs flash_attn: the import-only stand-in at the end of sys.path.
    sys.path.append(str(ROOT / "gold_plugin" / "testing" / "stubs"))
    from gold_plugin.integrations.openrlhf.transport import pack_logit_inputs

    print(f"torch {torch.__version__}, numpy {np.__version__}; before = reference_projection_inputs")
    results, cases = [], []
    for pair in args.pairs:
        print(f"[{pair}] building inputs and timing host stages ...", flush=True)
        result, case = run_pair(pair, args, pack_logit_inputs)
        results.append(result)
        cases.append(case)
    if not args.skip_loss:
        memory = Memory(device)  # after the host stages: on the CPU it changes glibc's mmap threshold
        for result, case in zip(results, cases):
            if case is not None:
                print(f"[{result.name}] loss forward + backward ...", flush=True)
                result.loss = run_loss(case, args, memory)
    examples = example_steps()
    for result in results:
        report(result, args, examples)
    summary(results)


if __name__ == "__main__":
    main(sys.argv[1:])
