"""The local backend's actor step with the hidden-state loss alone vs the byte-projected logit loss: same batch,
same student, same teacher; step time and peak memory of the actor's forward + loss + backward, side by side.

Variants (each a :class:`~gold_plugin.config.GoldConfig`; the step is the local trainer's own
:meth:`~gold_plugin.local.trainer.LocalTrainer.micro_batch_loss` and ``backward()``):

1. ``policy``: the clipped policy loss only (``--gold.signal advantage``, no extra term): the floor both pay;
2. ``hidden``: ``--gold.signal hidden --gold.teacher.topk 0`` (the hidden-state loss alone; its bridge is fitted
   on the batch first, outside the measurement, as on a run's first step);
3. ``bytes``: ``--gold.signal logit --gold.logit_projection bytes`` (the default signal, top-k ``--topk``).

The batch: ``--samples`` responses of ``--tokens`` student tokens of number-heavy text (sums, prices, years; the
test tokenizers cut numbers differently: Qwen and Mistral write single digits, GPT-2 merges digit runs), scored once
by a random tiny Llama teacher (:func:`gold_plugin.testing.tiny_teacher.save_tiny_teacher`, in-process
:class:`~gold_plugin.teacher.HFTeacher`, top-k and hidden states of ``DEFAULT_HIDDEN_STATE_LAYERS`` layers). The
student is a random Llama (:func:`gold_plugin.demo.models.tiny_llama`) with the student tokenizer's vocabulary:
tiny by default (Mistral's 32,000 ids, hidden 64), realistic with ``--student qwen --hidden 256`` (Qwen's 151,665
ids: the ``[B, T, V]`` logits dominate).

Every variant runs in a fresh subprocess (same seeds, so the same batch and weights) so that one variant's allocator
state does not leak into the next. Peak memory is the peak *above* what was allocated just before the step (the
models, the batch, the teacher's results): CUDA via ``torch.cuda.max_memory_allocated`` (after
``reset_peak_memory_stats``); CPU via the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` with glibc told to return large blocks at once; ``Memory`` of bench_logit_loss.py).
Times are medians over ``--rounds`` subprocesses per variant (rotating order) x ``--repeats`` runs after one
warm-up each; one torch thread on CPU unless ``--threads``.

Run (CPU, tiny):       .venv/bin/python benchmarks/bench_hidden_vs_logit.py --device cpu
Run (CPU, realistic):  .venv/bin/python benchmarks/bench_hidden_vs_logit.py --device cpu --student qwen --hidden 256
Run (GPU):             python3 benchmarks/bench_hidden_vs_logit.py --device cuda --student qwen --hidden 256 --samples 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

VARIANTS = {
    "policy": {"signal": "advantage"},
    "hidden": {"signal": "hidden", "topk": 0},
    "bytes": {"signal": "logit", "logit_projection": "bytes"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--student",
        default="mistral",
        choices=["mistral", "qwen", "gpt2"],
        help="student tokenizer",
    )
    p.add_argument(
        "--teacher",
        default="gpt2",
        choices=["mistral", "qwen", "gpt2"],
        help="teacher tokenizer",
    )
    p.add_argument("--hidden", type=int, default=64, help="student hidden size")
    p.add_argument("--layers", type=int, default=2, help="student layers")
    p.add_argument(
        "--samples",
        type=int,
        default=32,
        help="responses in the batch (one micro-batch)",
    )
    p.add_argument("--tokens", type=int, default=64, help="student tokens per response")
    p.add_argument("--topk", type=int, default=64, help="teacher top-k of the logit loss")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per subprocess, after one warm-up",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="subprocesses per variant, in rotating order",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one variant, print JSON
    p.add_argument("--work_dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def responses(student, count: int, tokens: int, seed: int) -> list[list[int]]:
    """``count`` responses of exactly ``tokens`` student tokens of number-heavy text."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(tokens):
            a, b = int(rng.integers(0, 100_000)), int(rng.integers(0, 10_000))
            kind = int(rng.integers(0, 3))
            parts.append(
                [
                    f"{a} + {b} = {a + b}.",
                    f"The price is {a / 100:.2f} dollars.",
                    f"In {1800 + b % 230}, {a}",
                ][kind]
            )
        ids = student.encode(" ".join(parts), add_special_tokens=False)[:tokens]
        if len(ids) < tokens:
            raise SystemExit(f"only {len(ids)} student tokens in a response; need {tokens}")
        out.append(ids)
    return out


def build(args: argparse.Namespace, variant: str, work: Path):
    """The stand-in trainer (the real LocalTrainer's step methods on a bare object) and the step's experience."""
    from gold_plugin.config import GoldConfig, TeacherConfig
    from gold_plugin.local.modeling import Rollout, tiny_llama
    from gold_plugin.local.trainer import LocalExperience, LocalTrainer
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer
    from gold_plugin.step import LogitVocab, align_results, loss_signals, student_layers, teacher_requests
    from gold_plugin.teacher import HFTeacher
    from gold_plugin.testing.tiny_teacher import save_tiny_teacher

    device = torch.device(args.device)
    options = dict(VARIANTS[variant])
    topk = options.pop("topk", args.topk)
    gold = GoldConfig(**options, teacher=TeacherConfig(topk=topk))
    student_tok, teacher_tok = (
        load_packaged_tokenizer(args.student),
        load_packaged_tokenizer(args.teacher),
    )
    if student_tok.pad_token_id is None:
        student_tok.pad_token = student_tok.eos_token
    teacher_dir = work / f"teacher_{args.teacher}"
    if not (teacher_dir / "config.json").exists():
        save_tiny_teacher(
            teacher_dir,
            args.teacher,
            seed=args.seed,
            max_position_embeddings=4 * args.tokens + 64,
        )
    # The teacher returns the top-k and the hidden states whatever the variant: the same results for all three.
    teacher = HFTeacher(
        str(teacher_dir),
        topk=args.topk,
        device=device,
        dtype="float32",
        micro_batch_size=args.samples,
        hidden_state_layers=gold.teacher.hidden_state_layers or 2,
    )
    response_ids = responses(student_tok, args.samples, args.tokens, args.seed)
    prompt = student_tok.encode("Add the numbers and write the total:", add_special_tokens=False)
    requests = teacher_requests(
        student_tok,
        response_ids,
        ["Add the numbers and write the total:"] * args.samples,
    )
    results = teacher.score(requests)
    del teacher
    aligned = align_results(student_tok, teacher_tok, response_ids, results, gold)

    model = tiny_llama(
        len(student_tok),
        student_tok,
        seed=args.seed,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        max_position_embeddings=len(prompt) + args.tokens + 8,
        tie_word_embeddings=False,
    ).to(device)
    trainer = object.__new__(LocalTrainer)
    trainer.config = SimpleNamespace(temperature=1.0, eps_clip=0.2, micro_batch_size=args.samples)
    trainer.gold, trainer.model, trainer.tokenizer, trainer.device = (
        gold,
        model,
        student_tok,
        device,
    )
    vocab = LogitVocab.build(student_tok, teacher_tok, gold)
    trainer.losses = {name: s.to(device) for name, s in loss_signals(gold, vocab, args.layers).items()}
    trainer.student_layers = student_layers(trainer.losses)
    n = args.samples
    rollout = Rollout([0] * n, [prompt] * n, [list(ids) for ids in response_ids], [False] * n)
    with torch.no_grad():
        old, mask = LocalTrainer._logprobs_in_chunks(trainer, rollout)
    prepared = {
        name: signal.prepare(aligned, response_ids, mask.cpu())[0].to(device)
        for name, signal in trainer.losses.items()
    }
    experience = LocalExperience(
        rollout=rollout,
        off_policy=torch.zeros(args.samples, dtype=torch.bool),
        aligned=aligned,
        prepared=prepared,
        old_logprobs=old,
        mask=mask,
        # Advantages of a typical size (the cost does not depend on their values).
        advantages=torch.randn(old.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        * mask,
        signal=mask.clone(),
        metrics={},
    )
    LocalTrainer.fit_signals(trainer, experience)  # as on a run's first step, before any update
    return trainer, experience


def child(args: argparse.Namespace) -> None:
    from bench_logit_loss import Memory

    from gold_plugin.local.trainer import LocalTrainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainer, experience = build(args, args.child, Path(args.work_dir))
    micro = list(range(args.samples))
    batch_tokens = max(float(experience.mask.sum()), 1.0)
    normalisers = LocalTrainer._normalisers(trainer, experience, micro, batch_tokens)
    batch_groups = normalisers.get("hidden_state", 0.0)
    memory = Memory(device)

    def once() -> tuple[float, int, dict[str, float]]:
        trainer.model.zero_grad(set_to_none=True)
        memory.start()
        start = time.perf_counter()
        loss, metrics = LocalTrainer.micro_batch_loss(trainer, experience, micro, batch_tokens, normalisers)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return elapsed, memory.peak_bytes(), metrics

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    metrics = runs[-1][2]
    print(
        json.dumps(
            {
                "times_s": [r[0] for r in runs],
                "peak_bytes": max(r[1] for r in runs),
                "logit_positions": metrics.get("gold/logit_positions", 0.0),
                "hidden_groups": batch_groups,
                "action_tokens": batch_tokens,
                "vocab": int(trainer.model.config.vocab_size),
            }
        )
    )


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: run with --device cpu.")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            # Rotating order: a load spike from another job does not always hit the same variant.
            shift = round_ % len(args.variants)
            for variant in args.variants[shift:] + args.variants[:shift]:
                cmd = [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--child",
                    variant,
                    "--work_dir",
                    work,
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout + done.stderr)
                    raise SystemExit(f"[{variant}] failed (exit {done.returncode})")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = runs[args.variants[0]][0]
    print(
        f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s); student {args.student} "
        f"(vocabulary {first['vocab']}, hidden {args.hidden}, {args.layers} layers), teacher {args.teacher}; "
        f"{args.samples} responses x {args.tokens} tokens ({first['action_tokens']:.0f} action tokens); top-k "
        f"{args.topk}; {args.rounds} rounds (a fresh subprocess per variant and round, rotating order) x "
        f"{args.repeats} runs; time = median of all runs; peak = the largest, above the allocation before the step "
        f"({'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'VmHWM'})"
    )
    summary = {}
    for variant, rs in runs.items():
        times = [t for r in rs for t in r["times_s"]]
        summary[variant] = {
            "time_s": statistics.median(times),
            "peak_bytes": max(r["peak_bytes"] for r in rs),
        }
        extra = {
            "hidden": f"{rs[0]['hidden_groups']:.0f} aligned groups",
            "bytes": f"{rs[0]['logit_positions']:.1f} teacher positions per sample",
        }
        print(
            f"  {variant:7s} forward+loss+backward {summary[variant]['time_s'] * 1e3:9.1f} ms "
            f"(range {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})   peak extra memory "
            f"{summary[variant]['peak_bytes'] / 2**20:9.1f} MiB   {extra.get(variant, '')}"
        )

    def ratio(a: str, b: str) -> None:
        if a in runs and b in runs:
            per_round = [
                statistics.median(x["times_s"]) / statistics.median(y["times_s"])
                for x, y in zip(runs[a], runs[b])
            ]
            print(
                f"{a} vs {b}: time {summary[a]['time_s'] / summary[b]['time_s']:.3f} (per round "
                f"{min(per_round):.3f}-{max(per_round):.3f}), peak memory "
                f"{summary[a]['peak_bytes'] / summary[b]['peak_bytes']:.3f}"
            )

    ratio("hidden", "bytes")
    ratio("hidden", "policy")
    ratio("bytes", "policy")


if __name__ == "__main__":
    main()
