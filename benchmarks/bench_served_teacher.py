"""A served teacher (``vllm serve``, called over HTTP) against the in-cluster vllm backend, on the same requests.

Side by side in one run, on the same weights: :class:`VLLMTeacher` (an engine in this process, as a teacher replica
holds it) and :class:`ServedTeacher` (a real ``vllm serve`` of the same folder on 127.0.0.1, started here). Repeats
are interleaved (in-cluster, served, in-cluster, ...). Printed: response tokens scored per second for each and
their ratio, and the bytes that came over the wire per scored response position and per prompt position (vLLM's
``prompt_logprobs`` covers the whole prompt, and each entry is JSON with the decoded token), beside the bytes a
:class:`TeacherResult` holds per position (what a Ray replica ships). The results are checked to be equal.

Model: a tiny Llama built from a config (``--hidden`` wide, 4 layers, the gpt2 test tokenizer's 50,257 ids,
float32)::

    python3 benchmarks/bench_served_teacher.py                # CPU, about 3 min on 2 cores
    python3 benchmarks/bench_served_teacher.py --model DIR    # any model folder vLLM serves (a GPU build on GPUs)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = [
    "the",
    "sea",
    "river",
    "mountain",
    "number",
    "seventeen",
    "42",
    "café",
    "naïve",
    "東京",
    "😀",
    "because",
    "although",
    "quickly",
    "teacher",
]


def requests_for(count: int, words: int, seed: int = 0):
    from gold_plugin.teacher import TeacherRequest

    rng = random.Random(seed)
    return [
        TeacherRequest(
            [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20))}],
            " ".join(rng.choice(WORDS) for _ in range(words)),
            ends_with_eos=True,
        )
        for _ in range(count)
    ]


def main() -> None:
    from gold_plugin.teacher import ServedTeacher, VLLMTeacher
    from gold_plugin.testing.tiny_teacher import save_tiny_teacher, vllm_cpu_engine_kwargs
    from gold_plugin.testing.vllm_server import SERVED_NAME, VLLMServer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a model folder (default: a tiny Llama built here)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--response-words", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            save_tiny_teacher(
                Path(tmp) / "teacher", "gpt2", seed=0, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.max_len,
            )
        )  # fmt: skip
        requests = requests_for(args.requests, args.response_words)
        in_cluster = VLLMTeacher(model, topk=args.topk, max_len=args.max_len, **vllm_cpu_engine_kwargs(256))
        with VLLMServer(
            model, max_logprobs=args.topk, max_model_len=args.max_len, log_path=Path(tmp) / "log"
        ) as srv:
            served = ServedTeacher([srv.url], SERVED_NAME, in_cluster.tokenizer, topk=args.topk)
            times: dict[str, list[float]] = {"in-cluster vllm": [], "served vllm": []}
            for _ in range(args.repeats):
                for name, teacher in (("in-cluster vllm", in_cluster), ("served vllm", served)):
                    start = time.perf_counter()
                    results = teacher.score(requests)
                    times[name].append(time.perf_counter() - start)
                    if name == "in-cluster vllm":
                        reference = results
            for a, b in zip(results, reference):
                np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
            wire = served.last_call.bytes_received
            served.close()
        in_cluster.close()

    scored = sum(int(r.scored.sum()) for r in results)
    prompt_positions = sum(len(served.encoder.prompt_ids(q.prompt)) for q in requests)
    held = sum(
        r.token_ids.nbytes + r.logprobs.nbytes + r.topk_ids.nbytes + r.topk_logprobs.nbytes for r in results
    )
    print(
        f"{args.requests} requests, {scored} scored response tokens, {prompt_positions} prompt tokens, top-{args.topk}"
    )
    rates = {}
    for name, seconds in times.items():
        best = min(seconds)
        rates[name] = scored / best
        print(f"  {name:<16} {rates[name]:>9.0f} response tokens/s (best of {len(seconds)}; median "
              f"{statistics.median(seconds):.2f} s)")  # fmt: skip
    print(f"  served / in-cluster throughput: {rates['served vllm'] / rates['in-cluster vllm']:.2f}")
    print(f"  on the wire: {wire / scored:,.0f} bytes per scored response position "
          f"({wire / (scored + prompt_positions):,.0f} per prompt or response position); a TeacherResult holds "
          f"{held / scored:,.0f} bytes per position")  # fmt: skip


if __name__ == "__main__":
    main()
