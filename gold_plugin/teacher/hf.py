"""Hugging Face transformers teacher backend (CPU or GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from gold_plugin.teacher.generation import (
    GenerationParams,
    PreparedPrompt,
    Prompt,
    TeacherGeneration,
    finish,
    prepare_prompts,
    stop_ids,
)
from gold_plugin.teacher.prepare import PreparedSequence, RequestEncoder, build_result
from gold_plugin.teacher.types import TeacherRequest, TeacherResult, TeacherScorer, filled

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gold_plugin.alignment.types import ChatTokenizer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on GPU, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}, got {dtype!r}.")
    return _DTYPES[dtype]


class HFTeacher(TeacherScorer):
    """Scores responses with a ``transformers`` causal LM.

    Sequences are sorted by length and scored ``micro_batch_size`` at a time, right-padded with an
    attention mask and explicit position ids. Only the hidden states at response positions go through
    the output layer, ``logit_chunk_size`` positions at a time, with a float32 log-softmax: no
    ``[batch, length, vocab]`` tensor is ever built.

    Args:
        model_name_or_path: HF folder or hub name, or an already loaded ``PreTrainedModel``.
        tokenizer_name_or_path: the teacher tokenizer if it is not stored with the model.
        topk: top-k ids and log-probs per response position (0 = only the response tokens' log-probs).
        max_len: teacher context; default the model's ``max_position_embeddings``.
        micro_batch_size: sequences per forward pass.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        end_of_turn_token: token scored when a response ended with the student's EOS (see
            :class:`~gold_plugin.teacher.prepare.RequestEncoder`).
        logit_chunk_size: response positions per output-layer chunk: the ``[positions, vocabulary]`` logits and
            float32 log-probs exist for this many positions at a time, whatever the response length
            (``--gold.teacher.logprob_chunk_size``).
        tokenizer: an already loaded tokenizer (overrides ``tokenizer_name_or_path``).
        hidden_state_layers: return the hidden states of this many layers at relative depths k/n after every scored
            response token (:attr:`TeacherResult.hidden_states`), each reduced to ``hidden_state_rank`` dimensions
            by :func:`~gold_plugin.signals.hidden_states.teacher_sketch`; 0 = none.
        hidden_state_rank: the sketch's rank.
    """

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        tokenizer_name_or_path: str | None = None,
        *,
        topk: int = 0,
        max_len: int | None = None,
        micro_batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        end_of_turn_token: str | None = None,
        logit_chunk_size: int = 2048,
        tokenizer: ChatTokenizer | None = None,
        hidden_state_layers: int = 0,
        hidden_state_rank: int = 64,
    ) -> None:
        from transformers import AutoModelForCausalLM

        from gold_plugin.teacher.tokenizer import load_tokenizer

        if topk < 0 or micro_batch_size < 1 or logit_chunk_size < 1:
            raise ValueError("topk must be >= 0, micro_batch_size and logit_chunk_size >= 1.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, self.device)
        if isinstance(model_name_or_path, str):
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
            source = tokenizer_name_or_path or model_name_or_path
        else:  # an already loaded model keeps its dtype unless one is asked for
            model = model_name_or_path if dtype == "auto" else model_name_or_path.to(torch_dtype)
            source = tokenizer_name_or_path or getattr(model, "name_or_path", None)
        if tokenizer is None:
            if not source:
                raise ValueError("Give the teacher tokenizer (tokenizer_name_or_path or tokenizer).")
            tokenizer = load_tokenizer(source)
        self.model = model.to(self.device).eval()
        self._tokenizer = tokenizer
        self.topk = int(topk)
        self.micro_batch_size = int(micro_batch_size)
        self.logit_chunk_size = int(logit_chunk_size)
        config = self.model.config
        self.max_len = int(max_len or getattr(config, "max_position_embeddings", 0) or 0)
        if self.max_len < 2:
            raise ValueError("Set max_len: the model config has no max_position_embeddings.")
        self.encoder = RequestEncoder(tokenizer, self.max_len, end_of_turn_token)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self._decoder = self._find_decoder()
        self._lm_head = self.model.get_output_embeddings()
        self.hidden_layers: tuple[int, ...] = ()
        self._sketch: torch.Tensor | None = None
        if hidden_state_layers:
            from gold_plugin.signals.hidden_states import layers_at_depths, teacher_sketch

            self.hidden_layers = layers_at_depths(int(config.num_hidden_layers), int(hidden_state_layers))
            sketch = teacher_sketch(int(config.hidden_size), int(hidden_state_rank))
            self._sketch = sketch.to(self.device)

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._tokenizer

    def _find_decoder(self) -> torch.nn.Module | None:
        try:
            decoder = self.model.get_decoder()
        except (AttributeError, NotImplementedError):
            return None
        return None if decoder is None or decoder is self.model else decoder

    def _finalize_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-specific output transforms that ``CausalLM.forward`` applies after the output layer."""
        config = self.model.config
        scale = getattr(config, "logit_scale", None)  # Cohere
        if isinstance(scale, (int, float)) and scale != 1:
            logits = logits * scale
        scaling = getattr(config, "logits_scaling", None)  # Granite
        if isinstance(scaling, (int, float)) and scaling != 1:
            logits = logits / scaling
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        if isinstance(cap, (int, float)) and cap > 0:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _sketched_states(
        self, all_states: tuple[torch.Tensor, ...], rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """float16 ``[positions, L, r]``: the chosen layers' states at ``(rows, cols)``, through the sketch."""
        assert self._sketch is not None
        picked = torch.stack([all_states[layer][rows, cols] for layer in self.hidden_layers], dim=1)
        return (picked.float() @ self._sketch).half()

    def score(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        results, todo, prepared = self.encoder.partition(requests, self.topk)
        by_length = sorted(range(len(todo)), key=lambda k: prepared[k].input_ids.shape[0], reverse=True)
        todo, prepared = [todo[k] for k in by_length], [prepared[k] for k in by_length]
        for start in range(0, len(todo), self.micro_batch_size):
            batch = todo[start : start + self.micro_batch_size]
            sequences = prepared[start : start + self.micro_batch_size]
            for index, seq, scores in zip(batch, sequences, self._score_batch(sequences)):
                results[index] = build_result(seq, self.topk, *scores)
        return filled(results)

    @torch.inference_mode()
    def _score_batch(
        self, sequences: list[PreparedSequence]
    ) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
        lengths = np.array([s.input_ids.shape[0] for s in sequences])
        batch, width = len(sequences), int(lengths.max())
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : lengths[row]] = seq.input_ids
        attention = np.arange(width)[None, :] < lengths[:, None]
        # Flat (row, position) of the logits that predict each scored response token.
        counts = np.array([s.num_scored for s in sequences])
        rows = np.repeat(np.arange(batch), counts)
        starts = np.array([s.prompt_len + s.first_scored - 1 for s in sequences])
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = np.repeat(starts, counts) + offsets
        targets = ids[rows, cols + 1]

        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(attention.astype(np.int64)).to(self.device)
        position_ids = torch.arange(width, device=self.device).unsqueeze(0).expand(batch, -1)
        rows_t = torch.from_numpy(rows).to(self.device)
        cols_t = torch.from_numpy(cols).to(self.device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
            "output_hidden_states": bool(self.hidden_layers),
        }
        states = None
        if self._decoder is not None:
            out = self._decoder(**inputs)
            selected = out.last_hidden_state[rows_t, cols_t]
            project = self._lm_head
        else:  # no separable decoder: full logits (in the model's dtype), only for exotic models
            out = self.model(**inputs)
            selected = out.logits[rows_t, cols_t]
        if (
            self.hidden_layers
        ):  # the state after reading each scored token: its own position, one after its logits
            states = self._sketched_states(out.hidden_states, rows_t, cols_t + 1).cpu().numpy()
        del out
        if self._decoder is None:

            def project(x: torch.Tensor) -> torch.Tensor:
                return x

        targets_t = torch.from_numpy(targets).to(self.device)
        token_lp, top_ids, top_lp = [], [], []
        for begin in range(0, selected.shape[0], self.logit_chunk_size):
            chunk = slice(begin, begin + self.logit_chunk_size)
            logits = project(selected[chunk]).float()
            if self._decoder is not None:
                logits = self._finalize_logits(logits)
            logprobs = torch.log_softmax(logits, dim=-1)
            token_lp.append(logprobs.gather(-1, targets_t[chunk, None]).squeeze(-1).cpu())
            if self.topk > 0:
                k = min(self.topk, logprobs.shape[-1])
                values, indices = torch.topk(logprobs, k, dim=-1)
                top_ids.append(indices.cpu())
                top_lp.append(values.cpu())
        split = np.cumsum(counts)[:-1]
        lp = np.split(torch.cat(token_lp).numpy().astype(np.float32), split)
        per_sequence_states = np.split(states, split) if states is not None else [None] * batch
        if self.topk == 0:
            return [(x, None, None, h) for x, h in zip(lp, per_sequence_states)]
        ids_np = torch.cat(top_ids).numpy().astype(np.int64)
        lps_np = torch.cat(top_lp).numpy().astype(np.float32)
        if ids_np.shape[1] < self.topk:  # vocabulary smaller than k: pad
            pad = self.topk - ids_np.shape[1]
            ids_np = np.pad(ids_np, ((0, 0), (0, pad)), constant_values=-1)
            lps_np = np.pad(lps_np, ((0, 0), (0, pad)), constant_values=-np.inf)
        return list(zip(lp, np.split(ids_np, split), np.split(lps_np, split), per_sequence_states))

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[TeacherGeneration]:
        """One completion per prompt, in order: ``model.generate`` on the prompt's teacher ids (the scoring rule:
        chat messages through the teacher's own template), ``micro_batch_size`` prompts at a time, left-padded,
        stopping at the teacher's end-of-turn or EOS token. Seeded by ``params.seed`` (torch's generator is
        restored afterwards); greedy at temperature 0. A prompt that cannot be rendered gets ``error``."""
        prepared = prepare_prompts(self.encoder, prompts, params.max_new_tokens)
        results: list[TeacherGeneration | None] = [
            TeacherGeneration("", False, error=p) if isinstance(p, str) else None for p in prepared
        ]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
        # Prompts with the same room for new tokens share micro-batches (one max_new_tokens per generate call).
        todo.sort(key=lambda i: (prepared[i].max_new_tokens, prepared[i].input_ids.shape[0]))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(params.seed))
            start = 0
            while start < len(todo):
                room = prepared[todo[start]].max_new_tokens
                batch = [
                    i
                    for i in todo[start : start + self.micro_batch_size]
                    if prepared[i].max_new_tokens == room
                ]
                for index, generation in zip(
                    batch, self._generate_batch([prepared[i] for i in batch], params)
                ):
                    results[index] = generation
                start += len(batch)
        return filled(results)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[PreparedPrompt], params: GenerationParams
    ) -> list[TeacherGeneration]:
        from transformers import GenerationConfig

        width = max(int(p.input_ids.shape[0]) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token is at the same column
            length = int(prompt.input_ids.shape[0])
            ids[row, width - length :] = torch.from_numpy(prompt.input_ids)
            attention[row, width - length :] = 1
        stops = stop_ids(self.encoder)
        sampling = {"do_sample": False} if params.greedy else {
            "do_sample": True, "temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": 0
        }  # fmt: skip
        config = GenerationConfig(
            max_new_tokens=prompts[0].max_new_tokens,
            eos_token_id=stops or None,
            pad_token_id=self.pad_id,
            **sampling,
        )
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attention.to(self.device), generation_config=config
        )
        new = out[:, width:].cpu().tolist()
        return [finish(self._tokenizer, row, stops, p.max_new_tokens) for row, p in zip(new, prompts)]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._decoder = None
        self._lm_head = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def shipped_state_width(model_name_or_path: str | None, rank: int) -> int:
    """Dimensions of each hidden state an hf teacher of this model ships: ``min(hidden size, rank)``, as its sketch
    (:func:`~gold_plugin.signals.hidden_states.teacher_sketch`) gives; ``rank`` when the config cannot be read."""
    from transformers import AutoConfig

    if not model_name_or_path:
        return int(rank)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
        hidden = int(config.get_text_config().hidden_size)
    except (OSError, ValueError, AttributeError, TypeError):
        return int(rank)
    return min(hidden, int(rank))
