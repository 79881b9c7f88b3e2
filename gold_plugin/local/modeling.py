"""Student-side model utilities for the local backend: sampling, log-probs, greedy accuracy, the tiny Llama.

Everything here is plain torch + transformers (no Ray), so it runs on CPU or one GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """Sampled responses for a batch of prompts (``n`` per prompt, prompt-major order).

    ``response_ids[i]`` ends with the EOS id when ``ends_with_eos[i]``; otherwise it was cut at
    ``max_new_tokens``. Padding is already stripped.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ends_with_eos: list[bool]
    teacher_written: list[bool] = field(default_factory=list)
    """Per sample: an off-policy completion the teacher wrote (``--gold.off_policy_source``); empty = none."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_samples_per_prompt: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    micro_batch_size: int = 256,
) -> Rollout:
    """Batched ``generate`` with left padding; responses are cut after the first EOS."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    expanded = [(i, list(p)) for i, p in enumerate(prompt_ids) for _ in range(n_samples_per_prompt)]
    rollout = Rollout([], [], [], [])
    was_training = model.training
    model.eval()
    for start in range(0, len(expanded), micro_batch_size):
        chunk = expanded[start : start + micro_batch_size]
        ids, mask = _left_pad([p for _, p in chunk], pad_id, device)
        kwargs = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": temperature, "top_p": top_p}
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            top_k=None,
            **kwargs,
        )
        new = out[:, ids.shape[1] :].tolist()
        for (index, prompt), row in zip(chunk, new):
            ends = eos_id in row
            response = row[: row.index(eos_id) + 1] if ends else row
            rollout.prompt_index.append(index)
            rollout.prompt_ids.append(prompt)
            rollout.response_ids.append(response)
            rollout.ends_with_eos.append(ends)
    model.train(was_training)
    return rollout


def pack_right(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded ``[prompt | response]`` rows, their attention mask, and the response (action) mask.

    ``action_mask[b, j]`` marks response token j of row b, j in ``[0, max_response_len)``; the log-prob of
    that token is read from the logits at position ``len(prompt) + j - 1``.
    """
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    num_actions = max(max((len(r) for r in response_ids), default=0), 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    action_mask = torch.zeros((len(rows), num_actions), dtype=torch.bool)
    for b, (row, response) in enumerate(zip(rows, response_ids)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[b, : len(row)] = 1
        action_mask[b, : len(response)] = True
    return ids.to(device), attn.to(device), action_mask.to(device), num_actions


@dataclass
class ResponseForward:
    """The student's forward over ``[prompt | response]`` rows, read at the response tokens."""

    action_logits: torch.Tensor
    """``[B, A, V]``: the logits that predict response token j (float32, divided by the temperature)."""
    logprobs: torch.Tensor
    """``[B, A]``: log-probs of the taken tokens (0 outside responses)."""
    action_mask: torch.Tensor
    """``[B, A]`` bool."""
    hidden_states: torch.Tensor | None = None
    """``[B, A, L, d]``: the asked layers' states after reading response token j (None unless asked for)."""


def response_forward(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    temperature: float = 1.0,
    hidden_layers: Sequence[int] = (),
    response_logits_only: bool = False,
) -> ResponseForward:
    """One forward of the rows; gradients flow when called under grad. ``hidden_layers`` are indices into
    ``transformers``' ``output_hidden_states`` (0 = the embeddings). ``response_logits_only``: the output layer
    runs only from the shortest prompt's last token on (``logits_to_keep``), which saves most of a large
    vocabulary's cost on short answers; the values are the same up to float rounding."""
    device = next(model.parameters()).device
    ids, attn, action_mask, num_actions = pack_right(prompt_ids, response_ids, pad_id, device)
    width = ids.shape[1]
    first_kept = max(min(len(p) for p in prompt_ids) - 1, 0) if response_logits_only else 0
    keep = {"logits_to_keep": width - first_kept} if response_logits_only else {}
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=bool(hidden_layers), **keep)
    logits = out.logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    prompt_len = torch.tensor([len(p) for p in prompt_ids], device=device)
    offsets = torch.arange(num_actions, device=device)
    # logits at position t predict token t+1: response token j sits at prompt_len + j.
    gather_pos = (prompt_len[:, None] + offsets[None, :] - 1).clamp(first_kept, width - 1) - first_kept
    token_pos = (prompt_len[:, None] + offsets[None, :]).clamp(0, width - 1)
    batch_index = torch.arange(len(prompt_ids), device=device)[:, None]
    action_logits = logits[batch_index, gather_pos]
    taken = ids[batch_index, token_pos]
    logprobs = torch.log_softmax(action_logits, dim=-1).gather(-1, taken[..., None]).squeeze(-1)
    logprobs = logprobs * action_mask
    states = None
    if hidden_layers:
        states = torch.stack(
            [out.hidden_states[layer][batch_index, token_pos] for layer in hidden_layers], dim=2
        )
    return ResponseForward(action_logits, logprobs, action_mask, states)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    check: Callable[[str, str], bool],
    *,
    input_key: str = "input",
    label_key: str = "label",
    max_new_tokens: int = 8,
    micro_batch_size: int = 512,
) -> float:
    """Share of records whose greedy response passes ``check(response_text, label)``."""
    prompts = [encode_prompt(tokenizer, r[input_key]) for r in records]
    rollout = sample(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        greedy=True,
        micro_batch_size=micro_batch_size,
    )
    correct = 0
    for response, record in zip(rollout.response_ids, records):
        text = tokenizer.decode(response, skip_special_tokens=True)
        correct += int(check(text, str(record[label_key])))
    return correct / max(len(records), 1)


def tiny_llama(
    vocab_size: int, tokenizer: PreTrainedTokenizerBase | None = None, *, seed: int = 0, **config: Any
) -> LlamaForCausalLM:
    """A small randomly initialised ``LlamaForCausalLM`` built from a config (no download): the project's one
    tiny-model builder (the demo's models, the tests' teachers and students).

    Defaults: 2 layers, ``hidden_size`` 128 (``intermediate_size`` twice that), 4 heads, 64 positions, tied
    embeddings; with ``tokenizer``, its EOS and pad ids and no BOS. ``config`` overrides any ``LlamaConfig``
    field. Weights are drawn after ``torch.manual_seed(seed)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = config.get("hidden_size", 128)
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }
    if tokenizer is not None:
        values.update(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
        )
    values.update(config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**values))
