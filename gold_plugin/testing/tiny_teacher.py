"""A tiny Llama-style teacher for tests and demos (random weights, a real test tokenizer, CPU-fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_llama_config(vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer, 32-wide ``LlamaConfig``; ``initializer_range`` is large enough that the next-token
    distributions are far from uniform (so scoring mistakes show up in comparisons)."""
    from transformers import LlamaConfig

    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.2,
        "tie_word_embeddings": False,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_teacher(
    out_dir: str | Path, tokenizer_name: str = "mistral", seed: int = 0, **overrides: Any
) -> Path:
    """Build a tiny ``LlamaForCausalLM`` with the vocabulary of test tokenizer ``tokenizer_name``
    (``gpt2``, ``qwen`` or ``mistral``), save it with the tokenizer into ``out_dir`` and return it."""
    import torch
    from transformers import LlamaForCausalLM

    from gold_plugin.testing.tokenizers import load_test_tokenizer

    tokenizer = load_test_tokenizer(tokenizer_name)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **overrides))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
