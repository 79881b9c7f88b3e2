"""Scoring throughput of the hf teacher backend on one GPU (tokens/s), for top-k 0 and 64.

Model: a ~1.2B-parameter Llama built from a config (Llama-3.2-1B shape: 16 layers, width 2048, vocab
128,256), random bf16 weights. Batch: ``--batch-size`` chat prompts, each with a response of
``--response-tokens`` teacher tokens. Baseline in the same process: the naive scorer that runs the
full ``CausalLM.forward`` and a float32 log-softmax over ``[batch, length, vocab]`` (what
:class:`HFTeacher` avoids); the ratio of the two is printed.

Needs only torch + transformers + tokenizers (no Ray, no vLLM, no internet)::

    python3 benchmarks/bench_teacher_throughput.py                 # GPU, full size
    python3 benchmarks/bench_teacher_throughput.py --quick         # CPU smoke test, tiny model

The tokenizer: ``--tokenizer-dir`` (any HF tokenizer folder), else the gpt2 test tokenizer if its
carrier package is installed, else a byte-level BPE trained in-script with ``tokenizers``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

WORDS_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more out up into do any your "
    "what some can other than then its time only could new these two may first also after where most over "
    "model token teacher student river mountain quickly carefully because although number seventeen 42 3.14 "
    "über café naïve résumé 東京 数学 проверка é ü 😀"
)
WORDS = WORDS_TEXT.split(" ")


def build_bpe_tokenizer(out_dir: Path, vocab_size: int = 8000):
    """A byte-level BPE (GPT-2 style) trained in milliseconds on generated text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(tokenizer_dir: str | None, workdir: Path):
    from transformers import AutoTokenizer

    if tokenizer_dir:
        return AutoTokenizer.from_pretrained(tokenizer_dir), f"folder {tokenizer_dir}"
    try:
        from gold_plugin.testing.tokenizers import load_test_tokenizer

        return load_test_tokenizer("gpt2"), "gpt2 test tokenizer"
    except Exception:
        return build_bpe_tokenizer(workdir / "bpe"), "in-script byte-level BPE"


def make_requests(tokenizer, batch_size: int, response_tokens: int, seed: int = 0):
    """Chat prompts and responses that the teacher tokenises into about ``response_tokens`` tokens."""
    from gold_plugin.alignment import encode_continuation, text_for_teacher
    from gold_plugin.teacher import TeacherRequest

    rng = random.Random(seed)
    requests = []
    for i in range(batch_size):
        text = " ".join(rng.choice(WORDS) for _ in range(response_tokens * 2))
        ids = encode_continuation(tokenizer, text)[:response_tokens]
        response = text_for_teacher(tokenizer, ids)
        prompt = [
            {"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(40))}
        ]
        requests.append(TeacherRequest(prompt, response, ends_with_eos=True))
    return requests


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Median seconds over ``repeats`` runs (after one warm-up), peak GPU memory (GiB), last output."""
    out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def naive_scores(model, teacher, requests, micro_batch_size: int, topk: int):
    """Baseline: full forward logits and a float32 log-softmax over [batch, length, vocab]."""
    from gold_plugin.teacher.prepare import PreparedSequence

    prepared = [p for p in teacher.encoder.prepare_all(requests) if isinstance(p, PreparedSequence)]
    device = teacher.device
    total = 0
    with torch.inference_mode():
        for start in range(0, len(prepared), micro_batch_size):
            chunk = prepared[start : start + micro_batch_size]
            width = max(len(p.input_ids) for p in chunk)
            ids = torch.full((len(chunk), width), teacher.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, : len(p.input_ids)] = torch.from_numpy(p.input_ids)
                mask[row, : len(p.input_ids)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            targets = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            if topk:
                torch.topk(logprobs, topk, dim=-1)
            total += sum(p.num_scored for p in chunk)
            del logprobs, targets
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, short responses, CPU: a smoke test")
    parser.add_argument("--tokenizer-dir", default=None, help="HF tokenizer folder (default: see above)")
    parser.add_argument("--batch-size", type=int, default=32, help="responses per scored batch")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument(
        "--vocab-size", type=int, default=128256, help="model vocabulary (>= the tokenizer's)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topk", type=int, nargs="+", default=[0, 64])
    parser.add_argument(
        "--skip-baseline", action="store_true", help="do not run the naive full-logits scorer"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available (required unless --quick)")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from gold_plugin.teacher import HFTeacher

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick and args.device is None:
        sys.exit("No CUDA device: run with --quick for the CPU smoke test.")
    workdir = Path(tempfile.mkdtemp(prefix="bench_teacher_"))
    tokenizer, tokenizer_source = load_tokenizer(args.tokenizer_dir, workdir)
    if args.quick:
        args.batch_size, args.micro_batch_size, args.response_tokens, args.repeats = 4, 2, 64, 1
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        shape.update(num_key_value_heads=2, vocab_size=len(tokenizer))
    else:  # Llama-3.2-1B shape
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32)
        shape.update(
            num_key_value_heads=8, vocab_size=max(args.vocab_size, len(tokenizer)), rope_theta=500000.0
        )
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    teacher = HFTeacher(model, tokenizer=tokenizer, micro_batch_size=args.micro_batch_size, device=device)
    requests = make_requests(tokenizer, args.batch_size, args.response_tokens)
    prep_start = time.perf_counter()
    prepared = teacher.encoder.prepare_all(requests)
    prep_s = time.perf_counter() - prep_start
    scored = sum(p.num_scored for p in prepared if not isinstance(p, str))
    lengths = [len(p.input_ids) for p in prepared if not isinstance(p, str)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={gpu} params={params / 1e9:.3f}B dtype={dtype} tokenizer={tokenizer_source} "
        f"(vocab {len(tokenizer)}) model_vocab={config.vocab_size}"
    )
    print(
        f"batch={args.batch_size} micro_batch={args.micro_batch_size} scored_tokens={scored} "
        f"sequence_length={min(lengths)}..{max(lengths)} tokenisation={prep_s:.3f}s"
    )
    rows = []
    for topk in args.topk:
        teacher.topk = topk
        seconds, peak, _ = timed(lambda: teacher.score(requests), device, args.repeats)
        row = {"scorer": "HFTeacher", "topk": topk, "seconds": seconds, "tokens_per_s": scored / seconds}
        row["peak_gib"] = peak
        if not args.skip_baseline:
            try:
                base_s, base_peak, _ = timed(
                    lambda k=topk: naive_scores(model, teacher, requests, args.micro_batch_size, k),
                    device,
                    args.repeats,
                )
                row.update(baseline_tokens_per_s=scored / base_s, baseline_peak_gib=base_peak)
                row["speedup_vs_baseline"] = base_s / seconds
            except torch.OutOfMemoryError:
                row.update(baseline_tokens_per_s=None, baseline_peak_gib="OOM")
                torch.cuda.empty_cache()
        rows.append(row)
        text = f"topk={topk:3d}: {row['tokens_per_s']:,.0f} tokens/s ({seconds:.3f} s/batch, peak {peak:.2f} GiB)"
        if row.get("baseline_tokens_per_s"):
            text += (
                f" | naive full-logits scorer: {row['baseline_tokens_per_s']:,.0f} tokens/s, peak "
                f"{row['baseline_peak_gib']:.2f} GiB -> speed ratio {row['speedup_vs_baseline']:.2f}x"
            )
        elif row.get("baseline_peak_gib") == "OOM":
            text += " | naive full-logits scorer: out of memory"
        print(text, flush=True)
    if len(rows) > 1 and rows[0]["topk"] == 0:
        for row in rows[1:]:
            print(
                f"cost of topk={row['topk']}: {rows[0]['tokens_per_s'] / row['tokens_per_s']:.3f}x the time of topk=0"
            )
    print("JSON " + json.dumps({"device": gpu, "params": params, "rows": rows}))
    if args.quick:  # sanity: the teacher's scores equal a direct forward of the first request
        from gold_plugin.teacher.prepare import PreparedSequence

        teacher.topk = 0
        first = prepared[0]
        assert isinstance(first, PreparedSequence)
        [result] = teacher.score(requests[:1])
        with torch.inference_mode():
            ids = torch.from_numpy(first.input_ids)[None].to(device)
            lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        start = first.prompt_len - 1
        ref = lp[start : start + first.num_scored].gather(-1, ids[0, first.prompt_len :, None]).squeeze(-1)
        err = float((torch.from_numpy(result.logprobs).to(device) - ref).abs().max())
        print(f"quick check: max |teacher - direct forward| = {err:.2e}")
        assert err < 1e-4, err


if __name__ == "__main__":
    main()
