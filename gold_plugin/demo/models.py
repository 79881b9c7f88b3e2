"""The demo's models: the tiny Llama builder and the supervised fine-tuning that prepares teacher and student.

Plain torch + transformers (no Ray), on CPU or one GPU; the tiny Llama itself is the local backend's
(:func:`gold_plugin.local.modeling.tiny_llama`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from gold_plugin.local.modeling import encode_prompt, response_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    input_key: str = "input",
    label_key: str = "label",
    log: Callable[[int, float], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 25,
    constant_lr: bool = False,
    response_logits_only: bool = False,
) -> int:
    """Supervised fine-tuning on ``prompt -> label + EOS`` (loss on the answer and EOS only), cosine LR after a
    50-step warmup (``constant_lr``: no decay).

    ``stop(step)`` is asked every ``check_every`` steps and ends training early when it returns True.
    ``response_logits_only``: the output layer runs at the answer positions only (large vocabularies).
    Returns the number of steps taken.
    """
    rng = random.Random(seed)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = [
        (encode_prompt(tokenizer, r[input_key]), encode_prompt(tokenizer, str(r[label_key])) + [eos_id])
        for r in records
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / 50)
            * (1.0 if constant_lr else 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
        ),
    )
    model.train()
    for step in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        prompts, answers = [b[0] for b in batch], [b[1] for b in batch]
        out = response_forward(model, prompts, answers, pad_id, response_logits_only=response_logits_only)
        logprobs, mask = out.logprobs, out.action_mask
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log is not None:
            log(step, float(loss))
        if stop is not None and (step + 1) % check_every == 0 and stop(step + 1):
            model.eval()
            return step + 1
        model.train()
    model.eval()
    return steps
